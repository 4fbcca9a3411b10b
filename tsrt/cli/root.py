"""The `tsrt` command line. Every user-facing error becomes one line on stderr and an exit code."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer

from tsrt.cli.common import configure_logging, show_help_as_written
from tsrt.errors import TsrtError

app = typer.Typer(
    name="tsrt",
    help="Torch-free TotalSegmentator / nnU-Net v2 inference on ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_subcommands() -> None:
    from tsrt.cli.companions import register as register_companion
    from tsrt.cli.engine import engine_app
    from tsrt.cli.models import models_app
    from tsrt.cli.report import report_app
    from tsrt.cli.totalseg import register
    from tsrt.cli.ui import ui

    app.command("ui")(ui)

    app.add_typer(models_app, name="models")
    register(app)
    app.add_typer(engine_app, name="engine")
    register_companion(app)
    app.add_typer(report_app, name="report")


@app.command()
def version() -> None:
    """Print tsrt's version."""
    from tsrt.version import __version__

    typer.echo(__version__)


#: The torch exporter's default opset, which the torch-free builder always writes (tsrt.models.onnx_graph.OPSET;
#: not imported here, since that loads onnx and `tsrt --help` should stay fast).
_EXPORT_OPSET = 17


@app.command()
def export(
    model_folder: Path = typer.Argument(..., help="nnU-Net v2 result folder (Trainer__Plans__Configuration)."),
    out_dir_argument: Optional[Path] = typer.Argument(
        None, metavar="[OUT]", help="Folder to write fold_N.onnx + fold_N.plan.json into (or -o)."
    ),
    out_dir_option: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Folder to write fold_N.onnx + fold_N.plan.json into, as `tsrt segment -o`."
    ),
    fold: Optional[list[str]] = typer.Option(
        None, "--fold", "-f", "--folds", help="Folds to export, as nnU-Net's -f 0 1 2 (or repeated); default: all."
    ),
    checkpoint: str = typer.Option("checkpoint_final.pth", help="Checkpoint file name inside each fold_N folder."),
    verify_with_torch: bool = typer.Option(
        False, "--verify-with-torch",
        help="Export with torch instead (the export extra): nnU-Net's own network, traced by torch.onnx, every "
        "graph compared with it. Needed for --fp16, --opset and --verify-image.",
    ),
    fp16: bool = typer.Option(False, "--fp16", help="Half-precision graph (InstanceNorm kept in float32)."),
    opset: int = typer.Option(_EXPORT_OPSET, help="ONNX opset version."),
    verify_image: Optional[Path] = typer.Option(None, help="Also verify on a centre patch of this image."),
) -> None:
    """Export trained nnU-Net v2 folds to ONNX graphs, torch-free (checkpoints read without unpickling code)."""
    if (out_dir_argument is None) == (out_dir_option is None):
        raise TsrtError(
            "Give the output folder once: `tsrt export MODEL_FOLDER -o OUT` (or `tsrt export MODEL_FOLDER OUT`)."
        )
    out_dir = out_dir_option or out_dir_argument
    if not verify_with_torch:
        torch_only = [
            flag for flag, given in (
                ("--fp16", fp16), ("--opset", opset != _EXPORT_OPSET), ("--verify-image", verify_image is not None)
            ) if given
        ]
        if torch_only:
            raise TsrtError(
                f"{torch_only[0]} is an option of the torch exporter: add --verify-with-torch "
                "(needs pip install 'tsrt[export]'), or leave it out."
            )
        from tsrt.models.exporter import export_result_folder

        plan_paths = export_result_folder(model_folder, out_dir, folds=fold or None, checkpoint=checkpoint)
    else:
        from tsrt.cli.models import torch_exporter

        export_model = torch_exporter("`tsrt export --verify-with-torch`")
        plan_paths = export_model(
            model_folder, out_dir, folds=fold or None, checkpoint=checkpoint, fp16=fp16, opset=opset,
            verify_image=verify_image,
        )
    for plan_path in plan_paths:
        typer.echo(plan_path)


_TS = "TotalSegmentator task options"
_MODEL = "Exported nnU-Net model options (--model)"
_COHORT = "Cohorts (a folder of NIfTI files, a .txt/.csv list or a glob)"


def _task_option(default, *names: str, **kwargs):
    return typer.Option(default, *names, rich_help_panel=_TS, **kwargs)


def _model_option(default, *names: str, **kwargs):
    return typer.Option(default, *names, rich_help_panel=_MODEL, **kwargs)


def _cohort_option(default, *names: str, **kwargs):
    return typer.Option(default, *names, rich_help_panel=_COHORT, **kwargs)


@app.command()
def segment(
    input_path: Optional[Path] = typer.Argument(
        None, metavar="INPUT",
        help="NIfTI file, DICOM folder or zip; or a cohort: a folder of NIfTI files, a .txt/.csv list, a quoted glob.",
    ),
    input_option: Optional[Path] = typer.Option(
        None, "-i", "--input", help="Same as INPUT (TotalSegmentator's spelling)."
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Output folder (one mask per class), or with --ml / --model the label file."
    ),
    task: str = _task_option("total", "--task", "-ta", help="TotalSegmentator task (`tsrt tasks` lists them)."),
    fast: bool = _task_option(False, "--fast", "-f", help="Lower-resolution model (3 mm for total)."),
    fastest: bool = _task_option(False, "--fastest", "-ff", help="Lowest-resolution model (6 mm for total)."),
    roi_subset: Optional[list[str]] = _task_option(
        None, "--roi-subset", "--roi_subset", "-rs", help="Only these classes (cropped around them, faster)."
    ),
    roi_subset_robust: Optional[list[str]] = _task_option(
        None, "--roi-subset-robust", "--roi_subset_robust", "-rsr", help="--roi-subset with the 3 mm crop model."
    ),
    robust_crop: bool = _task_option(
        False, "--robust-crop", "--robust_crop", "-rc", help="Crop with the 3 mm model instead of 6 mm."
    ),
    body_seg: bool = _task_option(
        False, "--body-seg", "--body_seg", "-bs", help="Crop to the body first (6 mm body model)."
    ),
    force_split: bool = _task_option(
        False, "--force-split", "--force_split", "-fs", help="Predict in three z parts (less memory)."
    ),
    ml: bool = _task_option(False, "--ml", "-ml", help="One multilabel file instead of a mask per class."),
    statistics: Optional[str] = _task_option(
        None, "--statistics", "-s", metavar="[PATH]",
        help="Also write statistics.json (in the mask folder or beside the --ml file), or to PATH (ending .json "
        "unless the input comes with -i).",
    ),
    radiomics: bool = _task_option(
        False, "--radiomics", "-r", help="Also write statistics_radiomics.json (pip install 'tsrt[radiomics]')."
    ),
    stats_include_incomplete: bool = _task_option(
        False, "--stats-include-incomplete", "--stats_include_incomplete", "-sii",
        help="Statistics also for masks touching the image border."
    ),
    stats_aggregation: str = _task_option(
        "mean", "--stats-aggregation", "--stats_aggregation", "-sa", help="mean or median intensity."
    ),
    preview: bool = _task_option(False, "--preview", "-p", help="Also write a preview PNG."),
    output_type: Optional[list[str]] = _task_option(
        None, "--output-type", "--output_type", "-ot",
        help="nifti (default), dicom_seg or dicom_rtstruct; several (-ot nifti dicom_seg) write one file each. "
        "DICOM types need a DICOM input and pip install 'tsrt[dicom]'.",
    ),
    v1_order: bool = _task_option(
        False, "--v1-order", "--v1_order", "-v1o", help="TotalSegmentator v1 label numbers (task total)."
    ),
    remove_small_blobs: Optional[float] = _task_option(
        None, "--remove-small-blobs", "--remove_small_blobs", "-rmb", metavar="MM3",
        help="Drop blobs up to this volume from every class (alone: 200 mm3, as TotalSegmentator).",
    ),
    no_derived_masks: bool = _task_option(
        False, "--no-derived-masks", "--no_derived_masks", "-ndm", help="No body/skin masks for task body."
    ),
    skip_saving: bool = _task_option(
        False, "--skip-saving", "--skip_saving", "-ss", help="Write no masks, only statistics.json and the preview."
    ),
    nr_thr_resamp: Optional[int] = typer.Option(
        None, "--nr-thr-resamp", "--nr_thr_resamp", "-nr", hidden=True, help="Accepted for compatibility; no effect."
    ),
    nr_thr_saving: Optional[int] = typer.Option(
        None, "--nr-thr-saving", "--nr_thr_saving", "-ns", hidden=True, help="Accepted for compatibility; no effect."
    ),
    model: Optional[Path] = _model_option(
        None, "--model", "-m", help="Exported model folder (fold_N.onnx + fold_N.plan.json) instead of a task."
    ),
    folds: Optional[list[str]] = _model_option(
        None, "--folds", help="Folds to ensemble (default: all exported)."
    ),
    tta: bool = _model_option(
        True, "--tta/--no-tta", help="Mirroring test-time augmentation where the model allows it."
    ),
    step_size: float = _model_option(0.5, "--step-size", help="Tile overlap as a fraction of the patch."),
    batch_size: int = _model_option(1, "--batch-size", help="Tiles per network call."),
    save_probabilities: Optional[str] = typer.Option(
        None, "--save-probabilities", "--save_probabilities", "-sp", metavar="[PATH]",
        help="Tasks: nnU-Net's class probabilities of the task's last model to PATH (.npz + .pkl), as "
        "TotalSegmentator. --model: no PATH, written as OUTPUT's name with .npz.",
    ),
    overwrite: bool = _cohort_option(
        False, "--overwrite", help="Segment finished cases again, even those whose run manifest matches."
    ),
    no_overwrite_changed: bool = _cohort_option(
        False, "--no-overwrite-changed",
        help="Keep cases made with other options, models, tsrt or input (reported as stale) instead of redoing them.",
    ),
    ray: Optional[str] = _cohort_option(
        None, "--ray", metavar="[auto|HOST:PORT]",
        help="Run on Ray (pip install 'tsrt[cluster]'): alone, Ray starts here; auto or HOST:PORT joins a cluster.",
    ),
    ray_workers: Optional[int] = _cohort_option(
        None, "--ray-workers", help="At most this many Ray workers (default: as many as the cluster's CPUs/GPUs hold)."
    ),
    ray_cpus_per_worker: float = _cohort_option(
        1.0, "--ray-cpus-per-worker", help="CPUs (ONNX Runtime threads) each Ray worker takes."
    ),
    provider: str = typer.Option(
        "auto", "--provider", help="auto, cpu, cuda, tensorrt; opt-in CPU: openvino (tsrt[openvino])."
    ),
    precision: str = typer.Option(
        "fp32", "--precision",
        help="fp32 (default); bf16: --provider openvino on a CPU with native bf16; fp16: --provider tensorrt; "
        "int8: the gated int8 graph `tsrt models quantize` makes (CPU: ONNX Runtime or OpenVINO).",
    ),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="cpu, gpu or gpu:N (CUDA/TensorRT)."),
    low_memory: bool = typer.Option(
        False, "--low-memory", "--low_memory",
        help="Run the network's large feature maps a few rows at a time: the same masks in about half the "
        "memory, slower (--provider cpu, fp32).",
    ),
    offline: bool = typer.Option(
        False, "--offline",
        help="Never fetch a missing model (also TSRT_OFFLINE=1); by default it is imported from the "
        "TotalSegmentator home or downloaded on first use.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or info messages."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail."),
    print_json: bool = typer.Option(
        False, "--json", help="Print the run manifest (a cohort: its summary) as JSON on stdout, nothing else."
    ),
) -> None:
    """Segment an image with a TotalSegmentator task (default: total), or with any exported model (--model).

    A run manifest (what made the result) is written beside every output: OUTPUT/tsrt_manifest.json for
    a mask folder, NAME.tsrt.json beside a file.
    """
    configure_logging(quiet, verbose)
    source = input_path or input_option
    if source is None:
        raise TsrtError("No input given: pass the image as INPUT or with -i.")
    from tsrt.cohort.cases import TaskJob, find_cases
    from tsrt.engines.providers import resolve_precision

    provider, precision = resolve_precision(provider, precision)  # refused here, before any input is looked at

    cases = find_cases(Path(source), output, ml or model is not None)
    if cases is None and ray is not None:
        raise TsrtError("--ray runs cohorts (a folder of NIfTI files, a .txt/.csv list, a glob); drop it for 1 image.")
    cohort = dict(
        overwrite=overwrite, overwrite_changed=not no_overwrite_changed, quiet=quiet, print_json=print_json, ray=ray,
        workers=ray_workers, cpus_per_worker=ray_cpus_per_worker,
    )
    model_probabilities = _model_probabilities(save_probabilities) if model is not None else False
    if model is not None and cases is not None:
        from tsrt.api import ModelJob

        job = ModelJob(
            model, folds=tuple(folds) if folds else None, tta=tta, step_size=step_size, batch_size=batch_size,
            provider=provider, device=device, save_probabilities=model_probabilities, precision=precision,
            low_memory=low_memory,
        )
        _segment_cohort(cases, job, output, **cohort)
        return
    if model is not None:
        from tsrt.api import segment as run_segment

        run = run_segment(
            source, output, model, folds=folds, tta=tta, step_size=step_size, batch_size=batch_size,
            provider=provider, device=device, save_probabilities=model_probabilities, progress=not quiet,
            precision=precision, low_memory=low_memory,
        )
        if print_json:
            _print_manifest(output)
        elif not quiet:
            timings = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in run.seconds.items())
            typer.echo(f"wrote {output} ({timings})")
        return
    if save_probabilities == "":
        raise TsrtError("--save_probabilities needs a file for the probabilities, e.g. --save_probabilities probs.npz.")
    if cases is not None:
        _check_single_image_options(output_type, save_probabilities, statistics, skip_saving)
    from tsrt import totalseg

    options = dict(
        task=task, fast=fast, fastest=fastest, roi_subset=roi_subset, ml=ml, statistics=_statistics(statistics),
        preview=preview, skip_saving=skip_saving,
        radiomics=radiomics, body_seg=body_seg, force_split=force_split, robust_crop=robust_crop, v1_order=v1_order,
        provider=provider, precision=precision,
        device=device, quiet=quiet, roi_subset_robust=roi_subset_robust, output_type=_output_type(output_type),
        statistics_exclude_masks_at_border=not stats_include_incomplete, stats_aggregation=stats_aggregation,
        no_derived_masks=no_derived_masks,
        remove_small_blobs=False if remove_small_blobs is None else remove_small_blobs,
        save_probabilities=save_probabilities, offline=offline, low_memory=low_memory,
    )
    if cases is None:
        totalseg.segment(source, output, **options)
        if print_json:
            _print_manifest(output)
        elif not quiet:
            typer.echo(f"wrote {output}")
        return
    from tsrt.totalseg.options import SegmentOptions

    _segment_cohort(cases, TaskJob(SegmentOptions.from_keywords(**options)), output, **cohort)


def _print_manifest(output: Path) -> None:
    """The run manifest just written beside `output`, as it is on disk (so stdout and the file agree)."""
    from tsrt.outputs.manifest import manifest_path

    path = manifest_path(output)
    if not path.is_file():
        raise TsrtError(f"This run wrote no files, so there is no run manifest ({path}) to print: drop --json.")
    typer.echo(path.read_text(encoding="utf-8"))


def _output_type(values: list[str] | None) -> str | list[str]:
    """TotalSegmentator's form: one output type as a string, several as a list."""
    if not values:
        return "nifti"
    return values[0] if len(values) == 1 else values


def _model_probabilities(value: str | None) -> bool:
    """--model writes its probabilities next to OUTPUT, so there the option is a flag."""
    if value:
        raise TsrtError(
            f"With --model, --save-probabilities takes no path (it writes OUTPUT's name with .npz): drop {value}."
        )
    return value is not None


def _statistics(value: str | None) -> bool | str:
    """--statistics alone (filled in as "") means statistics.json beside the output; with a value, that path."""
    return False if value is None else value or True


def _check_single_image_options(
    output_type: list[str] | None, save_probabilities: str | None, statistics: str | None, skip_saving: bool
) -> None:
    """DICOM outputs and one probabilities / statistics file belong to one image; a cohort would overwrite or mix
    them (and a case that writes no masks could never be seen as finished)."""
    from tsrt.outputs.dicom import DICOM_OUTPUT_TYPES, normalize_output_types

    dicom = [t for t in normalize_output_types(_output_type(output_type)) if t in DICOM_OUTPUT_TYPES]
    single = [f"--output_type {t}" for t in dicom]
    single += ["--save_probabilities"] * (save_probabilities is not None)
    single += [f"--statistics {statistics}"] * bool(statistics) + ["--skip_saving"] * skip_saving
    if single:
        raise TsrtError(f"{' '.join(single)} works on one image, not a cohort: run tsrt segment for each image.")


def cohort_table(summary, max_rows: int = 40):
    """A rich table of the cases this run worked on (failures first); skipped ones are only counted."""
    from rich.table import Table
    from rich.text import Text

    from tsrt.cohort.cases import SUMMARY_FILE

    worked = [record for record in summary.records if record.status != "skipped"]
    worked.sort(key=lambda record: record.status != "failed")
    table = Table(title=summary.line().split(":")[0], title_justify="left")
    for column in ("case", "status", "seconds", "peak MB", "worker", "attempts", "reason"):
        table.add_column(column, justify="right" if column in ("seconds", "peak MB", "attempts") else "left")
    for record in worked[:max_rows]:
        peak = "" if record.peak_memory_mb is None else f"{record.peak_memory_mb:.0f}"
        why = record.reason or (f"manifest {record.manifest}: {record.changes}" if record.changes else "")
        cells = (record.name, record.status, f"{record.seconds:.1f}", peak, record.worker, str(record.attempts), why)
        table.add_row(*(Text(cell) for cell in cells))  # case names and reasons as written, never rich markup
    if len(worked) > max_rows:
        table.caption = f"{len(worked) - max_rows} more cases in {SUMMARY_FILE}"
    return table


def _segment_cohort(
    cases, job, output: Path, *, overwrite: bool, overwrite_changed: bool, quiet: bool, print_json: bool,
    **ray_options,
) -> None:
    """Run a cohort here or on Ray, print its table (or with --json the summary), write
    OUTPUT/cohort_summary.json; failures exit non-zero."""
    from tsrt.cohort.run import run_job

    summary = run_job(
        cases, job, overwrite=overwrite, overwrite_changed=overwrite_changed, progress=not quiet and not print_json,
        **ray_options,
    )
    path = summary.write(output)
    if print_json:
        typer.echo(path.read_text(encoding="utf-8"))
    else:
        if not quiet:
            from rich.console import Console

            Console().print(cohort_table(summary))
        typer.echo(f"{summary.line()}; summary: {path}")
    if summary.failed:
        raise TsrtError(
            f"{len(summary.failed)} of {len(cases)} cases failed; fix them and run again (finished cases are skipped)."
        )


@app.command()
def demo(
    output: Path = typer.Option(Path("demo_output"), "-o", "--output", help="Folder for the phantom and its results."),
    provider: str = typer.Option(
        "auto", "--provider", help="auto, cpu, cuda, tensorrt; opt-in CPU: openvino (tsrt[openvino])."
    ),
    precision: str = typer.Option(
        "fp32", "--precision", help="fp32 (default); bf16: --provider openvino on a CPU with native bf16; "
        "fp16: --provider tensorrt; int8: a model quantized with `tsrt models quantize`."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Segment a generated CT phantom with the bundled demo model (no internet, no torch)."""
    import time
    from functools import partial

    from rich.console import Console
    from rich.table import Table

    from tsrt.demo.run import run_demo

    configure_logging(quiet, False)
    console = Console(stderr=False, quiet=quiet)
    started = time.perf_counter()
    say = partial(console.print, markup=False)  # paths as written, never rich markup
    summary = run_demo(output, provider=provider, precision=precision, progress=not quiet, say=say)
    table = Table(title=f"tsrt demo: {len(summary)} structures in {time.perf_counter() - started:.1f} s")
    for column in ("structure", "volume (ml)", "mean HU", "Dice vs truth"):
        table.add_column(column, justify="left" if column == "structure" else "right")
    for name, row in summary.items():
        table.add_row(name, f"{row['volume_ml']:.1f}", f"{row['mean_hu']:.0f}", f"{row['dice']:.3f}")
    console.print(table)


#: Options that take several values in TotalSegmentator's argparse CLI (`--roi_subset liver brain`).
_MULTI_VALUE_OPTIONS = {
    "--folds", "--roi-subset", "--roi_subset", "-rs", "--roi-subset-robust", "--roi_subset_robust", "-rsr",
    "--output-type", "--output_type", "-ot",
}
#: First arguments that are not TotalSegmentator-style segment options (`tsrt -i ct.nii.gz -o out` runs segment).
_TOP_LEVEL_OPTIONS = {"--help", "-h", "--version"}


#: Multi-value options of single commands (`tsrt export MODEL -f 0 1 2`, nnU-Net's spelling; -f is --fast elsewhere).
_COMMAND_MULTI_VALUE_OPTIONS = {"export": {"-f", "--fold", "--folds"}}


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """Rewrite `--opt a b c` as `--opt a --opt b --opt c`, so TotalSegmentator-style calls work with Typer."""
    multi_value = _MULTI_VALUE_OPTIONS | _COMMAND_MULTI_VALUE_OPTIONS.get(argv[0] if argv else "", set())
    expanded: list[str] = []
    current: str | None = None
    for token in argv:
        if token in multi_value:
            current = token
            expanded.append(token)
            continue
        if current is not None and not token.startswith("-"):
            if expanded[-1] != current:
                expanded.append(current)
            expanded.append(token)
            continue
        current = None
        expanded.append(token)
    return expanded


_register_subcommands()
show_help_as_written(app)


def _is_ray_address(text: str, argv: list[str]) -> bool:
    return text in ("local", "auto") or re.fullmatch(r"(ray://)?[\w.\-]+:\d+", text) is not None


def _fill_optional_values(argv: list[str]) -> list[str]:
    """`-rmb` alone means `-rmb 200` in TotalSegmentator, `--ray` alone `--ray local`; Typer options take a value."""
    filled: list[str] = []
    for index, token in enumerate(argv):
        filled.append(token)
        if token in _OPTIONAL_VALUE_OPTIONS:
            default, is_value = _OPTIONAL_VALUE_OPTIONS[token]
            following = argv[index + 1] if index + 1 < len(argv) else None
            if following is None or not is_value(following, argv):
                filled.append(default)
    return filled


def _is_value(text: str, argv: list[str]) -> bool:
    return not text.startswith("-")


def _is_statistics_path(text: str, argv: list[str]) -> bool:
    """`-s PATH` as TotalSegmentator's argparse reads it in its own call (-i INPUT); beside tsrt's positional
    INPUT (`tsrt segment -s ct.nii.gz -o out`) only a .json name, so the image stays the input."""
    return _is_value(text, argv) and ("-i" in argv or "--input" in argv or text.lower().endswith(".json"))


def _is_number(text: str, argv: list[str]) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


#: Options whose value may be left out (TotalSegmentator's argparse nargs="?"): (value it then means, test for a
#: value given the whole command line).
_OPTIONAL_VALUE_OPTIONS = {
    "-rmb": ("200", _is_number),
    "--remove_small_blobs": ("200", _is_number),
    "--remove-small-blobs": ("200", _is_number),
    "--ray": ("local", _is_ray_address),
    # --model: a flag; tasks (TotalSegmentator): a path, so the empty value is refused there.
    "--save-probabilities": ("", _is_value),
    "--save_probabilities": ("", _is_value),
    "-sp": ("", _is_value),
    "--statistics": ("", _is_statistics_path),
    "-s": ("", _is_statistics_path),
}


def totalsegmentator_argv(argv: list[str]) -> list[str]:
    """`tsrt -i ct.nii.gz -o seg --fast` (TotalSegmentator's call with the program renamed) means `tsrt segment ...`."""
    if argv and argv[0].startswith("-") and argv[0] not in _TOP_LEVEL_OPTIONS:
        argv = ["segment", *argv]
    if argv and argv[0] == "segment":  # its options only: `tsrt phase -s FILE` has a -s of its own
        argv = _fill_optional_values(argv)
    return expand_multi_value_options(argv)


def main() -> None:
    """Console-script entry: run the Typer app and turn TsrtError into one line + exit code."""
    from tsrt.cli.progress import install_terminal_progress

    install_terminal_progress()
    try:
        app(args=totalsegmentator_argv(sys.argv[1:]), prog_name="tsrt")
    except TsrtError as err:
        typer.echo(f"tsrt: error: {err}", err=True)
        sys.exit(err.exit_code)
