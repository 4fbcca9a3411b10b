"""The task layer's entry points: check a request once, then segment one image and write its outputs.

    from tsrt.totalseg import segment
    seg = segment("ct.nii.gz", "out_dir", task="total", fast=True)   # nibabel image, like upstream
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib

from tsrt.errors import TsrtError
from tsrt.outputs.dicom import require_dicom_extra, require_dicom_input
from tsrt.outputs.manifest import InputRecord, RunFacts, RunRecorder, RunRequest, graph_records, manifest_path
from tsrt.totalseg.options import SegmentOptions
from tsrt.totalseg.outputs import OutputOptions, check_output_name, label_image, statistics_for, write_task_outputs
from tsrt.totalseg.request import TaskRequest, build_request, check_int8_installed, check_models_installed
from tsrt.totalseg.runner import ModelRunner, TaskResult, make_runner, run_task
from tsrt.totalseg.source import SourceImage, read_source


def segment_source(
    source: SourceImage, request: TaskRequest, runner: ModelRunner, output: Path | None, options: OutputOptions
) -> tuple[TaskResult, dict[str, dict[str, float]] | None]:
    """Run the task on one read image and write its outputs (nothing when `output` is None)."""
    if output is not None:
        require_dicom_input(source.path, options.output_types)  # before any work
    result = run_task(source, request, runner, probabilities=options.probabilities)
    stats = None
    if options.statistics:
        stats = statistics_for(
            result, request, exclude_masks_at_border=options.exclude_masks_at_border, metric=options.stats_aggregation,
            normalized_intensities=options.normalized_intensities,
        )
    if output is not None:
        started = time.perf_counter()
        # Upstream writes no statistics.json when --fast met an empty crop (nothing was resampled).
        write_stats = options.statistics and not (request.fast and result.lowres is None)
        result.written = write_task_outputs(
            result, request, Path(output), multilabel=options.multilabel, statistics=write_stats, stats=stats,
            preview=options.preview, derived_masks=options.derived_masks, output_types=options.output_types,
            statistics_file=options.statistics_file, skip_saving=options.skip_saving,
        )
        if options.probabilities is not None and options.probabilities.exists():
            result.written += [options.probabilities, options.probabilities.with_suffix(".pkl")]
        result.seconds["write"] = time.perf_counter() - started
        if options.radiomics:
            started = time.perf_counter()
            from tsrt.outputs.radiomics_features import write_source_radiomics

            result.written.append(
                write_source_radiomics(source.image, source.path, Path(output), progress=runner.progress)
            )
            result.seconds["radiomics"] = time.perf_counter() - started
    return result, stats

def prepare_run(options: SegmentOptions) -> tuple[TaskRequest, ModelRunner, OutputOptions]:
    """Resolve the request and check what it needs (extras, installed models) once, before any image is read.

    Shared by `segment`, cohorts, the companion tools and the UI, so one image and a whole cohort are
    checked alike.
    """
    require_dicom_extra(options.output_type)
    if options.radiomics:
        from tsrt.outputs.radiomics_features import check_radiomics

        if options.skip_saving:
            raise TsrtError("--radiomics reads the written masks: drop --skip_saving.")
        check_radiomics(multilabel=options.ml)
    request = build_request(
        options.task, fast=options.fast, fastest=options.fastest, roi_subset=options.roi_subset,
        roi_subset_robust=options.roi_subset_robust, robust_crop=options.robust_crop, body_seg=options.body_seg,
        force_split=options.force_split, v1_order=options.v1_order, remove_small_blobs=options.remove_small_blobs,
    )
    if options.precision == "int8":
        check_int8_installed(request, options.models_dir, options.provider)
    check_models_installed(request, options.models_dir, offline=options.offline, progress=not options.quiet)
    runner = make_runner(options.models_dir, options.provider, options.device, threads=options.threads,
                         quiet=options.quiet, precision=options.precision, low_memory=options.low_memory)
    output_options = OutputOptions(
        multilabel=options.ml, statistics=bool(options.statistics), preview=options.preview,
        statistics_file=options.statistics if isinstance(options.statistics, Path) else None,
        skip_saving=options.skip_saving,
        exclude_masks_at_border=options.statistics_exclude_masks_at_border,
        stats_aggregation=options.stats_aggregation,
        normalized_intensities=options.statistics_normalized_intensities, radiomics=options.radiomics,
        derived_masks=not options.no_derived_masks, output_types=options.output_type,
        probabilities=options.save_probabilities,
    )
    return request, runner, output_options


def task_run_request(options: SegmentOptions, request: TaskRequest) -> RunRequest:
    """What the run manifest records of a task request: its options and every graph it runs, from the store."""
    from tsrt.models.store import model_dir
    from tsrt.totalseg.request import models_to_run

    graphs = [
        graph
        for model in models_to_run(request)[0]
        for graph in graph_records(model.name, model_dir(model, options.models_dir), model.fold_names, options.precision)
    ]
    return RunRequest("task", options.task, options.written_options(), tuple(graphs))


def source_facts(source: SourceImage, runner: ModelRunner) -> RunFacts:
    """What a task run on `source` ran on, for its manifest (the runner's provider as asked if no model opened)."""
    return RunFacts(source.image, runner.provider_used or runner.provider, runner.precision_used or "fp32")

def segment(
    input: str | Path | nib.Nifti1Image,
    output: str | Path | None = None,
    task: str = "total",
    fast: bool = False,
    fastest: bool = False,
    roi_subset: Sequence[str] | None = None,
    ml: bool = False,
    statistics: bool | str | Path = False,
    preview: bool = False,
    body_seg: bool = False,
    force_split: bool = False,
    robust_crop: bool = False,
    v1_order: bool = False,
    provider: str = "auto",
    device: str | None = None,
    quiet: bool = False,
    *,
    precision: str = "fp32",
    roi_subset_robust: Sequence[str] | None = None,
    output_type: str | Sequence[str] = "nifti",
    statistics_exclude_masks_at_border: bool = True,
    stats_aggregation: str = "mean",
    statistics_normalized_intensities: bool = False,
    radiomics: bool = False,
    no_derived_masks: bool = False,
    skip_saving: bool = False,
    remove_small_blobs: bool | float = False,
    models_dir: str | Path | None = None,
    threads: int | None = None,
    save_probabilities: str | Path | None = None,
    offline: bool = False,
    low_memory: bool = False,
) -> nib.Nifti1Image | tuple[nib.Nifti1Image, dict[str, dict[str, float]]]:
    """Run a TotalSegmentator task like `totalsegmentator.python_api.totalsegmentator`, torch-free.

    `input` is a NIfTI path, a DICOM folder or zip, or a nibabel image; `output` is a folder of
    per-class masks, or with `ml=True` one label file (None: write nothing). `output_type` "dicom_seg"
    / "dicom_rtstruct" (or a list, with "nifti") writes DICOM for a DICOM input instead (the `dicom`
    extra). `save_probabilities` is a file for nnU-Net's probability export of the task's last model.
    `statistics` may be a path for statistics.json (TotalSegmentator 2.18); `skip_saving` writes only
    statistics.json and the preview. Returns the multilabel nibabel image (with its label table), and
    the statistics too when `statistics` is set - exactly what TotalSegmentator returns. Models come
    from tsrt's store (`models_dir`, default $TSRT_HOME/models); a missing one is imported from the
    TotalSegmentator home or downloaded on first use, unless `offline` (or TSRT_OFFLINE=1): then it
    raises ModelError naming the command that installs it. `low_memory` (tsrt's own): the same masks in about
    half the peak memory, slower.
    """
    options = SegmentOptions(
        task=task, fast=fast, fastest=fastest, roi_subset=roi_subset, roi_subset_robust=roi_subset_robust, ml=ml,
        statistics=statistics, statistics_exclude_masks_at_border=statistics_exclude_masks_at_border,
        stats_aggregation=stats_aggregation, statistics_normalized_intensities=statistics_normalized_intensities,
        radiomics=radiomics, preview=preview, body_seg=body_seg, force_split=force_split, robust_crop=robust_crop,
        v1_order=v1_order, remove_small_blobs=remove_small_blobs, no_derived_masks=no_derived_masks,
        output_type=output_type, save_probabilities=save_probabilities, provider=provider, device=device,
        precision=precision, threads=threads, quiet=quiet, models_dir=models_dir, skip_saving=skip_saving, offline=offline,
        low_memory=low_memory,
    )
    return segment_with_options(input, output, options)

def segment_with_options(
    input: str | Path | nib.Nifti1Image, output: str | Path | None, options: SegmentOptions
) -> nib.Nifti1Image | tuple[nib.Nifti1Image, dict[str, dict[str, float]]]:
    """`segment` for a request already built (the CLI builds one `SegmentOptions` and passes it here)."""
    target = None if output is None else Path(output)
    if options.radiomics and target is None:
        raise TsrtError("radiomics=True reads the written masks: give an output folder (as TotalSegmentator needs).")
    if target is not None:
        require_dicom_input(input, options.output_type)  # the input's kind first, as upstream
        check_output_name(
            target, multilabel=options.ml, output_types=options.output_type, skip_saving=options.skip_saving
        )
    request, runner, output_options = prepare_run(options)
    recorder = RunRecorder()
    source = read_source(input)
    result, stats = segment_source(source, request, runner, target, output_options)
    if target is not None and result.written:  # last: the manifest says the outputs are complete
        recorder.write(
            manifest_path(target), task_run_request(options, request),
            InputRecord.of(source.path, source.image), source_facts(source, runner), result.written,
        )
    image = label_image(result.labels, source.image, result.label_map)
    return (image, stats or {}) if options.statistics else image
