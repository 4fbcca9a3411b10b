"""Peak memory of a command and every process it starts: process-tree PSS, the root's own peak, GPU memory.

    python benchmarks/memory.py -- tsrt segment -i ct.nii.gz -o out --fast
    python benchmarks/memory.py --interval 0.1 -- TotalSegmentator -i ct.nii.gz -o out --fast

PSS (proportional set size), not RSS, summed over the tree: nnU-Net's worker processes each map
torch's libraries, and PSS counts those shared pages once overall. The root's own peak RSS (the
kernel's high-water mark, from wait4) catches a peak shorter than the sampling interval. GPU memory is
nvidia-smi's used memory above what was in use before the command started (other processes on the
GPU count too). The report is one JSON line on stderr (the command keeps stdout); the exit code is the
command's. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


class TreeMemory:
    """Peak memory of a process and its descendants (PSS, sampled every 250 ms) and of the GPU (nvidia-smi).

    Reading smaps_rollup of a multi-GB process and walking every thread's children is not free: at
    50 ms the sampler took ~40 % of one core (measured on the 2-core machine), time the backends lost.
    The root's own high-water mark is exact anyway; the sampling adds its worker processes.
    """

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval = pid, interval
        self.peak_mb = 0.0
        self.gpu_peak_mb: float | None = None
        self._gpu_baseline = gpu_used_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        ticks = 0
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, sum(pss_mb(pid) for pid in descendants(self.pid)))
            if self._gpu_baseline is not None and ticks % 10 == 0:
                used = gpu_used_mb()
                if used is not None:
                    self.gpu_peak_mb = max(self.gpu_peak_mb or 0.0, used - self._gpu_baseline)
            ticks += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def descendants(pid: int) -> list[int]:
    """The process and every process below it (children of all its threads), read from /proc."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                queue.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages (torch's libraries in every nnU-Net worker) counted once overall."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0.0


def vmhwm_mb(pid: int | str = "self") -> float | None:
    """The process's resident high-water mark (None once it has exited).

    VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def nvidia_smi(field: str) -> str | None:
    """The first GPU's `field` (nvidia-smi --query-gpu), or None without a working nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def gpu_used_mb() -> float | None:
    used = nvidia_smi("memory.used")
    try:
        return float(used) if used is not None else None
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between samples (default %(default)s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to measure, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")

    started = time.perf_counter()
    process = subprocess.Popen(command)
    memory = TreeMemory(process.pid, args.interval)
    _, status, usage = os.wait4(process.pid, 0)
    memory.stop()
    process.returncode = returncode = os.waitstatus_to_exitcode(status)
    print(json.dumps({"command": command, "exit": returncode, "wall_s": round(time.perf_counter() - started, 2),
                      "peak_tree_pss_mb": round(memory.peak_mb), "root_peak_rss_mb": round(usage.ru_maxrss / 1024),
                      "gpu_peak_mb": memory.gpu_peak_mb}), file=sys.stderr)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
