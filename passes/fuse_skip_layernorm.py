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
readers read it; a norm scale or beta computed after the Add is then left alone (the
fused node takes the Add's place). Commits through `graphopt.rewrite` (one legality check).

Needs: LayerNormalization / graphopt::RMSNorm nodes (fuse-layernorm, fuse-rmsnorm: facts
"layernorm-fused", "rmsnorm-fused"). Changes: each matched Add (+ bias Add) + norm becomes
one node; value names are kept.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.ir.types import same_shape
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.rewrite import RewritePattern, Rewriter, RewriteRuleSet


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


class SkipLayerNormPattern(RewritePattern):
    """The rule of this module, anchored on each norm; commits through `graphopt.rewrite`."""

    name = "skip-layernorm"
    root_ops = (("", "LayerNormalization"), (GRAPHOPT_DOMAIN, "RMSNorm"))
    depth = 3

    def match_and_rewrite(self, graph: Graph, node: Node, rewriter: Rewriter) -> Union[bool, str]:
        simplified = _norm_kind(node)
        residual = None if simplified is None else node.inputs[0].producer  # type: ignore[union-attr]
        if residual is None or residual.op_type != "Add" or residual.domain or len(residual.inputs) != 2:
            return False
        a, b = residual.inputs
        total = residual.output
        if not (_is_computed(a) and _is_computed(b)) or not same_shape(a.shape, b.shape):  # type: ignore[union-attr]
            return False
        if not isinstance(a.shape[-1], int) or a.dtype is None or not a.dtype.is_float:  # type: ignore[union-attr,index]
            return False
        matched = [residual, node]
        for x, skip in ((a, b), (b, a)):
            split = _bias_split(x, residual)  # type: ignore[arg-type]
            if split is not None:
                matched.append(x.producer)  # type: ignore[union-attr]
                x, bias = split
                break
        else:
            x, skip, bias = a, b, None
        sum_read = any(use.node is not node for use in total.uses()) or total.is_graph_output
        outputs = [node.output, total] if sum_read else [node.output]
        edit = rewriter.edit(matched, outputs)
        scale, beta = node.inputs[1], (node.inputs[2] if len(node.inputs) > 2 else None)
        fused = edit.op.SkipLayerNorm(
            x, skip, scale, beta, bias, _domain=GRAPHOPT_DOMAIN, _outputs=len(outputs),
            epsilon=float(node.attrs.get("epsilon", 1e-5)), simplified=simplified,
        )
        problem = edit.commit(fused if sum_read else [fused])
        return True if problem is None else problem


RULES = [SkipLayerNormPattern()]


@register_pass
@dataclasses.dataclass
class FuseSkipLayerNorm(Pass):
    """Fold residual Adds (and a constant bias Add) into the LayerNorm/RMSNorm that reads them: graphopt::SkipLayerNorm.

    Rules in `graphopt.passes.fuse_skip_layernorm`. Needs LayerNormalization or
    graphopt::RMSNorm nodes raised (facts "layernorm-fused" and "rmsnorm-fused"); replaces
    each matched Add + norm by one node whose second output is the residual sum when other
    nodes read it.
    """

    name = "fuse-skip-layernorm"
    requires = ("layernorm-fused", "rmsnorm-fused")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        fused = RewriteRuleSet(RULES).apply(graph)[SkipLayerNormPattern.name]
        return PassResult(fused > 0, {"fused": fused})
