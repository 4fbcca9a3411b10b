"""`--precision` beyond `tsrt segment`: the companions, the demo, the runtime options and the UI offer it,
and refuse what the provider cannot run in one line, before any input is read or any output written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
