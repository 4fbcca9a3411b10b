"""`--low-memory`: a U-Net body run a few rows at a time at every large resolution, for the same features.

Why: at a 128^3 TotalSegmentator tile every full-resolution feature map is 256 MB, and ONNX Runtime's
whole-graph run holds up to five at once (the last decoder stage keeps the skip, the upsampled map,
their concatenation and the convolution's output): ~1.4 GB above the process. Convolutions are local
along the first spatial axis, so they can run in slabs of rows; only InstanceNorm needs a whole map, and
tsrt's graphs compute its statistics in two levels (sums over each row's plane, then over the rows; see
TWO_LEVEL_NORM_MIN_VOXELS). The row sums do not depend on the other rows, so they are gathered slab by
slab and the second level runs once on all of them.

Every operation is a node of the session's own optimised graph run by ONNX Runtime on a slab, so each
value comes from the same kernel over the same numbers: the features equal the whole graph's bit for bit
(the tests compare them). A level of the U-Net (its encoder blocks, the level below it, the upsampling,
its decoder blocks) is planned this way while its maps are large enough to carry two-level statistics;
the levels below run as one graph cut from the rest (the "inner" graph). Each block after a level's first
writes its output over the rows of its input that no later slab reads, and normalises its predecessor's
rows as it reads them, so a level keeps one map of each size.

The price is time: many small runs, and copies of the rows each slab reads (measured on --fast
example_ct with the TotalSegmentator-sized net, AMD EPYC, 2 cores, benchmark medians of 3: peak 965 instead of
1794 MiB, wall 6.7 vs 5.9 s). So it is opt-in. Graphs of another shape (residual encoders, quantized graphs, InstanceNorm
without two-level statistics at full resolution) return None from `plan_slabs` and run whole.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tsrt.engines.graph_patterns import GraphIndex, match_two_level_norm
from tsrt.engines.providers import (
    ProviderChoice, create_session, intact_cache, open_cpu_graph, optimized_cache_path, save_sealed_graph,
)

log = logging.getLogger("tsrt")

#: Voxels per channel in one slab of a convolution's output (4 rows of a 128^2 plane, 16 of a 64^2 one).
#: A convolution's extra input rows are copied, not recomputed, so the arithmetic does not grow with the
#: slab count, while the temporaries shrink with the slabs (an earlier form of this module peaked 120 MB
#: higher with 16-row slabs at 128^3, at the same speed).
SLAB_VOXELS = 4 * 128 * 128

#: Names the cached cut graphs: a new way of cutting never reads an older cut.
CUT_VERSION = "-v1"

@dataclass
class NormalizedConv:
    """One Conv -> two-level InstanceNorm -> (affine) -> (nonlinearity) block, with the nodes it runs."""

    conv: Any  # onnx NodeProto of the convolution
    conv_weights: list  # its constant inputs (weight, bias)
    kernel: int  # along the first axis
    stride: int  # along the first axis
    pad: int  # along the first axis (each side)
    out_channels: int
    row_sum: Any  # first-level ReduceSum (also used on the squares)
    rows_sum: Any  # second-level ReduceSum
    mean_scale: Any
    centre: Any
    square: Any
    variance_scale: Any
    add_eps: Any
    sqrt: Any
    divide: Any
    tail: list  # affine Mul and Add (if any), then the nonlinearity (if any)
    constants: dict[str, Any]  # name -> TensorProto read by the statistics and tail nodes

    def output_rows(self, input_rows: int) -> int:
        return (input_rows + 2 * self.pad - self.kernel) // self.stride + 1

    def input_span(self, lo: int, hi: int) -> tuple[int, int]:
        """Input rows (possibly outside the map: zero padding) that output rows [lo, hi) read."""
        return lo * self.stride - self.pad, (hi - 1) * self.stride - self.pad + self.kernel


@dataclass
class LevelPlan:
    """One resolution level of the U-Net: encoder blocks, the level below, upsampling, decoder blocks."""

    input_name: str
    output_name: str
    encoder: list[NormalizedConv]
    skip: str
    inner_output: str  # input of this level's transposed convolution
    inner: LevelPlan | None  # None: the inner graph computes inner_output from skip
    upsample: Any  # ConvTranspose node
    upsample_weights: list
    upsample_stride: int
    concat_skip_first: bool
    decoder: list[NormalizedConv]

    def deepest(self) -> LevelPlan:
        return self.inner.deepest() if self.inner is not None else self


@dataclass
class SlabPlan:
    """A body graph's levels and what its small graphs need from the source model."""

    top: LevelPlan
    opset: list
    ir_version: int


def _conv_geometry(graph: GraphIndex, conv) -> tuple[int, int, int, int] | None:
    """(kernel, stride, pad along the first axis, out channels) of a 3-D Conv with constant weights, symmetric
    explicit padding and no groups or dilation; else None."""
    attributes = graph.attributes(conv)
    weight = graph.constants.get(conv.input[1]) if len(conv.input) > 1 else None
    if weight is None or len(weight.dims) != 5 or attributes.get("group", 1) != 1:
        return None
    if any(d != 1 for d in attributes.get("dilations", [1])):
        return None
    if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    pads = list(attributes.get("pads", [0] * 6))
    strides = list(attributes.get("strides", [1, 1, 1]))
    if len(pads) != 6 or pads[:3] != pads[3:] or len(strides) != 3:
        return None
    if len(conv.input) > 2 and conv.input[2] not in graph.constants:
        return None
    return int(weight.dims[2]), int(strides[0]), int(pads[0]), int(weight.dims[0])


def _normalized_conv(graph: GraphIndex, conv) -> tuple[NormalizedConv, str] | None:
    """The block starting at `conv` and the name of its output, when it matches the two-level pattern."""
    geometry = _conv_geometry(graph, conv)
    norm = geometry and match_two_level_norm(graph, graph.only_consumer(conv.output[0], "Reshape"))
    if not norm:
        return None
    tail, output = [], norm.output
    scale = graph.only_consumer(output, "Mul")
    shift = scale and graph.only_consumer(scale.output[0], "Add")
    if scale is not None:
        if shift is None:
            return None
        tail, output = [scale, shift], shift.output[0]
    activation = graph.only_consumer(output, "LeakyRelu") or graph.only_consumer(output, "Relu")
    if activation is not None:
        tail.append(activation)
        output = activation.output[0]
    computed = norm.internal_outputs | {n.output[0] for n in tail}
    constants = {}
    for node in (norm.row_sum, norm.rows_sum, norm.mean_scale, norm.variance_scale, norm.add_eps, *tail):
        for name in node.input:
            if name in graph.constants:
                constants[name] = graph.constants[name]
            elif name not in computed:
                return None  # reads some other tensor: not the pattern
    kernel, stride, pad, channels = geometry
    block = NormalizedConv(
        conv=conv, conv_weights=[graph.constants[n] for n in conv.input[1:]], kernel=kernel, stride=stride, pad=pad,
        out_channels=channels, row_sum=norm.row_sum, rows_sum=norm.rows_sum, mean_scale=norm.mean_scale,
        centre=norm.centre, square=norm.square, variance_scale=norm.variance_scale, add_eps=norm.add_eps,
        sqrt=norm.sqrt, divide=norm.divide, tail=tail,
        constants=constants,
    )
    return block, output


def _plan_level(graph: GraphIndex, input_name: str, output_name: str) -> LevelPlan | None:
    """The level reading `input_name` (its first block may downsample) and producing `output_name`."""
    encoder, tensor = [], input_name
    while True:
        if encoder:  # inside the level: one Conv reads each block's output, until the skip
            users = graph.consumers.get(tensor, [])
            conv = users[0] if len(users) == 1 and users[0].op_type == "Conv" else None
        else:  # the level's input may also feed the level above's concatenation
            conv = graph.consumer(tensor, "Conv")
        if conv is None:
            break
        found = _normalized_conv(graph, conv)
        if found is None:
            return None
        encoder.append(found[0])
        tensor = found[1]
    if not encoder:
        return None
    skip = tensor
    concat = graph.consumer(skip, "Concat")
    if concat is None or len(concat.input) != 2 or graph.attributes(concat).get("axis") != 1:
        return None
    concat_skip_first = concat.input[0] == skip
    upsample = graph.producer.get(concat.input[1] if concat_skip_first else concat.input[0])
    if upsample is None or upsample.op_type != "ConvTranspose":
        return None
    attributes = graph.attributes(upsample)
    weight = graph.constants.get(upsample.input[1])
    strides = list(attributes.get("strides", []))
    if (weight is None or len(weight.dims) != 5 or len(strides) != 3 or list(weight.dims[2:]) != strides
            or any(p != 0 for p in attributes.get("pads", [0])) or attributes.get("group", 1) != 1
            or attributes.get("output_padding") or attributes.get("output_shape")
            or any(n not in graph.constants for n in upsample.input[1:])):
        return None  # only kernel == stride: each output row comes from one input row
    decoder, tensor = [], concat.output[0]
    while tensor != output_name:
        users = graph.consumers.get(tensor, [])
        found = _normalized_conv(graph, users[0]) if len(users) == 1 and users[0].op_type == "Conv" else None
        if found is None or found[0].stride != 1 or found[0].kernel != 2 * found[0].pad + 1:
            return None
        decoder.append(found[0])
        tensor = found[1]
    if not decoder or any(b.stride != 1 or b.kernel != 2 * b.pad + 1 for b in encoder[1:]):
        return None
    return LevelPlan(
        input_name=input_name, output_name=output_name, encoder=encoder, skip=skip, inner_output=upsample.input[0],
        inner=_plan_level(graph, skip, upsample.input[0]), upsample=upsample,
        upsample_weights=[graph.constants[n] for n in upsample.input[1:]], upsample_stride=int(strides[0]),
        concat_skip_first=concat_skip_first, decoder=decoder,
    )


def plan_slabs(model) -> SlabPlan | None:
    """How to run `model` in slabs, or None when its shape is not known: an ONNX body graph of a 3-D nnU-Net,
    or the outer graph `split_inner` makes of one (its second input is the inner graph's output)."""
    if len(model.graph.input) not in (1, 2) or len(model.graph.output) != 1:
        return None
    graph = GraphIndex(model)
    top = _plan_level(graph, model.graph.input[0].name, model.graph.output[0].name)
    if top is None or top.encoder[0].stride != 1:
        return None
    return SlabPlan(top=top, opset=list(model.opset_import), ir_version=model.ir_version)


def split_inner(model) -> tuple[Any, Any] | None:
    """(outer, inner) of a body graph `plan_slabs` can run: the inner graph computes the deepest planned
    level's upsampling input from its skip (the small maps, nearly all the weights); the outer graph is the
    rest, with that input as a second graph input. None when the graph has another shape."""
    from onnx import helper

    plan = plan_slabs(model)
    if plan is None:
        return None
    graph = GraphIndex(model)
    deepest = plan.top.deepest()
    source, target = deepest.skip, deepest.inner_output
    inner_nodes, stack, seen = set(), [target], set()
    while stack:
        name = stack.pop()
        if name in seen or name == source or (name in graph.constants and name not in graph.producer):
            continue
        seen.add(name)
        node = graph.producer.get(name)
        if node is None:
            return None  # it reaches the graph's input some other way: not separable
        inner_nodes.add(id(node))
        stack.extend(n for n in node.input if n)
    elem = model.graph.input[0].type.tensor_type.elem_type

    def subgraph(nodes: list, name: str, inputs: list[str], output: str):
        used = {n for node in nodes for n in node.input}
        part = helper.make_model(helper.make_graph(
            nodes, name, [helper.make_tensor_value_info(n, elem, None) for n in inputs],
            [helper.make_tensor_value_info(output, elem, None)],
            [t for t in model.graph.initializer if t.name in used],
        ), opset_imports=model.opset_import)
        part.ir_version = model.ir_version
        return part

    inner = subgraph([n for n in graph.nodes if id(n) in inner_nodes], "inner", [source], target)
    outer = subgraph([n for n in graph.nodes if id(n) not in inner_nodes], "outer",
                     [plan.top.input_name, target], plan.top.output_name)
    return outer, inner


# -- the small graphs a block runs ------------------------------------------------------------------------


def _renamed(node, mapping: dict[str, str]):
    clone = copy.deepcopy(node)
    for i, name in enumerate(clone.input):
        clone.input[i] = mapping.get(name, name)
    for i, name in enumerate(clone.output):
        clone.output[i] = mapping.get(name, name)
    return clone


def _renamed_tensor(tensor, name: str):
    clone = copy.deepcopy(tensor)
    clone.name = name
    return clone


def _int64(values: list[int]):
    """An int64 constant (named when a graph builder adds it)."""
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=np.int64))


class _GraphBuilder:
    """Nodes, inputs and constants of one small graph; tensor names get a prefix per block."""

    def __init__(self, plan: SlabPlan) -> None:
        self.plan = plan
        self.nodes: list = []
        self.inputs: list[str] = []
        self.constants: dict[str, Any] = {}

    def constant(self, tensor, name: str) -> str:
        self.constants[name] = _renamed_tensor(tensor, name)
        return name

    def build(self, outputs: list[str]) -> bytes:
        from onnx import TensorProto, helper

        types = {name: TensorProto.INT64 if name in ("pads", "starts", "ends") else TensorProto.FLOAT
                 for name in self.inputs}
        graph = helper.make_graph(
            self.nodes, "slab", [helper.make_tensor_value_info(n, types[n], None) for n in self.inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
            list(self.constants.values()),
        )
        model = helper.make_model(graph, opset_imports=self.plan.opset)
        model.ir_version = self.plan.ir_version
        return model.SerializeToString()


def _add_normalise(g: _GraphBuilder, block: NormalizedConv, x: str, plane: tuple[int, int], tag: str) -> str:
    """Nodes normalising raw rows `x` (1, C, h, Y, Z) of `block` with its statistics (inputs `mean{tag}` and
    `deviation{tag}`): the block's own Sub, Div, affine and nonlinearity. Returns the output's name."""
    from onnx import helper

    mean, deviation = f"mean{tag}", f"deviation{tag}"
    g.inputs += [mean, deviation]
    g.constant(_int64([0, 0, 0, -1]), f"flat_shape{tag}")
    g.constant(_int64([0, 0, 0, *plane]), f"volume_shape{tag}")
    g.nodes.append(helper.make_node("Reshape", [x, f"flat_shape{tag}"], [f"flat{tag}"]))
    g.nodes.append(_renamed(block.centre, {block.centre.input[0]: f"flat{tag}", block.centre.input[1]: mean,
                                           block.centre.output[0]: f"centred{tag}"}))
    g.nodes.append(_renamed(block.divide, {block.centre.output[0]: f"centred{tag}", block.sqrt.output[0]: deviation,
                                           block.divide.output[0]: f"scaled{tag}"}))
    g.nodes.append(helper.make_node("Reshape", [f"scaled{tag}", f"volume_shape{tag}"], [f"normalised{tag}"]))
    last = f"normalised{tag}"
    for number, node in enumerate(block.tail):
        mapping = {node.output[0]: f"tail{number}{tag}"}
        for name in node.input:
            if name in block.constants:
                mapping[name] = g.constant(block.constants[name], f"{name}{tag}")
            else:
                mapping[name] = last
        g.nodes.append(_renamed(node, mapping))
        last = f"tail{number}{tag}"
    return last


def _add_conv(g: _GraphBuilder, block: NormalizedConv, x: str, padded: bool) -> None:
    """The block's convolution of `x` (with zero rows added first when `padded`: input `pads`) and its
    first-level row sums: outputs `raw` and `row_sums`."""
    from onnx import helper

    if padded:
        g.inputs.append("pads")
        g.nodes.append(helper.make_node("Pad", [x, "pads"], ["padded"], mode="constant"))
        x = "padded"
    attributes = {a.name: helper.get_attribute_value(a) for a in block.conv.attribute}
    pads = list(attributes["pads"])
    pads[0] = pads[3] = 0  # a slab arrives with the rows around it (zero rows beyond the map's edge)
    attributes["pads"] = pads
    weights = [g.constant(t, f"w{i}") for i, t in enumerate(block.conv_weights)]
    g.nodes.append(helper.make_node("Conv", [x, *weights], ["raw"], **attributes))
    g.constant(_int64([0, 0, 0, -1]), "raw_flat_shape")
    g.nodes.append(helper.make_node("Reshape", ["raw", "raw_flat_shape"], ["raw_flat"]))
    g.nodes.append(_renamed(block.row_sum, {block.row_sum.input[0]: "raw_flat", block.row_sum.output[0]: "row_sums",
                                            **{n: g.constant(block.constants[n], f"{n}_c")
                                               for n in block.row_sum.input[1:] if n in block.constants}}))


def conv_graphs(plan: SlabPlan, block: NormalizedConv, source: str, previous: NormalizedConv | None = None,
                previous_plane: tuple[int, int] = (0, 0), level: LevelPlan | None = None) -> dict[bool, bytes]:
    """The block's convolution graphs, unpadded and padded (keys False, True), for its kind of input:
    `source` "plain" (rows of a finished map: input `x`), "normalise" (raw rows of `previous`, normalised
    first: inputs `x`, `mean_p`, `deviation_p`) or "upsample" (the level's low map rows `low`, upsampled and
    cut to rows `starts`..`ends`, joined to the skip rows `skip`)."""
    from onnx import helper

    graphs = {}
    for padded in (False, True):
        g = _GraphBuilder(plan)
        if source == "plain":
            g.inputs.append("x")
            x = "x"
        elif source == "normalise":
            g.inputs.append("x")
            x = _add_normalise(g, previous, "x", previous_plane, "_p")
        else:
            g.inputs += ["low", "skip", "starts", "ends"]
            names = [g.constant(t, f"u{i}") for i, t in enumerate(level.upsample_weights)]
            g.nodes.append(helper.make_node("ConvTranspose", ["low", *names], ["up"],
                                            **{a.name: helper.get_attribute_value(a) for a in level.upsample.attribute}))
            g.constant(_int64([2]), "slice_axes")
            g.nodes.append(helper.make_node("Slice", ["up", "starts", "ends", "slice_axes"], ["up_rows"]))
            parts = ["skip", "up_rows"] if level.concat_skip_first else ["up_rows", "skip"]
            g.nodes.append(helper.make_node("Concat", parts, ["joined"], axis=1))
            x = "joined"
        _add_conv(g, block, x, padded)
        graphs[padded] = g.build(["raw", "row_sums"])
    return graphs


def statistics_graphs(plan: SlabPlan, block: NormalizedConv, plane: tuple[int, int]) -> dict[str, bytes]:
    """`variance` (row sums of a raw slab's centred squares), `mean` and `deviation` (the second level, once
    per map) and `normalise` (a finished map's slab), from copies of the block's nodes."""
    from onnx import helper

    def constants_of(g: _GraphBuilder, node) -> dict[str, str]:
        return {n: g.constant(block.constants[n], n) for n in node.input if n in block.constants}

    graphs = {}
    g = _GraphBuilder(plan)
    g.inputs += ["raw", "mean"]
    g.constant(_int64([0, 0, 0, -1]), "flat_shape")
    g.nodes.append(helper.make_node("Reshape", ["raw", "flat_shape"], ["flat"]))
    g.nodes.append(_renamed(block.centre, {block.centre.input[0]: "flat", block.centre.input[1]: "mean",
                                           block.centre.output[0]: "centred"}))
    g.nodes.append(_renamed(block.square, {block.centre.output[0]: "centred", block.square.output[0]: "squares"}))
    g.nodes.append(_renamed(block.row_sum, {block.row_sum.input[0]: "squares", block.row_sum.output[0]: "row_sums",
                                            **constants_of(g, block.row_sum)}))
    graphs["variance"] = g.build(["row_sums"])
    for name, nodes in (("mean", [block.mean_scale]), ("deviation", [block.variance_scale, block.add_eps, block.sqrt])):
        g = _GraphBuilder(plan)
        g.inputs.append("row_sums")
        g.nodes.append(_renamed(block.rows_sum, {block.rows_sum.input[0]: "row_sums", block.rows_sum.output[0]: "sums",
                                                 **constants_of(g, block.rows_sum)}))
        last = "sums"
        for number, node in enumerate(nodes):
            mapping = {**constants_of(g, node), node.output[0]: name if number == len(nodes) - 1 else f"s{number}"}
            mapping.update({n: last for n in node.input if n not in block.constants})
            g.nodes.append(_renamed(node, mapping))
            last = mapping[node.output[0]]
        graphs[name] = g.build([name])
    g = _GraphBuilder(plan)
    g.inputs.append("x")
    out = _add_normalise(g, block, "x", plane, "")
    g.nodes.append(helper.make_node("Identity", [out], ["y"]))
    graphs["normalise"] = g.build(["y"])
    return graphs


def _output_plane(block: NormalizedConv, plane: tuple[int, int]) -> tuple[int, int]:
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in block.conv.attribute}
    kernel = [int(d) for d in block.conv_weights[0].dims[3:]]
    strides, pads = list(attributes.get("strides", [1, 1, 1]))[1:], list(attributes["pads"])
    return tuple((size + 2 * pads[1 + i] - kernel[i]) // strides[i] + 1 for i, size in enumerate(plane))


# -- running ----------------------------------------------------------------------------------------------


class _Map:
    """A feature map (1, C, rows, Y, Z) as one array, read and written a slab of rows at a time."""

    def __init__(self, array: np.ndarray, slab_rows: int) -> None:
        self.array, self.rows, self.slab_rows = array, array.shape[2], slab_rows

    def spans(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.slab_rows, self.rows)) for lo in range(0, self.rows, self.slab_rows)]

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) as a contiguous copy (what ONNX Runtime reads)."""
        return np.ascontiguousarray(self.array[:, :, lo:hi])


class _Block:
    """A planned block's sessions, and the statistics of its latest output."""

    def __init__(self, block: NormalizedConv, convs: dict[bool, bytes], statistics: dict[str, bytes], open_session,
                 plane: tuple[int, int]) -> None:
        self.block, self.plane = block, plane
        self.convs = {padded: open_session(graph) for padded, graph in convs.items()}
        self.sessions = {name: open_session(graph) for name, graph in statistics.items()}
        self.mean = self.deviation = None
        self.slab_rows = max(1, block.pad, SLAB_VOXELS // (plane[0] * plane[1]))

    def convolve(self, source: _Map, feeds: Callable[[int, int], dict[str, np.ndarray]], overwrite: bool) -> _Map:
        """The convolution over all output rows, slab by slab, and its output's statistics (kept on self).

        `feeds(lo, hi)`: the graph's inputs for source rows [lo, hi) (copies). With `overwrite`, the output goes
        over the source's own array when the shapes match: a slab's output is written only after the next
        slab's input rows have been copied, and no later slab reads those rows (unit stride, slabs at least
        `pad` rows high), so the chain needs one array.
        """
        block = self.block
        rows = block.output_rows(source.rows)
        shape = (1, block.out_channels, rows, *self.plane)
        fits = overwrite and block.stride == 1 and source.array.shape == shape  # slab_rows >= pad by construction
        out = _Map(source.array if fits else np.empty(shape, dtype=np.float32), self.slab_rows)
        pending, row_sums = None, []
        for lo, hi in out.spans():
            first, last = block.input_span(lo, hi)
            inputs = feeds(max(first, 0), min(last, source.rows))
            before, after = max(0, -first), max(0, last - source.rows)
            if before or after:
                inputs["pads"] = np.asarray([0, 0, before, 0, 0, 0, 0, after, 0, 0], dtype=np.int64)
            if pending is not None:
                out.array[:, :, pending[0]:pending[0] + pending[1].shape[2]] = pending[1]
            raw, sums = self.convs[bool(before or after)].run(["raw", "row_sums"], inputs)
            del inputs
            pending = (lo, raw)
            row_sums.append(sums)
        out.array[:, :, pending[0]:] = pending[1]
        del pending
        self.mean = self.sessions["mean"].run(["mean"], {"row_sums": np.concatenate(row_sums, axis=2)})[0]
        squares = [self.sessions["variance"].run(["row_sums"], {"raw": out.read(lo, hi), "mean": self.mean})[0]
                   for lo, hi in out.spans()]
        self.deviation = self.sessions["deviation"].run(["deviation"], {"row_sums": np.concatenate(squares, axis=2)})[0]
        return out

    def statistics(self) -> dict[str, np.ndarray]:
        return {"mean_p": self.mean, "deviation_p": self.deviation}

    def normalise(self, raw: _Map, release: bool = False) -> _Map:
        """The finished map, normalised in place; with `release`, the last run gives the arena's free memory back."""
        spans = raw.spans()
        for number, (lo, hi) in enumerate(spans):
            feeds = {"x": raw.read(lo, hi), "mean": self.mean, "deviation": self.deviation}
            raw.array[:, :, lo:hi] = self.sessions["normalise"].run(
                ["y"], feeds, release=release and number == len(spans) - 1)[0]
        return raw


class _Level:
    """A planned level's blocks, upsampling and the level below (another _Level or the inner session)."""

    def __init__(self, plan: SlabPlan, level: LevelPlan, plane: tuple[int, int], inner_session,
                 open_session) -> None:
        self.level = level
        self.encoder: list[_Block] = []
        previous, previous_plane = None, plane
        for block in level.encoder:
            plane = _output_plane(block, plane)
            kind = "normalise" if previous is not None else "plain"
            self.encoder.append(_Block(block, conv_graphs(plan, block, kind, previous, previous_plane),
                                       statistics_graphs(plan, block, plane), open_session, plane))
            previous, previous_plane = block, plane
        self.inner = (_Level(plan, level.inner, plane, inner_session, open_session)
                      if level.inner is not None else inner_session)
        self.decoder: list[_Block] = []
        previous = None
        for block in level.decoder:
            kind = "normalise" if previous is not None else "upsample"
            self.decoder.append(_Block(block, conv_graphs(plan, block, kind, previous, plane, level),
                                       statistics_graphs(plan, block, plane), open_session, plane))
            previous = block

    def run(self, tensor: _Map, release: bool = False) -> _Map:
        """This level's output for its input map (over the level's skip array)."""
        skip = _chain(self.encoder, tensor, lambda lo, hi: {"x": tensor.read(lo, hi)}, overwrite=False)
        if isinstance(self.inner, _Level):
            low = self.inner.run(skip).array
        else:
            low = self.inner.run([self.level.inner_output], {self.level.skip: skip.array})[0]
        stride = self.level.upsample_stride

        def joined(lo: int, hi: int) -> dict[str, np.ndarray]:
            first = lo // stride
            return {"low": np.ascontiguousarray(low[:, :, first:-(-hi // stride)]), "skip": skip.read(lo, hi),
                    "starts": np.asarray([lo - first * stride], dtype=np.int64),
                    "ends": np.asarray([hi - first * stride], dtype=np.int64)}

        return _chain(self.decoder, skip, joined, overwrite=True, release=release)


def _chain(blocks: list[_Block], source: _Map, feeds: Callable[[int, int], dict[str, np.ndarray]], overwrite: bool,
           release: bool = False) -> _Map:
    """Run the blocks in turn (each later block normalising its predecessor's rows as it reads them); the last
    block's finished map. Later blocks write over their predecessor's array (the first one over the chain's
    input with `overwrite`)."""
    previous = None
    for block in blocks:
        if previous is not None:
            feeds = lambda lo, hi, raw=source, stats=previous.statistics(): {"x": raw.read(lo, hi), **stats}
            overwrite = True
        source = block.convolve(source, feeds, overwrite)
        previous = block
    return previous.normalise(source, release)


class SlabbedBody:
    """Runs a body graph tile by tile in slabs, with the `run` of a session.

    `outer`: the graph `split_inner` leaves around the inner graph (small: the weights of the planned levels);
    `inner`: a session of the inner graph; `open_session` opens a small graph (serialised bytes) and returns
    a session whose `run` takes `release=`; `plane`: the patch's two trailing axes.
    """

    def __init__(self, outer, inner, open_session: Callable[[bytes], Any], plane: tuple[int, int]) -> None:
        plan = plan_slabs(outer)
        if plan is None or plan.top.deepest().inner is not None:
            raise ValueError("the outer graph does not have the planned shape")
        self.input_name = plan.top.input_name
        self.top = _Level(plan, plan.top, tuple(plane), inner, open_session)
        self.provider_name = getattr(inner, "provider_name", "cpu")

    @property
    def levels(self) -> int:
        """How many resolution levels run in slabs (the rest is the inner graph)."""
        count, level = 1, self.top
        while isinstance(level.inner, _Level):
            count, level = count + 1, level.inner
        return count

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        tiles = feeds[self.input_name]
        features = [self.top.run(_Map(tiles[n:n + 1], tiles.shape[2]), release=True).array
                    for n in range(tiles.shape[0])]
        return [features[0] if len(features) == 1 else np.concatenate(features)]


def open_slabbed_body(body: Path, body_sha256: str, choice: ProviderChoice, threads: int | None,
                      plane: tuple[int, int]) -> SlabbedBody | None:
    """The body graph (tsrt.engines.head's) as a SlabbedBody on ONNX Runtime's CPU, or None when its shape is
    not one `plan_slabs` knows (it then runs whole, as before).

    The inner and outer graphs are cut once from ONNX Runtime's optimised body graph (the nodes a whole
    run executes) and cached beside it, sealed; a marker remembers graphs that cannot be cut.
    """
    optimized = optimized_cache_path(body_sha256, body, choice)
    if not intact_cache(optimized):
        create_session(body, choice, threads=threads, graph_sha256=body_sha256)  # writes the optimised graph
        if not intact_cache(optimized):
            return None  # a read-only home: no cut graphs either
    outer_path = optimized.with_suffix(f".outer{CUT_VERSION}.onnx")
    inner_path = optimized.with_suffix(f".inner{CUT_VERSION}.onnx")
    not_cut = optimized.with_suffix(".noslabs")
    if not_cut.exists():
        return None
    import onnx

    if not (intact_cache(outer_path) and intact_cache(inner_path)):
        parts = split_inner(onnx.load(str(optimized)))
        try:
            if parts is None:
                not_cut.touch()
                return None
            save_sealed_graph(parts[0], outer_path)
            save_sealed_graph(parts[1], inner_path)
        except OSError as error:
            log.debug("cannot cache the slabbed graphs of %s: %s", body, error)
            return None
        del parts
    threads = threads or choice.threads
    try:
        return SlabbedBody(
            onnx.load(str(outer_path)), open_cpu_graph(inner_path, threads),
            lambda graph: open_cpu_graph(graph, threads, small=True), plane,
        )
    except ValueError as error:
        log.debug("running %s whole: %s", body, error)
        return None
