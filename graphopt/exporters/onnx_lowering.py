"""Lower graphopt's own ops to standard ONNX ops, exactly, so any ONNX runtime runs the model.

`decompose_graphopt_nodes(graph)` replaces, in place, every graphopt-domain node by the
default-domain ops it stands for, valid in the graph's own opset (13 and up), with the same
arithmetic as the patterns fusion raised them from (the `decompose-graphopt-ops` pass runs it
in a target's lowering; `decompose_graphopt_ops(graph)` is the copying form the exporter uses,
which also emits ONNX's opset-23 ops where the graph's opset has them):

- `Attention(q, k, v[, bias][, past_key, past_value])`: with a KV cache, K and V first become
  `Concat(past, new, axis=2)` (also the present outputs); K and V repeated for grouped-query heads
  (Unsqueeze/Expand/Reshape), `MatMul(q, Transpose(k))`, `Mul` by the scale, the bias added
  (a boolean bias selects with `Where`), a causal mask aligned to the last key, `Softmax`
  over the keys, `MatMul` with V;
- `RMSNorm(x, scale)`: `x * 1/sqrt(ReduceMean(x^2) + eps) * scale` (in the exporter's form
  at opset >= 23: ONNX's own `RMSNormalization`);
- `RotaryEmbedding(x, cos, sin)`: `graphopt.exporters.rotary_lowering` (in the exporter's form
  at opset >= 23, where cos/sin are [B, S, R/2]: ONNX's own `RotaryEmbedding`);
- `Gelu(x[, bias])`: `x + bias`, then the erf or tanh formula;
- `SkipLayerNorm(x, skip, scale[, beta][, bias])`: `(x + bias) + skip`, then
  `LayerNormalization` (or the RMSNorm formula when `simplified`); the sum is the second output.

A target that keeps `Attention` (`keep`) but has no KV-cache kernel gets the cache split off:
Concat nodes for the presents and an Attention without past inputs over them.

Standard `LayerNormalization` nodes (fuse-layernorm raises them) in a graph whose opset is
below 17, where the op does not exist yet, are decomposed too: `ReduceMean`, `Sub`,
`ReduceMean` of the square, `Add` epsilon, `Sqrt`, `Div`, `* scale + beta`.

ONNX Runtime's opset-23 `Attention` kernel was measured to return zeros for query rows
whose every key is masked, where softmax over an additive mask returns the mean of V; a
decomposition keeps the original model's results in every case, so it is the default.
"""

from __future__ import annotations

import math
from typing import Collection, Optional

import numpy as np

from graphopt.errors import ExportError
from graphopt.exporters.rotary_lowering import decompose_rotary
from graphopt.ir.graph import Graph, Node, Value
from graphopt.ir.ops.graphopt import has_kv_cache
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.ir.symbolic import dims_equal
from graphopt.ir.tensor import ArrayTensor

_LOWEST = float(np.finfo(np.float32).min)


LAYER_NORM_OPSET = 17
"""The first ONNX opset with LayerNormalization."""

STANDARD_OPS_OPSET = 23
"""The first ONNX opset with RMSNormalization and RotaryEmbedding."""


def _needs_decomposition(graph: Graph, node: Node) -> bool:
    if node.domain == GRAPHOPT_DOMAIN:
        return True
    return node.domain == "" and node.op_type == "LayerNormalization" and graph.opset() < LAYER_NORM_OPSET


def has_graphopt_ops(graph: Graph) -> bool:
    """True when the graph holds ops `decompose_graphopt_nodes` replaces."""
    return any(_needs_decomposition(graph, node) for node in graph.nodes)


def decompose_graphopt_ops(graph: Graph, standard_ops: bool = True) -> Graph:
    """`graph` itself when it holds no graphopt-domain ops, else a copy with them decomposed
    (`standard_ops`: see `decompose_graphopt_nodes`)."""
    if not has_graphopt_ops(graph):
        return graph
    lowered = graph.clone()
    decompose_graphopt_nodes(lowered, standard_ops=standard_ops)
    return lowered


def decompose_graphopt_nodes(graph: Graph, keep: Collection[str] = (), standard_ops: bool = False) -> int:
    """Replace, in place, each graphopt-domain node (and each LayerNormalization below opset
    17) by standard ONNX ops, except those whose op type is in `keep`; return how many
    nodes were replaced. The results keep the replaced outputs' names. `standard_ops`: in a
    graph of opset >= 23, RMS norms become ONNX's `RMSNormalization` and rotary embeddings
    its `RotaryEmbedding` (where the cos/sin have a batch dim equal to x's) instead of their
    formulas (`Attention` stays decomposed: see the module docstring)."""
    replaced = 0
    standard = standard_ops and graph.opset() >= STANDARD_OPS_OPSET
    for node in [n for n in graph.nodes if _needs_decomposition(graph, n)]:
        builder = _Builder(graph, node, standard)
        if node.op_type in keep:
            if node.op_type == "Attention" and has_kv_cache(node):
                _split_kv_cache(graph, builder, node)
                replaced += 1
            continue
        if node.op_type == "Attention":
            results = _attention(builder, node)
        elif node.op_type == "RotaryEmbedding":
            results = [_standard_rotary(builder, node) if builder.standard and _batched_tables(node) else decompose_rotary(builder, node)]
        elif node.op_type == "RMSNorm":
            results = [_rmsnorm(builder, node)]
        elif node.op_type == "Gelu":
            results = [_gelu(builder, node)]
        elif node.op_type == "SkipLayerNorm":
            results = _skip_layer_norm(builder, node)
        elif node.op_type == "LayerNormalization":
            results = [_layer_norm(builder, node, *node.inputs[:3])]
        else:
            raise ExportError(f"node {node.label}: graphopt::{node.op_type} has no standard ONNX lowering")
        if node.domain == "" and any(out.uses() or out.is_graph_output for out in node.outputs[1:]):
            raise ExportError(f"node {node.label}: LayerNormalization's mean/inv_std_dev outputs are not decomposed for opset < 17")
        for out, result in zip(node.outputs, results):
            graph.replace_value(out, result)
        graph.erase(node)
        replaced += 1
    return replaced


class _Builder:
    """Adds default-domain nodes before `anchor`; numbers become constants of a given dtype."""

    def __init__(self, graph: Graph, anchor: Node, standard: bool = False) -> None:
        self.graph = graph
        self.anchor = anchor
        self.standard = standard
        """Whether ONNX's opset-23 RMSNormalization and RotaryEmbedding may be emitted."""

    def op(self, op_type: str, *inputs: Value, **attrs: object) -> Value:
        return self.graph.add_node(op_type, list(inputs), attrs or None, before=self.anchor).output

    def const(self, values: object, like: Value | None = None, dtype: object = None) -> Value:
        if dtype is None:
            dtype = like.dtype.to_numpy() if like is not None and like.dtype is not None else np.float32
        return self.graph.add_constant(self.graph.unique_name("lowered_constant"), np.array(values, dtype=dtype))

    def ints(self, values: list[int]) -> Value:
        return self.const(values, dtype=np.int64)

    def dims(self, value: Value, start: int, end: int) -> Value:
        """Dims start:end of `value`'s runtime shape, as an int64 vector."""
        return self.op("Slice", self.op("Shape", value), self.ints([start]), self.ints([end]))


def _split_kv_cache(graph: Graph, b: _Builder, node: Node) -> None:
    """A kept Attention with a KV cache becomes Concat(past, new) for K and V (its present
    outputs) and an Attention without one over them, for targets whose kernel has no cache."""
    key = b.op("Concat", node.inputs[4], node.inputs[1], axis=2)  # type: ignore[arg-type]
    value = b.op("Concat", node.inputs[5], node.inputs[2], axis=2)  # type: ignore[arg-type]
    inputs = [node.inputs[0], key, value] + ([node.inputs[3]] if node.inputs[3] is not None else [])
    attention = graph.add_node("Attention", inputs, dict(node.attrs), domain=GRAPHOPT_DOMAIN, before=node)
    for out, result in zip(node.outputs, [attention.output, key, value]):
        graph.replace_value(out, result)
    graph.erase(node)


def _attention(b: _Builder, node: Node) -> list[Value]:
    """[output] or, with a KV cache, [output, present_key, present_value]."""
    query, key, value = node.inputs[:3]
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    presents: list[Value] = []
    if has_kv_cache(node):
        key = b.op("Concat", node.inputs[4], key, axis=2)  # type: ignore[arg-type]
        value = b.op("Concat", node.inputs[5], value, axis=2)  # type: ignore[arg-type]
        presents = [key, value]
    heads = int(node.attrs["num_heads"])
    kv_heads = int(node.attrs.get("num_kv_heads", heads))
    if kv_heads != heads:
        key, value = _repeat_kv(b, key, heads // kv_heads), _repeat_kv(b, value, heads // kv_heads)  # type: ignore[arg-type]
    head_size = query.type.shape[3] if query.type.shape else None  # type: ignore[union-attr]
    scale = node.attrs.get("scale")
    if scale is None:
        if not isinstance(head_size, int):
            raise ExportError(f"node {node.label}: Attention without a scale needs a static head size")
        scale = 1.0 / math.sqrt(head_size)
    scores = b.op("MatMul", query, b.op("Transpose", key, perm=(0, 1, 3, 2)))  # type: ignore[arg-type]
    scores = b.op("Mul", scores, b.const(scale, like=query))
    if bias is not None:
        if bias.dtype is not None and bias.dtype.name == "BOOL":
            scores = b.op("Where", bias, scores, b.const(_LOWEST, like=query))
        else:
            scores = b.op("Add", scores, bias)
    if node.attrs.get("causal"):
        scores = b.op("Where", _causal_mask(b, query, key), scores, b.const(_LOWEST, like=query))  # type: ignore[arg-type]
    probs = b.op("Softmax", scores, axis=-1)
    if node.attrs.get("nan_to_zero"):
        probs = b.op("Where", b.op("IsNaN", probs), b.const(0.0, like=query), probs)
    return [b.op("MatMul", probs, value), *presents][: len(node.outputs)]  # type: ignore[arg-type]


def _repeat_kv(b: _Builder, tensor: Value, copies: int) -> Value:
    """[B, Hkv, S, D] -> [B, Hkv * copies, S, D], each head repeated `copies` times in place."""
    unsqueezed = b.op("Unsqueeze", tensor, b.ints([2]))
    expanded_shape = b.op("Concat", b.dims(tensor, 0, 2), b.ints([copies]), b.dims(tensor, 2, 4), axis=0)
    expanded = b.op("Expand", unsqueezed, expanded_shape)
    merged_shape = b.op("Concat", b.dims(tensor, 0, 1), b.ints([-1]), b.dims(tensor, 2, 4), axis=0)
    return b.op("Reshape", expanded, merged_shape)


def _causal_mask(b: _Builder, query: Value, key: Value) -> Value:
    """Boolean [Sq, Sk]: query i sees keys j <= i + Sk - Sq."""
    q_len, k_len = b.dims(query, 2, 3), b.dims(key, 2, 3)
    ones = b.op("ConstantOfShape", b.op("Concat", q_len, k_len, axis=0), value=ArrayTensor(np.ones(1, np.float32)))
    offset = b.op("Squeeze", b.op("Sub", k_len, q_len), b.ints([0]))
    return b.op("Cast", b.op("Trilu", ones, offset, upper=0), to=9)


def _normalized_axes(node: Node, x: Value) -> list[int]:
    axis = int(node.attrs.get("axis", -1))
    rank = x.type.rank
    if rank is None:
        raise ExportError(f"node {node.label}: {node.op_type} needs the rank of its input to be known")
    return list(range(axis % rank, rank))


def _mean(b: _Builder, x: Value, axes: list[int]) -> Value:
    if b.graph.opset() >= 18:
        return b.op("ReduceMean", x, b.ints(axes), keepdims=1)
    return b.op("ReduceMean", x, axes=tuple(axes), keepdims=1)


def _rmsnorm(b: _Builder, node: Node, x: Optional[Value] = None) -> Value:
    x = node.inputs[0] if x is None else x
    scale = node.inputs[1] if node.op_type == "RMSNorm" else node.inputs[2]
    if b.standard:
        axis = _normalized_axes(node, x)[0]  # type: ignore[arg-type]
        return b.op("RMSNormalization", x, scale, axis=axis, epsilon=float(node.attrs.get("epsilon", 1e-5)))  # type: ignore[arg-type]
    square = b.op("Pow", x, b.const(2.0, like=x))  # type: ignore[arg-type]
    mean = _mean(b, square, _normalized_axes(node, x))  # type: ignore[arg-type]
    root = b.op("Sqrt", b.op("Add", mean, b.const(float(node.attrs.get("epsilon", 1e-5)), like=x)))
    normalized = b.op("Mul", x, b.op("Reciprocal", root))  # type: ignore[arg-type]
    return b.op("Mul", scale, normalized)  # type: ignore[arg-type]


def _batched_tables(node: Node) -> bool:
    """Whether a RotaryEmbedding's cos and sin are [B, S, R/2] with x's batch dim B, the form
    ONNX's RotaryEmbedding takes without position ids."""
    x, cos, sin = node.inputs[:3]
    shapes = [v.type.shape for v in (x, cos, sin)]
    if any(shape is None for shape in shapes) or len(shapes[1]) != 3 or len(shapes[2]) != 3:  # type: ignore[arg-type]
        return False
    return all(dims_equal(shape[0], shapes[0][0]) is True for shape in shapes[1:])  # type: ignore[index]


def _standard_rotary(b: _Builder, node: Node) -> Value:
    """ONNX's RotaryEmbedding on the [B, H, S, D] input with the same cos/sin (the arithmetic
    of `graphopt.ir.ops.rotary`)."""
    attrs: dict[str, object] = {"interleaved": int(node.attrs.get("interleaved", 0))}
    rotary = int(node.attrs.get("rotary_dim", 0) or 0)
    if rotary:
        attrs["rotary_embedding_dim"] = rotary
    return b.op("RotaryEmbedding", *node.inputs[:3], **attrs)  # type: ignore[arg-type]


def _layer_norm(b: _Builder, node: Node, x: Value, scale: Value, beta: Optional[Value] = None) -> Value:
    """LayerNormalization over the node's `axis`..-1: the op itself from opset 17, else its formula."""
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    if b.graph.opset() >= LAYER_NORM_OPSET:
        inputs = [x, scale] if beta is None else [x, scale, beta]
        return b.op("LayerNormalization", *inputs, axis=-1, epsilon=epsilon)
    axes = _normalized_axes(node, x)
    centered = b.op("Sub", x, _mean(b, x, axes))
    variance = _mean(b, b.op("Mul", centered, centered), axes)
    normalized = b.op("Div", centered, b.op("Sqrt", b.op("Add", variance, b.const(epsilon, like=x))))
    scaled = b.op("Mul", normalized, scale)
    return scaled if beta is None else b.op("Add", scaled, beta)


def _skip_layer_norm(b: _Builder, node: Node) -> list[Value]:
    x, skip, scale = node.inputs[:3]
    beta = node.inputs[3] if len(node.inputs) > 3 else None
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    total = b.op("Add", x if bias is None else b.op("Add", x, bias), skip)  # type: ignore[arg-type]
    if node.attrs.get("simplified", 0):
        y = _rmsnorm(b, node, total)
    else:
        y = _layer_norm(b, node, total, scale, beta)  # type: ignore[arg-type]
    return [y, total][: len(node.outputs)]


def _gelu(b: _Builder, node: Node) -> Value:
    x = node.inputs[0]
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        x = b.op("Add", x, node.inputs[1])  # type: ignore[arg-type]
    half = b.op("Mul", x, b.const(0.5, like=x))  # type: ignore[arg-type]
    if node.attrs.get("approximate", "none") == "tanh":
        cubic = b.op("Mul", b.op("Pow", x, b.const(3.0, like=x)), b.const(0.044715, like=x))  # type: ignore[arg-type]
        inner = b.op("Mul", b.op("Add", x, cubic), b.const(math.sqrt(2.0 / math.pi), like=x))  # type: ignore[arg-type]
        gate = b.op("Tanh", inner)
    else:
        gate = b.op("Erf", b.op("Div", x, b.const(math.sqrt(2.0), like=x)))  # type: ignore[arg-type]
    return b.op("Mul", half, b.op("Add", gate, b.const(1.0, like=x)))
