"""The browser tests' shared set-up: `tsrt ui` servers, Debian's chromium and a page in it (a pytest plugin).

tests/conftest.py loads this module with `pytest_plugins`, so its fixtures exist once per run and tests in
different files share them: a conftest.py in tests/ui would be imported as `conftest` too and shadow
tests/conftest.py, which test modules import helpers from (`from conftest import WeightsServer`).

Chromium is Debian's `chromium` package (installed here with apt-get when missing: CI starts from a clean
machine), driven by Playwright's Python package (its own browser download is not used). One `tsrt ui`
server runs per model store (the page reads the store named by TSRT_HOME when it starts), started when a
test first asks for it and stopped when the run ends: tests on the same store share it, each in its own
browser session. Screenshots and measured times are kept in test-artifacts/ (gitignored).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
VIEWPORT = {"width": 1500, "height": 2600}
#: Seconds a page may take to come up, and to segment (the machine is shared with other jobs).
START_TIMEOUT, SEGMENT_TIMEOUT = 120, 300
DEMO_LABEL = "Demo (trained on phantoms, not for patients)"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get (as root) when it is missing."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs Debian's chromium: apt-get install chromium (as root)")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        result = subprocess.run(command, capture_output=True, text=True, env=environment)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


# --------------------------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningUi:
    """One `tsrt ui` process: its address, and the folder holding its temp folder and log."""

    url: str
    process: subprocess.Popen
    folder: Path
    log: object  # the open log file

    def log_tail(self) -> str:
        return (self.folder / "ui.log").read_text()[-3000:]


def start_ui(store: Path, folder: Path) -> RunningUi:
    """`tsrt ui` on a free local port with TSRT_HOME=store and its temp folder under `folder`, once it answers."""
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    environment = {**os.environ, "TSRT_HOME": str(store), "TMPDIR": str(folder)}
    log = open(folder / "ui.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", "ui", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=folder,
    )
    running = RunningUi(f"http://127.0.0.1:{port}", process, folder, log)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"{running.url}/_stcore/health", timeout=2) as response:
                if response.read() == b"ok":
                    return running
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log.close()
            pytest.fail(f"tsrt ui did not come up:\n{running.log_tail()}")
        time.sleep(0.5)


def stop_ui(running: RunningUi, timeout: float = 60) -> None:
    """Stop `tsrt ui` as Ctrl-C/SIGTERM would; it must remove its sessions' temp folder."""
    running.process.terminate()
    try:
        running.process.wait(timeout=timeout)
    finally:
        if running.process.poll() is None:
            running.process.kill()
        running.log.close()
    assert not list(running.folder.glob("tsrt-ui-*")), "tsrt ui removes its sessions' temp folder when it stops"


class UiServers:
    """The run's `tsrt ui` servers, one per model store, started on first use and kept for later tests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: dict[Path, RunningUi] = {}

    def url(self, store: Path) -> str:
        """The address of the page serving `store` (read-only for the page)."""
        store = Path(store).resolve()
        if store not in self.running:
            self.running[store] = start_ui(store, self.folder / f"server_{len(self.running)}")
        return self.running[store].url

    def stop(self) -> None:
        problems = []
        for running in self.running.values():
            try:
                stop_ui(running)
            except (AssertionError, subprocess.TimeoutExpired) as error:
                problems.append(f"{running.url}: {error}")
        self.running.clear()
        assert not problems, problems


@pytest.fixture(scope="session")
def ui_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiServers]:
    """`tsrt ui` servers shared by the run's browser tests (`ui_servers.url(store)`), stopped at its end."""
    servers = UiServers(tmp_path_factory.mktemp("tsrt_ui"))
    yield servers
    servers.stop()


# --------------------------------------------------------------------------------------------- the page


@dataclass
class ChromiumPage:
    """A tab in headless Chromium and every address it asked for (requests and web sockets)."""

    page: Page
    requested: list[str]

    def hosts(self) -> set[str]:
        """The hosts the page talked to over http(s) and web sockets."""
        schemes = ("http", "https", "ws", "wss")
        return {urlparse(url).hostname for url in self.requested if urlparse(url).scheme in schemes}


@pytest.fixture()
def chromium_page(chromium: str) -> Iterator[ChromiumPage]:
    """A new tab (downloads allowed) in a fresh headless Chromium, closed after the test (downloads with it)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=VIEWPORT, accept_downloads=True)
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.on("websocket", lambda socket_: requested.append(socket_.url))
            yield ChromiumPage(page, requested)
        finally:
            browser.close()


def open_scan(page: Page, scan: Path, shape: tuple[int, ...]) -> None:
    """Upload `scan` in the sidebar and wait until the page describes it (its voxel counts)."""
    from playwright.sync_api import expect

    page.locator('input[type="file"]').set_input_files(str(scan))
    voxels = " x ".join(str(n) for n in shape)
    expect(page.get_by_text(f"{voxels} voxels", exact=False)).to_be_visible(timeout=60_000)


def choose(page: Page, menu: str, option: str, attempts: int = 3) -> None:
    """Pick `option` in the drop-down menu labelled `menu`.

    The list opens after a moment and closes again when the page scrolls under it (as it may while the
    click brings a menu low on the page into view), so an attempt whose list is gone is repeated.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    combobox = page.get_by_role("combobox", name=menu)
    item = page.get_by_role("option", name=option, exact=True)
    for attempt in range(attempts):
        combobox.scroll_into_view_if_needed()
        combobox.click()
        try:
            expect(item).to_be_visible()
            item.click(timeout=5_000)
            break
        except (AssertionError, PlaywrightTimeout):
            if attempt == attempts - 1:
                raise
            page.keyboard.press("Escape")
    expect(combobox).to_have_value(option, timeout=60_000)


def wait_until_idle(page: Page, timeout_s: float = 60) -> None:
    """Wait until the page's script has finished its run (Streamlit's running indicator is gone)."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stStatusWidgetRunningIcon")).to_have_count(0, timeout=timeout_s * 1000)


def segment(page: Page) -> None:
    """Press Segment and wait for the result (its last part is the Reports step) and the end of the run."""
    from playwright.sync_api import expect

    page.get_by_role("button", name="Segment").click()
    expect(page.get_by_role("heading", name="4. Reports")).to_be_visible(timeout=SEGMENT_TIMEOUT * 1000)
    wait_until_idle(page)


def downloaded(page: Page, button: Locator, timeout_s: float = 60) -> bytes:
    """The bytes of the file a download button gives."""
    with page.expect_download(timeout=timeout_s * 1000) as download:
        button.click()
    return Path(download.value.path()).read_bytes()
