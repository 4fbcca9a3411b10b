"""Import TotalSegmentator's companion resources (classifiers, atlas) into tsrt's store, once.

TotalSegmentator ships them in its package's `resources/` folder:

- contrast phase: `contrast_phase_classifiers_2024_07_19.pkl`, a pickled dict fold -> XGBRegressor.
  Unpickling runs code, so only this toolchain does it, once, on the file of an installed
  totalsegmentator; each regressor's Booster is re-saved in xgboost's JSON format and checked to
  predict bit-identically to the pickled one before it is installed. The runtime only loads the JSON.
- modality: `modality_classifiers[_normalized]_2025_02_24.json.N`, xgboost classifiers in
  xgboost's binary (UBJSON) format, re-saved as JSON and checked the same way.
- Evans index: `ct_brain_atlas_1mm.nii.gz`, copied as it is.

TotalSegmentator keeps the body-stats predictors of `totalseg_get_body_stats` in its weights folder
(home/nnunet/results; `source` is the home or that folder) instead:

- body_stats_xgb: `body_stats_models_2026_03_24/<target>_<ct|mr>_classifiers_2026_03_24_foldN.json`,
  xgboost binary payloads despite the name, re-saved as JSON and checked like the modality models.
- body_stats_ct / body_stats_mr: `lightning_models/<ct|mr>_all_ext_splitOrig_noise_can1_huber/version_N/
  checkpoints/*.ckpt`, Lightning checkpoints of a MONAI ResNet3D per fold. They are read with tsrt's
  restricted checkpoint reader (never torch.load: nothing in them can run), the network is rebuilt
  the way TotalSegmentator builds it (MONAI's resnet10/18/50 with its head) and exported to ONNX with
  torch; the graph must give the torch network's outputs on seeded random tiles before it is installed.
  `fold_N.json` keeps the checkpoint's hyperparameters (preprocessing, output names, denormalisation).

Files land in the store through `tsrt.models.resources.install_resource` (staged, sha256 manifest, rename).
The classifiers need no torch and no scikit-learn (only Boosters are touched); the body-stats networks
need the export extra (torch, MONAI).
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tsrt.errors import ModelError
from tsrt.errors import require_module
from tsrt.models.resources import (
    BODY_STATS_CNN_FOLDERS,
    BODY_STATS_FOLDS,
    BODY_STATS_MODALITIES,
    BODY_STATS_TARGETS,
    BODY_STATS_XGB_FOLDER,
    RESOURCES,
    body_stats_xgb_file,
    install_resource,
    resource_spec,
)

PHASE_PICKLE = "contrast_phase_classifiers_2024_07_19.pkl"
MODALITY_FILES = {
    "intensity": "modality_classifiers_2025_02_24.json",
    "normalized": "modality_classifiers_normalized_2025_02_24.json",
}
MODALITY_FEATURES = {"intensity": 4, "normalized": 16}
EVANS_ATLAS = "ct_brain_atlas_1mm.nii.gz"
#: Random probe inputs on which a converted model must predict exactly like the original.
_PROBES = 512


def totalseg_resources(source: Path | None = None) -> Path:
    """TotalSegmentator's resources folder: `source`, else the installed package's (found without importing it)."""
    if source is not None:
        folder = Path(source)
        if not folder.is_dir():
            raise ModelError(f"{folder} is not a folder: pass TotalSegmentator's resources folder.")
        return folder
    spec = importlib.util.find_spec("totalsegmentator")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "totalsegmentator is not installed, so its classifiers cannot be imported: "
            "pip install totalsegmentator (--no-deps is enough), or pass --resources DIR."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "resources"


def _source_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise ModelError(f"{folder} has no {name}: pass the resources folder of TotalSegmentator 2.x.")
    return path


def _totalseg_version() -> str:
    try:
        return metadata.version("totalsegmentator")
    except metadata.PackageNotFoundError:
        return "unknown"


def _check_same_predictions(original: Any, converted: Any, n_features: int, scale: float, what: str) -> None:
    """Refuse a conversion that changes any prediction (xgboost JSON is meant to be lossless)."""
    rng = np.random.default_rng(0)
    probes = rng.uniform(-scale, scale, size=(_PROBES, n_features))
    if not np.array_equal(original.inplace_predict(probes), converted.inplace_predict(probes)):
        raise ModelError(f"{what} predicts differently after conversion to JSON; nothing was installed.")


def _convert_phase(folder: Path, work: Path) -> dict[str, Path]:
    xgboost = require_module("xgboost", "Importing the contrast phase classifiers", "phase")
    with open(_source_file(folder, PHASE_PICKLE), "rb") as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xgboost's note that the pickle came from an older xgboost: we re-save it
        regressors = pickle.load(handle)  # noqa: S301 - the installed TotalSegmentator's own file, toolchain only
    if sorted(regressors) != list(range(5)):
        raise ModelError(f"{PHASE_PICKLE} holds folds {sorted(regressors)}, expected 0-4: a different release.")
    files = {}
    for fold, regressor in sorted(regressors.items()):
        booster = regressor.get_booster()  # what the scikit-learn wrapper predicts with
        path = work / f"fold_{fold}.json"
        booster.save_model(str(path))
        converted = xgboost.Booster(model_file=str(path))
        _check_same_predictions(booster, converted, 20, 500.0, f"Phase regressor fold {fold}")
        files[path.name] = path
    return files


def _convert_modality(folder: Path, work: Path) -> dict[str, Path]:
    xgboost = require_module("xgboost", "Importing the modality classifiers", "phase")
    files = {}
    for kind, stem in MODALITY_FILES.items():
        for fold in range(5):
            # Upstream's files are UBJSON named *.json.N; xgboost picks the format by extension.
            binary = work / f"{kind}_fold_{fold}.ubj"
            shutil.copyfile(_source_file(folder, f"{stem}.{fold}"), binary)
            original = xgboost.Booster(model_file=str(binary))
            path = work / f"{kind}_fold_{fold}.json"
            original.save_model(str(path))
            converted = xgboost.Booster(model_file=str(path))
            scale = 1.0 if kind == "normalized" else 3000.0
            _check_same_predictions(original, converted, MODALITY_FEATURES[kind], scale, f"Modality {kind} fold {fold}")
            files[path.name] = path
    return files


def _copy_atlas(folder: Path, work: Path) -> dict[str, Path]:
    return {EVANS_ATLAS: _source_file(folder, EVANS_ATLAS)}


# --------------------------------------------------------------------------------------------- body stats

#: TotalSegmentator's file names of the xgboost body-stats folds (totalseg_get_body_stats.get_fold_model_path).
BODY_STATS_XGB_SOURCE = "{target}_{modality}_classifiers_2026_03_24_fold{fold}.json"
#: Feature scales the converted predictors are probed at: intensities (HU) and volumes (mm3).
BODY_STATS_PROBE_SCALES = (1000.0, 2.0e6)
#: How closely an exported network must reproduce torch's outputs (relative to their largest magnitude).
BODY_STATS_CNN_TOLERANCE = 1e-4
BODY_STATS_CNN_OPSET = 17
#: Boosters predict the probes on one thread: idle OpenMP workers spin on a busy machine (10x slower here).
SINGLE_THREAD = {"nthread": 1}


def weights_folder(source: Path) -> Path:
    """TotalSegmentator's weights folder: home/nnunet/results when `source` is a home, else `source` itself."""
    source = Path(source)
    results = source / "nnunet" / "results"
    return results if results.is_dir() else source


def _convert_body_stats_xgb(weights: Path, work: Path) -> dict[str, Path]:
    xgboost = require_module("xgboost", "Importing the body-stats predictors", "phase")
    folder = weights_folder(weights) / BODY_STATS_XGB_FOLDER
    if not folder.is_dir():
        raise ModelError(f"{folder} does not exist: pass the TotalSegmentator home that holds {BODY_STATS_XGB_FOLDER}.")
    files = {}
    for modality in BODY_STATS_MODALITIES:
        for target in BODY_STATS_TARGETS:
            for fold in BODY_STATS_FOLDS:
                source = _source_file(folder, BODY_STATS_XGB_SOURCE.format(target=target, modality=modality, fold=fold))
                # binary payloads under a .json name: loaded from bytes, as upstream does, so no parser is guessed
                original = xgboost.Booster(params=SINGLE_THREAD, model_file=bytearray(source.read_bytes()))
                path = work / body_stats_xgb_file(target, modality, fold)
                original.save_model(str(path))
                converted = xgboost.Booster(params=SINGLE_THREAD, model_file=str(path))
                for scale in BODY_STATS_PROBE_SCALES:
                    _check_same_predictions(original, converted, original.num_features(), scale,
                                            f"Body-stats {target} ({modality}) fold {fold}")
                files[path.name] = path
    return files


def fold_checkpoint(folder: Path, fold: int) -> Path:
    """The fold's Lightning checkpoint where TotalSegmentator looks: one epoch*.ckpt, else last.ckpt."""
    checkpoints = folder / f"version_{fold}" / "checkpoints"
    found = sorted(checkpoints.glob("epoch*.ckpt"))
    if len(found) == 1:
        return found[0]
    if not found and (checkpoints / "last.ckpt").is_file():
        return checkpoints / "last.ckpt"
    raise ModelError(f"{checkpoints} holds {len(found)} epoch*.ckpt files, expected one: "
                     f"delete {folder} and download it again.")


def _plain(value: Any) -> Any:
    """Hyperparameters as JSON: numpy values as numbers, tuples as lists; anything else refused."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ModelError(f"A body-stats checkpoint has a hyperparameter of type {type(value).__name__}, which tsrt "
                     "cannot store: report this to tsrt.")


def _checkpoint_parts(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(network weights without Lightning's 'backbone.' prefix, hyperparameters), read without running code."""
    from tsrt.models.checkpoint import StoredTensor, read_checkpoint_contents

    contents = read_checkpoint_contents(path)
    state = contents.get("state_dict") if isinstance(contents, dict) else None
    hparams = contents.get("hyper_parameters") if isinstance(contents, dict) else None
    if not isinstance(state, dict) or not isinstance(hparams, dict):
        raise ModelError(f"{path} is not a Lightning checkpoint with state_dict and hyper_parameters.")
    if any(key.startswith("backbone.") for key in state):
        state = {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}
    weights = {}
    for key, value in state.items():
        if not isinstance(value, StoredTensor):
            raise ModelError(f"{path} holds {key!r} as a {type(value).__name__}, not a tensor.")
        weights[key] = value.to_numpy()
    return weights, _plain(hparams)


#: TotalSegmentator's ResNet3D variants: MONAI constructor, feature width, shortcut, downsample bias, widening, heads.
RESNET3D_VARIANTS = {
    "resnet3d_10": ("resnet10", 512, "B", False, 1.0, False),
    "resnet3d_10_w05": ("resnet10", 256, "B", False, 0.5, False),
    "resnet3d_10_multihead": ("resnet10", 512, "B", False, 1.0, True),
    "resnet3d_18": ("resnet18", 512, "A", True, 1.0, False),
    "resnet3d_50": ("resnet50", 2048, "B", False, 1.0, False),
}


def body_stats_output_count(hparams: dict[str, Any]) -> int:
    """How many outputs the network has: nr_classes (or one per target name), less one for a BCE loss."""
    names = hparams.get("reg_target_names") or ("PatientWeight", "PatientSize", "PatientAge", "PatientSex_01")
    count = int(hparams.get("nr_classes", len(names)))
    return count - 1 if hparams.get("loss") == "bce" else count


def build_body_stats_network(hparams: dict[str, Any]):
    """The torch network of a body-stats checkpoint, built as TotalSegmentator builds it (MONAI ResNet3D + head)."""
    torch = require_module("torch", "Importing the body-stats networks", "export")
    nets = require_module("monai.networks.nets", "Importing the body-stats networks", "export", called="monai")
    model = hparams.get("model")
    if model not in RESNET3D_VARIANTS:
        raise ModelError(f"The body-stats checkpoint is a {model!r} network; tsrt imports the ResNet3D ones only "
                         f"({', '.join(RESNET3D_VARIANTS)}).")
    if int(hparams.get("dim", 3)) != 3:
        raise ModelError("The body-stats checkpoint is a 2D network; tsrt imports the 3D ones only.")
    constructor, features, shortcut, bias_downsample, widen, multihead = RESNET3D_VARIANTS[model]
    images = hparams.get("img_files", ["ct.nii.gz"])
    channels = int(hparams.get("nr_channels") or (len(images) if isinstance(images, list) else 1))
    network = getattr(nets, constructor)(
        pretrained=False, spatial_dims=3, n_input_channels=channels, feed_forward=False, shortcut_type=shortcut,
        bias_downsample=bias_downsample, conv1_t_stride=int(hparams.get("resnet3d_stride", 2)), widen_factor=widen,
    )
    outputs, dropout = body_stats_output_count(hparams), float(hparams.get("dropout", 0.0))
    if multihead:
        hidden = min(128, features)
        heads = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(inplace=True),
                                torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 1))
            for _ in range(outputs)
        )
        network.fc = _side_by_side(heads)
    else:
        network.fc = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(features, outputs))
    return network.eval()


def _side_by_side(heads: Any) -> Any:
    """A torch Module running one small head per target, outputs side by side (TotalSegmentator's multihead)."""
    import torch

    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = heads  # the state dict's fc.heads.N.* keys

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return torch.cat([head(features) for head in self.heads], dim=1)

    return Heads()


def _export_body_stats_fold(checkpoint: Path, modality: str, graph: Path) -> dict[str, Any]:
    """Export one fold to `graph` and check it against torch; returns what fold_N.json records."""
    import onnxruntime
    import torch

    from tsrt.models.onnx_graph import BATCH_AXIS_NAME, GRAPH_INPUT_NAME, GRAPH_OUTPUT_NAME
    from tsrt.models.store import sha256_file
    from tsrt.reports.body_cnn import crop_size

    weights, hparams = _checkpoint_parts(checkpoint)
    network = build_body_stats_network(hparams)
    expected = network.state_dict()
    problems = sorted(set(expected) ^ set(weights)) or [
        key for key in expected if tuple(expected[key].shape) != weights[key].shape]
    if problems:
        raise ModelError(f"{checkpoint} does not fit a {hparams.get('model')} network ({problems[0]}): "
                         "delete it and download it again.")
    network.load_state_dict({key: torch.from_numpy(value) for key, value in weights.items()}, strict=True)
    channels = network.conv1.in_channels
    size = crop_size(hparams, modality)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network, (torch.zeros(1, channels, *size),), str(graph), dynamo=False, do_constant_folding=True,
            input_names=[GRAPH_INPUT_NAME], output_names=[GRAPH_OUTPUT_NAME], opset_version=BODY_STATS_CNN_OPSET,
            dynamic_axes={GRAPH_INPUT_NAME: {0: BATCH_AXIS_NAME}, GRAPH_OUTPUT_NAME: {0: BATCH_AXIS_NAME}},
        )
        probe = np.random.default_rng(0).standard_normal((2, channels, *size)).astype(np.float32)
        reference = network(torch.from_numpy(probe)).numpy()
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    exported = session.run(None, {GRAPH_INPUT_NAME: probe})[0]
    difference = float(np.max(np.abs(exported - reference)))
    scale = max(float(np.max(np.abs(reference))), 1.0)
    if exported.shape != reference.shape or difference > BODY_STATS_CNN_TOLERANCE * scale:
        raise ModelError(f"The ONNX graph of {checkpoint} differs from the torch network by {difference:.3g}; "
                         "nothing was installed.")
    return {
        "hyper_parameters": hparams,
        "checkpoint": {"file": checkpoint.name, "sha256": sha256_file(checkpoint)},
        "verified_with_torch": {"torch": torch.__version__, "tiles": 2, "max_abs_difference": difference},
    }


def _body_stats_cnn_converter(modality: str) -> Callable[[Path, Path], dict[str, Path]]:
    def convert(weights: Path, work: Path) -> dict[str, Path]:
        require_module("torch", "Importing the body-stats networks", "export")
        folder = weights_folder(weights) / BODY_STATS_CNN_FOLDERS[modality]
        if not folder.is_dir():
            raise ModelError(f"{folder} does not exist: pass the TotalSegmentator home that holds "
                             f"{BODY_STATS_CNN_FOLDERS[modality]}.")
        files = {}
        for fold in BODY_STATS_FOLDS:
            graph = work / f"fold_{fold}.onnx"
            described = _export_body_stats_fold(fold_checkpoint(folder, fold), modality, graph)
            description = work / f"fold_{fold}.json"
            description.write_text(json.dumps(described, indent=2))
            files[graph.name], files[description.name] = graph, description
        return files

    return convert


_CONVERTERS: dict[str, tuple[Callable[[Path, Path], dict[str, Path]], str]] = {
    "phase": (_convert_phase, PHASE_PICKLE),
    "modality": (_convert_modality, f"{MODALITY_FILES['intensity']}.N, {MODALITY_FILES['normalized']}.N"),
    "evans-index": (_copy_atlas, EVANS_ATLAS),
    "body_stats_xgb": (_convert_body_stats_xgb, f"{BODY_STATS_XGB_FOLDER}/{BODY_STATS_XGB_SOURCE}"),
    **{f"body_stats_{modality}": (_body_stats_cnn_converter(modality), f"{folder}/version_N/checkpoints/*.ckpt")
       for modality, folder in BODY_STATS_CNN_FOLDERS.items()},
}
assert set(_CONVERTERS) == set(RESOURCES)


def import_resource(name: str, source: Path | None = None, root: Path | None = None) -> Path:
    """Convert one companion resource into the store; return its folder.

    `source`: TotalSegmentator's resources folder (default: the installed package's), or for the
    body-stats resources its home or weights folder (default: $TOTALSEG_HOME_DIR or ~/.totalsegmentator).
    """
    spec = resource_spec(name)
    convert, source_names = _CONVERTERS[name]
    if spec.totalseg_folder is not None:
        from tsrt.config import default_totalseg_home

        folder = weights_folder(Path(source) if source is not None else default_totalseg_home())
    else:
        folder = totalseg_resources(source)
    with tempfile.TemporaryDirectory(prefix="tsrt-resource-") as work:
        files = convert(folder, Path(work))
        origin = {"totalsegmentator": _totalseg_version(), "files": source_names, "folder": str(folder)}
        return install_resource(name, files, origin, root)
