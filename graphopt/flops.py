"""Estimated floating-point operations of one run of an IR graph.

    report = estimate_flops(graph, {"batch": 1, "seq": 128})
    report["total"], report["by_op"]["MatMul"], report["sizes"], report["uncounted"]

Shapes. Symbolic dims of the graph inputs are given sizes: those in `sizes`, the others
the defaults `graphopt.check.sample_inputs` uses (DEFAULT_SYMBOL_SIZE, SEQUENCE_SYMBOL_SIZE
for names containing "seq"), so the estimate describes the same sample run that
`--check` executes. Concrete shapes are then re-inferred through the op schemas node by
node (shape arithmetic such as Shape -> Gather -> Reshape included); where inference
cannot tell, a node's recorded type is used with its symbols resolved the same way.

Counting rules (one FLOP = one multiply, add, compare or transcendental):
- MatMul: 2 * (output elements) * K, so batch and broadcast dims are included;
- Gemm: 2 * M * N * K, plus M * N when the bias C is given;
- Conv: 2 * (output elements) * (C_in / group) * (kernel elements), plus the output
  elements when a bias is given;
- elementwise ops (arithmetic, activations, comparisons, Where, ...): 1 per output element;
- reductions: 1 per input element;
- a few per output element for composite ops (PER_ELEMENT): Softmax 5 (max, subtract, exp,
  sum, divide), Gelu 5 (its erf form's divide, erf, add and two multiplies),
  LayerNormalization 7 (mean, subtract, square, variance, normalize, scale, shift), RMS
  norms 4 (square, mean, normalize, scale), ...;
- graphopt::Attention: per score (B * Hq * Sq * Sk) 2 * D for Q.K^T, 2 * Dv for the
  weighted sum, 1 for the scale, 5 for the softmax and 1 for a bias; the causal mask is
  not discounted. So fusing attention leaves the estimate as it was;
- data movement and shape ops (Reshape, Transpose, Gather, Concat, Cast, ...): 0.
Ops are matched by op type in any domain (graphopt::RMSNorm, com.microsoft::Gelu, ...). Any
other op, or a node whose shapes stay unknown, is listed under "uncounted" and adds 0.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from graphopt.check import symbol_size
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.ir.schema import InferenceContext, SymbolicValue
from graphopt.ir.tensor import ConstTensor
from graphopt.ir.symbolic import dim_symbols, evaluate_dim
from graphopt.ir.types import Dim, TensorType, merge_types

ELEMENTWISE = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "BitwiseAnd",
    "BitwiseNot", "BitwiseOr", "BitwiseXor", "Ceil", "Celu", "Clip", "Cos", "Cosh", "Div", "Elu",
    "Equal", "Erf", "Exp", "Floor", "Greater", "GreaterOrEqual", "HardSigmoid",
    "HardSwish", "IsInf", "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Mean", "Min",
    "Mish", "Mod", "Mul", "Neg", "Not", "Or", "PRelu", "Pow", "Reciprocal", "Relu",
    "Round", "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Sub", "Sum",
    "Tan", "Tanh", "ThresholdedRelu", "Where", "Xor",
})
"""Ops costing 1 FLOP per output element."""

PER_ELEMENT = {
    "Softmax": 5, "LogSoftmax": 5, "Gelu": 5, "LayerNormalization": 7, "SkipLayerNormalization": 8,
    "SimplifiedLayerNormalization": 4, "RMSNormalization": 4, "RMSNorm": 4,
    "GroupNormalization": 7, "InstanceNormalization": 7, "BatchNormalization": 2,
}
"""Ops costing a fixed number of FLOPs per output element."""

REDUCTIONS = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "ArgMax", "ArgMin", "CumSum",
})
"""Ops costing 1 FLOP per input element."""

FREE = frozenset({
    "Cast", "CastLike", "Concat", "Constant", "ConstantOfShape", "DepthToSpace", "Dropout",
    "Expand", "EyeLike", "Flatten", "Gather", "GatherElements", "GatherND", "Identity",
    "NonZero", "OneHot", "Pad", "Range", "Reshape", "ScatterElements", "ScatterND", "Shape",
    "Size", "Slice", "SpaceToDepth", "Split", "Squeeze", "Tile", "Transpose", "Trilu", "Unsqueeze",
})
"""Data movement and shape ops: 0 FLOPs."""

Types = dict[Value, TensorType]


def estimate_flops(graph: Graph, sizes: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """FLOPs of one run of `graph` with symbolic dims sized by `sizes` (see the module docstring).

    Returns {"total": int, "by_op": {op: FLOPs} (largest first, zeros left out),
    "sizes": {symbol: size} (every symbol that was given a size), "uncounted": {op: nodes}}.
    """
    symbols = _SymbolSizes(sizes)
    types = _concrete_types(graph, symbols)
    by_op: dict[str, int] = {}
    uncounted: dict[str, int] = {}
    for node in graph.nodes:
        flops = node_flops(node, types)
        if flops is None:
            uncounted[node.qualified_op] = uncounted.get(node.qualified_op, 0) + 1
        elif flops:
            by_op[node.qualified_op] = by_op.get(node.qualified_op, 0) + flops
    return {
        "total": sum(by_op.values()),
        "by_op": dict(sorted(by_op.items(), key=lambda item: (-item[1], item[0]))),
        "sizes": dict(symbols.chosen),
        "uncounted": dict(sorted(uncounted.items())),
    }


def node_flops(node: Node, types: Types) -> Optional[int]:
    """FLOPs of one node given concrete value types; None when they cannot be counted."""
    op = node.op_type
    if op in FREE:
        return 0
    rule = _RULES.get(op)
    if rule is not None:
        return rule(node, types)
    if op in ELEMENTWISE:
        return _numel(types, node.outputs[0])
    if op in PER_ELEMENT:
        count = _numel(types, node.outputs[0])
        return None if count is None else PER_ELEMENT[op] * count
    if op in REDUCTIONS:
        return _numel(types, node.inputs[0])
    return None


class _SymbolSizes:
    """Sizes of symbolic dims: the caller's, else `sample_inputs`' defaults (recorded)."""

    def __init__(self, given: Optional[dict[str, int]]) -> None:
        self.given = dict(given or {})
        self.chosen: dict[str, int] = {}

    def size(self, key: str) -> int:
        if key not in self.chosen:
            default = symbol_size(key)
            self.chosen[key] = self.given.get(key, default)
        return self.chosen[key]

    def resolve(self, type_: TensorType, unknown_key: Optional[str] = None) -> TensorType:
        """`type_` with symbolic dims (and, given `unknown_key`, unknown dims) made concrete."""
        if type_.shape is None:
            return type_
        shape = tuple(self._dim(d, unknown_key) for d in type_.shape)
        return TensorType(type_.dtype, shape)

    def _dim(self, dim: Dim, unknown_key: Optional[str]) -> Dim:
        if isinstance(dim, str):
            return evaluate_dim(dim, {symbol: self.size(symbol) for symbol in dim_symbols(dim)})
        if dim is None and unknown_key is not None:
            return self.size(unknown_key)
        return dim


def _concrete_types(graph: Graph, symbols: _SymbolSizes) -> Types:
    """Every value's type with concrete dims where inference can find them."""
    types: Types = {}
    contents: dict[Value, SymbolicValue] = {}
    for value in graph.inputs:
        types[value] = symbols.resolve(value.type, unknown_key=f"?{value.name}")
    for value in graph.constants.values():
        types[value] = value.type
    for node in graph.nodes:
        inferred, propagated = _infer(graph, node, types, contents)
        for index, out in enumerate(node.outputs):
            recorded = symbols.resolve(out.type)
            types[out] = recorded if inferred is None else merge_types(inferred[index], recorded)
            if propagated is not None and propagated[index] is not None:
                contents[out] = tuple(propagated[index])  # type: ignore[arg-type]
    return types


def _infer(
    graph: Graph, node: Node, types: Types, contents: dict[Value, SymbolicValue]
) -> tuple[Optional[list[TensorType]], Optional[list[Optional[SymbolicValue]]]]:
    """Output types (and small int contents) of `node` from concrete input types."""
    schema = node.schema
    if schema is None:
        return None, None
    inputs = node.inputs
    ctx = InferenceContext(
        node.op_type, node.domain,
        [None if v is None else types.get(v, v.type) for v in inputs],
        {k: (v.numpy() if isinstance(v, ConstTensor) else v) for k, v in node.attrs.items()},
        len(node.outputs), graph.opset(node.domain),
        [None if v is None else constant_data(v) for v in inputs],
        [None if v is None else contents.get(v) for v in inputs],
    )
    try:
        inferred = schema.infer(ctx)
        propagated = schema.propagate(ctx) if schema.propagate is not None else None
    except ValueError:
        return None, None
    return inferred, propagated


def _shape(types: Types, value: Optional[Value]) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    type_ = types.get(value, value.type)
    return type_.shape if type_.is_static else None  # type: ignore[return-value]


def _numel(types: Types, value: Optional[Value]) -> Optional[int]:
    shape = _shape(types, value)
    return None if shape is None else _product(shape)


def _product(dims: tuple[int, ...]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


def _matmul(node: Node, types: Types) -> Optional[int]:
    a, out = _shape(types, node.inputs[0]), _numel(types, node.outputs[0])
    if a is None or out is None or not a:
        return None
    return 2 * out * a[-1]


def _gemm(node: Node, types: Types) -> Optional[int]:
    a, out = _shape(types, node.inputs[0]), _numel(types, node.outputs[0])
    if a is None or out is None or len(a) != 2:
        return None
    k = a[0] if node.attrs.get("transA", 0) else a[1]
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    return 2 * out * k + (out if has_bias else 0)


def _conv(node: Node, types: Types) -> Optional[int]:
    weight, out = _shape(types, node.inputs[1]), _numel(types, node.outputs[0])
    if weight is None or out is None or len(weight) < 2:
        return None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    return 2 * out * _product(weight[1:]) + (out if has_bias else 0)


def _attention(node: Node, types: Types) -> Optional[int]:
    query, key, value = (_shape(types, v) for v in node.inputs[:3])
    if any(shape is None or len(shape) != 4 for shape in (query, key, value)):
        return None
    scores = query[0] * query[1] * query[2] * key[2]
    has_bias = len(node.inputs) > 3 and node.inputs[3] is not None
    return scores * (2 * query[3] + 2 * value[3] + 1 + PER_ELEMENT["Softmax"] + (1 if has_bias else 0))


_RULES: dict[str, Callable[[Node, Types], Optional[int]]] = {
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv, "Attention": _attention,
}
