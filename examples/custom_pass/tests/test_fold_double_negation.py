"""Tests of fold-double-negation: the rewrite, its options, and that outputs do not change.

Run after installing the package: pip install -e examples/custom_pass && pytest examples/custom_pass/tests
"""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import run_graph, sample_inputs
from graphopt_example_pass import FoldDoubleNegation


def double_negation_graph() -> Graph:
    """z = Neg(Neg(x)) (a graph output) and w = Relu(Neg(Neg(Neg(x))))."""
    graph = Graph("double_negation")
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 3)))
    twice = graph.add_node("Neg", [graph.add_node("Neg", [x]).output], output_names=["z"])
    thrice = graph.add_node("Neg", [twice.output])
    relu = graph.add_node("Relu", [graph.add_node("Neg", [thrice.output]).output], output_names=["w"])
    graph.set_outputs([twice.output, relu.output])
    return graph


def test_removes_pairs_and_keeps_outputs():
    graph = double_negation_graph()
    feeds = sample_inputs(graph)
    expected = run_graph(graph, feeds)
    result = FoldDoubleNegation().run(graph, graphopt.PassContext())
    graph.verify()
    assert result.changed and result.stats == {"folded": 2}
    assert "Neg" not in graph.op_counts()
    assert [v.name for v in graph.outputs] == ["z", "w"]
    for want, got in zip(expected, run_graph(graph, feeds)):
        np.testing.assert_array_equal(want, got)


def test_limit_option_from_pipeline_text():
    graph = graphopt.optimize(double_negation_graph(), "fold-double-negation{limit=1}", check=True)
    assert graph.op_counts()["Neg"] == 2


def test_bad_option_is_a_pipeline_error():
    with pytest.raises(graphopt.PipelineError, match="limit"):
        graphopt.optimize(double_negation_graph(), "fold-double-negation{limit=-1}")
