"""TotalSegmentator's own geometry steps around nnU-Net, reproduced without scipy or torch.

TotalSegmentator 2.18 does not let nnU-Net see the input image as it is. `nnUNet_predict_image`
first crops it to a mask (cropping.py), reorients it to RAS (alignment.py) and resamples it to the
task's spacing with `scipy.ndimage.zoom` (resampling.py); afterwards it undoes all three on the
label map. A runtime that wants TotalSegmentator's exact masks has to repeat those steps with the
same arithmetic, including scipy's float64 summation order (the int32 cast after resampling
truncates, so one ulp can change a voxel) and nibabel's float32 header zooms. This module does
that with numpy, numba and nibabel only.

What scipy.ndimage.zoom(data, zoom, order, mode="nearest") computes (scipy 1.17, grid_mode=False):

* Output shape ``int(round(n * z))`` per axis (round half to even).
* Output index o of an axis n_in -> n_out reads input coordinate ``o * ((n_in - 1) / (n_out - 1))``
  (factor 1 when n_out == 1); all zoom factors == 1 returns a copy of the input.
* Order 0 takes index ``floor(c + 0.5)`` (ties round up), odd orders start at ``floor(c)``; taps
  outside the array are clamped to the edge ('nearest').
* The value is the tensor-product sum over the (order+1)**3 taps in C order, each term
  ``((v * w0) * w1) * w2``; spline weights come from scipy's closed forms, the last weight of an
  axis being ``1 - sum(others)``.
* Orders >= 2 first pad 12 edge copies per side and run scipy's recursive B-spline prefilter
  (reflect-initialised for mode 'nearest') along each axis in turn.
* The result has the input's dtype; integer outputs are rounded half away from zero.

We evaluate exactly those operations in the same order, so results are bit-identical to scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

#: scipy pads this many edge samples per side before the spline prefilter in mode 'nearest'.
_SPLINE_PAD = 12
#: Poles of scipy's B-spline prefilters (ni_splines.c get_filter_poles), per order.
_SPLINE_POLES: dict[int, tuple[float, ...]] = {
    2: (-0.171572875253809902396622551580603843,),
    3: (-0.267949192431122706472553658494127633,),
    4: (-0.361341225900220177092212841325675255, -0.013725429297339121360331226939128204),
    5: (-0.430575347099973791851434783493520110, -0.043096288203264653822712376822550182),
}
#: TotalSegmentator splits the resampled image in three along z above this many voxels (nnunet.py).
TRIPLE_SPLIT_VOXEL_THRESHOLD = 512 * 512 * 900
#: ... but only when z has more than this many slices.
TRIPLE_SPLIT_MIN_Z = 200
#: Slices each part overlaps its neighbour by (a fixed count, not a fraction, in TotalSegmentator).
TRIPLE_SPLIT_MARGIN = 20
_IDENTITY_ORNT = np.array([[0, 1], [1, 1], [2, 1]])


# --------------------------------------------------------------------------- scipy.ndimage.zoom


def zoom_output_shape(shape: Sequence[int], zoom: Sequence[float] | float) -> tuple[int, ...]:
    """The output shape scipy.ndimage.zoom picks: ``int(round(n * z))`` in float64, ties to even."""
    factors = np.broadcast_to(np.asarray(zoom, dtype=np.float64), (len(shape),))
    return tuple(int(round(int(n) * factor)) for n, factor in zip(shape, factors))


def _spline_weights(x: np.ndarray, order: int) -> np.ndarray:
    """scipy's get_spline_interpolation_weights for many positions; operation order kept for bit equality."""
    x = x - np.floor(x if order & 1 else x + 0.5)
    weights = np.empty((x.size, order + 1), dtype=np.float64)
    y = x
    z = 1.0 - x
    if order == 1:
        weights[:, 0] = 1.0 - x
    elif order == 2:
        weights[:, 1] = 0.75 - x * x
        y = 0.5 - x
        weights[:, 0] = 0.5 * y * y
    elif order == 3:
        weights[:, 1] = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0
        weights[:, 2] = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
        weights[:, 0] = z * z * z / 6.0
    elif order == 4:
        t = x * x
        weights[:, 2] = t * (t * 0.25 - 0.625) + 115.0 / 192.0
        y = 1.0 + x
        weights[:, 1] = y * (y * (y * (5.0 - y) / 6.0 - 1.25) + 5.0 / 24.0) + 55.0 / 96.0
        weights[:, 3] = z * (z * (z * (5.0 - z) / 6.0 - 1.25) + 5.0 / 24.0) + 55.0 / 96.0
        y = 0.5 - x
        t = y * y
        weights[:, 0] = t * t / 24.0
    elif order == 5:
        t = y * y
        weights[:, 2] = t * (t * (0.25 - y / 12.0) - 0.5) + 0.55
        t = z * z
        weights[:, 3] = t * (t * (0.25 - z / 12.0) - 0.5) + 0.55
        y = y + 1.0
        weights[:, 1] = y * (y * (y * (y * (y / 24.0 - 0.375) + 1.25) - 1.75) + 0.625) + 0.425
        z = z + 1.0
        weights[:, 4] = z * (z * (z * (z * (z / 24.0 - 0.375) + 1.25) - 1.75) + 0.625) + 0.425
        y = 1.0 - x
        t = y * y
        weights[:, 0] = y * t * t / 120.0
    last = np.ones(x.size, dtype=np.float64)
    for i in range(order):
        last = last - weights[:, i]
    weights[:, order] = last
    return weights


def _axis_taps(n_in: int, n_out: int, order: int, prepad: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices (clamped: mode 'nearest') and weights of every output index along one axis.

    `n_in` is the (padded) input length the taps index; the coordinate mapping uses the unpadded
    length like scipy (it passes the unpadded shapes to the zoom factor and adds `prepad`).
    """
    n_unpadded = n_in - 2 * prepad
    factor = (n_unpadded - 1) / (n_out - 1) if n_out > 1 else 1.0
    coords = np.arange(n_out, dtype=np.float64) * factor
    coords = coords + float(prepad)
    if order & 1:
        start = np.floor(coords).astype(np.int64) - order // 2
    else:
        start = np.floor(coords + 0.5).astype(np.int64) - order // 2
    index = np.clip(start[:, None] + np.arange(order + 1), 0, n_in - 1)
    if order == 0:
        weights = np.ones((n_out, 1), dtype=np.float64)
    else:
        weights = _spline_weights(coords, order)
    return np.ascontiguousarray(index), np.ascontiguousarray(weights)


#: How `_tensor_zoom` stores a float64 sum: a C cast (numpy astype: truncation toward zero), or
#: scipy's output conversion for signed / unsigned integer outputs (round half away from zero, clamp).
_CAST, _SCIPY_SIGNED, _SCIPY_UNSIGNED = 0, 1, 2


@numba.njit(cache=True)
def _store(out, i, j, k, t, rounding):
    """Write one value the way `rounding` says."""
    if rounding == _SCIPY_SIGNED:
        t = t + 0.5 if t > 0 else t - 0.5
    elif rounding == _SCIPY_UNSIGNED:
        t = t + 0.5 if t > 0 else 0.0
    out[i, j, k] = t


@numba.njit(parallel=True, cache=True)
def _tensor_zoom(src, index0, weights0, index1, weights1, index2, weights2, out, use_weights, rounding):
    """Sum the tap products in scipy's order: C order over taps, ((v * w0) * w1) * w2, t starting at 0."""
    n0, n1, n2 = out.shape
    taps = index0.shape[1]
    for i in numba.prange(n0):
        for j in range(n1):
            for k in range(n2):
                t = 0.0
                for a in range(taps):
                    ia = index0[i, a]
                    wa = weights0[i, a]
                    for b in range(taps):
                        ib = index1[j, b]
                        wb = weights1[j, b]
                        for c in range(taps):
                            coeff = np.float64(src[ia, ib, index2[k, c]])
                            if use_weights:
                                coeff *= wa
                                coeff *= wb
                                coeff *= weights2[k, c]
                            t += coeff
                _store(out, i, j, k, t, rounding)
    return out


@numba.njit(cache=True)
def _prefilter_line(c, poles, gain):
    """scipy's apply_filter for mode 'nearest' (reflect-initialised causal/anti-causal passes) on one line."""
    n = c.shape[0]
    for i in range(n):
        c[i] *= gain
    for z in poles:
        z_i = z
        z_n = math.pow(z, float(n))
        total = c[0] + z_n * c[n - 1]
        for i in range(1, n):
            total += z_i * (c[i] + z_n * c[n - 1 - i])
            z_i *= z
        c[0] += total * z / (1 - z_n * z_n)
        for i in range(1, n):
            c[i] += z * c[i - 1]
        c[n - 1] *= z / (z - 1)
        for i in range(n - 2, -1, -1):
            c[i] = z * (c[i + 1] - c[i])


@numba.njit(cache=True)
def _prefilter_panel(panel, poles, gain):
    """`_prefilter_line` on every column of a 2D panel at once (rows are contiguous): same operations per column."""
    n, m = panel.shape
    for i in range(n):
        for col in range(m):
            panel[i, col] *= gain
    total = np.empty(m, dtype=np.float64)
    for z in poles:
        z_n = math.pow(z, float(n))
        for col in range(m):
            total[col] = panel[0, col] + z_n * panel[n - 1, col]
        z_i = z
        for i in range(1, n):
            for col in range(m):
                total[col] += z_i * (panel[i, col] + z_n * panel[n - 1 - i, col])
            z_i *= z
        denominator = 1 - z_n * z_n
        for col in range(m):
            panel[0, col] += total[col] * z / denominator
        for i in range(1, n):
            for col in range(m):
                panel[i, col] += z * panel[i - 1, col]
        last_factor = z / (z - 1)
        for col in range(m):
            panel[n - 1, col] *= last_factor
        for i in range(n - 2, -1, -1):
            for col in range(m):
                panel[i, col] = z * (panel[i + 1, col] - panel[i, col])


@numba.njit(parallel=True, cache=True)
def _prefilter_volume(volume, poles, gain):
    """Prefilter a float64 3D volume in place along axes 0, 1, 2 in turn (scipy's spline_filter order).

    Axes 0 and 1 are filtered as panels whose rows are contiguous, axis 2 line by line.
    """
    n0, n1, n2 = volume.shape
    if n0 > 1:
        for j in numba.prange(n1):
            _prefilter_panel(volume[:, j, :], poles, gain)
    if n1 > 1:
        for i in numba.prange(n0):
            _prefilter_panel(volume[i], poles, gain)
    if n2 > 1:
        for flat in numba.prange(n0 * n1):
            _prefilter_line(volume[flat // n1, flat % n1], poles, gain)


@numba.njit(parallel=True, cache=True)
def _pad_edge_float64(data, pad):
    """`np.pad(data, pad, mode="edge").astype(np.float64)` in one parallel pass."""
    n0, n1, n2 = data.shape
    out = np.empty((n0 + 2 * pad, n1 + 2 * pad, n2 + 2 * pad), dtype=np.float64)
    for i in numba.prange(out.shape[0]):
        si = min(max(i - pad, 0), n0 - 1)
        for j in range(out.shape[1]):
            sj = min(max(j - pad, 0), n1 - 1)
            for k in range(out.shape[2]):
                out[i, j, k] = np.float64(data[si, sj, min(max(k - pad, 0), n2 - 1)])
    return out


def _spline_coefficients(data: np.ndarray, order: int) -> np.ndarray:
    """scipy's `_prepad_for_spline_filter` + `spline_filter(output=float64, mode='nearest')`."""
    source = data.view(np.uint8) if data.dtype == np.bool_ else data
    coefficients = _pad_edge_float64(source, _SPLINE_PAD)
    gain = 1.0
    for z in _SPLINE_POLES[order]:
        gain *= (1.0 - z) * (1.0 - 1.0 / z)
    _prefilter_volume(coefficients, np.array(_SPLINE_POLES[order], dtype=np.float64), gain)
    return coefficients


def _zoom_into(data: np.ndarray, output_shape: Sequence[int], order: int, out: np.ndarray, rounding: int) -> np.ndarray:
    """Resample a 3D array onto `output_shape` with scipy's grid into the preallocated `out`."""
    if order > 1:
        source = _spline_coefficients(data, order)
        prepad = _SPLINE_PAD
    else:
        source = np.ascontiguousarray(data)
        prepad = 0
    taps = [_axis_taps(source.shape[axis], int(output_shape[axis]), order, prepad) for axis in range(3)]
    if source.dtype == np.bool_:
        source = source.view(np.uint8)
    return _tensor_zoom(source, *taps[0], *taps[1], *taps[2], out, order > 0, rounding)


def zoom_like_scipy(
    data: np.ndarray,
    zoom: Sequence[float] | float | None = None,
    *,
    output_shape: Sequence[int] | None = None,
    order: int,
    mode: str = "nearest",
) -> np.ndarray:
    """`scipy.ndimage.zoom(data, zoom, order=order, mode="nearest")` for 3D arrays, bit for bit.

    Give either `zoom` (scipy's argument; the output shape is rounded from it) or `output_shape`
    (the zoom is then output/input per axis, as TotalSegmentator's target_shape path computes it).
    The result has the input's dtype like scipy (integers rounded half away from zero).
    """
    if mode != "nearest":
        raise ValueError(f"only mode='nearest' (TotalSegmentator's) is implemented, got {mode!r}")
    if not 0 <= order <= 5:
        raise ValueError(f"spline order must be 0..5, got {order}")
    if data.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {data.shape}")
    if (zoom is None) == (output_shape is None):
        raise ValueError("give exactly one of zoom or output_shape")
    if zoom is None:
        output_shape = tuple(int(n) for n in output_shape)
        zoom = np.array(output_shape) / np.array(data.shape)
    else:
        output_shape = zoom_output_shape(data.shape, zoom)
    factors = np.broadcast_to(np.asarray(zoom, dtype=np.float64), (3,))
    if np.all(factors == 1):
        return data.copy()
    out = np.zeros(output_shape, dtype=data.dtype)
    rounding = {"i": _SCIPY_SIGNED, "u": _SCIPY_UNSIGNED}.get(data.dtype.kind, _CAST)
    return _zoom_into(data, output_shape, order, out, rounding)


# --------------------------------------------------------------------------- change_spacing


def nifti_zooms(affine: np.ndarray) -> tuple[np.float32, np.float32, np.float32]:
    """The zooms nibabel stores for a freshly built Nifti1Image(data, affine): float32 column norms.

    TotalSegmentator rebuilds images from (data, affine) at almost every step, so these - not the
    input file's pixdim - are the zooms its change_spacing and crop addon see.
    """
    rzs = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(np.sqrt(np.sum(rzs * rzs, axis=0)).astype(np.float32))


def _spacing_and_zoom(
    shape: Sequence[int], zooms: Sequence[float], new_spacing, target_shape: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(header spacing, effective new spacing, zoom factors) exactly as resampling.change_spacing derives them."""
    img_spacing = np.array(zooms)
    if len(img_spacing) == 4:
        img_spacing = img_spacing[:3]
    if type(new_spacing) is float:
        new_spacing = [new_spacing] * 3
    new_spacing = np.array(new_spacing)
    if target_shape is not None:
        zoom = np.array(target_shape) / np.array(shape)
        new_spacing = img_spacing / zoom
    else:
        zoom = img_spacing / new_spacing
    return img_spacing, new_spacing, zoom


def change_spacing(
    data: np.ndarray,
    affine: np.ndarray,
    zooms: Sequence[float],
    new_spacing: float | Sequence[float],
    *,
    target_shape: Sequence[int] | None = None,
    order: int = 0,
    dtype: np.dtype | type | None = None,
    force_affine: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """TotalSegmentator's `resampling.change_spacing` (scipy path) on arrays: returns (data, affine).

    `zooms` must be the image's header zooms as nibabel reports them (float32; see `nifti_zooms`),
    because the zoom factors are computed from them. Semantics kept from upstream:

    * spacing equal to the header zooms (after float32 -> float64 promotion) returns `data` and
      `affine` untouched - no resampling, no dtype cast, and `force_affine` is NOT applied;
    * with `target_shape` the zoom is target/shape and the spacing follows from it;
    * affine columns are divided by the zoom factors, then `force_affine` replaces the result;
    * interpolation runs in float64 (like get_fdata), then `.astype(dtype)` truncates toward zero
      (dtype None keeps float64);
    * 4D data is resampled volume by volume with the first three zooms.
    """
    img_spacing, new_spacing_arr, zoom = _spacing_and_zoom(data.shape, zooms, new_spacing, target_shape)
    if np.array_equal(img_spacing, new_spacing_arr):
        return data, affine
    new_affine = np.array(affine, dtype=np.float64, copy=True)
    for axis in range(3):
        new_affine[:3, axis] = new_affine[:3, axis] / zoom[axis]
    out_dtype = np.dtype(np.float64 if dtype is None else dtype)
    factors = np.broadcast_to(np.asarray(zoom, dtype=np.float64), (3,))
    volumes = [data] if data.ndim == 3 else [data[..., index] for index in range(data.shape[3])]
    resampled = []
    for volume in volumes:
        output_shape = zoom_output_shape(volume.shape, factors)
        out = np.empty(output_shape, dtype=out_dtype)
        if np.all(factors == 1):
            out[...] = volume
        else:
            _zoom_into(volume, output_shape, order, out, _CAST)
        resampled.append(out)
    new_data = resampled[0] if data.ndim == 3 else np.stack(resampled, axis=-1)
    if force_affine is not None:
        new_affine = force_affine
    return new_data, new_affine


# --------------------------------------------------------------------------- orientation


def as_closest_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """nibabel.as_closest_canonical on (data, affine): RAS-closest axis order; identity returns inputs as they are.

    The data comes back as a view (transposes/flips). The new zooms are `nifti_zooms(new_affine)`.
    """
    return _reorient(data, affine, io_orientation(affine))


def undo_canonical(data: np.ndarray, affine: np.ndarray, original_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TotalSegmentator's alignment.undo_canonical: reorient canonical (data, affine) back to the original axes."""
    from_canonical = ornt_transform(axcodes2ornt("RAS"), io_orientation(original_affine))
    return _reorient(data, affine, from_canonical)


def _reorient(data: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SpatialImage.as_reoriented on arrays."""
    if np.array_equal(ornt, _IDENTITY_ORNT):
        return data, affine
    new_affine = np.asarray(affine).dot(inv_ornt_aff(ornt, data.shape))
    return apply_orientation(data, ornt), new_affine


# --------------------------------------------------------------------------- cropping

Bbox = list[list[int]]


def bbox_from_mask(mask: np.ndarray, *, outside_value: float = -900, addon: int | Sequence[int] = 0) -> Bbox:
    """cropping.get_bbox_from_mask: [[lo, hi)] per axis of voxels > outside_value, grown by `addon` voxels.

    An all-outside mask gives the whole image (upstream prints a warning); bounds are clipped to the shape.
    """
    if isinstance(addon, (int, np.integer)):
        addon = [int(addon)] * 3
    foreground = mask > outside_value
    bbox = []
    for axis in range(3):
        other_axes = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(foreground.any(axis=other_axes))
        if present.size == 0:
            bbox = [[0, mask.shape[a]] for a in range(3)]
            break
        bbox.append([int(present[0]) - int(addon[axis]), int(present[-1]) + 1 + int(addon[axis])])
    return [[max(0, lo), min(mask.shape[axis], hi)] for axis, (lo, hi) in enumerate(bbox)]


def crop_addon_voxels(addon_mm: Sequence[float], zooms: Sequence[float]) -> np.ndarray:
    """Millimetres to voxels like crop_to_mask: divide by the (float32) header zooms, truncate."""
    return (np.array(addon_mm) / np.array(zooms)).astype(int)


def crop_to_bbox(data: np.ndarray, affine: np.ndarray, bbox: Bbox, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """cropping.crop_to_bbox_nifti: slice the box, move the origin to its first voxel, cast with astype."""
    cropped = data[bbox[0][0] : bbox[0][1], bbox[1][0] : bbox[1][1], bbox[2][0] : bbox[2][1]]
    if dtype is not None:
        cropped = cropped.astype(dtype)
    new_affine = np.array(affine, dtype=np.float64, copy=True)
    new_affine[:3, 3] = np.dot(new_affine, np.array([bbox[0][0], bbox[1][0], bbox[2][0], 1]))[:3]
    return cropped, new_affine


def crop_to_mask(
    data: np.ndarray,
    affine: np.ndarray,
    zooms: Sequence[float],
    mask: np.ndarray,
    addon_mm: Sequence[float] = (0, 0, 0),
    dtype=None,
) -> tuple[np.ndarray, np.ndarray, Bbox]:
    """cropping.crop_to_mask: box of mask > 0 plus `addon_mm` (converted with the header `zooms`).

    TotalSegmentator passes dtype=np.int32 for the image (so float intensities are truncated toward
    zero) and np.uint8 for a cascade mask. Returns (cropped data, cropped affine, bbox).
    """
    bbox = bbox_from_mask(mask, outside_value=0, addon=crop_addon_voxels(addon_mm, zooms))
    cropped, new_affine = crop_to_bbox(data, affine, bbox, dtype)
    return cropped, new_affine, bbox


def undo_crop(data: np.ndarray, full_shape: Sequence[int], bbox: Bbox, dtype=np.float64) -> np.ndarray:
    """cropping.undo_crop: paste `data` at `bbox` into zeros of `full_shape` (upstream: float64 zeros)."""
    full = np.zeros(tuple(full_shape), dtype=dtype)
    full[bbox[0][0] : bbox[0][1], bbox[1][0] : bbox[1][1], bbox[2][0] : bbox[2][1]] = data
    return full


# --------------------------------------------------------------------------- triple split along z


def should_split(shape: Sequence[int], *, multimodel: bool, force_split: bool = False, cascade: bool = False) -> bool:
    """Whether nnUNet_predict_image predicts the resampled image in three z parts."""
    split = bool(np.prod(shape) > TRIPLE_SPLIT_VOXEL_THRESHOLD and shape[2] > TRIPLE_SPLIT_MIN_Z and multimodel)
    if force_split:
        split = True
    if cascade:
        split = False
    return split


def split_in_three_along_z(shape: Sequence[int]) -> list[slice]:
    """The z slices of the three overlapping parts (third = z // 3, margin 20), exactly as upstream slices.

    Upstream uses plain Python slices, so for z < 21 (force_split on a tiny image) the middle
    part's start is negative and counts from the end; we keep that.
    """
    third = shape[2] // 3
    margin = TRIPLE_SPLIT_MARGIN
    return [
        slice(None, third + margin),
        slice(third + 1 - margin, third * 2 + margin),
        slice(third * 2 + 1 - margin, None),
    ]


def combine_three_parts(parts: Sequence[np.ndarray], shape: Sequence[int], dtype=np.uint8) -> np.ndarray:
    """Reassemble the three part predictions: each part loses its overlap, as nnUNet_predict_image does."""
    third = shape[2] // 3
    margin = TRIPLE_SPLIT_MARGIN
    combined = np.zeros(tuple(shape), dtype=dtype)
    combined[:, :, :third] = parts[0][:, :, :-margin]
    combined[:, :, third : third * 2] = parts[1][:, :, margin - 1 : -margin]
    combined[:, :, third * 2 :] = parts[2][:, :, margin - 1 :]
    return combined
