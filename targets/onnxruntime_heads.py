"""The head layout ONNX Runtime's contrib kernels read: [B, S, H*D] before the heads are split.

Exporters split heads as Reshape [B, S, H*D] -> [B, S, H, D] then Transpose(0, 2, 1, 3) to
[B, H, S, D]; the attention and rotary lowerings hand the contrib ops the tensor before that
split where there is one (`merged_source`), so the layout ops go dead.
"""

from __future__ import annotations

from typing import Optional

from graphopt.ir.graph import Value
from graphopt.ir.symbolic import dims_equal

HEAD_PERM = (0, 2, 1, 3)
"""[B, S, H, D] <-> [B, H, S, D]."""


def merged_source(value: Value, heads: int, head_size: int) -> Optional[Value]:
    """The [B, S, heads*head_size] tensor `value` ([B, heads, S, head_size]) was made from by
    Reshape to [B, S, heads, head_size] and Transpose(0, 2, 1, 3), if it was (batch and
    sequence dims proven the same on both sides of the Reshape)."""
    transpose = value.producer
    if transpose is None or transpose.op_type != "Transpose" or transpose.domain or tuple(transpose.attrs.get("perm", ())) != HEAD_PERM:
        return None
    reshape = transpose.inputs[0].producer  # type: ignore[union-attr]
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain:
        return None
    source, split = reshape.inputs[0], reshape.output.shape
    if source is None or source.shape is None or len(source.shape) != 3 or split is None or len(split) != 4:
        return None
    if tuple(split[2:]) != (heads, head_size) or source.shape[2] != heads * head_size:
        return None
    if not all(dims_equal(a, b) for a, b in zip(split[:2], source.shape[:2])):
        return None
    return source
