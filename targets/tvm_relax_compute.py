"""Relax translations of the compute ops, registered into `tvm_relax`'s rule table.

MatMul and Gemm (weights pre-packed in `PACK`-column panels read through a TE matmul),
Softmax, reductions, LayerNormalization, Conv, and graphopt's fused ops: `Gelu` as its
`erf` / `tanh` formula (the build's fast-math pass makes those polynomials), `RMSNorm` and
`SkipLayerNorm` as `nn.rms_norm` / `nn.layer_norm`, `Attention` written out as matmul,
scale, bias, causal mask, softmax, matmul (keys padded to whole panels when their count is
only known at run time).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from graphopt.ir.graph import Node
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.targets.tvm_relax import (_LOWEST, PACK, RelaxConversionError, _axes, _axis, _Converter, _Packed, _product, _rule_for,
                                        _same_dims, _Sym)


@_rule_for("MatMul")
def _matmul(c: _Converter, node: Node, a: Any, b: Any) -> Any:
    from tvm import relax

    if isinstance(b, _Packed):
        return c.emit(c.bb.call_te(_packed_matmul, c.tensor(a), b.var, primfunc_name_hint="matmul_packed"))
    return c.emit(relax.op.matmul(c.tensor(a), c.tensor(b)))


def _packed_matmul(a: Any, packed: Any) -> Any:
    """a [..., M, K] @ weight [K, N] stored as packed [N / PACK, K, PACK]."""
    from tvm import te

    panels, depth, width = packed.shape
    k = te.reduce_axis((0, depth), name="k")
    shape = [*a.shape[:-1], panels * width]
    return te.compute(shape, lambda *i: te.sum(a[(*i[:-1], k)] * packed[i[-1] // width, k, i[-1] % width], axis=k), name="matmul")


@_rule_for("Gemm")
def _gemm(c: _Converter, node: Node, a: Any, b: Any, bias: Any = None) -> Any:
    from tvm import relax

    if isinstance(b, _Packed):
        out = c.emit(c.bb.call_te(_packed_matmul, c.tensor(a), b.var, primfunc_name_hint="matmul_packed"))
    else:
        a, b = c.tensor(a), c.tensor(b)
        if node.attrs.get("transA", 0):
            a = c.emit(relax.op.permute_dims(a))
        if node.attrs.get("transB", 0):
            b = c.emit(relax.op.permute_dims(b))
        out = c.emit(relax.op.matmul(a, b))
    dtype = str(out.ty.dtype)
    if float(node.attrs.get("alpha", 1.0)) != 1.0:
        out = c.emit(relax.op.multiply(out, relax.const(float(node.attrs["alpha"]), dtype)))
    if bias is not None:
        bias = c.tensor(bias)
        if float(node.attrs.get("beta", 1.0)) != 1.0:
            bias = c.emit(relax.op.multiply(bias, relax.const(float(node.attrs["beta"]), dtype)))
        out = c.emit(relax.op.add(out, bias))
    return out


@_rule_for("Softmax")
def _softmax(c: _Converter, node: Node, x: Any) -> Any:
    """Softmax over `axis` (opset 13+); before opset 13 over the input flattened to 2-D at
    `axis` (default 1), i.e. over all the axes from `axis` on."""
    from tvm import relax

    x = c.tensor(x)
    if c.graph.opset() >= 13:
        return c.emit(relax.op.nn.softmax(x, int(node.attrs.get("axis", -1))))
    dims = c.shape(x)
    axis = _axis(len(dims), int(node.attrs.get("axis", 1)))
    flat = c.emit(relax.op.reshape(x, [c.simplify(_product(dims[:axis])), c.simplify(_product(dims[axis:]))]))
    return c.emit(relax.op.reshape(relax.op.nn.softmax(flat, -1), dims))


@_rule_for("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(c: _Converter, node: Node, x: Any, axes_in: Any = None) -> Any:
    """ONNX reductions: no (or empty) axes reduce every axis, or none with
    `noop_with_empty_axes`; float ReduceMax / ReduceMin start from -inf / +inf (Relax starts from the
    lowest / highest finite value, so a row of -inf would not give -inf); a float ReduceMean
    over a possibly empty set divides by at least 1 (`_mean_of_maybe_empty`)."""
    from tvm import relax

    x = c.tensor(x)
    axes = _axes(node, axes_in, c)
    if not axes and node.attrs.get("noop_with_empty_axes", 0):
        return x
    keepdims = bool(node.attrs.get("keepdims", 1))
    rank = c.rank(x)
    axes = sorted({_axis(rank, a) for a in axes}) if axes else list(range(rank))
    floating = str(x.ty.dtype).startswith("float")
    if node.op_type in ("ReduceMax", "ReduceMin") and floating:
        return c.emit(c.bb.call_te(_extremum, x, axes, keepdims, node.op_type == "ReduceMax", primfunc_name_hint=node.op_type.lower()))
    count = c.simplify(_product([c.shape(x)[a] for a in axes]))
    if node.op_type == "ReduceMean" and floating and not (isinstance(count, int) and count > 0):
        return _mean_of_maybe_empty(c, x, axes, keepdims, count)
    fn = {"ReduceMean": relax.op.mean, "ReduceSum": relax.op.sum, "ReduceMax": relax.op.max, "ReduceMin": relax.op.min}[node.op_type]
    return c.emit(fn(x, axes, keepdims=keepdims))


def _mean_of_maybe_empty(c: _Converter, x: Any, axes: list[int], keepdims: bool, count: Any) -> Any:
    """Float mean over `axes`, whose element count `count` may be 0: the sum divided by
    max(count, 1), so an empty reduction gives 0 as ONNX Runtime does (ONNX leaves it
    undefined; TVM's mean would divide by zero)."""
    from tvm import relax, tirx

    dtype = str(x.ty.dtype)
    total = c.emit(relax.op.sum(x, axes, keepdims=keepdims))
    if isinstance(count, int):
        return total
    divisor = c.tensor(_Sym(np.array(tirx.max(count, 1), dtype=object), "int64"))  # not simplified: dims are bound to >= 1
    return c.emit(relax.op.divide(total, relax.op.astype(divisor, dtype)))


def _extremum(x: Any, axes: list[int], keepdims: bool, largest: bool) -> Any:
    """Max (or min) of float `x` over `axes`, starting from -inf (+inf): ONNX's result for a
    row of -inf values and for an empty reduction."""
    from tvm import te, tirx

    pick = tirx.max if largest else tirx.min
    reducer = te.comm_reducer(lambda a, b: pick(a, b), lambda dtype: tirx.const(float("-inf") if largest else float("inf"), dtype),
                              name="max" if largest else "min")
    reduced = {a: te.reduce_axis((0, x.shape[a]), name=f"r{a}") for a in axes}
    kept = [a for a in range(len(x.shape)) if keepdims or a not in reduced]
    shape = [1 if a in reduced else x.shape[a] for a in kept]

    def element(*index: Any) -> Any:
        position = dict(zip(kept, index))
        return reducer(x[tuple(reduced[a] if a in reduced else position[a] for a in range(len(x.shape)))], axis=list(reduced.values()))

    return te.compute(shape, element, name="extremum")


@_rule_for("LayerNormalization")
def _layer_norm(c: _Converter, node: Node, x: Any, scale: Any, bias: Any = None) -> Any:
    shift = c.tensor(bias) if bias is not None else None
    if len(node.outputs) > 1 and any(out.uses() or out.is_graph_output for out in node.outputs[1:]):
        return _layer_norm_with_statistics(c, node, c.tensor(x), c.tensor(scale), shift)
    return _normalize(c, node, c.tensor(x), c.tensor(scale), shift, simplified=False)


def _layer_norm_with_statistics(c: _Converter, node: Node, x: Any, scale: Any, shift: Any) -> list[Any]:
    """LayerNormalization with its Mean and InvStdDev outputs (kept dims, float32), written
    out as ONNX defines it: statistics in float32 (`stash_type` 1), the normalized value
    cast back to x's type, then scaled and shifted."""
    from tvm import relax

    if int(node.attrs.get("stash_type", 1)) != 1:
        raise RelaxConversionError(f"LayerNormalization with stash_type {node.attrs['stash_type']} is not supported (only 1, float32)")
    dtype = str(x.ty.dtype)
    dims = c.shape(x)
    axes = list(range(_axis(len(dims), int(node.attrs.get("axis", -1))), len(dims)))
    wide = x if dtype == "float32" else c.emit(relax.op.astype(x, "float32"))
    mean = c.emit(relax.op.mean(wide, axes, keepdims=True))
    centered = c.emit(relax.op.subtract(wide, mean))
    variance = c.emit(relax.op.mean(relax.op.multiply(centered, centered), axes, keepdims=True))
    inv_std = c.emit(relax.op.rsqrt(relax.op.add(variance, relax.const(float(node.attrs.get("epsilon", 1e-5)), "float32"))))
    y = c.emit(relax.op.multiply(centered, inv_std))
    y = c.emit(relax.op.multiply(y if dtype == "float32" else relax.op.astype(y, dtype), scale))
    if shift is not None:
        y = c.emit(relax.op.add(y, shift))
    return [y, mean, inv_std]


@_rule_for("Conv")
def _conv(c: _Converter, node: Node, x: Any, w: Any, bias: Any = None) -> Any:
    from tvm import relax

    x, w = c.tensor(x), c.tensor(w)
    spatial = c.rank(x) - 2
    if spatial not in (1, 2) or str(node.attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        raise RelaxConversionError(f"Conv with {spatial} spatial dims / auto_pad is not supported")
    pads = [int(p) for p in node.attrs.get("pads", [0] * 2 * spatial)]  # type: ignore[union-attr]
    kwargs = dict(strides=[int(s) for s in node.attrs.get("strides", [1] * spatial)], padding=pads,  # type: ignore[union-attr]
                  dilation=[int(d) for d in node.attrs.get("dilations", [1] * spatial)], groups=int(node.attrs.get("group", 1)))  # type: ignore[union-attr]
    out = c.emit((relax.op.nn.conv1d if spatial == 1 else relax.op.nn.conv2d)(x, w, **kwargs))
    if bias is not None:
        out = c.emit(relax.op.add(out, c.emit(relax.op.reshape(c.tensor(bias), [-1] + [1] * spatial))))
    return out


@_rule_for("Gelu", domain=GRAPHOPT_DOMAIN)
def _gelu(c: _Converter, node: Node, x: Any, bias: Any = None) -> Any:
    """Written with `erf` / `tanh` (not `nn.gelu`) so the build's fast-math pass reaches them."""
    from tvm import relax

    x = c.tensor(x)
    dtype = str(x.ty.dtype)
    if bias is not None:
        x = c.emit(relax.op.add(x, c.tensor(bias)))

    def const(v: float) -> Any:
        return relax.const(v, dtype)

    if node.attrs.get("approximate", "none") == "tanh":
        cubic = relax.op.multiply(relax.op.multiply(relax.op.multiply(x, x), x), const(0.044715))
        gate = relax.op.tanh(relax.op.multiply(relax.op.add(x, cubic), const(math.sqrt(2.0 / math.pi))))
    else:
        gate = relax.op.erf(relax.op.multiply(x, const(1.0 / math.sqrt(2.0))))
    return c.emit(relax.op.multiply(relax.op.multiply(x, const(0.5)), relax.op.add(gate, const(1.0))))


@_rule_for("RMSNorm", domain=GRAPHOPT_DOMAIN)
def _rms_norm(c: _Converter, node: Node, x: Any, scale: Any) -> Any:
    x = c.tensor(x)
    return _normalize(c, node, x, c.tensor(scale), None, simplified=True)


def _normalize(c: _Converter, node: Node, x: Any, scale: Any, shift: Any, *, simplified: bool) -> Any:
    """LayerNorm / RMSNorm over the node's `axis`..-1; a scale or shift that is not exactly
    the normalized shape (a scalar, leading ones) is applied by broadcasting after."""
    from tvm import relax

    dims = c.shape(x)
    axes = list(range(int(node.attrs.get("axis", -1)) % len(dims), len(dims)))
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    normalized = [dims[a] for a in axes]
    exact = [v for v in (scale, shift) if v is not None and _same_dims(c, c.shape(v), normalized)]
    if len(exact) < len([v for v in (scale, shift) if v is not None]):
        dtype = str(x.ty.dtype)
        ones = c.emit(relax.op.ones(normalized, dtype))
        y = c.emit(relax.op.nn.rms_norm(x, ones, axes, epsilon) if simplified else
                   relax.op.nn.layer_norm(x, ones, c.emit(relax.op.zeros(normalized, dtype)), axes, epsilon))
        y = c.emit(relax.op.multiply(y, scale))
        return y if shift is None else c.emit(relax.op.add(y, shift))
    if simplified:
        return c.emit(relax.op.nn.rms_norm(x, scale, axes, epsilon))
    shift = shift if shift is not None else c.emit(relax.op.zeros_like(scale))
    return c.emit(relax.op.nn.layer_norm(x, scale, shift, axes, epsilon))


def repeat_kv_heads(c: _Converter, k: Any, v: Any, heads: Any, kv_heads: Any) -> tuple[Any, Any]:
    """K and V [B, kv_heads, S, D] repeated to `heads` heads (grouped-query attention)."""
    from tvm import relax

    if kv_heads == heads:
        return k, v
    return c.emit(relax.op.repeat(k, heads // kv_heads, axis=1)), c.emit(relax.op.repeat(v, heads // kv_heads, axis=1))


def attention_scale(c: _Converter, q: Any, scale: Any) -> float:
    """`scale`, or 1/sqrt(head size) of Q [B, H, S, D] when it is None (a static size needed)."""
    if scale is not None:
        return float(scale)
    head_size = c.shape(q)[3]
    if not isinstance(head_size, int):
        raise RelaxConversionError("Attention without a scale needs a static head size")
    return 1.0 / math.sqrt(head_size)


@_rule_for("Attention", domain=GRAPHOPT_DOMAIN)
def _attention(c: _Converter, node: Node, q: Any, k: Any, v: Any, bias: Any = None) -> Any:
    from tvm import relax

    q, k, v = c.tensor(q), c.tensor(k), c.tensor(v)
    dtype = str(q.ty.dtype)
    heads = int(node.attrs["num_heads"])
    k, v = repeat_kv_heads(c, k, v, heads, int(node.attrs.get("num_kv_heads", heads)))
    scale = attention_scale(c, q, node.attrs.get("scale"))
    keys = c.shape(k)[2]
    b = None if bias is None else c.tensor(bias)
    width = _padded_width(c, keys, b)
    if width is None:
        key_t = c.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))
    else:
        key_t = c.emit(c.bb.call_te(_transpose_padded, k, width, primfunc_name_hint="transpose_padded"))
        if b is not None and not (isinstance(c.shape(b)[-1], int) and c.shape(b)[-1] == 1):
            b = c.emit(c.bb.call_te(_pad_last, b, width, primfunc_name_hint="pad_keys"))
    scores = c.emit(relax.op.matmul(q, key_t))
    scores = c.emit(relax.op.multiply(scores, relax.const(float(scale), dtype)))
    lowest = relax.const(_LOWEST, dtype)
    if b is not None:
        if str(b.ty.dtype) == "bool":
            scores = c.emit(relax.op.where(b, scores, lowest))
        else:
            scores = c.emit(relax.op.add(scores, b))
    if node.attrs.get("causal"):
        q_len = c.shape(q)[2]
        first = c.simplify(keys - q_len)
        limits = c.emit(relax.op.expand_dims(relax.op.arange(first, c.simplify(first + q_len), 1, "int64"), 1))
        cols = c.emit(relax.op.arange(0, keys if width is None else width, 1, "int64"))
        scores = c.emit(relax.op.where(relax.op.less_equal(cols, limits), scores, lowest))
    if width is None:
        return c.emit(relax.op.matmul(_nan_to_zero(c, node, c.emit(relax.op.nn.softmax(scores, -1))), v))
    scores = c.emit(c.bb.call_te(_mask_padding, scores, k, primfunc_name_hint="mask_padded_keys"))
    probs = _nan_to_zero(c, node, c.emit(relax.op.nn.softmax(scores, -1)))
    probs = c.cast_shape(c.emit(relax.op.strided_slice(probs, [3], [0], [keys], assume_inbound=True)), [*c.shape(q)[:3], keys])
    return c.emit(relax.op.matmul(probs, v))


def _nan_to_zero(c: _Converter, node: Node, probs: Any) -> Any:
    """The op's `nan_to_zero`: NaN probabilities (fully masked rows) count as 0."""
    from tvm import relax

    if not node.attrs.get("nan_to_zero"):
        return probs
    zero = relax.const(0.0, str(probs.ty.dtype))
    return c.emit(relax.op.where(relax.op.isnan(probs), zero, probs))


def _padded_width(c: _Converter, keys: Any, bias: Any) -> Any:
    """The key count rounded up to whole PACK panels when it is only known at run time (the
    CPU schedules vectorize the score matmul and the softmax only over a provable multiple
    of the panel width; padded keys are masked with -inf), else None."""
    from tvm import tirx

    if isinstance(keys, int):
        return None
    if bias is not None:
        last = c.shape(bias)[-1]
        if not (isinstance(last, int) and last == 1) and not _same_dims(c, [last], [keys]):
            return None
    return c.simplify(tirx.floordiv(keys + PACK - 1, PACK) * PACK)


def _transpose_padded(k: Any, width: Any) -> Any:
    """[B, H, S, D] -> [B, H, D, width], zeros past S."""
    from tvm import te, tirx

    keys = k.shape[2]
    return te.compute((*k.shape[:2], k.shape[3], width),
                      lambda b, h, d, j: tirx.if_then_else(j < keys, k[b, h, j, d], tirx.const(0, k.dtype)), name="transpose_padded")


def _pad_last(x: Any, width: Any) -> Any:
    """`x` with its last axis extended to `width` (zeros / False; masked later)."""
    from tvm import te, tirx

    size = x.shape[-1]
    return te.compute((*x.shape[:-1], width),
                      lambda *i: tirx.if_then_else(i[-1] < size, x[(*i[:-1], i[-1])], tirx.const(0, x.dtype)), name="pad_keys")


def _mask_padding(scores: Any, k: Any) -> Any:
    """-inf in the padded key columns (past K's length), so they get no probability."""
    from tvm import te, tirx

    keys = k.shape[2]
    return te.compute(scores.shape, lambda *i: tirx.if_then_else(i[-1] < keys, scores[i], tirx.const(float("-inf"), scores.dtype)),
                      name="mask_padded_keys")


@_rule_for("SkipLayerNorm", domain=GRAPHOPT_DOMAIN)
def _skip_layer_norm(c: _Converter, node: Node, x: Any, skip: Any, scale: Any, beta: Any = None, bias: Any = None) -> Any:
    from tvm import relax

    total = c.tensor(x)
    if bias is not None:
        total = c.emit(relax.op.add(total, c.tensor(bias)))
    total = c.emit(relax.op.add(total, c.tensor(skip)))
    shift = c.tensor(beta) if beta is not None else None
    y = _normalize(c, node, total, c.tensor(scale), shift, simplified=bool(node.attrs.get("simplified", 0)))
    return [y, total]
