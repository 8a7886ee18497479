"""`cleanup`: the standard simplifications, repeated until the graph stops changing."""

from __future__ import annotations

import dataclasses

from graphopt.pass_manager import Pipeline
from graphopt.registry import register_pass


@register_pass
@dataclasses.dataclass
class Cleanup(Pipeline):
    """Fold constants, simplify shapes, drop no-ops, merge duplicates and remove dead code.

    A pipeline of fold-constants, simplify-shapes, eliminate-noops,
    eliminate-common-subexpressions, eliminate-dead-code and cleanup-subgraphs (the same
    inside every If/Loop/Scan body), each with its default options, run in this order and
    then again until none of them changes the graph (at most `max_iterations` rounds).

    Needs what its passes need (ONNX Runtime for constant folding). Changes what they
    change; stats are theirs summed over rounds, as "<pass>.<stat>", plus "iterations".
    """

    name = "cleanup"
    fixed_point = True
    steps = (
        "fold-constants",
        "simplify-shapes",
        "eliminate-noops",
        "eliminate-common-subexpressions",
        "eliminate-dead-code",
        "cleanup-subgraphs",
    )
    max_iterations: int = 8
