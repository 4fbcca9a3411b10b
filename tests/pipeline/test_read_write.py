"""Read and write stages: geometry parity with nnU-Net's readers and TotalSegmentator's DICOM conversion,
header-preserving atomic label-map writes, and one actionable sentence for every bad input.

Oracles (dev venv only, never imported by tsrt): nnunetv2's SimpleITKIO / NibabelIO /
NibabelIOWithReorient, dicom2nifti called exactly as TotalSegmentator's dcm_to_nifti calls it,
SimpleITK's ImageSeriesReader, TotalSegmentator's load_multilabel_nifti.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from tsrt.errors import InputError, ModelError, OutputError
from tsrt.pipeline.read import Image, from_nnunet_array, read_channels, read_image, to_nnunet_array
from tsrt.pipeline.write import atomic_output, write_label_map, write_nifti

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared example data not found at {SHARED_DATA}")

READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")


def _rotation(z_deg: float, x_deg: float, y_deg: float) -> np.ndarray:
    def axis_rotation(axis: int, degrees: float) -> np.ndarray:
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        i, j = [a for a in range(3) if a != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m

    return axis_rotation(2, z_deg) @ axis_rotation(0, x_deg) @ axis_rotation(1, y_deg)


def _affine(rotation: np.ndarray, zooms: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


def _volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 2000, size=shape).astype(np.int16)


def _save(path: Path, data: np.ndarray, affine: np.ndarray, qform: np.ndarray | None = None,
          qform_code: int = 1, sform_code: int = 1, scaling: tuple[float, float] | None = None) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine if qform is None else qform, code=qform_code)
    image.header.set_sform(affine, code=sform_code)
    if scaling:
        image.header.set_slope_inter(*scaling)
    nib.save(image, path)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small NIfTI files covering the geometry cases real data rarely shows."""
    folder = tmp_path_factory.mktemp("synthetic")
    oblique = _affine(_rotation(30, 10, -5), (0.8, 0.9, 2.5), (10, -20, 30))
    lps_like = _affine(np.diag([-1.0, -1.0, 1.0]), (0.7, 0.7, 3.0), (120, 130, -40))
    # qform and sform disagree in rotation and origin (both valid, same voxel size): nibabel uses the sform.
    other_qform = _affine(np.diag([-1.0, 1.0, 1.0]), (0.8, 0.9, 2.5), (1, 2, 3))
    permuted = _affine(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]), (0.8, 0.9, 2.5), (5, 6, 7))
    return {
        "oblique": _save(folder / "oblique.nii.gz", _volume((9, 8, 7)), oblique),
        "qform_sform": _save(folder / "qform_sform.nii.gz", _volume((9, 8, 7), 1), oblique, qform=other_qform,
                             qform_code=1, sform_code=2),
        # pixdim (from a qform with code 0) disagrees with the sform's voxel sizes, and the sform permutes axes:
        # NibabelIO takes pixdim, NibabelIOWithReorient the reoriented sform's column lengths.
        "pixdim_mismatch": _save(folder / "pixdim_mismatch.nii.gz", _volume((9, 8, 7), 4), permuted,
                                 qform=np.diag([1.0, 1.2, 3.0, 1.0]), qform_code=0, sform_code=2),
        "scaled_lps": _save(folder / "scaled_lps.nii.gz", _volume((9, 8, 7), 2), lps_like, scaling=(0.37, -3.3)),
        "uncompressed": _save(folder / "plain.nii", _volume((6, 5, 4), 3).astype(np.float32), oblique),
    }


def _parity_files(synthetic: dict[str, Path]) -> dict[str, Path]:
    files = dict(synthetic)
    if SHARED_DATA.is_dir():
        files["example_ct"] = SHARED_DATA / "example_ct.nii.gz"
        files["example_mr_sm_lps"] = SHARED_DATA / "example_mr_sm.nii.gz"
    return files


def _nnunet_reader(name: str):
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return {"SimpleITKIO": SimpleITKIO, "NibabelIO": NibabelIO, "NibabelIOWithReorient": NibabelIOWithReorient}[name]()


# ------------------------------------------------------------------------------------ nnU-Net parity


@pytest.mark.parametrize("reader", READERS)
def test_to_nnunet_array_equals_nnunet_readers(synthetic: dict[str, Path], reader: str) -> None:
    checked = []
    for name, path in _parity_files(synthetic).items():
        expected, expected_props = _nnunet_reader(reader).read_images([str(path)])
        actual, props = to_nnunet_array(read_image(path), reader)
        assert actual.dtype == np.float32 and actual.flags["C_CONTIGUOUS"], name
        assert actual.shape == expected.shape and np.array_equal(actual, expected), name
        np.testing.assert_allclose(props["spacing"], expected_props["spacing"], rtol=0, atol=1e-6, err_msg=name)
        if reader == "SimpleITKIO":
            ours, theirs = props["sitk_stuff"], expected_props["sitk_stuff"]
            np.testing.assert_allclose(ours["spacing"], theirs["spacing"], atol=1e-6, err_msg=name)
            # ITK reads the qform when sform_code != 1 and qform_code > 0; nibabel (and tsrt) the sform.
            if name not in ("qform_sform", "pixdim_mismatch"):
                np.testing.assert_allclose(ours["origin"], theirs["origin"], atol=1e-4, err_msg=name)
                np.testing.assert_allclose(ours["direction"], theirs["direction"], atol=1e-6, err_msg=name)
        else:
            for key, value in expected_props["nibabel_stuff"].items():
                np.testing.assert_allclose(props["nibabel_stuff"][key], value, rtol=0, atol=1e-9, err_msg=name)
        checked.append(name)
    assert {"oblique", "qform_sform", "pixdim_mismatch", "scaled_lps"} <= set(checked)


def test_itk_and_nibabel_disagree_on_qform_sform_files(synthetic: dict[str, Path]) -> None:
    """Pins the surprise documented in tsrt.pipeline.read: for such files only the header copy keeps outputs aligned."""
    image = read_image(synthetic["qform_sform"])
    itk = sitk.ReadImage(str(synthetic["qform_sform"]))
    header = nib.load(synthetic["qform_sform"]).header
    assert np.allclose(image.affine, header.get_sform())
    assert np.allclose(itk.GetOrigin(), np.diag([-1, -1, 1]) @ header.get_qform()[:3, 3], atol=1e-4)
    assert not np.allclose(itk.GetOrigin(), image.origin, atol=1e-2)


@pytest.mark.parametrize("reader", READERS)
def test_from_nnunet_array_matches_nnunet_write_seg(synthetic: dict[str, Path], tmp_path: Path, reader: str) -> None:
    """A segmentation in reader space lands on the same voxels (and geometry) as nnU-Net's write_seg puts it."""
    for name in ("oblique", "scaled_lps"):
        path = synthetic[name]
        image = read_image(path)
        data, props = to_nnunet_array(image, reader)
        _, nnunet_props = _nnunet_reader(reader).read_images([str(path)])
        seg = np.random.default_rng(5).integers(0, 4, size=data.shape[1:]).astype(np.uint8)
        theirs = tmp_path / f"{name}_{reader}_nnunet.nii.gz"
        _nnunet_reader(reader).write_seg(seg, str(theirs), nnunet_props)
        ours = write_label_map(from_nnunet_array(seg, props), image, tmp_path / f"{name}_{reader}_tsrt.nii.gz")
        reference = nib.load(theirs)
        assert np.array_equal(np.asarray(nib.load(ours).dataobj), np.asarray(reference.dataobj)), (name, reader)
        np.testing.assert_allclose(nib.load(ours).affine, reference.affine, atol=1e-4)


def test_from_nnunet_array_round_trips_channels(synthetic: dict[str, Path]) -> None:
    image = read_channels([synthetic["oblique"], synthetic["oblique"]])
    for reader in READERS:
        data, props = to_nnunet_array(image, reader)
        assert data.shape[0] == 2
        assert np.array_equal(from_nnunet_array(data, props), image.array.astype(np.float32))


def test_read_channels_equals_nnunet_multichannel(synthetic: dict[str, Path], tmp_path: Path) -> None:
    second = _save(tmp_path / "ch1.nii.gz", _volume((9, 8, 7), 9), nib.load(synthetic["oblique"]).affine)
    paths = [synthetic["oblique"], second]
    image = read_channels(paths)
    assert image.array.shape == (2, 9, 8, 7)
    for reader in READERS:
        expected, expected_props = _nnunet_reader(reader).read_images([str(p) for p in paths])
        actual, props = to_nnunet_array(image, reader)
        assert np.array_equal(actual, expected)
        np.testing.assert_allclose(props["spacing"], expected_props["spacing"], atol=1e-6)


def test_read_channels_rejects_different_grids(synthetic: dict[str, Path], tmp_path: Path) -> None:
    shifted = nib.load(synthetic["oblique"]).affine.copy()
    shifted[:3, 3] += 5
    other = _save(tmp_path / "shifted.nii.gz", _volume((9, 8, 7)), shifted)
    with pytest.raises(InputError, match="does not share the voxel grid") as error:
        read_channels([synthetic["oblique"], other])
    _assert_actionable(error.value, "shifted.nii.gz")


def test_unknown_reader_is_a_model_error(synthetic: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="Tiff3DIO"):
        to_nnunet_array(read_image(synthetic["oblique"]), "Tiff3DIO")


def test_nifti_keeps_dtype_voxel_order_and_header(synthetic: dict[str, Path]) -> None:
    image = read_image(synthetic["oblique"])
    reference = nib.load(synthetic["oblique"])
    assert image.array.dtype == np.int16 and np.array_equal(image.array, reference.get_fdata())
    assert np.array_equal(image.affine, reference.affine) and image.header is not None
    assert image.spacing == pytest.approx((0.8, 0.9, 2.5), abs=1e-6)
    itk = sitk.ReadImage(str(synthetic["oblique"]))
    np.testing.assert_allclose(image.origin, itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.direction, itk.GetDirection(), atol=1e-6)
    plain = read_image(synthetic["uncompressed"])  # .nii is read into memory, not memory-mapped
    assert plain.array.dtype == np.float32 and not isinstance(plain.array, np.memmap)


# ------------------------------------------------------------------------------------ DICOM


def _write_dicom_series(folder: Path, volume: np.ndarray, rotation: np.ndarray, spacing: tuple[float, float, float],
                        origin: np.ndarray, series_uid: str, description: str, *, image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
                        skip: tuple[int, ...] = (), first_instance: int = 1) -> None:
    """One file per slice of `volume` (slice, row, column); rotation columns = row dir, column dir, normal (LPS).

    SimpleITK's DICOM writer (GDCM) switches the process to the C locale: it is put back afterwards, or later
    tests that decode a child's output with the default encoding would read ASCII.
    """
    import locale

    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(folder, volume, rotation, spacing, origin, series_uid, description, image_type, skip, first_instance)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


def _write_slices(folder: Path, volume: np.ndarray, rotation: np.ndarray, spacing: tuple[float, float, float],
                  origin: np.ndarray, series_uid: str, description: str, image_type: str, skip: tuple[int, ...],
                  first_instance: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    row_spacing, column_spacing, slice_spacing = spacing
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.10f}" for v in (*rotation[:, 0], *rotation[:, 1]))
    for index in range(volume.shape[0]):
        if index in skip:
            continue
        position = origin + index * slice_spacing * rotation[:, 2]
        slice_image = sitk.GetImageFromArray(volume[index])
        slice_image.SetSpacing((column_spacing, row_spacing))
        for tag, value in {
            "0008|0060": "CT", "0008|0008": image_type, "0020|000e": series_uid, "0008|103e": description,
            "0020|0011": series_uid.rsplit(".", 1)[-1], "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
            "0020|0052": "1.2.826.0.1.3680043.2.1125.8", "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.6f}" for v in position), "0020|0013": str(first_instance + index),
            "0008|0018": f"{series_uid}.{index + 1}", "0028|1052": "-1024", "0028|1053": "1",
        }.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{index * 37 % 101:03d}.dcm"))  # file order != slice order
        writer.Execute(slice_image)


def _dicom2nifti_like_totalsegmentator(folder: Path, out: Path) -> nib.Nifti1Image:
    """TotalSegmentator's dcm_to_nifti is exactly this call (asserted below); importing it would pull in torch."""
    import dicom2nifti

    dicom2nifti.dicom_series_to_nifti(str(folder), str(out), reorient_nifti=True)
    return nib.load(out)


def test_totalsegmentator_still_converts_dicom_with_dicom2nifti() -> None:
    spec = importlib.util.find_spec("totalsegmentator")
    assert spec is not None and spec.submodule_search_locations
    source = (Path(spec.submodule_search_locations[0]) / "dicom_io.py").read_text()
    assert "dicom2nifti.dicom_series_to_nifti(input_path, output_path, reorient_nifti=True)" in source


def _itk_reference(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK's ImageSeriesReader volume as (i,j,k) array + RAS affine, reoriented to closest canonical."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    volume = reader.Execute()
    array = sitk.GetArrayFromImage(volume).transpose(2, 1, 0)
    affine = np.eye(4)
    affine[:3, :3] = np.array(volume.GetDirection()).reshape(3, 3) * np.array(volume.GetSpacing())
    affine[:3, 3] = volume.GetOrigin()
    affine[:2] *= -1
    return _canonical(array, affine)


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ornt = io_orientation(affine)
    return apply_orientation(array, ornt), affine @ inv_ornt_aff(ornt, array.shape)


@pytest.fixture(scope="module")
def dicom_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dicom")
    axial = np.eye(3)
    # Oblique, voxel-size-dependent axis choice, and a sagittal stack whose normal points to -x.
    oblique = _rotation(20, 15, 0)
    # Sagittal: rows run to posterior, columns downwards, slices stacked towards the right (-x in LPS).
    sagittal = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    cases = {
        "axial": (axial, (0.7, 0.8, 2.0)),
        "oblique": (oblique, (0.6, 0.9, 3.0)),
        "sagittal": (sagittal, (1.1, 0.5, 1.5)),
        # 44 degrees with 4x anisotropic pixels: dicom2nifti's voxel-size-weighted axis choice clashes and
        # has to resolve it; a plain closest-axis rule would not exercise that path.
        "oblique_44_anisotropic": (_rotation(44, 0, 0), (0.5, 2.0, 3.0)),
    }
    for index, (name, (rotation, spacing)) in enumerate(cases.items()):
        _write_dicom_series(root / name, _volume((6, 12, 10), index), rotation, spacing,
                            np.array([-100.0, 50.0, 20.0]), f"1.2.826.0.1.3680043.2.1125.1.{index + 1}", name)
    return {name: root / name for name in cases}


@pytest.mark.parametrize("case", ["axial", "oblique", "sagittal", "oblique_44_anisotropic"])
def test_dicom_matches_totalsegmentator_conversion_and_itk(dicom_cases: dict[str, Path], tmp_path: Path, case: str) -> None:
    folder = dicom_cases[case]
    image = read_image(folder)
    converted = _dicom2nifti_like_totalsegmentator(folder, tmp_path / "converted.nii.gz")
    assert image.array.shape == converted.shape
    assert np.array_equal(image.array, converted.get_fdata())
    assert np.array_equal(image.affine, converted.affine)
    assert image.spacing == converted.header.get_zooms()
    itk_array, itk_affine = _itk_reference(folder)
    ours_array, ours_affine = _canonical(image.array, image.affine)
    assert np.array_equal(ours_array, itk_array)
    np.testing.assert_allclose(ours_affine, itk_affine, atol=1e-4)


@needs_data
@pytest.mark.slow  # decodes 20 JPEG 2000 slices twice (tsrt and dicom2nifti): ~3 s on an idle machine
def test_example_ct_dicom_matches_totalsegmentator_conversion(tmp_path: Path) -> None:
    folder = SHARED_DATA / "example_ct_dicom"
    image = read_image(folder)
    converted = _dicom2nifti_like_totalsegmentator(folder, tmp_path / "converted.nii.gz")
    assert image.array.dtype == np.int16  # dicom2nifti/pydicom give float64 with the same values
    assert np.array_equal(image.array, converted.get_fdata())
    assert np.array_equal(image.affine, converted.affine)
    assert image.header is not None and image.header.get_sform(coded=True)[1] == converted.header["sform_code"]
    # TotalSegmentator's reference segmentation of this DICOM lives on exactly this grid.
    reference_seg = nib.load(SHARED_DATA / "example_seg_dicom.nii.gz")
    assert reference_seg.shape == image.spatial_shape and np.allclose(reference_seg.affine, image.affine, atol=1e-4)


def test_dicom_zip_equals_folder(dicom_cases: dict[str, Path], tmp_path: Path) -> None:
    archive = tmp_path / "scan.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in sorted(dicom_cases["oblique"].iterdir()):
            zipped.write(file, f"export/DICOM/{file.name}")
    from_zip, from_folder = read_image(archive), read_image(dicom_cases["oblique"])
    assert np.array_equal(from_zip.array, from_folder.array) and np.array_equal(from_zip.affine, from_folder.affine)
    assert from_zip.source == str(archive)


def test_dicom_localizer_series_is_ignored(dicom_cases: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "with_scout"
    _write_dicom_series(folder / "ct", _volume((6, 12, 10), 0), np.eye(3), (0.7, 0.8, 2.0),
                        np.array([-100.0, 50.0, 20.0]), "1.2.826.0.1.3680043.2.1125.1.1", "axial")
    coronal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    _write_dicom_series(folder / "scout", _volume((1, 12, 10), 7), coronal, (1.0, 1.0, 1.0), np.zeros(3),
                        "1.2.826.0.1.3680043.2.1125.1.9", "topogram", image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    (folder / "notes.txt").write_text("not a DICOM file")
    image, plain = read_image(folder), read_image(dicom_cases["axial"])
    assert np.array_equal(image.array, plain.array) and np.array_equal(image.affine, plain.affine)


# ------------------------------------------------------------------------------------ bad input


def _assert_actionable(error: Exception, *fragments: str) -> None:
    """One line, one sentence (a '; ' joins what is wrong to what to do), ending in a full stop."""
    message = str(error)
    assert "\n" not in message and message.endswith(".") and ". " not in message, message
    assert ";" in message, message
    for fragment in fragments:
        assert fragment in message, message


def _bad_nifti(tmp_path: Path, name: str, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as error:
        read_image(tmp_path / "nope.nii.gz")
    _assert_actionable(error.value, "nope.nii.gz")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "scan.nrrd"
    path.write_bytes(b"NRRD0004\n")
    with pytest.raises(InputError, match="not a supported input") as error:
        read_image(path)
    _assert_actionable(error.value, "scan.nrrd", "convert it to NIfTI")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "truncated_plain"])
def test_damaged_nifti(synthetic: dict[str, Path], tmp_path: Path, damage: str) -> None:
    source = synthetic["uncompressed" if damage == "truncated_plain" else "oblique"]
    payload = source.read_bytes()
    path = tmp_path / ("bad.nii" if damage == "truncated_plain" else "bad.nii.gz")
    path.write_bytes(os.urandom(600) if damage == "garbage" else payload[: len(payload) * 2 // 3])
    with pytest.raises(InputError, match="cannot be read as NIfTI") as error:
        read_image(path)
    _assert_actionable(error.value, path.name, "export it again")


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 1), (1, 16, 16)])
def test_2d_image_needs_3d_volume(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = _bad_nifti(tmp_path, "slice.nii.gz", _volume(shape))
    with pytest.raises(InputError, match="2D image") as error:
        read_image(path)
    _assert_actionable(error.value, "needs a 3D volume")


def test_4d_with_one_volume_is_squeezed_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _volume((9, 8, 7, 1))
    path = _bad_nifti(tmp_path, "one_volume.nii.gz", data)
    with caplog.at_level(logging.WARNING, logger="tsrt.pipeline.read"):
        image = read_image(path)
    assert image.array.shape == (9, 8, 7) and np.array_equal(image.array, data[..., 0])
    assert image.header is not None and image.header.get_data_shape() == (9, 8, 7)
    assert any("single volume" in record.getMessage() for record in caplog.records)
    written = write_label_map(np.ones((9, 8, 7), np.uint8), image, tmp_path / "labels.nii.gz")
    assert nib.load(written).shape == (9, 8, 7)


def test_4d_with_several_volumes(tmp_path: Path) -> None:
    path = _bad_nifti(tmp_path, "series.nii.gz", _volume((9, 8, 7, 3)))
    with pytest.raises(InputError, match="holds 3 volumes") as error:
        read_image(path)
    _assert_actionable(error.value, "single 3D volume", "channel")


def test_nan_and_inf_voxels_are_counted(tmp_path: Path) -> None:
    data = np.zeros((9, 8, 7), np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    with pytest.raises(InputError, match="contains 4 voxel") as error:
        read_image(_bad_nifti(tmp_path, "nan.nii.gz", data))
    _assert_actionable(error.value, "NaN or infinite")


@pytest.mark.parametrize("kind", ["sheared", "zero_axis"])
def test_degenerate_geometry(tmp_path: Path, kind: str) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    if kind == "sheared":
        affine[0, 1] = 0.3
    else:
        affine[:3, 2] = 0
    path = tmp_path / f"{kind}.nii.gz"
    image = nib.Nifti1Image(_volume((9, 8, 7)), None)
    image.header.set_sform(affine, code=2)  # written raw: nibabel's qform would strip the shear
    nib.save(image, path)
    with pytest.raises(InputError, match="sheared" if kind == "sheared" else "degenerate") as error:
        read_image(path)
    _assert_actionable(error.value, path.name)


def test_empty_dicom_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="contains no DICOM images") as error:
        read_image(tmp_path / "empty")
    _assert_actionable(error.value)
    (tmp_path / "empty" / "readme.txt").write_text("hello")
    with pytest.raises(InputError, match="contains no DICOM images"):
        read_image(tmp_path / "empty")


def test_folder_with_several_series_names_them(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    _write_dicom_series(folder, _volume((6, 12, 10)), np.eye(3), (0.7, 0.8, 2.0), np.zeros(3),
                        "1.2.826.0.1.3680043.2.1125.1.3", "soft tissue")
    _write_dicom_series(folder / "lung", _volume((5, 12, 10), 1), np.eye(3), (0.7, 0.8, 2.0), np.zeros(3),
                        "1.2.826.0.1.3680043.2.1125.1.4", "lung kernel")
    with pytest.raises(InputError, match="holds 2 image series") as error:
        read_image(folder)
    _assert_actionable(error.value, "'soft tissue' (6 images)", "'lung kernel' (5 images)", "only the series")


def test_dicom_with_missing_slice(tmp_path: Path) -> None:
    folder = tmp_path / "gap"
    _write_dicom_series(folder, _volume((7, 12, 10)), np.eye(3), (0.7, 0.8, 2.0), np.zeros(3),
                        "1.2.826.0.1.3680043.2.1125.1.5", "gap", skip=(3,))
    with pytest.raises(InputError, match="missing slices") as error:
        read_image(folder)
    _assert_actionable(error.value, "export the complete series")


def test_dicom_with_two_images_at_one_position(tmp_path: Path) -> None:
    folder, uid = tmp_path / "repeat", "1.2.826.0.1.3680043.2.1125.1.7"
    _write_dicom_series(folder, _volume((6, 12, 10)), np.eye(3), (0.7, 0.8, 2.0), np.zeros(3), uid, "ct")
    _write_dicom_series(folder / "rescan", _volume((1, 12, 10), 5), np.eye(3), (0.7, 0.8, 2.0), np.zeros(3), uid, "ct",
                        first_instance=7)
    with pytest.raises(InputError, match="same position") as error:
        read_image(folder)
    _assert_actionable(error.value, "single 3D series")


def test_dicom_series_too_short(tmp_path: Path) -> None:
    folder = tmp_path / "short"
    _write_dicom_series(folder, _volume((3, 12, 10)), np.eye(3), (0.7, 0.8, 2.0), np.zeros(3),
                        "1.2.826.0.1.3680043.2.1125.1.6", "short")
    with pytest.raises(InputError, match="at least 4 slices") as error:
        read_image(folder)
    _assert_actionable(error.value)


@pytest.mark.parametrize("content", ["no_dicom", "not_a_zip"])
def test_bad_zip(tmp_path: Path, content: str) -> None:
    archive = tmp_path / "upload.zip"
    if content == "no_dicom":
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("report.txt", "no images here")
    else:
        archive.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(InputError, match="contains no DICOM" if content == "no_dicom" else "not a readable .zip") as error:
        read_image(archive)
    _assert_actionable(error.value, "upload.zip")


# ------------------------------------------------------------------------------------ writing


def test_label_map_keeps_geometry_and_header(synthetic: dict[str, Path], tmp_path: Path) -> None:
    source = synthetic["qform_sform"]
    image = read_image(source)
    labels = np.random.default_rng(1).integers(0, 200, size=image.spatial_shape)
    out = write_label_map(labels, image, tmp_path / "sub" / "seg.nii.gz", label_names={1: "spleen", 2: "kidney <right> & co"})
    written, original = nib.load(out), nib.load(source)
    assert written.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(written.dataobj), labels)
    for field in ("qform_code", "sform_code", "pixdim", "quatern_b", "quatern_c", "quatern_d",
                  "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units", "dim_info"):
        assert np.array_equal(written.header[field], original.header[field]), field
    assert written.header.get_intent()[0] == "label" and written.header["cal_max"] == labels.max()
    # ITK-based viewers resolve qform/sform their own way — identically for input and output.
    itk_in, itk_out = sitk.ReadImage(str(source)), sitk.ReadImage(str(out))
    assert itk_in.GetOrigin() == itk_out.GetOrigin() and itk_in.GetDirection() == itk_out.GetDirection()
    assert itk_in.GetSpacing() == itk_out.GetSpacing()
    from totalsegmentator.nifti_ext_header import load_multilabel_nifti

    _, names = load_multilabel_nifti(out)
    assert names == {1: "spleen", 2: "kidney <right> & co"}
    assert [p.name for p in out.parent.iterdir()] == ["seg.nii.gz"]


def test_label_map_dtype_follows_largest_label(synthetic: dict[str, Path], tmp_path: Path) -> None:
    image = read_image(synthetic["oblique"])
    for high, dtype in ((255, np.uint8), (256, np.uint16)):
        labels = np.zeros(image.spatial_shape, np.int64)
        labels[1, 2, 3] = high
        out = write_label_map(labels, image, tmp_path / f"seg{high}.nii.gz")
        assert nib.load(out).get_data_dtype() == dtype and np.asarray(nib.load(out).dataobj)[1, 2, 3] == high
    with pytest.raises(ValueError):
        write_label_map(np.zeros((2, 2, 2), np.uint8), image, tmp_path / "wrong_shape.nii.gz")


def test_write_nifti_stores_values_unscaled(synthetic: dict[str, Path], tmp_path: Path) -> None:
    image = read_image(synthetic["scaled_lps"])  # input has scl_slope 0.37: must not leak into outputs
    values = np.random.default_rng(2).random((3, *image.spatial_shape)).astype(np.float32)
    out = write_nifti(values, image, tmp_path / "probabilities.nii.gz")
    written = nib.load(out)
    assert written.shape == (*image.spatial_shape, 3)
    assert np.array_equal(np.asarray(written.dataobj), np.moveaxis(values, 0, -1))
    assert np.array_equal(written.affine, image.affine)
    rounded = write_nifti(image.array, image, tmp_path / "rounded.nii", dtype=np.int32)
    assert nib.load(rounded).get_data_dtype() == np.int32
    assert np.array_equal(np.asarray(nib.load(rounded).dataobj), image.array.astype(np.int32))


def test_label_map_for_dicom_input_matches_totalsegmentator_output_grid(dicom_cases: dict[str, Path], tmp_path: Path) -> None:
    image = read_image(dicom_cases["oblique"])
    out = write_label_map(np.ones(image.spatial_shape, np.uint8), image, tmp_path / "seg.nii.gz")
    converted = _dicom2nifti_like_totalsegmentator(dicom_cases["oblique"], tmp_path / "converted.nii.gz")
    assert nib.load(out).shape == converted.shape and np.array_equal(nib.load(out).affine, converted.affine)


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"previous result")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(target) as temp:
            assert temp.parent == tmp_path and temp.name.endswith("seg.nii.gz") and temp != target
            temp.write_bytes(b"half a fi")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]
    with atomic_output(target) as temp:
        temp.write_bytes(b"new result")
    assert target.read_bytes() == b"new result" and sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]


def test_real_write_failure_is_an_output_error_and_atomic(synthetic: dict[str, Path], tmp_path: Path) -> None:
    """A file-size limit makes the kernel refuse the write mid-file (EFBIG), like a full disk would."""
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"previous result")
    script = f"""
import resource, signal, sys
import numpy as np
from tsrt.errors import OutputError
from tsrt.pipeline.read import read_image
from tsrt.pipeline.write import write_nifti
image = read_image({str(synthetic['oblique'])!r})
noise = np.random.default_rng(0).random((64, *image.spatial_shape))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_nifti(noise, image, {str(target)!r})
except OutputError as error:
    print("OUTPUT_ERROR:", error)
    sys.exit(0)
sys.exit("no OutputError raised")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "OUTPUT_ERROR: Cannot write" in result.stdout and "Traceback" not in result.stdout
    _assert_actionable(OutputError(result.stdout.split("OUTPUT_ERROR: ", 1)[1].strip()), "seg.nii.gz")
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]


@pytest.mark.parametrize("where", ["parent_is_file", "proc", "is_directory", "wrong_suffix"])
def test_unwritable_output_path(synthetic: dict[str, Path], tmp_path: Path, where: str) -> None:
    image = read_image(synthetic["oblique"])
    (tmp_path / "afile").write_text("x")
    target = {
        "parent_is_file": tmp_path / "afile" / "seg.nii.gz",
        "proc": Path("/proc/tsrt-test-output/seg.nii.gz"),
        "is_directory": tmp_path,
        "wrong_suffix": tmp_path / "seg.png",
    }[where]
    with pytest.raises(OutputError) as error:
        write_label_map(np.zeros(image.spatial_shape, np.uint8), image, target)
    _assert_actionable(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_image_without_header_gets_a_fresh_one(synthetic: dict[str, Path], tmp_path: Path) -> None:
    source = read_image(synthetic["oblique"])
    bare = Image(source.array, source.affine, None, "in memory")
    assert bare.spacing == pytest.approx(source.spacing, abs=1e-6)
    out = write_label_map(np.ones(bare.spatial_shape, np.uint8), bare, tmp_path / "seg.nii.gz")
    np.testing.assert_allclose(nib.load(out).affine, source.affine, atol=1e-5)
