"""fuse-gelu and fuse-rmsnorm: raise decomposed GELU and RMSNorm into graphopt's own ops.

The patterns are written for the canonical form `canonicalize` produces (constants second,
constant factors outermost, divisions by constants as products, `x * 1/y` as `x / y`,
squares as `x * x`), so one rule covers every way an exporter groups the same arithmetic.
Multiplication and addition still match in either input order.

fuse-gelu
1. erf-gelu: (x * (erf(x * 1/sqrt(2)) + 1)) * 0.5  -> graphopt::Gelu(x). Covers
   0.5 * x * (1 + erf(x / sqrt(2))) in every grouping, with / sqrt(2) or * 1/sqrt(2).
   Any constant scalar k may stand for the 0.5 (canonicalize folds a constant factor that
   follows the GELU into it): the result is then graphopt::Gelu(x) * 2k.
2. tanh-gelu: (x * (tanh((x + x^3 * 0.044715) * sqrt(2/pi)) + 1)) * 0.5
   -> graphopt::Gelu(x, approximate="tanh"), in every grouping and with any k likewise.
3. onnx-gelu: the opset-20 ONNX Gelu op (newer exporters emit it) -> graphopt::Gelu with its
   `approximate`, so later passes and targets see one form.

fuse-rmsnorm
4. rmsnorm: (x / sqrt(mean(x * x, last axis, keepdims) + eps)) [* w]
   -> graphopt::RMSNorm(x, w or 1.0, epsilon=eps). Covers x * 1/sqrt(..) written
   Div(1, Sqrt) or Reciprocal(Sqrt), x^2 written Pow(x, 2), and the weight on either side;
   ReduceMean's axes take the form of the graph's opset (an input from 18, an attribute
   before). The check requires the mean to be over the last axis only and w a constant
   broadcasting over that axis only. With a weight the whole product is taken; without
   (a unit scale, e.g. after eliminate-noops removed a multiply by ones) the weight is 1.0.

ONNX's own opset-23 `RMSNormalization` is left as it is (unlike the opset-20 Gelu): ONNX
Runtime runs it natively, and the standard-ONNX decomposition of graphopt::RMSNorm would be
slower there.

Needs: the canonical form (run canonicalize first). Changes: each matched subgraph becomes
one node; the matched nodes are erased.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from graphopt.ir.graph import Graph, constant_data
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.passes.canonicalize import reduce_axes, reduce_mean_pattern
from graphopt.registry import register_pass
from graphopt.rewrite import Const, Match, RewriteRule, RewriteRuleSet

SQRT2 = math.sqrt(2.0)
TANH_SCALE = math.sqrt(2.0 / math.pi)


def _gelu(op, x, approximate: str, half: float):
    """graphopt::Gelu(x), times 2 * `half` when the product's constant factor is not 0.5."""
    gelu = op.Gelu(x, _domain="graphopt", approximate=approximate)
    return gelu if math.isclose(half, 0.5, rel_tol=1e-6) else op.Mul(gelu, 2.0 * half)


def _erf_gelu_rule() -> RewriteRule:
    def pattern(op, x):
        return op.Mul(op.Mul(x, op.Add(op.Erf(op.Mul(x, 1.0 / SQRT2)), 1.0)), Const("half"))

    def replacement(op, x, half):
        return _gelu(op, x, "none", half)

    return RewriteRule("erf-gelu", pattern, replacement)


def _tanh_gelu_rule() -> RewriteRule:
    def pattern(op, x):
        cubic = op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715))
        inner = op.Add(op.Tanh(op.Mul(cubic, Const(value=TANH_SCALE, rel_tol=1e-5))), 1.0)
        return op.Mul(op.Mul(x, inner), Const("half"))

    def replacement(op, x, half):
        return _gelu(op, x, "tanh", half)

    return RewriteRule("tanh-gelu", pattern, replacement)


def _keeps_dims(value: object) -> bool:
    return value in (None, 1)  # keepdims defaults to 1


def _rmsnorm_rule(graph: Graph, weighted: bool) -> RewriteRule:
    """The RMSNorm rule for `graph`'s opset; `weighted` takes the product with the weight."""

    def pattern(op, x, w, axes):
        mean = reduce_mean_pattern(op, graph, op.Mul(x, x), axes, keepdims=_keeps_dims)
        normalized = op.Div(x, op.Sqrt(op.Add(mean, Const("eps"))))
        return op.Mul(normalized, w) if weighted else normalized

    def replacement(op, **bindings):
        weight = bindings.get("w")
        return op.RMSNorm(bindings["x"], 1.0 if weight is None else weight, _domain="graphopt", axis=-1, epsilon=float(bindings["eps"]))

    return RewriteRule("rmsnorm" if weighted else "rmsnorm-unit-scale", pattern, replacement, check=_rmsnorm_check)


def _standard_gelu_rule() -> RewriteRule:
    def pattern(op, x, approximate):
        return op.Gelu(x, approximate=approximate)

    def replacement(op, x, approximate):
        return op.Gelu(x, _domain="graphopt", approximate=approximate or "none")

    return RewriteRule("onnx-gelu", pattern, replacement)


def _rmsnorm_check(graph: Graph, match: Match) -> bool | str:
    x = match["x"]
    axes = reduce_axes(next(n for n in match.nodes if n.op_type == "ReduceMean"))
    rank = x.type.rank
    if rank is None or axes is None or tuple(a % rank for a in axes) != (rank - 1,):
        return "the mean is not over the last axis only"
    weight = constant_data(match["w"]) if "w" in match.bindings else np.ones(1)
    if weight is None or weight.ndim > 1:
        return "the scale is not a constant vector"
    if x.dtype is None or not x.dtype.is_float:
        return "x is not floating point"
    return True


def _apply(graph: Graph, rules: list[RewriteRule]) -> PassResult:
    counts = RewriteRuleSet(rules).apply(graph)
    fused = sum(counts.values())
    return PassResult(fused > 0, {"fused": fused})


@register_pass
@dataclasses.dataclass
class FuseGelu(Pass):
    """Raise erf- and tanh-form GELU subgraphs (and ONNX Gelu nodes) into graphopt::Gelu.

    Rules 1-3 of `graphopt.passes.fuse_activations_norms`. Needs the canonical form
    (canonicalize); replaces each matched subgraph by one node; provides "gelu-fused".
    """

    name = "fuse-gelu"
    requires = ("canonical-form",)
    provides = ("gelu-fused",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return _apply(graph, [_erf_gelu_rule(), _tanh_gelu_rule(), _standard_gelu_rule()])


@register_pass
@dataclasses.dataclass
class FuseRMSNorm(Pass):
    """Raise decomposed RMS normalization (LLaMA, Mistral, Qwen2, T5) into graphopt::RMSNorm.

    Rule 4 of `graphopt.passes.fuse_activations_norms`: first every norm with its weight,
    then the remaining ones with a unit scale (the bare norm is part of the weighted one, so
    it must not be taken first). Needs the canonical form (canonicalize); replaces each
    matched subgraph by one node; provides "rmsnorm-fused".
    """

    name = "fuse-rmsnorm"
    requires = ("canonical-form",)
    provides = ("rmsnorm-fused",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        fused = sum(_apply(graph, [_rmsnorm_rule(graph, weighted)]).stats["fused"] for weighted in (True, False))
        return PassResult(fused > 0, {"fused": fused})
