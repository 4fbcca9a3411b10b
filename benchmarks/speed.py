"""Wall time, time per stage and tiles per second of one backend on one workload, each run in a fresh process.

    python benchmarks/speed.py ct_fast                                  # tsrt cpu, 3 runs after 1 warm-up
    python benchmarks/speed.py ct_fast --backend official --runs 1 --warmup 0
    python benchmarks/speed.py ct_sm_fast --small --provider openvino   # tiny nets, seconds not minutes
    python benchmarks/speed.py ct_fast --provider cpu --precision int8   # quantizes the net first (cached)
    python benchmarks/speed.py phantom_fast --low-memory --runs 1 --warmup 0

Every run is a child process (backend_child.py), so wall time includes start-up and peak memory is that
run's alone (memory.py's process-tree sampler and the child's own VmHWM). The child charges its time
to stages by wrapping the pipelines' functions; what it cannot see (interpreter start, imports before
its clock) is added to `startup`. Medians over the timed runs are reported, as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from memory import TreeMemory
from workloads import (
    GROUPS, WORKLOADS, Backend, Homes, Workload, add_setup_arguments, child_env, install_int8, job_for, output_path,
    prepare_input, store_models, tasks_for,
)

CHILD = Path(__file__).resolve().parent / "backend_child.py"
STAGES = ("startup", "load models", "read", "preprocess", "inference", "postprocess", "write")


def run_child(job: dict[str, Any], work: Path, env: dict[str, str]) -> dict[str, Any]:
    """One segmentation in a fresh process; wall time from spawn to exit, its log in work/logs."""
    job_file = work / "jobs" / f"{job['label']}.json"
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps(job))
    output = Path(job["output"])
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    output.parent.mkdir(parents=True, exist_ok=True)
    log = work / "logs" / f"{job['label']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(CHILD), str(job_file)], stdout=subprocess.PIPE,
                                   stderr=stderr, env=env, text=True, cwd=work)
        memory = TreeMemory(process.pid)
        stdout, _ = process.communicate()
        memory.stop()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{job['label']} failed (exit {process.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    asked = (job.get("provider"), job.get("precision", "fp32"))
    if "precision" in result and (result["provider"], result["precision"]) != asked:  # tsrt rows: never a silent switch
        raise RuntimeError(f"{job['label']} asked for {' '.join(asked)}, its sessions ran "
                           f"{result['provider']} {result['precision']}")
    stages = result["stages"]
    stages["startup"] = stages.get("startup", 0.0) + max(0.0, wall - result["in_process_s"])
    return {**result, "wall_s": wall, "peak_rss_mb": max(memory.peak_mb, result["vmhwm_mb"]),
            "gpu_peak_mb": memory.gpu_peak_mb}


def run_backend(row: Backend, workload: Workload, image: Path, homes: Homes, work: Path, tag: str,
                label: str) -> dict[str, Any]:
    """One run of a row on a workload, its labels at output_path(..., tag); raises RuntimeError if it fails."""
    job = job_for(row, workload, image, homes, output_path(work, workload, row, tag))
    job["label"] = label
    return run_child(job, work, child_env(homes))


def measure_workload(workload: Workload, rows: list[Backend], image: Path, homes: Homes, work: Path,
                     runs: int, warmup: int, failures: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Alternate the backends round by round (A B C A B C: drift hits all alike); `warmup` rounds not counted.

    A backend whose run fails is reported in `failures` and left out of later rounds; the others go on.
    """
    measured: dict[str, list[dict[str, Any]]] = {row.label: [] for row in rows}
    for round_index in range(warmup + runs):
        for row in rows:
            key = f"{workload.name}: {row.label}"
            if key in failures:
                continue
            label = f"{workload.name}-{row.tag}-r{round_index}"
            try:
                result = run_backend(row, workload, image, homes, work, "last", label)
            except RuntimeError as err:
                failures[key] = str(err).splitlines()[0]
                print(f"  {workload.name:13s} {row.label:28s} FAILED: {failures[key]}", flush=True)
                continue
            kind = "warm-up" if round_index < warmup else "run"
            print(f"  {workload.name:13s} {row.label:28s} {kind:7s} {result['wall_s']:7.1f}s "
                  f"peak {result['peak_rss_mb']:6.0f} MB", flush=True)
            if round_index >= warmup:
                measured[row.label].append(result)
    return {row.label: summarise(row, measured[row.label]) for row in rows if measured[row.label]}


def summarise(row: Backend, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the timed runs (the runs' walls kept too); the share outside session.run for tsrt rows."""

    def median(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    stages = {stage: median([r["stages"].get(stage, 0.0) for r in results]) for stage in STAGES}
    wall = median([r["wall_s"] for r in results])
    inference = stages["inference"]
    network = median([r.get("network_s") for r in results])
    tiles = results[-1]["tiles"]
    return {
        "group": row.group, "backend": row.backend, "provider": row.provider, "precision": row.precision,
        "low_memory": row.low_memory,
        "runs": len(results),
        "wall_s": wall, "wall_all_s": [r["wall_s"] for r in results], "stages_s": stages,
        "network_s": network, "tiles": tiles, "tiles_per_s": tiles / inference if inference else None,
        "peak_rss_mb": median([r["peak_rss_mb"] for r in results]),
        "gpu_peak_mb": median([r.get("gpu_peak_mb") for r in results]),
        # The share of wall time not spent in the network (session.run); tsrt rows only.
        "non_inference_share": (1.0 - network / wall) if network is not None and wall else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--backend", choices=sorted(GROUPS), default="tsrt",
                        help="official TotalSegmentator, nnUNetPredictor, tsrt's task path, or tsrt --model "
                             "(the last two on --fast's model; default %(default)s)")
    parser.add_argument("--provider", default="cpu", help="tsrt's provider (default %(default)s)")
    parser.add_argument("--precision", default="fp32", help="tsrt's precision (default %(default)s; int8 quantizes "
                        "the models first, forced past the gate on random weights)")
    parser.add_argument("--low-memory", action="store_true", help="tsrt with --low-memory (cpu fp32)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    add_setup_arguments(parser)
    args = parser.parse_args(argv)

    workload = WORKLOADS[args.workload]
    reference = args.backend in ("official", "nnunet")
    engine = ("cpu", "fp32") if reference else (args.provider, args.precision)
    row = Backend(GROUPS[args.backend], args.backend, *engine, low_memory=args.low_memory and not reference)
    homes = store_models(args.work, args.weights, tasks_for([workload], with_nnunet=row.group == "nnunet"),
                         small=args.small)
    if row.precision == "int8":
        tasks = {"total_fast"} if row.backend == "tsrt-model" else set(workload.ts_tasks)
        install_int8(args.work, args.weights, homes, tasks, "tensorrt" if row.provider == "tensorrt" else "cpu",
                     small=args.small)
    failures: dict[str, str] = {}
    measured = measure_workload(workload, [row], prepare_input(args.work, workload), homes, args.work, args.runs,
                                args.warmup, failures)
    print(json.dumps({"workload": workload.name, "label": row.label, **measured.get(row.label, {}),
                      "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
