"""Gaussian-weighted sliding-window inference, streamed along the first axis to bound memory.

nnU-Net predicts a volume as overlapping patch-sized tiles, weights each tile's logits with a
Gaussian importance map (sigma = patch/8) and divides by the summed weights. The tile positions,
the padding and the map here are the same as nnU-Net's (`compute_steps_for_sliding_window`,
`pad_nd_image`, `compute_gaussian`), so the same tiles see the same voxels.

Unlike nnU-Net, which keeps a (classes x volume) buffer for the whole image, this module finalises
rows of the first axis as soon as no later tile can reach them and hands them to a callback
(argmax, region thresholds, or a collector). Peak memory is one slab of tiles, not the volume.

Memory, further: tiles are added to the buffer a few rows at a time; the float16 buffer is stored as
float16 (every value it holds is rounded to float16 anyway, so this is exact); an image of one tile
needs no buffer beyond those few rows; and with a `head` the network stops at its last features and
the 1x1x1 output convolution runs on those few rows, so a tile's logits (1 GB for 118 classes at
128^3) never exist at once.

Accumulation precision. nnU-Net accumulates the weighted logits, the weights, the division and the
fold average in float16 (computing each step in float32 and rounding it to float16). Where the
Gaussian weights are tiny (volume corners) that rounding visibly changes nnU-Net's logits, and near
ties it decides the argmax. `accumulation="float16"` (the default) reproduces those roundings
exactly, per fold, so tsrt's labels equal nnU-Net's; `"float32"` is the numerically cleaner option.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numba
import numpy as np

#: Called with (first_row, weighted_mean_logits[C, rows, ...]) for every finalised slab, in order.
SlabConsumer = Callable[[int, np.ndarray], None]


@dataclass(frozen=True)
class LabelSink:
    """Where a consumer that keeps only each voxel's argmax class takes it (first maximum on ties, numpy's rule).

    An image of one tile then goes from logits to labels in one pass: the weighted mean of a block of
    rows is compared class by class while it is in cache, and no float copy of the block is written
    (that copy and the separate argmax were most of a one-tile job's time outside the network).
    """

    dtype: type
    #: Called with (first_row, labels[rows, ...]) of the unpadded volume, in row order.
    take: Callable[[int, np.ndarray], None]

#: The network's pointwise output layer: features per fold (F, C_feat, rows, ...) -> logits (F, C_out, rows, ...).
HeadApplier = Callable[[np.ndarray], np.ndarray]
#: Runs the network(s) on a batch of tiles (N, C_in, *patch); returns logits per fold (F, N, C_out, *patch).
TilePredictor = Callable[[np.ndarray], np.ndarray]
ACCUMULATIONS = ("float16", "float32")
#: About how many bytes of normalised float32 logits are handed to the consumer at once.
EMIT_CHUNK_BYTES = 64 << 20
#: About how many bytes of float32 logits a tile's block of rows holds while it is added (with a head: made).
TILE_BLOCK_BYTES = 16 << 20


def compute_steps(image_size: Sequence[int], tile_size: Sequence[int], step_size: float) -> list[list[int]]:
    """Tile start positions per axis, as nnU-Net computes them (evenly spread, first at 0, last at the end)."""
    if not 0 < step_size <= 1:
        raise ValueError(f"step size must be in (0, 1], got {step_size}")
    steps = []
    for size, tile in zip(image_size, tile_size):
        if size < tile:
            raise ValueError(f"image size {size} is smaller than the tile {tile}; pad it first")
        n_steps = int(math.ceil((size - tile) / (tile * step_size))) + 1
        stride = (size - tile) / (n_steps - 1) if n_steps > 1 else 0.0
        # Python's round() is numpy's half-to-even, which nnU-Net's np.round uses too.
        steps.append([int(round(stride * i)) for i in range(n_steps)])
    return steps


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8, value_scaling: float = 10.0) -> np.ndarray:
    """nnU-Net's Gaussian tile weights: a blurred delta at the patch centre, max = `value_scaling`.

    nnU-Net builds it with scipy's gaussian_filter (truncate 4) in float64 and then casts it to
    float16; a blurred delta is exactly the outer product of the 1D kernels, and we round through
    float16 too so that the weights are bit-identical. Zeros become the smallest non-zero weight.

    Made once per patch size in a process (a task's models mostly share theirs; each map costs ~0.15 s and ~40 MB
    of float64 temporaries at 128^3); every call gets its own copy.
    """
    return _gaussian_importance_map(tuple(int(n) for n in patch_size), float(sigma_scale), float(value_scaling)).copy()


@functools.lru_cache(maxsize=4)
def _gaussian_importance_map(patch_size: tuple[int, ...], sigma_scale: float, value_scaling: float) -> np.ndarray:
    profiles = []
    for size in patch_size:
        sigma = size * sigma_scale
        radius = int(4.0 * sigma + 0.5)
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 / (sigma * sigma) * offsets.astype(np.float64) ** 2)
        kernel /= kernel.sum()
        profile = np.zeros(size, dtype=np.float64)
        centre = size // 2
        for offset, weight in zip(offsets, kernel):
            if 0 <= centre + offset < size:
                profile[centre + offset] = weight
        profiles.append(profile)
    weights = profiles[0]
    for profile in profiles[1:]:
        weights = np.multiply.outer(weights, profile)
    weights = weights / (weights.max() / value_scaling)
    weights = weights.astype(np.float16)
    weights[weights == 0] = weights[weights != 0].min()
    return weights.astype(np.float32)


def padding_for(shape: Sequence[int], patch_size: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) zero padding that makes each of the last axes at least the patch size, content centred."""
    pads = []
    for size, patch in zip(shape[len(shape) - len(patch_size):], patch_size):
        missing = max(patch - size, 0)
        pads.append((missing // 2, missing - missing // 2))
    return [(0, 0)] * (len(shape) - len(patch_size)) + pads


def mirror_combinations(axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """The flips nnU-Net's test-time augmentation averages: none, then every non-empty axis subset."""
    combos: list[tuple[int, ...]] = [()]
    if axes:
        for count in range(1, len(axes) + 1):
            combos.extend(itertools.combinations(axes, count))
    return combos


@dataclass(frozen=True)
class Tile:
    """One tile: its start per spatial axis of the padded volume (first axis first)."""

    start: tuple[int, ...]


def tile_positions(padded_shape: Sequence[int], patch_size: Sequence[int], step_size: float) -> list[Tile]:
    """All tiles in nnU-Net's order (first axis outermost). A 2D patch on a 3D volume tiles every slice."""
    if len(patch_size) == len(padded_shape) - 1:
        steps = compute_steps(padded_shape[1:], patch_size, step_size)
        return [Tile((d, *rest)) for d in range(padded_shape[0]) for rest in itertools.product(*steps)]
    steps = compute_steps(padded_shape, patch_size, step_size)
    return [Tile(start) for start in itertools.product(*steps)]


@numba.njit(cache=True, inline="always")
def round_to_half(values: np.ndarray) -> None:
    """Round float32 values in place to the nearest float16 value (ties to even), kept as float32.

    Bit-identical to `values.astype(np.float16).astype(np.float32)`, including subnormals and
    overflow to inf, but usable inside numba loops on a scratch row. The first loop is branch-free
    integer arithmetic on the bits (so it compiles to SIMD); the float16 subnormal range, which only
    the Gaussian's far corners reach, is left to a second loop that runs only when a row has one.
    """
    bits = values.view(np.uint32)
    tiny = np.uint32(0)
    for k in range(values.size):
        word = bits[k]
        magnitude = word & np.uint32(0x7FFFFFFF)
        lsb = (word >> np.uint32(13)) & np.uint32(1)
        rounded = (word + np.uint32(0xFFF) + lsb) & np.uint32(0xFFFFE000)
        if magnitude >= np.uint32(0x477FF000):  # rounds past 65504: inf (NaN stays NaN)
            rounded = (word & np.uint32(0x80000000)) | np.uint32(0x7F800000) if magnitude <= np.uint32(0x7F800000) else word
        if magnitude < np.uint32(0x38800000):  # below float16's normal range: second loop
            rounded = word
            tiny |= np.uint32(1)
        bits[k] = rounded
    if tiny:
        for k in range(values.size):
            value = values[k]
            magnitude_f = np.abs(value)
            if magnitude_f < np.float32(6.103515625e-05):
                # float16 subnormals are multiples of 2**-24, the spacing of float32 in [0.5, 1): adding and
                # removing 0.5 rounds to that grid, ties to even, exactly as the float16 cast does
                rounded_f = (magnitude_f + np.float32(0.5)) - np.float32(0.5)
                values[k] = -rounded_f if np.signbit(value) else rounded_f


@numba.njit(parallel=True, cache=True)
def _accumulate(acc, weight_acc, fold_logits, gaussian, x0, y0, z0, half):
    """acc[f, :, x0:, y0:, z0:] += fold_logits[f] * gaussian and weight_acc += gaussian, in place.

    With `half`, every sum is rounded to float16 as nnU-Net's float16 buffers do (computed in
    float32, then rounded), one z-row at a time through a scratch row.
    """
    n_folds, n_classes, px, py, pz = fold_logits.shape
    for i in numba.prange(px):
        row = np.empty(pz, dtype=np.float32)
        for j in range(py):
            for k in range(pz):
                row[k] = weight_acc[x0 + i, y0 + j, z0 + k] + gaussian[i, j, k]
            if half:
                round_to_half(row)
            for k in range(pz):
                weight_acc[x0 + i, y0 + j, z0 + k] = row[k]
            for f in range(n_folds):
                for c in range(n_classes):
                    for k in range(pz):
                        row[k] = acc[f, c, x0 + i, y0 + j, z0 + k] + fold_logits[f, c, i, j, k] * gaussian[i, j, k]
                    if half:
                        round_to_half(row)
                    for k in range(pz):
                        acc[f, c, x0 + i, y0 + j, z0 + k] = row[k]


@numba.njit(cache=True, inline="always")
def _load_half(stored, row):
    """row[k] = the float16 value whose bits are stored[k] (uint16), widened to float32 exactly."""
    bits = row.view(np.uint32)
    for k in range(row.size):
        word = np.uint32(stored[k])
        sign = (word & np.uint32(0x8000)) << np.uint32(16)
        exponent = (word >> np.uint32(10)) & np.uint32(0x1F)
        mantissa = word & np.uint32(0x3FF)
        if exponent == np.uint32(0x1F):  # inf, NaN
            bits[k] = sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13))
        elif exponent != np.uint32(0):
            bits[k] = sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))
        else:  # zero or subnormal: mantissa * 2**-24, exact in float32
            value = np.float32(mantissa) * np.float32(5.9604644775390625e-08)
            row[k] = -value if sign else value


@numba.njit(cache=True, inline="always")
def _store_half(row, stored):
    """stored[k] = the float16 bits of row[k], which `round_to_half` has already made a float16 value (exact)."""
    bits = row.view(np.uint32)
    for k in range(row.size):
        word = bits[k]
        sign = (word >> np.uint32(16)) & np.uint32(0x8000)
        magnitude = word & np.uint32(0x7FFFFFFF)
        if magnitude >= np.uint32(0x7F800000):  # inf, NaN (a NaN keeps a mantissa bit)
            nan = np.uint32(0x200) if magnitude > np.uint32(0x7F800000) else np.uint32(0)
            stored[k] = np.uint16(sign | np.uint32(0x7C00) | nan)
        elif magnitude >= np.uint32(0x38800000):  # normal float16 range
            stored[k] = np.uint16(sign | ((magnitude - np.uint32(0x38000000)) >> np.uint32(13)))
        else:  # zero or subnormal: a multiple of 2**-24
            stored[k] = np.uint16(sign | np.uint32(np.abs(row[k]) * np.float32(16777216.0)))


@numba.njit(parallel=True, cache=True)
def _accumulate_stored_half(acc, weight_acc, fold_logits, gaussian, x0, y0, z0):
    """`_accumulate` with `half` into buffers stored as float16 (given as their uint16 bits): each row is widened,
    summed and rounded exactly as there, and stored back, in one pass without float32 copies of the buffers."""
    n_folds, n_classes, px, py, pz = fold_logits.shape
    for i in numba.prange(px):
        row = np.empty(pz, dtype=np.float32)
        for j in range(py):
            weights = weight_acc[x0 + i, y0 + j, z0:z0 + pz]
            _load_half(weights, row)
            for k in range(pz):
                row[k] = row[k] + gaussian[i, j, k]
            round_to_half(row)
            _store_half(row, weights)
            for f in range(n_folds):
                for c in range(n_classes):
                    stored = acc[f, c, x0 + i, y0 + j, z0:z0 + pz]
                    _load_half(stored, row)
                    for k in range(pz):
                        row[k] = row[k] + fold_logits[f, c, i, j, k] * gaussian[i, j, k]
                    round_to_half(row)
                    _store_half(row, stored)


@numba.njit(cache=True, inline="always")
def _add_fold(total, row, fold, half):
    """Add fold `fold`'s weight-normalised row to the running fold sum, rounded as nnU-Net's float16 buffers are."""
    if half:
        round_to_half(row)
    for k in range(row.size):
        total[k] = row[k] if fold == 0 else total[k] + row[k]
    if half and fold > 0:
        round_to_half(total)


@numba.njit(cache=True, inline="always")
def _finish_fold_mean(total, n_folds, half):
    """Divide the fold sum by the fold count (rounded with `half`); one fold is its own mean."""
    if n_folds > 1:
        for k in range(total.size):
            total[k] = total[k] / np.float32(n_folds)
        if half:
            round_to_half(total)


@numba.njit(parallel=True, cache=True)
def _normalize_rows(acc, weight_acc, rows, half):
    """Weighted mean over tiles, then the mean over folds, for rows [0, rows); returns (C, rows, Y, Z).

    The float16 path follows nnU-Net's order: each fold divided by the weights (rounded), folds
    summed (rounded after each), then divided by the fold count (rounded).
    """
    n_folds, n_classes = acc.shape[0], acc.shape[1]
    _, ny, nz = weight_acc.shape
    out = np.empty((n_classes, rows, ny, nz), dtype=np.float32)
    for i in numba.prange(rows):
        row = np.empty(nz, dtype=np.float32)
        total = np.empty(nz, dtype=np.float32)
        for c in range(n_classes):
            for j in range(ny):
                for f in range(n_folds):
                    for k in range(nz):
                        row[k] = acc[f, c, i, j, k] / weight_acc[i, j, k]
                    _add_fold(total, row, f, half)
                _finish_fold_mean(total, n_folds, half)
                for k in range(nz):
                    out[c, i, j, k] = total[k]
    return out


@numba.njit(cache=True, inline="always")
def _one_tile_weight_row(gaussian, i, j, weight, half):
    """The weight row (i, j) of a lone tile: 0 + g, rounded to float16 with `half`, as the buffer would hold it."""
    for k in range(weight.size):
        weight[k] = np.float32(0.0) + gaussian[i, j, k]
    if half:
        round_to_half(weight)


@numba.njit(cache=True, inline="always")
def _one_tile_class_row(fold_logits, gaussian, weight, c, i, j, row, total, half):
    """total = class `c`'s weighted mean on row (i, j) of a lone tile: `_accumulate` into a zeroed buffer and
    `_normalize_rows`, step for step (0 + logit * g rounded with `half`, the division, the fold mean)."""
    n_folds = fold_logits.shape[0]
    for f in range(n_folds):
        for k in range(row.size):
            row[k] = np.float32(0.0) + fold_logits[f, c, i, j, k] * gaussian[i, j, k]
        if half:
            round_to_half(row)
        for k in range(row.size):
            row[k] = row[k] / weight[k]
        _add_fold(total, row, f, half)
    _finish_fold_mean(total, n_folds, half)


@numba.njit(parallel=True, cache=True)
def _one_tile_mean(fold_logits, gaussian, half):
    """(C, rows, Y, Z) weighted mean of rows that one tile alone covers: what `_accumulate` into a zeroed
    buffer followed by `_normalize_rows` gives, bit for bit, in one pass without the buffer.

    Every step keeps the buffered path's arithmetic (0 + logit * weight, the weight 0 + g, each rounded
    to float16 with `half`, then the division and the fold mean), so the masks do not change.
    """
    n_folds, n_classes, px, py, pz = fold_logits.shape
    out = np.empty((n_classes, px, py, pz), dtype=np.float32)
    for i in numba.prange(px):
        weight = np.empty(pz, dtype=np.float32)
        row = np.empty(pz, dtype=np.float32)
        total = np.empty(pz, dtype=np.float32)
        for j in range(py):
            _one_tile_weight_row(gaussian, i, j, weight, half)
            for c in range(n_classes):
                _one_tile_class_row(fold_logits, gaussian, weight, c, i, j, row, total, half)
                for k in range(pz):
                    out[c, i, j, k] = total[k]
    return out


def one_tile_mean(fold_logits: np.ndarray, gaussian: np.ndarray, half: bool) -> np.ndarray:
    """Weighted mean logits (C, rows, ...) of a block of rows of the only tile of an image, fold_logits (F, C, rows, ...).

    An image of one tile needs no accumulation buffer: nothing overlaps it. float32 accumulation averages
    the folds before weighting, as the buffered path does.
    """
    if not half and fold_logits.shape[0] > 1:
        fold_logits = fold_logits.mean(axis=0, keepdims=True, dtype=np.float32)
    return _one_tile_mean(np.ascontiguousarray(fold_logits, dtype=np.float32), gaussian, half)


@numba.njit(parallel=True, cache=True)
def _one_tile_labels(fold_logits, gaussian, half, labels):
    """labels[rows, Y, Z] = argmax over classes of `_one_tile_mean`'s values, first maximum on ties.

    Each class's weighted-mean row is computed with `_one_tile_mean`'s arithmetic and compared at once, so
    the labels are those of `_one_tile_mean` followed by the argmax, bit for bit. Parallel over (row, y)
    pairs: a block of a few rows still keeps both cores busy.
    """
    n_folds, n_classes, px, py, pz = fold_logits.shape
    for ij in numba.prange(px * py):
        i, j = ij // py, ij % py
        weight = np.empty(pz, dtype=np.float32)
        row = np.empty(pz, dtype=np.float32)
        total = np.empty(pz, dtype=np.float32)
        best = np.empty(pz, dtype=np.float32)
        _one_tile_weight_row(gaussian, i, j, weight, half)
        for c in range(n_classes):
            _one_tile_class_row(fold_logits, gaussian, weight, c, i, j, row, total, half)
            for k in range(pz):
                if c == 0 or total[k] > best[k]:
                    best[k] = total[k]
                    labels[i, j, k] = c


def one_tile_labels(fold_logits: np.ndarray, gaussian: np.ndarray, half: bool, dtype: type) -> np.ndarray:
    """Argmax labels (rows, ...) of a block of rows of the only tile of an image: `one_tile_mean` then argmax, fused."""
    if not half and fold_logits.shape[0] > 1:
        fold_logits = fold_logits.mean(axis=0, keepdims=True, dtype=np.float32)
    labels = np.empty(fold_logits.shape[2:], dtype=dtype)
    _one_tile_labels(np.ascontiguousarray(fold_logits, dtype=np.float32), gaussian, half, labels)
    return labels


class _SlabAccumulator:
    """Weighted-logit buffer covering rows [first_row, first_row + capacity) of the padded volume.

    float16 accumulation keeps one buffer per fold (nnU-Net normalises each fold before averaging);
    float32 accumulation averages the folds per tile and keeps one buffer. With `store_half` the float16
    buffers are stored as float16 (half the memory; exact, since every sum is rounded to float16): a tile is
    added row by row, each row widened to float32 for the arithmetic and stored back (`_accumulate_stored_half`),
    and each normalised block of rows is widened to float32.
    """

    def __init__(
        self, n_folds: int, n_outputs: int, padded_shape: Sequence[int], capacity: int, half: bool, store_half: bool
    ):
        self.first_row = 0
        self.half = half
        buffers = n_folds if half else 1
        dtype = np.float16 if half and store_half else np.float32
        self.logits = np.zeros((buffers, n_outputs, capacity, *padded_shape[1:]), dtype=dtype)
        self.weights = np.zeros((capacity, *padded_shape[1:]), dtype=dtype)

    def add(self, fold_logits: np.ndarray, gaussian: np.ndarray, start: Sequence[int]) -> None:
        """fold_logits: (F, C, rows, ...) of one tile (or a block of its rows) starting at `start`."""
        if not self.half and fold_logits.shape[0] > 1:
            fold_logits = fold_logits.mean(axis=0, keepdims=True, dtype=np.float32)
        fold_logits = np.ascontiguousarray(fold_logits, dtype=np.float32)
        x0 = start[0] - self.first_row
        if self.logits.dtype == np.float32:
            _accumulate(self.logits, self.weights, fold_logits, gaussian, x0, start[1], start[2], self.half)
            return
        _accumulate_stored_half(self.logits.view(np.uint16), self.weights.view(np.uint16), fold_logits, gaussian, x0,
                                start[1], start[2])

    def normalized(self, begin: int, end: int) -> np.ndarray:
        """The weight-normalised logits of rows [begin, end) (padded-volume rows, all inside the buffer)."""
        lo, hi = begin - self.first_row, end - self.first_row
        logits, weights = self.logits[:, :, lo:hi], self.weights[lo:hi]
        if logits.dtype != np.float32:
            logits, weights = logits.astype(np.float32), weights.astype(np.float32)
        return _normalize_rows(logits, weights, hi - lo, self.half)

    def forget(self, upto_row: int) -> None:
        """Shift the buffer so rows before `upto_row` are dropped and new rows start at zero."""
        rows = upto_row - self.first_row
        if rows <= 0:
            return
        keep = self.logits.shape[2] - rows
        self.logits[:, :, :keep] = self.logits[:, :, rows:]
        self.logits[:, :, keep:] = 0
        self.weights[:keep] = self.weights[rows:]
        self.weights[keep:] = 0
        self.first_row = upto_row


def _batches(items: Sequence[Tile], size: int) -> Iterator[list[Tile]]:
    for begin in range(0, len(items), size):
        yield list(items[begin : begin + size])


def sliding_window_inference(
    data: np.ndarray,
    predict_tiles: TilePredictor,
    patch_size: Sequence[int],
    n_outputs: int,
    consume_slab: SlabConsumer,
    *,
    step_size: float = 0.5,
    batch_size: int = 1,
    mirror_axes: Sequence[int] | None = None,
    accumulation: str = "float16",
    progress: Callable[[int], None] | None = None,
    head: HeadApplier | None = None,
    labels: LabelSink | None = None,
) -> None:
    """Predict `data` tile by tile and hand finalised, weight-normalised logits to `consume_slab`.

    Args:
        data: preprocessed image, (channels, X, Y, Z) float32 in nnU-Net's transposed axis order.
        predict_tiles: the network of every fold: batch of tiles in, logits per fold out.
        patch_size: the network's tile size; 2 entries for a 2d configuration (tiles every X slice).
        n_outputs: number of output channels (classes or regions).
        consume_slab: receives (first_row, logits[C, rows, Y, Z]) of the *unpadded* volume in
            increasing row order, covering every row exactly once.
        step_size: tile overlap as a fraction of the patch (nnU-Net's `tile_step_size`).
        batch_size: tiles per network call.
        mirror_axes: spatial axes (of the patch) to flip for test-time augmentation, or None.
        accumulation: "float16" reproduces nnU-Net's float16 buffers exactly; "float32" does not round.
        progress: called with the number of tiles finished after each batch.
        head: the network's pointwise output layer, when `predict_tiles` stops before it and returns the
            last features per fold (F, N, C_feat, *patch): it is applied a few rows at a time, so a tile's
            full logits never exist. 3d patches without mirroring only (flips are averaged as logits).
        labels: where to send argmax labels when the consumer keeps nothing else: an image of one tile
            then goes to `labels.take` (fused mean and argmax) instead of `consume_slab`; images of
            several tiles still go to `consume_slab`.
    """
    if accumulation not in ACCUMULATIONS:
        raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
    if head is not None and (mirror_axes or len(patch_size) != 3):
        raise ValueError("a separate head needs a 3d patch and no mirroring")
    padded, pads = pad_to_patch(data, patch_size)
    spatial = padded.shape[1:]
    is_2d = len(patch_size) == len(spatial) - 1
    tile_extent = (1, *patch_size) if is_2d else tuple(patch_size)
    gaussian = gaussian_importance_map(patch_size)
    gaussian3d = gaussian[None] if is_2d else gaussian
    tiles = tile_positions(spatial, patch_size, step_size)
    flips = mirror_combinations(mirror_axes)

    row_starts = sorted({t.start[0] for t in tiles})
    accumulator = None  # created at the first batch, when the number of folds is known
    row_offset, valid_rows = pads[1][0], data.shape[1]
    crop = tuple(slice(before, before + size) for (before, _), size in zip(pads[2:], data.shape[2:]))
    # Finished rows are normalised and handed on a few at a time: the float32 copy that normalising
    # makes stays near EMIT_CHUNK_BYTES instead of a whole tile's rows (1 GB for 118 classes at 128^3).
    chunk_rows = max(1, EMIT_CHUNK_BYTES // (4 * n_outputs * int(np.prod(spatial[1:]))))
    # Tiles are added (and the head applied) a few rows at a time, for the same reason, in smaller blocks: 2 rows
    # of 118 classes at 128^2 stay in cache (Intel Xeon, 2 cores, per 128^3 tile: adding 0.62 s instead of 0.84 s
    # in 8-row blocks; ONNX Runtime's head 0.17 s and 44 MB instead of 0.31 s and 147 MB).
    tile_rows = max(1, TILE_BLOCK_BYTES // (4 * n_outputs * int(np.prod(tile_extent[1:]))))
    # One tile covers the image: each block of its rows is final once added, so the buffer holds one block.
    one_tile = len(tiles) == 1
    emitted = 0

    def emit(upto_row: int) -> None:
        nonlocal emitted
        assert accumulator is not None
        first, last = max(accumulator.first_row, row_offset), min(upto_row, row_offset + valid_rows)
        for begin in range(first, last, chunk_rows):
            end = min(last, begin + chunk_rows)
            consume_slab(begin - row_offset, accumulator.normalized(begin, end)[(slice(None), slice(None), *crop)])
            emitted = end - row_offset
        accumulator.forget(upto_row)

    # Tiles come in row order; group them by first-axis start so each group's rows can be released.
    for group_index, row in enumerate(row_starts):
        group = [t for t in tiles if t.start[0] == row]
        for batch in _batches(group, batch_size):
            inputs = np.stack([_cut_tile(padded, t.start, tile_extent, is_2d) for t in batch])
            logits = _predict_with_mirroring(predict_tiles, inputs, flips)  # (F, N, C or C_feat, *patch)
            if one_tile:
                emitted = _emit_one_tile(logits, gaussian3d, head, is_2d, tile_rows, row_offset, valid_rows, crop,
                                         accumulation == "float16", consume_slab, labels)
                if progress is not None:
                    progress(len(batch))
                continue
            if accumulator is None:
                # Before group k the buffer starts at row_starts[k]; earlier groups reach at most
                # row_starts[k-1] + extent <= row_starts[k] + extent, so one tile extent suffices.
                accumulator = _SlabAccumulator(
                    logits.shape[0], n_outputs, spatial, tile_extent[0], accumulation == "float16", store_half=True
                )
            for index, tile in enumerate(batch):
                tile_logits = logits[:, index][:, :, None] if is_2d else logits[:, index]
                for begin in range(0, tile_extent[0], tile_rows):
                    end = min(tile_extent[0], begin + tile_rows)
                    block = tile_logits[:, :, begin:end]
                    if head is not None:
                        block = head(np.ascontiguousarray(block))
                    accumulator.add(block, gaussian3d[begin:end], (tile.start[0] + begin, *tile.start[1:]))
                del tile_logits, block
            if progress is not None:
                progress(len(batch))
            del logits  # a tile's logits (1 GB for 118 classes at 128^3) are not needed while emitting
        if not one_tile:
            next_row = row_starts[group_index + 1] if group_index + 1 < len(row_starts) else spatial[0]
            emit(next_row)
    if emitted != valid_rows:
        raise AssertionError(f"sliding window emitted {emitted} of {valid_rows} rows")


def _emit_one_tile(
    logits: np.ndarray,
    gaussian: np.ndarray,
    head: HeadApplier | None,
    is_2d: bool,
    block_rows: int,
    row_offset: int,
    valid_rows: int,
    crop: tuple[slice, ...],
    half: bool,
    consume_slab: SlabConsumer,
    labels: LabelSink | None,
) -> int:
    """Hand on the only tile of an image, `block_rows` rows at a time (head applied per block); returns rows emitted.

    The tile starts at row 0 of the padded volume; rows of padding are dropped, not emitted. With a
    `labels` sink each block leaves as argmax labels, never as a float copy of its logits.
    """
    tile_logits = logits[:, 0][:, :, None] if is_2d else logits[:, 0]
    emitted = 0
    for begin in range(0, tile_logits.shape[2], block_rows):
        first, last = max(begin, row_offset), min(begin + block_rows, row_offset + valid_rows)
        if first >= last:
            continue
        block = tile_logits[:, :, first:last]
        if head is not None:
            block = head(np.ascontiguousarray(block))
        if labels is not None:
            labels.take(first - row_offset, one_tile_labels(block, gaussian[first:last], half, labels.dtype)[(slice(None), *crop)])
        else:
            mean = one_tile_mean(block, gaussian[first:last], half)
            consume_slab(first - row_offset, mean[(slice(None), slice(None), *crop)])
        emitted = last - row_offset
    return emitted


def pad_to_patch(data: np.ndarray, patch_size: Sequence[int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(data zero-padded to at least the patch, the padding): the volume the tiles are cut from."""
    pads = padding_for(data.shape, patch_size)
    padded = np.pad(data, pads, mode="constant", constant_values=0) if any(p != (0, 0) for p in pads) else data
    return padded, pads


def network_tiles(data: np.ndarray, patch_size: Sequence[int], step_size: float = 0.5) -> Iterator[np.ndarray]:
    """Every network input of `data` (channels, *spatial), (channels, *patch) each, in the order and with the
    padding `sliding_window_inference` feeds them (without mirrored copies): calibration data for int8."""
    padded, _ = pad_to_patch(data, patch_size)
    is_2d = len(patch_size) == padded.ndim - 2
    extent = (1, *patch_size) if is_2d else tuple(patch_size)
    for tile in tile_positions(padded.shape[1:], patch_size, step_size):
        yield _cut_tile(padded, tile.start, extent, is_2d)


def _cut_tile(padded: np.ndarray, start: Sequence[int], extent: Sequence[int], is_2d: bool) -> np.ndarray:
    region = padded[(slice(None), *(slice(s, s + e) for s, e in zip(start, extent)))]
    return np.ascontiguousarray(region[:, 0] if is_2d else region)


def _predict_with_mirroring(predict_tiles: TilePredictor, inputs: np.ndarray, flips: list[tuple[int, ...]]) -> np.ndarray:
    """Average each fold's network over the flips (in float32, as nnU-Net); returns (F, N, C, *patch).

    Spatial axis a of the patch is axis a + 2 of the input batch and a + 3 of the per-fold output. A lone
    prediction is returned as it is, in its own dtype: float16 features of a body (the head makes float32
    logits of a few rows at a time) are not widened as a whole (256 MB and 1.3 s for a TotalSegmentator tile).
    """
    if len(flips) == 1:  # no mirroring
        return predict_tiles(inputs)
    total = None
    for axes in flips:
        flipped = np.ascontiguousarray(np.flip(inputs, tuple(a + 2 for a in axes))) if axes else inputs
        out = predict_tiles(flipped)
        out = np.flip(out, tuple(a + 3 for a in axes)) if axes else out
        if total is None:
            total = out.astype(np.float32)  # a copy: the other flips are added into it
        else:
            total += out
    assert total is not None
    if len(flips) > 1:
        total /= len(flips)
    return total


def count_tiles(shape: Sequence[int], patch_size: Sequence[int], step_size: float) -> int:
    """Number of tiles (before mirroring) for a preprocessed volume of `shape` (spatial only)."""
    padded = [s + a + b for s, (a, b) in zip(shape, padding_for(shape, patch_size))]
    return len(tile_positions(padded, patch_size, step_size))
