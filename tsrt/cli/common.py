"""What several command groups share: logging set-up, help shown as written, the export extra's module names,
and the typer options declared alike (`provider: str = PROVIDER` in tsrt/cli/companions.py and report.py)."""

from __future__ import annotations

import inspect
import logging
import sys

import typer

#: Modules only the export extra installs; a missing one means that extra is not installed.
EXPORT_EXTRA_MODULES = (
    "torch", "torchvision", "nnunetv2", "dynamic_network_architectures", "onnxscript", "tsrt_export"
)

PROVIDER = typer.Option("auto", "--provider", help="auto, cpu, cuda or tensorrt.")
DEVICE = typer.Option(None, "--device", "-d", help="cpu, gpu or gpu:N (CUDA/TensorRT).")
PRECISION = typer.Option(
    "fp32", "--precision",
    help="fp32 (default); bf16: --provider openvino on a CPU with native bf16; fp16: tensorrt; int8: cpu or openvino "
    "(or tensorrt engines) with the gated int8 graphs `tsrt models quantize` makes.",
)
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or info messages.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="More detail.")


def configure_logging(quiet: bool, verbose: bool) -> None:
    """INFO by default, WARNING with -q, DEBUG with -v; plain messages on stderr."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


def show_help_as_written(app: typer.Typer) -> None:
    """Escape rich markup in every help text under `app`; call once, after all its commands are registered.

    Typer renders help through rich, which takes the `[ui]` of "pip install 'tsrt[ui]'" for a style tag
    and drops it. Escaped, every bracket shows as written, in every command group, including those
    added later (no help text here uses rich markup on purpose).
    """
    from rich.markup import escape
    from typer.models import ParameterInfo

    if isinstance(app.info.help, str):
        app.info.help = escape(app.info.help)
    for command in app.registered_commands:
        text = command.help if isinstance(command.help, str) else inspect.getdoc(command.callback)
        if text:
            command.help = escape(text)
        for parameter in inspect.signature(command.callback).parameters.values():
            if isinstance(parameter.default, ParameterInfo) and isinstance(parameter.default.help, str):
                parameter.default.help = escape(parameter.default.help)
    for group in app.registered_groups:
        if isinstance(group.help, str):
            group.help = escape(group.help)
        show_help_as_written(group.typer_instance)
