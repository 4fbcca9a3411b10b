"""Cases per minute for a cohort on Ray (embedded local Ray) with 1 vs 2 workers, and the single-process path.

Writes `--cases` phantoms (tsrt.demo.phantom, `--shape` voxels at 3 mm) as NIfTI and segments them with
the bundled demo model: once without Ray (one process, ONNX Runtime on every core), then with
`--ray` for each worker count (1 CPU and 1 ONNX Runtime thread per worker). Every run starts from an
empty output folder; its wall time includes starting Ray and opening the model in each worker.
All runs must give the same masks. Also records the load average, since machines are shared.
Needs the cluster extra (pip install 'tsrt[cluster]').

    python benchmarks/ray_cohort.py --cases 12 --workers 1 2 --json results/ray_cohort.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from tsrt.api import ModelJob
from tsrt.cohort.cases import find_cases
from tsrt.cohort.run import run_job
from tsrt.demo.run import demo_model_dir
from tsrt.demo.phantom import make_phantom


def write_cohort(folder: Path, count: int, shape: tuple[int, int, int]) -> Path:
    cases = folder / "cases"
    cases.mkdir(parents=True)
    for index in range(count):
        phantom = make_phantom(shape=shape, spacing=(3.0, 3.0, 3.0), seed=index, vary=True)
        nib.save(nib.Nifti1Image(phantom.image, phantom.affine), cases / f"case{index:03d}.nii.gz")
    return cases


def run(cases: Path, out: Path, ray: str | None, workers: int | None) -> dict:
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    summary = run_job(
        find_cases(cases, out, multilabel=True), ModelJob(demo_model_dir(), provider="cpu"), ray=ray, workers=workers,
        progress=False,
    )
    wall = time.perf_counter() - started
    if summary.failed:
        raise SystemExit(f"cases failed: {summary.failed}")
    case_seconds = [record.seconds for record in summary.records]
    return {
        "mode": "single process" if ray is None else f"ray, {summary.workers} worker(s)",
        "workers": summary.workers, "cases": len(summary.done), "wall_s": round(wall, 2),
        "cases_per_minute": round(len(summary.done) / wall * 60, 2),
        "startup_s": round(summary.startup_seconds, 2),
        "cases_per_minute_after_startup": round(len(summary.done) / (wall - summary.startup_seconds) * 60, 2),
        "median_case_s": round(statistics.median(case_seconds), 2),
        "max_peak_rss_mb": round(max(record.peak_memory_mb or 0 for record in summary.records)),
        "load_avg_1min_before": round(load_before, 2), "load_avg_1min_after": round(os.getloadavg()[0], 2),
    }


def same_masks(first: Path, second: Path) -> bool:
    for path in sorted(first.glob("*/*.nii.gz")):
        other = second / path.relative_to(first)
        if not np.array_equal(np.asanyarray(nib.load(path).dataobj), np.asanyarray(nib.load(other).dataobj)):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 80), help="phantom voxels (3 mm)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-single", action="store_true", help="skip the single-process run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="tsrt-ray-bench-") as temp:
        folder = Path(temp)
        cases = write_cohort(folder, args.cases, tuple(args.shape))
        runs = [] if args.no_single else [(None, None)]
        runs += [("local", count) for count in args.workers]
        results, outputs = [], []
        for ray, workers in runs:
            out = folder / f"out_{ray}_{workers}"
            results.append(run(cases, out, ray, workers))
            outputs.append(out)
            print(json.dumps(results[-1]), flush=True)
        agree = all(same_masks(outputs[0], other) for other in outputs[1:])
    report = {
        "cases": args.cases, "shape": list(args.shape), "cpu_count": os.cpu_count(), "same_masks": agree,
        "runs": results,
    }
    print(f"\n{args.cases} phantoms {tuple(args.shape)} @ 3 mm, demo model, {os.cpu_count()} cores (shared machine)")
    for result in results:
        print(
            f"  {result['mode']:<20} {result['cases_per_minute']:6.1f} cases/min (after start-up "
            f"{result['cases_per_minute_after_startup']:6.1f})  wall {result['wall_s']:6.1f} s  start-up "
            f"{result['startup_s']:5.1f} s  median case {result['median_case_s']:5.1f} s  "
            f"load {result['load_avg_1min_before']:.1f}"
        )
    print(f"  masks identical across runs: {agree}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
