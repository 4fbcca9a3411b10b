"""Preprocessing's memory contract: `to_nnunet_array` always makes a new array, and `overwrite_input` normalises
that array in place (one volume fewer through the whole sliding window) with the same result as a copy."""

from __future__ import annotations

import numpy as np

from tsrt.demo.run import demo_model_dir
from tsrt.models.plan import load_model_plans
from tsrt.pipeline.preprocess import preprocess
from tsrt.pipeline.read import Image, to_nnunet_array


def test_to_nnunet_array_never_returns_a_view_of_the_image():
    for shape in ((1, 1, 7), (5, 4, 3)):  # (1, 1, n) transposes to a contiguous view of the same memory
        image = Image(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), np.eye(4), None, "probe")
        data, _ = to_nnunet_array(image, "NibabelIO")
        assert not np.shares_memory(data, image.array), shape
        np.testing.assert_array_equal(data[0], image.array.transpose(2, 1, 0))


def test_overwrite_input_normalises_in_place_with_the_same_result():
    plan = load_model_plans(demo_model_dir())[0]
    rng = np.random.default_rng(0)
    values = rng.uniform(-1000, 1500, size=(1, 40, 36, 32)).astype(np.float32)
    spacing = [float(s) for s in plan.spacing]  # already at the plan's spacing: no resampling copy
    copied = preprocess(values.copy(), spacing, plan)
    scratch = values.copy()
    overwritten = preprocess(scratch, spacing, plan, overwrite_input=True)
    np.testing.assert_array_equal(overwritten.data, copied.data)
    assert np.shares_memory(overwritten.data, scratch)  # no second volume
    untouched = values.copy()
    preprocess(untouched, spacing, plan)
    np.testing.assert_array_equal(untouched, values)  # the default leaves the caller's array alone
