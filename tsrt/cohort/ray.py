"""Cohorts on a Ray cluster: the single-machine cohort code, run by one long-lived Ray actor per worker.

Why actors: each worker process opens the job's ONNX Runtime sessions once (CohortActor.__init__)
and reuses them for every case it is given, and it runs exactly the per-case code of the local
path (tsrt.cohort.cases.CaseWorker + run_case), so masks are the same voxel for voxel. Each actor
declares the CPUs (and a GPU when the job runs on CUDA/TensorRT) it uses, so Ray places one worker
per GPU, and on CPU nodes as many as their cores hold; ONNX Runtime and numba get that many threads.

The driver keeps two cases in flight per worker: the actor runs two threads, so one case is read
while the other is inferred (a lock serialises inference). When a worker dies mid-case (killed,
out of memory, node lost), Ray restarts it and the driver gives its cases to another worker; the
dead attempt's staging folder is removed, so no partial output remains. A case that kills its
worker `max_attempts` times is reported as failed and the run goes on.

    tsrt segment cases/ -o out --model DIR --ray               # start Ray here (all local cores)
    tsrt segment cases.csv -o out --task total --ray HOST:6379   # join a running cluster

Ray is the `cluster` extra and is imported only here, inside the functions.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from tsrt.cohort.cases import (
    Case, CaseRecord, CaseWorker, CohortJob, CohortSummary, case_progress, check_cohort_options, discard_staging,
    failure_reason, noted, triage,
)
from tsrt.errors import TsrtError, require_module
from tsrt.outputs.manifest import ManifestCheck

log = logging.getLogger("tsrt")

#: Cases queued on each worker: one inferring, one being read.
CASES_IN_FLIGHT_PER_WORKER = 2
#: How often a case may take its worker down before it counts as failed.
MAX_ATTEMPTS = 3


def import_ray():
    """Ray, or one line saying which extra installs it."""
    return require_module("ray", "--ray", "cluster", called="Ray")


class CohortActor:
    """One Ray worker process: the job's models, opened once, and the cases the driver sends it."""

    def __init__(self, job: CohortJob, threads: int) -> None:
        import ray

        self.node = ray.get_runtime_context().get_node_id()[:12]
        self.error: str | None = None
        self.worker: CaseWorker | None = None
        try:
            _limit_numba_threads(threads)
            segmenter = job.open(threads=threads)
            segmenter.warm_up()
            self.worker = CaseWorker(segmenter)
        except Exception as err:  # noqa: BLE001 - reported to the driver, which stops the run with it
            self.error = failure_reason(err)

    def ready(self) -> str | None:
        """None when the models are open, else why this worker cannot run cases."""
        return self.error

    def segment(self, case: Case) -> CaseRecord:
        if self.worker is None:
            return CaseRecord(case.name, "failed", attempts=1, node=self.node, reason=self.error or "worker not ready")
        record = self.worker.run(case)
        record.node = self.node
        return record


def _limit_numba_threads(threads: int) -> None:
    import numba

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def connect(ray, address: str) -> bool:
    """Start Ray in this process ("local") or join a cluster ("auto", "host:port"); True if this call started it."""
    if ray.is_initialized():
        return False  # the caller's own ray.init() wins
    options: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING)
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise TsrtError(
            f"Cannot join the Ray cluster at {address} ({str(err).splitlines()[0]}): start it with "
            "`ray start --head`, or give its address as HOST:PORT."
        ) from None
    return True


def gpus_per_worker(job: CohortJob, resources: dict[str, float]) -> int:
    """1 when the job runs on a GPU (asked for, or `auto` on a cluster that has GPUs), else 0."""
    device = job.device or ""
    if job.provider in ("cuda", "tensorrt") or device.startswith("gpu"):
        return 1
    if job.provider == "auto" and device not in ("cpu", "mps") and resources.get("GPU", 0) >= 1:
        return 1
    return 0


def worker_count(resources: dict[str, float], cpus_per_worker: float, gpus: int, cases: int, limit: int | None) -> int:
    """As many workers as the cluster's GPUs (GPU jobs) or CPUs / cpus_per_worker hold, at most one per case."""
    capacity = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 0) // cpus_per_worker)
    if capacity < 1:
        need = f"{gpus} GPU" if gpus else f"{cpus_per_worker:g} CPUs"
        raise TsrtError(
            f"The Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs; "
            f"a worker needs {need}: add nodes or lower --ray-cpus-per-worker."
        )
    return max(1, min(capacity, cases, limit or capacity))


def run_on_ray(
    cases: list[Case],
    job: CohortJob,
    *,
    address: str = "local",
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    overwrite: bool = False,
    overwrite_changed: bool = True,
    progress: bool = True,
    max_attempts: int = MAX_ATTEMPTS,
    on_case: Callable[[CaseRecord], None] | None = None,
) -> CohortSummary:
    """Segment every case whose manifest does not match on Ray workers; the summary lists every case in
    cohort order. The driver checks the manifests (tsrt.cohort.cases.triage) before any worker starts.

    Input and output paths must be the same on every node (a shared filesystem), and so must the
    models (the task's store, or the --model folder).
    """
    ray = import_ray()
    if cpus_per_worker <= 0:
        raise TsrtError(f"--ray-cpus-per-worker must be positive, not {cpus_per_worker:g}.")
    check_cohort_options(overwrite, overwrite_changed)
    started = time.perf_counter()
    driver_side = CaseWorker(job.open())  # the request and expected outputs; validates the options (no models opened)
    records: dict[str, CaseRecord] = {}
    checks: dict[str, ManifestCheck] = {}
    todo = []
    for case in cases:
        checks[case.name], kept = triage(case, driver_side, overwrite=overwrite, overwrite_changed=overwrite_changed)
        if kept is not None:
            records[case.name] = kept
        else:
            todo.append(case)
    summary = CohortSummary(workers=0, request=driver_side.segmenter.request)  # no worker starts when none is to run
    with case_progress(len(cases), progress) as advance:
        for record in records.values():
            advance(record)
        if todo:
            started_here = connect(ray, address)
            try:
                summary.workers, ready = _run_cases(
                    ray, todo, job, workers, cpus_per_worker, max_attempts, records, advance, on_case
                )
                summary.startup_seconds = ready - started
            finally:
                for case in todo:
                    discard_staging(case)
                if started_here:
                    ray.shutdown()
    for case in todo:
        noted(records[case.name], checks[case.name])
    summary.records = [records[case.name] for case in cases]
    summary.seconds = time.perf_counter() - started
    return summary


def _run_cases(
    ray,
    todo: list[Case],
    job: CohortJob,
    workers: int | None,
    cpus_per_worker: float,
    max_attempts: int,
    records: dict[str, CaseRecord],
    advance: Callable[[CaseRecord], None],
    on_case: Callable[[CaseRecord], None] | None,
) -> tuple[int, float]:
    """Start the workers, keep each one busy, retry cases whose worker died; returns the worker count
    and when they were all ready (perf_counter)."""
    from ray.exceptions import RayActorError, RayError

    resources = ray.cluster_resources()
    gpus = gpus_per_worker(job, resources)
    count = worker_count(resources, cpus_per_worker, gpus, len(todo), workers)
    threads = max(1, int(cpus_per_worker))
    actor_class = ray.remote(CohortActor).options(
        num_cpus=cpus_per_worker, num_gpus=gpus, max_restarts=-1, max_task_retries=0,
        max_concurrency=CASES_IN_FLIGHT_PER_WORKER,
    )
    actors = [actor_class.remote(job, threads) for _ in range(count)]
    try:
        try:
            problems = [problem for problem in ray.get([actor.ready.remote() for actor in actors]) if problem]
        except RayError as err:
            raise TsrtError(f"The Ray workers did not start: {str(err).strip().splitlines()[0]}") from None
        if problems:
            raise TsrtError(f"A Ray worker cannot open the models: {problems[0]}")
        ready = time.perf_counter()
        log.info("segmenting %d cases on %d Ray workers", len(todo), count)
        queue: deque[Case] = deque(todo)
        attempts: dict[str, int] = {}
        died_on: dict[str, int] = {}  # case -> the worker it was on when that worker died
        load = [0] * count
        in_flight: dict[Any, tuple[int, Case]] = {}
        while queue or in_flight:
            for index, actor in enumerate(actors):
                while load[index] < CASES_IN_FLIGHT_PER_WORKER:
                    case = _next_case(queue, index, died_on, count)
                    if case is None:
                        break
                    in_flight[actor.segment.remote(case)] = (index, case)
                    load[index] += 1
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            index, case = in_flight.pop(ref)
            load[index] -= 1
            attempts[case.name] = attempts.get(case.name, 0) + 1
            try:
                record = ray.get(ref)
            except (RayActorError, RayError) as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                if attempts[case.name] < max_attempts:
                    log.warning("%s: its Ray worker died (%s); retrying it on another worker", case.name, reason)
                    died_on[case.name] = index
                    queue.appendleft(case)
                    continue
                record = CaseRecord(
                    case.name, "failed",
                    reason=f"its worker died {attempts[case.name]} times ({reason}); does it need more memory?",
                )
            record.attempts = attempts[case.name]
            records[case.name] = record
            advance(record)
            if on_case is not None:
                on_case(record)
    finally:
        for actor in actors:
            ray.kill(actor)
    return count, ready


def _next_case(queue: deque[Case], worker: int, died_on: dict[str, int], workers: int) -> Case | None:
    """The next queued case for `worker`; a retried case goes to another worker than the one that died."""
    for position, case in enumerate(queue):
        if workers == 1 or died_on.get(case.name) != worker:
            del queue[position]
            return case
    return None
