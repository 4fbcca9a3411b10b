"""The body report (`tsrt report body`), as TotalSegmentator 2.18's `totalseg_get_body_stats` predicts it.

What a clinician gets: the patient's body weight (kg), height (cm), age (years) and sex estimated from
a CT or MR alone, with BMI and body surface area (Mosteller) computed from them; useful when the
scale was not used or the record is wrong (dosing, opportunistic screening). Two backends, as upstream:

`-mt cnn` (upstream's default): a ResNet3D per cross-validation fold reads the whole scan at 2 mm
(tsrt.reports.body_cnn); it also reports scanner and scan properties the networks were trained on.

`-mt xgboost`: organ, vertebra and tissue measurements feed five xgboost folds per target:

    closest canonical (unless -sc)
    ─► task total --fast (MR: total_mr --fast): volume and median intensity of 33 organs and muscles
       (CT: lung lobes merged into left and right lung), masks touching the border count as absent
       [MR: task vertebrae_mr for the vertebrae]
    ─► tasks tissue_types and body (MR: tissue_types_mr, body_mr)
    ─► at the centroid slice of each vertebra C1..L5: area (mm², the slice taken as 1 mm thick) and
       median intensity of subcutaneous fat, torso fat and skeletal muscle inside body_trunc; a tissue
       touching the slice's outer 2 pixels counts as absent
    ─► 258 features ─► per target the mean over the folds (regressors; sex: the classifiers'
       probability of male) with min, max and stddev ─► BMI and BSA

tsrt refuses (one line, nothing written) when the xgboost backend finds no vertebra C1..L5 or no
body trunk: every tissue feature would be zero and the prediction meaningless (upstream still
predicts). The predictors are the store's resources (tsrt.models.resources): `body_stats_xgb`,
`body_stats_ct`, `body_stats_mr`, imported once from TotalSegmentator's weights and checked at each use.

    import tsrt
    tsrt.body_report("ct.nii.gz", modality="ct", model_type="xgboost")  # {"weight": {"value": 81.2, ...}, ...}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tsrt.errors import TsrtError
from tsrt.reports.common import require_structures, touches_border

if TYPE_CHECKING:
    from tsrt.totalseg.options import RuntimeOptions
    from tsrt.totalseg.source import SourceImage

log = logging.getLogger("tsrt")

REPORT = "body"
JSON_NAME = "body_stats.json"
MODALITIES = ("ct", "mr")
MODEL_TYPES = ("cnn", "xgboost")
FOLDS = tuple(range(5))
#: Structures of task total (total_mr) whose volume and median intensity are features, in upstream's order.
ORGANS = (
    "gluteus_maximus_left", "hip_right", "spinal_cord", "heart", "spleen", "hip_left", "clavicula_left",
    "scapula_left", "gluteus_maximus_right", "gallbladder", "humerus_right", "gluteus_minimus_right",
    "autochthon_left", "gluteus_minimus_left", "scapula_right", "femur_right", "pancreas", "prostate", "aorta",
    "liver", "iliopsoas_left", "clavicula_right", "brain", "gluteus_medius_left", "humerus_left",
    "gluteus_medius_right", "kidney_left", "femur_left", "kidney_right", "autochthon_right", "iliopsoas_right",
    "lung_left", "lung_right",
)
VERTEBRAE = tuple(f"vertebrae_{name}" for name in (
    *(f"C{i}" for i in range(1, 8)), *(f"T{i}" for i in range(1, 13)), *(f"L{i}" for i in range(1, 6))))
TISSUE_TYPES = ("subcutaneous_fat", "torso_fat", "skeletal_muscle")
TISSUE_SLICES = tuple(f"{tissue}_{vertebra}" for tissue in TISSUE_TYPES for vertebra in VERTEBRAE)
#: CT's total --fast has lung lobes; the predictors read a left and a right lung.
LUNG_LOBES = {
    "lung_right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "lung_left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
}
BODY_TRUNK = "body_trunc"
#: A tissue whose slice mask reaches this many pixels from the slice's edge counts as absent (upstream's rule).
BORDER_PIXELS = 2
TARGETS = ("weight", "size", "age", "sex")
UNITS = {"weight": "kg", "size": "cm", "age": "years", "sex": None}
#: The tasks each backend's segmentation step runs, per modality (xgboost only).
TASKS = {
    "ct": {"total": "total", "tissue": "tissue_types", "body": "body"},
    "mr": {"total": "total_mr", "vertebrae": "vertebrae_mr", "tissue": "tissue_types_mr", "body": "body_mr"},
}


@dataclass(frozen=True)
class BodyStatsOptions:
    """One request: modality, backend and what upstream's flags change; checked once, before any image is read."""

    modality: str = "ct"
    model_type: str = "cnn"
    only_weight: bool = False
    skip_canonical: bool = False
    test_time_augmentation: bool = False  # cnn only, as upstream
    fold: int | None = None  # None: the mean of all five folds
    use_border: bool = False  # count tissues at the slice's edge too (upstream's use_border; no flag)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise TsrtError(f"Unknown modality {self.modality!r}: use ct or mr (-m).")
        if self.model_type not in MODEL_TYPES:
            raise TsrtError(f"Unknown model type {self.model_type!r}: use cnn or xgboost (-mt).")
        if self.fold is not None and self.fold not in FOLDS:
            raise TsrtError(f"Fold {self.fold} does not exist: use 0 to 4, or all (-f).")

    @property
    def targets(self) -> tuple[str, ...]:
        return ("weight",) if self.only_weight else TARGETS


def parse_fold(fold: str | int | None) -> int | None:
    """Upstream's -f: "all" (None) or a fold number 0..4."""
    if fold is None or str(fold).strip().lower() == "all":
        return None
    try:
        number = int(str(fold).strip())
    except ValueError:
        raise TsrtError(f"Fold {fold!r} is not a number: use 0 to 4, or all (-f).") from None
    if number not in FOLDS:
        raise TsrtError(f"Fold {number} does not exist: use 0 to 4, or all (-f).")
    return number


@dataclass
class BodyReport:
    """Upstream's result dict, and (xgboost) the feature row the predictors read."""

    result: dict[str, Any]
    features: list[float] | None = None

    def lines(self) -> list[str]:
        return result_lines(self.result)


def result_lines(result: Mapping[str, Any]) -> list[str]:
    """The aligned `key:  value unit` lines upstream prints (print_body_stats_result)."""
    width = max(len(str(key)) for key in result) + 1
    lines = []
    for key, entry in result.items():
        unit = entry.get("unit")
        shown = f"{entry['value']} {unit}" if unit else str(entry["value"])
        lines.append(f"{key + ':':<{width}}  {shown}")
    return lines


def with_bmi_and_bsa(result: dict[str, Any]) -> dict[str, Any]:
    """BMI (kg/m²) and Mosteller body surface area (m²) from the rounded weight and height, as upstream adds them."""
    weight_kg, height_cm = result["weight"]["value"], result["size"]["value"]
    height_m = height_cm / 100.0
    if height_m <= 0:
        raise TsrtError(f"The predicted height is {height_cm} cm, so BMI cannot be computed: use --only_weight.")
    result["bmi"] = {"value": round(weight_kg / (height_m ** 2), 2), "unit": "kg/m^2"}
    result["bsa"] = {"value": round(float(np.sqrt((height_cm * weight_kg) / 3600)), 2), "unit": "m^2"}
    return result


# --------------------------------------------------------------------------------------------- xgboost features


def feature_names() -> list[str]:
    """The predictors' 258 inputs in order: volumes (organs, vertebrae, tissue slices), then intensities."""
    names = [f"{roi}_volume" for roi in (*ORGANS, *VERTEBRAE)]
    names += [f"{roi}_volume" for roi in TISSUE_SLICES]
    names += [f"{roi}_intensity" for roi in (*ORGANS, *VERTEBRAE)]
    names += [f"{roi}_intensity" for roi in TISSUE_SLICES]
    return names


def combine_lung_lobes(stats: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """`stats` with a left and right lung: lobe volumes summed, intensities averaged weighted by volume."""
    combined = {name: dict(entry) for name, entry in stats.items()}
    for lung, lobes in LUNG_LOBES.items():
        volume = sum(stats[lobe]["volume"] for lobe in lobes)
        found = [lobe for lobe in lobes if stats[lobe]["volume"] > 0]
        weighted = sum(stats[lobe]["intensity"] * stats[lobe]["volume"] for lobe in found)
        found_volume = sum(stats[lobe]["volume"] for lobe in found)
        combined[lung] = {"volume": volume, "intensity": weighted / found_volume if found_volume > 0 else 0.0}
    return combined


def slice_touches_border(mask: np.ndarray) -> bool:
    """Whether a slice mask reaches the outer BORDER_PIXELS rows or columns."""
    return touches_border(mask, axes=(0, 1), width=BORDER_PIXELS)


def tissue_slice_stats(
    ct: np.ndarray,
    zooms: Sequence[float],
    vertebrae: tuple[np.ndarray, Mapping[int, str]],
    tissues: tuple[np.ndarray, Mapping[int, str]],
    body: tuple[np.ndarray, Mapping[int, str]],
    *,
    use_border: bool = False,
) -> dict[str, dict[str, float]]:
    """Area and median intensity of each tissue inside the body trunk on each vertebra's centroid slice (z).

    Arrays are on the canonical grid; `zooms` are its header zooms. Upstream's arithmetic: the area
    is voxel count x (x spacing x y spacing x 1 mm) rounded to 3 decimals, the median rounded to 5.
    """
    vertebra_labels, vertebra_map = vertebrae
    tissue_labels, tissue_map = tissues
    body_labels, body_map = body
    vertebra_ids = {name: label for label, name in vertebra_map.items()}
    tissue_ids = {name: label for label, name in tissue_map.items()}
    trunk = body_labels == {name: label for label, name in body_map.items()}[BODY_TRUNK]
    slice_mm2 = np.float32(zooms[0]) * np.float32(zooms[1]) * 1.0
    absent = {"volume": 0.0, "intensity": 0.0}
    stats: dict[str, dict[str, float]] = {}
    for vertebra in VERTEBRAE:
        z_found = np.nonzero(vertebra_labels == vertebra_ids[vertebra])[2]
        if z_found.size == 0:
            stats.update({f"{tissue}_{vertebra}": dict(absent) for tissue in TISSUE_TYPES})
            continue
        z = int(np.mean(z_found))
        tissue_slice = np.where(trunk[:, :, z], tissue_labels[:, :, z], 0)
        for tissue in TISSUE_TYPES:
            mask = tissue_slice == tissue_ids[tissue]
            count = mask.sum()
            if count == 0 or (not use_border and slice_touches_border(mask)):
                if count and not use_border:
                    log.debug("%s_%s touches the image border: counted as absent.", tissue, vertebra)
                stats[f"{tissue}_{vertebra}"] = dict(absent)
                continue
            stats[f"{tissue}_{vertebra}"] = {
                "volume": (count * slice_mm2).round(3),
                "intensity": np.median(ct[:, :, z][mask]).round(5),
            }
    return stats


def body_features(stats: Mapping[str, Mapping[str, float]], slices: Mapping[str, Mapping[str, float]]) -> list[float]:
    """The feature row in the predictors' order (feature_names)."""
    structures = (*ORGANS, *VERTEBRAE)
    return (
        [stats[roi]["volume"] for roi in structures]
        + [slices[roi]["volume"] for roi in TISSUE_SLICES]
        + [stats[roi]["intensity"] for roi in structures]
        + [slices[roi]["intensity"] for roi in TISSUE_SLICES]
    )


def load_predictors(
    modality: str, targets: Sequence[str], fold: int | None, models_dir: Path | None = None
) -> dict[str, list[Any]]:
    """Each target's fold predictors (xgboost Boosters) from the store, checked against their import-time sha256."""
    from tsrt.engines.boosters import load_boosters
    from tsrt.models.resources import body_stats_xgb_file, verified_files

    files = verified_files("body_stats_xgb", models_dir)
    folds = FOLDS if fold is None else (fold,)
    return {
        target: load_boosters([files[body_stats_xgb_file(target, modality, k)] for k in folds], "The body report")
        for target in targets
    }


def predict_targets(features: Sequence[float], predictors: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Upstream's entries: the folds' mean (rounded to 0.01) with min, max and stddev; sex with its probability."""
    from tsrt.engines.boosters import CLASS_THRESHOLD, predict_value

    result: dict[str, Any] = {}
    for target, boosters in predictors.items():
        predictions = np.array([predict_value(booster, features) for booster in boosters])
        if target == "sex":
            male = float(np.mean(predictions))  # the classifiers' probability of class 1 (male)
            sex = "M" if male >= CLASS_THRESHOLD else "F"
            result[target] = {"value": sex, "unit": None}
            if len(predictions) > 1:
                result[target]["probability"] = round(male if sex == "M" else 1.0 - male, 4)
                result[target]["stddev"] = round(float(np.std(predictions)), 4)
            continue
        result[target] = {"value": round(float(np.mean(predictions)), 2), "unit": UNITS[target]}
        if len(predictions) > 1:
            result[target]["min"] = round(float(predictions.min()), 2)
            result[target]["max"] = round(float(predictions.max()), 2)
            result[target]["stddev"] = round(float(np.std(predictions)), 4)
    return result


# --------------------------------------------------------------------------------------------- pipeline


def canonical_source(source: SourceImage) -> SourceImage:
    """The image turned to the closest canonical orientation as nibabel turns it (upstream cuts slices along z)."""
    import nibabel as nib

    from tsrt.totalseg.source import read_source

    image = source.image
    nifti = (nib.Nifti1Image(source.values, image.affine, image.header) if image.header is not None
             else nib.Nifti1Image(source.values, image.affine))
    turned = nib.as_closest_canonical(nifti)
    if turned is nifti:
        return source
    canonical = read_source(turned)
    canonical.path = source.path
    return canonical


class BodyReporter:
    """Predicts body stats for one image or a cohort: predictors and models checked (and fetched) once."""

    def __init__(self, runtime: RuntimeOptions | None = None, options: BodyStatsOptions | None = None) -> None:
        from tsrt.models.first_use import ensure_resource
        from tsrt.models.resources import body_stats_cnn_name
        from tsrt.totalseg.options import RuntimeOptions

        self.runtime = runtime or RuntimeOptions()
        self.options = options or BodyStatsOptions()
        models_dir = Path(self.runtime.models_dir) if self.runtime.models_dir is not None else None
        modality = self.options.modality
        self._runs: dict[str, tuple] = {}
        if self.options.model_type == "cnn":
            from tsrt.reports.body_cnn import BodyStatsNetworks

            ensure_resource(body_stats_cnn_name(modality), models_dir, progress=not self.runtime.quiet)
            self._networks = BodyStatsNetworks(
                modality, self.options.fold, models_dir=models_dir, provider=self.runtime.provider,
                device=self.runtime.device, threads=self.runtime.threads,
            )
            return
        ensure_resource("body_stats_xgb", models_dir, progress=not self.runtime.quiet)
        self._predictors = load_predictors(modality, self.options.targets, self.options.fold, models_dir)
        self._runs = {step: self._prepare(step, task) for step, task in TASKS[modality].items()}

    def _prepare(self, step: str, task: str) -> tuple:
        """Each task as upstream calls totalsegmentator(): -ml; statistics (median, border masks absent) but for body."""
        from tsrt.totalseg.task import prepare_run

        statistics = {} if step == "body" else {
            "statistics": True, "statistics_exclude_masks_at_border": True, "stats_aggregation": "median"}
        return prepare_run(self.runtime.segment_options(task, ml=True, fast=step == "total", **statistics))

    def _segment(self, source: SourceImage, step: str) -> tuple[np.ndarray, dict[int, str], dict[str, Any]]:
        from tsrt.totalseg.task import segment_source

        log.info("Running task %s%s...", TASKS[self.options.modality][step], " --fast" if step == "total" else "")
        request, runner, output_options = self._runs[step]
        result, stats = segment_source(source, request, runner, None, output_options)
        return result.labels, dict(result.label_map), dict(stats or {})

    def features(self, source: SourceImage) -> list[float]:
        """The xgboost feature row of a read image (refused when no vertebra or no body trunk is found)."""
        from tsrt.totalseg.source import header_zooms

        if not self.options.skip_canonical:
            source = canonical_source(source)
        labels, label_map, stats = self._segment(source, "total")
        vertebrae = (labels, label_map)
        if self.options.modality == "mr":
            vertebra_labels, vertebra_map, vertebra_stats = self._segment(source, "vertebrae")
            stats.update(vertebra_stats)
            vertebrae = (vertebra_labels, vertebra_map)
        found = np.isin(vertebrae[0], [label for label, name in vertebrae[1].items() if name in VERTEBRAE])
        require_structures(REPORT, {"a vertebra C1-L5": found}, ["a vertebra C1-L5"])
        tissue_labels, tissue_map, _ = self._segment(source, "tissue")
        body_labels, body_map, _ = self._segment(source, "body")
        trunk_label = [label for label, name in body_map.items() if name == BODY_TRUNK]
        require_structures(REPORT, {BODY_TRUNK: np.isin(body_labels, trunk_label)}, [BODY_TRUNK])
        if self.options.modality == "ct":
            stats = combine_lung_lobes(stats)
        log.info("Measuring the tissues at each vertebra...")
        slices = tissue_slice_stats(
            np.asarray(source.values, dtype=np.float64), header_zooms(source.image), vertebrae,
            (tissue_labels, tissue_map), (body_labels, body_map), use_border=self.options.use_border,
        )
        return body_features(stats, slices)

    def report(self, input: Any) -> BodyReport:
        from tsrt.totalseg.source import header_zooms, read_source

        source = read_source(input)
        if self.options.model_type == "cnn":
            log.info("Predicting body stats with the CNN...")
            result = self._networks.predict(
                source.values, source.image.affine, header_zooms(source.image),
                skip_canonical=self.options.skip_canonical, tta=self.options.test_time_augmentation,
            )
            if self.options.only_weight:
                result = {"weight": result["weight"]}
            features = None
        else:
            features = self.features(source)
            log.info("Predicting %s...", ", ".join(self.options.targets))
            result = predict_targets(features, self._predictors)
        if not self.options.only_weight:
            result = with_bmi_and_bsa(result)
        return BodyReport(result, features)

    def write(self, input: Any, output: Path) -> BodyReport:
        """Report on `input` and write its JSON (indented like upstream's), only once everything succeeded."""
        from tsrt.pipeline.write import write_json

        report = self.report(input)
        write_json(report.result, Path(output))
        return report


def body_report(
    input: Any,
    output: str | Path | None = None,
    *,
    modality: str = "ct",
    model_type: str = "cnn",
    only_weight: bool = False,
    skip_canonical: bool = False,
    test_time_augmentation: bool = False,
    fold: str | int | None = "all",
    models_dir: str | Path | None = None,
    provider: str = "auto",
    device: str | None = None,
    quiet: bool = False,
    threads: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Body weight, height, age and sex (and BMI, BSA) like `totalseg_get_body_stats`: returns its JSON.

    `output` (a .json path) also writes it. `model_type`: "cnn" (upstream's default) or "xgboost";
    `fold`: "all" (the folds' mean) or 0..4. The predictors come from the store, fetched on first use.
    """
    from tsrt.totalseg.options import RuntimeOptions

    options = BodyStatsOptions(modality, model_type, only_weight, skip_canonical, test_time_augmentation,
                               parse_fold(fold))
    reporter = BodyReporter(RuntimeOptions(models_dir, provider, device, quiet, threads, precision), options)
    report = reporter.report(input) if output is None else reporter.write(input, Path(output))
    return report.result
