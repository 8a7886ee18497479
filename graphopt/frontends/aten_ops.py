"""Rules translating ATen ops into IR ops, for `graphopt.frontends.aten_import`.

`RULES` maps an op overload's name ("aten.linear.default") to its rule. A rule takes the
importer, the fx node (for torch's metadata: result dtype and shape) and the node's
arguments, with tensors as IR values (or `State`), sizes as ints or `SymDim`, and Python
numbers as they are; keyword defaults are the ATen schema's. It returns the result value
(a tuple for ops with several results, None for ops without one), or raises
`UntranslatableError` for a use it does not cover.

The ONNX forms are those torch's exporter (onnxscript's torchlib) gives, so fusions match
the same subgraphs on either path: linear -> MatMul by the transposed weight (+ Add),
gelu -> the erf (or tanh) formula, rsqrt -> Reciprocal(Sqrt), silu -> x * Sigmoid(x),
layer_norm -> LayerNormalization. `scaled_dot_product_attention` becomes graphopt::Attention
with torch's semantics (rows whose every key is masked give 0).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from graphopt.frontends.aten_import import (
    INT64_MAX, Importer, Rule, State, SymDim, UntranslatableError, dtype_of, fake_value, static_shape,
)
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Value
from graphopt.ir.schema import GRAPHOPT_DOMAIN

RULES: dict[str, Rule] = {}

VIEW_OPS = frozenset({
    "aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.transpose.int",
    "aten.permute.default", "aten.t.default", "aten.slice.Tensor", "aten.select.int", "aten.unsqueeze.default",
    "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default", "aten.expand.default", "aten.alias.default",
    "aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int", "aten.flatten.using_ints",
    "aten.detach.default", "aten.as_strided.default", "aten.diagonal.default", "aten.narrow.default",
})
"""Ops whose result may share memory with their first argument (an in-place op on such a
result, or on a tensor such a result was taken from, changes both)."""


_VIEW_NAMES = frozenset({name.split(".")[1] for name in VIEW_OPS} | {"getitem", "contiguous"})


def _op_name(target: Any) -> str:
    """view for aten.view.default, getitem for operator.getitem."""
    text = str(target)
    return text.split(".")[1] if text.startswith("aten.") else getattr(target, "__name__", text)


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of the named op overloads."""

    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def _promoted(a: Any, b: Any) -> DType:
    """The dtype torch computes `a` op `b` in (type promotion: a tensor of rank >= 1 outranks
    a 0-d one, which outranks a Python number of the same kind)."""
    import torch

    def probe(x: Any) -> Any:
        if isinstance(x, (bool, int, float)):
            return x
        if isinstance(x, SymDim):
            return 1
        dtype = x.tensor.dtype if isinstance(x, State) else x.dtype.to_torch()
        rank = x.tensor.dim() if isinstance(x, State) else x.type.rank
        return torch.empty((), dtype=dtype) if rank == 0 else torch.empty((1,), dtype=dtype)

    return DType.from_torch(torch.result_type(probe(a), probe(b)))


def _axis(dim: int, rank: Optional[int]) -> int:
    if rank is None:
        raise UntranslatableError("the rank is unknown")
    return dim % rank if rank else 0


# ----------------------------------------------------------------------------- elementwise
def _binary(onnx_op: str) -> Rule:
    def translate(cx: Importer, node: Any, a: Any, b: Any, alpha: Any = 1) -> Value:
        dtype = dtype_of(node)
        right = cx.operand(b, dtype)
        if alpha != 1:
            right = cx.op("Mul", [right, cx.scalar(alpha, dtype)])
        return cx.op(onnx_op, [cx.operand(a, dtype), right])

    return translate


def _in_place(translate: Rule) -> Rule:
    """An in-place op as its functional form, when nothing else sees the mutated tensor."""

    def in_place(cx: Importer, node: Any, *args: Any, **kwargs: Any) -> Value:
        target = node.args[0]
        producer = getattr(target, "op", None)
        if producer != "call_function" or _op_name(target.target) in _VIEW_NAMES or len(target.users) != 1:
            raise UntranslatableError(f"{node.target} mutates a tensor that other ops read")
        return translate(cx, node, *args, **kwargs)

    return in_place


def _in_place_name(name: str) -> str:
    """aten.add.Tensor -> aten.add_.Tensor."""
    namespace, op, overload = name.split(".")
    return f"{namespace}.{op}_.{overload}"


for _names, _onnx in (
    (("aten.add.Tensor", "aten.add.Scalar"), "Add"),
    (("aten.sub.Tensor", "aten.sub.Scalar"), "Sub"),
    (("aten.mul.Tensor", "aten.mul.Scalar"), "Mul"),
    (("aten.div.Tensor", "aten.div.Scalar"), "Div"),
    (("aten.maximum.default", "aten.max.other"), "Max"),
    (("aten.minimum.default", "aten.min.other"), "Min"),
    (("aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor", "aten.pow.Scalar"), "Pow"),
):
    rule(*_names)(_binary(_onnx))
    rule(*(_in_place_name(n) for n in _names if "pow.Scalar" not in n))(_in_place(_binary(_onnx)))


@rule("aten.rsub.Tensor", "aten.rsub.Scalar")
def _rsub(cx: Importer, node: Any, a: Any, b: Any, alpha: Any = 1) -> Value:
    return _binary("Sub")(cx, node, b, a) if alpha == 1 else _binary("Sub")(cx, node, b, _binary("Mul")(cx, node, a, alpha))


@rule("aten.div.Tensor_mode", "aten.div.Scalar_mode")
def _div_mode(cx: Importer, node: Any, a: Any, b: Any, *, rounding_mode: Optional[str] = None) -> Value:
    dtype = dtype_of(node)
    if rounding_mode is None:
        return _binary("Div")(cx, node, a, b)
    if rounding_mode != "floor" or not dtype.is_float:
        raise UntranslatableError(f"division with rounding_mode={rounding_mode} of {dtype.name}")
    return cx.op("Floor", [cx.op("Div", [cx.operand(a, dtype), cx.operand(b, dtype)])])


def _comparison(onnx_op: str, negate: bool = False) -> Rule:
    def translate(cx: Importer, node: Any, a: Any, b: Any) -> Value:
        dtype = _promoted(a, b)
        out = cx.op(onnx_op, [cx.operand(a, dtype), cx.operand(b, dtype)])
        return cx.op("Not", [out]) if negate else out

    return translate


for _op, _onnx, _negate in (
    ("eq", "Equal", False), ("ne", "Equal", True), ("lt", "Less", False), ("le", "LessOrEqual", False),
    ("gt", "Greater", False), ("ge", "GreaterOrEqual", False),
):
    rule(f"aten.{_op}.Tensor", f"aten.{_op}.Scalar")(_comparison(_onnx, _negate))


def _logical(bool_op: str, int_op: str) -> Rule:
    def translate(cx: Importer, node: Any, a: Any, b: Any) -> Value:
        dtype = dtype_of(node)
        onnx_op = bool_op if dtype == DType.BOOL else int_op
        if dtype.is_float:
            raise UntranslatableError(f"{node.target} of {dtype.name}")
        return cx.op(onnx_op, [cx.operand(a, dtype), cx.operand(b, dtype)])

    return translate


rule("aten.__and__.Tensor", "aten.bitwise_and.Tensor", "aten.logical_and.default")(_logical("And", "BitwiseAnd"))
rule("aten.__or__.Tensor", "aten.bitwise_or.Tensor", "aten.logical_or.default")(_logical("Or", "BitwiseOr"))
rule("aten.__xor__.Tensor", "aten.bitwise_xor.Tensor", "aten.logical_xor.default")(_logical("Xor", "BitwiseXor"))


@rule("aten.bitwise_not.default", "aten.logical_not.default")
def _not(cx: Importer, node: Any, x: Any) -> Value:
    dtype = dtype_of(node)
    if dtype == DType.BOOL:
        return cx.op("Not", [cx.operand(x, DType.BOOL)])
    if dtype.is_float:
        raise UntranslatableError(f"{node.target} of {dtype.name}")
    return cx.op("BitwiseNot", [cx.operand(x, dtype)])


def _unary(*onnx_ops: str) -> Rule:
    def translate(cx: Importer, node: Any, x: Any) -> Value:
        value = cx.operand(x, dtype_of(node))
        for onnx_op in onnx_ops:
            value = cx.op(onnx_op, [value])
        return value

    return translate


for _op, _chain in (
    ("neg", ("Neg",)), ("abs", ("Abs",)), ("sqrt", ("Sqrt",)), ("rsqrt", ("Sqrt", "Reciprocal")),
    ("exp", ("Exp",)), ("log", ("Log",)), ("sin", ("Sin",)), ("cos", ("Cos",)), ("tanh", ("Tanh",)),
    ("sigmoid", ("Sigmoid",)), ("relu", ("Relu",)), ("erf", ("Erf",)), ("sign", ("Sign",)),
    ("ceil", ("Ceil",)), ("floor", ("Floor",)), ("reciprocal", ("Reciprocal",)), ("round", ("Round",)),
):
    rule(f"aten.{_op}.default")(_unary(*_chain))


@rule("aten.silu.default")
def _silu(cx: Importer, node: Any, x: Any) -> Value:
    value = cx.tensor(x)
    return cx.op("Mul", [value, cx.op("Sigmoid", [value])])


@rule("aten.gelu.default")
def _gelu(cx: Importer, node: Any, x: Any, *, approximate: str = "none") -> Value:
    value = cx.tensor(x)
    dtype = value.dtype
    if approximate == "tanh":
        cubic = cx.op("Mul", [cx.scalar(0.044715, dtype), cx.op("Pow", [value, cx.scalar(3.0, dtype)])])
        inner = cx.op("Mul", [cx.scalar(math.sqrt(2.0 / math.pi), dtype), cx.op("Add", [value, cubic])])
        inner = cx.op("Tanh", [inner])
    elif approximate == "none":
        inner = cx.op("Erf", [cx.op("Div", [value, cx.scalar(math.sqrt(2.0), dtype)])])
    else:
        raise UntranslatableError(f"gelu approximate={approximate!r}")
    inner = cx.op("Mul", [value, cx.op("Add", [inner, cx.scalar(1.0, dtype)])])
    return cx.op("Mul", [cx.scalar(0.5, dtype), inner])


@rule("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar")
def _where(cx: Importer, node: Any, condition: Any, a: Any, b: Any) -> Value:
    dtype = dtype_of(node)
    return cx.op("Where", [cx.operand(condition, DType.BOOL), cx.operand(a, dtype), cx.operand(b, dtype)])


@rule("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(cx: Importer, node: Any, x: Any, mask: Any, value: Any) -> Value:
    dtype = dtype_of(node)
    return cx.op("Where", [cx.operand(mask, DType.BOOL), cx.operand(value, dtype), cx.operand(x, dtype)])


@rule("aten.clamp.default", "aten.clamp.Tensor", "aten.clamp_min.default", "aten.clamp_max.default")
def _clamp(cx: Importer, node: Any, x: Any, min: Any = None, max: Any = None) -> Value:
    if str(node.target) == "aten.clamp_max.default":
        min, max = None, min
    dtype = dtype_of(node)
    bounds = [None if bound is None else cx.operand(bound, dtype) for bound in (min, max)]
    if any(b is not None and b.type.rank != 0 for b in bounds):
        return _clamp_tensors(cx, cx.operand(x, dtype), *bounds)
    return cx.op("Clip", [cx.operand(x, dtype), *bounds])


def _clamp_tensors(cx: Importer, x: Value, low: Optional[Value], high: Optional[Value]) -> Value:
    if low is not None:
        x = cx.op("Max", [x, low])
    return x if high is None else cx.op("Min", [x, high])


# ----------------------------------------------------------------------------- identities and casts
@rule(
    "aten.contiguous.default", "aten.clone.default", "aten.alias.default", "aten.detach.default",
    "aten.detach_.default", "aten.lift_fresh_copy.default", "aten.lift_fresh.default",
)
def _same(cx: Importer, node: Any, x: Any, **_: Any) -> Any:
    return x


@rule("aten.dropout.default", "aten.feature_dropout.default")
def _dropout(cx: Importer, node: Any, x: Any, p: float, train: bool) -> Any:
    if train and p > 0:
        return training_dropout(cx, cx.tensor(x), p)
    return x


def training_dropout(cx: Importer, x: Value, p: float) -> Value:
    """ONNX Dropout in training mode (no seed: its torch kernel draws from torch's global
    generator as `F.dropout` does, so a graph run after `torch.manual_seed` drops what eager drops)."""
    if x.dtype is None:
        raise UntranslatableError("dropout of a value of unknown element type")
    return cx.op("Dropout", [x, cx.scalar(float(p), x.dtype), cx.scalar(True, DType.BOOL)])


@rule(
    "aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default",
    "aten.sym_constrain_range.default", "aten._assert_async.msg",
)
def _check_only(cx: Importer, node: Any, *args: Any, **kwargs: Any) -> None:
    return None


@rule(
    "aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten._to_copy.default", "aten.type_as.default",
    "aten.to.other",
)
def _convert(cx: Importer, node: Any, x: Any, *args: Any, **kwargs: Any) -> Value:
    return cx.cast(cx.tensor(x), dtype_of(node))


# ----------------------------------------------------------------------------- linear algebra
@rule("aten.linear.default")
def _linear(cx: Importer, node: Any, x: Any, weight: Any, bias: Any = None) -> Value:
    out = cx.op("MatMul", [cx.tensor(x), cx.transposed(weight)])
    return out if bias is None else cx.op("Add", [out, cx.tensor(bias)])


@rule("aten.matmul.default", "aten.mm.default", "aten.bmm.default")
def _matmul(cx: Importer, node: Any, a: Any, b: Any) -> Value:
    return cx.op("MatMul", [cx.tensor(a), cx.tensor(b)])


@rule("aten.addmm.default", "aten.baddbmm.default")
def _addmm(cx: Importer, node: Any, bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1) -> Value:
    dtype = dtype_of(node)
    product = cx.op("MatMul", [cx.tensor(a), cx.tensor(b)])
    if alpha != 1:
        product = cx.op("Mul", [product, cx.scalar(alpha, dtype)])
    if beta == 0:
        return product
    added = cx.operand(bias, dtype)
    if beta != 1:
        added = cx.op("Mul", [added, cx.scalar(beta, dtype)])
    return cx.op("Add", [product, added])


@rule("aten.scaled_dot_product_attention.default")
def _sdpa(
    cx: Importer, node: Any, query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
    is_causal: bool = False, *, scale: Optional[float] = None, enable_gqa: bool = False,
) -> Value:
    q, k, v = (cx.tensor(t) for t in (query, key, value))
    q_shape, k_shape = fake_value(node.args[0]).shape, fake_value(node.args[1]).shape
    if dropout_p:
        return _attention_with_dropout(cx, node, q, k, v, attn_mask, float(dropout_p), is_causal, scale, enable_gqa)
    if len(q_shape) != 4 or len(k_shape) != 4:
        raise UntranslatableError("attention without [batch, heads, seq, dim] inputs")
    heads, kv_heads = static_shape(node.args[0])[1], static_shape(node.args[1])[1]
    if heads is None or kv_heads is None or heads % kv_heads:
        raise UntranslatableError("attention with symbolic or ungrouped head counts")
    attrs: dict[str, Any] = {"num_heads": heads, "num_kv_heads": kv_heads}
    attrs["scale"] = float(scale) if scale is not None else 1.0 / math.sqrt(_static(static_shape(node.args[0])[3]))
    if is_causal:
        if attn_mask is not None or str(q_shape[2]) != str(k_shape[2]):
            raise UntranslatableError("causal attention with a mask or with query and key lengths that may differ")
        attrs["causal"] = 1
    inputs = [q, k, v]
    if attn_mask is not None:
        mask = cx.tensor(attn_mask)
        inputs.append(mask if mask.dtype == DType.BOOL else cx.cast(mask, q.dtype))  # type: ignore[arg-type]
        attrs["nan_to_zero"] = 1
    return cx.op("Attention", inputs, domain=GRAPHOPT_DOMAIN, **attrs)


def _attention_with_dropout(
    cx: Importer, node: Any, q: Value, k: Value, v: Value, attn_mask: Any, dropout_p: float, is_causal: bool,
    scale: Optional[float], enable_gqa: bool,
) -> Value:
    """Training-mode attention with dropout on the probabilities, as torch's math kernel
    computes it on CPU (both operands scaled by sqrt(scale), a boolean mask made additive,
    softmax with fully masked rows at 0, then `dropout`): the same random draws as eager, in
    the same order. graphopt::Attention has no dropout, so the steps stay separate ops. The
    additive mask and the rows it masks fully are computed from the mask alone (shared by
    every layer reading it once cleanup merges them), not per layer from the scores; those
    rows add 0 instead of -inf before the softmax (their gradient stays finite) and their
    output rows are set to 0, as eager's."""
    if is_causal or enable_gqa:
        raise UntranslatableError("attention with dropout and a causal mask or grouped heads")
    dtype = q.dtype
    if dtype is None or q.type.rank is None:
        raise UntranslatableError("attention with dropout on values of unknown type or rank")
    head_dim = _static(static_shape(node.args[0])[-1])
    root = cx.scalar(math.sqrt(float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)), dtype)
    rank = q.type.rank
    perm = (*range(rank - 2), rank - 1, rank - 2)
    scores = cx.op("MatMul", [cx.op("Mul", [q, root]), cx.op("Mul", [cx.op("Transpose", [k], perm=perm), root])])
    if attn_mask is None:
        return cx.op("MatMul", [training_dropout(cx, cx.op("Softmax", [scores], axis=-1), dropout_p), v])
    mask = cx.tensor(attn_mask)
    lowest = cx.scalar(float("-inf"), dtype)
    if mask.dtype == DType.BOOL:
        mask = cx.op("Where", [mask, cx.scalar(0.0, dtype), lowest])
    else:
        mask = cx.cast(mask, dtype)
    zero = cx.scalar(0.0, dtype)
    kept = cx.op("Not", [cx.op("Equal", [cx.op("ReduceMax", [mask, cx.ints([-1])], keepdims=1), lowest])])
    finite = cx.op("Where", [kept, mask, zero])  # a fully masked row's softmax stays finite, and so its gradient
    probs = cx.op("Softmax", [cx.op("Add", [scores, finite])], axis=-1)
    # zero the fully masked rows of the output ([.., seq, head_dim]) rather than of the
    # probabilities ([.., seq, seq]): the same result and gradients, half the elements
    return cx.op("Where", [kept, cx.op("MatMul", [training_dropout(cx, probs, dropout_p), v]), zero])


def _static(dim: Optional[int]) -> int:
    if dim is None:
        raise UntranslatableError("a dim this op needs is symbolic")
    return dim


def _conv(cx: Importer, node: Any, x: Any, weight: Any, bias: Any, stride: Any, padding: Any, dilation: Any, groups: int) -> Value:
    spatial = len(static_shape(node.args[1])) - 2
    if len(static_shape(node.args[0])) != spatial + 2 or isinstance(padding, str):
        raise UntranslatableError("convolution without a batch dim or with string padding")

    def expand(values: Any) -> tuple[int, ...]:
        values = [values] if isinstance(values, int) else list(values)
        return tuple(values * spatial if len(values) == 1 else values)

    pads = expand(padding)
    inputs = [cx.tensor(x), cx.tensor(weight)] + ([] if bias is None else [cx.tensor(bias)])
    kernel = tuple(_static(d) for d in static_shape(node.args[1])[2:])
    return cx.op(
        "Conv", inputs, strides=expand(stride), pads=pads + pads, dilations=expand(dilation), group=int(groups),
        kernel_shape=kernel,
    )


@rule("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default")
def _convnd(
    cx: Importer, node: Any, x: Any, weight: Any, bias: Any = None, stride: Any = (1,), padding: Any = (0,),
    dilation: Any = (1,), groups: int = 1,
) -> Value:
    return _conv(cx, node, x, weight, bias, stride, padding, dilation, groups)


@rule("aten.convolution.default")
def _convolution(
    cx: Importer, node: Any, x: Any, weight: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
    transposed: bool, output_padding: Any, groups: int,
) -> Value:
    if transposed:
        raise UntranslatableError("transposed convolution")
    return _conv(cx, node, x, weight, bias, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------- normalization, softmax, reductions
@rule("aten.layer_norm.default")
def _layer_norm(
    cx: Importer, node: Any, x: Any, normalized_shape: Sequence[int], weight: Any = None, bias: Any = None,
    eps: float = 1e-5, cudnn_enable: bool = True,
) -> Value:
    value = cx.tensor(x)
    if weight is None:
        shape = [_static(d) if isinstance(d, int) else _static(None) for d in normalized_shape]
        scale = cx.graph.add_constant(cx.graph.unique_name("layer_norm_scale"), np.ones(shape, value.dtype.to_numpy()))  # type: ignore[union-attr]
    else:
        scale = cx.tensor(weight)
    inputs = [value, scale] + ([] if bias is None else [cx.tensor(bias)])
    return cx.op("LayerNormalization", inputs, axis=-len(normalized_shape), epsilon=float(eps), stash_type=1)


@rule("aten.native_layer_norm.default")
def _native_layer_norm(cx: Importer, node: Any, x: Any, normalized_shape: Sequence[int], weight: Any, bias: Any, eps: float) -> tuple:
    return (_layer_norm(cx, node, x, normalized_shape, weight, bias, eps), None, None)


def _softmax(onnx_op: str) -> Rule:
    def translate(cx: Importer, node: Any, x: Any, dim: int, dtype_or_half: Any = None) -> Value:
        return cx.op(onnx_op, [cx.operand(x, dtype_of(node))], axis=int(dim))

    return translate


rule("aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default")(_softmax("Softmax"))
rule("aten.log_softmax.int", "aten._log_softmax.default")(_softmax("LogSoftmax"))


def _reduction(onnx_op: str, cast_first: bool) -> Rule:
    def translate(cx: Importer, node: Any, x: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Value:
        value = cx.operand(x, dtype_of(node)) if cast_first else cx.tensor(x)
        axes = [dim] if isinstance(dim, int) else list(dim or [])
        inputs = [value] + ([cx.ints(axes)] if axes else [])
        return cx.op(onnx_op, inputs, keepdims=int(bool(keepdim)))

    return translate


rule("aten.mean.dim", "aten.mean.default")(_reduction("ReduceMean", True))
rule("aten.sum.dim_IntList", "aten.sum.default")(_reduction("ReduceSum", True))
rule("aten.amax.default")(_reduction("ReduceMax", False))
rule("aten.amin.default")(_reduction("ReduceMin", False))


@rule("aten.cumsum.default")
def _cumsum(cx: Importer, node: Any, x: Any, dim: int, *, dtype: Any = None) -> Value:
    return cx.op("CumSum", [cx.operand(x, dtype_of(node)), cx.graph.add_constant(cx.graph.unique_name("axis"), np.array(dim, np.int64))])


# ----------------------------------------------------------------------------- shapes and layout
@rule("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")
def _reshape(cx: Importer, node: Any, x: Any, size: Sequence[Any]) -> Value:
    return cx.op("Reshape", [cx.tensor(x), cx.ints(list(size))], allowzero=1)


@rule("aten.flatten.using_ints", "aten.unflatten.int")
def _reshape_to_result(cx: Importer, node: Any, x: Any, *args: Any) -> Value:
    return cx.op("Reshape", [cx.tensor(x), cx.shape(node)], allowzero=1)


@rule("aten.transpose.int")
def _transpose(cx: Importer, node: Any, x: Any, dim0: int, dim1: int) -> Value:
    value = cx.tensor(x)
    perm = list(range(value.type.rank or 0))
    a, b = _axis(dim0, value.type.rank), _axis(dim1, value.type.rank)
    perm[a], perm[b] = perm[b], perm[a]
    return cx.op("Transpose", [value], perm=tuple(perm)) if a != b else value


@rule("aten.permute.default")
def _permute(cx: Importer, node: Any, x: Any, dims: Sequence[int]) -> Value:
    value = cx.tensor(x)
    return cx.op("Transpose", [value], perm=tuple(_axis(d, value.type.rank) for d in dims))


@rule("aten.mT.default", "aten.numpy_T.default")
def _matrix_transpose(cx: Importer, node: Any, x: Any) -> Value:
    value = cx.tensor(x)
    rank = value.type.rank or 0
    perm = list(range(rank))
    if str(node.target) == "aten.mT.default":
        perm[-2:] = perm[:-3:-1]
    else:
        perm.reverse()
    return cx.op("Transpose", [value], perm=tuple(perm)) if rank > 1 else value


@rule("aten.flip.default")
def _flip(cx: Importer, node: Any, x: Any, dims: Sequence[int]) -> Value:
    value = cx.tensor(x)
    axes = [_axis(d, value.type.rank) for d in dims]
    count = len(axes)
    return cx.op("Slice", [value, cx.ints([-1] * count), cx.ints([-INT64_MAX] * count), cx.ints(axes), cx.ints([-1] * count)])


@rule("aten.t.default")
def _t(cx: Importer, node: Any, x: Any) -> Value:
    value = cx.tensor(x)
    return cx.op("Transpose", [value], perm=(1, 0)) if value.type.rank == 2 else value


@rule("aten.unsqueeze.default")
def _unsqueeze(cx: Importer, node: Any, x: Any, dim: int) -> Value:
    return cx.op("Unsqueeze", [cx.tensor(x), cx.ints([dim])])


@rule("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(cx: Importer, node: Any, x: Any, dim: Any = None) -> Value:
    value = cx.tensor(x)
    shape = static_shape(node.args[0])
    dims = range(len(shape)) if dim is None else [dim] if isinstance(dim, int) else dim
    axes = [_axis(d, len(shape)) for d in dims]
    if any(shape[a] is None for a in axes):
        raise UntranslatableError("squeeze of a symbolic dim")
    axes = [a for a in axes if shape[a] == 1]
    return cx.op("Squeeze", [value, cx.ints(axes)]) if axes else value


@rule("aten.expand.default")
def _expand(cx: Importer, node: Any, x: Any, size: Sequence[Any], *, implicit: bool = False) -> Value:
    return cx.op("Expand", [cx.tensor(x), cx.shape(node)])


@rule("aten.repeat.default")
def _repeat(cx: Importer, node: Any, x: Any, repeats: Sequence[Any]) -> Value:
    value = cx.tensor(x)
    extra = len(repeats) - (value.type.rank or 0)
    if extra > 0:
        value = cx.op("Unsqueeze", [value, cx.ints(list(range(extra)))])
    return cx.op("Tile", [value, cx.ints(list(repeats))])


@rule("aten.slice.Tensor")
def _slice(cx: Importer, node: Any, x: Any, dim: int = 0, start: Any = None, end: Any = None, step: Any = 1) -> Value:
    value = cx.tensor(x)
    start = 0 if start is None else start
    end = INT64_MAX if end is None else end
    if start == 0 and step == 1 and isinstance(end, int) and end >= INT64_MAX:
        return value
    return cx.op("Slice", [value, cx.ints([start]), cx.ints([end]), cx.ints([dim]), cx.ints([step])])


@rule("aten.select.int")
def _select(cx: Importer, node: Any, x: Any, dim: int, index: Any) -> Value:
    value = cx.tensor(x)
    position = cx.operand(index, DType.INT64) if isinstance(index, SymDim) else cx.scalar(int(index), DType.INT64)
    return cx.op("Gather", [value, position], axis=_axis(dim, value.type.rank))


@rule("aten.cat.default")
def _cat(cx: Importer, node: Any, tensors: Sequence[Any], dim: int = 0) -> Value:
    dtype = dtype_of(node)
    rank = len(static_shape(node))
    values = [cx.operand(t, dtype) for t in tensors]
    values = [v for v in values if not (v.type.rank == 1 and rank != 1 and v.shape == (0,))]
    return cx.op("Concat", values, axis=_axis(dim, rank)) if len(values) > 1 else values[0]


@rule("aten.stack.default")
def _stack(cx: Importer, node: Any, tensors: Sequence[Any], dim: int = 0) -> Value:
    dtype = dtype_of(node)
    axis = _axis(dim, len(static_shape(node)))
    values = [cx.op("Unsqueeze", [cx.operand(t, dtype), cx.ints([axis])]) for t in tensors]
    return cx.op("Concat", values, axis=axis) if len(values) > 1 else values[0]


@rule("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default")
def _split(cx: Importer, node: Any, x: Any, sizes: Any, dim: int = 0) -> tuple:
    value = cx.tensor(x)
    axis = _axis(dim, value.type.rank)
    parts = fake_value(node)
    lengths = [cx.size(part.shape[axis]) for part in parts]
    if len(parts) == 1:
        return (value,)
    return cx.ops("Split", [value, cx.ints(lengths)], len(parts), axis=axis)


@rule("aten.unbind.int")
def _unbind(cx: Importer, node: Any, x: Any, dim: int = 0) -> tuple:
    value = cx.tensor(x)
    axis = _axis(dim, value.type.rank)
    count = len(fake_value(node))
    parts = cx.ops("Split", [value, cx.ints([1] * count)], count, axis=axis) if count > 1 else (value,)
    return tuple(cx.op("Squeeze", [part, cx.ints([axis])]) for part in parts)


@rule("aten.index.Tensor")
def _index(cx: Importer, node: Any, x: Any, indices: Sequence[Any]) -> Value:
    """x[i0, i1, ...] with integer index tensors on the leading dims (broadcast together)."""
    value = cx.tensor(x)
    if not indices or any(i is None for i in indices):
        raise UntranslatableError("indexing with None (sliced) dims")
    index_nodes = node.args[1]
    if any(dtype_of(n) not in (DType.INT64, DType.INT32) for n in index_nodes):
        raise UntranslatableError("indexing with boolean masks")
    tensors = [cx.operand(i, DType.INT64) for i in indices]
    if len(tensors) == 1:
        return cx.op("Gather", [value, tensors[0]], axis=0)
    result = fake_value(node).shape
    broadcast = [cx.size(d) for d in result[: len(result) - ((value.type.rank or 0) - len(tensors))]]
    arrays = [t.const.numpy() if t.const is not None else None for t in tensors]
    if all(isinstance(d, int) for d in broadcast) and all(a is not None for a in arrays):
        stacked = np.stack(np.broadcast_arrays(*arrays), axis=-1)
        return cx.op("GatherND", [value, cx.graph.add_constant(cx.graph.unique_name("indices"), np.ascontiguousarray(stacked))])
    pieces = [cx.op("Unsqueeze", [cx.op("Expand", [t, cx.ints(broadcast)]), cx.ints([-1])]) for t in tensors]
    return cx.op("GatherND", [value, cx.op("Concat", pieces, axis=-1)])


@rule("aten.index_select.default")
def _index_select(cx: Importer, node: Any, x: Any, dim: int, index: Any) -> Value:
    value = cx.tensor(x)
    return cx.op("Gather", [value, cx.operand(index, DType.INT64)], axis=_axis(dim, value.type.rank))


@rule("aten.gather.default")
def _gather(cx: Importer, node: Any, x: Any, dim: int, index: Any, *, sparse_grad: bool = False) -> Value:
    value = cx.tensor(x)
    return cx.op("GatherElements", [value, cx.operand(index, DType.INT64)], axis=_axis(dim, value.type.rank))


@rule("aten.embedding.default")
def _embedding(cx: Importer, node: Any, weight: Any, indices: Any, *args: Any) -> Value:
    return cx.op("Gather", [cx.tensor(weight), cx.tensor(indices)], axis=0)


@rule("aten.tril.default", "aten.triu.default")
def _trilu(cx: Importer, node: Any, x: Any, diagonal: Any = 0) -> Value:
    upper = int(str(node.target) == "aten.triu.default")
    return cx.op("Trilu", [cx.tensor(x), cx.scalar(int(diagonal), DType.INT64)], upper=upper)


@rule("aten.pad.default")
def _pad_mode(cx: Importer, node: Any, x: Any, pad: Sequence[Any], mode: str = "constant", value: Any = None) -> Value:
    if mode != "constant":
        raise UntranslatableError(f"{mode} padding")
    return _pad(cx, node, x, pad, 0 if value is None else value)


@rule("aten.constant_pad_nd.default")
def _pad(cx: Importer, node: Any, x: Any, pad: Sequence[Any], value: Any = 0) -> Value:
    tensor = cx.tensor(x)
    rank = tensor.type.rank or 0
    begins, ends = [0] * rank, [0] * rank
    for index in range(len(pad) // 2):
        begins[rank - 1 - index], ends[rank - 1 - index] = pad[2 * index], pad[2 * index + 1]
    return cx.op("Pad", [tensor, cx.ints(begins + ends), cx.scalar(value, dtype_of(node))])


# ----------------------------------------------------------------------------- creation
LARGEST_FOLDED_FILL = 1024
"""Filled tensors with more elements than this are built by Expand, not stored."""


def _fill(cx: Importer, node: Any, value: Any) -> Value:
    dtype = dtype_of(node)
    shape = static_shape(node)
    if None not in shape and int(np.prod(shape, dtype=np.int64)) <= LARGEST_FOLDED_FILL:
        data = np.full(shape, value, dtype=dtype.to_numpy())
        return cx.graph.add_constant(cx.graph.unique_name(node.name), data)
    return cx.op("Expand", [cx.scalar(value, dtype), cx.shape(node)])


@rule("aten.zeros.default", "aten.new_zeros.default", "aten.zeros_like.default", "aten.empty.memory_format",
      "aten.new_empty.default", "aten.empty_like.default")
def _zeros(cx: Importer, node: Any, *args: Any, **kwargs: Any) -> Value:
    return _fill(cx, node, 0)


@rule("aten.ones.default", "aten.new_ones.default", "aten.ones_like.default")
def _ones(cx: Importer, node: Any, *args: Any, **kwargs: Any) -> Value:
    return _fill(cx, node, 1)


@rule("aten.full.default", "aten.full_like.default", "aten.new_full.default")
def _full(cx: Importer, node: Any, x: Any, *args: Any, **kwargs: Any) -> Value:
    value = args[-1] if str(node.target) == "aten.new_full.default" else args[0]
    if not isinstance(value, (bool, int, float)):
        raise UntranslatableError("fill value is not a number")
    return _fill(cx, node, value)


@rule("aten.scalar_tensor.default")
def _scalar_tensor(cx: Importer, node: Any, value: Any, **kwargs: Any) -> Value:
    return cx.operand(value, dtype_of(node))


@rule("aten.arange.default", "aten.arange.start", "aten.arange.start_step")
def _arange(cx: Importer, node: Any, *args: Any, **kwargs: Any) -> Value:
    import torch

    numbers = list(args)
    if len(numbers) == 1:
        numbers = [0] + numbers
    start, end, step = (numbers + [1])[:3]
    dtype = dtype_of(node)
    if all(isinstance(n, (int, float)) for n in (start, end, step)):
        data = torch.arange(start, end, step, dtype=dtype.to_torch()).numpy()
        return cx.graph.add_constant(cx.graph.unique_name(node.name), data)
    return cx.op("Range", [cx.operand(start, dtype), cx.operand(end, dtype), cx.operand(step, dtype)])
