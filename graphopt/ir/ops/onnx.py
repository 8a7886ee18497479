"""Schemas of the ONNX default-domain ops that Transformer graphs use.

Every schema follows ONNX semantics for default-domain opsets 13-21 (and 23-24 for the
Transformer ops Attention, RMSNormalization and RotaryEmbedding). Where an operand moved
from an attribute to an input within or just before that range (Squeeze/Unsqueeze axes,
Reduce* axes, Split sizes, Slice starts/ends/axes/steps, Pad pads, Clip bounds) both forms
are read: the input when the node has it, else the attribute.

Inference never guesses: a dim it cannot know is None and a rank it cannot know is a None
shape. It raises ValueError, naming the op, only when the inputs are definitely
inconsistent (static inner dims of a MatMul that differ, a Concat of different ranks, ...).
Element-type agreement between inputs is not checked here: `same_dtype_inputs` states it.

In `same_dtype_inputs`, an index past a node's inputs (an omitted optional input) is
skipped, and the group `ALL_INPUTS` = (-1,) means every input of the node, for the variadic
ops Concat, Sum, Mean, Min, Max and Einsum (graphopt.ir.verify reads it so).

Symbolic values (see `graphopt.ir.schema`) are a tensor's flat row-major contents, so ops
that only move data around (Identity, Reshape, Squeeze, Unsqueeze) pass them through; a 0-d
scalar is a 1-tuple, and the booleans of Equal are carried as 1 and 0.

Symbolic dims are expressions (`graphopt.ir.symbolic`): Concat along an axis sums its inputs'
dims (`past + seq`), the integer Add/Sub/Mul/Div of shape entries compute expressions, so a
`Shape -> Gather -> Add -> Range/Reshape/Expand` chain keeps them, and a Reshape's -1 is the
input's element count divided by the rest when the division is exact. Two dims that are
proven different (ints that differ, `seq` and `seq + 1`) are an inconsistency where ints that
differ would be one (MatMul inner dims, Concat's other axes).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from graphopt.ir.dtypes import DType
from graphopt.ir.schema import (
    ONNX_DOMAIN,
    InferenceContext,
    InferFn,
    OpSchema,
    PropagateFn,
    SymbolicValue,
    register_schema,
)
from graphopt.ir.symbolic import add_dims, dim_at_most, dims_equal, floordiv_dims, mul_dims, sub_dims
from graphopt.ir.types import Dim, Shape, TensorType, broadcast_shapes, format_dim, format_shape, merge_dims

if TYPE_CHECKING:
    from graphopt.ir.graph import Node

ALL_INPUTS: tuple[int, ...] = (-1,)

# Slice ends at or past this reach the end of any axis (exporters write INT32_MAX or INT64_MAX).
SLICE_TO_END = 2**31 - 1
# The most elements a propagate function builds from attributes or repeats (Constant, ConstantOfShape).
_MAX_PROPAGATED = 64


def is_plain_gemm(node: "Node") -> bool:
    """Whether `node` is a Gemm computing A @ op(B) (+ C) as a linear layer: alpha = beta = 1,
    transA = 0, transB either way (what matmul rewrites such as quantize and the torch target's
    prepacked linears take)."""
    attrs = node.attrs
    return (
        node.domain == "" and node.op_type == "Gemm" and float(attrs.get("alpha", 1.0)) == 1.0
        and float(attrs.get("beta", 1.0)) == 1.0 and not int(attrs.get("transA", 0))
    )


Propagated = list[Optional[SymbolicValue]]


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _register(
    name: str,
    infer: InferFn,
    *,
    doc: str,
    inputs: tuple[int, int] = (1, 1),
    outputs: tuple[int, int] = (1, 1),
    same: tuple[tuple[int, ...], ...] = (),
    pure: bool = True,
    propagate: Optional[PropagateFn] = None,
) -> None:
    register_schema(
        OpSchema(
            ONNX_DOMAIN,
            name,
            infer,
            min_inputs=inputs[0],
            max_inputs=inputs[1],
            min_outputs=outputs[0],
            max_outputs=outputs[1],
            same_dtype_inputs=same,
            pure=pure,
            propagate=propagate,
            doc=doc,
        )
    )


def _error(ctx: InferenceContext, message: str) -> ValueError:
    return ValueError(f"{ctx.op_type}: {message}")


def _shape(ctx: InferenceContext, index: int) -> Shape:
    return ctx.input_type(index).shape


def _dtype(ctx: InferenceContext, index: int) -> Optional[DType]:
    return ctx.input_type(index).dtype


def _first_dtype(ctx: InferenceContext, indices: Sequence[int]) -> Optional[DType]:
    """The first known dtype among inputs `indices`."""
    for index in indices:
        dtype = _dtype(ctx, index)
        if dtype is not None:
            return dtype
    return None


def _required_attr(ctx: InferenceContext, name: str) -> Any:
    value = ctx.attr(name)
    if value is None:
        raise _error(ctx, f"required attribute {name!r} is missing")
    return value


def _str_attr(ctx: InferenceContext, name: str, default: Optional[str] = None) -> str:
    """A string attribute (str or bytes); required when there is no default."""
    value = _required_attr(ctx, name) if default is None else ctx.attr(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _dtype_attr(ctx: InferenceContext, name: str, default: Optional[int] = None) -> Optional[DType]:
    """A dtype-number attribute as a DType; None when absent or not an IR dtype."""
    value = ctx.attr(name, default)
    try:
        return None if value is None else DType(int(value))
    except ValueError:
        return None


def _ints_attr(ctx: InferenceContext, name: str) -> Optional[tuple[int, ...]]:
    value = ctx.attr(name)
    return None if value is None else tuple(int(v) for v in value)


def _axis(ctx: InferenceContext, axis: int, rank: int, what: str = "axis") -> int:
    """`axis` normalised into [0, rank); raises when it is out of range."""
    if not -rank <= axis < rank:
        raise _error(ctx, f"{what} {axis} is out of range for rank {rank}")
    return axis % rank


def _axes(ctx: InferenceContext, axes: Sequence[int], rank: int) -> list[int]:
    """Distinct normalised axes; raises on out-of-range or repeated axes."""
    result = [_axis(ctx, a, rank) for a in axes]
    if len(set(result)) != len(result):
        raise _error(ctx, f"axes {list(axes)} repeat an axis")
    return result


def _broadcast(ctx: InferenceContext, shapes: Sequence[Shape]) -> Shape:
    try:
        return broadcast_shapes(*shapes)
    except ValueError as exc:
        listed = ", ".join(format_shape(s) for s in shapes if s is not None)
        raise _error(ctx, f"shapes {listed} do not broadcast ({exc})") from None


def _product(dims: Sequence[Dim]) -> Dim:
    """The product of dims: 0 when one is 0, else unknown when one is unknown, else an int
    or an expression (`batch*heads`)."""
    return functools.reduce(mul_dims, dims, 1)


def _proven_different(a: Dim, b: Dim) -> bool:
    return dims_equal(a, b) is False


def _static(values: Optional[SymbolicValue]) -> Optional[tuple[int, ...]]:
    """`values` when every element is a known int, else None."""
    if values is None or not all(isinstance(v, int) for v in values):
        return None
    return values  # type: ignore[return-value]


def _list_arg(ctx: InferenceContext, index: int, attr: str) -> tuple[bool, Optional[SymbolicValue]]:
    """An int-list operand that is input `index` in newer opsets and attribute `attr` in older.

    Returns (given, values): `given` is False when the node has neither form; `values` is
    None when the input is there but its contents are unknown.
    """
    if ctx.has_input(index):
        return True, ctx.input_symbolic(index)
    value = ctx.attr(attr)
    if value is None:
        return False, None
    return True, tuple(int(v) for v in value)


def _vector_length(ctx: InferenceContext, index: int) -> Optional[int]:
    """The length of input `index` when it is a 1-D tensor of static length."""
    shape = _shape(ctx, index)
    if shape is not None and len(shape) == 1 and isinstance(shape[0], int):
        return shape[0]
    return None


def _scalar(ctx: InferenceContext, index: int) -> Optional[float | int | str]:
    """The single value of a one-element input (int, symbol or float), when known."""
    symbolic = ctx.input_symbolic(index)
    if symbolic is not None:
        return symbolic[0] if len(symbolic) == 1 and symbolic[0] is not None else None
    data = ctx.input_constant(index)
    if data is not None and data.size == 1 and data.dtype.kind in "iuf":
        value = data.reshape(-1)[0]
        return int(value) if data.dtype.kind in "iu" else float(value)
    return None


def _tensor_attr_type(value: Any) -> TensorType:
    """The type of a tensor attribute given as a numpy array or an ONNX TensorProto."""
    if isinstance(value, np.ndarray):
        return TensorType(DType.from_numpy(value.dtype), value.shape)
    if hasattr(value, "data_type") and hasattr(value, "dims"):
        return TensorType(DType(value.data_type), tuple(int(d) for d in value.dims))
    array = np.asarray(value)
    return TensorType(DType.from_numpy(array.dtype), array.shape)


def _tensor_attr_ints(value: Any) -> Optional[tuple[int, ...]]:
    """The flat contents of a small integer tensor attribute, else None."""
    tensor_type = _tensor_attr_type(value)
    numel = tensor_type.numel()
    if tensor_type.dtype is None or not tensor_type.dtype.is_integer or numel is None:
        return None
    if numel > _MAX_PROPAGATED:
        return None
    if isinstance(value, np.ndarray):
        array = value
    elif hasattr(value, "data_type"):
        from onnx import numpy_helper

        array = numpy_helper.to_array(value)
    else:
        array = np.asarray(value)
    return tuple(int(v) for v in array.reshape(-1))


def _same_as_input(ctx: InferenceContext) -> list[TensorType]:
    return [ctx.input_type(0)]


def _passthrough(ctx: InferenceContext) -> Propagated:
    return [ctx.input_symbolic(0)]


# --------------------------------------------------------------------------------------
# Elementwise ops
# --------------------------------------------------------------------------------------


def _to_bool(ctx: InferenceContext) -> list[TensorType]:
    return [TensorType(DType.BOOL, _shape(ctx, 0))]


def _broadcasting(result: Optional[DType] = None, dtype_from: Optional[Sequence[int]] = None) -> InferFn:
    """Infer for a broadcasting elementwise op over all its inputs: dtype `result`, else the
    first known dtype among inputs `dtype_from` (default: all inputs)."""

    def infer(ctx: InferenceContext) -> list[TensorType]:
        shape = _broadcast(ctx, [_shape(ctx, i) for i in range(ctx.num_inputs)])
        if result is not None:
            return [TensorType(result, shape)]
        indices = range(ctx.num_inputs) if dtype_from is None else dtype_from
        return [TensorType(_first_dtype(ctx, indices), shape)]

    return infer


def _infer_prelu(ctx: InferenceContext) -> list[TensorType]:
    x, slope = _shape(ctx, 0), _shape(ctx, 1)
    if x is not None and slope is not None and len(slope) > len(x):
        raise _error(ctx, f"slope {format_shape(slope)} has a higher rank than X {format_shape(x)}")
    _broadcast(ctx, [x, slope])
    return [ctx.input_type(0)]


def _infer_softmax(ctx: InferenceContext) -> list[TensorType]:
    shape = _shape(ctx, 0)
    if shape is not None:
        _axis(ctx, int(ctx.attr("axis", -1 if ctx.opset >= 13 else 1)), len(shape))
    return [ctx.input_type(0)]


def _infer_trilu(ctx: InferenceContext) -> list[TensorType]:
    shape = _shape(ctx, 0)
    if shape is not None and len(shape) < 2:
        raise _error(ctx, f"input of rank {len(shape)} has no matrix to take a triangle of")
    return [ctx.input_type(0)]


def _infer_dropout(ctx: InferenceContext) -> list[TensorType]:
    return [ctx.input_type(0), TensorType(DType.BOOL, _shape(ctx, 0))][: ctx.num_outputs]


def _binary_values(
    ctx: InferenceContext, fn: Callable[[Dim, Dim], Dim], int_only: bool = True
) -> Propagated:
    """Elementwise `fn` over two known vectors or scalars (rank <= 1), broadcasting a
    one-element side; None when an operand is unknown or is not an integer tensor."""
    left, right = _known_contents(ctx, 0), _known_contents(ctx, 1)
    if left is None or right is None or not _small_rank(ctx, (0, 1)):
        return [None]
    dtype = _first_dtype(ctx, (0, 1))
    if int_only and dtype is not None and not dtype.is_integer:
        return [None]
    return [_zip_broadcast(fn, left, right)]


def _known_contents(ctx: InferenceContext, index: int) -> Optional[SymbolicValue]:
    """Symbolic contents of an input, including small boolean constants as 1/0."""
    symbolic = ctx.input_symbolic(index)
    if symbolic is not None:
        return symbolic
    data = ctx.input_constant(index)
    if data is not None and data.dtype.kind == "b" and data.size <= _MAX_PROPAGATED:
        return tuple(int(v) for v in data.reshape(-1))
    return None


def _small_rank(ctx: InferenceContext, indices: Sequence[int]) -> bool:
    """True when every input in `indices` is known to be a scalar or a vector."""
    ranks = [ctx.input_type(i).rank for i in indices]
    return all(r is not None and r <= 1 for r in ranks)


def _zip_broadcast(fn: Callable[..., Dim], *operands: SymbolicValue) -> Optional[SymbolicValue]:
    length = max(len(v) for v in operands)
    if any(len(v) not in (1, length) for v in operands):
        return None
    return tuple(fn(*(v[0] if len(v) == 1 else v[i] for v in operands)) for i in range(length))


def _div(a: Dim, b: Dim) -> Dim:
    """Integer division truncating toward zero, as ONNX integer Div does (an expression
    only when the division is exact, where truncating and flooring agree)."""
    if isinstance(a, int) and isinstance(b, int):
        if b == 0:
            return None
        quotient = abs(a) // abs(b)
        return quotient if (a >= 0) == (b > 0) else -quotient
    return floordiv_dims(a, b)


def _equal(a: Dim, b: Dim) -> Dim:
    """1 or 0 when the operands are proven equal or different (a symbolic dim is a size, so
    it never equals a negative number), else unknown."""
    same = dims_equal(a, b)
    return None if same is None else int(same)


def _select(condition: Dim, x: Dim, y: Dim) -> Dim:
    if condition == 1:
        return x
    if condition == 0:
        return y
    return x if x == y and x is not None else None


def _arithmetic(fn: Callable[[Dim, Dim], Dim]) -> PropagateFn:
    def propagate(ctx: InferenceContext) -> Propagated:
        return _binary_values(ctx, fn)

    return propagate


def _propagate_equal(ctx: InferenceContext) -> Propagated:
    return _binary_values(ctx, _equal, int_only=False)


def _propagate_where(ctx: InferenceContext) -> Propagated:
    operands = [_known_contents(ctx, i) for i in range(3)]
    if any(v is None for v in operands) or not _small_rank(ctx, (0, 1, 2)):
        return [None]
    return [_zip_broadcast(_select, *operands)]  # type: ignore[arg-type]


_UNARY_OPS = {
    "Neg": "Elementwise negation.",
    "Abs": "Elementwise absolute value.",
    "Sqrt": "Elementwise square root.",
    "Reciprocal": "Elementwise 1/x.",
    "Exp": "Elementwise exponential.",
    "Log": "Elementwise natural logarithm.",
    "Erf": "Elementwise error function.",
    "Tanh": "Elementwise hyperbolic tangent.",
    "Sigmoid": "Elementwise logistic sigmoid.",
    "Relu": "Elementwise max(x, 0).",
    "LeakyRelu": "Elementwise leaky ReLU with slope `alpha`.",
    "Elu": "Elementwise ELU with `alpha`.",
    "Selu": "Elementwise scaled ELU.",
    "Celu": "Elementwise continuously differentiable ELU.",
    "Gelu": "Elementwise GELU, exact or tanh-approximated (`approximate`).",
    "HardSigmoid": "Elementwise max(0, min(1, alpha*x + beta)).",
    "HardSwish": "Elementwise x * HardSigmoid(x) with alpha=1/6, beta=0.5.",
    "Softplus": "Elementwise log(1 + exp(x)).",
    "Softsign": "Elementwise x / (1 + |x|).",
    "Mish": "Elementwise x * tanh(softplus(x)).",
    "ThresholdedRelu": "Elementwise x where x > alpha, else 0.",
    "Shrink": "Elementwise shrinkage with `lambd` and `bias`.",
    "Sin": "Elementwise sine.",
    "Cos": "Elementwise cosine.",
    "Tan": "Elementwise tangent.",
    "Asin": "Elementwise arcsine.",
    "Acos": "Elementwise arccosine.",
    "Atan": "Elementwise arctangent.",
    "Sinh": "Elementwise hyperbolic sine.",
    "Cosh": "Elementwise hyperbolic cosine.",
    "Asinh": "Elementwise inverse hyperbolic sine.",
    "Acosh": "Elementwise inverse hyperbolic cosine.",
    "Atanh": "Elementwise inverse hyperbolic tangent.",
    "Floor": "Elementwise floor.",
    "Ceil": "Elementwise ceiling.",
    "Round": "Elementwise round half to even.",
    "Sign": "Elementwise sign (-1, 0 or 1).",
    "Not": "Elementwise logical not of a bool tensor.",
    "BitwiseNot": "Elementwise bitwise not of an integer tensor.",
}
for _name, _doc in _UNARY_OPS.items():
    _register(_name, _same_as_input, doc=_doc)

_register("IsNaN", _to_bool, doc="Elementwise test for NaN; bool output.")
_register(
    "IsInf",
    _to_bool,
    doc="Elementwise test for +/-inf (`detect_positive`/`detect_negative`); bool output.",
)
_register("Identity", _same_as_input, propagate=_passthrough, doc="Returns its input unchanged.")

_ARITHMETIC_OPS: dict[str, tuple[str, Optional[Callable[[Dim, Dim], Dim]]]] = {
    "Add": ("Broadcasting elementwise addition.", add_dims),
    "Sub": ("Broadcasting elementwise subtraction.", sub_dims),
    "Mul": ("Broadcasting elementwise multiplication.", mul_dims),
    "Div": ("Broadcasting elementwise division (truncating for integers).", _div),
    "Mod": ("Broadcasting elementwise remainder (`fmod` selects C fmod semantics).", None),
    "BitwiseAnd": ("Broadcasting elementwise bitwise and.", None),
    "BitwiseOr": ("Broadcasting elementwise bitwise or.", None),
    "BitwiseXor": ("Broadcasting elementwise bitwise xor.", None),
    "BitShift": ("Broadcasting elementwise bit shift of unsigned integers (`direction`).", None),
}
for _name, (_doc, _fn) in _ARITHMETIC_OPS.items():
    _register(
        _name,
        _broadcasting(),
        inputs=(2, 2),
        same=((0, 1),),
        propagate=None if _fn is None else _arithmetic(_fn),
        doc=_doc,
    )

_register(
    "Pow",
    _broadcasting(dtype_from=(0,)),
    inputs=(2, 2),
    doc="Broadcasting elementwise power; result has the base's dtype.",
)
_register(
    "PRelu",
    _infer_prelu,
    inputs=(2, 2),
    same=((0, 1),),
    doc="Elementwise PReLU; `slope` broadcasts to X's shape.",
)

_COMPARISON_OPS = {
    "Equal": "Broadcasting elementwise ==; bool output.",
    "Less": "Broadcasting elementwise <; bool output.",
    "Greater": "Broadcasting elementwise >; bool output.",
    "LessOrEqual": "Broadcasting elementwise <=; bool output.",
    "GreaterOrEqual": "Broadcasting elementwise >=; bool output.",
    "And": "Broadcasting elementwise logical and of bool tensors.",
    "Or": "Broadcasting elementwise logical or of bool tensors.",
    "Xor": "Broadcasting elementwise logical xor of bool tensors.",
}
for _name, _doc in _COMPARISON_OPS.items():
    _register(
        _name,
        _broadcasting(DType.BOOL),
        inputs=(2, 2),
        same=((0, 1),),
        propagate=_propagate_equal if _name == "Equal" else None,
        doc=_doc,
    )

_VARIADIC_OPS = {
    "Sum": "Broadcasting elementwise sum of all inputs.",
    "Mean": "Broadcasting elementwise mean of all inputs.",
    "Min": "Broadcasting elementwise minimum of all inputs.",
    "Max": "Broadcasting elementwise maximum of all inputs.",
}
for _name, _doc in _VARIADIC_OPS.items():
    _register(_name, _broadcasting(), inputs=(1, 2**31), same=(ALL_INPUTS,), doc=_doc)

_register(
    "Where",
    _broadcasting(dtype_from=(1, 2)),
    inputs=(3, 3),
    same=((1, 2),),
    propagate=_propagate_where,
    doc="Broadcasting select: X where condition is true, else Y.",
)
_register(
    "Clip",
    _same_as_input,
    inputs=(1, 3),
    same=((0, 1, 2),),
    doc="Clamps to [min, max] (inputs since opset 11, attributes before).",
)
for _name, _doc in {
    "Softmax": "Softmax along `axis`.",
    "LogSoftmax": "Log of softmax along `axis`.",
    "Hardmax": "One-hot of the first maximum along `axis`.",
}.items():
    _register(_name, _infer_softmax, doc=_doc)
_register(
    "Trilu",
    _infer_trilu,
    inputs=(1, 2),
    doc="Upper or lower triangle of the last two dims, offset by k.",
)
_register("CumSum", _same_as_input, inputs=(2, 2), doc="Cumulative sum along the axis given as input 1.")
_register(
    "Dropout",
    _infer_dropout,
    inputs=(1, 3),
    outputs=(1, 2),
    doc="Dropout (identity in inference) with an optional bool mask output.",
)


# --------------------------------------------------------------------------------------
# Matrix products
# --------------------------------------------------------------------------------------


def _matmul_shape(ctx: InferenceContext, a: Shape, b: Shape) -> Shape:
    """numpy.matmul shape rule with symbolic dims."""
    if a is None or b is None:
        return None
    if not a or not b:
        raise _error(ctx, "inputs must have rank >= 1")
    a_matrix = a if len(a) > 1 else (1,) + a
    b_matrix = b if len(b) > 1 else b + (1,)
    k_a, k_b = a_matrix[-1], b_matrix[-2]
    if _proven_different(k_a, k_b):
        raise _error(ctx, f"inner dims {k_a} and {k_b} differ (shapes {format_shape(a)} and {format_shape(b)})")
    batch = _broadcast(ctx, [a_matrix[:-2], b_matrix[:-2]])
    assert batch is not None
    rows = (a_matrix[-2],) if len(a) > 1 else ()
    cols = (b_matrix[-1],) if len(b) > 1 else ()
    return batch + rows + cols


def _infer_matmul(ctx: InferenceContext) -> list[TensorType]:
    return [TensorType(_first_dtype(ctx, (0, 1)), _matmul_shape(ctx, _shape(ctx, 0), _shape(ctx, 1)))]


def _infer_matmul_integer(ctx: InferenceContext) -> list[TensorType]:
    return [TensorType(DType.INT32, _matmul_shape(ctx, _shape(ctx, 0), _shape(ctx, 1)))]


def _infer_gemm(ctx: InferenceContext) -> list[TensorType]:
    a, b = _shape(ctx, 0), _shape(ctx, 1)
    for name, shape in (("A", a), ("B", b)):
        if shape is not None and len(shape) != 2:
            raise _error(ctx, f"{name} must be 2-D, got {format_shape(shape)}")
    m = k_a = k_b = n = None
    if a is not None:
        m, k_a = (a[1], a[0]) if ctx.attr("transA", 0) else a
    if b is not None:
        k_b, n = (b[1], b[0]) if ctx.attr("transB", 0) else b
    if _proven_different(k_a, k_b):
        raise _error(ctx, f"inner dims {k_a} and {k_b} differ")
    if ctx.has_input(2):
        _broadcast(ctx, [(m, n), _shape(ctx, 2)])
    return [TensorType(_first_dtype(ctx, (0, 1, 2)), (m, n))]


def _einsum_term(ctx: InferenceContext, term: str, shape: Shape) -> tuple[list[tuple[str, Dim]], Shape]:
    """(label, dim) pairs of one input term and the dims its ellipsis covers (None if unknown)."""
    labels = term.replace("...", "")
    if (labels and not labels.isalpha()) or term.count("...") > 1:
        raise _error(ctx, f"bad term {term!r} in the equation")
    has_ellipsis = "..." in term
    if shape is None:
        return [(label, None) for label in labels], None
    if not has_ellipsis:
        if len(labels) != len(shape):
            raise _error(ctx, f"term {term!r} has {len(labels)} labels for rank {len(shape)}")
        return list(zip(labels, shape)), ()
    extra = len(shape) - len(labels)
    if extra < 0:
        raise _error(ctx, f"term {term!r} has more labels than rank {len(shape)}")
    start = term.index("...")
    dims = shape[:start] + shape[start + extra :]
    return list(zip(labels, dims)), shape[start : start + extra]


def _infer_einsum(ctx: InferenceContext) -> list[TensorType]:
    equation = _str_attr(ctx, "equation").replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != ctx.num_inputs:
        raise _error(ctx, f"equation {equation!r} has {len(terms)} terms for {ctx.num_inputs} inputs")
    label_dims: dict[str, Dim] = {}
    ellipsis_shapes: list[Shape] = []
    for index, term in enumerate(terms):
        pairs, ellipsis = _einsum_term(ctx, term, _shape(ctx, index))
        for label, dim in pairs:
            known = label_dims.get(label)
            if _proven_different(known, dim):
                raise _error(ctx, f"label {label!r} has dims {known} and {dim}")
            label_dims[label] = merge_dims(known, dim)
        if "..." in term:
            ellipsis_shapes.append(ellipsis)
    if not arrow:
        counts = Counter(lhs.replace("...", "").replace(",", ""))
        rhs = ("..." if ellipsis_shapes else "") + "".join(sorted(c for c, n in counts.items() if n == 1))
    ellipsis_dims = _broadcast(ctx, ellipsis_shapes)
    out: list[Dim] = []
    for position, piece in enumerate(rhs.split("...")):
        if position > 0:
            if ellipsis_dims is None:
                return [TensorType(_first_dtype(ctx, (0,)), None)]
            out.extend(ellipsis_dims)
        for label in piece:
            if label not in label_dims:
                raise _error(ctx, f"output label {label!r} is not in any input")
            out.append(label_dims[label])
    return [TensorType(_first_dtype(ctx, (0,)), tuple(out))]


_register(
    "MatMul",
    _infer_matmul,
    inputs=(2, 2),
    same=((0, 1),),
    doc="numpy.matmul: batched matrix product with broadcasting.",
)
_register(
    "MatMulInteger",
    _infer_matmul_integer,
    inputs=(2, 4),
    same=((0, 2), (1, 3)),
    doc="Integer matmul with optional zero points; int32 output.",
)
_register(
    "Gemm",
    _infer_gemm,
    inputs=(2, 3),
    same=((0, 1, 2),),
    doc="alpha * op(A) @ op(B) + beta * C for 2-D A and B.",
)
_register(
    "Einsum",
    _infer_einsum,
    inputs=(1, 2**31),
    same=(ALL_INPUTS,),
    doc="Einstein summation by `equation`.",
)


# --------------------------------------------------------------------------------------
# Convolution and pooling
# --------------------------------------------------------------------------------------


def _window_dims(
    ctx: InferenceContext, spatial: Sequence[Dim], kernel: Sequence[Dim], pooling: bool = False
) -> list[Dim]:
    """Output spatial dims of a sliding-window op (strides, dilations, pads, auto_pad, and
    ceil_mode for pooling).

    A convolution window that does not fit the padded input is an error; for pooling the
    dim is left unknown, as onnxruntime accepts some such pools (auto_pad=VALID).
    """
    ceil_mode = pooling and bool(ctx.attr("ceil_mode", 0))
    n = len(spatial)
    strides = _ints_attr(ctx, "strides") or (1,) * n
    dilations = _ints_attr(ctx, "dilations") or (1,) * n
    pads = _ints_attr(ctx, "pads") or (0,) * (2 * n)
    auto_pad = _str_attr(ctx, "auto_pad", "NOTSET")
    if len(kernel) != n or len(strides) != n or len(dilations) != n or len(pads) != 2 * n:
        raise _error(ctx, f"kernel/strides/dilations/pads do not match {n} spatial dims")
    out: list[Dim] = []
    for i, (size, k, stride, dilation) in enumerate(zip(spatial, kernel, strides, dilations)):
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            if isinstance(size, int):
                out.append(-(-size // stride))
            else:
                out.append(size if stride == 1 else None)
            continue
        if k is None or (auto_pad == "VALID" and ceil_mode):
            out.append(None)
            continue
        begin, total = (0, 0) if auto_pad == "VALID" else (pads[i], pads[i] + pads[i + n])
        span = dilation * (k - 1) + 1
        if not isinstance(size, int):
            out.append(add_dims(size, total - span + 1) if stride == 1 else None)
            continue
        room = size + total - span
        if room < 0 and pooling:
            out.append(None)
            continue
        if room < 0:
            raise _error(ctx, f"window of {span} does not fit spatial dim {size} with pads {total}")
        count = (-(-room // stride) if ceil_mode else room // stride) + 1
        # a window that would start inside the right padding is dropped
        if ceil_mode and (count - 1) * stride >= size + begin:
            count -= 1
        out.append(count)
    return out


def _spatial_rank(ctx: InferenceContext, *shapes: Shape) -> Optional[int]:
    for shape in shapes:
        if shape is not None:
            if len(shape) < 3:
                raise _error(ctx, f"expected (N, C, spatial...) but got {format_shape(shape)}")
            return len(shape) - 2
    kernel = _ints_attr(ctx, "kernel_shape")
    return None if kernel is None else len(kernel)


def _infer_conv(ctx: InferenceContext) -> list[TensorType]:
    x, w = _shape(ctx, 0), _shape(ctx, 1)
    dtype = _first_dtype(ctx, (0, 1))
    n = _spatial_rank(ctx, x, w)
    if n is None:
        return [TensorType(dtype, None)]
    x = x if x is not None else (None,) * (n + 2)
    w = w if w is not None else (None,) * (n + 2)
    if len(x) != len(w):
        raise _error(ctx, f"X {format_shape(x)} and W {format_shape(w)} have different ranks")
    group = int(ctx.attr("group", 1))
    channels, per_group = x[1], w[1]
    if isinstance(channels, int) and isinstance(per_group, int) and channels != per_group * group:
        raise _error(ctx, f"X has {channels} channels but W expects {per_group} x group {group}")
    kernel = _ints_attr(ctx, "kernel_shape") or w[2:]
    return [TensorType(dtype, (x[0], w[0], *_window_dims(ctx, x[2:], kernel)))]


def _infer_pool(ctx: InferenceContext) -> list[TensorType]:
    x = _shape(ctx, 0)
    n = _spatial_rank(ctx, x)
    if n is None:
        shape: Shape = None
    else:
        x = x if x is not None else (None,) * (n + 2)
        kernel = _ints_attr(ctx, "kernel_shape")
        if kernel is None:
            raise _error(ctx, "kernel_shape is required")
        shape = (x[0], x[1], *_window_dims(ctx, x[2:], kernel, pooling=True))
    return [TensorType(_dtype(ctx, 0), shape), TensorType(DType.INT64, shape)][: ctx.num_outputs]


def _infer_global_pool(ctx: InferenceContext) -> list[TensorType]:
    x = _shape(ctx, 0)
    n = _spatial_rank(ctx, x)
    shape = None if x is None or n is None else (x[0], x[1]) + (1,) * n
    return [TensorType(_dtype(ctx, 0), shape)]


_register(
    "Conv",
    _infer_conv,
    inputs=(2, 3),
    same=((0, 1, 2),),
    doc="N-d convolution with groups, strides, dilations, pads.",
)
_register(
    "MaxPool",
    _infer_pool,
    outputs=(1, 2),
    doc="N-d max pooling with an optional int64 Indices output.",
)
_register("AveragePool", _infer_pool, doc="N-d average pooling.")
_register("LpPool", _infer_pool, doc="N-d Lp-norm pooling.")
_register("GlobalAveragePool", _infer_global_pool, doc="Mean over all spatial dims, kept as 1s.")
_register("GlobalMaxPool", _infer_global_pool, doc="Max over all spatial dims, kept as 1s.")


# --------------------------------------------------------------------------------------
# Shape manipulation
# --------------------------------------------------------------------------------------


def _infer_transpose(ctx: InferenceContext) -> list[TensorType]:
    shape = _shape(ctx, 0)
    perm = _ints_attr(ctx, "perm")
    if shape is None:
        return [TensorType(_dtype(ctx, 0), None if perm is None else (None,) * len(perm))]
    if perm is None:
        perm = tuple(reversed(range(len(shape))))
    if sorted(perm) != list(range(len(shape))):
        raise _error(ctx, f"perm {list(perm)} is not a permutation of rank {len(shape)}")
    return [TensorType(_dtype(ctx, 0), tuple(shape[p] for p in perm))]


def _reshape_inferred_dim(ctx: InferenceContext, source: Sequence[Dim], known: Sequence[Dim]) -> Dim:
    """The dim a -1 stands for: numel(source) // prod(known), when the division is exact
    (symbolically: `[batch, seq, 64]` into `[batch, -1, 4]` gives `16*seq`)."""
    if any(d is None for d in source) or any(d is None for d in known):
        return None
    total, rest = _product(source), _product(known)
    if rest == 0:
        return None
    if isinstance(total, int) and isinstance(rest, int) and total % rest:
        raise _error(ctx, f"cannot reshape {format_shape(source)} into a shape with fixed part {format_shape(known)}")
    return floordiv_dims(total, rest)


def _infer_reshape(ctx: InferenceContext) -> list[TensorType]:
    dtype = _dtype(ctx, 0)
    source = _shape(ctx, 0)
    target = ctx.input_symbolic(1)
    if target is None:
        length = _vector_length(ctx, 1)
        return [TensorType(dtype, None if length is None else (None,) * length)]
    allow_zero = bool(ctx.attr("allowzero", 0))
    out: list[Dim] = []
    inferred: Optional[int] = None
    for i, value in enumerate(target):
        if value == 0 and not allow_zero:
            if source is not None and i >= len(source):
                raise _error(ctx, f"target {format_shape(target)} copies dim {i} of rank-{len(source)} input")
            out.append(None if source is None else source[i])
        elif value == -1:
            if inferred is not None:
                raise _error(ctx, f"target {format_shape(target)} has more than one -1")
            inferred = i
            out.append(None)
        elif isinstance(value, int) and value < 0:
            raise _error(ctx, f"target {format_shape(target)} has invalid dim {value}")
        else:
            out.append(value)
    if source is not None:
        if inferred is not None:
            out[inferred] = _reshape_inferred_dim(ctx, source, out[:inferred] + out[inferred + 1 :])
        else:
            before, after = _product(source), _product(out)
            if _proven_different(before, after):
                raise _error(ctx, f"cannot reshape {format_shape(source)} ({before} elements) into {format_shape(out)}")
    return [TensorType(dtype, tuple(out))]


def _infer_flatten(ctx: InferenceContext) -> list[TensorType]:
    shape = _shape(ctx, 0)
    if shape is None:
        return [TensorType(_dtype(ctx, 0), (None, None))]
    axis = int(ctx.attr("axis", 1))
    if not -len(shape) <= axis <= len(shape):
        raise _error(ctx, f"axis {axis} is out of range for rank {len(shape)}")
    if axis < 0:
        axis += len(shape)
    return [TensorType(_dtype(ctx, 0), (_product(shape[:axis]), _product(shape[axis:])))]


def _infer_squeeze(ctx: InferenceContext) -> list[TensorType]:
    dtype, shape = _dtype(ctx, 0), _shape(ctx, 0)
    given, axes = _list_arg(ctx, 1, "axes")
    axes = _static(axes)
    if shape is None or (given and axes is None):
        return [TensorType(dtype, None)]
    if not given:
        if not all(isinstance(d, int) for d in shape):
            return [TensorType(dtype, None)]
        return [TensorType(dtype, tuple(d for d in shape if d != 1))]
    assert axes is not None
    drop = _axes(ctx, axes, len(shape))
    for axis in drop:
        if isinstance(shape[axis], int) and shape[axis] != 1:
            raise _error(ctx, f"cannot squeeze axis {axis} of size {shape[axis]}")
    return [TensorType(dtype, tuple(d for i, d in enumerate(shape) if i not in drop))]


def _infer_unsqueeze(ctx: InferenceContext) -> list[TensorType]:
    dtype, shape = _dtype(ctx, 0), _shape(ctx, 0)
    _, axes = _list_arg(ctx, 1, "axes")
    axes = _static(axes)
    if shape is None:
        return [TensorType(dtype, None)]
    if axes is None:
        length = _vector_length(ctx, 1)
        return [TensorType(dtype, None if length is None else (None,) * (len(shape) + length))]
    rank = len(shape) + len(axes)
    inserted = set(_axes(ctx, axes, rank))
    rest = iter(shape)
    return [TensorType(dtype, tuple(1 if i in inserted else next(rest) for i in range(rank)))]


def _infer_concat(ctx: InferenceContext) -> list[TensorType]:
    dtype = _first_dtype(ctx, range(ctx.num_inputs))
    shapes = [_shape(ctx, i) for i in range(ctx.num_inputs)]
    known = [s for s in shapes if s is not None]
    if not known:
        return [TensorType(dtype, None)]
    rank = len(known[0])
    if any(len(s) != rank for s in known):
        raise _error(ctx, f"inputs have different ranks: {', '.join(format_shape(s) for s in known)}")
    axis = _axis(ctx, int(_required_attr(ctx, "axis")), rank)
    out: list[Dim] = []
    for i in range(rank):
        if i == axis:
            parts = [s[i] for s in shapes] if len(known) == len(shapes) else [None]
            out.append(_concat_dim(parts))
            continue
        dim: Dim = None
        for s in known:
            if _proven_different(dim, s[i]):
                raise _error(ctx, f"dim {i} differs between inputs: {dim} vs {s[i]}")
            dim = merge_dims(dim, s[i])
        out.append(dim)
    return [TensorType(dtype, tuple(out))]


def _concat_dim(parts: Sequence[Dim]) -> Dim:
    """The sum of dims (`past + seq`); unknown when a part is."""
    return functools.reduce(add_dims, parts, 0)


def _infer_split(ctx: InferenceContext) -> list[TensorType]:
    dtype, shape = _dtype(ctx, 0), _shape(ctx, 0)
    count = ctx.num_outputs
    if shape is None:
        return [TensorType(dtype, None)] * count
    axis = _axis(ctx, int(ctx.attr("axis", 0)), len(shape))
    dim = shape[axis]
    given, split = _list_arg(ctx, 1, "split")
    sizes: list[Dim]
    if given:
        if split is None:
            sizes = [None] * count
        else:
            if len(split) != count:
                raise _error(ctx, f"split {list(split)} has {len(split)} parts for {count} outputs")
            total = _concat_dim(split)
            if _proven_different(total, dim):
                raise _error(ctx, f"split {format_shape(split)} sums to {format_dim(total)}, not dim {format_dim(dim)}")
            sizes = list(split)
    elif not isinstance(dim, int):
        # equal parts (also with num_outputs, whose last part is smaller only when the
        # division is not exact)
        sizes = [floordiv_dims(dim, count)] * count
    elif ctx.attr("num_outputs") is not None:
        chunk = -(-dim // count)
        last = dim - chunk * (count - 1)
        if last < 0:
            raise _error(ctx, f"dim {dim} cannot be split into {count} outputs")
        sizes = [chunk] * (count - 1) + [last]
    else:
        if dim % count:
            raise _error(ctx, f"dim {dim} does not split evenly into {count} outputs")
        sizes = [dim // count] * count
    return [TensorType(dtype, shape[:axis] + (size,) + shape[axis + 1 :]) for size in sizes]


def _slice_range(dim: int, start: int, end: int, step: int) -> range:
    """The indices a Slice takes from an axis of size `dim` (step != 0).

    ONNX adds `dim` to negative starts and ends, then clamps starts into [0, dim] and ends
    into [0, dim] when stepping forward, [0, dim - 1] and [-1, dim - 1] when stepping back.
    (A Python slice differs: it empties a backward slice that starts before -dim.)
    """
    if dim == 0:
        return range(0)
    start += dim if start < 0 else 0
    end += dim if end < 0 else 0
    if step > 0:
        return range(min(max(start, 0), dim), min(max(end, 0), dim), step)
    return range(min(max(start, 0), dim - 1), min(max(end, -1), dim - 1), step)


def _slice_dim(ctx: InferenceContext, dim: Dim, start: Dim, end: Dim, step: int) -> Dim:
    if step == 0:
        raise _error(ctx, "steps must be non-zero")
    if isinstance(dim, int) and isinstance(start, int) and isinstance(end, int):
        return len(_slice_range(dim, start, end, step))
    if step == -1 and start == -1 and isinstance(end, int) and end <= -SLICE_TO_END:
        return dim
    if step != 1:
        return None
    begin, stop = _slice_bound(dim, start), _slice_bound(dim, end)
    # with 0 <= begin <= stop <= dim proven, no clamping happens: the length is stop - begin
    if dim_at_most(0, begin) and dim_at_most(begin, stop) and dim_at_most(stop, dim):
        return sub_dims(stop, begin)
    return 0 if dim_at_most(stop, begin) else None


def _slice_bound(dim: Dim, bound: Dim) -> Dim:
    """A forward Slice's start or end as a position in [0, dim] where it is expressible: a
    negative int counts from the end, one at or past SLICE_TO_END is the end."""
    if not isinstance(bound, int):
        return bound
    if bound >= SLICE_TO_END:
        return dim
    if bound <= -SLICE_TO_END:
        return 0
    return add_dims(dim, bound) if bound < 0 else bound


def _infer_slice(ctx: InferenceContext) -> list[TensorType]:
    dtype, shape = _dtype(ctx, 0), _shape(ctx, 0)
    if shape is None:
        return [TensorType(dtype, None)]
    rank = len(shape)
    _, starts = _list_arg(ctx, 1, "starts")
    _, ends = _list_arg(ctx, 2, "ends")
    axes_given, axes = _list_arg(ctx, 3, "axes")
    steps_given, steps = _list_arg(ctx, 4, "steps")
    axes, steps = _static(axes), _static(steps)
    length = next((len(v) for v in (starts, ends, axes, steps) if v is not None), _vector_length(ctx, 1))
    if (axes_given and axes is None) or length is None:
        return [TensorType(dtype, (None,) * rank)]
    axes = axes if axes_given else tuple(range(length))
    assert axes is not None
    for name, values in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps)):
        if values is not None and len(values) != length:
            raise _error(ctx, f"{name} has {len(values)} entries, expected {length}")
    out = list(shape)
    for i, axis in enumerate(_axes(ctx, axes, rank)):
        if starts is None or ends is None or (steps_given and steps is None):
            out[axis] = None
        else:
            step = steps[i] if steps is not None else 1
            out[axis] = _slice_dim(ctx, shape[axis], starts[i], ends[i], step)
    return [TensorType(dtype, tuple(out))]


def _infer_expand(ctx: InferenceContext) -> list[TensorType]:
    target = ctx.input_symbolic(1)
    if target is None:
        length = _vector_length(ctx, 1)
        target = None if length is None else (None,) * length
    elif any(isinstance(v, int) and v < 0 for v in target):
        raise _error(ctx, f"target shape {format_shape(target)} has a negative dim")
    return [TensorType(_dtype(ctx, 0), _broadcast(ctx, [_shape(ctx, 0), target]))]


def _infer_tile(ctx: InferenceContext) -> list[TensorType]:
    dtype, shape = _dtype(ctx, 0), _shape(ctx, 0)
    repeats = ctx.input_symbolic(1)
    if shape is None:
        return [TensorType(dtype, None)]
    if repeats is None:
        return [TensorType(dtype, (None,) * len(shape))]
    if len(repeats) != len(shape):
        raise _error(ctx, f"repeats {format_shape(repeats)} do not match rank {len(shape)}")
    if any(isinstance(r, int) and r < 0 for r in repeats):
        raise _error(ctx, f"repeats {format_shape(repeats)} has a negative count")
    return [TensorType(dtype, tuple(_product((d, r)) for d, r in zip(shape, repeats)))]


def _infer_pad(ctx: InferenceContext) -> list[TensorType]:
    dtype, shape = _dtype(ctx, 0), _shape(ctx, 0)
    _, pads = _list_arg(ctx, 1, "pads")
    pads = _static(pads)
    if shape is None:
        return [TensorType(dtype, None)]
    axes: Sequence[int] = range(len(shape))
    if ctx.has_input(3):
        given_axes = _static(ctx.input_symbolic(3))
        if given_axes is None:
            return [TensorType(dtype, (None,) * len(shape))]
        axes = _axes(ctx, given_axes, len(shape))
    if pads is None:
        return [TensorType(dtype, tuple(None if i in axes else d for i, d in enumerate(shape)))]
    if len(pads) != 2 * len(axes):
        raise _error(ctx, f"pads {list(pads)} do not match {len(axes)} padded axes")
    out = list(shape)
    for i, axis in enumerate(axes):
        extra = pads[i] + pads[i + len(axes)]
        dim = shape[axis]
        if isinstance(dim, int) and dim + extra < 0:
            raise _error(ctx, f"pads {list(pads)} remove more than dim {dim}")
        out[axis] = add_dims(dim, extra) if extra >= 0 or dim_at_most(-extra, dim) else None
    return [TensorType(dtype, tuple(out))]


def _propagate_gather(ctx: InferenceContext) -> Propagated:
    data, indices = ctx.input_symbolic(0), _static(ctx.input_symbolic(1))
    if data is None or indices is None or ctx.input_type(0).rank != 1:
        return [None]
    if int(ctx.attr("axis", 0)) not in (0, -1):
        return [None]
    if not all(-len(data) <= i < len(data) for i in indices):
        return [None]
    return [tuple(data[i] for i in indices)]


def _propagate_slice(ctx: InferenceContext) -> Propagated:
    data = ctx.input_symbolic(0)
    starts = _static(_list_arg(ctx, 1, "starts")[1])
    ends = _static(_list_arg(ctx, 2, "ends")[1])
    axes_given, axes = _list_arg(ctx, 3, "axes")
    steps_given, steps = _list_arg(ctx, 4, "steps")
    steps = _static(steps) if steps_given else (1,)
    if data is None or ctx.input_type(0).rank != 1 or starts is None or ends is None or steps is None:
        return [None]
    if (axes_given and _static(axes) not in ((0,), (-1,))) or not len(starts) == len(ends) == len(steps) == 1:
        return [None]
    if steps[0] == 0:
        return [None]
    return [tuple(data[i] for i in _slice_range(len(data), starts[0], ends[0], steps[0]))]


def _propagate_concat(ctx: InferenceContext) -> Propagated:
    parts = [ctx.input_symbolic(i) for i in range(ctx.num_inputs)]
    axis = int(ctx.attr("axis", 0))
    if axis < 0:
        ranks = {ctx.input_type(i).rank for i in range(ctx.num_inputs)} - {None}
        if len(ranks) != 1:
            return [None]
        axis += ranks.pop()
    # only a concat along the first axis joins flat contents end to end
    if axis != 0 or any(p is None for p in parts):
        return [None]
    return [tuple(v for part in parts for v in part)]  # type: ignore[union-attr]


_register("Transpose", _infer_transpose, doc="Permutes dims by `perm` (default: reversed).")
_register(
    "Reshape",
    _infer_reshape,
    inputs=(2, 2),
    propagate=_passthrough,
    doc="Reshapes to input 1 (0 copies a dim unless allowzero, -1 is inferred).",
)
_register("Flatten", _infer_flatten, doc="Collapses dims before and from `axis` into a 2-D tensor.")
_register(
    "Squeeze",
    _infer_squeeze,
    inputs=(1, 2),
    propagate=_passthrough,
    doc="Removes size-1 dims at `axes` (input since opset 13), or all of them.",
)
_register(
    "Unsqueeze",
    _infer_unsqueeze,
    inputs=(1, 2),
    propagate=_passthrough,
    doc="Inserts size-1 dims at `axes` of the output (input since opset 13).",
)
_register(
    "Concat",
    _infer_concat,
    inputs=(1, 2**31),
    same=(ALL_INPUTS,),
    propagate=_propagate_concat,
    doc="Joins inputs along `axis`.",
)
_register(
    "Split",
    _infer_split,
    inputs=(1, 2),
    outputs=(1, 2**31),
    doc="Splits along `axis` by `split` sizes (input since opset 13) or into equal parts.",
)
_register(
    "Slice",
    _infer_slice,
    inputs=(1, 5),
    same=((1, 2, 3, 4),),
    propagate=_propagate_slice,
    doc="Strided slice by starts/ends/axes/steps (inputs since opset 10).",
)
_register("Expand", _infer_expand, inputs=(2, 2), doc="Broadcasts the input to the shape given as input 1.")
_register("Tile", _infer_tile, inputs=(2, 2), doc="Repeats the input `repeats[i]` times along each dim.")
_register(
    "Pad",
    _infer_pad,
    inputs=(1, 4),
    same=((0, 2),),
    doc="Pads (or crops, with negative pads) by `pads` (input since opset 11), optionally on `axes`.",
)


# --------------------------------------------------------------------------------------
# Indexing
# --------------------------------------------------------------------------------------


def _infer_gather(ctx: InferenceContext) -> list[TensorType]:
    data, indices = _shape(ctx, 0), _shape(ctx, 1)
    if data is None or indices is None:
        return [TensorType(_dtype(ctx, 0), None)]
    axis = _axis(ctx, int(ctx.attr("axis", 0)), len(data))
    return [TensorType(_dtype(ctx, 0), data[:axis] + indices + data[axis + 1 :])]


def _infer_gather_elements(ctx: InferenceContext) -> list[TensorType]:
    data, indices = _shape(ctx, 0), _shape(ctx, 1)
    if data is not None and indices is not None and len(data) != len(indices):
        raise _error(ctx, f"data {format_shape(data)} and indices {format_shape(indices)} have different ranks")
    if data is not None:
        _axis(ctx, int(ctx.attr("axis", 0)), len(data))
    return [TensorType(_dtype(ctx, 0), indices)]


def _infer_gather_nd(ctx: InferenceContext) -> list[TensorType]:
    data, indices = _shape(ctx, 0), _shape(ctx, 1)
    batch_dims = int(ctx.attr("batch_dims", 0))
    if data is None or indices is None:
        return [TensorType(_dtype(ctx, 0), None)]
    if not indices:
        raise _error(ctx, "indices must have rank >= 1")
    depth = indices[-1]
    if not isinstance(depth, int):
        return [TensorType(_dtype(ctx, 0), None)]
    if batch_dims + depth > len(data):
        raise _error(ctx, f"index depth {depth} + batch_dims {batch_dims} exceeds data rank {len(data)}")
    return [TensorType(_dtype(ctx, 0), indices[:-1] + data[batch_dims + depth :])]


def _infer_onehot(ctx: InferenceContext) -> list[TensorType]:
    indices = _shape(ctx, 0)
    dtype = _dtype(ctx, 2)
    if indices is None:
        return [TensorType(dtype, None)]
    axis = int(ctx.attr("axis", -1))
    rank = len(indices) + 1
    axis = _axis(ctx, axis, rank)
    depth = _scalar(ctx, 1)
    if isinstance(depth, float):
        depth = int(depth)
    if isinstance(depth, int) and depth < 0:
        raise _error(ctx, f"depth {depth} is negative")
    return [TensorType(dtype, indices[:axis] + (depth,) + indices[axis:])]


def _infer_nonzero(ctx: InferenceContext) -> list[TensorType]:
    return [TensorType(DType.INT64, (ctx.input_type(0).rank, None))]


def _infer_topk(ctx: InferenceContext) -> list[TensorType]:
    shape = _shape(ctx, 0)
    if shape is None:
        out: Shape = None
    else:
        axis = _axis(ctx, int(ctx.attr("axis", -1)), len(shape))
        k = _scalar(ctx, 1)
        if isinstance(k, int) and k < 0:
            raise _error(ctx, f"k {k} is negative")
        if isinstance(k, int) and isinstance(shape[axis], int) and k > shape[axis]:  # type: ignore[operator]
            raise _error(ctx, f"k {k} exceeds dim {shape[axis]}")
        k_dim: Dim = k if isinstance(k, (int, str)) else None
        out = shape[:axis] + (k_dim,) + shape[axis + 1 :]
    return [TensorType(_dtype(ctx, 0), out), TensorType(DType.INT64, out)]


_register(
    "Gather",
    _infer_gather,
    inputs=(2, 2),
    propagate=_propagate_gather,
    doc="Takes entries along `axis` by index tensor.",
)
_register(
    "GatherElements",
    _infer_gather_elements,
    inputs=(2, 2),
    doc="Per-element gather along `axis`; output has indices' shape.",
)
_register(
    "GatherND",
    _infer_gather_nd,
    inputs=(2, 2),
    doc="Gathers slices by index tuples in the last indices dim.",
)
_register(
    "ScatterND",
    _same_as_input,
    inputs=(3, 3),
    same=((0, 2),),
    doc="Writes updates into a copy of data at index tuples.",
)
_register(
    "ScatterElements",
    _same_as_input,
    inputs=(3, 3),
    same=((0, 2),),
    doc="Writes updates into a copy of data per element along `axis`.",
)
_register(
    "OneHot",
    _infer_onehot,
    inputs=(3, 3),
    doc="One-hot encoding with `depth` classes inserted at `axis`.",
)
_register("NonZero", _infer_nonzero, doc="Indices of non-zero elements as an int64 [rank, count] tensor.")
_register(
    "TopK",
    _infer_topk,
    inputs=(2, 2),
    outputs=(2, 2),
    doc="The k largest (or smallest) values along `axis` and their int64 indices.",
)


# --------------------------------------------------------------------------------------
# Types, shapes and constants
# --------------------------------------------------------------------------------------


def _infer_cast(ctx: InferenceContext) -> list[TensorType]:
    _required_attr(ctx, "to")
    return [TensorType(_dtype_attr(ctx, "to"), _shape(ctx, 0))]


def _propagate_cast(ctx: InferenceContext) -> Propagated:
    to = _dtype_attr(ctx, "to")
    return [ctx.input_symbolic(0) if to is not None and to.is_integer else None]


def _infer_castlike(ctx: InferenceContext) -> list[TensorType]:
    return [TensorType(_dtype(ctx, 1), _shape(ctx, 0))]


def _shape_range(ctx: InferenceContext, rank: int) -> range:
    """The dims Shape reports: [start, end) clamped like a Python slice (opset 15)."""
    return range(rank)[slice(int(ctx.attr("start", 0)), ctx.attr("end"))]


def _infer_shape(ctx: InferenceContext) -> list[TensorType]:
    rank = ctx.input_type(0).rank
    return [TensorType(DType.INT64, (None if rank is None else len(_shape_range(ctx, rank)),))]


def _propagate_shape(ctx: InferenceContext) -> Propagated:
    shape = _shape(ctx, 0)
    if shape is None:
        return [None]
    return [tuple(shape[i] for i in _shape_range(ctx, len(shape)))]


def _infer_size(ctx: InferenceContext) -> list[TensorType]:
    return [TensorType(DType.INT64, ())]


def _propagate_size(ctx: InferenceContext) -> Propagated:
    shape = _shape(ctx, 0)
    return [None if shape is None else (_product(shape),)]


def _infer_constant_of_shape(ctx: InferenceContext) -> list[TensorType]:
    value = ctx.attr("value")
    dtype = DType.FLOAT if value is None else _tensor_attr_type(value).dtype
    target = ctx.input_symbolic(0)
    if target is None:
        length = _vector_length(ctx, 0)
        return [TensorType(dtype, None if length is None else (None,) * length)]
    if any(isinstance(d, int) and d < 0 for d in target):
        raise _error(ctx, f"shape {format_shape(target)} has a negative dim")
    return [TensorType(dtype, target)]


def _propagate_constant_of_shape(ctx: InferenceContext) -> Propagated:
    value = ctx.attr("value")
    fill = None if value is None else _tensor_attr_ints(value)
    target = _static(ctx.input_symbolic(0))
    if fill is None or len(fill) != 1 or target is None or len(target) != 1 or target[0] > _MAX_PROPAGATED:
        return [None]
    return [fill * target[0]]


_CONSTANT_LISTS = {
    "value_float": (DType.FLOAT, False),
    "value_floats": (DType.FLOAT, True),
    "value_int": (DType.INT64, False),
    "value_ints": (DType.INT64, True),
    "value_string": (DType.STRING, False),
    "value_strings": (DType.STRING, True),
}


def _infer_constant(ctx: InferenceContext) -> list[TensorType]:
    value = ctx.attr("value")
    if value is not None:
        return [_tensor_attr_type(value)]
    for name, (dtype, is_list) in _CONSTANT_LISTS.items():
        given = ctx.attr(name)
        if given is not None:
            return [TensorType(dtype, (len(given),) if is_list else ())]
    if ctx.attr("sparse_value") is not None:
        dims = getattr(ctx.attr("sparse_value"), "dims", None)
        return [TensorType(None, None if dims is None else tuple(int(d) for d in dims))]
    raise _error(ctx, "no value attribute is set")


def _propagate_constant(ctx: InferenceContext) -> Propagated:
    if ctx.attr("value") is not None:
        return [_tensor_attr_ints(ctx.attr("value"))]
    if ctx.attr("value_int") is not None:
        return [(int(ctx.attr("value_int")),)]
    ints = ctx.attr("value_ints")
    if ints is not None and len(ints) <= _MAX_PROPAGATED:
        return [tuple(int(v) for v in ints)]
    return [None]


def _infer_range(ctx: InferenceContext) -> list[TensorType]:
    dtype = _first_dtype(ctx, (0, 1, 2))
    # inputs are scalars in the spec; onnxruntime also takes one-element vectors
    start, limit, delta = (_scalar(ctx, i) for i in range(3))
    length: Dim = None
    if all(isinstance(v, (int, float)) for v in (start, limit, delta)):
        if delta == 0:
            raise _error(ctx, "delta is 0")
        length = max(math.ceil((limit - start) / delta), 0)
    elif delta == 1 and not isinstance(start, float) and not isinstance(limit, float):
        length = sub_dims(limit, start) if dim_at_most(start, limit) else None
    return [TensorType(dtype, (length,))]


_register("Cast", _infer_cast, propagate=_propagate_cast, doc="Converts elements to dtype `to`.")
_register("CastLike", _infer_castlike, inputs=(2, 2), doc="Converts elements to the dtype of input 1.")
_register(
    "Shape",
    _infer_shape,
    propagate=_propagate_shape,
    doc="The input's shape as int64, dims [start, end) (opset 15).",
)
_register(
    "Size", _infer_size, propagate=_propagate_size, doc="The input's element count as an int64 scalar."
)
_register(
    "ConstantOfShape",
    _infer_constant_of_shape,
    propagate=_propagate_constant_of_shape,
    doc="A tensor of the given shape filled with `value` (default float 0).",
)
_register(
    "Constant",
    _infer_constant,
    inputs=(0, 0),
    propagate=_propagate_constant,
    doc="A constant from `value`, `value_int(s)`, `value_float(s)` or `value_string(s)`.",
)
_register(
    "Range",
    _infer_range,
    inputs=(3, 3),
    same=((0, 1, 2),),
    doc="1-D sequence start, start+delta, ... before limit.",
)


# --------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------


def _infer_reduce(ctx: InferenceContext) -> list[TensorType]:
    dtype, shape = _dtype(ctx, 0), _shape(ctx, 0)
    keepdims = bool(ctx.attr("keepdims", 1))
    given, axes = _list_arg(ctx, 1, "axes")
    if shape is None:
        return [TensorType(dtype, None)]
    if given and _static(axes) is None:
        return [TensorType(dtype, tuple(1 if d == 1 else None for d in shape) if keepdims else None)]
    if not given or not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return [TensorType(dtype, shape)]
        reduced = set(range(len(shape)))
    else:
        reduced = set(_axes(ctx, axes, len(shape)))  # type: ignore[arg-type]
    if keepdims:
        return [TensorType(dtype, tuple(1 if i in reduced else d for i, d in enumerate(shape)))]
    return [TensorType(dtype, tuple(d for i, d in enumerate(shape) if i not in reduced))]


def _infer_arg_reduce(ctx: InferenceContext) -> list[TensorType]:
    shape = _shape(ctx, 0)
    if shape is None:
        return [TensorType(DType.INT64, None)]
    axis = _axis(ctx, int(ctx.attr("axis", 0)), len(shape))
    if ctx.attr("keepdims", 1):
        return [TensorType(DType.INT64, shape[:axis] + (1,) + shape[axis + 1 :])]
    return [TensorType(DType.INT64, shape[:axis] + shape[axis + 1 :])]


for _name, _what in {
    "ReduceMean": "Mean",
    "ReduceSum": "Sum",
    "ReduceMax": "Maximum",
    "ReduceMin": "Minimum",
    "ReduceProd": "Product",
    "ReduceL1": "Sum of absolute values",
    "ReduceL2": "Euclidean norm",
    "ReduceSumSquare": "Sum of squares",
    "ReduceLogSum": "Log of the sum",
    "ReduceLogSumExp": "Log of the sum of exponentials",
}.items():
    _since = 13 if _name == "ReduceSum" else 18
    _register(_name, _infer_reduce, inputs=(1, 2), doc=f"{_what} over `axes` (an input since opset {_since}).")
_register("ArgMax", _infer_arg_reduce, doc="int64 index of the maximum along `axis`.")
_register("ArgMin", _infer_arg_reduce, doc="int64 index of the minimum along `axis`.")


# --------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------


def _infer_layer_norm(ctx: InferenceContext) -> list[TensorType]:
    x = ctx.input_type(0)
    stats_dtype = _dtype_attr(ctx, "stash_type", DType.FLOAT)
    stats_shape: Shape = None
    if x.shape is not None:
        axis = _axis(ctx, int(ctx.attr("axis", -1)), len(x.shape))
        stats_shape = x.shape[:axis] + (1,) * (len(x.shape) - axis)
    stats = TensorType(stats_dtype, stats_shape)
    return [x, stats, stats][: ctx.num_outputs]


def _infer_batch_norm(ctx: InferenceContext) -> list[TensorType]:
    x = _shape(ctx, 0)
    channels: Dim = None
    if x is not None:
        if len(x) < 2:
            raise _error(ctx, f"X must have rank >= 2, got {format_shape(x)}")
        channels = x[1]
    stats = TensorType(_first_dtype(ctx, (3, 4)), (channels,))
    return [ctx.input_type(0), stats, stats][: ctx.num_outputs]


_register(
    "LayerNormalization",
    _infer_layer_norm,
    inputs=(2, 3),
    outputs=(1, 3),
    same=((0, 1, 2),),
    doc="Normalizes over dims from `axis`; optional Mean/InvStdDev in `stash_type`.",
)
_register(
    "BatchNormalization",
    _infer_batch_norm,
    inputs=(5, 5),
    outputs=(1, 3),
    same=((1, 2), (3, 4)),
    doc="Per-channel normalization with running statistics (optional outputs in training mode).",
)
_register(
    "InstanceNormalization",
    _same_as_input,
    inputs=(3, 3),
    same=((0, 1, 2),),
    doc="Per-instance, per-channel normalization.",
)
_register(
    "GroupNormalization",
    _same_as_input,
    inputs=(3, 3),
    same=((0, 1, 2),),
    doc="Normalization over channel groups (`num_groups`).",
)
_register("LpNormalization", _same_as_input, doc="Lp-normalizes along `axis`.")
_register(
    "MeanVarianceNormalization",
    _same_as_input,
    doc="Zero-mean, unit-variance normalization over `axes`.",
)


# --------------------------------------------------------------------------------------
# Opset 23/24 Transformer ops: Attention, RMSNormalization, RotaryEmbedding
# --------------------------------------------------------------------------------------


def _heads_split(ctx: InferenceContext, index: int, heads: Any, what: str) -> tuple[Dim, Dim, Dim, Dim]:
    """Input `index` as (batch, heads, seq, head_size): a 4-D input as it is, a 3-D
    [batch, seq, heads * head_size] input split by attribute `heads`."""
    shape = _shape(ctx, index)
    if shape is None:
        return (None, None, None, None)
    if len(shape) == 4:
        if isinstance(heads, int) and isinstance(shape[1], int) and shape[1] != heads:
            raise _error(ctx, f"{what} has {shape[1]} heads, attribute says {heads}")
        return shape  # type: ignore[return-value]
    if len(shape) != 3:
        raise _error(ctx, f"{what} must have rank 3 or 4, got {format_shape(shape)}")
    if not isinstance(heads, int) or heads <= 0:
        raise _error(ctx, f"3-D {what} {format_shape(shape)} needs a positive head-count attribute")
    hidden = shape[2]
    if isinstance(hidden, int) and hidden % heads:
        raise _error(ctx, f"{what} hidden size {hidden} is not a multiple of {heads} heads")
    return (shape[0], heads, shape[1], floordiv_dims(hidden, heads))


def _infer_attention(ctx: InferenceContext) -> list[TensorType]:
    ranks = {len(shape) for shape in (_shape(ctx, i) for i in range(3)) if shape is not None}
    if len(ranks) > 1:
        raise _error(ctx, "Q, K and V must all be 3-D or all be 4-D")
    if ctx.has_input(4) != ctx.has_input(5):
        raise _error(ctx, "past_key and past_value must be given together")
    q_heads, kv_heads = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
    batch, heads, q_len, _ = _heads_split(ctx, 0, q_heads, "Q")
    _, k_heads, kv_len, k_size = _heads_split(ctx, 1, kv_heads, "K")
    _, _, _, v_size = _heads_split(ctx, 2, kv_heads, "V")
    if isinstance(heads, int) and isinstance(k_heads, int) and heads % k_heads:
        raise _error(ctx, f"{heads} query heads are not a multiple of {k_heads} key/value heads")
    past = _shape(ctx, 4) if ctx.has_input(4) else (None, None, 0, None)
    total = add_dims(past[2], kv_len) if past is not None and len(past) == 4 else None
    q_dtype, v_dtype = _first_dtype(ctx, (0, 1, 4)), _first_dtype(ctx, (2, 5))
    if ranks == {3}:
        hidden = _product([heads, v_size])
        y = TensorType(q_dtype, (batch, q_len, hidden))
    elif ranks == {4}:
        y = TensorType(q_dtype, (batch, heads, q_len, v_size))
    else:
        y = TensorType(q_dtype, None)
    present_key = TensorType(q_dtype, (batch, k_heads, total, k_size))
    present_value = TensorType(v_dtype, (batch, k_heads, total, v_size))
    scores = TensorType(q_dtype, (batch, heads, q_len, total))
    return [y, present_key, present_value, scores][: ctx.num_outputs]


def _infer_rms_norm(ctx: InferenceContext) -> list[TensorType]:
    x = ctx.input_type(0)
    if x.shape is not None:
        _axis(ctx, int(ctx.attr("axis", -1)), len(x.shape))
    return [TensorType(_first_dtype(ctx, (1, 0)), x.shape)]


def _infer_rotary(ctx: InferenceContext) -> list[TensorType]:
    shape = _shape(ctx, 0)
    if shape is not None:
        if len(shape) not in (3, 4):
            raise _error(ctx, f"X must have rank 3 or 4, got {format_shape(shape)}")
        if len(shape) == 3:
            _heads_split(ctx, 0, ctx.attr("num_heads"), "X")
    rotary = int(ctx.attr("rotary_embedding_dim", 0))
    if rotary % 2:
        raise _error(ctx, f"rotary_embedding_dim {rotary} is odd")
    return [ctx.input_type(0)]


_register(
    "Attention",
    _infer_attention,
    inputs=(3, 7),
    outputs=(1, 4),
    same=((0, 1, 4), (2, 5)),
    doc="Scaled dot-product attention (opset 23/24): 3-D or 4-D Q/K/V, GQA, causal, mask, KV cache, softcap.",
)
_register(
    "RMSNormalization",
    _infer_rms_norm,
    inputs=(2, 2),
    doc="Root-mean-square normalization over dims from `axis`, statistics in `stash_type` (opset 23).",
)
_register(
    "RotaryEmbedding",
    _infer_rotary,
    inputs=(3, 4),
    same=((0, 1, 2),),
    doc="Rotary position embedding of 3-D or 4-D X from cos/sin caches (opset 23).",
)


# --------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------


def _infer_quantize(ctx: InferenceContext) -> list[TensorType]:
    # output_dtype (opset 21) defaults to 0, "not set"
    requested = _dtype_attr(ctx, "output_dtype") if ctx.attr("output_dtype", 0) else None
    if not ctx.has_input(2):
        return [TensorType(requested or DType.UINT8, _shape(ctx, 0))]
    zero_point = _dtype(ctx, 2)
    if requested is not None and zero_point is not None and zero_point != requested:
        raise _error(ctx, f"output_dtype {requested.name} differs from the zero point's {zero_point.name}")
    return [TensorType(zero_point or requested, _shape(ctx, 0))]


def _infer_dequantize(ctx: InferenceContext) -> list[TensorType]:
    dtype = DType.FLOAT if ctx.opset < 19 else _dtype(ctx, 1)
    return [TensorType(dtype, _shape(ctx, 0))]


def _infer_dynamic_quantize(ctx: InferenceContext) -> list[TensorType]:
    return [
        TensorType(DType.UINT8, _shape(ctx, 0)),
        TensorType(DType.FLOAT, ()),
        TensorType(DType.UINT8, ()),
    ]


_register(
    "QuantizeLinear",
    _infer_quantize,
    inputs=(2, 3),
    doc="Quantizes to the zero point's dtype, else `output_dtype`, else uint8.",
)
_register(
    "DequantizeLinear",
    _infer_dequantize,
    inputs=(2, 3),
    same=((0, 2),),
    doc="Dequantizes to the scale's dtype (float before opset 19).",
)
_register(
    "DynamicQuantizeLinear",
    _infer_dynamic_quantize,
    outputs=(3, 3),
    doc="Quantizes to uint8 with a computed scalar scale and zero point.",
)


# --------------------------------------------------------------------------------------
# Random ops (impure)
# --------------------------------------------------------------------------------------


def _infer_random_like(ctx: InferenceContext) -> list[TensorType]:
    dtype = _dtype_attr(ctx, "dtype") if ctx.attr("dtype") is not None else _dtype(ctx, 0)
    return [TensorType(dtype, _shape(ctx, 0))]


def _infer_random(ctx: InferenceContext) -> list[TensorType]:
    return [TensorType(_dtype_attr(ctx, "dtype", DType.FLOAT), _ints_attr(ctx, "shape"))]


def _infer_multinomial(ctx: InferenceContext) -> list[TensorType]:
    shape = _shape(ctx, 0)
    if shape is not None and len(shape) != 2:
        raise _error(ctx, f"input must be [batch, classes], got {format_shape(shape)}")
    batch = None if shape is None else shape[0]
    dtype = _dtype_attr(ctx, "dtype", DType.INT32)
    return [TensorType(dtype, (batch, int(ctx.attr("sample_size", 1))))]


_register(
    "RandomNormalLike",
    _infer_random_like,
    pure=False,
    doc="Normal samples shaped like the input (`dtype` or the input's).",
)
_register(
    "RandomUniformLike",
    _infer_random_like,
    pure=False,
    doc="Uniform samples shaped like the input (`dtype` or the input's).",
)
_register(
    "RandomNormal",
    _infer_random,
    inputs=(0, 0),
    pure=False,
    doc="Normal samples of attribute `shape`.",
)
_register(
    "RandomUniform",
    _infer_random,
    inputs=(0, 0),
    pure=False,
    doc="Uniform samples of attribute `shape`.",
)
_register("Bernoulli", _infer_random_like, pure=False, doc="0/1 samples with the input's probabilities.")
_register(
    "Multinomial",
    _infer_multinomial,
    pure=False,
    doc="Class samples per batch row from unnormalized log-probabilities.",
)
