"""The CNN backend of the body report (`-mt cnn`, TotalSegmentator's default): a ResNet3D per fold on the whole scan.

What upstream's totalsegmentator.cnn does, reproduced on numpy and ONNX Runtime:

    closest canonical (unless -sc) ─► 2 mm, linear (TotalSegmentator's change_spacing, float32)
    ─► clip / scale to [-1, 1] / z-score, as the checkpoint's hyperparameters say
    ─► centre crop or zero pad to the training crop size ─► one (1, 1, X, Y, Z) tile
    [-tta: the scan flipped along each axis, each with and without the canonical turn: six tiles]
    ─► every fold's network (fold_N.onnx, imported once from the Lightning checkpoint) ─► its outputs
       denormalised with that fold's target mean and std
    ─► per target: mean over folds and tiles (weight, size, age, ... with min, max, stddev;
       sex and contrast as a probability; vertebrae, manufacturer and MR sequence as a class)

The preprocessing and the names of the outputs come from the first fold's hyperparameters, the
denormalisation from each fold's, as upstream. The graphs and hyperparameters are the store's
`body_stats_ct` / `body_stats_mr` resources (tsrt.models.resources), checked against their sha256.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tsrt.errors import ModelError
from tsrt.models.resources import BODY_STATS_FOLDS, body_stats_cnn_name, verified_files
from tsrt.totalseg import ops

#: upstream's CNN_TARGET_SPACING_MM: the networks see the scan at 2 mm.
SPACING_MM = 2.0
#: upstream's CNN_FALLBACK_CROP_SIZE (3D) when a checkpoint records no crop size.
FALLBACK_CROP_SIZE = {"ct": (240, 240, 240), "mr": (210, 210, 150)}
#: What the networks were trained to predict (upstream's CNN_MODEL_TARGET_ORDER(S)), in output order.
BASE_OUTPUTS = ("PatientWeight", "PatientSize", "PatientAge", "PatientSex_01")
MODALITY_OUTPUTS = {
    "mr": (*BASE_OUTPUTS, "Manufacturer_int", "contrast", "verte_upper", "verte_lower", "noise_p75", "mr_sequence_int"),
    "ct": (*BASE_OUTPUTS, "Manufacturer_int", "KVP", "XRayTubeCurrent", "ConvolutionKernel", "contrast", "pi_time",
           "verte_upper", "verte_lower", "noise_p75"),
}
#: Output name -> (result key, unit), upstream's CNN_TARGET_SPECS.
TARGETS: dict[str, tuple[str, str | None]] = {
    "PatientWeight": ("weight", "kg"), "PatientSize": ("size", "cm"), "PatientAge": ("age", "years"),
    "PatientSex_01": ("sex", None), "Manufacturer_int": ("manufacturer", None), "contrast": ("contrast", None),
    "verte_upper": ("verte_upper", None), "verte_lower": ("verte_lower", None), "noise_p75": ("noise", None),
    "mr_sequence_int": ("mr_sequence", None), "KVP": ("kvp", "kV"), "XRayTubeCurrent": ("xray_tube_current", "mA"),
    "ConvolutionKernel": ("convolution_kernel", None), "pi_time": ("pi_time", "seconds"),
}
#: Binary outputs: (label below 0.5, label from 0.5).
BINARY = {"sex": ("F", "M"), "contrast": ("no", "yes")}
MANUFACTURERS = ("siemens", "philips", "ge", "toshiba", "canon", "other")
MR_SEQUENCES = ("t1", "pd", "t2", "flair", "stir", "t2star", "swi", "dwi", "mra", "other")
VERTEBRAE = tuple(f"C{i}" for i in range(1, 8)) + tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6))
#: Class outputs: class number -> name, the name when the number is unknown, how far off a number may snap.
MAPPED: dict[str, tuple[dict[int, str], str | None, int | None]] = {
    "manufacturer": (dict(enumerate(MANUFACTURERS)), "other", None),
    "mr_sequence": (dict(enumerate(MR_SEQUENCES)), "other", None),
    "verte_upper": (dict(enumerate(VERTEBRAE, start=1)), None, 2),
    "verte_lower": (dict(enumerate(VERTEBRAE, start=1)), None, 2),
}
#: -tta: the scan flipped along each voxel axis; each flip with and without the canonical turn.
TTA_FLIP_AXES = (0, 1, 2)


@dataclass(frozen=True)
class FoldNetwork:
    """One fold's graph and the hyperparameters its preprocessing and outputs need."""

    graph: Path
    hparams: dict[str, Any]


def fold_indices(fold: int | None) -> list[int]:
    """All five folds (None) or one."""
    return list(BODY_STATS_FOLDS) if fold is None else [int(fold)]


def load_networks(modality: str, fold: int | None, models_dir: Path | None = None) -> list[FoldNetwork]:
    """The folds' graphs and hyperparameters from the store, each file checked against its import-time sha256."""
    files = verified_files(body_stats_cnn_name(modality), models_dir)
    return [
        FoldNetwork(files[f"fold_{index}.onnx"], dict(json.loads(files[f"fold_{index}.json"].read_text())["hyper_parameters"]))
        for index in fold_indices(fold)
    ]


# --------------------------------------------------------------------------------------------- preprocessing


def centre_pad_or_crop(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The centre of `volume` in a zero array of `shape` (cropped where it is larger, padded where smaller)."""
    source, target = [], []
    for have, want in zip(volume.shape, shape):
        start = max((have - want) // 2, 0)
        length = min(have, want)
        offset = max((want - length) // 2, 0)
        source.append(slice(start, start + length))
        target.append(slice(offset, offset + length))
    out = np.zeros(tuple(int(s) for s in shape), dtype=volume.dtype)
    out[tuple(target)] = volume[tuple(source)]
    return out


def _channel_stats(values: Any, channels: int, ndim: int, name: str) -> np.ndarray:
    stats = np.asarray(values, dtype=np.float32).reshape(-1)
    if stats.size == 1 and channels != 1:
        stats = np.repeat(stats, channels)
    if stats.size != channels:
        raise ModelError(f"The body-stats network has {stats.size} values of {name} for {channels} channels.")
    return stats.reshape((channels,) + (1,) * (ndim - 1))


def _zscore_channels(stack: np.ndarray, nonzero: bool) -> np.ndarray:
    """Each channel minus its mean over its (non-zero) voxels, over their std (float32 sums, as upstream)."""
    out = np.empty_like(stack, dtype=np.float32)
    for index, channel in enumerate(stack):
        mask = channel != 0 if nonzero else np.ones(channel.shape, dtype=bool)
        if not mask.any():
            out[index] = channel
            continue
        values = channel[mask]
        mean, std = float(values.mean()), float(values.std())
        normalised = channel.copy()
        normalised[mask] = values - mean if std < 1e-8 else (values - mean) / std
        out[index] = normalised
    return out


def normalise_intensities(stack: np.ndarray, hparams: Mapping[str, Any]) -> np.ndarray:
    """The validation-time intensity steps the hyperparameters name: clip, scale to [-1, 1], normalise."""
    stack = stack.astype(np.float32, copy=False)
    if hparams.get("clip", False):
        stack = np.clip(stack, hparams["clip_low"], hparams["clip_high"])
    if hparams.get("daug_scale_itensity", False):  # upstream's spelling
        low, high = float(stack.min()), float(stack.max())
        stack = (np.zeros_like(stack, dtype=np.float32) if high - low < 1e-8
                 else ((stack - low) / (high - low) * 2.0 - 1.0).astype(np.float32))
    stack = stack.astype(np.float32, copy=False)
    if not hparams.get("normalize", True):
        return stack
    if hparams.get("norm_global", False):
        mean = _channel_stats(hparams["global_mean"], stack.shape[0], stack.ndim, "global_mean")
        std = _channel_stats(hparams["global_std"], stack.shape[0], stack.ndim, "global_std")
        return (stack - mean) / np.where(np.abs(std) < 1e-8, 1.0, std)
    if hparams.get("norm_channel_wise", True):
        return _zscore_channels(stack, bool(hparams.get("norm_ignore_zero", False)))
    mean, std = float(stack.mean()), float(stack.std())
    return stack - mean if std < 1e-8 else (stack - mean) / std


def crop_size(hparams: Mapping[str, Any], modality: str) -> tuple[int, ...]:
    size = hparams.get("crop_size")
    shape = tuple(int(s) for s in size) if size is not None else FALLBACK_CROP_SIZE[modality]
    if len(shape) != 3:
        raise ModelError(f"The body-stats network's crop size {shape} is not 3D: import a ResNet3D checkpoint.")
    return shape


def network_input(
    values: np.ndarray, affine: np.ndarray, zooms: Sequence[float], hparams: Mapping[str, Any], modality: str,
    *, canonical: bool = True,
) -> np.ndarray:
    """One scan (voxel values, affine, header zooms) as the network's (1, 1, X, Y, Z) float32 input."""
    if canonical:
        turned, turned_affine = ops.as_closest_canonical(values, affine)
        if turned is not values:
            values, zooms = turned, ops.nifti_zooms(turned_affine)
        affine = turned_affine
    data, _ = ops.change_spacing(np.asarray(values), affine, zooms, SPACING_MM, order=1, dtype=np.float32)
    stack = normalise_intensities(np.asarray(data, dtype=np.float32)[None], hparams)
    size = crop_size(hparams, modality)
    tile = np.stack([centre_pad_or_crop(channel, size) for channel in stack])
    return tile.astype(np.float32, copy=False)[None]


def network_inputs(
    values: np.ndarray, affine: np.ndarray, zooms: Sequence[float], hparams: Mapping[str, Any], modality: str,
    *, skip_canonical: bool = False, tta: bool = False,
) -> np.ndarray:
    """The batch upstream feeds the networks: the scan, or with -tta its six flipped variants."""
    if not tta:
        return network_input(values, affine, zooms, hparams, modality, canonical=not skip_canonical)
    tiles = []
    for axis in TTA_FLIP_AXES:
        flipped = np.flip(values, axis=axis)  # the same affine: another image, not the same one turned
        for canonical in (True, False):
            tiles.append(network_input(flipped, affine, zooms, hparams, modality, canonical=canonical))
    return np.concatenate(tiles, axis=0)


# --------------------------------------------------------------------------------------------- outputs


def output_names(hparams: Mapping[str, Any], count: int, modality: str) -> tuple[str, ...]:
    """Which output is which: the checkpoint's target names, else upstream's defaults for that many outputs."""
    recorded = hparams.get("reg_target_names") or []
    if recorded:
        if len(recorded) != count:
            raise ModelError(f"The body-stats network names {len(recorded)} targets but gives {count} outputs.")
        return tuple(recorded)
    if count == len(MODALITY_OUTPUTS[modality]):
        return MODALITY_OUTPUTS[modality]
    if count == len(BASE_OUTPUTS):
        return BASE_OUTPUTS
    raise ModelError(f"The body-stats network gives {count} outputs without naming them: import a checkpoint "
                     "that records reg_target_names.")


def denormalise(prediction: np.ndarray, hparams: Mapping[str, Any]) -> np.ndarray:
    """One tile's outputs back in the targets' units (float32, with the fold's recorded mean and std)."""
    if not hparams.get("reg_target_normalize", False):
        return prediction
    means = np.asarray(hparams.get("reg_target_mean", []), dtype=np.float32)
    stds = np.asarray(hparams.get("reg_target_std", []), dtype=np.float32)
    if means.size == 0 or stds.size == 0:
        return prediction
    if means.size == 1 and prediction.size != 1:
        means = np.repeat(means, prediction.size)
    if stds.size == 1 and prediction.size != 1:
        stds = np.repeat(stds, prediction.size)
    if means.size != prediction.size or stds.size != prediction.size:
        raise ModelError(f"The body-stats network records {means.size} target means for {prediction.size} outputs.")
    return prediction * stds.reshape(prediction.shape) + means.reshape(prediction.shape)


def binary_entry(predictions: np.ndarray, labels: tuple[str, str]) -> dict[str, Any]:
    positive = float(np.mean(predictions)) >= 0.5
    probabilities = np.clip(predictions if positive else 1.0 - predictions, 0.0, 1.0)
    entry: dict[str, Any] = {"value": labels[1] if positive else labels[0], "unit": None}
    if len(probabilities) > 1:
        entry["probability"] = round(float(np.mean(probabilities)), 4)
        entry["stddev"] = round(float(np.std(probabilities)), 4)
    return entry


def class_entry(predictions: np.ndarray, classes: Mapping[int, str], fallback: str | None,
                snap: int | None) -> dict[str, Any]:
    number = int(math.floor(float(np.mean(predictions)) + 0.5))
    if number not in classes and snap is not None:
        closest = min(classes, key=lambda known: abs(known - number))
        if abs(closest - number) <= snap:
            number = closest
    entry: dict[str, Any] = {"value": classes.get(number, fallback), "unit": None}
    if len(predictions) > 1:
        entry["stddev"] = round(float(np.std(predictions)), 4)
    return entry


def value_entry(predictions: np.ndarray, unit: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"value": round(float(np.mean(predictions)), 2), "unit": unit}
    if len(predictions) > 1:
        entry["min"] = round(float(np.min(predictions)), 2)
        entry["max"] = round(float(np.max(predictions)), 2)
        entry["stddev"] = round(float(np.std(predictions)), 4)
    return entry


def format_predictions(predictions: np.ndarray, hparams: Mapping[str, Any], modality: str) -> dict[str, Any]:
    """Upstream's result entries, in output order, from the (tiles x folds, outputs) predictions."""
    result: dict[str, Any] = {}
    for index, name in enumerate(output_names(hparams, predictions.shape[1], modality)):
        if name not in TARGETS:
            raise ModelError(f"The body-stats network predicts {name!r}, which this tsrt does not know.")
        key, unit = TARGETS[name]
        if modality == "mr" and key == "manufacturer":
            continue
        column = predictions[:, index].reshape(-1).astype(np.float32)
        if key in BINARY:
            result[key] = binary_entry(column, BINARY[key])
        elif key in MAPPED:
            classes, fallback, snap = MAPPED[key]
            result[key] = class_entry(column, classes, fallback, snap)
        else:
            result[key] = value_entry(column, unit)
    return result


class BodyStatsNetworks:
    """The folds' ONNX Runtime sessions, opened once for one image or a cohort."""

    def __init__(self, modality: str, fold: int | None, *, models_dir: Path | None = None, provider: str = "auto",
                 device: str | None = None, threads: int | None = None) -> None:
        from tsrt.engines.providers import choose_provider, create_session

        self.modality = modality
        self.networks = load_networks(modality, fold, models_dir)
        choice = choose_provider(provider, precision="fp32", device=device, threads=threads)
        self._sessions = [create_session(network.graph, choice, threads=threads) for network in self.networks]

    @property
    def hparams(self) -> dict[str, Any]:
        """The first fold's hyperparameters: they define the preprocessing and the outputs' names."""
        return self.networks[0].hparams

    def predict(self, values: np.ndarray, affine: np.ndarray, zooms: Sequence[float], *,
                skip_canonical: bool = False, tta: bool = False) -> dict[str, Any]:
        batch = network_inputs(values, affine, zooms, self.hparams, self.modality,
                               skip_canonical=skip_canonical, tta=tta)
        rows = []
        for network, session in zip(self.networks, self._sessions):
            name = session.get_inputs()[0].name
            outputs = np.atleast_2d(np.asarray(session.run(None, {name: batch})[0], dtype=np.float32))
            rows += [denormalise(row, network.hparams) for row in outputs]
        return format_predictions(np.stack(rows), self.hparams, self.modality)
