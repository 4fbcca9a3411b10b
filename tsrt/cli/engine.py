"""`tsrt engine ...`: ahead-of-time TensorRT engines for an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tsrt.errors import TsrtError

engine_app = typer.Typer(help="Build TensorRT engines for an exported model (needs an NVIDIA GPU and TensorRT).", no_args_is_help=True)


@engine_app.command("build")
def build(
    model_dir: Path = typer.Argument(..., help="Exported model folder (fold_N.onnx + fold_N.plan.json)."),
    precision: str = typer.Option(
        "fp32", "--precision",
        help="fp32 (default); fp16: half-precision kernels (InstanceNorm stays float32 in the graph); int8: from the "
        "model's gated int8 graph (tsrt models quantize MODEL_DIR -c SCANS --tensorrt), no calibrator.",
    ),
    fp16: bool = typer.Option(False, "--fp16", hidden=True, help="Old spelling of --precision fp16."),
    workspace: float = typer.Option(4.0, "--workspace", help="TensorRT builder workspace in GB."),
    batch_size: Optional[list[int]] = typer.Option(None, "--batch-size", help="Tile batch sizes to build for (repeat)."),
    device: Optional[str] = typer.Option(None, "--device", help="gpu or gpu:N."),
) -> None:
    """Build and cache TensorRT engines for the model's patch shape and tile batch sizes, one folder per precision:
    `tsrt segment --provider tensorrt --precision P` runs the engines built with the same P."""
    from tsrt.engines.tensorrt import build_engines

    if fp16:
        if precision not in ("fp32", "fp16"):
            raise TsrtError(f"--fp16 means --precision fp16, not {precision}: give one of them.")
        precision = "fp16"
    cache = build_engines(
        model_dir, precision=precision.lower(), workspace_gb=workspace, batch_sizes=batch_size or [1], device=device
    )
    typer.echo(f"{precision} engines cached in {cache}")
