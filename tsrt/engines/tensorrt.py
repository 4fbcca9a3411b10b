"""TensorRT engines for an exported model, built ahead of time through ONNX Runtime's TensorRT provider.

Building a TensorRT engine for a 3D U-Net takes minutes, so `tsrt engine build` does it once per
model, GPU, TensorRT version and precision (fp32, fp16 or int8), for the patch shape and the tile batch
sizes the runtime will use, and stores the engines next to the graphs. `tsrt segment --provider tensorrt
--precision P` then finds the engines of that precision through the same cache folder (`tensorrt_choice`
is the one place both take it from), so engines of different precisions never overwrite each other.

int8 engines are built by explicit quantization from the model's gated int8 graph (`tsrt models quantize`):
TensorRT's INT8 flag on the Q/DQ graph, whose scales the calibration chose and the accuracy gate checked; no
calibrator. TensorRT reads only symmetric int8 Q/DQ (signed int8, zero points 0, no int32 bias
dequantization), so the graph must be quantized in that form (`tsrt models quantize ... --tensorrt`); the
default form (uint8 activations, for ONNX Runtime's CPU kernels and OpenVINO) is refused in one line.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tsrt.errors import ModelError, ProviderError
from tsrt.models.plan import RecordedPlan, load_model_plans
from tsrt.models.store import gated_int8_graphs
from tsrt.engines.providers import (
    PROVIDER_NAMES, TENSORRT_BUILDER_FLAGS, ProviderChoice, available_providers, check_precision, choose_provider,
    create_session, parse_device,
)

log = logging.getLogger("tsrt")

#: The precisions TensorRT engines are built in (`tsrt engine build --precision`).
ENGINE_PRECISIONS = tuple(TENSORRT_BUILDER_FLAGS)


@dataclass(frozen=True)
class EngineKey:
    """What an engine is only valid for: the GPU model, the TensorRT version and the precision."""

    gpu_name: str
    tensorrt_version: str
    precision: str  # fp32 | fp16 | int8

    @property
    def folder_name(self) -> str:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower() or "gpu"
        version = re.sub(r"[^0-9.]+", "", self.tensorrt_version) or "unknown"
        return f"{gpu}_trt{version}_{self.precision}"


def engine_precision(precision: str, graph_precision: str = "fp32") -> str:
    """The precision an engine is built in: as asked, except that a graph exported in fp16 always builds fp16."""
    return "fp16" if graph_precision == "fp16" and precision == "fp32" else precision


def engine_cache_dir(model_dir: Path, key: EngineKey) -> Path:
    """Where the engines of `model_dir` for `key` live: MODEL_DIR/engines/<gpu>_trt<version>_<precision>/."""
    return Path(model_dir) / "engines" / key.folder_name


def gpu_name(device_index: int) -> str:
    """The GPU's model name from nvidia-smi (engines are specific to it), or a generic name."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return f"gpu{device_index}"
    try:
        result = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader", "-i", str(device_index)],
            capture_output=True, text=True, timeout=20, check=True,
        )
        return result.stdout.strip().splitlines()[0] or f"gpu{device_index}"
    except (subprocess.SubprocessError, OSError, IndexError):
        return f"gpu{device_index}"


def tensorrt_version() -> str:
    """The installed TensorRT's version; raises ProviderError when TensorRT cannot be used here."""
    if PROVIDER_NAMES["tensorrt"] not in available_providers():
        raise ProviderError(
            "TensorRT is not available here (onnxruntime has no TensorrtExecutionProvider): "
            "install 'tsrt[tensorrt]' on a machine with an NVIDIA GPU, or use --provider cpu/cuda."
        )
    try:
        import tensorrt  # noqa: PLC0415 - optional dependency

        return str(tensorrt.__version__)
    except ImportError:
        return "ort-bundled"


def engine_cache_for(model_dir: Path, precision: str, device: str | None = None) -> Path:
    """The engine folder of `model_dir` for this GPU, this TensorRT and `precision` (needs TensorRT)."""
    key = EngineKey(gpu_name(parse_device(device)), tensorrt_version(), precision)
    return engine_cache_dir(model_dir, key)


def tensorrt_choice(
    model_dir: Path,
    precision: str,
    *,
    requested: str = "tensorrt",
    device: str | None = None,
    threads: int | None = None,
    workspace_gb: float = 4.0,
) -> ProviderChoice:
    """The TensorRT provider for `model_dir`'s engines of `precision` (engine_precision's): what `tsrt engine build`
    builds with and what `--provider tensorrt` runs with, so a run finds exactly the engines built for it."""
    cache = engine_cache_for(model_dir, precision, device)
    log.info("TensorRT engine cache: %s", cache)
    return choose_provider(
        requested, precision=precision, device=device, fp16=precision == "fp16", engine_cache_dir=cache,
        workspace_gb=workspace_gb, threads=threads,
    )


def tensorrt_int8_problem(graph: Path) -> str | None:
    """Why TensorRT cannot build an int8 engine from this Q/DQ graph, or None when it can.

    TensorRT quantizes symmetrically only: every QuantizeLinear/DequantizeLinear must have a signed int8 zero
    point of 0 (a missing one means uint8 in ONNX); an int32 DequantizeLinear (ONNX Runtime's quantized biases)
    has no TensorRT layer. A graph without QuantizeLinear is not quantized at all.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(graph))
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    nodes = [node for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not any(node.op_type == "QuantizeLinear" for node in nodes):
        return "it holds no QuantizeLinear nodes (it is not a Q/DQ graph)"
    problems: list[tuple[int, str]] = []  # (how telling, what): the most telling is said
    for node in nodes:
        name = f"{node.op_type} {node.name or node.output[0]}"
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero_point is None:
            missing = len(node.input) < 3 or not node.input[2]
            problems.append((0, f"{name} has no zero point (uint8 in ONNX)" if missing else
                             f"the zero point of {name} is not a constant"))
        elif zero_point.data_type == TensorProto.UINT8:
            problems.append((0, f"uint8 activations ({name})"))
        elif zero_point.data_type != TensorProto.INT8:
            kind = TensorProto.DataType.Name(zero_point.data_type).lower()
            problems.append((2, f"{kind} dequantization, e.g. of a quantized bias ({name})"))
        elif np.any(numpy_helper.to_array(zero_point) != 0):
            problems.append((1, f"zero points other than 0, asymmetric ({name})"))
    return min(problems)[1] if problems else None


def check_tensorrt_int8_graphs(model_dir: Path, graphs: Sequence[Path]) -> None:
    """Refuse, in one line, gated int8 graphs TensorRT cannot build (before minutes of building or any image)."""
    for graph in graphs:
        problem = tensorrt_int8_problem(graph)
        if problem is not None:
            raise ModelError(
                f"TensorRT cannot build an int8 engine from {graph} ({problem}): TensorRT needs symmetric int8; "
                f"quantize for it with `tsrt models quantize {model_dir} --calibration SCANS --tensorrt`, "
                "or use --precision fp16 on TensorRT."
            )


def engine_graphs(model_dir: Path, plans: list[RecordedPlan], precision: str) -> list[Path]:
    """The graph each fold's engine is built from: the exported graph, or for int8 the gated int8 graph (checked:
    present, the bytes its gate passed, in TensorRT's symmetric form); refusals are one line."""
    if precision != "int8":
        return [plan.graph_path for plan in plans]
    graphs = gated_int8_graphs(Path(model_dir), plans)
    check_tensorrt_int8_graphs(Path(model_dir), graphs)
    return graphs


def build_engines(
    model_dir: Path,
    *,
    precision: str = "fp32",
    workspace_gb: float = 4.0,
    batch_sizes: Sequence[int] = (1,),
    device: str | None = None,
    folds: Sequence[str] | None = None,
) -> Path:
    """Build (or reuse) the TensorRT engines of every fold at `precision` for the patch shape and batch sizes.

    Each batch size is run once through a TensorRT-provider session with the engine cache on; ONNX
    Runtime serialises the engine it builds into the cache folder, which later sessions reuse.
    """
    check_precision("tensorrt", precision)  # bf16 or a typo: one line, before anything else
    tensorrt_version()  # fails first, in one line, when there is no TensorRT
    plans = load_model_plans(Path(model_dir), None if folds is None else [str(f) for f in folds])
    graphs = engine_graphs(Path(model_dir), plans, precision)  # int8: no gated graph is one line, before building
    precision = engine_precision(precision, plans[0].graph_precision)
    choice = tensorrt_choice(Path(model_dir), precision, device=device, workspace_gb=workspace_gb)
    cache = Path(choice.providers[0][1]["trt_engine_cache_path"])  # engine_cache_for's folder
    cache.mkdir(parents=True, exist_ok=True)
    log.info("building %s TensorRT engines into %s", precision, cache)
    try:
        for plan, graph in zip(plans, graphs):
            session = create_session(graph, choice)
            for batch in batch_sizes:
                tiles = np.zeros((batch, plan.num_input_channels, *plan.patch_size), dtype=np.float32)
                session.run([plan.graph_output_name], {plan.graph_input_name: tiles})
                log.info("engine ready: fold %s, batch %d, %s", plan.fold, batch, precision)
    except BaseException:
        for folder in (cache, cache.parent):  # nothing built: leave no empty engine folder behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return cache
