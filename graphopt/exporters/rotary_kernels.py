"""Torch kernel of `graphopt::RotaryEmbedding` (formula: `graphopt.ir.ops.rotary`).

Called like the kernels of `graphopt_kernels.py`: inputs positionally, attributes as keywords.
"""

from __future__ import annotations

import torch
from torch import Tensor


def graphopt_RotaryEmbedding(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: int = 0, rotary_dim: int = 0) -> Tensor:
    """Rotate the first `rotary_dim` features (all when 0) of x [B, H, S, D] by cos/sin
    [B, S, R/2] or [S, R/2]: half-split pairs, or adjacent ones when `interleaved`."""
    rotary = rotary_dim or x.shape[-1]
    c, s = cos.unsqueeze(-3), sin.unsqueeze(-3)
    rotate, keep = x[..., :rotary], x[..., rotary:]
    if interleaved:
        x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
    else:
        x1, x2 = rotate[..., : rotary // 2], rotate[..., rotary // 2 :]
    real, imag = x1 * c - x2 * s, x2 * c + x1 * s
    rotated = torch.stack([real, imag], dim=-1).flatten(-2) if interleaved else torch.cat([real, imag], dim=-1)
    return torch.cat([rotated, keep], dim=-1) if keep.shape[-1] else rotated
