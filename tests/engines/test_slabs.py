"""Large feature maps run a few rows at a time (tsrt.engines.slabs, `--low-memory`): the features equal the
whole graph's bit for bit (trained demo weights; a seeded network with two slabbed levels and slabs that do
not divide the rows), the same masks come out of the CLI, the cut graphs are cached sealed, and a model or
provider it cannot run says so in one line and runs as usual."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seeded_nets import plain_unet_plans

from tsrt.demo.run import demo_model_dir
from tsrt.engines.head import split_output_head
from tsrt.engines.providers import choose_provider, create_session
from tsrt.engines.slabs import SlabbedBody, open_slabbed_body, plan_slabs
from tsrt.models.onnx_graph import build_graph_from_weights, network_spec, save_graph, state_dict_for, weight_shapes
from tsrt.models.store import sha256_file
from tsrt.pipeline.infer import load_model


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TSRT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _ct_tile(shared_data: Path, patch: tuple[int, ...]) -> np.ndarray:
    """A real CT patch, normalised roughly as CTNormalization does (the exact values do not matter here)."""
    volume = np.asarray(nib.load(str(shared_data / "example_ct_sm.nii.gz")).dataobj, dtype=np.float32)
    tile = np.zeros(patch, np.float32)
    part = volume[tuple(slice(0, min(a, b)) for a, b in zip(volume.shape, patch))]
    tile[tuple(slice(0, s) for s in part.shape)] = (np.clip(part, -1000, 1500) - 80.0) / 300.0
    return tile[None, None]


def test_trained_demo_model_features_equal_the_whole_graph(shared_data: Path):
    whole = load_model(demo_model_dir(), provider="cpu")
    slabbed = load_model(demo_model_dir(), provider="cpu", low_memory=True)
    assert isinstance(slabbed.sessions[0], SlabbedBody) and not isinstance(whole.sessions[0], SlabbedBody)
    assert slabbed.sessions[0].levels == 1  # 64^3: the next level (32^3) has no two-level statistics
    for tile in (_ct_tile(shared_data, tuple(whole.plan.patch_size)),
                 np.random.default_rng(1).standard_normal((1, 1, *whole.plan.patch_size), dtype=np.float32)):
        expected = whole.tile_features(tile)
        np.testing.assert_array_equal(slabbed.tile_features(tile), expected)
        np.testing.assert_array_equal(slabbed.predict_tiles(tile), whole.predict_tiles(tile))


def _seeded_network(folder: Path, patch: list[int]) -> Path:
    """A 3-stage PlainConvUNet with InstanceNorm and seeded weights (torch-free builder)."""
    plans = plain_unet_plans(patch, instance_norm=True)
    labels = {"background": 0, "a": 1, "b": 2}
    spec = network_spec(plans, {"channel_names": {"0": "CT"}, "labels": labels}, "3d_fullres")
    rng = np.random.default_rng(7)
    weights = {name: (rng.standard_normal(shape) * 0.3).astype(np.float32) for name, shape in weight_shapes(spec).items()}
    folder.mkdir(parents=True, exist_ok=True)
    return save_graph(build_graph_from_weights(spec, state_dict_for(spec, weights)), folder / "fold_0.onnx")


def test_two_slabbed_levels_and_uneven_slabs_equal_the_whole_graph(tmp_path: Path):
    # 88 rows: 10-row slabs at full resolution and 42-row slabs at the next level leave shorter last slabs;
    # the second level (44x48x32 voxels) still has two-level statistics, the third runs as the inner graph.
    patch = [88, 96, 64]
    graph = _seeded_network(tmp_path / "net", patch)
    split = split_output_head(graph, sha256_file(graph))
    choice = choose_provider("cpu")
    whole = create_session(split.body, choice, graph_sha256=split.body_sha256)
    slabbed = open_slabbed_body(split.body, split.body_sha256, choice, None, tuple(patch[1:]))
    assert slabbed is not None and slabbed.levels == 2, "two levels should run in slabs"
    tile = np.random.default_rng(3).standard_normal((1, 1, *patch), dtype=np.float32) * 2 + 0.5
    expected = whole.run([split.body_output], {"input": tile})[0]
    np.testing.assert_array_equal(slabbed.run(None, {"input": tile})[0], expected)
    batch = np.concatenate([tile, tile[:, :, ::-1].copy()])  # a batch of two tiles, each on its own
    both = slabbed.run(None, {"input": batch})[0]
    np.testing.assert_array_equal(both[:1], expected)
    np.testing.assert_array_equal(both[1:], whole.run([split.body_output], {"input": batch[1:]})[0])


def test_cut_graphs_are_cached_sealed_and_rebuilt_when_tampered(home: Path):
    load_model(demo_model_dir(), provider="cpu", low_memory=True)
    outer = next((home / "cache" / "ort").glob("*.outer-v1.onnx"))
    stamp = outer.stat().st_mtime_ns
    load_model(demo_model_dir(), provider="cpu", low_memory=True)
    assert outer.stat().st_mtime_ns == stamp, "an intact cut is reused"
    outer.write_bytes(outer.read_bytes()[:-10] + b"tampered!!")
    model = load_model(demo_model_dir(), provider="cpu", low_memory=True)
    assert isinstance(model.sessions[0], SlabbedBody) and outer.stat().st_mtime_ns != stamp


def test_a_graph_of_another_shape_is_not_planned(tmp_path: Path):
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 1, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3, 3], pads=[1] * 6)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight],
    )
    assert plan_slabs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])) is None


def test_low_memory_elsewhere_says_so_and_runs_as_usual(caplog: pytest.LogCaptureFixture):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    with caplog.at_level(logging.INFO, logger="tsrt"):
        model = load_model(demo_model_dir(), provider="openvino", low_memory=True)
    assert not isinstance(model.sessions[0], SlabbedBody)
    assert any("--low-memory" in r.message and "--provider cpu" in r.message for r in caplog.records)


def test_cli_low_memory_writes_the_same_labels(shared_data: Path, tmp_path: Path):
    ct = shared_data / "example_ct_sm.nii.gz"
    outputs = {}
    for name, extra in (("whole", []), ("slabs", ["--low-memory"])):
        target = tmp_path / f"{name}.nii.gz"
        done = subprocess.run(
            [sys.executable, "-c", "from tsrt.cli.root import main; main()", "-i", str(ct), "-o", str(target), "--model", str(demo_model_dir()),
             "--provider", "cpu", *extra], capture_output=True, text=True,
        )
        assert done.returncode == 0, done.stderr
        outputs[name] = np.asarray(nib.load(str(target)).dataobj)
    assert outputs["whole"].any(), "the demo model should find something in a CT"
    np.testing.assert_array_equal(outputs["slabs"], outputs["whole"])


def test_low_memory_is_not_a_written_option():
    """It changes no voxel, so a cohort rerun with or without it keeps its results (the manifest's options)."""
    from tsrt.totalseg.options import SegmentOptions

    assert SegmentOptions(low_memory=True).written_options() == SegmentOptions().written_options()
    assert SegmentOptions.from_keywords(low_memory=True).low_memory
