"""`eliminate-dead-code`: remove nodes and constants that no graph output depends on."""

from __future__ import annotations

import dataclasses

from graphopt.ir.graph import Graph, Node
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass


@register_pass
@dataclasses.dataclass
class EliminateDeadCode(Pass):
    """Remove nodes whose outputs reach no graph output, and constants nothing reads.

    Rules:
    1. A node is live when one of its outputs is a graph output or is read by a live node
       (as an input, or from inside the node's If/Loop/Scan bodies), or when it may have side effects: an op whose schema is impure (random ops) or an
       opaque op (no schema), unless `remove_opaque` is set.
    2. Every other node is removed, readers before producers.
    3. A constant that no node reads and that is not a graph output is removed, unless it
       is also a graph input (an initializer a caller may override).

    Needs nothing. Changes: removes nodes and constants; graph inputs and outputs stay.
    """

    name = "eliminate-dead-code"
    remove_opaque: bool = False
    """Also remove unused nodes of ops without a schema (they may have side effects graphopt cannot see)."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        live = self._live_nodes(graph)
        dead = [node for node in reversed(graph.nodes) if id(node) not in live]
        for node in dead:
            graph.erase(node)
        unused = [
            value for value in graph.constants.values()
            if not value.uses() and not value.is_graph_output and not graph.is_overridable(value)
        ]
        for value in unused:
            graph.remove_constant(value)
        stats = {"removed_nodes": len(dead), "removed_constants": len(unused)}
        return PassResult(bool(dead or unused), stats)

    def _live_nodes(self, graph: Graph) -> set[int]:
        """Ids of the live nodes, found walking the graph from its outputs backwards."""
        needed = {id(value) for value in graph.outputs}
        live: set[int] = set()
        for node in reversed(graph.nodes):
            if self._has_effects(node) or any(id(out) in needed for out in node.outputs):
                live.add(id(node))
                needed.update(id(value) for value in node.reads)
        return live

    def _has_effects(self, node: Node) -> bool:
        schema = node.schema
        if schema is None:
            return not self.remove_opaque
        return not schema.pure
