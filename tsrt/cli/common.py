"""What several command groups share: logging set-up and the export extra's module names."""

from __future__ import annotations

import logging
import sys

#: Modules only the export extra installs; a missing one means that extra is not installed.
EXPORT_EXTRA_MODULES = (
    "torch", "torchvision", "nnunetv2", "dynamic_network_architectures", "onnxscript", "tsrt_export"
)


def configure_logging(quiet: bool, verbose: bool) -> None:
    """INFO by default, WARNING with -q, DEBUG with -v; plain messages on stderr."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
