"""`tsrt report pulmonary` against TotalSegmentator's `totalseg_pulmonary_report`, on pulmonary artery phantoms.

Phantom: a main pulmonary artery (a cone along an oblique axis, radius 14 mm at its base, 12 mm at the
top) that splits into a left and a right branch (radii 9 and 10 mm, oblique too), stored in LPS with
anisotropic voxels. The landmarks are thin discs across the vessel: the annulus spans the whole cross
section (upstream measures the annulus mask itself), the other four are small discs on the vessel's
axis (upstream cuts the artery with the plane through their centre, normal to their flattest direction).
Analytic answer: each cut is a circle of the vessel's radius R at that point; upstream grows the cuts of
landmarks 2-5 by one voxel (0.8 mm) before measuring, so there R + 0.8 mm. Diameters within 0.15 cm
(voxels), areas within 6 %.

Parity: the official measurement functions (`_load_report_data`, `create_landmark_planes`,
`measure_landmarks`, `prepare_results`: everything of `create_pulmonary_report` but its VTK/wkhtmltoimage
page) run in a child process on the same mask files; tsrt's JSON must equal theirs key for key, value for
value. The model path runs on intensity-band fixture models in TotalSegmentator's layout (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LANDMARK_NAMES = ("pul_annulus", "pul_sinotubular_junction", "pul_bifurcation", "pul_left_start", "pul_right_start")
VOXEL_MM = 0.8  # the measuring grid; upstream's dilation grows landmarks 2-5 by one voxel
DIAMETER_TOLERANCE_CM, AREA_TOLERANCE = 0.15, 0.06


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=float)
    return vector / np.linalg.norm(vector)


TRUNK_BASE, TRUNK_AXIS, TRUNK_LENGTH, TRUNK_RADII = np.array([0.0, 0.0, -25.0]), _unit([0.25, 0.35, 1.0]), 50.0, (14.0, 12.0)
#: RAS: the patient's left is -x.
BRANCHES = {"left": (_unit([-1.0, -0.3, 0.35]), 35.0, 9.0), "right": (_unit([1.0, -0.2, 0.25]), 38.0, 10.0)}
#: Landmark -> (vessel, start and end along its axis in mm, disc radius in mm or None for the whole section).
DISCS = {
    "pul_annulus": ("trunk", 4.0, 7.0, None),
    "pul_sinotubular_junction": ("trunk", 18.0, 20.5, 5.0),
    "pul_bifurcation": ("trunk", 33.0, 35.5, 5.0),
    "pul_left_start": ("left", 14.0, 16.5, 4.0),
    "pul_right_start": ("right", 14.0, 16.5, 4.0),
}
#: CT values: soft tissue, heart, artery, and one per landmark (the fixture models label by intensity).
TISSUE_HU, HEART_HU, ARTERY_HU = 40, 150, 300
LANDMARK_HU = dict(zip(LANDMARK_NAMES, (1000, 1300, 1600, 1900, 2200)))


def _trunk_radius(t: float | np.ndarray) -> float | np.ndarray:
    return TRUNK_RADII[0] + (TRUNK_RADII[1] - TRUNK_RADII[0]) * t / TRUNK_LENGTH


def make_phantom(
    spacing=(0.7, 0.7, 1.0), extent=((-60, 60), (-45, 50), (-40, 55)), heart: bool = False, scale: float = 1.0
) -> dict:
    """CT and masks of the phantom (LPS storage), the analytic radius per landmark (mm) and the affine.

    `scale` shrinks the anatomy and the extent (not the landmark discs' 2.5-3 mm thickness): the model
    test runs on a half-size chest so that its 0.8 mm crop stays small.
    """
    extent = tuple((lo * scale, hi * scale) for lo, hi in extent)
    shape = tuple(int(np.ceil((hi - lo) / s)) for (lo, hi), s in zip(extent, spacing))
    origin = np.array([lo for lo, _ in extent], dtype=float)
    grid = np.indices(shape, dtype=np.float32)
    position = np.stack([origin[a] + grid[a] * spacing[a] for a in range(3)], axis=-1)

    def along(base: np.ndarray, axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        relative = position - base
        t = relative @ axis
        return t, np.linalg.norm(relative - t[..., None] * axis, axis=-1)

    vessels = {"trunk": along(TRUNK_BASE * scale, TRUNK_AXIS)}
    t, radial = vessels["trunk"]
    trunk_length = TRUNK_LENGTH * scale
    trunk = (t >= 0) & (t <= trunk_length) & (radial <= scale * _trunk_radius(np.clip(t / scale, 0, TRUNK_LENGTH)))
    top = (TRUNK_BASE + TRUNK_LENGTH * TRUNK_AXIS) * scale
    artery = trunk | (np.linalg.norm(position - top, axis=-1) <= TRUNK_RADII[1] * scale)
    for name, (axis, length, radius) in BRANCHES.items():
        vessels[name] = along(top, axis)
        s, branch_radial = vessels[name]
        artery |= (s >= 0) & (s <= length * scale) & (branch_radial <= radius * scale)
    ct = np.full(shape, TISSUE_HU, np.int16)
    if heart:
        centre, axes = np.array([0.0, -12.0, -52.0]) * scale, np.array([38.0, 30.0, 27.0]) * scale
        ct[np.sum(((position - centre) / axes) ** 2, axis=-1) <= 1] = HEART_HU
    ct[artery] = ARTERY_HU
    masks, radii = {"pulmonary_artery": artery}, {}
    for name, (vessel, start, end, disc) in DISCS.items():
        t, radial = vessels[vessel]
        middle, half = (start + end) / 2, (end - start) / 2
        radius = scale * (_trunk_radius(middle) if vessel == "trunk" else BRANCHES[vessel][2])
        disc = radius if disc is None else min(disc, 0.75 * radius)
        masks[name] = (np.abs(t - middle * scale) <= half) & (radial <= disc) & artery
        radii[name] = radius + (0.0 if disc == radius else VOXEL_MM)
        ct[masks[name]] = LANDMARK_HU[name]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    lps = np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    flip = (slice(None, None, -1), slice(None, None, -1))
    return {
        "ct": np.ascontiguousarray(ct[flip]), "affine": affine @ lps, "radii": radii,
        "masks": {name: np.ascontiguousarray(mask[flip]).astype(np.uint8) for name, mask in masks.items()},
    }


def write_phantom(folder: Path, phantom: dict, masks: dict | None = None) -> Path:
    """ct.nii.gz and the mask files (TotalSegmentator's names) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(phantom["ct"], phantom["affine"]), folder / "ct.nii.gz")
    for name, mask in (masks if masks is not None else phantom["masks"]).items():
        nib.save(nib.Nifti1Image(mask, phantom["affine"]), folder / f"{name}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    phantom = make_phantom()
    return write_phantom(tmp_path_factory.mktemp("pulmonary_phantom"), phantom), phantom


def _run(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`tsrt ARGS` through the console entry point (one-line errors, exit codes)."""
    return subprocess.run(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", *args], capture_output=True, text=True,
        env={**os.environ, "TSRT_HOME": str(home), **(env or {})}, cwd=REPO_ROOT,
    )


def _cli(*args: str, home: Path, env: dict[str, str] | None = None):
    from typer.testing import CliRunner

    from tsrt.cli.root import app

    return CliRunner().invoke(app, list(args), env={"TSRT_HOME": str(home), **(env or {})})


# --------------------------------------------------------------------------------------------- geometry


def test_resampling_and_morphology_equal_scipy_and_scikit_image() -> None:
    """The scipy/scikit-image steps upstream measures with, bit for bit on random data."""
    from scipy import ndimage
    from skimage.measure import label

    from tsrt.reports import pulmonary_geometry as geometry

    rng = np.random.default_rng(7)
    for dtype in (np.uint8, np.int16, np.float32, np.float64):
        data = rng.uniform(0, 600, size=(11, 14, 9)).astype(dtype)
        if dtype == np.uint8:
            data = (data > 350).astype(np.uint8)
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        matrix, offset, shape = rotation * rng.uniform(0.7, 1.3, 3), rng.uniform(-3, 6, 3), (12, 10, 13)
        for order in (0, 1, 3):
            expected = ndimage.affine_transform(data, matrix, offset, shape, order=order, mode="constant")
            ours = geometry.affine_transform(data, matrix, offset, shape, order)
            assert ours.dtype == expected.dtype and np.array_equal(ours, expected), (dtype, order)
    for _ in range(5):
        flat, volume = rng.uniform(size=(30, 25)) < 0.6, rng.uniform(size=(12, 13, 9)) < 0.7
        for mask in (flat, volume):
            assert np.array_equal(geometry.fill_holes(mask), ndimage.binary_fill_holes(mask))
            assert np.array_equal(geometry.erode(mask), ndimage.binary_erosion(mask))
            sparse = mask & (rng.uniform(size=mask.shape) < 0.4)
            assert np.array_equal(geometry.label_full(sparse)[0], label(sparse))


def test_planes_and_diameters_equal_official_functions() -> None:
    """Normals, cuts, farthest pairs and perpendicular chords as TotalSegmentator's aorta_report geometry gives them."""
    from totalsegmentator.aorta_report.geometry import _farthest_pair, find_mask_normal, get_plane_diameters
    from totalsegmentator.aorta_report.geometry_report import get_plane_aorta_intersection

    from tsrt.reports import pulmonary_geometry as geometry

    rng = np.random.default_rng(11)
    tube = make_phantom(spacing=(1.5, 1.5, 1.5))["masks"]["pulmonary_artery"]
    for _ in range(12):
        count = int(rng.integers(2, 300))
        points = rng.integers(0, 18, size=(count, 3))
        cloud = np.zeros((18, 18, 18), np.uint8)
        cloud[tuple(points.T)] = 1
        assert np.array_equal(geometry.mask_normal(cloud), find_mask_normal(cloud))
        found = np.argwhere(cloud)
        length, start, end = geometry.farthest_pair(found)
        theirs = _farthest_pair(found)
        assert (length, start.tolist(), end.tolist()) == (theirs[0], theirs[1].tolist(), theirs[2].tolist())
        centre = np.argwhere(tube)[int(rng.integers(0, int(tube.sum())))]
        normal = rng.normal(size=3)
        ours = geometry.plane_intersection(tube, centre, normal)
        assert np.array_equal(ours, get_plane_aorta_intersection(tube, centre, normal))
        section = ours[:, :, int(geometry.find_center(ours, True)[2])]
        spacing = np.array([0.8, 0.9], dtype=np.float32)
        official = get_plane_diameters(section, spacing)
        mine = geometry.slice_diameters(section, spacing) if section.sum() >= 5 else None
        if mine is None or official[3] is None:
            continue
        assert (mine.diameter_mm, mine.perpendicular_mm) == (official[0], official[1])
        assert [p.tolist() for p in (mine.start, mine.end)] == [p.tolist() for p in official[2]]
        assert [p.tolist() for p in (mine.start_perpendicular, mine.end_perpendicular)] == [
            p.tolist() for p in official[3]]


def test_report_page_nifti_has_upstreams_layout(tmp_path: Path) -> None:
    """RGB frames stored as combine_rgb_slices_as_nifti(..., reverse_z=True) stores upstream's page PNGs."""
    from PIL import Image
    from totalsegmentator.reporting import combine_rgb_slices_as_nifti

    from tsrt.reports.pulmonary_render import rgb_frames_nifti

    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, size=(23, 31, 3), dtype=np.uint8) for _ in range(3)]
    paths = []
    for index, frame in enumerate(frames):
        paths.append(tmp_path / f"frame_{index}.png")
        Image.fromarray(frame).save(paths[-1])
    theirs = combine_rgb_slices_as_nifti(paths, reverse_z=True)
    ours = rgb_frames_nifti(frames)
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    assert np.array_equal(ours.affine, theirs.affine) and ours.get_data_dtype() == theirs.get_data_dtype()


# --------------------------------------------------------------------------------------------- phantom parity

#: The official measurement of a folder of masks (ct.nii.gz beside them), or of a CT file after upstream's
#: models ran on it (totalseg_pulmonary_report --run_models); argv: the folder or file, the work folder.
_ORACLE = """
def main():
    import logging
    import matplotlib
    matplotlib.use("Agg")
    from totalsegmentator.pulmonary_report.measurements import create_landmark_planes, measure_landmarks
    from totalsegmentator.pulmonary_report.pipeline import _load_report_data, _run_segmentation_models
    from totalsegmentator.pulmonary_report.rendering import prepare_results
    from totalsegmentator.serialization_utils import convert_to_serializable

    source, work = Path(sys.argv[1]), Path(sys.argv[2])
    logger = logging.getLogger("oracle")
    if source.is_dir():
        ct_path, masks = source / "ct.nii.gz", source
    else:  # upstream's models through its `TotalSegmentator` command lines, run in this process (one torch import)
        from totalsegmentator.pulmonary_report import model_runner

        sequential_nnunet()
        model_runner._run = lambda command, description: totalsegmentator_command_in_process(command)
        masks = work / "models"
        masks.mkdir(parents=True, exist_ok=True)
        ct_path, statuses = _run_segmentation_models(source, masks, logger, "None", False, "local")
        for _ in statuses:
            pass
    data = _load_report_data(ct_path, masks, masks, "pulmonary_artery.nii.gz", work, logger, False)
    widest = create_landmark_planes(data["landmarks"], data["pulmonary_artery"], data["spacing"], logger)
    measure_landmarks(data["landmarks"], data["ct_img"], data["affine"], widest, work, logger, False)
    metadata = {"PatientName": "Unknown", "PatientSex": "M", "PatientAge": 83, "PatientBirthDate": "19000101",
                "PatientID": "Unknown", "StudyID": "Unknown", "StudyDescription": "Unknown",
                "StudyDate": "19000101", "version": "0.2.1"}
    return json.loads(json.dumps(convert_to_serializable(prepare_results(data["landmarks"], metadata))))
"""


def _official_measurement(folder: Path, work: Path):
    from totalseg_official import start_official

    (work / "tmp").mkdir(parents=True, exist_ok=True)
    return start_official(_ORACLE, work, str(folder), str(work / "tmp"))


def _check_analytic(report: dict, radii: dict) -> None:
    for index, name in enumerate(LANDMARK_NAMES, start=1):
        entry, radius_cm = report["landmarks"][str(index)], radii[name] / 10
        assert abs(entry["diameter"] - 2 * radius_cm) <= DIAMETER_TOLERANCE_CM, (name, entry, 2 * radius_cm)
        assert abs(entry["diameter_pd"] - 2 * radius_cm) <= DIAMETER_TOLERANCE_CM, (name, entry, 2 * radius_cm)
        assert entry["area"] == pytest.approx(np.pi * radius_cm**2, rel=AREA_TOLERANCE), (name, entry)


def test_phantom_report_equals_official_and_analytic(phantom_folder, tmp_path: Path) -> None:
    """`tsrt report pulmonary --rois` (NIfTI and DICOM CT) writes the official JSON, on the analytic values."""
    from totalseg_official import write_dicom_series

    folder, phantom = phantom_folder
    official = _official_measurement(folder, tmp_path / "official")
    try:
        reports = {}
        for source in (folder / "ct.nii.gz", write_dicom_series(folder / "ct.nii.gz", tmp_path / "ct_dicom")):
            output = tmp_path / source.name.replace(".nii.gz", "") / "report.json"
            result = _cli("report", "pulmonary", str(source), "-o", str(output), "--rois", str(folder), "-q",
                          home=tmp_path / "home")
            assert result.exit_code == 0, (result.output, result.exception)
            reports[source.name] = json.loads(output.read_text())
            for suffix in (".nii.gz", ".png", ".txt"):
                assert output.with_name("report" + suffix).exists(), suffix
        theirs = official.result()
    finally:
        official.kill()
    ours = reports["ct.nii.gz"]
    print(json.dumps({k: (v["area"], v["diameter"], v["diameter_pd"]) for k, v in ours["landmarks"].items()}))
    assert ours == theirs  # every key, its order and every value (rounded as upstream rounds)
    assert list(ours["landmarks"]["1"]) == list(theirs["landmarks"]["1"])
    assert reports["ct_dicom"]["landmarks"] == ours["landmarks"]  # the CT only feeds the pictures
    _check_analytic(ours, phantom["radii"])
    page = nib.load(output.with_name("report.nii.gz"))
    assert page.shape[2] == 24 and page.get_data_dtype().names == ("R", "G", "B")


# --------------------------------------------------------------------------------------------- refusals


def _refused(result, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, lines
    assert all(needle in lines[0] for needle in needles), lines


def test_missing_or_cut_structures_are_refused_in_one_line(tmp_path: Path) -> None:
    """No artery, no landmark at all, or a landmark the field of view cuts: one line, exit != 0, nothing written."""
    phantom = make_phantom(spacing=(1.5, 1.5, 1.5))
    empty = {name: np.zeros_like(mask) for name, mask in phantom["masks"].items()}
    cut = dict(phantom["masks"])
    cut["pul_bifurcation"] = cut["pul_bifurcation"].copy()
    z = int(np.argwhere(cut["pul_bifurcation"])[:, 2].max())
    cut["pul_bifurcation"][:, :, z + 1 :] = 0
    cut_ct = dict(phantom, ct=phantom["ct"][:, :, : z + 1])
    cases = {
        "no_artery": (phantom, {**phantom["masks"], "pulmonary_artery": empty["pulmonary_artery"]}, ("pulmonary_artery",)),
        "no_landmarks": (phantom, {**empty, "pulmonary_artery": phantom["masks"]["pulmonary_artery"]},
                         LANDMARK_NAMES),
        "cut_by_fov": (cut_ct, {name: mask[:, :, : z + 1] for name, mask in cut.items()},
                       ("pul_bifurcation", "whole, but the field of view cuts")),
    }
    for name, (source, masks, needles) in cases.items():
        folder = write_phantom(tmp_path / name, source, masks)
        output = tmp_path / f"{name}_out" / "pulmonary_report.json"
        if name == "no_artery":  # the real console entry point: exactly one line on stderr
            _refused(_run("report", "pulmonary", str(folder / "ct.nii.gz"), "-o", str(output), "--rois", str(folder),
                          home=tmp_path / "home"), "pulmonary report", *needles)
        else:
            result = _cli("report", "pulmonary", str(folder / "ct.nii.gz"), "-o", str(output), "--rois", str(folder),
                          home=tmp_path / "home")
            message = str(result.exception)
            assert result.exit_code != 0 and "\n" not in message, message
            assert all(needle in message for needle in needles), message
        assert not output.parent.exists() or not any(output.parent.iterdir()), name


def test_age_outside_range_is_refused(tmp_path: Path, phantom_folder) -> None:
    folder, _ = phantom_folder
    nodeinfo = tmp_path / "nodeinfo.json"
    nodeinfo.write_text(json.dumps({"PatientAge": "003Y"}))
    output = tmp_path / "out" / "pulmonary_report.json"
    result = _cli("report", "pulmonary", str(folder / "ct.nii.gz"), "-o", str(output), "--rois", str(folder),
                  "-n", str(nodeinfo), home=tmp_path / "home")
    assert result.exit_code != 0 and "5..150" in str(result.exception)
    assert not output.parent.exists()


# --------------------------------------------------------------------------------------------- with models

#: Intensity-band fixture models (see tsrt_export.fixtures): the heart (with the artery, as the crop wants
#: it), the artery, each landmark and the body are labelled by their HU in the phantom.
BANDS = {
    "heart": (100.0, float("inf")),
    "body_trunc": (-500.0, float("inf")),
    "pulmonary_artery": (200.0, float("inf")),
    **{name: (hu - 100.0, hu + 100.0) for name, hu in LANDMARK_HU.items()},
}
#: What totalseg_pulmonary_report --run_models runs: total --fast -rs heart (and its 6 mm crop model),
#: heartchambers_highres (cropped with the 3 mm model), pulmonary_artery_landmarks (and the body model).
MODEL_TASKS = ("total_fast", "total_fastest", "body_fast", "heartchambers_highres", "pulmonary_artery_landmarks")
#: A half-size chest from 6 mm below the heart to 6 mm above the branches, on the slice grid of a taller
#: (-110, 75) one (its slices 8..67): at 0.8 mm (94 x 82 x 90 voxels) it fits one 96^3 tile of the models.
E2E_SPACING, E2E_EXTENT, E2E_SCALE = (0.9, 0.9, 1.2), ((-75, 75), (-65, 65), (-90.8, 52.2)), 0.5


@pytest.fixture(scope="module")
def banded_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TotalSegmentator home with the report's models labelling by intensity, and a (fake) license."""
    pytest.importorskip("nnunetv2", reason="the fixture models need the export extra")
    from tsrt_export.fixtures import write_totalseg_home

    home = write_totalseg_home(tmp_path_factory.mktemp("pulmonary_ts_home"), MODEL_TASKS, intensity_bands=BANDS)
    config = json.loads((home / "config.json").read_text())
    config["license_number"] = "aca_TSRTFIXTURE000"  # upstream's offline check: 18 characters
    (home / "config.json").write_text(json.dumps(config))
    return home


@pytest.mark.slow
def test_command_with_models_equals_official_on_nifti_and_dicom(banded_home: Path, tmp_path: Path) -> None:
    """`tsrt report pulmonary` end to end (heart crop, 0.8 mm CT, artery and landmark models fetched on first
    use from the TotalSegmentator home, measurement, page) against the official pipeline running the same
    models; then a scan without a heart is refused in one line."""
    from totalseg_official import start_official, write_dicom_series

    phantom = make_phantom(E2E_SPACING, E2E_EXTENT, heart=True, scale=E2E_SCALE)
    nifti = tmp_path / "chest.nii.gz"
    nib.save(nib.Nifti1Image(phantom["ct"], phantom["affine"]), nifti)
    official = start_official(_ORACLE, tmp_path / "official", str(nifti), str(tmp_path / "official" / "work"),
                              home=banded_home)
    store, env = tmp_path / "tsrt_home", {"TOTALSEG_HOME_DIR": str(banded_home)}
    try:
        reports = {}
        for source in (nifti, write_dicom_series(nifti, tmp_path / "chest_dicom")):
            output = tmp_path / f"{source.name}.report" / "pulmonary_report.json"
            result = _cli("report", "pulmonary", str(source), "-o", str(output), "-q", "--device", "cpu", home=store,
                          env=env)
            assert result.exit_code == 0, (result.output, result.exception)
            reports[source.name] = json.loads(output.read_text())
        theirs = official.result()
    finally:
        official.kill()
    ours = reports[nifti.name]
    print(json.dumps({k: (v["area"], v["diameter"], v["diameter_pd"]) for k, v in ours["landmarks"].items()}))
    assert ours == theirs
    for index, name in enumerate(LANDMARK_NAMES, start=1):  # the models' masks are coarser: 0.25 cm
        entry = ours["landmarks"][str(index)]
        assert abs(entry["diameter"] - 2 * phantom["radii"][name] / 10) <= 0.25, (name, entry)
        dicom = reports["chest_dicom"]["landmarks"][str(index)]
        assert (dicom["area"], dicom["diameter"], dicom["diameter_pd"]) == pytest.approx(
            (entry["area"], entry["diameter"], entry["diameter_pd"]), abs=0.11), name

    no_heart = tmp_path / "no_heart.nii.gz"  # soft tissue in air: nothing at the heart's HU
    tissue = np.where(phantom["ct"] == TISSUE_HU, TISSUE_HU, -1000).astype(np.int16)
    nib.save(nib.Nifti1Image(tissue, phantom["affine"]), no_heart)
    output = tmp_path / "no_heart_report" / "pulmonary_report.json"
    _refused(_run("report", "pulmonary", str(no_heart), "-o", str(output), "--device", "cpu", "-q", home=store, env=env),
             "pulmonary report", "heart")
    assert not output.parent.exists()
