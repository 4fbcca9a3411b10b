"""The accuracy gate: an int8 graph is installed only when it segments held-out scans like fp32 does.

Both run the whole pipeline (tsrt's preprocessing, sliding window, postprocessing; mirroring off, which is
stricter and 8x cheaper) on the same inputs, and the label maps are compared voxel by voxel, pooled over
the scans: per class Dice (int8 vs fp32), voxel agreement, and seconds per run. Refused: mean Dice below
MEAN_DICE, or any class with at least LARGE_CLASS_VOXELS fp32 voxels below CLASS_DICE. The mean is over the
classes with at least MEAN_MIN_VOXELS fp32 voxels (as the README's parity tables): a structure the scans show
a few dozen voxels of has a Dice that is noise, and would decide the mean.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tsrt.pipeline.infer import InferenceSettings, LoadedModel
from tsrt.pipeline.predict import predict_array
from tsrt.progress import progress
from tsrt.quantization.calibration import QuantTarget, scan_input

MEAN_DICE = 0.99
MEAN_MIN_VOXELS = 100
CLASS_DICE = 0.95
LARGE_CLASS_VOXELS = 1000


@dataclass
class LabelCounts:
    """Voxel counts of two label maps, pooled over scans: enough for per-class Dice and agreement."""

    reference: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # voxels per label, fp32
    candidate: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # voxels per label, int8
    both: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # voxels with that label in both
    voxels: int = 0
    agreeing: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        size = int(max(reference.max(initial=0), candidate.max(initial=0))) + 1
        counts = [np.bincount(labels.ravel(), minlength=size) for labels in (reference, candidate)]
        same = reference == candidate
        counts.append(np.bincount(reference[same].ravel(), minlength=size))
        for name, new in zip(("reference", "candidate", "both"), counts):
            old = getattr(self, name)
            merged = np.zeros(max(len(old), size), np.int64)
            merged[: len(old)] += old
            merged[:size] += new
            setattr(self, name, merged)
        self.voxels += int(reference.size)
        self.agreeing += int(same.sum())

    def dice(self, label: int) -> float:
        """Dice of one label (1.0 when neither map has it)."""
        total = int(self.reference[label] + self.candidate[label]) if label < len(self.reference) else 0
        return 1.0 if total == 0 else 2.0 * int(self.both[label]) / total

    def present(self) -> list[int]:
        """Labels (background excluded) found in either map."""
        return [label for label in range(1, len(self.reference)) if self.reference[label] or self.candidate[label]]


@dataclass
class GateResult:
    """What the gate measured and decided."""

    per_class: dict[str, dict[str, Any]]  # class -> dice, voxels_fp32, voxels_int8
    mean_dice: float
    agreement: float
    seconds: dict[str, list[float]]  # fp32 / int8 -> seconds per scan (whole prediction); *_network: in the network
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def min_dice(self) -> float:
        return min((row["dice"] for row in self.per_class.values()), default=1.0)

    def summary(self) -> dict[str, Any]:
        """The numbers the plan records beside the int8 graph (the report file has the rest)."""
        return {
            "passed": self.passed, "mean_dice": round(self.mean_dice, 5), "min_dice": round(self.min_dice, 5),
            "agreement": round(self.agreement, 6), "failures": self.failures,
            "seconds_fp32": round(float(np.mean(self.seconds["fp32"])), 3),
            "seconds_int8": round(float(np.mean(self.seconds["int8"])), 3),
        }


def judge(counts: LabelCounts, label_names: dict[int, str]) -> tuple[dict[str, dict[str, Any]], float, list[str]]:
    """(per-class rows, mean Dice, failures) against the thresholds."""
    rows: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for label in counts.present():
        name = label_names.get(label, f"label_{label}")
        dice = counts.dice(label)
        voxels = int(counts.reference[label])
        rows[name] = {"dice": round(dice, 5), "voxels_fp32": voxels, "voxels_int8": int(counts.candidate[label])}
        if voxels >= LARGE_CLASS_VOXELS and dice < CLASS_DICE:
            failures.append(f"{name} Dice {dice:.3f} < {CLASS_DICE} ({voxels} voxels)")
    counted = [row["dice"] for row in rows.values() if row["voxels_fp32"] >= MEAN_MIN_VOXELS]
    mean = float(np.mean(counted)) if counted else 1.0
    if mean < MEAN_DICE:
        failures.insert(0, f"mean Dice {mean:.3f} < {MEAN_DICE}")
    return rows, mean, failures


def run_gate(
    target: QuantTarget, fp32: LoadedModel, int8: LoadedModel, scans: Sequence[Path], *, show_progress: bool = True
) -> GateResult:
    """Segment every scan with both models (alternating, so load drifts hit both) and compare the labels."""
    settings = InferenceSettings(step_size=target.step_size, use_mirroring=False, progress=False)
    counts = LabelCounts()
    seconds: dict[str, list[float]] = {"fp32": [], "int8": [], "fp32_network": [], "int8_network": []}
    with progress(f"accuracy gate ({target.name})", 2 * len(scans), enabled=show_progress, transient=True) as advance:
        for scan in scans:
            data, spacing = scan_input(scan, target)
            labels = {}
            for name, model in (("fp32", fp32), ("int8", int8)):
                started, network = time.perf_counter(), model.seconds_in_network
                labels[name] = predict_array(data, spacing, model, settings).labels
                seconds[name].append(round(time.perf_counter() - started, 3))
                seconds[f"{name}_network"].append(round(model.seconds_in_network - network, 3))
                advance(1)
            counts.add(labels["fp32"], labels["int8"])
    per_class, mean, failures = judge(counts, target.plan.label_names)
    agreement = counts.agreeing / counts.voxels if counts.voxels else 1.0
    return GateResult(per_class, mean, agreement, seconds, failures)
