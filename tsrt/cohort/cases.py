"""Cohorts: one job over many cases, resumable, one failing case never stops the rest.

INPUT is a cohort when it is a `.txt` file (one image path per line, relative to the file's folder;
blank lines and `#` comments ignored), a `.csv` file (a `path` column, optionally a `case` column
naming each case; without a header the first column), a folder holding NIfTI files (every *.nii /
*.nii.gz in it) or a glob such as `scans/*/ct.nii.gz`. A folder of DICOM slices stays one case.
Each case gets its own output folder, OUTPUT/<case>/, with the masks (or `<case>.nii.gz` with --ml
or --model), statistics.json and the preview, so side files of different cases never collide.

A case's folder appears only when the case is complete: it is written as OUTPUT/.tsrt-partial.<case>/
and renamed, so a run stopped or killed mid-case leaves no partial output. The run manifest
(tsrt.outputs.manifest) is written into it last. A rerun skips a case only when that manifest matches
the new request (tsrt version, task or model, options, graph checksums) and the input's bytes, and
every output it lists is still there ("matched"); a case whose manifest differs ("changed") or is
absent ("missing": never run, interrupted, or made by an older tsrt) is segmented again, or with
`overwrite_changed=False` reported as "stale" and left as it is. `overwrite` redoes matched cases too.
Models are opened once per process (here, or per Ray worker with tsrt.cohort.ray) and reused for every case.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tsrt.progress import progress
from tsrt.errors import InputError, TsrtError
from tsrt.outputs.manifest import (
    MATCHED, InputRecord, ManifestCheck, RunFacts, RunRecorder, RunRequest, check_manifest, input_sha256,
    manifest_path, peak_memory_mb, reset_peak_memory,
)
from tsrt.totalseg.options import SegmentOptions
from tsrt.totalseg.outputs import OutputOptions
from tsrt.totalseg.request import TaskRequest
from tsrt.totalseg.runner import ModelRunner, output_label_map
from tsrt.totalseg.source import read_source
from tsrt.totalseg.task import segment_source, source_facts
from tsrt.pipeline.nifti_header import read_list_text
from tsrt.pipeline.write import atomic_output

log = logging.getLogger("tsrt")

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_LIST_SUFFIXES = (".txt", ".csv")
#: Header names of the CSV column holding the image paths, and of the optional one naming the cases.
_PATH_COLUMNS = ("path", "image", "input", "file")
_NAME_COLUMNS = ("case", "name", "id")
#: Case folders are written under this prefix and renamed when complete.
STAGING_PREFIX = ".tsrt-partial."
SUMMARY_FILE = "cohort_summary.json"


@dataclass(frozen=True)
class Case:
    name: str
    input: Path
    output: Path  # the mask folder, or the label file (--ml, --model)

    @property
    def folder(self) -> Path:
        """OUTPUT/<case>: everything the case writes, published as a whole."""
        return self.output if self.output.name == self.name else self.output.parent

    @property
    def manifest(self) -> Path:
        """The case's run manifest: OUTPUT/<case>/tsrt_manifest.json (masks), or <case>.tsrt.json (a label file)."""
        return manifest_path(self.output, folder=self.output == self.folder)


@dataclass
class CaseRecord:
    """One case's line in the run summary."""

    name: str
    status: str  # "done", "skipped" (its manifest matched), "stale" (changed, kept: overwrite_changed off) or "failed"
    seconds: float = 0.0
    peak_memory_mb: float | None = None  # peak resident memory of the process while it ran the case
    worker: str = ""  # host:pid that ran it
    node: str = ""  # Ray node id (cluster runs)
    attempts: int = 0  # > 1 when a worker died under it and it was retried
    reason: str = ""  # why it failed
    manifest: str = ""  # the earlier result's manifest against this request: matched, changed or missing
    changes: str = ""  # what changed (or why the manifest is missing)


@dataclass
class CohortSummary:
    records: list[CaseRecord] = field(default_factory=list)
    seconds: float = 0.0
    verb: str = "segmented"  # what was done to each finished case
    workers: int = 1
    startup_seconds: float = 0.0  # Ray runs: joining/starting Ray and opening the models in every worker
    request: RunRequest | None = None  # what every case was asked for (once; each case's manifest repeats it)

    def _names(self, status: str) -> list[str]:
        return [record.name for record in self.records if record.status == status]

    @property
    def done(self) -> list[str]:
        return self._names("done")

    @property
    def skipped(self) -> list[str]:
        return self._names("skipped")  # already finished

    @property
    def stale(self) -> list[str]:
        return self._names("stale")  # made by another request, kept (overwrite_changed off)

    @property
    def failed(self) -> list[tuple[str, str]]:
        return [(record.name, record.reason) for record in self.records if record.status == "failed"]

    def line(self) -> str:
        stale = f"{len(self.stale)} stale (kept; rerun without --no-overwrite-changed to redo), " if self.stale else ""
        text = (
            f"{len(self.done)} {self.verb}, {len(self.skipped)} already done, {stale}{len(self.failed)} failed "
            f"({self.seconds:.0f}s)"
        )
        if self.failed:
            text += ": " + "; ".join(f"{name} ({reason})" for name, reason in self.failed)
        return text

    def to_json(self) -> dict[str, Any]:
        minutes = self.seconds / 60
        return {
            "done": len(self.done), "skipped": len(self.skipped), "stale": len(self.stale), "failed": len(self.failed),
            "seconds": round(self.seconds, 3), "startup_seconds": round(self.startup_seconds, 3),
            "workers": self.workers,
            "cases_per_minute": round(len(self.done) / minutes, 3) if minutes > 0 and self.done else None,
            "request": None if self.request is None else self.request.to_json(),
            "cases": [asdict(record) for record in self.records],
        }

    def write(self, folder: Path) -> Path:
        """The summary as OUTPUT/cohort_summary.json (replaced atomically on every run)."""
        path = Path(folder) / SUMMARY_FILE
        with atomic_output(path) as temp:
            temp.write_text(json.dumps(self.to_json(), indent=2))
        return path


# --------------------------------------------------------------------------------------------- finding cases


def case_name(path: Path) -> str:
    name = path.name
    for suffix in (*_NIFTI_SUFFIXES, ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def find_cases(source: Path | str, output: Path, multilabel: bool) -> list[Case] | None:
    """The cohort's cases, or None when `source` is a single image (file, DICOM folder or zip)."""
    pattern = str(source)
    source = Path(source)
    if source.is_file() and source.suffix.lower() in _LIST_SUFFIXES:
        entries = _listed_inputs(source)
    elif source.is_dir():
        entries = [
            (path, None)
            for path in sorted(source.iterdir())
            if path.is_file() and path.name.lower().endswith(_NIFTI_SUFFIXES)
        ]
        if not entries:
            return None  # a DICOM folder: one case
    elif not source.exists() and _is_glob(pattern):
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise InputError(f"{pattern} matches no files; check the pattern (quote it so the shell leaves it alone).")
        entries = [(Path(match), None) for match in matches]
    else:
        return None
    cases, seen = [], {}
    for path, given_name in entries:
        name = given_name or case_name(path)
        if not name or "/" in name or os.sep in name or name.startswith("."):
            raise InputError(f"Case name {name!r} ({path}) cannot be a folder name; drop the / or the leading dot.")
        if name in seen:
            raise InputError(f"Cases {seen[name]} and {path} would both write {output / name}; rename one of them.")
        seen[name] = path
        folder = output / name
        cases.append(Case(name, path, folder / f"{name}.nii.gz" if multilabel else folder))
    if not cases:
        raise InputError(f"{source} lists no images; put one image path per line.")
    return cases


def _listed_inputs(list_file: Path) -> list[tuple[Path, str | None]]:
    """(image path, case name or None) per entry of a .txt or .csv list, relative to the list's folder."""
    text = read_list_text(list_file)  # by content: a NIfTI or gzip named .txt/.csv is refused in one line
    if list_file.suffix.lower() == ".csv":
        rows = [row for row in csv.reader(text.splitlines()) if any(cell.strip() for cell in row)]
    else:
        rows = [[line] for line in text.splitlines()]
    rows = [[cell.strip() for cell in row] for row in rows]
    rows = [row for row in rows if row and row[0] and not row[0].startswith("#")]
    path_column, name_column = 0, None
    header = [cell.lower() for cell in rows[0]] if rows and list_file.suffix.lower() == ".csv" else []
    known = [name for name in _PATH_COLUMNS if name in header]
    if known:
        path_column = header.index(known[0])
        name_column = next((header.index(name) for name in _NAME_COLUMNS if name in header), None)
        rows = rows[1:]
    entries = []
    for row in rows:
        if path_column >= len(row) or not row[path_column]:
            raise InputError(f"{list_file} has a row without an image path: {','.join(row)}")
        path = Path(row[path_column]).expanduser()
        name = row[name_column] if name_column is not None and name_column < len(row) and row[name_column] else None
        entries.append((path if path.is_absolute() else list_file.parent / path, name))
    return entries


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
    if options.radiomics:
        files.append(folder / "statistics_radiomics.json")
    return files


# --------------------------------------------------------------------------------------------- segmenting cases


class Segmenter(Protocol):
    """What a cohort runs on each case, with its models opened once (tasks here, exported models in tsrt.api)."""

    request: RunRequest  # what each case's manifest records, and what a rerun compares

    def expected_outputs(self, case: Case) -> list[Path]: ...

    def warm_up(self) -> None:
        """Open every model now, so a worker that cannot fails at its start rather than on each case."""

    def read(self, case: Case) -> Any: ...

    def segment(self, loaded: Any, output: Path) -> RunFacts:
        """Segment what `read` returned and write the case's outputs to `output` (case.output's place)."""


class CohortJob(Protocol):
    """A picklable description of the work, so that every Ray worker can open its own Segmenter."""

    provider: str
    device: str | None

    def open(self, threads: int | None = None) -> Segmenter: ...


@dataclass
class TaskSegmenter:
    task: TaskRequest
    runner: ModelRunner
    options: OutputOptions
    request: RunRequest

    def expected_outputs(self, case: Case) -> list[Path]:
        return expected_outputs(case, self.task, self.options)

    def warm_up(self) -> None:
        from tsrt.totalseg.request import models_to_run

        for part in models_to_run(self.task)[0]:
            self.runner.model(part)

    def read(self, case: Case) -> Any:
        return read_source(case.input)

    def segment(self, loaded: Any, output: Path) -> RunFacts:
        segment_source(loaded, self.task, self.runner, output, self.options)
        return source_facts(loaded, self.runner)


@dataclass(frozen=True)
class TaskJob:
    """A TotalSegmentator task request, run on every case of a cohort."""

    options: SegmentOptions

    @property
    def provider(self) -> str:
        return self.options.provider

    @property
    def device(self) -> str | None:
        return self.options.device

    def open(self, threads: int | None = None) -> TaskSegmenter:
        from tsrt.totalseg.task import prepare_run, task_run_request

        options = self.options if threads is None else self.options.replace(threads=threads)
        request, runner, output_options = prepare_run(options)
        runner.progress = False  # one bar over cases, not one per model call
        return TaskSegmenter(request, runner, output_options, task_run_request(options, request))


class TurnLock:
    """A lock taken in the order turns were handed out: two cases in flight are segmented in queue order.

    With a plain lock the second case's thread could take it first while the loop waits for the first
    case, and the overlap of reading with segmenting would be lost. A turn whose case fails before it
    segments is skipped, so no later case waits for it.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next = 0
        self._serving = 0
        self._skipped: set[int] = set()

    def take_turn(self) -> int:
        with self._changed:
            turn, self._next = self._next, self._next + 1
            return turn

    @contextmanager
    def held(self, turn: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._serving == turn)
        try:
            yield
        finally:
            with self._changed:
                self._advance()

    def skip(self, turn: int) -> None:
        with self._changed:
            if turn == self._serving:
                self._advance()
            else:
                self._skipped.add(turn)

    def _advance(self) -> None:
        self._serving += 1
        while self._serving in self._skipped:
            self._skipped.discard(self._serving)
            self._serving += 1
        self._changed.notify_all()


class CaseWorker:
    """Segments cases one at a time with one Segmenter; callable from two threads, so that reading
    the next case overlaps this one's inference (what a Ray worker does)."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter
        self._compute = TurnLock()

    def take_turn(self) -> int:
        """Reserve the next place in the segmenting order (the loop does, in the order it queues cases)."""
        return self._compute.take_turn()

    def check(self, case: Case) -> ManifestCheck:
        """The case's earlier result against this worker's request (matched means: keep it)."""
        return check_manifest(
            case.manifest, self.segmenter.request, case.input, self.segmenter.expected_outputs(case)
        )

    def segment(self, case: Case, measured: dict[str, Any] | None = None, turn: int | None = None) -> None:
        """Read, then segment in turn under the lock and write the manifest last; `measured` gets the lock
        wait and the peak memory under it (the manifest's peak too)."""
        turn = self.take_turn() if turn is None else turn
        recorder = RunRecorder(restart_memory=False)  # two cases share the process: the peak restarts under the lock
        try:
            loaded = self.segmenter.read(case)
            digest = input_sha256(case.input)
        except BaseException:
            self._compute.skip(turn)
            raise
        queued = time.perf_counter()
        with self._compute.held(turn):
            if measured is not None:
                measured["waited"] = time.perf_counter() - queued
            reset_peak_memory()
            manifest = None
            try:
                with staged_case(case) as output:
                    facts = self.segmenter.segment(loaded, output)
                    staging = staging_folder(case)
                    written = [path for path in staging.rglob("*") if path.is_file()]
                    manifest = recorder.write(
                        staging / case.manifest.relative_to(case.folder), self.segmenter.request,
                        InputRecord.of(case.input, facts.image, digest), facts, written,
                    )
            finally:
                if measured is not None:  # the summary's peak is the manifest's
                    measured["peak"] = peak_memory_mb() if manifest is None else manifest.peak_memory_mb

    def run(self, case: Case, turn: int | None = None) -> CaseRecord:
        """run_case for a worker two threads share: the seconds and peak memory of this case, not of the other."""
        measured: dict[str, Any] = {}
        record = run_case(case, lambda each: self.segment(each, measured, turn), measure_memory=False)
        record.seconds -= measured.get("waited", 0.0)
        record.peak_memory_mb = measured.get("peak")
        return record


def staging_folder(case: Case) -> Path:
    return case.folder.parent / f"{STAGING_PREFIX}{case.folder.name}"


def discard_staging(case: Case) -> None:
    """Remove what an interrupted attempt at `case` left (its staging folder, a half-replaced old folder)."""
    staging = staging_folder(case)
    for leftover in (staging, staging.with_name(staging.name + ".old")):
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def staged_case(case: Case) -> Iterator[Path]:
    """Yield where to write case.output, inside OUTPUT/.tsrt-partial.<case>/; publish the folder when done."""
    staging = staging_folder(case)
    discard_staging(case)  # a worker killed mid-case left it; it is this attempt's now
    staging.mkdir(parents=True)
    try:
        yield staging / case.output.relative_to(case.folder)
        if case.folder.exists():  # --overwrite, or a folder from an older run: swap it out, then drop it
            old = staging.with_name(staging.name + ".old")
            os.replace(case.folder, old)
            os.replace(staging, case.folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, case.folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------- running cases


def failure_reason(err: BaseException) -> str:
    return str(err) if isinstance(err, TsrtError) else f"{type(err).__name__}: {err}"


def run_case(case: Case, work: Callable[[Case], object], *, measure_memory: bool = True) -> CaseRecord:
    """Run `work` on one case, timed and with its peak memory; any exception becomes a failed record."""
    record = CaseRecord(case.name, "done", worker=f"{socket.gethostname()}:{os.getpid()}", attempts=1)
    started = time.perf_counter()
    if measure_memory:
        reset_peak_memory()
    try:
        work(case)
    except Exception as err:  # noqa: BLE001 - one broken case must not stop a cohort
        record.status, record.reason = "failed", failure_reason(err)
        log.error("%s failed: %s", case.name, record.reason, exc_info=log.isEnabledFor(logging.DEBUG))
    record.seconds = time.perf_counter() - started
    if measure_memory:
        record.peak_memory_mb = peak_memory_mb()
    return record


def for_each_case(
    cases: list[Case],
    work: Callable[[Case], object],
    finished: Callable[[Case], bool],
    *,
    overwrite: bool = False,
    progress: bool = True,
    verb: str = "segmented",
    on_case: Callable[[CaseRecord], None] | None = None,
) -> CohortSummary:
    """Run `work` on every case not `finished` yet (all of them with `overwrite`); failures are collected."""
    summary = CohortSummary(verb=verb)
    started = time.perf_counter()
    with case_progress(len(cases), progress) as advance:
        for case in cases:
            if not overwrite and finished(case):
                record = CaseRecord(case.name, "skipped")
            else:
                record = run_case(case, work)
            summary.records.append(record)
            advance(record)
            if on_case is not None:
                on_case(record)
    summary.seconds = time.perf_counter() - started
    return summary


@contextmanager
def case_progress(total: int, enabled: bool) -> Iterator[Callable[[CaseRecord], None]]:
    """A bar over the cohort's cases, advanced (with the case's name and status) as cases finish."""
    with progress("cases", total, enabled=enabled) as advance:
        yield lambda record: advance(1, f"{record.name} {record.status}")


def triage(
    case: Case, worker: CaseWorker, *, overwrite: bool, overwrite_changed: bool
) -> tuple[ManifestCheck, CaseRecord | None]:
    """The case's manifest state, and its record when it is not to be run: skipped (matched) or stale
    (changed or missing over an existing folder, with `overwrite_changed` off). None: run it."""
    check = worker.check(case)
    record = None
    if check.state == MATCHED and not overwrite:
        record = CaseRecord(case.name, "skipped")
    elif check.state != MATCHED and not overwrite_changed and case.folder.exists():
        record = CaseRecord(case.name, "stale")
        log.info("%s is stale (%s): kept, as --no-overwrite-changed asks.", case.name, check.reason)
    return check, None if record is None else noted(record, check)


def noted(record: CaseRecord, check: ManifestCheck) -> CaseRecord:
    """`record` with the manifest state its case had before this run."""
    record.manifest, record.changes = check.state, check.reason
    return record


def check_cohort_options(overwrite: bool, overwrite_changed: bool) -> None:
    """The two rerun flags contradict each other; refuse before any case runs."""
    if overwrite and not overwrite_changed:
        raise TsrtError("--overwrite redoes every case and --no-overwrite-changed keeps changed ones: choose one.")


def run_here(
    cases: list[Case],
    worker: CaseWorker,
    *,
    overwrite: bool = False,
    overwrite_changed: bool = True,
    progress: bool = True,
    on_case: Callable[[CaseRecord], None] | None = None,
) -> CohortSummary:
    """Every case whose manifest does not match, on this machine, two in flight: the next case is read
    (decompressed, decoded) while the current one is segmented; CaseWorker's lock keeps one inference at a time."""
    check_cohort_options(overwrite, overwrite_changed)
    summary = CohortSummary(request=worker.segmenter.request)
    started = time.perf_counter()

    def report(record: CaseRecord) -> None:
        summary.records.append(record)
        advance(record)
        if on_case is not None:
            on_case(record)

    def run(case: Case, check: ManifestCheck, turn: int) -> CaseRecord:
        return noted(worker.run(case, turn), check)

    with case_progress(len(cases), progress) as advance, ThreadPoolExecutor(2, thread_name_prefix="tsrt-case") as pool:
        in_flight: deque[Future[CaseRecord]] = deque()
        for case in cases:
            check, kept = triage(case, worker, overwrite=overwrite, overwrite_changed=overwrite_changed)
            if kept is not None:
                report(kept)
                continue
            in_flight.append(pool.submit(run, case, check, worker.take_turn()))
            if len(in_flight) == 2:
                report(in_flight.popleft().result())
        while in_flight:
            report(in_flight.popleft().result())
    order = {case.name: index for index, case in enumerate(cases)}
    summary.records.sort(key=lambda record: order[record.name])
    summary.seconds = time.perf_counter() - started
    return summary


def run_cohort(
    cases: list[Case],
    request: TaskRequest,
    runner: ModelRunner,
    options: OutputOptions,
    run_request: RunRequest,
    *,
    overwrite: bool = False,
    overwrite_changed: bool = True,
    progress: bool = True,
) -> CohortSummary:
    """Segment every case whose manifest does not match `run_request` with an open runner; a case that
    fails is logged and the next one runs."""
    runner.progress = False  # one bar over cases, not one per model call
    return run_here(
        cases, CaseWorker(TaskSegmenter(request, runner, options, run_request)), overwrite=overwrite,
        overwrite_changed=overwrite_changed, progress=progress,
    )
