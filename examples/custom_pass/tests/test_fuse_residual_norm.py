"""Tests of fuse-residual-norm: a two-output rewrite rule, and that outputs do not change.

Run after installing the package: pip install -e examples/custom_pass && pytest examples/custom_pass/tests
"""

from __future__ import annotations

import numpy as np

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import max_abs_error, run_graph, sample_inputs
from graphopt_example_pass import FuseResidualNorm


def pre_norm_block(skip_shape=(2, 4)) -> Graph:
    """y = LayerNorm(x + skip); out = (x + skip) + Relu(y): the sum is read twice."""
    graph = Graph("pre_norm", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, (2, 4)))
    skip = graph.add_input("skip", TensorType(DType.FLOAT, skip_shape))
    scale = graph.add_constant("scale", np.linspace(0.5, 2.0, 4, dtype=np.float32))
    bias = graph.add_constant("bias", np.linspace(-1.0, 1.0, 4, dtype=np.float32))
    total = graph.add_node("Add", [x, skip], output_names=["sum"]).output
    y = graph.add_node("LayerNormalization", [total, scale, bias], {"axis": -1}, output_names=["y"]).output
    relu = graph.add_node("Relu", [y]).output
    graph.set_outputs([graph.add_node("Add", [total, relu], output_names=["out"]).output])
    return graph


def test_the_norm_and_the_sum_both_come_from_the_fused_node():
    graph = pre_norm_block()
    feeds = sample_inputs(graph)
    expected = run_graph(graph, feeds)
    result = FuseResidualNorm().run(graph, graphopt.PassContext())
    graph.verify()
    assert result.changed and result.stats == {"fused": 1}
    assert graph.op_counts() == {"graphopt::SkipLayerNorm": 1, "Relu": 1, "Add": 1}
    (fused,) = [n for n in graph.nodes if n.op_type == "SkipLayerNorm"]
    assert [v.name for v in fused.outputs] == ["y", "sum"]
    assert {use.node.op_type for use in fused.outputs[1].uses()} == {"Add"}
    assert max_abs_error(expected, run_graph(graph, feeds)) <= 1e-5


def test_a_broadcast_residual_is_refused_by_the_check():
    graph = pre_norm_block(skip_shape=(1, 4))
    printed = str(graph)
    assert FuseResidualNorm().run(graph, graphopt.PassContext()).stats == {"fused": 0}
    assert str(graph) == printed
