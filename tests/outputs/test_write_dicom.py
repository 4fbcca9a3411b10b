"""DICOM outputs (--output_type dicom_seg / dicom_rtstruct) and --save_probabilities for TotalSegmentator tasks.

On the real DICOM series of TotalSegmentator's test suite (../shared/data/example_ct_dicom):
tsrt's DICOM SEG and RTSTRUCT are read back (pydicom, highdicom, rt-utils) and each segment / ROI is
compared with tsrt's own NIfTI label map of the same run, sampled at the DICOM pixel centres by an
independent nearest-voxel lookup; then against official TotalSegmentator's files for the same input
and weights (a subprocess, confident fixture weights when the demo model exists): same segment
labels, codes and colours, same frames and mask voxels. --save_probabilities is compared with
TotalSegmentator's .npz/.pkl on a small crop of example_ct_sm.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from tsrt.errors import InputError, OutputError, TsrtError
from tsrt.pipeline.read import read_image
from tsrt.outputs.dicom import (
    AlgorithmIdentity,
    dicom_output_paths,
    load_source_series,
    normalize_output_types,
    write_dicom_seg,
    write_rtstruct,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SERIES = "example_ct_dicom"
#: Confident weights: the official comparison must be this close (as tests/test_totalseg_parity.py).
CONFIDENT_MIN_AGREEMENT = 0.9995
CONFIDENT_MIN_DICE = 0.999
RANDOM_MIN_AGREEMENT = 0.995
#: Contours are lossy (holes, pixel-edge rounding): rasterised ROIs against the label map they came from.
RTSTRUCT_MIN_DICE = 0.98
#: highdicom and TotalSegmentator convert RGB to CIELab with slightly different formulas (DICOM units of 65535).
CIELAB_TOLERANCE = 16
#: The model that "made" the hand-drawn label maps below, as the task layer names it.
ALGORITHM = AlgorithmIdentity(
    "TotalSegmentator", "2.18.0", {"task": "total", "mode": "fast", "models": "Dataset297_TotalSegmentator_total_3mm"}
)


def _sorted_slices(folder: Path) -> list[pydicom.Dataset]:
    """The series' datasets along the slice normal; blank SOPInstanceUIDs taken from the file meta (as tsrt does)."""
    datasets = []
    for path in sorted(folder.iterdir()):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        if not dataset.SOPInstanceUID:
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
        datasets.append(dataset)
    normal = np.cross(*np.reshape([float(v) for v in datasets[0].ImageOrientationPatient], (2, 3)))
    return sorted(datasets, key=lambda d: float(normal @ np.array(d.ImagePositionPatient, dtype=float)))


def _labels_at_pixels(labels: np.ndarray, affine: np.ndarray, dataset: pydicom.Dataset) -> np.ndarray:
    """The label map (NIfTI grid, RAS affine) at the centres of one slice's pixels: (rows, columns)."""
    orientation = np.array(dataset.ImageOrientationPatient, dtype=float)
    position = np.array(dataset.ImagePositionPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    rows, columns = np.mgrid[0 : int(dataset.Rows), 0 : int(dataset.Columns)]
    lps = (
        position[:, None, None]
        + orientation[:3, None, None] * columns * column_spacing
        + orientation[3:, None, None] * rows * row_spacing
    )
    ras = lps * np.array([-1.0, -1.0, 1.0])[:, None, None]
    inverse = np.linalg.inv(affine)
    voxel = np.einsum("ab,bxy->axy", inverse[:3, :3], ras) + inverse[:3, 3, None, None]
    index = np.rint(voxel).astype(int)
    assert np.abs(voxel - index).max() < 0.01, "the DICOM pixels are not voxel centres of the label map"
    return labels[index[0], index[1], index[2]]


def _seg_frames(path: Path, slices: list[pydicom.Dataset]) -> dict[str, np.ndarray]:
    """A DICOM SEG's segments as (slices, rows, columns) masks, frames placed by their plane position."""
    seg = pydicom.dcmread(path)
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in slices])
    masks = {name: np.zeros((len(slices), int(seg.Rows), int(seg.Columns)), bool) for name in names.values()}
    for frame, groups in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        number = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = np.array([float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient])
        (index,) = np.flatnonzero(np.abs(positions - position).max(axis=1) < 1e-3)
        masks[names[number]][index] |= frame.astype(bool)
    return masks


def _rasterised_rois(path: Path, slices: list[pydicom.Dataset]) -> dict[str, np.ndarray]:
    """An RTSTRUCT's ROIs filled back into (slices, rows, columns) masks, contours placed by their z."""
    from rt_utils import image_helper

    structure = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in structure.StructureSetROISequence}
    to_pixels = image_helper.get_patient_to_pixel_transformation_matrix(slices)
    z = np.array([float(d.ImagePositionPatient[2]) for d in slices])
    masks = {}
    for roi in structure.ROIContourSequence:
        contours: dict[int, list] = {}
        for contour in getattr(roi, "ContourSequence", []):
            index = int(np.argmin(np.abs(z - float(contour.ContourData[2]))))
            contours.setdefault(index, []).append(contour.ContourData)
        mask = np.zeros((len(slices), int(slices[0].Rows), int(slices[0].Columns)), bool)
        for index, data in contours.items():
            mask[index] = image_helper.get_slice_mask_from_slice_contour_data(slices[index], data, to_pixels) > 0
        masks[names[int(roi.ReferencedROINumber)]] = mask
    return masks


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


# --------------------------------------------------------------------------------------------- no models


def test_dicom_codes_are_those_of_the_installed_totalsegmentator() -> None:
    pytest.importorskip("totalsegmentator", reason="the codes are generated from TotalSegmentator (dev environment)")
    from tsrt_export.generate_dicom_codes import OUTPUT, generate

    assert OUTPUT.read_text() == generate(), "run: python -m tsrt_export.generate_dicom_codes"


def test_output_types_are_read_like_totalsegmentator() -> None:
    assert normalize_output_types("nifti") == ("nifti",)
    assert normalize_output_types(["nifti,dicom_seg", "dicom"]) == ("nifti", "dicom_seg", "dicom_rtstruct")
    with pytest.raises(TsrtError, match="Unknown output type 'png'"):
        normalize_output_types(["nifti", "png"])


def test_output_files_are_named_like_totalsegmentator(tmp_path: Path) -> None:
    assert dicom_output_paths(tmp_path / "seg.dcm", ["dicom_seg"], "total") == {"dicom_seg": tmp_path / "seg.dcm"}
    assert dicom_output_paths(tmp_path, ["dicom_seg"], "total") == {"dicom_seg": tmp_path}  # <SeriesUID>.dcm inside
    assert dicom_output_paths(tmp_path / "rt", ["dicom_rtstruct"], "total") == {"dicom_rtstruct": tmp_path / "rt.dcm"}
    with pytest.raises(OutputError, match="is a folder"):
        dicom_output_paths(tmp_path, ["dicom_rtstruct"], "total")
    several = ["nifti", "dicom_seg", "dicom_rtstruct"]
    assert dicom_output_paths(tmp_path / "out.nii.gz", several, "total") == {
        "nifti": tmp_path / "out.nii.gz", "dicom_seg": tmp_path / "out_seg.dcm",
        "dicom_rtstruct": tmp_path / "out_rtstruct.dcm",
    }
    assert dicom_output_paths(tmp_path, several[1:], "body")["dicom_seg"] == tmp_path / "body_segmentation_seg.dcm"


@pytest.fixture(scope="module")
def series_zip(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("zip") / "series.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted((shared_data / SERIES).iterdir()):
            archive.write(file, f"study/{file.name}")
    return path


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "zip"])
def test_each_source_slice_shows_its_own_pixels_on_the_volume(
    shared_data: Path, series_zip: Path, packed: bool
) -> None:
    """The slice -> voxel-grid mapping the DICOM writers use, checked against each file's pixel data (HU)."""
    folder = shared_data / SERIES
    source = series_zip if packed else folder
    image = read_image(source)
    series = load_source_series(source, image)
    assert len(series) == image.spatial_shape[2] == len(list(folder.iterdir()))
    by_uid = {
        d.file_meta.MediaStorageSOPInstanceUID: d for d in (pydicom.dcmread(p) for p in sorted(folder.iterdir()))
    }
    for placed in series:
        dataset = by_uid[placed.dataset.SOPInstanceUID]
        hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        np.testing.assert_array_equal(placed.frame(image.array), hounsfield)


def test_written_segments_and_rois_hold_the_label_map(shared_data: Path, tmp_path: Path) -> None:
    """A label map drawn from the CT itself (no model): every class present comes back voxel for voxel."""
    folder = shared_data / SERIES
    image = read_image(folder)
    labels = np.zeros(image.spatial_shape, np.uint8)
    labels[image.array > 200] = 3  # bone
    labels[(image.array > 20) & (image.array < 80)] = 5  # soft tissue
    labels[100:200, 150:300, 5:9] = 7  # a box
    label_map = {3: "vertebrae_L1", 5: "liver", 7: "not_a_totalsegmentator_class", 9: "spleen"}  # 9 absent
    series = load_source_series(folder, image)
    seg_path = write_dicom_seg(labels, label_map, series, tmp_path / "seg.dcm", algorithm=ALGORITHM)
    rt_path = write_rtstruct(labels, {7: "box"}, series, tmp_path / "rt.dcm", algorithm=ALGORITHM)

    slices = _sorted_slices(folder)
    expected = np.stack([_labels_at_pixels(labels, image.affine, d) for d in slices])
    segments = _seg_frames(seg_path, slices)
    assert list(segments) == ["vertebrae_L1", "liver", "not_a_totalsegmentator_class"]
    for label, name in label_map.items():
        if name in segments:
            np.testing.assert_array_equal(segments[name], expected == label, err_msg=name)
    seg = pydicom.dcmread(seg_path)
    liver, other = seg.SegmentSequence[1], seg.SegmentSequence[2]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    assert other.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"
    assert seg.SeriesNumber == 100 and liver.SegmentAlgorithmName == "TotalSegmentator"
    _assert_made_by_tsrt(seg, pydicom.dcmread(rt_path), task="total", mode="fast")

    import highdicom as hd

    # highdicom reads it back through the frames' references to the source images.
    read_back = hd.seg.segread(seg_path).get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in slices], segment_numbers=[2], combine_segments=True
    )
    np.testing.assert_array_equal(read_back.astype(bool), expected == 5)
    assert _dice(_rasterised_rois(rt_path, slices)["box"], expected == 7) == 1.0  # a box has no holes


def test_an_empty_label_map_writes_no_dicom_seg(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / SERIES
    image = read_image(folder)
    series = load_source_series(folder, image)
    labels = np.zeros(image.spatial_shape, np.uint8)
    with pytest.raises(OutputError, match="needs at least one segment"):
        write_dicom_seg(labels, {1: "spleen"}, series, tmp_path / "seg.dcm", algorithm=ALGORITHM)
    assert list(tmp_path.iterdir()) == []
    write_rtstruct(labels, {1: "spleen"}, series, tmp_path / "rt.dcm")  # an RTSTRUCT without ROIs, as upstream
    assert len(pydicom.dcmread(tmp_path / "rt.dcm").StructureSetROISequence) == 0


def _assert_made_by_tsrt(
    seg: pydicom.Dataset, rtstruct: pydicom.Dataset, *, task: str, mode: str, version: str = "2.18.0"
) -> None:
    """Both files name tsrt (and its version) as their maker and the task's model as the algorithm."""
    from tsrt.version import __version__

    for dataset in (seg, rtstruct):
        assert (dataset.Manufacturer, dataset.SoftwareVersions) == ("tsrt", __version__)
    for segment in seg.SegmentSequence:
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmSource) == ("TotalSegmentator", f"tsrt {__version__}")
        assert algorithm.AlgorithmVersion == version
        parameters = dict(item.split("=", 1) for item in algorithm.AlgorithmParameters.split(","))
        assert (parameters["task"], parameters["mode"]) == (task, mode)
        assert parameters["models"].startswith("Dataset")
    for roi in rtstruct.StructureSetROISequence:
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIGenerationDescription.startswith("TotalSegmentator ") and f"tsrt {__version__}" in (
            roi.ROIGenerationDescription
        )


def _main(*args: str, home: Path, prelude: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "TSRT_HOME": str(home), "PYTHONUTF8": "1"}
    return subprocess.run(
        [sys.executable, "-c", f"{prelude}from tsrt.cli.root import main; main()", *args],
        capture_output=True, text=True, encoding="utf-8", errors="replace", env=env,
    )


def test_nifti_input_with_a_dicom_output_type_is_refused_in_one_line(shared_data: Path, tmp_path: Path) -> None:
    result = _main(
        "-i", str(shared_data / "example_ct_sm.nii.gz"), "-o", str(tmp_path / "seg.dcm"), "--fast", "-ot", "dicom_seg",
        home=tmp_path / "home",
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == InputError.exit_code and len(lines) == 1, result.stderr
    assert "needs a DICOM series as input" in lines[0] and "--output_type nifti" in lines[0]
    assert not (tmp_path / "seg.dcm").exists()


def test_without_the_dicom_extra_one_line_names_the_install(shared_data: Path, tmp_path: Path) -> None:
    result = _main(
        "-i", str(shared_data / SERIES), "-o", str(tmp_path / "seg.dcm"), "--fast", "-ot", "dicom_seg",
        home=tmp_path / "home", prelude="import sys; sys.modules['highdicom'] = None; ",  # as if not installed
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "pip install 'tsrt[dicom]'" in lines[0] and "highdicom" in lines[0]


def test_dicom_outputs_and_probabilities_take_one_image_not_a_cohort(shared_data: Path, tmp_path: Path) -> None:
    cohort = tmp_path / "cases"
    cohort.mkdir()
    (cohort / "a.nii.gz").symlink_to(shared_data / "example_ct_sm.nii.gz")
    for flags, message in ((("-ot", "nifti", "dicom_seg"), "--output_type dicom_seg works on one image"),
                           (("-sp", str(tmp_path / "p.npz")), "--save_probabilities works on one image")):
        result = _main("-i", str(cohort), "-o", str(tmp_path / "out"), "--fast", *flags, home=tmp_path / "home")
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr


# --------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def demo_weights() -> Path | None:
    from tsrt_export.fixtures import find_demo_checkpoint

    return find_demo_checkpoint(REPO_ROOT)


@pytest.fixture(scope="module")
def ts_home(tmp_path_factory: pytest.TempPathFactory, demo_weights: Path | None) -> Path:
    pytest.importorskip("totalsegmentator", reason="the comparison needs official TotalSegmentator (dev environment)")
    from tsrt_export.fixtures import write_totalseg_home

    return write_totalseg_home(tmp_path_factory.mktemp("ts_home"), ("total_fast",), source_checkpoint=demo_weights)


@pytest.fixture(scope="module")
def crop(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small crop of example_ct_sm: probabilities of 118 classes stay a few MB."""
    path = tmp_path_factory.mktemp("crop") / "ct_crop.nii.gz"
    nib.save(nib.load(shared_data / "example_ct_sm.nii.gz").slicer[30:78, 25:65, :], path)
    return path


_OFFICIAL_BODY = """
def main():
    jobs = json.loads(Path(sys.argv[1]).read_text())
    sequential_nnunet()
    from totalsegmentator.python_api import totalsegmentator

    for job in jobs:
        if "save_probabilities" in job:
            job["save_probabilities"] = Path(job["save_probabilities"])
        totalsegmentator(device="cpu", quiet=True, nr_thr_saving=1, fast=True, **job)
    return "ok"
"""


@pytest.fixture(scope="module")
def official(ts_home: Path, shared_data: Path, crop: Path, tmp_path_factory: pytest.TempPathFactory):
    """Official TotalSegmentator, started now (`_official_outputs` waits): the DICOM outputs and the probabilities."""
    import json

    try:
        import totalseg_official
    except ModuleNotFoundError:  # the shared runner (tests/totalseg_official.py); tsrt's own checks still run
        yield None
        return
    work = tmp_path_factory.mktemp("official")
    jobs = [
        {"input": str(shared_data / SERIES), "output": str(work / "seg"),
         "output_type": ["nifti", "dicom_seg", "dicom_rtstruct"]},
        {"input": str(crop), "output": str(work / "crop.nii.gz"), "ml": True,
         "save_probabilities": str(work / "probabilities.npz")},
    ]
    (work / "jobs.json").write_text(json.dumps(jobs))
    process = totalseg_official.start_official(_OFFICIAL_BODY, work, str(work / "jobs.json"), home=ts_home)
    yield work, process
    process.kill()


def _official_outputs(official) -> Path:
    """The official run's folder once it has finished."""
    if official is None:
        pytest.skip("tests/totalseg_official.py (runs official TotalSegmentator) is missing")
    work, process = official
    process.result()
    return work


def _cli(*args: str, env: dict[str, str]):
    from tsrt.cli.root import app, totalsegmentator_argv

    return CliRunner().invoke(app, totalsegmentator_argv(list(args)), env=env, catch_exceptions=True)


@pytest.fixture(scope="module")
def tsrt_outputs(
    ts_home: Path, official, shared_data: Path, crop: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """`tsrt models import` + `tsrt segment` with TotalSegmentator's spellings, while the official run goes on."""
    pytest.importorskip("nnunetv2", reason="importing models needs the export extra")
    home, work = tmp_path_factory.mktemp("tsrt_home"), tmp_path_factory.mktemp("tsrt")
    env = {"TSRT_HOME": str(home)}
    calls = [
        ("models", "import", "total", "--fast", "--totalseg-home", str(ts_home), "-q"),
        ("-i", str(shared_data / SERIES), "-o", str(work / "seg"), "--fast", "-ot", "nifti", "dicom_seg",
         "dicom_rtstruct", "-d", "cpu", "-q"),
        ("-i", str(crop), "-o", str(work / "crop.nii.gz"), "--ml", "--fast", "-sp", str(work / "probabilities.npz"),
         "-d", "cpu", "-q"),
    ]
    for args in calls:
        result = _cli(*args, env=env)
        assert result.exit_code == 0, (args, result.output, result.exception)
    return work


@pytest.mark.slow
def test_dicom_seg_and_rtstruct_hold_tsrts_own_label_map(tsrt_outputs: Path, shared_data: Path) -> None:
    nifti = nib.load(tsrt_outputs / "seg.nii.gz")
    from tsrt.pipeline.label_table import read_label_table

    names = read_label_table(nifti)
    slices = _sorted_slices(shared_data / SERIES)
    labels = np.asanyarray(nifti.dataobj)
    expected = np.stack([_labels_at_pixels(labels, nifti.affine, d) for d in slices])
    present = [names[label] for label in sorted(set(np.unique(labels).tolist()) - {0})]
    assert present, "the run segmented nothing: the comparison would prove nothing"
    inverse = {name: label for label, name in names.items()}

    segments = _seg_frames(tsrt_outputs / "seg_seg.dcm", slices)
    assert list(segments) == present
    for name, mask in segments.items():
        np.testing.assert_array_equal(mask, expected == inverse[name], err_msg=name)

    rois = _rasterised_rois(tsrt_outputs / "seg_rtstruct.dcm", slices)
    assert list(rois) == present
    for name, mask in rois.items():
        dice = _dice(mask, expected == inverse[name])
        print(f"RTSTRUCT {name}: Dice {dice:.5f} against tsrt's label map")
        assert dice >= RTSTRUCT_MIN_DICE, (name, dice)

    from tsrt.models.registry import load_registry

    seg, rtstruct = (pydicom.dcmread(tsrt_outputs / name) for name in ("seg_seg.dcm", "seg_rtstruct.dcm"))
    _assert_made_by_tsrt(seg, rtstruct, task="total", mode="fast", version=load_registry().totalsegmentator_version)
    manifest = json.loads((tsrt_outputs / "seg.tsrt.json").read_text())  # -o seg: beside the three files
    assert manifest["outputs"] == ["seg.nii.gz", "seg_rtstruct.dcm", "seg_seg.dcm"]
    assert manifest["input"]["kind"] == "dicom_folder" and manifest["request"]["options"]["output_type"] == [
        "nifti", "dicom_seg", "dicom_rtstruct"
    ]


def _agreement(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> tuple[float, float]:
    """(share of equal pixels of the combined label maps, mean Dice over the classes)."""
    names = list(theirs)
    shape = next(iter(theirs.values())).shape
    combined = [np.zeros(shape, np.uint16), np.zeros(shape, np.uint16)]
    for index, name in enumerate(names, start=1):
        combined[0][theirs[name]] = index
        combined[1][ours[name]] = index
    return float(np.mean(combined[0] == combined[1])), float(np.mean([_dice(ours[n], theirs[n]) for n in names]))


def _check_agreement(what: str, agreement: float, dice: float, confident: bool) -> None:
    print(f"{what}: agreement {agreement:.6f}, mean Dice {dice:.6f} ({'confident' if confident else 'random'} weights)")
    if confident:
        assert agreement >= CONFIDENT_MIN_AGREEMENT and dice >= CONFIDENT_MIN_DICE, (what, agreement, dice)
    else:
        assert agreement >= RANDOM_MIN_AGREEMENT, (what, agreement, dice)


@pytest.mark.slow
def test_dicom_seg_matches_totalsegmentator(tsrt_outputs: Path, official, shared_data: Path, demo_weights) -> None:
    work = _official_outputs(official)
    slices = _sorted_slices(shared_data / SERIES)
    ours, theirs = _seg_frames(tsrt_outputs / "seg_seg.dcm", slices), _seg_frames(work / "seg_seg.dcm", slices)
    assert list(ours) == list(theirs) and theirs, "segment labels (and their order) differ"
    _check_agreement("DICOM SEG", *_agreement(ours, theirs), demo_weights is not None)

    our_seg, their_seg = pydicom.dcmread(tsrt_outputs / "seg_seg.dcm"), pydicom.dcmread(work / "seg_seg.dcm")
    assert our_seg.SeriesNumber == their_seg.SeriesNumber
    for mine, upstream in zip(our_seg.SegmentSequence, their_seg.SegmentSequence):
        for sequence in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence"):
            assert getattr(mine, sequence)[0].CodeValue == getattr(upstream, sequence)[0].CodeValue
        assert mine.SegmentAlgorithmType == upstream.SegmentAlgorithmType
        ours_algorithm, their_algorithm = (s.SegmentationAlgorithmIdentificationSequence[0] for s in (mine, upstream))
        assert ours_algorithm.AlgorithmName == their_algorithm.AlgorithmName
        assert ours_algorithm.AlgorithmVersion == their_algorithm.AlgorithmVersion
        difference = np.abs(np.subtract(mine.RecommendedDisplayCIELabValue, upstream.RecommendedDisplayCIELabValue))
        assert difference.max() <= CIELAB_TOLERANCE, (mine.SegmentLabel, difference)


@pytest.mark.slow
def test_rtstruct_matches_totalsegmentator(tsrt_outputs: Path, official, shared_data: Path, demo_weights) -> None:
    work = _official_outputs(official)
    slices = _sorted_slices(shared_data / SERIES)
    ours = _rasterised_rois(tsrt_outputs / "seg_rtstruct.dcm", slices)
    theirs = _rasterised_rois(work / "seg_rtstruct.dcm", slices)
    assert list(ours) == list(theirs) and theirs, "ROI names (and their order) differ"
    _check_agreement("RTSTRUCT (rasterised)", *_agreement(ours, theirs), demo_weights is not None)
    our_rois, their_rois = (pydicom.dcmread(p).ROIContourSequence for p in (tsrt_outputs / "seg_rtstruct.dcm",
                                                                           work / "seg_rtstruct.dcm"))
    colours = [[list(map(int, r.ROIDisplayColor)) for r in rois] for rois in (our_rois, their_rois)]
    assert colours[0] == colours[1]
    nifti_ours, nifti_theirs = nib.load(tsrt_outputs / "seg.nii.gz"), nib.load(work / "seg.nii.gz")
    agreement = float(np.mean(np.asanyarray(nifti_ours.dataobj) == np.asanyarray(nifti_theirs.dataobj)))
    print(f"multilabel NIfTI beside the DICOM files: agreement {agreement:.6f}")


@pytest.mark.slow
def test_probabilities_match_totalsegmentator(tsrt_outputs: Path, official, demo_weights) -> None:
    """--save_probabilities: nnU-Net's export (.npz + .pkl) of the model's input grid, as upstream writes it."""
    work = _official_outputs(official)
    ours = np.load(tsrt_outputs / "probabilities.npz")["probabilities"]
    theirs = np.load(work / "probabilities.npz")["probabilities"]
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
    difference = np.abs(ours - theirs)
    argmax = float(np.mean(ours.argmax(0) == theirs.argmax(0)))
    print(
        f"probabilities: max |difference| {difference.max():.2e}, mean {difference.mean():.2e}, "
        f"argmax agreement {argmax:.6f}"
    )
    assert difference.mean() < 1e-3 and (demo_weights is None or difference.max() < 0.05)
    with open(tsrt_outputs / "probabilities.pkl", "rb") as mine, open(work / "probabilities.pkl", "rb") as upstream:
        our_properties, their_properties = pickle.load(mine), pickle.load(upstream)
    assert set(our_properties) == set(their_properties)
    for key, value in their_properties.items():
        if key == "sitk_stuff":
            for field, expected in value.items():
                np.testing.assert_allclose(our_properties[key][field], expected, atol=1e-5, err_msg=field)
        else:
            assert np.array_equal(np.asarray(our_properties[key]), np.asarray(value)), key
