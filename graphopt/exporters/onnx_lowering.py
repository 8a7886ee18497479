"""Lower graphopt's own ops to standard ONNX so any ONNX runtime can run the model.

`lower_graphopt_ops(model)` converts a ModelProto that holds graphopt-domain nodes to
default-domain opset 23 (with onnx's version converter, which leaves the other domains
alone) and replaces each graphopt node by its standard counterpart:

| graphopt op | ONNX op (opset) | attributes |
| --- | --- | --- |
| Attention(q, k, v[, bias]) | Attention (23) | num_heads -> q_num_heads, num_kv_heads -> kv_num_heads, scale, causal -> is_causal; bias -> attn_mask (bool: True attends; float: added) |
| RMSNorm(x, scale) | RMSNormalization (23) | axis, epsilon, stash_type |
| Gelu(x) | Gelu (20) | approximate |

ONNX's `is_causal` aligns the mask to the first key; graphopt's `causal` aligns it to the
last key; they agree when query and key lengths are equal, which is what fusion produces.
Models without graphopt nodes are returned unchanged.
"""

from __future__ import annotations

from typing import Any

from graphopt.errors import ExportError
from graphopt.ir.schema import GRAPHOPT_DOMAIN

STANDARD_OPSET = 23

_RENAMES: dict[str, tuple[str, dict[str, str]]] = {
    "Attention": ("Attention", {"num_heads": "q_num_heads", "num_kv_heads": "kv_num_heads", "scale": "scale", "causal": "is_causal"}),
    "RMSNorm": ("RMSNormalization", {"axis": "axis", "epsilon": "epsilon", "stash_type": "stash_type"}),
    "Gelu": ("Gelu", {"approximate": "approximate"}),
}


def has_graphopt_ops(model: Any) -> bool:
    return any(node.domain == GRAPHOPT_DOMAIN for node in model.graph.node)


def lower_graphopt_ops(model: Any) -> Any:
    """A copy of `model` with graphopt-domain nodes replaced by standard ONNX ops (opset 23)."""
    if not has_graphopt_ops(model):
        return model
    from onnx import helper, version_converter

    current = {o.domain: o.version for o in model.opset_import}.get("", 0)
    if current < STANDARD_OPSET:
        try:
            model = version_converter.convert_version(model, STANDARD_OPSET)
        except Exception as exc:
            raise ExportError(f"could not convert the model to opset {STANDARD_OPSET} to lower graphopt ops: {exc}") from None
    nodes = []
    for node in model.graph.node:
        if node.domain != GRAPHOPT_DOMAIN:
            nodes.append(node)
            continue
        if node.op_type not in _RENAMES:
            raise ExportError(f"node '{node.name}': graphopt::{node.op_type} has no standard ONNX lowering")
        op_type, attributes = _RENAMES[node.op_type]
        attrs = {attributes[a.name]: helper.get_attribute_value(a) for a in node.attribute if a.name in attributes}
        nodes.append(helper.make_node(op_type, list(node.input), list(node.output), name=node.name, **attrs))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != GRAPHOPT_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    model.ir_version = max(model.ir_version, 10)
    return model
