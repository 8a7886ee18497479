"""Schema of ``graphopt::RotaryEmbedding(x, cos, sin) -> y``: rotary position embedding (RoPE).

Inputs:
- ``x`` [B, H, S, D]: heads already split, the layout Hugging Face models rotate q and k in;
- ``cos``, ``sin`` [B, S, R/2] (one row per token) or [S, R/2] (shared by the batch; a
  batch dim of 1 broadcasts too): the cosines and sines of each token's rotation angles,
  one per rotated pair, already scaled (HF's ``attention_scaling`` multiplies them).

Attributes: ``rotary_dim`` R (0 or absent: D), even, at most D: only the first R features
of each head rotate, the other D - R pass through (partial rotary, as Phi-3 and GPT-NeoX);
``interleaved`` (0: the rotated pairs are the two halves, x_rot[..., i] and
x_rot[..., i + R/2], as LLaMA's ``rotate_half``; 1: adjacent pairs x_rot[..., 2i] and
x_rot[..., 2i + 1], as GPT-J).

With x_rot = x[..., :R], x_pass = x[..., R:], c = cos and s = sin broadcast over the head
axis (c[b, 1, t, i]):

    interleaved = 0:  x1 = x_rot[..., :R/2],  x2 = x_rot[..., R/2:]
                      y_rot = concat(x1 * c - x2 * s, x2 * c + x1 * s)
    interleaved = 1:  x1 = x_rot[..., 0::2],  x2 = x_rot[..., 1::2]
                      y_rot[..., 0::2] = x1 * c - x2 * s,  y_rot[..., 1::2] = x2 * c + x1 * s
    y = concat(y_rot, x_pass)                       (same shape and type as x)

which is `x_rot * C + rotate_half(x_rot) * S` with C = concat(c, c) and S = concat(s, s)
(interleaved: each entry repeated twice), the form the models compute, and ONNX's
opset-23 `RotaryEmbedding` on [B, H, S, D] input with the same cos/sin.
"""

from __future__ import annotations

from graphopt.ir.schema import GRAPHOPT_DOMAIN, InferenceContext, OpSchema, register_schema
from graphopt.ir.types import TensorType


def _rotary(ctx: InferenceContext) -> list[TensorType]:
    x, cos, sin = ctx.input_type(0), ctx.input_type(1), ctx.input_type(2)
    if x.shape is not None and len(x.shape) != 4:
        raise ValueError(f"RotaryEmbedding: x must be rank 4 [batch, heads, seq, head_dim], got rank {len(x.shape)}")
    head_dim = x.shape[3] if x.shape is not None else None
    rotary = int(ctx.attr("rotary_dim", 0) or 0)
    if rotary < 0 or rotary % 2:
        raise ValueError(f"RotaryEmbedding: rotary_dim must be even and >= 0, got {rotary}")
    if isinstance(head_dim, int) and rotary > head_dim:
        raise ValueError(f"RotaryEmbedding: rotary_dim {rotary} exceeds the head size {head_dim}")
    rotary = rotary or head_dim  # type: ignore[assignment]
    if isinstance(rotary, int) and rotary % 2:
        raise ValueError(f"RotaryEmbedding: the rotated size {rotary} is odd")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape is None:
            continue
        if len(t.shape) not in (2, 3):
            raise ValueError(f"RotaryEmbedding: {name} must be rank 2 [seq, rotary_dim/2] or 3 [batch, seq, rotary_dim/2], got rank {len(t.shape)}")
        half = t.shape[-1]
        if isinstance(half, int) and isinstance(rotary, int) and half != rotary // 2:
            raise ValueError(f"RotaryEmbedding: {name} has {half} entries per token, the rotated size {rotary} needs {rotary // 2}")
    return [x]


register_schema(OpSchema(
    GRAPHOPT_DOMAIN, "RotaryEmbedding", _rotary, min_inputs=3, max_inputs=3, same_dtype_inputs=((0, 1, 2),),
    doc="Rotary position embedding of split heads [B, H, S, D] by cos/sin [B, S, R/2]; half-split or interleaved, partial.",
))
