"""Write stage: label maps (and other volumes) on the input's exact voxel grid, written atomically.

Outputs copy the input's NIfTI header — qform and sform with their codes, pixdim, units, dim_info —
so every viewer places them exactly over the input, whichever of qform/sform it prefers. Only
what describes the voxel values changes (dtype, scaling, display range, intent, extensions).
Files appear only when complete: each is written to a hidden temp file in the same folder and
renamed over the target, so an interrupted run never leaves a truncated segmentation behind.
"""

from __future__ import annotations

import os
import pickle
from typing import Any
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import DTypeLike

from tsrt.errors import OutputError
from tsrt.pipeline.label_table import caret_label_table
from tsrt.pipeline.read import Image, short_reason

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temp path in `path`'s folder; rename it to `path` on success, remove it on failure.

    The temp name ends with the target's name, so writers that pick the format from the
    extension (nibabel: .nii vs .nii.gz) behave the same. The folder is created if missing.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"Output {path} is a folder; give a file name such as {path / 'segmentation.nii.gz'}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"Cannot create the output folder {path.parent} ({short_reason(error)}); choose a location you can write to."
        ) from None
    temp = path.parent / f".{secrets.token_hex(4)}.tsrt-partial.{path.name}"
    try:
        yield temp
        try:
            _flush_to_disk(temp)
            os.replace(temp, path)
        except OSError as error:
            raise _cannot_write(path, error) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_nifti(array: np.ndarray, like: Image, path: Path, dtype: DTypeLike | None = None) -> Path:
    """Write `array` (i, j, k) — or (c, i, j, k), stored as NIfTI's 4th dimension — on `like`'s grid.

    Values are cast to `dtype` (default: the array's own) and stored unscaled.
    """
    array = np.asarray(array)
    if array.ndim not in (3, 4) or array.shape[-3:] != like.spatial_shape:
        raise ValueError(f"array of shape {array.shape} does not fit the image grid {like.spatial_shape}")
    data = array if array.ndim == 3 else np.moveaxis(array, 0, -1)
    data = data.astype(np.dtype(dtype) if dtype is not None else data.dtype, copy=False)
    header = output_header(like, data.shape, data.dtype)
    return _save(data, like, header, Path(path))


def write_label_map(
    labels: np.ndarray, like: Image, path: Path, *, label_names: dict[int, str] | None = None
) -> Path:
    """Write an integer label map on `like`'s grid: uint8 when the largest label is < 256, else uint16.

    `label_names` are stored as TotalSegmentator does (a CaretExtension XML label table), which
    TotalSegmentator's `load_multilabel_nifti` and Connectome Workbench read back.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape != like.spatial_shape:
        raise ValueError(f"label map of shape {labels.shape} does not fit the image grid {like.spatial_shape}")
    if labels.dtype.kind not in "biu":
        raise ValueError(f"label map must hold integers, not {labels.dtype}")
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise ValueError(f"labels must lie in 0..65535, got {low}..{high}")
    data = labels.astype(np.uint8 if high < 256 else np.uint16, copy=False)
    header = output_header(like, data.shape, data.dtype)
    header.set_intent("label")
    header["cal_min"], header["cal_max"] = 0, high
    if label_names:
        header.extensions.append(nib.nifti1.Nifti1Extension(0, caret_label_table(label_names)))
    return _save(data, like, header, Path(path))


def output_header(like: Image, shape: tuple[int, ...], dtype: np.dtype) -> nib.Nifti1Header:
    """The input's header with the fields describing voxel values reset for new content."""
    if like.header is None:
        header = nib.Nifti1Header()
        header.set_sform(like.affine, code="aligned")
        header.set_qform(like.affine, code="unknown")
        header.set_xyzt_units("mm")
    else:
        header = like.header.copy()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header.set_intent("none")
    header["cal_min"] = header["cal_max"] = 0
    header["glmin"] = header["glmax"] = 0
    header.extensions.clear()  # input extensions describe the input's values (AFNI, DICOM, JSON sidecars)
    return header


def write_probabilities(path: Path, probabilities: np.ndarray, properties: dict[str, Any]) -> Path:
    """Class probabilities as nnU-Net exports them (nnUNetv2_predict and TotalSegmentator --save_probabilities).

    tsrt has this one probability format, for tasks and for --model alike.

    `path` gets the .npz nnU-Net writes (key "probabilities": float32 (classes, *spatial) in the
    reader's axis order, on the grid of the image the model saw), and `path` with the suffix .pkl
    the pickled nnU-Net properties that place it (reader geometry, spacing, crop box, shapes).
    """
    path = Path(path)
    with atomic_output(path) as temp, open(temp, "wb") as handle:
        np.savez_compressed(handle, probabilities=probabilities.astype(np.float32, copy=False))
    with atomic_output(path.with_suffix(".pkl")) as temp, open(temp, "wb") as handle:
        pickle.dump(properties, handle)
    return path


def write_json(document: object, path: Path) -> Path:
    """Write a JSON report atomically, indented by 4 like TotalSegmentator's own JSON files."""
    import json

    with atomic_output(Path(path)) as temp:
        temp.write_text(json.dumps(document, indent=4))
    return Path(path)


def _save(data: np.ndarray, like: Image, header: nib.Nifti1Header, path: Path) -> Path:
    if not path.name.lower().endswith(_NIFTI_SUFFIXES):
        raise OutputError(f"Output {path} is not a NIfTI file name; give it the ending .nii.gz (or .nii).")
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # Passing like.affine (== header's best affine) keeps the header's qform/sform and codes untouched.
    image = image_class(data, like.affine, header)
    try:
        with atomic_output(path) as temp:
            image.to_filename(temp)
    except OSError as error:
        raise _cannot_write(path, error) from None
    return path


def _cannot_write(path: Path, error: OSError) -> OutputError:
    return OutputError(f"Cannot write {path} ({short_reason(error)}); check free disk space and write permission there.")


def _flush_to_disk(path: Path) -> None:
    """fsync so a crash right after the rename cannot leave an empty file under the final name."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
