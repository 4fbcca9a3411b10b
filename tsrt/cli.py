"""The `tsrt` command line. Every user-facing error becomes one line on stderr and an exit code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from tsrt.errors import TsrtError

app = typer.Typer(
    name="tsrt",
    help="Torch-free TotalSegmentator / nnU-Net v2 inference on ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print tsrt's version."""
    from tsrt import __version__

    typer.echo(__version__)


#: Modules only the export extra installs; a missing one means that extra is not installed.
_EXPORT_EXTRA_MODULES = (
    "torch", "torchvision", "nnunetv2", "dynamic_network_architectures", "onnx", "onnxscript", "tsrt_export"
)


@app.command()
def export(
    model_folder: Path = typer.Argument(..., help="nnU-Net v2 result folder (Trainer__Plans__Configuration)."),
    out_dir: Path = typer.Argument(..., help="Folder to write fold_N.onnx + fold_N.plan.json into."),
    fold: Optional[list[str]] = typer.Option(None, "--fold", "-f", help="Fold to export (repeat); default: all."),
    checkpoint: str = typer.Option("checkpoint_final.pth", help="Checkpoint file name inside each fold_N folder."),
    fp16: bool = typer.Option(False, "--fp16", help="Half-precision graph (InstanceNorm kept in float32)."),
    opset: int = typer.Option(17, help="ONNX opset version."),
    verify_image: Optional[Path] = typer.Option(None, help="Also verify on a centre patch of this image."),
) -> None:
    """Export trained nnU-Net v2 folds to verified ONNX graphs (needs the export extra)."""
    try:
        from tsrt_export.onnx_export import export_model
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in _EXPORT_EXTRA_MODULES:
            raise
        raise TsrtError(
            f"`tsrt export` needs {err.name}, which is missing: install the export extra: pip install 'tsrt[export]'."
        ) from None
    plan_paths = export_model(
        model_folder, out_dir, folds=fold or None, checkpoint=checkpoint, fp16=fp16, opset=opset,
        verify_image=verify_image,
    )
    for plan_path in plan_paths:
        typer.echo(plan_path)


def main() -> None:
    """Console-script entry: run the Typer app and turn TsrtError into one line + exit code."""
    try:
        app()
    except TsrtError as err:
        typer.echo(f"tsrt: error: {err}", err=True)
        sys.exit(err.exit_code)
