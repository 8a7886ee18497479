"""`decompose-graphopt-ops`: graphopt's own ops back to standard ONNX (a target lowering step)."""

from __future__ import annotations

import dataclasses

from graphopt.exporters.onnx_lowering import decompose_graphopt_nodes
from graphopt.ir.graph import Graph
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass


@register_pass
@dataclasses.dataclass
class DecomposeGraphoptOps(Pass):
    """Replace graphopt-domain ops by the standard ONNX ops they stand for.

    Each `Attention`, `RMSNorm`, `Gelu` and `SkipLayerNorm` (and each `LayerNormalization`
    in a graph below opset 17) becomes the default-domain ops with the same arithmetic
    (`graphopt.exporters.onnx_lowering`), except the op types listed in `keep` (those a
    target runs natively). Targets whose runtime takes standard ONNX run it in
    their `lowering()`. Needs nothing. Changes: adds the standard ops and their constants,
    removes the replaced nodes; their outputs keep their names (graph outputs included).
    Lossless. Stats: "decomposed", the nodes replaced.
    """

    name = "decompose-graphopt-ops"
    keep: list[str] = dataclasses.field(default_factory=list)
    """graphopt op types to leave as they are (a target that runs them natively)."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decomposed = decompose_graphopt_nodes(graph, keep=self.keep)
        return PassResult(decomposed > 0, {"decomposed": decomposed})
