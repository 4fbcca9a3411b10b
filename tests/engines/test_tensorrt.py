"""TensorRT engines per precision, as far as a machine without a GPU can test them.

What runs here: the builder configuration chosen for each precision (a pure choice), the engine folders (one per
precision, the same for `tsrt engine build` and `--provider tensorrt`), which int8 graphs TensorRT can build (real
graphs from `tsrt models quantize` in both forms), and every refusal in one line. For the paths behind TensorRT's
availability check, ONNX Runtime is made to *list* TensorRT (as onnxruntime-gpu does on a machine whose TensorRT
libraries are missing): tsrt then goes all the way to a real session, which ONNX Runtime cannot start here.
What needs a GPU (an engine actually built and run, its masks against fp32) is benchmarks/gpu_check.py's.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quantization.test_quantize import scans, write_banded_model  # noqa: F401 (scans: the phantoms fixture)
from tsrt.api import segment
from tsrt.demo.run import demo_model_dir
from tsrt.engines.providers import PROVIDER_NAMES, available_providers, tensorrt_options
from tsrt.engines.tensorrt import (
    ENGINE_PRECISIONS, EngineKey, build_engines, engine_cache_dir, engine_precision, tensorrt_int8_problem,
)
from tsrt.errors import ModelError, ProviderError
from tsrt.models.plan import read_plan
from tsrt.pipeline.infer import load_model

HAS_TRT = PROVIDER_NAMES["tensorrt"] in available_providers()
needs_no_tensorrt = pytest.mark.skipif(HAS_TRT, reason="this machine has TensorRT: the refusals cannot be provoked")

#: Runs tsrt's CLI with this onnxruntime (a CPU build) *listing* TensorRT: sessions are then created for real and
#: ONNX Runtime drops TensorRT by itself.
_TENSORRT_LISTED = (
    "import sys, onnxruntime as ort\n"
    "listed = ort.get_available_providers()\n"
    "ort.get_available_providers = lambda: ['TensorrtExecutionProvider', 'CUDAExecutionProvider', *listed]\n"
    "from tsrt.cli import main\n"
    "sys.argv[0] = 'tsrt'\n"
    "main()\n"
)


def _tsrt(*args: str, home: Path, tensorrt_listed: bool = False) -> subprocess.CompletedProcess:
    code = _TENSORRT_LISTED if tensorrt_listed else "import sys; sys.argv[0] = 'tsrt'\nfrom tsrt.cli import main\nmain()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "TSRT_HOME": str(home)})


def _one_line(result: subprocess.CompletedProcess, message: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("tsrt: error: ") and message in lines[0], result.stderr
    return lines[0]


def _quantized(folder: Path, scans: dict[str, list[Path]], *form: str) -> Path:
    """The banded model quantized by `tsrt models quantize` (form: `--tensorrt` or the default), gated on a phantom."""
    model = write_banded_model(folder)
    calibration = [arg for scan in scans["calibration"] for arg in ("-c", str(scan))]
    result = _tsrt("models", "quantize", str(model), *calibration, "--validation", str(scans["validation"][0]),
                   "--tiles", "8", "-q", *form, home=folder.parent / "home")
    assert result.returncode == 0, result.stderr
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, scans) -> dict[str, Path]:  # noqa: F811 (the imported fixture)
    """The banded model with no int8 graph, with the default (ONNX Runtime/OpenVINO) one, with TensorRT's."""
    root = tmp_path_factory.mktemp("trt")
    return {
        "none": write_banded_model(root / "none"),
        "cpu": _quantized(root / "cpu", scans),
        "tensorrt": _quantized(root / "tensorrt", scans, "--tensorrt"),
    }


# --------------------------------------------------------------------------------------------- pure choices


def test_each_precision_gets_its_builder_flags_and_int8_no_calibrator(tmp_path: Path) -> None:
    options = {precision: tensorrt_options(precision, 1, tmp_path / precision, 2.0) for precision in ENGINE_PRECISIONS}
    assert ENGINE_PRECISIONS == ("fp32", "fp16", "int8")
    flags = {p: (o["trt_fp16_enable"], o["trt_int8_enable"]) for p, o in options.items()}
    assert flags == {"fp32": (False, False), "fp16": (True, False), "int8": (False, True)}
    for precision, chosen in options.items():
        # Explicit quantization: the Q/DQ graph's own scales; a calibration table is not even named.
        assert not any("calibration" in key for key in chosen), chosen
        assert chosen["trt_engine_cache_path"] == chosen["trt_timing_cache_path"] == str(tmp_path / precision)
        assert chosen["device_id"] == 1 and chosen["trt_max_workspace_size"] == 2 << 30
    with pytest.raises(ProviderError, match="fp32, fp16 or int8"):
        tensorrt_options("bf16", 0, tmp_path)


def test_engines_of_each_precision_live_apart(tmp_path: Path) -> None:
    folders = {p: engine_cache_dir(tmp_path, EngineKey("NVIDIA L4", "10.3.0.26", p)) for p in ENGINE_PRECISIONS}
    assert len(set(folders.values())) == 3
    assert {p: f.name for p, f in folders.items()} == {p: f"nvidia-l4_trt10.3.0.26_{p}" for p in ENGINE_PRECISIONS}
    # A graph exported in fp16 builds fp16 engines when fp32 is asked (what its arithmetic is); nothing else moves.
    assert [engine_precision(p, "fp16") for p in ENGINE_PRECISIONS] == ["fp16", "fp16", "int8"]
    assert [engine_precision(p) for p in ENGINE_PRECISIONS] == list(ENGINE_PRECISIONS)


def _tiny_qdq_graph(path: Path, zero_point: np.ndarray, dequantized: TensorProto.DataType = TensorProto.INT8) -> Path:
    """x -> QuantizeLinear -> DequantizeLinear -> y, and an initializer dequantized from `dequantized` (a bias)."""
    quantized = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["dq"], name="dq"),
        helper.make_node("DequantizeLinear", ["b", "scale", "bzp"], ["bias"], name="bias_dq"),
        helper.make_node("Add", ["dq", "bias"], ["y"]),
    ]
    initializers = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("zp", quantized, [], zero_point.reshape(-1).tolist()),
        helper.make_tensor("b", dequantized, [], [3]),
        helper.make_tensor("bzp", dequantized, [], [0]),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
    return path


def test_which_int8_graphs_tensorrt_can_build(models: dict[str, Path], tmp_path: Path) -> None:
    """TensorRT quantizes symmetrically: signed int8, zero points 0, no int32 dequantization."""
    assert tensorrt_int8_problem(models["tensorrt"] / "fold_0.int8.onnx") is None
    assert "uint8 activations" in tensorrt_int8_problem(models["cpu"] / "fold_0.int8.onnx")
    assert "not a Q/DQ graph" in tensorrt_int8_problem(models["none"] / "fold_0.onnx")
    assert tensorrt_int8_problem(_tiny_qdq_graph(tmp_path / "ok.onnx", np.array(0, np.int8))) is None
    assert "asymmetric" in tensorrt_int8_problem(_tiny_qdq_graph(tmp_path / "asym.onnx", np.array(3, np.int8)))
    assert "int32 dequantization" in tensorrt_int8_problem(
        _tiny_qdq_graph(tmp_path / "bias.onnx", np.array(0, np.int8), TensorProto.INT32)
    )


def test_tensorrt_form_is_gated_and_recorded_and_runs_on_the_cpu_like_fp32(models: dict[str, Path], scans, tmp_path):  # noqa: F811
    """`--tensorrt` writes the same gated graph file in TensorRT's form; ONNX Runtime runs it as int8."""
    record = read_plan(models["tensorrt"] / "fold_0.plan.json").int8
    assert record is not None and record["gate"]["passed"] and record["quantization"]["form"] == "tensorrt"
    assert read_plan(models["cpu"] / "fold_0.plan.json").int8["quantization"]["form"] == "cpu"
    scan = scans["validation"][0]
    fp32 = segment(scan, tmp_path / "fp32.nii.gz", models["tensorrt"], provider="cpu", progress=False)
    int8 = segment(scan, tmp_path / "int8.nii.gz", models["tensorrt"], provider="cpu", precision="int8", progress=False)
    assert int8.manifest is not None and int8.manifest.precision == "int8"
    assert float(np.mean(int8.labels == fp32.labels)) == pytest.approx(record["gate"]["agreement"], abs=1e-6)


# --------------------------------------------------------------------------------------------- refusals


@needs_no_tensorrt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_without_tensorrt_engine_build_is_one_line(models: dict[str, Path], tmp_path: Path, precision: str) -> None:
    result = _tsrt("engine", "build", str(models["tensorrt"]), "--precision", precision, home=tmp_path)
    _one_line(result, "TensorRT is not available here")
    assert not (models["tensorrt"] / "engines").exists()


def test_engine_build_refuses_what_tensorrt_does_not_build_in_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    _one_line(_tsrt("engine", "build", str(models["none"]), "--precision", "bf16", home=tmp_path), "runs on OpenVINO")
    _one_line(_tsrt("engine", "build", str(models["none"]), "--fp16", "--precision", "int8", home=tmp_path),
              "--fp16 means --precision fp16")


@needs_no_tensorrt
def test_int8_engines_need_a_gated_graph_in_tensorrts_form(models: dict[str, Path], tmp_path: Path) -> None:
    """With TensorRT listed, each refusal comes before any engine folder exists; the TensorRT-form graph passes
    every check and reaches ONNX Runtime, which cannot start TensorRT on this machine."""
    demo = tmp_path / "demo"
    shutil.copytree(demo_model_dir(), demo)
    build = ("engine", "build")
    no_graph = _one_line(_tsrt(*build, str(demo), "--precision", "int8", home=tmp_path, tensorrt_listed=True),
                         "needs a calibrated int8 graph")
    assert f"`tsrt models quantize {demo} --calibration SCANS`" in no_graph
    wrong_form = _one_line(_tsrt(*build, str(models["cpu"]), "--precision", "int8", home=tmp_path, tensorrt_listed=True),
                           "TensorRT cannot build an int8 engine")
    assert "uint8 activations" in wrong_form and f"tsrt models quantize {models['cpu']}" in wrong_form
    assert "--tensorrt" in wrong_form
    reached = _tsrt(*build, str(models["tensorrt"]), "--precision", "int8", home=tmp_path, tensorrt_listed=True)
    _one_line(reached, "ONNX Runtime could not start the tensorrt provider")
    for model in (demo, *models.values()):
        assert not (model / "engines").exists()  # nothing built, no empty engine folder left behind
    # The same refusal at run time, before the input (which does not exist) is read.
    out = tmp_path / "seg.nii.gz"
    run = _tsrt("segment", str(tmp_path / "no_such.nii.gz"), "-o", str(out), "--model", str(models["cpu"]),
                "--provider", "tensorrt", "--precision", "int8", home=tmp_path, tensorrt_listed=True)
    _one_line(run, "TensorRT cannot build an int8 engine")
    assert not out.exists()


@needs_no_tensorrt
def test_a_run_finds_the_engines_built_for_its_precision(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`tsrt engine build --precision P` and `--provider tensorrt --precision P` name the same engine folder, one per
    precision (read from what each logs before ONNX Runtime, which cannot start TensorRT here, refuses)."""
    import onnxruntime

    listed = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [PROVIDER_NAMES["tensorrt"], *listed])
    model = models["tensorrt"]
    built, found = {}, {}
    with caplog.at_level(logging.INFO, logger="tsrt"):
        for precision in ENGINE_PRECISIONS:
            caplog.clear()
            with pytest.raises(ProviderError, match="could not start the tensorrt provider"):
                build_engines(model, precision=precision)
            [built[precision]] = [r.args[1] for r in caplog.records if r.getMessage().startswith("building")]
            caplog.clear()
            with pytest.raises(ProviderError, match="could not start the tensorrt provider"):
                load_model(model, provider="tensorrt", precision=precision)
            [found[precision]] = [r.args[0] for r in caplog.records if r.getMessage().startswith("TensorRT engine cache")]
    assert built == found
    assert len(set(built.values())) == 3 and all(Path(built[p]).name.endswith(f"_{p}") for p in ENGINE_PRECISIONS)
    assert all(Path(folder).parent == model / "engines" for folder in built.values())
    # The run's own int8 check: a graph in the CPU form never reaches TensorRT.
    caplog.clear()
    with pytest.raises(ModelError, match="TensorRT cannot build an int8 engine"):
        load_model(models["cpu"], provider="tensorrt", precision="int8")
    assert not any(r.getMessage().startswith("TensorRT engine cache") for r in caplog.records)


def test_cuda_still_refuses_int8_and_auto_takes_the_cpu() -> None:
    from tsrt.engines.providers import check_precision, choose_provider

    with pytest.raises(ProviderError, match="not --provider cuda"):
        check_precision("cuda", "int8")
    check_precision("tensorrt", "int8")  # an engine from the gated graph (checked when the model is known)
    assert choose_provider("auto", precision="int8").name == "cpu"
