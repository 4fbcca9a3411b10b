"""The local cohort loop: the next case is read while the current one is segmented, outputs stay complete."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from tsrt.cohort.cases import Case, CaseWorker, run_here
from tsrt.outputs.manifest import RunFacts, RunRequest
from tsrt.pipeline.read import Image


class _HandshakeSegmenter:
    """Segmenting case k waits until case k+1's read has begun: only an overlapping loop can finish in time."""

    request = RunRequest("model", "handshake", {}, ())

    def __init__(self, cases: list[Case]) -> None:
        self.names = [case.name for case in cases]
        self.read_started = {name: threading.Event() for name in self.names}
        self.overlapped: list[str] = []

    def expected_outputs(self, case: Case) -> list[Path]:
        return [case.output / "done.txt"]

    def warm_up(self) -> None:
        pass

    def read(self, case: Case) -> str:
        self.read_started[case.name].set()
        return case.name

    def segment(self, loaded: str, output: Path) -> RunFacts:
        index = self.names.index(loaded)
        if index + 1 < len(self.names) and self.read_started[self.names[index + 1]].wait(timeout=30):
            self.overlapped.append(loaded)
        output.mkdir(parents=True, exist_ok=True)
        (output / "done.txt").write_text(loaded)
        return RunFacts(Image(np.zeros((2, 2, 2)), np.eye(4), None, loaded), "cpu", "fp32")


def _cases(tmp_path: Path, count: int) -> list[Case]:
    for i in range(count):
        (tmp_path / f"case{i}.nii.gz").write_bytes(b"case %d" % i)  # hashed for the run manifest
    return [Case(f"case{i}", tmp_path / f"case{i}.nii.gz", tmp_path / "out" / f"case{i}") for i in range(count)]


def test_the_next_case_is_read_while_the_current_one_is_segmented(tmp_path: Path) -> None:
    cases = _cases(tmp_path, 4)
    segmenter = _HandshakeSegmenter(cases)
    summary = run_here(cases, CaseWorker(segmenter), progress=False)
    assert [record.name for record in summary.records] == [case.name for case in cases]
    assert all(record.status == "done" for record in summary.records)
    assert segmenter.overlapped == ["case0", "case1", "case2"]
    assert all((case.output / "done.txt").read_text() == case.name for case in cases)


def test_finished_cases_are_skipped_in_order_and_the_rest_still_overlap(tmp_path: Path) -> None:
    cases = _cases(tmp_path, 3)
    run_here(cases[1:2], CaseWorker(_HandshakeSegmenter(cases[1:2])), progress=False)
    segmenter = _HandshakeSegmenter([cases[0], cases[2]])
    summary = run_here(cases, CaseWorker(segmenter), progress=False)
    assert [(r.name, r.status) for r in summary.records] == [("case0", "done"), ("case1", "skipped"), ("case2", "done")]
    assert segmenter.overlapped == ["case0"]


class _SlowFirstReadSegmenter(_HandshakeSegmenter):
    """The first case reads slowly, so the second case's thread reaches the compute lock first."""

    def __init__(self, cases: list[Case]) -> None:
        super().__init__(cases)
        self.order: list[str] = []

    def read(self, case: Case) -> str:
        if case.name == self.names[0]:
            time.sleep(0.3)
        return super().read(case)

    def segment(self, loaded: str, output: Path) -> RunFacts:
        self.order.append(loaded)
        return super().segment(loaded, output)


def test_cases_are_segmented_in_queue_order_even_when_a_later_read_finishes_first(tmp_path: Path) -> None:
    """A plain lock let the second case segment first and wait for a read the loop had not queued yet."""
    cases = _cases(tmp_path, 3)
    segmenter = _SlowFirstReadSegmenter(cases)
    started = time.perf_counter()
    summary = run_here(cases, CaseWorker(segmenter), progress=False)
    assert segmenter.order == ["case0", "case1", "case2"]
    assert segmenter.overlapped == ["case0", "case1"] and time.perf_counter() - started < 20
    assert all(record.status == "done" for record in summary.records)


class _NoWaitSegmenter(_SlowFirstReadSegmenter):
    def segment(self, loaded: str, output: Path) -> RunFacts:
        self.order.append(loaded)
        output.mkdir(parents=True, exist_ok=True)
        (output / "done.txt").write_text(loaded)
        return RunFacts(Image(np.zeros((2, 2, 2)), np.eye(4), None, loaded), "cpu", "fp32")


def test_a_case_failing_before_its_turn_does_not_block_the_next(tmp_path: Path) -> None:
    cases = _cases(tmp_path, 3)
    cases[1].input.unlink()  # its input hash fails before its turn: the turn must pass on
    segmenter = _NoWaitSegmenter(cases)
    started = time.perf_counter()
    summary = run_here(cases, CaseWorker(segmenter), progress=False)
    assert [record.status for record in summary.records] == ["done", "failed", "done"]
    assert segmenter.order == ["case0", "case2"] and time.perf_counter() - started < 10
