"""`tsrt tasks`, `tsrt doctor` and `tsrt combine-masks`: the TotalSegmentator side commands.

Registered on the main app by tsrt/cli/root.py. Heavy imports happen inside the commands so that
`tsrt --help` stays fast.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from tsrt.errors import InputError, TsrtError


def tasks(
    task: Optional[str] = typer.Argument(None, help="Show this task's classes (label number and name)."),
    fast: bool = typer.Option(False, "--fast", help="The classes of the task's --fast mode."),
) -> None:
    """TotalSegmentator tasks tsrt runs (modes, modality, classes), or one task's classes."""
    from tsrt.models.registry import get_task, load_registry

    registry = load_registry()
    if task is not None:
        resolved = get_task(task, fast=fast)
        parts = ", ".join(part.name for part in resolved.parts)
        typer.echo(f"{resolved.name} ({resolved.modality}, {resolved.mode} mode: {parts})")
        for label, name in resolved.classes.items():
            typer.echo(f"{label:>4}  {name}")
        return
    typer.echo(f"TotalSegmentator {registry.totalsegmentator_version} tasks (tsrt tasks TASK lists its classes):")
    for name in registry.task_names():
        resolved = registry.task(name)
        license_note = ", license" if resolved.license else ""
        roi = ", --roi_subset" if resolved.roi_subset else ""
        typer.echo(
            f"  {name:<28} {resolved.modality:<3} {len(resolved.classes):>4} classes  "
            f"modes: {'/'.join(registry.modes(name))}{license_note}{roi}"
        )
    for name, reason in registry.skipped_tasks.items():
        typer.echo(f"  {name:<28} not available ({reason})")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def doctor() -> None:
    """What this installation can do: versions, execution providers, the model store and runnable tasks."""
    from tsrt.version import __version__
    from tsrt.config import tsrt_home
    from tsrt.engines.providers import available_providers
    from tsrt.models.registry import load_registry
    from tsrt.models.store import model_status, models_root

    typer.echo(f"tsrt {__version__} on Python {platform.python_version()} ({sys.platform}, {platform.machine()})")
    for package in ("onnxruntime", "onnxruntime-gpu", "numpy", "nibabel", "SimpleITK", "numba", "typer", "rich"):
        version = _version(package)
        if package == "onnxruntime-gpu" and version == "not installed":
            continue
        typer.echo(f"  {package:<16} {version}")
    forbidden = [name for name in ("torch", "nnunetv2", "totalsegmentator") if name in sys.modules]
    if forbidden:
        typer.echo(f"  warning: {', '.join(forbidden)} imported in this process (tsrt itself never imports them)")
    typer.echo(f"execution providers: {', '.join(available_providers())}")
    registry = load_registry()
    root = models_root()
    typer.echo(f"TSRT_HOME: {tsrt_home()}  (models in {root})")
    statuses = {name: model_status(model) for name, model in registry.models.items()}
    complete = [s for s in statuses.values() if s.complete]
    incomplete = [s for s in statuses.values() if s.state == "incomplete"]
    typer.echo(f"models: {len(complete)} complete, {len(incomplete)} incomplete, of {len(statuses)} known")
    for status in incomplete:
        typer.echo(f"  incomplete: {status.model.name} ({status.problems[0]}): import or download it again")
    runnable = []
    for name in registry.task_names():
        for mode in registry.modes(name):
            task = registry.task(name, fast=mode == "fast", fastest=mode == "fastest")
            if all(statuses[m.name].complete for m in task.required_models):
                runnable.append(name if mode == "normal" else f"{name} --{mode}")
    typer.echo(f"runnable tasks: {', '.join(runnable) if runnable else 'none yet'}")
    if not runnable:
        typer.echo(
            "  install one with `tsrt models import total --fast --totalseg-home DIR` "
            "or `tsrt models download total --fast`"
        )


def combine_masks(
    masks: Optional[Path] = typer.Argument(
        None, metavar="INPUT", help="tsrt/TotalSegmentator output folder, or a --ml label file."
    ),
    input_option: Optional[Path] = typer.Option(None, "-i", help="Same as INPUT (totalseg_combine_masks' spelling)."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Combined mask file (.nii.gz, .nii; no ending: .nii, as totalseg_combine_masks)."
    ),
    kind: str = typer.Option(
        ..., "-m", "--masks", help="lung, lung_left, lung_right, vertebrae, ribs, vertebrae_ribs, pelvis or body."
    ),
    multilabel: bool = typer.Option(False, "--ml", "-ml", "--multilabel", help="Store the label table ({1: KIND})."),
) -> None:
    """Merge classes into one binary mask, like totalseg_combine_masks."""
    import nibabel as nib

    from tsrt.outputs.files import nifti_output_path
    from tsrt.totalseg import ops
    from tsrt.pipeline.label_table import caret_label_table, read_label_table
    from tsrt.pipeline.write import atomic_output

    output = nifti_output_path(output)
    source = input_option or masks
    if source is None:
        raise TsrtError("No input given: pass the segmentation folder or --ml file as INPUT or with -i.")
    if kind not in ops.COMBINE_MASK_CLASSES:
        raise TsrtError(f"Unknown combination {kind!r}: choose one of {', '.join(ops.COMBINE_MASK_CLASSES)}.")
    if source.is_file():
        from tsrt.pipeline.nifti_header import check_image_file

        check_image_file(source)  # a damaged or mislabelled file is one line, before nibabel reads it
        image = nib.load(source)
        label_map = read_label_table(image)
        if not label_map:
            raise InputError(f"{source} has no label table; pass the output folder of a run without --ml instead.")
        try:
            combined = ops.combine_masks_from_labels(np.asanyarray(image.dataobj), label_map, kind)
        except KeyError as err:
            raise InputError(f"{source} has no class {err.args[0]}; combine {kind} needs the task total.") from None
        affine = image.affine
    elif source.is_dir():
        try:
            combined, affine = ops.combine_masks_from_dir(source, kind)
        except ValueError as err:
            raise InputError(f"{err}") from None
    else:
        raise InputError(f"{source} does not exist: pass a segmentation output folder or a --ml label file.")
    result = nib.Nifti1Image(combined, affine)
    if multilabel:
        result.header.extensions.append(nib.nifti1.Nifti1Extension(0, caret_label_table({1: kind})))
    with atomic_output(output) as temporary:
        nib.save(result, temporary)
    typer.echo(f"wrote {output} ({int(combined.sum())} voxels)")


def register(app: typer.Typer) -> None:
    app.command()(tasks)
    app.command()(doctor)
    app.command("combine-masks")(combine_masks)
