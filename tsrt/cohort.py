"""Cohorts: one TotalSegmentator task over many cases, resumable, one failing case never stops the rest.

INPUT is a cohort when it is a `.txt` file (one image path per line, relative to the file's folder;
blank lines and `#` comments ignored) or a folder holding NIfTI files (every *.nii / *.nii.gz in it).
A folder of DICOM slices stays one case. Each case gets its own output folder, OUTPUT/<case>/, with
the masks (or `<case>.nii.gz` with --ml), statistics.json and the preview, so side files of
different cases never collide. Finished cases (every expected file present; files are written
atomically) are skipped unless `overwrite`; models are loaded once for the whole cohort.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tsrt.errors import InputError, TsrtError
from tsrt.totalseg import ModelRunner, OutputOptions, TaskRequest, output_label_map, read_source, segment_source

log = logging.getLogger("tsrt")

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    name: str
    input: Path
    output: Path  # the mask folder, or the --ml file


@dataclass
class CohortSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already finished
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case, one-line reason)
    seconds: float = 0.0

    def line(self) -> str:
        text = (
            f"{len(self.done)} segmented, {len(self.skipped)} already done, {len(self.failed)} failed "
            f"({self.seconds:.0f}s)"
        )
        if self.failed:
            text += ": " + "; ".join(f"{name} ({reason})" for name, reason in self.failed)
        return text


def case_name(path: Path) -> str:
    name = path.name
    for suffix in (*_NIFTI_SUFFIXES, ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_cases(source: Path, output: Path, multilabel: bool) -> list[Case] | None:
    """The cohort's cases, or None when `source` is a single image (file, DICOM folder or zip)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".txt":
        inputs = _listed_inputs(source)
    elif source.is_dir():
        inputs = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(_NIFTI_SUFFIXES))
        if not inputs:
            return None  # a DICOM folder: one case
    else:
        return None
    cases, seen = [], {}
    for path in inputs:
        name = case_name(path)
        if name in seen:
            raise InputError(f"Cases {seen[name]} and {path} would both write {output / name}; rename one of them.")
        seen[name] = path
        folder = output / name
        cases.append(Case(name, path, folder / f"{name}.nii.gz" if multilabel else folder))
    if not cases:
        raise InputError(f"{source} lists no images; put one image path per line.")
    return cases


def _listed_inputs(list_file: Path) -> list[Path]:
    inputs = []
    for line in list_file.read_text().splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            path = Path(entry).expanduser()
            inputs.append(path if path.is_absolute() else list_file.parent / path)
    return inputs


def expected_outputs(case: Case, request: TaskRequest, options: OutputOptions) -> list[Path]:
    """The files a finished case has (statistics.json and the preview count too when asked for)."""
    task = request.task
    if options.multilabel:
        files, folder = [case.output], case.output.parent
    else:
        names = output_label_map(task.name, task.classes, v1_order=request.v1_order, roi_subset=request.roi_subset)
        files, folder = [case.output / f"{name}.nii.gz" for name in names.values()], case.output
        if options.derived_masks and any(step.step == "derived_masks" for step in task.postprocess):
            files += [case.output / "body.nii.gz", case.output / "skin.nii.gz"]
    if options.statistics:
        files.append(folder / "statistics.json")
    if options.preview:
        files.append(folder / f"preview_{task.name}.png")
    return files


def run_cohort(
    cases: list[Case],
    request: TaskRequest,
    runner: ModelRunner,
    options: OutputOptions,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> CohortSummary:
    """Segment every case not finished yet; a case that fails is logged and the next one runs."""
    summary = CohortSummary()
    started = time.perf_counter()
    runner.progress = False  # one bar over cases, not one per model call
    with _CaseProgress(len(cases), progress) as advance:
        for case in cases:
            advance(case.name)
            if not overwrite and all(path.exists() for path in expected_outputs(case, request, options)):
                summary.skipped.append(case.name)
                continue
            try:
                segment_source(read_source(case.input), request, runner, case.output, options)
            except TsrtError as err:
                summary.failed.append((case.name, str(err)))
                log.error("%s failed: %s", case.name, err)
                continue
            except Exception as err:  # noqa: BLE001 - one broken case must not stop a cohort
                summary.failed.append((case.name, f"{type(err).__name__}: {err}"))
                log.error(
                    "%s failed: %s: %s", case.name, type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG)
                )
                continue
            summary.done.append(case.name)
    summary.seconds = time.perf_counter() - started
    return summary


class _CaseProgress:
    """A rich bar over the cohort's cases (nothing when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self._progress = None
        self._task = None

    def __enter__(self):
        if not self.enabled:
            return lambda name: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("cases"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(),
        )
        self._progress.start()
        self._task = self._progress.add_task("", total=self.total)
        first = [True]

        def advance(name: str) -> None:
            if not first[0]:
                self._progress.advance(self._task)
            first[0] = False
            self._progress.update(self._task, description=name)

        return advance

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self.total, description="")
            self._progress.stop()


def segment_cohort(cases: list[Case], *, overwrite: bool = False, **options) -> CohortSummary:
    """`tsrt.segment`'s keyword options (task, fast, ml, ...) applied to every case; models load once."""
    from tsrt.totalseg import prepare_run

    request, runner, output_options = prepare_run(**options)
    return run_cohort(
        cases, request, runner, output_options, overwrite=overwrite, progress=not options.get("quiet", False)
    )
