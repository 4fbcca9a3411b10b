"""Lookups over an ONNX graph, and the one node pattern two engines rewrite: tsrt's two-level InstanceNorm.

Why a module of its own: `tsrt.engines.slabs` runs that pattern a few rows at a time (ONNX Runtime, the same
numbers bit for bit), and `tsrt.engines.openvino_graph` folds it back into one InstanceNormalization for
OpenVINO (which then keeps one map instead of six). Both must recognise exactly the same nodes.

The pattern (written by tsrt.models.onnx_graph and the torch exporter for maps of >= 2**16 voxels):
Reshape(x -> N, C, rows, plane) -> ReduceSum(plane) -> ReduceSum(rows) -> Mul(1/count) = mean;
Sub(rows, mean) = centred; Mul(centred, centred) -> ReduceSum -> ReduceSum -> Mul(1/count) -> Add(eps) -> Sqrt;
Div(centred, deviation) -> Reshape(back to x's shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class GraphIndex:
    """Producer, consumer and constant lookups over an ONNX graph."""

    def __init__(self, model) -> None:
        from onnx import helper

        self.nodes = list(model.graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in dict.fromkeys(node.input):  # a node reading a tensor twice is one consumer
                self.consumers.setdefault(name, []).append(node)
        self.constants = {t.name: t for t in model.graph.initializer}
        for node in self.nodes:  # Constant nodes' values count as constants too
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self.constants[node.output[0]] = attribute.t
        self.attribute_value = helper.get_attribute_value

    def only_consumer(self, name: str, op_type: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def consumer(self, name: str, op_type: str):
        users = [n for n in self.consumers.get(name, []) if n.op_type == op_type]
        return users[0] if len(users) == 1 else None

    def attributes(self, node) -> dict[str, Any]:
        return {a.name: self.attribute_value(a) for a in node.attribute}


@dataclass
class TwoLevelNorm:
    """The nodes of one two-level InstanceNorm (without its affine part, which follows as Mul and Add)."""

    reshape: Any  # to (N, C, rows, plane)
    row_sum: Any  # first-level ReduceSum (its twin `variance_row` sums the squares)
    rows_sum: Any  # second-level ReduceSum
    mean_scale: Any
    centre: Any
    square: Any
    variance_row: Any
    variance_rows: Any
    variance_scale: Any
    add_eps: Any
    sqrt: Any
    divide: Any
    back: Any  # Reshape to the input's shape

    @property
    def input(self) -> str:
        return self.reshape.input[0]

    @property
    def output(self) -> str:
        return self.back.output[0]

    @property
    def nodes(self) -> tuple:
        """Every node of the pattern, the final Reshape (`back`) last."""
        return (self.reshape, self.row_sum, self.rows_sum, self.mean_scale, self.centre, self.square, self.variance_row,
                self.variance_rows, self.variance_scale, self.add_eps, self.sqrt, self.divide, self.back)

    @property
    def internal_outputs(self) -> set[str]:
        """Every tensor the pattern computes, its output included."""
        return {node.output[0] for node in self.nodes}


def match_two_level_norm(graph: GraphIndex, reshape) -> TwoLevelNorm | None:
    """The two-level InstanceNorm starting at `reshape` (a Reshape node), or None when the nodes after it differ."""
    if reshape is None or reshape.op_type != "Reshape" or len(graph.consumers.get(reshape.output[0], [])) != 2:
        return None
    row_sum = graph.consumer(reshape.output[0], "ReduceSum")
    centre = graph.consumer(reshape.output[0], "Sub")
    rows_sum = row_sum and graph.only_consumer(row_sum.output[0], "ReduceSum")
    mean_scale = rows_sum and graph.only_consumer(rows_sum.output[0], "Mul")
    if mean_scale is None or centre is None or list(centre.input) != [reshape.output[0], mean_scale.output[0]]:
        return None
    square = graph.consumer(centre.output[0], "Mul")
    divide = graph.consumer(centre.output[0], "Div")
    if square is None or divide is None or list(square.input) != [centre.output[0]] * 2:
        return None
    variance_row = graph.only_consumer(square.output[0], "ReduceSum")
    variance_rows = variance_row and graph.only_consumer(variance_row.output[0], "ReduceSum")
    variance_scale = variance_rows and graph.only_consumer(variance_rows.output[0], "Mul")
    add_eps = variance_scale and graph.only_consumer(variance_scale.output[0], "Add")
    sqrt = add_eps and graph.only_consumer(add_eps.output[0], "Sqrt")
    if sqrt is None or list(divide.input) != [centre.output[0], sqrt.output[0]]:
        return None
    same_reductions = (list(variance_row.input[1:]) == list(row_sum.input[1:])
                       and list(variance_rows.input[1:]) == list(rows_sum.input[1:])
                       and graph.attributes(variance_row) == graph.attributes(row_sum)
                       and graph.attributes(variance_rows) == graph.attributes(rows_sum))
    back = graph.only_consumer(divide.output[0], "Reshape")
    if not same_reductions or back is None:
        return None
    return TwoLevelNorm(
        reshape=reshape, row_sum=row_sum, rows_sum=rows_sum, mean_scale=mean_scale, centre=centre, square=square,
        variance_row=variance_row, variance_rows=variance_rows, variance_scale=variance_scale, add_eps=add_eps,
        sqrt=sqrt, divide=divide, back=back,
    )
