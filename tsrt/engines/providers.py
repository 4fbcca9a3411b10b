"""Choosing execution providers (ONNX Runtime CPU, CUDA, TensorRT; OpenVINO) and creating sessions.

`auto` takes the best provider this onnxruntime build offers and says which in one line; an
explicitly requested provider that is missing is an error with what to install, never a silent
CPU fallback: ONNX Runtime quietly drops a GPU provider whose libraries (CUDA, cuDNN, TensorRT) fail
to load, so every new session is checked for the provider it actually runs (`provider_in_use`). Sessions cache ONNX Runtime's optimised graph on disk so a repeat start is fast.

`openvino` (opt-in, the `openvino` extra) runs the same ONNX graph on Intel's OpenVINO CPU runtime.

Precision is its own option (`--precision`, default fp32), separate from the provider (the engine):
bf16 runs on OpenVINO and only on CPUs with native bf16 (AVX512_BF16 / AMX; emulated it was 2x slower),
fp16 on TensorRT (or CUDA with an fp16 graph), int8 on the CPU (ONNX Runtime or OpenVINO) or as a TensorRT engine,
and only with the gated int8 graph `tsrt models quantize` installs (tsrt.models.plan.require_int8 says how to make
one; TensorRT needs it in its symmetric form, tsrt.engines.tensorrt). A
precision the provider cannot run is refused in one line before any image is read (`check_precision`), never
run slowly.
The old `--provider openvino-bf16` spelling still means `--provider openvino --precision bf16`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np

from tsrt.config import threads_from_environment, tsrt_home
from tsrt.errors import ProviderError, missing_extra
from tsrt.models.store import sha256_file

log = logging.getLogger("tsrt")

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_PREFERENCE = ("tensorrt", "cuda", "cpu")
#: The precisions tsrt can be asked for (`--precision`); fp32 is always the default.
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: The inference precision hint OpenVINO (not an ONNX Runtime provider) gets for each precision it runs.
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the QDQ graph's own int8 ops
#: Old provider spellings that named a precision too: spelling -> (provider, precision).
DEPRECATED_PROVIDERS = {"openvino-bf16": ("openvino", "bf16")}
PROVIDER_CHOICES = ("auto", *PROVIDER_NAMES, "openvino")
#: CPU flags (/proc/cpuinfo) that mean native bfloat16 arithmetic.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


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

    name: str  # cpu | cuda | tensorrt | openvino
    providers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    threads: int | None = None  # intra-op threads; None: OMP_NUM_THREADS, else every core (tsrt.config)
    requested: str = ""  # what the user asked for ("auto" may fall back, with a warning; nothing else may)
    precision: str = "fp32"  # the arithmetic asked for (PRECISIONS), already checked against the provider

    @property
    def uses_gpu(self) -> bool:
        return self.name in ("cuda", "tensorrt")

    @property
    def uses_openvino(self) -> bool:
        return self.name == "openvino"


def resolve_precision(provider: str = "auto", precision: str = "fp32") -> tuple[str, str]:
    """(provider, precision) with the old `openvino-bf16` spelling mapped (and a deprecation line), checked
    by `check_precision`: every caller (CLI, API, options, cohort jobs) resolves once, before any image is read."""
    provider, precision = provider.lower(), (precision or "fp32").lower()
    if provider in DEPRECATED_PROVIDERS:
        new_provider, new_precision = DEPRECATED_PROVIDERS[provider]
        if precision not in ("fp32", new_precision):
            raise ProviderError(f"--provider {provider} means --precision {new_precision}, not {precision}: "
                                f"use --provider {new_provider} --precision {precision}.")
        log.warning("--provider %s is deprecated: use --provider %s --precision %s.", provider, new_provider, new_precision)
        provider, precision = new_provider, new_precision
    check_precision(provider, precision)
    return provider, precision


def check_precision(provider: str, precision: str, graph_precision: str | None = None) -> None:
    """Refuse, in one line, a precision the provider cannot run (fast) - said before any work, not run slowly.

    `graph_precision` is the model's graphs' (when known): CUDA runs fp16 only from an fp16 graph, and
    int8 runs the model's gated int8 graph ("int8" when it has one; the model layer names the command that
    makes one, so unknown passes here).
    """
    if precision not in PRECISIONS:
        raise ProviderError(f"Unknown precision {precision!r}: choose {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}.")
    if precision == "int8":
        if provider == "cuda":
            raise ProviderError("--precision int8 runs on the CPU (--provider cpu or openvino) or as a TensorRT engine "
                                "(--provider tensorrt), not --provider cuda: use --precision fp16 on CUDA.")
        if graph_precision is not None and graph_precision != "int8":
            raise ProviderError("--precision int8 needs a calibrated int8 graph, which this model does not have: make "
                                "one with `tsrt models quantize MODEL --calibration SCANS`, or use --precision fp32.")
    if precision == "bf16":
        if provider != "openvino":
            raise ProviderError(f"--precision bf16 runs on OpenVINO, not --provider {provider}: use --provider openvino "
                                "--precision bf16 (pip install 'tsrt[openvino]').")
        if not native_bf16():
            raise ProviderError("This CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag): bf16 would be "
                                "emulated and slower than fp32, so use --precision fp32.")
    if precision == "fp16":
        engine = auto_provider() if provider == "auto" else provider
        if engine in ("cpu", "openvino"):
            raise ProviderError(f"--precision fp16 is for GPUs (--provider tensorrt), not the {engine} provider: "
                                "use --precision fp32 on the CPU.")
        if engine == "cuda" and graph_precision is not None and graph_precision != "fp16":
            raise ProviderError("--precision fp16 on --provider cuda needs a model exported in fp16 "
                                "(tsrt export --verify-with-torch --fp16): use --provider tensorrt, or --precision fp32.")


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: its /proc/cpuinfo flags, else OpenVINO's capabilities."""
    try:
        flags = next(
            (line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("flags")), None,
        )
    except OSError:
        flags = None
    if flags is not None:
        return any(flag in flags for flag in BF16_CPU_FLAGS)
    try:
        import openvino
    except ModuleNotFoundError:
        return False
    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def auto_provider() -> str:
    """The provider `--provider auto` takes: the best this onnxruntime build offers."""
    available = available_providers()
    return next(p for p in _PREFERENCE if PROVIDER_NAMES[p] in available or p == "cpu")


def choose_provider(
    requested: str = "auto",
    *,
    precision: str = "fp32",
    device: str | None = None,
    fp16: bool = False,
    engine_cache_dir: Path | None = None,
    workspace_gb: float = 4.0,
    threads: int | None = None,
    graph_precision: str | None = None,
) -> ProviderChoice:
    """Build the provider list for `requested` (see PROVIDER_CHOICES) at `precision`, checking availability.

    `fp16` says the graph itself is fp16 (TensorRT then builds fp16 engines, as for --precision fp16).
    """
    requested, precision = resolve_precision(requested, precision)
    if requested not in PROVIDER_CHOICES:
        choices = f"{', '.join(PROVIDER_CHOICES[:-1])} or {PROVIDER_CHOICES[-1]}"
        raise ProviderError(f"Unknown provider {requested!r}: choose {choices}.")
    if graph_precision is not None:
        check_precision(requested, precision, graph_precision)
    if requested == "openvino":
        _check_openvino(requested)
        return ProviderChoice(name=requested, threads=threads, requested=requested, precision=precision)
    available = available_providers()
    if requested == "auto":
        name = "cpu" if precision == "int8" else auto_provider()  # int8 graphs run on the CPU
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
        engine_precision = "fp16" if fp16 and precision == "fp32" else precision  # an fp16 graph builds fp16 engines
        chain.append((PROVIDER_NAMES["tensorrt"], tensorrt_options(engine_precision, gpu, cache, workspace_gb)))
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
    precision = "fp16" if fp16 and name == "tensorrt" else precision
    return ProviderChoice(name=name, providers=chain, threads=threads, requested=requested, precision=precision)


#: TensorRT's builder flags per precision (ONNX Runtime's names). fp16: half-precision kernels where TensorRT finds
#: them faster. int8: explicit quantization - the INT8 flag on the gated Q/DQ graph, whose Q/DQ nodes carry the
#: scales, so no calibrator and no calibration table (TensorRT refuses one for a Q/DQ graph); the layers the graph
#: keeps float (the output layer, ConvTranspose, normalisation) stay fp32, as the accuracy gate measured them.
TENSORRT_BUILDER_FLAGS: dict[str, dict[str, bool]] = {
    "fp32": {"trt_fp16_enable": False, "trt_int8_enable": False},
    "fp16": {"trt_fp16_enable": True, "trt_int8_enable": False},
    "int8": {"trt_fp16_enable": False, "trt_int8_enable": True},
}


def tensorrt_options(precision: str, device_id: int, cache: Path, workspace_gb: float = 4.0) -> dict[str, Any]:
    """ONNX Runtime's TensorRT provider options for engines of `precision` cached in `cache` (a pure choice:
    `tsrt engine build` and `--provider tensorrt` runs build and find the same engine with it)."""
    if precision not in TENSORRT_BUILDER_FLAGS:
        raise ProviderError(f"TensorRT builds fp32, fp16 or int8 engines, not {precision}.")
    return {
        "device_id": device_id,
        **TENSORRT_BUILDER_FLAGS[precision],
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_max_workspace_size": int(workspace_gb * (1 << 30)),
    }


#: What ONNX Runtime needs to start a GPU provider, for the error that says why it could not.
PROVIDER_LIBRARIES = {
    "cuda": "the CUDA and cuDNN libraries (libcudart, libcublas, libcudnn) of the versions onnxruntime-gpu was built for",
    "tensorrt": "the TensorRT libraries (libnvinfer, libnvonnxparser) besides CUDA and cuDNN",
}


def output_layer_choice(choice: ProviderChoice) -> ProviderChoice:
    """Where a split graph's output layer (its pointwise head) runs: OpenVINO runs leave it to ONNX Runtime's
    CPU in fp32. The head is called on a few rows at a time, a shape OpenVINO compiles as dynamic; measured on
    the 118-class TotalSegmentator head, 128^3 features in blocks of 8 rows (Intel Xeon, 2 cores): ONNX
    Runtime 0.31 s and 147 MB per tile, OpenVINO 0.92 s and 265 MB. Other providers keep their own."""
    if not choice.uses_openvino:
        return choice
    return ProviderChoice(name="cpu", providers=[(PROVIDER_NAMES["cpu"], {})], threads=choice.threads,
                          requested=choice.requested, precision="fp32")


def provider_in_use(session_providers: Sequence[str], choice: ProviderChoice) -> str:
    """The provider a new session actually runs on (tsrt's name), checked against what was asked.

    A provider asked for by name that ONNX Runtime could not start is an error naming what is missing;
    with `auto` the fallback is allowed but said at warning level (visible under -q too).
    """
    actual_ort = session_providers[0] if session_providers else PROVIDER_NAMES["cpu"]
    actual = next((name for name, ort_name in PROVIDER_NAMES.items() if ort_name == actual_ort), actual_ort)
    wanted = PROVIDER_NAMES.get(choice.name)
    if wanted is None or wanted in session_providers:
        return choice.name
    problem = (
        f"ONNX Runtime could not start the {choice.name} provider (it needs "
        f"{PROVIDER_LIBRARIES.get(choice.name, 'its libraries')}) and would run on {actual}"
    )
    if choice.requested == "auto":
        log.warning("%s instead: --provider auto falls back; install those libraries to use the GPU.", problem)
        return actual
    raise ProviderError(f"{problem}: install what is missing, or run on the CPU with --provider cpu.")


def _check_openvino(requested: str) -> None:
    """OpenVINO is an optional extra: missing, it is an error saying what to install."""
    try:
        import openvino  # noqa: F401
    except ModuleNotFoundError:
        raise missing_extra(f"--provider {requested}", "OpenVINO", "openvino", kind=ProviderError) from None


class OpenVinoSession:
    """An ONNX graph compiled by OpenVINO for the CPU, answering ONNX Runtime's `run` call.

    The sliding window then needs no second code path. Outputs are copied out of OpenVINO's buffers (its
    default), because callers may keep one tile's logits while running the next; `share_outputs=True` hands
    OpenVINO's own buffers instead (one tile's copy less: 256 MB of TotalSegmentator features), for callers
    that are done with a run's outputs before the next run. A graph with a fixed batch of one (see
    tsrt.engines.openvino_graph) runs a larger batch one item at a time.

    After every run OpenVINO gives back the memory of the graph's intermediate maps (`release_memory`; the
    outputs are the request's own and stay), as ONNX Runtime's arena does in `_ArenaReleasingSession`: tsrt
    runs a graph once per tile, and the tile's head, accumulation and argmax then run without them (384 MB
    of a TotalSegmentator-sized int8 body at 128^3; no measurable time: 1.4-1.8 s per tile either way).
    """

    def __init__(self, graph: Path, precision: str, threads: int | None = None, *, provider_name: str = "openvino",
                 share_outputs: bool = False) -> None:
        import openvino

        self.provider_name = provider_name  # OpenVINO compiles for the CPU device only
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        threads = threads or threads_from_environment()
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = openvino.Core()
        cache = openvino_cache_dir()
        if cache is not None:
            core.set_property({"CACHE_DIR": str(cache)})
        self.compiled = core.compile_model(str(graph), "CPU", config)
        if cache is not None:
            seal_new_blobs(cache)
        self._request = self.compiled.create_infer_request()
        self.share_outputs = share_outputs
        batch = self.compiled.inputs[0].get_partial_shape()[0] if len(self.compiled.inputs) == 1 else None
        self.batch_of_one = batch is not None and batch.is_static and batch.get_length() == 1

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        outputs = output_names or [output.get_any_name() for output in self.compiled.outputs]
        if self.batch_of_one:
            ((name, batch),) = feeds.items()
            if batch.shape[0] != 1:
                items = [self._infer(outputs, {name: batch[n:n + 1]}, share=False) for n in range(batch.shape[0])]
                return [np.concatenate(parts) for parts in zip(*items)]
        return self._infer(outputs, feeds, share=self.share_outputs)

    def _infer(self, outputs: list[str], feeds: dict[str, Any], share: bool) -> list[Any]:
        results = self._request.infer(feeds, share_outputs=share)
        if hasattr(self.compiled, "release_memory"):  # older OpenVINO releases (pyproject allows 2024.0) lack it
            self.compiled.release_memory()
        return [results[self.compiled.output(name)] for name in outputs]


def openvino_cache_dir() -> Path | None:
    """Where OpenVINO keeps its compiled models (None: a read-only home, compile every time).

    A compiled model loads in ~0.05 s instead of compiling in ~0.25 s (a TotalSegmentator-sized net, bf16),
    a tenth of a one-tile job's network time; the price is one blob per graph and precision (~125 MB). OpenVINO
    keys each blob by the graph file's path, size and mtime and the compile options; tsrt's graphs there are
    named by their content's sha256. OpenVINO loads blobs unchecked, so tsrt seals each one it saw written
    (`seal_new_blobs`) and removes any blob without an intact seal before OpenVINO may read it.
    """
    folder = tsrt_home() / "cache" / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            return None
        for blob in folder.glob("*.blob"):
            if not cache_seal(blob).exists():
                log.debug("removing the unsealed OpenVINO blob %s", blob)
                blob.unlink(missing_ok=True)
            else:
                intact_cache(blob)
    except OSError as error:
        log.debug("no OpenVINO model cache: %s", error)
        return None
    return folder


def seal_new_blobs(folder: Path) -> None:
    """Seal the blobs OpenVINO has just written into `folder` (a blob gone meanwhile is skipped)."""
    for blob in folder.glob("*.blob"):
        if cache_seal(blob).exists():
            continue
        try:
            _write_seal(blob, sha256_file(blob))
        except OSError as error:
            log.debug("cannot seal %s: %s", blob, error)


def _cpu_signature() -> str:
    """The CPU model: ORT's fully optimised CPU graphs may use instructions only this CPU has."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def optimized_cache_path(graph_sha256: str, graph: Path, choice: ProviderChoice) -> Path:
    """Where ORT's optimised form of a graph is cached: keyed by the source graph's content (sha256), the
    ONNX Runtime version and the CPU, so an edited graph or another runtime never loads a stale cache."""
    import onnxruntime as ort

    key = f"{graph_sha256}:{ort.__version__}:{_cpu_signature()}:{choice.name}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return tsrt_home() / "cache" / "ort" / f"{graph.stem}-{digest}.onnx"


def cache_seal(cached: Path) -> Path:
    """The sha256 of a cached optimised graph, written when tsrt made it: it is loaded only if it still matches."""
    return cached.with_name(cached.name + ".sha256")


def sealed_sha256(cached: Path) -> str:
    """The sha256 a cached graph's seal holds (its first word; the rest is the file's stat stamp)."""
    return cache_seal(cached).read_text().split()[0]


def _stat_stamp(path: Path) -> str:
    """Size, mtime, ctime and inode: any write to the file, or a file put in its place, changes one of them
    (ctime cannot be set back from user space), so an unchanged stamp means unchanged bytes."""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"


def intact_cache(cached: Path) -> bool:
    """Whether a cached optimised graph exists and is byte for byte what tsrt wrote (else it is removed).

    The file is hashed only when its stat stamp differs from the one in the seal (after a copy or a
    restore, say), so an unchanged cache opens without reading its 100+ MB twice; a hash that still
    matches renews the stamp.
    """
    if not cached.exists():
        return False
    seal = cache_seal(cached)
    try:
        words = seal.read_text().split()
        if len(words) == 2 and words[1] == _stat_stamp(cached):
            return True
        if words and words[0] == sha256_file(cached):
            _write_seal(cached, words[0])
            return True
    except OSError:
        pass
    log.warning("The cached optimised graph %s does not match what tsrt wrote; rebuilding it.", cached)
    cached.unlink(missing_ok=True)
    seal.unlink(missing_ok=True)
    return False


def _write_seal(cached: Path, sha256: str) -> None:
    """sha256 and, once the file is in place, its stat stamp; written to a temp file and renamed."""
    stamp = f" {_stat_stamp(cached)}" if cached.exists() else ""
    temp = cache_seal(cached).with_suffix(f".tmp{os.getpid()}")
    temp.write_text(sha256 + stamp)
    os.replace(temp, cache_seal(cached))


def seal_cache(temp: Path, cached: Path) -> None:
    """Move a freshly optimised graph into the cache with its seal (seal first, so no unsealed file is trusted)."""
    digest = sha256_file(temp)
    _write_seal(cached, digest)
    os.replace(temp, cached)
    _write_seal(cached, digest)


def save_sealed_graph(model, target: Path) -> None:
    """Write an ONNX model derived from a cached graph into the cache, sealed (a temp file, then renamed)."""
    import onnx

    temp = target.with_suffix(f".tmp{os.getpid()}.onnx")
    onnx.save(model, str(temp))
    seal_cache(temp, target)


def create_session(graph: Path, choice: ProviderChoice, *, threads: int | None = None, graph_sha256: str | None = None,
                   share_outputs: bool = False):
    """An InferenceSession for `graph` on the chosen providers.

    On CPU, ONNX Runtime's fully optimised graph is saved once and loaded on later runs with
    optimisation switched off, which removes most of the start-up cost; the cache is keyed by the
    graph's sha256 and sealed with its own, so a changed source or a tampered cache is rebuilt, never
    loaded. GPU providers fuse differently per device, so for them the cache is TensorRT's engine cache.
    `graph_sha256`: the graph file's sha256 when the caller has just computed it (it is not hashed twice).
    `share_outputs`: the caller is done with a run's outputs before the next run (OpenVINO may then hand its
    own buffers; see OpenVinoSession).
    """
    threads = threads or choice.threads
    if choice.uses_openvino:
        return OpenVinoSession(graph, OPENVINO_PRECISIONS[choice.precision], threads, provider_name=choice.name,
                               share_outputs=share_outputs)
    import onnxruntime as ort

    options = _session_options(ort, threads, shared_cpu_arena=choice.name == "cpu")
    source = graph
    cached = None
    if choice.name == "cpu":
        cached = optimized_cache_path(graph_sha256 or sha256_file(graph), graph, choice)
        if intact_cache(cached):
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
    ort.set_default_logger_severity(3)  # ORT's own fallback messages: provider_in_use says it in tsrt's words
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        session = ort.InferenceSession(
            str(source), sess_options=options, providers=names, provider_options=provider_options
        )
    used = provider_in_use(session.get_providers(), choice)
    temp = getattr(options, "optimized_model_filepath", "")
    if cached is not None and temp and Path(temp).exists():
        seal_cache(Path(temp), cached)
    return _ArenaReleasingSession(session, used)


def open_cpu_graph(source: Path | bytes, threads: int | None, *, small: bool = False) -> "_ArenaReleasingSession":
    """A CPU session on a graph ONNX Runtime has already optimised (a file or serialised bytes), with the
    settings of `create_session`'s CPU sessions and its shared arena.

    `small=True`, for the many small graphs that run in turn (tsrt.engines.slabs): the session's threads
    sleep as soon as a run ends (spinning threads of one took the cores from the next: 0.87 s instead of
    0.56 s for a slabbed 128^3 block on 2 cores), and the arena keeps what a run freed for the next run
    (the slabs' temporaries, reused) until a run with `release=True`.
    """
    import onnxruntime as ort

    options = _session_options(ort, threads, shared_cpu_arena=True)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if small:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    ort.set_default_logger_severity(3)
    session = ort.InferenceSession(
        source if isinstance(source, bytes) else str(source), sess_options=options,
        providers=[PROVIDER_NAMES["cpu"]],
    )
    return _ArenaReleasingSession(session, "cpu", release_every_run=not small)


def _session_options(ort, threads: int | None, *, shared_cpu_arena: bool):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = threads or threads_from_environment()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # The memory pattern pre-plans one block per run shape and keeps it beside the arena: +1 GB on a
    # 128^3 TotalSegmentator tile from the second tile on, and no faster here (see _ArenaReleasingSession).
    options.enable_mem_pattern = False
    if shared_cpu_arena:
        _use_shared_cpu_arena(ort, options)
    return options


_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def _use_shared_cpu_arena(ort, options) -> None:
    """Let the session allocate from one process-wide CPU arena that grows by exactly what a request needs.

    A session's own arena grows in powers of two (kNextPowerOfTwo), so a 128^3 TotalSegmentator tile
    reserves ~160 MB it never uses; kSameAsRequested does not, at the same speed (measured: --fast on
    example_ct 1966 -> 1805 MiB peak, wall 1.00x, same masks). Without an arena every run pays for fresh
    pages: 1.7x slower. Sessions opened one after another (a task's models) reuse the same arena.
    """
    global _shared_arena_registered
    with _shared_arena_lock:
        if not _shared_arena_registered:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            same_as_requested = 1  # OrtArenaCfg(max_mem, arena_extend_strategy, initial_chunk, max_dead_bytes)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, same_as_requested, -1, -1))
            _shared_arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


class _ArenaReleasingSession:
    """An ONNX Runtime session whose CPU arena gives its memory back after every run.

    A 128^3 TotalSegmentator tile needs about 1 GB of activations; a growing arena keeps that reserved
    while tsrt accumulates the tile's logits, so both would count toward peak memory. Shrinking
    costs no measurable time on this machine (6.3 s per tile either way).
    """

    def __init__(self, session, provider_name: str, *, release_every_run: bool = True) -> None:
        import onnxruntime as ort

        self._session = session
        self.provider_name = provider_name  # what ONNX Runtime actually runs (checked at creation)
        self.release_every_run = release_every_run
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, output_names: list[str] | None, feeds: dict[str, Any], *, release: bool | None = None) -> list[Any]:
        if release if release is not None else self.release_every_run:
            return self._session.run(output_names, feeds, self._run_options)
        return self._session.run(output_names, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)
