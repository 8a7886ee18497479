"""fuse-layernorm: raise decomposed layer normalization into ONNX LayerNormalization.

Rule (patterns are ONNX-level; Add and Mul match in either input order):

    mean = ReduceMean(x, last axis, keepdims)        d = x - mean
    var  = ReduceMean(d^2 or d*d, last axis, keepdims)
    n    = d / Sqrt(var + eps)     (or d * Reciprocal(Sqrt(var + eps)))
    y    = n * gamma + beta | n * gamma | n
 -> LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)

The forms are tried widest first (with scale and shift, with scale, bare), each over the
whole graph. ReduceMean's axes may be an attribute (opset <= 17) or an input (opset 18). The check
requires both means over the last axis only, a floating-point x whose last dim is static,
and gamma / beta constants that broadcast over the last axis only (they are rewritten as
vectors of that size; a missing gamma becomes ones). LayerNormalization exists from opset
17; in a graph with an older opset the ONNX exporter decomposes it back into the same
arithmetic (`graphopt.exporters.onnx_lowering`), so the written model stays valid.

Needs: nothing. Changes: each matched subgraph becomes one LayerNormalization node.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import numpy as np
from graphopt.ir.graph import Graph, Value, constant_data
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.rewrite import Const, Match, RewriteRule, RewriteRuleSet

AFFINE_FORMS = ("scale-shift", "scale", "none")


def _keeps_dims(value) -> bool:
    return value in (None, 1)  # keepdims defaults to 1


def _mean(op, x, axes, axes_as_input: bool):
    return op.ReduceMean(x, axes, keepdims=_keeps_dims) if axes_as_input else op.ReduceMean(x, keepdims=_keeps_dims)


def _layernorm_rule(axes_as_input: bool, square_by_pow: bool, reciprocal: bool, affine: str) -> RewriteRule:
    def pattern(op, x, axes, axes2, gamma, beta):
        centered = op.Sub(x, _mean(op, x, axes, axes_as_input))
        square = op.Pow(centered, 2.0) if square_by_pow else op.Mul(centered, centered)
        root = op.Sqrt(op.Add(_mean(op, square, axes2, axes_as_input), Const("eps")))
        normalized = op.Mul(centered, op.Reciprocal(root)) if reciprocal else op.Div(centered, root)
        if affine == "none":
            return normalized
        scaled = op.Mul(normalized, gamma)
        return op.Add(scaled, beta) if affine == "scale-shift" else scaled

    def replacement(op, **bindings):
        x, eps, gamma, beta = bindings["x"], bindings["eps"], bindings.get("gamma"), bindings.get("beta")
        width = x.shape[-1]
        scale = np.ones(width) if gamma is None else _as_vector(gamma, width)
        inputs = [x, scale] if beta is None else [x, scale, _as_vector(beta, width)]
        return op.LayerNormalization(*inputs, axis=-1, epsilon=float(eps))

    name = "-".join((
        "layernorm", "axes-input" if axes_as_input else "axes-attr", "pow" if square_by_pow else "mul",
        "reciprocal" if reciprocal else "div", affine,
    ))
    return RewriteRule(name, pattern, replacement, check=_check)


def _as_vector(value: Value, width: int) -> np.ndarray:
    data = constant_data(value)
    assert data is not None, "checked by _check"
    return np.broadcast_to(data.reshape(-1), (width,)).astype(data.dtype)


def _last_axis_only(node, rank: int) -> bool:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        data = constant_data(node.inputs[1])
        axes = None if data is None else tuple(int(a) for a in data.reshape(-1))
    return axes is not None and tuple(a % rank for a in axes) == (rank - 1,)


def _affine_problem(value: Optional[Value], width: int, name: str) -> Optional[str]:
    if value is None:
        return None
    data = constant_data(value)
    if data is None:
        return f"{name} is not a small constant"
    if data.ndim and (any(d != 1 for d in data.shape[:-1]) or data.shape[-1] not in (1, width)):
        return f"{name} of shape {list(data.shape)} does not broadcast over the last axis only"
    return None


def _check(graph: Graph, match: Match) -> bool | str:
    x = match["x"]
    if x.dtype is None or not x.dtype.is_float:
        return "x is not floating point"
    if x.shape is None or not x.shape or not isinstance(x.shape[-1], int):
        return "x has no static last dim"
    rank = len(x.shape)
    if not all(_last_axis_only(n, rank) for n in match.nodes if n.op_type == "ReduceMean"):
        return "a mean is not over the last axis only"
    for key in ("gamma", "beta"):
        problem = _affine_problem(match.bindings.get(key), x.shape[-1], key)
        if problem:
            return problem
    return True


RULE_SETS = [[_layernorm_rule(*flags, affine) for flags in itertools.product((False, True), repeat=3)] for affine in AFFINE_FORMS]
"""One set per affine form, applied in this order, so a norm is taken with its scale and shift
before the bare normalization inside it could match on its own."""


@register_pass
@dataclasses.dataclass
class FuseLayerNorm(Pass):
    """Raise decomposed layer normalization (mean, centre, variance, sqrt, divide, affine) into LayerNormalization.

    The rule is in `graphopt.passes.fuse_layernorm`. Needs nothing; replaces each matched
    subgraph by one node. Graphs with an opset below 17 get it decomposed back on export.
    """

    name = "fuse-layernorm"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        fused = sum(sum(RewriteRuleSet(rules).apply(graph).values()) for rules in RULE_SETS)
        return PassResult(fused > 0, {"fused": fused})
