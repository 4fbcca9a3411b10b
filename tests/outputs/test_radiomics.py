"""`--radiomics` against TotalSegmentator's `get_radiomics_features_for_entire_dir`, same masks and image.

The official function lives in totalsegmentator.statistics, a plain module (numpy, nibabel, its
class tables; nothing that patches nnU-Net), so it runs in this process. Both sides use the
installed PyRadiomics (the radiomics extra); what is compared is TotalSegmentator's recipe - settings,
feature classes, key names, rounding, the zero entries for empty masks - and tsrt's file handling.

- Same masks: per-class masks cut from TotalSegmentator's own reference segmentation of
  example_ct_sm (real weights), plus an empty one: every feature equal within 1e-6 relative.
- End to end: `tsrt segment --fast --radiomics` on confident fixture weights, NIfTI and DICOM input;
  the official function on the masks tsrt wrote (and, for DICOM, on TotalSegmentator's dicom2nifti
  conversion of the series, in the series' integer type) gives the same JSON.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from totalseg_official import tsrt_cli

pytest.importorskip("radiomics", reason="--radiomics needs the radiomics extra (PyRadiomics)")

REPO_ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-6
#: Reference classes cut into mask files: large and small organs, a vessel and bone.
CLASSES = ("liver", "spleen", "kidney_right", "aorta", "vertebrae_L1", "gallbladder")


def _official_radiomics(image: Path, mask_folder: Path, output: Path) -> dict:
    pytest.importorskip("totalsegmentator", reason="the oracle is official TotalSegmentator (dev environment)")
    from totalsegmentator.statistics import get_radiomics_features_for_entire_dir

    get_radiomics_features_for_entire_dir(image, mask_folder, output)
    return json.loads(output.read_text())


def _assert_same_features(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for mask, features in theirs.items():
        assert list(ours[mask]) == list(features), mask
        for name, value in features.items():
            if np.isnan(value):  # PyRadiomics' NaN (e.g. a one-voxel mask) is written as NaN by both
                assert np.isnan(ours[mask][name]), (mask, name)
                continue
            assert ours[mask][name] == pytest.approx(value, rel=RTOL, abs=1e-12), (mask, name)


@pytest.fixture(scope="module")
def reference_masks(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tsrt.pipeline.label_table import read_label_table

    folder = tmp_path_factory.mktemp("reference_masks")
    seg = nib.load(shared_data / "example_seg_fast.nii.gz")
    labels = np.asanyarray(seg.dataobj)
    by_name = {name: label for label, name in read_label_table(seg).items()}
    for name in CLASSES:
        mask = (labels == by_name[name]).astype(np.uint8)
        assert mask.any(), name
        nib.save(nib.Nifti1Image(mask, seg.affine), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(labels.shape, np.uint8), seg.affine), folder / "brain.nii.gz")
    return folder


def test_same_features_as_official_on_the_same_masks(reference_masks: Path, shared_data: Path, tmp_path: Path) -> None:
    from tsrt.outputs.radiomics_features import STANDARD_FEATURES, write_radiomics

    image = shared_data / "example_ct_sm.nii.gz"
    theirs = _official_radiomics(image, reference_masks, tmp_path / "official.json")
    ours_path = write_radiomics(image, reference_masks, tmp_path / "statistics_radiomics.json")
    ours = json.loads(ours_path.read_text())
    _assert_same_features(ours, theirs)
    assert list(ours["brain"]) == list(STANDARD_FEATURES) and not any(ours["brain"].values())
    assert len(ours["liver"]) == 32 and ours["liver"]["shape_VoxelVolume"] > 1e5  # shape + first order, real values



def test_radiomics_with_multilabel_output_is_refused(tmp_path: Path, shared_data: Path) -> None:
    output = tmp_path / "seg.nii.gz"
    result = tsrt_cli("segment", str(shared_data / "example_ct_sm.nii.gz"), "-o", str(output), "--ml", "--radiomics",
                  home=tmp_path / "home")
    assert result.exit_code != 0 and "--ml" in str(result.exception)
    assert not output.exists() and not (tmp_path / "statistics_radiomics.json").exists()


def test_missing_pyradiomics_is_one_line_before_any_work(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tsrt.errors import TsrtError
    from tsrt.totalseg.task import segment

    monkeypatch.setitem(sys.modules, "radiomics", None)  # as if the extra were not installed
    output = tmp_path / "masks"
    with pytest.raises(TsrtError) as raised:
        # No models in this store either: the PyRadiomics check must come first, before any segmentation.
        segment(shared_data / "example_ct_sm.nii.gz", output, fast=True, radiomics=True, models_dir=tmp_path / "none")
    message = str(raised.value)
    assert "\n" not in message and "pip install 'tsrt[radiomics]'" in message
    assert not output.exists()


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def fast_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("nnunetv2", reason="the fixture models need the export extra")
    from tsrt_export.fixtures import find_demo_checkpoint, write_totalseg_home

    checkpoint = find_demo_checkpoint(REPO_ROOT)
    if checkpoint is None:
        pytest.skip("needs confident weights (the trained demo checkpoint) so that masks are not noise")
    ts_home = write_totalseg_home(tmp_path_factory.mktemp("radiomics_ts_home"), ("total_fast",),
                                  source_checkpoint=checkpoint)
    home = tmp_path_factory.mktemp("radiomics_store")
    result = tsrt_cli("models", "import", "total", "--fast", "--totalseg-home", str(ts_home), "-q", home=home)
    assert result.exit_code == 0, (result.output, result.exception)
    return home


@pytest.fixture(scope="module")
def dicom_series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DICOM series of a crop of example_ct_sm: 117 masks of the full 512x512 example series take minutes."""
    from totalseg_official import write_dicom_series

    folder = tmp_path_factory.mktemp("radiomics_dicom")
    nib.save(nib.load(shared_data / "example_ct_sm.nii.gz").slicer[20:100, 10:90, :], folder / "crop.nii.gz")
    return write_dicom_series(folder / "crop.nii.gz", folder / "series")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nifti", "dicom"])
def test_segment_radiomics_end_to_end(
    kind: str, fast_store: Path, shared_data: Path, dicom_series: Path, tmp_path: Path
) -> None:
    source = shared_data / "example_ct_sm.nii.gz" if kind == "nifti" else dicom_series
    output = tmp_path / "masks"
    result = tsrt_cli("segment", str(source), "-o", str(output), "--fast", "--radiomics", "-q", "--device", "cpu",
                  home=fast_store)
    assert result.exit_code == 0, (result.output, result.exception)
    ours = json.loads((output / "statistics_radiomics.json").read_text())
    masks = sorted(p for p in output.glob("*.nii.gz"))
    assert len(ours) == len(masks) == 117
    image = source
    if kind == "dicom":
        # TotalSegmentator refuses DICOM here. Reference: its own conversion of the series (dicom2nifti), stored
        # in the series' integer type as tsrt reads it (dicom2nifti writes float64; PyRadiomics resamples in the
        # stored type, so that choice changes interpolated values).
        import dicom2nifti

        converted = tmp_path / "converted.nii.gz"
        dicom2nifti.dicom_series_to_nifti(str(source), str(converted), reorient_nifti=True)
        values = nib.load(converted).get_fdata()
        assert np.array_equal(values, np.round(values))
        image = tmp_path / "converted_int16.nii.gz"
        nib.save(nib.Nifti1Image(values.astype(np.int16), nib.load(converted).affine), image)
    mask_folder = tmp_path / "official_masks"
    shutil.copytree(output, mask_folder, ignore=shutil.ignore_patterns("*.json"))
    theirs = _official_radiomics(image, mask_folder, tmp_path / "official.json")
    _assert_same_features(ours, theirs)
    computed = [name for name, features in ours.items() if "shape_MeshVolume" in features and len(features) == 32]
    assert len(computed) >= 3, f"too few non-empty masks to prove anything: {computed}"


def test_a_failed_extraction_is_null_with_its_reason_never_zero(reference_masks: Path, shared_data: Path,
                                                                 tmp_path: Path) -> None:
    """PyRadiomics refuses a mask whose grid differs from the image's: that mask's features are null, with why."""
    from tsrt.outputs.radiomics_features import FAILURE_KEY, STANDARD_FEATURES, write_radiomics

    folder = tmp_path / "masks"
    shutil.copytree(reference_masks, folder)
    liver = nib.load(folder / "liver.nii.gz")
    shifted = liver.affine.copy()
    shifted[:3, 3] += 500.0  # half a metre away: no overlap with the image
    nib.save(nib.Nifti1Image(np.asanyarray(liver.dataobj), shifted), folder / "liver.nii.gz")
    written = json.loads(write_radiomics(shared_data / "example_ct_sm.nii.gz", folder).read_text())
    failed = written["liver"]
    assert all(failed[name] is None for name in STANDARD_FEATURES) and failed[FAILURE_KEY]
    assert written["spleen"]["shape_VoxelVolume"] > 0  # the other masks keep their real features
