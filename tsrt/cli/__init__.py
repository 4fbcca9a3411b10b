"""The `tsrt` command line, one module per command group; `main` is the console entry point."""

from tsrt.cli.root import main

__all__ = ["main"]
