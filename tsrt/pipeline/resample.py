"""Resampling to a new voxel grid, numerically equal to nnU-Net's `resample_data_or_seg_to_shape`.

nnU-Net resamples image data (order 3) at preprocessing and predicted probabilities (order 1) at
export with skimage's `resize(mode='edge', anti_aliasing=False)` on every channel, or - for
anisotropic spacings - on every slice across the low-resolution axis followed by
`scipy.ndimage.map_coordinates(order=order_z, mode='nearest')` along it. Those are dense
tensor-product interpolations that are slow; this module reproduces them separably, one axis at
a time, in numba. The semantics it reproduces (scipy 1.17 / skimage 0.26):

* Sample positions: output index o of an axis of length n_in -> n_out reads input coordinate
  ``(o + 0.5) * (n_in / n_out) - 0.5`` (skimage calls `ndimage.zoom(grid_mode=True)`; nnU-Net
  builds the same coordinates for map_coordinates), clamped into ``[0, n_in - 1]`` (ndimage
  mode 'nearest', which is what skimage's 'edge' becomes).
* Order 0 takes input index ``floor(coordinate + 0.5)`` (ties round up); order 1 is linear.
* Order 3 is a cubic B-spline. Its prefilter is the causal/anti-causal recursive filter, but
  for mode 'nearest' scipy first pads each axis with 12 copies of the edge sample and then runs
  the filter with *mirror* boundary initialisation on the padded line; we do exactly that.
* skimage clips the result to the [min, max] of the array it was given: the whole channel, or -
  with a separate z axis - each slice on its own. Orders 0 and 1 are convex combinations, so the
  clip only matters (and is only applied) for order 3.
* An axis whose size does not change is left alone (B-spline interpolation at the knots is the
  identity), and an input whose shape already equals the target is returned as it is.

Everything is computed in float64 like nnU-Net; only the final result is cast to `out_dtype`.
Results equal nnU-Net's up to float64 rounding (the tensor product is evaluated in a different
order), not bit for bit.

Streaming: `resample_slab` produces output rows [start, stop) along the first spatial axis from
just the input rows `input_rows_needed` names. That is exact only for orders <= 1, which are
local; the order-3 prefilter is a global recursive filter along every axis, so order 3 is
refused there (use `resample_to_shape` on the whole volume).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numba
import numpy as np

#: The single pole of the cubic B-spline prefilter, sqrt(3) - 2 (as scipy writes it).
_CUBIC_POLE = -0.267949192431122706472553658494127633
#: scipy pads each axis by this many edge copies before prefiltering in mode 'nearest'.
_SPLINE_PAD = 12
#: scipy sums the causal initialisation over the whole padded line; terms past |pole|**35
#: (~1e-20 relative) cannot change a float64 sum, so we stop there.
_CAUSAL_INIT_TERMS = 35
#: How many lines a numba job resamples side by side.
_PANEL_WIDTH = 64
#: Relative cost of a pass along the last axis (its lines are strided and must be transposed).
_LAST_AXIS_PASS_COST = 1.5
SUPPORTED_ORDERS = (0, 1, 3)


# --------------------------------------------------------------------------- public helpers


def compute_new_shape(
    old_shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[int, ...]:
    """Target shape for a new spacing: round(old_spacing / new_spacing * old_shape), as nnU-Net.

    Python's round is round-half-to-even, which is what nnU-Net gets too.
    """
    if not len(old_shape) == len(old_spacing) == len(new_spacing):
        raise ValueError(f"shape {old_shape}, spacing {old_spacing} and new spacing {new_spacing} differ in length")
    return tuple(
        int(round(float(sp_old) / float(sp_new) * int(n)))
        for n, sp_old, sp_new in zip(old_shape, old_spacing, new_spacing)
    )


def _lowres_axis(spacing: Sequence[float]) -> int | None:
    """The one axis with the largest spacing, or None when two or more axes share it (nnU-Net)."""
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    axes = np.flatnonzero(max(spacing_arr) / spacing_arr == 1)
    return int(axes[0]) if len(axes) == 1 else None


def _is_anisotropic(spacing: Sequence[float], threshold: float) -> bool:
    return bool(np.max(spacing) / np.min(spacing) > threshold)


def separate_z_axis(
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    force_separate_z: bool | None,
    threshold: float = 3.0,
) -> int | None:
    """The axis nnU-Net resamples separately (with order_z), or None for one joint resize.

    Mirrors `determine_do_sep_z_and_axis`: a forced decision uses the current spacing's low-res
    axis; otherwise the current spacing is checked for anisotropy first, then the new one. When
    the largest spacing is shared by several axes nothing is done separately.
    """
    if force_separate_z is not None:
        return _lowres_axis(current_spacing) if force_separate_z else None
    if _is_anisotropic(current_spacing, threshold):
        return _lowres_axis(current_spacing)
    if _is_anisotropic(new_spacing, threshold):
        return _lowres_axis(new_spacing)
    return None


# --------------------------------------------------------------------------- per-axis taps


def _mirror_index(index: np.ndarray, length: int) -> np.ndarray:
    """scipy's out-of-range tap mapping (whole-sample mirror), used for taps past the edge."""
    if length <= 1:
        return np.zeros_like(index)
    period = 2 * length - 2
    low = index < 0
    folded = np.where(low, period * (-index // period) + index, index)
    folded = np.where(low, np.where(folded <= 1 - length, folded + period, -folded), folded)
    high = folded >= length
    folded = np.where(high, folded - period * (folded // period), folded)
    return np.where(high & (folded >= length), period - folded, folded)


def _axis_taps(
    in_size: int, out_size: int, order: int, out_start: int = 0, out_stop: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Input index and weight of each tap of output samples [out_start, out_stop) along one axis.

    For order 3 the indices address the spline coefficients of the line padded by _SPLINE_PAD
    edge copies on each side, as scipy does. Zero-weight taps are pointed at the sample's first
    tap so that they never widen the input window a slab needs.
    """
    if order not in SUPPORTED_ORDERS:
        raise ValueError(f"Interpolation order {order} is not supported (supported: {SUPPORTED_ORDERS}).")
    out_stop = out_size if out_stop is None else out_stop
    pad = _SPLINE_PAD if order > 1 else 0
    length = in_size + 2 * pad
    out_index = np.arange(out_start, out_stop, dtype=np.float64)
    coord = (out_index + 0.5) * (in_size / out_size) - 0.5 + pad
    coord = np.clip(coord, 0.0, length - 1.0)
    if order % 2:
        base = np.floor(coord)
    else:
        base = np.floor(coord + 0.5)
    first = base.astype(np.int64) - order // 2
    index = _mirror_index(first[:, None] + np.arange(order + 1), length)

    frac = coord - base
    if order == 0:
        weights = np.ones((len(coord), 1))
    elif order == 1:
        w0 = 1.0 - frac
        weights = np.stack([w0, 1.0 - w0], axis=1)
    else:  # cubic B-spline, evaluated the way scipy's get_spline_interpolation_weights does
        y, z = frac, 1.0 - frac
        w1 = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0
        w2 = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
        w0 = z * z * z / 6.0
        weights = np.stack([w0, w1, w2, 1.0 - w0 - w1 - w2], axis=1)
    index = np.where(weights == 0.0, index[:, :1], index)
    return np.ascontiguousarray(index, dtype=np.int64), np.ascontiguousarray(weights, dtype=np.float64)


def input_rows_needed(out_start: int, out_stop: int, in_size: int, out_size: int, order: int) -> tuple[int, int]:
    """Input rows [in_start, in_stop) that output rows [out_start, out_stop) of one axis read.

    Exact for orders 0 and 1. Order 3 needs the whole axis, since its prefilter is global. When
    streaming a separate-z resampling, pass max(order, order_z): order 1 reads a superset of the
    rows order 0 reads.
    """
    if not 0 <= out_start <= out_stop <= out_size:
        raise ValueError(f"Output rows [{out_start}, {out_stop}) are not within [0, {out_size}).")
    if out_start == out_stop:
        return 0, 0
    if in_size == out_size:
        return out_start, out_stop
    if order > 1:
        return 0, in_size
    index, _ = _axis_taps(in_size, out_size, order, out_start, out_stop)
    return int(index.min()), int(index.max()) + 1


# --------------------------------------------------------------------------- numba kernels


@numba.njit(cache=True)
def _prefilter_panel(panel: np.ndarray) -> None:
    """Cubic B-spline prefilter of every column of a (length, k) panel, in place.

    Causal then anti-causal recursion with scipy's mirror-boundary initialisation; the columns
    are independent, so the inner loops vectorise.
    """
    length, width = panel.shape
    z = _CUBIC_POLE
    z_last = z ** (length - 1)
    acc = np.empty(width)
    for j in range(width):
        acc[j] = panel[0, j] + z_last * panel[length - 1, j]
    z_i = z
    for i in range(1, min(length - 2, _CAUSAL_INIT_TERMS) + 1):
        for j in range(width):
            acc[j] += z_i * (panel[i, j] + z_last * panel[length - 1 - i, j])
        z_i *= z
    for j in range(width):
        panel[0, j] = acc[j] / (1.0 - z_last * z_last)
    for i in range(1, length):
        for j in range(width):
            panel[i, j] += z * panel[i - 1, j]
    for j in range(width):
        panel[length - 1, j] = (z * panel[length - 2, j] + panel[length - 1, j]) * z / (z * z - 1.0)
    for i in range(length - 2, -1, -1):
        for j in range(width):
            panel[i, j] = z * (panel[i + 1, j] - panel[i, j])


@numba.njit(cache=True)
def _resample_panel(panel: np.ndarray, index: np.ndarray, weights: np.ndarray, prefilter: bool) -> np.ndarray:
    """Resample every column of a (length, k) panel of padded lines; returns (n_out, k)."""
    if prefilter:
        _prefilter_panel(panel)
    n_out, n_taps = index.shape
    width = panel.shape[1]
    resampled = np.empty((n_out, width))
    for o in range(n_out):
        row = resampled[o]
        w = weights[o, 0]
        tap = panel[index[o, 0]]
        for j in range(width):
            row[j] = w * tap[j]
        for t in range(1, n_taps):
            w = weights[o, t]
            tap = panel[index[o, t]]
            for j in range(width):
                row[j] += w * tap[j]
    return resampled


@numba.njit(parallel=True, cache=True)
def _resample_lines(src: np.ndarray, index: np.ndarray, weights: np.ndarray, pad: int, prefilter: bool) -> np.ndarray:
    """Resample axis 1 of a (pre, n, post) array: out[p, o, q] = sum_t weights[o, t] * line[index[o, t]].

    `line` is the (p, q) line edge-padded by `pad` and, if `prefilter`, turned into cubic
    B-spline coefficients (scipy's mode 'nearest': edge padding, then the mirror-boundary
    filter). Lines are gathered side by side into panels - neighbouring q of one p, or, for the
    last axis (post == 1), neighbouring p - so recursions and tap sums run over contiguous
    memory whichever axis is resampled, and the coefficients stay in the cache.
    """
    pre, n, post = src.shape
    length = n + 2 * pad
    n_out = index.shape[0]
    dst = np.empty((pre, n_out, post))
    gain = (1.0 - _CUBIC_POLE) * (1.0 - 1.0 / _CUBIC_POLE) if prefilter else 1.0
    if post == 1:
        n_panels = (pre + _PANEL_WIDTH - 1) // _PANEL_WIDTH
        for panel_id in numba.prange(n_panels):
            p0 = panel_id * _PANEL_WIDTH
            width = min(_PANEL_WIDTH, pre - p0)
            panel = np.empty((length, width))
            for j in range(width):
                for i in range(length):
                    panel[i, j] = src[p0 + j, min(max(i - pad, 0), n - 1), 0] * gain
            resampled = _resample_panel(panel, index, weights, prefilter)
            for j in range(width):
                for o in range(n_out):
                    dst[p0 + j, o, 0] = resampled[o, j]
    else:
        panels_per_row = (post + _PANEL_WIDTH - 1) // _PANEL_WIDTH
        for panel_id in numba.prange(pre * panels_per_row):
            p = panel_id // panels_per_row
            q0 = (panel_id % panels_per_row) * _PANEL_WIDTH
            width = min(_PANEL_WIDTH, post - q0)
            panel = np.empty((length, width))
            for i in range(length):
                line = src[p, min(max(i - pad, 0), n - 1)]
                for j in range(width):
                    panel[i, j] = line[q0 + j] * gain
            resampled = _resample_panel(panel, index, weights, prefilter)
            for o in range(n_out):
                out_row = dst[p, o]
                for j in range(width):
                    out_row[q0 + j] = resampled[o, j]
    return dst


# --------------------------------------------------------------------------- orchestration


def _as_3d(volume: np.ndarray, axis: int) -> np.ndarray:
    """View a C-contiguous volume as (before axis, axis, after axis) for the kernels."""
    shape = volume.shape
    return volume.reshape(int(np.prod(shape[:axis], dtype=np.int64)), shape[axis], -1)


def _resample_axis(volume: np.ndarray, axis: int, index: np.ndarray, weights: np.ndarray, order: int) -> np.ndarray:
    """Resample one axis of a float64 C-contiguous volume with precomputed taps."""
    pad = _SPLINE_PAD if order > 1 else 0
    out = _resample_lines(_as_3d(volume, axis), index, weights, pad, order > 1)
    new_shape = list(volume.shape)
    new_shape[axis] = index.shape[0]
    return out.reshape(new_shape)


def _clip_range(channel: np.ndarray, per_slice_axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """skimage's clip bounds: min/max of the whole channel, or of each slice across an axis (NaN-aware)."""
    if per_slice_axis is None:
        reduce_axes: tuple[int, ...] | None = None
    else:
        reduce_axes = tuple(a for a in range(channel.ndim) if a != per_slice_axis)
    low = np.min(channel, axis=reduce_axes, keepdims=True)
    high = np.max(channel, axis=reduce_axes, keepdims=True)
    if np.isnan(low).any():
        low = np.nanmin(channel, axis=reduce_axes, keepdims=True)
        high = np.nanmax(channel, axis=reduce_axes, keepdims=True)
    return low, high


def _validate(data: np.ndarray, new_shape: Sequence[int], current_spacing, new_spacing, order: int, order_z: int) -> None:
    spatial = data.ndim - 1
    if spatial not in (2, 3):
        raise ValueError(f"Expected data shaped (C, X, Y) or (C, X, Y, Z), got {data.shape}.")
    if not len(new_shape) == len(current_spacing) == len(new_spacing) == spatial:
        raise ValueError(
            f"new_shape {tuple(new_shape)}, spacings {tuple(current_spacing)} / {tuple(new_spacing)} "
            f"do not match data with {spatial} spatial axes."
        )
    if any(int(s) < 1 for s in new_shape) or 0 in data.shape:
        raise ValueError(f"Cannot resample {data.shape} to {tuple(new_shape)}: empty axis.")
    for name, value in (("order", order), ("order_z", order_z)):
        if value not in SUPPORTED_ORDERS:
            raise ValueError(f"{name}={value} is not supported (supported: {SUPPORTED_ORDERS}).")


def _pass_order(axes: Sequence[int], shape: Sequence[int], new_shape: Sequence[int]) -> list[int]:
    """The order of per-axis passes that moves the least memory.

    Each pass reads and writes the whole intermediate volume, so shrinking axes go first and
    growing ones last; a pass along the last (contiguous) axis has to transpose its lines, so it
    counts extra. The result only differs from any other order by float rounding.
    """

    def cost(permutation: tuple[int, ...]) -> float:
        current, total = list(shape), 0.0
        for axis in permutation:
            size_before = math.prod(current)
            current[axis] = new_shape[axis]
            weight = _LAST_AXIS_PASS_COST if axis == len(shape) - 1 else 1.0
            total += (size_before + math.prod(current)) * weight
        return total

    return list(min(itertools.permutations(axes), key=cost))


def _resample(
    data: np.ndarray,
    in_row_start: int,
    in_shape: tuple[int, ...],
    new_shape: tuple[int, ...],
    out_rows: tuple[int, int],
    sep_axis: int | None,
    order: int,
    order_z: int,
    out_dtype,
) -> np.ndarray:
    """Shared engine: `data` holds input rows [in_row_start, ...) of a volume of shape in_shape.

    Every axis whose size changes gets one pass (order_z for the separate axis, `order` for the
    others). For order 3, skimage's clip must come after the in-plane passes - per slice when
    there is a separate axis, which is then resampled last - or at the very end otherwise.
    Passes are linear and act on different axes, so otherwise their order is free.
    """
    rows_in_slab = (out_rows[0] - in_row_start, out_rows[1] - in_row_start)
    axis_order = {axis: (order_z if axis == sep_axis else order) for axis in range(len(in_shape))}
    clips = order > 1
    changing = [axis for axis in range(len(in_shape)) if in_shape[axis] != new_shape[axis]]
    # Planned on the whole volume, so that slabs are bit-identical to a whole-volume run.
    if clips and sep_axis in changing:
        passes = _pass_order([a for a in changing if a != sep_axis], in_shape, new_shape) + [sep_axis]
    else:
        passes = _pass_order(changing, in_shape, new_shape)
    clip_after = len(passes) - (1 if clips and sep_axis in changing else 0)

    taps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for axis in passes:
        if axis == 0:
            index, weights = _axis_taps(in_shape[0], new_shape[0], axis_order[0], *out_rows)
            rows_available = data.shape[1] + (2 * _SPLINE_PAD if axis_order[0] > 1 else 0)
            index = index - in_row_start
            if index.size and (index.min() < 0 or index.max() >= rows_available):
                raise ValueError(
                    f"Input rows [{in_row_start}, {in_row_start + data.shape[1]}) do not cover what output rows "
                    f"{list(out_rows)} need; see input_rows_needed."
                )
            taps[0] = (index, weights)
        else:
            taps[axis] = _axis_taps(in_shape[axis], new_shape[axis], axis_order[axis])

    out = np.empty((data.shape[0], out_rows[1] - out_rows[0], *new_shape[1:]), dtype=out_dtype)
    for c in range(data.shape[0]):
        volume = np.array(data[c], dtype=np.float64, order="C", copy=True)
        clip = _clip_range(volume, sep_axis) if clips else None
        if 0 not in changing:
            volume = volume[rows_in_slab[0] : rows_in_slab[1]]
        for step, axis in enumerate(passes):
            if step == clip_after and clip is not None:
                np.clip(volume, clip[0], clip[1], out=volume)
                clip = None
            volume = _resample_axis(np.ascontiguousarray(volume), axis, *taps[axis], axis_order[axis])
        if clip is not None:
            np.clip(volume, clip[0], clip[1], out=volume)
        out[c] = volume
    return out


def resample_to_shape(
    data: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = None,
    threshold: float = 3.0,
    out_dtype=np.float32,
) -> np.ndarray:
    """Resample (C, X, Y[, Z]) data to new_shape exactly as nnU-Net's `resample_data_or_seg_to_shape`
    does with is_seg=False (order 3 for images, order 1 for probabilities).

    Returns the input itself (cast to out_dtype if needed) when the shape does not change.
    """
    data = np.asarray(data)
    new_shape = tuple(int(s) for s in new_shape)
    _validate(data, new_shape, current_spacing, new_spacing, order, order_z)
    if tuple(data.shape[1:]) == new_shape:
        return data.astype(out_dtype, copy=False)
    sep_axis = separate_z_axis(current_spacing, new_spacing, force_separate_z, threshold)
    return _resample(
        data, 0, tuple(data.shape[1:]), new_shape, (0, new_shape[0]), sep_axis, order, order_z, out_dtype
    )


def resample_slab(
    data_rows: np.ndarray,
    in_row_start: int,
    in_shape: Sequence[int],
    out_start: int,
    out_stop: int,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    order: int = 1,
    order_z: int = 0,
    force_separate_z: bool | None = None,
    threshold: float = 3.0,
    out_dtype=np.float32,
) -> np.ndarray:
    """Output rows [out_start, out_stop) (first spatial axis) of `resample_to_shape`, from input rows only.

    `data_rows` is data[:, in_row_start:in_row_start + k] of a volume whose spatial shape is
    in_shape; it must cover `input_rows_needed(out_start, out_stop, in_shape[0], new_shape[0],
    max(order, order_z))`. Orders above 1 are refused: their prefilter is global.
    """
    data_rows = np.asarray(data_rows)
    in_shape = tuple(int(s) for s in in_shape)
    new_shape = tuple(int(s) for s in new_shape)
    _validate(data_rows, new_shape, current_spacing, new_spacing, order, order_z)
    if max(order, order_z) > 1:
        raise ValueError("Slab-wise resampling is exact only for order <= 1 (the order-3 prefilter is global).")
    if tuple(data_rows.shape[2:]) != in_shape[1:] or not 0 <= out_start <= out_stop <= new_shape[0]:
        raise ValueError(
            f"Slab {data_rows.shape} / output rows [{out_start}, {out_stop}) do not fit in_shape {in_shape} "
            f"-> new_shape {new_shape}."
        )
    sep_axis = separate_z_axis(current_spacing, new_spacing, force_separate_z, threshold)
    return _resample(
        data_rows, int(in_row_start), in_shape, new_shape, (int(out_start), int(out_stop)), sep_axis, order, order_z,
        out_dtype,
    )
