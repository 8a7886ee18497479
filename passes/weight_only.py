"""Calibrated weight-only quantization methods (no graph editing here).

Both work on a [K, N] weight matrix W (y = x @ W) quantized in `MatMulNBits` blocks of
`block_size` along K (see `graphopt.passes.quantize_weights`), and on calibration
activations x of the matmul's input.

- `awq_factors(rows, weights, ...)`: activation-aware scaling (AWQ, Lin et al. 2024). Input
  channels that see large activations matter more, so the weights' rows are scaled up by
  s_j = mean|x_j|^alpha (normalized around 1) before rounding and the activation divided by
  s: x @ W == (x / s) @ (s * W) exactly in float, and the rounding error of the important rows
  shrinks. alpha is searched on AWQ_GRID (0 = no scaling, so the search never loses to
  round-to-nearest) for the smallest relative squared error of the matmuls that read x, on
  the given activation rows. Returns the factors, or None when alpha = 0 wins.
- `clipped_blocks(w, rows, ...)`: AWQ's clipping search. Each block's range is shrunk by the
  ratio of CLIP_RATIOS (1 = no clipping) that gives the smallest squared error of that block's
  share of x @ W on the rows, per output column: saturating a few outliers buys finer steps
  for the rest.
- `gptq(w, gram, ...)`: GPTQ (Frantar et al. 2023). Quantizes W's input channels one at a
  time in order, and spreads each channel's rounding error over the channels not yet
  quantized through the inverse of the Hessian H = X^T X of the calibration activations
  (dampened by GPTQ_DAMP * mean(diag H)), which minimizes ||X W - X Q||^2 greedily. Block
  scales and zero points are chosen when the walk reaches a block, from the updated weights.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from graphopt.passes.quantize_weights import (
    BlockQuantized, block_params, decoded_blocks, pack_blocks, quantize_values, rounded_blocks, weight_blocks,
)

AWQ_GRID = tuple(i / 10 for i in range(11))
"""alpha values awq_factors tries (0: plain round-to-nearest)."""
CLIP_RATIOS = tuple(1 - i / 20 for i in range(11))
"""Range shrink ratios clipped_blocks tries per block (1.0 down to 0.5)."""
CLIP_ROWS = 128
"""Activation rows clipped_blocks scores each ratio on."""
GPTQ_DAMP = 0.01
"""Fraction of the Hessian's mean diagonal added to it (GPTQ's percdamp)."""
GPTQ_BATCH = 128
"""Input channels updated together before the rest of W sees their error (lazy batch)."""


def awq_factors(
    rows: np.ndarray, weights: Sequence[np.ndarray], bits: int, block_size: int, symmetric: bool
) -> Optional[np.ndarray]:
    """Per-input-channel factors s ([K] float32) that minimize the relative squared error of
    x @ W over `weights` (every [K, N] matmul reading x) on `rows` ([R, K] activations)."""
    rows = np.asarray(rows, dtype=np.float32)
    importance = np.abs(rows).mean(axis=0).astype(np.float64)
    importance = np.where(importance > 0, importance, importance[importance > 0].min() if np.any(importance > 0) else 1.0)
    exact = [rows @ w for w in weights]
    norms = [max(float(np.sum(e.astype(np.float64) ** 2)), 1e-30) for e in exact]
    best: tuple[float, Optional[np.ndarray]] = (np.inf, None)
    for alpha in AWQ_GRID:
        factors = importance**alpha
        factors = (factors / np.sqrt(factors.max() * factors.min())).astype(np.float32)
        scaled_rows = rows / factors
        error = 0.0
        for w, want, norm in zip(weights, exact, norms):
            restored = rounded_blocks(w * factors[:, None], bits, block_size, symmetric)
            error += float(np.sum((scaled_rows @ restored - want).astype(np.float64) ** 2)) / norm
        if error < best[0]:
            best = (error, None if alpha == 0 else factors)
    return best[1]


def clipped_blocks(w: np.ndarray, rows: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockQuantized:
    """`MatMulNBits` encoding of a [K, N] weight with each (column, block) range clipped by the
    ratio of CLIP_RATIOS that minimizes ||x_block @ (W_block - Q(W_block))||^2 on `rows` [R, K]."""
    grouped = weight_blocks(w, block_size)  # [N, blocks, block_size]
    n, blocks, _ = grouped.shape
    sample = np.asarray(rows, dtype=np.float32)[:: max(1, len(rows) // CLIP_ROWS)][:CLIP_ROWS]
    padded = np.zeros((len(sample), blocks * block_size), np.float32)
    padded[:, : sample.shape[1]] = sample
    x = padded.reshape(len(sample), blocks, block_size).transpose(1, 0, 2)  # [blocks, R, block_size]
    best_error = np.full((n, blocks), np.inf)
    best_ratio = np.ones((n, blocks), np.float32)
    for ratio in CLIP_RATIOS:
        scale, zero = block_params(grouped, bits, symmetric, ratio)
        difference = (grouped - decoded_blocks(grouped, scale, zero, bits)).transpose(1, 2, 0)  # [blocks, block_size, N]
        error = np.sum(np.matmul(x, difference).astype(np.float64) ** 2, axis=1).T  # [N, blocks]
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_ratio = np.where(better, ratio, best_ratio)
    scale, zero = block_params(grouped, bits, symmetric, best_ratio)
    return pack_blocks(quantize_values(grouped, scale[..., None], zero[..., None], bits), scale, zero, bits, symmetric)


def gptq(w: np.ndarray, gram: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockQuantized:
    """GPTQ encoding of a [K, N] weight given the [K, K] Gram matrix X^T X of its inputs."""
    weight = np.asarray(w, dtype=np.float64).T.copy()  # [N, K]: one row per output channel
    n, k = weight.shape
    hessian = np.asarray(gram, dtype=np.float64).copy()
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    hessian[np.diag_indices(k)] += GPTQ_DAMP * float(np.mean(np.diag(hessian)))
    inverse = _upper_cholesky_of_inverse(hessian)
    blocks = -(-k // block_size)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, blocks), np.float32)
    codes = np.zeros((n, blocks * block_size), np.float32)
    batch = max(GPTQ_BATCH // block_size, 1) * block_size
    for start in range(0, k, batch):
        stop = min(start + batch, k)
        chunk = weight[:, start:stop].copy()
        errors = np.zeros_like(chunk)
        local = inverse[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if column % block_size == 0:
                group = chunk[:, i:i + block_size].astype(np.float32)
                padded = np.zeros((n, 1, block_size), np.float32)
                padded[:, 0, : group.shape[1]] = group
                scale, zero = block_params(padded, bits, symmetric)
                scales[:, column // block_size], zeros[:, column // block_size] = scale[:, 0], zero[:, 0]
            b = column // block_size
            code = quantize_values(chunk[:, i], scales[:, b].astype(np.float64), zeros[:, b], bits)
            codes[:, column] = code
            error = (chunk[:, i] - (code - zeros[:, b]) * scales[:, b]) / local[i, i]
            chunk[:, i:] -= np.outer(error, local[i, i:])
            errors[:, i] = error
        weight[:, stop:] -= errors @ inverse[start:stop, stop:]
    grouped = codes.reshape(n, blocks, block_size)
    padding = blocks * block_size - k
    if padding:
        grouped[:, -1, block_size - padding:] = zeros[:, -1:]  # padded inputs are 0: code = zero point
    return pack_blocks(grouped, scales, zeros, bits, symmetric)


def _upper_cholesky_of_inverse(hessian: np.ndarray) -> np.ndarray:
    """U with U^T U = H^-1 (GPTQ's Hinv), damping more until H is positive definite."""
    k = hessian.shape[0]
    extra = GPTQ_DAMP * float(np.mean(np.diag(hessian)))
    for _ in range(8):
        try:
            return np.linalg.cholesky(np.linalg.inv(hessian)).T
        except np.linalg.LinAlgError:
            hessian = hessian + extra * np.eye(k)
            extra *= 10
    raise np.linalg.LinAlgError("GPTQ: the calibration Hessian is not positive definite even after damping")

