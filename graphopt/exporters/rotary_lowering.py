"""Decompose `graphopt::RotaryEmbedding` into standard ONNX ops (opset 13 and up).

`decompose_rotary(builder, node)` emits the formula of `graphopt.ir.ops.rotary` with the
`_Builder` of `graphopt.exporters.onnx_lowering`: cos/sin unsqueezed over the head axis, the
two halves (or the even and odd features, `interleaved`) sliced off x, `x1*c - x2*s` and
`x2*c + x1*s` joined back (interleaved: stacked on a new last axis and reshaped), and the
pass-through features past `rotary_dim` concatenated after them. The arithmetic is the one
the fused pattern computed, so results agree to rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from graphopt.errors import ExportError
from graphopt.ir.graph import Node, Value

if TYPE_CHECKING:
    from graphopt.exporters.onnx_lowering import _Builder

_END = int(np.iinfo(np.int64).max)


def decompose_rotary(b: "_Builder", node: Node) -> Value:
    """The standard-ONNX value equal to `node`'s output, built before `node`."""
    x, cos, sin = node.inputs[:3]
    head_dim = x.type.shape[3] if x.type.shape else None  # type: ignore[union-attr]
    rotary = int(node.attrs.get("rotary_dim", 0) or 0) or head_dim
    if not isinstance(rotary, int):
        raise ExportError(f"node {node.label}: RotaryEmbedding without rotary_dim needs a static head size")
    axis = b.ints([-1])
    c = b.op("Unsqueeze", cos, b.ints([-3]))  # type: ignore[arg-type]
    s = b.op("Unsqueeze", sin, b.ints([-3]))  # type: ignore[arg-type]
    if int(node.attrs.get("interleaved", 0)):
        x1 = b.op("Slice", x, b.ints([0]), b.ints([rotary]), axis, b.ints([2]))  # type: ignore[arg-type]
        x2 = b.op("Slice", x, b.ints([1]), b.ints([rotary]), axis, b.ints([2]))  # type: ignore[arg-type]
    else:
        x1 = b.op("Slice", x, b.ints([0]), b.ints([rotary // 2]), axis)  # type: ignore[arg-type]
        x2 = b.op("Slice", x, b.ints([rotary // 2]), b.ints([rotary]), axis)  # type: ignore[arg-type]
    real = b.op("Sub", b.op("Mul", x1, c), b.op("Mul", x2, s))
    imag = b.op("Add", b.op("Mul", x2, c), b.op("Mul", x1, s))
    if int(node.attrs.get("interleaved", 0)):
        last = b.ints([-1])
        pairs = b.op("Concat", b.op("Unsqueeze", real, last), b.op("Unsqueeze", imag, last), axis=-1)
        rotated = b.op("Reshape", pairs, b.ints([0, 0, 0, rotary]))
    else:
        rotated = b.op("Concat", real, imag, axis=-1)
    if rotary == head_dim:
        return rotated
    kept = b.op("Slice", x, b.ints([rotary]), b.ints([_END]), axis)  # type: ignore[arg-type]
    return b.op("Concat", rotated, kept, axis=-1)
