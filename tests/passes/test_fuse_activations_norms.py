"""fuse-gelu and fuse-rmsnorm: golden small graphs and every layer of the zoo."""

import math

import numpy as np
import pytest
from conftest import ROUNDTRIP_ARCHITECTURES, numpy_inputs
from fusion_expectations import GELU_LAYERS, RMSNORMS

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import max_abs_error, run_graph


def _fuse(graph, pipeline="eliminate-noops,fuse-gelu,fuse-rmsnorm"):
    fused = graphopt.optimize(graph.clone(), pipeline, verify=True)
    return fused, [r.stats for r in fused.metadata["pipeline_report"].records]


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_every_gelu_and_rmsnorm_of_the_zoo_is_fused(name, dynamo, zoo, zoo_onnx):
    graph = graphopt.from_onnx(zoo_onnx(name, dynamo=dynamo))
    feeds = numpy_inputs(zoo(name))
    fused, stats = _fuse(graph)
    counts = fused.op_counts()
    assert counts.get("graphopt::Gelu", 0) == GELU_LAYERS.get(name, 0), stats
    assert counts.get("graphopt::RMSNorm", 0) == RMSNORMS.get(name, 0), stats
    assert max_abs_error(run_graph(graph, feeds), run_graph(fused, feeds)) <= 1e-4


def _erf_gelu_graph(grouping: str) -> Graph:
    graph = Graph("gelu", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("n", 8)))
    c = {v: graph.add_constant(f"c{i}", np.array(v, np.float32)) for i, v in enumerate((math.sqrt(2.0), 1.0, 0.5))}
    inner = graph.add_node("Add", [c[1.0], graph.add_node("Erf", [graph.add_node("Div", [x, c[math.sqrt(2.0)]]).output]).output]).output
    if grouping == "half-first":
        out = graph.add_node("Mul", [inner, graph.add_node("Mul", [c[0.5], x]).output], output_names=["y"])
    else:
        out = graph.add_node("Mul", [x, graph.add_node("Mul", [inner, c[0.5]]).output], output_names=["y"])
    graph.set_outputs([out.output])
    return graph


@pytest.mark.parametrize("grouping", ["half-first", "half-inner"])
def test_erf_gelu_golden(grouping):
    graph = _erf_gelu_graph(grouping)
    fused, stats = _fuse(graph, "fuse-gelu,eliminate-dead-code")
    assert stats[0] == {"fused": 1}
    assert str(fused).splitlines()[3:] == [
        "  %y: f32[n, 8] = graphopt::Gelu(%x) {approximate='none'}",
        "  return %y",
        "}",
    ]
    feeds = {"x": np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)}
    assert max_abs_error(run_graph(graph, feeds), run_graph(fused, feeds)) <= 1e-6


def test_gelu_with_an_extra_reader_inside_is_not_fused():
    graph = _erf_gelu_graph("half-first")
    erf = next(n for n in graph.nodes if n.op_type == "Erf")
    graph.set_outputs([graph.outputs[0], erf.output])
    _, stats = _fuse(graph, "fuse-gelu")
    assert stats[0] == {"fused": 0}


@pytest.mark.parametrize("attrs", [{}, {"approximate": "tanh"}])
def test_onnx_gelu_op_is_raised_too(attrs):
    graph = Graph("gelu20", {"": 20})
    x = graph.add_input("x", TensorType(DType.FLOAT, (2, 3)))
    graph.set_outputs([graph.add_node("Gelu", [x], attrs, output_names=["y"]).output])
    fused, stats = _fuse(graph, "fuse-gelu")
    assert stats[0] == {"fused": 1}
    (node,) = fused.nodes
    assert node.qualified_op == "graphopt::Gelu" and node.attrs == {"approximate": attrs.get("approximate", "none")}
    feeds = {"x": np.linspace(-3, 3, 6, dtype=np.float32).reshape(2, 3)}
    assert max_abs_error(run_graph(graph, feeds), run_graph(fused, feeds)) <= 1e-6
