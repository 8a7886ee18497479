"""decompose-graphopt-ops: graphopt's ops become standard ONNX, in place, names and results kept."""

from __future__ import annotations

import numpy as np
from pass_testing import run_checked

from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.ir.types import TensorType
from graphopt.passes.decompose_graphopt_ops import DecomposeGraphoptOps


def _gelu_rmsnorm_graph() -> Graph:
    """y = Gelu(RMSNorm(x, scale)), z = RMSNorm(x, scale), both graph outputs."""
    graph = Graph("g", opset_imports={"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4)))
    scale = graph.add_constant("scale", np.linspace(0.5, 2.0, 4, dtype=np.float32))
    norm = graph.add_node("RMSNorm", [x, scale], {"epsilon": 1e-5}, domain=GRAPHOPT_DOMAIN, output_names=["z"]).output
    gelu = graph.add_node("Gelu", [norm], domain=GRAPHOPT_DOMAIN, output_names=["y"]).output
    graph.set_outputs([gelu, norm])
    return graph


def test_graphopt_ops_become_standard_ops_with_the_same_results_and_output_names():
    graph = _gelu_rmsnorm_graph()
    result = run_checked(DecomposeGraphoptOps(), graph)
    assert result.changed and result.stats == {"decomposed": 2}
    assert {n.domain for n in graph.nodes} == {""}
    assert {"Erf", "Sqrt", "ReduceMean"} <= set(graph.op_counts())
    assert [v.name for v in graph.outputs] == ["y", "z"]


def test_kept_op_types_stay():
    graph = _gelu_rmsnorm_graph()
    result = run_checked(DecomposeGraphoptOps(keep=["RMSNorm"]), graph)
    assert result.stats == {"decomposed": 1}
    assert [n.qualified_op for n in graph.nodes if n.domain == GRAPHOPT_DOMAIN] == ["graphopt::RMSNorm"]
    assert [v.name for v in graph.outputs] == ["y", "z"]


def test_a_graph_without_graphopt_ops_is_unchanged():
    graph = Graph("plain", opset_imports={"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, (2,)))
    graph.set_outputs([graph.add_node("Relu", [x]).output])
    before = str(graph)
    assert not DecomposeGraphoptOps().run(graph, None).changed
    assert str(graph) == before
