"""`random_graphs()`: a hypothesis strategy for small, valid, runnable IR graphs.

Each graph has 1-3 float32 inputs with small static shapes and 1-12 nodes drawn from
elementwise unary and binary ops, MatMul, Reshape/Transpose/Unsqueeze/Squeeze/Concat/Slice/
Gather with constant arguments, Constant, Identity, Cast round trips, ReduceSum/ReduceMean
and Softmax (ONNX opset 18). Cleanup passes get work on purpose: constants of 0 and 1,
identity permutations and reshapes, repeated subexpressions and nodes nothing reads. Values
stay small (no Exp, Log, Sqrt or division by a graph value), so outputs are finite and
comparable. Every graph passes `graph.verify()`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
from hypothesis import strategies as st

from graphopt import DType, Graph, Node, TensorType, Value
from graphopt.ir.tensor import ArrayTensor

F32 = DType.FLOAT
MAX_NODES = 12
MAX_ELEMENTS = 64
MAX_RANK = 4
LARGEST_STEP = 5
"""The most nodes one step adds (a Slice reading four Constant nodes)."""
UNARY_OPS = ("Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Erf", "Sin", "Cos", "Identity")
BINARY_OPS = ("Add", "Sub", "Mul", "Max", "Min")
SPECIAL_SCALARS = (0.0, 1.0, -1.0, 0.5, 2.0)
NEUTRAL = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}
SLICE_TO_END = 2**31 - 1

Draw = Callable[[st.SearchStrategy], Any]


class _Builder:
    """Grows one random graph; `values` are the float32 values later ops may read."""

    def __init__(self, draw: Draw) -> None:
        self.draw = draw
        self.graph = Graph("fuzz", {"": 18})
        self.values: list[Value] = []
        self.chaining = False

    # ------------------------------------------------------------ helpers
    def pick(self, accept: Callable[[Value], bool] = lambda v: True) -> Optional[Value]:
        """A float32 value satisfying `accept` (often the newest, to grow chains), or None."""
        candidates = [v for v in self.values if accept(v)]
        if not candidates:
            return None
        if self.chaining or self.draw(st.booleans()):
            return candidates[-1]
        return self.draw(st.sampled_from(candidates))

    def node(self, op_type: str, inputs: list[Optional[Value]], attrs: Optional[dict] = None) -> Node:
        node = self.graph.add_node(op_type, inputs, attrs)
        if node.output.dtype == F32 and _numel(node.output) <= MAX_ELEMENTS:
            self.values.append(node.output)
        return node

    def constant(self, array: np.ndarray) -> Value:
        """`array` as a graph constant or a Constant node, as the draw decides."""
        if self.draw(st.booleans()):
            return self.graph.add_constant("c", array)
        return self.graph.add_node("Constant", [], {"value": ArrayTensor(array)}).output

    def ints(self, items: list[int]) -> Value:
        return self.constant(np.array(items, dtype=np.int64))

    def floats(self, shape: tuple[int, ...], neutral: Optional[float] = None) -> np.ndarray:
        """Random floats, or one repeated special number (often `neutral`, the op's identity)."""
        if self.draw(st.booleans()):
            specials = SPECIAL_SCALARS if neutral is None else (neutral,) + SPECIAL_SCALARS
            return np.full(shape, self.draw(st.sampled_from(specials)), dtype=np.float32)
        seed = self.draw(st.integers(0, 2**16))
        return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)

    def axis(self, rank: int, extra: int = 0) -> int:
        """An axis in [-(rank + extra), rank + extra - 1]."""
        return self.draw(st.integers(-(rank + extra), rank + extra - 1))

    # ------------------------------------------------------------ steps
    def unary(self) -> None:
        self.node(self.draw(st.sampled_from(UNARY_OPS)), [self.pick()])

    def binary(self) -> None:
        a = self.pick()
        op = self.draw(st.sampled_from(BINARY_OPS + ("Div",)))
        b = None if op == "Div" else self.pick(lambda v: _broadcasts(a, v))
        if b is None or self.draw(st.booleans()):
            shape = self.draw(st.sampled_from([(), (1,), a.shape[-1:], a.shape]))
            data = self.floats(shape, NEUTRAL.get(op))
            if op == "Div":
                data = np.where(np.abs(data) < 0.25, 2.0, data).astype(np.float32)
            b = self.constant(data)
        inputs = [a, b] if op == "Div" or self.draw(st.booleans()) else [b, a]
        self.node(op, inputs)

    def matmul(self) -> None:
        a = self.pick(lambda v: len(v.shape) >= 2)
        if a is None:
            return
        k = a.shape[-1]
        b = self.pick(lambda v: len(v.shape) == 2 and v.shape[0] == k and v is not a)
        if b is None or self.draw(st.booleans()):
            b = self.constant(self.floats((k, self.draw(st.integers(1, 4)))))
        self.node("MatMul", [a, b])

    def reshape(self) -> None:
        a = self.pick()
        shape = list(a.shape)
        targets = [[_numel(a)], [1] + shape, shape]
        if shape:
            inferred = self.draw(st.integers(0, len(shape) - 1))
            targets.append([-1 if i == inferred else d for i, d in enumerate(shape)])
            targets.append([0] + shape[1:])
        target = self.draw(st.sampled_from([t for t in targets if len(t) <= MAX_RANK]))
        self.node("Reshape", [a, self.ints(target)])

    def transpose(self) -> None:
        a = self.pick(lambda v: len(v.shape) >= 2)
        if a is not None:
            perm = self.draw(st.permutations(range(len(a.shape))))
            self.node("Transpose", [a], {"perm": tuple(perm)})

    def unsqueeze(self) -> None:
        a = self.pick(lambda v: len(v.shape) < MAX_RANK)
        if a is not None:
            self.node("Unsqueeze", [a, self.ints([self.axis(len(a.shape), extra=1)])])

    def squeeze(self) -> None:
        a = self.pick(lambda v: 1 in v.shape)
        if a is None:
            return
        if self.draw(st.booleans()):
            self.node("Squeeze", [a])
            return
        ones = [i for i, d in enumerate(a.shape) if d == 1]
        axes = self.draw(st.lists(st.sampled_from(ones), min_size=1, unique=True))
        self.node("Squeeze", [a, self.ints([i - len(a.shape) if self.draw(st.booleans()) else i for i in axes])])

    def concat(self) -> None:
        a = self.pick(lambda v: 1 <= len(v.shape) and 2 * _numel(v) <= MAX_ELEMENTS)
        if a is not None:
            b = self.pick(lambda v: v.shape == a.shape)
            self.node("Concat", [a, b], {"axis": self.axis(len(a.shape))})

    def slice(self) -> None:
        a = self.pick(lambda v: len(v.shape) >= 1)
        if a is None:
            return
        axis = self.axis(len(a.shape))
        dim = a.shape[axis]
        start = self.draw(st.integers(0, dim - 1))
        end = self.draw(st.sampled_from([dim, SLICE_TO_END] + list(range(start + 1, dim + 1))))
        step = self.draw(st.sampled_from([1, 1, 2]))
        self.node("Slice", [a, self.ints([start]), self.ints([end]), self.ints([axis]), self.ints([step])])

    def gather(self) -> None:
        a = self.pick(lambda v: len(v.shape) >= 1)
        if a is None:
            return
        axis = self.axis(len(a.shape))
        dim = a.shape[axis]
        index = st.integers(-dim, dim - 1)
        indices = self.draw(index) if self.draw(st.booleans()) else self.draw(st.lists(index, min_size=1, max_size=3))
        self.node("Gather", [a, self.ints(indices)], {"axis": axis})

    def new_constant(self) -> None:
        """A float constant later ops may read, so some subexpressions are constant."""
        shape = tuple(self.draw(st.lists(st.integers(1, 4), max_size=2)))
        self.values.append(self.constant(self.floats(shape)))

    def cast_round_trip(self) -> None:
        via = self.draw(st.sampled_from([DType.DOUBLE, DType.FLOAT, DType.FLOAT16]))
        there = self.node("Cast", [self.pick()], {"to": int(via)})
        self.node("Cast", [there.output], {"to": int(F32)})

    def reduce(self) -> None:
        a = self.pick(lambda v: len(v.shape) >= 1)
        if a is None:
            return
        op = self.draw(st.sampled_from(["ReduceSum", "ReduceMean"]))
        axes = self.draw(st.lists(st.integers(0, len(a.shape) - 1), max_size=len(a.shape), unique=True))
        inputs = [a, self.ints(axes)] if axes else [a]
        self.node(op, inputs, {"keepdims": self.draw(st.integers(0, 1))})

    def softmax(self) -> None:
        a = self.pick(lambda v: len(v.shape) >= 1)
        if a is not None:
            self.node("Softmax", [a], {"axis": self.axis(len(a.shape))})

    def shape_chain(self) -> None:
        """Two layout ops in a row on the newest value (work for shape simplification)."""
        self.chaining = True
        for _ in range(2):
            self.draw(st.sampled_from(LAYOUT_STEPS))(self)
        self.chaining = False

    def duplicate(self) -> None:
        """Repeat an existing node with the same inputs and attributes (work for CSE)."""
        nodes = [n for n in self.graph.nodes if n.op_type != "Constant"]
        if nodes:
            node = self.draw(st.sampled_from(nodes))
            self.node(node.op_type, list(node.inputs), dict(node.attrs))


STEPS = (
    _Builder.unary, _Builder.unary, _Builder.binary, _Builder.binary, _Builder.binary,
    _Builder.matmul, _Builder.reshape, _Builder.transpose, _Builder.unsqueeze, _Builder.squeeze,
    _Builder.concat, _Builder.slice, _Builder.gather, _Builder.new_constant,
    _Builder.cast_round_trip, _Builder.reduce, _Builder.softmax, _Builder.shape_chain,
    _Builder.duplicate,
)
"""The kinds of step a graph grows by; repeats weight the draw."""
LAYOUT_STEPS = (_Builder.reshape, _Builder.transpose, _Builder.unsqueeze, _Builder.squeeze)


def _numel(value: Value) -> int:
    return int(np.prod(value.shape, dtype=np.int64))


def _broadcasts(a: Value, b: Value) -> bool:
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        return False
    return len(shape) <= MAX_RANK and int(np.prod(shape, dtype=np.int64)) <= MAX_ELEMENTS


_SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


@st.composite
def random_graphs(draw: Draw) -> Graph:
    """A small random graph (see the module docstring); verified before it is returned."""
    builder = _Builder(draw)
    first = draw(_SHAPES)
    for index in range(draw(st.integers(1, 3))):
        shape = first if index and draw(st.booleans()) else draw(_SHAPES)
        builder.values.append(builder.graph.add_input(f"x{index}", TensorType(F32, shape)))
    target = draw(st.sampled_from(range(1, MAX_NODES + 1)))
    for _ in range(MAX_NODES):
        if len(builder.graph) >= min(target, MAX_NODES - LARGEST_STEP + 1):
            break
        draw(st.sampled_from(STEPS))(builder)
    if not any(v.producer is not None for v in builder.values):
        builder.unary()
    produced = [v for v in builder.values if v.producer is not None]
    outputs = [produced[-1]]
    extra = draw(st.sampled_from(produced))
    if extra is not outputs[0] and draw(st.booleans()):
        outputs.append(extra)
    builder.graph.set_outputs(outputs)
    builder.graph.verify()
    return builder.graph
