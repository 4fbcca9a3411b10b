"""Import TotalSegmentator's companion resources (classifiers, atlas) into tsrt's store, once.

TotalSegmentator ships them in its package's `resources/` folder:

- contrast phase: `contrast_phase_classifiers_2024_07_19.pkl`, a pickled dict fold -> XGBRegressor.
  Unpickling runs code, so only this toolchain does it, once, on the file of an installed
  totalsegmentator; each regressor's Booster is re-saved in xgboost's JSON format and checked to
  predict bit-identically to the pickled one before it is installed. The runtime only loads the JSON.
- modality: `modality_classifiers[_normalized]_2025_02_24.json.N`, xgboost classifiers in
  xgboost's binary (UBJSON) format, re-saved as JSON and checked the same way.
- Evans index: `ct_brain_atlas_1mm.nii.gz`, copied as it is.

Files land in the store through `tsrt.models.resources.install_resource` (staged, sha256 manifest, rename).
Nothing here imports torch or needs scikit-learn (only Boosters are touched): a runtime install with
the `phase` extra can import these too, from a totalsegmentator package that is installed (even with
--no-deps) or unpacked anywhere (`source`).
"""

from __future__ import annotations

import importlib.util
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
from tsrt.models.resources import RESOURCES, install_resource, resource_spec

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


_CONVERTERS: dict[str, tuple[Callable[[Path, Path], dict[str, Path]], str]] = {
    "phase": (_convert_phase, PHASE_PICKLE),
    "modality": (_convert_modality, f"{MODALITY_FILES['intensity']}.N, {MODALITY_FILES['normalized']}.N"),
    "evans-index": (_copy_atlas, EVANS_ATLAS),
}
assert set(_CONVERTERS) == set(RESOURCES)


def import_resource(name: str, source: Path | None = None, root: Path | None = None) -> Path:
    """Convert one companion resource from TotalSegmentator's resources folder into the store; return its folder."""
    resource_spec(name)
    convert, source_names = _CONVERTERS[name]
    folder = totalseg_resources(source)
    with tempfile.TemporaryDirectory(prefix="tsrt-resource-") as work:
        files = convert(folder, Path(work))
        origin = {"totalsegmentator": _totalseg_version(), "files": source_names, "folder": str(folder)}
        return install_resource(name, files, origin, root)
