"""The committed demo model (models/demo) is a working nnU-Net v2 model.

It is loaded here exactly as nnU-Net would load it, with nnunetv2's own `nnUNetPredictor`, in
this (fresh) process, and must segment a small phantom that was not a training case well: the
Dice against the phantom's ground truth is computed, so a broken or untrained model fails.
See models/demo/TRAINING.md and export/train_demo.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tsrt.demo.phantom import PHANTOM_LABELS, make_phantom

REPO = Path(__file__).resolve().parents[2]
MODEL = (REPO / "models" / "demo" / "nnUNet_results" / "Dataset900_TsrtDemo"
         / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres")

# Training used seeds 0..29 (vary=True); this one is unseen.
TEST_PHANTOM = dict(shape=(96, 80, 64), spacing=(3.0, 3.0, 3.0), seed=4242, vary=True)
# Floors a little under what the committed model reaches on this phantom (TRAINING.md, #5: 0.968-0.999; this small
# field of view cuts the kidneys, which is why 8 of the 48 training phantoms are that small).
MIN_DICE = {
    "liver": 0.95, "spleen": 0.95, "aorta": 0.95, "spine": 0.95, "lung_left": 0.95, "lung_right": 0.95,
    "kidney_left": 0.95, "kidney_right": 0.95,
}


def dice(pred: np.ndarray, gt: np.ndarray, label: int) -> float:
    p, g = pred == label, gt == label
    return 2.0 * float((p & g).sum()) / max(1, int(p.sum()) + int(g.sum()))


def test_demo_model_folder_is_complete_and_small():
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json", "fold_0/checkpoint_final.pth"):
        assert (MODEL / name).is_file(), name
    total = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert total < 5_000_000, f"demo model folder is {total / 1e6:.1f} MB"
    plans = json.loads((MODEL / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [3.0, 3.0, 3.0]
    assert cfg["normalization_schemes"] == ["CTNormalization"]
    labels = json.loads((MODEL / "dataset.json").read_text())["labels"]
    assert {v: k for k, v in labels.items() if v} == PHANTOM_LABELS


@pytest.fixture(scope="module")
def predictor():
    torch = pytest.importorskip("torch")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                           perform_everything_on_device=False, device=torch.device("cpu"),
                           verbose=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(MODEL), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    return pred


@pytest.mark.slow
def test_nnunet_predictor_loads_committed_checkpoint(predictor):
    assert predictor.trainer_name == "nnUNetTrainerNoMirroring"
    assert predictor.allowed_mirroring_axes is None  # left/right labels: trained and run without mirroring
    assert predictor.label_manager.num_segmentation_heads == len(PHANTOM_LABELS) + 1


@pytest.fixture(scope="module")
def segmentation(predictor):
    """nnU-Net's prediction for the unseen test phantom and its ground truth, both (x, y, z)."""
    ph = make_phantom(**TEST_PHANTOM)
    # nnU-Net's SimpleITK axis order: (c, z, y, x) with spacing (sz, sy, sx); the phantom is (x, y, z).
    image = ph.image.transpose(2, 1, 0)[None].astype(np.float32)
    seg = predictor.predict_single_npy_array(image, {"spacing": list(ph.spacing[::-1])}, None, None, False)
    seg = np.asarray(seg).transpose(2, 1, 0)
    assert seg.shape == ph.labels.shape
    return seg, ph.labels


@pytest.mark.slow
@pytest.mark.parametrize("organ", sorted(MIN_DICE))
def test_demo_model_segments_unseen_phantom(segmentation, organ):
    seg, gt = segmentation
    label = {name: k for k, name in PHANTOM_LABELS.items()}[organ]
    assert (gt == label).sum() > 1000, f"{organ} should be in the test phantom's field of view"
    score = dice(seg, gt, label)
    assert score >= MIN_DICE[organ], f"{organ} Dice {score:.3f} < {MIN_DICE[organ]}"


@pytest.mark.slow
def test_demo_model_labels_nothing_outside_the_unseen_phantoms_body(segmentation):
    """No structure painted into the air around the body (the issue's "no label outside the phantom's body")."""
    from tsrt_export.train_demo import OUTSIDE_BODY_HU

    seg, _ = segmentation
    air = make_phantom(**TEST_PHANTOM).image < OUTSIDE_BODY_HU
    assert air.sum() > 10_000  # the phantom has air around its body to get wrong
    assert int(((seg > 0) & air).sum()) == 0
