"""fuse-gelu and fuse-rmsnorm: raise decomposed GELU and RMSNorm into graphopt's own ops.

Rules (patterns are ONNX-level; multiplication and addition match in either input order):

fuse-gelu
1. x * 0.5 * (1 + erf(x / sqrt(2)))  -> graphopt::Gelu(x), in the three groupings
   ((x * 0.5) * (...), (x * (...)) * 0.5, x * (0.5 * (...))), with x / sqrt(2) also
   written x * (1/sqrt(2)).
2. x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  -> graphopt::Gelu(x, approximate="tanh"),
   in the three groupings.
2b. The opset-20 ONNX Gelu op (newer exporters emit it) -> graphopt::Gelu with its
   `approximate`, so later passes and targets see one form.

fuse-rmsnorm
3. w * (x * 1/sqrt(mean(x^2, last axis, keepdims) + eps))  -> graphopt::RMSNorm(x, w, epsilon=eps),
   with 1/sqrt written Div(1, Sqrt) or Reciprocal(Sqrt), and ReduceMean's axes as an
   attribute (opset <= 17) or an input (opset 18). The check requires the mean to be over the
   last axis only, with keepdims, and w a constant broadcasting over that axis only.
4. The same without `w *` (a unit scale, e.g. after eliminate-noops removed a multiply by
   ones) -> graphopt::RMSNorm(x, 1.0, epsilon=eps); tried after rule 3 everywhere.

ONNX's own opset-23 `RMSNormalization` is left as it is (unlike the opset-20 Gelu): ONNX
Runtime runs it natively, and the standard-ONNX decomposition of graphopt::RMSNorm would be
slower there.

Needs: nothing. Changes: each matched subgraph becomes one node; the matched nodes are erased.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from graphopt.ir.graph import Graph, constant_data
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.rewrite import Const, Match, RewriteRule, RewriteRuleSet

SQRT2 = math.sqrt(2.0)
TANH_SCALE = math.sqrt(2.0 / math.pi)


def _erf_argument(op, x, divide: bool):
    return op.Div(x, SQRT2) if divide else op.Mul(x, 1.0 / SQRT2)


GROUPINGS = ("half-first", "half-last", "half-inner")
"""How x * 0.5 * inner is associated: (x*0.5)*inner, (x*inner)*0.5, x*(0.5*inner)."""


def _half_product(op, x, inner, grouping: str):
    if grouping == "half-first":
        return op.Mul(op.Mul(x, 0.5), inner)
    if grouping == "half-last":
        return op.Mul(op.Mul(x, inner), 0.5)
    return op.Mul(x, op.Mul(inner, 0.5))


def _erf_gelu_rule(divide: bool, grouping: str) -> RewriteRule:
    def pattern(op, x):
        return _half_product(op, x, op.Add(op.Erf(_erf_argument(op, x, divide)), 1.0), grouping)

    def replacement(op, x):
        return op.Gelu(x, _domain="graphopt", approximate="none")

    return RewriteRule(f"erf-gelu-{'div' if divide else 'mul'}-{grouping}", pattern, replacement)


def _tanh_gelu_rule(grouping: str) -> RewriteRule:
    def pattern(op, x):
        cubic = op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715))
        inner = op.Add(op.Tanh(op.Mul(cubic, Const(value=TANH_SCALE, rel_tol=1e-5))), 1.0)
        return _half_product(op, x, inner, grouping)

    def replacement(op, x):
        return op.Gelu(x, _domain="graphopt", approximate="tanh")

    return RewriteRule(f"tanh-gelu-{grouping}", pattern, replacement)


def _normalized(op, x, axes, axes_as_input: bool, reciprocal: bool):
    square = op.Pow(x, 2.0)
    mean = op.ReduceMean(square, axes, keepdims=1) if axes_as_input else op.ReduceMean(square, keepdims=1)
    root = op.Sqrt(op.Add(mean, Const("eps")))
    return op.Mul(x, op.Reciprocal(root) if reciprocal else op.Div(1.0, root))


def _rmsnorm_rule(axes_as_input: bool, reciprocal: bool, weighted: bool) -> RewriteRule:
    def pattern(op, x, w, axes):
        normalized = _normalized(op, x, axes, axes_as_input, reciprocal)
        return op.Mul(w, normalized) if weighted else normalized

    def scaled(op, x, w, eps):
        return op.RMSNorm(x, w, _domain="graphopt", axis=-1, epsilon=float(eps))

    def unit(op, x, eps):
        return op.RMSNorm(x, 1.0, _domain="graphopt", axis=-1, epsilon=float(eps))

    replacement = scaled if weighted else unit
    name = f"rmsnorm-{'axes-input' if axes_as_input else 'axes-attr'}-{'reciprocal' if reciprocal else 'div'}"
    return RewriteRule(name + ("" if weighted else "-unit-scale"), pattern, replacement, check=_rmsnorm_check)


def _standard_gelu_rule() -> RewriteRule:
    def pattern(op, x, approximate):
        return op.Gelu(x, approximate=approximate)

    def replacement(op, x, approximate):
        return op.Gelu(x, _domain="graphopt", approximate=approximate or "none")

    return RewriteRule("onnx-gelu", pattern, replacement)


def _rmsnorm_check(graph: Graph, match: Match) -> bool | str:
    x = match["x"]
    mean = next(n for n in match.nodes if n.op_type == "ReduceMean")
    axes = mean.attrs.get("axes")
    if axes is None and len(mean.inputs) > 1 and mean.inputs[1] is not None:
        data = constant_data(mean.inputs[1])
        axes = None if data is None else tuple(int(a) for a in data.reshape(-1))
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

    Rules 1, 2 and 2b of `graphopt.passes.fuse_activations_norms`. Needs nothing; replaces each
    matched subgraph by one node.
    """

    name = "fuse-gelu"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        rules = [_erf_gelu_rule(d, g) for d in (True, False) for g in GROUPINGS]
        rules += [_tanh_gelu_rule(g) for g in GROUPINGS] + [_standard_gelu_rule()]
        return _apply(graph, rules)


@register_pass
@dataclasses.dataclass
class FuseRMSNorm(Pass):
    """Raise decomposed RMS normalization (LLaMA, Mistral, Qwen2, T5) into graphopt::RMSNorm.

    Rule 3 of `graphopt.passes.fuse_activations_norms`. Needs nothing; replaces each
    matched subgraph by one node.
    """

    name = "fuse-rmsnorm"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        variants = [(a, r) for a in (False, True) for r in (False, True)]
        weighted = _apply(graph, [_rmsnorm_rule(a, r, weighted=True) for a, r in variants])
        unit = _apply(graph, [_rmsnorm_rule(a, r, weighted=False) for a, r in variants])
        fused = weighted.stats["fused"] + unit.stats["fused"]
        return PassResult(fused > 0, {"fused": fused})
