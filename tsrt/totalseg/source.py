"""The input as TotalSegmentator holds it: the image read once, its header geometry and its voxel values."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tsrt.errors import InputError
from tsrt.pipeline.read import Image, read_image
from tsrt.totalseg import ops

log = logging.getLogger("tsrt")


@dataclass
class SourceImage:
    """The input as TotalSegmentator holds it: geometry/header for the outputs, voxel values for the models.

    `values` equals upstream's `img_in_orig.get_fdata()`: the stored integers when the file is
    unscaled (float64 of them is exact, so we skip the copy), float64 of the scaled values otherwise.
    """

    image: Image
    values: np.ndarray
    path: Path | None = None  # the file, DICOM folder or zip it was read from (DICOM outputs reference it)

def read_source(source: str | Path | nib.Nifti1Image | Image) -> SourceImage:
    """Read a NIfTI path, DICOM folder/zip, a nibabel image or a tsrt Image as TotalSegmentator would."""
    if isinstance(source, Image):
        return SourceImage(source, _float64_if_not_integer(source.array))
    if isinstance(source, nib.spatialimages.SpatialImage):
        return _source_from_nifti(source, "<nibabel image>")
    path = Path(source)
    image = read_image(path)
    if image.array.ndim != 3:
        raise InputError(f"{path} holds several channels; TotalSegmentator tasks take one 3D image.")
    values = image.array
    if image.header is not None and _is_scaled(image.header) and path.name.lower().endswith((".nii", ".nii.gz")):
        values = np.asarray(nib.load(path).get_fdata(dtype=np.float64)).reshape(image.spatial_shape)
    return SourceImage(image, _float64_if_not_integer(values), path)

def _source_from_nifti(nifti: nib.spatialimages.SpatialImage, name: str) -> SourceImage:
    """A nibabel image as upstream takes it (first volume of 4D data, with a warning)."""
    shape = nifti.shape
    if len(shape) < 3 or min(shape[:3]) <= 1:
        raise InputError(f"{name} is a 2D image ({'x'.join(map(str, shape))}); TotalSegmentator needs a 3D volume.")
    if nifti.get_data_dtype().fields is not None:
        raise InputError(f"{name} stores structured (e.g. RGB) voxels; pass a greyscale CT/MR volume.")
    values = np.asanyarray(nifti.dataobj)  # scaled proxies come back as floats
    if values.dtype.kind not in "iub":
        values = nifti.get_fdata(dtype=np.float64)
    if values.ndim > 3:
        log.warning("%s has %d dimensions; only the first volume is used (like TotalSegmentator).", name, values.ndim)
        values = values[(...,) + (0,) * (values.ndim - 3)]
    header = nifti.header.copy() if isinstance(nifti.header, nib.Nifti1Header) else None
    if header is not None:
        header.set_data_shape(values.shape)
    image = Image(values, np.array(nifti.affine, dtype=np.float64), header, name)
    return SourceImage(image, values)

def header_zooms(image: Image) -> tuple[np.float32, np.float32, np.float32]:
    """`img_in_orig.header.get_zooms()`: the float32 voxel sizes upstream's statistics and postprocessing use."""
    if image.header is not None:
        return tuple(np.float32(z) for z in image.header.get_zooms()[:3])  # type: ignore[return-value]
    return ops.nifti_zooms(image.affine)

def _is_scaled(header: nib.Nifti1Header) -> bool:
    slope, inter = header.get_slope_inter()
    return slope is not None and (slope != 1.0 or (inter or 0.0) != 0.0)

def _float64_if_not_integer(values: np.ndarray) -> np.ndarray:
    """Integers stay as they are (float64 of them is exact); anything else becomes float64 like get_fdata."""
    return values if values.dtype.kind in "iub" else values.astype(np.float64, copy=False)
