"""Lower `graphopt::RotaryEmbedding` to ONNX Runtime's kernels: the `com.microsoft` contrib op,
or ONNX's own opset-23 `RotaryEmbedding` for standard ONNX out.

Both kernels take cos/sin *caches* [max_pos, R/2] indexed by position ids [B, S], while the
graphopt op takes the rows already gathered, [B, S, R/2] or [S, R/2]. So the rows become
the cache (flattened to [Bc * S, R/2], Bc the batch dim of cos: B or 1) and the ids
`arange(Bc * S).reshape(Bc, S)` broadcast to [B, S] (no broadcast where cos is already
[B, S, R/2]: those nodes then read only cos, so every layer shares them after CSE) index them
back: every id lies inside the cache, whatever the positions the model was given. X stays
[B, H, S, D] (both kernels take that layout, ORT 1.32), except that the contrib op takes the
[B, S, H*D] projection the heads were split from when there is one (with `num_heads`; the
heads are split again after it, and an attention lowering reading the merged form drops that
split). Measured against the torch kernel and the decomposition
(`tests/targets/test_onnxruntime_rotary.py`): equal to <= 1e-6 for half-split and
interleaved rotation, full and partial `rotary_dim`, batch-broadcast and 2-D cos/sin.

Each function returns the new node, or None (refused: the node is then decomposed) where
the kernel would not compute the same: x not rank 4, cos/sin not rank 2 or 3, an element
type the kernel lacks, a partial rotary whose head count is not static (the contrib op
needs `num_heads` with `rotary_embedding_dim`), or, for the opset-23 op, a graph below
opset 23.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value
from graphopt.ir.symbolic import dims_equal
from graphopt.targets.onnxruntime_heads import HEAD_PERM, merged_source

MS_DOMAIN = "com.microsoft"
ONNX_ROTARY_OPSET = 23
"""The first ONNX opset with RotaryEmbedding."""
_KERNEL_TYPES = (DType.FLOAT, DType.FLOAT16)


def lower_rotary_contrib(graph: Graph, node: Node) -> Optional[Node]:
    """Replace `node` by `com.microsoft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache)`."""
    plan = _plan(node)
    if plan is None:
        return None
    rotary, heads, partial = plan
    if partial and heads is None:
        return None
    cos_cache, sin_cache, ids = _caches(graph, node, rotary)
    attrs: dict[str, object] = {"interleaved": int(node.attrs.get("interleaved", 0))}
    if partial:
        attrs.update(rotary_embedding_dim=rotary, num_heads=heads)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    head_size = node.output.type.shape[3]  # type: ignore[index]
    merged = merged_source(node.inputs[0], heads, head_size) if heads is not None and isinstance(head_size, int) else None  # type: ignore[arg-type]
    if merged is None:
        new = graph.add_node("RotaryEmbedding", [node.inputs[0], ids, cos_cache, sin_cache], attrs, domain=MS_DOMAIN, before=node, infer=False)
        return _replace(graph, node, new)
    # the [B, S, H*D] projection the heads were split from: rotated as it is, split again after
    attrs["num_heads"] = heads
    new = graph.add_node("RotaryEmbedding", [merged, ids, cos_cache, sin_cache], attrs, domain=MS_DOMAIN, before=node, infer=False)
    new.outputs[0].type = merged.type
    shape = graph.add_constant(graph.unique_name(f"{node.name}_heads"), np.array([0, 0, heads, head_size], np.int64))
    split = graph.add_node("Reshape", [new.output, shape], before=node).output
    heads_first = graph.add_node("Transpose", [split], {"perm": HEAD_PERM}, before=node)
    _replace(graph, node, heads_first)
    return new


def lower_rotary_onnx23(graph: Graph, node: Node) -> Optional[Node]:
    """Replace `node` by ONNX's `RotaryEmbedding(x, cos_cache, sin_cache, position_ids)` (opset >= 23)."""
    plan = _plan(node)
    if plan is None or graph.opset() < ONNX_ROTARY_OPSET:
        return None
    rotary, _, partial = plan
    cos_cache, sin_cache, ids = _caches(graph, node, rotary)
    attrs: dict[str, object] = {"interleaved": int(node.attrs.get("interleaved", 0))}
    if partial:
        attrs["rotary_embedding_dim"] = rotary
    new = graph.add_node("RotaryEmbedding", [node.inputs[0], cos_cache, sin_cache, ids], attrs, before=node, infer=False)
    return _replace(graph, node, new)


def _plan(node: Node) -> Optional[tuple[int, Optional[int], bool]]:
    """(rotated size R, static head count or None, whether R < D), or None when refused."""
    x, cos, sin = node.inputs[:3]
    if x is None or cos is None or sin is None or x.dtype not in _KERNEL_TYPES:
        return None
    shape = x.type.shape
    if shape is None or len(shape) != 4 or cos.type.rank not in (2, 3) or sin.type.rank != cos.type.rank:
        return None
    head_dim = shape[3]
    rotary = int(node.attrs.get("rotary_dim", 0) or 0) or head_dim
    if not isinstance(rotary, int):
        return None
    heads = shape[1] if isinstance(shape[1], int) else None
    return rotary, heads, rotary != head_dim


def _caches(graph: Graph, node: Node, rotary: int) -> tuple[Value, Value, Value]:
    """cos/sin as [rows, R/2] caches and the [B, S] ids that pick each token's row."""
    x, cos, sin = node.inputs[:3]

    def add(op: str, *inputs: Value, **attrs: object) -> Value:
        return graph.add_node(op, list(inputs), attrs or None, before=node).output

    def ints(values: object) -> Value:
        return graph.add_constant(graph.unique_name(f"{node.name}_rotary"), np.array(values, dtype=np.int64))

    def dims(value: Value, start: int, end: int) -> Value:
        return add("Slice", add("Shape", value), ints([start]), ints([end]))

    half = rotary // 2
    cos_cache = add("Reshape", cos, ints([-1, half]))  # type: ignore[arg-type]
    sin_cache = add("Reshape", sin, ints([-1, half]))  # type: ignore[arg-type]
    rows = add("Squeeze", dims(cos_cache, 0, 1), ints([0]))
    ids = add("Range", ints(0), rows, ints(1))
    rank = cos.type.rank  # type: ignore[union-attr]
    per_batch = dims(cos, 0, 2) if rank == 3 else add("Concat", ints([1]), dims(cos, 0, 1), axis=0)  # type: ignore[arg-type]
    ids = add("Reshape", ids, per_batch)
    if rank == 3 and dims_equal(cos.type.shape[0], x.type.shape[0]) and dims_equal(cos.type.shape[1], x.type.shape[2]):  # type: ignore[index,union-attr]
        return cos_cache, sin_cache, ids  # already [B, S]: no Expand, and the same nodes for every layer
    batch_seq = add("Concat", dims(x, 0, 1), dims(x, 2, 3), axis=0)  # type: ignore[arg-type]
    return cos_cache, sin_cache, add("Expand", ids, batch_seq)


def _replace(graph: Graph, node: Node, new: Node) -> Node:
    new.outputs[0].type = node.output.type
    graph.replace_value(node.output, new.output)
    graph.erase(node)
    return new
