"""benchmarks/backends.py end to end on a tiny workload: official TotalSegmentator and tsrt, real runs.

Small 48^3 networks on a 30-slice CT crop, one timed run each. Checks that the script produces
its JSON, Markdown table and PNG, that stage times add up to no more than the wall time, and that
tsrt's labels agree with official TotalSegmentator's. Speed itself is never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: Random small nets: near-tied logits flip a few voxels between torch and ONNX Runtime (as in the parity tests).
MIN_AGREEMENT = 0.995


def test_backends_script_writes_json_table_and_plot(shared_data: Path, tmp_path: Path):
    pytest.importorskip("totalsegmentator", reason="the benchmark runs official TotalSegmentator (dev environment)")
    pytest.importorskip("matplotlib", reason="the plot needs the preview extra")
    out = tmp_path / "out"
    command = [
        sys.executable, str(REPO / "benchmarks" / "backends.py"), "--small", "--workloads", "ct_sm_fast",
        "--providers", "cpu", "--runs", "1", "--warmup", "0", "--no-nnunet", "--no-extras",
        "--work", str(tmp_path / "work"), "--out", str(out), "--name", "smoke",
    ]
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    report = json.loads((out / "smoke.json").read_text())
    rows = report["workloads"]["ct_sm_fast"]
    assert set(rows) == {"TotalSegmentator (PyTorch)", "tsrt cpu"}
    for row in rows.values():
        stages = {k: v for k, v in row["stages_s"].items() if v is not None}
        assert stages["inference"] > 0 and row["tiles"] > 0
        assert sum(stages.values()) <= row["wall_s"] * 1.01
        assert row["peak_rss_mb"] > 0
    assert rows["tsrt cpu"]["provider"] == "cpu"
    assert 0 < rows["tsrt cpu"]["network_s"] <= rows["tsrt cpu"]["stages_s"]["inference"]
    # Same sliding window on both sides: the same number of tiles.
    assert rows["tsrt cpu"]["tiles"] == rows["TotalSegmentator (PyTorch)"]["tiles"]
    accuracy = report["accuracy_random_weights"]["ct_sm_fast"]["tsrt cpu"]
    assert accuracy["agreement"] >= MIN_AGREEMENT and accuracy["classes"] > 0

    table = (out / "smoke.md").read_text()
    assert "| ct_sm_fast | tsrt cpu |" in table and "× vs reference" in table
    assert (out / "smoke.png").read_bytes().startswith(b"\x89PNG")
