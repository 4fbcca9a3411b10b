"""`tsrt ui`: the clinical web page (tsrt/ui/app.py) served by Streamlit on this computer.

Streamlit runs in a child process with the privacy options set on its command line: it listens on
the local address only, sends no usage statistics, and never looks up this machine's external
address (it does that only when the listening address is left to its default). The child gets a
temp folder for the sessions' uploads and results, which is deleted when it stops.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from tsrt.errors import InputError, TsrtError, missing_extra
from tsrt.ui.settings import DEFAULT_MAX_UPLOAD_MB, UiSettings

APP_PATH = Path(__file__).resolve().parents[1] / "ui" / "app.py"
_WILDCARD_ADDRESSES = {"0.0.0.0", "::"}


def streamlit_command(host: str, port: int, max_upload_mb: int, python: str = sys.executable) -> list[str]:
    """`streamlit run` for the page: local address, no telemetry, no file watching, minimal toolbar."""
    shown_address = "localhost" if host in _WILDCARD_ADDRESSES else host
    return [
        python, "-m", "streamlit", "run", str(APP_PATH),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",  # no browser opened, no e-mail prompt
        "--browser.gatherUsageStats", "false",  # no usage statistics, in the server and in the page
        "--browser.serverAddress", shown_address,  # set by hand, so Streamlit never asks the internet for our IP
        "--server.maxUploadSize", str(max_upload_mb),
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--client.toolbarMode", "minimal",  # no deploy button
        "--global.developmentMode", "false",
    ]


def ui(
    host: str = typer.Option("127.0.0.1", help="Address to listen on; the default serves this computer only."),
    port: int = typer.Option(8501, help="Port of the page (http://HOST:PORT)."),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Folder of scans (NIfTI, DICOM zips or folders) to open without uploading."
    ),
    max_upload_mb: int = typer.Option(DEFAULT_MAX_UPLOAD_MB, "--max-upload-mb", help="Largest upload, in MB."),
) -> None:
    """Start the clinical web UI on this computer: open a scan, segment it, review and download (needs tsrt[ui])."""
    if importlib.util.find_spec("streamlit") is None:
        raise missing_extra("`tsrt ui`", "Streamlit", "ui")
    if data_dir is not None and not data_dir.is_dir():
        raise InputError(f"--data-dir {data_dir} is not a folder; give the folder that holds the scans.")
    if max_upload_mb < 1:
        raise TsrtError("--max-upload-mb must be at least 1.")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: other computers on the network can open the page.", err=True)
    with tempfile.TemporaryDirectory(prefix="tsrt-ui-") as temp:
        settings = UiSettings(data_dir=data_dir.resolve() if data_dir else None, max_upload_mb=max_upload_mb,
                              temp_dir=Path(temp))
        environment = {**os.environ, **settings.environment()}
        typer.echo(f"tsrt ui: open http://{'localhost' if host in _WILDCARD_ADDRESSES else host}:{port} (Ctrl-C stops it)")
        process = subprocess.Popen(streamlit_command(host, port, max_upload_mb), env=environment)
        previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate())  # stop the server with us
        try:
            code = process.wait()
        except KeyboardInterrupt:  # the child got the Ctrl-C too and shuts down
            code = process.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        raise TsrtError(f"The web UI stopped with exit code {code}; see the messages above.")
