"""The aorta report (`tsrt report aorta`), as TotalSegmentator 2.18's `totalseg_aorta_report` computes it.

Diameters of the aorta at eleven anatomical landmarks and per section, for aneurysm and dissection
follow-up. The recipe (aorta_report/pipeline.py), step by step:

    task total --fast -rs aorta heart  ─►  CT cropped to aorta + heart + 20 mm, resampled to 0.8 mm
    ─► on that crop: total -rs aorta, branch vessels, T12, iliac arteries; aortic_dissection (true/false
       lumen); aorta_annulus (annulus, sinotubular junction); renal_arteries (celiac trunk, ...)
    ─► contrast phase (a native CT ignores the lumen model)
    ─► report grid: the annulus model's grid, canonical, cropped to the aorta + 20 mm, 0.8 mm
    ─► centerline (skeleton of the dilated, smoothed aorta, ending in the annulus centre)
    ─► landmarks, cross-sections, diameters, areas, section lengths and volumes
    ─► aorta_report.json (upstream's keys, units and rounding), pictures, diameter profile, CPR

Measurement steps: tsrt.reports.aorta_centerline, aorta_landmarks, aorta_measure, aorta_geometry
(scipy and scikit-image: the `reports` extra). Pictures: tsrt.reports.aorta_render (numpy only).
The contrast phase comes from the caller (tsrt.companions sits beside this layer): the CLI runs
`tsrt phase`'s estimator; the Python API takes `contrast_phase` (a name, or a callable such as
`tsrt.contrast_phase`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tsrt.errors import InputError
from tsrt.reports import aorta_centerline as cl
from tsrt.reports.aorta_geometry import Volume, require_scientific, smooth_mask
from tsrt.reports.aorta_landmarks import STRUCTURES, anchor_structures, place_landmarks
from tsrt.reports.aorta_measure import (
    AortaReport,
    Centerline,
    DiameterProfile,
    ReportGrid,
    cut_landmarks,
    diameter_profile,
    measure_landmarks,
    measure_sections,
    report_json,
)
from tsrt.reports.common import require_structures
from tsrt.reports.pulmonary_geometry import find_center
from tsrt.totalseg import ops

if TYPE_CHECKING:
    import nibabel as nib

    from tsrt.totalseg.options import RuntimeOptions

log = logging.getLogger("tsrt")

#: Upstream's aorta report version, written into the metadata: which algorithm made the numbers.
VERSION = "0.1.2"
#: What `totalseg_aorta_report` asks task total for (besides the fast aorta/heart crop).
TOTAL_ROIS = (
    "aorta", "brachiocephalic_trunk", "subclavian_artery_left", "common_carotid_artery_left",
    "iliac_artery_left", "iliac_artery_right", "vertebrae_T12",
)
DETAIL_TASKS = ("aortic_dissection", "aorta_annulus", "renal_arteries")
#: Branch vessels drawn in the overview (not measured).
VESSELS_TO_PLOT = (
    "brachiocephalic_trunk", "subclavian_artery_left", "common_carotid_artery_left", "renal_arteries",
    "celiac_trunk", "superior_mesenteric_artery", "iliac_artery_left", "iliac_artery_right",
)
AORTA, ANNULUS, TRUE_LUMEN, FALSE_LUMEN = "aorta", "annulus_proper", "aorta_true_lumen", "aorta_false_lumen"
CROP_MARGIN_MM = 20
REPORT_SPACING_MM = 0.8
#: Centerline: the aorta grown 4 voxels and blurred (sigma 6 voxels) before thinning, so the skeleton is one line.
CENTERLINE_DILATION, CENTERLINE_SIGMA = 4, 6
MIN_ANNULUS_MM3, MIN_FALSE_LUMEN_VOXELS = 200, 20
#: upstream's _validate_ct: images it refuses to report on.
MAX_SIDE, MIN_SIDE = 1500, 20
DEFAULT_METADATA = {
    "PatientName": "Unknown", "PatientSex": "M", "PatientAge": "083Y", "PatientBirthDate": "19000101",
    "PatientID": "Unknown", "StudyID": "Unknown", "StudyDescription": "Unknown", "StudyDate": "19000101",
}

PhaseSource = str | Callable[[Any], Any] | None


# --------------------------------------------------------------------------------------------- inputs


def load_metadata(nodeinfo: str | Path | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Patient/study fields for the report (upstream's nodeinfo.json, or its defaults), with the version.

    Like upstream, ages in weeks and ages outside 5..150 years are refused (the report is for adults).
    """
    if nodeinfo is None:
        metadata = dict(DEFAULT_METADATA)
    elif isinstance(nodeinfo, Mapping):
        metadata = dict(nodeinfo)
    else:
        try:
            metadata = json.loads(Path(nodeinfo).read_text(), strict=False)
        except (OSError, ValueError) as error:
            raise InputError(f"Cannot read the metadata file {nodeinfo} ({error}): give a nodeinfo JSON.") from None
    for old, new in (("PatientsAge", "PatientAge"), ("PatientsSex", "PatientSex"),
                     ("PatientsBirthDate", "PatientBirthDate")):
        if old in metadata:
            metadata[new] = metadata.pop(old)
    metadata.setdefault("PatientAge", "099Y")
    if "W" in str(metadata["PatientAge"]):
        raise InputError("The patient's age is given in weeks: the aorta report is for patients aged 5 to 150 years.")
    try:
        metadata["PatientAge"] = int(str(metadata["PatientAge"]).replace("Y", ""))
    except ValueError:
        raise InputError(f"PatientAge {metadata['PatientAge']!r} is not an age in years (e.g. 063Y).") from None
    if not 5 <= metadata["PatientAge"] <= 150:
        raise InputError("The aorta report is for patients aged 5 to 150 years; the metadata says otherwise.")
    metadata["version"] = VERSION
    return metadata


def check_ct_shape(shape: tuple[int, ...], name: str) -> None:
    """Refuse images upstream refuses (not 3D, a side over 1500 or under 20 voxels)."""
    if len(shape) != 3:
        raise InputError(f"{name} is not a 3D image; the aorta report needs one CT volume.")
    if max(shape) > MAX_SIDE or min(shape) < MIN_SIDE:
        raise InputError(
            f"{name} is {'x'.join(map(str, shape))} voxels; the aorta report takes {MIN_SIDE} to {MAX_SIDE} per side."
        )


def as_saved(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """The image as a NIfTI file holds it (float32 affine): upstream saves and reloads between steps."""
    import nibabel as nib

    return nib.Nifti1Image.from_bytes(nib.Nifti1Image(data, affine).to_bytes())


def _signed_permutation(matrix: np.ndarray, translation: np.ndarray, shape) -> bool:
    rounded = np.round(matrix)
    if not np.allclose(matrix, rounded, atol=1e-6) or not np.array_equal(np.abs(rounded).sum(axis=0), np.ones(3)):
        return False
    if not np.array_equal(np.abs(rounded).sum(axis=1), np.ones(3)):
        return False
    corners = np.array([[i, j, k] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])], float)
    exact = corners @ rounded.T + np.round(translation)
    return bool(np.abs(corners @ matrix.T + translation - exact).max() < 1e-3)


def on_grid(image: nib.Nifti1Image, reference: nib.Nifti1Image, order: int) -> np.ndarray:
    """`image` resampled onto `reference`'s grid (float32), as upstream's lazy_load does with nibabel.

    Grids that differ only by axis order, flips and whole-voxel shifts (always, for masks the models
    made on the report's CT) are copied voxel for voxel; anything else goes through
    nibabel.processing.resample_from_to (scipy), spline order `order`, zero outside.
    """
    mapping = np.linalg.inv(image.affine) @ reference.affine
    matrix, translation = mapping[:3, :3], mapping[:3, 3]
    source = np.asanyarray(image.dataobj)
    if _signed_permutation(matrix, translation, reference.shape):
        rounded, shift = np.round(matrix).astype(int), np.round(translation).astype(int)
        result = np.zeros(reference.shape[:3], dtype=np.float32)
        axes, indices, valid = [], [], []
        for target_axis in range(3):
            source_axis = int(np.flatnonzero(rounded[:, target_axis])[0])
            sign = rounded[source_axis, target_axis]
            index = sign * np.arange(reference.shape[target_axis]) + shift[source_axis]
            axes.append(source_axis)
            ok = (index >= 0) & (index < source.shape[source_axis])
            indices.append(index[ok])
            valid.append(np.flatnonzero(ok))
        moved = np.transpose(source, axes)
        result[np.ix_(*valid)] = moved[np.ix_(*indices)]
        return result
    from nibabel.processing import resample_from_to

    return resample_from_to(image, reference, order=order).get_fdata(dtype=np.float32)


def mask_on_grid(image: nib.Nifti1Image | None, reference: nib.Nifti1Image, order: int = 0) -> np.ndarray:
    """A structure on the report grid: > 0.5 after resampling, its largest blob (uint8); zeros when absent."""
    if image is None:
        return np.zeros(reference.shape[:3], dtype=np.uint8)
    return np.asarray(ops.keep_largest_blob(on_grid(image, reference, order) > 0.5)).astype(np.uint8)


@dataclass
class AortaMasks:
    """What the models give (nibabel images by TotalSegmentator class name) and the CT they ran on."""

    ct: nib.Nifti1Image
    masks: Mapping[str, nib.Nifti1Image]
    #: The CT as the phase estimator sees it (the models' input), for a callable contrast phase.
    phase_input: Any = None

    def array(self, name: str) -> np.ndarray | None:
        image = self.masks.get(name)
        return None if image is None else np.asanyarray(image.dataobj)


def masks_from_folders(ct: str | Path, totalseg_dir: str | Path, details_dir: str | Path | None = None) -> AortaMasks:
    """Masks TotalSegmentator already wrote (one `<class>.nii.gz` per structure), as upstream's -rt/-rd take them."""
    import nibabel as nib

    from tsrt.totalseg.source import read_source

    source = read_source(ct)
    ct_image = nib.Nifti1Image(source.values, source.image.affine)
    masks = {}
    folders = {"totalseg": Path(totalseg_dir), "details": Path(details_dir or totalseg_dir)}
    names = {name: "totalseg" for name in (*TOTAL_ROIS, *VESSELS_TO_PLOT)}
    names.update({name: kind for name, kind in STRUCTURES.values()})
    names.update({ANNULUS: "details", TRUE_LUMEN: "details", FALSE_LUMEN: "details"})
    for name, kind in names.items():
        path = folders[kind] / f"{name}.nii.gz"
        if not path.exists() and name == "brachiocephalic_trunk":
            path = path.with_name("brachiocephalic_trunc.nii.gz")  # TotalSegmentator v1's spelling
        if path.exists():
            masks[name] = nib.load(path)
    return AortaMasks(ct_image, masks, ct_image)


# --------------------------------------------------------------------------------------------- measuring


def phase_name(contrast_phase: PhaseSource, image: Any) -> str | None:
    """The contrast phase from a name, or from a callable given the models' CT (a dict's "phase" or a name)."""
    if contrast_phase is None or isinstance(contrast_phase, str):
        return contrast_phase
    found = contrast_phase(image)
    return found["phase"] if isinstance(found, Mapping) else str(found)


def report_grid(inputs: AortaMasks, use_lumen: bool) -> ReportGrid:
    """The annulus model's grid, canonical, cropped to the aorta + 20 mm, resampled to 0.8 mm; masks moved onto it."""
    import nibabel as nib
    from scipy import ndimage

    annulus_image = nib.as_closest_canonical(inputs.masks[ANNULUS])
    aorta_image = nib.as_closest_canonical(inputs.masks[AORTA])
    aorta_crop = ops.keep_largest_blob(aorta_image.get_fdata(dtype=np.float32))
    if aorta_crop.shape != annulus_image.shape or not np.allclose(aorta_image.affine, annulus_image.affine):
        aorta_crop = on_grid(nib.Nifti1Image((aorta_crop > 0.5).astype(np.uint8), aorta_image.affine), annulus_image, 0)
    zooms = annulus_image.header.get_zooms()[:3]
    bbox = ops.bbox_from_mask(aorta_crop > 0.5, outside_value=0,
                              addon=ops.crop_addon_voxels([CROP_MARGIN_MM] * 3, zooms))
    cropped = Volume(np.asanyarray(annulus_image.dataobj), annulus_image.affine).crop(bbox, np.uint8)
    cropped_image = cropped.nifti()
    data, affine = ops.change_spacing(
        cropped.data, cropped.affine, cropped_image.header.get_zooms()[:3], REPORT_SPACING_MM, order=0
    )
    reference = cropped_image if data is cropped.data else nib.Nifti1Image(data, affine)
    annulus = reference.get_fdata(dtype=np.float32)
    spacing = reference.header.get_zooms()[:3]
    annulus_volume = annulus.sum() * np.prod(spacing)
    if annulus_volume < MIN_ANNULUS_MM3:
        log.warning("The aortic annulus is (almost) empty: landmark 1 is left out.")

    aorta = mask_on_grid(inputs.masks[AORTA], reference)
    aorta_filled = ndimage.binary_fill_holes(aorta).astype(np.uint8)
    if use_lumen:
        true_lumen = mask_on_grid(inputs.masks.get(TRUE_LUMEN), reference, order=3)
        false_lumen = mask_on_grid(inputs.masks.get(FALSE_LUMEN), reference, order=3)
    else:
        true_lumen, false_lumen = aorta.copy(), np.zeros_like(aorta)
    false_lumen = np.asarray(ops.remove_small_blobs(false_lumen, [MIN_FALSE_LUMEN_VOXELS, 1e9]))
    aorta[true_lumen > 0.5] = 1
    aorta[false_lumen > 0.5] = 1
    aorta = ndimage.binary_fill_holes(aorta).astype(np.uint8)
    true_lumen = aorta.copy()
    true_lumen[false_lumen > 0.5] = 0
    annulus = ops.binary_erosion_cross(ops.binary_dilation_cross(annulus, 1), 1)  # scipy's binary_closing

    structures = {}
    for key, (name, _) in STRUCTURES.items():
        structures[key] = mask_on_grid(inputs.masks.get(name), reference)
        if not structures[key].any():
            log.info("%s is empty.", name)
    vessels = np.zeros_like(aorta)
    for name in VESSELS_TO_PLOT:
        vessels[mask_on_grid(inputs.masks.get(name), reference) > 0.5] = 1
    return ReportGrid(
        reference.affine, spacing, annulus, float(annulus_volume), aorta, aorta_filled, true_lumen, false_lumen,
        structures, vessels, reference,
    )


def build_centerline(grid: ReportGrid) -> Centerline:
    """Skeleton of the grown, smoothed aorta, distal end first, continued to the annulus centre (+1 voxel)."""
    annulus_center = find_center(grid.annulus)
    if annulus_center is None:
        raise InputError("The aortic annulus is empty, so the centerline has no proximal end (nothing was measured).")
    smooth = smooth_mask(ops.binary_dilation_cross(grid.aorta, CENTERLINE_DILATION), CENTERLINE_SIGMA)
    image, points = cl.trace(smooth)
    points = cl.distal_first(points)
    points = cl.append_point(image, points, annulus_center)
    extended_image, extended = cl.extend(image, points, 1)
    # Upstream tests the annulus centre itself (not the extension) for lying in the annulus.
    if grid.annulus[tuple(points[-1].astype(int))]:
        image, points = extended_image, extended
    else:
        log.info("The annulus centre lies outside the annulus mask: the centerline is not extended.")
    if cl.path_length_mm(points, grid.spacing) < 2:
        log.warning("The centerline is shorter than 2 mm: check the aorta mask.")
    return Centerline(points, image, cl.resample_evenly(points, grid.affine, 1))


def measure(
    inputs: AortaMasks,
    *,
    metadata: Mapping[str, Any] | None = None,
    contrast_phase: PhaseSource = None,
    skip_dissection: bool = False,
    erosion: bool = False,
    with_ct: bool = True,
    with_profile: bool = True,
) -> AortaReport:
    """The aorta report from the models' masks (`inputs`), as upstream's create_aorta_report measures it.

    Refuses (one line, nothing measured) when the aorta or the aortic annulus is missing.
    `contrast_phase`: "native" (or a callable returning it) ignores the true/false lumen masks, as
    upstream does; None uses them (the phase was not checked).
    """
    require_scientific()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    present = {name: inputs.array(name) for name in (AORTA, ANNULUS) if inputs.array(name) is not None}
    require_structures("aorta", present, [AORTA, ANNULUS])
    metadata = load_metadata(metadata)
    use_lumen = TRUE_LUMEN in inputs.masks and not skip_dissection
    if use_lumen:
        phase = phase_name(contrast_phase, inputs.phase_input if inputs.phase_input is not None else inputs.ct)
        log.info("Contrast phase: %s", phase or "not given (the true/false lumen masks are used)")
        use_lumen = phase != "native"
    grid = report_grid(inputs, use_lumen)
    timings["grid"] = time.perf_counter() - started

    started = time.perf_counter()
    centerline = build_centerline(grid)
    timings["centerline"] = time.perf_counter() - started
    started = time.perf_counter()
    structures = anchor_structures(grid.structures, grid.aorta, centerline.points, grid.spacing)
    aorta_volume = Volume(grid.aorta, grid.affine, tuple(grid.spacing))
    landmarks = place_landmarks(structures, grid.annulus_volume, centerline.points, aorta_volume, grid.spacing)
    max_diameter = cut_landmarks(landmarks, centerline.points, grid.aorta, grid.annulus, grid.spacing, erosion)
    ct = on_grid(inputs.ct, grid.reference, 3) if with_ct else None
    measure_landmarks(landmarks, grid.affine, grid.true_lumen, grid.false_lumen, max_diameter, ct)
    timings["landmarks"] = time.perf_counter() - started
    started = time.perf_counter()
    sections = measure_sections(
        landmarks, aorta_volume, grid.aorta_filled, grid.true_lumen, grid.false_lumen, centerline.points,
        grid.spacing, max_diameter,
    )
    timings["sections"] = time.perf_counter() - started
    profile = None
    if with_profile:
        started = time.perf_counter()
        positions, (whole, true, false) = diameter_profile(
            [grid.aorta_filled, grid.true_lumen, grid.false_lumen], centerline.resampled, grid.spacing,
            max(max_diameter * 1.6, 60),
        )
        profile = DiameterProfile(positions, whole, true, false)
        timings["profile"] = time.perf_counter() - started
    document = report_json(landmarks, sections, metadata)
    return AortaReport(document, landmarks, sections, grid, centerline, max_diameter, profile, ct, timings)


# --------------------------------------------------------------------------------------------- models


def require_aorta_in_view(aorta: np.ndarray, affine: np.ndarray) -> None:
    """Refuse in one line an aorta that is missing or that the field of view cuts anywhere but at its caudal end.

    The caudal end may leave the scan (upstream then leaves the abdominal landmarks out); nothing else may.
    The reporter checks its first model's aorta with it; the web page checks its own segmentation, before
    any of the report's models run.
    """
    canonical, _ = ops.as_closest_canonical(np.asarray(aorta, dtype=bool), affine)
    require_structures("aorta", {AORTA: np.pad(canonical, ((0, 0), (0, 0), (1, 0)))}, [AORTA], whole=[AORTA])


class AortaReporter:
    """Runs the report's models through tsrt's task layer and measures; models checked once for a cohort."""

    def __init__(
        self,
        runtime: RuntimeOptions | None = None,
        *,
        contrast_phase: PhaseSource = None,
        skip_dissection: bool = False,
        erosion: bool = False,
    ) -> None:
        from tsrt.totalseg.options import RuntimeOptions
        from tsrt.totalseg.task import prepare_run

        require_scientific()  # before any model runs: a missing extra fails fast
        runtime = runtime or RuntimeOptions()
        self.contrast_phase, self.skip_dissection, self.erosion = contrast_phase, skip_dissection, erosion
        self._crop = prepare_run(runtime.segment_options("total", fast=True, roi_subset=(AORTA, "heart"), ml=True))
        tasks = [t for t in DETAIL_TASKS if not (skip_dissection and t == "aortic_dissection")]
        self._details = [prepare_run(runtime.segment_options("total", roi_subset=TOTAL_ROIS, ml=True))]
        self._details += [prepare_run(runtime.segment_options(task, ml=True)) for task in tasks]

    @staticmethod
    def _run(source: Any, prepared: tuple, wanted: set[str]) -> dict[str, np.ndarray]:
        """The `wanted` classes' masks from one task run on `source`."""
        from tsrt.totalseg.task import segment_source

        request, runner, options = prepared
        result, _ = segment_source(source, request, runner, None, options)
        return {name: result.labels == label for label, name in result.label_map.items() if name in wanted}

    def model_masks(self, input: Any) -> AortaMasks:
        """Crop the CT to aorta and heart, resample it to 0.8 mm and run the detail models on it."""
        from tsrt.totalseg.source import header_zooms, read_source

        source = read_source(input)
        name = str(input) if isinstance(input, (str, Path)) else "the image"
        check_ct_shape(tuple(source.values.shape), name)
        log.info("Finding the aorta (task total --fast)...")
        found = self._run(source, self._crop, {AORTA, "heart"})
        aorta = found.get(AORTA, np.zeros(source.values.shape, bool))
        require_aorta_in_view(aorta, source.image.affine)
        combined = aorta | found.get("heart", np.zeros_like(aorta))
        bbox = ops.bbox_from_mask(combined, outside_value=0,
                                  addon=ops.crop_addon_voxels([CROP_MARGIN_MM] * 3, header_zooms(source.image)))
        data, affine = ops.crop_to_bbox(source.values, source.image.affine, bbox)
        cropped = as_saved(np.asarray(data, dtype=np.float64).astype(np.int16), affine)
        data, affine = ops.change_spacing(
            np.asanyarray(cropped.dataobj), cropped.affine, cropped.header.get_zooms()[:3], REPORT_SPACING_MM,
            order=3, dtype=np.int16,
        )
        ct = as_saved(np.asarray(data), affine)
        log.info("CT cropped to the aorta and resampled to %s mm: %s voxels", REPORT_SPACING_MM, ct.shape)
        ct_source = read_source(ct)
        import nibabel as nib

        wanted = {*TOTAL_ROIS, *VESSELS_TO_PLOT, *(name for name, _ in STRUCTURES.values()),
                  ANNULUS, TRUE_LUMEN, FALSE_LUMEN}
        masks: dict[str, Any] = {}
        for prepared in self._details:
            log.info("Running task %s...", prepared[0].task.name)
            for label_name, mask in self._run(ct_source, prepared, wanted).items():  # the first run's aorta stays
                masks.setdefault(label_name, nib.Nifti1Image(mask.astype(np.uint8), ct.affine))
        return AortaMasks(ct, masks, ct)

    def report(self, input: Any, metadata: Mapping[str, Any] | None = None, *, with_ct: bool = True) -> AortaReport:
        return measure(
            self.model_masks(input), metadata=metadata, contrast_phase=self.contrast_phase,
            skip_dissection=self.skip_dissection, erosion=self.erosion, with_ct=with_ct,
        )


# --------------------------------------------------------------------------------------------- files


@dataclass
class AortaOutputs:
    """Where the report's files go (None: not written). `json` is upstream's -j, `nifti` its -o."""

    json: Path | None = None
    picture: Path | None = None  # the report page as PNG (tsrt's drawing)
    nifti: Path | None = None  # the report page frames as an RGB NIfTI, like upstream's output image
    profile: Path | None = None  # diameter profile CSV (tsrt's)
    cpr: Path | None = None  # curved planar reformation overview PNG (upstream's -c)
    pdf: Path | None = None  # the page again, as a one-page PDF
    cpr_animated: Path | None = None  # the CPR scrolled along the aorta, RGB NIfTI frames (upstream's -ca)


def aorta_output_files(json_path: str | Path, *, pdf: bool = False, nifti: bool = False, cpr: bool = False,
                       profile: bool = True, picture: bool = True, cpr_animated: bool = False) -> AortaOutputs:
    """The files the command writes beside the JSON: <stem>.png, _profile.csv, and on request .pdf, .nii.gz, _cpr.png,
    _cpr_animated.nii.gz.

    The PDF replaces nothing: PNG and PDF hold the same page.
    """
    json_path = Path(json_path)
    stem = json_path.with_suffix("")

    def named(suffix: str, wanted: bool) -> Path | None:
        return stem.with_name(stem.name + suffix) if wanted else None

    return AortaOutputs(
        json_path, named(".png", picture), named(".nii.gz", nifti), named("_profile.csv", profile),
        named("_cpr.png", cpr), named(".pdf", pdf), named("_cpr_animated.nii.gz", cpr_animated),
    )


def profile_csv(report: AortaReport) -> str:
    """The diameter profile as CSV: position from the annulus (mm), aorta / true / false lumen diameters (mm)."""
    profile = report.profile
    rows = ["position_mm,aorta_diameter_mm,true_lumen_diameter_mm,false_lumen_diameter_mm"]
    for values in zip(profile.position_mm, profile.aorta_mm, profile.true_lumen_mm, profile.false_lumen_mm):
        rows.append(",".join("" if np.isnan(v) else f"{v:.2f}" for v in values))
    return "\n".join(rows) + "\n"


def write_outputs(report: AortaReport, outputs: AortaOutputs) -> list[Path]:
    """Write the requested files (each atomically; the JSON last, so it marks a finished case)."""
    from tsrt.pipeline.write import atomic_output, write_json

    written = []
    if any(path is not None for path in (outputs.picture, outputs.nifti, outputs.pdf)):
        from tsrt.reports import aorta_render

        page = aorta_render.render_page(report)  # once: PNG, PDF and NIfTI show the same page
        for path in (outputs.picture, outputs.pdf):
            if path is not None:
                written.append(aorta_render.write_page(page, path))
        if outputs.nifti is not None:
            written.append(aorta_render.write_page_nifti(page, outputs.nifti))
    if outputs.cpr is not None or outputs.cpr_animated is not None:
        from tsrt.reports.aorta_cpr import straighten
        from tsrt.reports.aorta_render import write_cpr_overview

        straight = straighten(report)  # once: the still and the animation show the same stack
        if outputs.cpr is not None:
            written.append(write_cpr_overview(report, outputs.cpr, straight))
        if outputs.cpr_animated is not None:
            from tsrt.reports.aorta_animation import write_cpr_animation

            written.append(write_cpr_animation(report, outputs.cpr_animated, straight))
    if outputs.profile is not None and report.profile is not None:
        with atomic_output(outputs.profile) as temp:
            temp.write_text(profile_csv(report))
        written.append(outputs.profile)
    if outputs.json is not None:
        written.append(write_json(report.json, outputs.json))
    return written


def aorta_report(
    input: Any,
    output: str | Path | None = None,
    *,
    picture: str | Path | None = None,
    nifti: str | Path | None = None,
    profile: str | Path | None = None,
    cpr: str | Path | None = None,
    pdf: str | Path | None = None,
    cpr_animated: str | Path | None = None,
    metadata: str | Path | Mapping[str, Any] | None = None,
    contrast_phase: PhaseSource = None,
    skip_dissection: bool = False,
    erosion: bool = False,
    rois_totalseg: str | Path | None = None,
    rois_details: str | Path | None = None,
    models_dir: str | Path | None = None,
    provider: str = "auto",
    device: str | None = None,
    quiet: bool = False,
    threads: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The aorta report like `totalseg_aorta_report`: upstream's JSON (returned; written to `output`).

    `picture` (PNG), `pdf`, `nifti` (the page as RGB NIfTI), `profile` (CSV), `cpr` (PNG) and `cpr_animated`
    (the CPR scrolled along the aorta, RGB NIfTI frames) add files.
    `rois_totalseg` / `rois_details`: folders of masks TotalSegmentator already wrote for `input`
    (upstream's -rt/-rd); then no model runs. `contrast_phase`: the phase name, or a callable such
    as `tsrt.contrast_phase` (a native CT ignores the dissection model); None: not checked.
    """
    meta = load_metadata(metadata)
    if rois_totalseg is not None:
        report = measure(
            masks_from_folders(input, rois_totalseg, rois_details), metadata=meta, contrast_phase=contrast_phase,
            skip_dissection=skip_dissection, erosion=erosion,
        )
    else:
        from tsrt.totalseg.options import RuntimeOptions

        reporter = AortaReporter(
            RuntimeOptions(models_dir, provider, device, quiet, threads, precision),
            contrast_phase=contrast_phase, skip_dissection=skip_dissection, erosion=erosion,
        )
        report = reporter.report(input, meta)
    outputs = AortaOutputs(
        *(None if path is None else Path(path) for path in (output, picture, nifti, profile, cpr, pdf, cpr_animated))
    )
    write_outputs(report, outputs)
    return report.json
