"""Weight quantization arithmetic shared by the quantization passes (no graph editing here).

- `quantize_symmetric(w, axis, dtype)`: per-channel (or per-tensor with axis=None) symmetric
  int8/uint8 weights, scale = max|w| / 127 per channel; |dequantized - w| <= scale / 2.
- `activation_params(low, high, dtype)`: scale and zero point of an activation range
  (uint8: asymmetric over [low, high]; int8: symmetric, zero point 0).
- `quantize_blocks(w, bits, block_size)`: ONNX Runtime `MatMulNBits` layout of a [K, N]
  weight: unsigned `bits`-bit values (zero point 2^(bits-1)) of W^T in blocks of
  `block_size` along K, packed low nibble first, and one scale per (column, block).
- `dequantize_blocks(...)`: the inverse, used by the torch kernel and the tests.
"""

from __future__ import annotations

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


def quantize_blocks(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [N, blocks, block_size * bits / 8], scales float32 [N, blocks]) of a
    [K, N] weight, symmetric: q = clip(round(w / s), -qmax, qmax) + 2^(bits-1), qmax = 2^(bits-1) - 1."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), dtype=np.float32)
    padded[:k] = w
    grouped = padded.T.reshape(n, blocks, block_size)
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(grouped).max(axis=2)
    scales = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    q = (np.clip(np.rint(grouped / scales[..., None]), -qmax, qmax) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return q, scales


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, k: int, n: int, bits: int, block_size: int) -> np.ndarray:
    """The [K, N] float32 weight that `quantize_blocks` encoded."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(n, -1, block_size * bits // 8)
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, packed.shape[1], block_size)
    else:
        q = packed
    values = (q.astype(np.float32) - 2 ** (bits - 1)) * np.asarray(scales, np.float32).reshape(n, -1, 1)
    return values.reshape(n, -1)[:, :k].T.copy()
