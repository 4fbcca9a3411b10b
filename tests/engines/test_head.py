"""The output layer run apart (tsrt.engines.head): the body + head logits are the whole graph's, bit for bit;
graphs that do not end in a pointwise convolution are left whole; the split graphs are cached and sealed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tsrt.demo.run import demo_model_dir
from tsrt.engines.head import split_output_head
from tsrt.engines.providers import choose_provider, create_session
from tsrt.models.store import sha256_file
from tsrt.pipeline.infer import load_model


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TSRT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_body_and_head_give_the_whole_graphs_logits():
    model = load_model(demo_model_dir(), provider="cpu")
    assert model.heads and model.feature_outputs, "the demo network ends in a 1x1x1 convolution: it should split"
    plan = model.plan
    whole = create_session(plan.graph_path, choose_provider("cpu"))
    tile = np.random.default_rng(0).standard_normal((1, 1, *plan.patch_size), dtype=np.float32)
    expected = whole.run([plan.graph_output_name], {plan.graph_input_name: tile})[0]
    np.testing.assert_array_equal(model.predict_tiles(tile)[0], expected)
    features = model.tile_features(tile)
    assert features.shape[:2] == (1, 1) and features.shape[2] != plan.num_segmentation_heads  # features, not logits
    rows = slice(10, 17)
    np.testing.assert_array_equal(model.apply_heads(np.ascontiguousarray(features[:, 0, :, rows]))[0], expected[0, :, rows])


def _graph_ending_in_a_3x3x3_conv(path: Path) -> Path:
    weight = numpy_helper.from_array(np.ones((2, 1, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3, 3], pads=[1] * 6)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_graph_without_a_pointwise_head_stays_whole(tmp_path: Path, home: Path):
    graph = _graph_ending_in_a_3x3x3_conv(tmp_path / "fold_0.onnx")
    assert split_output_head(graph, sha256_file(graph)) is None
    assert list((home / "cache" / "ort").glob("*.nohead")), "the answer is remembered, not parsed again each run"
    assert split_output_head(graph, sha256_file(graph)) is None


def test_split_graphs_are_cached_sealed_and_rebuilt_when_tampered(home: Path):
    graph = demo_model_dir() / "fold_0.onnx"
    first = split_output_head(graph, sha256_file(graph))
    assert first is not None and first.body.exists() and first.head.exists()
    stamp = first.body.stat().st_mtime_ns
    again = split_output_head(graph, sha256_file(graph))
    assert again == first and first.body.stat().st_mtime_ns == stamp, "an intact cache is reused"
    first.body.write_bytes(first.body.read_bytes()[:-10] + b"tampered!!")
    rebuilt = split_output_head(graph, sha256_file(graph))
    assert rebuilt is not None and onnx.load(str(rebuilt.body)).graph.output[0].name == first.body_output
