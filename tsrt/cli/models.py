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

from tsrt.cli.common import EXPORT_EXTRA_MODULES
from tsrt.errors import is_missing, missing_extra
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
    for column in ("task", "modality", "license", "normal", "fast", "fastest"):
        table.add_column(column)
    for name in registry.task_names():
        cells = []
        for mode in ("normal", "fast", "fastest"):
            if mode not in registry.modes(name):
                cells.append("")
                continue
            task = registry.task(name, fast=mode == "fast", fastest=mode == "fastest")
            cells.append(_mode_cell([statuses[m.name] for m in task.required_models]))
        first = registry.task(name)
        table.add_row(name, first.modality, "yes" if first.license else "", *cells)
    console.print(table)
    incomplete = [s for s in statuses.values() if s.state == "incomplete"]
    for status in incomplete:
        console.print(f"[red]{status.model.name} is incomplete[/red] ({status.problems[0]}): import it again.")


def _models_table(statuses: list, root: Path):
    from rich.table import Table

    table = Table(title=f"Models in {root}")
    for column in ("model", "state", "folds", "size"):
        table.add_column(column)
    for status in statuses:
        state = "[green]complete[/green]" if status.complete else f"[red]incomplete[/red]: {status.problems[0]}"
        table.add_row(status.model.name, state, ", ".join(status.folds), human_size(status.size_bytes))
    return table


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
    task: str = typer.Argument(..., help="TotalSegmentator task, e.g. total; or phase, modality, evans-index."),
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
    companion tools instead (converted to xgboost JSON; no torch needed).
    """
    from tsrt.models.resources import RESOURCES

    if task in RESOURCES:
        from tsrt_export.import_classifiers import import_resource

        folder = import_resource(task, resources)
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
    task: str = typer.Argument(..., help="TotalSegmentator task, e.g. total."),
    fast: bool = _FAST,
    fastest: bool = _FASTEST,
    with_optional: bool = _OPTIONAL,
    quiet: bool = _QUIET,
    verify_with_torch: bool = _VERIFY_WITH_TORCH,
) -> None:
    """Download TotalSegmentator's weights for a task and import them into the store (no torch needed)."""
    from tsrt.models.download import download_task

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
