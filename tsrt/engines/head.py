"""A network's output layer run apart from the rest, so a tile's logits are made a few rows at a time.

nnU-Net networks end in a 1x1x1 convolution from the last decoder features (32 for TotalSegmentator)
to the classes (up to 118): at 128^3 that output is ~1 GB of float32, the largest buffer of a run.
Split there, the body graph returns the features (256 MB) and the head graph (that convolution alone)
runs on a few rows at a time inside the sliding window. Both run on the same ONNX Runtime provider, so
each logit comes from the same kernel over the same 32 numbers as in the whole graph (the tests check
the logits are identical). The two graphs are derived once per source graph and cached, sealed, beside
ONNX Runtime's optimised graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tsrt.config import tsrt_home
from tsrt.engines.providers import intact_cache, save_sealed_graph, sealed_sha256

log = logging.getLogger("tsrt")

#: Input name of the head graph (the body's features go in here).
HEAD_INPUT = "features"
HEAD_OUTPUT = "logits"


@dataclass(frozen=True)
class SplitGraph:
    """The body (input -> last features) and the head (features -> logits) of one graph."""

    body: Path
    body_output: str
    head: Path
    #: The graphs' sha256 as sealed (already checked), so sessions need not hash them again at start-up.
    body_sha256: str = ""
    head_sha256: str = ""


def split_output_head(graph: Path, graph_sha256: str) -> SplitGraph | None:
    """The graph split before its pointwise output convolution, or None when it does not end in one.

    Cached by the source graph's sha256 (a marker remembers graphs that cannot be split, so the large
    source is parsed once, not on every run).
    """
    folder = tsrt_home() / "cache" / "ort"
    stem = f"{graph.stem}-{graph_sha256[:24]}"
    body, head, not_split = (folder / f"{stem}.body.onnx", folder / f"{stem}.head.onnx", folder / f"{stem}.nohead")
    if not_split.exists():
        return None
    if intact_cache(body) and intact_cache(head):
        return sealed_split(body, body.with_suffix(".output").read_text().strip(), head)
    import onnx

    model = onnx.load(str(graph))
    parts = _split(model)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if parts is None:
            not_split.touch()
            return None
        body_model, head_model, features = parts
        for part, target in ((body_model, body), (head_model, head)):
            save_sealed_graph(part, target)
        body.with_suffix(".output").write_text(features)
    except OSError as error:  # a read-only home: run the whole graph, as before
        log.debug("cannot cache the split graph of %s: %s", graph, error)
        return None
    return sealed_split(body, features, head)


def sealed_split(body: Path, features: str, head: Path) -> SplitGraph:
    """The split graph with the sha256 values its seals hold (written or checked by the caller)."""
    return SplitGraph(
        body, features, head, sealed_sha256(body), sealed_sha256(head)
    )


def _split(model):
    """(body, head, features tensor name) of an ONNX model ending in a 1x1x1 Conv, else None."""
    from onnx import helper, numpy_helper

    graph = model.graph
    if len(graph.output) != 1:
        return None
    producers = [node for node in graph.node if graph.output[0].name in node.output]
    if len(producers) != 1 or producers[0].op_type != "Conv":
        return None
    conv = producers[0]
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    if len(conv.input) < 2 or any(name not in initializers for name in conv.input[1:]):
        return None
    weight = numpy_helper.to_array(initializers[conv.input[1]])
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    pointwise = (
        weight.ndim == 5 and weight.shape[2:] == (1, 1, 1) and attributes.get("group", 1) == 1
        and all(v == 1 for v in attributes.get("strides", [1])) and all(v == 1 for v in attributes.get("dilations", [1]))
        and all(v == 0 for v in attributes.get("pads", [0])) and attributes.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    )
    if not pointwise:
        return None
    features = conv.input[0]
    elem_type = graph.output[0].type.tensor_type.elem_type

    head_inputs = [HEAD_INPUT, *(f"head_{i}" for i in range(1, len(conv.input)))]
    head_weights = [
        numpy_helper.from_array(numpy_helper.to_array(initializers[name]), head_inputs[i])
        for i, name in enumerate(conv.input) if i > 0
    ]
    head_graph = helper.make_graph(
        [helper.make_node("Conv", head_inputs, [HEAD_OUTPUT], **attributes)], "output_head",
        [helper.make_tensor_value_info(HEAD_INPUT, elem_type, [None, weight.shape[1], None, None, None])],
        [helper.make_tensor_value_info(HEAD_OUTPUT, elem_type, None)], head_weights,
    )
    head = helper.make_model(head_graph, opset_imports=model.opset_import)
    head.ir_version = model.ir_version

    graph.node.remove(conv)
    graph.ClearField("output")
    graph.output.append(helper.make_tensor_value_info(features, elem_type, None))
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    return model, head, features
