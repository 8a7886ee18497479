"""Torch kernels of the opset-23/24 Transformer ops: Attention, RMSNormalization, RotaryEmbedding.

They follow the ONNX specification (and `onnx.reference`, checked against ONNX Runtime 1.32):

- `Attention`: 3-D inputs are split into heads by `q_num_heads` / `kv_num_heads` and the
  output merged back; `past_key` / `past_value` are concatenated in front of K / V (the
  present outputs); grouped-query heads repeat each KV head in place; the bias is the
  additive float mask (a boolean mask gives 0 / -inf), plus -inf outside the causal
  frontier `j <= i + offset` (offset = the past length, or `nonpad_kv_seqlen - q_len` per
  batch for an external cache), outside the opset-25 window, and past `nonpad_kv_seqlen`;
  a mask shorter than the keys is padded with -inf (False). Scores are
  `(Q * sqrt(scale)) @ (K * sqrt(scale))^T`, soft-capped, biased, softmaxed in
  `softmax_precision`; a query row with no key left (every bias -inf) outputs zeros.
  Outputs: Y, present_key, present_value and `qk_matmul_output` in the
  `qk_matmul_output_mode` (0 raw scores, 1 soft-capped, 2 biased, 3 probabilities).
- `RMSNormalization`: `x / sqrt(mean(x^2 over axis..-1) + epsilon)` in `stash_type`,
  cast back to X's type, times `scale`.
- `RotaryEmbedding`: the rotation of the first `rotary_embedding_dim` features (all when
  0) by cos/sin rows picked by `position_ids` (or given per token), halves or interleaved pairs.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

_FLOAT_TYPES: dict[int, torch.dtype] = {1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def _float_type(op: str, attr: str, value: int) -> torch.dtype:
    if value not in _FLOAT_TYPES:
        raise ValueError(f"{op}: {attr}={value} is not a float type (1, 10, 11 or 16)")
    return _FLOAT_TYPES[value]


def _split_heads(x: Tensor, heads: Optional[int]) -> Tensor:
    """[B, S, H * D] -> [B, H, S, D]."""
    if not heads:
        raise ValueError("Attention: 3-D inputs need the q_num_heads and kv_num_heads attributes")
    batch, seq, hidden = x.shape
    return x.reshape(batch, seq, heads, hidden // heads).transpose(1, 2)


def _allowed_keys(
    q_len: int, total: int, device: torch.device, offset: Tensor | int, *, causal: bool, left: int, right: int,
) -> Optional[Tensor]:
    """Boolean [.., q_len, total] of the keys the causal frontier and the window leave, or None."""
    if not causal and left < 0 and right < 0:
        return None
    rows = torch.arange(q_len, device=device).reshape(q_len, 1)
    cols = torch.arange(total, device=device).reshape(1, total)
    diff = rows + offset - cols
    allowed = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        allowed &= diff >= 0
    if left >= 0:
        allowed &= diff <= left
    if right >= 0:
        allowed &= -diff <= right
    return allowed


def _attention_bias(
    mask: Optional[Tensor], nonpad: Optional[Tensor], q_len: int, total: int, dtype: torch.dtype, device: torch.device,
    offset: Tensor | int, *, causal: bool, left: int, right: int,
) -> Optional[Tensor]:
    """The additive bias broadcastable to [B, Hq, q_len, total] (-inf where no attention)."""
    bias: Optional[Tensor] = None
    if mask is not None:
        if mask.shape[-1] < total:
            fill = False if mask.dtype == torch.bool else float("-inf")
            mask = torch.nn.functional.pad(mask, (0, total - mask.shape[-1]), value=fill)
        if mask.dtype == torch.bool:
            bias = torch.zeros((), dtype=dtype, device=device).masked_fill(~mask, float("-inf"))
        else:
            bias = mask.to(dtype)
    allowed = _allowed_keys(q_len, total, device, offset, causal=causal, left=left, right=right)
    if nonpad is not None:
        padding = torch.arange(total, device=device).reshape(1, 1, 1, total) < nonpad.reshape(-1, 1, 1, 1)
        allowed = padding if allowed is None else allowed & padding
    if allowed is not None:
        frontier = torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
        bias = frontier if bias is None else bias + frontier
    return bias


def _guarded_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last axis; rows whose every score is -inf give zeros, not NaN."""
    empty = torch.isneginf(scores.amax(dim=-1, keepdim=True))
    return torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)


def onnx_Attention(
    Q: Tensor, K: Tensor, V: Tensor, attn_mask: Optional[Tensor] = None, past_key: Optional[Tensor] = None,
    past_value: Optional[Tensor] = None, nonpad_kv_seqlen: Optional[Tensor] = None, *,
    is_causal: int = 0, kv_num_heads: Optional[int] = None, q_num_heads: Optional[int] = None,
    scale: Optional[float] = None, softcap: float = 0.0, softmax_precision: Optional[int] = None,
    qk_matmul_output_mode: int = 0, left_window_size: int = -1, right_window_size: int = -1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ONNX Attention (opsets 23-25); returns (Y, present_key, present_value, qk_matmul_output)."""
    three_d = Q.dim() == 3
    if three_d:
        Q, K, V = _split_heads(Q, q_num_heads), _split_heads(K, kv_num_heads), _split_heads(V, kv_num_heads)
    offset: Tensor | int = 0
    if past_key is not None and past_value is not None:
        offset = past_key.shape[2]
        K, V = torch.cat([past_key, K], dim=2), torch.cat([past_value, V], dim=2)
    elif nonpad_kv_seqlen is not None:
        offset = (nonpad_kv_seqlen - Q.shape[2]).reshape(-1, 1, 1, 1)
    present_key, present_value = K, V
    q_len, total = Q.shape[2], K.shape[2]
    bias = _attention_bias(attn_mask, nonpad_kv_seqlen, q_len, total, Q.dtype, Q.device, offset,
                           causal=bool(is_causal), left=left_window_size, right=right_window_size)
    groups = Q.shape[1] // K.shape[1]
    if groups > 1:
        K, V = K.repeat_interleave(groups, dim=1), V.repeat_interleave(groups, dim=1)
    root = math.sqrt(1.0 / math.sqrt(Q.shape[-1]) if scale is None else scale)
    raw = torch.matmul(Q * root, (K * root).transpose(-1, -2))
    capped = softcap * torch.tanh(raw / softcap) if softcap > 0 else raw
    biased = capped if bias is None else capped + bias
    stashed = biased if softmax_precision is None else biased.to(_float_type("Attention", "softmax_precision", softmax_precision))
    probs = _guarded_softmax(stashed).to(Q.dtype)
    y = torch.matmul(probs, V.to(probs.dtype))
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], q_len, -1)
    qk = (raw, capped, biased, probs)[qk_matmul_output_mode]
    return y, present_key, present_value, qk


def onnx_RMSNormalization(X: Tensor, scale: Tensor, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1) -> Tensor:
    """ONNX RMSNormalization (opset 23)."""
    axes = list(range(axis % X.dim(), X.dim()))
    stashed = X.to(_float_type("RMSNormalization", "stash_type", stash_type))
    normed = stashed / torch.sqrt(stashed.pow(2).mean(dim=axes, keepdim=True) + epsilon)
    return normed.to(X.dtype).to(scale.dtype) * scale


def onnx_RotaryEmbedding(
    X: Tensor, cos_cache: Tensor, sin_cache: Tensor, position_ids: Optional[Tensor] = None, *,
    interleaved: int = 0, num_heads: int = 0, rotary_embedding_dim: int = 0,
) -> Tensor:
    """ONNX RotaryEmbedding (opset 23): X [B, H, S, D] or [B, S, H * D]."""
    if X.dim() == 4:
        x = X.transpose(1, 2)
    else:
        if not num_heads:
            raise ValueError("RotaryEmbedding: a 3-D input needs the num_heads attribute")
        x = X.reshape(X.shape[0], X.shape[1], num_heads, -1)
    rotary = rotary_embedding_dim or x.shape[-1]
    if position_ids is not None:
        cos_cache, sin_cache = cos_cache[position_ids], sin_cache[position_ids]
    cos, sin = cos_cache.unsqueeze(2), sin_cache.unsqueeze(2)
    rotate, keep = x[..., :rotary], x[..., rotary:]
    if interleaved:
        x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
    else:
        x1, x2 = rotate.chunk(2, dim=-1)
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    rotated = torch.stack([real, imag], dim=-1).flatten(-2) if interleaved else torch.cat([real, imag], dim=-1)
    out = torch.cat([rotated, keep], dim=-1)
    return out.transpose(1, 2) if X.dim() == 4 else out.reshape(X.shape)


ONNX23_KERNELS: dict[tuple[str, str], Callable] = {
    ("", "Attention"): onnx_Attention,
    ("", "RMSNormalization"): onnx_RMSNormalization,
    ("", "RotaryEmbedding"): onnx_RotaryEmbedding,
}
"""The kernels above, keyed as `torch_kernels.TORCH_KERNELS` is."""

MULTI_OUTPUT_KERNELS: frozenset[tuple[str, str]] = frozenset({("", "Attention")})
"""Of these, the ones returning a tuple of every output."""
