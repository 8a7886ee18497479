"""Graph.to_onnx/save_onnx/to_fx reach the exporters through the IR's conversion registry."""

import numpy as np
import pytest

import graphopt
from graphopt import DType, ExportError, Graph, TensorType
from graphopt.ir import conversions


def _graph() -> Graph:
    graph = Graph("small")
    x = graph.add_input("x", TensorType(DType.FLOAT, (2, 3)))
    relu = graph.add_node("Relu", [x], output_names=["y"])
    graph.set_outputs([relu.output])
    return graph


def test_import_graphopt_registers_the_built_in_formats():
    assert {"fx", "onnx", "onnx-file"} <= set(conversions.registered_conversions())


def test_free_functions_and_methods_give_the_same_model(tmp_path):
    graph = _graph()
    assert graphopt.to_onnx(graph) == graph.to_onnx()
    graphopt.save_onnx(graph, tmp_path / "a.onnx")
    graph.save_onnx(tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    x = np.array([[-1.0, 0.0, 2.0], [3.0, -4.0, 5.0]], np.float32)
    (out,) = graphopt.to_fx(graph)(__import__("torch").from_numpy(x))
    np.testing.assert_array_equal(out.numpy(), np.maximum(x, 0))


def test_a_registered_conversion_receives_the_graph_and_options(monkeypatch):
    calls = []
    monkeypatch.setitem(conversions._CONVERSIONS, "onnx", lambda graph, **options: calls.append((graph, options)) or "model")
    graph = _graph()
    assert graph.to_onnx(keep_graphopt_ops=True) == "model"
    assert calls == [(graph, {"keep_graphopt_ops": True})]


def test_an_unregistered_format_names_itself_and_the_registered_ones():
    with pytest.raises(ExportError, match=r"no conversion to 'mlir' is registered \(registered: fx, onnx, onnx-file"):
        conversions.convert("mlir", _graph())
