"""End to end in a real browser: `tsrt ui` serving the page, headless Chromium using it like a clinician.

Server, browser and page are tests/chromium_page.py's fixtures (the page's server is shared with the other
browser tests on the same model store). The screenshot and the measured upload-to-overlay time are kept in
test-artifacts/ (gitignored).
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import nibabel as nib
import pytest

from chromium_page import ARTIFACTS, DEMO_LABEL, ChromiumPage, UiServers, downloaded, open_scan, segment
from tsrt.demo.phantom import make_phantom

PHANTOM = dict(shape=(96, 80, 64), spacing=(3.0, 3.0, 3.0), seed=7)  # as in test_ui.py: few tiles
pytestmark = pytest.mark.slow


def test_installed_task_preselected_then_demo_in_chromium_upload_segment_overlay_table_downloads(
    chromium_page: ChromiumPage, ui_servers: UiServers, small_task_store: Path, tmp_path: Path
):
    """`small_task_store`'s tasks are installed (`total --fast`, `total --fastest`, `body --fast`)."""
    from playwright.sync_api import expect

    phantom = make_phantom(**PHANTOM)
    scan = tmp_path / "phantom_ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), scan)
    ARTIFACTS.mkdir(exist_ok=True)
    page = chromium_page.page
    page.goto(ui_servers.url(small_task_store))
    expect(page.get_by_text("never leave it", exact=False)).to_be_visible(timeout=60_000)
    # The best installed task for CT is preselected (only its --fast models are installed), not the demo.
    model = page.get_by_role("combobox", name="Model")
    expect(model).to_have_value("total (TotalSegmentator task)", timeout=60_000)
    expect(page.get_by_role("checkbox", name="fast (lower resolution, quicker)")).to_be_checked()

    started = time.perf_counter()
    open_scan(page, scan, PHANTOM["shape"])
    expect(model).to_have_value("total (TotalSegmentator task)")
    model.click()
    options = page.get_by_role("option")
    expect(options.last).to_have_text(DEMO_LABEL)  # listed last
    options.last.click()
    expect(model).to_have_value(DEMO_LABEL, timeout=60_000)
    save_memory = page.get_by_role("checkbox", name="Save memory (slower, same masks)")
    expect(save_memory).not_to_be_checked()  # off by default: the faster path
    save_memory.check(force=True)  # the run below takes --low-memory (its labels: tests/ui/test_ui.py)
    expect(save_memory).to_be_checked()
    segment(page)
    images = page.locator('[data-testid="stImage"] img')
    expect(images).to_have_count(4)  # axial, coronal, sagittal, overview
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

    report = downloaded(page, report_button).decode()
    with page.expect_download(timeout=120_000) as masks_download:
        masks_button.click()
    with zipfile.ZipFile(masks_download.value.path()) as archive:
        masks = archive.namelist()
    page.screenshot(path=str(ARTIFACTS / "ui_demo_chromium.png"), full_page=True)

    assert report.splitlines()[0] == "structure,label,volume (ml),mean HU,status"
    assert "liver" in report and "segmentations/liver.nii.gz" in masks
    hosts = chromium_page.hosts()
    assert hosts == {"127.0.0.1"}, f"the page made requests off this machine: {hosts}"
    (ARTIFACTS / "ui_demo_chromium.json").write_text(json.dumps({
        "upload_to_overlay_seconds": round(upload_to_overlay, 2),
        "phantom": {"shape": PHANTOM["shape"], "spacing_mm": PHANTOM["spacing"]},
        "requests": len(chromium_page.requested),
    }, indent=2))
    print(f"\nscreenshot: {ARTIFACTS / 'ui_demo_chromium.png'}; upload to overlay: {upload_to_overlay:.1f} s")
