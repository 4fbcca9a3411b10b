"""Backends side by side on the same inputs and weights: official TotalSegmentator, nnUNetPredictor, tsrt.

    python benchmarks/backends.py --quick          # < 10 min on 2 cores: --fast on example_ct
    python benchmarks/backends.py                  # the full run (README's Performance table)

Every run is a child process (benchmarks/backend_child.py), so wall time includes start-up and
peak RSS is that run's alone (the process tree's resident memory, sampled, and the child's VmHWM).
Backends alternate A B C A B C ... after a warm-up round; medians are reported.

This script composes the others, each runnable alone: workloads.py (inputs, weights, backends; the
cached set-up), speed.py (timed runs of one backend), memory.py (the process-tree sampler),
accuracy.py (agreement and Dice; confident weights; the demo model's reduced precision),
cold_start.py (`--help` times, empty-cache run, installed sizes) and report.py (JSON, tables, plot).

Weights: TotalSegmentator-sized networks (6 stages, 32..320 features, 128^3 patches, the real class
counts) with seeded random weights in TotalSegmentator's layout (tsrt_export.fixtures), imported
into a tsrt store with the same export `tsrt models import` runs. Random weights put near-tied
logits everywhere, so float noise alone caps agreement between backends (~99.8 %); the accuracy
section therefore also runs "confident" weights (the trained demo model's backbone, its own
architecture at 128^3 patches), and the demo model itself for reduced precision vs fp32.

Groups: `totalseg` rows compare tsrt's task path (every provider present) with official
TotalSegmentator (ratio = official wall / backend wall); `nnunet` rows compare `tsrt segment
--model` with nnU-Net's nnUNetPredictor on the same single model (its --fast model).

On a CPU without native bf16, OpenVINO emulates it (several times slower than fp32), so
openvino-bf16 then runs only on ct_fast and the demo model.

Outputs (--out, default benchmarks/results): NAME.json (everything), NAME.md (tables), NAME.png.
Set-up (fixture weights, exports, phantom) is cached in --work and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from accuracy import RANDOM_WEIGHTS_FLOOR, compare_outputs, confident_accuracy, demo_precision
from cold_start import cold_start, installed_sizes
from report import Report, machine, markdown, save
from speed import measure_workload
from workloads import (
    DEFAULT_WORK, DEFAULT_WORKLOADS, REPO, WORKLOADS, backends_for, prepare_input, store_models, tasks_for,
    tsrt_providers,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="ct_fast only, 1 timed run, no nnUNetPredictor/confident/cold-start extras (< 10 min)")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS))
    parser.add_argument("--providers", nargs="+", help="tsrt providers to run (default: every one present)")
    parser.add_argument("--runs", type=int, help="timed runs per backend (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 1, quick 0)")
    parser.add_argument("--small", action="store_true",
                        help="tiny 4-stage nets on 48^3 patches instead of TotalSegmentator-sized ones (smoke tests)")
    parser.add_argument("--no-nnunet", action="store_true", help="skip the nnUNetPredictor comparison")
    parser.add_argument("--no-extras", action="store_true", help="skip confident weights, demo, cold start, sizes")
    parser.add_argument("--work", type=Path, help="cache for weights, exports and outputs (default ~/.cache/tsrt-bench)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", help="output file stem (default: quick or full)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the workloads (and cold start) already in OUT/NAME.json and measure only the rest")
    args = parser.parse_args(argv)

    quick = args.quick
    names = args.workloads or (["ct_fast"] if quick else list(DEFAULT_WORKLOADS))
    workloads = [WORKLOADS[name] for name in names]
    runs = args.runs or (1 if quick else 3)
    warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    work = args.work or DEFAULT_WORK
    work.mkdir(parents=True, exist_ok=True)
    providers = tsrt_providers(args.providers)
    stem = args.name or ("quick" if quick else "full")
    started = time.perf_counter()
    report: Report = {"command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)
                                                         if Path(sys.argv[0]).is_absolute() else sys.argv[0]),
                                                        *(argv if argv is not None else sys.argv[1:])]),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "runs": runs, "warmup": warmup,
                    "providers": providers, "network": ("4 stages, 4..32 features, 48^3 patch" if args.small else
                                "6 stages, 32..320 features, 128^3 patch") + ", seeded random weights",
                    "random_weights_floor": RANDOM_WEIGHTS_FLOOR, "workloads": {}, "accuracy_random_weights": {},
                    "failures": {}}
    previous = args.out / f"{stem}.json"
    if args.resume and previous.exists():  # an interrupted run: keep what it measured
        kept = json.loads(previous.read_text())
        for key in ("workloads", "accuracy_random_weights", "failures", "runs_capped", "cold_start"):
            if key in kept:
                report[key] = kept[key]
        report["resumed_from"] = kept.get("date")
        print(f"resuming {previous}: {', '.join(kept['workloads'])} kept", flush=True)
    homes = store_models(work, "random", tasks_for(workloads, with_nnunet=not args.no_nnunet), small=args.small)
    if not (quick or args.no_extras or "cold_start" in report):
        report["cold_start"] = cold_start(homes, work, prepare_input(work, WORKLOADS["ct_fast"]))
    for workload in workloads:
        if workload.name in report["workloads"]:
            continue
        image = prepare_input(work, workload)
        rows = backends_for(workload, providers, with_nnunet=not (args.no_nnunet or quick))
        capped = workload.max_runs is not None and runs > workload.max_runs
        workload_runs, workload_warmup = (workload.max_runs, 0) if capped else (runs, warmup)
        measured = measure_workload(workload, rows, image, homes, work, workload_runs, workload_warmup,
                                    report["failures"])
        report["workloads"][workload.name] = measured
        if capped:
            report.setdefault("runs_capped", {})[workload.name] = workload_runs
        ran = [row for row in rows if row.label in measured]
        report["accuracy_random_weights"][workload.name] = compare_outputs(workload, ran, work)
        save(report, args.out, stem, started)  # partial results survive an interrupted run
    if not (quick or args.no_extras):
        accuracy_workloads = [w for w in workloads if w.input.endswith(".nii.gz")]  # the shared CTs, not the phantom
        report["accuracy_confident"] = confident_accuracy(accuracy_workloads, providers, work, args.small)
        report["demo_precision"] = demo_precision(providers, work, runs, warmup)
        report["installed_mb"] = installed_sizes()
    elif quick:
        report["demo_precision"] = demo_precision(providers, work, runs, warmup)
    save(report, args.out, stem, started)
    print(markdown(report))
    print(f"wrote {args.out / stem}.json/.md/.png in {report['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
