"""fuse-matmul-add: rank-2 MatMul + constant bias -> Gemm; higher ranks stay as they are."""

import numpy as np

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import max_abs_error, run_graph


def _graph(x_shape, bias_shape=(6,)) -> Graph:
    graph = Graph("linear", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, x_shape))
    rng = np.random.default_rng(0)
    weight = graph.add_constant("w", rng.standard_normal((8, 6)).astype(np.float32))
    bias = graph.add_constant("b", rng.standard_normal(bias_shape).astype(np.float32))
    out = graph.add_node("Add", [bias, graph.add_node("MatMul", [x, weight]).output], output_names=["y"])
    graph.set_outputs([out.output])
    return graph


def test_rank_2_linear_becomes_gemm():
    graph = _graph(("n", 8), bias_shape=(1, 6))
    fused = graphopt.optimize(graph.clone(), "fuse-matmul-add,eliminate-dead-code", verify=True)
    assert fused.op_counts() == {"Gemm": 1}
    assert fused.outputs[0].name == "y" and fused.nodes[0].inputs[2].shape == (6,)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)}
    assert max_abs_error(run_graph(graph, feeds), run_graph(fused, feeds)) <= 1e-5


def test_rank_3_linear_is_left_for_the_runtime():
    fused = graphopt.optimize(_graph(("b", "n", 8)), "fuse-matmul-add", verify=True)
    assert fused.op_counts() == {"Add": 1, "MatMul": 1}
