"""Pulmonary artery report (`tsrt report pulmonary`), as TotalSegmentator 2.18's `totalseg_pulmonary_report` makes it.

The report gives the main pulmonary artery's cross-section at five landmarks: area (cm2) and two
diameters (cm), the widest span and the widest span across it. TotalSegmentator's recipe (its
`--run_models` path), step by step:

    task total --fast --roi_subset heart ─► CT cropped to the heart + 20 mm (int16) ─► 0.8 mm (cubic, int16)
    ─► task heartchambers_highres (pulmonary_artery) and task pulmonary_artery_landmarks (pul_annulus,
       pul_sinotubular_junction, pul_bifurcation, pul_left_start, pul_right_start) on that CT
    ─► the cuts through the artery at the landmarks, measured (tsrt/reports/pulmonary_measure.py)

Absent landmarks are reported as "not in image" like upstream; a missing heart or artery, no landmark
at all, or a landmark the scan's field of view cuts stops the report with one line naming them.
Files: NAME.json (upstream's `-j`: its keys and rounding), beside it NAME.nii.gz (the report page as RGB
frames, upstream's `-o`), NAME.txt (the log, upstream's `-l`) and NAME.png (the page's first frame,
tsrt's addition); the page is drawn by tsrt (tsrt/reports/pulmonary_render.py), not by wkhtmltoimage and VTK.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tsrt.errors import InputError
from tsrt.reports.common import require_structures
from tsrt.reports.pulmonary_measure import (
    ARTERY,
    LANDMARKS,
    MARGIN_MM,
    REPORT,
    SPACING_MM,
    PulmonaryMeasurement,
    ReportMasks,
    Volume,
    check_masks,
    measure,
)
from tsrt.totalseg import ops

if TYPE_CHECKING:
    import nibabel as nib

    from tsrt.totalseg.options import RuntimeOptions

log = logging.getLogger("tsrt")

__all__ = [
    "JSON_NAME", "PulmonaryReporter", "check_ct_shape", "check_masks", "load_metadata", "masks_from_folder",
    "measure", "output_files", "pulmonary_report", "write_report",
]

#: The report's own version (totalsegmentator.pulmonary_report.VERSION), written into its metadata.
REPORT_VERSION = "0.2.1"
#: Upstream's input limits (voxels per axis) and patient age limits (years).
MAX_SIDE, MIN_SIDE = 1500, 20
MIN_AGE, MAX_AGE = 5, 150
#: Upstream's metadata when no nodeinfo.json is given.
DEFAULT_METADATA = {
    "PatientName": "Unknown", "PatientSex": "M", "PatientAge": "083Y", "PatientBirthDate": "19000101",
    "PatientID": "Unknown", "StudyID": "Unknown", "StudyDescription": "Unknown", "StudyDate": "19000101",
}
JSON_NAME = "pulmonary_report.json"


# --------------------------------------------------------------------------------------------- metadata


def load_metadata(nodeinfo: str | Path | None = None) -> dict[str, Any]:
    """The patient metadata upstream reads from nodeinfo.json (else its defaults), age in whole years.

    Refuses like upstream stops: an age in weeks, or outside 5..150 years.
    """
    if nodeinfo is not None and Path(nodeinfo).exists():
        metadata = json.loads(Path(nodeinfo).read_text(), strict=False)
        for old, new in (("PatientsAge", "PatientAge"), ("PatientsSex", "PatientSex"),
                         ("PatientsBirthDate", "PatientBirthDate")):
            if old in metadata:
                metadata[new] = metadata.pop(old)
    else:
        if nodeinfo is not None:
            log.warning("%s not found: the report uses TotalSegmentator's default patient details.", nodeinfo)
        metadata = dict(DEFAULT_METADATA)
    metadata.setdefault("PatientAge", "099Y")
    age = str(metadata["PatientAge"])
    if "W" in age:
        raise InputError("The patient's age is given in weeks: the pulmonary report is for patients of 5 to 150 years.")
    try:
        metadata["PatientAge"] = int(age.replace("Y", ""))
    except ValueError:
        raise InputError(f"PatientAge {age!r} in {nodeinfo} is not a number of years (e.g. 054Y).") from None
    if not MIN_AGE <= metadata["PatientAge"] <= MAX_AGE:
        raise InputError(
            f"The patient's age ({metadata['PatientAge']}) is outside 5..150 years, where the pulmonary report applies."
        )
    metadata["version"] = REPORT_VERSION
    return metadata


def check_ct_shape(shape: tuple[int, ...]) -> None:
    """Upstream's input limits: a 3D image, no side over 1500 or under 20 voxels."""
    if len(shape) != 3:
        raise InputError(f"The pulmonary report needs a 3D CT; this image has shape {shape}.")
    if max(shape) > MAX_SIDE:
        raise InputError(f"The image is very large ({'x'.join(map(str, shape))} voxels, over {MAX_SIDE} on a side).")
    if min(shape) < MIN_SIDE:
        raise InputError(
            f"The image is very small ({'x'.join(map(str, shape))} voxels, under {MIN_SIDE} on a side): give a chest CT."
        )


# --------------------------------------------------------------------------------------------- inputs


def saved_and_loaded(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """`nib.Nifti1Image(data, affine)` as nibabel reads it back from a file: sform in float32, pixdim kept.

    Upstream hands every intermediate CT to the next step as a file, so that is what the next step sees.
    """
    import nibabel as nib

    return nib.Nifti1Image.from_bytes(nib.Nifti1Image(data, affine).to_bytes())


def _load(path: Path) -> Volume:
    import nibabel as nib

    if not path.exists():
        raise InputError(f"{path} is missing: --rois needs {ARTERY}.nii.gz and the five pul_*.nii.gz masks there.")
    image = nib.load(path)
    return Volume(np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64))


def masks_from_folder(ct: str | Path, rois: str | Path) -> ReportMasks:
    """The CT and a folder of masks TotalSegmentator wrote (upstream's --rois_totalseg/--rois_details)."""
    from tsrt.totalseg.source import read_source

    source = read_source(ct)
    folder = Path(rois)
    return ReportMasks(
        Volume(source.values, np.asarray(source.image.affine, dtype=np.float64)),
        _load(folder / f"{ARTERY}.nii.gz"),
        {name: _load(folder / f"{name}.nii.gz") for name, _ in LANDMARKS.values()},
    )


class PulmonaryReporter:
    """Runs the three tasks and measures one image or a cohort: models checked (and fetched) once."""

    def __init__(self, runtime: RuntimeOptions | None = None) -> None:
        from tsrt.totalseg.options import RuntimeOptions
        from tsrt.totalseg.task import prepare_run

        runtime = runtime or RuntimeOptions()
        self._heart = prepare_run(runtime.segment_options("total", fast=True, roi_subset=("heart",), ml=True))
        self._chambers = prepare_run(runtime.segment_options("heartchambers_highres", ml=True))
        self._landmarks = prepare_run(runtime.segment_options("pulmonary_artery_landmarks", ml=True))

    def _labels(self, source: Any, run: tuple, names: list[str]) -> dict[str, np.ndarray]:
        from tsrt.totalseg.task import segment_source

        request, runner, options = run
        result, _ = segment_source(source, request, runner, None, options)
        by_name = {name: label for label, name in result.label_map.items()}
        return {name: (result.labels == by_name[name]).astype(np.uint8) for name in names}

    def segment(self, input: Any) -> ReportMasks:
        """Heart crop, 0.8 mm CT, then the artery and the landmarks on it (upstream's --run_models)."""
        from tsrt.totalseg.source import header_zooms, read_source

        source = read_source(input)
        check_ct_shape(source.image.spatial_shape)
        log.info("Segmenting the heart (task total --fast)...")
        heart = self._labels(source, self._heart, ["heart"])["heart"]
        require_structures(REPORT, {"heart": heart}, ["heart"])
        affine = np.asarray(source.image.affine, dtype=np.float64)
        cropped, cropped_affine, box = ops.crop_to_mask(
            source.values, affine, header_zooms(source.image), heart, MARGIN_MM, dtype=np.int16
        )
        header = saved_and_loaded(np.zeros((1, 1, 1), np.int16), cropped_affine)  # upstream saves the crop
        ct, ct_affine = ops.change_spacing(
            cropped, header.affine, header.header.get_zooms()[:3], SPACING_MM, order=3, dtype=np.int16
        )
        ct_image = saved_and_loaded(np.asarray(ct), ct_affine)  # ... and the 0.8 mm CT the models read
        ct_source = read_source(ct_image)
        log.info("Segmenting the pulmonary artery (task heartchambers_highres)...")
        artery = self._labels(ct_source, self._chambers, [ARTERY])[ARTERY]
        log.info("Segmenting the landmarks (task pulmonary_artery_landmarks)...")
        landmarks = self._labels(ct_source, self._landmarks, [name for name, _ in LANDMARKS.values()])
        ct_volume = Volume(np.asarray(ct), np.asarray(ct_image.affine, dtype=np.float64))
        edges = tuple((lo == 0, hi == n) for (lo, hi), n in zip(box, source.image.spatial_shape))
        return ReportMasks(
            ct_volume, Volume(artery, ct_volume.affine),
            {name: Volume(mask, ct_volume.affine) for name, mask in landmarks.items()}, edges,
        )

    def measure(self, input: Any, metadata: dict[str, Any]) -> PulmonaryMeasurement:
        masks = self.segment(input)
        check_masks(masks)
        return measure(masks, metadata)


def output_files(output: str | Path) -> dict[str, Path]:
    """Where the report's files go: `output` is the JSON (a name without .json: the folder for pulmonary_report.*)."""
    output = Path(output)
    json_path = output if output.name.lower().endswith(".json") else output / JSON_NAME
    stem = json_path.name[: -len(".json")]
    return {
        "json": json_path,
        "nifti": json_path.with_name(f"{stem}.nii.gz"),
        "png": json_path.with_name(f"{stem}.png"),
        "log": json_path.with_name(f"{stem}.txt"),
    }


def write_report(measurement: PulmonaryMeasurement, output: str | Path, started: float) -> dict[str, Any]:
    """The report page (RGB NIfTI and PNG), the log, and the JSON last (its presence marks a finished case)."""
    from tsrt.pipeline.write import atomic_output, write_json
    from tsrt.reports.pulmonary_render import encode_frame, page_frames, rgb_frames_nifti

    files = output_files(output)
    frames = page_frames(measurement)
    with atomic_output(files["nifti"]) as temp:
        rgb_frames_nifti(frames).to_filename(str(temp))
    with atomic_output(files["png"]) as temp:
        temp.write_bytes(encode_frame(frames[0]))
    lines = [*measurement.warnings, f"Report done (took {time.time() - started:.2f}s)"]
    stamp = time.strftime("%H:%M")
    with atomic_output(files["log"]) as temp:
        temp.write_text("".join(f"{stamp} {line}\n" for line in lines))
    report = measurement.report
    write_json(report, files["json"])
    return report


def pulmonary_report(
    input: Any,
    output: str | Path | None = None,
    *,
    rois: str | Path | None = None,
    nodeinfo: str | Path | None = None,
    models_dir: str | Path | None = None,
    provider: str = "auto",
    device: str | None = None,
    quiet: bool = False,
    threads: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The pulmonary artery report of a chest CT like `totalseg_pulmonary_report --run_models`.

    Returns the report's JSON document; with `output` (the JSON, or a folder for pulmonary_report.*) writes
    the files (see `output_files`). `rois`: a folder with
    pulmonary_artery.nii.gz and the five pul_*.nii.gz masks (TotalSegmentator's names) computed on
    `input`, which are then used instead of running the models (upstream's -rt/-rd).
    """
    from tsrt.totalseg.options import RuntimeOptions

    started = time.time()
    metadata = load_metadata(nodeinfo)
    if rois is not None:
        masks = masks_from_folder(input, rois)
        check_ct_shape(masks.ct.data.shape)
        check_masks(masks)
        measurement = measure(masks, metadata)
    else:
        reporter = PulmonaryReporter(RuntimeOptions(models_dir, provider, device, quiet, threads, precision))
        measurement = reporter.measure(input, metadata)
    if output is None:
        return measurement.report
    return write_report(measurement, output, started)
