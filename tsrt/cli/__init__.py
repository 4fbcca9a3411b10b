"""The `tsrt` command line, one module per command group; `main` is the console entry point."""


def main() -> None:
    """Run the command line (imported on call, so `tsrt.cli.progress` alone stays light for the Python API)."""
    from tsrt.cli.root import main as run

    run()


__all__ = ["main"]
