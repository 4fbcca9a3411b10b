"""Cold start and installed size: what a user waits for before the first mask, and what they download.

    python benchmarks/cold_start.py                 # --help times, first --fast run with an empty cache, sizes
    python benchmarks/cold_start.py --no-sizes --small

`--help` times are the import cost of each CLI (median of 3). The empty-cache run is tsrt's --fast on
example_ct right after deleting its cache (compiled/optimised graphs), then once more warm, in fresh
processes like every benchmark run. Sizes: each distribution closure's installed bytes from the RECORD
files of this interpreter's venv, and `du` of the whole venvs. The torch-free runtime venv is
TSRT_RUNTIME_VENV (default .venv-runtime in the repo); the dev venv is the one running this script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from speed import run_backend
from workloads import (
    REPO, WORKLOADS, Backend, Homes, add_setup_arguments, prepare_input, store_models, tasks_for,
)


def runtime_venv() -> Path:
    return Path(os.environ.get("TSRT_RUNTIME_VENV", REPO / ".venv-runtime"))


def cold_start(homes: Homes, work: Path, image: Path) -> dict[str, float]:
    """`tsrt --help` and `TotalSegmentator --help` wall times, and tsrt's first --fast run with an empty cache."""
    found: dict[str, float] = {}
    # the interpreter running the benchmark (the dev venv) and the runtime-only venv (torch-free install)
    venvs = {"dev": Path(sys.prefix), "runtime": runtime_venv()}
    commands = {f"tsrt --help ({name} venv)": venv / "bin" / "tsrt" for name, venv in venvs.items()}
    commands["TotalSegmentator --help"] = Path(sys.prefix) / "bin" / "TotalSegmentator"
    for key, executable in commands.items():
        if executable.exists() and (seconds := median_wall([str(executable), "--help"])) is not None:
            found[key] = seconds
    shutil.rmtree(homes[1] / "cache", ignore_errors=True)
    workload, row = WORKLOADS["ct_fast"], Backend("totalseg", "tsrt", "cpu")
    first = run_backend(row, workload, image, homes, work, "cold", "cold-start")
    second = run_backend(row, workload, image, homes, work, "cold", "warm-start")
    found["tsrt --fast example_ct, empty cache (s)"] = first["wall_s"]
    found["tsrt --fast example_ct, warm cache (s)"] = second["wall_s"]
    return found


def median_wall(command: list[str], repeats: int = 3) -> float | None:
    """Median wall time of a command (its output discarded); None if it fails (a broken install is not fast)."""
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        if subprocess.run(command, capture_output=True, check=False).returncode != 0:
            print(f"  cold start: `{' '.join(command)}` failed, left out", flush=True)
            return None
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def installed_sizes() -> dict[str, int]:
    """Installed bytes of each distribution closure, read from the dev venv's RECORD files, and of .venv-runtime."""
    from importlib import metadata

    def closure(root: str) -> set[str]:
        seen: set[str] = set()
        queue = [root]
        while queue:
            name = re.split(r"[ ;<>=!\[~(]", queue.pop(), maxsplit=1)[0].lower().replace("_", "-")
            if name in seen:
                continue
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue
            seen.add(name)
            queue.extend(r for r in (dist.requires or []) if "extra ==" not in r)
        return seen

    def size(names: set[str]) -> int:
        total = 0
        for name in names:
            for file in metadata.distribution(name).files or []:
                try:
                    total += file.locate().stat().st_size
                except OSError:
                    pass
        return total

    found = {
        "TotalSegmentator 2.18 + dependencies (dev venv, RECORD sizes)": size(closure("totalsegmentator")) / 2**20,
        "tsrt runtime dependencies (dev venv, RECORD sizes)": size(closure("tsrt") - {"tsrt"}) / 2**20,
    }
    runtime = runtime_venv()
    if runtime.is_dir():
        found[".venv-runtime on disk (du, whole venv)"] = du_mb(runtime)
    found[".venv on disk (du, the dev venv: TotalSegmentator, torch, tsrt dev tools)"] = du_mb(Path(sys.prefix))
    return {key: round(value) for key, value in found.items()}


def du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True).stdout
    return float(out.split()[0]) if out else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-sizes", action="store_true", help="skip the installed sizes (du of two venvs)")
    add_setup_arguments(parser, weights=False)
    args = parser.parse_args(argv)

    workload = WORKLOADS["ct_fast"]
    homes = store_models(args.work, "random", tasks_for([workload], with_nnunet=False), small=args.small)
    found: dict[str, dict] = {"cold_start": cold_start(homes, args.work, prepare_input(args.work, workload))}
    if not args.no_sizes:
        found["installed_mb"] = installed_sizes()
    print(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
