"""The Reports step end to end in a real browser: `tsrt ui` on loopback, Debian's chromium driven by Playwright.

A clinician segments a phantom with the demo model, opens the Reports step, makes the volume report and
downloads it; the downloaded statistics are checked against numbers this test computes itself from the
downloaded masks and the scan. Then the aorta report is refused in one line (the phantom's aorta runs the
whole length of the scan, so the field of view cuts it) and the Evans index too (its models are not
installed, and the page never fetches one). Server and browser are test_ui_browser's fixtures.
"""

from __future__ import annotations

import csv
import io
import json
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import nibabel as nib
import numpy as np
import pytest

from test_ui_browser import ARTIFACTS, chromium, ui_url  # noqa: F401 - fixtures used by name
from tsrt.demo.phantom import make_phantom

#: Large enough that the liver and spleen lie whole inside the scan (measured), small enough for few tiles.
PHANTOM = dict(shape=(112, 96, 72), spacing=(3.0, 3.0, 3.0), seed=7)
#: TotalSegmentator leaves a structure within this many voxels of the scan's edge out of statistics.json.
BORDER_VOXELS = 3
pytestmark = pytest.mark.slow


@pytest.fixture()
def small_task_store(tmp_path: Path) -> Path:
    """Replaces conftest's store for `ui_url`: an empty TSRT_HOME, so the demo model is the only one (no task built)."""
    home = tmp_path / "empty_home"
    home.mkdir()
    return home


def expected_statistics(masks: dict[str, np.ndarray], scan: np.ndarray, spacing) -> dict[str, dict[str, float]]:
    """statistics.json by TotalSegmentator's rules, from scratch: volume (mm³) and mean of the int16 scan,
    0 and 0 for an empty mask or one within BORDER_VOXELS of any face of the volume."""
    expected = {}
    values = scan.astype(np.int16)
    for name, mask in masks.items():
        edge = np.ones(mask.shape, dtype=bool)
        edge[BORDER_VOXELS:-BORDER_VOXELS, BORDER_VOXELS:-BORDER_VOXELS, BORDER_VOXELS:-BORDER_VOXELS] = False
        if not mask.any() or (mask & edge).any():
            expected[name] = {"volume": 0.0, "intensity": 0.0}
        else:
            expected[name] = {"volume": float(mask.sum() * np.prod(spacing)), "intensity": float(values[mask].mean())}
    return expected


def test_volume_report_made_and_downloaded_then_aorta_and_evans_refused_in_one_line(
    chromium: str, ui_url: str, tmp_path: Path  # noqa: F811 - the imported fixtures
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
            model = page.get_by_role("combobox", name="Model")
            expect(model).to_have_value("Demo (trained on phantoms, not for patients)", timeout=60_000)
            page.locator('input[type="file"]').set_input_files(str(scan))
            expect(page.get_by_text("112 x 96 x 72 voxels", exact=False)).to_be_visible(timeout=60_000)
            page.get_by_role("button", name="Segment").click()
            expect(page.get_by_role("heading", name="4. Reports")).to_be_visible(timeout=300_000)

            started = time.perf_counter()
            page.get_by_role("tab", name="Organ volumes and densities").click()
            page.get_by_role("button", name="Create the volume report").click()
            json_button = page.get_by_role("button", name="Volume report (JSON, statistics.json)")
            csv_button = page.get_by_role("button", name="Volume report (CSV)")
            expect(json_button).to_have_count(1, timeout=60_000)
            expect(csv_button).to_have_count(1, timeout=60_000)
            report_seconds = time.perf_counter() - started
            expect(page.get_by_text("Reference ranges are not available", exact=False)).to_be_visible()
            with page.expect_download() as json_download:
                json_button.click()
            statistics = json.loads(Path(json_download.value.path()).read_text())
            with page.expect_download() as csv_download:
                csv_button.click()
            table = list(csv.DictReader(io.StringIO(Path(csv_download.value.path()).read_text())))
            with page.expect_download(timeout=120_000) as masks_download:
                page.get_by_role("button", name="Masks (zip, one NIfTI per structure)").click()
            masks_zip = tmp_path / "masks.zip"
            masks_download.value.save_as(masks_zip)  # downloads are deleted with the browser

            errors = page.locator('[data-testid="stAlertContentError"]')
            page.get_by_role("tab", name="Aorta diameters").click()
            page.get_by_role("combobox", name="Contrast phase").click()
            page.get_by_role("option", name="native", exact=True).click()
            page.get_by_role("button", name="Create the aorta report").click()
            expect(errors).to_have_count(1, timeout=60_000)
            aorta_refusal = errors.first.inner_text().strip()
            page.get_by_role("tab", name="Evans index").click()
            page.get_by_role("button", name="Create the Evans index").click()
            expect(errors).to_have_count(2, timeout=60_000)
            evans_refusal = errors.nth(1).inner_text().strip()
            expect(page.locator('[data-testid="stException"]')).to_have_count(0)
            page.screenshot(path=str(ARTIFACTS / "ui_reports_chromium.png"), full_page=True)
        finally:
            browser.close()

    # The JSON is statistics.json for the written masks, recomputed here from the masks and the scan.
    masks = {}
    with zipfile.ZipFile(masks_zip) as archive:
        for member in archive.namelist():
            if member.endswith(".nii.gz"):
                archive.extract(member, tmp_path / "masks")
                masks[Path(member).name[: -len(".nii.gz")]] = np.asarray(
                    nib.load(tmp_path / "masks" / member).dataobj) > 0
    values = np.asarray(nib.load(scan).get_fdata())
    expected = expected_statistics(masks, values, PHANTOM["spacing"])
    assert set(statistics) == set(expected), "one entry per structure of the model, as statistics.json"
    measured = [name for name, stats in expected.items() if stats["volume"] > 0]
    assert {"liver", "spleen"} <= set(measured), f"the phantom's liver and spleen lie whole in the scan: {measured}"
    for name, stats in expected.items():
        assert statistics[name]["volume"] == pytest.approx(stats["volume"]), name
        assert statistics[name]["intensity"] == pytest.approx(stats["intensity"], abs=1e-4), name
    # The CSV: every structure found, volumes in ml and mean HU for the measured ones, the rest marked cut.
    assert [row["structure"] for row in table] == [name for name in statistics if masks[name].any()]
    for row in table:
        stats = expected[row["structure"]]
        if stats["volume"] > 0:
            assert float(row["volume (ml)"]) == pytest.approx(stats["volume"] / 1000, abs=0.005)
            assert float(row["mean HU"]) == pytest.approx(stats["intensity"], abs=0.05)
            assert row["status"] == "complete"
        else:
            assert row["volume (ml)"] == "" and row["status"].startswith("cut off at the scan edge")

    # The phantom's aorta runs the whole scan: cut at its cranial end too, which the aorta report cannot measure.
    aorta = nib.as_closest_canonical(nib.Nifti1Image(masks["aorta"].astype(np.uint8), phantom.affine)).get_fdata() > 0
    assert aorta[:, :, -1].any(), "the segmented aorta reaches the top slice"
    assert aorta_refusal == (
        "The aorta report needs aorta whole, but the field of view cuts it: use a scan that covers it "
        "(nothing was measured)."
    )
    assert "\n" not in evans_refusal and "tsrt models import evans-index" in evans_refusal, evans_refusal
    hosts = {urlparse(url).hostname for url in requested if urlparse(url).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, f"the page made requests off this machine: {hosts}"
    print(f"\nvolume report: {report_seconds:.1f} s from the click to its downloads; "
          f"screenshot: {ARTIFACTS / 'ui_reports_chromium.png'}")
