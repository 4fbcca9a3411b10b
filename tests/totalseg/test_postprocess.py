"""Logits to labels: the numba argmax keeps numpy's first-maximum rule, regions follow regions_class_order."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from tsrt.pipeline.postprocess import logits_to_labels


def _plan(regions=None, labels=None):
    labels = labels or {"background": 0, "a": 1, "b": 2, "c": 3}
    return SimpleNamespace(
        has_regions=regions is not None,
        regions_class_order=regions,
        label_names={v: k for k, v in labels.items() if k != "background"} if regions is None else {1: "a", 2: "b", 3: "c"},
    )


def test_argmax_equals_numpy_including_exact_ties():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(118, 12, 17, 23)).astype(np.float16).astype(np.float32)
    logits[7] = logits[3]  # exact ties: the lower class must win, as with np.argmax
    labels = {"background": 0, **{f"c{i}": i for i in range(1, 118)}}
    ours = logits_to_labels(logits, _plan(labels=labels))
    np.testing.assert_array_equal(ours, np.argmax(logits, axis=0))
    assert ours.dtype == np.uint8


def test_regions_later_regions_overwrite_earlier_where_logit_positive():
    logits = np.full((3, 2, 2, 2), -1.0, dtype=np.float32)
    logits[0, 0] = 1.0  # region 1 on the first row
    logits[1, :, 0] = 1.0  # region 2 on the first column, overlapping
    ours = logits_to_labels(logits, _plan(regions=[1, 2, 3]))
    assert ours[0, 0, 0] == 2 and ours[0, 1, 0] == 1 and ours[1, 0, 1] == 2 and ours[1, 1, 1] == 0
