"""bfloat16 graphs (`to-bf16`) on the CPU torch target: prepacked oneDNN bf16 linears with the
bias and GELU folded in, outputs near float32, and the warning on a CPU that emulates bf16.

Bound: on the zoo's random-weight tiny BERT (its zero-initialised linear biases drawn at random
too, so there are biases to fold), every token vector of the bf16 module's output has
cosine >= 0.999 with the float32 graph's (ONNX Runtime); the measured worst is 0.99999 (prepacked or not).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import model_zoo
import torch
from conftest import numpy_inputs

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import run_graph
from graphopt.exporters import fx_linear
from graphopt.exporters.fx_export import to_fx

pytestmark = pytest.mark.skipif(
    not fx_linear.prepacked_linear_available() or DType.BFLOAT16 not in fx_linear.prepacked_dtypes(),
    reason="torch's oneDNN runs no bfloat16 linears on this CPU",
)


def _token_cosines(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    a = actual.reshape(-1, actual.shape[-1]).astype(np.float64)
    b = expected.reshape(-1, expected.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _calls(module, name: str) -> list:
    return [n for n in module.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == name]


def _bf16_matmuls(graph: Graph) -> int:
    return sum(
        1 for n in graph.nodes
        if n.op_type == "MatMul" and n.inputs[1].const is not None and n.inputs[1].dtype == DType.BFLOAT16
    )


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(float32 graph, fuse,to-bf16 graph, feeds, float32 outputs from ONNX Runtime) of the zoo's
    tiny BERT with random linear biases."""
    zm = model_zoo.build("bert")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in zm.model.modules():
            if isinstance(layer, torch.nn.Linear) and layer.bias is not None:
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) / 4)
    graph = graphopt.from_onnx(model_zoo.export_onnx(zm, tmp_path_factory.mktemp("bf16") / "bert.onnx"))
    feeds = numpy_inputs(zm)
    return graph, graphopt.optimize(graph.clone(), "fuse,to-bf16"), feeds, run_graph(graph, feeds)


def test_tiny_bert_in_bf16_runs_prepacked_linears_near_float32(bert):
    graph, bf16, feeds, expected = bert
    compiled = graphopt.compile(bf16, target="torch")
    matmuls = _bf16_matmuls(bf16)
    assert matmuls >= 8  # 2 layers: fused QKV, attention output, two FFN matmuls
    assert len(_calls(compiled.module, "packed_linear")) == matmuls
    assert not _calls(compiled.module, "onnx_MatMul")
    got = compiled(**feeds)
    assert got[0].dtype == np.float32
    cosines = _token_cosines(got[0], expected[0])
    assert cosines.min() >= 0.999, cosines.min()


def test_bf16_norms_keep_the_residual_stream_in_bf16(bert):
    graph, bf16, feeds, expected = bert
    float_norms = graphopt.optimize(graph.clone(), "fuse,to-bf16{norms=float32}")
    skips = [n for n in bf16.nodes if n.qualified_op == "graphopt::SkipLayerNorm"]
    assert skips and all(v.dtype == DType.BFLOAT16 for n in skips for v in (*n.inputs, *n.outputs) if v is not None)
    assert all(n.outputs[0].dtype == DType.FLOAT for n in float_norms.nodes if n.qualified_op == "graphopt::SkipLayerNorm")

    def casts(g: Graph) -> int:
        return sum(n.op_type == "Cast" for n in g.nodes)

    assert casts(float_norms) - casts(bf16) >= len(skips)
    for g in (bf16, float_norms):
        cosines = _token_cosines(graphopt.compile(g, target="torch")(**feeds)[0], expected[0])
        assert cosines.min() >= 0.999, cosines.min()


def test_tiny_bert_bias_and_gelu_fold_into_the_bf16_linears(bert):
    _, bf16, _, _ = bert
    gelus = [n for n in bf16.nodes if n.qualified_op == "graphopt::Gelu"]
    assert gelus and all(n.inputs[0].dtype == DType.BFLOAT16 for n in gelus)
    module = to_fx(bf16, prepack_linears=True)
    linears = _calls(module, "packed_linear")
    assert not _calls(module, "graphopt_Gelu")
    assert sum(n.kwargs["gelu"] == "none" for n in linears) == len(gelus)
    bias_adds = [
        n for n in bf16.nodes
        if n.op_type == "Add" and any(v.producer is not None and v.producer.op_type == "MatMul" for v in n.inputs)
        and any(v.const is not None for v in n.inputs)
    ]
    gelu_biases = [n for n in gelus if len(n.inputs) > 1 and n.inputs[1] is not None]
    assert bias_adds and gelu_biases
    assert sum(n.args[2] is not None for n in linears) == len(bias_adds) + len(gelu_biases)
    assert not [n for n in _calls(module, "onnx_Add") if any(a in linears for a in n.args)]


def test_prepack_false_runs_the_bf16_graph_with_plain_matmuls(bert):
    _, bf16, feeds, expected = bert
    plain = graphopt.compile(bf16, target="torch{prepack=False}")
    packed = graphopt.compile(bf16, target="torch")
    assert not _calls(plain.module, "packed_linear") and len(_calls(plain.module, "onnx_MatMul")) == _bf16_matmuls(bf16)
    got = plain(**feeds)[0]
    assert _token_cosines(got, expected[0]).min() >= 0.999
    # same bf16 arithmetic up to where it rounds (the fused linear rounds once, after bias and GELU)
    assert _token_cosines(got, packed(**feeds)[0]).min() >= 0.9995


def _mlp() -> Graph:
    """x @ W1 + b1 -> Gelu -> @ W2 + b2, in float32."""
    rng = np.random.default_rng(0)
    graph = Graph("mlp", opset_imports={"": 17, "graphopt": 1})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 16)))
    w1 = graph.add_constant("w1", rng.standard_normal((16, 32)).astype(np.float32) / 4)
    b1 = graph.add_constant("b1", rng.standard_normal(32).astype(np.float32))
    w2 = graph.add_constant("w2", rng.standard_normal((32, 8)).astype(np.float32) / 4)
    b2 = graph.add_constant("b2", rng.standard_normal(8).astype(np.float32))
    act = graph.add_node("Gelu", [graph.add_node("MatMul", [x, w1]).output, b1], domain="graphopt").output
    y = graph.add_node("Add", [graph.add_node("MatMul", [act, w2]).output, b2], output_names=["y"]).output
    graph.set_outputs([y])
    return graph


def _bf16_mlp() -> Graph:
    return graphopt.optimize(_mlp(), "to-bf16")


def test_bf16_linear_plans_fold_the_gelu_bias_and_the_add_bias():
    graph = _bf16_mlp()
    plans = list(fx_linear.plan_linears(graph, frozenset({DType.BFLOAT16})).values())
    assert [(len(p.absorbed), p.gelu, p.weight.dtype == DType.BFLOAT16.to_numpy()) for p in plans] == [(2, "none", True), (2, None, True)]
    assert all(p.bias is not None and p.bias.dtype == DType.BFLOAT16.to_numpy() for p in plans)
    assert fx_linear.plan_linears(graph) == {}  # float32 weights only by default
    x = torch.randn(5, 16)
    packed, plain = to_fx(graph, prepack_linears=True), to_fx(graph)
    assert len(_calls(packed, "packed_linear")) == 2 and not _calls(packed, "onnx_MatMul")
    with torch.no_grad():
        a, b = packed(x)[0], plain(x)[0]
    assert a.dtype == torch.float32
    assert _token_cosines(a.numpy(), b.numpy()).min() >= 0.999


def _no_native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(fx_linear.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.mark.parametrize("spec", ["torch", "torch{prepack=False}"])
def test_a_cpu_without_avx512_bf16_or_amx_warns_and_still_runs(monkeypatch, caplog, spec):
    _no_native_bf16(monkeypatch)
    graph = _bf16_mlp()
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        compiled = graphopt.compile(graph, target=spec)
    warnings = [r.getMessage() for r in caplog.records if r.name == "graphopt" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "avx512_bf16" in warnings[0] and "AMX" in warnings[0] and "emulated" in warnings[0]
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(compiled(x=x)[0], run_graph(graph, {"x": x}, engine="torch")[0], rtol=0.05, atol=0.05)


def test_no_warning_for_float32_graphs_or_cpus_with_avx512_bf16(monkeypatch, caplog):
    _no_native_bf16(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        graphopt.compile(_mlp(), target="torch")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        graphopt.compile(_bf16_mlp(), target="torch")
    assert not [r for r in caplog.records if r.name == "graphopt" and r.levelno >= logging.WARNING]
