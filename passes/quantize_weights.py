"""Weight quantization arithmetic shared by the quantization passes (no graph editing here).

- `quantize_symmetric(w, axis, dtype)`: per-channel (or per-tensor with axis=None) symmetric
  int8/uint8 weights, scale = max|w| / 127 per channel; |dequantized - w| <= scale / 2.
- `activation_params(low, high, dtype)`: scale and zero point of an activation range
  (uint8: asymmetric over [low, high]; int8: symmetric, zero point 0).
- `quantize_blocks(w, bits, block_size, symmetric)`: ONNX Runtime `MatMulNBits` layout of a
  [K, N] weight: unsigned `bits`-bit codes of W^T in blocks of `block_size` along K, packed
  low nibble first, one scale per (column, block) and, when asymmetric, one zero point.
  Symmetric uses every level ([-8, 7] for int4) with the largest magnitude on -8, exactly as
  ONNX Runtime's `MatMulNBitsQuantizer`; the codes are bit-equal to its C++ quantizer's.
  `weight_blocks`, `block_params`, `quantize_values` and `pack_blocks` are its steps, which
  the calibrated methods (`graphopt.passes.weight_only`) reuse.
- `dequantize_blocks(...)`: the inverse, used by the tests; `rounded_blocks` gives the same
  weight without packing (what the calibrated methods and choose-precision score).
- `rounded_activation(x)` / `rounded_weight(w)`: x and W as a uint8 per-tensor / int8
  per-channel quantizer gives them back (smooth-quant's and choose-precision's int8 estimates).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

QMAX = {"int8": 127, "uint8": 127}
ZERO_POINT = {"int8": 0, "uint8": 128}
NUMPY_TYPE = {"int8": np.int8, "uint8": np.uint8}


def quantize_symmetric(w: np.ndarray, axis: Optional[int], dtype: str = "int8") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quantized, scale, zero_point) of `w`; scale/zero point have w.shape[axis] entries
    (a scalar each when axis is None). Values span [-127, 127] around the zero point."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        absmax = np.asarray(np.abs(w).max() if w.size else 0.0, dtype=np.float32)
        broadcast = absmax
    else:
        others = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
        absmax = np.abs(w).max(axis=others) if w.size else np.zeros(w.shape[axis], np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        broadcast = absmax.reshape(shape)
    scale = np.where(absmax > 0, absmax / QMAX[dtype], 1.0).astype(np.float32)
    step = np.where(broadcast > 0, broadcast / QMAX[dtype], 1.0).astype(np.float32)
    zero = ZERO_POINT[dtype]
    quantized = np.clip(np.rint(w / step), -QMAX[dtype], QMAX[dtype]) + zero
    zero_point = np.full(scale.shape, zero, dtype=NUMPY_TYPE[dtype])
    return quantized.astype(NUMPY_TYPE[dtype]), scale, zero_point


def activation_params(low: float, high: float, dtype: str = "uint8") -> tuple[np.ndarray, np.ndarray]:
    """Scalar (scale, zero_point) covering [low, high] (low <= 0 <= high)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if dtype == "uint8":
        scale = (high - low) / 255.0 or 1.0
        zero = int(np.clip(np.rint(-low / scale), 0, 255))
        return np.asarray(scale, np.float32), np.asarray(zero, np.uint8)
    scale = max(-low, high) / 127.0 or 1.0
    return np.asarray(scale, np.float32), np.asarray(0, np.int8)


def rounded_activation(x: np.ndarray) -> np.ndarray:
    """x as uint8 quantization over its own [min, max] (`activation_params`) gives it back: what
    a per-tensor static or dynamic int8 matmul reads."""
    scale, zero = activation_params(float(x.min()), float(x.max()))
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


def rounded_weight(w: np.ndarray) -> np.ndarray:
    """A [K, N] weight as per-output-channel symmetric int8 (`quantize_symmetric`) gives it back."""
    q, scale, _ = quantize_symmetric(w, axis=1)
    return q.astype(np.float32) * scale


@dataclasses.dataclass
class BlockQuantized:
    """A [K, N] weight in ONNX Runtime's `MatMulNBits` layout (see `quantize_blocks`)."""

    packed: np.ndarray
    """uint8 [N, blocks, block_size * bits / 8]: W^T's `bits`-bit values, low nibble first."""
    scales: np.ndarray
    """float32 [N, blocks]."""
    zero_points: Optional[np.ndarray]
    """uint8 [N, ceil(blocks / 2)] (4 bits, packed like the weights) or [N, blocks] (8 bits);
    None when symmetric (MatMulNBits' default zero point 2^(bits-1))."""


def weight_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """W^T of a [K, N] weight as [N, blocks, block_size], K zero-padded to whole blocks."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), dtype=np.float32)
    padded[:k] = w
    return padded.T.reshape(n, blocks, block_size)


def block_params(grouped: np.ndarray, bits: int, symmetric: bool, clip: "float | np.ndarray" = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per block of `grouped` ([..., block_size] -> [...]), as ONNX Runtime's
    quantizer picks them: symmetric maps the value of largest magnitude to -2^(bits-1) (all 2^bits
    levels used, scale signed, zero point 2^(bits-1)); asymmetric spans [min(x, 0), max(x, 0)]
    with 2^bits - 1 steps and a rounded zero point. `clip` (per block, or one ratio) shrinks that
    range first: values beyond it saturate."""
    levels = 2**bits - 1
    if symmetric:
        index = np.abs(grouped).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(grouped, index, axis=-1)[..., 0] * clip
        scale = extreme / -(2 ** (bits - 1))
        zero = np.full(scale.shape, 2 ** (bits - 1), dtype=np.float32)
    else:
        low, high = np.minimum(grouped.min(axis=-1), 0.0) * clip, np.maximum(grouped.max(axis=-1), 0.0) * clip
        scale = (high - low) / levels
        zero = np.clip(np.rint(-low / np.where(scale != 0, scale, 1.0)), 0, levels)
    scale = np.where(scale != 0, scale, 1.0).astype(np.float32)
    return scale, zero.astype(np.float32)


def quantize_values(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit codes of x (scale, zero broadcast against x): clip(rint(x / s) + z)."""
    return np.clip(np.rint(x / scale) + zero, 0, 2**bits - 1)


def decoded_blocks(grouped: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """The values `MatMulNBits` computes with for blocks `grouped` [N, blocks, block_size]
    encoded with per-block `scale` and `zero` [N, blocks]: (code - zero) * scale."""
    return (quantize_values(grouped, scale[..., None], zero[..., None], bits) - zero[..., None]) * scale[..., None]


def rounded_blocks(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> np.ndarray:
    """The [K, N] weight `quantize_blocks` encodes, as `dequantize_blocks` would give it back
    (without packing and unpacking)."""
    grouped = weight_blocks(w, block_size)
    scale, zero = block_params(grouped, bits, symmetric)
    return _ungrouped(decoded_blocks(grouped, scale, zero, bits), w.shape[0])


def _ungrouped(grouped: np.ndarray, k: int) -> np.ndarray:
    """The [K, N] matrix of blocks [N, blocks, block_size] (`weight_blocks`' inverse)."""
    return grouped.reshape(grouped.shape[0], -1)[:, :k].T.copy()


def pack_blocks(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, symmetric: bool) -> BlockQuantized:
    """`BlockQuantized` of codes [N, blocks, block_size] with their per-block scale and zero point."""
    q = codes.astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zero_points = None
    if not symmetric:
        zero_points = zero.astype(np.uint8)
        if bits == 4:
            if zero_points.shape[1] % 2:
                zero_points = np.pad(zero_points, ((0, 0), (0, 1)), constant_values=8)  # ONNX Runtime's filler
            zero_points = (zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)).astype(np.uint8)
    return BlockQuantized(q, scale.astype(np.float32), zero_points)


def quantize_blocks(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> BlockQuantized:
    """Round-to-nearest `MatMulNBits` encoding of a [K, N] weight, scales per (column, block of
    `block_size` along K) from `block_params`; codes equal ONNX Runtime's quantizer's."""
    grouped = weight_blocks(w, block_size)
    scale, zero = block_params(grouped, bits, symmetric)
    return pack_blocks(quantize_values(grouped, scale[..., None], zero[..., None], bits), scale, zero, bits, symmetric)


def dequantize_blocks(
    packed: np.ndarray, scales: np.ndarray, k: int, n: int, bits: int, block_size: int, zero_points: Optional[np.ndarray] = None
) -> np.ndarray:
    """The [K, N] float32 weight that `quantize_blocks` encoded."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(n, -1, block_size * bits // 8)
    blocks = packed.shape[1]
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block_size)
    else:
        q = packed
    if zero_points is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), dtype=np.float32)
    elif bits == 4:
        zp = np.asarray(zero_points, dtype=np.uint8).reshape(n, -1)
        zero = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    else:
        zero = np.asarray(zero_points, dtype=np.float32).reshape(n, blocks)
    return _ungrouped((q.astype(np.float32) - zero[..., None]) * np.asarray(scales, np.float32).reshape(n, blocks, 1), k)
