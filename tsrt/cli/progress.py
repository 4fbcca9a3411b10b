"""Terminal progress bars (rich) for the core's `tsrt.progress` reports; installed by the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tsrt.progress import Advance, ProgressSpec, has_reporter, set_reporter


@contextmanager
def rich_bar(spec: ProgressSpec) -> Iterator[Advance]:
    """One rich bar on stderr: M/N for items, size and speed for bytes."""
    from rich.console import Console
    from rich.progress import (
        BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
        TimeRemainingColumn, TransferSpeedColumn,
    )

    label = TextColumn("{task.description}", markup=False)  # file and case names as written, never rich markup
    if spec.unit == "bytes":
        columns = (label, BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    else:
        columns = (label, BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}", markup=False),
                   TimeRemainingColumn() if spec.transient else TimeElapsedColumn())
    bar = Progress(*columns, transient=spec.transient, console=Console(stderr=True))
    task = bar.add_task(spec.label, total=spec.total, completed=spec.completed, note="")

    def advance(steps: int = 1, note: str | None = None) -> None:
        if note is None:
            bar.advance(task, steps)
        else:
            bar.update(task, advance=steps, note=note)

    bar.start()
    try:
        yield advance
    finally:
        bar.update(task, note="")
        bar.stop()


def install_terminal_progress() -> None:
    """Show the core's progress as rich bars, unless a caller installed its own reporter."""
    if not has_reporter():
        set_reporter(rich_bar)
