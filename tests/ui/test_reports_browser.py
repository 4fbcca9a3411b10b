"""The Reports step end to end in a real browser: `tsrt ui` on loopback, Debian's chromium driven by Playwright.

Volumes: a clinician segments a phantom with the demo model, opens the Reports step, makes the volume report
and downloads it; the downloaded statistics are checked against numbers this test computes itself from the
downloaded masks and the scan. Then the aorta report is refused in one line (the phantom's aorta runs the
whole length of the scan, so the field of view cuts it) and the Evans index too (its models are not
installed, and the page never fetches one).

Aorta: the page makes the aorta report with real models. tests/reports/test_aorta_e2e.py's intensity-band
fixture models (TotalSegmentator's layout) and its chest phantom (a candy-cane aorta of known diameter
profile): `tsrt report aorta` runs first and fetches the models on first use into a store, then the page
serving that store segments the same scan with the installed `total --fast` and makes the report. Its
JSON and profile CSV must equal the command's, its report page too (below the header, which holds the
date), and the page shows the diameter profile and each landmark's cut with the command's diameters.

Server, browser and page are tests/chromium_page.py's fixtures (servers are shared per model store).
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urljoin

import nibabel as nib
import numpy as np
import pytest

from chromium_page import ARTIFACTS, DEMO_LABEL, ChromiumPage, UiServers, choose, downloaded, open_scan, segment
from pictures import decode_png
from totalseg_official import tsrt_cli
from tsrt.demo.phantom import make_phantom

# tests/reports/test_aorta_e2e.py's builders, under the module name pytest gives that file (rootdir-relative
# "prepend" imports: its folder on sys.path), so a run that collects both shares one module.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reports"))
from test_aorta_e2e import PHASE, aorta_models_home  # noqa: E402, F401 - aorta_models_home is a fixture
from test_aorta_e2e import make_phantom as make_chest_phantom  # noqa: E402

#: Large enough that the liver and spleen lie whole inside the scan (measured), small enough for few tiles.
PHANTOM = dict(shape=(112, 96, 72), spacing=(3.0, 3.0, 3.0), seed=7)
#: TotalSegmentator leaves a structure within this many voxels of the scan's edge out of statistics.json.
BORDER_VOXELS = 3
pytestmark = pytest.mark.slow


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
    chromium_page: ChromiumPage, ui_servers: UiServers, small_task_store: Path, tmp_path: Path
):
    """On the server of test_ui_browser's store (tasks but no report models installed), with the demo model."""
    from playwright.sync_api import expect

    phantom = make_phantom(**PHANTOM)
    scan = tmp_path / "phantom_ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), scan)
    ARTIFACTS.mkdir(exist_ok=True)
    page = chromium_page.page
    page.goto(ui_servers.url(small_task_store))
    open_scan(page, scan, PHANTOM["shape"])
    choose(page, "Model", DEMO_LABEL)
    segment(page)

    started = time.perf_counter()
    page.get_by_role("tab", name="Organ volumes and densities").click()
    page.get_by_role("button", name="Create the volume report").click()
    json_button = page.get_by_role("button", name="Volume report (JSON, statistics.json)")
    csv_button = page.get_by_role("button", name="Volume report (CSV)")
    expect(json_button).to_have_count(1, timeout=60_000)
    expect(csv_button).to_have_count(1, timeout=60_000)
    report_seconds = time.perf_counter() - started
    expect(page.get_by_text("Reference ranges are not available", exact=False)).to_be_visible()
    statistics = json.loads(downloaded(page, json_button))
    table = list(csv.DictReader(io.StringIO(downloaded(page, csv_button).decode())))
    with page.expect_download(timeout=120_000) as masks_download:
        page.get_by_role("button", name="Masks (zip, one NIfTI per structure)").click()
    masks_zip = tmp_path / "masks.zip"
    masks_download.value.save_as(masks_zip)

    errors = page.locator('[data-testid="stAlertContentError"]')
    page.get_by_role("tab", name="Aorta diameters").click()
    choose(page, "Contrast phase", "native")
    page.get_by_role("button", name="Create the aorta report").click()
    expect(errors).to_have_count(1, timeout=60_000)
    aorta_refusal = errors.first.inner_text().strip()
    page.get_by_role("tab", name="Evans index").click()
    page.get_by_role("button", name="Create the Evans index").click()
    expect(errors).to_have_count(2, timeout=60_000)
    evans_refusal = errors.nth(1).inner_text().strip()
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)
    page.screenshot(path=str(ARTIFACTS / "ui_reports_chromium.png"), full_page=True)

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
    hosts = chromium_page.hosts()
    assert hosts == {"127.0.0.1"}, f"the page made requests off this machine: {hosts}"
    print(f"\nvolume report: {report_seconds:.1f} s from the click to its downloads; "
          f"screenshot: {ARTIFACTS / 'ui_reports_chromium.png'}")


# --------------------------------------------------------------------------------------------- aorta, with models


@pytest.fixture(scope="module")
def aorta_case(aorta_models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The chest phantom, and `tsrt report aorta`'s files for it, made with a store that starts empty: the
    command fetches the report's models on first use from the TotalSegmentator home into the store, which
    the page then serves (it never fetches a model itself)."""
    folder = tmp_path_factory.mktemp("aorta_case")
    ct, affine = make_chest_phantom()
    scan = folder / "chest_ct.nii.gz"
    nib.save(nib.Nifti1Image(ct, affine), scan)
    store, report = folder / "tsrt_home", folder / "command" / "aorta_report.json"
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TOTALSEG_HOME_DIR", str(aorta_models_home))
        result = tsrt_cli("report", "aorta", str(scan), "-o", str(report), "--contrast-phase", PHASE, "-q",
                          "--device", "cpu", home=store)
    assert result.exit_code == 0, (result.output, result.exception)
    print(f"\ntsrt report aorta: {time.perf_counter() - started:.1f} s (its models imported on first use)")
    return {"scan": scan, "store": store, "json": report, "page": report.with_suffix(".png"),
            "profile": report.with_name(report.stem + "_profile.csv")}


@pytest.mark.oracle  # the fixture models are built with the export extra (torch, nnU-Net)
def test_aorta_report_made_on_the_page_with_real_models_equals_the_command(
    chromium_page: ChromiumPage, ui_servers: UiServers, aorta_case: dict[str, Path]
):
    """Segment with the installed task, make the aorta report in its tab, compare with `tsrt report aorta`'s files."""
    from playwright.sync_api import expect

    from tsrt.reports.aorta_cpr import CURVES
    from tsrt.reports.aorta_render import HEADER_HEIGHT
    from tsrt.ui.reports import PLOT_HEIGHT, PLOT_WIDTH, landmark_colour

    ARTIFACTS.mkdir(exist_ok=True)
    page = chromium_page.page
    page.goto(ui_servers.url(aorta_case["store"]))
    open_scan(page, aorta_case["scan"], nib.load(aorta_case["scan"]).shape)
    # The installed `total --fast` is the preselected model; the page's own segmentation must find the aorta whole.
    expect(page.get_by_role("combobox", name="Model")).to_have_value("total (TotalSegmentator task)")
    expect(page.get_by_role("checkbox", name="fast (lower resolution, quicker)")).to_be_checked()
    segment(page)

    started = time.perf_counter()
    page.get_by_role("tab", name="Aorta diameters").click()
    choose(page, "Contrast phase", PHASE)
    page.get_by_role("button", name="Create the aorta report").click()
    json_button = page.get_by_role("button", name="Aorta report (JSON)")
    expect(json_button).to_have_count(1, timeout=300_000)
    report_seconds = time.perf_counter() - started
    expect(page.locator('[data-testid="stAlertContentError"]')).to_have_count(0)
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)
    summary = page.get_by_text("Widest aorta diameter:", exact=False).inner_text()
    profile_image = page.locator('[data-testid="stImage"]').filter(has_text="Diameter along the centerline").locator("img")
    expect(profile_image).to_be_visible()
    shown_width = profile_image.evaluate("image => image.complete ? image.naturalWidth : 0")
    shown_profile = page.request.get(urljoin(page.url, profile_image.get_attribute("src"))).body()
    captions = [text.strip() for text in page.locator('[data-testid="stImageCaption"]').all_inner_texts()]
    ours = json.loads(downloaded(page, json_button))
    page_png = downloaded(page, page.get_by_role("button", name="Report page (PNG)"))
    profile_csv = downloaded(page, page.get_by_role("button", name="Diameter profile (CSV)")).decode()
    profile_png = downloaded(page, page.get_by_role("button", name="Diameter profile (PNG)"))
    page.screenshot(path=str(ARTIFACTS / "ui_aorta_chromium.png"), full_page=True)

    # The page's report is the command's: the same JSON (landmarks, diameters, sections), profile and page.
    theirs = json.loads(aorta_case["json"].read_text())
    assert ours == theirs
    assert profile_csv == aorta_case["profile"].read_text()
    expected_page = decode_png(aorta_case["page"].read_bytes())
    shown_page = decode_png(page_png)
    assert shown_page.shape == expected_page.shape
    assert np.array_equal(shown_page[HEADER_HEIGHT:], expected_page[HEADER_HEIGHT:]), "the page below its date"
    # What the page shows: the command's numbers.
    landmarks = {int(number): landmark for number, landmark in theirs["landmarks"].items() if landmark["diameter"]}
    assert len(landmarks) == 11, "the phantom's aorta has all eleven landmarks (test_aorta_e2e)"
    widest = theirs["section_stats"]["aorta_total"]["max_diameter"]
    assert summary == f"Widest aorta diameter: {widest} cm; 11 of 11 landmarks measured.", summary
    expected_captions = [f"{number} - {landmark['name']}: {landmark['diameter']:.1f} x {landmark['diameter_pd']:.1f} cm"
                         for number, landmark in sorted(landmarks.items())]
    assert [caption for caption in captions if caption[:1].isdigit()] == expected_captions, captions
    # The diameter profile shown is the one downloaded, with the aorta's curve, both lumens' (the phantom has a
    # false lumen, see the command's profile) and a disc in each landmark's colour.
    plot = decode_png(profile_png)
    assert plot.shape == (PLOT_HEIGHT, PLOT_WIDTH, 3) and shown_width == PLOT_WIDTH
    assert np.array_equal(decode_png(shown_profile), plot)
    rows = list(csv.DictReader(io.StringIO(aorta_case["profile"].read_text())))
    assert any(row["false_lumen_diameter_mm"] for row in rows)
    for colour in [colour for _, colour in CURVES] + [landmark_colour(number) for number in landmarks]:
        assert np.all(plot == colour, axis=-1).any(), colour
    hosts = chromium_page.hosts()
    assert hosts == {"127.0.0.1"}, f"the page made requests off this machine: {hosts}"
    print(f"\naorta report on the page: {report_seconds:.1f} s from the click to its downloads; "
          f"screenshot: {ARTIFACTS / 'ui_aorta_chromium.png'}")
