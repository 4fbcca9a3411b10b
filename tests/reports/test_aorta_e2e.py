"""`tsrt report aorta -i CT -o OUT` end to end on fixture models, against official `totalseg_aorta_report --run_models`.

Both sides run every model the report needs from one TotalSegmentator home of intensity-band fixture
models (tsrt_export.fixtures: each class is labelled wherever the CT lies in its HU band): task total
--fast -rs aorta heart (and its 6 mm crop model), the CT cropped and resampled to 0.8 mm, then total -rs
(aorta, branch vessels, T12, iliac arteries: the cardiac and vertebrae parts), aortic_dissection,
aorta_annulus (five folds each) and renal_arteries. tsrt fetches them on first use through its task
layer; the official pipeline runs its TotalSegmentator command for each (the same command line through
the same entry point, in the oracle's process: torch is imported once). The contrast phase is given to both (no
phase classifier in the fixture home). The JSON must agree key for key, numbers within float tolerance.

Phantom: a small candy-cane aorta (0.8 mm voxels, so the 0.8 mm models see the CT's own values) whose
parts each have their own HU: lumen 300, a false lumen 450 in the descending aorta, annulus 700 and
sinotubular junction 900 inside the root; brachiocephalic trunk -300 and left subclavian artery -150
leaving the arch; celiac trunk 1300; T12 2000 behind the descending aorta; right iliac artery -700 below
its end; heart 100 below the root; soft tissue 40. The lower-resolution models (1.5, 3, 6 mm) see the
resampled CT, where every edge passes through the values between its two sides, so the HU are ordered
such that no edge that reaches the aorta passes through a band whose landmark position depends on where
its voxels lie (branches negative, celiac bright, T12 and iliac at the extremes, gaps of >= 6 mm
between the aorta and what must not touch it). The 1.5 mm aorta still wraps the bright celiac trunk in
a rim, so landmark 10's cut reads wider (2.9 x 1.3 cm) on both sides; the others are the tube's 1.2-2 cm.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from totalseg_official import start_official

SPACING = 0.8
ASCENDING_MM, ARCH_RADIUS_MM, DESCENDING_MM = 32.0, 16.0, 68.0
ROOT_RADIUS_MM, DISTAL_RADIUS_MM = 7.0, 5.5
SINUS_AT_MM, SINUS_EXTRA_MM, SINUS_WIDTH_MM, JUNCTION_AT_MM = 12.0, 2.0, 3.0, 24.0
PHASE = "arterial_late"
HU = {
    "tissue": 40, "heart": 100, "lumen": 300, "false_lumen": 450, "annulus": 700, "junction": 900,
    "brachio": -300, "subclavian": -150, "celiac": 1300, "T12": 2000, "iliac": -700,
}
#: The fixture models' bands [lo, hi) in HU: 50 HU or more around each value (a band edge ramps over 10 HU).
BANDS = {
    "aorta": (200.0, 1150.0),  # lumen, false lumen, annulus and junction: the whole aorta
    "heart": (70.0, 130.0),
    "brachiocephalic_trunk": (-350.0, -250.0),
    "subclavian_artery_left": (-200.0, -100.0),
    "iliac_artery_right": (-750.0, -650.0),
    "vertebrae_T12": (1900.0, 2100.0),
    "celiac_trunk": (1250.0, 1350.0),
    "aorta_true_lumen": (200.0, 400.0),
    "aorta_false_lumen": (400.0, 550.0),
    "annulus_proper": (600.0, 800.0),
    "sinotubular_junction": (800.0, 1000.0),
}
#: totalseg_aorta_report --run_models: total --fast -rs (the 3 mm model, cropped by the 6 mm one), total -rs
#: (its five parts), and the three aorta tasks.
MODEL_TASKS = ("total_fast", "total_fastest", "total", "aortic_dissection", "aorta_annulus", "renal_arteries")
#: The field of view (mm, world = voxel grid, RAS): the phantom, 6 mm above the arch (the fast 3 mm model's aorta
#: must not reach the top slice); at 0.8 mm 90 x 75 x 142 voxels, so the 0.8 mm models cover it with two 96^3 tiles.
EXTENT = ((-20.0, 52.0), (-30.0, 30.0), (-53.0, 61.0))


def radius(s: np.ndarray) -> np.ndarray:
    """The aorta's radius (mm) at arc length `s` (mm from the annulus): a taper and the sinus bulge."""
    total = ASCENDING_MM + np.pi * ARCH_RADIUS_MM + DESCENDING_MM
    taper = ROOT_RADIUS_MM + (DISTAL_RADIUS_MM - ROOT_RADIUS_MM) * np.clip(s / total, 0, 1)
    return taper + SINUS_EXTRA_MM * np.exp(-(((s - SINUS_AT_MM) / SINUS_WIDTH_MM) ** 2))


def make_phantom() -> tuple[np.ndarray, np.ndarray]:
    """The CT (int16 HU) and its affine: the root at the origin, the arch in the x-z plane."""
    R, top, distal_x = ARCH_RADIUS_MM, ASCENDING_MM, 2 * ARCH_RADIUS_MM
    shape = tuple(int(round((hi - lo) / SPACING)) for lo, hi in EXTENT)
    x, y, z = np.meshgrid(*[(lo + np.arange(n) * SPACING).astype(np.float32) for (lo, _), n in zip(EXTENT, shape)],
                          indexing="ij")
    up, down = np.clip(z, 0, top), np.clip(z, top - DESCENDING_MM, top)
    theta = np.arctan2(np.maximum(z - top, 0), x - R)
    distances = np.stack([
        np.sqrt(x**2 + y**2 + (z - up) ** 2),
        np.sqrt((x - R - R * np.cos(theta)) ** 2 + y**2 + (z - top - R * np.sin(theta)) ** 2),
        np.sqrt((x - distal_x) ** 2 + y**2 + (z - down) ** 2),
    ])
    arcs = np.stack([up, top + R * (np.pi - theta), top + np.pi * R + top - down])
    which = np.argmin(distances, axis=0)
    distance = np.take_along_axis(distances, which[None], 0)[0]
    arc = np.take_along_axis(arcs, which[None], 0)[0]
    aorta = (distance <= radius(arc)) & ~((which == 0) & (z < 0)) & ~((which == 2) & (z < top - DESCENDING_MM))
    axial = np.sqrt(x**2 + y**2)

    def branch(angle_deg: float, radius_mm: float) -> np.ndarray:  # a vessel leaving the arch upwards
        angle = np.deg2rad(angle_deg)
        bx, bz = R + R * np.cos(angle), top + R * np.sin(angle)
        return (np.sqrt((x - bx) ** 2 + y**2) <= radius_mm) & (z >= bz) & (z <= bz + 16) & ~aorta

    ct = np.full(x.shape, HU["tissue"], np.int16)
    ct[np.sum((np.stack([x, y, z + 19.0]) / np.array([11.0, 11.0, 9.0])[:, None, None, None]) ** 2, axis=0) <= 1] = \
        HU["heart"]  # below the root, 10 mm away
    ct[aorta] = HU["lumen"]
    ct[aorta & (which == 2) & (y > 1.0) & (z > -28) & (z < 18)] = HU["false_lumen"]  # the dissection's flap at 1 mm
    ct[aorta & (axial <= 6.0) & (np.abs(z - 1.0) <= 1.5)] = HU["annulus"]
    ct[aorta & (np.abs(z - JUNCTION_AT_MM) <= 1.5)] = HU["junction"]
    ct[branch(140, 3.5)] = HU["brachio"]
    ct[branch(40, 3.5)] = HU["subclavian"]
    ct[(np.sqrt((x - distal_x) ** 2 + z**2) <= 3.0) & (y >= 0) & (y <= 22) & ~aorta] = HU["celiac"]
    ct[(np.abs(x - distal_x) <= 9) & (y <= -12) & (y >= -26) & (np.abs(z - 12.0) <= 8)] = HU["T12"]  # 6.5 mm behind
    bottom = top - DESCENDING_MM  # the iliac artery 7 mm below the aorta's end (its band must not touch it)
    ct[(np.sqrt((x - distal_x + 2.0) ** 2 + y**2) <= 4.0) & (z <= bottom - 7) & (z >= bottom - 15)] = HU["iliac"]
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = [lo for lo, _ in EXTENT]
    return ct, affine


@pytest.fixture(scope="session")
def aorta_models_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TotalSegmentator home with the report's models labelling by intensity, and a (fake) license."""
    pytest.importorskip("nnunetv2", reason="the fixture models need the export extra")
    from tsrt_export.fixtures import write_totalseg_home

    home = write_totalseg_home(tmp_path_factory.mktemp("aorta_ts_home"), MODEL_TASKS, intensity_bands=BANDS)
    config = json.loads((home / "config.json").read_text())
    config["license_number"] = "aca_TSRTFIXTURE000"  # the aorta tasks are licensed; upstream checks 18 characters
    (home / "config.json").write_text(json.dumps(config))
    return home


#: Official create_aorta_report with run_models=True; argv: the CT, the work folder, the contrast phase.
_ORACLE = """
def main():
    import logging, time
    import totalsegmentator.aorta_report.model_runner as runner
    import totalsegmentator.aorta_report.pipeline as pipeline
    from totalsegmentator.serialization_utils import convert_to_serializable

    sequential_nnunet()
    runner._run = lambda command, description: totalsegmentator_command_in_process(command)
    pipeline.render_previews = lambda *args, **kwargs: None  # fury/VTK under Xvfb
    pipeline.render_report_image = lambda *args, **kwargs: None  # wkhtmltoimage
    pipeline.serialize_outputs = lambda *args, **kwargs: (None, None)  # blosc pickles of the page
    ct, work, phase = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    (work / "models").mkdir(parents=True, exist_ok=True)  # the phase, as totalseg_get_phase would cache it
    (work / "models" / "contrast_phase.json").write_text(json.dumps({"phase": phase}))
    metadata = {"PatientName": "Unknown", "PatientSex": "M", "PatientAge": 83, "PatientBirthDate": "19000101",
                "PatientID": "Unknown", "StudyID": "Unknown", "StudyDescription": "Unknown",
                "StudyDate": "19000101", "version": "0.1.2"}
    started = time.time()
    for update in pipeline.create_aorta_report(ct, None, None, metadata, work, logging.getLogger("oracle"),
                                               delete_tmp=False, delete_aux_files=False, run_models=True,
                                               annulus_fn="annulus_proper.nii.gz"):  # the command's default
        final = update
    report = json.loads(json.dumps(convert_to_serializable(final["report_json"])))
    return {"json": report, "seconds": time.time() - started}
"""


def _cli(*args: str, home: Path, env: dict[str, str]):
    """`tsrt ARGS` in this process with TSRT_HOME=home and `env` (TOTALSEG_HOME_DIR: where models come from)."""
    from typer.testing import CliRunner

    from tsrt.cli.root import app

    return CliRunner().invoke(app, list(args), env={"TSRT_HOME": str(home), **env})


def _close(ours, theirs, path: str = "") -> None:
    """Equal structure (keys in order, types), numbers within float tolerance."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), (path, list(ours), list(theirs))
        for key in theirs:
            _close(ours[key], theirs[key], f"{path}/{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (path, ours, theirs)
        for index, (a, b) in enumerate(zip(ours, theirs)):
            _close(a, b, f"{path}/{index}")
    elif isinstance(theirs, float) and not isinstance(theirs, bool):
        assert isinstance(ours, (int, float)) and ours == pytest.approx(theirs, rel=1e-6, abs=1e-6), (path, ours, theirs)
    else:
        assert ours == theirs, (path, ours, theirs)


@pytest.mark.slow
def test_command_with_models_equals_official(aorta_models_home: Path, tmp_path: Path) -> None:
    """`tsrt report aorta CT -o OUT` (models fetched on first use from the TotalSegmentator home) writes the JSON
    official totalseg_aorta_report --run_models writes with the same weights, and finds all 11 landmarks."""
    ct, affine = make_phantom()
    nifti = tmp_path / "chest.nii.gz"
    nib.save(nib.Nifti1Image(ct, affine), nifti)
    official = start_official(_ORACLE, tmp_path / "official", str(nifti), str(tmp_path / "official" / "work"), PHASE,
                              home=aorta_models_home)
    try:
        output = tmp_path / "report" / "aorta_report.json"
        started = time.perf_counter()
        result = _cli("report", "aorta", str(nifti), "-o", str(output), "--contrast-phase", PHASE, "-q",
                      "--device", "cpu", home=tmp_path / "tsrt_home", env={"TOTALSEG_HOME_DIR": str(aorta_models_home)})
        seconds = time.perf_counter() - started
        assert result.exit_code == 0, (result.output, result.exception)
        theirs = official.result()
    finally:
        official.kill()
    ours = json.loads(output.read_text())
    print(f"tsrt {seconds:.1f} s (models imported on first use), official {theirs['seconds']:.1f} s")
    for number, landmark in ours["landmarks"].items():
        print(number, landmark["name"], landmark["diameter"], landmark["diameter_pd"], landmark["area"])
    _close(ours, theirs["json"])
    assert all(landmark["diameter"] for landmark in ours["landmarks"].values())  # every landmark found
    assert ours["landmarks"]["9"]["area_fl"] > 0 and ours["landmarks"]["1"]["area_fl"] == 0  # the dissection
