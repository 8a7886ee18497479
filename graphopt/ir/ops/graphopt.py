"""Schemas of graphopt's own high-level ops (domain "graphopt").

Fusion passes raise decomposed patterns into these ops; targets lower them to their fast
kernels (torch: scaled_dot_product_attention, ONNX Runtime: contrib ops, ...).

- ``Attention(query, key, value[, bias])``: query [B, Hq, Sq, D], key [B, Hkv, Sk, D],
  value [B, Hkv, Sk, Dv] (heads already split), optional `bias` broadcastable to
  [B, Hq, Sq, Sk]: boolean (True = attend) or additive float. Attributes `num_heads` (Hq),
  `num_kv_heads` (Hkv; Hq must be a multiple: grouped-query / multi-query attention),
  `scale` (multiplies Q.K^T; 1/sqrt(D) when absent), `causal` (1: query i attends to keys
  j <= i + Sk - Sq, i.e. aligned to the last key, as with a KV cache), `nan_to_zero` (1:
  probabilities that come out NaN, i.e. rows whose every score is -inf because every key is
  masked, count as 0, so such rows output 0, as transformers' SDPA export computes). Output [B, Hq, Sq, Dv].
  With a KV cache, inputs 4 and 5 are `past_key` [B, Hkv, P, D] and `past_value` [B, Hkv, P, Dv]
  (given together; `bias` may then be omitted, written as an empty input): the op attends over
  `present_key = Concat(past_key, key, axis=2)` and `present_value = Concat(past_value, value,
  axis=2)` ([B, Hkv, P + Sk, D]), its optional outputs 1 and 2, exactly as the Concat nodes
  fuse-attention absorbs compute them (P may be 0).
- ``RMSNorm(x, scale)``: x / sqrt(mean(x^2 over axes axis..-1) + epsilon) * scale,
  computed in float32 (`stash_type`, as ONNX LayerNormalization), output in x's type.
- ``Gelu(x[, bias])``: gelu(x + bias); `approximate` = "none" (erf form) or "tanh". `bias`
  is a vector over x's last axis (fuse-bias-gelu folds the Add before the activation).
- ``SkipLayerNorm(x, skip, scale[, beta][, bias]) -> (y[, sum])``: sum = (x + bias) + skip
  (bias omitted: x + skip), y = LayerNormalization(sum, scale, beta) over the last axis
  (`simplified` = 0) or RMSNorm(sum, scale) (`simplified` = 1, no beta), with `epsilon`;
  statistics in float32. The optional second output is the residual sum itself, for the
  nodes that read it (it usually feeds the next residual Add).
- ``AllReduce(x)``: the element-wise sum of `x` over the `world_size` ranks of a tensor-parallel
  group (`reduction` = "sum", the only one); every rank gets the sum. ``AllGather(x)``: the
  ranks' `x` concatenated along `axis` in rank order. The `shard` pass inserts them; they
  are not pure (every rank must run each one, in the same order), so no pass removes, merges or
  folds them. The torch target runs them with torch.distributed (`graphopt.distributed`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from graphopt.ir.schema import GRAPHOPT_DOMAIN, InferenceContext, OpSchema, register_schema
from graphopt.ir.symbolic import add_dims, mul_dims
from graphopt.ir.types import TensorType, merge_dims

if TYPE_CHECKING:
    from graphopt.ir.graph import Node


def _attention(ctx: InferenceContext) -> list[TensorType]:
    query, key, value = ctx.input_type(0), ctx.input_type(1), ctx.input_type(2)
    heads, kv_heads = ctx.attr("num_heads"), ctx.attr("num_kv_heads", ctx.attr("num_heads"))
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads <= 0 or heads % kv_heads):
        raise ValueError(f"Attention: num_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
    for name, t, expected in (("query", query, heads), ("key", key, kv_heads), ("value", value, kv_heads)):
        if t.shape is not None and len(t.shape) != 4:
            raise ValueError(f"Attention: {name} must be rank 4 [batch, heads, seq, head_dim], got rank {len(t.shape)}")
        if t.shape is not None and isinstance(t.shape[1], int) and isinstance(expected, int) and t.shape[1] != expected:
            raise ValueError(f"Attention: {name} has {t.shape[1]} heads, attribute says {expected}")
    if ctx.has_input(4) != ctx.has_input(5):
        raise ValueError("Attention: past_key and past_value are given together")
    if ctx.num_outputs > 1 and not ctx.has_input(4):
        raise ValueError("Attention: present_key/present_value outputs need past_key/past_value inputs")
    dv = value.shape[3] if value.shape is not None else None
    output = TensorType(query.dtype, None if query.shape is None else (query.shape[0], query.shape[1], query.shape[2], dv))
    presents = [_present(ctx.input_type(4), key), _present(ctx.input_type(5), value)] if ctx.has_input(4) else []
    return [output, *presents][: ctx.num_outputs]


def has_kv_cache(node: "Node") -> bool:
    """Whether graphopt Attention `node` reads a KV cache (past_key/past_value inputs)."""
    return len(node.inputs) > 5 and node.inputs[4] is not None


def _present(past: TensorType, new: TensorType) -> TensorType:
    """Concat(past, new, axis=2) of two [B, H, S, D] tensors."""
    if past.shape is None or new.shape is None or len(past.shape) != 4 or len(new.shape) != 4:
        return TensorType(new.dtype, None)
    merged = [merge_dims(a, b) for a, b in zip(past.shape, new.shape)]
    merged[2] = add_dims(past.shape[2], new.shape[2])
    return TensorType(new.dtype, tuple(merged))


def _same_type(ctx: InferenceContext) -> list[TensorType]:
    return [ctx.input_type(0)]


def _skip_layer_norm(ctx: InferenceContext) -> list[TensorType]:
    if ctx.attr("simplified", 0) and ctx.has_input(3):
        raise ValueError("SkipLayerNorm: the simplified (RMS) form takes no beta input")
    x, skip = ctx.input_type(0), ctx.input_type(1)
    shape = x.shape if x.shape is not None else skip.shape
    if x.shape is not None and skip.shape is not None and len(x.shape) == len(skip.shape):
        shape = tuple(a if a is not None else b for a, b in zip(x.shape, skip.shape))
    return [TensorType(x.dtype, shape)] * ctx.num_outputs


def _world_size(ctx: InferenceContext, op: str) -> int:
    size = ctx.attr("world_size")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{op}: world_size must be a positive integer, got {size!r}")
    return size


def _all_reduce(ctx: InferenceContext) -> list[TensorType]:
    _world_size(ctx, "AllReduce")
    if ctx.attr("reduction", "sum") != "sum":
        raise ValueError(f"AllReduce: reduction {ctx.attr('reduction')!r} is not supported (only 'sum')")
    return [ctx.input_type(0)]


def _all_gather(ctx: InferenceContext) -> list[TensorType]:
    size = _world_size(ctx, "AllGather")
    x = ctx.input_type(0)
    if x.shape is None:
        return [TensorType(x.dtype, None)]
    axis = ctx.attr("axis", 0)
    if not -len(x.shape) <= axis < len(x.shape):
        raise ValueError(f"AllGather: axis {axis} is out of range for rank {len(x.shape)}")
    shape = list(x.shape)
    shape[axis] = None if shape[axis] is None else mul_dims(shape[axis], size)
    return [TensorType(x.dtype, tuple(shape))]


register_schema(OpSchema(
    GRAPHOPT_DOMAIN, "Attention", _attention, min_inputs=3, max_inputs=6, max_outputs=3, same_dtype_inputs=((0, 1, 2, 4, 5),),
    doc="Scaled dot-product attention over split heads, grouped-query aware, optional bias, causal mask and KV cache.",
))
register_schema(OpSchema(
    GRAPHOPT_DOMAIN, "RMSNorm", _same_type, min_inputs=2, max_inputs=2,
    doc="Root-mean-square normalization with a learned scale.",
))
register_schema(OpSchema(
    GRAPHOPT_DOMAIN, "Gelu", _same_type, min_inputs=1, max_inputs=2, same_dtype_inputs=((0, 1),),
    doc="Gaussian error linear unit of x (+ bias), exact (erf) or tanh approximation.",
))
register_schema(OpSchema(
    GRAPHOPT_DOMAIN, "SkipLayerNorm", _skip_layer_norm, min_inputs=3, max_inputs=5, max_outputs=2,
    same_dtype_inputs=((0, 1, 2, 3, 4),),
    doc="Residual add (x + bias + skip) then LayerNorm or RMSNorm; the sum as an optional second output.",
))
register_schema(OpSchema(
    GRAPHOPT_DOMAIN, "AllReduce", _all_reduce, min_inputs=1, max_inputs=1, pure=False,
    doc="Sum of a tensor over the ranks of a tensor-parallel group (a collective: every rank runs it).",
))
register_schema(OpSchema(
    GRAPHOPT_DOMAIN, "AllGather", _all_gather, min_inputs=1, max_inputs=1, pure=False,
    doc="The ranks' tensors concatenated along an axis, in rank order (a collective: every rank runs it).",
))
