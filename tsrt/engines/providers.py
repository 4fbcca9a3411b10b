"""Choosing execution providers (ONNX Runtime CPU, CUDA, TensorRT; OpenVINO) and creating sessions.

`auto` takes the best provider this onnxruntime build offers and says which in one line; an
explicitly requested provider that is missing is an error with what to install, never a silent
CPU fallback. Sessions cache ONNX Runtime's optimised graph on disk so a repeat start is fast.

`openvino` (opt-in, the `openvino` extra) runs the same ONNX graph on Intel's OpenVINO CPU runtime
in float32; `openvino-bf16` asks it for bfloat16 arithmetic, which is fast only on CPUs with native
bf16 (AMX / AVX512_BF16) and changes results slightly - never a default.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsrt.config import tsrt_home
from tsrt.errors import ProviderError, missing_extra

log = logging.getLogger("tsrt")

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_PREFERENCE = ("tensorrt", "cuda", "cpu")
#: OpenVINO providers (not ONNX Runtime's) and the inference precision each asks OpenVINO for.
OPENVINO_PRECISIONS = {"openvino": "f32", "openvino-bf16": "bf16"}
PROVIDER_CHOICES = ("auto", *PROVIDER_NAMES, *OPENVINO_PRECISIONS)


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def parse_device(device: str | None) -> int:
    """`gpu`, `gpu:N`, `cuda:N` or `cpu` -> GPU index (0 when not given)."""
    if not device or device in ("cpu", "gpu", "cuda"):
        return 0
    kind, _, index = device.partition(":")
    if kind not in ("gpu", "cuda") or not index.isdigit():
        raise ProviderError(f"Device {device!r} is not understood: use cpu, gpu or gpu:N (for example gpu:1).")
    return int(index)


@dataclass
class ProviderChoice:
    """The provider chosen for a run and the ordered provider list (with options) for ORT."""

    name: str  # cpu | cuda | tensorrt | openvino | openvino-bf16
    providers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    threads: int | None = None  # intra-op threads; None lets ONNX Runtime use every core

    @property
    def uses_gpu(self) -> bool:
        return self.name in ("cuda", "tensorrt")

    @property
    def uses_openvino(self) -> bool:
        return self.name in OPENVINO_PRECISIONS


def choose_provider(
    requested: str = "auto",
    *,
    device: str | None = None,
    fp16: bool = False,
    engine_cache_dir: Path | None = None,
    workspace_gb: float = 4.0,
    threads: int | None = None,
) -> ProviderChoice:
    """Build the provider list for `requested` (see PROVIDER_CHOICES), checking availability."""
    requested = requested.lower()
    if requested not in PROVIDER_CHOICES:
        choices = f"{', '.join(PROVIDER_CHOICES[:-1])} or {PROVIDER_CHOICES[-1]}"
        raise ProviderError(f"Unknown provider {requested!r}: choose {choices}.")
    if requested in OPENVINO_PRECISIONS:
        _check_openvino(requested)
        return ProviderChoice(name=requested, threads=threads)
    available = available_providers()
    if requested == "auto":
        name = next(p for p in _PREFERENCE if PROVIDER_NAMES[p] in available or p == "cpu")
        log.info("provider: %s (auto; available: %s)", name, ", ".join(available))
    else:
        name = requested
        if PROVIDER_NAMES[name] not in available:
            hint = "pip install 'tsrt[gpu]'" if name == "cuda" else "pip install 'tsrt[tensorrt]' on a machine with TensorRT"
            raise ProviderError(
                f"The {name} execution provider is not available in this onnxruntime build "
                f"(available: {', '.join(available)}): use --provider cpu or auto, or {hint}."
            )
    gpu = parse_device(device)
    cpu_options: dict[str, Any] = {}
    chain: list[tuple[str, dict[str, Any]]] = []
    if name == "tensorrt":
        cache = engine_cache_dir or (tsrt_home() / "engines")
        chain.append(
            (
                PROVIDER_NAMES["tensorrt"],
                {
                    "device_id": gpu,
                    "trt_fp16_enable": bool(fp16),
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": str(cache),
                    "trt_max_workspace_size": int(workspace_gb * (1 << 30)),
                },
            )
        )
    if name in ("tensorrt", "cuda"):
        chain.append(
            (
                PROVIDER_NAMES["cuda"],
                {
                    "device_id": gpu,
                    "arena_extend_strategy": "kSameAsRequested",
                    "cudnn_conv_algo_search": "EXHAUSTIVE",
                    "do_copy_in_default_stream": True,
                },
            )
        )
    chain.append((PROVIDER_NAMES["cpu"], cpu_options))
    return ProviderChoice(name=name, providers=chain, threads=threads)


def _check_openvino(requested: str) -> None:
    """OpenVINO is an optional extra; bf16 without native CPU support is emulated (slow), so say so."""
    try:
        import openvino
    except ModuleNotFoundError:
        raise missing_extra(f"--provider {requested}", "OpenVINO", "openvino", kind=ProviderError) from None
    if OPENVINO_PRECISIONS[requested] == "bf16":
        capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in capabilities:
            log.warning(
                "This CPU has no native bfloat16 (OpenVINO reports %s): bf16 is emulated and slower than "
                "--provider openvino.", ", ".join(capabilities)
            )


class OpenVinoSession:
    """An ONNX graph compiled by OpenVINO for the CPU, answering ONNX Runtime's `run` call.

    The sliding window then needs no second code path. Outputs are copied out of OpenVINO's
    buffers (its default), because callers may keep one tile's logits while running the next.
    """

    def __init__(self, graph: Path, precision: str, threads: int | None = None) -> None:
        import openvino

        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = openvino.Core().compile_model(str(graph), "CPU", config)
        self._request = self.compiled.create_infer_request()

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        results = self._request.infer(feeds)
        outputs = output_names or [output.get_any_name() for output in self.compiled.outputs]
        return [results[self.compiled.output(name)] for name in outputs]


def _cpu_signature() -> str:
    """The CPU model: ORT's fully optimised CPU graphs may use instructions only this CPU has."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _optimized_cache_path(graph: Path, choice: ProviderChoice) -> Path:
    import onnxruntime as ort

    stat = graph.stat()
    key = f"{graph.resolve()}:{stat.st_mtime_ns}:{stat.st_size}:{_cpu_signature()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return tsrt_home() / "cache" / "ort" / f"{graph.stem}-{digest}-ort{ort.__version__}-{choice.name}.onnx"


def create_session(graph: Path, choice: ProviderChoice, *, threads: int | None = None):
    """An InferenceSession for `graph` on the chosen providers.

    On CPU, ONNX Runtime's fully optimised graph is saved once and loaded on later runs with
    optimisation switched off, which removes most of the start-up cost. GPU providers fuse
    differently per device, so for them the cache is the TensorRT engine cache instead.
    """
    threads = threads or choice.threads
    if choice.uses_openvino:
        return OpenVinoSession(graph, OPENVINO_PRECISIONS[choice.name], threads)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # The memory pattern pre-plans one block per run shape and keeps it beside the arena: +1 GB on a
    # 128^3 TotalSegmentator tile from the second tile on, and no faster here (see _ArenaReleasingSession).
    options.enable_mem_pattern = False
    source = graph
    if choice.name == "cpu":
        cached = _optimized_cache_path(graph, choice)
        if cached.exists():
            source = cached
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        else:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                options.optimized_model_filepath = str(cached.with_suffix(f".tmp{os.getpid()}.onnx"))
            except OSError:
                pass  # a read-only home only costs start-up time
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    names = [name for name, _ in choice.providers]
    provider_options = [opts for _, opts in choice.providers]
    session = ort.InferenceSession(str(source), sess_options=options, providers=names, provider_options=provider_options)
    temp = getattr(options, "optimized_model_filepath", "")
    if temp and Path(temp).exists():
        os.replace(temp, _optimized_cache_path(graph, choice))
    return _ArenaReleasingSession(session)


class _ArenaReleasingSession:
    """An ONNX Runtime session whose CPU arena gives its memory back after every run.

    A 128^3 TotalSegmentator tile needs about 1 GB of activations; a growing arena keeps that reserved
    while tsrt accumulates the tile's logits, so both would count toward peak memory. Shrinking
    costs no measurable time on this machine (6.3 s per tile either way).
    """

    def __init__(self, session) -> None:
        import onnxruntime as ort

        self._session = session
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        return self._session.run(output_names, feeds, self._run_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)
