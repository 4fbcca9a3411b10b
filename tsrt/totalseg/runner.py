"""TotalSegmentator tasks on tsrt's runtime: the masks `TotalSegmentator` 2.18 writes, without torch.

This reproduces `totalsegmentator.python_api.totalsegmentator` and `nnunet.nnUNet_predict_image`
step by step, so that with the same weights every voxel comes out the same:

    read ─► [coarse model ─► crop mask] ─► crop (+ margin, int32) ─► closest canonical ─►
    resample to the task spacing (order 1, int32) ─► [triple split along z] ─► part models
    (nnU-Net runtime, fold 0, step 0.8/0.5, no mirroring) ─► combine parts (later parts win) ─►
    auxiliary labels, task postprocessing ─► [fast statistics, preview] ─► resample back
    (order 0) ─► undo canonical ─► undo crop ─► binary / vertebrae refinement / v1 order /
    roi_subset / remove_outside ─► outputs

Upstream writes the resampled image to `s01_0000.nii.gz` and nnU-Net reads it back with the plan's
reader; here the same array and header geometry go to `tsrt.pipeline.read.to_nnunet_array` directly, which
gives nnU-Net's reader result without the disk round trip (float32 of the int32 voxels, spacing
from the header nibabel would write). One `ImageRun` is one nnUNet_predict_image call: the coarse
crop models (`--roi_subset`, tasks with a crop, `--body_seg`) go through the same function.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from tsrt.engines.providers import ProviderChoice, choose_provider
from tsrt.errors import ModelError
from tsrt.models.plan import load_model_plans
from tsrt.models.registry import ModelPart, PostprocessStep, Task, TaskError, load_registry
from tsrt.pipeline.infer import InferenceSettings, LoadedModel, load_model
from tsrt.pipeline.predict import predict_array
from tsrt.pipeline.read import Image, from_nnunet_array, to_nnunet_array
from tsrt.pipeline.write import write_probabilities
from tsrt.totalseg import ops
from tsrt.totalseg.request import TaskRequest, build_request, coarse_model, parts_for_roi_subset
from tsrt.totalseg.source import SourceImage, header_zooms
from tsrt.totalseg.v1_classes import TOTAL_V1_CLASSES

log = logging.getLogger("tsrt")

#: TotalSegmentator resamples the input with this spline order (its --resampling_order default).
INPUT_RESAMPLING_ORDER = 1


@dataclass
class CropMask:
    """Crop the input to the bounding box of `mask` (on the input grid) grown by `margin_mm`."""

    mask: np.ndarray
    margin_mm: tuple[float, float, float]

@dataclass
class RemoveOutside:
    """After prediction, zero labels farther than `dilation_mm` from `mask` (heartchambers_highres)."""

    mask: np.ndarray
    dilation_mm: float

@dataclass
class BodyMask:
    """vertebrae_pp_refined: vertebra labels are dilated by `dilation_mm` and kept where `labels == 1`."""

    labels: np.ndarray  # the vertebrae_body model's map on the input grid (1 = vertebral body)
    dilation_mm: float

@dataclass
class ImageRun:
    """One `nnUNet_predict_image` call: which models run, how their labels are named and cleaned."""

    task_name: str
    parts: tuple[ModelPart, ...]
    multimodel: bool  # upstream: task_id is a list (parts are renamed and merged; triple split allowed)
    classes: Mapping[int, str]  # final label numbers of the task
    auxiliary_labels: tuple[int, ...] = ()
    postprocess: tuple[PostprocessStep, ...] = ()
    crop: CropMask | None = None
    force_split: bool = False
    binary: bool = False
    v1_order: bool = False
    roi_subset: tuple[str, ...] | None = None
    remove_outside: RemoveOutside | None = None
    body_mask: BodyMask | None = None
    remove_small_blobs_mm3: float | None = None  # --remove_small_blobs: every class, after the task's cleaning
    probabilities_path: Path | None = None  # --save_probabilities: the last part model's, first z piece (as upstream)

    @property
    def resample_mm(self) -> tuple[float, float, float] | None:
        return self.parts[0].resample_mm

    @property
    def label_map(self) -> dict[int, str]:
        return output_label_map(self.task_name, self.classes, v1_order=self.v1_order, roi_subset=self.roi_subset)

def output_label_map(
    task_name: str, classes: Mapping[int, str], *, v1_order: bool = False, roi_subset: Sequence[str] | None = None
) -> dict[int, str]:
    """The label numbers of an output (v1 numbering with --v1_order on total, only roi_subset classes)."""
    label_map = dict(TOTAL_V1_CLASSES if v1_order and task_name == "total" else classes)
    if roi_subset is not None:
        label_map = {k: v for k, v in label_map.items() if v in roi_subset}
    return label_map

@dataclass
class LowRes:
    """The canonical, resampled image and its labels before resampling back (fast statistics, preview)."""

    values: np.ndarray
    affine: np.ndarray
    labels: np.ndarray

    @property
    def zooms(self) -> tuple[np.float32, np.float32, np.float32]:
        return ops.nifti_zooms(self.affine)

@dataclass
class ImageRunResult:
    labels: np.ndarray  # uint8 on the input grid
    label_map: dict[int, str]
    lowres: LowRes | None  # None when the crop was empty (nothing was predicted)

@dataclass
class TaskResult:
    labels: np.ndarray  # uint8 on the input grid
    label_map: dict[int, str]
    source: SourceImage
    lowres: LowRes | None
    seconds: dict[str, float] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)  # the files segment_source wrote (the manifest lists them)

class ModelRunner:
    """Opens stored models and runs them like TotalSegmentator's nnUNetv2_predict call.

    Folds come from the registry (fold 0 for TotalSegmentator's models), the tile step from the
    model's task (0.8 for total/total_mr, else 0.5), and mirroring is off (TotalSegmentator: tta=False).
    One model is open at a time: a TotalSegmentator-sized session holds several hundred MB (weights
    and ONNX Runtime's pre-packed copies) and task total runs five, while reopening one from the
    cached optimised graph takes a fraction of a second. A single-model task stays open across a cohort.
    """

    def __init__(
        self,
        store_root: Path | None = None,
        *,
        provider: str = "auto",
        device: str | None = None,
        threads: int | None = None,
        progress: bool = True,
        precision: str = "fp32",
        low_memory: bool = False,
    ) -> None:
        self.store_root = store_root
        self.low_memory = low_memory
        self.provider = provider
        self.precision = precision
        self.device = device
        self.threads = threads
        self.progress = progress
        self.on_tiles: Callable[[int, int], None] | None = None  # per-model tile counts, for a UI's progress bar
        self._open: tuple[str, LoadedModel] | None = None
        self._providers: dict[bool, ProviderChoice] = {}
        self.seconds: dict[str, float] = {}
        self.tiles_run = 0  # tiles through every model so far (for tiles/s)
        self.provider_used: str | None = None
        self.precision_used: str | None = None  # of the last model opened (the run manifest's)

    def model(self, part: ModelPart) -> LoadedModel:
        if self._open is None or self._open[0] != part.name:
            from tsrt.models.store import model_dir

            self._open = None  # close the previous model before the next one allocates
            started = time.perf_counter()
            folder = model_dir(part, self.store_root)
            loaded = load_model(
                folder, folds=part.fold_names, provider=self._provider(folder, part), threads=self.threads,
                low_memory=self.low_memory,
            )
            self._open = (part.name, loaded)
            self.provider_used = loaded.provider_used
            self.precision_used = loaded.precision_used
            self._add_seconds("load models", started)
        return self._open[1]

    def _provider(self, folder: Path, part: ModelPart) -> ProviderChoice:
        """One provider choice per graph precision for all models (and one log line, not one per model)."""
        fp16 = load_model_plans(folder, list(part.fold_names) if part.fold_names else None)[0].graph_precision == "fp16"
        if fp16 not in self._providers:
            self._providers[fp16] = choose_provider(
                self.provider, precision=self.precision, device=self.device, fp16=fp16, threads=self.threads,
                # int8: the task layer checked every model's gated int8 graph first (check_int8_installed)
                graph_precision="int8" if self.precision == "int8" else "fp16" if fp16 else "fp32",
            )
        return self._providers[fp16]

    def predict(
        self, part: ModelPart, values: np.ndarray, affine: np.ndarray, *, probabilities: Path | None = None
    ) -> np.ndarray:
        """Labels (uint8, same grid) for the volume `values` with voxel->RAS `affine`.

        The volume is presented as nnU-Net's reader would return the NIfTI nibabel writes for
        Nifti1Image(values, affine): float32 voxels, spacing = the header zooms of that file.
        With `probabilities`, the class probabilities are written there as nnU-Net exports them.
        """
        model = self.model(part)
        image = part_image(part, values, affine)
        data, properties = to_nnunet_array(image, model.plan.image_reader_writer)
        settings = InferenceSettings(
            step_size=part.step_size, use_mirroring=part.mirroring, progress=self.progress, on_tiles=self.on_tiles
        )
        started, tiles_before = time.perf_counter(), model.tiles_run
        prediction = predict_array(
            data, properties["spacing"], model, settings, save_probabilities=probabilities is not None,
            overwrite_input=True,  # made just above
        )
        self.tiles_run += model.tiles_run - tiles_before
        self._add_seconds("predict", started)
        if probabilities is not None and prediction.probabilities is not None:
            nnunet_properties = {k: v for k, v in properties.items() if k != "tsrt"} | prediction.cropping
            write_probabilities(probabilities, prediction.probabilities, nnunet_properties)
        labels = from_nnunet_array(prediction.labels, properties)
        if labels.size and int(labels.max()) > 255:
            raise ModelError(f"{part.name} predicted label {int(labels.max())}; TotalSegmentator's maps stop at 255.")
        return labels.astype(np.uint8, copy=False)

    def _add_seconds(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

def part_image(part: ModelPart, values: np.ndarray, affine: np.ndarray) -> Image:
    """The volume as nnU-Net's reader would return the NIfTI upstream writes for it (see ModelRunner.predict)."""
    return Image(values, np.asarray(affine, dtype=np.float64), _nifti_header_for(values.shape, affine), part.name)

def part_input(source: SourceImage, part: ModelPart) -> Image:
    """What `part` is given when it runs alone on all of `source` (no crop, no z split): the closest
    canonical image at the part's spacing. `tsrt models quantize` calibrates and gates on this view."""
    data, affine, _ = crop_input(source, None)
    data, affine = ops.as_closest_canonical(data, affine)
    values, affine = resample_input(data, affine, part.resample_mm)
    return part_image(part, values, affine)

def _nifti_header_for(shape: tuple[int, ...], affine: np.ndarray) -> nib.Nifti1Header:
    """The header nibabel writes for Nifti1Image(data, affine): sform 'aligned', pixdim = float32 column norms."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_sform(affine, code="aligned")
    header.set_qform(affine, code="unknown")
    return header

def _task_running(model: ModelPart) -> Task:
    """The task TotalSegmentator names when it runs `model` alone (its postprocessing and step size apply)."""
    registry = load_registry()
    for name in registry.task_names():
        for mode in registry.modes(name):
            task = registry.task(name, fast=mode == "fast", fastest=mode == "fastest")
            if tuple(p.name for p in task.parts) == (model.name,):
                return task
    raise TaskError(f"No task runs {model.name} on its own: the registry is inconsistent; reinstall tsrt.")

def _single_model_run(model: ModelPart, **options: Any) -> ImageRun:
    task = _task_running(model)
    return ImageRun(
        task_name=task.name, parts=(model,), multimodel=False, classes=task.classes,
        auxiliary_labels=task.remove_auxiliary_labels, postprocess=task.postprocess, **options,
    )

def run_task(
    source: SourceImage, request: TaskRequest, runner: ModelRunner, *, probabilities: Path | None = None
) -> TaskResult:
    """TotalSegmentator's python_api: coarse crop or body crop first, then the task's models.

    `probabilities`: where the task's own models (not the crop helpers) export their probabilities.
    """
    task = request.task
    started = time.perf_counter()
    crop: CropMask | None = None
    remove_outside: RemoveOutside | None = None
    if request.roi_subset is not None or task.crop is not None:
        crop, remove_outside = coarse_crop(source, request, runner)
    elif request.body_seg and task.body_seg is not None:
        crop = body_crop(source, request, runner)
    body_mask = vertebrae_body_mask(source, task, runner)
    run = ImageRun(
        task_name=task.name,
        parts=parts_for_roi_subset(task, request.roi_subset),
        multimodel=len(task.parts) > 1,
        classes=task.classes,
        auxiliary_labels=task.remove_auxiliary_labels,
        postprocess=task.postprocess,
        crop=crop,
        force_split=request.force_split,
        v1_order=request.v1_order,
        roi_subset=request.roi_subset,
        remove_outside=remove_outside,
        body_mask=body_mask,
        remove_small_blobs_mm3=request.remove_small_blobs_mm3,
        probabilities_path=probabilities,
    )
    result = predict_image(source, run, runner)
    seconds = {"total": time.perf_counter() - started, **runner.seconds}
    return TaskResult(result.labels, result.label_map, source, result.lowres, seconds)

def coarse_crop(
    source: SourceImage, request: TaskRequest, runner: ModelRunner
) -> tuple[CropMask, RemoveOutside | None]:
    """Segment coarsely (6 mm, or 3 mm when robust/MR) and keep the classes to crop around."""
    task = request.task
    if task.crop is not None:
        classes, margin = task.crop.classes, task.crop.margin_mm
    else:
        assert task.roi_subset_crop is not None and request.roi_subset is not None
        classes, margin = request.roi_subset, task.roi_subset_crop.margin_mm
    log.info("Generating rough segmentation for cropping...")
    model = coarse_model(request)
    if model is not None:
        coarse = predict_image(source, _single_model_run(model), runner)
        labels, class_map = coarse.labels, coarse.label_map
    else:
        assert task.crop is not None and task.crop.source_task is not None
        inner = build_request(task.crop.source_task)
        coarse_task = run_task(source, inner, runner)
        labels, class_map = coarse_task.labels, coarse_task.label_map
    crop = CropMask(_class_mask(labels, class_map, classes), margin)
    remove_outside = None
    if task.crop is not None and task.crop.remove_outside:
        remove_outside = RemoveOutside(
            _class_mask(labels, class_map, task.crop.remove_outside), float(task.crop.remove_outside_dilation_mm or 0)
        )
    return crop, remove_outside

def body_crop(source: SourceImage, request: TaskRequest, runner: ModelRunner) -> CropMask:
    """--body_seg: the 6 mm body model (with the body task's cleaning) as a binary crop mask."""
    spec = request.task.body_seg
    assert spec is not None
    log.info("Generating rough body segmentation...")
    body = predict_image(source, _single_model_run(spec.model, binary=True), runner)
    return CropMask(body.labels, spec.margin_mm)

def vertebrae_body_mask(source: SourceImage, task: Task, runner: ModelRunner) -> BodyMask | None:
    """The vertebrae_body helper model's map, which vertebrae_pp_refined clips its instances to."""
    for helper in task.helpers:
        if helper.role != "vertebrae_body_mask":
            raise TaskError(f"Task {task.name} needs a {helper.role!r} helper model, which tsrt does not run yet.")
        log.info("Generating vertebrae body mask for refinement...")
        helper_run = predict_image(source, _single_model_run(helper.model), runner)
        return BodyMask(helper_run.labels, float(helper.params.get("dilation_mm", 2.0)))
    return None

def _class_mask(labels: np.ndarray, class_map: Mapping[int, str], classes: Sequence[str]) -> np.ndarray:
    inverse = {name: label for label, name in class_map.items()}
    missing = [name for name in classes if name not in inverse]
    if missing:
        raise TaskError(f"The crop model has no class {missing[0]!r}: the registry is inconsistent; reinstall tsrt.")
    return np.isin(labels, [inverse[name] for name in classes]).astype(np.uint8)

def predict_image(source: SourceImage, run: ImageRun, runner: ModelRunner) -> ImageRunResult:
    """nnUNet_predict_image: crop, canonical, resample, predict, clean, and back onto the input grid."""
    shape = source.image.spatial_shape
    if run.crop is not None and not run.crop.mask.any():
        log.info("Crop is empty. Returning empty segmentation.")
        return ImageRunResult(np.zeros(shape, dtype=np.uint8), run.label_map, None)

    data, affine, bbox = crop_input(source, run.crop)
    data, affine = ops.as_closest_canonical(data, affine)
    canonical_shape, canonical_affine = data.shape, affine
    lowres_values, lowres_affine = resample_input(data, affine, run.resample_mm)

    labels = predict_parts(lowres_values, lowres_affine, run, runner)
    labels = postprocess_lowres(labels, lowres_affine, run)
    lowres = LowRes(lowres_values, lowres_affine, labels)

    labels = restore_input_grid(labels, lowres_affine, run.resample_mm, canonical_shape, canonical_affine, source, bbox)
    labels = finalize_labels(labels, source, run)
    return ImageRunResult(labels, run.label_map, lowres)

def crop_input(source: SourceImage, crop: CropMask | None) -> tuple[np.ndarray, np.ndarray, ops.Bbox | None]:
    """cropping.crop_to_mask with TotalSegmentator's int32 cast; the whole image when there is no crop."""
    affine = np.array(source.image.affine, dtype=np.float64)
    if crop is None:
        return source.values, affine, None
    data, cropped_affine, bbox = ops.crop_to_mask(
        source.values, affine, ops.nifti_zooms(affine), crop.mask, crop.margin_mm, dtype=np.int32
    )
    log.info("  cropping from %s to %s", "x".join(map(str, crop.mask.shape)), "x".join(map(str, data.shape)))
    return data, cropped_affine, bbox

def resample_input(
    data: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """resampling.change_spacing(order=1, dtype=int32); an image already at the spacing is left as it is."""
    if spacing is None:
        return data, affine
    started = time.perf_counter()
    resampled, new_affine = ops.change_spacing(
        data, affine, ops.nifti_zooms(affine), list(spacing), order=INPUT_RESAMPLING_ORDER, dtype=np.int32
    )
    log.debug("Resampled %s -> %s in %.2fs", data.shape, resampled.shape, time.perf_counter() - started)
    return resampled, new_affine

def predict_parts(values: np.ndarray, affine: np.ndarray, run: ImageRun, runner: ModelRunner) -> np.ndarray:
    """Every part model on the resampled image (in three z pieces when upstream splits), merged into task labels."""
    shape = values.shape
    split = ops.should_split(shape, multimodel=run.multimodel, force_split=run.force_split)
    pieces = ops.split_in_three_along_z(shape) if split else [slice(None)]
    if split:
        log.info("Splitting into subparts...")
    predicted = []
    for index, z_slice in enumerate(pieces):
        piece = values[:, :, z_slice]
        if split:
            log.info("  subpart %d of 3", index + 1)
        # Upstream copies nnU-Net's export of its first piece (s01) after each part: the last part's stays.
        probabilities = run.probabilities_path if index == 0 else None
        predicted.append(_predict_piece(piece, affine, run, runner, probabilities))
    return ops.combine_three_parts(predicted, shape) if split else predicted[0]

def _predict_piece(
    values: np.ndarray, affine: np.ndarray, run: ImageRun, runner: ModelRunner, probabilities: Path | None = None
) -> np.ndarray:
    if not run.multimodel:
        return runner.predict(run.parts[0], values, affine, probabilities=probabilities)
    inverse = {name: label for label, name in run.classes.items()}
    combined = np.zeros(values.shape, dtype=np.uint8)
    for index, part in enumerate(run.parts):
        log.info("Predicting part %d of %d (%s)...", index + 1, len(run.parts), part.name)
        last = index == len(run.parts) - 1
        part_labels = runner.predict(part, values, affine, probabilities=probabilities if last else None)
        lookup = np.zeros(max(max(part.classes, default=0), int(part_labels.max(initial=0))) + 1, dtype=np.uint8)
        for label, name in part.classes.items():
            lookup[label] = inverse[name]
        mapped = lookup[part_labels]
        np.copyto(combined, mapped, where=mapped != 0)
    return combined

def postprocess_lowres(labels: np.ndarray, affine: np.ndarray, run: ImageRun) -> np.ndarray:
    """Auxiliary labels off, then the task's label-map cleaning, at the model resolution like upstream."""
    if run.auxiliary_labels:
        labels = ops.remove_auxiliary_labels(labels, run.auxiliary_labels)
    zooms = ops.nifti_zooms(affine)
    for step in run.postprocess:
        if step.step == "keep_largest_blob":
            labels = ops.keep_largest_blob_multilabel(labels, run.classes, step.params["classes"])
        elif step.step == "remove_small_blobs":
            interval = ops.blob_size_interval(float(step.params["min_volume_mm3"]), zooms)
            labels = ops.remove_small_blobs_multilabel(labels, run.classes, step.params["classes"], interval)
        elif step.step == "vertebrae_pp":
            labels = ops.postprocess_vertebrae_pp(
                labels, run.classes, voxel_volume=np.prod(np.asarray(zooms, dtype=np.float32)), voxel_spacing=zooms
            )
        elif step.step in ("derived_masks", "refine_with_vertebrae_body_mask"):
            continue  # on the input grid: finalize_labels / the output stage
        else:
            raise TaskError(
                f"Task {run.task_name} needs the postprocessing step {step.step!r}, which tsrt does not have yet."
            )
    if run.remove_small_blobs_mm3 is not None:
        interval = ops.blob_size_interval(run.remove_small_blobs_mm3, zooms)
        labels = ops.remove_small_blobs_multilabel(labels, run.classes, list(run.classes.values()), interval)
    return labels

def restore_input_grid(
    labels: np.ndarray,
    lowres_affine: np.ndarray,
    spacing: tuple[float, float, float] | None,
    canonical_shape: tuple[int, ...],
    canonical_affine: np.ndarray,
    source: SourceImage,
    bbox: ops.Bbox | None,
) -> np.ndarray:
    """change_spacing back (order 0, exact shape, forced affine), undo_canonical, undo_crop."""
    affine = lowres_affine
    if spacing is not None:
        labels, affine = ops.change_spacing(
            labels, lowres_affine, ops.nifti_zooms(lowres_affine), list(spacing), target_shape=canonical_shape,
            order=0, dtype=np.uint8, force_affine=canonical_affine,
        )
    labels, _ = ops.undo_canonical(labels, affine, source.image.affine)
    if bbox is not None:
        labels = ops.undo_crop(labels, source.image.spatial_shape, bbox, dtype=np.uint8)
    return np.array(labels, dtype=np.uint8, order="C")  # a copy: later steps edit in place, LowRes keeps its own

def finalize_labels(labels: np.ndarray, source: SourceImage, run: ImageRun) -> np.ndarray:
    """Binary for crop masks, vertebrae refinement, v1 numbering, roi_subset, remove_outside - upstream's order."""
    if run.binary:
        labels = (labels > 0).astype(np.uint8)
    if run.body_mask is not None:
        labels = ops.refine_vertebrae_pp_with_body_mask(
            labels, run.body_mask.labels, run.label_map, voxel_spacing=header_zooms(source.image),
            dilation_mm=run.body_mask.dilation_mm,
        )
    if run.v1_order and run.task_name == "total":
        labels = ops.reorder_multilabel_like_v1(labels, run.classes, TOTAL_V1_CLASSES)
    if run.roi_subset is not None:
        labels = ops.keep_roi_subset(labels, list(run.label_map))
    if run.remove_outside is not None:
        zooms = header_zooms(source.image)
        dilation_voxels = int(run.remove_outside.dilation_mm / np.mean(np.asarray(zooms, dtype=np.float32)))
        labels = ops.remove_outside_of_mask(labels, run.remove_outside.mask, addon=dilation_voxels)
    return labels

def make_runner(
    store_root: Path | None, provider: str = "auto", device: str | None = None, *, threads: int | None = None,
    quiet: bool = False, precision: str = "fp32", low_memory: bool = False,
) -> ModelRunner:
    """A ModelRunner for TotalSegmentator's --device spellings (cpu/mps pick the CPU provider)."""
    if device in ("cpu", "mps"):
        provider, device = ("cpu" if provider == "auto" else provider), None
    return ModelRunner(
        store_root, provider=provider, device=device, threads=threads, progress=not quiet, precision=precision,
        low_memory=low_memory,
    )
