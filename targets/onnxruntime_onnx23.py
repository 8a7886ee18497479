"""The opset-23/24 Transformer ops for ONNX Runtime, which runs Attention, RMSNormalization and
RotaryEmbedding natively (1.32, CPU); `prepare_onnx23_ops(graph)` covers the forms its kernel
does not compute as ONNX specifies:

- an `Attention` mask whose last dim may be shorter than the key count (past + new keys):
  ONNX pads it with -inf (False), ORT fails at run time, so the mask is padded in the graph
  first (`Pad` to the runtime key count; a no-op where it is already that long);
- a read `qk_matmul_output` in mode 2 (scores + mask) with `is_causal`, a boolean mask or
  `nonpad_kv_seqlen`: ORT writes the float minimum where ONNX has -inf at the scores these
  mask out; refused with UnsupportedOpError.
"""

from __future__ import annotations

import numpy as np

from graphopt.errors import UnsupportedOpError
from graphopt.ir.graph import Graph, Node, Value

_MASK = 3
_PAST_KEY = 4
_NONPAD = 6
_QK_OUTPUT = 3
_QK_WITH_BIAS = 2


def prepare_onnx23_ops(graph: Graph) -> Graph:
    """`graph`, or a copy whose ONNX Attention nodes ORT runs as ONNX specifies; raises
    UnsupportedOpError naming the node and attribute for a form it cannot."""
    nodes = [n for n in graph.nodes if n.domain == "" and n.op_type == "Attention"]
    for node in nodes:
        _check_attention(node)
    if not any(_mask_needs_padding(n) for n in nodes):
        return graph
    prepared = graph.clone()
    for node in prepared.nodes:
        if node.domain == "" and node.op_type == "Attention" and _mask_needs_padding(node):
            node.replace_input(_MASK, _padded_mask(prepared, node))
    return prepared


def _check_attention(node: Node) -> None:
    qk = node.outputs[_QK_OUTPUT] if len(node.outputs) > _QK_OUTPUT else None
    read = qk is not None and (bool(qk.uses()) or qk.is_graph_output)
    if not read or int(node.attrs.get("qk_matmul_output_mode", 0)) != _QK_WITH_BIAS:
        return
    mask = _input(node, _MASK)
    sources = [name for name, present in (
        ("is_causal=1", int(node.attrs.get("is_causal", 0))),
        ("a boolean attn_mask", mask is not None and mask.dtype is not None and mask.dtype.name == "BOOL"),
        ("nonpad_kv_seqlen", _input(node, _NONPAD) is not None),
    ) if present]
    if sources:
        raise UnsupportedOpError(
            f"node {node.label}: Attention with qk_matmul_output_mode=2 and {' and '.join(sources)}: ONNX Runtime writes "
            "the float minimum, not -inf, at the masked scores of qk_matmul_output; run it with target 'torch'"
        )


def _input(node: Node, index: int) -> Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _mask_needs_padding(node: Node) -> bool:
    """True unless the mask's last dim is known to equal the key count."""
    mask, key, past = _input(node, _MASK), node.inputs[1], _input(node, _PAST_KEY)
    if mask is None:
        return False
    mask_shape, key_shape = mask.type.shape, key.type.shape  # type: ignore[union-attr]
    if not mask_shape or key_shape is None:
        return True
    keys = key_shape[2] if len(key_shape) == 4 else key_shape[1]
    if past is not None:
        past_shape = past.type.shape
        past_len = past_shape[2] if past_shape is not None else None
        keys = keys + past_len if isinstance(keys, int) and isinstance(past_len, int) else None
    return keys is None or mask_shape[-1] != keys


def _padded_mask(graph: Graph, node: Node) -> Value:
    """The mask padded on its last axis to the runtime key count: -inf, or False when boolean."""
    mask, key, past = node.inputs[_MASK], node.inputs[1], _input(node, _PAST_KEY)

    def add(op: str, *inputs: Value, **attrs: object) -> Value:
        return graph.add_node(op, list(inputs), attrs or None, before=node).output

    def const(values: object, dtype: object) -> Value:
        return graph.add_constant(graph.unique_name(f"{node.name}_mask_pad"), np.array(values, dtype=dtype))

    axis = 2 if key.type.rank == 4 else 1  # type: ignore[union-attr]
    keys = add("Shape", key, start=axis, end=axis + 1)  # type: ignore[arg-type]
    if past is not None:
        keys = add("Add", keys, add("Shape", past, start=2, end=3))
    missing = add("Sub", keys, add("Shape", mask, start=-1))  # type: ignore[arg-type]
    pads = add("Concat", const([0], np.int64), missing, axis=0)
    dtype = mask.dtype.to_numpy()  # type: ignore[union-attr]
    if dtype != np.bool_ and dtype.kind != "f":
        raise UnsupportedOpError(f"node {node.label}: Attention with an {dtype.name} attn_mask shorter than the keys (ONNX pads it with -inf)")
    fill = const(False if dtype == np.bool_ else -np.inf, dtype)
    return add("Pad", mask, pads, fill, const([-1], np.int64))  # type: ignore[arg-type]
