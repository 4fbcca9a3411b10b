"""`tsrt engine ...`: ahead-of-time TensorRT engines for an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

engine_app = typer.Typer(help="Build TensorRT engines for an exported model (needs an NVIDIA GPU and TensorRT).", no_args_is_help=True)


@engine_app.command("build")
def build(
    model_dir: Path = typer.Argument(..., help="Exported model folder (fold_N.onnx + fold_N.plan.json)."),
    fp16: bool = typer.Option(False, "--fp16", help="Half-precision engines (InstanceNorm stays float32 in the graph)."),
    workspace: float = typer.Option(4.0, "--workspace", help="TensorRT builder workspace in GB."),
    batch_size: Optional[list[int]] = typer.Option(None, "--batch-size", help="Tile batch sizes to build for (repeat)."),
    device: Optional[str] = typer.Option(None, "--device", help="gpu or gpu:N."),
) -> None:
    """Build and cache TensorRT engines for the model's patch shape and tile batch sizes."""
    from tsrt.engines.tensorrt import build_engines

    cache = build_engines(model_dir, fp16=fp16, workspace_gb=workspace, batch_sizes=batch_size or [1], device=device)
    typer.echo(f"engines cached in {cache}")
