"""ONNX -> IR -> FX: an ONNX model runs as a torch.fx GraphModule with the same outputs."""

import onnxruntime as ort
import pytest
import torch

import graphopt
import model_zoo
from conftest import ROUNDTRIP_ARCHITECTURES, max_abs_diff, numpy_inputs


def _ort(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _fx_outputs(graph, feeds):
    module = graph.to_fx()
    return module(*[torch.from_numpy(feeds[v.name]) for v in graph.inputs])


@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_onnx_model_runs_as_fx(name, zoo, zoo_onnx):
    path = zoo_onnx(name)
    feeds = numpy_inputs(zoo(name))
    graph = graphopt.from_onnx(path)
    assert max_abs_diff(_ort(path, feeds), _fx_outputs(graph, feeds)) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "vit"])
def test_dynamo_onnx_model_runs_as_fx(name, zoo, zoo_onnx):
    path = zoo_onnx(name, dynamo=True)
    feeds = numpy_inputs(zoo(name))
    assert max_abs_diff(_ort(path, feeds), _fx_outputs(graphopt.from_onnx(path), feeds)) <= 1e-4


def test_fx_from_onnx_honours_dynamic_axes(zoo_onnx):
    graph = graphopt.from_onnx(zoo_onnx("qwen2"))
    other = numpy_inputs(model_zoo.build("qwen2", batch=3, seq=5))
    assert max_abs_diff(_ort(zoo_onnx("qwen2"), other), _fx_outputs(graph, other)) <= 1e-4


def test_unsupported_op_names_node_and_op():
    from onnx import TensorProto, helper

    node = helper.make_node("FusedThing", ["x"], ["y"], domain="com.example", name="fancy")
    model = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    ), opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    with pytest.raises(graphopt.UnsupportedOpError, match=r"com.example::FusedThing \(first at node 'fancy'"):
        graphopt.from_onnx(model).to_fx()
