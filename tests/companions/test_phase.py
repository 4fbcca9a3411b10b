"""`tsrt phase` against TotalSegmentator's own `get_ct_contrast_phase` (totalseg_get_phase), same inputs.

Oracle: the official function, in a child process (it imports TotalSegmentator's python_api, which
patches nnU-Net). Two levels:

- Given the same statistics (`existing_stats`), the result dict must be identical - pi time, phase,
  probability, min/max and stddev - for TotalSegmentator's own statistics of example_ct_sm and for
  synthetic intensity sets spread over the phase bands.
- End to end on confident fixture weights laid out like TotalSegmentator's home: both run task
  total --fast (and, because the fixture's brain row fires, headneck_bones_vessels) on a crop of
  example_ct_sm. The statistics both compute (captured inside the official run) agree within 0.1 %
  and the phase result is the same - for tsrt reading the NIfTI and reading the same crop as a DICOM
  series (TotalSegmentator's DICOM conversion equals tsrt's reader: tests/test_read_write.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from totalseg_official import run_official, start_official, tsrt_cli, tsrt_process, write_dicom_series

pytest.importorskip("xgboost", reason="the contrast phase needs the phase extra (xgboost)")

REPO_ROOT = Path(__file__).resolve().parents[2]
STATISTICS_RTOL = 1e-3

#: The crop of example_ct_sm (3 mm voxels) the end-to-end runs use: small enough that the 0.75 mm
#: head-neck model stays quick, and with the fixture's brain and crop-source rows present.
CROP = np.s_[40:72, 30:62, 5:25]
#: Confident fixture rows: "brain" fires (so the head-neck model runs), vertebrae_T1 gives its crop,
#: and the four neck vessels the phase reads take trained rows instead of dead ones.
CLASS_ROWS = {
    "brain": "spine",
    "vertebrae_T1": "lung_left",
    "internal_carotid_artery_right": "aorta",
    "internal_carotid_artery_left": "kidney_left",
    "internal_jugular_vein_right": "liver",
    "internal_jugular_vein_left": "spleen",
}




@pytest.fixture(scope="module")
def phase_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TSRT_HOME with TotalSegmentator's phase regressors imported by `tsrt models import phase`."""
    pytest.importorskip("totalsegmentator", reason="importing the regressors needs the totalsegmentator package")
    home = tmp_path_factory.mktemp("phase_home")
    result = tsrt_cli("models", "import", "phase", "-q", home=home)
    assert result.exit_code == 0, (result.output, result.exception)
    return home


# --------------------------------------------------------------------------------------------- same statistics


def _synthetic_statistics(count: int) -> list[dict]:
    """Intensity sets from native to late venous: vessels and organs enhance by different amounts."""
    from tsrt.companions.phase import TOTAL_FEATURE_ORGANS

    rng = np.random.default_rng(11)
    cases = []
    for index in range(count):
        arterial, venous, organ = rng.uniform(30, 420), rng.uniform(30, 260), rng.uniform(30, 160)
        base = {
            "aorta": arterial, "iliac_artery_left": arterial, "iliac_artery_right": arterial, "heart": arterial * 0.8,
            "pulmonary_vein": arterial * 0.9, "inferior_vena_cava": venous, "portal_vein_and_splenic_vein": venous,
            "iliac_vena_left": venous * 0.8, "iliac_vena_right": venous * 0.8, "liver": organ, "pancreas": organ,
            "urinary_bladder": rng.uniform(0, 200), "gallbladder": rng.uniform(0, 40), "brain": 0.0,
            "colon": rng.uniform(0, 120), "small_bowel": rng.uniform(20, 160),
        }
        stats = {}
        for name in TOTAL_FEATURE_ORGANS:
            found = name != "brain" and rng.uniform() > 0.1  # now and then a structure is missing
            stats[name] = {"volume": float(rng.uniform(5e3, 2e6)) if found else 0.0,
                           "intensity": round(float(base[name] + rng.normal(0, 8)), 5) if found else 0.0}
        stats["liver"]["volume"] = 1.5e6  # at least one structure is always found
        cases.append(stats)
    return cases


_EXISTING_STATS_ORACLE = """
def main():
    from totalsegmentator.bin.totalseg_get_phase import get_ct_contrast_phase, pi_time_to_phase
    jobs = json.loads(Path(sys.argv[1]).read_text())
    results = []
    for stats in jobs["stats"]:
        for update in get_ct_contrast_phase(Path(jobs["image"]), existing_stats=stats, quiet=True, device="cpu"):
            pass
        results.append(update["result"])
    bands = [list(pi_time_to_phase(t)) for t in jobs["pi_times"]]
    return {"results": results, "bands": bands}
"""

#: Pi times at and around every band edge (and NaN), for the band table.
PI_TIMES = [-3.0, 0.0, 4.99, 5.0, 9.99, 10.0, 19.99, 20.0, 29.99, 30.0, 49.99, 50.0, 59.99, 60.0, 69.99, 70.0,
            89.99, 90.0, 99.99, 100.0, 250.0, float("nan")]


@pytest.fixture(scope="module")
def statistics_cases(shared_data: Path) -> list[dict]:
    real = json.loads((shared_data / "example_seg_fast_statistics.json").read_text())
    return [real, *_synthetic_statistics(40)]


@pytest.fixture(scope="module")
def official_on_statistics(statistics_cases: list[dict], shared_data: Path, tmp_path_factory) -> dict:
    pytest.importorskip("totalsegmentator", reason="the oracle is official TotalSegmentator (dev environment)")
    work = tmp_path_factory.mktemp("official_phase_stats")
    jobs = {"image": str(shared_data / "example_ct_sm.nii.gz"), "stats": statistics_cases, "pi_times": PI_TIMES}
    (work / "jobs.json").write_text(json.dumps(jobs))
    return run_official(_EXISTING_STATS_ORACLE, work, str(work / "jobs.json"))


def test_same_result_as_official_for_the_same_statistics(
    phase_home: Path, statistics_cases: list[dict], official_on_statistics: dict, shared_data: Path
) -> None:
    from tsrt.companions.phase import contrast_phase

    expected = official_on_statistics["results"]
    assert len({r["phase"] for r in expected}) >= 3, "the cases should span several phases to prove anything"
    for stats, theirs in zip(statistics_cases, expected):
        ours = contrast_phase(
            shared_data / "example_ct_sm.nii.gz", existing_stats=stats, models_dir=phase_home / "models", quiet=True
        )
        assert ours == theirs  # exact: pi time, phase, probability, min/max, stddev


def test_phase_bands_match_official(official_on_statistics: dict) -> None:
    from tsrt.companions.phase import pi_time_to_phase

    assert [list(pi_time_to_phase(t)) for t in PI_TIMES] == official_on_statistics["bands"]


def test_cli_with_existing_statistics_writes_the_api_result(
    phase_home: Path, statistics_cases: list[dict], shared_data: Path, tmp_path: Path
) -> None:
    from tsrt.companions.phase import contrast_phase

    stats_file = tmp_path / "statistics.json"
    stats_file.write_text(json.dumps(statistics_cases[3]))
    output = tmp_path / "out" / "contrast_phase.json"
    result = tsrt_cli("phase", str(shared_data / "example_ct_sm.nii.gz"), "-o", str(output), "-s", str(stats_file), "-q",
                  home=phase_home)
    assert result.exit_code == 0, (result.output, result.exception)
    written = json.loads(output.read_text())
    assert list(written) == ["pi_time", "phase", "probability", "pi_time_min", "pi_time_max", "stddev"]
    assert written == contrast_phase(
        shared_data / "example_ct_sm.nii.gz", existing_stats=stats_file, models_dir=phase_home / "models"
    )


def test_runtime_needs_no_scikit_learn(
    phase_home: Path, statistics_cases: list[dict], official_on_statistics: dict, shared_data: Path, tmp_path: Path
) -> None:
    """The phase extra is xgboost alone: xgboost's scikit-learn wrappers must not be needed at run time."""
    import subprocess
    import sys

    stats_file = tmp_path / "statistics.json"
    stats_file.write_text(json.dumps(statistics_cases[5]))
    code = (
        "import json, sys; sys.modules['sklearn'] = None\n"
        "from tsrt.companions.phase import contrast_phase\n"
        f"print(json.dumps(contrast_phase({str(shared_data / 'example_ct_sm.nii.gz')!r}, "
        f"existing_stats={str(stats_file)!r}, models_dir={str(phase_home / 'models')!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == official_on_statistics["results"][5]


# --------------------------------------------------------------------------------------------- bad input


def test_missing_regressors_are_one_line_naming_the_import(tmp_path: Path, shared_data: Path) -> None:
    output = tmp_path / "phase.json"
    done = tsrt_process("phase", str(shared_data / "example_ct_sm.nii.gz"), "-o", str(output), home=tmp_path / "home")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tsrt: error:") and "tsrt models import phase" in lines[0], lines
    assert not output.exists()


def test_tampered_regressor_is_refused(phase_home: Path, tmp_path: Path, shared_data: Path, statistics_cases) -> None:
    import shutil

    home = tmp_path / "home"
    shutil.copytree(phase_home, home)
    fold = home / "models" / "resources" / "phase" / "fold_2.json"
    document = json.loads(fold.read_text())
    document["learner"]["learner_model_param"]["base_score"] = "[9E1]"  # a plausible-looking edit
    fold.write_text(json.dumps(document))
    stats_file = tmp_path / "statistics.json"
    stats_file.write_text(json.dumps(statistics_cases[1]))
    output = tmp_path / "phase.json"
    done = tsrt_process("phase", str(shared_data / "example_ct_sm.nii.gz"), "-o", str(output), "-s", str(stats_file),
                         home=home)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "fold_2.json" in lines[0] and "checksum" in lines[0], lines
    assert not output.exists()


def test_statistics_without_the_phase_structures_are_refused(
    phase_home: Path, statistics_cases: list[dict], tmp_path: Path, shared_data: Path
) -> None:
    nothing_found = {name: {"volume": 0.0, "intensity": 0.0} for name in statistics_cases[1]}
    wrong_task = {"liver_segment_1": {"volume": 10.0, "intensity": 50.0}}
    for name, stats in {"empty": nothing_found, "other_task": wrong_task}.items():
        stats_file = tmp_path / f"{name}.json"
        stats_file.write_text(json.dumps(stats))
        output = tmp_path / f"{name}_phase.json"
        done = tsrt_process("phase", str(shared_data / "example_ct_sm.nii.gz"), "-o", str(output), "-s",
                             str(stats_file), home=phase_home)
        assert done.returncode != 0, name
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tsrt: error:"), lines
        assert not output.exists()


# --------------------------------------------------------------------------------------------- end to end


_END_TO_END_ORACLE = """
def main():
    sequential_nnunet()
    import totalsegmentator.bin.totalseg_get_phase as get_phase
    official = get_phase.totalsegmentator
    captured = []

    def recording(*args, **kwargs):
        seg, stats = official(*args, **kwargs)
        captured.append({"task": kwargs.get("task", "total"), "stats": stats})
        return seg, stats

    get_phase.totalsegmentator = recording
    runs = {}
    for name, (path, f_type) in json.loads(Path(sys.argv[1]).read_text()).items():
        captured.clear()
        for update in get_phase.get_ct_contrast_phase(Path(path), f_type=f_type, quiet=True, device="cpu"):
            pass
        runs[name] = {"result": update["result"], "statistics": {c["task"]: c["stats"] for c in captured}}
    return runs
"""


@pytest.fixture(scope="module")
def e2e_inputs(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("phase_inputs")
    nifti = folder / "ct_crop.nii.gz"
    nib.save(nib.load(shared_data / "example_ct_sm.nii.gz").slicer[CROP], nifti)
    return {"nifti": nifti, "dicom": write_dicom_series(nifti, folder / "ct_crop_dicom")}


@pytest.fixture(scope="module")
def e2e_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("totalsegmentator", reason="the oracle is official TotalSegmentator (dev environment)")
    from tsrt_export.fixtures import find_demo_checkpoint, write_totalseg_home

    checkpoint = find_demo_checkpoint(REPO_ROOT)
    if checkpoint is None:
        pytest.skip("the end-to-end phase needs confident weights (the trained demo checkpoint)")
    home = tmp_path_factory.mktemp("phase_ts_home")
    tasks = ("total_fast", "total_fastest", "headneck_bones_vessels")
    return write_totalseg_home(home, tasks, source_checkpoint=checkpoint, class_rows=CLASS_ROWS)


@pytest.fixture(scope="module")
def e2e_official(e2e_home: Path, e2e_inputs: dict[str, Path], tmp_path_factory) -> object:
    work = tmp_path_factory.mktemp("official_phase_e2e")
    jobs = {"nifti": [str(e2e_inputs["nifti"]), "niigz"]}
    (work / "jobs.json").write_text(json.dumps(jobs))
    process = start_official(_END_TO_END_ORACLE, work, str(work / "jobs.json"), home=e2e_home)
    yield process
    process.kill()


@pytest.fixture(scope="module")
def e2e_store(e2e_home: Path, e2e_official, phase_home: Path, tmp_path_factory) -> Path:
    """phase_home's regressors plus the fixture models, imported while the official run goes on."""
    import shutil

    home = tmp_path_factory.mktemp("phase_store")
    shutil.copytree(phase_home / "models", home / "models")
    for task, *flags in (("total", "--fast"), ("headneck_bones_vessels",)):
        result = tsrt_cli("models", "import", task, *flags, "--totalseg-home", str(e2e_home), "-q", home=home)
        assert result.exit_code == 0, (result.output, result.exception)
    return home


def _assert_statistics_close(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for name, values in theirs.items():
        for key in ("volume", "intensity"):
            assert ours[name][key] == pytest.approx(values[key], rel=STATISTICS_RTOL, abs=1e-6), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nifti", "dicom"])
def test_end_to_end_statistics_and_phase_match_official(
    kind: str, e2e_store: Path, e2e_official, e2e_inputs: dict[str, Path], tmp_path: Path
) -> None:
    from tsrt.companions.phase import PhaseEstimator, phase_features, predict_phase
    from tsrt.totalseg.options import RuntimeOptions
    from tsrt.totalseg.source import read_source

    estimator = PhaseEstimator(RuntimeOptions(models_dir=e2e_store / "models", device="cpu", quiet=True))
    source = read_source(e2e_inputs[kind])
    total = estimator.total_statistics(source)
    headneck = estimator.task_statistics(source, "headneck_bones_vessels")
    ours = predict_phase(phase_features(total, headneck), estimator.regressors)

    theirs = e2e_official.result()["nifti"]
    assert set(theirs["statistics"]) == {"total", "headneck_bones_vessels"}, "the head-neck path must run"
    _assert_statistics_close(total, theirs["statistics"]["total"])
    _assert_statistics_close(headneck, theirs["statistics"]["headneck_bones_vessels"])
    found = [name for name, values in headneck.items() if values["volume"] > 0]
    assert "internal_carotid_artery_right" in found, "the neck vessel features should not all be zero"
    assert ours["phase"] == theirs["result"]["phase"]
    assert ours["probability"] == theirs["result"]["probability"]
    assert ours["pi_time"] == pytest.approx(theirs["result"]["pi_time"], abs=0.5)
    print(f"{kind}: tsrt {ours} | official {theirs['result']}")


@pytest.mark.slow
def test_cli_cohort_writes_one_result_per_case(
    e2e_store: Path, e2e_official, e2e_inputs: dict[str, Path], tmp_path: Path
) -> None:
    """The CLI's whole pipeline (total, brain check, head-neck, regressors) on a folder; one case is broken."""
    import shutil

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(e2e_inputs["nifti"], cohort / "case_a.nii.gz")
    (cohort / "case_b.nii.gz").write_bytes(b"not a nifti")
    output = tmp_path / "phases"
    result = tsrt_cli("phase", str(cohort), "-o", str(output), "-q", "--device", "cpu", home=e2e_store)
    assert result.exit_code != 0  # case_b failed, and says so
    assert "1 phased" in result.output and "case_b" in result.output
    written = json.loads((output / "case_a" / "contrast_phase.json").read_text())
    theirs = e2e_official.result()["nifti"]["result"]
    assert list(written) == list(theirs)
    assert (written["phase"], written["probability"]) == (theirs["phase"], theirs["probability"])
    assert written["pi_time"] == pytest.approx(theirs["pi_time"], abs=0.5)
    assert not (output / "case_b" / "contrast_phase.json").exists()
