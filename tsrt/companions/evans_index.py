"""Evans index of a head CT (`tsrt evans-index`), as TotalSegmentator's `totalseg_evans_index` measures it.

The Evans index is the widest left-right span of the lateral ventricles' frontal horns divided by
the widest inner width of the skull on the same axial slice; above 0.3 suggests ventricular
enlargement (e.g. normal-pressure hydrocephalus). TotalSegmentator's recipe, step by step:

    task total --roi_subset brain skull, task ventricle_parts (frontal horns: labels 1 and 6)
    ─► closest canonical, 1 mm voxels (masks: nearest neighbour; CT: linear, stored as uint8)
    ─► CT outside the brain set to 0 ─► rigid registration of that CT onto TotalSegmentator's
       1 mm brain CT atlas (so "left-right" and "axial" mean the atlas's axes, whatever the head tilt)
    ─► brain (linear, truncated), skull and ventricles (label interpolation) in atlas space
    ─► brain dilated by 2 voxels into the gap below the skull, skull removed, largest blob
    ─► volumes; small blobs removed (brain <= 200, horns <= 10 voxels)
    ─► widest x-extent of the horns over all axial slices, widest x-extent of the brain on that slice
    ─► index = horn width / brain width

Upstream registers with ANTs (antspyx). Here SimpleITK, already a tsrt dependency, runs the same
rigid registration the way `ants.registration(type_of_transform="Rigid")` sets it up: images taken
as plain voxel arrays (spacing 1, origin 0), moving histogram matched to the atlas, centre-of-mass
initialisation, Mattes mutual information (32 bins, regular 20 % sampling), 6/4/2/1 shrink
factors with 3/2/1/0-voxel smoothing, 2100/1200/1200/10 iterations, steps of 0.25 voxel.
tests/test_evans_index.py shows both give the analytic index of a head phantom within 0.01.
The atlas comes into the store with `tsrt models import evans-index`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tsrt.totalseg import ops
from tsrt.errors import InputError
from tsrt.models.resources import verified_files

if TYPE_CHECKING:
    from tsrt.totalseg.options import RuntimeOptions

log = logging.getLogger("tsrt")

RESOLUTION_MM = 1.0
#: ventricle_parts labels of the frontal horns (left, right).
FRONTAL_HORN_LABELS = (1, 6)
#: Voxels the brain grows by to fill the gap below the skull (more would leak where there is no skull).
BRAIN_DILATION_VOXELS = 2
#: Blobs of at most this many 1 mm voxels are dropped before measuring.
SMALL_BRAIN_BLOB, SMALL_HORN_BLOB = 200, 10
#: ants.registration(type_of_transform="Rigid"): per level shrink factor, smoothing sigma (voxels), iterations.
RIGID_LEVELS = ((6, 3.0, 2100), (4, 2.0, 1200), (2, 1.0, 1200), (1, 0.0, 10))
RIGID_STEP = 0.25
MI_BINS, MI_SAMPLING = 32, 0.2
#: Fixed seed for the metric's regular sampling, so a run is repeatable.
SAMPLING_SEED = 1


@dataclass(frozen=True)
class Width:
    """A left-right span: `length` in voxels from `start` to `end` (x, y, z voxel indices)."""

    length: int
    start: tuple[int, int, int]
    end: tuple[int, int, int]


@dataclass
class HeadMasks:
    """What the models give, on the input's voxel grid: brain, skull and ventricle_parts labels."""

    brain: np.ndarray
    skull: np.ndarray
    ventricles: np.ndarray


@dataclass
class EvansMeasurement:
    report: dict[str, float]  # TotalSegmentator's keys and rounding
    horns: Width
    brain: Width
    slice_image: np.ndarray  # skull + ventricles on the measured axial slice (atlas space), 0/1


# --------------------------------------------------------------------------------------------- measuring


def widest_span_along_x(mask: np.ndarray) -> Width | None:
    """The longest x-extent (last minus first voxel index) of any (y, z) row of `mask`.

    Ties go to the lowest z, then the lowest y, as upstream's scan order picks them. None when no
    row spans more than one voxel.
    """
    rows = mask.any(axis=0)  # (y, z)
    if not rows.any():
        return None
    nx = mask.shape[0]
    first = np.argmax(mask, axis=0)
    last = nx - 1 - np.argmax(mask[::-1], axis=0)
    lengths = np.where(rows, last - first, 0)
    best = int(lengths.max())
    if best <= 0:
        return None
    z = int(np.argmax(lengths.max(axis=0) == best))
    y = int(np.argmax(lengths[:, z] == best))
    return Width(best, (int(first[y, z]), y, z), (int(last[y, z]), y, z))


def _to_itk(array: np.ndarray):
    """A voxel array as ANTs' from_numpy sees it: index (x, y, z), spacing 1, origin 0, identity direction."""
    import SimpleITK as sitk

    return sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0)))


def _from_itk(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def register_rigid(moving: np.ndarray, fixed: np.ndarray) -> Any:
    """Rigid transform (fixed voxel -> moving voxel) that aligns `moving` with `fixed`, ANTs' Rigid recipe."""
    import SimpleITK as sitk

    fixed_image, moving_image = _to_itk(fixed), _to_itk(moving)
    matcher = sitk.HistogramMatchingImageFilter()  # antsRegistration -u 1
    matcher.SetNumberOfHistogramLevels(256)
    matcher.SetNumberOfMatchPoints(12)
    matcher.ThresholdAtMeanIntensityOn()
    moving_image = matcher.Execute(moving_image, fixed_image)
    transform = sitk.CenteredTransformInitializer(  # antsRegistration -r [fixed,moving,1]: centres of mass
        fixed_image, moving_image, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    for shrink, sigma, iterations in RIGID_LEVELS:
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=MI_BINS)
        method.SetMetricSamplingStrategy(method.REGULAR)
        method.SetMetricSamplingPercentage(MI_SAMPLING, SAMPLING_SEED)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsGradientDescent(
            learningRate=1.0, numberOfIterations=iterations, convergenceMinimumValue=1e-6, convergenceWindowSize=10,
            estimateLearningRate=method.Once, maximumStepSizeInPhysicalUnits=RIGID_STEP,
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([shrink])
        method.SetSmoothingSigmasPerLevel([sigma])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        method.SetInitialTransform(transform, inPlace=True)
        method.Execute(fixed_image, moving_image)
    return transform


def warp_linear(moving: np.ndarray, fixed_shape: tuple[int, ...], transform: Any) -> np.ndarray:
    """`moving` resampled onto the fixed grid with linear interpolation (float32), 0 outside."""
    import SimpleITK as sitk

    reference = _to_itk(np.zeros(fixed_shape, dtype=np.float32))
    return _from_itk(sitk.Resample(_to_itk(moving), reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def warp_labels(labels: np.ndarray, fixed_shape: tuple[int, ...], transform: Any) -> np.ndarray:
    """Label map onto the fixed grid: each label interpolated linearly, the strongest wins (ANTs' genericLabel)."""
    best = warp_linear((labels == 0).astype(np.float32), fixed_shape, transform)
    best[...] = np.maximum(best, 0.0)
    result = np.zeros(fixed_shape, dtype=np.uint8)
    for label in (int(v) for v in np.unique(labels) if v != 0):
        weight = warp_linear((labels == label).astype(np.float32), fixed_shape, transform)
        wins = weight > best
        result[wins] = label
        best[wins] = weight[wins]
    return result


def _to_atlas_resolution(data: np.ndarray, affine: np.ndarray, order: int) -> np.ndarray:
    """Closest canonical, then 1 mm voxels stored as uint8 (change_spacing's truncating cast)."""
    data, affine = ops.as_closest_canonical(data, affine)
    resampled, _ = ops.change_spacing(
        data, affine, ops.nifti_zooms(affine), RESOLUTION_MM, order=order, dtype=np.uint8
    )
    return np.asarray(resampled)


def measure(values: np.ndarray, affine: np.ndarray, masks: HeadMasks, atlas: np.ndarray) -> EvansMeasurement:
    """The Evans index from the CT voxels (input grid, `affine`), its head masks and the 1 mm atlas."""
    horns_input = np.isin(masks.ventricles, FRONTAL_HORN_LABELS)
    if not masks.brain.any() or not masks.skull.any() or not horns_input.any():
        missing = [n for n, m in (("brain", masks.brain), ("skull", masks.skull), ("frontal horns", horns_input))
                   if not m.any()]
        raise InputError(
            f"No {', '.join(missing)} found, so there is no Evans index: give a head CT that holds the whole brain."
        )
    affine = np.asarray(affine, dtype=np.float64)
    brain = _to_atlas_resolution((masks.brain > 0).astype(np.uint8), affine, order=0)
    skull = _to_atlas_resolution((masks.skull > 0).astype(np.uint8), affine, order=0)
    ventricles = _to_atlas_resolution(np.asarray(masks.ventricles, dtype=np.uint8), affine, order=0)
    ct = _to_atlas_resolution(np.asarray(values), affine, order=1).astype(np.float64)
    ct[~(brain > 0.5)] = 0  # the brain only: what the atlas shows

    log.info("Registering the brain onto the atlas...")
    transform = register_rigid(ct, atlas)
    shape = atlas.shape
    brain = warp_linear(brain, shape, transform).astype(np.uint8)  # upstream: linear, cast truncates
    skull = warp_labels(skull, shape, transform)
    ventricles = warp_labels(ventricles, shape, transform)
    ventricles_all = ventricles > 0

    brain = ops.binary_dilation_cross(brain, BRAIN_DILATION_VOXELS).astype(np.uint8)
    brain[skull > 0] = 0
    brain = ops.keep_largest_blob(brain)
    voxel_ml = RESOLUTION_MM**3 * 0.001
    brain_ml = float(brain.sum()) * voxel_ml
    ventricle_ml = float(ventricles_all.sum()) * voxel_ml

    horns = np.isin(ventricles, FRONTAL_HORN_LABELS).astype(np.uint8)
    brain = ops.remove_small_blobs(brain, [SMALL_BRAIN_BLOB, 1e10])
    horns = ops.remove_small_blobs(horns, [SMALL_HORN_BLOB, 1e10])
    horn_width = widest_span_along_x(horns)
    if horn_width is None:
        raise InputError(
            "The frontal horns are too small to measure after registration: is the whole brain in the image?"
        )
    z = horn_width.start[2]
    brain_width = widest_span_along_x(brain[:, :, z : z + 1])
    if brain_width is None:
        raise InputError("No brain on the slice of the widest frontal horns: is the whole brain in the image?")
    index = horn_width.length / brain_width.length
    report = {
        "evans_index": round(index, 3),
        "brain_volume_ml": round(brain_ml, 1),
        "ventricle_volume_ml": round(ventricle_ml, 1),
        "ventricle_brain_ratio": round(ventricle_ml / brain_ml, 3),
    }
    slice_image = ((skull[:, :, z] > 0) | ventricles_all[:, :, z]).astype(np.uint8)
    return EvansMeasurement(report, horn_width, brain_width, slice_image)


# --------------------------------------------------------------------------------------------- picture


def render_png(measurement: EvansMeasurement, scale: int = 3) -> bytes:
    """The measured slice (skull and ventricles in grey) with both widths drawn: brain green, horns orange.

    Shown as radiologists view axial slices: anterior up, patient's left on the image's right.
    """
    from tsrt.outputs.preview import encode_png

    grey = np.where(measurement.slice_image > 0, 200, 25).astype(np.uint8)
    canvas = np.repeat(grey[:, :, None], 3, axis=2)
    for width, colour in ((measurement.brain, (40, 220, 40)), (measurement.horns, (255, 140, 0))):
        y = width.start[1]
        canvas[width.start[0] : width.end[0] + 1, max(y - 1, 0) : y + 2] = colour
        for x in (width.start[0], width.end[0]):  # end marks
            canvas[max(x - 1, 0) : x + 2, max(y - 5, 0) : y + 6] = (220, 30, 30)
    # array axes (x = right->left in RAS index order, y = posterior->anterior): rows = y from the top
    picture = canvas.transpose(1, 0, 2)[::-1, ::-1]
    picture = np.repeat(np.repeat(picture, scale, axis=0), scale, axis=1)
    return encode_png(np.ascontiguousarray(picture))


# --------------------------------------------------------------------------------------------- pipeline


def load_atlas(models_dir: str | Path | None = None) -> np.ndarray:
    """TotalSegmentator's 1 mm brain CT atlas from the store (checksum-verified), as float64 voxels."""
    import nibabel as nib

    files = verified_files("evans-index", Path(models_dir) if models_dir is not None else None)
    return np.asarray(nib.load(files["ct_brain_atlas_1mm.nii.gz"]).get_fdata(dtype=np.float64))


class EvansIndexer:
    """Measures one image or a cohort: atlas checked and models prepared once."""

    def __init__(self, runtime: RuntimeOptions | None = None) -> None:
        from tsrt.totalseg.task import prepare_run

        from tsrt.totalseg.options import RuntimeOptions

        runtime = runtime or RuntimeOptions()
        self.atlas = load_atlas(runtime.models_dir)
        self._brain_skull = prepare_run(runtime.segment_options("total", roi_subset=("brain", "skull"), ml=True))
        self._ventricles = prepare_run(runtime.segment_options("ventricle_parts", ml=True))

    def head_masks(self, source: Any) -> HeadMasks:
        """brain and skull (task total, roi_subset) and ventricle_parts on the input grid."""
        from tsrt.totalseg.task import segment_source

        log.info("Segmenting brain and skull...")
        request, runner, options = self._brain_skull
        result, _ = segment_source(source, request, runner, None, options)
        by_name = {name: label for label, name in result.label_map.items()}
        log.info("Segmenting the ventricles...")
        request, runner, options = self._ventricles
        ventricles, _ = segment_source(source, request, runner, None, options)
        return HeadMasks(result.labels == by_name["brain"], result.labels == by_name["skull"], ventricles.labels)

    def measure(self, input: Any) -> EvansMeasurement:
        from tsrt.totalseg.source import read_source

        source = read_source(input)
        masks = self.head_masks(source)
        return measure(source.values, source.image.affine, masks, self.atlas)

    def write(self, input: Any, output: Path, preview: Path | None) -> dict[str, float]:
        """Measure `input`; write the JSON (and the PNG) only once everything succeeded."""
        from tsrt.pipeline.write import atomic_output, write_json

        measurement = self.measure(input)
        if preview is not None:
            png = render_png(measurement)
            with atomic_output(Path(preview)) as temp:
                temp.write_bytes(png)
        write_json(measurement.report, Path(output))
        return measurement.report


def measure_evans_index(
    input: Any,
    output: str | Path | None = None,
    preview: str | Path | None = None,
    *,
    models_dir: str | Path | None = None,
    provider: str = "auto",
    device: str | None = None,
    quiet: bool = False,
    threads: int | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """The Evans index report like `totalseg_evans_index` (JSON to `output`, the slice PNG to `preview`)."""
    from tsrt.totalseg.options import RuntimeOptions

    indexer = EvansIndexer(RuntimeOptions(models_dir, provider, device, quiet, threads, precision))
    if output is None:
        measurement = indexer.measure(input)
        if preview is not None:
            from tsrt.pipeline.write import atomic_output

            with atomic_output(Path(preview)) as temp:
                temp.write_bytes(render_png(measurement))
        return measurement.report
    return indexer.write(input, Path(output), Path(preview) if preview is not None else None)
