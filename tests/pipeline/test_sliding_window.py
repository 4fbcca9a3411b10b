"""The sliding window against nnU-Net's own: same Gaussian, same tiles, same logits.

The network here is a small torch conv net (not a mock: a real network, evaluated by nnU-Net's
predictor and by tsrt's window through the same torch module), so any difference comes from
tiling, padding, weighting, mirroring or the streamed accumulation.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: E402
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window  # noqa: E402
from nnunetv2.utilities.label_handling.label_handling import LabelManager  # noqa: E402

from tsrt.pipeline.sliding_window import (  # noqa: E402
    compute_steps,
    count_tiles,
    gaussian_importance_map,
    mirror_combinations,
    sliding_window_inference,
)


@pytest.mark.parametrize("patch", [(32, 32, 32), (24, 40, 16), (17, 33, 20), (64, 48)])
def test_gaussian_equals_nnunet(patch):
    ours = gaussian_importance_map(patch)
    theirs = compute_gaussian(tuple(patch), sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    np.testing.assert_array_equal(ours, theirs.float().numpy())
    # Made once per patch size: a later call is the same map, and a caller's writes never reach the next one.
    ours[...] = -1
    np.testing.assert_array_equal(gaussian_importance_map(patch), theirs.float().numpy())


@pytest.mark.parametrize(
    "image,tile,step",
    [((110, 64, 200), (64, 64, 64), 0.5), ((128, 97, 33), (32, 32, 32), 0.8), ((40, 41, 400), (40, 20, 37), 0.25)],
)
def test_steps_equal_nnunet(image, tile, step):
    assert compute_steps(image, tile, step) == compute_steps_for_sliding_window(image, tile, step)


def test_mirror_combinations_cover_all_flips():
    assert len(mirror_combinations((0, 1, 2))) == 8
    assert mirror_combinations(None) == [()]


class _SmallNet(torch.nn.Module):
    """A real (tiny) segmentation network: conv layers with an anisotropic receptive field."""

    def __init__(self, in_channels: int, classes: int, dim: int):
        super().__init__()
        conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
        torch.manual_seed(3)
        self.layers = torch.nn.Sequential(
            conv(in_channels, 8, 3, padding=1), torch.nn.LeakyReLU(), conv(8, classes, 3, padding=1)
        )

    def forward(self, x):
        return self.layers(x)


def _nnunet_logits(net, data, patch, classes, step, mirror_axes):
    predictor = nnUNetPredictor(
        tile_step_size=step, use_mirroring=mirror_axes is not None, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.network = net
    predictor.allowed_mirroring_axes = mirror_axes
    predictor.label_manager = LabelManager({"background": 0, **{f"c{i}": i for i in range(1, classes)}}, None)

    class _Config:
        patch_size = list(patch)

    predictor.configuration_manager = _Config()
    return predictor.predict_sliding_window_return_logits(torch.from_numpy(data)).float().numpy()


def _tsrt_logits(net, data, patch, classes, step, mirror_axes, batch_size=2, accumulation="float32"):
    out = np.full((classes, *data.shape[1:]), np.nan, dtype=np.float32)
    seen = []

    def consume(first_row, slab):
        seen.append((first_row, slab.shape[1]))
        out[:, first_row : first_row + slab.shape[1]] = slab

    def predict(tiles):
        with torch.no_grad():
            return net(torch.from_numpy(tiles)).numpy()[None]  # one fold

    sliding_window_inference(
        data, predict, patch, classes, consume, step_size=step, batch_size=batch_size, mirror_axes=mirror_axes,
        accumulation=accumulation,
    )
    rows = [r for r, _ in seen]
    assert rows == sorted(rows) and sum(n for _, n in seen) == data.shape[1], "slabs must cover each row once, in order"
    return out


def _summed_weight(shape, patch, step):
    """The total Gaussian weight each voxel receives (the denominator of the weighted mean)."""
    from tsrt.pipeline.sliding_window import padding_for, tile_positions

    pads = padding_for((1, *shape), patch)[1:]
    padded = [s + a + b for s, (a, b) in zip(shape, pads)]
    gaussian = gaussian_importance_map(patch)
    is_2d = len(patch) < len(shape)
    total = np.zeros(padded, dtype=np.float64)
    for tile in tile_positions(padded, patch, step):
        extent = (1, *patch) if is_2d else patch
        region = tuple(slice(s, s + e) for s, e in zip(tile.start, extent))
        total[region] += gaussian[None] if is_2d else gaussian
    return total[tuple(slice(a, a + s) for (a, _), s in zip(pads, shape))]


@pytest.mark.parametrize(
    "shape,patch,step,mirror",
    [
        ((1, 70, 50, 45), (32, 32, 32), 0.5, None),  # several tiles per axis
        ((1, 20, 50, 45), (32, 32, 32), 0.5, None),  # smaller than the patch on one axis: padding
        ((2, 40, 36, 50), (24, 24, 24), 0.8, (0, 1, 2)),  # two channels, TotalSegmentator step, full TTA
        ((1, 5, 60, 50), (32, 32), 0.5, (0, 1)),  # a 2d configuration on a 3d volume
        ((1, 30, 28, 25), (32, 32, 32), 0.5, None),  # one tile: added and emitted a few rows at a time
    ],
)
def test_sliding_window_equals_nnunet(shape, patch, step, mirror):
    rng = np.random.default_rng(0)
    data = rng.normal(size=shape).astype(np.float32)
    classes = 4
    net = _SmallNet(shape[0], classes, len(patch)).eval()
    ours = _tsrt_logits(net, data, patch, classes, step, mirror)
    theirs = _nnunet_logits(net, data, patch, classes, step, mirror)
    assert not np.isnan(ours).any()
    # nnU-Net accumulates weighted logits in float16, tsrt in float32. Where the summed Gaussian
    # weight is in float16's normal range the two agree to float16 rounding; at the volume's edges
    # and corners nnU-Net's products fall into float16 subnormals (even to 0), tsrt's do not.
    reliable = _summed_weight(shape[1:], patch, step) > 1e-2
    assert reliable.mean() > 0.5
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs)[:, reliable].max() <= 2e-3 * scale
    # Emulating nnU-Net's float16 buffers gives the very same numbers everywhere, corners included.
    emulated = _tsrt_logits(net, data, patch, classes, step, mirror, batch_size=1, accumulation="float16")
    np.testing.assert_array_equal(emulated, theirs)
    assert count_tiles(shape[1:], patch, step) > 0


def test_round_to_half_equals_numpy_float16():
    from tsrt.pipeline.sliding_window import round_to_half

    rng = np.random.default_rng(1)
    values = (rng.normal(size=200_000) * np.exp(rng.uniform(-25, 12, size=200_000))).astype(np.float32)
    values[:4] = [65519.0, 65520.0, -65520.0, 2.0**-25]
    # Rows as the accumulator passes them: wholly normal-range rows take the vectorised path, the rest
    # the per-value one. The whole array at once is one mixed row.
    normal_rows = (rng.normal(size=(500, 128)) * 40).astype(np.float32)
    values = np.concatenate([values, normal_rows.ravel(), [6.1035156e-05, 65504.0, 65519.0]]).astype(np.float32)
    whole = values.copy()
    round_to_half(whole)
    by_row = values.copy()
    for begin in range(0, values.size, 128):
        round_to_half(by_row[begin : begin + 128])
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(whole, expected)
    np.testing.assert_array_equal(by_row, expected)


def test_round_to_half_on_a_sweep_of_every_exponent_and_the_edge_cases():
    """Every 4099th float32 bit pattern (all signs, exponents and mantissa bits: ~1 M values) and the
    boundaries: subnormal ties (odd multiples of 2**-25), signed zeros, the normal-range edge, overflow, inf, NaN.
    (All 2**32 patterns were checked once by hand: 0 mismatches; too slow for CI.)"""
    from tsrt.pipeline.sliding_window import round_to_half

    sweep = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ties = (np.arange(1, 2048, 2) * 2.0**-25).astype(np.float32)
    edges = np.array([0.0, -0.0, 2.0**-14, np.nextafter(np.float32(2.0**-14), np.float32(0)), 65504.0, 65519.996,
                      65520.0, np.inf, -np.inf, np.nan], dtype=np.float32)
    values = np.concatenate([sweep, ties, -ties, edges]).astype(np.float32)
    rounded = values.copy()
    round_to_half(rounded)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(np.float16).astype(np.float32)
    nan = np.isnan(values)
    assert np.isnan(rounded[nan]).all()
    np.testing.assert_array_equal(rounded[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def _pointwise_head(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """A 1x1x1 output layer, (..., C_feat, *spatial) -> (..., C, *spatial), summed in a fixed order in float64
    so the same voxel gives the same logit whatever block of rows it is computed in."""
    axis = features.ndim - 4
    total = 0.0
    for c in range(weights.shape[1]):
        channel = np.take(features, [c], axis=axis).astype(np.float64)
        shape = [1] * features.ndim
        shape[axis] = weights.shape[0]
        total = total + channel * weights[:, c].reshape(shape)
    return total.astype(np.float32)


@pytest.mark.parametrize("shape", [(1, 70, 50, 45), (1, 30, 28, 25)], ids=["tiles", "one tile"])
def test_a_separate_head_applied_to_blocks_of_rows_equals_nnunet(shape, monkeypatch):
    """With `head`, the network stops at its last features and the output layer runs a few rows at a time:
    nnU-Net's float16 logits (made from whole-tile logits) come out bit for bit."""
    import tsrt.pipeline.sliding_window as sliding_window

    patch, classes, step = (32, 32, 32), 5, 0.5
    monkeypatch.setattr(sliding_window, "TILE_BLOCK_BYTES", 4 * classes * 32 * 32 * 5)  # blocks of 5 rows
    rng = np.random.default_rng(2)
    data = rng.normal(size=shape).astype(np.float32)
    body = _SmallNet(1, 8, 3).eval()
    weights = rng.normal(size=(classes, 8)).astype(np.float32)

    class WholeNet(torch.nn.Module):
        def forward(self, x):
            return torch.from_numpy(_pointwise_head(weights, body(x).detach().numpy()))

    theirs = _nnunet_logits(WholeNet(), data, patch, classes, step, None)
    ours = np.full((classes, *shape[1:]), np.nan, dtype=np.float32)
    blocks = []

    def consume(first_row, slab):
        ours[:, first_row : first_row + slab.shape[1]] = slab

    def features(tiles):
        with torch.no_grad():
            return body(torch.from_numpy(tiles)).numpy()[None]

    def head(block):
        blocks.append(block.shape)
        return _pointwise_head(weights, block)

    sliding_window_inference(data, features, patch, classes, consume, step_size=step, head=head)
    np.testing.assert_array_equal(ours, theirs)
    assert all(b[1] == 8 and b[2] <= 5 for b in blocks) and len(blocks) >= 7 * count_tiles(shape[1:], patch, step)


def test_a_separate_head_refuses_mirroring():
    with pytest.raises(ValueError, match="no mirroring"):
        sliding_window_inference(
            np.zeros((1, 8, 8, 8), np.float32), lambda t: t[None], (8, 8, 8), 1, lambda r, s: None,
            mirror_axes=(0,), head=lambda b: b,
        )


@pytest.mark.parametrize("folds", [1, 3])
def test_a_buffer_stored_as_float16_adds_exactly_as_one_stored_as_float32(folds):
    """Overlapping tiles added straight into float16 storage (row by row, widened and stored back) give the very
    numbers of float32 storage with float16 rounding, for logits from tiny (float16 subnormals) to past its range."""
    import tsrt.pipeline.sliding_window as sliding_window

    rng = np.random.default_rng(11)
    patch, padded = (12, 10, 14), (20, 16, 22)
    gaussian = gaussian_importance_map(patch)
    wide = sliding_window._SlabAccumulator(folds, 3, padded, padded[0], True, store_half=False)
    stored = sliding_window._SlabAccumulator(folds, 3, padded, padded[0], True, store_half=True)
    assert stored.logits.dtype == np.float16
    for start in ((0, 0, 0), (4, 3, 5), (8, 6, 8), (3, 0, 8)):
        logits = (rng.normal(size=(folds, 3, *patch)) * np.exp(rng.uniform(-14, 9, size=(folds, 3, *patch))))
        logits[..., 0, 0, 0] = np.inf
        with np.errstate(over="ignore", invalid="ignore"):
            for accumulator in (wide, stored):
                accumulator.add(logits.astype(np.float32), gaussian, start)
    np.testing.assert_array_equal(stored.weights.astype(np.float32), wide.weights)
    np.testing.assert_array_equal(stored.logits.astype(np.float32), wide.logits)
    subnormal = (np.abs(wide.logits) < 6.1e-05) & (wide.logits != 0)
    assert subnormal.any() and np.isinf(wide.logits).any()  # float16 subnormals and overflow were met
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        np.testing.assert_array_equal(stored.normalized(0, 20), wide.normalized(0, 20))


@pytest.mark.parametrize("accumulation", ["float16", "float32"])
@pytest.mark.parametrize("folds", [1, 3])
def test_the_one_tile_path_equals_the_accumulation_buffer(accumulation, folds):
    """An image of one tile skips the buffer; its numbers must be the buffered path's, bit for bit, for any folds,
    logits from tiny to past float16's range (subnormal products at the Gaussian's corners, overflow to inf)."""
    import tsrt.pipeline.sliding_window as sliding_window
    from tsrt.pipeline.sliding_window import one_tile_mean

    rng = np.random.default_rng(7)
    patch = (12, 10, 14)
    gaussian = gaussian_importance_map(patch)
    logits = (rng.normal(size=(folds, 3, *patch)) * np.exp(rng.uniform(-12, 9, size=(folds, 3, *patch)))).astype(np.float32)
    half = accumulation == "float16"
    buffered = sliding_window._SlabAccumulator(folds, 3, patch, patch[0], half, store_half=False)
    buffered.add(logits, gaussian, (0, 0, 0))
    with np.errstate(over="ignore", invalid="ignore"):
        expected = buffered.normalized(0, patch[0])
        fused = np.concatenate([one_tile_mean(logits[:, :, b : b + 5], gaussian[b : b + 5], half) for b in range(0, 12, 5)], axis=1)
    np.testing.assert_array_equal(fused, expected)
    assert np.isfinite(expected).mean() > 0.9


@pytest.mark.parametrize("accumulation", ["float16", "float32"])
@pytest.mark.parametrize("folds", [1, 3])
@pytest.mark.parametrize("image", [(1, 12, 10, 14), (1, 9, 7, 14)], ids=["exact", "padded"])
def test_one_tile_labels_equal_the_logits_path_then_argmax(accumulation, folds, image):
    """A consumer that keeps only labels gets them from the fused pass: the same labels as the logits path
    followed by tsrt's argmax (first maximum on ties), with the padding cropped, for logits full of ties
    (few distinct values) and past float16's range."""
    import tsrt.pipeline.postprocess as postprocess
    from tsrt.pipeline.sliding_window import LabelSink

    rng = np.random.default_rng(11)
    patch, classes = (12, 10, 14), 4
    data = rng.normal(size=image).astype(np.float32)
    logits = rng.integers(-3, 4, size=(folds, 1, classes, *patch)).astype(np.float32) * 2.0 ** rng.integers(-20, 17, size=(folds, 1, classes, *patch))
    predict = lambda tiles: logits.astype(np.float32)  # noqa: E731 - the "network": fixed logits for the one tile

    slabs = np.full((classes, *image[1:]), np.nan, dtype=np.float32)

    def consume(first_row, slab):
        slabs[:, first_row : first_row + slab.shape[1]] = slab

    taken = np.full(image[1:], 255, dtype=np.uint8)
    rows_seen = []

    def take(first_row, block):
        rows_seen.append((first_row, block.shape[0]))
        taken[first_row : first_row + block.shape[0]] = block

    with np.errstate(over="ignore", invalid="ignore"):
        sliding_window_inference(data, predict, patch, classes, consume, accumulation=accumulation)
        sliding_window_inference(data, predict, patch, classes, lambda r, s: pytest.fail("logits sent to a label sink"),
                                 accumulation=accumulation, labels=LabelSink(np.uint8, take))
    expected = np.empty(image[1:], dtype=np.uint8)
    postprocess._argmax_classes(slabs, expected)
    np.testing.assert_array_equal(taken, expected)
    assert sum(n for _, n in rows_seen) == image[1] and len(set(expected.ravel())) > 1
