"""Lower graphopt's own ops to standard ONNX so any ONNX runtime can run the model.

`lower_graphopt_ops(model)` converts a ModelProto that holds graphopt-domain nodes to
default-domain opset 23 (with onnx's version converter, which leaves the other domains
alone) and replaces each graphopt node by its standard counterpart:

| graphopt op | ONNX op (opset) | attributes |
| --- | --- | --- |
| Attention(q, k, v[, bias]) | Attention (23) | num_heads -> q_num_heads, num_kv_heads -> kv_num_heads, scale, causal -> is_causal; bias -> attn_mask (bool: True attends; float: added) |
| RMSNorm(x, scale) | RMSNormalization (23) | axis, epsilon, stash_type |
| Gelu(x) | Gelu (20) | approximate |

ONNX Runtime wants the mask's query axis (-2) to be the query length, not 1 to broadcast:
a mask whose query axis is not known to match is expanded to it first.
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
    shapes = _known_shapes(model)
    nodes: list[Any] = []
    for node in model.graph.node:
        if node.domain != GRAPHOPT_DOMAIN:
            nodes.append(node)
            continue
        if node.op_type not in _RENAMES:
            raise ExportError(f"node '{node.name}': graphopt::{node.op_type} has no standard ONNX lowering")
        op_type, attributes = _RENAMES[node.op_type]
        attrs = {attributes[a.name]: helper.get_attribute_value(a) for a in node.attribute if a.name in attributes}
        inputs = list(node.input)
        if node.op_type == "Attention" and len(inputs) > 3 and inputs[3]:
            inputs[3] = _mask_with_query_axis(inputs[3], inputs[0], shapes, nodes, node.name)
        nodes.append(helper.make_node(op_type, inputs, list(node.output), name=node.name, **attrs))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != GRAPHOPT_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    model.ir_version = max(model.ir_version, 10)
    return model


def _known_shapes(model: Any) -> dict[str, list[Any]]:
    shapes = {}
    for info in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _mask_with_query_axis(mask: str, query: str, shapes: dict[str, list[Any]], nodes: list[Any], name: str) -> str:
    """`mask`, expanded so that its axis -2 is the query length when that is not known."""
    from onnx import TensorProto, helper

    mask_shape, query_shape = shapes.get(mask), shapes.get(query)
    if mask_shape and query_shape and len(mask_shape) >= 2 and mask_shape[-2] == query_shape[2] and mask_shape[-2] is not None:
        return mask
    prefix = f"{name}/mask_query_axis"

    def constant(suffix: str, values: list[int]) -> Any:
        tensor = helper.make_tensor(f"{prefix}/{suffix}", TensorProto.INT64, [len(values)], values)
        return helper.make_node("Constant", [], [f"{prefix}/{suffix}"], value=tensor)

    nodes += [
        constant("lead", [1, 1]),
        constant("tail", [1]),
        constant("start", [2]),
        constant("end", [3]),
        helper.make_node("Shape", [query], [f"{prefix}/query_shape"]),
        helper.make_node("Slice", [f"{prefix}/query_shape", f"{prefix}/start", f"{prefix}/end"], [f"{prefix}/query_length"]),
        helper.make_node("Concat", [f"{prefix}/lead", f"{prefix}/query_length", f"{prefix}/tail"], [f"{prefix}/target"], axis=0),
        helper.make_node("Expand", [mask, f"{prefix}/target"], [f"{prefix}/mask"]),
    ]
    return f"{prefix}/mask"
