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


def _register_subcommands() -> None:
    from tsrt.cli_engine import engine_app
    from tsrt.cli_models import models_app

    app.add_typer(models_app, name="models")
    app.add_typer(engine_app, name="engine")


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


def _configure_logging(quiet: bool, verbose: bool) -> None:
    import logging

    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


@app.command()
def segment(
    input_path: Optional[Path] = typer.Argument(None, metavar="INPUT", help="NIfTI file, DICOM folder or zip."),
    input_option: Optional[Path] = typer.Option(None, "-i", "--input", help="Same as INPUT (TotalSegmentator's spelling)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output label file (.nii.gz)."),
    model: Path = typer.Option(..., "--model", "-m", help="Exported model folder (fold_N.onnx + fold_N.plan.json)."),
    folds: Optional[list[str]] = typer.Option(None, "--folds", "-f", help="Folds to ensemble (default: all exported)."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Mirroring test-time augmentation where the model allows it."),
    step_size: float = typer.Option(0.5, "--step-size", help="Tile overlap as a fraction of the patch."),
    batch_size: int = typer.Option(1, "--batch-size", help="Tiles per network call."),
    provider: str = typer.Option("auto", "--provider", help="auto, cpu, cuda or tensorrt."),
    device: Optional[str] = typer.Option(None, "--device", help="gpu or gpu:N for CUDA/TensorRT."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="Also write class probabilities (.npz)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or info messages."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail."),
) -> None:
    """Segment an image with an exported nnU-Net model (nnUNetv2_predict's defaults)."""
    from tsrt.api import segment as run_segment

    _configure_logging(quiet, verbose)
    source = input_path or input_option
    if source is None:
        raise TsrtError("No input given: pass the image as INPUT or with -i.")
    run = run_segment(
        source, output, model, folds=folds, tta=tta, step_size=step_size, batch_size=batch_size,
        provider=provider, device=device, save_probabilities=save_probabilities, progress=not quiet,
    )
    if not quiet:
        timings = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in run.seconds.items())
        typer.echo(f"wrote {output} ({timings})")


@app.command()
def demo(
    output: Path = typer.Option(Path("demo_output"), "-o", "--output", help="Folder for the phantom and its results."),
    provider: str = typer.Option("auto", "--provider", help="auto, cpu, cuda or tensorrt."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Segment a generated CT phantom with the bundled demo model (no internet, no torch)."""
    from tsrt.demo import run_demo

    _configure_logging(quiet, False)
    run_demo(output, provider=provider, progress=not quiet)


#: Options that take several values in TotalSegmentator's argparse CLI (`--roi_subset liver brain`).
_MULTI_VALUE_OPTIONS = {"--folds", "-f", "--roi-subset", "--roi_subset", "-rs"}


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """Rewrite `--opt a b c` as `--opt a --opt b --opt c`, so TotalSegmentator-style calls work with Typer."""
    expanded: list[str] = []
    current: str | None = None
    for token in argv:
        if token in _MULTI_VALUE_OPTIONS:
            current = token
            expanded.append(token)
            continue
        if current is not None and not token.startswith("-"):
            if expanded[-1] != current:
                expanded.append(current)
            expanded.append(token)
            continue
        current = None
        expanded.append(token)
    return expanded


_register_subcommands()


def main() -> None:
    """Console-script entry: run the Typer app and turn TsrtError into one line + exit code."""
    try:
        app(args=expand_multi_value_options(sys.argv[1:]), prog_name="tsrt")
    except TsrtError as err:
        typer.echo(f"tsrt: error: {err}", err=True)
        sys.exit(err.exit_code)
