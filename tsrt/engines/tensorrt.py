"""TensorRT engines for an exported model, built ahead of time through ONNX Runtime's TensorRT provider.

Building a TensorRT engine for a 3D U-Net takes minutes, so `tsrt engine build` does it once per
model, GPU, TensorRT version and precision, for the patch shape and the tile batch sizes the
runtime will use, and stores the engines next to the graphs. `tsrt segment --provider tensorrt`
then finds them through the same cache folder (see `engine_cache_dir`).
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

from tsrt.errors import ProviderError
from tsrt.models.plan import load_model_plans
from tsrt.engines.providers import PROVIDER_NAMES, available_providers, choose_provider, create_session, parse_device

log = logging.getLogger("tsrt")


@dataclass(frozen=True)
class EngineKey:
    """What an engine is only valid for: the GPU model, the TensorRT version and the precision."""

    gpu_name: str
    tensorrt_version: str
    precision: str  # fp16 | fp32

    @property
    def folder_name(self) -> str:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower() or "gpu"
        version = re.sub(r"[^0-9.]+", "", self.tensorrt_version) or "unknown"
        return f"{gpu}_trt{version}_{self.precision}"


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


def build_engines(
    model_dir: Path,
    *,
    fp16: bool = False,
    workspace_gb: float = 4.0,
    batch_sizes: Sequence[int] = (1,),
    device: str | None = None,
    folds: Sequence[str] | None = None,
) -> Path:
    """Build (or reuse) the TensorRT engines of every fold for the patch shape and batch sizes.

    Each batch size is run once through a TensorRT-provider session with the engine cache on; ONNX
    Runtime serialises the engine it builds into the cache folder, which later sessions reuse.
    """
    version = tensorrt_version()  # fails first, in one line, when there is no TensorRT
    index = parse_device(device)
    key = EngineKey(gpu_name(index), version, "fp16" if fp16 else "fp32")
    cache = engine_cache_dir(model_dir, key)
    cache.mkdir(parents=True, exist_ok=True)
    choice = choose_provider("tensorrt", device=device, fp16=fp16, engine_cache_dir=cache, workspace_gb=workspace_gb)
    for plan in load_model_plans(Path(model_dir), folds):
        session = create_session(plan.graph_path, choice)
        for batch in batch_sizes:
            tiles = np.zeros((batch, plan.num_input_channels, *plan.patch_size), dtype=np.float32)
            session.run([plan.graph_output_name], {plan.graph_input_name: tiles})
            log.info("engine ready: fold %s, batch %d, %s", plan.fold, batch, key.precision)
    return cache
