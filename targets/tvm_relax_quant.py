"""Relax translations of the quantization ops, registered into `tvm_relax`'s rule table.

The ops graphopt's `quantize` pass emits (see `graphopt.passes.quantize`), with ONNX semantics:

- QuantizeLinear: round half to even of x / scale (in float32), plus the zero point,
  saturated to the output type (int8, uint8, int16, uint16); per tensor or per axis.
- DequantizeLinear: (x - zero point) in int32, then float32 times the scale; int8, uint8,
  int16, uint16 or int32 inputs; per tensor or per axis.
- DynamicQuantizeLinear: uint8 over [min(0, min x), max(0, max x)], scale = width / 255
  (1 / 255 for an all-zero input, as ONNX's reference; ONNX Runtime gives 1.0 there, the
  quantized values and zero point agree), zero point = round(clamp(-low / scale, 0, 255)).
- MatMulInteger: the int32 product of (A - a_zero_point) and (B - b_zero_point); zero points
  per tensor, per row of A, per column of B.
- com.microsoft MatMulNBits: the 4- or 8-bit blocks of W^T unpacked (low nibble first),
  minus the zero points (packed uint8, default 2^(bits-1)), times one scale per block, then
  a float matmul (as ONNX Runtime's reference path and `torch_kernels`).

Blocked (Q)DQ (`block_size`), float8/int4 types, float zero points and `g_idx` are refused.

Constant weights. `dequantize_nbits_weights`, run by `to_relax` first, turns a MatMulNBits
with constant weights into a MatMul with its float [K, N] weight, so the target's packed float
matmul runs it (MiniLM, seq 128, int4: 0.81x the time of unpacking on every call). The int8
weights of DequantizeLinear and MatMulInteger stay int8, widened on each call by small
elementwise kernels: folding them to float32 at build time measured no faster (MiniLM, seq
128, medians of 7 interleaved rounds within 2%) and took 1.5x the parameter bytes.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value
from graphopt.targets.tvm_relax import RelaxConversionError, _Converter, _rule_for

MICROSOFT_DOMAIN = "com.microsoft"

QUANT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1)}
"""Saturation bounds of the quantized types QuantizeLinear may produce."""

DEQUANTIZABLE = frozenset({*QUANT_RANGES, "int32"})
"""Input types of DequantizeLinear that the translation takes."""


# --- rules ---------------------------------------------------------------------------


@_rule_for("QuantizeLinear")
def _quantize_linear(c: _Converter, node: Node, x: Any, scale: Any, zero: Any = None) -> Any:
    from tvm import relax

    _refuse_blocks(node)
    out = _output_type(node, QUANT_RANGES)
    x = _as_float32(c, c.tensor(x))
    axis = int(node.attrs.get("axis", 1))
    y = c.emit(relax.op.round(relax.op.divide(x, _along(c, scale, x, axis, "float32"))))
    if zero is not None:
        y = c.emit(relax.op.add(y, _along(c, zero, x, axis, "float32")))
    low, high = QUANT_RANGES[out]
    return c.emit(relax.op.astype(relax.op.clip(y, float(low), float(high)), out))


@_rule_for("DequantizeLinear")
def _dequantize_linear(c: _Converter, node: Node, x: Any, scale: Any, zero: Any = None) -> Any:
    from tvm import relax

    _refuse_blocks(node)
    out = _output_type(node, ("float32", "float16"))
    x = c.tensor(x)
    if str(x.ty.dtype) not in DEQUANTIZABLE:
        raise RelaxConversionError(f"DequantizeLinear of {x.ty.dtype} is not supported (only {', '.join(sorted(DEQUANTIZABLE))})")
    axis = int(node.attrs.get("axis", 1))
    values = c.emit(relax.op.astype(x, "int32"))
    if zero is not None:
        values = c.emit(relax.op.subtract(values, _along(c, zero, x, axis, "int32")))
    y = c.emit(relax.op.multiply(relax.op.astype(values, "float32"), _along(c, scale, x, axis, "float32")))
    return y if out == "float32" else c.emit(relax.op.astype(y, out))


@_rule_for("DynamicQuantizeLinear")
def _dynamic_quantize_linear(c: _Converter, node: Node, x: Any) -> Any:
    from tvm import relax

    x = c.tensor(x)
    dtype = str(x.ty.dtype)
    x = _as_float32(c, x)

    def const(v: float) -> Any:
        return relax.const(v, "float32")

    high = c.emit(relax.op.maximum(relax.op.max(x), const(0.0)))
    low = c.emit(relax.op.minimum(relax.op.min(x), const(0.0)))
    width = c.emit(relax.op.where(relax.op.equal(high, low), const(1.0), relax.op.subtract(high, low)))
    scale = c.emit(relax.op.divide(width, const(255.0)))
    zero = c.emit(relax.op.round(relax.op.clip(relax.op.divide(relax.op.negative(low), scale), 0.0, 255.0)))
    y = c.emit(relax.op.clip(relax.op.add(relax.op.round(relax.op.divide(x, scale)), zero), 0.0, 255.0))
    scale_out = scale if dtype == "float32" else c.emit(relax.op.astype(scale, dtype))
    return [c.emit(relax.op.astype(y, "uint8")), scale_out, c.emit(relax.op.astype(zero, "uint8"))]


@_rule_for("MatMulInteger")
def _matmul_integer(c: _Converter, node: Node, a: Any, b: Any, a_zero: Any = None, b_zero: Any = None) -> Any:
    from tvm import relax

    a = c.emit(relax.op.astype(c.tensor(a), "int32"))
    b = c.emit(relax.op.astype(c.tensor(b), "int32"))
    if a_zero is not None:
        zero = c.emit(relax.op.astype(c.tensor(a_zero), "int32"))
        if c.rank(zero) == 1:
            zero = c.emit(relax.op.expand_dims(zero, [1]))  # one per row of A
        a = c.emit(relax.op.subtract(a, zero))
    if b_zero is not None:
        b = c.emit(relax.op.subtract(b, relax.op.astype(c.tensor(b_zero), "int32")))
    return c.emit(relax.op.matmul(a, b, out_dtype="int32"))


@_rule_for("MatMulNBits", domain=MICROSOFT_DOMAIN)
def _matmul_nbits(c: _Converter, node: Node, a: Any, b: Any, scales: Any, zero: Any = None, g_idx: Any = None, bias: Any = None) -> Any:
    from tvm import relax

    n, k, bits, block_size = _nbits_layout(node)
    a = c.tensor(a)
    packed = c.emit(relax.op.reshape(c.emit(relax.op.astype(c.tensor(b), "int32")), [n, -1, block_size * bits // 8]))
    q = _unpack_relax(c, packed, bits)
    blocks = c.shape(q)[1]
    if zero is None:
        offset = relax.const(float(2 ** (bits - 1)), "float32")
    else:
        codes = _unpack_relax(c, c.emit(relax.op.reshape(c.emit(relax.op.astype(c.tensor(zero), "int32")), [n, -1])), bits)
        codes = c.emit(relax.op.strided_slice(codes, [1], [0], [blocks], assume_inbound=True))
        offset = c.emit(relax.op.astype(relax.op.expand_dims(codes, [2]), "float32"))
    steps = c.emit(relax.op.reshape(relax.op.astype(c.tensor(scales), "float32"), [n, blocks, 1]))
    weight = c.emit(relax.op.multiply(relax.op.subtract(relax.op.astype(q, "float32"), offset), steps))
    weight = c.emit(relax.op.reshape(weight, [n, blocks * block_size]))
    if blocks * block_size != k:
        weight = c.emit(relax.op.strided_slice(weight, [1], [0], [k], assume_inbound=True))
    weight = c.emit(relax.op.astype(relax.op.permute_dims(weight), str(a.ty.dtype)))
    y = c.emit(relax.op.matmul(a, weight))
    return y if bias is None else c.emit(relax.op.add(y, c.tensor(bias)))


def _refuse_blocks(node: Node) -> None:
    if int(node.attrs.get("block_size", 0)):
        raise RelaxConversionError(f"blocked {node.op_type} (block_size={node.attrs['block_size']}) is not supported")


def _output_type(node: Node, supported: Any) -> str:
    dtype = node.outputs[0].dtype
    name = None if dtype is None else dtype.to_numpy().name
    if name not in supported:
        raise RelaxConversionError(f"{node.op_type} to {name or 'an unknown type'} is not supported (only {', '.join(supported)})")
    return name


def _as_float32(c: _Converter, x: Any) -> Any:
    from tvm import relax

    return x if str(x.ty.dtype) == "float32" else c.emit(relax.op.astype(x, "float32"))


def _along(c: _Converter, param: Any, x: Any, axis: int, dtype: str) -> Any:
    """A scale or zero point as `dtype`, shaped to broadcast against `x`: a scalar when it
    has one element (per tensor), else laid along `axis` (per axis)."""
    from tvm import relax

    rank = c.rank(x)
    if isinstance(param, np.ndarray):
        data = param.reshape(() if param.size == 1 else [-1] + [1] * (rank - axis % rank - 1))
        return relax.const(data.astype(dtype), dtype)
    param = c.tensor(param)
    size = c.shape(param)
    if all(isinstance(d, int) and d == 1 for d in size):
        shape: list[int] = []
    else:
        shape = [-1] + [1] * (rank - axis % rank - 1)
    return c.emit(relax.op.astype(relax.op.reshape(param, shape), dtype))


def _nbits_layout(node: Node) -> tuple[int, int, int, int]:
    """(N, K, bits, block_size) of a MatMulNBits this module translates."""
    bits = int(node.attrs["bits"])
    if bits not in (4, 8):
        raise RelaxConversionError(f"MatMulNBits with bits={bits} is not supported (only 4 and 8)")
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        raise RelaxConversionError("MatMulNBits with g_idx is not supported")
    zero = node.inputs[3] if len(node.inputs) > 3 else None
    if zero is not None and zero.dtype != DType.UINT8:
        raise RelaxConversionError(f"MatMulNBits with {zero.dtype.name.lower() if zero.dtype else 'untyped'} zero points is not supported (only packed uint8)")
    return int(node.attrs["N"]), int(node.attrs["K"]), bits, int(node.attrs["block_size"])


def _unpack_relax(c: _Converter, packed: Any, bits: int) -> Any:
    """int32 codes of packed bytes along the last axis (4 bits: low nibble first)."""
    from tvm import relax

    if bits == 8:
        return packed
    nibbles = relax.op.stack([relax.op.bitwise_and(packed, relax.const(15, "int32")), relax.op.right_shift(packed, relax.const(4, "int32"))], axis=-1)
    dims = c.shape(packed)
    return c.emit(relax.op.reshape(nibbles, [*dims[:-1], dims[-1] * 2]))


# --- constant weights at build time ---------------------------------------------------


def dequantize_nbits_weights(graph: Graph) -> Graph:
    """`graph`, or a copy (weights shared) in which every MatMulNBits with constant weights,
    scales and zero points is a MatMul with its dequantized [K, N] weight (computed as the
    rule computes it at run time, once per weight), plus its bias; outputs keep their names."""
    if not any(_constant_nbits(n) for n in graph.nodes):
        return graph
    graph = graph.clone()
    matrices: dict[tuple[str, ...], Value] = {}
    for node in [n for n in graph.nodes if _constant_nbits(n)]:
        a, b, scales, zero, _, bias = list(node.inputs) + [None] * (6 - len(node.inputs))
        key = (b.name, scales.name, zero.name if zero is not None else "", a.dtype.name)  # type: ignore[union-attr]
        if key not in matrices:
            matrix = _nbits_matrix(node, b, scales, zero).astype(a.dtype.to_numpy())  # type: ignore[union-attr]
            matrices[key] = graph.add_constant(graph.unique_name(f"{b.name}_dequantized"), np.ascontiguousarray(matrix))  # type: ignore[union-attr]
        result = graph.add_node("MatMul", [a, matrices[key]], before=node).output
        if bias is not None:
            result = graph.add_node("Add", [result, bias], before=node).output
        graph.replace_value(node.output, result)
        graph.erase(node)
        for value in (b, scales, zero):
            if value is not None and not value.uses() and not value.is_graph_output:
                graph.remove_constant(value)
    return graph


def _constant_nbits(node: Node) -> bool:
    if node.domain != MICROSOFT_DOMAIN or node.op_type != "MatMulNBits" or node.inputs[0].dtype not in (DType.FLOAT, DType.FLOAT16):  # type: ignore[union-attr]
        return False
    try:
        _nbits_layout(node)
    except RelaxConversionError:
        return False
    return all(v is None or v.const is not None for v in node.inputs[1:4])


def _nbits_matrix(node: Node, b: Value, scales: Value, zero: Optional[Value]) -> np.ndarray:
    """The float32 [K, N] weight of a MatMulNBits with constant weights."""
    n, k, bits, block_size = _nbits_layout(node)
    q = _unpack_numpy(b.const.numpy().reshape(n, -1, block_size * bits // 8), bits)  # type: ignore[union-attr]
    blocks = q.shape[1]
    offset = np.float32(2 ** (bits - 1)) if zero is None else _unpack_numpy(zero.const.numpy().reshape(n, -1), bits)[:, :blocks, None].astype(np.float32)  # type: ignore[union-attr]
    weight = (q.astype(np.float32) - offset) * scales.const.numpy().reshape(n, blocks, 1).astype(np.float32)  # type: ignore[union-attr]
    return weight.reshape(n, -1)[:, :k].T


def _unpack_numpy(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 codes of packed bytes along the last axis (4 bits: low nibble first)."""
    packed = packed.astype(np.int32)
    if bits == 8:
        return packed
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
