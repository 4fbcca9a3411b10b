"""`tsrt report aorta` against TotalSegmentator's `totalseg_aorta_report`, on a tube phantom of known geometry.

Phantom (0.8 mm voxels, RAS): a candy-cane aorta - 60 mm ascending, a half-circle arch of 25 mm radius,
170 mm descending - whose radius shrinks linearly from 13 to 9 mm along the centerline, with a
Gaussian sinus bulge (+3 mm at 15 mm from the annulus). Around it: the annulus (a disk at the root),
the sinotubular junction (a disk at 30 mm), three arch branches, celiac trunk, SMA, renal arteries,
a T12 box behind the descending aorta, both iliac arteries, and a false lumen in the front half of
the descending aorta (a dissection). So every landmark and section exists, and each landmark's
analytic diameter is 2 r(s) at its arc length s.

Parity: tsrt (the command, with -rt masks as upstream's -rt/-rd take them) and official
`create_aorta_report` (run in a child process on the same files; its 3D previews need VTK under
Xvfb and its page wkhtmltoimage, so those three rendering steps are replaced by stubs, and its CPR
overview by one that records the diameter profile) give the same JSON, key for key and number for
number, and the same diameter profile. The animated CPR (-ca) has upstream's frames: as many, each showing
the CPR slice upstream's generate_animated_cpr_nifti picks (its position line on upstream's pixel row), and
panels as wide as upstream's helpers draw them (computed in the oracle; its VTK view and browser page left out).
Analytic: diameters within 2 voxels plus rounding (the cut is grown by one voxel before measuring, so both
read about one voxel wide), landmark positions, volumes and the false lumen's area.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pictures import decode_png
from totalseg_official import start_official, tsrt_cli, tsrt_process

SPACING = 0.8
ASCENDING_MM, ARCH_RADIUS_MM, DESCENDING_MM = 60.0, 25.0, 170.0
ROOT_RADIUS_MM, DISTAL_RADIUS_MM = 13.0, 9.0
SINUS_AT_MM, SINUS_EXTRA_MM, SINUS_WIDTH_MM = 15.0, 3.0, 5.0
JUNCTION_AT_MM = 30.0
ANNULUS_RADIUS_MM = 12.0
T12_BELOW_ARCH_MM, CELIAC_BELOW_ARCH_MM = 105.0, 125.0
FALSE_LUMEN_Z_MM = (-110.0, -50.0)  # below the arch's centre
FALSE_LUMEN_FRONT_MM = 1.5  # the flap: 1.5 mm in front of the centerline
TOTAL_MM = ASCENDING_MM + np.pi * ARCH_RADIUS_MM + DESCENDING_MM
PHASE = "arterial_late"


def radius(s):
    """The tube's radius (mm) at arc length `s` (mm from the annulus)."""
    s = np.asarray(s, float)
    taper = ROOT_RADIUS_MM + (DISTAL_RADIUS_MM - ROOT_RADIUS_MM) * np.clip(s / TOTAL_MM, 0, 1)
    return taper + SINUS_EXTRA_MM * np.exp(-(((s - SINUS_AT_MM) / SINUS_WIDTH_MM) ** 2))


def arc_length(point) -> float:
    """Arc length (mm from the annulus) of the centerline point nearest to a world point (x-z plane)."""
    x, _, z = point
    R, top, distal_x = ARCH_RADIUS_MM, ASCENDING_MM, 2 * ARCH_RADIUS_MM
    up = np.clip(z, 0, top)
    theta = np.arctan2(max(z - top, 0), x - R)
    down = np.clip(z, top - DESCENDING_MM, top)
    candidates = (
        (np.hypot(x, z - up), up),
        (np.hypot(x - R - R * np.cos(theta), z - top - R * np.sin(theta)), top + R * (np.pi - theta)),
        (np.hypot(x - distal_x, z - down), top + np.pi * R + top - down),
    )
    return float(min(candidates)[1])


def make_aorta_phantom() -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """CT (HU), masks by TotalSegmentator class name, affine (world mm: the root at the origin)."""
    R, top, distal_x = ARCH_RADIUS_MM, ASCENDING_MM, 2 * ARCH_RADIUS_MM
    low = np.array([-ROOT_RADIUS_MM - 38, -ROOT_RADIUS_MM - 40, top - DESCENDING_MM - 35])
    high = np.array([distal_x + ROOT_RADIUS_MM + 38, ROOT_RADIUS_MM + 40, top + R + ROOT_RADIUS_MM + 45])
    shape = tuple(int(v) for v in np.ceil((high - low) / SPACING))
    x, y, z = np.meshgrid(*[(low[i] + np.arange(shape[i]) * SPACING).astype(np.float32) for i in range(3)],
                          indexing="ij")
    up = np.clip(z, 0, top)
    theta = np.arctan2(np.maximum(z - top, 0), x - R)
    down = np.clip(z, top - DESCENDING_MM, top)
    distances = np.stack([
        np.sqrt(x**2 + y**2 + (z - up) ** 2),
        np.sqrt((x - R - R * np.cos(theta)) ** 2 + y**2 + (z - top - R * np.sin(theta)) ** 2),
        np.sqrt((x - distal_x) ** 2 + y**2 + (z - down) ** 2),
    ])
    arcs = np.stack([up, top + R * (np.pi - theta), top + np.pi * R + top - down])
    which = np.argmin(distances, axis=0)
    distance = np.take_along_axis(distances, which[None], 0)[0]
    arc = np.take_along_axis(arcs, which[None], 0)[0]
    aorta = (distance <= radius(arc)) & ~((which == 0) & (z < 0))
    axial = np.sqrt(x**2 + y**2)

    def branch(angle_deg: float, radius_mm: float) -> np.ndarray:  # a vessel leaving the arch upwards
        angle = np.deg2rad(angle_deg)
        bx, bz = R + R * np.cos(angle), top + R * np.sin(angle)
        return (np.sqrt((x - bx) ** 2 + y**2) <= radius_mm) & (z >= bz) & (z <= bz + 43) & ~aorta

    def forward(height: float, radius_mm: float) -> np.ndarray:  # a vessel leaving the descending aorta to the front
        return (np.sqrt((x - distal_x) ** 2 + (z - height) ** 2) <= radius_mm) & (y >= 0) & (y <= 35) & ~aorta

    bottom = top - DESCENDING_MM
    false = aorta & (which == 2) & (y > FALSE_LUMEN_FRONT_MM) & (z > top + FALSE_LUMEN_Z_MM[0]) & (
        z < top + FALSE_LUMEN_Z_MM[1])
    masks = {
        "aorta": aorta,
        "annulus_proper": (axial <= ANNULUS_RADIUS_MM) & (np.abs(z - 1.0) <= 1.5),
        "sinotubular_junction": (axial <= radius(JUNCTION_AT_MM)) & (np.abs(z - JUNCTION_AT_MM) <= 1.5),
        "brachiocephalic_trunk": branch(140, 5.0),
        "subclavian_artery_left": branch(40, 4.5),
        "common_carotid_artery_left": branch(90, 3.5),
        "celiac_trunk": forward(top - CELIAC_BELOW_ARCH_MM, 3.5),
        "superior_mesenteric_artery": forward(top - 140, 3.0),
        "renal_arteries": (np.sqrt(y**2 + (z - (top - 150)) ** 2) <= 2.5) & (np.abs(x - distal_x) <= 35) & ~aorta,
        "vertebrae_T12": (np.abs(x - distal_x) <= 14) & (y <= -16) & (y >= -36)
        & (np.abs(z - (top - T12_BELOW_ARCH_MM)) <= 11),
        "aorta_false_lumen": false,
        "aorta_true_lumen": aorta & ~false,
    }
    for side, sign in (("right", -1), ("left", 1)):
        masks[f"iliac_artery_{side}"] = (np.sqrt((x - (distal_x + sign * 10 * (bottom - z) / 25)) ** 2 + y**2) <= 5.5) & (
            z < bottom + 2) & (z >= bottom - 25) & ~aorta
    ct = np.full(shape, -100, np.int16)
    for name in ("aorta", "brachiocephalic_trunk", "subclavian_artery_left", "common_carotid_artery_left",
                 "celiac_trunk", "superior_mesenteric_artery", "renal_arteries", "iliac_artery_left",
                 "iliac_artery_right"):
        ct[masks[name]] = 300
    ct[false] = 120
    ct[masks["vertebrae_T12"]] = 700
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = low
    return ct, {name: mask.astype(np.uint8) for name, mask in masks.items()}, affine


def analytic_volume_ml() -> float:
    """Volume of the tube: the integral of pi r(s)^2 along the centerline (ml)."""
    s = np.linspace(0, TOTAL_MM, 20001)
    area = np.pi * radius(s) ** 2
    return float(np.sum((area[1:] + area[:-1]) / 2 * np.diff(s)) / 1000)


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The phantom's CT and masks as files, in TotalSegmentator's per-class layout."""
    folder = tmp_path_factory.mktemp("aorta_phantom")
    ct, masks, affine = make_aorta_phantom()
    nib.save(nib.Nifti1Image(ct, affine), folder / "ct.nii.gz")
    rois = folder / "rois"
    rois.mkdir()
    for name, mask in masks.items():
        nib.save(nib.Nifti1Image(mask, affine), rois / f"{name}.nii.gz")
    return {"ct": folder / "ct.nii.gz", "rois": rois, "folder": folder, "masks": masks, "affine": affine}


_ORACLE = """
def main():
    import logging
    import time
    import numpy as np
    import totalsegmentator.aorta_report.pipeline as pipeline
    from totalsegmentator.serialization_utils import convert_to_serializable

    job = json.loads(Path(sys.argv[1]).read_text())
    captured = {}
    pipeline.render_previews = lambda *args, **kwargs: None  # fury/VTK under Xvfb
    pipeline.render_report_image = lambda *args, **kwargs: None  # wkhtmltoimage
    pipeline.serialize_outputs = lambda *args, **kwargs: (None, None)  # blosc pickles of the page

    def keep_profile(*args):  # plot_cpr_overview: its layout needs wkhtmltoimage too
        positions, aorta, true, false = args[11:15]
        captured["profile"] = [np.asarray(v, float).tolist() for v in (positions, aorta, true, false)]
        captured["animation"] = animation_geometry(args[0], args[1], positions, aorta, true, false)

    def animation_geometry(cpr_ct, cpr_mask, positions, aorta, true, false):
        # What generate_animated_cpr_nifti (-ca) makes of this CPR, from its own helpers (VTK and the browser
        # page left out): the CPR slice and position-line row of every frame, and the content's pixel size.
        import inspect
        import re
        import matplotlib
        matplotlib.use("Agg")
        from totalsegmentator.aorta_report import cpr_animated as official

        source = inspect.getsource(official.generate_animated_cpr_nifti)
        sizes = {name: int(re.search(rf"{name} = (\\d+)", source).group(1))
                 for name in ("TARGET_H", "TITLE_H", "width_3d", "width_cross_section")}
        ct, mask = cpr_ct.get_fdata(), (cpr_mask.get_fdata() > 0.5).astype(np.uint8)
        slices, step = ct.shape[2], float(cpr_ct.header.get_zooms()[2])
        image, outline = ct[:, ct.shape[1] // 2, :].T[::-1, ::-1], mask[:, mask.shape[1] // 2, :].T[::-1, ::-1]
        width = max(int(image.shape[1] * sizes["TARGET_H"] / image.shape[0]), 150)
        cpr_panel, rows = official._render_cpr_panel_base(image, outline, slices, width, sizes["TARGET_H"], -700, 1000)
        display = np.arange(slices)[::-1] * step
        frames = [int(np.argmin(np.abs(display - p)))
                  for p in official._fit_curve_positions_to_display(positions, display)]
        profile_panel = official._render_profile_panel_base(
            sizes["TARGET_H"], 0.05, 0.9, official._fit_curve_positions_to_display(positions, display),
            float(display.max()), aorta, true, false, [])
        content = [sizes["width_3d"] + cpr_panel.shape[1] + profile_panel.shape[1] + sizes["width_cross_section"],
                   sizes["TARGET_H"] + sizes["TITLE_H"]]
        return {"frames": frames, "rows": [int(rows[f]) for f in frames], "content": content,
                "cpr_width": int(cpr_panel.shape[1]), "profile_width": int(profile_panel.shape[1]),
                "title_height": sizes["TITLE_H"]}

    pipeline.plot_cpr_overview = keep_profile
    work = Path(job["work"])
    (work / "models").mkdir(parents=True, exist_ok=True)  # the phase, as totalseg_get_phase would cache it
    (work / "models" / "contrast_phase.json").write_text(json.dumps({"phase": job["phase"]}))
    metadata = {"PatientName": "Unknown", "PatientSex": "M", "PatientAge": 83, "PatientBirthDate": "19000101",
                "PatientID": "Unknown", "StudyID": "Unknown", "StudyDescription": "Unknown",
                "StudyDate": "19000101", "version": "0.1.2"}
    started = time.time()
    for update in pipeline.create_aorta_report(
        Path(job["ct"]), Path(job["rois"]), Path(job["rois"]), metadata, work, logging.getLogger("oracle"),
        delete_tmp=False, delete_aux_files=False, cpr_path=work / "cpr.png", aorta_fn="aorta.nii.gz",
        annulus_fn="annulus_proper.nii.gz",
    ):
        final = update
    report = json.loads(json.dumps(convert_to_serializable(final["report_json"])))
    return {"json": report, "seconds": time.time() - started, **captured}
"""


@pytest.fixture(scope="module")
def official(phantom_case: dict, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("totalsegmentator", reason="the oracle is official TotalSegmentator (dev environment)")
    work = tmp_path_factory.mktemp("official_aorta")
    job = {"ct": str(phantom_case["ct"]), "rois": str(phantom_case["rois"]), "work": str(work / "tmp"), "phase": PHASE}
    (work / "job.json").write_text(json.dumps(job))
    process = start_official(_ORACLE, work, str(work / "job.json"))
    yield process
    process.kill()


@pytest.fixture(scope="module")
def tsrt_run(phantom_case: dict, official, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`tsrt report aorta` with the phantom's masks (while the oracle runs): its files."""
    import time

    out = tmp_path_factory.mktemp("tsrt_aorta") / "aorta_report.json"
    started = time.perf_counter()
    result = tsrt_cli("report", "aorta", str(phantom_case["ct"]), "-rt", str(phantom_case["rois"]),
                      "--contrast-phase", PHASE, "-o", str(out), "--pdf", "--nifti", "-c", "-ca", "-q",
                      home=tmp_path_factory.mktemp("empty_home"))
    assert result.exit_code == 0, (result.output, result.exception)
    return {"json": out, "seconds": time.perf_counter() - started}


@pytest.mark.slow
def test_report_equals_official(tsrt_run: dict, official) -> None:
    theirs = official.result()
    ours = json.loads(tsrt_run["json"].read_text())
    print(f"tsrt {tsrt_run['seconds']:.1f} s, official {theirs['seconds']:.1f} s")
    assert list(ours) == list(theirs["json"]) == ["landmarks", "section_stats", "metadata"]
    for number, landmark in theirs["json"]["landmarks"].items():  # key for key, value for value
        assert list(ours["landmarks"][number]) == list(landmark), number
        assert ours["landmarks"][number] == landmark, number
    assert ours["section_stats"] == theirs["json"]["section_stats"]
    assert ours["metadata"] == theirs["json"]["metadata"]
    # the diameter profile (upstream computes it for the CPR picture; tsrt writes it as CSV, 2 decimals)
    rows = tsrt_run["json"].with_name("aorta_report_profile.csv").read_text().splitlines()
    assert rows[0] == "position_mm,aorta_diameter_mm,true_lumen_diameter_mm,false_lumen_diameter_mm"
    table = np.array([[float(v) if v else np.nan for v in row.split(",")] for row in rows[1:]])
    expected = np.array(theirs["profile"], dtype=float).T
    assert table.shape == expected.shape
    assert np.array_equal(np.isnan(table), np.isnan(expected))
    assert np.nanmax(np.abs(table - expected)) <= 0.005 + 1e-9


@pytest.mark.slow
def test_measurements_match_the_phantom(tsrt_run: dict) -> None:
    report = json.loads(tsrt_run["json"].read_text())
    landmarks = report["landmarks"]
    assert all(landmark["diameter"] is not None for landmark in landmarks.values())  # every landmark found
    at = {}
    for number, landmark in landmarks.items():
        ends = np.array([landmark[key] for key in ("start", "end", "start_pd", "end_pd")])
        s = arc_length(ends.mean(axis=0))
        expected_cm = 2 * (ANNULUS_RADIUS_MM if number == "1" else radius(s)) / 10
        at[number] = s
        print(f"{number} {landmark['name']}: s={s:.1f} mm, analytic {expected_cm:.2f} cm, "
              f"measured {landmark['diameter']} x {landmark['diameter_pd']} cm")
        for key in ("diameter", "diameter_pd"):  # 2 voxels (the cut is grown by one) + the 0.05 cm rounding
            assert abs(landmark[key] - expected_cm) <= 2 * SPACING / 10 + 0.05 + 1e-9, (number, key)
    assert abs(at["2"] - SINUS_AT_MM) <= 2.0  # the sinuses: the widest section between annulus and junction
    assert abs(at["3"] - JUNCTION_AT_MM) <= 2.0
    assert abs(at["9"] - (ASCENDING_MM + np.pi * ARCH_RADIUS_MM + T12_BELOW_ARCH_MM)) <= 2.0
    assert abs(at["10"] - (ASCENDING_MM + np.pi * ARCH_RADIUS_MM + CELIAC_BELOW_ARCH_MM - 3.5)) <= 2.0  # its top
    assert at == dict(sorted(at.items(), key=lambda item: int(item[0])))
    assert all(at[str(n)] < at[str(n + 1)] for n in range(1, 11))  # in order from the annulus down
    # the false lumen at T12: a disk's segment in front of the flap
    r = radius(at["9"])
    segment_cm2 = (r**2 * np.arccos(FALSE_LUMEN_FRONT_MM / r) - FALSE_LUMEN_FRONT_MM * np.sqrt(r**2 - 1.5**2)) / 100
    assert abs(landmarks["9"]["area_fl"] - segment_cm2) <= 0.15
    assert landmarks["8"]["area_fl"] + landmarks["9"]["area_fl"] > 0 and landmarks["1"]["area_fl"] == 0
    total = report["section_stats"]["aorta_total"]
    assert total["volume"] == pytest.approx(analytic_volume_ml(), rel=0.02)
    assert total["volume_true_lumen"] + total["volume_false_lumen"] == pytest.approx(total["volume"], abs=0.15)
    length_cm = (at["11"] - at["1"]) / 10  # voxel-step centerlines run a little long on diagonals
    assert length_cm <= total["length"] <= length_cm * 1.06
    widest = max(landmark["diameter"] for landmark in landmarks.values())
    assert total["max_diameter"] == pytest.approx(widest, abs=0.1)


@pytest.mark.slow
def test_page_files(tsrt_run: dict) -> None:
    json_path = tsrt_run["json"]
    png = json_path.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG")
    width, height = struct.unpack(">II", png[16:24])
    assert width == 1200 and height > 900
    pdf = json_path.with_suffix(".pdf").read_bytes()
    assert pdf.startswith(b"%PDF-1.4") and pdf.rstrip().endswith(b"%%EOF")
    image = nib.load(json_path.with_name("aorta_report.nii.gz"))
    assert image.get_data_dtype().names == ("R", "G", "B") and image.shape == (width + 1, height + 1, 1)
    raw = np.asarray(image.dataobj)[:, :, 0]
    volume = np.stack([raw[name] for name in "RGB"], axis=-1)[::-1, ::-1]  # upstream flips the stacked frames
    page = volume[:width, 1:][::-1, ::-1].transpose(1, 0, 2)  # each frame: transposed, flipped, top-right
    assert np.array_equal(page, decode_png(png))  # the same page, laid out as upstream's NIfTI
    cpr = decode_png(json_path.with_name("aorta_report_cpr.png").read_bytes())  # the straightened aorta
    assert cpr.shape[0] > 900 and (cpr == (255, 77, 77)).all(axis=-1).any()  # with the aorta's outline


def _nifti_frames(path: Path) -> np.ndarray:
    """The frames of an RGB report NIfTI in display order, (frames, rows, columns, 3), as upstream stores them."""
    raw = np.asarray(nib.load(path).dataobj)
    volume = np.stack([raw[name] for name in "RGB"], axis=-1)[::-1, ::-1]  # upstream flips the stacked frames
    return volume[:-1, 1:][::-1, ::-1].transpose(2, 1, 0, 3)[::-1]  # each turned, top-right; last frame first


@pytest.mark.slow
def test_animated_cpr_has_officials_frames_and_panels(tsrt_run: dict, official) -> None:
    """-ca: upstream's frame count, CPR slice per frame (the position line's row) and content size; it moves."""
    from tsrt.reports.aorta_animation import POSITION_COLOUR
    from tsrt.reports.aorta_render import HEADER_HEIGHT

    theirs = official.result()["animation"]
    path = tsrt_run["json"].with_name("aorta_report_cpr_animated.nii.gz")
    image = nib.load(path)
    assert image.get_data_dtype().names == ("R", "G", "B") and np.array_equal(image.affine, np.diag([-1, -1, 1, 1]))
    frames = _nifti_frames(path)
    content_width, content_height = theirs["content"]
    page_width = max(content_width + 48, 900)  # report_layout: the page around the content
    print(f"frames {len(frames)} (official {len(theirs['frames'])}), page {frames.shape[2]} x {frames.shape[1]}, "
          f"content {content_width} x {content_height}")
    assert len(frames) == len(theirs["frames"])
    assert image.shape[:2] == (page_width + 1, frames.shape[1] + 1)
    assert frames.shape[1] >= HEADER_HEIGHT + content_height
    top, left = HEADER_HEIGHT + theirs["title_height"], (page_width - content_width) // 2  # the panels' corner
    bottom = top + content_height - theirs["title_height"]
    marked = np.all(frames[:, top:bottom] == POSITION_COLOUR, axis=-1)  # (frame, panel row, column)
    for index, row in enumerate(theirs["rows"]):
        line_rows = np.flatnonzero(marked[index].sum(axis=1) >= theirs["cpr_width"] + theirs["profile_width"])
        assert len(line_rows) == 3 and abs(int(line_rows[1]) - row) <= 1, (index, line_rows, row)
        line = np.flatnonzero(marked[index, line_rows[1]])
        assert line[-1] - line[0] + 1 == theirs["cpr_width"] + theirs["profile_width"]  # across CPR and profile
        assert line[0] == left + 200  # right of the 3D view
    assert all(not np.array_equal(a, b) for a, b in zip(frames[:-1], frames[1:]))  # every frame moves on
    views = frames[:, top:bottom, left : left + 200]
    disk = np.all(views == (255, 128, 0), axis=-1)  # the cutting disk's rim in the 3D view
    rows = np.array([np.flatnonzero(d.any(axis=1)).mean() for d in disk])
    # the phantom's descending aorta is 55 % of its length, the ascending one (down to the root) the last 19 %
    climbing, descending = rows[: int(0.45 * len(rows))], rows[-int(0.15 * len(rows)) :]
    print("3D view: disk rows", rows.round().astype(int).tolist())
    assert np.all(np.diff(climbing) <= 0.5) and climbing[0] - climbing[-1] > 300  # up the descending aorta
    assert np.all(np.diff(descending) >= -0.5) and descending[-1] - descending[0] > 50  # down to the root


def test_animation_frames_are_stored_as_upstream_stores_report_frames() -> None:
    from tsrt.reports.aorta_animation import frames_nifti
    from tsrt.reports.pulmonary_render import rgb_frames_nifti

    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, size=(7, 11, 3), dtype=np.uint8) for _ in range(4)]
    ours, theirs = frames_nifti(iter(frames), 4, (11, 7)), rgb_frames_nifti(frames)
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    assert np.array_equal(ours.affine, theirs.affine) and ours.get_data_dtype() == theirs.get_data_dtype()
    decoded = np.stack([np.asarray(ours.dataobj)[name] for name in "RGB"], axis=-1)[::-1, ::-1]
    assert np.array_equal(decoded[:-1, 1:][::-1, ::-1].transpose(2, 1, 0, 3)[::-1], np.stack(frames))


# --------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def small_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small CT with an aorta-like tube and an annulus, as per-class files."""
    folder = tmp_path_factory.mktemp("small_aorta")
    shape = (40, 40, 60)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    aorta = ((x - 20) ** 2 + (y - 20) ** 2 <= 36) & (z >= 5) & (z < 55)
    annulus = ((x - 20) ** 2 + (y - 20) ** 2 <= 25) & (z >= 50) & (z < 53)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(np.where(aorta, 300, -100).astype(np.int16), affine), folder / "ct.nii.gz")
    for name, mask in (("aorta", aorta), ("annulus_proper", annulus)):
        (folder / "full").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), folder / "full" / f"{name}.nii.gz")
    (folder / "no_aorta").mkdir()
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), affine), folder / "no_aorta" / "aorta.nii.gz")
    nib.save(nib.Nifti1Image(annulus.astype(np.uint8), affine), folder / "no_aorta" / "annulus_proper.nii.gz")
    (folder / "no_annulus").mkdir()
    nib.save(nib.Nifti1Image(aorta.astype(np.uint8), affine), folder / "no_annulus" / "aorta.nii.gz")
    return {"folder": folder, "ct": folder / "ct.nii.gz"}


@pytest.mark.parametrize("rois, missing", [("no_aorta", "aorta"), ("no_annulus", "annulus_proper")])
def test_missing_aorta_or_annulus_is_refused_in_one_line(small_case: dict, rois: str, missing: str,
                                                         tmp_path: Path) -> None:
    output = tmp_path / "report" / "aorta_report.json"
    done = tsrt_process("report", "aorta", str(small_case["ct"]), "-rt", str(small_case["folder"] / rois),
                        "--contrast-phase", "native", "-o", str(output), home=tmp_path / "home")
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "aorta report needs" in lines[0] and missing in lines[0], lines
    assert not output.parent.exists() or not any(output.parent.iterdir())


def test_aorta_cut_by_the_field_of_view_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model path: an aorta touching the top (or a side) of the scan is refused; only its distal end may leave."""
    from tsrt.reports.aorta import AortaReporter
    from tsrt.reports.common import MissingStructuresError

    shape = (30, 30, 40)
    values = np.full(shape, -100, np.int16)
    reporter = object.__new__(AortaReporter)  # no models: the first run's masks are given below
    reporter._crop, reporter._details = None, []

    def first_run(top: bool):
        aorta = np.zeros(shape, bool)
        aorta[12:18, 12:18, 0 if not top else 5 : 40 if top else 30] = True
        return lambda source, prepared, wanted: {"aorta": aorta, "heart": np.zeros(shape, bool)}

    monkeypatch.setattr(AortaReporter, "_run", staticmethod(first_run(top=True)))
    with pytest.raises(MissingStructuresError, match="cuts it"):
        reporter.model_masks(nib.Nifti1Image(values, np.eye(4)))
    monkeypatch.setattr(AortaReporter, "_run", staticmethod(first_run(top=False)))
    masks = reporter.model_masks(nib.Nifti1Image(values, np.eye(4)))  # cut at the distal end: accepted
    assert masks.ct.shape[2] > 0 and masks.masks == {}


# --------------------------------------------------------------------------------------------- helpers


def test_farthest_pair_matches_pdist_order() -> None:
    from scipy.spatial.distance import pdist

    from tsrt.reports.aorta_geometry import farthest_pair

    rng = np.random.default_rng(5)
    disk = np.argwhere(np.add.outer((np.arange(21) - 10) ** 2, (np.arange(21) - 10) ** 2)[:, :, None] <= 64)
    for points in [disk, *(np.argwhere(rng.random((18, 16, 5)) > 0.85) for _ in range(6))]:
        distances = pdist(points)
        flat = int(np.argmax(distances))
        first = next(i for i in range(len(points)) if flat < (i + 1) * len(points) - (i + 1) * (i + 2) // 2)
        second = flat - (first * len(points) - first * (first + 1) // 2) + first + 1
        length, a, b = farthest_pair(points)
        assert length == distances[flat]
        assert np.array_equal(a, points[first]) and np.array_equal(b, points[second])


def test_grid_copy_equals_nibabel_resampling() -> None:
    """Masks on a flipped, shifted grid are copied voxel for voxel, exactly as nibabel's resampling gives them."""
    from nibabel.processing import resample_from_to

    from tsrt.reports.aorta import on_grid

    rng = np.random.default_rng(2)
    data = (rng.random((12, 10, 8)) > 0.6).astype(np.uint8)
    affine = np.array([[-0.8, 0, 0, 10], [0, 0, 0.8, -3], [0, 0.8, 0, 5], [0, 0, 0, 1.0]])
    image = nib.Nifti1Image(data, affine)
    reference = nib.as_closest_canonical(image).slicer[2:9, 1:7, 3:11]
    ours = on_grid(image, reference, 0)
    assert np.array_equal(ours, resample_from_to(image, reference, order=0).get_fdata(dtype=np.float32))
