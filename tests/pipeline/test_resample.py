"""tsrt.pipeline.resample must reproduce nnU-Net's resample_data_or_seg_to_shape (is_seg=False).

The oracle is nnunetv2's own function (skimage resize + scipy map_coordinates underneath).
Tolerance: max |delta| <= 1e-4 x the data range; in practice the difference is float64
rounding (~1e-14) or one float32 ulp.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tsrt.pipeline.resample import (
    compute_new_shape,
    input_rows_needed,
    resample_slab,
    resample_to_shape,
    separate_z_axis,
)

nnunet_resampling = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling")

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CT_PATH = DATA_DIR / "example_ct_sm.nii.gz"
RELATIVE_TOLERANCE = 1e-4


def nnunet_resample(data, new_shape, current_spacing, new_spacing, order, order_z, force_separate_z=None):
    return nnunet_resampling.resample_data_or_seg_to_shape(
        data, np.asarray(new_shape), current_spacing, new_spacing, is_seg=False, order=order, order_z=order_z,
        force_separate_z=force_separate_z,
    )


def assert_matches(ours: np.ndarray, reference: np.ndarray, data: np.ndarray) -> float:
    """Same shape, and max |delta| within 1e-4 of the input's value range; returns max |delta|."""
    assert ours.shape == reference.shape
    delta = float(np.max(np.abs(ours.astype(np.float64) - reference.astype(np.float64))))
    tolerance = RELATIVE_TOLERANCE * float(np.ptp(data))
    assert delta <= tolerance, f"max |delta| {delta:.3g} > {tolerance:.3g}"
    return delta


def random_volume(shape, dtype=np.float64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def softmax_probabilities(n_classes: int, spatial_shape, seed=0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(scale=3.0, size=(n_classes, *spatial_shape))
    exp = np.exp(logits - logits.max(axis=0, keepdims=True))
    return (exp / exp.sum(axis=0, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def ct_crop() -> np.ndarray:
    """A (1, 40, 48, 20) crop of the example CT (3 mm), z-scored like nnU-Net's CT-less z-score norm."""
    if not CT_PATH.exists():
        pytest.skip(f"real CT not available at {CT_PATH}")
    nib = pytest.importorskip("nibabel")
    volume = np.asarray(nib.load(str(CT_PATH)).dataobj, dtype=np.float32)[40:80, 30:78, 5:25]
    return ((volume - volume.mean()) / volume.std())[None].astype(np.float32)


# --------------------------------------------------------------------------- shape and axis decisions


@pytest.mark.parametrize(
    "old_shape, old_spacing, new_spacing",
    [
        ((122, 101, 30), (3.0, 3.0, 3.0), (1.5, 1.5, 1.5)),
        ((40, 512, 512), (5.0, 0.7, 0.7), (1.5, 1.5, 1.5)),
        ((5, 7, 9), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)),  # 2.5, 3.5, 4.5: round half to even
        ((33, 17), (0.8, 1.2), (1.7, 0.35)),
    ],
)
def test_compute_new_shape_matches_nnunet(old_shape, old_spacing, new_spacing):
    expected = tuple(int(s) for s in nnunet_resampling.compute_new_shape(old_shape, old_spacing, new_spacing))
    assert compute_new_shape(old_shape, old_spacing, new_spacing) == expected


@pytest.mark.parametrize("force_separate_z", [None, True, False])
@pytest.mark.parametrize(
    "current_spacing, new_spacing",
    [
        ((5.0, 0.7, 0.7), (1.5, 1.5, 1.5)),  # current anisotropic, low-res axis 0
        ((0.7, 0.7, 5.0), (1.5, 1.5, 1.5)),  # low-res axis 2
        ((1.5, 1.5, 1.5), (0.7, 5.0, 0.7)),  # only the new spacing is anisotropic
        ((0.24, 1.25, 1.25), (1.0, 1.0, 1.0)),  # two axes share the largest spacing
        ((1.0, 1.0, 1.0), (1.5, 1.5, 1.5)),  # isotropic
        ((2.9, 1.0, 1.0), (1.0, 1.0, 1.0)),  # below the threshold
    ],
)
def test_separate_z_axis_matches_nnunet(current_spacing, new_spacing, force_separate_z):
    do_separate, axis = nnunet_resampling.determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing)
    expected = int(axis) if do_separate else None
    assert separate_z_axis(current_spacing, new_spacing, force_separate_z) == expected


# --------------------------------------------------------------------------- parity with nnU-Net


@pytest.mark.parametrize(
    "shape, current_spacing, new_spacing, order, order_z",
    [
        ((1, 20, 17, 15), (1.0, 1.0, 1.0), (0.6, 0.6, 0.6), 3, 0),  # isotropic upsampling
        ((1, 20, 17, 15), (1.0, 1.0, 1.0), (1.7, 1.3, 1.9), 3, 0),  # isotropic downsampling
        ((1, 20, 16, 15), (1.0, 1.0, 1.0), (1.0, 0.5, 2.0), 3, 0),  # one axis unchanged
        ((1, 6, 30, 28), (5.0, 0.7, 0.7), (1.5, 1.5, 1.5), 3, 0),  # separate z, nearest along z
        ((1, 6, 30, 28), (5.0, 0.7, 0.7), (1.5, 1.5, 1.5), 3, 1),  # separate z, linear along z
        ((1, 30, 28, 6), (0.7, 0.7, 5.0), (1.5, 1.5, 1.5), 3, 1),  # separate z on the last axis
        ((1, 12, 30, 28), (5.0, 0.7, 0.7), (10.0, 1.4, 1.4), 3, 0),  # separate z, downsampling z
        ((1, 12, 30, 28), (1.5, 1.5, 1.5), (1.5, 0.4, 1.5), 3, 1),  # only the new spacing is anisotropic
        ((1, 1, 17, 15), (1.0, 1.0, 1.0), (1.0, 0.6, 0.6), 3, 0),  # size-1 axis
        ((1, 2, 1, 28), (1.0, 1.0, 1.0), (0.3, 0.3, 0.3), 3, 1),  # upsampling from sizes 1 and 2
        ((2, 20, 17, 15), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), 0, 0),  # nearest, .5 ties
    ],
)
def test_random_data_matches_nnunet(shape, current_spacing, new_spacing, order, order_z):
    data = random_volume(shape)
    new_shape = compute_new_shape(shape[1:], current_spacing, new_spacing)
    ours = resample_to_shape(data, new_shape, current_spacing, new_spacing, order=order, order_z=order_z,
                             out_dtype=np.float64)
    reference = nnunet_resample(data, new_shape, current_spacing, new_spacing, order, order_z)
    assert_matches(ours, reference, data)
    if order == 0:
        np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize(
    "current_spacing, new_spacing, order_z, axes",
    [
        ((3.0, 3.0, 3.0), (1.5, 1.5, 1.5), 0, (0, 1, 2)),  # the CT's own spacing, upsampled
        ((3.0, 3.0, 3.0), (4.5, 4.5, 4.5), 0, (0, 1, 2)),  # downsampled
        ((5.0, 0.7, 0.7), (1.5, 1.5, 1.5), 0, (2, 0, 1)),  # slices first, as nnU-Net transposes
        ((5.0, 0.7, 0.7), (1.5, 1.5, 1.5), 1, (2, 0, 1)),
    ],
)
def test_ct_crop_matches_nnunet(ct_crop, current_spacing, new_spacing, order_z, axes):
    data = np.ascontiguousarray(ct_crop.transpose(0, *(a + 1 for a in axes)))
    new_shape = compute_new_shape(data.shape[1:], current_spacing, new_spacing)
    ours = resample_to_shape(data, new_shape, current_spacing, new_spacing, order=3, order_z=order_z)
    reference = nnunet_resample(data, new_shape, current_spacing, new_spacing, 3, order_z)
    assert ours.dtype == reference.dtype == np.float32
    assert_matches(ours, reference, data)


@pytest.mark.parametrize(
    "current_spacing, new_spacing",
    [
        ((1.5, 1.5, 1.5), (5.0, 0.7, 0.7)),  # export back to an anisotropic original: separate z
        ((1.5, 1.5, 1.5), (0.8, 1.1, 2.0)),  # joint linear resize
    ],
)
def test_probabilities_order1_matches_nnunet(current_spacing, new_spacing):
    probabilities = softmax_probabilities(4, (14, 24, 22))
    new_shape = compute_new_shape(probabilities.shape[1:], current_spacing, new_spacing)
    ours = resample_to_shape(probabilities, new_shape, current_spacing, new_spacing, order=1, order_z=0)
    reference = nnunet_resample(probabilities, new_shape, current_spacing, new_spacing, 1, 0)
    assert_matches(ours, reference, probabilities)
    assert np.array_equal(ours.argmax(0), reference.argmax(0))


@pytest.mark.parametrize(
    "current_spacing, new_spacing, order",
    [((1.0, 1.0), (0.7, 1.65), 3), ((1.0, 1.0), (1.3, 0.8), 1), ((5.0, 0.7), (1.5, 1.5), 3)],
)
def test_2d_data_matches_nnunet(current_spacing, new_spacing, order):
    """nnU-Net only takes 4D data; (C, X, Y) equals its result on (C, 1, X, Y) with a unit first spacing."""
    data = random_volume((2, 40, 33))
    new_shape = compute_new_shape(data.shape[1:], current_spacing, new_spacing)
    ours = resample_to_shape(data, new_shape, current_spacing, new_spacing, order=order, order_z=1,
                             out_dtype=np.float64)
    reference = nnunet_resample(data[:, None], (1, *new_shape), (1.0, *current_spacing), (1.0, *new_spacing), order, 1)
    assert_matches(ours, reference[:, 0], data)


def test_unchanged_shape_returns_input():
    data = random_volume((2, 9, 8, 7), dtype=np.float32)
    spacing = (1.0, 1.0, 1.0)
    assert resample_to_shape(data, data.shape[1:], spacing, spacing) is data
    as_float64 = resample_to_shape(data, data.shape[1:], spacing, spacing, out_dtype=np.float64)
    np.testing.assert_array_equal(as_float64, nnunet_resample(data, data.shape[1:], spacing, spacing, 3, 0))


def test_tolerance_check_can_fail():
    """Linear instead of cubic interpolation is far outside the tolerance: the parity checks have teeth."""
    data = random_volume((1, 20, 17, 15))
    spacing, new_spacing = (1.0, 1.0, 1.0), (0.6, 0.6, 0.6)
    new_shape = compute_new_shape(data.shape[1:], spacing, new_spacing)
    wrong = resample_to_shape(data, new_shape, spacing, new_spacing, order=1, out_dtype=np.float64)
    with pytest.raises(AssertionError):
        assert_matches(wrong, nnunet_resample(data, new_shape, spacing, new_spacing, 3, 0), data)


def test_unsupported_order_is_refused():
    with pytest.raises(ValueError, match="order"):
        resample_to_shape(random_volume((1, 4, 4, 4)), (5, 5, 5), (1, 1, 1), (0.8, 0.8, 0.8), order=2)


# --------------------------------------------------------------------------- slab streaming


@pytest.mark.parametrize(
    "current_spacing, new_spacing, order_z",
    [
        ((1.5, 1.5, 1.5), (5.0, 0.7, 0.7), 0),  # separate axis 0, nearest: the export case
        ((1.5, 1.5, 1.5), (5.0, 0.7, 0.7), 1),
        ((1.5, 1.5, 1.5), (0.7, 0.7, 5.0), 0),  # separate last axis, linear along axis 0
        ((1.5, 1.5, 1.5), (0.6, 1.1, 2.3), 0),  # joint linear resize
        ((1.5, 1.5, 1.5), (1.5, 0.7, 0.7), 0),  # axis 0 unchanged
    ],
)
def test_slabs_reassemble_the_full_result(current_spacing, new_spacing, order_z):
    probabilities = softmax_probabilities(3, (14, 24, 22), seed=1)
    new_shape = compute_new_shape(probabilities.shape[1:], current_spacing, new_spacing)
    full = resample_to_shape(probabilities, new_shape, current_spacing, new_spacing, order=1, order_z=order_z)
    slabs = []
    for out_start in range(0, new_shape[0], 5):
        out_stop = min(out_start + 5, new_shape[0])
        in_start, in_stop = input_rows_needed(out_start, out_stop, probabilities.shape[1], new_shape[0], 1)
        assert in_stop - in_start < probabilities.shape[1] or new_shape[0] <= 5
        slabs.append(resample_slab(
            probabilities[:, in_start:in_stop], in_start, probabilities.shape[1:], out_start, out_stop, new_shape,
            current_spacing, new_spacing, order=1, order_z=order_z,
        ))
    np.testing.assert_array_equal(np.concatenate(slabs, axis=1), full)


def test_slab_refuses_order3_and_missing_rows():
    data = random_volume((1, 20, 8, 8))
    spacing, new_spacing, new_shape = (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (40, 16, 16)
    with pytest.raises(ValueError, match="order"):
        resample_slab(data, 0, data.shape[1:], 0, 10, new_shape, spacing, new_spacing, order=3)
    in_start, in_stop = input_rows_needed(10, 20, 20, 40, 1)
    assert (in_start, in_stop) == (4, 11)  # coordinates 4.75 .. 9.25
    with pytest.raises(ValueError, match="input_rows_needed"):
        resample_slab(data[:, in_start + 1:in_stop], in_start + 1, data.shape[1:], 10, 20, new_shape, spacing,
                      new_spacing, order=1)


def test_input_rows_needed_for_order3_is_the_whole_axis():
    assert input_rows_needed(3, 9, 20, 40, 3) == (0, 20)


# --------------------------------------------------------------------------- runtime hygiene


def test_module_imports_only_numpy_and_numba():
    source = (Path(__file__).resolve().parents[2] / "tsrt" / "pipeline" / "resample.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "collections", "itertools", "math", "numpy", "numba"}, imported
    check = "import sys, tsrt.pipeline.resample; print(sorted({'torch', 'nnunetv2', 'skimage', 'totalsegmentator'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
