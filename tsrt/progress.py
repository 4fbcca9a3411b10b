"""Progress of long work (tiles, downloads, cases, radiomics), reported without tying the core to a terminal.

The core calls `progress(...)` and advances what it yields; what a person sees is decided at the top
of the house: the CLI installs a terminal bar (tsrt.cli.progress), the web UI shows its own stages,
and with no reporter installed nothing is drawn. So the pipeline never imports a UI library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ProgressSpec:
    """What one bar is about."""

    label: str
    total: int | None  # None: unknown (a download without Content-Length)
    completed: int = 0  # already done when the bar starts (a resumed download)
    unit: Literal["items", "bytes"] = "items"
    transient: bool = False  # remove the bar when done (per-image work inside a longer run)


#: `advance(steps, note)`: `steps` more are done; `note`, if given, replaces the bar's trailing text.
Advance = Callable[..., None]
#: A reporter opens a bar for a spec and yields its `advance`.
Reporter = Callable[[ProgressSpec], AbstractContextManager[Advance]]

_reporter: Reporter | None = None


def set_reporter(reporter: Reporter | None) -> Reporter | None:
    """Install how progress is shown (None: not at all); returns the previous reporter."""
    global _reporter
    previous, _reporter = _reporter, reporter
    return previous


def has_reporter() -> bool:
    return _reporter is not None


def _ignore(steps: int = 1, note: str | None = None) -> None:
    return None


@contextmanager
def progress(
    label: str,
    total: int | None,
    *,
    enabled: bool = True,
    completed: int = 0,
    unit: Literal["items", "bytes"] = "items",
    transient: bool = False,
) -> Iterator[Advance]:
    """A bar for `total` steps through the installed reporter; a no-op when disabled or none is installed."""
    if not enabled or _reporter is None:
        yield _ignore
        return
    with _reporter(ProgressSpec(label, total, completed, unit, transient)) as advance:
        yield advance
