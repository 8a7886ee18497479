"""fuse-attention raises attention in every layer of the zoo, on every capture path."""

import model_zoo
import numpy as np
import pytest
import torch
from conftest import ROUNDTRIP_ARCHITECTURES, numpy_inputs
from fusion_expectations import ATTENTION_MISSES as KNOWN_MISSES
from fusion_expectations import LAYERS

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import max_abs_error, run_graph


def _fuse(graph):
    fused = graphopt.optimize(graph.clone(), "fuse-attention", verify=True)
    return fused, fused.report.records[0].stats


def _assert_fused_everywhere(name, graph, feeds, misses=KNOWN_MISSES):
    expected = run_graph(graph, feeds)
    fused, stats = _fuse(graph)
    attention = [n for n in fused.nodes if n.op_type == "Attention"]
    if name in misses:
        assert not attention
        assert any(misses[name] in key for key in stats), stats
        return
    assert len(attention) == LAYERS, stats
    assert not any(n.op_type == "Softmax" for n in fused.nodes)
    assert max_abs_error(expected, run_graph(fused, feeds)) <= 1e-4
    if name in ("llama", "mistral", "qwen2"):
        assert {(n.attrs["num_heads"], n.attrs["num_kv_heads"]) for n in attention} == {(4, 2)}


@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_fuses_torchscript_exports(name, zoo, zoo_onnx):
    _assert_fused_everywhere(name, graphopt.from_onnx(zoo_onnx(name)), numpy_inputs(zoo(name)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_fuses_dynamo_exports(name, zoo, zoo_onnx):
    _assert_fused_everywhere(name, graphopt.from_onnx(zoo_onnx(name, dynamo=True)), numpy_inputs(zoo(name)), misses={})


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "t5-encoder", "bloom"])
def test_same_fusion_fires_on_the_fx_captured_graph(name, zoo):
    zm = zoo(name)
    args = tuple(zm.inputs.values())
    program = torch.export.export(zm.model, args, dynamic_shapes=tuple({0: torch.export.Dim("batch")} for _ in args))
    graph = graphopt.from_fx(program)
    feeds = {value.name: tensor.numpy() for value, tensor in zip(graph.inputs, args)}
    _assert_fused_everywhere(name, graph, feeds, misses={})


def test_fused_model_keeps_dynamic_axes(zoo_onnx):
    fused, _ = _fuse(graphopt.from_onnx(zoo_onnx("qwen2")))
    other = numpy_inputs(model_zoo.build("qwen2", batch=3, seq=5))
    original = graphopt.from_onnx(zoo_onnx("qwen2"))
    assert max_abs_error(run_graph(original, other), run_graph(fused, other)) <= 1e-4


def _tiny_attention(scale_node: str, mask: bool) -> Graph:
    graph = Graph("tiny", {"": 18})
    q = graph.add_input("q", TensorType(DType.FLOAT, ("b", 2, "s", 4)))
    k = graph.add_input("k", TensorType(DType.FLOAT, ("b", 2, "s", 4)))
    v = graph.add_input("v", TensorType(DType.FLOAT, ("b", 2, "s", 4)))
    kt = graph.add_node("Transpose", [k], {"perm": (0, 1, 3, 2)}, output_names=["kt"])
    scores = graph.add_node("MatMul", [q, kt.output], output_names=["scores"]).output
    two = graph.add_constant("two", np.array(2.0, np.float32))
    scores = graph.add_node(scale_node, [scores, two], output_names=["scaled"]).output
    if mask:
        m = graph.add_input("mask", TensorType(DType.FLOAT, ("b", 1, 1, "s")))
        scores = graph.add_node("Add", [m, scores], output_names=["masked"]).output
    probs = graph.add_node("Softmax", [scores], {"axis": -1}, output_names=["probs"])
    out = graph.add_node("MatMul", [probs.output, v], output_names=["out"])
    graph.set_outputs([out.output])
    return graph


def test_golden_small_graph_with_mask_on_the_left_of_add():
    fused, stats = _fuse(_tiny_attention("Div", mask=True))
    assert stats == {"fused": 1, "kv-cache": 0}
    assert str(fused) == (
        "graph tiny (\n"
        "  %q: f32[b, 2, s, 4]\n  %k: f32[b, 2, s, 4]\n  %v: f32[b, 2, s, 4]\n  %mask: f32[b, 1, 1, s]\n"
        ") {\n"
        "  %out: f32[b, 2, s, 4] = graphopt::Attention(%q, %k, %v, %mask) {num_heads=2, num_kv_heads=2, scale=0.5}\n"
        "  return %out\n}\n"
    )


def test_scale_applied_before_bias_scales_the_bias():
    graph = _tiny_attention("Mul", mask=False)
    scaled = graph.find_value("scaled")
    bias_input = graph.add_input("bias", TensorType(DType.FLOAT, (1, 1, 1, "s")))
    add = graph.add_node("Add", [graph.find_value("scores"), bias_input], before=scaled.producer)
    scaled.producer.replace_input(0, add.output)
    graph.verify()
    feeds = {"q": np.random.default_rng(0).standard_normal((1, 2, 3, 4), dtype=np.float32)}
    feeds["k"], feeds["v"] = feeds["q"] * 0.5, feeds["q"] + 1
    feeds["bias"] = np.random.default_rng(1).standard_normal((1, 1, 1, 3), dtype=np.float32)
    fused, stats = _fuse(graph)
    assert stats["fused"] == 1 and not any(n.op_type == "Softmax" for n in fused.nodes)
    assert max_abs_error(run_graph(graph, feeds), run_graph(fused, feeds)) <= 1e-5


def test_returned_attention_weights_block_the_fusion():
    graph = _tiny_attention("Div", mask=False)
    graph.set_outputs([graph.outputs[0], graph.find_value("probs")])
    fused, stats = _fuse(graph)
    assert stats["fused"] == 0
    assert "used outside the attention" in " ".join(stats)
