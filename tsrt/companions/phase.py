"""Contrast phase of a CT (`tsrt phase`), as TotalSegmentator's `totalseg_get_phase` predicts it.

Why it works: contrast agent reaches the arteries, the organs and the veins at different times after
injection, so the median HU of a few vessels and organs tells how many seconds after injection
("pi time") the scan was taken. TotalSegmentator's recipe, reproduced here step by step:

    task total --fast, median intensity per structure on the 3 mm image, masks at the border kept
    ─► 16 organ/vessel medians
    [brain larger than 100 mm³ ─► task headneck_bones_vessels, median on the input ─► 4 neck vessels;
     else those 4 are 0]
    ─► 5 xgboost regressors (one per cross-validation fold) ─► mean pi time, min/max/std over folds
    ─► phase band and its probability

The regressors are TotalSegmentator's, converted once to xgboost's JSON format by
`tsrt models import phase` (tsrt.models.resources); the `phase` extra installs xgboost
(tsrt.engines.boosters runs them without scikit-learn).

    from tsrt.companions.phase import contrast_phase
    contrast_phase("ct.nii.gz")  # {"pi_time": 71.2, "phase": "portal_venous", "probability": 1.0, ...}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tsrt.errors import InputError
from tsrt.engines.boosters import load_boosters, predict_value
from tsrt.models.resources import verified_files

if TYPE_CHECKING:
    from tsrt.totalseg.options import RuntimeOptions

log = logging.getLogger("tsrt")

#: Structures of task total whose median HU feed the regressors, in the regressors' feature order.
TOTAL_FEATURE_ORGANS = (
    "liver", "pancreas", "urinary_bladder", "gallbladder",
    "heart", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein",
    "iliac_vena_left", "iliac_vena_right", "iliac_artery_left", "iliac_artery_right",
    "pulmonary_vein", "brain", "colon", "small_bowel",
)
#: Neck vessels of task headneck_bones_vessels, the last four features (0 when there is no brain in the scan).
HEADNECK_FEATURE_VESSELS = (
    "internal_carotid_artery_right", "internal_carotid_artery_left",
    "internal_jugular_vein_right", "internal_jugular_vein_left",
)
#: The head and neck model only runs when the brain is in the scan (volume in mm³ above this).
BRAIN_MIN_VOLUME_MM3 = 100.0

#: Pi-time bands (seconds after injection, upper bound exclusive) -> phase and how sure the band is.
#: Late times stay portal venous: TotalSegmentator had too little delayed-phase training data.
PHASE_BANDS: tuple[tuple[float, str, float], ...] = (
    (5, "native", 1.0),
    (10, "native", 0.7),
    (20, "arterial_early", 0.7),
    (30, "arterial_early", 1.0),
    (50, "arterial_late", 1.0),
    (60, "arterial_late", 0.7),
    (90, "portal_venous", 1.0),
    (100, "portal_venous", 0.7),
    (float("inf"), "portal_venous", 0.3),
)


def pi_time_to_phase(pi_time: float) -> tuple[str, float]:
    """The phase band a pi time falls in, and the band's probability."""
    for upper, phase, probability in PHASE_BANDS:
        if pi_time < upper:
            return phase, probability
    return PHASE_BANDS[-1][1], PHASE_BANDS[-1][2]  # NaN compares False everywhere


# --------------------------------------------------------------------------------------------- classifiers


def load_phase_regressors(models_dir: str | Path | None = None) -> list[Any]:
    """The five fold regressors from the store, each checked against its import-time checksum."""
    files = verified_files("phase", Path(models_dir) if models_dir is not None else None)
    return load_boosters(files.values(), "The contrast phase")


def phase_features(stats: Mapping[str, Any], headneck_stats: Mapping[str, Any] | None) -> list[float]:
    """The 20 regressor inputs: median HU of the total structures, then of the neck vessels (0 without them)."""
    missing = [name for name in TOTAL_FEATURE_ORGANS if name not in stats or "intensity" not in stats[name]]
    if missing:
        raise InputError(
            f"The statistics lack {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: give the "
            "statistics.json of `tsrt segment --fast --statistics -sa median -sii` (task total)."
        )
    features = [float(stats[name]["intensity"]) for name in TOTAL_FEATURE_ORGANS]
    if headneck_stats is None:
        return features + [0.0] * len(HEADNECK_FEATURE_VESSELS)
    return features + [float(headneck_stats[name]["intensity"]) for name in HEADNECK_FEATURE_VESSELS]


def predict_phase(features: Sequence[float], regressors: Sequence[Any]) -> dict[str, Any]:
    """Mean pi time over the folds, its spread, and the phase: TotalSegmentator's output keys and rounding.

    The fold predictions stay float32 (xgboost's output) through mean and std, as upstream computes them.
    """
    predictions = np.array([predict_value(regressor, features) for regressor in regressors])
    pi_time = round(float(np.mean(predictions)), 2)
    phase, probability = pi_time_to_phase(pi_time)
    return {
        "pi_time": pi_time,
        "phase": phase,
        "probability": probability,
        "pi_time_min": round(float(predictions.min()), 2),
        "pi_time_max": round(float(predictions.max()), 2),
        "stddev": round(float(np.std(predictions)), 4),
    }


# --------------------------------------------------------------------------------------------- pipeline


def brain_present(stats: Mapping[str, Any]) -> bool:
    brain = stats.get("brain", {})
    return float(brain.get("volume", 0.0)) > BRAIN_MIN_VOLUME_MM3


def _check_structures_found(stats: Mapping[str, Any], name: str) -> None:
    """Refuse to guess a phase from an image in which none of the phase structures was found."""
    found = [float(stats[organ].get("volume", stats[organ]["intensity"]) or 0.0) for organ in TOTAL_FEATURE_ORGANS]
    if not any(found):
        raise InputError(
            f"None of the structures the contrast phase is read from (liver, aorta, heart, ...) was found in {name}: "
            "give a contrast CT of the trunk."
        )


class PhaseEstimator:
    """Predicts phases for one image or a cohort: classifiers checked and models loaded once."""

    def __init__(self, runtime: RuntimeOptions | None = None) -> None:
        from tsrt.totalseg.options import RuntimeOptions

        runtime = runtime or RuntimeOptions()
        self.regressors = load_phase_regressors(runtime.models_dir)  # before any segmentation: a missing extra fails fast
        self._runtime = runtime
        self._total: tuple | None = None
        self._headneck: tuple | None = None

    def _segment_options(self, task: str, **options: Any):
        """Median statistics over whole masks, the way get_ct_contrast_phase asks TotalSegmentator for them."""
        return self._runtime.segment_options(
            task, statistics=True, statistics_exclude_masks_at_border=False, stats_aggregation="median", **options
        )

    def _prepared(self, task: str) -> tuple:
        from tsrt.totalseg.task import prepare_run

        if task == "total":
            if self._total is None:
                self._total = prepare_run(self._segment_options("total", fast=True))
            return self._total
        if self._headneck is None:
            self._headneck = prepare_run(self._segment_options("headneck_bones_vessels"))
        return self._headneck

    def task_statistics(self, source: Any, task: str) -> dict[str, dict[str, float]]:
        """Median-intensity statistics of `task` (total: --fast) on a read image."""
        from tsrt.totalseg.task import segment_source

        request, runner, options = self._prepared(task)
        _, stats = segment_source(source, request, runner, None, options)
        return stats or {}

    def total_statistics(self, source: Any) -> dict[str, dict[str, float]]:
        return self.task_statistics(source, "total")

    def predict(self, input: Any, existing_stats: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The phase of `input` (path, DICOM folder/zip, nibabel image); `existing_stats` skips task total."""
        from tsrt.totalseg.source import read_source

        source = None
        name = str(input) if isinstance(input, (str, Path)) else "the image"
        if existing_stats is None:
            source = read_source(input)
            log.info("Running task total --fast for the organ intensities...")
            stats = self.total_statistics(source)
        else:
            stats = dict(existing_stats)
        phase_features(stats, None)  # names the missing structures before any more work
        _check_structures_found(stats, name)
        headneck = None
        if brain_present(stats):
            if source is None:
                source = read_source(input)
            log.info("Brain in the scan: running task headneck_bones_vessels for the neck vessels...")
            headneck = self.task_statistics(source, "headneck_bones_vessels")
        return predict_phase(phase_features(stats, headneck), self.regressors)


def contrast_phase(
    input: Any,
    output: str | Path | None = None,
    *,
    existing_stats: Mapping[str, Any] | str | Path | None = None,
    models_dir: str | Path | None = None,
    provider: str = "auto",
    device: str | None = None,
    quiet: bool = False,
    threads: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Predict the contrast phase like `totalseg_get_phase`; also write it as JSON when `output` is given.

    `existing_stats`: the dict, or path to the statistics.json, of an earlier
    `tsrt segment --fast --statistics -sa median -sii` run (task total) - that model is then not run.
    """
    stats = read_statistics(existing_stats) if isinstance(existing_stats, (str, Path)) else existing_stats
    from tsrt.totalseg.options import RuntimeOptions

    estimator = PhaseEstimator(RuntimeOptions(models_dir, provider, device, quiet, threads, precision))
    result = estimator.predict(input, stats)
    if output is not None:
        from tsrt.pipeline.write import write_json

        write_json(result, Path(output))
    return result


def read_statistics(path: str | Path) -> dict[str, Any]:
    """A statistics.json, or one line saying why it cannot be used."""
    from tsrt.totalseg.json_input import read_json_object

    return read_json_object(
        path, "the statistics file", "give the statistics.json `tsrt segment --statistics` wrote",
        "is not a statistics.json (expected one entry per structure)",
    )

