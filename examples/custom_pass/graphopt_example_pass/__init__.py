"""Example third-party graphopt passes, registered through the `graphopt.passes` entry point.

    pip install ./examples/custom_pass
    graphopt passes                      # lists fold-double-negation and fuse-residual-norm
    graphopt optimize in.onnx -o out.onnx -p "fold-double-negation{limit=10}"

`fold-double-negation` edits the graph by hand; `fuse-residual-norm` is a rewrite rule with
two outputs, applied by `graphopt.rewrite` (which checks and commits every match).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from graphopt import Graph, Node, Pass, PassContext, PassResult, Value
from graphopt.rewrite import Match, RewriteRule, RewriteRuleSet, Var

__all__ = ["FoldDoubleNegation", "FuseResidualNorm"]


@dataclasses.dataclass
class FoldDoubleNegation(Pass):
    """Remove double negations: Neg(Neg(x)) -> x.

    Rule: the readers of an outer Neg whose input is produced by another Neg read x instead,
    and the outer Neg is erased; the inner Neg is erased too once nothing reads it. Where
    the outer Neg's output is a graph output it becomes Identity(x), so the output keeps
    its name. Needs nothing, provides nothing; exact, so check mode expects no change.

    Options:
        limit: fold at most this many pairs (None: all), e.g. to bisect a problem.
        erase_inner: erase an inner Neg left unused (False leaves it to dead-code elimination).
    """

    name = "fold-double-negation"
    limit: Optional[int] = None
    erase_inner: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {self.limit}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded = 0
        for outer in graph:  # a snapshot: inner Negs come first in execution order
            if self.limit is not None and folded >= self.limit:
                break
            inner = _inner_negation(outer)
            if inner is None:
                continue
            _bypass(graph, outer, inner.inputs[0])  # type: ignore[arg-type]
            if self.erase_inner and not inner.output.uses() and not inner.output.is_graph_output:
                graph.erase(inner)
            folded += 1
        return PassResult(changed=folded > 0, stats={"folded": folded})


def _is_neg(node: Optional[Node]) -> bool:
    return node is not None and node.op_type == "Neg" and node.domain == ""


def _inner_negation(node: Node) -> Optional[Node]:
    """The Neg feeding `node` when `node` is a Neg too, else None."""
    if not _is_neg(node) or node.inputs[0] is None:
        return None
    producer = node.inputs[0].producer
    return producer if _is_neg(producer) else None


def _bypass(graph: Graph, outer: Node, source: Value) -> None:
    """Make the readers of `outer` read `source`, then erase `outer`."""
    result = outer.output
    if not result.is_graph_output:
        result.replace_all_uses_with(source)
        graph.erase(outer)
        return
    name = result.name
    identity = graph.add_node("Identity", [source], after=outer)
    result.replace_all_uses_with(identity.output)
    graph.erase(outer)
    graph.rename_value(identity.output, name)


def _residual_norm(op, x, skip, scale, bias):
    """The pattern: two outputs, the norm and the residual sum it reads."""
    total = op.Add(x, skip)
    norm = op.LayerNormalization(
        total, scale, bias, axis=-1, epsilon=Var("epsilon"), stash_type=lambda v: v in (None, 1)
    )
    return norm, total


def _skip_norm(op, x, skip, scale, bias, epsilon):
    """The replacement: one node whose two outputs replace the norm and the sum, in order."""
    eps = 1e-5 if epsilon is None else float(epsilon)
    return op.SkipLayerNorm(x, skip, scale, bias, _domain="graphopt", _outputs=2, epsilon=eps, simplified=0)


def _same_shape_check(graph: Graph, match: Match) -> bool | str:
    x, skip = match["x"], match["skip"]
    if x.shape is None or x.shape != skip.shape:
        return "x and skip differ in shape (a broadcast residual)"
    return True


RESIDUAL_NORM = RewriteRule("residual-norm", _residual_norm, _skip_norm, check=_same_shape_check)


@dataclasses.dataclass
class FuseResidualNorm(Pass):
    """Fold a residual Add whose sum is also read elsewhere into the LayerNorm after it: graphopt::SkipLayerNorm.

    Rule (a multi-output rewrite): LayerNormalization(x + skip, scale, bias) over the last
    axis, with x and skip of one shape, becomes one
    graphopt::SkipLayerNorm whose first output replaces the norm and whose second replaces
    the sum, so the readers of either (the next residual Add of a pre-norm block) read the
    fused node. graphopt.rewrite checks every match: the sum may be read anywhere, other
    matched values only inside the match; names are kept. A teaching copy of one case of
    the built-in fuse-skip-layernorm. Needs LayerNormalization nodes; exact up to rounding.
    """

    name = "fuse-residual-norm"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        fused = RewriteRuleSet([RESIDUAL_NORM]).apply(graph)["residual-norm"]
        return PassResult(changed=fused > 0, stats={"fused": fused})
