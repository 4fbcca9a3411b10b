"""Backends side by side on the same inputs and weights: official TotalSegmentator, nnUNetPredictor, tsrt.

    python benchmarks/backends.py --quick                          # --fast on example_ct, every precision row
    python benchmarks/backends.py --quick --workloads ct_sm_fast   # the same on a 30-slice crop (smoke run)
    python benchmarks/backends.py                                  # the full run (README's Performance table)

--quick takes ~5 min on 2 cores with the set-up cached; the first run also exports and quantizes (the
random total_fast net: 16 min and 7.5 GB on a machine loaded ~7x; ~2 min when quiet). The full run:
~3 h on 2 idle cores (`total` on 128^3 nets is ~10 min per fp32 row), ~15-20 min of it int8 set-up.

Every run is a child process (benchmarks/backend_child.py), so wall time includes start-up and
peak RSS is that run's alone (the process tree's resident memory, sampled, and the child's VmHWM).
Backends alternate A B C A B C ... after a warm-up round; medians are reported.

This script composes the others, each runnable alone: workloads.py (inputs, weights, rows; the
cached set-up, int8 graphs included), speed.py (timed runs of one backend), memory.py (the process-tree
sampler), accuracy.py (agreement and Dice; confident weights; reduced precision vs fp32), cold_start.py
(`--help` times, empty-cache run, installed sizes) and report.py (JSON, tables, plot).

tsrt rows are (engine, precision) pairs, as `tsrt segment --provider P --precision Q` runs them: ONNX
Runtime cpu fp32 and int8, OpenVINO fp32, bf16 (only on a CPU with native bf16) and int8, and the GPU
rows (cuda fp32, tensorrt fp32/fp16/int8) where onnxruntime has those providers; each row left out is in
the report with its reason, and the report's header has the CPU's flags (VNNI, AVX512_BF16, AMX).
int8 rows run the graphs `tsrt models quantize` makes (calibrated on phantoms; cached in --work), only for
the models the workloads run (total_fast: one, total: five).

Weights: TotalSegmentator-sized networks (6 stages, 32..320 features, 128^3 patches, the real class
counts) with seeded random weights in TotalSegmentator's layout (tsrt_export.fixtures), imported
into a tsrt store with the same export `tsrt models import` runs. Random weights put near-tied
logits everywhere, so float noise alone caps agreement between backends (~99.8 %), and reduced
precision's agreement and Dice there are not meaningful (their int8 graphs cannot pass the accuracy
gate and are installed with --force: those rows are for speed). Accuracy therefore comes from
"confident" weights (the trained demo model's backbone, its own architecture at 128^3 patches) and the
demo model itself: each reduced precision vs fp32, Dice per class (mean, minimum) and voxel agreement.

Groups: `totalseg` rows compare tsrt's task path (every row) with official TotalSegmentator (ratio =
official wall / row's wall); `nnunet` rows compare `tsrt segment --model` (cpu fp32) with nnU-Net's
nnUNetPredictor on the same single model (its --fast model).

Outputs (--out, default benchmarks/results): NAME.json (everything), NAME.md (tables), NAME.png.
Set-up (fixture weights, exports, int8 graphs, phantoms) is cached in --work and reused by later runs.
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
from tsrt.engines.providers import PRECISIONS, PROVIDER_CHOICES
from workloads import (
    CPU_PROVIDERS, DEFAULT_WORK, DEFAULT_WORKLOADS, REPO, WORKLOADS, backends_for, install_int8, int8_form,
    prepare_input, store_models, tasks_for, tsrt_rows,
)

#: tsrt's engines (`--provider`), for --providers.
PROVIDERS = tuple(provider for provider in PROVIDER_CHOICES if provider != "auto")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="ct_fast only (or --workloads), 1 timed run, no nnUNetPredictor, cold start or official "
                        "confident run; with the demo and confident-weights precision tables")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS,
                        help="tsrt engines to run (default: every one present)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                        help="tsrt precisions to run (default: every one this machine runs natively)")
    parser.add_argument("--runs", type=int, help="timed runs per backend (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 1, quick 0)")
    parser.add_argument("--small", action="store_true",
                        help="tiny 4-stage nets on 48^3 patches instead of TotalSegmentator-sized ones (smoke tests)")
    parser.add_argument("--no-nnunet", action="store_true", help="skip the nnUNetPredictor comparison")
    parser.add_argument("--no-low-memory", action="store_true", help="skip the cpu fp32 --low-memory row")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip confident weights, the demo model, cold start and installed sizes")
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
    rows, skipped = tsrt_rows(args.providers, args.precisions)
    if ("cpu", "fp32") not in rows:
        parser.error("the rows must include cpu fp32 (ONNX Runtime's CPU in fp32: the reference of every precision)")
    stem = args.name or ("quick" if quick else "full")
    started = time.perf_counter()
    report: Report = {"command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)
                                                         if Path(sys.argv[0]).is_absolute() else sys.argv[0]),
                                                        *(argv if argv is not None else sys.argv[1:])]),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "runs": runs, "warmup": warmup,
                    "tsrt_rows": [" ".join(row) for row in rows], "skipped_rows": skipped,
                    "network": ("4 stages, 4..32 features, 48^3 patch" if args.small else
                                "6 stages, 32..320 features, 128^3 patch") + ", seeded random weights",
                    "random_weights_floor": RANDOM_WEIGHTS_FLOOR, "workloads": {}, "accuracy_random_weights": {},
                    "int8": {}, "failures": {}}
    previous = args.out / f"{stem}.json"
    if args.resume and previous.exists():  # an interrupted run: keep what it measured
        kept = json.loads(previous.read_text())
        for key in ("workloads", "accuracy_random_weights", "failures", "runs_capped", "cold_start", "int8"):
            if key in kept:
                report[key] = kept[key]
        report["resumed_from"] = kept.get("date")
        print(f"resuming {previous}: {', '.join(kept['workloads'])} kept", flush=True)
    for key, reason in skipped.items():
        print(f"not run: {key}: {reason}", flush=True)
    homes = store_models(work, "random", tasks_for(workloads, with_nnunet=not args.no_nnunet), small=args.small)
    if any(precision == "int8" for _, precision in rows):  # only the models the workloads' tsrt rows run
        report["int8"]["random"] = install_int8(work, "random", homes, {t for w in workloads for t in w.ts_tasks},
                                                int8_form(rows), small=args.small)
        save(report, args.out, stem, started)
    if not (quick or args.no_extras or "cold_start" in report):
        report["cold_start"] = cold_start(homes, work, prepare_input(work, WORKLOADS["ct_fast"]))
    for workload in workloads:
        if workload.name in report["workloads"]:
            continue
        image = prepare_input(work, workload)
        backends = backends_for(workload, rows, with_nnunet=not (args.no_nnunet or quick),
                                low_memory=not args.no_low_memory)
        capped = workload.max_runs is not None and runs > workload.max_runs
        workload_runs, workload_warmup = (workload.max_runs, 0) if capped else (runs, warmup)
        measured = measure_workload(workload, backends, image, homes, work, workload_runs, workload_warmup,
                                    report["failures"])
        report["workloads"][workload.name] = measured
        if capped:
            report.setdefault("runs_capped", {})[workload.name] = workload_runs
        ran = [backend for backend in backends if backend.label in measured]
        report["accuracy_random_weights"][workload.name] = compare_outputs(workload, ran, work)
        save(report, args.out, stem, started)  # partial results survive an interrupted run
    if not args.no_extras:
        # The shared CTs, not the phantom; quick: tsrt's rows only (their precisions vs fp32), no official run.
        accuracy_workloads = [w for w in workloads if w.input.endswith(".nii.gz")]
        confident = confident_accuracy(accuracy_workloads, rows, work, args.small, with_official=not quick)
        if confident["vs_official"]:
            report["accuracy_confident"] = confident["vs_official"]
        report["precision_confident"] = confident["vs_fp32"]
        if confident["int8"]:
            report["int8"]["confident"] = confident["int8"]
        save(report, args.out, stem, started)
        report["demo_precision"], demo_int8 = demo_precision([r for r in rows if r[0] in CPU_PROVIDERS], work, runs,
                                                             warmup)
        if demo_int8:
            report["int8"]["demo"] = demo_int8
    if not (quick or args.no_extras):
        report["installed_mb"] = installed_sizes()
    save(report, args.out, stem, started)
    print(markdown(report))
    print(f"wrote {args.out / stem}.json/.md/.png in {report['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
