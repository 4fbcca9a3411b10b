"""The web page's Reports step (tsrt/ui/reports.py and its tab in tsrt/ui/app.py), without a browser.

Volumes are checked against statistics recomputed here; refusals are one line and come before any model
runs (the page's segmentation is asked first, and a missing model is never fetched: a real HTTP server on
127.0.0.1 stands in for the release server and must see no request). The aorta page is built from a real
measurement (`tsrt.reports.aorta.measure` on the masks of an S-shaped tube of known radius), so the diameter
profile picture is checked against the report's own numbers and the tube's geometry. The report models
themselves cannot run here (their weights are not installed); tests/ui/test_reports_browser.py drives the
step in Chromium, where the aorta report runs on fixture models and must equal `tsrt report aorta`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import WeightsServer
from pictures import decode_png
from test_ui import APP, PHANTOM, RUN_TIMEOUT, page_env  # noqa: F401 - page_env is a fixture used by name
from tsrt.demo.phantom import make_phantom
from tsrt.errors import ModelError, TsrtError
from tsrt.pipeline.read import Image
from tsrt.reports.common import MissingStructuresError
from tsrt.ui.runner import Segmentation

SPACING = (2.0, 1.5, 3.0)


def _segmentation(labels: np.ndarray, names: dict[int, str], values: np.ndarray | None = None,
                  affine: np.ndarray | None = None, modality: str = "CT") -> Segmentation:
    values = np.zeros(labels.shape, np.int16) if values is None else values
    affine = np.diag([*SPACING, 1.0]) if affine is None else affine
    return Segmentation(Image(values, affine, None, "test"), values, labels, names, "demo", modality, "cpu")


# --------------------------------------------------------------------------------------------- volumes


def test_volume_report_is_the_segmentations_statistics_json_and_a_table(tmp_path: Path):
    from tsrt.ui.reports import STATUS_CUT_NOT_MEASURED, volume_report

    rng = np.random.default_rng(3)
    values = rng.normal(60, 40, size=(24, 24, 24)).astype(np.float64)  # floats: cast to int16 as upstream does
    labels = np.zeros((24, 24, 24), np.uint8)
    labels[6:12, 6:14, 5:15] = 1  # inside
    labels[2:6, 15:20, 10:14] = 2  # 2 voxels from the edge: cut
    labels[14:20, 3:9, 16:21] = 3  # 3 voxels from the edge: measured
    names = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "aorta"}  # no aorta
    report = volume_report(_segmentation(labels, names, values), tmp_path, "case")

    voxel = float(np.prod(SPACING))
    rounded = values.astype(np.int16)
    expected = {
        "liver": {"volume": 480 * voxel, "intensity": float(rounded[labels == 1].mean())},
        "spleen": {"volume": 0.0, "intensity": 0.0},
        "kidney_left": {"volume": 180 * voxel, "intensity": float(rounded[labels == 3].mean())},
        "aorta": {"volume": 0.0, "intensity": 0.0},
    }
    written = json.loads((tmp_path / "case_statistics.json").read_text())
    assert list(written) == list(expected)
    for name, stats in expected.items():
        assert written[name]["volume"] == pytest.approx(stats["volume"]) and written[name] == report.statistics[name]
        assert written[name]["intensity"] == pytest.approx(stats["intensity"], abs=1e-4), name
    assert report.table == {
        "structure": ["liver", "spleen", "kidney_left"],  # found ones; the aorta was not found
        "volume (ml)": [round(480 * voxel / 1000, 2), None, round(180 * voxel / 1000, 2)],
        "mean HU": [round(expected["liver"]["intensity"], 1), None, round(expected["kidney_left"]["intensity"], 1)],
        "status": ["complete", STATUS_CUT_NOT_MEASURED, "complete"],
    }
    assert report.measured == 2
    rows = list(csv.reader(io.StringIO((tmp_path / "case_volumes.csv").read_text())))
    assert rows[0] == list(report.table) and rows[2] == ["spleen", "", "", STATUS_CUT_NOT_MEASURED]
    assert [f.path.name for f in report.files] == ["case_statistics.json", "case_volumes.csv"]
    mr = volume_report(_segmentation(labels, names, values, modality="MR"), tmp_path / "mr", "case")
    assert "mean intensity" in mr.table


def test_volume_report_without_a_whole_structure_is_refused_in_one_line(tmp_path: Path):
    from tsrt.ui.reports import volume_report

    labels = np.zeros((20, 20, 20), np.uint8)
    with pytest.raises(MissingStructuresError, match="found none") as refused:
        volume_report(_segmentation(labels, {1: "liver"}), tmp_path, "case")
    labels[0:5, 5:10, 5:10] = 1
    with pytest.raises(MissingStructuresError, match="only structures the edge of the scan cuts"):
        volume_report(_segmentation(labels, {1: "liver"}), tmp_path, "case")
    assert "\n" not in str(refused.value) and not list(tmp_path.iterdir()), "nothing written"


# --------------------------------------------------------------------------------------------- refusals


def test_the_segmentation_refuses_reports_whose_structures_it_shows_missing_or_cut():
    from tsrt.ui.reports import AORTA, EVANS, VOLUMES, refuse_what_the_segmentation_lacks

    shape = (20, 20, 30)
    whole = np.zeros(shape, np.uint8)
    whole[8:12, 8:12, 3:27] = 1
    reaching_feet, reaching_head = whole.copy(), whole.copy()
    reaching_feet[8:12, 8:12, 0:3] = 1
    reaching_head[8:12, 8:12, 27:30] = 1
    names = {1: "aorta", 2: "liver"}
    for accepted in (whole, reaching_feet):  # the caudal end may leave the scan, as the aorta report allows
        refuse_what_the_segmentation_lacks(AORTA, _segmentation(accepted, names))
    with pytest.raises(MissingStructuresError) as cut:
        refuse_what_the_segmentation_lacks(AORTA, _segmentation(reaching_head, names))
    assert str(cut.value) == ("The aorta report needs aorta whole, but the field of view cuts it: use a scan that "
                              "covers it (nothing was measured).")
    # Which end is the head comes from the affine: stored head first (z flipped), the same arrays swap verdicts.
    flipped = np.diag([*SPACING, 1.0]) @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, shape[2] - 1], [0, 0, 0, 1]])
    refuse_what_the_segmentation_lacks(AORTA, _segmentation(reaching_head, names, affine=flipped))
    with pytest.raises(MissingStructuresError, match="cuts it"):
        refuse_what_the_segmentation_lacks(AORTA, _segmentation(reaching_feet, names, affine=flipped))
    with pytest.raises(MissingStructuresError, match="needs aorta, which the scan does not show"):
        refuse_what_the_segmentation_lacks(AORTA, _segmentation(np.zeros(shape, np.uint8), names))
    refuse_what_the_segmentation_lacks(AORTA, _segmentation(reaching_head * 2, {2: "liver"}))  # no aorta known

    head = np.zeros(shape, np.uint8)
    head[5:15, 5:15, 5:25] = 2  # skull only
    with pytest.raises(MissingStructuresError) as no_brain:
        refuse_what_the_segmentation_lacks(EVANS, _segmentation(head, {1: "brain", 2: "skull"}))
    assert str(no_brain.value) == ("The Evans index report needs brain, which the scan does not show: use a scan "
                                   "that covers it (nothing was measured).")
    refuse_what_the_segmentation_lacks(EVANS, _segmentation(head, {2: "liver"}))  # the model knows no brain
    refuse_what_the_segmentation_lacks(VOLUMES, _segmentation(head, {2: "liver"}))


def test_report_models_are_never_fetched_from_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Missing report models are refused in one line naming the command; the release server hears nothing.
    The same request without the page's offline runtime does ask it (so this test can fail)."""
    from tsrt.reports.aorta import AortaReporter
    from tsrt.totalseg.options import RuntimeOptions
    from tsrt.totalseg.source import read_source
    from tsrt.ui.reports import PHASE_ESTIMATE, aorta_report_for_page, evans_index_for_page, report_runtime

    server = WeightsServer(b"")
    try:
        monkeypatch.setenv("TSRT_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "empty_totalseg_home"))
        monkeypatch.setenv("TSRT_WEIGHTS_URL", f"{server.url}/missing")
        monkeypatch.delenv("TSRT_OFFLINE", raising=False)
        values = np.random.default_rng(0).integers(-100, 100, size=(24, 24, 24)).astype(np.int16)
        nib.save(nib.Nifti1Image(values, np.eye(4)), tmp_path / "scan.nii.gz")
        source = read_source(tmp_path / "scan.nii.gz")
        segmentation = _segmentation(np.zeros(values.shape, np.uint8), {1: "liver"}, values)
        runtime = report_runtime("cpu", "fp32")
        assert runtime.segment_options("total").offline
        with pytest.raises(ModelError) as aorta:
            aorta_report_for_page(source, segmentation, runtime, "native", tmp_path / "out", "case")
        with pytest.raises(ModelError) as evans:
            evans_index_for_page(source, segmentation, runtime, tmp_path / "out", "case")
        with pytest.raises(TsrtError) as phase:
            aorta_report_for_page(source, segmentation, runtime, PHASE_ESTIMATE, tmp_path / "out", "case")
        assert server.requests == []
        assert "\n" not in str(phase.value) and str(phase.value).endswith("or choose the contrast phase by name.")
        for refused, command in ((aorta, "tsrt models import total"), (evans, "tsrt models import evans-index")):
            assert "\n" not in str(refused.value) and command in str(refused.value), refused.value
        assert not (tmp_path / "out").exists()
        with pytest.raises(TsrtError, match="404"):
            AortaReporter(RuntimeOptions(provider="cpu", quiet=True))  # not offline: models on first use
        assert server.requests, "without the page's runtime the missing model is downloaded"
    finally:
        server.close()


# --------------------------------------------------------------------------------------------- profile picture


def test_tick_steps_are_one_two_five():
    from tsrt.ui.reports import tick_step

    assert [tick_step(span) for span in (10, 101.7, 250, 7)] == [1, 20, 50, 1]
    assert tick_step(35, 6) == 10 and tick_step(0.5) == pytest.approx(0.05)


def _colour_at(picture: np.ndarray, pixel: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in picture[pixel])


def test_profile_picture_draws_the_curve_and_each_landmark_at_its_millimetres():
    from tsrt.reports.aorta_cpr import CURVES
    from tsrt.reports.aorta_measure import DiameterProfile
    from tsrt.ui.reports import ProfilePoint, landmark_colour, profile_frame, render_diameter_profile

    positions = np.arange(120.0, -1.0, -5.0)  # distal end first, as the report's profile
    aorta = 22 + positions / 20
    aorta[4] = np.nan  # no cut there: a gap in the curve
    no_lumen = np.full_like(aorta, np.nan)
    profile = DiameterProfile(positions, aorta, aorta.copy(), no_lumen)
    points = [ProfilePoint(1, "annulus", 0.0, 24.0, 23.0), ProfilePoint(5, "distal asc. aorta", 60.0, 28.0, 27.0),
              ProfilePoint(6, "mid aortic arch", 62.0, 27.5, 27.0)]
    picture = render_diameter_profile(profile, points)
    frame = profile_frame(profile, points)
    assert frame.length_mm >= 120 and frame.diameter_mm >= 28 * 1.15
    for point in points:
        assert _colour_at(picture, frame.pixel(point.position_mm, point.diameter_mm)) == landmark_colour(point.number)
    curve = CURVES[0][1]
    for index in (0, 10, 20):
        assert _colour_at(picture, frame.pixel(positions[index], aorta[index])) == curve, index
    gap = frame.pixel((positions[3] + positions[5]) / 2, aorta[3])
    assert _colour_at(picture, gap) != curve, "no line across a position without a diameter"
    for _, lumen in CURVES[1:]:
        assert not np.all(picture == lumen, axis=-1).any(), "without a false lumen only the aorta is drawn"
    dissected = DiameterProfile(positions, aorta, aorta - 6, np.where(positions > 60, 8.0, np.nan))
    drawn = render_diameter_profile(dissected, points)
    for _, lumen in CURVES[1:]:
        assert np.all(drawn == lumen, axis=-1).any()


# --------------------------------------------------------------------------------------------- aorta page

TUBE_SHAPE, TUBE_SPACING = (48, 48, 110), 1.5
TUBE_BOTTOM, TUBE_TOP = 20, 90  # slices; the annulus sits in the top three


def tube_radius(z):
    """The tube's radius in voxels at slice z: 9 at the annulus, narrowing to 6 at the distal end."""
    return 9 - 3 * ((TUBE_TOP - np.asarray(z, float)) / (TUBE_TOP - TUBE_BOTTOM))


@pytest.fixture(scope="module")
def tube_report():
    """The aorta report measured on an S-shaped tube with annulus, sinotubular junction, T12 and an iliac artery."""
    import nibabel as nib

    from tsrt.reports.aorta import AortaMasks, measure

    x, y, z = np.meshgrid(*[np.arange(n) for n in TUBE_SHAPE], indexing="ij")
    centre_x = 24 + 4 * np.sin((z - TUBE_BOTTOM) / (TUBE_TOP - TUBE_BOTTOM) * np.pi)
    across = (x - centre_x) ** 2 + (y - 24) ** 2
    aorta = (across <= tube_radius(z) ** 2) & (z >= TUBE_BOTTOM) & (z < TUBE_TOP)
    masks = {
        "aorta": aorta,
        "annulus_proper": (across <= 36) & (z >= TUBE_TOP - 3) & (z < TUBE_TOP),
        "sinotubular_junction": (across <= tube_radius(z) ** 2) & (z >= 72) & (z < 74),
        "iliac_artery_right": ((x - 24) ** 2 + (y - 24) ** 2 <= 16) & (z >= 10) & (z < TUBE_BOTTOM + 1),
        "vertebrae_T12": (np.abs(x - 24) <= 6) & (y <= 12) & (y >= 4) & (np.abs(z - 40) <= 5),
    }
    affine = np.diag([TUBE_SPACING] * 3 + [1.0])
    ct = nib.Nifti1Image(np.where(aorta, 300, -100).astype(np.int16), affine)
    images = {name: nib.Nifti1Image(mask.astype(np.uint8), affine) for name, mask in masks.items()}
    return measure(AortaMasks(ct, images, ct), contrast_phase="native")


def test_aorta_page_writes_the_commands_files_and_puts_each_landmark_on_the_profile(tube_report, tmp_path: Path):
    from tsrt.ui.reports import aorta_page_report, landmark_colour, profile_frame

    made = aorta_page_report(tube_report, tmp_path, "tube")
    assert [(f.label, f.path.name) for f in made.files] == [
        ("Aorta report (JSON)", "tube_aorta_report.json"), ("Report page (PNG)", "tube_aorta_report.png"),
        ("Diameter profile (CSV)", "tube_aorta_report_profile.csv"), ("Diameter profile (PNG)", "tube_aorta_profile.png"),
    ]
    assert json.loads(made.files[0].path.read_text()) == json.loads(json.dumps(tube_report.json))
    profile_rows = list(csv.reader(io.StringIO(made.files[2].path.read_text())))
    assert profile_rows[0][:2] == ["position_mm", "aorta_diameter_mm"] and len(profile_rows) > 10
    assert decode_png(made.files[1].path.read_bytes()).shape[1] == 1200, "the report page"
    assert made.files[3].path.read_bytes() == made.profile_png

    measured = [number for number, landmark in sorted(tube_report.landmarks.items()) if not landmark.empty]
    assert [point.number for point in made.points] == measured and len(measured) >= 4
    positions = [point.position_mm for point in made.points]
    assert positions[0] == pytest.approx(0.0, abs=1.0) and positions == sorted(positions), "annulus first, then distal"
    profile = tube_report.profile
    order = np.argsort(profile.position_mm)
    picture = decode_png(made.profile_png)
    frame = profile_frame(profile, made.points)
    for point in made.points:
        landmark = tube_report.landmarks[point.number].values
        assert (point.diameter_mm, point.diameter_pd_mm) == (landmark["diameter"] * 10, landmark["diameter_pd"] * 10)
        assert _colour_at(picture, frame.pixel(point.position_mm, point.diameter_mm)) == landmark_colour(point.number)
        if point.number == 1:
            continue  # the annulus is its own disc, not the tube
        on_curve = np.interp(point.position_mm, profile.position_mm[order], profile.aorta_mm[order])
        assert point.diameter_mm == pytest.approx(on_curve, abs=2.0), point
    # Position 0 is the annulus, where the tube is widest (9 mm wider than at its distal end).
    near, far = profile.position_mm < 20, profile.position_mm > profile.position_mm.max() - 20
    widest, narrowest = 2 * tube_radius(TUBE_TOP) * TUBE_SPACING, 2 * tube_radius(TUBE_BOTTOM) * TUBE_SPACING
    assert np.nanmean(profile.aorta_mm[near]) - np.nanmean(profile.aorta_mm[far]) > (widest - narrowest) / 2
    assert [caption.split(" - ")[0] for _, caption in made.landmark_pictures] == [str(n) for n in measured]


# --------------------------------------------------------------------------------------------- the page


def test_reports_tab_makes_the_volume_report_and_shows_made_reports_with_their_downloads(
    page_env: Path, tube_report, tmp_path: Path  # noqa: F811 - the imported fixture
):
    from streamlit.testing.v1 import AppTest

    from tsrt.companions.evans_index import EvansMeasurement, Width, render_png
    from tsrt.pipeline.write import write_json
    from tsrt.ui.reports import EvansPageReport, ReportFile, aorta_page_report

    phantom = make_phantom(**PHANTOM)
    scan = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), scan)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    at.file_uploader(key="upload").upload("phantom.nii.gz", scan.read_bytes(), "application/gzip")
    at.run()
    at.button(key="run").click().run(timeout=RUN_TIMEOUT)
    assert not at.exception and not at.error, (at.exception, at.error)
    assert [tab.label for tab in at.tabs] == ["Organ volumes and densities", "Aorta diameters", "Evans index"]
    images_before = len(at.image)

    at.button(key="report:volumes").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    result = at.session_state["result"]
    found = [name for name, status in zip(result.report["structure"], result.report["status"]) if status != "not found"]
    assert list(at.dataframe[1].value["structure"]) == found
    assert "Reference ranges are not available" in at.tabs[0].caption[1].value

    # Reports the models would make (they cannot run here): the tube's aorta report and an Evans measurement.
    folder = result.files.folder
    result.reports["aorta"] = aorta_page_report(tube_report, folder, "tube")
    slice_image = np.zeros((60, 70), np.uint8)
    slice_image[5:55, 5:65] = 1
    measurement = EvansMeasurement({"evans_index": 0.281, "brain_volume_ml": 1302.4, "ventricle_volume_ml": 21.0,
                                    "ventricle_brain_ratio": 0.016}, Width(18, (26, 40, 30), (44, 40, 30)),
                                   Width(64, (3, 40, 30), (67, 40, 30)), slice_image)
    png = folder / "head_evans_index.png"
    png.write_bytes(render_png(measurement))
    json_path = write_json(measurement.report, folder / "head_evans_index.json")
    result.reports["evans"] = EvansPageReport(measurement.report, png, [
        ReportFile("Evans index (JSON)", json_path, "application/json"), ReportFile("Measured slice (PNG)", png, "image/png"),
    ])
    at.run()
    assert not at.exception and not at.error, (at.exception, at.error)
    aorta_tab, evans_tab = at.tabs[1], at.tabs[2]
    widest = tube_report.json["section_stats"]["aorta_total"]["max_diameter"]
    assert f"{len(result.reports['aorta'].points)} of 11 landmarks measured" in aorta_tab.markdown[0].value
    assert ("-" if widest is None else f"{widest} cm") in aorta_tab.markdown[0].value
    # the profile, one cut per measured landmark and the report page; the Evans slice
    assert len(at.image) == images_before + 3 + len(result.reports["aorta"].points)
    assert [metric.value for metric in evans_tab.metric] == ["0.281", "1302 ml", "21 ml"]
    labels = [button.label for button in at.download_button]
    assert labels[-8:] == [
        "Volume report (JSON, statistics.json)", "Volume report (CSV)", "Aorta report (JSON)", "Report page (PNG)",
        "Diameter profile (CSV)", "Diameter profile (PNG)", "Evans index (JSON)", "Measured slice (PNG)",
    ]
