"""`--precision` beyond `tsrt segment`: the companions, the demo, the runtime options and the UI offer it,
and refuse what the provider cannot run in one line, before any input is read or any output written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantization.test_quantize import scans  # noqa: F401 (the calibration phantoms fixture)
from tsrt.engines.providers import native_bf16
from tsrt.errors import ProviderError
from tsrt.totalseg.options import RuntimeOptions
from tsrt.ui.runner import precision_choices


def _tsrt(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TSRT_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", *args], capture_output=True, text=True, env=env
    )


def _assert_one_line(result: subprocess.CompletedProcess, message: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("tsrt: error: ") and message in lines[0], result.stderr


@pytest.mark.parametrize("command", ["phase", "modality", "evans-index"])
def test_companions_refuse_a_precision_the_provider_cannot_run(tmp_path: Path, command: str) -> None:
    """The input does not exist: a refusal that named it instead would have come after reading."""
    out = tmp_path / "result.json"
    result = _tsrt(command, str(tmp_path / "no_such_ct.nii.gz"), "-o", str(out), "--provider", "cpu",
                   "--precision", "fp16", home=tmp_path)
    _assert_one_line(result, "fp16 is for GPUs")
    assert not out.exists()


def test_demo_refuses_before_writing_the_phantom(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = _tsrt("demo", "-o", str(out), "--provider", "cpu", "--precision", "bf16", home=tmp_path)
    _assert_one_line(result, "use --provider openvino")
    assert not out.exists()


def test_runtime_options_check_and_pass_the_precision() -> None:
    with pytest.raises(ProviderError, match="fp16 is for GPUs"):
        RuntimeOptions(provider="cpu", precision="fp16")
    runtime = RuntimeOptions(provider="cpu")
    assert runtime.precision == "fp32"
    assert runtime.segment_options("total", ml=True).precision == "fp32"
    if native_bf16():
        bf16 = RuntimeOptions(provider="openvino", precision="bf16")
        assert (bf16.segment_options("total").provider, bf16.segment_options("total").precision) == ("openvino", "bf16")


@pytest.mark.parametrize("providers", [["auto", "cpu"], ["auto", "cpu", "openvino"], ["auto", "cpu", "cuda", "tensorrt"]])
def test_ui_offers_only_precisions_an_installed_provider_runs(providers: list[str]) -> None:
    choices = precision_choices(providers)
    assert choices[0] == "fp32" and "int8" not in choices
    assert ("bf16" in choices) == ("openvino" in providers and native_bf16())
    assert ("fp16" in choices) == ("tensorrt" in providers)
    for precision in choices[1:]:  # every offered precision is accepted by some offered provider
        provider = "openvino" if precision == "bf16" else "tensorrt"
        RuntimeOptions(provider=provider, precision=precision)


def test_ui_offers_int8_for_a_model_with_gated_int8_graphs_on_the_cpu(small_task_store: Path, scans, tmp_path: Path) -> None:  # noqa: F811
    """The store lacks int8 graphs, then `total --fast` is quantized (fixture weights are random: forced): int8 is
    offered for that model and mode on cpu, openvino and auto only, and what the page then runs is int8."""
    from tsrt.models.registry import get_task
    from tsrt.quantization.install import quantize, task_targets
    from tsrt.totalseg.source import read_source
    from tsrt.ui.runner import DEMO_KEY, has_gated_int8, model_choices, segment_for_ui

    models = tmp_path / "home" / "models"
    shutil.copytree(small_task_store / "models", models)
    providers = ["auto", "cpu", "openvino", "cuda", "tensorrt"]
    assert not has_gated_int8("total", True, models) and not has_gated_int8(DEMO_KEY, False)
    assert "int8" not in precision_choices(providers, "cpu", has_gated_int8("total", True, models))

    quantize(task_targets(get_task("total", fast=True), models), scans["calibration"][:1], scans["validation"],
             force=True, max_tiles=2, show_progress=False)
    assert has_gated_int8("total", True, models)
    assert not has_gated_int8("total", False, models) and not has_gated_int8("body", True, models)
    offered = {provider: "int8" in precision_choices(providers, provider, True) for provider in providers}
    assert offered == {"auto": True, "cpu": True, "openvino": True, "cuda": False, "tensorrt": False}
    for provider in ("auto", "cpu", "openvino"):  # each offered pair is accepted
        RuntimeOptions(provider=provider, precision="int8")

    [choice] = [c for c in model_choices(models) if c.key == "total"]
    result = segment_for_ui(read_source(scans["validation"][0]), choice, fast=True, provider="cpu", precision="int8",
                            store_root=models)
    assert result.manifest is not None and result.manifest.precision == "int8"
    assert result.manifest.request.options["precision"] == "int8"


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16 (no avx512_bf16 / amx_bf16 in /proc/cpuinfo)")
def test_demo_runs_in_bf16_on_openvino(tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'tsrt[openvino]')")
    out = tmp_path / "demo"
    result = _tsrt("demo", "-o", str(out), "--provider", "openvino", "--precision", "bf16", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(bf16)" in result.stdout and (out / "segmentation.nii.gz").exists()


def test_demo_refuses_int8_without_a_quantized_model_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = _tsrt("demo", "-o", str(out), "--precision", "int8", home=tmp_path)
    _assert_one_line(result, "tsrt models quantize")
    assert not out.exists()


#: Per report, the options that keep it from asking anything but its models (no phase classifier), and the task
#: whose models it checks first.
REPORTS = {
    "aorta": (("--contrast-phase", "native"), "total --fast"),
    "pulmonary": ((), "total --fast"),
    "spine": (("--contrast-phase", "native"), "vertebrae_pp_refined"),
}


@pytest.mark.parametrize("report", sorted(REPORTS))
def test_reports_refuse_a_precision_the_provider_cannot_run(tmp_path: Path, report: str) -> None:
    out = tmp_path / "report.json"
    flags, _ = REPORTS[report]
    result = _tsrt("report", report, str(tmp_path / "no_such_ct.nii.gz"), "-o", str(out), *flags,
                   "--provider", "cpu", "--precision", "fp16", home=tmp_path)
    _assert_one_line(result, "fp16 is for GPUs")
    assert not out.exists()


@pytest.mark.parametrize("report", sorted(REPORTS))
def test_reports_run_their_models_at_the_precision_asked_for(tmp_path: Path, report: str) -> None:
    """int8 reaches the models the report runs: with an empty store (offline) the one line is the int8 one naming
    the report's task - not the line fp32 gives for a missing model - and comes before the input is looked at."""
    out = tmp_path / "report.json"
    flags, task = REPORTS[report]
    args = ("report", report, str(tmp_path / "no_such_ct.nii.gz"), "-o", str(out), *flags)
    offline = {**os.environ, "TSRT_OFFLINE": "1", "TSRT_HOME": str(tmp_path)}
    int8 = subprocess.run([sys.executable, "-c", "from tsrt.cli.root import main; main()", *args, "--precision", "int8"],
                          capture_output=True, text=True, env=offline)
    _assert_one_line(int8, f"`tsrt models quantize {task}")
    fp32 = subprocess.run([sys.executable, "-c", "from tsrt.cli.root import main; main()", *args],
                          capture_output=True, text=True, env=offline)
    _assert_one_line(fp32, f"Task {task.split()[0]}")
    assert "quantize" not in fp32.stderr and not out.exists()
