"""`F.linear` calls for matmuls by the transpose of a weight that is not a constant.

In the graphs of the backend's autograd path the parameters are graph inputs, so a linear
layer reads `MatMul(x, Transpose(W))`, then `Add(., b)`. `plan_linear_calls(graph)` finds
them and the exporter emits one `torch.nn.functional.linear(x, W, b)`: one addmm with the
bias fused instead of a matmul and an add, and a backward that computes the weight's
gradient in W's own layout (the matmul's gives it transposed, which AccumulateGrad copies).
Matmuls by constant weights are `fx_linear`'s (prepacked) or stay matmuls.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from graphopt.exporters.fx_linear import sole_user
from graphopt.ir.graph import Graph, Node, Value


@dataclasses.dataclass
class LinearCall:
    """`F.linear(x, weight, bias)` standing for the nodes `absorbed` (the last one's output)."""

    x: Value
    weight: Value
    bias: Optional[Value]
    absorbed: list[Node]

    @property
    def last(self) -> Node:
        return self.absorbed[-1]


def plan_linear_calls(graph: Graph) -> dict[int, LinearCall]:
    """{id(matmul node): call} for each `MatMul(x, Transpose(W))` with W a 2-D graph input of x's
    float type and x of rank >= 2; a following `Add` of a [N] graph input or constant (the
    matmul read by that Add only) becomes the bias; the Transpose is absorbed when the
    matmul is its only reader."""
    plans: dict[int, LinearCall] = {}
    for node in graph.nodes:
        weight = _transposed_input(node)
        if weight is None:
            continue
        transpose = node.inputs[1].producer  # type: ignore[union-attr]
        absorbed = [transpose, node] if len(node.inputs[1].uses()) == 1 else [node]  # type: ignore[union-attr]
        plan = LinearCall(node.inputs[0], weight, None, absorbed)  # type: ignore[arg-type]
        bias_add = _bias_add(node, weight)
        if bias_add is not None:
            plan.absorbed.append(bias_add[0])
            plan.bias = bias_add[1]
        plans[id(node)] = plan
    return plans


def _transposed_input(node: Node) -> Optional[Value]:
    """W when `node` is MatMul(x, Transpose(W)) as `plan_linear_calls` takes it."""
    if node.domain != "" or node.op_type != "MatMul" or any(v is None for v in node.inputs):
        return None
    x, transposed = node.inputs
    transpose = transposed.producer  # type: ignore[union-attr]
    if transpose is None or transpose.domain != "" or transpose.op_type != "Transpose" or tuple(transpose.attrs.get("perm", ())) != (1, 0):
        return None
    weight = transpose.inputs[0]
    if weight is None or weight.producer is not None or weight.is_constant or weight.type.rank != 2:
        return None
    if x.dtype is None or not x.dtype.is_float or weight.dtype != x.dtype or x.type.rank is None or x.type.rank < 2:  # type: ignore[union-attr]
        return None
    return weight


def _bias_add(node: Node, weight: Value) -> Optional[tuple[Node, Value]]:
    """(the Add, its bias vector) when an Add of a bias alone reads the matmul's output."""
    add = sole_user(node.output)
    if add is None or add.domain != "" or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    bias = add.inputs[1] if add.inputs[0] is node.output else add.inputs[0]
    if bias is None or bias is node.output or bias.producer is not None or bias.dtype != weight.dtype:
        return None
    n = weight.shape[0] if weight.shape else None  # type: ignore[index]
    if bias.shape is None or len(bias.shape) != 1 or not isinstance(n, int) or bias.shape[0] != n:
        return None
    if add.output.type.shape != node.output.type.shape:
        return None
    return add, bias
