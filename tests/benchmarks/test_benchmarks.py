"""benchmarks/: which (engine, precision) rows a machine runs, reduced precision vs fp32, the report's tables;
and benchmarks/backends.py end to end on a tiny workload (slow).

The fast tests run the benchmark's own functions on hand-made inputs and real files (the CPU's flags, the
stored report of an earlier full run); nothing here measures speed. The slow test runs the script: official
TotalSegmentator and tsrt on small 48^3 networks and a 30-slice CT crop, one timed run each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import each other by bare name

import accuracy  # noqa: E402
import report  # noqa: E402
import speed  # noqa: E402
import workloads  # noqa: E402

#: Random small nets: near-tied logits flip a few voxels between torch and ONNX Runtime (as in the parity tests).
MIN_AGREEMENT = 0.995
CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]
GPU = [*CPU_ONLY, "CUDAExecutionProvider", "TensorrtExecutionProvider"]


def _flags_in_cpuinfo() -> set[str]:
    """This machine's CPU flags, read here independently of the benchmark's reader."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo (the benchmarks are Linux-only)")
    return set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())


def _table(markdown: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the Markdown table whose header starts with `first_header`, as {column: cell}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return rows


# ----------------------------------------------------------------------------------- rows by machine


def test_a_cpu_without_native_bf16_runs_fp32_and_int8_and_says_why_not_bf16() -> None:
    rows, skipped = workloads.select_tsrt_rows({"avx2", "avx512f", "avx512_vnni"}, True, CPU_ONLY)
    assert rows == [("cpu", "fp32"), ("cpu", "int8"), ("openvino", "fp32"), ("openvino", "int8")]
    assert "avx512_bf16" in skipped["openvino bf16"] and "emulate" in skipped["openvino bf16"]
    assert set(skipped) == {"openvino bf16", "cuda", "tensorrt"}  # GPU rows: one reason per missing provider


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_native_bf16_adds_the_openvino_bf16_row(flag: str) -> None:
    rows, skipped = workloads.select_tsrt_rows({"avx2", flag}, True, CPU_ONLY)
    assert ("openvino", "bf16") in rows and "openvino bf16" not in skipped
    assert rows[0] == ("cpu", "fp32")  # the reference of every precision comes first


def test_without_openvino_only_onnx_runtime_rows_run() -> None:
    rows, skipped = workloads.select_tsrt_rows({"avx512_bf16", "avx512_vnni"}, False, CPU_ONLY)
    assert rows == [("cpu", "fp32"), ("cpu", "int8")]
    assert "tsrt[openvino]" in skipped["openvino"]


def test_gpu_rows_appear_with_their_providers() -> None:
    rows, skipped = workloads.select_tsrt_rows({"avx2"}, False, GPU)
    assert [row for row in rows if row[0] in ("cuda", "tensorrt")] == [
        ("cuda", "fp32"), ("tensorrt", "fp32"), ("tensorrt", "fp16"), ("tensorrt", "int8")]
    assert "fp16" in skipped["cuda fp16"]  # the benchmark's graphs are fp32: CUDA would refuse fp16
    assert workloads.int8_form(rows) == "tensorrt"  # one int8 graph per model, in the form TensorRT builds
    assert workloads.int8_form([("cpu", "fp32"), ("cpu", "int8")]) == "cpu"


def test_cpu_rows_are_exactly_what_tsrt_runs_on_this_machine() -> None:
    """The oracle is tsrt's own check: a CPU row is selected iff `--provider P --precision Q` is not refused."""
    from tsrt.engines.providers import check_precision
    from tsrt.errors import ProviderError

    rows, _ = workloads.select_tsrt_rows(_flags_in_cpuinfo(), True, CPU_ONLY)
    for provider, precision in workloads.TSRT_ROWS:
        if provider not in workloads.CPU_PROVIDERS:
            continue
        try:
            check_precision(provider, precision)
            runs = True
        except ProviderError:
            runs = False
        assert ((provider, precision) in rows) == runs, (provider, precision)


# ----------------------------------------------------------------------------------- precision vs fp32


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_precision_agreement_takes_mean_and_min_over_classes_of_1000_voxels() -> None:
    reference = np.zeros((40, 40, 40), np.uint8)
    reference[:30, :10, :10] = 1  # 3000 voxels
    reference[30:, :15, :10] = 2  # 1500 voxels
    reference[:5, 20:25, 20:22] = 3  # 50 voxels: not counted (below 1000)
    labels = reference.copy()
    labels[:3, :10, :10] = 2  # 300 voxels of class 1 read as class 2
    labels[reference == 3] = 0
    found = accuracy.precision_agreement(reference, labels, {1: "liver", 2: "spleen", 3: "aorta"})

    expected = {name: _dice(reference == v, labels == v) for v, name in ((1, "liver"), (2, "spleen"))}
    assert found["classes"] == 2 and set(found["per_class"]) == set(expected)
    assert found["mean_dice"] == pytest.approx(np.mean(list(expected.values())))
    assert found["min_class"] == min(expected, key=expected.get)
    assert found["min_dice"] == pytest.approx(min(expected.values()))
    assert found["agreement"] == pytest.approx(float((reference == labels).mean()))


def test_each_precision_is_compared_with_its_own_engines_fp32() -> None:
    base = np.zeros((20, 20, 20), np.uint8)
    base[:12] = 1
    shifted = base.copy()
    shifted[11] = 0
    labels = {("cpu", "fp32"): base, ("cpu", "int8"): shifted, ("openvino", "fp32"): shifted,
              ("openvino", "int8"): shifted, ("tensorrt", "fp16"): base}
    found = accuracy.compare_precisions(labels)
    assert {key: row["reference"] for key, row in found.items()} == {
        "cpu int8": "cpu fp32", "openvino fp32": "cpu fp32", "openvino int8": "openvino fp32",
        "tensorrt fp16": "cpu fp32"}  # no tensorrt fp32 ran: the CPU's fp32 instead
    assert found["openvino int8"]["agreement"] == 1.0 and found["cpu int8"]["agreement"] < 1.0


# ----------------------------------------------------------------------------------- the report


def _measured(row: workloads.Backend, wall: float) -> dict:
    """A row as speed.summarise makes it from one child run's result."""
    stages = {"startup": 0.5, "load models": 0.2, "read": 0.1, "preprocess": 0.3, "inference": wall - 1.5,
              "postprocess": 0.2, "write": 0.2}
    result = {"stages": stages, "wall_s": wall, "tiles": 4, "peak_rss_mb": 900.0, "gpu_peak_mb": None,
              "network_s": wall - 2.0 if row.backend == "tsrt" else None}
    return speed.summarise(row, [result])


def test_the_table_has_engine_and_precision_columns_and_marks_reduced_precision_on_random_weights() -> None:
    rows = [("cpu", "fp32"), ("cpu", "int8"), ("openvino", "fp32"), ("openvino", "int8")]
    backends = workloads.backends_for(workloads.WORKLOADS["ct_sm_fast"], rows, with_nnunet=False)
    assert backends[-1].low_memory and backends[-1].label == "tsrt cpu fp32 --low-memory"
    walls = dict(zip((backend.label for backend in backends), (30.0, 12.0, 8.0, 10.0, 6.0, 14.0)))
    skipped = {"openvino bf16": "this CPU has no native bf16"}
    built = {
        "command": "python benchmarks/backends.py --quick", "machine": report.machine(), "runs": 1, "warmup": 0,
        "random_weights_floor": 0.998, "skipped_rows": skipped, "failures": {},
        "workloads": {"ct_sm_fast": {b.label: _measured(b, walls[b.label]) for b in backends}},
        "accuracy_random_weights": {"ct_sm_fast": {b.label: {"agreement": 0.9, "dice": 0.8} for b in backends[1:]}},
    }
    built["targets"] = report.targets(built)
    markdown = report.markdown(built)

    flags = _flags_in_cpuinfo()
    header = markdown.splitlines()[0]
    for flag in ("avx512_vnni", "avx512_bf16", "amx_bf16"):
        assert f"{flag} {'yes' if flag in flags else 'no'}" in header
    assert built["machine"]["cpu_flags"]["avx512_vnni"] == ("avx512_vnni" in flags)  # the JSON has them too

    table = _table(markdown, "workload")
    assert [(r["backend"], r["engine"], r["precision"]) for r in table] == [
        ("TotalSegmentator", "PyTorch", "fp32"), ("tsrt", "cpu", "fp32"), ("tsrt", "cpu", "int8"),
        ("tsrt", "openvino", "fp32"), ("tsrt", "openvino", "int8"), ("tsrt", "cpu --low-memory", "fp32")]
    for row, backend in zip(table[1:], backends[1:]):
        assert row["× vs reference"] == f"{30.0 / walls[backend.label]:.2f}×"
        assert row["Dice"].endswith("†") == (backend.precision == "int8")  # not meaningful on random weights
    assert "not meaningful" in markdown and "- openvino bf16: this CPU has no native bf16" in markdown


def test_reduced_precision_goals_compare_network_time_per_tile_with_onnxruntime_fp32() -> None:
    """int8 / bf16 against cpu fp32's session.run time per tile of the same workload; end-to-end ratios from walls."""
    rows = [("cpu", "fp32"), ("cpu", "int8"), ("openvino", "bf16"), ("openvino", "int8")]
    backends = workloads.backends_for(workloads.WORKLOADS["ct_fast"], rows, with_nnunet=False, low_memory=False)
    walls = dict(zip((b.label for b in backends), (30.0, 10.0, 7.0, 6.2, 4.4)))
    measured = {b.label: _measured(b, walls[b.label]) for b in backends}  # network = wall - 2 over 4 tiles
    built = {"workloads": {"ct_fast": measured}}
    goals = {goal["target"]: goal for goal in report.precision_targets(built)}

    int8 = goals["int8 network per tile <= 0.4x ONNX Runtime fp32 (ct_fast)"]
    assert int8["measured"] == f"cpu {5 / 8:.2f}x, openvino {2.4 / 8:.2f}x" and int8["reached"]
    bf16 = goals["native bf16 network per tile >= 1.8x ONNX Runtime fp32 (ct_fast)"]
    assert bf16["measured"] == f"openvino {8 / 4.2:.2f}x faster" and bf16["reached"]
    end_to_end = goals["bf16 end to end --fast >= 1.6x tsrt cpu fp32"]
    assert end_to_end["measured"] == f"{10 / 6.2:.2f}x" and end_to_end["reached"]
    fast = goals["ct_fast with int8 >= 6x faster than official"]
    assert fast["measured"] == f"cpu {30 / 7:.2f}x, openvino {30 / 4.4:.2f}x" and fast["reached"]

    measured["tsrt openvino int8"]["network_s"] = 3.3 * 4  # 0.41x: no longer reached, and the table says so
    assert not {g["target"]: g for g in report.precision_targets(built)}[int8["target"]]["reached"]
    assert "| network s/tile |" in report.main_table({"workloads": built["workloads"], "accuracy_random_weights": {}})[0]


def test_low_memory_rows_are_held_to_the_memory_goals_in_mib() -> None:
    backends = workloads.backends_for(workloads.WORKLOADS["phantom_fast"], [("cpu", "fp32")], with_nnunet=False)
    measured = {b.label: _measured(b, 60.0) for b in backends}
    low = measured["tsrt cpu fp32 --low-memory"]

    def goal() -> dict:
        found = report.targets({"workloads": {"phantom_fast": measured}})
        return next(t for t in found if t["target"] == "512x512x800 phantom --fast <= 2 GB peak RSS with --low-memory")

    low["peak_rss_mb"] = 2040.0
    assert goal() == {"target": "512x512x800 phantom --fast <= 2 GB peak RSS with --low-memory", "measured": "2040 MB",
                      "reached": True}
    low["peak_rss_mb"] = 2049.0
    assert not goal()["reached"]


def test_an_earlier_full_run_renders_with_the_same_targets_and_split_columns() -> None:
    """benchmarks/reported/full.json predates precision rows (provider "openvino-bf16"): still readable."""
    stored = json.loads((REPO / "benchmarks" / "reported" / "full.json").read_text())
    assert report.targets(stored) == stored["targets"]  # what the earlier code computed from the same rows
    table = _table(report.markdown(stored), "workload")
    bf16 = [r for r in table if r["precision"] == "bf16"]
    assert [(r["workload"], r["backend"], r["engine"]) for r in bf16] == [("ct_fast", "tsrt", "openvino")]
    assert bf16[0]["wall s"] == f"{stored['workloads']['ct_fast']['tsrt openvino-bf16']['wall_s']:.1f}"


# ----------------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_backends_script_writes_json_table_and_plot(shared_data: Path, tmp_path: Path):
    pytest.importorskip("totalsegmentator", reason="the benchmark runs official TotalSegmentator (dev environment)")
    pytest.importorskip("matplotlib", reason="the plot needs the preview extra")
    out = tmp_path / "out"
    command = [
        sys.executable, str(REPO / "benchmarks" / "backends.py"), "--small", "--workloads", "ct_sm_fast",
        "--providers", "cpu", "--precisions", "fp32", "--runs", "1", "--warmup", "0", "--no-nnunet", "--no-extras",
        "--work", str(tmp_path / "work"), "--out", str(out), "--name", "smoke",
    ]
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    report_json = json.loads((out / "smoke.json").read_text())
    rows = report_json["workloads"]["ct_sm_fast"]
    assert set(rows) == {"TotalSegmentator (PyTorch)", "tsrt cpu fp32", "tsrt cpu fp32 --low-memory"}
    for row in rows.values():
        stages = {k: v for k, v in row["stages_s"].items() if v is not None}
        assert stages["inference"] > 0 and row["tiles"] > 0
        assert sum(stages.values()) <= row["wall_s"] * 1.01
        assert row["peak_rss_mb"] > 0
    tsrt = rows["tsrt cpu fp32"]
    assert (tsrt["provider"], tsrt["precision"]) == ("cpu", "fp32")
    assert 0 < tsrt["network_s"] <= tsrt["stages_s"]["inference"]
    # Same sliding window on both sides: the same number of tiles.
    assert tsrt["tiles"] == rows["TotalSegmentator (PyTorch)"]["tiles"]
    accuracy_row = report_json["accuracy_random_weights"]["ct_sm_fast"]["tsrt cpu fp32"]
    assert accuracy_row["agreement"] >= MIN_AGREEMENT and accuracy_row["classes"] > 0
    # --low-memory gives the same masks: the same agreement with official TotalSegmentator, to the voxel.
    assert report_json["accuracy_random_weights"]["ct_sm_fast"]["tsrt cpu fp32 --low-memory"] == accuracy_row

    table = (out / "smoke.md").read_text()
    assert "| ct_sm_fast | tsrt | cpu | fp32 |" in table and "× vs reference" in table
    assert (out / "smoke.png").read_bytes().startswith(b"\x89PNG")
