"""fuse-layernorm: raise decomposed layer normalization into ONNX LayerNormalization.

The patterns are written for the canonical form `canonicalize` produces (constants second,
`d * Reciprocal(s)` as `d / s`, squares as `d * d`); Add and Mul match in either input order.

1. layernorm:
       mean = ReduceMean(x, last axis, keepdims)        d = x - mean
       n    = d / Sqrt(ReduceMean(d * d, last axis, keepdims) + eps)
    -> LayerNormalization(x, ones, axis=-1, epsilon=eps)
   ReduceMean's axes take the form of the graph's opset (an input from 18, an attribute
   before). Covers d^2 written Pow(d, 2) and the division written d * Reciprocal(Sqrt(..)).
2. layernorm-scale: LayerNormalization(x, s) * gamma -> LayerNormalization(x, s * gamma)
3. layernorm-shift: LayerNormalization(x, s) + beta  -> LayerNormalization(x, s, beta)

Rules 2 and 3 take the affine part `n * gamma + beta` (or `n * gamma`) into the norm rule 1
raised, and the same for any last-axis LayerNormalization. The checks require both means
over the last axis only, a floating-point x whose last dim is static, and gamma / beta
constants that broadcast over the last axis only (they are stored as vectors of that
size). LayerNormalization exists from opset 17; in a graph with an older opset the ONNX
exporter decomposes it back into the same arithmetic (`graphopt.exporters.onnx_lowering`),
so the written model stays valid.

Needs: the canonical form (run canonicalize first). Changes: each matched subgraph becomes
one LayerNormalization node.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.passes.canonicalize import reduce_axes, reduce_mean_pattern
from graphopt.registry import register_pass
from graphopt.rewrite import Const, Match, RewriteRule, RewriteRuleSet


def _keeps_dims(value: object) -> bool:
    return value in (None, 1)  # keepdims defaults to 1


def _layernorm_rule(graph: Graph) -> RewriteRule:
    """The bare-normalization rule for `graph`'s opset."""

    def pattern(op, x, axes, axes2):
        centered = op.Sub(x, reduce_mean_pattern(op, graph, x, axes, keepdims=_keeps_dims))
        variance = reduce_mean_pattern(op, graph, op.Mul(centered, centered), axes2, keepdims=_keeps_dims)
        return op.Div(centered, op.Sqrt(op.Add(variance, Const("eps"))))

    def replacement(op, x, eps):
        return op.LayerNormalization(x, np.ones(x.shape[-1]), axis=-1, epsilon=float(eps))

    return RewriteRule("layernorm", pattern, replacement, check=_normalization_check)


def _scale_rule() -> RewriteRule:
    def pattern(op, x, scale, gamma, axis, epsilon):
        return op.Mul(op.LayerNormalization(x, scale, axis=axis, epsilon=epsilon, stash_type=_default_stash), gamma)

    def replacement(op, x, scale, gamma, axis, epsilon):
        return op.LayerNormalization(x, _vector(scale, x) * _vector(gamma, x), **_attrs(axis, epsilon))

    return RewriteRule("layernorm-scale", pattern, replacement, check=_affine_check("gamma"))


def _shift_rule() -> RewriteRule:
    def pattern(op, x, scale, beta, axis, epsilon):
        return op.Add(op.LayerNormalization(x, scale, axis=axis, epsilon=epsilon, stash_type=_default_stash), beta)

    def replacement(op, x, scale, beta, axis, epsilon):
        return op.LayerNormalization(x, scale, _vector(beta, x), **_attrs(axis, epsilon))

    return RewriteRule("layernorm-shift", pattern, replacement, check=_affine_check("beta"))


def _default_stash(value: object) -> bool:
    return value in (None, 1)  # the rewritten norm computes in float32, as stash_type=1 says


def _attrs(axis: Optional[int], epsilon: Optional[float]) -> dict[str, object]:
    """The attributes of a LayerNormalization rebuilt from one whose `axis` / `epsilon` may be unset."""
    return {key: value for key, value in (("axis", axis), ("epsilon", epsilon)) if value is not None}


def _vector(value: Value, x: Value) -> np.ndarray:
    """Constant `value` (checked to broadcast over x's last axis only) as a vector of that size."""
    data = constant_data(value)
    assert data is not None, "checked by the rule"
    return np.broadcast_to(data.reshape(-1), (x.shape[-1],)).astype(data.dtype)


def _broadcast_problem(value: Optional[Value], width: int, name: str) -> Optional[str]:
    if value is None:
        return None
    data = constant_data(value)
    if data is None or (value.graph is not None and value.graph.is_overridable(value)):
        return f"{name} is not a small constant"
    if data.ndim and (any(d != 1 for d in data.shape[:-1]) or data.shape[-1] not in (1, width)):
        return f"{name} of shape {list(data.shape)} does not broadcast over the last axis only"
    return None


def _x_problem(x: Value) -> Optional[str]:
    if x.dtype is None or not x.dtype.is_float:
        return "x is not floating point"
    if x.shape is None or not x.shape or not isinstance(x.shape[-1], int):
        return "x has no static last dim"
    return None


def _last_axis_only(node: Node, rank: int) -> bool:
    axes = reduce_axes(node)
    return axes is not None and tuple(a % rank for a in axes) == (rank - 1,)


def _normalization_check(graph: Graph, match: Match) -> bool | str:
    x = match["x"]
    problem = _x_problem(x)
    if problem:
        return problem
    if not all(_last_axis_only(n, len(x.shape)) for n in match.nodes if n.op_type == "ReduceMean"):
        return "a mean is not over the last axis only"
    return True


def _affine_check(key: str):
    """The check of a rule that takes the constant `key` into a LayerNormalization."""

    def check(graph: Graph, match: Match) -> bool | str:
        x = match["x"]
        problem = _x_problem(x)
        if problem:
            return problem
        if match["axis"] is not None and match["axis"] % len(x.shape) != len(x.shape) - 1:
            return "the norm is not over the last axis"
        for name in ("scale", "bias", key):
            problem = _broadcast_problem(match.bindings.get(name), x.shape[-1], name)
            if problem:
                return problem
        return True

    return check


@register_pass
@dataclasses.dataclass
class FuseLayerNorm(Pass):
    """Raise decomposed layer normalization (mean, centre, variance, sqrt, divide, affine) into LayerNormalization.

    The rules are in `graphopt.passes.fuse_layernorm`. Needs the canonical form
    (canonicalize); replaces each matched subgraph by one node; provides "layernorm-fused".
    Graphs with an opset below 17 get it decomposed back on export.
    """

    name = "fuse-layernorm"
    requires = ("canonical-form",)
    provides = ("layernorm-fused",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        rules = RewriteRuleSet([_layernorm_rule(graph), _scale_rule(), _shift_rule()])
        counts = rules.apply(graph)
        fused = counts["layernorm"]
        return PassResult(sum(counts.values()) > 0, {"fused": fused})
