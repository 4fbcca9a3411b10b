"""End to end in a real browser: `tsrt ui` serving the page, headless Chromium using it like a clinician.

Chromium is Debian's `chromium` package (installed here with apt-get when missing: CI starts from a
clean machine), driven by Playwright's Python package (its own browser download is not used). The
screenshot and the measured upload-to-overlay time are kept in test-artifacts/ (gitignored).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import nibabel as nib
import pytest

from tsrt.demo.phantom import make_phantom

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
PHANTOM = dict(shape=(96, 80, 64), spacing=(3.0, 3.0, 3.0), seed=7)  # as in test_ui.py: few tiles
pytestmark = pytest.mark.slow


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def ui_url(tmp_path: Path, small_task_store: Path):
    """`tsrt ui` on a free local port with `small_task_store`'s tasks installed (`total --fast`, `total --fastest`,
    `body --fast`; the UI only reads the store); stopped (and its temp folder gone) afterwards."""
    port = _free_port()
    environment = {**os.environ, "TSRT_HOME": str(small_task_store), "TMPDIR": str(tmp_path)}
    log = open(tmp_path / "ui.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", "ui", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read() == b"ok":
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"tsrt ui did not come up:\n{(tmp_path / 'ui.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert not list(tmp_path.glob("tsrt-ui-*")), "tsrt ui removes its sessions' temp folder when it stops"


def test_installed_task_preselected_then_demo_in_chromium_upload_segment_overlay_table_downloads(
    chromium: str, ui_url: str, tmp_path: Path
):
    from playwright.sync_api import expect, sync_playwright

    phantom = make_phantom(**PHANTOM)
    scan = tmp_path / "phantom_ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), scan)
    ARTIFACTS.mkdir(exist_ok=True)
    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 2600}, accept_downloads=True)
            page.on("request", lambda request: requested.append(request.url))
            page.on("websocket", lambda socket_: requested.append(socket_.url))
            page.goto(ui_url)
            expect(page.get_by_text("never leave it", exact=False)).to_be_visible(timeout=60_000)
            # The best installed task for CT is preselected (only its --fast models are installed), not the demo.
            model = page.get_by_role("combobox", name="Model")
            expect(model).to_have_value("total (TotalSegmentator task)", timeout=60_000)
            expect(page.get_by_role("checkbox", name="fast (lower resolution, quicker)")).to_be_checked()

            started = time.perf_counter()
            page.locator('input[type="file"]').set_input_files(str(scan))
            expect(page.get_by_text("96 x 80 x 64 voxels", exact=False)).to_be_visible(timeout=60_000)
            expect(model).to_have_value("total (TotalSegmentator task)")
            model.click()
            options = page.get_by_role("option")
            expect(options.last).to_have_text("Demo (trained on phantoms, not for patients)")  # listed last
            options.last.click()
            expect(model).to_have_value("Demo (trained on phantoms, not for patients)", timeout=60_000)
            page.get_by_role("button", name="Segment").click()
            images = page.locator('[data-testid="stImage"] img')
            expect(images).to_have_count(4, timeout=300_000)  # axial, coronal, sagittal, overview
            upload_to_overlay = time.perf_counter() - started

            expect(page.get_by_text("structures found", exact=False)).to_be_visible()
            expect(page.get_by_text("synthetic phantoms only", exact=False)).to_have_count(0)  # its own phantom
            expect(page.locator('[data-testid="stDataFrame"]')).to_be_visible()
            liver = page.get_by_role("checkbox", name="liver", exact=True)
            expect(liver).to_be_checked()
            axial = images.first.get_attribute("src")
            liver.uncheck(force=True)  # the visible box is Streamlit's styled label, the input is hidden
            expect(images.first).not_to_have_attribute("src", axial, timeout=60_000)
            # The rerun may still show the previous run's stale widgets beside the new ones: wait for one of each.
            report_button = page.get_by_role("button", name="Report (CSV)")
            masks_button = page.get_by_role("button", name="Masks (zip, one NIfTI per structure)")
            expect(report_button).to_have_count(1, timeout=60_000)
            expect(masks_button).to_have_count(1, timeout=60_000)

            with page.expect_download() as csv_download:
                report_button.click()
            report = Path(csv_download.value.path()).read_text()
            with page.expect_download(timeout=120_000) as masks_download:
                masks_button.click()
            with zipfile.ZipFile(masks_download.value.path()) as archive:
                masks = archive.namelist()
            page.screenshot(path=str(ARTIFACTS / "ui_demo_chromium.png"), full_page=True)
        finally:
            browser.close()

    assert report.splitlines()[0] == "structure,label,volume (ml),mean HU,status"
    assert "liver" in report and "segmentations/liver.nii.gz" in masks
    hosts = {urlparse(url).hostname for url in requested if urlparse(url).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, f"the page made requests off this machine: {hosts}"
    (ARTIFACTS / "ui_demo_chromium.json").write_text(json.dumps({
        "upload_to_overlay_seconds": round(upload_to_overlay, 2),
        "phantom": {"shape": PHANTOM["shape"], "spacing_mm": PHANTOM["spacing"]},
        "requests": len(requested),
    }, indent=2))
    print(f"\nscreenshot: {ARTIFACTS / 'ui_demo_chromium.png'}; upload to overlay: {upload_to_overlay:.1f} s")
