"""Running a cohort job: here (two cases in flight) or on a Ray cluster, chosen per request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tsrt.cohort.cases import Case, CaseRecord, CaseWorker, CohortJob, CohortSummary, TaskJob, run_here
from tsrt.totalseg.options import SegmentOptions


def run_job(
    cases: list[Case],
    job: CohortJob,
    *,
    overwrite: bool = False,
    overwrite_changed: bool = True,
    progress: bool = True,
    ray: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    on_case: Callable[[CaseRecord], None] | None = None,
) -> CohortSummary:
    """Run `job` over the cases here (models opened once), or with `ray` on a Ray cluster (tsrt.cohort.ray).

    A case whose run manifest matches the job is skipped; `overwrite` redoes it anyway, and
    `overwrite_changed=False` keeps (reports as stale) a case that another request made.
    """
    if ray is not None:
        from tsrt.cohort.ray import run_on_ray

        return run_on_ray(
            cases, job, address=ray, workers=workers, cpus_per_worker=cpus_per_worker, overwrite=overwrite,
            overwrite_changed=overwrite_changed, progress=progress, on_case=on_case,
        )
    return run_here(
        cases, CaseWorker(job.open()), overwrite=overwrite, overwrite_changed=overwrite_changed, progress=progress,
        on_case=on_case,
    )


def segment_cohort(
    cases: list[Case],
    *,
    overwrite: bool = False,
    overwrite_changed: bool = True,
    ray: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    **options: Any,
) -> CohortSummary:
    """`tsrt.segment`'s keyword options (task, fast, ml, ...) applied to every case; models open once per process.

    `ray`: None runs here; "local" starts Ray in this process; "auto" or "host:port" joins a running
    cluster (needs `tsrt[cluster]`).
    """
    job = TaskJob(SegmentOptions.from_keywords(**options))
    job.open()  # validates the options and checks the store before any case (models open lazily)
    return run_job(
        cases, job, overwrite=overwrite, overwrite_changed=overwrite_changed, progress=not job.options.quiet, ray=ray,
        workers=workers, cpus_per_worker=cpus_per_worker,
    )
