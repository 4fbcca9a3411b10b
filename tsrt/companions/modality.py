"""CT or MR? (`tsrt modality`), the two ways TotalSegmentator's `totalseg_get_modality` tells them apart.

- From image intensities (default): mean, standard deviation, minimum and maximum of all voxels.
  CT values are Hounsfield units (air at -1024, bone in the thousands), MR values are arbitrary
  positive numbers, so four numbers suffice - as long as the image was not rescaled.
- From regions (`normalized=True`, upstream's `-n`): task total_mr --fast segments 16 structures
  (brain, spinal cord, muscles, bones, ...) in either modality; the median of the image scaled to
  0..1 inside each is the feature vector. Slower, but it still works on normalized images,
  because it compares tissues with each other rather than absolute values.

Each way has five xgboost classifiers (cross-validation folds); their 0 (CT) / 1 (MR) votes are
averaged. They are TotalSegmentator's, converted to xgboost JSON by `tsrt models import modality`
(tsrt.models.resources); the `phase` extra installs xgboost (tsrt.engines.boosters runs them without scikit-learn).

    from tsrt.companions.modality import image_modality
    image_modality("scan.nii.gz")  # {"modality": "ct", "probability": 1.0}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tsrt.errors import InputError
from tsrt.engines.boosters import load_boosters, predict_class
from tsrt.models.resources import verified_files

if TYPE_CHECKING:
    from tsrt.totalseg.options import RuntimeOptions

log = logging.getLogger("tsrt")

#: total_mr structures whose normalized median intensity the region classifiers read, in their feature order.
REGION_FEATURE_STRUCTURES = (
    "brain", "esophagus", "colon", "spinal_cord",
    "scapula_left", "scapula_right",
    "femur_left", "femur_right", "hip_left", "hip_right",
    "gluteus_maximus_left", "gluteus_maximus_right",
    "autochthon_left", "autochthon_right",
    "iliopsoas_left", "iliopsoas_right",
)
WAYS = ("intensity", "normalized")


def load_modality_classifiers(way: str, models_dir: str | Path | None = None) -> list[Any]:
    """The five fold classifiers of one way, each checked against its import-time checksum."""
    if way not in WAYS:
        raise ValueError(f"way is one of {WAYS}, not {way!r}")
    files = verified_files("modality", Path(models_dir) if models_dir is not None else None)
    paths = [path for name, path in files.items() if name.startswith(f"{way}_fold_")]
    return load_boosters(paths, "The modality check")


def intensity_features(values: np.ndarray) -> list[float]:
    """Mean, std, min and max of every voxel, in float64 like nibabel's get_fdata() values."""
    data = np.asarray(values, dtype=np.float64)
    return [float(np.mean(data)), float(np.std(data)), float(np.min(data)), float(np.max(data))]


def region_features(stats: Mapping[str, Mapping[str, float]]) -> list[float]:
    """Normalized median intensity of the 16 total_mr structures (0 for those not found)."""
    return [float(stats[name]["intensity"]) for name in REGION_FEATURE_STRUCTURES]


def predict_modality(features: Sequence[float], classifiers: Sequence[Any]) -> dict[str, Any]:
    """Average the folds' votes (0 = CT, 1 = MR); the probability is the majority's share."""
    votes = float(np.mean(np.array([predict_class(classifier, features) for classifier in classifiers])))
    if votes < 0.5:
        return {"modality": "ct", "probability": float(1 - votes)}
    return {"modality": "mr", "probability": float(votes)}


class ModalityClassifier:
    """Classifies one image or a cohort: classifiers checked (and total_mr prepared) once."""

    def __init__(self, *, normalized: bool = False, runtime: RuntimeOptions | None = None) -> None:
        from tsrt.totalseg.options import RuntimeOptions

        runtime = runtime or RuntimeOptions()
        self.normalized = normalized
        self.classifiers = load_modality_classifiers("normalized" if normalized else "intensity", runtime.models_dir)
        self._prepared = None
        if normalized:
            from tsrt.totalseg.task import prepare_run

            self._prepared = prepare_run(runtime.segment_options(
                "total_mr", fast=True, statistics=True, statistics_exclude_masks_at_border=False,
                stats_aggregation="median", statistics_normalized_intensities=True,
            ))

    def features(self, input: Any) -> list[float]:
        from tsrt.totalseg.source import read_source
        from tsrt.totalseg.task import segment_source

        source = read_source(input)
        if self._prepared is None:
            return intensity_features(source.values)
        request, runner, options = self._prepared
        log.info("Running task total_mr --fast for the region intensities...")
        _, stats = segment_source(source, request, runner, None, options)
        if not stats or all(float(stats[name]["volume"]) == 0.0 for name in REGION_FEATURE_STRUCTURES):
            name = input if isinstance(input, (str, Path)) else "the image"
            raise InputError(
                f"None of the regions the modality is read from (brain, spinal cord, hip, gluteus, ...) was found "
                f"in {name}: use the intensity check (without --normalized) instead."
            )
        return region_features(stats)

    def predict(self, input: Any) -> dict[str, Any]:
        return predict_modality(self.features(input), self.classifiers)


def image_modality(
    input: Any,
    output: str | Path | None = None,
    *,
    normalized: bool = False,
    models_dir: str | Path | None = None,
    provider: str = "auto",
    device: str | None = None,
    quiet: bool = False,
    threads: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Predict CT or MR like `totalseg_get_modality` (`normalized=True`: its `-n` region way); JSON to `output`."""
    from tsrt.totalseg.options import RuntimeOptions

    runtime = RuntimeOptions(models_dir, provider, device, quiet, threads, precision)
    classifier = ModalityClassifier(normalized=normalized, runtime=runtime)
    result = classifier.predict(input)
    if output is not None:
        from tsrt.pipeline.write import write_json

        write_json(result, Path(output))
    return result
