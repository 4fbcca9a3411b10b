"""Calibration data for int8: a model's own network inputs, made from the user's scans by tsrt's pipeline.

Why the pipeline: int8 activation ranges are right only for what the network really sees at inference,
so the scans are read, oriented, resampled, normalised, padded and tiled by the code inference runs (a
TotalSegmentator part sees the closest canonical image at its task spacing, as the task runs it). The
scans should be the user's own CTs/MRs: they carry that site's scanners and protocols.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tsrt.errors import InputError
from tsrt.models.plan import RecordedPlan
from tsrt.models.registry import ModelPart
from tsrt.outputs.manifest import input_sha256
from tsrt.pipeline.preprocess import preprocess
from tsrt.pipeline.read import read_image, to_nnunet_array
from tsrt.pipeline.sliding_window import network_tiles
from tsrt.progress import progress
from tsrt.totalseg.runner import part_input
from tsrt.totalseg.source import read_source

#: nnUNetv2_predict's tile step, used for exported models (a TotalSegmentator part uses its task's step).
DEFAULT_STEP_SIZE = 0.5


@dataclass(frozen=True)
class QuantTarget:
    """One exported model to quantize: its folder and folds' plans, and for a model of tsrt's store the
    TotalSegmentator part it is (whose input is the task's view of the scan, not the raw scan)."""

    model_dir: Path
    plans: list[RecordedPlan]
    part: ModelPart | None = None

    @property
    def plan(self) -> RecordedPlan:
        return self.plans[0]

    @property
    def name(self) -> str:
        """The store's name of a part, else nnU-Net's name of the result the folds came from."""
        if self.part is not None:
            return self.part.name
        plan = self.plan
        return f"{plan.dataset_name}/{plan.trainer}__{plan.plans_name}__{plan.configuration}"

    @property
    def step_size(self) -> float:
        return self.part.step_size if self.part is not None else DEFAULT_STEP_SIZE


def scan_input(path: Path, target: QuantTarget) -> tuple[np.ndarray, list[float]]:
    """(channels-first array in the reader's order, spacing): what the model's preprocessing gets for `path`."""
    image = part_input(read_source(path), target.part) if target.part is not None else read_image(path)
    data, properties = to_nnunet_array(image, target.plan.image_reader_writer)
    return data, list(properties["spacing"])


def calibration_tiles(
    scans: Sequence[Path], target: QuantTarget, max_tiles: int, *, show_progress: bool = True
) -> np.ndarray:
    """Up to `max_tiles` network inputs (N, C, *patch), spread evenly over each scan's tiles and shared
    fairly between the scans (each keeps ceil(max_tiles / scans) at most), in sliding-window order."""
    if not scans:
        raise InputError("No calibration scans: pass some of your own CTs/MRs with --calibration.")
    quota = max(1, math.ceil(max_tiles / len(scans)))
    chosen: list[np.ndarray] = []
    with progress(f"calibration tiles ({target.name})", len(scans), enabled=show_progress, transient=True) as advance:
        for scan in scans:
            data, spacing = scan_input(scan, target)
            network_input = preprocess(data, spacing, target.plan).data
            tiles = list(network_tiles(network_input, target.plan.patch_size, target.step_size))
            keep = np.unique(np.linspace(0, len(tiles) - 1, min(quota, len(tiles))).round().astype(int))
            chosen.extend(tiles[i] for i in keep)
            advance(1)
    return np.stack(chosen[:max_tiles]).astype(np.float32, copy=False)


def scans_sha256(scans: Sequence[Path]) -> str:
    """One sha256 for a set of scans: over each scan's bytes (a DICOM folder: its files), in sorted order, so
    the same scans give the same value whatever their names or listing order."""
    digest = hashlib.sha256()
    for value in sorted(input_sha256(Path(scan)) for scan in scans):
        digest.update(bytes.fromhex(value))
    return digest.hexdigest()


def held_out(scans: Sequence[Path], validation: Sequence[Path] | None) -> tuple[list[Path], list[Path]]:
    """(calibration scans, validation scans): `validation` when given, else every fourth scan of the
    calibration set is held out for the gate (at least one; one scan alone cannot be both)."""
    scans = list(scans)
    if validation:
        return scans, list(validation)
    if len(scans) < 2:
        raise InputError(
            "The accuracy gate needs scans the calibration did not see: pass --validation SCANS, or at least "
            "two calibration scans (every fourth is then held out)."
        )
    held = scans[3::4] or scans[-1:]
    return [scan for scan in scans if scan not in held], held


class TileReader:
    """ONNX Runtime's CalibrationDataReader over calibration tiles: one tile per run (set_range lets
    quantize_static calibrate tile by tile, so memory is one tile's activations, not all of them)."""

    def __init__(self, tiles: np.ndarray, input_name: str, on_tile: Callable[[], None] | None = None) -> None:
        self.tiles, self.input_name, self.on_tile = tiles, input_name, on_tile
        self.position, self.end = 0, len(tiles)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        tile = self.tiles[self.position : self.position + 1]
        self.position += 1
        if self.on_tile is not None:
            self.on_tile()
        return {self.input_name: tile}

    def __iter__(self):
        return iter(self.get_next, None)

    def __len__(self) -> int:
        return len(self.tiles)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, end_index
