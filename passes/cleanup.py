"""`cleanup`: the standard simplifications, repeated until the graph stops changing."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from graphopt.ir.graph import Graph
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.pass_manager import run_to_fixed_point
from graphopt.registry import get_pass, register_pass


@register_pass
@dataclasses.dataclass
class Cleanup(Pass):
    """Fold constants, simplify shapes, drop no-ops, merge duplicates and remove dead code.

    Runs, in this order and then again until none of them changes the graph (at most
    `max_iterations` rounds): fold-constants, simplify-shapes, eliminate-noops,
    eliminate-common-subexpressions, eliminate-dead-code and cleanup-subgraphs (the same
    inside every If/Loop/Scan body), each with its default options.
    The passes are looked up by name in the pass registry.

    Needs what its passes need (ONNX Runtime for constant folding). Changes what they
    change; stats are theirs summed over rounds, as "<pass>.<stat>", plus "iterations".
    """

    name = "cleanup"
    max_iterations: int = 8

    PASSES: ClassVar[tuple[str, ...]] = (
        "fold-constants",
        "simplify-shapes",
        "eliminate-noops",
        "eliminate-common-subexpressions",
        "eliminate-dead-code",
        "cleanup-subgraphs",
    )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        passes = [get_pass(name)() for name in self.PASSES]
        changed, stats = run_to_fixed_point(graph, passes, ctx, self.max_iterations)
        return PassResult(changed, stats)
