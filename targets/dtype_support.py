"""How the targets name the element types they cannot run, and what they tell the user to do.

Shared by the `unsupported_reason` of the onnxruntime, tvm and tensorrt targets: a node is
named by its signature, ``Add(bfloat16, bfloat16) -> bfloat16`` (the element types of its
inputs, then of its outputs), and the advice names the graphopt pass that makes such a type.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Node

_NAMES = {DType.FLOAT: "float32", DType.DOUBLE: "float64"}

MADE_BY = {
    DType.BFLOAT16: "to-bf16 (to-fp16 or float32 instead)",
    DType.FLOAT16: "to-fp16 (float32 instead)",
    DType.INT4: "quantize{dtype=int4} (int8 instead)",
    DType.UINT4: "quantize{dtype=int4} (int8 instead)",
}
"""The graphopt pass that produces each low-precision type a target may lack, and what to use instead."""


def dtype_name(dtype: Optional[DType]) -> str:
    """numpy-style name of an element type: float32, bfloat16, int4 ('?' when unknown)."""
    if dtype is None:
        return "?"
    return _NAMES.get(dtype, dtype.name.lower())


def signature(node: Node) -> str:
    """The node's op with the element types it reads and writes: ``MatMul(bfloat16, bfloat16) -> bfloat16``."""
    reads = ", ".join(dtype_name(v.dtype) for v in node.inputs if v is not None)
    writes = ", ".join(dtype_name(v.dtype) for v in node.outputs)
    return f"{node.qualified_op}({reads}) -> {writes}"


def node_dtypes(node: Node) -> list[DType]:
    """The known element types of the node's inputs and outputs, each once, in order."""
    found: list[DType] = []
    for value in (*node.inputs, *node.outputs):
        if value is not None and value.dtype is not None and value.dtype not in found:
            found.append(value.dtype)
    return found


def listing(items: Sequence[str], limit: int = 5) -> str:
    """The first `limit` distinct items, comma-separated, with how many more there are."""
    distinct = list(dict.fromkeys(items))
    more = f" and {len(distinct) - limit} more" if len(distinct) > limit else ""
    return ", ".join(distinct[:limit]) + more


def advice(dtypes: Iterable[DType]) -> str:
    """What to do instead: target torch, partition, or a pipeline without the pass that made `dtypes`."""
    passes = list(dict.fromkeys(MADE_BY[d] for d in dtypes if d in MADE_BY))
    instead = f", or a pipeline without {' / '.join(passes)}" if passes else ""
    return f"use target 'torch', or compile with partition=True to run these nodes in torch{instead}"


def refused_types_reason(nodes: Sequence[Node], refused: Callable[[Node], list[DType]], who: str, where: str = "") -> str:
    """"<who> takes no <types> tensors<where>: <signatures>; <advice>" for the `nodes` whose
    element types `refused(node)` names; "" when there are none (their op names say it)."""
    typed = [n for n in nodes if refused(n)]
    if not typed:
        return ""
    dtypes = list(dict.fromkeys(d for n in typed for d in refused(n)))
    names = ", ".join(dtype_name(d) for d in dtypes)
    return f"{who} takes no {names} tensors{where}: {listing([signature(n) for n in typed])}; {advice(dtypes)}"
