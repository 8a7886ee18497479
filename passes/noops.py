"""`eliminate-noops`: remove ops that return their input unchanged."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional

import numpy as np

from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass


def known_constant(graph: Graph, value: Optional[Value]) -> Optional[np.ndarray]:
    """The data of a small constant (weight or Constant-node output) no caller can override."""
    if value is None or graph.is_overridable(value):
        return None
    return constant_data(value)


def same_known_shape(a: Value, b: Value) -> bool:
    """True when both shapes are fully known (static ints or symbols) and equal."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(x is not None and x == y for x, y in zip(a.shape, b.shape))


Rule = Callable[[Graph, Node], Optional[Value]]
"""A no-op rule: the value a node's first output equals, or None when it is not a no-op."""


def _identity(graph: Graph, node: Node) -> Optional[Value]:
    return node.inputs[0]


def _dropout(graph: Graph, node: Node) -> Optional[Value]:
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None:
        flag = known_constant(graph, training)
        if flag is None or flag.any():
            return None
    return node.inputs[0]


def _cast(graph: Graph, node: Node) -> Optional[Value]:
    source = node.inputs[0]
    target = node.inputs[1].dtype if node.op_type == "CastLike" else _dtype_attr(node.attrs.get("to"))
    return source if source.dtype is not None and source.dtype == target else None


def _dtype_attr(value: object) -> Optional[DType]:
    try:
        return DType(int(value))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _same_shape(graph: Graph, node: Node) -> Optional[Value]:
    source = node.inputs[0]
    return source if same_known_shape(source, node.outputs[0]) else None


def _transpose(graph: Graph, node: Node) -> Optional[Value]:
    source = node.inputs[0]
    perm = node.attrs.get("perm")
    if perm is None:
        return source if source.shape is not None and len(source.shape) <= 1 else None
    return source if tuple(perm) == tuple(range(len(perm))) else None


def _slice(graph: Graph, node: Node) -> Optional[Value]:
    source = node.inputs[0]
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        steps = known_constant(graph, node.inputs[4])
        if steps is None or not (steps == 1).all():
            return None
    return source if same_known_shape(source, node.outputs[0]) else None


def _concat(graph: Graph, node: Node) -> Optional[Value]:
    return node.inputs[0] if len(node.inputs) == 1 else None


def _neutral(element: int, sides: tuple[int, ...]) -> Rule:
    """Binary op that returns its other operand when an operand in `sides` is all `element`."""

    def rule(graph: Graph, node: Node) -> Optional[Value]:
        for side in sides:
            data = known_constant(graph, node.inputs[side])
            if data is not None and (data == element).all():
                return _unbroadcast(node, node.inputs[1 - side])
        return None

    return rule


def _unbroadcast(node: Node, operand: Optional[Value]) -> Optional[Value]:
    """`operand` when `node`'s output has its element type and provably its shape."""
    out = node.outputs[0]
    if operand is None or operand.dtype != out.dtype or not same_known_shape(operand, out):
        return None
    return operand


def _where(graph: Graph, node: Node) -> Optional[Value]:
    condition = known_constant(graph, node.inputs[0])
    if condition is None or (condition.any() and not condition.all()):
        return None
    return _unbroadcast(node, node.inputs[1] if condition.all() else node.inputs[2])


RULES: dict[str, Rule] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "CastLike": _cast,
    "Reshape": _same_shape,
    "Expand": _same_shape,
    "Flatten": _same_shape,
    "Squeeze": _same_shape,
    "Unsqueeze": _same_shape,
    "Transpose": _transpose,
    "Slice": _slice,
    "Concat": _concat,
    "Add": _neutral(0, (0, 1)),
    "Sub": _neutral(0, (1,)),
    "Mul": _neutral(1, (0, 1)),
    "Div": _neutral(1, (1,)),
    "And": _neutral(1, (0, 1)),
    "Or": _neutral(0, (0, 1)),
    "Where": _where,
}


@register_pass
@dataclasses.dataclass
class EliminateNoops(Pass):
    """Remove ONNX ops that return their (first) input unchanged; readers read that input.

    Rules, each for a default-domain node whose first output is y:
    1. y = Identity(x) -> x.
    2. y = Dropout(x, ...) -> x when its mask output is unused and training_mode is absent
       or a constant false (inference).
    3. y = Cast(x, to=T) or CastLike(x, like) -> x when x already has element type T.
    4. y = Reshape/Expand/Flatten/Squeeze/Unsqueeze(x, ...) -> x when y's shape is provably
       x's shape: every dim static or the same symbol.
    5. y = Transpose(x, perm) -> x when perm is the identity.
    6. y = Slice(x, ...) -> x when every step is 1 and y's shape is provably x's shape.
    7. y = Concat(x) of a single input -> x.
    8. y = Add(x, 0), Add(0, x), Sub(x, 0), Mul(x, 1), Mul(1, x), Div(x, 1), And(x, true),
       And(true, x), Or(x, false), Or(false, x) -> x when the constant is all that neutral
       element and y has x's element type and provably x's shape (the constant broadcasts
       away). For floats, -0.0 + 0.0 gives +0.0: equal, not bit-equal.
    9. y = Where(c, a, b) with c a constant all true (resp. all false) -> a (resp. b) when
       y has its element type and provably its shape.

    Needs: types on values (from import or inference). Changes: removes the matched nodes.
    Graph output names are kept: when y is a graph output, x takes over its name, and the
    node stays when x is a graph input, a constant or another graph output.
    """

    name = "eliminate-noops"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed = 0
        for node in graph:
            source = noop_source(graph, node)
            if source is None:
                continue
            if graph.can_replace_value(node.outputs[0], source):
                graph.replace_value(node.outputs[0], source, keep_name=False)
                graph.erase(node)
                removed += 1
        return PassResult(removed > 0, {"removed": removed})


def noop_source(graph: Graph, node: Node, ops: Optional[Iterable[str]] = None) -> Optional[Value]:
    """The value `node`'s first output provably equals by EliminateNoops' rules (only the
    rules for the op types in `ops` when given), or None when the node is not a no-op."""
    rule = RULES.get(node.op_type) if ops is None or node.op_type in ops else None
    if rule is None or node.domain != "" or not node.inputs or node.inputs[0] is None:
        return None
    source = rule(graph, node)
    return source if source is not None and _only_first_output_used(node) else None


def _only_first_output_used(node: Node) -> bool:
    return all(not out.uses() and not out.is_graph_output for out in node.outputs[1:])
