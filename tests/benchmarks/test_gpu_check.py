"""benchmarks/gpu_check.py: the no-GPU line here, and its machinery on the CPU rows (the GPU rows need a GPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", env={**os.environ, "PYTHONUTF8": "1"}, cwd=REPO)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine may have a GPU: the full check runs")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_zero() -> None:
    run = _run()
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines() == ["gpu_check: no NVIDIA GPU on this machine (nvidia-smi lists none): "
                                               "nothing to check."]


def test_cpu_rows_run_the_machinery_and_write_both_reports(tmp_path: Path) -> None:
    """The CPU rows: fp32 (the reference) and int8 from the demo model quantized in TensorRT's form (as the GPU
    rows' int8 engines are built from), gated on a held-out phantom (small phantoms: quick)."""
    run = _run("--cpu-only", "--skip-totalseg-sized", "--tiles", "1", "--phantom-shape", "80,72,64",
               "--calibration-tiles", "4", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {(row["model"], row["precision"]): row for row in report["rows"]}
    assert set(rows) == {("demo", "fp32"), ("demo", "int8")}
    demo = rows["demo", "fp32"]
    assert demo["provider_used"] == "cpu" and demo["seconds_per_tile"] > 0 and demo["end_to_end_seconds"] > 0
    assert demo["mean_dice_vs_cpu"] == 1.0 and demo["voxel_agreement_vs_cpu"] == 1.0
    int8 = rows["demo", "int8"]
    assert int8["provider_used"] == "cpu" and int8["end_to_end_seconds"] > 0
    assert 0.95 < int8["mean_dice_vs_cpu"] < 1.0 and 0.98 < int8["voxel_agreement_vs_cpu"] < 1.0  # int8, not fp32
    assert int8["note"].startswith("int8: gate ")
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| demo | cpu | fp32 | cpu |" in markdown and "| demo | cpu | int8 | cpu |" in markdown
