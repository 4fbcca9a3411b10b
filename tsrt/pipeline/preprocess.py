"""Preprocessing exactly as nnU-Net does at inference: transpose -> crop to nonzero -> normalize -> resample.

The arithmetic of the normalisation schemes uses the same numpy operations in the same order as
nnU-Net's (float32 in place), so normalised voxels are bit-identical; resampling is the numba port
in `tsrt.pipeline.resample`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

from tsrt.errors import InputError, ModelError
from tsrt.models.plan import RecordedPlan
from tsrt.pipeline.resample import compute_new_shape, resample_to_shape


@dataclass
class Preprocessed:
    """The network's input plus what postprocessing needs to map predictions back."""

    data: np.ndarray  # (channels, *spatial) float32, in the plan's transposed axis order
    shape_before_cropping: tuple[int, ...]
    bbox: list[tuple[int, int]]  # half-open crop box per transposed axis
    shape_after_cropping: tuple[int, ...]
    spacing_transposed: list[float]  # the image's own spacing, transposed
    target_spacing: list[float]  # the spacing `data` is at (plan spacing; 2d: first axis kept)

    @property
    def needs_resampling_back(self) -> bool:
        return tuple(self.data.shape[1:]) != tuple(self.shape_after_cropping)


@numba.njit(cache=True)
def _fill_holes_3d(mask: np.ndarray) -> np.ndarray:
    """scipy's binary_fill_holes (face connectivity): background not connected to the border becomes foreground.

    A flood fill from the border over background voxels; each voxel enters the stack at most once,
    so the stack holds at most the number of background voxels (int64 flat indices).
    """
    nx, ny, nz = mask.shape
    outside = np.zeros(mask.shape, dtype=np.bool_)
    stack = np.empty(mask.size - np.count_nonzero(mask), dtype=np.int64)
    top = 0
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                on_border = i == 0 or j == 0 or k == 0 or i == nx - 1 or j == ny - 1 or k == nz - 1
                if on_border and not mask[i, j, k] and not outside[i, j, k]:
                    outside[i, j, k] = True
                    stack[top] = (i * ny + j) * nz + k
                    top += 1
    while top > 0:
        top -= 1
        flat = stack[top]
        i, rest = flat // (ny * nz), flat % (ny * nz)
        j, k = rest // nz, rest % nz
        for di, dj, dk in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
            a, b, c = i + di, j + dj, k + dk
            if 0 <= a < nx and 0 <= b < ny and 0 <= c < nz and not mask[a, b, c] and not outside[a, b, c]:
                outside[a, b, c] = True
                stack[top] = (a * ny + b) * nz + c
                top += 1
    return ~outside


def fill_holes_3d(mask: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_fill_holes` of a 3D mask (face connectivity), as bool."""
    return _fill_holes_3d(np.ascontiguousarray(np.asarray(mask) != 0))


def nonzero_mask(data: np.ndarray, fill_holes: bool = True) -> np.ndarray:
    """nnU-Net's mask of 'inside the scan': voxels nonzero in any channel, holes filled.

    Filling never changes the bounding box, so callers that only crop can skip it.
    """
    mask = np.any(data != 0, axis=0)
    return _fill_holes_3d(mask) if fill_holes else mask


def bounding_box(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open bounding box of True voxels; the whole array when there are none (as nnU-Net)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return box


def normalize_channel(image: np.ndarray, scheme: str, properties: dict[str, float], inside: np.ndarray | None) -> np.ndarray:
    """One channel, in place on float32, with nnU-Net's scheme of that name.

    `inside` is the nonzero mask, used only by ZScoreNormalization with use_mask_for_norm.
    """
    eps = 1e-8
    if scheme == "CTNormalization":
        np.clip(image, properties["percentile_00_5"], properties["percentile_99_5"], out=image)
        image -= properties["mean"]
        image /= max(properties["std"], eps)
    elif scheme == "ZScoreNormalization":
        if inside is not None:
            mean = image[inside].mean()
            std = image[inside].std()
            image[inside] = (image[inside] - mean) / max(std, eps)
        else:
            mean = image.mean()
            std = image.std()
            image -= mean
            image /= max(std, eps)
    elif scheme == "NoNormalization":
        pass
    elif scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
    elif scheme == "RGBTo01Normalization":
        if image.min() < 0 or image.max() > 255:
            raise InputError("This model expects 8-bit RGB intensities (0-255) but the image has values outside that range.")
        image /= 255.0
    else:
        raise ModelError(f"Normalization scheme {scheme!r} is not supported by tsrt; re-train or report it as an issue.")
    return image


def preprocess(
    data: np.ndarray, spacing: Sequence[float], plan: RecordedPlan, *, overwrite_input: bool = False
) -> Preprocessed:
    """Turn a reader-ordered image (channels, *spatial) with its spacing into the network's input.

    `overwrite_input` (as numpy's): a float32 `data` the caller no longer needs is normalised in place instead of
    copied, and usually becomes the network's input itself. The copy is a whole volume: 44 MB for `total`'s 1.5 mm
    grid on example_ct, held through the whole sliding window.
    """
    if data.shape[0] != plan.num_input_channels:
        raise InputError(
            f"The model expects {plan.num_input_channels} input channel(s) but got {data.shape[0]}: "
            "pass one image per channel in the model's channel order."
        )
    data = data.astype(np.float32, copy=not overwrite_input)  # everything below works in place
    data = data.transpose([0, *[a + 1 for a in plan.transpose_forward]])
    spacing_transposed = [float(spacing[a]) for a in plan.transpose_forward]
    shape_before_cropping = tuple(data.shape[1:])

    uses_mask = any(plan.use_mask_for_norm)
    mask = nonzero_mask(data, fill_holes=uses_mask)
    bbox = bounding_box(mask)
    crop = tuple(slice(a, b) for a, b in bbox)
    data = np.ascontiguousarray(data[(slice(None), *crop)])
    mask = mask[crop]
    shape_after_cropping = tuple(data.shape[1:])

    target_spacing = list(plan.spacing)
    if len(target_spacing) < len(shape_after_cropping):
        target_spacing = [spacing_transposed[0], *target_spacing]
    new_shape = compute_new_shape(shape_after_cropping, spacing_transposed, target_spacing)

    for channel in range(data.shape[0]):
        properties = plan.foreground_intensity_properties_per_channel.get(str(channel), {})
        inside = mask if plan.use_mask_for_norm[channel] else None
        data[channel] = normalize_channel(data[channel], plan.normalization_schemes[channel], properties, inside)

    resampling = plan.resampling_data
    data = resample_to_shape(
        data,
        new_shape,
        spacing_transposed,
        target_spacing,
        order=resampling.order,
        order_z=resampling.order_z,
        force_separate_z=resampling.force_separate_z,
        threshold=resampling.anisotropy_threshold,
    )
    return Preprocessed(
        data=np.ascontiguousarray(data, dtype=np.float32),
        shape_before_cropping=shape_before_cropping,
        bbox=bbox,
        shape_after_cropping=shape_after_cropping,
        spacing_transposed=spacing_transposed,
        target_spacing=target_spacing,
    )
