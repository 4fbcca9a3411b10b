"""A TotalSegmentator request resolved against the task registry: which models it runs, and are they installed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tsrt import config
from tsrt.errors import ModelError, TsrtError
from tsrt.models.registry import ModelPart, Task, TaskError, get_task

log = logging.getLogger("tsrt")


@dataclass(frozen=True)
class TaskRequest:
    """A validated TotalSegmentator call: the task in its mode and the options that change masks."""

    task: Task
    roi_subset: tuple[str, ...] | None = None
    robust_roi_crop: bool = False  # the 3 mm crop model for roi_subset (--roi_subset_robust, always for MR)
    robust_crop: bool = False
    body_seg: bool = False
    force_split: bool = False
    v1_order: bool = False
    fast: bool = False  # upstream computes statistics on the resampled image only for --fast
    remove_small_blobs_mm3: float | None = None

def missing_models(models: Sequence[ModelPart], store_root: Path | None = None) -> list[ModelPart]:
    """The models of `models` that are not complete in the store."""
    from tsrt.models.store import model_status

    return [model for model in models if not model_status(model, store_root).complete]

def check_int8_installed(request: TaskRequest, store_root: Path | None = None, provider: str = "auto") -> None:
    """`--precision int8`: every model the request runs needs its gated int8 graph (`tsrt models quantize`; on
    `provider` tensorrt in TensorRT's symmetric form). Said in one line before any model is fetched or image read
    (a model fetched now would have none)."""
    from tsrt.models.plan import has_int8, int8_missing, load_model_plans
    from tsrt.models.store import model_dir

    needed, optional = models_to_run(request)
    missing = {model.name for model in missing_models(needed, store_root)}
    lacking = [
        model for model in needed
        if model.name in missing or not has_int8(load_model_plans(model_dir(model, store_root), _folds(model)))
    ]
    if not lacking:
        if provider == "tensorrt":
            from tsrt.engines.tensorrt import check_tensorrt_int8_graphs
            from tsrt.models.store import gated_int8_graphs

            for model in needed:
                folder = model_dir(model, store_root)
                check_tensorrt_int8_graphs(folder, gated_int8_graphs(folder, load_model_plans(folder, _folds(model))))
        return
    task = request.task
    mode = {"fast": " --fast", "fastest": " --fastest"}.get(task.mode, "")
    with_optional = " --with-optional" if any(m.name in {o.name for o in optional} for m in lacking) else ""
    raise int8_missing(f"task {task.name}{mode} ({', '.join(m.name for m in lacking)})", f"{task.name}{mode}{with_optional}")

def _folds(model: ModelPart) -> list[str] | None:
    return list(model.fold_names) if model.fold_names else None

def models_to_run(request: TaskRequest) -> tuple[list[ModelPart], list[ModelPart]]:
    """(models this request runs, those among them that are optional for the task's mode)."""
    task = request.task
    needed: list[ModelPart] = list(parts_for_roi_subset(task, request.roi_subset))
    if request.roi_subset is not None or task.crop is not None:
        source = coarse_model(request)
        if source is not None:
            needed.append(source)
        elif task.crop is not None and task.crop.source_task is not None:
            needed.extend(get_task(task.crop.source_task).required_models)
    elif request.body_seg and task.body_seg is not None:
        needed.append(task.body_seg.model)
    needed.extend(helper.model for helper in task.helpers)
    unique = list({model.name: model for model in needed}.values())
    required = {model.name for model in task.required_models}
    return unique, [model for model in unique if model.name not in required]

def check_models_installed(
    request: TaskRequest, store_root: Path | None = None, *, offline: bool = False, progress: bool = True
) -> None:
    """Before any image is read, install what the request needs on first use (as TotalSegmentator does).

    Missing models are imported from the TotalSegmentator home or downloaded; offline (`--offline`,
    TSRT_OFFLINE=1) a missing model stops the run with one line naming the command that installs it.
    """
    needed, optional = models_to_run(request)
    missing = missing_models(needed, store_root)
    if missing and not (offline or config.offline()):
        from tsrt.models.first_use import install_missing

        install_missing(missing, store_root=store_root, progress=progress)
        missing = missing_models(missing, store_root)
    if not missing:
        return
    task = request.task
    mode = {"fast": " --fast", "fastest": " --fastest"}.get(task.mode, "")
    with_optional = " --with-optional" if any(m.name in {o.name for o in optional} for m in missing) else ""
    names = ", ".join(m.name for m in missing)
    licensed = ""
    if any(m.license for m in missing):
        licensed = " (licensed: set your key with `tsrt models set-license KEY` first)"
    raise ModelError(
        f"Task {task.name}{mode} needs models that are not in the store ({names}): run "
        f"`tsrt models import {task.name}{mode}{with_optional} --totalseg-home DIR` with a TotalSegmentator "
        f"home, or `tsrt models download {task.name}{mode}{with_optional}`{licensed}."
    )

def build_request(
    task: str = "total",
    *,
    fast: bool = False,
    fastest: bool = False,
    roi_subset: Sequence[str] | None = None,
    roi_subset_robust: Sequence[str] | None = None,
    robust_crop: bool = False,
    body_seg: bool = False,
    force_split: bool = False,
    v1_order: bool = False,
    remove_small_blobs: bool | float = False,
) -> TaskRequest:
    """Validate the options the way `totalsegmentator()` does and resolve the task's mode.

    `remove_small_blobs`: True drops blobs of 200 mm3 or less from every class (upstream's default), a
    number sets the threshold in mm3.
    """
    resolved = get_task(task, fast=fast, fastest=fastest)
    if resolved.note:
        log.info("%s", resolved.note)
    robust_roi = roi_subset_robust is not None
    if roi_subset_robust is not None:
        roi_subset = roi_subset_robust
    if roi_subset is not None:
        roi_subset = (roi_subset,) if isinstance(roi_subset, str) else tuple(roi_subset)
        if not roi_subset:
            raise TaskError("--roi_subset needs at least one class name (e.g. liver).")
        if not task.startswith("total") or resolved.roi_subset_crop is None:
            raise TaskError(f"--roi_subset works with the tasks total, total_mr and total_v3, not {task}: drop it.")
        unknown = [name for name in roi_subset if name not in resolved.classes.values()]
        if unknown:
            raise TaskError(
                f"--roi_subset: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} "
                f"not a class of task {task}: "
                f"`tsrt tasks {task}` lists its classes."
            )
        if task.endswith("_mr"):
            robust_roi = True  # upstream: the 6 mm MR model is too coarse, always crop with 3 mm
    if body_seg and task.endswith("_mr"):
        log.info("For MR models --body_seg is not supported and is ignored (as in TotalSegmentator).")
        body_seg = False
    return TaskRequest(
        task=resolved,
        roi_subset=roi_subset,
        robust_roi_crop=robust_roi,
        robust_crop=robust_crop,
        body_seg=body_seg,
        force_split=force_split,
        v1_order=v1_order,
        fast=fast,
        remove_small_blobs_mm3=_blob_threshold(remove_small_blobs),
    )


#: TotalSegmentator's --remove_small_blobs threshold when given without a value (mm3).
DEFAULT_SMALL_BLOB_MM3 = 200.0

def _blob_threshold(remove_small_blobs: bool | float) -> float | None:
    if remove_small_blobs is True:
        return DEFAULT_SMALL_BLOB_MM3
    if remove_small_blobs is False or remove_small_blobs is None:
        return None
    threshold = float(remove_small_blobs)
    if threshold <= 0:
        raise TsrtError(f"--remove_small_blobs needs a positive volume in mm3, not {remove_small_blobs}.")
    return threshold

def parts_for_roi_subset(task: Task, roi_subset: Sequence[str] | None) -> tuple[ModelPart, ...]:
    """Upstream runs only the parts holding a requested class (multi-part tasks only)."""
    if roi_subset is None or len(task.parts) == 1:
        return task.parts
    return tuple(part for part in task.parts if any(name in roi_subset for name in part.classes.values()))

def coarse_model(request: TaskRequest) -> ModelPart | None:
    """The model whose segmentation gives the crop: roi_subset's (robust: 3 mm) or the task's crop model."""
    task = request.task
    if task.crop is not None:
        robust = request.robust_crop or request.robust_roi_crop
        if robust and task.crop.robust_source_model is not None:
            return task.crop.robust_source_model
        return task.crop.source_model
    spec = task.roi_subset_crop
    if spec is None:
        return None
    robust = request.robust_crop or request.robust_roi_crop
    return spec.robust_source_model if robust and spec.robust_source_model is not None else spec.source_model
