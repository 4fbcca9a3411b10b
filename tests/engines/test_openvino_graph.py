"""The form of a graph OpenVINO runs (tsrt.engines.openvino_graph): two-level InstanceNorms folded into one node
for bf16 and int8, kept for fp32, a batch of one, larger batches run tile by tile; on the trained demo model.

ONNX Runtime's own InstanceNormalization is the reference for the fold: the folded graph must give the
unfolded graph's features to float rounding, so a fold that normalised over the wrong axes (or dropped eps)
would fail. No timing or memory here: those are benchmark figures (benchmarks/backends.py).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tsrt.demo.run import demo_model_dir
from tsrt.engines.graph_patterns import GraphIndex, match_two_level_norm
from tsrt.engines.head import split_output_head
from tsrt.engines.openvino_graph import fold_two_level_norms, openvino_graph
from tsrt.models.store import sha256_file


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TSRT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def demo_body() -> tuple[Path, str]:
    graph = demo_model_dir() / "fold_0.onnx"
    split = split_output_head(graph, sha256_file(graph))
    assert split is not None
    return split.body, split.body_sha256


def _features(graph: Path | bytes, tile: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: tile})[0]


def _ops(model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def _tile(seed: int = 0, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, 64, 64, 64), dtype=np.float32)


def test_folded_norms_give_the_unfolded_features_on_onnxruntime(demo_body):
    body, _ = demo_body
    model = onnx.load(str(body))
    before = _ops(model)
    graph = GraphIndex(model)
    patterns = sum(match_two_level_norm(graph, node) is not None for node in graph.nodes if node.op_type == "Reshape")
    assert patterns == 4  # the demo model's 64^3 level: two encoder and two decoder blocks

    assert fold_two_level_norms(model) == patterns
    after = _ops(model)
    assert after["InstanceNormalization"] == before["InstanceNormalization"] + patterns
    assert not {"ReduceSum", "Sqrt", "Div", "Sub"} & set(after)  # nothing of the patterns is left
    tile = _tile()
    np.testing.assert_allclose(_features(model.SerializeToString(), tile), _features(body, tile), rtol=0, atol=2e-4)


def test_a_reduction_over_other_axes_is_not_folded(demo_body):
    """Statistics over part of a map (here: the plane only, a per-row norm) are not an InstanceNorm."""
    model = onnx.load(str(demo_body[0]))
    graph = GraphIndex(model)
    norm = next(match_two_level_norm(graph, node) for node in graph.nodes
                if node.op_type == "Reshape" and match_two_level_norm(graph, node) is not None)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([3], np.int64), "plane_axes_again"))
    for node in (norm.rows_sum, norm.variance_rows):  # both second-level sums: still the pattern, other statistics
        node.input[1] = "plane_axes_again"
    assert fold_two_level_norms(model) == 3


def test_bf16_and_int8_fold_the_norms_and_fp32_keeps_them(demo_body):
    body, sha256 = demo_body
    kept, folded = (onnx.load(str(openvino_graph(body, sha256, precision))) for precision in ("fp32", "int8"))
    assert _ops(kept)["ReduceSum"] == _ops(onnx.load(str(body)))["ReduceSum"] > 0
    assert _ops(folded)["ReduceSum"] == 0
    assert openvino_graph(body, sha256, "bf16") == openvino_graph(body, sha256, "int8")
    for model in (kept, folded):  # a batch of one (the body's output has no recorded shape: OpenVINO infers it)
        assert [v.type.tensor_type.shape.dim[0].dim_value for v in model.graph.input] == [1]


def test_reduced_precision_bodies_hand_over_float16_features(demo_body):
    """A bf16/int8 body's features leave as float16 (the folded body's own features, rounded once); fp32 bodies and
    graphs that are not bodies (logits) stay float32."""
    body, sha256 = demo_body
    half = openvino_graph(body, sha256, "int8", body=True)
    assert half == openvino_graph(body, sha256, "bf16", body=True) != openvino_graph(body, sha256, "int8")
    assert [v.type.tensor_type.elem_type for v in onnx.load(str(half)).graph.output] == [onnx.TensorProto.FLOAT16]
    for graph in (openvino_graph(body, sha256, "fp32", body=True), openvino_graph(body, sha256, "int8")):
        assert [v.type.tensor_type.elem_type for v in onnx.load(str(graph)).graph.output] == [onnx.TensorProto.FLOAT]
    tile = _tile(seed=7)
    features = _features(half, tile)
    assert features.dtype == np.float16
    np.testing.assert_array_equal(features, _features(openvino_graph(body, sha256, "int8"), tile).astype(np.float16))


def test_a_home_that_cannot_hold_the_cache_runs_the_source_graph(demo_body, home: Path):
    body, sha256 = demo_body
    (home / "cache").mkdir(parents=True, exist_ok=True)
    (home / "cache" / "openvino").write_bytes(b"")  # a file where the folder should be (chmod binds no root)
    assert openvino_graph(body, sha256, "int8") == body


def test_openvino_runs_a_batch_on_a_graph_of_one_tile_by_tile(demo_body):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'tsrt[openvino]')")
    from tsrt.engines.providers import OpenVinoSession

    body, sha256 = demo_body
    session = OpenVinoSession(openvino_graph(body, sha256, "fp32"), "f32", share_outputs=True)
    assert session.batch_of_one
    tiles = _tile(seed=3, batch=2)
    (both,) = session.run(None, {"input": tiles})
    first = np.array(session.run(None, {"input": tiles[:1]})[0])
    second = np.array(session.run(None, {"input": tiles[1:]})[0])
    np.testing.assert_array_equal(both, np.concatenate([first, second]))
    np.testing.assert_allclose(both, _features(body, tiles), rtol=1e-3, atol=2e-3)


def test_a_shared_output_outlives_the_memory_openvino_gives_back(demo_body):
    """OpenVINO frees its intermediate maps after every run; a body's features handed as OpenVINO's own buffer
    must stay intact while the process reuses memory (here: a large allocation written over, then another
    graph's run) until the next run of the same session."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'tsrt[openvino]')")
    from tsrt.engines.providers import OpenVinoSession

    body, sha256 = demo_body
    graph = openvino_graph(body, sha256, "fp32")
    shared = OpenVinoSession(graph, "f32", share_outputs=True)
    tile = _tile(seed=5)
    (features,) = shared.run(None, {"input": tile})
    scribble = np.full(64 << 20, 7, dtype=np.uint8)  # memory the freed maps may have held
    OpenVinoSession(graph, "f32").run(None, {"input": _tile(seed=6)})
    del scribble
    (copied,) = OpenVinoSession(graph, "f32").run(None, {"input": tile})
    np.testing.assert_array_equal(features, copied)


def test_openvino_runs_leave_the_output_layer_to_onnxruntime():
    """The head runs a few rows at a time: ONNX Runtime's CPU there (faster and leaner than OpenVINO's dynamic
    shapes), in fp32 whatever the body's precision."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'tsrt[openvino]')")
    from tsrt.pipeline.infer import load_model

    model = load_model(demo_model_dir(), provider="openvino")
    assert model.provider_used == "openvino" and [head.provider_name for head in model.heads] == ["cpu"]
    assert [session.provider_name for session in model.sessions] == ["openvino"]
