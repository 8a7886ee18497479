"""Relax translations of the opset-23/24 Transformer ops, registered into `tvm_relax`'s rule table.

- `Attention`: 3-D Q/K/V split into heads (`q_num_heads` / `kv_num_heads`) and the output
  merged back, `past_key` / `past_value` concatenated in front of K / V (the present
  outputs), then graphopt's Attention translation (`tvm_relax_compute`) over an additive
  bias: the float mask, or 0 / -inf for a boolean one, plus -inf outside the causal frontier
  `j <= i + offset` (offset = past length, or `nonpad_kv_seqlen - q_len` per batch), outside
  the opset-25 windows and past `nonpad_kv_seqlen`; rows left with no key output zeros
  (`nan_to_zero`), as ONNX says. With a `softcap`, a read `qk_matmul_output` or a
  `softmax_precision` other than the input type, the scores are written out step by step
  instead (`_explicit_attention`). A mask whose last dim may differ from the key count at
  run time is refused at compile time (ONNX pads a shorter one with -inf: a static shorter
  one is padded here).
- `RMSNormalization`: float32 X and scale, as `nn.rms_norm` over `axis`..-1 (other types are refused).
- `RotaryEmbedding`: cos/sin rows gathered by `position_ids`, the rotated halves (or
  interleaved pairs) of the first `rotary_embedding_dim` features, the rest passed through.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Node
from graphopt.targets.tvm_relax import RelaxConversionError, _Converter, _prim, _rule_for, _same_dims
from graphopt.targets.tvm_relax_compute import _attention, _normalize, attention_scale, repeat_kv_heads

_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}


@dataclasses.dataclass
class _Attrs:
    """The attributes a `tvm_relax_compute` translation reads (graphopt's Attention over the
    split heads, a normalization over a given axis) and the node label for its errors."""

    attrs: dict[str, Any]
    label: str


def _refuse(node: Node, what: str) -> RelaxConversionError:
    return RelaxConversionError(f"{node.op_type}: {what} has no exact TVM translation")


def _needs_explicit_scores(node: Node, dtype: str) -> bool:
    """True when the scores must be written out here: a soft cap, a read `qk_matmul_output`,
    or a softmax in another precision than the inputs'."""
    attrs = node.attrs
    precision = attrs.get("softmax_precision")
    read_scores = len(node.outputs) > 3 and (bool(node.outputs[3].uses()) or node.outputs[3].is_graph_output)
    return bool(float(attrs.get("softcap", 0.0))) or read_scores or (precision is not None and _float_type(node, precision) != dtype)


def _float_type(node: Node, precision: Any) -> str:
    if int(precision) not in _FLOAT_TYPES:
        raise _refuse(node, f"softmax_precision={precision}")
    return _FLOAT_TYPES[int(precision)]


def _explicit_attention(c: _Converter, node: Node, q: Any, k: Any, v: Any, bias: Any) -> tuple[Any, Any]:
    """(Y, qk_matmul_output) over split heads, each step as ONNX writes it:
    (Q * sqrt(scale)) @ (K * sqrt(scale))^T, soft cap, bias, softmax in `softmax_precision`
    (fully masked rows zero), @ V; the scores output in `qk_matmul_output_mode`."""
    from tvm import relax

    dtype = str(q.ty.dtype)
    k, v = repeat_kv_heads(c, k, v, c.shape(q)[1], c.shape(k)[1])
    scale = attention_scale(c, q, node.attrs.get("scale"))
    root = relax.const(math.sqrt(scale), dtype)
    raw = c.emit(relax.op.matmul(relax.op.multiply(q, root), relax.op.permute_dims(relax.op.multiply(k, root), [0, 1, 3, 2])))
    capped = raw
    softcap = float(node.attrs.get("softcap", 0.0))
    if softcap > 0:
        cap = relax.const(softcap, dtype)
        capped = c.emit(relax.op.multiply(relax.op.tanh(relax.op.divide(raw, cap)), cap))
    biased = capped if bias is None else c.emit(relax.op.add(capped, bias))
    precision = node.attrs.get("softmax_precision")
    stashed = biased if precision is None else c.emit(relax.op.astype(biased, _float_type(node, precision)))
    probs = c.emit(relax.op.nn.softmax(stashed, -1))
    probs = c.emit(relax.op.where(relax.op.isnan(probs), relax.const(0.0, str(probs.ty.dtype)), probs))
    if str(probs.ty.dtype) != dtype:
        probs = c.emit(relax.op.astype(probs, dtype))
    y = c.emit(relax.op.matmul(probs, v if str(v.ty.dtype) == dtype else relax.op.astype(v, dtype)))
    return y, (raw, capped, biased, probs)[int(node.attrs.get("qk_matmul_output_mode", 0))]


def _split_heads(c: _Converter, x: Any, heads: Optional[int]) -> Any:
    """[B, S, H * D] -> [B, H, S, D]."""
    from tvm import relax, tirx

    batch, seq, hidden = c.shape(x)
    size = hidden // heads if isinstance(hidden, int) else c.simplify(tirx.floordiv(hidden, heads))
    return c.emit(relax.op.permute_dims(c.emit(relax.op.reshape(x, [batch, seq, heads, size])), [0, 2, 1, 3]))


def _bias(c: _Converter, node: Node, mask: Any, nonpad: Any, batch: Any, q_len: Any, total: Any, past: Any, dtype: str) -> Any:
    """The additive bias: the mask (boolean as 0 / -inf) plus -inf at the keys the causal
    frontier, the windows or `nonpad_kv_seqlen` take away."""
    from tvm import relax

    zero, blocked = relax.const(0.0, dtype), relax.const(float("-inf"), dtype)
    bias = None
    if mask is not None:
        mask = c.tensor(mask)
        if str(mask.ty.dtype) == "bool":
            bias = c.emit(relax.op.where(mask, zero, blocked))
        else:
            bias = mask if str(mask.ty.dtype) == dtype else c.emit(relax.op.astype(mask, dtype))
        bias = _pad_keys(c, node, bias, total)
    allowed = _allowed_keys(c, node, nonpad, batch, q_len, total, past)
    if allowed is not None:
        frontier = c.emit(relax.op.where(allowed, zero, blocked))
        bias = frontier if bias is None else c.emit(relax.op.add(bias, frontier))
    return bias


def _pad_keys(c: _Converter, node: Node, bias: Any, total: Any) -> Any:
    """A mask bias shorter than the key count padded with -inf, as ONNX pads the mask."""
    from tvm import relax

    width = c.shape(bias)[-1]
    if _same_dims(c, [width], [total]):
        return bias
    if not (isinstance(width, int) and isinstance(total, int) and width < total):
        raise _refuse(node, "an attn_mask whose last dim may differ from the key count at run time")
    pad_width = [0] * (2 * c.rank(bias) - 1) + [total - width]
    return c.emit(relax.op.nn.pad(bias, pad_width, pad_value=float("-inf")))


def _batch_sized(c: _Converter, lengths: Any, batch: Any) -> Any:
    """`nonpad_kv_seqlen` [B] stated to have Q's batch dim where one is static and the other
    symbolic (graphopt's broadcasting takes such dims to be equal; the VM checks it)."""
    from tvm import relax

    if _same_dims(c, c.shape(lengths), [batch]):
        return lengths
    return c.bb.match_cast(lengths, relax.TensorType([_prim(batch)], str(lengths.ty.dtype)))


def _allowed_keys(c: _Converter, node: Node, nonpad: Any, batch: Any, q_len: Any, total: Any, past: Any) -> Any:
    """Boolean [.., q_len, total]: key j is allowed for query i at position p = i + offset
    (offset = past length, or nonpad_kv_seqlen - q_len per batch) iff j <= p (causal),
    p - left <= j <= p + right (windows) and j < nonpad_kv_seqlen; None when nothing restricts."""
    from tvm import relax

    causal = int(node.attrs.get("is_causal", 0))
    left, right = int(node.attrs.get("left_window_size", -1)), int(node.attrs.get("right_window_size", -1))
    cols = relax.op.arange(0, total, 1, "int64")
    per_batch = None if nonpad is None else c.emit(relax.op.reshape(_batch_sized(c, c.tensor(nonpad), batch), [-1, 1, 1, 1]))
    conditions = []
    if causal or left >= 0 or right >= 0:
        if per_batch is None:
            rows = c.emit(relax.op.expand_dims(relax.op.arange(past, c.simplify(past + q_len), 1, "int64"), 1))
        else:
            rows = c.emit(relax.op.add(relax.op.expand_dims(relax.op.arange(c.simplify(-q_len), 0, 1, "int64"), 1), per_batch))
        diff = c.emit(relax.op.subtract(rows, cols))
        if causal:
            conditions.append(relax.op.greater_equal(diff, relax.const(0, "int64")))
        if left >= 0:
            conditions.append(relax.op.less_equal(diff, relax.const(left, "int64")))
        if right >= 0:
            conditions.append(relax.op.greater_equal(diff, relax.const(-right, "int64")))
    if per_batch is not None:
        conditions.append(relax.op.less(cols, per_batch))
    if not conditions:
        return None
    allowed = c.emit(conditions[0])
    for condition in conditions[1:]:
        allowed = c.emit(relax.op.logical_and(allowed, condition))
    return allowed


@_rule_for("Attention")
def _onnx_attention(c: _Converter, node: Node, q: Any, k: Any, v: Any, mask: Any = None,
                    past_key: Any = None, past_value: Any = None, nonpad: Any = None) -> Any:
    from tvm import relax

    q, k, v = c.tensor(q), c.tensor(k), c.tensor(v)
    dtype = str(q.ty.dtype)
    three_d = c.rank(q) == 3
    if three_d:
        q = _split_heads(c, q, node.attrs.get("q_num_heads"))
        k = _split_heads(c, k, node.attrs.get("kv_num_heads"))
        v = _split_heads(c, v, node.attrs.get("kv_num_heads"))
    past = 0
    if past_key is not None:
        past = c.shape(c.tensor(past_key))[2]
        k = c.emit(relax.op.concat([c.tensor(past_key), k], axis=2))
        v = c.emit(relax.op.concat([c.tensor(past_value), v], axis=2))
    batch, _, q_len, _ = c.shape(q)
    total = c.shape(k)[2]
    bias = _bias(c, node, mask, nonpad, batch, q_len, total, past, dtype)
    if _needs_explicit_scores(node, dtype):
        y, scores = _explicit_attention(c, node, q, k, v, bias)
    elif dtype == "float16":
        # scores, softmax and the weighted sum accumulate in float32 (as ONNX Runtime does),
        # rounded to float16 once at the end
        wide = [None if t is None else c.emit(relax.op.astype(t, "float32")) for t in (q, k, v, bias)]
        y, scores = c.emit(relax.op.astype(_plain_attention(c, node, *wide), dtype)), None
    else:
        y, scores = _plain_attention(c, node, q, k, v, bias), None
    if three_d:
        y = c.emit(relax.op.reshape(c.emit(relax.op.permute_dims(y, [0, 2, 1, 3])), [batch, q_len, -1]))
    results = [y, k, v] if scores is None else [y, k, v, scores]
    return results[: len(node.outputs)]


def _plain_attention(c: _Converter, node: Node, q: Any, k: Any, v: Any, bias: Any) -> Any:
    """graphopt's Attention translation over [B, H, S, D] heads and an additive bias."""
    attrs = {"num_heads": c.shape(q)[1], "num_kv_heads": c.shape(k)[1], "scale": node.attrs.get("scale"), "nan_to_zero": 1}
    return _attention(c, _Attrs(attrs, node.label), q, k, v, bias)  # type: ignore[arg-type]


@_rule_for("RMSNormalization")
def _onnx_rms_norm(c: _Converter, node: Node, x: Any, scale: Any) -> Any:
    from tvm import relax

    x, scale = c.tensor(x), c.tensor(scale)
    dtypes = {str(x.ty.dtype), str(scale.ty.dtype)}
    if dtypes != {"float32"}:
        raise _refuse(node, f"X/scale of type {'/'.join(sorted(dtypes))} (only float32)")
    if int(node.attrs.get("stash_type", DType.FLOAT)) != DType.FLOAT:
        raise _refuse(node, f"stash_type={node.attrs['stash_type']}")
    dims = c.shape(x)
    axis = int(node.attrs.get("axis", -1)) % len(dims)
    if axis:
        return _normalize(c, node, x, scale, None, simplified=True)
    # over every axis: a leading axis of 1 keeps one (TVM's rms_norm cannot reduce to rank 0)
    attrs = _Attrs({"axis": 1, "epsilon": node.attrs.get("epsilon", 1e-5)}, node.label)
    y = _normalize(c, attrs, c.emit(relax.op.expand_dims(x, 0)), scale, None, simplified=True)  # type: ignore[arg-type]
    return c.emit(relax.op.squeeze(y, [0]))


def _per_token(c: _Converter, cache: Any, tokens: list[Any]) -> Any:
    """Cache rows [B, S, R] as [B, S, 1, R] against tokens [B, S, H, D]; a batch or sequence
    dim that differs from the tokens' only in being static or symbolic is stated to be
    theirs (graphopt's broadcasting takes such dims to be equal; the VM checks it)."""
    from tvm import relax

    cache = c.emit(relax.op.expand_dims(cache, 2))
    dims = c.shape(cache)
    stated = [d if (isinstance(d, int) and d == 1) or _same_dims(c, [d], [t]) else t for d, t in zip(dims[:2], tokens[:2])]
    if all(s is d for s, d in zip(stated, dims[:2])):
        return cache
    return c.bb.match_cast(cache, relax.TensorType([_prim(d) for d in [*stated, *dims[2:]]], str(cache.ty.dtype)))


@_rule_for("RotaryEmbedding")
def _onnx_rotary(c: _Converter, node: Node, x: Any, cos: Any, sin: Any, positions: Any = None) -> Any:
    from tvm import relax

    x, cos, sin = c.tensor(x), c.tensor(cos), c.tensor(sin)
    shape = c.shape(x)
    if len(shape) == 3:
        heads = int(node.attrs.get("num_heads", 0))
        if not heads or not isinstance(shape[2], int):
            raise _refuse(node, "a 3-D input without num_heads or a static hidden size")
        tokens = c.emit(relax.op.reshape(x, [shape[0], shape[1], heads, shape[2] // heads]))
    else:
        tokens = c.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))
    head_size = c.shape(tokens)[3]
    rotary = int(node.attrs.get("rotary_embedding_dim", 0)) or head_size
    if not isinstance(rotary, int):
        raise _refuse(node, "a symbolic head size")
    if positions is not None:
        positions = c.tensor(positions)
        cos, sin = c.emit(relax.op.take(cos, positions, axis=0)), c.emit(relax.op.take(sin, positions, axis=0))
    cos, sin = _per_token(c, cos, c.shape(tokens)), _per_token(c, sin, c.shape(tokens))
    half = rotary // 2
    if int(node.attrs.get("interleaved", 0)):
        x1 = c.emit(relax.op.strided_slice(tokens, [3], [0], [rotary], [2]))
        x2 = c.emit(relax.op.strided_slice(tokens, [3], [1], [rotary], [2]))
    else:
        x1 = c.emit(relax.op.strided_slice(tokens, [3], [0], [half]))
        x2 = c.emit(relax.op.strided_slice(tokens, [3], [half], [rotary]))
    real = c.emit(relax.op.subtract(relax.op.multiply(cos, x1), relax.op.multiply(sin, x2)))
    imag = c.emit(relax.op.add(relax.op.multiply(sin, x1), relax.op.multiply(cos, x2)))
    if int(node.attrs.get("interleaved", 0)):
        pairs = c.emit(relax.op.concat([relax.op.expand_dims(real, 4), relax.op.expand_dims(imag, 4)], axis=4))
        rotated = c.emit(relax.op.reshape(pairs, [*c.shape(tokens)[:3], rotary]))
    else:
        rotated = c.emit(relax.op.concat([real, imag], axis=3))
    if rotary != head_size:
        rotated = c.emit(relax.op.concat([rotated, relax.op.strided_slice(tokens, [3], [rotary], [head_size])], axis=3))
    if len(shape) == 3:
        return c.emit(relax.op.reshape(rotated, shape))
    return c.emit(relax.op.permute_dims(rotated, [0, 2, 1, 3]))
