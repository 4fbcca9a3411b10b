"""Read stage: a NIfTI file, a folder of one DICOM series, or a .zip of one, into an `Image`.

Single source of truth for geometry is **nibabel** (the NIfTI header as nibabel interprets it):
TotalSegmentator itself is nibabel-based (it loads, reorients, resamples and saves with nibabel and
copies the input header into its outputs), nibabel gives us the raw on-disk dtype and the header to
copy into our outputs, and nnU-Net's readers all agree with it on voxel values and spacing.
SimpleITK is used only to decode DICOM pixel data (GDCM); the DICOM geometry is computed from the
DICOM tags and converted exactly the way TotalSegmentator's DICOM->NIfTI step (dicom2nifti) does,
so a DICOM input gives the same voxel grid, values and affine as TotalSegmentator's converted file.

`to_nnunet_array` then reproduces, without nnunetv2, the array and properties each of nnU-Net's
readers (SimpleITKIO, NibabelIO, NibabelIOWithReorient) would return for the same file, and
`from_nnunet_array` maps a result back onto the `Image` voxel grid (what their `write_seg` undoes).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from tsrt.errors import InputError, ModelError
from tsrt.pipeline.nifti_header import check_image_file

log = logging.getLogger(__name__)

#: nnU-Net image reader names `to_nnunet_array` reproduces (the `image_reader_writer` of a plan).
NNUNET_READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")

#: Flips x and y: nibabel affines map to RAS+, ITK geometry is LPS+.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

#: Direction cosines whose dot products deviate more than this from an orthonormal basis are
#: treated as sheared/degenerate. Float32 sform storage gives ~1e-7, real scanner data ~1e-5.
_ORTHONORMAL_TOLERANCE = 1e-3

#: nibabel's orientation array for "already in the wanted axis order and sense".
_IDENTITY_ORNT = np.array([[0, 1], [1, 1], [2, 1]])

#: dicom2nifti refuses series of 3 slices or fewer ("TOO_FEW_SLICES/LOCALIZER"); so do we.
_MIN_DICOM_SLICES = 4


@dataclass
class Image:
    """A volume with full geometry. `array` is indexed (i, j, k) like the file's voxel grid (nibabel/NIfTI order)."""

    array: np.ndarray  # 3D (i,j,k), original dtype kept (int16/int32/float...) — or 4D (c,i,j,k) for multi-channel
    affine: np.ndarray  # 4x4 voxel->RAS+ mm (nibabel convention)
    header: nib.Nifti1Header | None  # source NIfTI header (or the one TotalSegmentator's DICOM conversion writes)
    source: str  # path, for messages
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # e.g. {"modality": "CT"} from DICOM

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape[-3:])  # type: ignore[return-value]

    @property
    def num_channels(self) -> int:
        return 1 if self.array.ndim == 3 else int(self.array.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (i, j, k).

        The header's pixdim when there is a header: that is what nnU-Net's readers, SimpleITK and
        TotalSegmentator resample with. Otherwise the lengths of the affine's columns.
        """
        if self.header is not None:
            return tuple(float(z) for z in self.header.get_zooms()[:3])  # type: ignore[return-value]
        return tuple(float(n) for n in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """Position of voxel (0, 0, 0) in ITK's LPS+ convention (SimpleITK's GetOrigin)."""
        return tuple(float(v) for v in _RAS_TO_LPS @ self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> tuple[float, ...]:
        """Unit axis directions in LPS+, row-major 3x3 with axis i, j, k as columns (SimpleITK's GetDirection)."""
        rotation_zoom = self.affine[:3, :3]
        cosines = _RAS_TO_LPS @ (rotation_zoom / np.linalg.norm(rotation_zoom, axis=0))
        return tuple(float(v) for v in cosines.ravel())


def read_image(path: str | Path) -> Image:
    """Read a .nii/.nii.gz file, a folder holding one DICOM series, or a .zip of one."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Input {path} does not exist; check the path and its spelling.")
    check_image_file(path)  # content against name, NIfTI header and payload size: refused before nibabel allocates
    if path.is_dir():
        return _read_dicom_folder(path, shown=str(path))
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _read_nifti(path)
    if name.endswith(".zip"):
        return _read_dicom_zip(path)
    raise InputError(
        f"{path} is not a supported input (a .nii/.nii.gz file, a DICOM folder or a .zip of DICOM files); "
        "convert it to NIfTI or pass the folder holding the DICOM slices."
    )


def read_channels(paths: Sequence[str | Path]) -> Image:
    """Read one image per input channel (nnU-Net's _0000, _0001, ...) into a (c, i, j, k) `Image`.

    The channels are stacked voxel by voxel, so they must share one voxel grid: same shape,
    same spacing and the same affine (within 1e-3 mm), as nnU-Net requires of its inputs.
    """
    if not paths:
        raise InputError("No input image was given; pass one image file (or one per channel).")
    images = [read_image(p) for p in paths]
    first = images[0]
    for index, image in enumerate(images[1:], start=1):
        same_grid = (
            image.spatial_shape == first.spatial_shape
            and np.allclose(image.spacing, first.spacing, rtol=1e-5, atol=0)
            and np.allclose(image.affine, first.affine, rtol=0, atol=1e-3)
        )
        if not same_grid:
            raise InputError(
                f"Channel {index} ({image.source}, {_describe_grid(image)}) does not share the voxel grid of "
                f"channel 0 ({first.source}, {_describe_grid(first)}); resample all channels onto one grid first."
            )
    array = np.stack([image.array for image in images])
    return Image(array, first.affine.copy(), first.header, " + ".join(image.source for image in images), first.extra)


def to_nnunet_array(image: Image, reader: str) -> tuple[np.ndarray, dict]:
    """The float32 (c, z, y, x) array (a new one) and properties nnU-Net's reader `reader` returns for this image.

    Properties carry nnU-Net's own keys ('spacing', 'sitk_stuff' or 'nibabel_stuff') plus 'tsrt',
    which `from_nnunet_array` uses to put a result back onto the image's voxel grid.
    SimpleITKIO and NibabelIO both return the voxel grid with axes reversed (k, j, i) and the
    header spacing reversed; NibabelIOWithReorient first reorients to the closest RAS grid, and its
    spacing comes from the reoriented affine's column lengths (nibabel rewrites pixdim then).
    """
    channels = image.array if image.array.ndim == 4 else image.array[None]
    zooms = image.spacing
    ornt = None
    if reader == "SimpleITKIO":
        properties: dict[str, Any] = {
            "sitk_stuff": {"spacing": zooms, "origin": image.origin, "direction": image.direction},
            "spacing": [abs(z) for z in zooms[::-1]],
        }
    elif reader == "NibabelIO":
        properties = {"nibabel_stuff": {"original_affine": image.affine.copy()}, "spacing": list(zooms[::-1])}
    elif reader == "NibabelIOWithReorient":
        ornt = io_orientation(image.affine)
        if np.array_equal(ornt, _IDENTITY_ORNT):  # nibabel returns the image unchanged
            ornt, reoriented_affine = None, image.affine.copy()
        else:
            channels = np.stack([apply_orientation(channel, ornt) for channel in channels])
            reoriented_affine = image.affine @ inv_ornt_aff(ornt, image.spatial_shape)
            if not np.allclose(reoriented_affine, image.affine):  # nibabel then rewrites pixdim (float32)
                zooms = tuple(float(z) for z in np.float32(np.linalg.norm(reoriented_affine[:3, :3], axis=0)))
        properties = {
            "nibabel_stuff": {"original_affine": image.affine.copy(), "reoriented_affine": reoriented_affine},
            "spacing": list(zooms[::-1]),
        }
    else:
        raise ModelError(
            f"The model reads images with nnU-Net's {reader!r}, which tsrt does not reproduce "
            f"(supported: {', '.join(NNUNET_READERS)}); re-train or re-export it with one of those readers."
        )
    properties["tsrt"] = {"reader": reader, "ornt": ornt, "spatial_shape": image.spatial_shape}
    # Always a new array (never a view of image.array), so callers may hand it to preprocessing to overwrite.
    data = np.array(channels.transpose(0, 3, 2, 1), dtype=np.float32, order="C")
    return data, properties


def from_nnunet_array(array: np.ndarray, properties: dict) -> np.ndarray:
    """Map a (z, y, x) or (c, z, y, x) array in a reader's order back onto the image voxel grid (i, j, k).

    The inverse of `to_nnunet_array`'s axis handling, i.e. what nnU-Net's `write_seg` does before saving.
    """
    ornt = properties["tsrt"]["ornt"]
    inverse = None if ornt is None else ornt_transform(axcodes2ornt("RAS"), ornt)
    channels = array if array.ndim == 4 else array[None]
    grids = [channel.transpose(2, 1, 0) for channel in channels]
    if inverse is not None:
        grids = [apply_orientation(grid, inverse) for grid in grids]
    result = np.stack(grids) if array.ndim == 4 else grids[0]
    expected = tuple(properties["tsrt"]["spatial_shape"])
    if result.shape[-3:] != expected:
        raise ValueError(f"array of shape {array.shape} does not match the image grid {expected}")
    return result


# --------------------------------------------------------------------------------------------- NIfTI


def _read_nifti(path: Path) -> Image:
    try:
        nifti = nib.load(path, mmap=False)
        header = nifti.header.copy()
        dtype = header.get_data_dtype()
        if dtype.fields is not None or dtype.kind == "c":
            raise InputError(
                f"{path} stores {'colour (RGB)' if dtype.fields else 'complex'} voxels; "
                "tsrt needs a greyscale CT/MR volume — export the scan as a single-value (greyscale) image."
            )
        volume_shape = _volume_shape(tuple(nifti.shape), str(path))
        array = _load_voxels(nifti).reshape(volume_shape, order="F")
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as error:
        raise InputError(
            f"{path} cannot be read as NIfTI ({short_reason(error)}); it is probably truncated or damaged — copy or export it again."
        ) from None
    if len(nifti.shape) != 3:
        header.set_data_shape(volume_shape)
    _check_finite(array, str(path))
    affine = np.array(nifti.affine, dtype=np.float64)
    _check_geometry(affine, header.get_zooms()[:3], str(path))
    _note_header_ambiguities(header, affine, str(path))
    return Image(array, affine, header, str(path))


def _load_voxels(nifti: nib.Nifti1Image) -> np.ndarray:
    """Voxel values with scl_slope/scl_inter applied; the on-disk dtype is kept when unscaled.

    Scaled data is computed in float64 exactly as nibabel's get_fdata does, then kept as float32
    (what every nnU-Net reader hands the network), in slabs so no full float64 copy is needed.
    """
    proxy = nifti.dataobj
    raw = np.asarray(proxy.get_unscaled())
    slope, inter = float(proxy.slope), float(proxy.inter)
    if slope == 1.0 and inter == 0.0:
        return raw
    scaled = np.empty(raw.shape, dtype=np.float32, order="F")
    slab = 16
    for start in range(0, raw.shape[2] if raw.ndim > 2 else 1, slab):
        part = raw[:, :, start : start + slab] if raw.ndim > 2 else raw
        target = scaled[:, :, start : start + slab] if raw.ndim > 2 else scaled
        target[...] = part * np.float64(slope) + np.float64(inter)
    return scaled


def _volume_shape(shape: tuple[int, ...], source: str) -> tuple[int, int, int]:
    """The 3D shape to use, squeezing a single 4th-dimension volume; errors for 2D and multi-volume files."""
    shown = "x".join(str(n) for n in shape)
    if len(shape) < 3 or min(shape[:3]) <= 1:
        raise InputError(
            f"{source} is a 2D image ({shown} voxels) but tsrt needs a 3D volume; pass the whole series (all slices), not a single slice."
        )
    volumes = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    if volumes > 1:
        raise InputError(
            f"{source} holds {volumes} volumes ({shown} voxels); pass a single 3D volume, "
            "or give each channel as its own 3D file."
        )
    if len(shape) > 3:
        log.warning("%s has shape %s with a single volume; using it as the 3D volume %s.", source, shown, shape[:3])
    return shape[:3]  # type: ignore[return-value]


def _check_finite(array: np.ndarray, source: str) -> None:
    """Reject NaN/Inf voxels and images with one value everywhere (nothing to segment: a broken export)."""
    if array.dtype.kind == "f":
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(
                f"{source} contains {bad} voxel(s) that are NaN or infinite; fix or re-export the image so every voxel has a value."
            )
    if array.size and array.min() == array.max():
        raise InputError(
            f"{source} has the same value ({array.flat[0]}) in every voxel, so it shows no anatomy; check that the right "
            "series was exported."
        )


def _check_geometry(affine: np.ndarray, zooms: Sequence[float], source: str) -> None:
    """Reject geometry no resampling can honour: non-finite, zero-size or sheared voxel axes."""
    rotation_zoom = affine[:3, :3]
    lengths = np.linalg.norm(rotation_zoom, axis=0)
    zooms = np.asarray(zooms, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or np.any(lengths < 1e-6) or not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise InputError(
            f"{source} has a degenerate orientation (missing, zero or non-finite voxel sizes or axes); "
            "re-export the image with its scanner geometry."
        )
    cosines = rotation_zoom / lengths
    skew = float(np.abs(cosines.T @ cosines - np.eye(3)).max())
    if skew > _ORTHONORMAL_TOLERANCE:
        raise InputError(
            f"{source} has non-perpendicular (sheared) voxel axes (direction cosines off by {skew:.3g}); "
            "resample it to an orthogonal grid or re-export it from the scanner data."
        )
    if not np.allclose(lengths, zooms, rtol=1e-3, atol=0):
        log.warning(
            "%s: voxel size in the header (%s mm) differs from the affine's (%s mm); like nnU-Net and "
            "TotalSegmentator, the header's voxel size is used for resampling.",
            source, _mm(zooms), _mm(lengths),
        )


def _note_header_ambiguities(header: nib.Nifti1Header, affine: np.ndarray, source: str) -> None:
    """Log what makes viewers disagree about where this image is; outputs copy the header, so they agree with it."""
    qform, qform_code = header.get_qform(coded=True)
    sform, sform_code = header.get_sform(coded=True)
    if qform_code == 0 and sform_code == 0:
        log.warning("%s has no orientation (qform and sform codes are 0); positions and left/right are guessed.", source)
    elif qform is not None and sform is not None and not np.allclose(qform, sform, atol=1e-3):
        log.info(
            "%s has different qform and sform; tsrt (like nibabel and TotalSegmentator) uses the sform, "
            "ITK-based tools may use the qform — outputs keep both, so they overlay the input either way.",
            source,
        )


# --------------------------------------------------------------------------------------------- DICOM


@dataclass
class _DicomFile:
    path: str
    series_uid: str
    series_label: str
    is_localizer: bool
    orientation: np.ndarray  # ImageOrientationPatient: row direction, column direction (LPS)
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    grid: tuple[int, int]  # (Rows, Columns)
    frames: int
    samples_per_pixel: int
    modality: str


_TAG = {
    "series_uid": "0020|000e",
    "series_number": "0020|0011",
    "series_description": "0008|103e",
    "image_type": "0008|0008",
    "modality": "0008|0060",
    "orientation": "0020|0037",
    "position": "0020|0032",
    "pixel_spacing": "0028|0030",
    "rows": "0028|0010",
    "columns": "0028|0011",
    "frames": "0028|0008",
    "samples_per_pixel": "0028|0002",
}


def _read_dicom_zip(path: Path) -> Image:
    try:
        with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="tsrt-dicom-") as folder:
            archive.extractall(folder)  # extractall drops absolute and '..' parts of member names
            return _read_dicom_folder(Path(folder), shown=str(path))
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise InputError(f"{path} is not a readable .zip file ({short_reason(error)}); zip the DICOM folder again.") from None
    except OSError as error:
        raise InputError(f"{path} could not be unpacked ({short_reason(error)}); check free disk space in the temp folder or unzip it yourself.") from None


def _read_dicom_folder(folder: Path, shown: str) -> Image:
    """One DICOM series -> Image, matching TotalSegmentator's dicom2nifti conversion.

    Which files form the series: all DICOM images under the folder (recursively, like dicom2nifti),
    minus localizers/scouts. dicom2nifti does not separate series — mixing two makes its
    conversion fail or interleave slices — so tsrt refuses folders holding several series with at
    least 4 images each and names them, rather than guess which one to segment.
    """
    files = _scan_dicom_files(folder)
    if not files:
        raise InputError(f"{shown} contains no DICOM images; pass the folder (or .zip) that holds the CT/MR slices.")
    if any(f.frames > 1 for f in files):
        raise InputError(
            f"{shown} holds enhanced multi-frame DICOM, which tsrt does not read; export the series as classic "
            "DICOM (one file per slice) or as NIfTI."
        )
    series: dict[str, list[_DicomFile]] = {}
    for dicom_file in files:
        if not dicom_file.is_localizer:
            series.setdefault(dicom_file.series_uid, []).append(dicom_file)
    volumes = [slices for slices in series.values() if len(slices) >= _MIN_DICOM_SLICES]
    if not volumes:
        largest = max((len(s) for s in series.values()), default=0)
        raise InputError(
            f"{shown} holds no DICOM series of at least {_MIN_DICOM_SLICES} slices (largest: {largest}, "
            "localizers excluded); tsrt needs a 3D series — export all slices of the scan."
        )
    skipped = len(files) - sum(len(s) for s in volumes)
    if skipped and len(volumes) == 1:
        log.info("%s: using %s (%d images), ignoring %d localizer or stray image(s).",
                 shown, volumes[0][0].series_label, len(volumes[0]), skipped)
    if len(volumes) > 1:
        listing = "; ".join(f"{s[0].series_label} ({len(s)} images)" for s in sorted(volumes, key=len, reverse=True))
        raise InputError(
            f"{shown} holds {len(volumes)} image series ({listing}); put only the series to segment in the folder or zip."
        )
    return _dicom_series_to_image(volumes[0], shown)


def _scan_dicom_files(folder: Path) -> list[_DicomFile]:
    """Header-only pass over every file under `folder`; non-DICOM and non-image objects are skipped."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            reader.SetFileName(os.path.join(root, name))
            try:
                reader.ReadImageInformation()
            except RuntimeError:
                continue  # not DICOM (or no pixel data)
            tags = {key: reader.GetMetaData(tag).strip() for key, tag in _TAG.items() if reader.HasMetaDataKey(tag)}
            try:
                orientation = np.array([float(v) for v in tags["orientation"].split("\\")])
                position = np.array([float(v) for v in tags["position"].split("\\")])
                pixel_spacing = tuple(float(v) for v in tags["pixel_spacing"].split("\\"))
                grid = (int(tags["rows"]), int(tags["columns"]))
            except (KeyError, ValueError):
                continue  # no patient geometry: not a slice of a volume (report, secondary capture, ...)
            if orientation.shape != (6,) or position.shape != (3,) or len(pixel_spacing) != 2:
                continue
            image_type = tags.get("image_type", "").upper().split("\\")
            modality = tags.get("modality", "")
            number, description = tags.get("series_number", ""), tags.get("series_description", "")
            found.append(
                _DicomFile(
                    path=os.path.join(root, name),
                    series_uid=tags.get("series_uid", ""),
                    series_label=f"series {number} '{description}'".replace(" ''", "") if (number or description)
                    else f"series {tags.get('series_uid', '?')}",
                    # dicom2nifti's rule: LOCALIZER images, and CT PROJECTION IMAGEs (scout views)
                    is_localizer="LOCALIZER" in image_type or ("CT" in modality and "PROJECTION IMAGE" in image_type),
                    orientation=orientation,
                    position=position,
                    pixel_spacing=pixel_spacing,  # type: ignore[arg-type]
                    grid=grid,
                    frames=int(tags.get("frames", "1") or 1),
                    samples_per_pixel=int(tags.get("samples_per_pixel", "1") or 1),
                    modality=modality,
                )
            )
    return found


def _dicom_series_to_image(slices: list[_DicomFile], shown: str) -> Image:
    import SimpleITK as sitk

    first = slices[0]
    for other in slices[1:]:
        if not np.allclose(other.orientation, first.orientation, rtol=1e-3, atol=1e-3) or other.grid != first.grid:
            raise InputError(
                f"The DICOM series in {shown} mixes slice orientations or sizes; export a single 3D series of the scan."
            )
    if first.samples_per_pixel != 1:
        raise InputError(f"The DICOM series in {shown} is a colour image; tsrt needs a greyscale CT/MR series.")
    slices = _sort_like_dicom2nifti(slices)
    positions = np.array([s.position for s in slices])
    steps = np.diff(positions, axis=0)
    gaps = np.linalg.norm(steps, axis=1)
    if np.any(gaps < 1e-4):
        raise InputError(
            f"The DICOM series in {shown} has several images at the same position (duplicates or repeated scans); "
            "export a single 3D series."
        )
    uneven = [i for i, step in enumerate(steps) if not np.allclose(step, steps[0], rtol=0.05, atol=0.1)]
    if uneven:
        raise InputError(
            f"The DICOM series in {shown} has missing slices or uneven slice spacing (after slice {uneven[0] + 1} of "
            f"{len(slices)}: {gaps[uneven[0]]:.2f} mm instead of {gaps[0]:.2f} mm); export the complete series."
        )
    row_direction, column_direction = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_direction, column_direction)
    stack_direction = (positions[-1] - positions[0]) / np.linalg.norm(positions[-1] - positions[0])
    if not (np.allclose(normal, stack_direction, atol=0.05) or np.allclose(normal, -stack_direction, atol=0.05)):
        raise InputError(
            f"The DICOM series in {shown} is sheared (tilted gantry: slices are not stacked perpendicular to "
            "their plane); export a tilt-corrected series."
        )

    series_reader = sitk.ImageSeriesReader()
    series_reader.SetImageIO("GDCMImageIO")
    series_reader.SetFileNames([s.path for s in slices])
    try:
        pixels = series_reader.Execute()
    except RuntimeError as error:
        raise InputError(f"The DICOM pixel data in {shown} cannot be decoded ({short_reason(error)}); export the series again.") from None
    if pixels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The DICOM series in {shown} is a colour image; tsrt needs a greyscale CT/MR series.")
    voxels = sitk.GetArrayFromImage(pixels).transpose(2, 1, 0)  # (slice, row, column) -> (i=column, j=row, k=slice)

    # The affine dicom2nifti builds: columns move along the row direction by the column spacing, rows
    # along the column direction by the row spacing, slices by the mean step; then LPS -> RAS.
    affine = np.eye(4)
    affine[:3, 0] = row_direction * first.pixel_spacing[1]
    affine[:3, 1] = column_direction * first.pixel_spacing[0]
    affine[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    affine[:3, 3] = positions[0]
    affine[:2] *= -1
    ornt = _dicom2nifti_ornt(affine, shown)
    affine = affine @ inv_ornt_aff(ornt, voxels.shape)
    voxels = np.asfortranarray(apply_orientation(voxels, ornt))

    # TotalSegmentator saves the conversion as NIfTI (float32 sform) and reloads it: do the same round trip.
    header = nib.Nifti1Header()
    header.set_data_shape(voxels.shape)
    header.set_data_dtype(voxels.dtype)
    header.set_sform(affine, code="aligned")
    header.set_qform(affine, code="unknown")
    header.set_xyzt_units("mm")
    _check_finite(voxels, f"The DICOM series in {shown}")
    return Image(voxels, header.get_best_affine(), header, shown, {"modality": first.modality})


def _sort_like_dicom2nifti(slices: list[_DicomFile]) -> list[_DicomFile]:
    """Ascending along the patient axis (x, y or z) over which the slice positions spread most."""
    positions = np.array([s.position for s in slices])
    axis = int(np.argmax(positions.max(axis=0) - positions.min(axis=0)))
    return sorted(slices, key=lambda s: s.position[axis])


def _dicom2nifti_ornt(affine: np.ndarray, shown: str) -> np.ndarray:
    """The reorientation dicom2nifti applies (reorient_nifti=True): voxel axes to L, A, S order and sense.

    For each patient axis x, y, z it picks the voxel axis that moves furthest per mm along it
    (rows of the inverse affine, so voxel size matters), resolving clashes in favour of the
    stronger match, then flips axes so i runs to the Left, j to Anterior, k to Superior (LAS).
    Returned as a nibabel orientation array: row = input voxel axis, (output axis, +1/-1 flip).
    """
    voxels_per_mm = np.linalg.inv(affine)[:3, :3]  # column w: voxel displacement for 1 mm along patient axis w
    strength = np.abs(voxels_per_mm).T.copy()  # strength[w, v]
    choice = strength.argmax(axis=1)
    best = strength.max(axis=1)
    for _ in range(10):
        if len(set(choice.tolist())) == 3:
            break
        for a, b in ((0, 1), (0, 2), (1, 2)):
            if choice[a] == choice[b]:
                loser = b if best[a] >= best[b] else a
                strength[loser, choice[loser]] = 0
                choice[loser], best[loser] = strength[loser].argmax(), strength[loser].max()
    if len(set(choice.tolist())) != 3:
        raise InputError(f"The DICOM series in {shown} has degenerate slice geometry; export the series again.")
    ornt = np.zeros((3, 2))
    for world_axis, voxel_axis in enumerate(choice):
        sense = voxels_per_mm[voxel_axis, world_axis]
        flip = sense >= 0 if world_axis == 0 else sense < 0  # x must run to the Left (RAS x decreasing)
        ornt[voxel_axis] = (world_axis, -1 if flip else 1)
    return ornt


# --------------------------------------------------------------------------------------------- helpers


def _describe_grid(image: Image) -> str:
    return f"{'x'.join(map(str, image.spatial_shape))} voxels of {_mm(image.spacing)} mm"


def _mm(values: Sequence[float]) -> str:
    return "x".join(f"{float(v):.4g}" for v in values)


def short_reason(error: BaseException) -> str:
    """The first line of an exception's message (an OSError's strerror), for one-sentence errors."""
    text = (error.strerror if isinstance(error, OSError) and error.strerror else str(error)).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__
