"""Execution-provider selection, TensorRT engine cache keys and the error paths a CPU machine can test."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tsrt.engines.tensorrt import EngineKey, build_engines, engine_cache_dir
from tsrt.errors import ProviderError
from tsrt.engines.providers import PROVIDER_NAMES, available_providers, choose_provider, parse_device

HAS_CUDA = PROVIDER_NAMES["cuda"] in available_providers()
HAS_TRT = PROVIDER_NAMES["tensorrt"] in available_providers()


def test_auto_picks_an_available_provider_and_ends_with_cpu():
    choice = choose_provider("auto")
    assert choice.providers[-1][0] == "CPUExecutionProvider"
    assert PROVIDER_NAMES[choice.name] in available_providers()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA; the missing-provider error cannot be provoked")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(ProviderError, match="cuda execution provider is not available.*--provider cpu"):
        choose_provider("cuda")


@pytest.mark.skipif(HAS_TRT, reason="this machine has TensorRT; the missing-provider error cannot be provoked")
def test_missing_tensorrt_is_a_clear_error_and_engine_build_refuses(tmp_path):
    with pytest.raises(ProviderError, match="tensorrt"):
        choose_provider("tensorrt")
    with pytest.raises(ProviderError, match="TensorRT is not available here"):
        build_engines(tmp_path)


def test_unknown_provider_and_device_are_rejected():
    with pytest.raises(ProviderError, match="Unknown provider"):
        choose_provider("rocm")
    with pytest.raises(ProviderError, match="gpu:N"):
        parse_device("tpu:0")
    assert parse_device("gpu:3") == 3 and parse_device(None) == 0


@pytest.mark.skipif(not HAS_TRT, reason="needs onnxruntime-gpu with TensorRT and an NVIDIA GPU, which CI does not have")
def test_tensorrt_provider_options_carry_cache_precision_and_workspace(tmp_path):
    choice = choose_provider("tensorrt", device="gpu:0", fp16=True, engine_cache_dir=tmp_path, workspace_gb=2)
    name, options = choice.providers[0]
    assert name == "TensorrtExecutionProvider"
    assert options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_path"] == str(tmp_path)
    assert options["trt_max_workspace_size"] == 2 * (1 << 30)
    assert [n for n, _ in choice.providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_engine_cache_is_keyed_by_gpu_tensorrt_version_and_precision(tmp_path):
    fp32 = engine_cache_dir(tmp_path, EngineKey("NVIDIA A100-SXM4-40GB", "10.3.0.26", "fp32"))
    fp16 = engine_cache_dir(tmp_path, EngineKey("NVIDIA A100-SXM4-40GB", "10.3.0.26", "fp16"))
    other_gpu = engine_cache_dir(tmp_path, EngineKey("NVIDIA L4", "10.3.0.26", "fp32"))
    other_trt = engine_cache_dir(tmp_path, EngineKey("NVIDIA A100-SXM4-40GB", "10.4.0", "fp32"))
    assert len({fp32, fp16, other_gpu, other_trt}) == 4
    assert fp32.parent == tmp_path / "engines"
    assert fp32.name == "nvidia-a100-sxm4-40gb_trt10.3.0.26_fp32"


@pytest.mark.skipif(HAS_TRT, reason="this machine has TensorRT; the one-line refusal cannot be provoked")
def test_engine_build_cli_says_one_line_and_exits_nonzero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", "engine", "build", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tsrt: error: TensorRT is not available here"), result.stderr


_ARENA_PROBE = r'''
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from tsrt.engines.providers import choose_provider, create_session

# y = sum(expand(x)^2): two 256 MB intermediates that live only inside a run.
graph = helper.make_graph(
    [
        helper.make_node("Expand", ["x", "shape"], ["big"]),
        helper.make_node("Mul", ["big", "big"], ["squared"]),
        helper.make_node("ReduceSum", ["squared"], ["y"], keepdims=0),
    ],
    "arena_probe",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    [helper.make_tensor("shape", TensorProto.INT64, [3], [64, 1024, 1024])],
)
path = Path(sys.argv[1]) / "probe.onnx"
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

def peak_mb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024

if sys.argv[2] == "tsrt":
    session = create_session(path, choose_provider("cpu"), threads=1)
else:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
before, peak_before = resident_mb(), peak_mb()
for _ in range(2):
    y = session.run(None, {"x": np.ones(1, np.float32)})[0]
assert float(y) == 64 * 1024 * 1024, y
print(resident_mb() - before, peak_mb() - peak_before)
'''


def test_cpu_sessions_give_activation_memory_back_after_each_run(tmp_path):
    """A tile's activations (about 1 GB on TotalSegmentator's networks) must not stay reserved while
    tsrt accumulates that tile's logits, and the arena must not round its growth up: ONNX Runtime's
    defaults keep the activations and grow the arena in powers of two (tsrt's shared arena grows by
    what is asked)."""
    env = {**os.environ, "TSRT_HOME": str(tmp_path / "home")}
    kept_mb, peak_mb = {}, {}
    for mode in ("tsrt", "plain"):
        done = subprocess.run([sys.executable, "-c", _ARENA_PROBE, str(tmp_path), mode], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        kept_mb[mode], peak_mb[mode] = map(float, done.stdout.strip().splitlines()[-1].split())
    print("kept", kept_mb, "peak", peak_mb)
    assert kept_mb["plain"] > 500, f"the probe did not allocate its 512 MB of intermediates: {kept_mb}"
    assert kept_mb["tsrt"] < kept_mb["plain"] / 3, f"tsrt's session kept its activations reserved: {kept_mb}"
    assert 500 < peak_mb["tsrt"] <= peak_mb["plain"], f"the probe's peak: {peak_mb}"


def test_cpu_sessions_share_one_arena_that_grows_by_what_is_asked(tmp_path, monkeypatch):
    """Every tsrt CPU session allocates from the process-wide arena (kSameAsRequested: on the TotalSegmentator-sized
    net, --fast example_ct peaks 1805 instead of 1966 MiB, farm-bench 2026-12-07); sessions opened one after the
    other on it give the outputs a plain ONNX Runtime session gives."""
    import numpy as np
    import onnxruntime as ort

    from tsrt.engines.providers import create_session

    monkeypatch.setenv("TSRT_HOME", str(tmp_path))
    graph = _demo_graph()
    tile = np.random.default_rng(3).normal(size=(1, 1, 64, 64, 64)).astype(np.float32)
    expected = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"input": tile})[0]
    for _ in range(2):
        session = create_session(graph, choose_provider("cpu"))
        assert session.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
        np.testing.assert_allclose(session.run(None, {"input": tile})[0], expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------- what actually ran

#: Makes this onnxruntime (a CPU build) *list* CUDA, as onnxruntime-gpu does on a machine whose CUDA libraries
#: are missing: the session is then created for real and ONNX Runtime drops CUDA by itself.
_CUDA_LISTED_BUT_BROKEN = (
    "import sys, onnxruntime as ort\n"
    "listed = ort.get_available_providers()\n"
    "ort.get_available_providers = lambda: ['CUDAExecutionProvider', *listed]\n"
    "from tsrt.cli import main\n"
    "sys.argv[0] = 'tsrt'\n"
    "main()\n"
)


def _demo_graph():
    from tsrt.demo.run import demo_model_dir

    return next(demo_model_dir().glob("fold_*.onnx"))


def test_a_provider_ort_could_not_start_is_an_error_naming_the_libraries():
    from tsrt.engines.providers import ProviderChoice, create_session

    # A real session asked for CUDA whose provider list ends up CPU-only: what ORT does when CUDA fails to load.
    choice = ProviderChoice("cuda", [("CPUExecutionProvider", {})], requested="cuda")
    with pytest.raises(ProviderError) as raised:
        create_session(_demo_graph(), choice)
    message = str(raised.value)
    assert "\n" not in message and "cuDNN" in message and "--provider cpu" in message and "would run on cpu" in message


def test_auto_may_fall_back_but_says_so_and_records_what_ran(caplog):
    from tsrt.engines.providers import ProviderChoice, create_session

    choice = ProviderChoice("cuda", [("CPUExecutionProvider", {})], requested="auto")
    with caplog.at_level("WARNING", logger="tsrt"):
        session = create_session(_demo_graph(), choice)
    assert session.provider_name == "cpu"
    assert any("falls back" in record.getMessage() for record in caplog.records)


def test_cli_refuses_a_silent_cpu_fallback_and_writes_nothing(tmp_path, shared_data):
    from tsrt.demo.run import demo_model_dir

    output = tmp_path / "out" / "seg.nii.gz"
    args = ["segment", str(shared_data / "example_ct_sm.nii.gz"), "-o", str(output), "--model", str(demo_model_dir()),
            "-q"]
    run = subprocess.run(
        [sys.executable, "-c", _CUDA_LISTED_BUT_BROKEN, *args, "--provider", "cuda"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", env={**os.environ, "PYTHONUTF8": "1"},
    )
    assert run.returncode == ProviderError.exit_code, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tsrt: error: ONNX Runtime could not start the cuda provider")
    assert not output.exists() and not list(tmp_path.rglob("*.nii.gz"))
    # auto: the same broken CUDA falls back to the CPU, with a warning even under -q, and the run completes.
    run = subprocess.run(
        [sys.executable, "-c", _CUDA_LISTED_BUT_BROKEN, *args, "--provider", "auto"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", env={**os.environ, "PYTHONUTF8": "1"},
    )
    assert run.returncode == 0, run.stderr
    assert "could not start the cuda provider" in run.stderr and output.is_file()


def test_a_tampered_optimised_graph_cache_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    import numpy as np

    from tsrt.engines.providers import ProviderChoice, create_session, optimized_cache_path
    from tsrt.models.store import sha256_file

    monkeypatch.setenv("TSRT_HOME", str(tmp_path))
    graph = _demo_graph()
    choice = choose_provider("cpu")
    first = create_session(graph, choice)
    cached = optimized_cache_path(sha256_file(graph), graph, choice)
    assert cached.is_file()
    tile = np.random.default_rng(0).normal(size=(1, 1, 64, 64, 64)).astype(np.float32)
    expected = first.run(None, {"input": tile})[0]
    # Same size, same mtime, different bytes: flip one byte inside the largest initializer's data.
    stat = cached.stat()
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cached.stat().st_size == stat.st_size
    second = create_session(graph, choice)
    np.testing.assert_array_equal(second.run(None, {"input": tile})[0], expected)
    assert sha256_file(cached) != hashlib.sha256(bytes(data)).hexdigest()  # rebuilt from the source graph
    # Another source graph (other bytes) never shares the cache entry.
    other = tmp_path / graph.name
    other.write_bytes(graph.read_bytes() + b"\0")
    assert optimized_cache_path(sha256_file(other), other, choice) != cached
    assert isinstance(choice, ProviderChoice)


def test_an_unchanged_cache_opens_without_being_hashed_and_a_copied_one_is_restamped(tmp_path, monkeypatch):
    """The seal holds the file's stat stamp: an unchanged cache is trusted without reading it (start-up time);
    the same bytes under a new inode (a copied home) are hashed once, found intact, kept and stamped anew."""
    import shutil

    import tsrt.engines.providers as providers
    from tsrt.models.store import sha256_file

    monkeypatch.setenv("TSRT_HOME", str(tmp_path))
    graph = _demo_graph()
    choice = choose_provider("cpu")
    providers.create_session(graph, choice)
    cached = providers.optimized_cache_path(sha256_file(graph), graph, choice)
    hashed: list[Path] = []
    monkeypatch.setattr(providers, "sha256_file", lambda path: hashed.append(Path(path)) or sha256_file(path))
    assert providers.intact_cache(cached) and hashed == []
    copy = cached.with_suffix(".copy")
    shutil.copy2(cached, copy)
    os.replace(copy, cached)  # same bytes and mtime, new inode and ctime
    assert providers.intact_cache(cached) and hashed == [cached]
    assert providers.intact_cache(cached) and hashed == [cached], "the renewed stamp is trusted again"
    assert providers.sealed_sha256(cached) == sha256_file(cached)


def test_bf16_is_refused_in_one_line_on_a_cpu_without_native_bf16(monkeypatch) -> None:
    """The refusal's wording on any CPU (tests/cli/test_cli_precision.py runs it for real where it applies)."""
    import tsrt.engines.providers as providers

    monkeypatch.setattr(providers, "native_bf16", lambda: False)
    with pytest.raises(ProviderError, match="no native bfloat16 .* use --precision fp32") as refused:
        providers.resolve_precision("openvino", "bf16")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("provider", ["cpu", "openvino"])
def test_omp_num_threads_caps_every_session_as_it_caps_pytorch(tmp_path, monkeypatch, provider):
    """OMP_NUM_THREADS, which caps PyTorch (official TotalSegmentator), caps tsrt's sessions too; an explicit
    thread count wins, and a value that is not a positive whole number leaves the engine's default."""
    if provider == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'tsrt[openvino]')")
    from tsrt.engines.providers import create_session

    monkeypatch.setenv("TSRT_HOME", str(tmp_path))

    def threads_used(session) -> int:
        if provider == "openvino":
            return int(session.compiled.get_property("INFERENCE_NUM_THREADS"))
        return session.get_session_options().intra_op_num_threads

    def opened(**kwargs):
        return create_session(_demo_graph(), choose_provider(provider), **kwargs)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_used(opened()) == 1
    assert threads_used(opened(threads=2)) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    default = threads_used(opened())
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads_used(opened()) == default
    assert default != 1 or os.cpu_count() == 1  # the engine's default: every core
