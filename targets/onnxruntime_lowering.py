"""Lower graphopt's fused ops to the com.microsoft contrib ops ONNX Runtime accelerates.

The `lower-onnxruntime{device=cpu|cuda}` pass replaces, in place, each fused op by ORT's
kernel for it where that kernel computes the same thing on these inputs; anything left is
decomposed into standard ONNX by the exporter. Each mapping, and when it is taken:

- `Attention(q, k, v[, bias])` -> packed `Attention(x, W, b, , , attention_bias)` when q, k
  and v are the three outputs of one Split of `x @ W (+ b)` (fuse-qkv), each reshaped into
  heads ([B, S, N, D]) and transposed ([B, N, S, D]); otherwise `MultiHeadAttention(q', k',
  v', , , attention_bias)` with q' (and k', v') the [B, S, N*D] projections the head
  transposes were made from (or the heads merged back when there is no such projection:
  K and V are then passed as [B, N, S, D], which the op also takes). Where the output is
  only transposed back and merged ([B, S, N*Dv]), the contrib op's own [B, S, N*Dv] output
  replaces that chain; the dead layout ops are removed. Taken when every K/V head has its
  own query head (no grouped-query attention: ORT's GroupQueryAttention wants a KV cache
  layout), the query and value head sizes are equal and static, the bias is rank 4 with
  its last two dims the query and key lengths (a boolean bias becomes 0 / lowest-float
  additive, which gives the same softmax), and a causal mask only without a bias and only
  for equal query and key lengths (`unidirectional=1`). Measured against the softmax form
  (`tests/targets/test_onnxruntime_lowering.py`): equal to <= 1e-5, including query rows
  whose every key is masked with the lowest float (both give the mean of V, unlike the
  opset-23 ONNX Attention kernel, which returns zeros there).
  When that fused-qkv projection was quantized (`quantize{mode=dynamic}`'s
  DynamicQuantizeLinear -> MatMulInteger chain, or `mode=static`'s Q/DQ pair with uint8
  activations), it becomes `QAttention` over the int8 weight with its per-column scales (the
  kernel ORT's own `quantize_dynamic` picks), provided the mask is absent or boolean
  [B, 1, Sq, Sk] (possibly as `Where(mask, 0, very negative)`): it is given as the int32
  [B, Sq, Sk] raw mask with that negative value as `mask_filter_value`. Equal to the
  unlowered quantized graph to <= 1e-4 (same test file), padding included.
- `Attention(q, k, v[, bias], past_key, past_value)` (a KV cache, any K/V head count) ->
  `GroupQueryAttention(q', k', v', past_key, past_value, seqlens_k, total_sequence_length,
  , , , attention_bias)` with `causal=0`, `seqlens_k` = past + seq - 1 for every row and the
  graph's own mask (causal, padding, sliding window: whatever the model computed) as the
  additive `attention_bias`, so every key is scored and masked exactly as in the softmax form,
  fully masked rows included (measured, ORT 1.32: the mean of V for a lowest-float mask, NaN
  for -inf, then the op's `nan_to_zero`; GQA's own causal mode returns 0 there instead, so it is
  used only for a `causal` op without a bias). Taken when the head sizes are static and equal,
  the new keys are as many as the queries, and the bias is rank 4 [B|1, 1|N, Sq, past + Sk]
  (symbolic dims compared as expressions). ORT's CPU kernel refuses, at run time, a batch
  above 1 with several new tokens and a non-empty past (batched chunked prefill); the target's
  model then runs such a call one batch row at a time (exact: rows are independent).
  Measured on the decoder zoo (`tests/targets/test_kv_cache_attention.py`): <= 1e-4 against the
  export at prefill, decode and with left padding, and the same 32 greedy tokens.
- `RotaryEmbedding` -> ORT's contrib `RotaryEmbedding` (`targets/onnxruntime_rotary.py`).
- `SkipLayerNorm` -> `SkipLayerNormalization` (or `SkipSimplifiedLayerNormalization` when
  `simplified`) with the residual sum as output 3, for rank-3 inputs of one shape (as
  fuse-skip-layernorm checks it) and a static hidden size. On CPU the plain form becomes
  `Add(x, skip)`, `Add(bias)`, `LayerNormalization` instead: ORT's CPU
  `SkipLayerNormalization` kernel (1.32) was measured 2.5-5x slower than those three ops
  (hidden 384-4096, 1-2 threads, 128 or 1024 rows; 133 vs 51 us for MiniLM's [1, 128, 384]
  on 2 threads), while `SkipSimplifiedLayerNormalization` is as fast as or faster than its
  decomposition, so it stays.
- `RMSNorm` -> `SimplifiedLayerNormalization` (an ORT kernel in the ONNX domain) over the
  last axis; a scalar scale becomes a vector.
- `Gelu` -> `Gelu` / `BiasGelu` (erf form) or `FastGelu` (tanh form, with its bias).

Only float32 nodes are lowered (ORT's CPU kernels for several of these ops are float32
only); other element types keep the standard decomposition. Speed of each choice on
BERT-base and all-MiniLM-L6-v2: `benchmarks/onnxruntime_cpu.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import numpy as np

from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.ir.ops.graphopt import has_kv_cache
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.ir.symbolic import add_dims, dims_equal
from graphopt.ir.types import Dim, TensorType, same_shape
from graphopt.exporters.onnx_lowering import LAYER_NORM_OPSET
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.targets.onnxruntime_heads import HEAD_PERM, merged_source
from graphopt.targets.onnxruntime_rotary import lower_rotary_contrib
from graphopt.registry import register_pass

MS_DOMAIN = "com.microsoft"
_LOWEST = float(np.finfo(np.float32).min)


@register_pass
@dataclasses.dataclass
class LowerOnnxRuntime(Pass):
    """Replace graphopt's fused ops by the ONNX Runtime contrib ops that compute the same (the onnxruntime target's lowering).

    Each float32 `Attention`, `SkipLayerNorm`, `RMSNorm` and `Gelu` becomes ORT's kernel for
    it where that kernel is equal on these inputs (and, on `device`, faster than the
    standard decomposition; see the module docstring); anything left is decomposed into
    standard ONNX when the target builds its session. Needs nothing; leaves the layout ops
    it bypassed dead (the onnxruntime target's lowering runs eliminate-dead-code after it).
    Stats: "lowered", the nodes replaced.
    """

    name = "lower-onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    """Which ONNX Runtime execution provider the contrib kernels are chosen for (their speed differs)."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        lowered = 0
        for node in [n for n in graph.nodes if n.domain == GRAPHOPT_DOMAIN]:
            lower = _LOWERINGS.get(node.op_type)
            if self.device == "cpu":
                lower = _CPU_LOWERINGS.get(node.op_type, lower)
            if node.inputs[0] is None or node.inputs[0].dtype != DType.FLOAT:
                continue
            if lower is not None:
                graph.opset_imports.setdefault(MS_DOMAIN, 1)
                lowered += bool(lower(graph, node))
        if MS_DOMAIN in graph.opset_imports and not any(n.domain == MS_DOMAIN for n in graph.nodes):
            del graph.opset_imports[MS_DOMAIN]
        return PassResult(lowered > 0, {"lowered": lowered})


def _replace(graph: Graph, node: Node, new: Node, pairs: list[tuple[int, int]]) -> None:
    """Point readers of `node`'s outputs at `new`'s outputs (old index, new index), erase `node`,
    and give the new outputs the old names."""
    _replace_outputs(graph, node, {old: new.outputs[index] for old, index in pairs})


def _replace_outputs(graph: Graph, node: Node, results: dict[int, Value]) -> None:
    """Point readers of `node`'s outputs at `results` (by output index), erase `node`, and give
    the results the old names."""
    names = []
    for index, result in results.items():
        old = node.outputs[index]
        if old.uses() or old.is_graph_output:
            old.replace_all_uses_with(result)
            names.append((result, old.name))
    graph.erase(node)
    for value, name in names:
        graph.rename_value(value, name)


def _vector(graph: Graph, value: Optional[Value], width: int) -> Optional[Value]:
    """`value` as a [width] vector: itself when it is one, a new constant for a constant scalar."""
    if value is None:
        return None
    if value.shape == (width,):
        return value
    data = constant_data(value)
    if data is None or data.size != 1:
        return None
    return graph.add_constant(graph.unique_name("contrib_vector"), np.full(width, data.reshape(-1)[0], data.dtype))


def _static_width(value: Value) -> Optional[int]:
    shape = value.shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


# ---------------------------------------------------------------------------- activations and norms
def _gelu(graph: Graph, node: Node) -> bool:
    x = node.inputs[0]
    bias = node.inputs[1] if len(node.inputs) > 1 else None
    if node.attrs.get("approximate", "none") == "tanh":
        new = graph.add_node("FastGelu", [x, bias] if bias is not None else [x], domain=MS_DOMAIN, before=node)
    elif bias is not None:
        new = graph.add_node("BiasGelu", [x, bias], domain=MS_DOMAIN, before=node)
    else:
        new = graph.add_node("Gelu", [x], domain=MS_DOMAIN, before=node)
    new.outputs[0].type = node.output.type
    _replace(graph, node, new, [(0, 0)])
    return True


def _rmsnorm(graph: Graph, node: Node) -> bool:
    x, scale = node.inputs
    width = _static_width(x)  # type: ignore[arg-type]
    rank = x.type.rank  # type: ignore[union-attr]
    if width is None or not rank or int(node.attrs.get("axis", -1)) % rank != rank - 1:
        return False
    scale = _vector(graph, scale, width)
    if scale is None:
        return False
    attrs = {"axis": -1, "epsilon": float(node.attrs.get("epsilon", 1e-5)), "stash_type": 1}
    new = graph.add_node("SimplifiedLayerNormalization", [x, scale], attrs, before=node, infer=False)
    new.outputs[0].type = node.output.type
    _replace(graph, node, new, [(0, 0)])
    return True


def _skip_layer_norm(graph: Graph, node: Node) -> bool:
    x, skip, scale = node.inputs[:3]
    beta = node.inputs[3] if len(node.inputs) > 3 else None
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    width = _static_width(x)  # type: ignore[arg-type]
    if width is None or x.type.rank != 3 or not same_shape(x.shape, skip.shape):  # type: ignore[union-attr]
        return False
    scale = _vector(graph, scale, width)
    if scale is None or (beta is not None and beta.shape != (width,)) or (bias is not None and bias.shape != (width,)):
        return False
    simplified = bool(node.attrs.get("simplified", 0))
    attrs = {"epsilon": float(node.attrs.get("epsilon", 1e-5))}
    if simplified:
        op, inputs = "SkipSimplifiedLayerNormalization", [x, skip, scale, bias]
    else:
        op, inputs = "SkipLayerNormalization", [x, skip, scale, beta, bias]
    new = graph.add_node(op, inputs, attrs, domain=MS_DOMAIN, num_outputs=4, before=node)
    new.outputs[0].type = node.outputs[0].type
    new.outputs[3].type = node.outputs[-1].type
    _replace(graph, node, new, [(0, 0), (1, 3)] if len(node.outputs) > 1 else [(0, 0)])
    _omit_unread_outputs(new)
    return True


def _skip_layer_norm_cpu(graph: Graph, node: Node) -> bool:
    """On CPU: `Add(x, skip)`, `Add(bias)`, `LayerNormalization` instead of ORT's slower
    SkipLayerNormalization kernel. The bias is added last: ORT's SkipLayerNormFusion matches
    `(x + bias) + skip` (and, with static shapes, a bias-free `x + skip`) and would put the
    slow kernel back; sessions graphopt creates on CPU also turn that fusion off."""
    if node.attrs.get("simplified", 0):
        return _skip_layer_norm(graph, node)
    if graph.opset() < LAYER_NORM_OPSET:
        return False
    x, skip, scale = node.inputs[:3]
    beta = node.inputs[3] if len(node.inputs) > 3 else None
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    total = graph.add_node("Add", [x, skip], before=node).output
    if bias is not None:
        total = graph.add_node("Add", [total, bias], before=node).output
    attrs = {"axis": -1, "epsilon": float(node.attrs.get("epsilon", 1e-5))}
    norm = graph.add_node("LayerNormalization", [total, scale] + ([beta] if beta is not None else []), attrs, before=node)
    _replace_outputs(graph, node, dict(enumerate([norm.output, total][: len(node.outputs)])))
    return True


def _omit_unread_outputs(node: Node) -> None:
    """Export the optional outputs nobody reads as "": ORT computes and writes every named
    output (SkipLayerNormalization's mean, inverse std and pre-norm sum: a [B, S, H] write
    per layer for nothing)."""
    unread = [i for i, v in enumerate(node.outputs) if i > 0 and not v.uses() and not v.is_graph_output]
    if unread:
        node.origin["omitted_outputs"] = unread


# ---------------------------------------------------------------------------- attention
def _merged_readers(value: Value, heads: int, head_size: int) -> Optional[list[Value]]:
    """The [B, S, heads*head_size] values the [B, heads, S, head_size] `value` is turned into
    by Transpose(0, 2, 1, 3) + Reshape, when that is all its readers do."""
    batch, seq = value.shape[0], value.shape[2]  # type: ignore[index]
    if value.is_graph_output or not value.uses():
        return None
    merged = []
    for transpose in value.users():
        if transpose.op_type != "Transpose" or transpose.domain or tuple(transpose.attrs.get("perm", ())) != HEAD_PERM:
            return None
        if transpose.output.is_graph_output or not transpose.output.uses():
            return None
        for reshape in transpose.output.users():
            shape = reshape.output.shape
            if reshape.op_type != "Reshape" or reshape.domain or shape is None or len(shape) != 3 or shape[2] != heads * head_size:
                return None
            if not same_shape(tuple(shape[:2]), (batch, seq)):
                return None
            merged.append(reshape.output)
    return merged if sum(v.is_graph_output for v in merged) <= 1 else None


def _split_projection(sources: list[Value]) -> Optional[tuple[Node, Optional[Value]]]:
    """(producer of the projection, constant bias or None) when the three sources are outputs
    0, 1, 2 of one last-axis Split of `projection (+ b)`, each read once."""
    split = sources[0].producer
    if split is None or split.op_type != "Split" or split.domain or len(split.outputs) != 3:
        return None
    if any(s.producer is not split or s.output_index != i for i, s in enumerate(sources)):
        return None
    if int(split.attrs.get("axis", 0)) % 3 != 2 or any(len(s.uses()) != 1 for s in sources):
        return None
    fused, bias = split.inputs[0], None
    producer = fused.producer  # type: ignore[union-attr]
    if producer is not None and producer.op_type == "Add" and not producer.domain and len(fused.uses()) == 1:  # type: ignore[union-attr]
        matmul_out, bias = producer.inputs
        if bias is None or not bias.is_constant:
            matmul_out, bias = bias, matmul_out
        if bias is None or not bias.is_constant or len(bias.shape or ()) != 1 or matmul_out is None or len(matmul_out.uses()) != 1:
            return None
        producer = matmul_out.producer
    return (producer, bias) if producer is not None else None


def _packed_projection(sources: list[Value]) -> Optional[tuple[Value, Value, Optional[Value]]]:
    """(x, W, b) when the three sources are outputs 0, 1, 2 of one Split of x @ W (+ b)."""
    found = _split_projection(sources)
    if found is None or found[0].op_type != "MatMul" or found[0].domain:
        return None
    x, weight = found[0].inputs
    if x is None or weight is None or not weight.is_constant or x.type.rank != 3:
        return None
    return x, weight, found[1]


@dataclasses.dataclass
class _QuantizedProjection:
    """x @ W (+ b) in int8 as QAttention reads it: the uint8 activation with its scale and
    zero point, the constant int8 [K, N] weight with its per-tensor or per-column ones."""

    x: Value
    weight: Value
    bias: Optional[Value]
    x_scale: Value
    w_scale: Value
    x_zero: Value
    w_zero: Value


def _only(value: Optional[Value], op_type: str) -> Optional[Node]:
    """The standard-domain `op_type` node producing `value`, if that is what produces it."""
    node = None if value is None else value.producer
    return node if node is not None and node.op_type == op_type and not node.domain else None


def _quantized_projection(sources: list[Value]) -> Optional[_QuantizedProjection]:
    """The int8 form of the packed projection the quantize pass leaves: mode=dynamic's
    DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(scales), or mode=static's
    MatMul(DequantizeLinear(QuantizeLinear(x)), DequantizeLinear(W)) with a per-column axis."""
    found = _split_projection(sources)
    if found is None:
        return None
    producer, bias = found
    if producer.op_type == "Mul" and not producer.domain:
        cast, scales = (_only(v, op) for v, op in zip(producer.inputs, ("Cast", "Mul")))
        matmul = _only(cast.inputs[0], "MatMulInteger") if cast is not None else None
        dynamic = _only(matmul.inputs[0], "DynamicQuantizeLinear") if matmul is not None else None
        if dynamic is None or scales is None or len(matmul.inputs) < 4 or matmul.inputs[1] is None or not matmul.inputs[1].is_constant:  # type: ignore[union-attr]
            return None
        w_scale = scales.inputs[1] if scales.inputs[0] is dynamic.outputs[1] else None
        if w_scale is None or not w_scale.is_constant or matmul.inputs[2] is not dynamic.outputs[2]:  # type: ignore[union-attr]
            return None
        x, weight, w_zero = dynamic.outputs[0], matmul.inputs[1], matmul.inputs[3]  # type: ignore[union-attr]
        return _QuantizedProjection(x, weight, bias, dynamic.outputs[1], w_scale, dynamic.outputs[2], w_zero)  # type: ignore[arg-type]
    if producer.op_type != "MatMul" or producer.domain:
        return None
    dq_x, dq_w = (_only(v, "DequantizeLinear") for v in producer.inputs)
    quant = _only(dq_x.inputs[0], "QuantizeLinear") if dq_x is not None else None
    if quant is None or dq_w is None or int(dq_w.attrs.get("axis", 1)) % 2 != 1 and dq_w.inputs[1].shape not in ((), (1,)):  # type: ignore[union-attr]
        return None
    if any(v is None or not v.is_constant for v in dq_w.inputs) or quant.output.dtype != DType.UINT8:
        return None
    if dq_x.inputs[1:] != quant.inputs[1:] or any(v is None for v in quant.inputs[1:3]):  # type: ignore[union-attr]
        return None
    weight, w_scale, w_zero = dq_w.inputs[:3]
    return _QuantizedProjection(quant.output, weight, bias, quant.inputs[1], w_scale, quant.inputs[2], w_zero)  # type: ignore[arg-type]


def _mask_index(graph: Graph, bias: Optional[Value], query: Value, key: Value, anchor: Node) -> tuple[bool, Optional[Value], float]:
    """(usable, mask_index, filter value): a boolean [B, 1, Sq, Sk] mask (or the additive
    Where(mask, 0, very negative) made of it) as QAttention's int32 [B, Sq, Sk] raw mask,
    with the value masked scores get."""
    if bias is None:
        return True, None, _LOWEST
    filler = _LOWEST
    where = _only(bias, "Where")
    if bias.dtype != DType.BOOL and where is not None:
        zero, fill = (constant_data(v) for v in where.inputs[1:])
        if zero is None or fill is None or zero.size != 1 or fill.size != 1 or float(zero.reshape(-1)[0]) != 0.0:
            return False, None, filler
        if float(fill.reshape(-1)[0]) > -1e4:
            return False, None, filler
        filler = max(float(fill.reshape(-1)[0]), _LOWEST)
        bias = where.inputs[0]
    shape, q_shape, k_shape = bias.shape, query.shape, key.shape  # type: ignore[union-attr]
    if bias.dtype != DType.BOOL or shape is None or len(shape) != 4 or shape[1] != 1 or q_shape is None or k_shape is None:  # type: ignore[union-attr]
        return False, None, filler
    if not same_shape((shape[0], shape[2], shape[3]), (q_shape[0], q_shape[2], k_shape[2])):
        return False, None, filler
    as_int = graph.add_node("Cast", [bias], {"to": DType.INT32.value}, before=anchor).output
    return True, graph.add_node("Squeeze", [as_int, _ints(graph, [1])], before=anchor).output, filler


def _quantized_attention(graph: Graph, node: Node, projection: _QuantizedProjection, attrs: dict) -> Optional[Node]:
    """QAttention over the int8 packed projection, or None where its mask cannot be given."""
    query, key = node.inputs[:2]
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    usable, mask, filler = _mask_index(graph, bias, query, key, node)  # type: ignore[arg-type]
    if not usable:
        return None
    qkv_bias = projection.bias
    if qkv_bias is None:
        width = projection.weight.shape[1]  # type: ignore[index]
        qkv_bias = graph.add_constant(graph.unique_name("qkv_zero_bias"), np.zeros(width, np.float32))
    inputs = [projection.x, projection.weight, qkv_bias, projection.x_scale, projection.w_scale, mask, projection.x_zero, projection.w_zero]
    return graph.add_node("QAttention", inputs, {**attrs, "mask_filter_value": filler}, domain=MS_DOMAIN, before=node, infer=False)


def _additive_bias(graph: Graph, bias: Optional[Value], query: Value, keys: Dim, anchor: Node) -> tuple[bool, Optional[Value]]:
    """(usable, attention_bias): the bias as a float [B|1, N|1, Sq, Sk] additive input, Sk = `keys`."""
    if bias is None:
        return True, None
    shape, q_shape = bias.shape, query.shape
    if shape is None or len(shape) != 4 or q_shape is None:
        return False, None
    if not dims_equal(shape[2], q_shape[2]) or not dims_equal(shape[3], keys):
        return False, None
    if bias.dtype is not None and bias.dtype.name == "BOOL":
        zero = graph.add_constant(graph.unique_name("mask_zero"), np.zeros((), query.dtype.to_numpy()))  # type: ignore[union-attr]
        lowest = graph.add_constant(graph.unique_name("mask_lowest"), np.array(_LOWEST, query.dtype.to_numpy()))  # type: ignore[union-attr]
        return True, graph.add_node("Where", [bias, zero, lowest], before=anchor).output
    return bias.dtype == query.dtype, bias


def _float_attention(graph: Graph, node: Node, sources: list[Optional[Value]], attrs: dict, width: int) -> Optional[Node]:
    """Packed `Attention` over a float fused-qkv projection, else `MultiHeadAttention`; None
    where the mask cannot be given to them."""
    query, key, value = node.inputs[:3]
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    usable, attention_bias = _additive_bias(graph, bias, query, key.shape[2] if key.shape else None, node)  # type: ignore[arg-type,union-attr]
    if not usable:
        return None
    packed = _packed_projection(sources) if all(s is not None for s in sources) else None  # type: ignore[arg-type]
    if packed is not None:
        x, weight, qkv_bias = packed
        if qkv_bias is None:
            qkv_bias = graph.add_constant(graph.unique_name("qkv_zero_bias"), np.zeros(weight.shape[1], weight.dtype.to_numpy()))  # type: ignore[index,union-attr]
        inputs = [x, weight, qkv_bias, None, None, attention_bias]
        return graph.add_node("Attention", inputs, attrs, domain=MS_DOMAIN, before=node, infer=False)
    q_in = sources[0] or _merge_heads(graph, query, width, node)  # type: ignore[arg-type]
    if sources[1] is not None and sources[2] is not None:
        k_in, v_in = sources[1], sources[2]
    else:
        k_in, v_in = key, value
    inputs = [q_in, k_in, v_in, None, None, attention_bias]
    return graph.add_node("MultiHeadAttention", inputs, attrs, domain=MS_DOMAIN, before=node, infer=False)


def _attention(graph: Graph, node: Node) -> bool:
    if has_kv_cache(node):
        return _kv_cache_attention(graph, node)
    query, key, value = node.inputs[:3]
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    heads = int(node.attrs["num_heads"])
    if int(node.attrs.get("num_kv_heads", heads)) != heads:
        return False
    shapes = [v.shape for v in (query, key, value)]  # type: ignore[union-attr]
    if any(s is None or len(s) != 4 for s in shapes) or not isinstance(shapes[0][3], int) or shapes[2][3] != shapes[0][3]:  # type: ignore[index]
        return False
    head_size = shapes[0][3]  # type: ignore[index]
    causal = bool(node.attrs.get("causal", 0))
    if causal and (bias is not None or shapes[0][2] != shapes[1][2] or shapes[0][2] is None):  # type: ignore[index]
        return False
    attrs: dict = {"num_heads": heads, "scale": float(node.attrs.get("scale", 1.0 / math.sqrt(head_size)))}
    if causal:
        attrs["unidirectional"] = 1
    sources = [merged_source(v, heads, head_size) for v in (query, key, value)]  # type: ignore[arg-type]
    new = None
    if all(s is not None for s in sources):
        quantized = _quantized_projection(sources)  # type: ignore[arg-type]
        new = _quantized_attention(graph, node, quantized, attrs) if quantized is not None else None
    if new is None:
        new = _float_attention(graph, node, sources, attrs, heads * head_size)
    if new is None:
        return False
    _attach_output(graph, node, new, heads, head_size)
    return True


def _attach_output(graph: Graph, node: Node, new: Node, heads: int, head_size: int) -> None:
    """Give `node`'s [B, N, S, D] output the contrib op's [B, S, N*D] one: bypassing the
    readers that only merge heads (`node` is then left dead), else splitting the heads again."""
    query = node.inputs[0]
    shape = query.shape  # type: ignore[union-attr]
    out = new.outputs[0]
    out.type = TensorType(query.dtype, (shape[0], shape[2], heads * head_size))  # type: ignore[union-attr,index]
    if node.attrs.get("nan_to_zero"):
        zero = graph.add_constant(graph.unique_name("nan_zero"), np.zeros((), query.dtype.to_numpy()))  # type: ignore[union-attr]
        out = graph.add_node("Where", [graph.add_node("IsNaN", [out], before=node).output, zero, out], before=node).output
    merged = _merged_readers(node.outputs[0], heads, head_size)
    if merged is not None:
        for reader in merged:
            name = reader.name if reader.is_graph_output else None
            reader.replace_all_uses_with(out)
            if name is not None:
                graph.erase(reader.producer)  # type: ignore[arg-type]
                graph.rename_value(out, name)
    else:
        heads_split = graph.add_node("Reshape", [out, _ints(graph, [0, 0, heads, head_size])], before=node).output
        _replace(graph, node, graph.add_node("Transpose", [heads_split], {"perm": HEAD_PERM}, before=node), [(0, 0)])


def _kv_cache_attention(graph: Graph, node: Node) -> bool:
    """`Attention(q, k, v[, bias], past_key, past_value)` -> `GroupQueryAttention` with
    `causal=0` and the graph's own mask as `attention_bias` (see the module docstring)."""
    query, key, value, bias, past_key, past_value = node.inputs[:6]
    heads = int(node.attrs["num_heads"])
    kv_heads = int(node.attrs.get("num_kv_heads", heads))
    shapes = [v.shape for v in (query, key, value, past_key, past_value)]  # type: ignore[union-attr]
    if any(shape is None or len(shape) != 4 for shape in shapes):
        return False
    head_size = shapes[0][3]  # type: ignore[index]
    if not isinstance(head_size, int) or any(shape[3] != head_size for shape in shapes[1:]):  # type: ignore[index]
        return False
    if not dims_equal(shapes[0][2], shapes[1][2]):  # type: ignore[index]
        return False  # the kernel takes as many new keys as queries
    causal = bool(node.attrs.get("causal", 0))
    if causal and bias is not None:
        return False  # its causal mode outputs 0 for fully masked rows, the decomposition the mean of V
    usable, attention_bias = _additive_bias(graph, bias, query, add_dims(shapes[3][2], shapes[1][2]), node)  # type: ignore[arg-type,index]
    if not usable:
        return False
    # lengths read from the mask where there is one (_additive_bias proved its last dim is
    # past + seq; one mask serves every layer, so these nodes are shared after CSE)
    if attention_bias is not None:
        total = _dim_of(graph, attention_bias, 3, node)
    else:
        total = graph.add_node("Add", [_dim_of(graph, past_key, 2, node), _dim_of(graph, key, 2, node)], before=node).output  # type: ignore[arg-type]
    last = graph.add_node("Sub", [total, _ints(graph, [1])], before=node).output
    bias_batch = attention_bias is not None and dims_equal(attention_bias.type.shape[0], shapes[0][0])  # type: ignore[index]
    batch = _dim_of(graph, attention_bias if bias_batch else query, 0, node)  # type: ignore[arg-type]
    seqlens = graph.add_node("Cast", [graph.add_node("Expand", [last, batch], before=node).output], {"to": DType.INT32.value}, before=node).output
    scalar = graph.add_node("Reshape", [total, _ints(graph, [])], before=node).output
    total_length = graph.add_node("Cast", [scalar], {"to": DType.INT32.value}, before=node).output
    merged = [
        merged_source(v, h, head_size) or _merge_heads(graph, v, h * head_size, node)  # type: ignore[arg-type]
        for v, h in ((query, heads), (key, kv_heads), (value, kv_heads))
    ]
    attrs: dict = {
        "num_heads": heads, "kv_num_heads": kv_heads, "causal": int(causal),
        "scale": float(node.attrs.get("scale", 1.0 / math.sqrt(head_size))),
    }
    inputs = [*merged, past_key, past_value, seqlens, total_length, None, None, None, attention_bias]
    new = graph.add_node("GroupQueryAttention", inputs, attrs, domain=MS_DOMAIN, num_outputs=3, before=node, infer=False)
    for index in (1, 2):
        new.outputs[index].type = node.outputs[index].type if len(node.outputs) > index else past_key.type  # type: ignore[union-attr]
        if len(node.outputs) > index:
            graph.replace_value(node.outputs[index], new.outputs[index])
    _attach_output(graph, node, new, heads, head_size)
    return True


def _dim_of(graph: Graph, value: Value, axis: int, anchor: Node) -> Value:
    """`value`'s dim `axis` as an int64 [1] tensor."""
    shape = graph.add_node("Shape", [value], before=anchor).output
    return graph.add_node("Gather", [shape, _ints(graph, [axis])], {"axis": 0}, before=anchor).output


def _ints(graph: Graph, values: list[int]) -> Value:
    return graph.add_constant(graph.unique_name("contrib_shape"), np.array(values, np.int64))


def _merge_heads(graph: Graph, value: Value, width: int, anchor: Node) -> Value:
    """[B, N, S, D] -> [B, S, N*D]."""
    transposed = graph.add_node("Transpose", [value], {"perm": HEAD_PERM}, before=anchor).output
    return graph.add_node("Reshape", [transposed, _ints(graph, [0, 0, width])], before=anchor).output


_CPU_LOWERINGS = {"SkipLayerNorm": _skip_layer_norm_cpu}
"""Where the CPU lowering differs (measured faster; see the module doc)."""

_LOWERINGS = {
    "Attention": _attention,
    "SkipLayerNorm": _skip_layer_norm,
    "RMSNorm": _rmsnorm,
    "Gelu": _gelu,
    "RotaryEmbedding": lower_rotary_contrib,
}
