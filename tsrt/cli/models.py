"""`tsrt models ...`: list, import and download TotalSegmentator models into tsrt's store.

Registered in tsrt/cli/root.py as `app.add_typer(models_app, name="models")`. Heavy modules (the
importer, which loads onnx; rich tables) are imported inside the commands so `tsrt --help` stays fast.
Import and download convert checkpoints torch-free (tsrt.models.totalseg_import); `--verify-with-torch`
uses the torch exporter of the export extra instead, which compares every graph with the torch network.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from tsrt.cli.common import EXPORT_EXTRA_MODULES, configure_logging
from tsrt.errors import InputError, is_missing, missing_extra
from tsrt.models.store import human_size

if TYPE_CHECKING:
    from tsrt.models.registry import Task
    from tsrt.models.totalseg_import import Exporter

models_app = typer.Typer(
    help="List, import and download TotalSegmentator models into tsrt's store ($TSRT_HOME/models).",
    no_args_is_help=True,
)

_FAST = typer.Option(False, "--fast", help="The task's fast mode (lower resolution), as TotalSegmentator --fast.")
_FASTEST = typer.Option(False, "--fastest", help="The task's fastest mode, as TotalSegmentator --fastest.")
_OPTIONAL = typer.Option(
    False, "--with-optional", help="Also the models only some options use (--roi_subset, --robust_crop, --body_seg)."
)
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
_VERIFY_WITH_TORCH = typer.Option(
    False, "--verify-with-torch",
    help="Export with the torch exporter, comparing every graph with the torch network (needs the export extra).",
)


def torch_exporter(feature: str) -> "Exporter":
    """The torch exporter of the export extra, or one actionable line when that extra is missing."""
    try:
        from tsrt_export.onnx_export import export_model
    except ModuleNotFoundError as err:
        if not is_missing(err, EXPORT_EXTRA_MODULES):
            raise
        raise missing_extra(
            feature, str(err.name), "export", " and the torch toolchain from tsrt's source tree: pip install ./export"
        ) from None
    return export_model


def _report(outcomes: list, quiet: bool) -> None:
    if quiet:
        return
    from tsrt.models.store import directory_size

    words = {"imported": "imported", "present": "already in the store", "absent": "not found (optional), skipped"}
    for outcome in outcomes:
        size = f" ({human_size(directory_size(outcome.path))})" if outcome.action != "absent" else ""
        typer.echo(f"{outcome.model.name}: {words[outcome.action]}{size}")


@models_app.command("list")
def list_models(
    verify: bool = typer.Option(False, "--verify", help="Re-hash every graph instead of trusting install records."),
    per_model: bool = typer.Option(False, "--models", help="One row per model in the store instead of per task."),
) -> None:
    """Tasks, their modes and which of their models are in the store."""
    from rich.console import Console
    from rich.table import Table

    from tsrt.models.registry import load_registry
    from tsrt.models.store import model_status, models_root

    registry = load_registry()
    statuses = {name: model_status(model, verify=verify) for name, model in registry.models.items()}
    console = Console()
    if per_model:
        console.print(_models_table([s for s in statuses.values() if s.state != "missing"], models_root()))
        return
    table = Table(title=f"TotalSegmentator {registry.totalsegmentator_version} tasks — store: {models_root()}")
    for column in ("task", "modality", "license", "normal", "fast", "fastest", "int8"):
        table.add_column(column)
    int8_states = {name: _int8_state(status) for name, status in statuses.items()}
    for name in registry.task_names():
        cells, int8_modes = [], []
        for mode in ("normal", "fast", "fastest"):
            if mode not in registry.modes(name):
                cells.append("")
                continue
            task = registry.task(name, fast=mode == "fast", fastest=mode == "fastest")
            cells.append(_mode_cell([statuses[m.name] for m in task.required_models]))
            records = [int8_states[m.name] for m in task.required_models]
            if all(record is not None for record in records):
                forced = any(record["gate"].get("forced") for record in records if record is not None)
                int8_modes.append(f"{mode} (forced)" if forced else mode)
        first = registry.task(name)
        table.add_row(name, first.modality, "yes" if first.license else "", *cells, ", ".join(int8_modes))
    console.print(table)
    incomplete = [s for s in statuses.values() if s.state == "incomplete"]
    for status in incomplete:
        console.print(f"[red]{status.model.name} is incomplete[/red] ({status.problems[0]}): import it again.")


def _models_table(statuses: list, root: Path):
    from rich.table import Table

    table = Table(title=f"Models in {root}")
    for column in ("model", "state", "folds", "size", "int8 (tsrt models quantize)"):
        table.add_column(column)
    for status in statuses:
        state = "[green]complete[/green]" if status.complete else f"[red]incomplete[/red]: {status.problems[0]}"
        table.add_row(status.model.name, state, ", ".join(status.folds), human_size(status.size_bytes),
                      _int8_summary(_int8_state(status)))
    return table


def _int8_state(status) -> dict | None:
    """The gate record of a stored model's int8 graphs (every fold has one), else None."""
    from tsrt.models.plan import has_int8, load_model_plans

    if not status.complete:
        return None
    plans = load_model_plans(status.path, list(status.model.fold_names) if status.model.fold_names else None)
    return plans[0].int8 if has_int8(plans) else None


def _int8_summary(record: dict | None) -> str:
    """`gated`/`forced` with the gate's numbers and its seconds per run (int8 vs fp32), or a dash."""
    if record is None:
        return "[dim]–[/dim]"
    gate = record["gate"]
    word = "[yellow]forced[/yellow]" if gate.get("forced") else "[green]gated[/green]"
    return (f"{word}: mean Dice {gate['mean_dice']:.3f}, min {gate['min_dice']:.3f}, agreement "
            f"{100 * gate['agreement']:.2f} %, {gate['seconds_int8']:.1f} s vs {gate['seconds_fp32']:.1f} s fp32")


def _mode_cell(statuses: list) -> str:
    present = [s for s in statuses if s.complete]
    if not present:
        return "[dim]–[/dim]"
    size = human_size(sum(s.size_bytes for s in present))
    if len(present) == len(statuses):
        return f"[green]✓[/green] {size}"
    return f"[yellow]{len(present)}/{len(statuses)}[/yellow] {size}"


def _task(name: str, fast: bool, fastest: bool) -> "Task":
    from tsrt.models.registry import get_task

    return get_task(name, fast=fast, fastest=fastest)


@models_app.command("import")
def import_models(
    task: str = typer.Argument(
        ..., help="TotalSegmentator task, e.g. total; or phase, modality, evans-index, body_stats_xgb, body_stats_ct, "
        "body_stats_mr."
    ),
    fast: bool = _FAST,
    fastest: bool = _FASTEST,
    totalseg_home: Optional[Path] = typer.Option(
        None, "--totalseg-home", help="TotalSegmentator's home (default $TOTALSEG_HOME_DIR or ~/.totalsegmentator)."
    ),
    with_optional: bool = _OPTIONAL,
    resources: Optional[Path] = typer.Option(
        None, "--resources", help="phase/modality/evans-index: TotalSegmentator's resources folder "
        "(default: the installed totalsegmentator package's)."
    ),
    quiet: bool = _QUIET,
    verify_with_torch: bool = _VERIFY_WITH_TORCH,
) -> None:
    """Export the models a task needs from an existing TotalSegmentator install into the store (no torch needed).

    `phase`, `modality` and `evans-index` import the classifiers / atlas of TotalSegmentator's
    companion tools instead (converted to xgboost JSON; no torch needed); `body_stats_xgb`,
    `body_stats_ct` and `body_stats_mr` the predictors of `tsrt report body` from the home's weights
    (the networks are converted to ONNX with the export extra).
    """
    from tsrt.models.resources import RESOURCES

    if task in RESOURCES:
        from tsrt.models.first_use import resource_converter

        from_home = RESOURCES[task].totalseg_folder is not None  # the body-stats predictors: the home's weights
        folder = resource_converter(task)(task, totalseg_home if from_home else resources)
        if not quiet:
            typer.echo(f"{task}: imported into {folder}")
        return
    from tsrt.models.exporter import export_result_folder
    from tsrt.models.totalseg_import import import_task

    resolved = _task(task, fast, fastest)
    exporter = torch_exporter("--verify-with-torch") if verify_with_torch else export_result_folder
    outcomes = import_task(
        resolved, totalseg_home, with_optional=with_optional, progress=not quiet, exporter=exporter
    )
    _report(outcomes, quiet)


@models_app.command("download")
def download(
    task: str = typer.Argument(
        ..., help="TotalSegmentator task, e.g. total; or body_stats_xgb, body_stats_ct, body_stats_mr."
    ),
    fast: bool = _FAST,
    fastest: bool = _FASTEST,
    with_optional: bool = _OPTIONAL,
    quiet: bool = _QUIET,
    verify_with_torch: bool = _VERIFY_WITH_TORCH,
) -> None:
    """Download TotalSegmentator's weights for a task and import them into the store (no torch needed).

    `body_stats_xgb`, `body_stats_ct` and `body_stats_mr` download the predictors of `tsrt report body`
    (the networks: licensed, and converted with the export extra).
    """
    from tsrt.models.download import download_task
    from tsrt.models.resources import RESOURCES

    if task in RESOURCES:
        from tsrt.models.first_use import download_resource

        folder = download_resource(task, progress=not quiet)
        if not quiet:
            typer.echo(f"{task}: downloaded and imported into {folder}")
        return

    resolved = _task(task, fast, fastest)
    # Resolved before downloading: a missing export extra must not cost gigabytes first.
    exporter = torch_exporter("--verify-with-torch") if verify_with_torch else None
    outcomes = download_task(resolved, with_optional=with_optional, progress=not quiet, exporter=exporter)
    _report(outcomes, quiet)


@models_app.command("set-license")
def set_license(
    key: str = typer.Argument(..., help="License key, e.g. aca_XXXXXXXXXXXXXX."),
    skip_validation: bool = typer.Option(False, "--skip-validation", help="Do not ask the license server."),
) -> None:
    """Store a TotalSegmentator license key for downloading licensed models (as totalseg_set_license)."""
    from tsrt.models.download import set_license_key

    path = set_license_key(key, validate=not skip_validation)
    typer.echo(f"License key saved in {path}.")


@models_app.command("quantize")
def quantize_models(
    target: str = typer.Argument(..., help="A TotalSegmentator task in the store (e.g. total) or an exported model folder."),
    calibration: list[str] = typer.Option(
        ..., "--calibration", "-c",
        help="Your own CTs/MRs to calibrate on: a NIfTI file, DICOM folder or zip, a folder of NIfTI files, a "
        ".txt/.csv list or a quoted glob; repeat the option for several.",
    ),
    validation: Optional[list[str]] = typer.Option(
        None, "--validation",
        help="Held-out scans for the accuracy gate (same forms); default: every fourth calibration scan.",
    ),
    fast: bool = _FAST,
    fastest: bool = _FASTEST,
    with_optional: bool = _OPTIONAL,
    method: str = typer.Option("percentile", "--method", help="Calibration: percentile (default), entropy or minmax."),
    tiles: int = typer.Option(32, "--tiles", min=1, help="Calibration tiles per model, spread over the scans."),
    force: bool = typer.Option(
        False, "--force", help="Install int8 even when the accuracy gate refuses it (recorded as forced)."
    ),
    tensorrt: bool = typer.Option(
        False, "--tensorrt",
        help="Symmetric int8 (zero points 0, float weights with Q/DQ pairs), the form `tsrt engine build --precision "
        "int8` builds; ONNX Runtime and OpenVINO run it too, gated the same way.",
    ),
    quiet: bool = _QUIET,
) -> None:
    """Make int8 graphs from your scans, installed only when they segment held-out scans like fp32.

    Each fp32 graph gets an int8 QDQ graph beside it (fold_N.int8.onnx, for ONNX Runtime CPU and OpenVINO;
    with --tensorrt in the symmetric form `tsrt engine build --precision int8` also builds),
    recorded in its plan, with quantization_report.json: per-class Dice int8 vs fp32, voxel agreement,
    seconds. Refused (nothing installed) when mean Dice < 0.99 or a class of >= 1000 voxels is below 0.95.
    Then `tsrt segment ... --precision int8` runs them.
    """
    from tsrt.quantization.install import GateRefused, model_dir_targets, quantize, task_targets

    configure_logging(quiet, False)
    folder = Path(target)
    targets = model_dir_targets(folder) if folder.is_dir() else task_targets(
        _task(target, fast, fastest), with_optional=with_optional
    )
    try:
        outcomes = quantize(
            targets, _scans(calibration), _scans(validation) if validation else None, method=method, force=force,
            max_tiles=tiles, show_progress=not quiet, form="tensorrt" if tensorrt else "cpu",
        )
    except GateRefused as refused:
        if not quiet:
            _print_gate(refused.outcomes)
        raise
    if not quiet:
        _print_gate(outcomes)
        for outcome in outcomes:
            forced = " (forced: the gate refused it)" if outcome.report["forced"] else ""
            typer.echo(f"{outcome.target.name}: int8 installed{forced}; report: {outcome.report_path}")


def _scans(values: list[str]) -> list[Path]:
    """Scan files from each value: an image (file, DICOM folder or zip), or a cohort form (folder, list, glob)."""
    from tsrt.cohort.cases import find_cases

    scans: list[Path] = []
    for value in values:
        cases = find_cases(Path(value), Path("."), False)
        if cases is None and not Path(value).exists():
            raise InputError(f"Scan {value} does not exist: give a NIfTI file, a DICOM folder, a folder, list or glob.")
        scans.extend([Path(value)] if cases is None else [case.input for case in cases])
    return scans


def _print_gate(outcomes: list) -> None:
    """One table per model: per-class Dice int8 vs fp32, then agreement, mean Dice and seconds per run."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for outcome in outcomes:
        report = outcome.report
        verdict = "[green]passed[/green]" if report["passed"] else "[red]refused[/red]"
        limits = report["thresholds"]
        table = Table(title=f"{outcome.target.name}: int8 vs fp32", caption=(
            f"{len(report['validation']['scans'])} held-out scan(s); {report['calibration']['tiles']} calibration "
            f"tiles ({report['calibration']['method']}); dim: under {limits['mean_over_classes_min_voxels']} voxels, "
            "not in the mean"))
        for column in ("class", "voxels fp32", "voxels int8", "Dice"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for name, row in report["per_class"].items():
            dice = f"{row['dice']:.4f}"
            if row["voxels_fp32"] >= limits["class_min_voxels"] and row["dice"] < limits["class_dice"]:
                dice = f"[red]{dice}[/red]"
            style = "dim" if row["voxels_fp32"] < limits["mean_over_classes_min_voxels"] else None
            table.add_row(name, str(row["voxels_fp32"]), str(row["voxels_int8"]), dice, style=style)
        console.print(table)
        console.print(
            f"gate {verdict}: mean Dice {report['mean_dice']:.4f} (>= {report['thresholds']['mean_dice']}), voxel "
            f"agreement {100 * report['agreement']:.3f} %, seconds per run fp32 {report['seconds_fp32']:.2f} / "
            f"int8 {report['seconds_int8']:.2f}"
        )
