"""`tsrt report body` against TotalSegmentator's `totalseg_get_body_stats` (get_body_stats), same inputs.

Oracle: the official generator in a child process, TOTALSEG_HOME_DIR a fixture home laid out as
TotalSegmentator lays it out: xgboost folds trained here on synthetic features (binary payloads named
.json), ResNet3D checkpoints from TotalSegmentator's own constructor with seeded weights, and
intensity-band nnU-Net models for tasks total --fast, tissue_types and body. tsrt starts with an empty
store and installs all of it on first use from that home (predictors converted, networks exported to
ONNX and checked against torch).

- xgboost: a trunk phantom (fat, muscle, organs, six vertebrae, each at its own HU so the band models
  find it) as NIfTI and as a DICOM series. The feature row the official predictors receive (captured
  in the child) equals tsrt's, and the JSON equals upstream's key for key.
- xgboost on MR: the same trunk at MR intensities and band models for total_mr --fast, vertebrae_mr,
  tissue_types_mr and body_mr (bands in the image's units), as NIfTI and as an MR DICOM series.
- cnn: example_ct_sm (real CT) as NIfTI and DICOM, all folds, and with -tta: same JSON within float
  tolerance (ONNX Runtime vs torch).
- refusals: no vertebra in the scan (one line, nothing written); predictors missing offline (one line
  naming the import command); the predictors downloaded from a release zip on first use.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("xgboost", reason="the body report's xgboost backend needs the phase extra (xgboost)")

#: Phantom HU per structure; the band models label [HU - 8, HU + 8) (fat, lungs: wider).
TISSUE_HU = {"subcutaneous_fat": -100.0, "torso_fat": -60.0, "skeletal_muscle": 50.0}
FILLER_HU = 25.0  # soft tissue no model labels
ORGAN_HU = {"liver": 70.0, "spleen": 95.0, "kidney_left": 120.0, "kidney_right": 145.0, "heart": 170.0,
            "aorta": 220.0}
LUNG_HU = -850.0
VERTEBRA_HU = {"vertebrae_T10": 300.0, "vertebrae_T11": 340.0, "vertebrae_T12": 380.0, "vertebrae_L1": 420.0,
               "vertebrae_L2": 460.0, "vertebrae_L3": 500.0}
HALF_BAND = 8.0
BANDS = {
    **{name: (hu - HALF_BAND, hu + HALF_BAND) for name, hu in {**ORGAN_HU, **VERTEBRA_HU}.items()},
    "lung_upper_lobe_right": (-900.0, -800.0),
    "body_trunc": (-500.0, float("inf")),
    "subcutaneous_fat": (-120.0, -80.0), "torso_fat": (-80.0, -40.0), "skeletal_muscle": (40.0, 60.0),
}
MODEL_TASKS = ("total_fast", "tissue_types", "body", "body_fast")
#: What make_trunk writes where (CT: HU): air, the body's layers, organs, the lung and the vertebrae.
CT_TRUNK = {"air": -1000.0, **TISSUE_HU, "filler": FILLER_HU, **ORGAN_HU, "lung": LUNG_HU, **VERTEBRA_HU}
#: The same trunk as a T1-like MR (int16, air 0, fat bright, lung dark). The 1.5 mm models see partial-volume
#: values between neighbouring structures, so the order keeps those off the bands that matter: the rings (skin
#: to filler) stay below the organs, the vertebrae (vertebrae_mr runs at 1.5 mm) above everything else.
MR_TRUNK = {
    "air": 0.0, "subcutaneous_fat": 400.0, "torso_fat": 360.0, "skeletal_muscle": 150.0, "filler": 120.0,
    "liver": 500.0, "spleen": 540.0, "kidney_left": 580.0, "kidney_right": 620.0, "heart": 660.0, "aorta": 700.0,
    "lung": 60.0,
    **{name: 1000.0 + 40.0 * index for index, name in enumerate(VERTEBRA_HU)},
}
MR_BANDS = {
    **{name: (MR_TRUNK[name] - HALF_BAND, MR_TRUNK[name] + HALF_BAND)
       for name in (*ORGAN_HU, *VERTEBRA_HU, *TISSUE_HU)},
    "lung_right": (30.0, 95.0),  # total_mr segments whole lungs (CT: lobes, merged by the report)
    "body_trunc": (20.0, float("inf")),
}
MR_MODEL_TASKS = ("total_mr_fast", "vertebrae_mr", "tissue_types_mr", "body_mr")
LICENSE = "aca_TSRTFIXTURE000"  # upstream's offline check: 18 characters
#: The CNNs' outputs are compared within this (ONNX Runtime vs torch on the same tiles).
CNN_TOLERANCE = 0.02


# --------------------------------------------------------------------------------------------- phantom


def make_trunk(spacing=(3.0, 3.0, 3.0), shape=(84, 68, 34), vertebrae: bool = True, seed: int = 3,
               values: Mapping[str, float] = CT_TRUNK) -> nib.Nifti1Image:
    """A trunk in air: skin fat, a muscle ring, visceral fat, organs and a stack of vertebrae (RAS, int16).

    `values`: each structure's intensity (CT_TRUNK in HU, MR_TRUNK). The body stays 6 voxels inside the
    image in x and y, so no tissue touches the slice border; organs and vertebrae stay off the outer 3
    slices, so their statistics are counted (upstream's border).
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.indices(shape, dtype=np.float32)
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    radius = np.sqrt(((x - cx) / 36.0) ** 2 + ((y - cy) / 27.0) ** 2)  # 1 at the skin
    ct = np.full(shape, values["air"], np.float32)
    ct[radius <= 1.0] = values["subcutaneous_fat"]
    ct[radius <= 0.86] = values["skeletal_muscle"]
    ct[radius <= 0.76] = values["torso_fat"]
    ct[radius <= 0.62] = values["filler"]
    blobs = {  # centre (voxels) and semi-axes (voxels)
        "liver": ((cx - 12, cy + 4, 20), (9, 8, 7)), "spleen": ((cx + 15, cy + 5, 21), (4, 4, 5)),
        "kidney_left": ((cx + 10, cy - 6, 11), (3, 3, 5)), "kidney_right": ((cx - 10, cy - 6, 10), (3, 3, 5)),
        "heart": ((cx + 2, cy + 6, 25), (7, 6, 3.5)),
    }
    for name, (centre, axes) in blobs.items():
        inside = sum(((c - m) / a) ** 2 for c, m, a in zip((x, y, z), centre, axes)) <= 1
        ct[inside] = values[name]
    aorta = ((x - (cx + 3)) ** 2 + (y - (cy - 9)) ** 2 <= 2.2 ** 2) & (z >= 3) & (z <= 30)
    ct[aorta] = values["aorta"]
    lung = (((x - (cx - 10)) / 8) ** 2 + ((y - cy) / 8) ** 2 + ((z - 25) / 3) ** 2) <= 1
    ct[lung] = values["lung"]
    if vertebrae:
        for index, name in enumerate(VERTEBRA_HU):
            top = 30 - 4 * index
            body = ((x - cx) ** 2 + (y - (cy - 16)) ** 2 <= 3.5 ** 2) & (z <= top) & (z > top - 4)
            ct[body] = values[name]
    body_voxels = (ct != values["air"]) & ~lung
    ct[body_voxels] += rng.integers(-3, 4, size=int(body_voxels.sum()))  # medians differ from the nominal values
    ct[lung] = values["lung"] + rng.integers(-20, 21, size=int(lung.sum()))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-120.0, -100.0, -50.0)
    return nib.Nifti1Image(ct.astype(np.int16), affine)


# --------------------------------------------------------------------------------------------- fixtures


def _xgboost_home(folder: Path, tasks: tuple[str, ...], bands: dict[str, tuple[float, float]]) -> Path:
    """A TotalSegmentator home with band models for `tasks`, the xgboost folds and a (fake) license."""
    pytest.importorskip("nnunetv2", reason="the fixture models need the export extra")
    from tsrt_export.fixtures import write_body_stats_xgb, write_totalseg_home

    home = write_totalseg_home(folder, tasks, intensity_bands=bands)
    config = json.loads((home / "config.json").read_text())
    config["license_number"] = LICENSE
    (home / "config.json").write_text(json.dumps(config))
    write_body_stats_xgb(home)
    return home


@pytest.fixture(scope="module")
def body_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TotalSegmentator home: CT band models, xgboost folds, CT and MR networks, a (fake) license."""
    pytest.importorskip("monai", reason="the fixture networks are built by TotalSegmentator's constructor (MONAI)")
    from tsrt_export.fixtures import write_body_stats_cnn

    home = _xgboost_home(tmp_path_factory.mktemp("body_ts_home"), MODEL_TASKS, BANDS)
    write_body_stats_cnn(home, "ct")
    write_body_stats_cnn(home, "mr")
    return home


@pytest.fixture(scope="module")
def body_mr_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MR tasks' band models (total_mr --fast, vertebrae_mr, tissue_types_mr, body_mr) and the xgboost folds.

    MR band models read the bands in the image's own units (no per-image z-score; see write_result_folder).
    """
    return _xgboost_home(tmp_path_factory.mktemp("body_mr_ts_home"), MR_MODEL_TASKS, MR_BANDS)


@pytest.fixture(scope="module")
def trunk_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from totalseg_official import write_dicom_series

    folder = tmp_path_factory.mktemp("body_trunk")
    nib.save(make_trunk(), folder / "trunk.nii.gz")
    nib.save(make_trunk(vertebrae=False), folder / "no_vertebrae.nii.gz")
    return {"nifti": folder / "trunk.nii.gz", "dicom": write_dicom_series(folder / "trunk.nii.gz", folder / "dicom"),
            "no_vertebrae": folder / "no_vertebrae.nii.gz"}


#: The official results: get_body_stats on each job, and (xgboost) the feature row its first predictor received.
_ORACLE = """
def main():
    import contextlib, io
    import numpy as np
    import xgboost
    from totalsegmentator.bin.totalseg_get_body_stats import get_body_stats, print_body_stats_result

    sequential_nnunet()
    rows = []
    predict = xgboost.XGBRegressor.predict

    def spying_predict(self, X, *args, **kwargs):
        rows.append([float(value) for value in np.asarray(X, dtype=np.float64)[0]])
        return predict(self, X, *args, **kwargs)

    xgboost.XGBRegressor.predict = spying_predict
    results = []
    for job in json.loads(Path(sys.argv[1]).read_text()):
        rows.clear()
        for update in get_body_stats(Path(job["image"]), job["modality"], f_type=job["f_type"], quiet=True,
                                     device="cpu", model_type=job["model_type"], fold=job.get("fold", "all"),
                                     test_time_augmentation=job.get("tta", False),
                                     only_weight=job.get("only_weight", False)):
            pass
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            print_body_stats_result(update["result"])
        results.append({"result": update["result"], "features": rows[0] if rows else None,
                        "lines": printed.getvalue().splitlines()})
    return results
"""


def _start_official(jobs: list[dict], work: Path, home: Path):
    from totalseg_official import start_official

    work.mkdir(parents=True, exist_ok=True)
    (work / "jobs.json").write_text(json.dumps(jobs))
    return start_official(_ORACLE, work, str(work / "jobs.json"), home=home)


def _cli(*args: str, store: Path, home: Path, env: dict[str, str] | None = None):
    from typer.testing import CliRunner

    from tsrt.cli.root import app

    return CliRunner().invoke(
        app, list(args), env={"TSRT_HOME": str(store), "TOTALSEG_HOME_DIR": str(home), **(env or {})}
    )


def _run(*args: str, store: Path, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`tsrt ARGS` through the console entry point (one-line errors, exit codes)."""
    return subprocess.run(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", *args], capture_output=True, text=True,
        env={**os.environ, "TSRT_HOME": str(store), "TOTALSEG_HOME_DIR": str(home), **(env or {})}, cwd=REPO_ROOT,
    )


def _close(ours, theirs, tolerance: float, where: str = "") -> None:
    """Same keys in the same order, same strings, numbers within `tolerance`."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), (where, list(ours), list(theirs))
        for key in theirs:
            _close(ours[key], theirs[key], tolerance, f"{where}.{key}")
    elif isinstance(theirs, float) and not isinstance(theirs, bool):
        assert ours == pytest.approx(theirs, abs=tolerance), (where, ours, theirs)
    else:
        assert ours == theirs, (where, ours, theirs)


def _largest_difference(ours, theirs) -> float:
    if isinstance(theirs, dict):
        return max([_largest_difference(ours[key], theirs[key]) for key in theirs] or [0.0])
    return abs(ours - theirs) if isinstance(theirs, float) else 0.0


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.slow
def test_xgboost_equals_official_on_nifti_and_dicom(body_home: Path, trunk_inputs: dict, tmp_path: Path) -> None:
    """Same features and the same JSON as get_body_stats(model_type="xgboost"), models fetched on first use."""
    # One official run (NIfTI): the DICOM series holds the same voxels, so tsrt's DICOM result must equal it too
    # (a second official run on the series gave the identical JSON and took 40 % of this test's time).
    _assert_same_as_official(*_xgboost_by_both(trunk_inputs["nifti"], trunk_inputs["dicom"], "ct", body_home, tmp_path))


def _xgboost_by_both(nifti: Path, dicom: Path, modality: str, home: Path, tmp_path: Path):
    """Official get_body_stats (xgboost) on `nifti` in the background while tsrt makes the report from `nifti` (Python
    API) and from `dicom` (the CLI), models fetched on first use from `home`: the arguments of _assert_same_as_official.
    """
    from tsrt.reports.body import BodyReporter, BodyStatsOptions
    from tsrt.totalseg.options import RuntimeOptions

    jobs = [{"image": str(nifti), "modality": modality, "f_type": "niigz", "model_type": "xgboost"}]
    official = _start_official(jobs, tmp_path / "official", home)
    store = tmp_path / "store"
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TSRT_HOME", str(store))
            env.setenv("TOTALSEG_HOME_DIR", str(home))
            reporter = BodyReporter(RuntimeOptions(quiet=True), BodyStatsOptions(modality, "xgboost"))
            report = reporter.write(nifti, tmp_path / "nifti" / "body.json")
        dicom_json = tmp_path / "dicom" / "body.json"
        result = _cli("report", "body", "-i", str(dicom), "-o", str(dicom_json), "-m", modality, "-mt", "xgboost",
                      store=store, home=home)
        assert result.exit_code == 0, (result.output, result.exception)
        theirs = official.result()
    finally:
        official.kill()
    return report, theirs[0], [tmp_path / "nifti" / "body.json", dicom_json], result.output


#: Measured on either trunk: organs, the lung, vertebrae and tissue slices (the phantom keeps them off the borders).
FOUND_ON_TRUNK = ("liver_volume", "heart_volume", "lung_right_volume", "vertebrae_L1_volume",
                  "subcutaneous_fat_vertebrae_L1_volume", "skeletal_muscle_vertebrae_T10_intensity",
                  "torso_fat_vertebrae_L3_volume")


def _assert_same_as_official(report, official: dict, written: list[Path], printed_output: str) -> dict[str, float]:
    """tsrt's feature row, result, written JSONs and printed lines equal upstream's; returns the named features."""
    from tsrt.reports.body import feature_names, result_lines

    named = dict(zip(feature_names(), report.features))
    found = [name for name, value in named.items() if value]
    print(len(found), "non-zero features:", found)
    for needle in FOUND_ON_TRUNK:
        assert needle in found, needle
    difference = [(name, a, b) for (name, a), b in zip(named.items(), official["features"])
                  if a != pytest.approx(b, rel=1e-12, abs=1e-9)]
    assert difference == []
    assert report.result == official["result"]
    for path in written:
        assert json.loads(path.read_text()) == official["result"], path
    expected = official["lines"]  # upstream's print_body_stats_result
    assert result_lines(official["result"]) == expected
    printed = printed_output.splitlines()
    assert printed[printed.index(expected[0]):][: len(expected)] == expected
    assert expected[0].startswith("weight:") and expected[0].endswith(" kg") and expected[-1].startswith("bsa:")
    return named


@pytest.mark.slow
def test_xgboost_on_mr_equals_official_on_nifti_and_dicom(body_mr_home: Path, tmp_path: Path) -> None:
    """get_body_stats(modality="mr", model_type="xgboost"): total_mr --fast, vertebrae_mr, tissue_types_mr, body_mr.

    The MR trunk (MR_TRUNK) as NIfTI and as an MR DICOM series of the same voxels; one official run (NIfTI).
    """
    from totalseg_official import write_dicom_series

    nifti = tmp_path / "mr_trunk.nii.gz"
    nib.save(make_trunk(values=MR_TRUNK), nifti)
    dicom = write_dicom_series(nifti, tmp_path / "mr_dicom", modality="MR")
    named = _assert_same_as_official(*_xgboost_by_both(nifti, dicom, "mr", body_mr_home, tmp_path))
    # MR intensities, read where the phantom put them: organs from total_mr, vertebrae from vertebrae_mr (noise +-3)
    for structure in ("liver", "aorta", "vertebrae_T10", "vertebrae_L1", "vertebrae_L3"):
        assert abs(named[f"{structure}_intensity"] - MR_TRUNK[structure]) <= 3, structure
    assert abs(named["subcutaneous_fat_vertebrae_L1_intensity"] - MR_TRUNK["subcutaneous_fat"]) <= 3
    assert named["lung_left_volume"] == 0  # total_mr's own lungs, no CT lobes merged


@pytest.mark.slow
def test_cnn_equals_official_on_real_ct_nifti_dicom_and_tta(
    body_home: Path, shared_data: Path, tmp_path: Path
) -> None:
    """get_body_stats(model_type="cnn"): all folds on NIfTI and DICOM, -tta, one fold with --only_weight, and MR."""
    from totalseg_official import write_dicom_series

    ct = shared_data / "example_ct_sm.nii.gz"
    mr = shared_data / "example_mr_sm.nii.gz"
    dicom = write_dicom_series(ct, tmp_path / "ct_dicom")
    cases = {
        "nifti": (["-i", str(ct), "-m", "ct"], {"image": str(ct), "f_type": "niigz"}),
        "dicom": (["-i", str(dicom), "-m", "ct"], {"image": str(dicom), "f_type": "dicom"}),
        "tta": (["-i", str(ct), "-m", "ct", "-tta"], {"image": str(ct), "f_type": "niigz", "tta": True}),
        "fold": (["-i", str(ct), "-m", "ct", "-f", "3", "--only_weight"],
                 {"image": str(ct), "f_type": "niigz", "fold": "3", "only_weight": True}),
        # MR: the MR networks (body_stats_mr) on a real MR
        "mr": (["-i", str(mr), "-m", "mr"], {"image": str(mr), "f_type": "niigz", "modality": "mr"}),
    }
    # The DICOM series holds the NIfTI's voxels: its report is checked against the official NIfTI result
    # (one official run fewer).
    jobs = [{"modality": "ct", **job, "model_type": "cnn"} for name, (_, job) in cases.items() if name != "dicom"]
    official = _start_official(jobs, tmp_path / "official", body_home)
    store = tmp_path / "store"
    try:
        ours = {}
        for name, (args, _) in cases.items():
            output = tmp_path / name / "body_stats.json"
            result = _cli("report", "body", *args, "-o", str(output), "-q", store=store, home=body_home)
            assert result.exit_code == 0, (name, result.output, result.exception)
            ours[name] = json.loads(output.read_text())
        theirs = official.result()
    finally:
        official.kill()
    official_for = dict(zip([name for name in cases if name != "dicom"], theirs)) | {"dicom": theirs[0]}
    for name, mine in ours.items():
        official_result = official_for[name]
        print(name, json.dumps(mine))
        _close(mine, official_result["result"], CNN_TOLERANCE, name)
        print(name, "largest difference:", _largest_difference(mine, official_result["result"]))
    assert list(ours["nifti"])[:4] == ["weight", "size", "age", "sex"] and list(ours["nifti"])[-2:] == ["bmi", "bsa"]
    assert "min" in ours["tta"]["weight"] and list(ours["fold"]) == ["weight"] and "min" not in ours["fold"]["weight"]
    for modality in ("ct", "mr"):
        manifest = json.loads((store / "models" / "resources" / f"body_stats_{modality}" / "manifest.json").read_text())
        assert sorted(manifest["files"]) == sorted(f"fold_{k}.{e}" for k in range(5) for e in ("onnx", "json"))
    assert ours["mr"] != ours["nifti"]  # the MR networks, not the CT ones
    described = json.loads((store / "models" / "resources" / "body_stats_ct" / "fold_0.json").read_text())
    assert described["verified_with_torch"]["max_abs_difference"] < 1e-3


# --------------------------------------------------------------------------------------------- refusals


def _one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]
    return lines[0]


@pytest.mark.slow
def test_a_scan_without_vertebrae_is_refused_in_one_line(body_home: Path, trunk_inputs: dict, tmp_path: Path) -> None:
    output = tmp_path / "out" / "body_stats.json"
    _one_line(_run("report", "body", str(trunk_inputs["no_vertebrae"]), "-o", str(output), "-m", "ct",
                   "-mt", "xgboost", "-q", store=tmp_path / "store", home=body_home),
              "The body report needs a vertebra C1-L5, which the scan does not show")
    assert not output.parent.exists()


def test_missing_predictors_name_the_command_that_installs_them(tmp_path: Path) -> None:
    """Offline, with nothing in the store: one line naming the import and download commands, nothing written."""
    ct = tmp_path / "ct.nii.gz"
    nib.save(make_trunk(shape=(24, 20, 10)), ct)
    output = tmp_path / "out" / "body_stats.json"
    empty_home = tmp_path / "empty_ts_home"
    for model_type, name in (("xgboost", "body_stats_xgb"), ("cnn", "body_stats_ct")):
        line = _one_line(_run("report", "body", str(ct), "-o", str(output), "-m", "ct", "-mt", model_type,
                              store=tmp_path / "store", home=empty_home, env={"TSRT_OFFLINE": "1"}),
                         f"tsrt models import {name} --totalseg-home DIR", f"tsrt models download {name}")
        assert "not in the model store" in line
    assert not output.parent.exists()


def test_options_are_checked_before_any_work(tmp_path: Path) -> None:
    ct = tmp_path / "ct.nii.gz"
    nib.save(make_trunk(shape=(24, 20, 10)), ct)
    for args, needle in ((["-m", "pet"], "Unknown modality 'pet'"), (["-m", "ct", "-mt", "svm"], "Unknown model type"),
                         (["-m", "ct", "-f", "7"], "Fold 7 does not exist")):
        _one_line(_run("report", "body", str(ct), *args, store=tmp_path / "store", home=tmp_path / "none"), needle)


# --------------------------------------------------------------------------------------------- download


@pytest.mark.slow
def test_predictors_are_downloaded_on_first_use_from_the_release_zip(body_home: Path, tmp_path: Path) -> None:
    """No predictors in the home: the release zip (as GitHub serves it) is fetched, converted and used once."""
    from conftest import WeightsServer

    from tsrt.models.resources import BODY_STATS_XGB_FOLDER, verified_files

    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as archive:
        for path in sorted((body_home / "nnunet" / "results" / BODY_STATS_XGB_FOLDER).iterdir()):
            archive.write(path, f"{BODY_STATS_XGB_FOLDER}/{path.name}")
    server = WeightsServer(payload.getvalue())
    store = tmp_path / "store"
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TSRT_HOME", str(store))
            env.setenv("TSRT_WEIGHTS_URL", f"{server.url}/good")
            from tsrt.models.first_use import ensure_resource

            ensure_resource("body_stats_xgb", totalseg_home=tmp_path / "no_home", progress=False)
            files = verified_files("body_stats_xgb")
        assert [request[1] for request in server.requests] == [
            f"/good/v2.5.0-weights/{BODY_STATS_XGB_FOLDER}.zip"]
        assert len(files) == 40 and not (store / "downloads" / "body_stats_xgb.zip").exists()
    finally:
        server.close()


# --------------------------------------------------------------------------------------------- import


def test_every_resnet3d_variant_is_rebuilt_as_totalsegmentator_builds_it() -> None:
    """The importer's networks have the weights (names and shapes) of TotalSegmentator's constructor, per variant."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai", reason="TotalSegmentator builds the networks with MONAI")
    from totalsegmentator.cnn import _create_model_from_hparams
    from tsrt_export.fixtures import body_stats_cnn_hparams
    from tsrt_export.import_classifiers import RESNET3D_VARIANTS, build_body_stats_network

    for variant in RESNET3D_VARIANTS:
        for modality in ("ct", "mr"):
            hparams = {**body_stats_cnn_hparams(modality), "model": variant}
            with torch.device("meta"):
                ours, theirs = build_body_stats_network(hparams), _create_model_from_hparams(hparams)
            shapes = [{key: tuple(value.shape) for key, value in net.state_dict().items()} for net in (ours, theirs)]
            assert shapes[0] == shapes[1], (variant, modality)
    with pytest.raises(Exception, match="ResNet3D ones only"):
        build_body_stats_network({**body_stats_cnn_hparams("ct"), "model": "tf_efficientnet_b0_ns"})
