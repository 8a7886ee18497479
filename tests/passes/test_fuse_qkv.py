"""fuse-qkv: projections of one input with constant weights -> one MatMul (+ Add) + Split."""

import numpy as np

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import max_abs_error, run_graph


def _graph(depths=(8, 8, 8), biases=(True, False, True)) -> Graph:
    graph = Graph("qkv", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("b", "s", 8)))
    rng = np.random.default_rng(0)
    outputs = []
    for i, (depth, bias) in enumerate(zip(depths, biases)):
        source = x if depth == 8 else graph.add_node("Slice", [x] + [graph.add_constant(f"s{i}{k}", np.array([v], np.int64)) for k, v in enumerate((0, depth, -1))]).output
        weight = graph.add_constant(f"w{i}", rng.standard_normal((depth, 4 + i)).astype(np.float32))
        y = graph.add_node("MatMul", [source, weight]).output
        if bias:
            y = graph.add_node("Add", [y, graph.add_constant(f"b{i}", rng.standard_normal(4 + i).astype(np.float32))]).output
        outputs.append(graph.add_node("Relu", [y], output_names=[f"y{i}"]).output)
    graph.set_outputs(outputs)
    return graph


FEEDS = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}


def test_three_projections_become_one_matmul_and_a_split():
    graph = _graph()
    fused = graphopt.optimize(graph.clone(), "fuse-qkv", verify=True)
    assert fused.report.records[0].stats == {"fused": 1, "projections": 3}
    assert fused.op_counts() == {"Add": 1, "MatMul": 1, "Relu": 3, "Split": 1}
    matmul = next(n for n in fused.nodes if n.op_type == "MatMul")
    assert matmul.inputs[1].shape == (8, 15)
    assert sorted(fused.constants) == ["qkv_bias", "qkv_split", "qkv_weight"]
    assert max_abs_error(run_graph(graph, FEEDS), run_graph(fused, FEEDS)) <= 1e-5


def test_a_projection_of_another_input_is_not_merged():
    fused = graphopt.optimize(_graph(depths=(8, 4, 8), biases=(False, False, False)), "fuse-qkv", verify=True)
    assert fused.op_counts()["MatMul"] == 2  # the two reading x merged; the one reading a slice alone
    assert fused.op_counts()["Split"] == 1
