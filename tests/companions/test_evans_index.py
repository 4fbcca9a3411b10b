"""`tsrt evans-index` against TotalSegmentator's `totalseg_evans_index`, on head phantoms of known geometry.

Phantom: an ellipsoidal brain (inner skull 128 mm wide) in a 7 mm skull, with box-shaped frontal
horns (flat lateral walls) spanning 36 mm, so the analytic Evans index is 36 / 128 = 0.28125.
Each phantom is turned in the axial plane and stored in LPS with anisotropic voxels, so the
canonical reorientation, the 1 mm resampling and the registration onto the atlas all matter.

The masks are fed directly to both sides (the issue allows it; running the 0.44 mm ventricle model
on a whole head with test networks would take far too long): tsrt's `measure`, and the official
`evans_index` generator with its model step replaced by the same mask files. The official function
registers with ANTs; antspyx pins numpy < 2.4 and scipy < 1.16, so it is installed for the oracle
only, without its dependencies, into a cache folder put first on the oracle's PYTHONPATH (the project
environment keeps its numpy and scipy). tsrt registers with SimpleITK. Both must give the analytic
index within 0.01, and the same as each other within 0.01.

The model path (`tsrt evans-index` on an image) runs on fixture weights in TotalSegmentator's layout:
a small head-sized image with no brain for those weights gives the one-line error and no files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pictures import decode_png
from totalseg_official import start_official, tsrt_cli, tsrt_process, write_dicom_series

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 0.01
ANTSPYX = ("antspyx==0.6.1", "statsmodels==0.15.0", "patsy==1.0.3", "webcolors==25.10.0", "formulaic==1.2.2",
           "interface-meta==2.0.1")
ANTS_CACHE = Path(os.environ.get("TSRT_TEST_CACHE", Path.home() / ".cache" / "tsrt-tests")) / "antspyx-0.6.1"

BRAIN_AXES_MM = (64.0, 80.0, 62.0)
SKULL_MM = 7.0
HORN_GAP_CENTRE_MM, HORN_HALF_WIDTH_MM = 10.0, 8.0  # each horn spans 2..18 mm from the midline
ANALYTIC_INDEX = 2 * (HORN_GAP_CENTRE_MM + HORN_HALF_WIDTH_MM) / (2 * BRAIN_AXES_MM[0])
#: (name, voxel spacing in mm, turn about the axial axis in degrees). One phantom: each official run is ~1 min of ANTs.
PHANTOMS = (("turned_8deg_thick_slices", (1.0, 1.1, 2.0), 8.0),)


def make_head_phantom(spacing: tuple[float, float, float], turn_deg: float, horn_hu: int = 6,
                      scale: float = 1.0) -> dict:
    """CT (HU), brain/skull masks and ventricle_parts labels of a head phantom, stored in LPS.

    `horn_hu`: the frontal horns' intensity (CSF by default; the model test makes them the brightest
    structure, so intensity-band fixture models can tell them from everything else). `scale` shrinks
    every length alike (the analytic index stays ANALYTIC_INDEX): the model test's smaller head keeps
    the 0.44 mm ventricle grid small.
    """
    a, b, c = (scale * axis for axis in BRAIN_AXES_MM)
    skull = scale * SKULL_MM
    reach = np.array([a, b, c]) + skull + 12 * scale
    shape = tuple(int(np.ceil(2 * r / s)) for r, s in zip(reach, spacing))
    centre = (np.array(shape) - 1) / 2
    x, y, z = [(np.arange(n) - centre[i]) * spacing[i] for i, n in enumerate(shape)]
    x, y, z = np.meshgrid(x, y, z, indexing="ij")
    turn = np.deg2rad(turn_deg)
    xr, yr = np.cos(turn) * x + np.sin(turn) * y, -np.sin(turn) * x + np.cos(turn) * y

    def ellipsoid(axes: tuple[float, float, float], dy: float = 0.0) -> np.ndarray:
        return (xr / axes[0]) ** 2 + ((yr - dy) / axes[1]) ** 2 + (z / axes[2]) ** 2 <= 1

    inner = ellipsoid((a, b, c))
    outer = ellipsoid((a + skull, b + skull, c + skull))
    # frontal horns: anterior, around the axial midplane
    rows = (np.abs(yr - 22.0 * scale) <= 12.0 * scale) & (np.abs(z) <= 8.0 * scale)
    gap, half_width = scale * HORN_GAP_CENTRE_MM, scale * HORN_HALF_WIDTH_MM
    left = rows & (np.abs(xr + gap) <= half_width)  # RAS: the patient's left is -x
    right = rows & (np.abs(xr - gap) <= half_width)
    third = ellipsoid((3.0 * scale, 10.0 * scale, 8.0 * scale), dy=-5.0 * scale)
    ct = np.full(shape, -1000, np.int16)
    ct[outer] = 1100
    ct[inner] = 34
    ct[ellipsoid((0.75 * a, 0.75 * b, 0.75 * c))] = 28  # white matter a little darker than the cortex
    ct[third] = 6
    ct[left | right] = horn_hu
    ventricles = np.zeros(shape, np.uint8)
    ventricles[left], ventricles[right], ventricles[third] = 1, 6, 11
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -centre * np.array(spacing)
    lps = np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    flip = (slice(None, None, -1), slice(None, None, -1))
    return {
        "ct": ct[flip], "affine": affine @ lps, "brain": inner[flip].astype(np.uint8),
        "skull": (outer & ~inner)[flip].astype(np.uint8), "ventricles": ventricles[flip],
        "ventricle_ml": float((left | right | third).sum() * np.prod(spacing) / 1000),
    }



@pytest.fixture(scope="module")
def evans_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("totalsegmentator", reason="importing the atlas needs the totalsegmentator package")
    home = tmp_path_factory.mktemp("evans_home")
    result = tsrt_cli("models", "import", "evans-index", "-q", home=home)
    assert result.exit_code == 0, (result.output, result.exception)
    return home


@pytest.fixture(scope="module")
def ants_overlay() -> Path:
    """antspyx for the oracle only (see the module docstring), installed from PyPI once per machine."""
    pytest.importorskip("totalsegmentator", reason="the oracle is official TotalSegmentator (dev environment)")
    marker = ANTS_CACHE / ".complete"
    if not marker.exists():
        staging = ANTS_CACHE.with_name(ANTS_CACHE.name + f".partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(staging), *ANTSPYX],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"antspyx for the official oracle could not be installed: {done.stderr.strip()[-300:]}")
        (staging / ".complete").write_text("\n".join(ANTSPYX))
        shutil.rmtree(ANTS_CACHE, ignore_errors=True)
        staging.rename(ANTS_CACHE)
    return ANTS_CACHE


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Each phantom's CT and its masks as TotalSegmentator's models would write them (label tables included)."""
    from tsrt.pipeline.read import Image
    from tsrt.totalseg.outputs import label_image

    folder = tmp_path_factory.mktemp("head_phantoms")
    files = {}
    for name, spacing, turn in PHANTOMS:
        phantom = make_head_phantom(spacing, turn)
        ct = nib.Nifti1Image(phantom["ct"], phantom["affine"])
        image = Image(phantom["ct"], phantom["affine"], ct.header, name)
        brain_skull = np.zeros(phantom["ct"].shape, np.uint8)
        brain_skull[phantom["brain"] > 0], brain_skull[phantom["skull"] > 0] = 90, 91  # task total's numbers
        ventricle_names = {1: "ventricle_frontal_horn_left", 6: "ventricle_frontal_horn_right", 11: "third_ventricle"}
        paths = {"ct": folder / f"{name}_ct.nii.gz", "brain_skull": folder / f"{name}_brain_skull.nii.gz",
                 "ventricles": folder / f"{name}_ventricles.nii.gz", "png": folder / f"{name}_official.png"}
        nib.save(ct, paths["ct"])
        nib.save(label_image(brain_skull, image, {90: "brain", 91: "skull"}), paths["brain_skull"])
        nib.save(label_image(phantom["ventricles"], image, ventricle_names), paths["ventricles"])
        files[name] = {"phantom": phantom, "paths": {k: str(v) for k, v in paths.items()}}
    return files


_ORACLE = """
def main():
    import numpy as np
    import nibabel as nib
    import totalsegmentator.bin.totalseg_evans_index as official

    jobs = json.loads(Path(sys.argv[1]).read_text())
    reports = {}
    for name, paths in jobs["phantoms"].items():
        def given_masks(ct_img, verbose=False, paths=paths):  # the model step, fed with the phantom's masks
            yield nib.load(paths["brain_skull"])
            yield nib.load(paths["ventricles"])

        official.run_models_shell = given_masks
        for update in official.evans_index(Path(paths["ct"]), "niigz"):
            pass
        reports[name] = {key: float(value) for key, value in update["report_json"].items()}
        Path(paths["png"]).write_bytes(update["report_png"])
    widths = []
    for path in jobs["masks"]:
        length, (start, end) = official.max_diameter_x(np.load(path))
        widths.append([int(length), [int(v) for v in start], [int(v) for v in end]])
    return {"reports": reports, "widths": widths}
"""


@pytest.fixture(scope="module")
def width_masks(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Random blobby masks for the width scan, with ties across rows and slices."""
    folder = tmp_path_factory.mktemp("width_masks")
    rng = np.random.default_rng(3)
    paths = []
    for index in range(12):
        mask = (rng.uniform(size=(14, 9, 6)) < [0.05, 0.2, 0.5][index % 3]).astype(np.uint8)
        if index == 0:
            mask[:] = 0
            mask[3:9, 2, 4] = mask[3:9, 5, 1] = 1  # two rows of the same width: the lower slice wins
        path = folder / f"mask_{index}.npy"
        np.save(path, mask)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def official(phantom_files: dict, width_masks: list[Path], ants_overlay: Path, tmp_path_factory):
    work = tmp_path_factory.mktemp("official_evans")
    jobs = {"phantoms": {name: entry["paths"] for name, entry in phantom_files.items()},
            "masks": [str(p) for p in width_masks]}
    (work / "jobs.json").write_text(json.dumps(jobs))
    process = start_official(_ORACLE, work, str(work / "jobs.json"), extra_path=ants_overlay)
    yield process
    process.kill()


def test_widest_span_matches_official_scan(official, width_masks: list[Path]) -> None:
    from tsrt.companions.evans_index import widest_span_along_x

    expected = official.result()["widths"]
    for path, (length, start, end) in zip(width_masks, expected):
        ours = widest_span_along_x(np.load(path))
        if length == 0:
            assert ours is None
            continue
        assert (ours.length, list(ours.start), list(ours.end)) == (length, start, end), path.name


@pytest.mark.slow
@pytest.mark.parametrize("name", [p[0] for p in PHANTOMS])
def test_phantom_index_is_analytic_for_tsrt_and_official(
    name: str, phantom_files: dict, official, evans_home: Path, tmp_path: Path
) -> None:
    from tsrt.companions.evans_index import HeadMasks, load_atlas, measure, render_png

    phantom = phantom_files[name]["phantom"]
    masks = HeadMasks(phantom["brain"], phantom["skull"], phantom["ventricles"])
    measurement = measure(phantom["ct"], phantom["affine"], masks, load_atlas(evans_home / "models"))
    ours = measurement.report
    theirs = official.result()["reports"][name]
    print(f"{name}: analytic {ANALYTIC_INDEX:.4f} | tsrt {ours} | official {theirs}")
    assert list(ours) == list(theirs)
    assert abs(ours["evans_index"] - ANALYTIC_INDEX) <= TOLERANCE
    assert abs(theirs["evans_index"] - ANALYTIC_INDEX) <= TOLERANCE
    assert abs(ours["evans_index"] - theirs["evans_index"]) <= TOLERANCE
    assert ours["brain_volume_ml"] == pytest.approx(theirs["brain_volume_ml"], rel=0.01)
    assert ours["ventricle_volume_ml"] == pytest.approx(theirs["ventricle_volume_ml"], rel=0.05)
    assert ours["ventricle_volume_ml"] == pytest.approx(phantom["ventricle_ml"], rel=0.1)
    # the picture: the measured slice with both widths drawn (green brain, orange horns)
    png = render_png(measurement)
    assert png.startswith(b"\x89PNG")
    picture = decode_png(png)
    for colour in ((40, 220, 40), (255, 140, 0)):
        assert np.all(picture == colour, axis=-1).any(), colour


# --------------------------------------------------------------------------------------------- the command


def test_missing_or_tampered_atlas_is_one_line(evans_home: Path, tmp_path: Path, phantom_files: dict) -> None:
    ct = phantom_files[PHANTOMS[0][0]]["paths"]["ct"]
    tampered = tmp_path / "tampered"
    shutil.copytree(evans_home, tampered)
    atlas = tampered / "models" / "resources" / "evans-index" / "ct_brain_atlas_1mm.nii.gz"
    atlas.write_bytes(atlas.read_bytes()[:-10] + b"0123456789")
    for home, needle in ((tmp_path / "empty", "tsrt models import evans-index"), (tampered, "checksum")):
        output = tmp_path / "evans.json"
        done = tsrt_process("evans-index", ct, "-o", str(output), home=home)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and needle in lines[0], lines
        assert not output.exists() and not output.with_suffix(".png").exists()


@pytest.fixture(scope="module")
def model_store(evans_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The atlas plus the three models the command runs (total part 4 and its 6 mm crop model, ventricle_parts)."""
    pytest.importorskip("nnunetv2", reason="the fixture models need the export extra")
    from tsrt_export.fixtures import find_demo_checkpoint, write_totalseg_home

    checkpoint = find_demo_checkpoint(REPO_ROOT)
    if checkpoint is None:
        pytest.skip("needs confident weights (the trained demo checkpoint): random ones could find a brain anywhere")
    ts_home = write_totalseg_home(
        tmp_path_factory.mktemp("evans_ts_home"), EVANS_TS_TASKS, source_checkpoint=checkpoint,
    )
    return _evans_store(ts_home, evans_home, tmp_path_factory.mktemp("evans_store"))


#: What `totalseg_evans_index` runs: total with --roi_subset brain skull (and its crop model), ventricle_parts.
EVANS_TS_TASKS = ("total", "total_fastest", "ventricle_parts")


def _evans_index_on_the_page(scan: Path, store: Path, folder: Path):
    """The UI's Evans index (tsrt.ui.reports) on `scan`, after a page segmentation by a model without head classes
    (so the page leaves the verdict to the Evans models), with the store's models and no fetching."""
    from tsrt.pipeline.read import Image
    from tsrt.totalseg.source import read_source
    from tsrt.ui.reports import evans_index_for_page, report_runtime
    from tsrt.ui.runner import Segmentation

    source = read_source(scan)
    labels = np.zeros(source.image.array.shape, np.uint8)
    segmentation = Segmentation(Image(labels, source.image.affine, None, str(scan)), source.values, labels,
                                {1: "liver"}, "total", "CT", "cpu")
    folder.mkdir()
    return evans_index_for_page(source, segmentation, report_runtime("cpu", "fp32", store / "models"), folder, "head")


def _evans_store(ts_home: Path, evans_home: Path, home: Path) -> Path:
    """A tsrt home with the imported atlas and the models the Evans index runs, exported from `ts_home`."""
    from tsrt_export.import_totalseg import import_models, results_root

    from tsrt.totalseg.request import build_request, models_to_run

    shutil.copytree(evans_home / "models", home / "models")
    needed = {m.name: m for request in (build_request("total", roi_subset=["brain", "skull"]),
                                        build_request("ventricle_parts")) for m in models_to_run(request)[0]}
    import_models(list(needed.values()), results_root(ts_home), store_root=home / "models", progress=False)
    return home


@pytest.mark.slow
def test_command_on_images_without_a_brain(model_store: Path, tmp_path: Path) -> None:
    """NIfTI, DICOM and a cohort folder through the real command: no brain for these weights -> one line, no files."""
    phantom = make_head_phantom((3.0, 3.0, 3.0), 0.0)  # head-sized, but the fixture weights find no brain in it
    nifti = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(phantom["ct"], phantom["affine"]), nifti)
    dicom = write_dicom_series(nifti, tmp_path / "head_dicom")
    for source in (nifti, dicom):
        output = tmp_path / f"{source.name}.json"
        result = tsrt_cli("evans-index", str(source), "-o", str(output), "-q", "--device", "cpu", home=model_store)
        assert result.exit_code != 0 and "No brain" in str(result.exception), (result.output, result.exception)
        assert not output.exists() and not output.with_suffix(".png").exists()
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(nifti, cohort / "a.nii.gz")
    shutil.copy(nifti, cohort / "b.nii.gz")
    result = tsrt_cli("evans-index", str(cohort), "-o", str(tmp_path / "out"), "-q", "--device", "cpu", home=model_store)
    assert result.exit_code != 0 and "0 measured" in result.output and "2 failed" in result.output
    assert not list((tmp_path / "out").rglob("*.json"))


# --------------------------------------------------------------------------------------------- with models

#: Intensity-band fixture models (see tsrt_export.fixtures._set_band_weights): each labels voxels by HU.
#: Brain tissue (28-34 HU) is brain, bone is skull, and the frontal horns, made the brightest
#: structure of this phantom (HORN_HU), are ventricle_parts label 1. Resampling ramps at the outer
#: skull surface give a thin "brain" shell outside the skull; the Evans pipeline drops it (largest blob).
HORN_HU = 2500
#: The model test's head at 70 % size: the 0.44 mm ventricle model then runs on a third of the tiles.
E2E_HEAD_SCALE = 0.7
#: Both widths are counted in whole voxels of the 1 mm atlas grid, so one voxel more or less on each moves
#: the index by about (1 + index) / brain width: 0.014 on the 90 mm brain of the smaller head (ANTs'
#: registration is not bit-reproducible between machines, so the official side can land one voxel apart).
E2E_TOLERANCE = (1 + ANALYTIC_INDEX) / (2 * BRAIN_AXES_MM[0] * E2E_HEAD_SCALE)
BANDS = {"brain": (-300.0, 600.0), "skull": (600.0, float("inf")), "ventricle_frontal_horn_left": (1800.0, float("inf"))}

_ORACLE_WITH_MODELS = """
def main():
    import types
    import totalsegmentator.bin.totalseg_evans_index as official

    # upstream runs its models through `TotalSegmentator ...` shell commands (run_models_shell): here in this process
    sequential_nnunet()
    official.subprocess = types.SimpleNamespace(call=lambda command, **kwargs: totalsegmentator_command_in_process(command))
    for update in official.evans_index(Path(sys.argv[1]), "niigz"):
        pass
    Path(sys.argv[2]).write_bytes(update["report_png"])
    return {key: float(value) for key, value in update["report_json"].items()}
"""


@pytest.mark.slow
def test_command_with_models_matches_official(
    evans_home: Path, ants_overlay: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`tsrt evans-index` end to end (brain/skull roi_subset, the 0.44 mm ventricle model, registration,
    measurement, JSON and PNG) on fixture models in TotalSegmentator's layout, against official
    `totalseg_evans_index` running the same models; both give the phantom's analytic index. The web page's
    Reports step gives the command's JSON and picture. DICOM input runs the same reader as every command
    (test_command_on_images_without_a_brain sends a series through this one): a second model run on the
    series would add a minute of suite time and no code path."""
    pytest.importorskip("nnunetv2", reason="the fixture models need the export extra")
    from tsrt_export.fixtures import write_totalseg_home

    ts_home = write_totalseg_home(tmp_path_factory.mktemp("banded_ts_home"), EVANS_TS_TASKS, intensity_bands=BANDS)
    store = _evans_store(ts_home, evans_home, tmp_path_factory.mktemp("banded_store"))
    name, spacing, turn = PHANTOMS[0]
    phantom = make_head_phantom(spacing, turn, horn_hu=HORN_HU, scale=E2E_HEAD_SCALE)
    nifti = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(phantom["ct"], phantom["affine"]), nifti)
    official = start_official(_ORACLE_WITH_MODELS, tmp_path / "official", str(nifti), str(tmp_path / "official.png"),
                              home=ts_home, extra_path=ants_overlay)
    output, picture = tmp_path / "head.evans.json", tmp_path / "head.evans.png"
    try:
        result = tsrt_cli("evans-index", str(nifti), "-o", str(output), "-p", str(picture), "-q", "--device", "cpu",
                          home=store)
        assert result.exit_code == 0, (result.output, result.exception)
        ours = json.loads(output.read_text())
        image = decode_png(picture.read_bytes())
        for colour in ((40, 220, 40), (255, 140, 0)):  # both widths drawn
            assert np.all(image == colour, axis=-1).any(), colour
        page = _evans_index_on_the_page(nifti, store, tmp_path / "page")
        theirs = official.result()
    finally:
        official.kill()
    print(f"analytic {ANALYTIC_INDEX:.4f} | tsrt {ours} | official {theirs}")
    assert list(ours) == list(theirs)
    assert abs(ours["evans_index"] - theirs["evans_index"]) <= E2E_TOLERANCE
    assert abs(ours["evans_index"] - ANALYTIC_INDEX) <= E2E_TOLERANCE
    assert abs(theirs["evans_index"] - ANALYTIC_INDEX) <= E2E_TOLERANCE
    assert ours["brain_volume_ml"] == pytest.approx(theirs["brain_volume_ml"], rel=0.02)
    assert ours["ventricle_volume_ml"] == pytest.approx(theirs["ventricle_volume_ml"], rel=0.05)
    # The web page's Reports step runs the same indexer on the same models: the command's JSON and slice picture.
    assert page.values == ours and json.loads(page.files[0].path.read_text()) == ours
    assert page.picture.read_bytes() == picture.read_bytes()
    assert (tmp_path / "official.png").read_bytes().startswith(b"\x89PNG")
