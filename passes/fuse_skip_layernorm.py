"""fuse-skip-layernorm: fold the residual Add before a norm into graphopt::SkipLayerNorm.

Rules (Add matches in either input order):
1. LayerNormalization(a + b, scale[, beta]) over the last axis, with only its first output
   read -> SkipLayerNorm(x, skip, scale[, beta][, bias], epsilon, simplified=0);
2. graphopt::RMSNorm(a + b, scale) over the last axis -> the same with simplified=1.
a and b must be computed tensors (not constants) of one shape (dim by dim equal where both
are known; an unknown dim, such as a batch the exporter lost, agrees with any) with a static
last dim. When a (or b) is itself `p + c` with c a constant vector over the last axis and
that Add read only here, it is folded too: x = p, bias = c (the sum is (p + c) + skip,
as before). When other nodes also read the residual sum a + b (pre-norm blocks feed it
to the next residual Add), the fused node gets the sum as its second output and those
readers read it. A norm scale or beta computed after the Add is left alone.

Needs: LayerNormalization / graphopt::RMSNorm nodes (fuse-layernorm, fuse-rmsnorm).
Changes: each matched Add (+ bias Add) + norm becomes one node; value names are kept.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.ir.types import merge_types
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass


def _is_computed(value: Optional[Value]) -> bool:
    if value is None or value.is_constant:
        return False
    return value.producer is None or value.producer.op_type != "Constant"


def _norm_kind(node: Node) -> Optional[int]:
    """`simplified` for a norm this pass can fold into: 0 LayerNormalization, 1 RMSNorm."""
    is_layer_norm = node.domain == "" and node.op_type == "LayerNormalization"
    if not (is_layer_norm or (node.domain == GRAPHOPT_DOMAIN and node.op_type == "RMSNorm")):
        return None
    x = node.inputs[0]
    rank = None if x is None else x.type.rank
    if not rank or int(node.attrs.get("axis", -1)) % rank != rank - 1:
        return None
    if is_layer_norm:
        extra_outputs = any(out.uses() or out.is_graph_output for out in node.outputs[1:])
        return None if extra_outputs or int(node.attrs.get("stash_type", 1)) != 1 else 0
    return 1 if int(node.attrs.get("stash_type", 1)) == 1 else None


def same_shape(a: Optional[tuple], b: Optional[tuple]) -> bool:
    """True when two known shapes of one rank agree dim by dim, an unknown dim agreeing with any."""
    if a is None or b is None or len(a) != len(b) or not a:
        return False
    return all(x is None or y is None or x == y for x, y in zip(a, b))


def _bias_split(value: Value, residual: Node) -> Optional[tuple[Value, Value]]:
    """(p, c) when `value` = p + c, c a constant vector over the last axis, read only by `residual`."""
    add = value.producer
    if add is None or add.op_type != "Add" or add.domain or len(add.inputs) != 2 or value.is_graph_output:
        return None
    if [use.node for use in value.uses()] != [residual]:
        return None
    for p, c in (add.inputs, add.inputs[::-1]):
        data = None if c is None else constant_data(c)
        if data is None or not _is_computed(p) or not same_shape(p.shape, value.shape) or data.dtype != p.dtype.to_numpy():  # type: ignore[union-attr]
            continue
        if data.ndim == 1 and data.shape[0] == value.shape[-1]:  # type: ignore[index]
            return p, c  # type: ignore[return-value]
    return None


def _defined_before(value: Optional[Value], anchor: Node, positions: dict[int, int]) -> bool:
    producer = None if value is None else value.producer
    return producer is None or positions[id(producer)] < positions[id(anchor)]


def _fuse_one(graph: Graph, norm: Node, simplified: int, positions: dict[int, int]) -> bool:
    residual = norm.inputs[0].producer  # type: ignore[union-attr]
    if residual is None or residual.op_type != "Add" or residual.domain or len(residual.inputs) != 2:
        return False
    a, b = residual.inputs
    total = residual.output
    if not (_is_computed(a) and _is_computed(b)) or not same_shape(a.shape, b.shape):  # type: ignore[union-attr]
        return False
    if not isinstance(a.shape[-1], int) or a.dtype is None or not a.dtype.is_float:  # type: ignore[union-attr,index]
        return False
    scale, beta = norm.inputs[1], (norm.inputs[2] if len(norm.inputs) > 2 else None)
    if not all(_defined_before(v, residual, positions) for v in (scale, beta)):
        return False
    bias_add, bias = None, None
    for x, skip in ((a, b), (b, a)):
        split = _bias_split(x, residual)  # type: ignore[arg-type]
        if split is not None:
            bias_add, (x, bias) = x.producer, split  # type: ignore[union-attr]
            break
    else:
        x, skip = a, b
    attrs = {"epsilon": float(norm.attrs.get("epsilon", 1e-5)), "simplified": simplified}
    sum_read = any(use.node is not norm for use in total.uses()) or total.is_graph_output
    fused = graph.add_node(
        "SkipLayerNorm", [x, skip, scale, beta, bias], attrs, domain=GRAPHOPT_DOMAIN,
        num_outputs=2 if sum_read else 1, before=residual,
    )
    for out, old in zip(fused.outputs, (norm.output, total)):
        out.type = merge_types(out.type, old.type)
    names = [norm.output.name, total.name]
    norm.output.replace_all_uses_with(fused.outputs[0])
    graph.erase(norm)
    if sum_read:
        total.replace_all_uses_with(fused.outputs[1])
    graph.erase(residual)
    if bias_add is not None:
        graph.erase(bias_add)
    for out, name in zip(fused.outputs, names):
        graph.rename_value(out, name)
    return True


@register_pass
@dataclasses.dataclass
class FuseSkipLayerNorm(Pass):
    """Fold residual Adds (and a constant bias Add) into the LayerNorm/RMSNorm that reads them: graphopt::SkipLayerNorm.

    Rules in `graphopt.passes.fuse_skip_layernorm`. Needs LayerNormalization or
    graphopt::RMSNorm nodes (fuse-layernorm, fuse-rmsnorm); replaces each matched Add + norm
    by one node whose second output is the residual sum when other nodes read it.
    """

    name = "fuse-skip-layernorm"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        fused = 0
        for norm in graph:
            simplified = _norm_kind(norm)
            if simplified is None or norm.graph is not graph:
                continue
            positions = {id(n): i for i, n in enumerate(graph.nodes)}
            fused += _fuse_one(graph, norm, simplified, positions)
        return PassResult(fused > 0, {"fused": fused})
