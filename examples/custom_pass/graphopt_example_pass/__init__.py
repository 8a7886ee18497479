"""An example third-party graphopt pass, registered through the `graphopt.passes` entry point.

    pip install ./examples/custom_pass
    graphopt passes                      # lists fold-double-negation
    graphopt optimize in.onnx -o out.onnx -p "fold-double-negation{limit=10}"
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from graphopt import Graph, Node, Pass, PassContext, PassResult, Value

__all__ = ["FoldDoubleNegation"]


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
