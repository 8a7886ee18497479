"""Lower graphopt's fused ops to the com.microsoft contrib ops ONNX Runtime accelerates.

`lower_to_contrib_ops(graph)` returns a copy in which the fused ops ORT has fast kernels for
are replaced by those kernels; anything left is decomposed into standard ONNX by the
exporter. (Filled in op by op as measurements show a contrib kernel is faster.)
"""

from __future__ import annotations

from graphopt.ir.graph import Graph


def lower_to_contrib_ops(graph: Graph) -> Graph:
    """A copy of `graph` with graphopt ops replaced by faster ORT contrib ops where measured."""
    return graph.clone()
