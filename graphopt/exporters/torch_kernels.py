"""PyTorch implementations of ONNX operator semantics.

The exporter turns an ONNX-semantics graph into a runnable ``torch.fx``
GraphModule by emitting one ``call_function`` node per ONNX node, whose target
is the kernel found here.  Kernel conventions:

* A kernel is a module-level function ``onnx_<OpType>``.
* The node's inputs are passed positionally; a missing optional input is None.
* The node's attributes are passed as keyword arguments with their ONNX names
  and ONNX defaults, as Python values (int, float, str, lists of those, numpy
  arrays for TENSOR attributes).
* Where ONNX moved an attribute to an input (Squeeze/Unsqueeze/Reduce* ``axes``,
  Split ``split``, Clip ``min``/``max``, Pad ``pads``, Slice, TopK ``k``) the
  names are the same, so one parameter accepts either form.
* Single-output ops return a tensor; ops in ``MULTI_OUTPUT_OPS`` (any domain) and
  ``MULTI_OUTPUT_KERNELS`` ((domain, op) pairs: ONNX's and graphopt's Attention) return a tuple
  holding every output (unused optional outputs may be None).
* Ops in ``OPSET_SENSITIVE_OPS`` also take a keyword-only ``opset``.
* Split without ``split`` before opset 18 needs the node's output count, which
  the caller passes as ``num_outputs`` (the opset-18 attribute of that meaning).

Shape-like inputs (Reshape, Expand, Tile, ...) are int64 tensors read with
``.tolist()``, so the kernels run eagerly rather than under symbolic tracing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from graphopt.exporters.graphopt_kernels import GRAPHOPT_KERNELS
from graphopt.exporters.onnx23_kernels import MULTI_OUTPUT_KERNELS as ONNX23_MULTI_OUTPUT_KERNELS, ONNX23_KERNELS
from graphopt.ir.dtypes import torch_dtypes

_IntsLike = Tensor | Sequence[int] | int | None

_ONNX_DTYPES: dict[int, torch.dtype] = {int(dtype): torch_dtype for dtype, torch_dtype in torch_dtypes().items()}
"""ONNX data-type number: torch dtype (graphopt.ir.dtypes.torch_dtypes keyed by number)."""

_FLOAT8_DTYPES = frozenset(
    {torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz}
)

# Types numpy only knows through ml_dtypes; float32 holds all their values.
_ML_DTYPE_NAMES = frozenset({"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"})

# float8_e4m3fn has no infinity: without saturation, values rounding past its
# maximum (448, plus half an ulp of 32) become NaN.  torch always saturates it.
_E4M3FN_OVERFLOW = 464.0

_QUANT_RANGES: dict[torch.dtype, tuple[int, int]] = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.uint16: (0, 65535),
    torch.int16: (-32768, 32767),
}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _torch_dtype(op: str, attr: str, onnx_dtype: int) -> torch.dtype:
    if onnx_dtype not in _ONNX_DTYPES:
        raise ValueError(f"{op}: unsupported {attr}={onnx_dtype} (ONNX TensorProto dtype)")
    return _ONNX_DTYPES[onnx_dtype]


def _from_numpy(array: np.ndarray) -> Tensor:
    """Copy a numpy array (ml_dtypes bfloat16/float8 included) into a tensor."""
    array = np.asarray(array)
    if array.dtype.name in _ML_DTYPE_NAMES:
        return torch.from_numpy(array.astype(np.float32)).to(getattr(torch, array.dtype.name))
    return torch.from_numpy(array.copy())


def _int_list(value: _IntsLike) -> list[int] | None:
    """Read an int attribute, list attribute or int tensor input as a list."""
    if value is None:
        return None
    if isinstance(value, (Tensor, np.ndarray)):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _per_channel(t: Tensor, rank: int) -> Tensor:
    """Reshape a (C,) tensor to broadcast against an (N, C, ...) tensor."""
    return t.reshape(-1, *([1] * (rank - 2)))


def _torch_pads(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] order to F.pad's last-dimension-first order."""
    return [p for b, e in zip(reversed(begins), reversed(ends)) for p in (b, e)]


_INT64_MIN = torch.iinfo(torch.int64).min
_WIDENED_UNSIGNED = frozenset({torch.uint16, torch.uint32})


def _on_unsigned(kind: str, typed_outputs: tuple[int, ...] = (0,)) -> Callable[[Callable], Callable]:
    """Run a kernel on uint16/uint32/uint64 tensors, for which torch has few CPU kernels,
    through int64, exactly.

    uint16/uint32 tensor arguments become int64 holding the same values; outputs at
    `typed_outputs` (those of the input type) are cast back, which wraps modulo 2**bits.
    uint64 arguments become int64 too where that is exact: for ``kind="modular"`` ops
    (add, sub, mul and their sums and products) the same bits; for ``kind="ordered"`` ops
    (comparisons, min/max, sorts) the bits with the sign bit flipped, which keeps the order.
    ``kind="value"`` ops (division) only widen uint16/uint32.
    """

    def wrap(kernel: Callable) -> Callable:
        @functools.wraps(kernel)
        def widened(*args: object, **kwargs: object) -> object:
            dtype = next((a.dtype for a in args if isinstance(a, Tensor) and a.dtype in _UNSIGNED_DTYPES), None)
            if dtype is None or (dtype == torch.uint64 and kind == "value"):
                return kernel(*args, **kwargs)
            result = kernel(*(_unsigned_to_int64(a, dtype, kind) for a in args), **kwargs)
            if isinstance(result, tuple):
                return tuple(_int64_to_unsigned(r, dtype, kind) if i in typed_outputs else r for i, r in enumerate(result))
            return _int64_to_unsigned(result, dtype, kind) if 0 in typed_outputs else result

        return widened

    return wrap


_UNSIGNED_DTYPES = frozenset({torch.uint16, torch.uint32, torch.uint64})


def _unsigned_to_int64(arg: object, dtype: torch.dtype, kind: str) -> object:
    if not isinstance(arg, Tensor) or arg.dtype != dtype:
        return arg
    if dtype in _WIDENED_UNSIGNED:
        return arg.to(torch.int64)
    signed = arg.view(torch.int64)
    return signed ^ _INT64_MIN if kind == "ordered" else signed


def _int64_to_unsigned(result: Tensor, dtype: torch.dtype, kind: str) -> Tensor:
    if dtype in _WIDENED_UNSIGNED:
        return result.to(dtype)
    return (result ^ _INT64_MIN if kind == "ordered" else result).view(dtype)


def _cast(x: Tensor, dtype: torch.dtype, saturate: int, round_mode: str = "up") -> Tensor:
    if dtype == torch.float8_e8m0fnu and x.dtype != dtype:
        return _to_e8m0(x, saturate, round_mode)
    if dtype in _FLOAT8_DTYPES and x.dtype not in _FLOAT8_DTYPES:
        x = x if x.is_floating_point() else x.float()
        limit = torch.finfo(dtype).max
        if saturate:
            x = x.clamp(-limit, limit)
        elif dtype == torch.float8_e4m3fn:
            x = torch.where(x.abs() > _E4M3FN_OVERFLOW, torch.nan, x)
    return x.to(dtype)


CAST_ROUND_MODES = ("up", "down", "nearest")


def _to_e8m0(x: Tensor, saturate: int, round_mode: str) -> Tensor:
    """float8e8m0 (a power of two, its biased exponent stored in a byte) from x's float32
    bits, as the ONNX reference does: the exponent is rounded up when ``round_mode`` says so
    (``up``: any fraction; ``nearest``: half or more), stopping at 2**127 if ``saturate``;
    NaN and infinities become NaN (0xFF); the sign is ignored."""
    if round_mode not in CAST_ROUND_MODES:
        raise ValueError(f"Cast: unsupported round_mode={round_mode!r}")
    bits = x.to(torch.float32).view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    if round_mode == "up":
        up = (bits & 0x7FFFFF) != 0
    elif round_mode == "nearest":
        up = ((bits & 0x400000) != 0) & (((bits & 0x3FFFFF) != 0) | (exponent > 0))
    else:
        up = torch.zeros_like(exponent, dtype=torch.bool)
    special = exponent == 0xFF
    up = up & ~special
    if saturate:
        up = up & (exponent != 0xFE)
    exponent = torch.where(special, 0xFF, exponent + up.to(torch.int32))
    return exponent.to(torch.uint8).view(torch.float8_e8m0fnu)


# ---------------------------------------------------------------------------
# Elementwise arithmetic
# ---------------------------------------------------------------------------


@_on_unsigned("modular")
def onnx_Add(a: Tensor, b: Tensor) -> Tensor:
    return torch.add(a, b)


@_on_unsigned("modular")
def onnx_Sub(a: Tensor, b: Tensor) -> Tensor:
    return torch.sub(a, b)


@_on_unsigned("modular")
def onnx_Mul(a: Tensor, b: Tensor) -> Tensor:
    return torch.mul(a, b)


@_on_unsigned("value")
def onnx_Div(a: Tensor, b: Tensor) -> Tensor:
    """Integer division truncates toward zero, like C (and the ONNX reference)."""
    if a.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


@_on_unsigned("value")
def onnx_Mod(a: Tensor, b: Tensor, *, fmod: int = 0) -> Tensor:
    """fmod=0: result takes the divisor's sign; fmod=1: the dividend's (C fmod)."""
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def onnx_Pow(x: Tensor, y: Tensor) -> Tensor:
    """The result has the base's dtype, whatever the exponent's dtype."""
    if not x.is_floating_point() and y.is_floating_point():
        return torch.pow(x.double(), y.double()).to(x.dtype)
    return torch.pow(x, y).to(x.dtype)


def onnx_Neg(x: Tensor) -> Tensor:
    return torch.neg(x)


def onnx_Abs(x: Tensor) -> Tensor:
    """The identity on unsigned types (torch has no abs kernel for uint16/32/64)."""
    return x if x.dtype in _UNSIGNED_DTYPES else torch.abs(x)


def onnx_Sign(x: Tensor) -> Tensor:
    return torch.sign(x)


def onnx_Reciprocal(x: Tensor) -> Tensor:
    return torch.reciprocal(x)


def onnx_Floor(x: Tensor) -> Tensor:
    return torch.floor(x)


def onnx_Ceil(x: Tensor) -> Tensor:
    return torch.ceil(x)


def onnx_Round(x: Tensor) -> Tensor:
    """Rounds half to even, as torch.round does."""
    return torch.round(x)


def onnx_Sqrt(x: Tensor) -> Tensor:
    return torch.sqrt(x)


def onnx_Exp(x: Tensor) -> Tensor:
    return torch.exp(x)


def onnx_Log(x: Tensor) -> Tensor:
    return torch.log(x)


def onnx_Sin(x: Tensor) -> Tensor:
    return torch.sin(x)


def onnx_Cos(x: Tensor) -> Tensor:
    return torch.cos(x)


def onnx_Erf(x: Tensor) -> Tensor:
    return torch.erf(x)


def onnx_Tan(x: Tensor) -> Tensor:
    return torch.tan(x)


def onnx_Asin(x: Tensor) -> Tensor:
    return torch.asin(x)


def onnx_Acos(x: Tensor) -> Tensor:
    return torch.acos(x)


def onnx_Atan(x: Tensor) -> Tensor:
    return torch.atan(x)


def onnx_Sinh(x: Tensor) -> Tensor:
    return torch.sinh(x)


def onnx_Cosh(x: Tensor) -> Tensor:
    return torch.cosh(x)


def onnx_Asinh(x: Tensor) -> Tensor:
    return torch.asinh(x)


def onnx_Acosh(x: Tensor) -> Tensor:
    return torch.acosh(x)


def onnx_Atanh(x: Tensor) -> Tensor:
    return torch.atanh(x)


def onnx_BitwiseAnd(a: Tensor, b: Tensor) -> Tensor:
    return torch.bitwise_and(a, b)


def onnx_BitwiseOr(a: Tensor, b: Tensor) -> Tensor:
    return torch.bitwise_or(a, b)


def onnx_BitwiseXor(a: Tensor, b: Tensor) -> Tensor:
    return torch.bitwise_xor(a, b)


@_on_unsigned("modular")
def onnx_BitwiseNot(x: Tensor) -> Tensor:
    return torch.bitwise_not(x)


def onnx_BitShift(x: Tensor, y: Tensor, *, direction: str) -> Tensor:
    """Logical shifts of unsigned integers (uint16/uint32 through int64; uint64 on its bits,
    its right shift made logical by clearing the sign bit after a first one-bit shift)."""
    if direction not in ("LEFT", "RIGHT"):
        raise ValueError(f"BitShift: unsupported direction={direction!r}")
    if x.dtype in _WIDENED_UNSIGNED:
        return onnx_BitShift(x.to(torch.int64), y.to(torch.int64), direction=direction).to(x.dtype)
    if x.dtype == torch.uint64:
        bits, shift = x.view(torch.int64), y.view(torch.int64)
        if direction == "LEFT":
            return (bits << shift).view(torch.uint64)
        logical = ((bits >> 1) & torch.iinfo(torch.int64).max) >> (shift - 1).clamp(min=0)
        return torch.where(shift == 0, bits, logical).view(torch.uint64)
    return x << y if direction == "LEFT" else x >> y


@_on_unsigned("ordered")
def onnx_Min(*inputs: Tensor) -> Tensor:
    return functools.reduce(torch.minimum, inputs)


@_on_unsigned("ordered")
def onnx_Max(*inputs: Tensor) -> Tensor:
    return functools.reduce(torch.maximum, inputs)


def onnx_Sum(*inputs: Tensor) -> Tensor:
    return functools.reduce(torch.add, inputs)


def onnx_Mean(*inputs: Tensor) -> Tensor:
    return onnx_Sum(*inputs) / len(inputs)


@_on_unsigned("ordered")
def onnx_Clip(x: Tensor, min: Tensor | float | None = None, max: Tensor | float | None = None) -> Tensor:  # noqa: A002
    """``min``/``max`` are attributes before opset 11 and optional inputs after."""
    if min is None and max is None:
        return x
    return torch.clamp(x, min=min, max=max)


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def onnx_Relu(x: Tensor) -> Tensor:
    return torch.relu(x)


def onnx_Sigmoid(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def onnx_Tanh(x: Tensor) -> Tensor:
    return torch.tanh(x)


def onnx_LeakyRelu(x: Tensor, *, alpha: float = 0.01) -> Tensor:
    return F.leaky_relu(x, alpha)


def onnx_PRelu(x: Tensor, slope: Tensor) -> Tensor:
    return torch.where(x < 0, x * slope, x)


def onnx_Elu(x: Tensor, *, alpha: float = 1.0) -> Tensor:
    return torch.where(x < 0, alpha * (torch.exp(x) - 1), x)


def onnx_Selu(x: Tensor, *, alpha: float = 1.67326319217681884765625, gamma: float = 1.05070102214813232421875) -> Tensor:
    return gamma * torch.where(x > 0, x, alpha * torch.exp(x) - alpha)


def onnx_HardSigmoid(x: Tensor, *, alpha: float = 0.2, beta: float = 0.5) -> Tensor:
    return torch.clamp(alpha * x + beta, 0, 1)


def onnx_HardSwish(x: Tensor) -> Tensor:
    return x * onnx_HardSigmoid(x, alpha=1 / 6, beta=0.5)


def onnx_Softplus(x: Tensor) -> Tensor:
    return F.softplus(x)


def onnx_Mish(x: Tensor) -> Tensor:
    return x * torch.tanh(F.softplus(x))


def onnx_Softsign(x: Tensor) -> Tensor:
    return x / (1 + x.abs())


def onnx_ThresholdedRelu(x: Tensor, *, alpha: float = 1.0) -> Tensor:
    return torch.where(x > alpha, x, torch.zeros((), dtype=x.dtype, device=x.device))


def onnx_Celu(x: Tensor, *, alpha: float = 1.0) -> Tensor:
    """max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""
    return torch.clamp(x, min=0) + torch.clamp(alpha * torch.expm1(x / alpha), max=0)


def onnx_Swish(x: Tensor, *, alpha: float = 1.0) -> Tensor:
    return x * torch.sigmoid(alpha * x)


def onnx_Shrink(x: Tensor, *, bias: float = 0.0, lambd: float = 0.5) -> Tensor:
    """Computed in float64 for integer inputs and cast back (truncating), as the reference does."""
    wide = x if x.is_floating_point() else x.to(torch.float64)
    zero = torch.zeros((), dtype=wide.dtype, device=x.device)
    return torch.where(wide < -lambd, wide + bias, torch.where(wide > lambd, wide - bias, zero)).to(x.dtype)


def onnx_Gelu(x: Tensor, *, approximate: str = "none") -> Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"Gelu: unsupported approximate={approximate!r}")
    return F.gelu(x, approximate=approximate)


def _hardmax(x: Tensor, dim: int) -> Tensor:
    return torch.zeros_like(x).scatter(dim, x.argmax(dim, keepdim=True), 1)


def _softmax_family(fn: Callable[[Tensor, int], Tensor], x: Tensor, axis: int | None, opset: int) -> Tensor:
    """From opset 13 the op works along ``axis`` (default -1); before, on the
    input coerced to 2-D as [prod(shape[:axis]), prod(shape[axis:])] (default axis 1)."""
    if opset >= 13:
        return fn(x, -1 if axis is None else axis)
    axis = _axis(1 if axis is None else axis, x.dim())
    rows, cols = math.prod(x.shape[:axis]), math.prod(x.shape[axis:])
    return fn(x.reshape(rows, cols), 1).reshape(x.shape)


def onnx_Softmax(x: Tensor, *, axis: int | None = None, opset: int = 21) -> Tensor:
    return _softmax_family(torch.softmax, x, axis, opset)


def onnx_LogSoftmax(x: Tensor, *, axis: int | None = None, opset: int = 21) -> Tensor:
    return _softmax_family(torch.log_softmax, x, axis, opset)


def onnx_Hardmax(x: Tensor, *, axis: int | None = None, opset: int = 21) -> Tensor:
    return _softmax_family(_hardmax, x, axis, opset)


# ---------------------------------------------------------------------------
# Comparison and logic
# ---------------------------------------------------------------------------


def onnx_Equal(a: Tensor, b: Tensor) -> Tensor:
    return torch.eq(a, b)


@_on_unsigned("ordered", ())
def onnx_Less(a: Tensor, b: Tensor) -> Tensor:
    return torch.lt(a, b)


@_on_unsigned("ordered", ())
def onnx_LessOrEqual(a: Tensor, b: Tensor) -> Tensor:
    return torch.le(a, b)


@_on_unsigned("ordered", ())
def onnx_Greater(a: Tensor, b: Tensor) -> Tensor:
    return torch.gt(a, b)


@_on_unsigned("ordered", ())
def onnx_GreaterOrEqual(a: Tensor, b: Tensor) -> Tensor:
    return torch.ge(a, b)


def onnx_Not(x: Tensor) -> Tensor:
    return torch.logical_not(x)


def onnx_And(a: Tensor, b: Tensor) -> Tensor:
    return torch.logical_and(a, b)


def onnx_Or(a: Tensor, b: Tensor) -> Tensor:
    return torch.logical_or(a, b)


def onnx_Xor(a: Tensor, b: Tensor) -> Tensor:
    return torch.logical_xor(a, b)


def onnx_IsNaN(x: Tensor) -> Tensor:
    return torch.isnan(x)


def onnx_IsInf(x: Tensor, *, detect_negative: int = 1, detect_positive: int = 1) -> Tensor:
    return (torch.isposinf(x) & bool(detect_positive)) | (torch.isneginf(x) & bool(detect_negative))


def onnx_Where(condition: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return torch.where(condition, x, y)


# ---------------------------------------------------------------------------
# Linear algebra
# ---------------------------------------------------------------------------


def onnx_MatMul(a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


def onnx_Gemm(
    a: Tensor, b: Tensor, c: Tensor | None = None, *, alpha: float = 1.0, beta: float = 1.0, transA: int = 0, transB: int = 0
) -> Tensor:
    a = a.t() if transA else a
    b = b.t() if transB else b
    y = alpha * torch.matmul(a, b)
    if c is not None:
        y = y + beta * c
    return y.to(a.dtype)


def onnx_Det(x: Tensor) -> Tensor:
    return torch.linalg.det(x)


def onnx_Einsum(*inputs: Tensor, equation: str) -> Tensor:
    return torch.einsum(equation.replace(" ", ""), *inputs)


def onnx_MatMulInteger(
    a: Tensor, b: Tensor, a_zero_point: Tensor | None = None, b_zero_point: Tensor | None = None
) -> Tensor:
    """int32 product of (a - a_zero_point) and (b - b_zero_point); a's zero point
    may be per row (shape [M]) and b's per column (shape [N])."""
    a = a.to(torch.int32)
    b = b.to(torch.int32)
    if a_zero_point is not None:
        zero = a_zero_point.to(torch.int32)
        a = a - (zero.reshape(-1, 1) if zero.dim() == 1 else zero)
    if b_zero_point is not None:
        b = b - b_zero_point.to(torch.int32)
    return torch.matmul(a, b)


def _conv_pads(
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    auto_pad: str,
    pads: Sequence[int] | None,
) -> tuple[list[int], list[int]]:
    """Begin and end padding of each spatial axis."""
    n = len(spatial)
    if auto_pad == "NOTSET":
        pads = list(pads) if pads else [0] * (2 * n)
        return pads[:n], pads[n:]
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"Conv: unsupported auto_pad={auto_pad!r}")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins, ends


_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def onnx_Conv(
    x: Tensor,
    w: Tensor,
    b: Tensor | None = None,
    *,
    auto_pad: str = "NOTSET",
    dilations: list[int] | None = None,
    group: int = 1,
    kernel_shape: list[int] | None = None,
    pads: list[int] | None = None,
    strides: list[int] | None = None,
) -> Tensor:
    n = x.dim() - 2
    if n not in _CONV_FNS:
        raise ValueError(f"Conv: unsupported input rank {x.dim()}")
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    kernel = kernel_shape or list(w.shape[2:])
    begins, ends = _conv_pads(x.shape[2:], kernel, strides, dilations, auto_pad, pads)
    if begins != ends:
        x = F.pad(x, _torch_pads(begins, ends))
        begins = [0] * n
    return _CONV_FNS[n](x, w, b, stride=strides, padding=begins, dilation=dilations, groups=group)


# ---------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------


def onnx_LayerNormalization(
    x: Tensor, scale: Tensor, b: Tensor | None = None, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics are computed (and returned) in the stash type; Y has x's dtype. A float32 x
    with float32 scale and bias of the normalized shape runs as one fused `native_layer_norm`."""
    dims = list(range(_axis(axis, x.dim()), x.dim()))
    normalized = x.shape[dims[0]:] if dims else ()
    if (
        dims and stash_type == 1 and x.dtype == torch.float32 and scale.dtype == torch.float32
        and scale.shape == normalized and (b is None or (b.dtype == torch.float32 and b.shape == normalized))
    ):
        return torch.native_layer_norm(x, list(normalized), scale, b, epsilon)
    stashed = x.to(_torch_dtype("LayerNormalization", "stash_type", stash_type))
    mean = stashed.mean(dims, keepdim=True)
    centered = stashed - mean
    inv_std_dev = torch.reciprocal(torch.sqrt((centered * centered).mean(dims, keepdim=True) + epsilon))
    y = (centered * inv_std_dev).to(x.dtype) * scale
    if b is not None:
        y = y + b
    return y, mean, inv_std_dev


def onnx_BatchNormalization(
    x: Tensor,
    scale: Tensor,
    b: Tensor,
    input_mean: Tensor,
    input_var: Tensor,
    *,
    epsilon: float = 1e-5,
    momentum: float = 0.9,
    training_mode: int = 0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Outputs (Y, running_mean, running_var); the running stats only in training mode."""
    rank = x.dim()
    if not training_mode:
        mean, var = input_mean, input_var
    else:
        dims = [d for d in range(rank) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    y = _per_channel(scale, rank) * (x - _per_channel(mean, rank)) / torch.sqrt(_per_channel(var, rank) + epsilon)
    y = y + _per_channel(b, rank)
    if not training_mode:
        return y, None, None
    running_mean = input_mean * momentum + mean * (1 - momentum)
    running_var = input_var * momentum + var * (1 - momentum)
    return y, running_mean, running_var


def onnx_InstanceNormalization(x: Tensor, scale: Tensor, b: Tensor, *, epsilon: float = 1e-5) -> Tensor:
    dims = list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    rank = x.dim()
    return _per_channel(scale, rank) * (x - mean) / torch.sqrt(var + epsilon) + _per_channel(b, rank)


def onnx_GroupNormalization(
    x: Tensor, scale: Tensor, bias: Tensor, *, num_groups: int, epsilon: float = 1e-5, stash_type: int = 1
) -> Tensor:
    """scale/bias hold one value per group (opset 18) or per channel (opset 21);
    the two coincide when num_groups equals the channel count."""
    channels = x.shape[1]
    grouped = x.reshape(x.shape[0], num_groups, -1).to(_torch_dtype("GroupNormalization", "stash_type", stash_type))
    mean = grouped.mean(-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(-1, keepdim=True)
    normalized = ((grouped - mean) / torch.sqrt(var + epsilon)).reshape(x.shape).to(x.dtype)
    if scale.numel() != channels:
        scale = scale.repeat_interleave(channels // num_groups)
        bias = bias.repeat_interleave(channels // num_groups)
    return normalized * _per_channel(scale, x.dim()) + _per_channel(bias, x.dim())


def onnx_MeanVarianceNormalization(x: Tensor, *, axes: list[int] | None = None) -> Tensor:
    """(x - E[x]) / (sqrt(E[x^2] - E[x]^2) + 1e-9) over ``axes`` (default [0, 2, 3]), as the
    op's ONNX function body computes it."""
    dims = [_axis(a, x.dim()) for a in (axes if axes is not None else [0, 2, 3])]
    mean = x.mean(dims, keepdim=True)
    variance = (x * x).mean(dims, keepdim=True) - mean * mean
    return (x - mean) / (torch.sqrt(variance) + 1e-9)


def onnx_GlobalAveragePool(x: Tensor) -> Tensor:
    return x.mean(list(range(2, x.dim())), keepdim=True)


def onnx_GlobalMaxPool(x: Tensor) -> Tensor:
    return x.amax(list(range(2, x.dim())), keepdim=True)


# ---------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------


def _reduce(
    fn: Callable[[Tensor, list[int], bool], Tensor], data: Tensor, axes: _IntsLike, keepdims: int, noop_with_empty_axes: int
) -> Tensor:
    dims = _int_list(axes)
    if not dims:
        if noop_with_empty_axes:
            # Reducing over no axis still applies the op's elementwise part
            # (ReduceSumSquare squares, ReduceLogSum takes the log, ...).
            return fn(data.unsqueeze(0), [0], False)
        dims = list(range(data.dim()))
    return fn(data, [_axis(a, data.dim()) for a in dims], bool(keepdims))


def _sum(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return torch.sum(x, dims, keepdim=keep, dtype=x.dtype)


def _mean(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    if x.is_floating_point():
        return torch.mean(x, dims, keepdim=keep)
    return torch.mean(x.double(), dims, keepdim=keep).to(x.dtype)


def _prod(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep, dtype=x.dtype)
    return x


def _amax(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    """Over an empty set: -inf, or the type's lowest value where it has no infinity (ONNX 18+)."""
    if any(x.shape[d] == 0 for d in dims):
        return _filled_reduction(x, dims, keep, _extreme(x.dtype, lowest=True))
    return torch.amax(x, dims, keepdim=keep)


def _amin(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    """Over an empty set: +inf, or the type's highest value where it has no infinity (ONNX 18+)."""
    if any(x.shape[d] == 0 for d in dims):
        return _filled_reduction(x, dims, keep, _extreme(x.dtype, lowest=False))
    return torch.amin(x, dims, keepdim=keep)


def _extreme(dtype: torch.dtype, *, lowest: bool) -> float | int | bool:
    if dtype == torch.bool:
        return not lowest
    if dtype.is_floating_point:
        return -math.inf if lowest else math.inf
    info = torch.iinfo(dtype)
    return info.min if lowest else info.max


def _filled_reduction(x: Tensor, dims: list[int], keep: bool, fill: float | int | bool) -> Tensor:
    """The result of reducing `dims` of `x` when every reduced set is empty: `fill` everywhere."""
    if keep:
        shape = [1 if d in dims else size for d, size in enumerate(x.shape)]
    else:
        shape = [size for d, size in enumerate(x.shape) if d not in dims]
    return torch.full(shape, fill, dtype=x.dtype, device=x.device)


def _sum_square(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return _sum(x * x, dims, keep)


@_on_unsigned("modular")
def onnx_ReduceSum(data: Tensor, axes: _IntsLike = None, *, keepdims: int = 1, noop_with_empty_axes: int = 0) -> Tensor:
    return _reduce(_sum, data, axes, keepdims, noop_with_empty_axes)


def onnx_ReduceMean(data: Tensor, axes: _IntsLike = None, *, keepdims: int = 1, noop_with_empty_axes: int = 0) -> Tensor:
    return _reduce(_mean, data, axes, keepdims, noop_with_empty_axes)


@_on_unsigned("modular")
def onnx_ReduceProd(data: Tensor, axes: _IntsLike = None, *, keepdims: int = 1, noop_with_empty_axes: int = 0) -> Tensor:
    return _reduce(_prod, data, axes, keepdims, noop_with_empty_axes)


@_on_unsigned("ordered")
def onnx_ReduceMax(data: Tensor, axes: _IntsLike = None, *, keepdims: int = 1, noop_with_empty_axes: int = 0) -> Tensor:
    return _reduce(_amax, data, axes, keepdims, noop_with_empty_axes)


@_on_unsigned("ordered")
def onnx_ReduceMin(data: Tensor, axes: _IntsLike = None, *, keepdims: int = 1, noop_with_empty_axes: int = 0) -> Tensor:
    return _reduce(_amin, data, axes, keepdims, noop_with_empty_axes)


def onnx_ReduceSumSquare(
    data: Tensor, axes: _IntsLike = None, *, keepdims: int = 1, noop_with_empty_axes: int = 0
) -> Tensor:
    return _reduce(_sum_square, data, axes, keepdims, noop_with_empty_axes)


def onnx_ReduceL1(data: Tensor, axes: _IntsLike = None, *, keepdims: int = 1, noop_with_empty_axes: int = 0) -> Tensor:
    return _reduce(lambda x, d, k: _sum(x.abs(), d, k), data, axes, keepdims, noop_with_empty_axes)


def onnx_ReduceL2(data: Tensor, axes: _IntsLike = None, *, keepdims: int = 1, noop_with_empty_axes: int = 0) -> Tensor:
    return _reduce(lambda x, d, k: torch.sqrt(_sum_square(x, d, k)), data, axes, keepdims, noop_with_empty_axes)


def onnx_ReduceLogSum(data: Tensor, axes: _IntsLike = None, *, keepdims: int = 1, noop_with_empty_axes: int = 0) -> Tensor:
    return _reduce(lambda x, d, k: torch.log(_sum(x, d, k)), data, axes, keepdims, noop_with_empty_axes)


def onnx_ReduceLogSumExp(
    data: Tensor, axes: _IntsLike = None, *, keepdims: int = 1, noop_with_empty_axes: int = 0
) -> Tensor:
    return _reduce(lambda x, d, k: torch.logsumexp(x, d, keepdim=k), data, axes, keepdims, noop_with_empty_axes)


def _arg_reduce(fn: Callable[..., Tensor], data: Tensor, axis: int, keepdims: int, select_last_index: int) -> Tensor:
    keep = bool(keepdims)
    if select_last_index:
        return data.shape[axis] - 1 - fn(data.flip(axis), dim=axis, keepdim=keep)
    return fn(data, dim=axis, keepdim=keep)


@_on_unsigned("ordered", ())
def onnx_ArgMax(data: Tensor, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0) -> Tensor:
    return _arg_reduce(torch.argmax, data, axis, keepdims, select_last_index)


@_on_unsigned("ordered", ())
def onnx_ArgMin(data: Tensor, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0) -> Tensor:
    return _arg_reduce(torch.argmin, data, axis, keepdims, select_last_index)


@_on_unsigned("modular")
def onnx_CumSum(x: Tensor, axis: Tensor, *, exclusive: int = 0, reverse: int = 0) -> Tensor:
    dim = _axis(int(axis), x.dim())
    if reverse:
        x = x.flip(dim)
    y = torch.cumsum(x, dim, dtype=x.dtype)
    if exclusive:
        y = torch.cat([torch.zeros_like(y.narrow(dim, 0, 1)), y.narrow(dim, 0, y.shape[dim] - 1)], dim)
    return y.flip(dim) if reverse else y


@_on_unsigned("modular")
def onnx_CumProd(x: Tensor, axis: Tensor, *, exclusive: int = 0, reverse: int = 0) -> Tensor:
    dim = _axis(int(axis), x.dim())
    if reverse:
        x = x.flip(dim)
    y = torch.cumprod(x, dim, dtype=x.dtype)
    if exclusive:
        y = torch.cat([torch.ones_like(y.narrow(dim, 0, 1)), y.narrow(dim, 0, y.shape[dim] - 1)], dim)
    return y.flip(dim) if reverse else y


@_on_unsigned("ordered")
def onnx_TopK(x: Tensor, k: Tensor | int, *, axis: int = -1, largest: int = 1, sorted: int = 1) -> tuple[Tensor, Tensor]:  # noqa: A002
    """Ties go to the lower index, as ONNX requires, thanks to a stable sort."""
    values, indices = torch.sort(x, dim=axis, descending=bool(largest), stable=True)
    count = int(k if isinstance(k, int) else k.reshape(-1)[0])
    return values.narrow(axis, 0, count), indices.narrow(axis, 0, count)


# ---------------------------------------------------------------------------
# Shape manipulation
# ---------------------------------------------------------------------------


def onnx_Identity(x: Tensor) -> Tensor:
    return x


def onnx_Shape(data: Tensor, *, start: int = 0, end: int | None = None) -> Tensor:
    return torch.tensor(data.shape[start:end], dtype=torch.int64)


def onnx_Size(data: Tensor) -> Tensor:
    return torch.tensor(data.numel(), dtype=torch.int64)


def onnx_Reshape(data: Tensor, shape: Tensor, *, allowzero: int = 0) -> Tensor:
    """A 0 in ``shape`` copies the input dimension unless ``allowzero``; -1 is inferred."""
    dims = _int_list(shape)
    if not allowzero:
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return data.reshape(dims)


def onnx_Flatten(x: Tensor, *, axis: int = 1) -> Tensor:
    axis = _axis(axis, x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def onnx_Squeeze(data: Tensor, axes: _IntsLike = None) -> Tensor:
    dims = _int_list(axes)
    if not dims:
        return torch.squeeze(data)
    return torch.squeeze(data, tuple(_axis(a, data.dim()) for a in dims))


def onnx_Unsqueeze(data: Tensor, axes: _IntsLike) -> Tensor:
    """Axes index the output, so they are normalized against the output rank."""
    dims = _int_list(axes)
    out_rank = data.dim() + len(dims)
    for d in sorted(_axis(a, out_rank) for a in dims):
        data = data.unsqueeze(d)
    return data


def onnx_Transpose(data: Tensor, *, perm: list[int] | None = None) -> Tensor:
    return data.permute(perm if perm is not None else list(reversed(range(data.dim()))))


def onnx_Concat(*inputs: Tensor, axis: int) -> Tensor:
    return torch.cat(inputs, dim=axis)


def onnx_Split(
    x: Tensor, split: _IntsLike = None, *, axis: int = 0, num_outputs: int | None = None
) -> tuple[Tensor, ...]:
    """Sizes come from ``split``; otherwise ``num_outputs`` parts of ceil(n / num_outputs),
    the last one smaller (pass the node's output count as num_outputs before opset 18)."""
    sizes = _int_list(split)
    if not sizes:
        if num_outputs is None:
            raise ValueError("Split: needs the split input/attribute or num_outputs")
        length = x.shape[axis]
        chunk = -(-length // num_outputs)
        sizes = [chunk] * (num_outputs - 1) + [length - chunk * (num_outputs - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


def _slice_axis(data: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    size = data.shape[axis]
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), size), min(max(end, 0), size)
        return data[(slice(None),) * axis + (slice(start, end, step),)]
    start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
    return data.index_select(axis, torch.arange(start, end, step, device=data.device))


def onnx_Slice(data: Tensor, starts: _IntsLike, ends: _IntsLike, axes: _IntsLike = None, steps: _IntsLike = None) -> Tensor:
    """Out-of-range starts/ends are clamped; negative steps walk backwards."""
    start_list, end_list = _int_list(starts), _int_list(ends)
    axis_list = _int_list(axes) if axes is not None else list(range(len(start_list)))
    step_list = _int_list(steps) if steps is not None else [1] * len(start_list)
    for start, end, axis, step in zip(start_list, end_list, axis_list, step_list):
        if step == 0:
            raise ValueError("Slice: steps must be non-zero")
        data = _slice_axis(data, _axis(axis, data.dim()), start, end, step)
    return data


def onnx_Expand(x: Tensor, shape: Tensor) -> Tensor:
    """Broadcasts both ways: the output shape is broadcast(x.shape, shape)."""
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_int_list(shape))))


def onnx_Tile(x: Tensor, repeats: Tensor) -> Tensor:
    return torch.tile(x, tuple(_int_list(repeats)))


def _reflect_index(positions: Tensor, size: int) -> Tensor:
    period = max(2 * (size - 1), 1)
    folded = positions.abs() % period
    return torch.where(folded < size, folded, period - folded)


_PAD_INDEX: dict[str, Callable[[Tensor, int], Tensor]] = {
    "reflect": _reflect_index,
    "edge": lambda positions, size: positions.clamp(0, size - 1),
    "wrap": lambda positions, size: positions % size,
}


def onnx_Pad(
    data: Tensor,
    pads: _IntsLike = None,
    constant_value: Tensor | None = None,
    axes: _IntsLike = None,
    *,
    mode: str = "constant",
    value: float = 0.0,
) -> Tensor:
    """``pads`` is [begin..., end...] over ``axes`` (default: all); negative pads crop."""
    rank = data.dim()
    axis_list = [_axis(a, rank) for a in _int_list(axes)] if axes is not None else list(range(rank))
    pad_list = _int_list(pads)
    begins, ends = [0] * rank, [0] * rank
    for i, axis in enumerate(axis_list):
        begins[axis], ends[axis] = pad_list[i], pad_list[i + len(axis_list)]
    if mode == "constant":
        fill = value if constant_value is None else constant_value.item()
        return F.pad(data, _torch_pads(begins, ends), value=fill)
    if mode not in _PAD_INDEX:
        raise ValueError(f"Pad: unsupported mode={mode!r}")
    for axis in range(rank):
        size = data.shape[axis]
        positions = torch.arange(-begins[axis], size + ends[axis], device=data.device)
        data = data.index_select(axis, _PAD_INDEX[mode](positions, size))
    return data


def onnx_DepthToSpace(x: Tensor, *, blocksize: int, mode: str = "DCR") -> Tensor:
    """[N, C, H, W] -> [N, C / b^2, H * b, W * b]; DCR takes depth as (b, b, C'), CRD as (C', b, b)."""
    if mode not in ("DCR", "CRD"):
        raise ValueError(f"DepthToSpace: unsupported mode={mode!r}")
    n, c, h, w = x.shape
    b = blocksize
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def onnx_SpaceToDepth(x: Tensor, *, blocksize: int, mode: str = "DCR") -> Tensor:
    """The inverse of DepthToSpace: depth ordered (b, b, C) in DCR mode, (C, b, b) in CRD."""
    if mode not in ("DCR", "CRD"):
        raise ValueError(f"SpaceToDepth: unsupported mode={mode!r}")
    n, c, h, w = x.shape
    b = blocksize
    order = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
    y = x.reshape(n, c, h // b, b, w // b, b).permute(order)
    return y.reshape(n, c * b * b, h // b, w // b)


def onnx_Trilu(x: Tensor, k: Tensor | None = None, *, upper: int = 1) -> Tensor:
    diagonal = 0 if k is None else int(k)
    return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)


# ---------------------------------------------------------------------------
# Indexing
# ---------------------------------------------------------------------------


def _wrap_negative(indices: Tensor, size: int | Tensor) -> Tensor:
    indices = indices.long()
    return torch.where(indices < 0, indices + size, indices)


@_on_unsigned("modular")
def onnx_Gather(data: Tensor, indices: Tensor, *, axis: int = 0) -> Tensor:
    axis = _axis(axis, data.dim())
    if axis == 0 and data.dim() == 2 and data.is_floating_point():
        # rows of a table: an embedding lookup, whose backward is one in-place kernel (the
        # index_select backward's functional index_add copies the whole table once more)
        return torch.nn.functional.embedding(_wrap_negative(indices, data.shape[0]), data)
    picked = data.index_select(axis, _wrap_negative(indices, data.shape[axis]).reshape(-1))
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


def onnx_GatherElements(data: Tensor, indices: Tensor, *, axis: int = 0) -> Tensor:
    axis = _axis(axis, data.dim())
    return torch.gather(data, axis, _wrap_negative(indices, data.shape[axis]))


def onnx_GatherND(data: Tensor, indices: Tensor, *, batch_dims: int = 0) -> Tensor:
    depth = indices.shape[-1]
    batch = math.prod(data.shape[:batch_dims])
    flat_data = data.reshape(batch, *data.shape[batch_dims:])
    flat_indices = indices.long().reshape(batch, -1, depth)
    batch_index = torch.arange(batch, device=data.device).unsqueeze(1)
    picked = flat_data[(batch_index, *flat_indices.unbind(-1))]
    return picked.reshape((*indices.shape[:-1], *data.shape[batch_dims + depth :]))


_SCATTER_REDUCTIONS = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter(op: str, data: Tensor, dim: int, index: Tensor, src: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return data.scatter(dim, index, src)
    if reduction not in _SCATTER_REDUCTIONS:
        raise ValueError(f"{op}: unsupported reduction={reduction!r}")
    return data.scatter_reduce(dim, index, src, _SCATTER_REDUCTIONS[reduction], include_self=True)


def onnx_ScatterElements(
    data: Tensor, indices: Tensor, updates: Tensor, *, axis: int = 0, reduction: str = "none"
) -> Tensor:
    axis = _axis(axis, data.dim())
    index = _wrap_negative(indices, data.shape[axis])
    return _scatter("ScatterElements", data, axis, index, updates, reduction)


def onnx_ScatterND(data: Tensor, indices: Tensor, updates: Tensor, *, reduction: str = "none") -> Tensor:
    """Flattens the indexed leading dims of ``data`` and scatters whole slices along them."""
    depth = indices.shape[-1]
    lead, rest = data.shape[:depth], data.shape[depth:]
    sizes = torch.tensor(lead, dtype=torch.int64, device=data.device)
    strides = torch.tensor([math.prod(lead[i + 1 :]) for i in range(depth)], dtype=torch.int64, device=data.device)
    linear = (_wrap_negative(indices.reshape(-1, depth), sizes) * strides).sum(-1)
    src = updates.reshape(-1, *rest)
    index = linear.reshape(-1, *([1] * len(rest))).expand_as(src)
    flat = _scatter("ScatterND", data.reshape(-1, *rest), 0, index, src, reduction)
    return flat.reshape(data.shape)


@_on_unsigned("modular")
def onnx_ReverseSequence(x: Tensor, sequence_lens: Tensor, *, batch_axis: int = 1, time_axis: int = 0) -> Tensor:
    """Reverses the first sequence_lens[b] steps along ``time_axis`` of each batch entry
    (the two axes are 0 and 1); later steps stay in place."""
    steps = torch.arange(x.shape[time_axis], device=x.device)
    lengths = sequence_lens.to(torch.int64)
    step, length = (steps[:, None], lengths[None, :]) if time_axis == 0 else (steps[None, :], lengths[:, None])
    source = torch.where(step < length, length - 1 - step, step)
    index = source.reshape(*source.shape, *([1] * (x.dim() - 2))).expand(x.shape)
    return torch.gather(x, time_axis, index)


@_on_unsigned("modular")
def onnx_Compress(x: Tensor, condition: Tensor, *, axis: int | None = None) -> Tensor:
    """The slices along ``axis`` (of the flattened input without one) whose condition is
    true; a condition shorter than the axis leaves the rest out."""
    data = x.reshape(-1) if axis is None else x
    dim = 0 if axis is None else _axis(axis, x.dim())
    keep = torch.nonzero(condition.reshape(-1)[: data.shape[dim]]).reshape(-1)
    return data.index_select(dim, keep)


def onnx_NonZero(x: Tensor) -> Tensor:
    return torch.nonzero(x).t()


def onnx_OneHot(indices: Tensor, depth: Tensor, values: Tensor, *, axis: int = -1) -> Tensor:
    """Indices in [-depth, -1] wrap around; other out-of-range ones give all off_value."""
    size = int(depth)
    axis = _axis(axis, indices.dim() + 1)
    positions = torch.arange(size, device=indices.device).reshape(-1, *([1] * (indices.dim() - axis)))
    hot = _wrap_negative(indices, size).unsqueeze(axis) == positions
    return torch.where(hot, values[1], values[0])


def onnx_Unique(x: Tensor, *, axis: int | None = None, sorted: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # noqa: A002
    """Outputs (Y, indices of first occurrences, inverse_indices, counts)."""
    source = x.reshape(-1) if axis is None else x
    dim = 0 if axis is None else _axis(axis, x.dim())
    values, inverse, counts = torch.unique(source, sorted=True, return_inverse=True, return_counts=True, dim=dim)
    length = source.shape[dim]
    first = torch.full_like(counts, length).scatter_reduce(
        0, inverse, torch.arange(length, device=x.device), "amin", include_self=True
    )
    if not sorted:
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=x.device)
        values, first, counts, inverse = values.index_select(dim, order), first[order], counts[order], rank[inverse]
    return values, first, inverse, counts


# ---------------------------------------------------------------------------
# Tensor creation and conversion
# ---------------------------------------------------------------------------


def onnx_Constant(
    *,
    value: np.ndarray | None = None,
    value_float: float | None = None,
    value_floats: list[float] | None = None,
    value_int: int | None = None,
    value_ints: list[int] | None = None,
    value_string: str | None = None,
    value_strings: list[str] | None = None,
    sparse_value: object = None,
) -> Tensor:
    if value is not None:
        return _from_numpy(value)
    if value_float is not None or value_floats is not None:
        return torch.tensor(value_float if value_floats is None else value_floats, dtype=torch.float32)
    if value_int is not None or value_ints is not None:
        return torch.tensor(value_int if value_ints is None else value_ints, dtype=torch.int64)
    for name, unsupported in (("value_string", value_string), ("value_strings", value_strings), ("sparse_value", sparse_value)):
        if unsupported is not None:
            raise ValueError(f"Constant: unsupported attribute {name}")
    raise ValueError("Constant: missing value attribute")


def onnx_ConstantOfShape(shape: Tensor, *, value: np.ndarray | None = None) -> Tensor:
    fill = torch.zeros((), dtype=torch.float32) if value is None else _from_numpy(value).reshape(())
    return torch.full(_int_list(shape), fill.item(), dtype=fill.dtype, device=shape.device)


def onnx_EyeLike(x: Tensor, *, dtype: int | None = None, k: int = 0) -> Tensor:
    """Ones on the k-th diagonal of a 2-D tensor shaped like x, of ``dtype`` (default x's)."""
    rows, cols = x.shape
    out_dtype = x.dtype if dtype is None else _torch_dtype("EyeLike", "dtype", dtype)
    diagonal = torch.arange(cols, device=x.device) - torch.arange(rows, device=x.device).unsqueeze(1) == k
    return diagonal.to(out_dtype)


def onnx_Range(start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    """start + i * delta for i < max(ceil((limit - start) / delta), 0)."""
    count = max(math.ceil((limit.item() - start.item()) / delta.item()), 0)
    return start + torch.arange(count, dtype=start.dtype, device=start.device) * delta


def onnx_Cast(x: Tensor, *, to: int, saturate: int = 1, round_mode: str = "up") -> Tensor:
    """``saturate`` only matters for float8 targets: clamp to the finite range;
    ``round_mode`` (opset 25) only for float8e8m0 targets."""
    return _cast(x, _torch_dtype("Cast", "to", to), saturate, round_mode)


def onnx_CastLike(x: Tensor, target_type: Tensor, *, saturate: int = 1, round_mode: str = "up") -> Tensor:
    return _cast(x, target_type.dtype, saturate, round_mode)


def onnx_Dropout(
    data: Tensor, ratio: Tensor | float | None = None, training_mode: Tensor | None = None, *, seed: int | None = None,
    mask: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Outputs (output, mask); outside training mode, the identity and an all-True mask.
    Without a seed the mask is drawn from torch's global generator exactly as `F.dropout`
    draws it (so a graph traced from torch drops what eager drops); with one, from a
    generator of that seed. `mask=False` (a node without the mask output) gives None for
    it and runs `F.dropout` itself: its backward multiplies by a float noise tensor, faster
    than `native_dropout`'s boolean mask."""
    rate = 0.5 if ratio is None else float(ratio)
    if training_mode is None or not bool(training_mode) or rate == 0:
        return data, torch.ones_like(data, dtype=torch.bool) if mask else None
    if seed is None:
        return torch.native_dropout(data, rate, True) if mask else (torch.nn.functional.dropout(data, rate, True), None)
    generator = torch.Generator(device=data.device)
    generator.manual_seed(seed)
    mask = torch.rand(data.shape, generator=generator, device=data.device) >= rate
    return data * mask / (1 - rate), mask


# ---------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------


def _quant_param(param: Tensor, x: Tensor, axis: int, block_size: int) -> Tensor:
    """Broadcast a per-tensor, per-axis or blocked scale/zero point against x."""
    if param.numel() == 1:
        return param.reshape(())
    axis = _axis(axis, x.dim())
    if block_size:
        return param.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def onnx_QuantizeLinear(
    x: Tensor,
    y_scale: Tensor,
    y_zero_point: Tensor | None = None,
    *,
    axis: int = 1,
    saturate: int = 1,
    block_size: int = 0,
    output_dtype: int = 0,
) -> Tensor:
    """round_half_even(x / scale) + zero_point, clamped to the output type's range.

    After the division (in the inputs' type) the steps run in place in float32 (float64 for
    float64 inputs, float32 for 16-bit floats): exact, since a rounded value that float32 cannot add the zero point to
    exactly (magnitude >= 2^24) is clamped to the 8- or 16-bit range either way."""
    if y_zero_point is not None:
        dtype = y_zero_point.dtype
    else:
        dtype = _torch_dtype("QuantizeLinear", "output_dtype", output_dtype) if output_dtype else torch.uint8
    scaled = x / _quant_param(y_scale, x, axis, block_size)
    if dtype in _FLOAT8_DTYPES:
        return _cast(scaled, dtype, saturate)
    if dtype not in _QUANT_RANGES:
        raise ValueError(f"QuantizeLinear: unsupported output type {dtype}")
    if scaled.dtype in (torch.float16, torch.bfloat16):
        scaled = scaled.float()
    quantized = scaled.round_()
    if y_zero_point is not None:
        quantized = quantized.add_(_quant_param(y_zero_point, x, axis, block_size))
    low, high = _QUANT_RANGES[dtype]
    return quantized.clamp_(low, high).to(dtype)


def onnx_DequantizeLinear(
    x: Tensor, x_scale: Tensor, x_zero_point: Tensor | None = None, *, axis: int = 1, block_size: int = 0, output_dtype: int = 0
) -> Tensor:
    """(x - zero_point) * scale, computed in float32, returned in the scale's dtype."""
    values = x.to(torch.float32)
    if x_zero_point is not None and x.dtype not in _FLOAT8_DTYPES:
        values = values - _quant_param(x_zero_point, x, axis, block_size).to(torch.float32)
    y = values * _quant_param(x_scale, x, axis, block_size)
    dtype = _torch_dtype("DequantizeLinear", "output_dtype", output_dtype) if output_dtype else x_scale.dtype
    return y.to(dtype)


def onnx_DynamicQuantizeLinear(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 quantization over the range [min(0, min(x)), max(0, max(x))].

    Outputs (y, y_scale, y_zero_point); a range of zero width gets scale 1/255,
    as in the ONNX reference implementation.
    """
    scale, zero_point = dynamic_quantize_params(x)
    y = (x / scale).round_().add_(zero_point).clamp_(0, 255)  # in place, after one pass for the range
    return y.to(torch.uint8), scale.to(x.dtype), zero_point.to(torch.uint8)


def dynamic_quantize_params(x: Tensor) -> tuple[Tensor, Tensor]:
    """DynamicQuantizeLinear's (scale, zero point) of x as float32 scalars (the zero point a
    whole number in [0, 255]), from one pass over x."""
    low, high = torch.aminmax(x)
    high = torch.clamp(high, min=0).float()
    low = torch.clamp(low, max=0).float()
    width = torch.where(high == low, torch.ones_like(high), high - low)
    scale = width / 255
    return scale, torch.round(torch.clamp(-low / scale, 0, 255))


def com_microsoft_MatMulNBits(
    a: Tensor, b: Tensor, scales: Tensor, zero_points: Tensor | None = None, g_idx: Tensor | None = None,
    bias: Tensor | None = None, *, K: int, N: int, bits: int, block_size: int, accuracy_level: int = 0,
) -> Tensor:
    """Reference path of ONNX Runtime's weight-only matmul: unpack the `bits`-bit blocks of
    W^T ([N, blocks, block_size * bits / 8] uint8, low nibble first), subtract the zero point
    (default 2^(bits-1)), scale per (column, block), then a float matmul."""
    if bits not in (4, 8) or g_idx is not None:
        raise ValueError(f"MatMulNBits: only bits=4 or 8 without g_idx are implemented, got bits={bits}")
    packed = b.reshape(N, -1, block_size * bits // 8).to(torch.int32)
    q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(N, -1, block_size) if bits == 4 else packed
    if zero_points is None:
        zero = torch.full((), 2 ** (bits - 1), dtype=torch.float32)
    elif bits == 4:
        zp = zero_points.reshape(N, -1).to(torch.int32)
        zero = torch.stack([zp & 0x0F, zp >> 4], dim=-1).reshape(N, -1)[:, : q.shape[1]].unsqueeze(-1).float()
    else:
        zero = zero_points.reshape(N, -1, 1).float()
    weight = ((q.float() - zero) * scales.reshape(N, -1, 1).float()).reshape(N, -1)[:, :K]
    y = torch.matmul(a, weight.t().to(a.dtype))
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

TORCH_KERNELS: dict[tuple[str, str], Callable] = {
    ("", name.removeprefix("onnx_")): fn for name, fn in sorted(globals().items()) if name.startswith("onnx_")
}
TORCH_KERNELS.update(ONNX23_KERNELS)
TORCH_KERNELS.update(GRAPHOPT_KERNELS)
TORCH_KERNELS[("com.microsoft", "MatMulNBits")] = com_microsoft_MatMulNBits

MULTI_OUTPUT_KERNELS: frozenset[tuple[str, str]] = ONNX23_MULTI_OUTPUT_KERNELS | {("graphopt", "Attention")}

MULTI_OUTPUT_OPS: frozenset[str] = frozenset(
    {"Split", "TopK", "Dropout", "LayerNormalization", "BatchNormalization", "Unique", "DynamicQuantizeLinear", "SkipLayerNorm"}
)

OPSET_SENSITIVE_OPS: frozenset[str] = frozenset({"Softmax", "LogSoftmax", "Hardmax"})

_DOMAIN_ALIASES = {"ai.onnx": ""}

# ---------------------------------------------------------------------------
# Element types torch can run
# ---------------------------------------------------------------------------

_UNSIGNED = frozenset({torch.uint16, torch.uint32, torch.uint64})
_FLOAT8 = _FLOAT8_DTYPES | {torch.float8_e8m0fnu}
_COMPLEX = frozenset({torch.complex64, torch.complex128})

PARTIAL_DTYPES: frozenset[torch.dtype] = _UNSIGNED | _FLOAT8 | _COMPLEX
"""Element types torch has tensors of but CPU kernels for few ops: a kernel runs only those
`PARTIAL_DTYPE_KERNELS` lists for it. The other types with a torch dtype (float16/32/64,
bfloat16, bool, int8-64, uint8) run everywhere ONNX allows them; string, 2-, 4- and 6-bit
types run nowhere."""

PARTIAL_DTYPE_KERNELS: dict[str, frozenset[torch.dtype]] = {
    **dict.fromkeys(
        (
            "Compress", "Concat", "DepthToSpace", "DequantizeLinear", "Equal", "Expand", "EyeLike", "Flatten",
            "Gather", "GatherND", "Identity", "IsNaN", "MatMulInteger", "Mul", "OneHot", "RMSNormalization",
            "Reshape", "Shape", "Size", "Slice", "SpaceToDepth", "Split", "Squeeze", "Tile", "Transpose",
            "Unsqueeze", "Where",
        ),
        PARTIAL_DTYPES,
    ),
    **dict.fromkeys(
        (
            "ConstantOfShape", "Pad",
        ),
        _UNSIGNED | _FLOAT8,
    ),
    **dict.fromkeys(
        (
            "Abs",
        ),
        _UNSIGNED | _FLOAT8_DTYPES,
    ),
    **dict.fromkeys(
        (
            "Add", "CumProd", "CumSum", "Dropout", "ReduceMean", "ReduceProd", "ReduceSum", "ReverseSequence",
            "Shrink", "Sub",
        ),
        _UNSIGNED | _COMPLEX,
    ),
    **dict.fromkeys(
        (
            "ArgMax", "ArgMin", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Ceil",
            "Clip", "Floor", "Greater", "GreaterOrEqual", "IsInf", "Less", "LessOrEqual", "Max", "Min",
            "QuantizeLinear", "ReduceMax", "ReduceMin", "Round", "ThresholdedRelu", "TopK",
        ),
        _UNSIGNED,
    ),
    **dict.fromkeys(
        (
            "Div", "Mod",
        ),
        _WIDENED_UNSIGNED,
    ),
    **dict.fromkeys(
        (
            "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BatchNormalization", "Conv", "Cos", "Cosh",
            "Det", "Einsum", "Exp", "GatherElements", "Gemm", "GlobalAveragePool", "GroupNormalization",
            "InstanceNormalization", "Log", "MatMul", "Mean", "MeanVarianceNormalization", "Neg", "Reciprocal",
            "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "RotaryEmbedding", "Sigmoid",
            "Sin", "Sinh", "Softsign", "Sqrt", "Sum", "Swish", "Tan", "Tanh", "Trilu",
        ),
        _COMPLEX,
    ),
    **dict.fromkeys(("Cast", "CastLike", "Constant"), PARTIAL_DTYPES),
}
"""ONNX op -> the `PARTIAL_DTYPES` its kernel runs with ONNX's results (output types
included), measured on torch 2.13's CPU kernels with the ONNX node test cases' inputs
(`tests/exporters/test_fx_conformance.py` re-measures it and fails when torch changes)."""


def torch_dtype(onnx_dtype: int) -> torch.dtype | None:
    """The torch dtype of an ONNX element type number, or None where torch has none."""
    return _ONNX_DTYPES.get(onnx_dtype)


def unsupported_dtype(domain: str, op_type: str, onnx_dtypes: Iterable[int]) -> int | None:
    """The first of `onnx_dtypes` (ONNX element type numbers of a node's inputs and outputs)
    that the kernel of ``op_type`` cannot run in torch, or None."""
    domain = _DOMAIN_ALIASES.get(domain, domain)
    allowed = PARTIAL_DTYPE_KERNELS.get(op_type, frozenset()) if domain == "" else frozenset()
    for onnx_dtype in onnx_dtypes:
        dtype = _ONNX_DTYPES.get(onnx_dtype)
        if dtype is None or (dtype in PARTIAL_DTYPES and dtype not in allowed):
            return onnx_dtype
    return None


def _one_of(name: str, choices: Sequence[object]) -> Callable[[dict], str | None]:
    def check(attrs: dict) -> str | None:
        value = attrs.get(name)
        return None if value is None or value in choices else f"{name}={value!r} (supported: {', '.join(map(str, choices))})"

    return check


def _no_string_constant(attrs: dict) -> str | None:
    present = [name for name in ("value_string", "value_strings", "sparse_value") if attrs.get(name) is not None]
    return f"attribute {present[0]} (torch has no string or sparse constants)" if present else None


_SCATTER_CHOICES = ("none", *_SCATTER_REDUCTIONS)

_ATTRIBUTE_CHECKS: dict[tuple[str, str], list[Callable[[dict], str | None]]] = {
    ("", "Cast"): [_one_of("to", tuple(_ONNX_DTYPES)), _one_of("round_mode", CAST_ROUND_MODES)],
    ("", "CastLike"): [_one_of("round_mode", CAST_ROUND_MODES)],
    ("", "Conv"): [_one_of("auto_pad", ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"))],
    ("", "Pad"): [_one_of("mode", ("constant", *_PAD_INDEX))],
    ("", "Gelu"): [_one_of("approximate", ("none", "tanh"))],
    ("graphopt", "Gelu"): [_one_of("approximate", ("none", "tanh"))],
    ("", "Constant"): [_no_string_constant],
    ("", "ScatterElements"): [_one_of("reduction", _SCATTER_CHOICES)],
    ("", "ScatterND"): [_one_of("reduction", _SCATTER_CHOICES)],
    ("", "LayerNormalization"): [_one_of("stash_type", tuple(_ONNX_DTYPES))],
    ("", "GroupNormalization"): [_one_of("stash_type", tuple(_ONNX_DTYPES))],
    ("", "QuantizeLinear"): [
        _one_of("output_dtype", (0, *(k for k, v in _ONNX_DTYPES.items() if v in _QUANT_RANGES or v in _FLOAT8_DTYPES)))
    ],
    ("", "DequantizeLinear"): [_one_of("output_dtype", (0, *_ONNX_DTYPES))],
    ("", "BitShift"): [_one_of("direction", ("LEFT", "RIGHT"))],
    ("", "DepthToSpace"): [_one_of("mode", ("DCR", "CRD"))],
    ("", "SpaceToDepth"): [_one_of("mode", ("DCR", "CRD"))],
    ("", "EyeLike"): [_one_of("dtype", tuple(_ONNX_DTYPES))],
    ("com.microsoft", "MatMulNBits"): [_one_of("bits", (4, 8))],
    ("", "Attention"): [_one_of("softmax_precision", (1, 10, 11, 16)), _one_of("qk_matmul_output_mode", (0, 1, 2, 3))],
    ("", "RMSNormalization"): [_one_of("stash_type", (1, 10, 11, 16))],
}


def unsupported_attribute(domain: str, op_type: str, attrs: dict) -> str | None:
    """Why the kernel of ``op_type`` cannot compute a node with these attributes (as the
    exporter passes them), or None."""
    checks = _ATTRIBUTE_CHECKS.get((_DOMAIN_ALIASES.get(domain, domain), op_type), [])
    return next((problem for check in checks if (problem := check(attrs)) is not None), None)


def get_kernel(domain: str, op_type: str) -> Callable | None:
    """The kernel for ``op_type`` in ``domain`` ("" or "ai.onnx" for default ONNX), or None."""
    return TORCH_KERNELS.get((_DOMAIN_ALIASES.get(domain, domain), op_type))
