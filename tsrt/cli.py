"""The `tsrt` command line. Every user-facing error becomes one line on stderr and an exit code."""

from __future__ import annotations

import sys

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


def main() -> None:
    """Console-script entry: run the Typer app and turn TsrtError into one line + exit code."""
    try:
        app()
    except TsrtError as err:
        typer.echo(f"tsrt: error: {err}", err=True)
        sys.exit(err.exit_code)
