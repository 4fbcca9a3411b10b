"""Real nnU-Net v2 result folders and TotalSegmentator model homes with seeded weights, for tests.

Why: export, runtime and parity tests need genuine trained-model folders (plans.json, dataset.json,
fold_N/checkpoint_final.pth exactly as nnU-Net 2.8.1 writes them) without downloading anything.
The networks are built by nnU-Net's own trainer classes, so nnU-Net's predictor and official
TotalSegmentator load and run them unchanged. Weights are either seeded random (same arguments ->
byte-identical weights) or "confident": the backbone of a trained checkpoint with its segmentation
rows re-assigned to the requested classes (see `write_result_folder`).

TotalSegmentator task keys of `write_totalseg_home` (see `TOTALSEG_TASKS`):

    total            Dataset291..295 (5 parts), nnUNetTrainerNoMirroring, 1.5 mm
    total_fast       Dataset297 (--fast), nnUNetTrainer_4000epochs_NoMirroring, 3 mm
    total_fastest    Dataset298 (--fastest, and the crop model for roi_subset), 6 mm
    total_mr         Dataset850/851 (2 parts), nnUNetTrainer_2000epochs_NoMirroring, 1.5 mm
    total_mr_fast    Dataset852 (--fast, and the MR crop model for roi_subset), 3 mm
    total_mr_fastest Dataset853 (--fastest), 6 mm
    body             Dataset299, nnUNetTrainer, 1.5 mm
    body_fast        Dataset300 (--fast, and the --body_seg crop model), 6 mm
    body_mr          Dataset597, nnUNetTrainer_DASegOrd0, 1.5 mm
    body_mr_fast     Dataset598 (--fast), 6 mm
    <sub-task>       any single-model task of TotalSegmentator's TASK_CONFIGS (liver_segments, ...)

Folder names, dataset ids, trainers, spacings, folds and class maps are read from the installed
TotalSegmentator's own tables (map_tasks_config, map_to_binary), so the layout is exactly what
that version looks for. What official TotalSegmentator needs to run offline from such a home:

- every model folder of the task, home/nnunet/results/<DatasetNNN_name>/<trainer>__nnUNetPlans__
  3d_fullres/fold_0/checkpoint_final.pth: download_pretrained_weights() only checks that the
  dataset folder exists. roi_subset and crop tasks also run the crop model (total_fastest, or
  total_mr_fast for MR); --body_seg runs body_fast.
- home/config.json with "send_usage_stats": false, else every run POSTs usage statistics (errors
  swallowed); "statistics_disclaimer_shown": true only silences a notice. No license is needed
  for these (non-commercial) tasks, and DICOM input goes through dicom2nifti (no download).
- TOTALSEG_HOME_DIR set and TOTALSEG_WEIGHTS_PATH unset (the latter overrides the home). Both are
  read when TotalSegmentator runs, and it points nnUNet_results at the home itself. Still run it in
  its own process: importing totalsegmentator.nnunet replaces nnUNetPredictor's predict/export
  methods process-wide (its "cropped logits resampling" patch), which would silently change the
  nnU-Net reference of any parity test in the same process, and nnU-Net's spawned workers need an
  importable __main__ (a script file with a main guard, not `python -c`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from tsrt.errors import ModelError
from tsrt.models.checkpoint import read_checkpoint
from tsrt.models.onnx_graph import resolve_configuration

PLAIN_CONV_UNET = "PlainConvUNet"
RESIDUAL_ENCODER_UNET = "ResidualEncoderUNet"
ARCHITECTURES = (PLAIN_CONV_UNET, RESIDUAL_ENCODER_UNET)

#: Bias of a segmentation row that must never win: exp(-30) is far below any softmax/sigmoid cut-off.
DEAD_CLASS_BIAS = -30.0

#: Intensity-band networks: width of each band edge in normalised units, and the logit of a class inside its band.
BAND_EDGE = 0.01
BAND_LOGIT = 10.0
#: CT statistics for intensity-band fixtures: normalised intensity is HU / 1000, unclipped from -1024 to 3071.
BAND_CT_INTENSITY_PROPERTIES: dict[str, float] = {
    "max": 3071.0, "mean": 0.0, "median": 0.0, "min": -1024.0,
    "percentile_00_5": -1024.0, "percentile_99_5": 3071.0, "std": 1000.0,
}

DEFAULT_LABELS: dict[str, int] = {"background": 0, "spleen": 1, "kidney_right": 2, "kidney_left": 3}
DEFAULT_CHANNEL_NAMES: dict[str, str] = {"0": "CT"}

#: Plausible CT foreground statistics (HU), the kind nnU-Net's fingerprint extractor records.
DEFAULT_CT_INTENSITY_PROPERTIES: dict[str, float] = {
    "max": 3071.0,
    "mean": 86.5,
    "median": 64.0,
    "min": -1024.0,
    "percentile_00_5": -958.0,
    "percentile_99_5": 1342.0,
    "std": 291.3,
}
#: MR channels are z-scored per image, so these only need to be present and plausible.
DEFAULT_MR_INTENSITY_PROPERTIES: dict[str, float] = {
    "max": 4095.0,
    "mean": 312.7,
    "median": 268.0,
    "min": 0.0,
    "percentile_00_5": 12.0,
    "percentile_99_5": 1210.0,
    "std": 198.4,
}

#: nnU-Net's ExperimentPlanner / ResEncUNetPlanner stage recipes (planner attributes of 2.8.1).
_PLANNER_RECIPES: dict[str, dict[str, Any]] = {
    PLAIN_CONV_UNET: {
        "planner": "ExperimentPlanner",
        "blocks_key": "n_conv_per_stage",
        "encoder_blocks": (2,) * 14,
        "decoder_blocks": (2,) * 13,
    },
    RESIDUAL_ENCODER_UNET: {
        "planner": "nnUNetPlannerResEncM",
        "blocks_key": "n_blocks_per_stage",
        "encoder_blocks": (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6),
        "decoder_blocks": (1,) * 12,
    },
}
#: nnU-Net's UNet_featuremap_min_edge_length: no axis is pooled below this many voxels.
_MIN_FEATURE_MAP_EDGE = 4
_SEG_LAYER_KEY = re.compile(r"^decoder\.seg_layers\.(\d+)\.(weight|bias)$")

#: Where the bundled demo model's trained checkpoint lives (any trainer name), relative to the repo.
DEMO_CHECKPOINT_GLOB = "models/demo/nnUNet_results/Dataset900_TsrtDemo/*__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth"


def find_demo_checkpoint(repo_root: Path) -> Path | None:
    """The demo model's trained fold-0 checkpoint, or None while it has not been trained/committed."""
    found = sorted(Path(repo_root).glob(DEMO_CHECKPOINT_GLOB))
    return found[0] if found else None


# --------------------------------------------------------------------------------------------
# Source checkpoints ("confident" weights)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointArchitecture:
    """What a trained checkpoint fixes: its network recipe, input channels and output rows."""

    network_class_name: str
    arch_kwargs: dict[str, Any]
    kw_requires_import: list[str]
    num_input_channels: int
    head_names: list[str]  # one name per row of the segmentation layers
    has_regions: bool
    configuration: str
    patch_size: list[int]
    spacing: list[float]
    network_weights: dict[str, torch.Tensor] = field(repr=False)

    @property
    def architecture(self) -> str:
        return self.network_class_name.rsplit(".", 1)[-1]

    @property
    def n_stages(self) -> int:
        return int(self.arch_kwargs["n_stages"])

    @property
    def features(self) -> list[int]:
        return [int(f) for f in self.arch_kwargs["features_per_stage"]]

    @property
    def strides(self) -> list[list[int]]:
        return [[int(s) for s in stride] for stride in self.arch_kwargs["strides"]]


def architecture_from_checkpoint(path: Path) -> CheckpointArchitecture:
    """Read the network recipe and class rows of an nnU-Net checkpoint (its init_args hold both)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Source checkpoint {path} does not exist: train or generate it first.")
    # The restricted reader, as every tsrt path that reads a checkpoint it did not write: nothing in it can run code.
    checkpoint = read_checkpoint(path)
    plans, dataset_json = checkpoint.training_plans, checkpoint.training_dataset_json
    configuration = checkpoint.configuration
    try:
        if plans is None or dataset_json is None or configuration is None:
            raise KeyError("init_args")
        config_plans = resolve_configuration(plans, configuration)
        architecture = config_plans["architecture"]
    except (KeyError, TypeError) as err:
        raise ModelError(
            f"{path} is not an nnU-Net v2 checkpoint (missing {err}): pass a checkpoint_final.pth written by nnU-Net."
        ) from None
    weights = {key: torch.from_numpy(value) for key, value in checkpoint.network_weights.items()}
    has_regions = _has_regions(dataset_json["labels"])
    return CheckpointArchitecture(
        network_class_name=architecture["network_class_name"],
        arch_kwargs=copy.deepcopy(architecture["arch_kwargs"]),
        kw_requires_import=list(architecture["_kw_requires_import"]),
        num_input_channels=len(dataset_json.get("channel_names", dataset_json.get("modality", {}))),
        head_names=_head_names(dataset_json["labels"], has_regions),
        has_regions=has_regions,
        configuration=configuration,
        patch_size=[int(p) for p in config_plans["patch_size"]],
        spacing=[float(s) for s in config_plans["spacing"]],
        network_weights=weights,
    )


def _has_regions(labels: dict[str, Any]) -> bool:
    """nnU-Net's rule (LabelManager): any label given as a list of more than one value makes it region-based."""
    return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())


def _head_names(labels: dict[str, Any], has_regions: bool) -> list[str]:
    """Class name of each network output row, in nnU-Net's order (LabelManager semantics).

    Regular models have one row per label value, background first; region-based models have one
    row per region in dataset.json order, without background and without the ignore label.
    """
    if has_regions:
        return [name for name, value in labels.items() if name not in ("background", "ignore") and value != 0]
    by_value = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        by_value[int(value[0] if isinstance(value, (list, tuple)) else value)] = name
    return [by_value[v] for v in sorted(by_value)]


def _confident_state_dict(
    target_state: dict[str, torch.Tensor],
    source: CheckpointArchitecture,
    target_heads: list[str],
    target_regions: bool,
    class_rows: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Trained backbone + segmentation rows re-assigned to the requested classes.

    Each requested class takes the trained row `class_rows` names for it, else the trained row of the
    same name, else the first trained row not yet used; classes left over get zero weights and
    DEAD_CLASS_BIAS, so no two classes share a row and unassigned classes are never predicted.
    Sigmoid (region) heads get `row - background row`, the trained log-odds of the class against background.
    """
    if source.has_regions:
        raise ModelError("The source checkpoint is region-based; pass a softmax-trained (regular labels) checkpoint.")
    source_classes = source.head_names[1:]
    unknown = sorted(set((class_rows or {}).values()) - set(source_classes))
    if unknown:
        raise ModelError(f"class_rows names {unknown[0]!r}, which the source checkpoint has no row for.")
    assigned: dict[str, int] = {
        name: source_classes.index(row) + 1 for name, row in (class_rows or {}).items() if name in target_heads
    }
    for name in target_heads:
        row = source_classes.index(name) + 1 if name in source_classes else None
        if name not in assigned and row is not None and row not in assigned.values():
            assigned[name] = row
    unused = [row for row in range(1, len(source.head_names)) if row not in assigned.values()]
    for name in target_heads:
        if name in assigned or name == "background":
            continue
        if unused:
            assigned[name] = unused.pop(0)

    state: dict[str, torch.Tensor] = {}
    for key, target_value in target_state.items():
        if key not in source.network_weights:
            raise ModelError(
                f"The source checkpoint has no tensor {key}: pass a checkpoint of the same architecture family."
            )
        source_value = source.network_weights[key]
        if not _SEG_LAYER_KEY.match(key):
            if tuple(source_value.shape) != tuple(target_value.shape):
                raise ModelError(
                    f"Tensor {key} is {tuple(source_value.shape)} in the source checkpoint but "
                    f"{tuple(target_value.shape)} here: use the source's stage/feature configuration."
                )
            state[key] = source_value.detach().clone()
            continue
        rows = []
        for head_index, name in enumerate(target_heads):
            if name == "background" and not target_regions and head_index == 0:
                rows.append(source_value[0].clone())
            elif name in assigned:
                row = source_value[assigned[name]].clone()
                rows.append(row - source_value[0] if target_regions else row)
            elif key.endswith("weight"):
                rows.append(torch.zeros_like(source_value[0]))
            else:
                rows.append(torch.full_like(source_value[0], DEAD_CLASS_BIAS))
        state[key] = torch.stack(rows).to(target_value.dtype).contiguous()
    return state


# --------------------------------------------------------------------------------------------
# Plans, dataset.json, checkpoints
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _set_band_weights(
    network: torch.nn.Module, heads: Sequence[str], bands: Mapping[str, tuple[float, float]], normalise
) -> None:
    """Weights that label each voxel by its own intensity: class k wherever lo_k <= value < hi_k.

    Bands are in HU (CT) or in the image's own units (other channels, which get NoNormalization).

    Why: a test can then know what the "model" must find (e.g. brain, skull and ventricles of a
    phantom) while every pipeline still runs a genuine nnU-Net network of any size. The network has
    no normalisation layers (InstanceNorm would make the bands depend on each tile's statistics):
    the first encoder conv computes ramps relu(x - t) and relu(x - t - BAND_EDGE) for every band
    edge t, the second turns each pair into a 0/1 step, the last decoder stage passes the steps from
    the skip connection through, and the head scores class k with BAND_LOGIT * (step(lo) - step(hi))
    against a background of BAND_LOGIT / 2. All deeper paths are zero.
    """
    if not hasattr(network.encoder.stages[0][0], "convs"):
        raise ModelError("Intensity bands need a PlainConvUNet (its first stage is a plain conv stack).")
    unknown = sorted(set(bands) - set(heads))
    if unknown:
        raise ModelError(f"intensity_bands names {unknown[0]!r}, which this model has no class for.")
    edges = sorted({float(v) for lo, hi in bands.values() for v in (lo, hi) if abs(v) != float("inf")})
    for parameter in network.parameters():
        parameter.zero_()
    first, second = (block.conv for block in network.encoder.stages[0][0].convs[:2])
    last_stage = network.decoder.stages[-1].convs
    if first.out_channels < 2 * len(edges):
        raise ModelError(f"{len(edges)} band edges need at least {2 * len(edges)} features in the first stage.")
    centre = tuple(k // 2 for k in first.weight.shape[2:])
    skip_offset = last_stage[0].conv.in_channels - first.out_channels  # decoder input: [upsampled, skip]
    for j, edge in enumerate(edges):
        t = float(normalise(edge))
        for channel, shift in ((2 * j, t), (2 * j + 1, t + BAND_EDGE)):
            first.weight[(channel, 0, *centre)] = 1.0
            first.bias[channel] = -shift
        second.weight[(j, 2 * j, *centre)] = 1.0 / BAND_EDGE
        second.weight[(j, 2 * j + 1, *centre)] = -1.0 / BAND_EDGE
        last_stage[0].conv.weight[(j, skip_offset + j, *centre)] = 1.0
        for block in last_stage[1:]:
            block.conv.weight[(j, j, *centre)] = 1.0
    head = network.decoder.seg_layers[-1]
    head.bias[0] = BAND_LOGIT / 2
    for row, name in enumerate(heads[1:], start=1):
        if name not in bands:
            head.bias[row] = DEAD_CLASS_BIAS
            continue
        lo, hi = (float(v) for v in bands[name])
        if lo == float("-inf"):
            head.bias[row] = BAND_LOGIT
        else:
            head.weight[(row, edges.index(lo), *([0] * (head.weight.ndim - 2)))] += BAND_LOGIT
        if hi != float("inf"):
            head.weight[(row, edges.index(hi), *([0] * (head.weight.ndim - 2)))] -= BAND_LOGIT


def _ct_normaliser(properties: Mapping[str, float]):
    """nnU-Net's CTNormalization of one HU value with these foreground statistics."""
    lower, upper = properties["percentile_00_5"], properties["percentile_99_5"]
    return lambda hu: (min(max(hu, lower), upper) - properties["mean"]) / max(properties["std"], 1e-8)


def _plan_architecture(
    architecture: str, spacing: Sequence[float], patch_size: Sequence[int], n_stages: int, features: Sequence[int],
    instance_norm: bool = True,
) -> dict[str, Any]:
    """The plans' `architecture` entry as nnU-Net's planners write it, for a fixed number of stages.

    Strides and kernel sizes come from nnU-Net's own topology rule (get_pool_and_conv_props), so an
    anisotropic spacing such as (5, 0.7, 0.7) pools only the fine axes first, with 1-wide kernels on
    the coarse axis, exactly as a planned dataset would.
    """
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op, get_matching_instancenorm
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    network_class = {PLAIN_CONV_UNET: PlainConvUNet, RESIDUAL_ENCODER_UNET: ResidualEncoderUNet}[architecture]
    recipe = _PLANNER_RECIPES[architecture]
    dim = len(spacing)
    _, strides, kernels, _, _ = get_pool_and_conv_props(list(spacing), list(patch_size), _MIN_FEATURE_MAP_EDGE, 999999)
    if len(strides) < n_stages:
        raise ModelError(
            f"A patch of {tuple(patch_size)} voxels at spacing {tuple(spacing)} allows at most {len(strides)} "
            f"stages, not {n_stages}: use a larger patch_size or fewer n_stages."
        )
    conv_op = convert_dim_to_conv_op(dim)
    norm_op = get_matching_instancenorm(conv_op)
    return {
        "network_class_name": f"{network_class.__module__}.{network_class.__name__}",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": list(features),
            "conv_op": f"{conv_op.__module__}.{conv_op.__name__}",
            # The bottleneck always gets a full 3x3(x3) kernel, as in get_pool_and_conv_props.
            "kernel_sizes": [list(k) for k in kernels[: n_stages - 1]] + [[3] * dim],
            "strides": [list(s) for s in strides[:n_stages]],
            recipe["blocks_key"]: list(recipe["encoder_blocks"][:n_stages]),
            "n_conv_per_stage_decoder": list(recipe["decoder_blocks"][: n_stages - 1]),
            "conv_bias": True,
            "norm_op": f"{norm_op.__module__}.{norm_op.__name__}" if instance_norm else None,
            "norm_op_kwargs": {"eps": 1e-05, "affine": True} if instance_norm else None,
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _total_stride(strides: Sequence[Sequence[int]]) -> list[int]:
    """Per-axis product of the stage strides: what every patch axis must be a multiple of."""
    total = [1] * len(strides[0])
    for stride in strides:
        total = [t * int(s) for t, s in zip(total, stride)]
    return total


def _check_patch_divisible(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> None:
    divisor = _total_stride(strides)
    if any(p % d for p, d in zip(patch_size, divisor)):
        raise ModelError(
            f"patch_size {tuple(patch_size)} is not divisible by the network's total stride {tuple(divisor)}: "
            "choose a patch_size that is a multiple of it."
        )


def _configuration_plans(
    *,
    plans_name: str,
    configuration: str,
    architecture: dict[str, Any],
    patch_size: Sequence[int],
    spacing: Sequence[float],
    channel_names: dict[str, str],
    normalization_schemes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One configuration entry, with the keys and defaults of ExperimentPlanner.get_plans_for_configuration.

    `normalization_schemes` overrides the planner's choice from the channel names (intensity-band models).
    """
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    is_resenc = architecture["network_class_name"].endswith(RESIDUAL_ENCODER_UNET)
    # ResEncUNetPlanner reuses the default planner's preprocessed data for 2d and 3d_fullres.
    identifier_prefix = "nnUNetPlans" if is_resenc and configuration in ("2d", "3d_fullres") else plans_name
    resampling = "resample_data_or_seg_to_shape"
    return {
        "data_identifier": f"{identifier_prefix}_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [int(p) for p in patch_size],
        "median_image_size_in_voxels": [float(2 * p) for p in patch_size],
        "spacing": [float(s) for s in spacing],
        "normalization_schemes": list(normalization_schemes) if normalization_schemes is not None else [
            get_normalization_scheme(name).__name__ for name in channel_names.values()],
        "use_mask_for_norm": [False] * len(channel_names),
        "resampling_fn_data": resampling,
        "resampling_fn_seg": resampling,
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": resampling,
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": architecture,
        "batch_dice": configuration == "2d",
    }


def _fold_seed(seed: int, fold: int | str) -> int:
    """A 63-bit seed per (seed, fold), stable across Python runs (unlike hash())."""
    digest = hashlib.sha256(f"tsrt-fixture:{seed}:{fold}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@lru_cache(maxsize=None)
def _trainer_class(trainer: str) -> type:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(trainer)
    except Exception as err:  # nnU-Net raises RuntimeError/AssertionError variants for unknown trainers
        raise ModelError(f"nnU-Net has no trainer class {trainer!r} ({err}): pass a trainer nnunetv2 ships.") from None


def _build_network(plans: dict, configuration: str, dataset_json: dict, trainer: str, seed: int) -> torch.nn.Module:
    """The network exactly as the trainer builds it for training (deep supervision on), seeded.

    nnU-Net initialises weights from torch's default generator; it is forked and seeded here so the
    same seed gives byte-identical weights and the caller's random state is left untouched.
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = _trainer_class(trainer).build_network_architecture(
            plans_manager, configuration_manager, num_inputs, num_heads, enable_deep_supervision=True
        )
        _balance_random_heads(network, num_inputs, _total_stride(configuration_manager.pool_op_kernel_sizes))
    return network


@torch.no_grad()
def _balance_random_heads(network: torch.nn.Module, num_inputs: int, total_stride: Sequence[int]) -> None:
    """Centre each random segmentation row on a random input so argmax is spread over the classes.

    With He-initialised weights the features after the last LeakyReLU are mostly positive, so one
    class row can dominate everywhere; subtracting each row's mean logit (bias) and scaling the rows
    to a few units of spread keeps predictions varied without making any class unreachable.
    The probe is the smallest input with a 2-voxel bottleneck, so full-size nets stay cheap.
    """
    network.eval()
    probe = torch.randn(1, num_inputs, *(2 * s for s in total_stride))
    outputs = network(probe)
    seg_layers = network.decoder.seg_layers
    for layer, logits in zip(reversed(seg_layers), outputs):  # outputs are highest resolution first
        per_class = logits[0].flatten(1)
        spread = per_class.std(dim=1).clamp_min(1e-6)
        scale = (3.0 / spread).view(-1, *([1] * (layer.weight.ndim - 1)))
        layer.weight.mul_(scale)
        layer.bias.copy_(-per_class.mean(dim=1) * scale.flatten() + layer.bias * scale.flatten())
    network.train()


def _training_logging(num_heads: int) -> dict[str, list]:
    """A one-epoch LocalLogger record (the `logging` entry of a checkpoint), with fixed values."""
    return {
        "mean_fg_dice": [0.5],
        "ema_fg_dice": [0.5],
        "dice_per_class_or_region": [[0.5] * num_heads],
        "train_losses": [-0.4],
        "val_losses": [-0.4],
        "lrs": [0.01],
        "epoch_start_timestamps": [1_700_000_000.0],
        "epoch_end_timestamps": [1_700_000_060.0],
    }


def _save_checkpoint(
    path: Path,
    network: torch.nn.Module,
    *,
    plans: dict,
    configuration: str,
    fold: int | str,
    dataset_json: dict,
    trainer: str,
    mirror_axes: tuple[int, ...] | None,
    num_heads: int,
) -> None:
    """Write the dict nnUNetTrainer.save_checkpoint writes (CPU training: no grad scaler)."""
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "grad_scaler_state": None,
        "logging": _training_logging(num_heads),
        "_best_ema": 0.5,
        "current_epoch": 1,
        "init_args": {
            "plans": plans,
            "configuration": configuration,
            "fold": fold,
            "dataset_json": dataset_json,
            "device": torch.device("cpu"),
        },
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": mirror_axes,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)


def _write_json(obj: dict, path: Path) -> dict:
    """Write like nnU-Net's save_json(sort_keys=False) and return the object as nnU-Net reloads it."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    obj = copy.deepcopy(obj)
    recursive_fix_for_json_export(obj)
    save_json(obj, str(path), sort_keys=False)
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def write_result_folder(
    results_root: Path,
    *,
    dataset_id: int = 901,
    dataset_name: str = "Fixture",
    configuration: str = "3d_fullres",
    trainer: str = "nnUNetTrainer",
    plans_name: str = "nnUNetPlans",
    architecture: str | None = None,
    n_stages: int | None = None,
    features: Sequence[int] | None = None,
    patch_size: Sequence[int] = (32, 32, 32),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    transpose_forward: Sequence[int] = (0, 1, 2),
    channel_names: dict[str, str] | None = None,
    labels: dict[str, int | list[int]] | None = None,
    regions_class_order: Sequence[int] | None = None,
    folds: Sequence[int | str] = (0,),
    seed: int = 0,
    mirror_axes: Sequence[int] | None = (0, 1, 2),
    source_checkpoint: Path | None = None,
    intensity_properties: dict | None = None,
    class_rows: Mapping[str, str] | None = None,
    intensity_bands: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Write a complete nnU-Net v2 result folder and return its path.

    The folder is `results_root/Dataset{id:03d}_{name}/{trainer}__{plans}__{configuration}` with
    plans.json, dataset.json, dataset_fingerprint.json and fold_N/checkpoint_final.pth.

    `architecture` ("PlainConvUNet" default, or "ResidualEncoderUNet"), `n_stages` (default 3) and
    `features` (default min(4 * 2**i, 32)) describe a new network; with `source_checkpoint` they
    default to, and must agree with, the trained checkpoint, whose backbone is copied and whose
    segmentation rows are re-assigned to `labels` (see `_confident_state_dict`; `class_rows` maps a
    class to the trained row it takes, e.g. {"brain": "spine"}).
    For "2d", `patch_size` and `spacing` may be given in 3d; their last two entries are used.
    `mirror_axes` beyond the configuration's dimensionality are dropped, as nnU-Net's trainer does.
    `intensity_bands` ({class: (lo_hu, hi_hu)}, a new PlainConvUNet without normalisation layers)
    makes the network label each voxel by its intensity (see `_set_band_weights`); other classes
    are never predicted. A CT channel implies BAND_CT_INTENSITY_PROPERTIES by default; any other
    channel (MR) gets NoNormalization in the plans, so its bands are in the image's own units (nnU-Net
    z-scores MR per image, which would move a band with every image's mean and spread).
    """
    ndim = 2 if configuration == "2d" else 3
    if intensity_bands is not None and source_checkpoint is not None:
        raise ModelError("intensity_bands builds its own weights: do not pass a source_checkpoint as well.")
    source = architecture_from_checkpoint(source_checkpoint) if source_checkpoint is not None else None
    channel_names = dict(channel_names or DEFAULT_CHANNEL_NAMES)
    labels = copy.deepcopy(labels or DEFAULT_LABELS)
    config_spacing = [float(s) for s in spacing][-ndim:]
    config_patch = [int(p) for p in patch_size][-ndim:]
    if len(config_spacing) != ndim or len(config_patch) != ndim:
        raise ModelError(f"Configuration {configuration} needs {ndim}d patch_size and spacing.")

    if source is None:
        architecture = architecture or PLAIN_CONV_UNET
        if architecture not in ARCHITECTURES:
            raise ModelError(f"Unknown architecture {architecture!r}: use one of {', '.join(ARCHITECTURES)}.")
        n_stages = n_stages or 3
        features = list(features) if features is not None else [min(4 * 2**i, 32) for i in range(n_stages)]
        if len(features) != n_stages:
            raise ModelError(f"features has {len(features)} entries but n_stages is {n_stages}: give one per stage.")
        arch = _plan_architecture(architecture, config_spacing, config_patch, n_stages, features,
                                  instance_norm=intensity_bands is None)
    else:
        _check_matches_source(source, architecture, n_stages, features, ndim, len(channel_names))
        arch = {
            "network_class_name": source.network_class_name,
            "arch_kwargs": copy.deepcopy(source.arch_kwargs),
            "_kw_requires_import": list(source.kw_requires_import),
        }
    _check_patch_divisible(config_patch, arch["arch_kwargs"]["strides"])

    has_regions = _has_regions(labels)
    if has_regions and regions_class_order is None:
        raise ModelError("labels define regions (lists), so regions_class_order is required: give one label per region.")

    full_name = f"Dataset{dataset_id:03d}_{dataset_name}"
    output_dir = Path(results_root) / full_name / f"{trainer}__{plans_name}__{configuration}"
    output_dir.mkdir(parents=True, exist_ok=True)

    dataset_json = _write_dataset_json(
        output_dir, channel_names, labels, regions_class_order, description=f"tsrt fixture (seed {seed})"
    )
    transpose_forward = [int(a) for a in transpose_forward]
    band_on_ct = channel_names.get("0", "").upper() == "CT"
    band_schemes = None if intensity_bands is None or band_on_ct else ["NoNormalization"] * len(channel_names)
    ct_defaults = BAND_CT_INTENSITY_PROPERTIES if intensity_bands is not None else DEFAULT_CT_INTENSITY_PROPERTIES
    properties = intensity_properties or {
        str(channel): dict(ct_defaults if name.upper() == "CT" else DEFAULT_MR_INTENSITY_PROPERTIES)
        for channel, name in channel_names.items()
    }
    median_spacing = [float(s) for s in spacing] if len(spacing) == 3 else [max(config_spacing)] + config_spacing
    median_shape = [2 * p for p in ([config_patch[0]] * (3 - ndim) + config_patch)]
    transpose_backward = [transpose_forward.index(axis) for axis in range(3)]
    plans = _write_json(
        {
            "dataset_name": full_name,
            "plans_name": plans_name,
            "original_median_spacing_after_transp": median_spacing,
            "original_median_shape_after_transp": median_shape,
            "image_reader_writer": "SimpleITKIO",
            "transpose_forward": transpose_forward,
            "transpose_backward": transpose_backward,
            "configurations": {
                configuration: _configuration_plans(
                    plans_name=plans_name,
                    configuration=configuration,
                    architecture=arch,
                    patch_size=config_patch,
                    spacing=config_spacing,
                    channel_names=channel_names,
                    normalization_schemes=band_schemes,
                )
            },
            "experiment_planner_used": _PLANNER_RECIPES.get(
                arch["network_class_name"].rsplit(".", 1)[-1], _PLANNER_RECIPES[PLAIN_CONV_UNET]
            )["planner"],
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": properties,
        },
        output_dir / "plans.json",
    )
    _write_json(
        {
            "foreground_intensity_properties_per_channel": properties,
            "median_relative_size_after_cropping": 1.0,
            # The fingerprint is in the images' own axis order, the plans in transposed order.
            "shapes_after_crop": [[median_shape[axis] for axis in transpose_backward]] * 2,
            "spacings": [[median_spacing[axis] for axis in transpose_backward]] * 2,
        },
        output_dir / "dataset_fingerprint.json",
    )

    allowed_mirroring = None if mirror_axes is None else tuple(int(a) for a in mirror_axes if int(a) < ndim)
    heads = _head_names(labels, has_regions)
    for fold in folds:
        fold_value: int | str = fold if fold == "all" else int(fold)
        network = _build_network(plans, configuration, dataset_json, trainer, _fold_seed(seed, fold_value))
        if source is not None:
            network.load_state_dict(
                _confident_state_dict(network.state_dict(), source, heads, has_regions, class_rows)
            )
        if intensity_bands is not None:
            if has_regions:
                raise ModelError("intensity_bands needs a model with regular (non-region) labels.")
            normalise = _ct_normaliser(properties["0"]) if band_on_ct else float  # NoNormalization: image units
            _set_band_weights(network, heads, intensity_bands, normalise)
        _save_checkpoint(
            output_dir / f"fold_{fold_value}" / "checkpoint_final.pth",
            network,
            plans=plans,
            configuration=configuration,
            fold=fold_value,
            dataset_json=dataset_json,
            trainer=trainer,
            mirror_axes=allowed_mirroring,
            num_heads=len(heads),
        )
    return output_dir


def _check_matches_source(
    source: CheckpointArchitecture,
    architecture: str | None,
    n_stages: int | None,
    features: Sequence[int] | None,
    ndim: int,
    num_inputs: int,
) -> None:
    """Refuse arguments that contradict the source checkpoint instead of silently ignoring them."""
    problems = []
    if architecture is not None and architecture != source.architecture:
        problems.append(f"architecture {architecture} (source: {source.architecture})")
    if n_stages is not None and n_stages != source.n_stages:
        problems.append(f"n_stages {n_stages} (source: {source.n_stages})")
    if features is not None and list(features) != source.features:
        problems.append(f"features {list(features)} (source: {source.features})")
    if len(source.patch_size) != ndim:
        problems.append(f"a {ndim}d configuration (source is {len(source.patch_size)}d)")
    if num_inputs != source.num_input_channels:
        problems.append(f"{num_inputs} input channels (source: {source.num_input_channels})")
    if problems:
        raise ModelError(
            f"The source checkpoint cannot provide {'; '.join(problems)}: omit these arguments or match the source."
        )


def _write_dataset_json(
    output_dir: Path,
    channel_names: dict[str, str],
    labels: dict[str, Any],
    regions_class_order: Sequence[int] | None,
    description: str,
) -> dict:
    """dataset.json via nnU-Net's own generate_dataset_json; returns it as nnU-Net reloads it."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(
        str(output_dir),
        channel_names=dict(channel_names),
        labels=copy.deepcopy(labels),
        num_training_cases=2,
        file_ending=".nii.gz",
        regions_class_order=None if regions_class_order is None else [int(r) for r in regions_class_order],
        dataset_name=output_dir.parent.name,
        description=description,
        license="CC0: synthetic test fixture",
        converted_by="tsrt_export.fixtures",
    )
    return json.loads((output_dir / "dataset.json").read_text())


# --------------------------------------------------------------------------------------------
# TotalSegmentator model homes
# --------------------------------------------------------------------------------------------

#: Task key -> (TotalSegmentator task, sub-mode in TotalSegmentator's TASK_CONFIGS).
TOTALSEG_TASKS: dict[str, tuple[str, str]] = {
    "total": ("total", "default"),
    "total_fast": ("total", "fast"),
    "total_fastest": ("total", "fastest"),
    "total_mr": ("total_mr", "default"),
    "total_mr_fast": ("total_mr", "fast"),
    "total_mr_fastest": ("total_mr", "fastest"),
    "body": ("body", "default"),
    "body_fast": ("body", "fast"),
    "body_mr": ("body_mr", "default"),
    "body_mr_fast": ("body_mr", "fast"),
}
#: Plan spacing (mm) of fixture models for tasks TotalSegmentator does not resample (resample=None).
NATIVE_TASK_SPACING = 1.5
#: totalsegmentator() passes plans="nnUNetPlans" unless model_size="small" (total_v3 only).
TOTALSEG_PLANS = "nnUNetPlans"
#: Offline TotalSegmentator config: no usage statistics (the only network call left once weights exist).
TOTALSEG_CONFIG = {
    "totalseg_id": "totalseg_TSRTFIXT",
    "send_usage_stats": False,
    "prediction_counter": 0,
    "statistics_disclaimer_shown": True,
}


@dataclass(frozen=True)
class TotalSegModel:
    """One nnU-Net model TotalSegmentator loads for a task key."""

    task_id: int
    folder_name: str  # DatasetNNN_name
    trainer: str
    configuration: str
    folds: list[int]
    spacing: list[float]  # nnU-Net (z, y, x) order
    labels: dict[str, int]
    modality: str  # "CT" or "MR"


def totalseg_models(task: str) -> list[TotalSegModel]:
    """The models TotalSegmentator runs for a task key, read from TotalSegmentator's own tables."""
    from totalsegmentator import map_to_binary
    from totalsegmentator.map_tasks_config import DEFAULT_CONFIG, TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    if task in TOTALSEG_TASKS:
        ts_task, mode = TOTALSEG_TASKS[task]
        sub_mode = {**DEFAULT_CONFIG, **TASK_CONFIGS[ts_task]["sub_modes"][mode]}
    elif task in TASK_CONFIGS and "sub_modes" not in TASK_CONFIGS[task]:
        ts_task, sub_mode = task, {**DEFAULT_CONFIG, **TASK_CONFIGS[task]}  # a single-model sub-task
    else:
        raise ModelError(
            f"Unknown TotalSegmentator task key {task!r}: use one of {', '.join(TOTALSEG_TASKS)} "
            "or a single-model TotalSegmentator task (liver_segments, lung_vessels, ...)."
        )
    task_ids = sub_mode["task_id"] if isinstance(sub_mode["task_id"], list) else [sub_mode["task_id"]]
    # No resampling by TotalSegmentator (resample None): nnU-Net resamples to the plan's spacing itself.
    resample = sub_mode["resample"] if sub_mode["resample"] is not None else NATIVE_TASK_SPACING
    spacing_xyz = [float(resample)] * 3 if isinstance(resample, (int, float)) else [float(r) for r in resample]
    # TotalSegmentator picks part class maps like nnunet.nnUNet_predict_image does.
    parts = {
        "total": (map_to_binary.class_map_5_parts, map_to_binary.map_taskid_to_partname_ct),
        "total_mr": (map_to_binary.class_map_parts_mr, map_to_binary.map_taskid_to_partname_mr),
    }
    models = []
    for task_id in task_ids:
        if len(task_ids) > 1:
            class_maps, part_names = parts[ts_task]
            class_map = class_maps[part_names[task_id]]
        else:
            class_map = map_to_binary.class_map[ts_task]
        models.append(
            TotalSegModel(
                task_id=task_id,
                folder_name=TASK_ID_WEIGHTS_CONFIGS[task_id]["foldername"],
                trainer=sub_mode["trainer"],
                configuration=sub_mode["model"],
                folds=list(sub_mode["folds"] or [0]),  # None: nnU-Net finds the folds present
                spacing=spacing_xyz[::-1],
                labels={"background": 0, **{name: int(value) for value, name in sorted(class_map.items())}},
                modality="MR" if ts_task.endswith("_mr") else "CT",
            )
        )
    return models


def write_totalseg_home(
    home: Path,
    tasks: Sequence[str] = ("total_fast",),
    *,
    source_checkpoint: Path | None = None,
    seed: int = 0,
    small: bool = True,
    class_rows: Mapping[str, str] | None = None,
    intensity_bands: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Lay out a TOTALSEG_HOME_DIR that official TotalSegmentator runs offline; return `home`.

    Run TotalSegmentator in a separate process with TOTALSEG_HOME_DIR=home and TOTALSEG_WEIGHTS_PATH
    unset (see the module docstring for why).
    `small` builds 4-stage nets of 4..32 features on 48^3 patches (seconds on CPU); small=False
    builds full-size 6-stage, 32..320-feature nets on 128^3 patches for benchmarks.
    With `source_checkpoint`, every model gets that checkpoint's backbone and "confident" rows
    (`class_rows`: which trained row a class takes in every model that has it).
    With `intensity_bands` ({class: (lo_hu, hi_hu)}), every model labels voxels by intensity instead:
    each class named there in the models that have it, nothing else (see `write_result_folder`).
    MR tasks' models then read the bands in the image's own units (NoNormalization in their plans).
    """
    home = Path(home)
    results_root = home / "nnunet" / "results"
    results_root.mkdir(parents=True, exist_ok=True)
    (home / "config.json").write_text(json.dumps(TOTALSEG_CONFIG, indent=4))
    source = architecture_from_checkpoint(source_checkpoint) if source_checkpoint is not None else None
    for task in tasks:
        for model in totalseg_models(task):
            dataset_id, dataset_name = model.folder_name.removeprefix("Dataset").split("_", 1)
            if source is not None:
                shape_kwargs: dict[str, Any] = {"patch_size": _patch_for_source(source, small)}
            elif intensity_bands is not None:  # cheap per voxel; large tiles keep 0.44 mm models to few tiles
                # the first stage holds two ramps per band edge (many classes, e.g. vertebrae, need more)
                edges = {v for name, band in intensity_bands.items() if name in model.labels for v in band
                         if abs(v) != float("inf")}
                first = max(4, 2 * len(edges))
                # a band net labels each voxel alone, so the tile size changes only the cost: the coarse (3 and
                # 6 mm) models see images a few dozen voxels wide, which a 48^3 tile covers at 1/8 of 96^3's work
                side = 48 if min(model.spacing) >= 3.0 else 96
                shape_kwargs = {"patch_size": (side, side, side), "n_stages": 4,
                                "features": (first, max(8, first), max(16, first), 32)}
            elif small:
                shape_kwargs = {"patch_size": (48, 48, 48), "n_stages": 4, "features": (4, 8, 16, 32)}
            else:
                shape_kwargs = {
                    "patch_size": (128, 128, 128),
                    "n_stages": 6,
                    "features": [min(32 * 2**i, 320) for i in range(6)],
                }
            write_result_folder(
                results_root,
                dataset_id=int(dataset_id),
                dataset_name=dataset_name,
                configuration=model.configuration,
                trainer=model.trainer,
                plans_name=TOTALSEG_PLANS,
                spacing=model.spacing,
                channel_names={"0": model.modality},
                labels=model.labels,
                folds=model.folds,
                seed=seed,
                mirror_axes=None if "NoMirroring" in model.trainer else (0, 1, 2),
                source_checkpoint=source_checkpoint,
                class_rows=class_rows,
                intensity_bands=None if intensity_bands is None else
                {name: band for name, band in intensity_bands.items() if name in model.labels},
                **shape_kwargs,
            )
    return home


def _patch_for_source(source: CheckpointArchitecture, small: bool) -> list[int]:
    """The smallest multiple of the source's total stride of at least 48 (small) or 128 voxels per axis."""
    target = 48 if small else 128
    divisor = _total_stride(source.strides)
    return [-(-target // d) * d for d in divisor]


# --------------------------------------------------------------------------------------------
# Body-stats predictors (totalseg_get_body_stats)
# --------------------------------------------------------------------------------------------

#: TotalSegmentator's file of one xgboost fold, under home/nnunet/results/<BODY_STATS_XGB_FOLDER>/.
BODY_STATS_XGB_FILE = "{target}_{modality}_classifiers_2026_03_24_fold{fold}.json"
#: Upper bounds of the synthetic training volumes (mm3; tissue slices: mm2) per kind of feature.
_BODY_FEATURE_RANGES = {"organ_volume": 2.0e6, "vertebra_volume": 1.2e5, "slice_volume": 4.0e4}
#: Synthetic targets: mean and spread (sex: the share of males is 1/2).
_BODY_TARGETS = {"weight": (78.0, 16.0), "size": (172.0, 9.0), "age": (56.0, 15.0)}
#: Target normalisation the fixture CNNs record (reg_target_mean / std), per output name.
_BODY_CNN_TARGET_STATS = {
    "PatientWeight": (78.0, 16.0), "PatientSize": (172.0, 9.0), "PatientAge": (56.0, 15.0),
    "PatientSex_01": (0.5, 0.5), "Manufacturer_int": (1.5, 1.5), "KVP": (115.0, 10.0),
    "XRayTubeCurrent": (250.0, 90.0), "ConvolutionKernel": (2.0, 2.0), "contrast": (0.5, 0.5),
    "pi_time": (60.0, 30.0), "verte_upper": (12.0, 5.0), "verte_lower": (20.0, 3.0), "noise_p75": (15.0, 5.0),
    "mr_sequence_int": (3.0, 2.0),
}


def _synthetic_body_features(rng: Any, count: int) -> Any:
    """Feature rows in the predictors' order (tsrt.reports.body.feature_names): a third of them absent (0)."""
    import numpy as np

    from tsrt.reports.body import ORGANS, feature_names

    rows = []
    for name in feature_names():
        structure = name.rsplit("_", 1)[0]
        if name.endswith("_intensity"):
            low, high = (-150.0, 120.0) if structure.startswith(("subcutaneous", "torso", "skeletal")) else (-100.0, 600.0)
        elif structure in ORGANS:
            low, high = 0.0, _BODY_FEATURE_RANGES["organ_volume"]
        elif structure.startswith("vertebrae_"):
            low, high = 0.0, _BODY_FEATURE_RANGES["vertebra_volume"]
        else:
            low, high = 0.0, _BODY_FEATURE_RANGES["slice_volume"]
        values = rng.uniform(low, high, count)
        values[rng.uniform(size=count) < 1 / 3] = 0.0
        rows.append(values)
    return np.stack(rows, axis=1)


def write_body_stats_xgb(home: Path, *, seed: int = 0, samples: int = 400, rounds: int = 25) -> Path:
    """xgboost folds in TotalSegmentator's layout (binary payloads named .json), trained on synthetic features.

    Every target depends on many features (volumes and intensities), so a feature computed differently
    changes the prediction. The classifiers (sex) are XGBClassifier, the others XGBRegressor, saved by the
    scikit-learn wrappers as upstream's loader expects. Returns the folder.
    """
    import shutil

    import numpy as np
    import xgboost

    from tsrt.models.resources import BODY_STATS_XGB_FOLDER

    folder = Path(home) / "nnunet" / "results" / BODY_STATS_XGB_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for m_index, modality in enumerate(("ct", "mr")):
        rng = np.random.default_rng(seed * 1000 + m_index)
        features = _synthetic_body_features(rng, samples)
        scaled = features / np.maximum(np.abs(features).max(axis=0), 1e-9)
        for t_index, target in enumerate(("weight", "size", "age", "sex")):
            mixing = rng.normal(size=features.shape[1])
            score = scaled @ mixing
            score = (score - score.mean()) / score.std()
            for fold in range(5):
                picked = rng.choice(samples, size=samples * 4 // 5, replace=False)
                options = {"n_estimators": rounds, "max_depth": 3, "learning_rate": 0.3, "n_jobs": 1,
                           "random_state": seed + 31 * fold + 7 * t_index}
                if target == "sex":
                    model = xgboost.XGBClassifier(**options)
                    model.fit(features[picked], (score[picked] > 0).astype(int))
                else:
                    mean, spread = _BODY_TARGETS[target]
                    model = xgboost.XGBRegressor(**options)
                    model.fit(features[picked], mean + spread * score[picked])
                binary = folder / f"{target}_{modality}_fold{fold}.ubj"
                model.save_model(str(binary))
                shutil.move(binary, folder / BODY_STATS_XGB_FILE.format(target=target, modality=modality, fold=fold))
    return folder


def body_stats_cnn_hparams(modality: str, *, model: str = "resnet3d_10_w05",
                           crop_size: Sequence[int] = (48, 48, 40)) -> dict[str, Any]:
    """Hyperparameters of a fixture body-stats network, named as TotalSegmentator's Lightning checkpoints name them."""
    from tsrt.reports.body_cnn import MODALITY_OUTPUTS

    outputs = list(MODALITY_OUTPUTS[modality])
    return {
        "model": model, "dim": 3, "img_files": [f"{modality}.nii.gz"], "crop_size": list(crop_size),
        "resnet3d_stride": 2, "dropout": 0.1, "nr_classes": len(outputs), "reg_target_names": outputs,
        "loss": "huber", "normalize": True, "norm_channel_wise": True, "norm_ignore_zero": modality == "mr",
        "clip": modality == "ct", "clip_low": -1000.0, "clip_high": 1500.0, "multi_orientation": False,
        "nr_slices": 1, "reg_target_normalize": True,
        "reg_target_mean": [_BODY_CNN_TARGET_STATS[name][0] for name in outputs],
        "reg_target_std": [_BODY_CNN_TARGET_STATS[name][1] for name in outputs],
    }


def write_body_stats_cnn(
    home: Path, modality: str = "ct", *, seed: int = 0, hparams: Mapping[str, Any] | None = None,
    folds: Sequence[int] = range(5),
) -> Path:
    """Lightning checkpoints of body-stats networks in TotalSegmentator's layout, one per fold; returns the folder.

    Each network is built by TotalSegmentator's own constructor (totalsegmentator.cnn, MONAI) with seeded
    weights and batch-norm statistics, and saved as its loader expects: {"state_dict": backbone.* weights,
    "hyper_parameters": ...} in version_N/checkpoints/epoch=E-step=S.ckpt.
    """
    from totalsegmentator.cnn import _create_model_from_hparams

    from tsrt.models.resources import BODY_STATS_CNN_FOLDERS

    folder = Path(home) / "nnunet" / "results" / BODY_STATS_CNN_FOLDERS[modality]
    recorded = dict(hparams) if hparams is not None else body_stats_cnn_hparams(modality)
    for fold in folds:
        torch.manual_seed(seed * 100 + fold)
        network = _create_model_from_hparams(recorded)
        with torch.no_grad():
            for module in network.modules():
                if isinstance(module, (torch.nn.BatchNorm3d, torch.nn.BatchNorm2d)):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.6, 1.4)
                    module.bias.uniform_(-0.1, 0.1)
        state = {f"backbone.{key}": value for key, value in network.state_dict().items()}
        target = folder / f"version_{fold}" / "checkpoints" / f"epoch={40 + fold}-step={400 * (fold + 1)}.ckpt"
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 40 + fold, "global_step": 400 * (fold + 1), "pytorch-lightning_version": "2.5.0",
                    "state_dict": state, "hyper_parameters": dict(recorded)}, target)
    return folder
