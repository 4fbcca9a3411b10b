"""`tsrt modality` against TotalSegmentator's `get_modality` / `get_modality_from_rois`, same inputs.

Oracle: the official functions of totalseg_get_modality, in a child process (the module imports
python_api). Inputs: the CT and MR examples of ../shared/data and the example CT DICOM series
(converted for the official function with dicom2nifti, as TotalSegmentator converts DICOM).

- Intensity way: the four features agree to float precision and the prediction is the same.
- Region way (`-n`): task total_mr --fast on confident fixture weights in TotalSegmentator's
  layout, whose rows are steered onto the structures the classifiers read; the statistics (captured
  inside the official run) agree within 0.1 %, the 16 features closely, and the prediction is the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from totalseg_official import start_official, tsrt_cli, tsrt_process

pytest.importorskip("xgboost", reason="the modality check needs the phase extra (xgboost)")

REPO_ROOT = Path(__file__).resolve().parents[2]
STATISTICS_RTOL = 1e-3
INTENSITY_INPUTS = ("example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "example_ct.nii.gz", "example_ct_dicom")
REGION_INPUTS = ("example_mr_sm.nii.gz", "example_ct_sm.nii.gz")
#: Confident fixture rows for total_mr: 8 of the 16 structures the region classifiers read get trained rows.
CLASS_ROWS = {
    "brain": "spleen", "spinal_cord": "spine", "autochthon_left": "lung_left", "autochthon_right": "lung_right",
    "gluteus_maximus_left": "kidney_left", "iliopsoas_right": "kidney_right", "hip_left": "liver", "colon": "aorta",
}




_ORACLE = """
def main():
    sequential_nnunet()
    import nibabel as nib
    import totalsegmentator.bin.totalseg_get_modality as get_modality
    from totalsegmentator.dicom_io import dcm_to_nifti

    jobs = json.loads(Path(sys.argv[1]).read_text())
    intensity = {}
    for name, path in jobs["intensity"].items():
        path = Path(path)
        if path.is_dir():
            converted = Path(jobs["work"]) / "dicom.nii.gz"
            dcm_to_nifti(path, converted, tmp_dir=Path(jobs["work"]))
            path = converted
        image = nib.load(path)
        intensity[name] = {"features": [float(f) for f in get_modality.get_features(image)],
                           "result": get_modality.get_modality(image)}

    official = get_modality.totalsegmentator
    captured = []

    def recording(*args, **kwargs):
        seg, stats = official(*args, **kwargs)
        captured.append(stats)
        return seg, stats

    get_modality.totalsegmentator = recording
    regions = {}
    for name, path in jobs["regions"].items():
        captured.clear()
        result = get_modality.get_modality_from_rois(nib.load(path), device="cpu")
        regions[name] = {"result": result, "statistics": captured[0]}
    return {"intensity": intensity, "regions": regions}
"""


@pytest.fixture(scope="module")
def modality_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("totalsegmentator", reason="importing the classifiers needs the totalsegmentator package")
    home = tmp_path_factory.mktemp("modality_home")
    result = tsrt_cli("models", "import", "modality", "-q", home=home)
    assert result.exit_code == 0, (result.output, result.exception)
    return home


@pytest.fixture(scope="module")
def ts_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("totalsegmentator", reason="the oracle is official TotalSegmentator (dev environment)")
    from tsrt_export.fixtures import find_demo_checkpoint, write_totalseg_home

    checkpoint = find_demo_checkpoint(REPO_ROOT)
    if checkpoint is None:
        pytest.skip("the region way needs confident weights (the trained demo checkpoint)")
    home = tmp_path_factory.mktemp("modality_ts_home")
    return write_totalseg_home(home, ("total_mr_fast",), source_checkpoint=checkpoint, class_rows=CLASS_ROWS)


@pytest.fixture(scope="module")
def official(ts_home: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("official_modality")
    jobs = {
        "work": str(work),
        "intensity": {name: str(shared_data / name) for name in INTENSITY_INPUTS},
        "regions": {name: str(shared_data / name) for name in REGION_INPUTS},
    }
    (work / "jobs.json").write_text(json.dumps(jobs))
    process = start_official(_ORACLE, work, str(work / "jobs.json"), home=ts_home)
    yield process
    process.kill()


@pytest.fixture(scope="module")
def store(ts_home: Path, official, modality_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The classifiers plus total_mr --fast, imported while the official run goes on."""
    home = tmp_path_factory.mktemp("modality_store")
    shutil.copytree(modality_home / "models", home / "models")
    result = tsrt_cli("models", "import", "total_mr", "--fast", "--totalseg-home", str(ts_home), "-q", home=home)
    assert result.exit_code == 0, (result.output, result.exception)
    return home


@pytest.mark.parametrize("name", INTENSITY_INPUTS)
def test_intensity_way_matches_official(name: str, modality_home: Path, official, shared_data: Path) -> None:
    from tsrt.companions.modality import ModalityClassifier, intensity_features
    from tsrt.totalseg.options import RuntimeOptions
    from tsrt.totalseg.source import read_source

    classifier = ModalityClassifier(runtime=RuntimeOptions(models_dir=modality_home / "models"))
    features = intensity_features(read_source(shared_data / name).values)
    result = classifier.predict(shared_data / name)
    theirs = official.result()["intensity"][name]
    np.testing.assert_allclose(features, theirs["features"], rtol=1e-12, atol=0)
    assert result == theirs["result"]


@pytest.mark.slow
@pytest.mark.parametrize("name", REGION_INPUTS)
def test_region_way_matches_official(name: str, store: Path, official, shared_data: Path, tmp_path: Path) -> None:
    from tsrt.companions.modality import REGION_FEATURE_STRUCTURES

    output = tmp_path / "modality.json"
    result = tsrt_cli("modality", str(shared_data / name), "-n", "-o", str(output), "-q", "--device", "cpu", home=store)
    assert result.exit_code == 0, (result.output, result.exception)
    theirs = official.result()["regions"][name]

    from tsrt.totalseg.source import read_source
    from tsrt.totalseg.task import segment_source
    from tsrt.companions.modality import ModalityClassifier
    from tsrt.totalseg.options import RuntimeOptions

    classifier = ModalityClassifier(
        normalized=True, runtime=RuntimeOptions(models_dir=store / "models", device="cpu", quiet=True)
    )
    request, runner, options = classifier._prepared
    _, stats = segment_source(read_source(shared_data / name), request, runner, None, options)
    assert list(stats) == list(theirs["statistics"])
    for structure, values in theirs["statistics"].items():
        for key in ("volume", "intensity"):
            assert stats[structure][key] == pytest.approx(values[key], rel=STATISTICS_RTOL, abs=1e-6), (structure, key)
    found = [s for s in REGION_FEATURE_STRUCTURES if stats[s]["volume"] > 0]
    assert len(found) >= 4, f"too few regions found to prove anything: {found}"
    features = [stats[s]["intensity"] for s in REGION_FEATURE_STRUCTURES]
    np.testing.assert_allclose(features, [theirs["statistics"][s]["intensity"] for s in REGION_FEATURE_STRUCTURES],
                               atol=1e-3)
    assert json.loads(output.read_text()) == theirs["result"]
    print(f"{name}: regions {found}; tsrt {json.loads(output.read_text())} | official {theirs['result']}")


def test_cli_cohort_from_a_list(modality_home: Path, shared_data: Path, tmp_path: Path) -> None:
    listing = tmp_path / "cases.txt"
    listing.write_text(f"{shared_data / 'example_ct_sm.nii.gz'}\n# a comment\n{shared_data / 'example_mr_sm.nii.gz'}\n")
    output = tmp_path / "out"
    result = tsrt_cli("modality", str(listing), "-o", str(output), "-q", home=modality_home)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "2 classified" in result.output
    for case in ("example_ct_sm", "example_mr_sm"):
        written = json.loads((output / case / "modality.json").read_text())
        assert set(written) == {"modality", "probability"} and written["modality"] in {"ct", "mr"}
    again = tsrt_cli("modality", str(listing), "-o", str(output), "-q", home=modality_home)
    assert "2 already done" in again.output


def test_tampered_classifier_and_missing_store_are_one_line(
    modality_home: Path, shared_data: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(modality_home, home)
    classifier = home / "models" / "resources" / "modality" / "intensity_fold_0.json"
    classifier.write_text(classifier.read_text().replace('"base_score":"', '"base_score":"1', 1))
    cases = (("tampered", home, "checksum"), ("missing", tmp_path / "empty", "tsrt models import modality"))
    for what, tsrt_home, needle in cases:
        output = tmp_path / f"{what}.json"
        done = tsrt_process("modality", str(shared_data / "example_ct_sm.nii.gz"), "-o", str(output), home=tsrt_home)
        assert done.returncode != 0, what
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tsrt: error:") and needle in lines[0], (what, lines)
        assert not output.exists()
