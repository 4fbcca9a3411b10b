"""The main job: `tsrt demo` on the bundled demo model, and the bundled graph matching its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tsrt.demo.run import demo_model_dir, run_demo
from tsrt.models.plan import load_model_plans

REPO = Path(__file__).resolve().parents[2]
DEMO_RESULTS = REPO / "models" / "demo" / "nnUNet_results"


def _demo_result_folder() -> Path:
    folders = [p.parent for p in DEMO_RESULTS.glob("Dataset*/*__*__*/plans.json")]
    assert len(folders) == 1, f"expected one committed demo result folder under {DEMO_RESULTS}, found {folders}"
    return folders[0]


def test_demo_writes_every_output_and_segments_the_phantom(tmp_path: Path):
    summary = run_demo(tmp_path / "demo_output", provider="cpu", progress=False)
    out = tmp_path / "demo_output"
    multilabel = nib.load(out / "segmentation.nii.gz")
    phantom_ct = nib.load(out / "phantom_ct.nii.gz")
    assert multilabel.shape == phantom_ct.shape and np.allclose(multilabel.affine, phantom_ct.affine)
    masks = sorted(p.name for p in (out / "segmentations").glob("*.nii.gz"))
    assert masks == sorted(f"{name}.nii.gz" for name in summary)
    stats = json.loads((out / "statistics.json").read_text())
    assert set(stats) == set(summary)
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A trained model, not seeded weights: Dice vs the phantom's truth (models/demo/TRAINING.md has the table:
    # 0.983-0.988 for every structure on this default phantom).
    for organ in ("liver", "spleen", "aorta", "spine", "lung_left", "lung_right", "kidney_left", "kidney_right"):
        assert summary[organ]["dice"] >= 0.95, f"{organ}: Dice {summary[organ]['dice']:.3f}"
    # Nothing painted into the air around the body (the model before 2026-12 labelled 170,000 voxels of it lung;
    # today's labels none, TRAINING.md).
    labels = np.asarray(multilabel.dataobj)
    air = np.asarray(phantom_ct.dataobj) < -910
    assert int(((labels > 0) & air).sum()) == 0


def test_bundled_graph_reproduces_a_fresh_export_of_the_committed_checkpoint(tmp_path: Path):
    pytest.importorskip("torch", reason="re-exporting needs the export extra")
    import onnxruntime as ort

    from tsrt_export.onnx_export import export_model

    export_model(_demo_result_folder(), tmp_path / "fresh", progress=False)
    bundled = load_model_plans(demo_model_dir())[0]
    fresh = load_model_plans(tmp_path / "fresh")[0]
    assert fresh.checkpoint_sha256 == bundled.checkpoint_sha256, "the bundled graph was exported from another checkpoint"
    tiles = np.random.default_rng(0).normal(size=(1, 1, *bundled.patch_size)).astype(np.float32)
    outputs = []
    for plan in (bundled, fresh):
        session = ort.InferenceSession(str(plan.graph_path), providers=["CPUExecutionProvider"])
        outputs.append(session.run([plan.graph_output_name], {plan.graph_input_name: tiles})[0])
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-4 * float(np.ptp(outputs[1])))
