"""fuse-bias-gelu: the bias Add before graphopt::Gelu becomes the Gelu's second input."""

import numpy as np
import pytest

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import max_abs_error, run_graph


def _graph(bias_shape, approximate="none") -> Graph:
    graph = Graph("bias_gelu", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("n", 8)))
    rng = np.random.default_rng(0)
    weight = graph.add_constant("w", rng.standard_normal((8, 6)).astype(np.float32))
    bias = graph.add_constant("b", rng.standard_normal(bias_shape).astype(np.float32))
    projected = graph.add_node("MatMul", [x, weight]).output
    added = graph.add_node("Add", [bias, projected]).output
    gelu = graph.add_node("Gelu", [added], {"approximate": approximate}, domain="graphopt", output_names=["y"])
    graph.set_outputs([gelu.output])
    return graph


PREFIX = "canonicalize,fuse-gelu,"
"""fuse-bias-gelu requires "gelu-fused": fuse-gelu (which requires canonicalize) runs first
(it finds nothing to raise: the graphs hold graphopt::Gelu already)."""

FEEDS = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias_shape", [(6,), (1, 6)])
def test_bias_is_folded_into_gelu(bias_shape, approximate):
    graph = _graph(bias_shape, approximate)
    fused = graphopt.optimize(graph.clone(), PREFIX + "fuse-bias-gelu,eliminate-dead-code", verify=True)
    assert fused.op_counts() == {"MatMul": 1, "graphopt::Gelu": 1}
    (gelu,) = [n for n in fused.nodes if n.op_type == "Gelu"]
    assert gelu.inputs[1].shape == (6,) and gelu.attrs == {"approximate": approximate}
    expected = run_graph(graph, FEEDS)
    assert max_abs_error(expected, run_graph(fused, FEEDS)) <= 1e-6
    assert max_abs_error(expected, run_graph(fused, FEEDS, engine="torch")) <= 1e-5


def test_a_bias_over_rows_is_not_folded():
    graph = _graph((3, 6))
    fused = graphopt.optimize(graph.clone(), PREFIX + "fuse-bias-gelu", verify=True)
    assert fused.op_counts()["Add"] == 1
    assert len(next(n for n in fused.nodes if n.op_type == "Gelu").inputs) == 1


def test_running_it_without_fuse_gelu_is_refused_before_anything_runs():
    with pytest.raises(graphopt.PipelineError, match="needs 'gelu-fused'"):
        graphopt.optimize(_graph((6,)), "fuse-bias-gelu")
