"""fuse-bias-gelu: fold a constant bias Add into the graphopt::Gelu that reads it.

Rule: graphopt::Gelu(x + b) -> graphopt::Gelu(x, b) with the same `approximate`, where b
is a constant that broadcasts over x's last axis only (shape [N], [1, N], ...; it becomes a
vector of N) and x is not a constant. The Add is usually the bias of the linear layer
before the activation; ORT's BiasGelu/FastGelu kernels take it as an input.

Needs: graphopt::Gelu (fuse-gelu first: requires its fact "gelu-fused"). Changes: each matched Add + Gelu becomes one
Gelu node with two inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from graphopt.ir.graph import Graph, constant_data
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.rewrite import Match, RewriteRule, RewriteRuleSet, Var


def _pattern(op, x, b):
    return op.Gelu(op.Add(x, b), _domain="graphopt", approximate=Var("approximate"))


def _replacement(op, x, b, approximate):
    bias = constant_data(b)
    vector = np.broadcast_to(bias.reshape(-1), (x.shape[-1],)).astype(bias.dtype)
    return op.Gelu(x, vector, _domain="graphopt", approximate=approximate or "none")


def _check(graph: Graph, match: Match) -> bool | str:
    x, b = match["x"], match["b"]
    if x.is_constant or (x.producer is not None and x.producer.op_type == "Constant"):
        return "x is a constant"
    bias = constant_data(b)
    if bias is None:
        return "the added value is not a small constant"
    if x.shape is None or not x.shape or not isinstance(x.shape[-1], int):
        return "x has no static last dim"
    width = x.shape[-1]
    if bias.ndim > len(x.shape) or (bias.ndim and (any(d != 1 for d in bias.shape[:-1]) or bias.shape[-1] not in (1, width))):
        return f"the bias of shape {list(bias.shape)} does not broadcast over the last axis only"
    if x.dtype is None or bias.dtype != x.dtype.to_numpy():
        return "the bias and x differ in element type"
    return True


RULES = [RewriteRule("bias-gelu", _pattern, _replacement, check=_check)]


@register_pass
@dataclasses.dataclass
class FuseBiasGelu(Pass):
    """Fold a constant bias Add before graphopt::Gelu into the Gelu's optional bias input.

    The rule is in `graphopt.passes.fuse_bias_gelu`. Needs graphopt::Gelu nodes (requires
    "gelu-fused", which fuse-gelu provides); replaces each matched Add + Gelu by one node.
    """

    name = "fuse-bias-gelu"
    requires = ("gelu-fused",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        fused = sum(RewriteRuleSet(RULES).apply(graph).values())
        return PassResult(fused > 0, {"fused": fused})
