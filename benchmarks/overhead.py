"""Where a one-tile job's wall time goes outside the network: start-up, read, preprocess, session, write.

    python benchmarks/overhead.py                                  # --fast example_ct, 5 fresh processes
    python benchmarks/overhead.py --runs 3 -- -i CT.nii.gz -o out.nii.gz --fast --ml

Each run is a fresh `tsrt segment` process (the same CLI a user calls) in which this script wraps the
stage functions with timers before the CLI imports them, so the stages are the product's own code, timed
from the process's start (the kernel's start time of the process: interpreter start-up included) to its
exit. "network" is the sum of every ONNX Runtime or OpenVINO `session.run` (body and head); everything else is what
issue 19 calls overhead. The report prints the median of each stage over the runs and the CPU's flags
(compare only figures from one run of this script). The store is TSRT_HOME as for any run (the
benchmarks' TotalSegmentator-sized total_fast net: `python benchmarks/workloads.py --prepare ct_fast`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import machine
from workloads import SHARED

#: (module, function, stage): wrapped in the child, in every module that imported them, before the run.
STAGES = (
    ("tsrt.totalseg.source", "read_source", "read input"),
    ("tsrt.pipeline.preprocess", "preprocess", "preprocess"),
    ("tsrt.pipeline.infer", "load_model", "open model (sessions)"),
    ("tsrt.pipeline.sliding_window", "sliding_window_inference", "sliding window (incl. network)"),
    ("tsrt.totalseg.outputs", "write_task_outputs", "write outputs"),
)


def process_start_time() -> float:
    """This process's start on the time.time() clock, from /proc (the kernel counts it in clock ticks since boot)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def child(cli_args: list[str]) -> None:
    """Time one `tsrt segment` in this process and print the stages as one JSON line on stderr."""
    started = process_start_time()
    seconds: dict[str, float] = {}
    seconds["interpreter start-up"] = time.time() - started

    def timed(function, stage):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - begin

        return wrapper

    begin = time.perf_counter()
    import importlib

    import onnxruntime

    from tsrt.cli.root import main

    for module_name, name, stage in STAGES:
        original = getattr(importlib.import_module(module_name), name)
        wrapped = timed(original, stage)
        # every module that already holds the function (`from x import f`) gets the timed one
        for module in [m for m in sys.modules.values() if getattr(m, "__name__", "").startswith("tsrt")]:
            if getattr(module, name, None) is original:
                setattr(module, name, wrapped)
    onnxruntime.InferenceSession.run = timed(onnxruntime.InferenceSession.run, "network (session.run)")
    from tsrt.engines.providers import OpenVinoSession  # OpenVINO's runs are the network too

    OpenVinoSession.run = timed(OpenVinoSession.run, "network (session.run)")

    seconds["imports"] = time.perf_counter() - begin
    sys.argv = ["tsrt", "segment", *cli_args]
    try:
        main()
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    seconds["wall"] = time.time() - started
    print(json.dumps(seconds), file=sys.stderr)


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median per stage, with the sliding window's own work (without the network) and the overhead derived."""
    stages = sorted({key for run in runs for key in run})
    median = {stage: statistics.median(run.get(stage, 0.0) for run in runs) for stage in stages}
    window = [run.get("sliding window (incl. network)", 0.0) - run.get("network (session.run)", 0.0) for run in runs]
    median["sliding window without the network"] = statistics.median(window)
    median["outside the network"] = statistics.median(run["wall"] - run.get("network (session.run)", 0.0) for run in runs)
    return median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes to time (median reported)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("cli", nargs="*", help="tsrt segment arguments (after --)")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "tsrt-overhead.nii.gz"
    cli = args.cli or ["-i", str(SHARED / "example_ct.nii.gz"), "-o", str(out), "--fast", "--ml", "-q", "--offline"]
    if args.child:
        child(cli)
        return 0
    runs = []
    for index in range(args.runs):
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--", *cli], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}", file=sys.stderr)
            return 1
        runs.append(json.loads(done.stderr.strip().splitlines()[-1]))
        print(f"run {index + 1}: wall {runs[-1]['wall']:.2f} s, network {runs[-1].get('network (session.run)', 0):.2f} s",
              file=sys.stderr)
    report = {"machine": machine(), "command": ["tsrt", "segment", *cli], "runs": runs, "median_seconds": summarise(runs)}
    print(f"tsrt segment {' '.join(cli)}")
    print(f"machine: {json.dumps(report['machine'])}")
    for stage, value in sorted(report["median_seconds"].items(), key=lambda item: -item[1]):
        print(f"  {stage:<38} {value:6.2f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
