"""The form of a graph OpenVINO runs: a batch of one, and for bf16 and int8 the InstanceNorms in one node each.

Why: with a dynamic batch axis OpenVINO cannot plan its memory ahead, and tsrt's graphs write each
InstanceNorm over a large map as a two-level reduction (ONNX Runtime's numbers, and `--low-memory`'s
slabs, depend on it; see tsrt.engines.graph_patterns), which OpenVINO runs node by node, each node
writing a whole map. On a static batch of one, with each norm folded into one InstanceNormalization
(OpenVINO's MVN) for bf16 and int8, the TotalSegmentator-sized body needs far less (`--fast` on
example_ct, whole run, peak RSS in MiB: fp32 2507 -> 2091, bf16 2081 -> 1473, int8 2005 -> 1287).

fp32 keeps the two levels: OpenVINO's one-level sums are ~20x further from ONNX Runtime's features (mean
|difference| 1.4e-4 vs 6.5e-6 on a 128^3 tile). bf16 and int8 round far more than either form: against
OpenVINO fp32 on the trained backbone at 128^3 (example_ct `--fast`, 8 classes), bf16 gave mean Dice 0.9874
in the old form (dynamic batch), 0.9700 on a batch of one unfolded, 0.9824 folded; on the demo model's
phantom 0.9995, 0.9994 and 0.9996. Kernel choices move bf16 that much; the folded form is the leanest.

A body (a graph split before its output layer, tsrt.engines.head) run in bf16 or int8 hands its features over
in float16: half the 256 MB of a TotalSegmentator tile's 32 feature maps (the whole int8 run peaked 125 MiB
lower), and float16's rounding (2^-11 relative) is finer than the arithmetic that made them (bf16 keeps 8
bits; int8 quantises every convolution's input). InstanceNorm's outputs are far inside float16's range. The
output layer then runs on them in float32. fp32 bodies keep float32 features.

The rewritten graph is derived once per source graph (keyed by its sha256) and cached, sealed, beside
OpenVINO's compiled blobs; a home that cannot hold it runs the source graph as before.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tsrt.config import tsrt_home
from tsrt.engines.graph_patterns import GraphIndex, TwoLevelNorm, match_two_level_norm
from tsrt.engines.providers import intact_cache, save_sealed_graph

log = logging.getLogger("tsrt")

#: Names the cached rewritten graphs: a new rewrite never reads an older one.
REWRITE_VERSION = "-v1"


def openvino_graph(graph: Path, graph_sha256: str, precision: str, body: bool = False) -> Path:
    """The cached OpenVINO form of `graph` for `precision` (written on first use), or `graph` itself when it
    cannot be cached; InstanceNorms are folded for bf16 and int8, whose bodies (`body`: features, not logits)
    return float16 (see above)."""
    reduced = precision in ("bf16", "int8")
    half = reduced and body
    form = ("folded" if reduced else "batch1") + ("-half" if half else "")
    target = (tsrt_home() / "cache" / "openvino"
              / f"{graph.stem}-{graph_sha256[:24]}.openvino-{form}{REWRITE_VERSION}.onnx")
    if intact_cache(target):
        return target
    import onnx

    model = onnx.load(str(graph))
    folded = fold_two_level_norms(model) if reduced else 0
    fix_batch_of_one(model)
    if half:
        cast_outputs_to_half(model)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_sealed_graph(model, target)
    except OSError as error:
        log.debug("cannot cache OpenVINO's form of %s: %s", graph, error)
        return graph
    log.debug("OpenVINO's form of %s: %d InstanceNorm(s) folded", graph.name, folded)
    return target


def fold_two_level_norms(model) -> int:
    """Replace every two-level InstanceNorm of `model` by one InstanceNormalization node (in place); returns how
    many. A match whose reductions are not over a whole (channel, instance) map is left as it is."""
    from onnx import helper, numpy_helper

    graph = GraphIndex(model)
    folds: dict[int, tuple[TwoLevelNorm, object]] = {}
    for node in graph.nodes:
        norm = match_two_level_norm(graph, node) if node.op_type == "Reshape" else None
        shape = norm and _whole_map_statistics(graph, norm)
        if shape is None:
            continue
        channels, epsilon = shape
        prefix = f"{norm.back.output[0]}/folded"
        scale, bias = f"{prefix}/scale", f"{prefix}/bias"
        model.graph.initializer.extend([numpy_helper.from_array(np.ones(channels, np.float32), scale),
                                        numpy_helper.from_array(np.zeros(channels, np.float32), bias)])
        folds[id(norm.back)] = (norm, helper.make_node(
            "InstanceNormalization", [norm.input, scale, bias], [norm.output], name=prefix, epsilon=epsilon))
    if not folds:
        return 0
    removed = {id(n) for norm, _ in folds.values() for n in norm.nodes[:-1]}  # `back` becomes the folded node
    nodes = _live([folds[id(n)][1] if id(n) in folds else n for n in graph.nodes if id(n) not in removed],
                  {value.name for value in model.graph.output})
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(folds)


def _live(nodes: list, outputs: set[str]) -> list:
    """`nodes` without those no graph output depends on (the folded patterns' Constant nodes), in order."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(node.input)
    return live[::-1]


def _whole_map_statistics(graph: GraphIndex, norm: TwoLevelNorm) -> tuple[int, float] | None:
    """(channels, epsilon) when the pattern's statistics are each map's own: a reshape to (N, C, rows, plane),
    sums over the plane then the rows, one scale for mean and variance; else None."""
    shape = _constant(graph, norm.reshape.input[1])
    first, second = (_reduced_axes(graph, node) for node in (norm.row_sum, norm.rows_sum))
    scales = [_constant(graph, name) for node in (norm.mean_scale, norm.variance_scale) for name in node.input
              if name in graph.constants]
    epsilon = [_constant(graph, name) for name in norm.add_eps.input if name in graph.constants]
    if shape is None or shape.shape != (4,) or first not in ([3], [-1]) or second not in ([2], [-2]):
        return None
    if len(scales) != 2 or scales[0].size != 1 or not np.array_equal(scales[0], scales[1]) or len(epsilon) != 1:
        return None
    return int(shape[1]), float(epsilon[0].reshape(()))


def _constant(graph: GraphIndex, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    tensor = graph.constants.get(name)
    return None if tensor is None else numpy_helper.to_array(tensor)


def _reduced_axes(graph: GraphIndex, node) -> list[int] | None:
    """The axes a keepdims ReduceSum reduces (opset 13+: its second input), else None."""
    if graph.attributes(node).get("keepdims", 1) != 1 or len(node.input) < 2:
        return None
    axes = _constant(graph, node.input[1])
    return None if axes is None else [int(a) for a in axes.reshape(-1)]


def fix_batch_of_one(model) -> None:
    """Give the graph's inputs and outputs a batch axis of 1 (the sliding window runs one tile at a time;
    OpenVinoSession runs a larger batch tile by tile)."""
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = 1


def cast_outputs_to_half(model) -> None:
    """Make every float32 output of the graph float16: its producer writes a renamed float32 value, cast to the
    output's name (what reads the value inside the graph reads the float32 one)."""
    from onnx import TensorProto, helper

    for output in model.graph.output:
        if output.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        full = output.name + "/float32"
        for node in model.graph.node:
            node.output[:] = [full if name == output.name else name for name in node.output]
            node.input[:] = [full if name == output.name else name for name in node.input]
        model.graph.node.append(helper.make_node("Cast", [full], [output.name], to=TensorProto.FLOAT16,
                                                 name=output.name + "/to_float16"))
        output.type.tensor_type.elem_type = TensorProto.FLOAT16
