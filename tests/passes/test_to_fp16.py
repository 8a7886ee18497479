"""to-fp16 / to-bf16: half precision for matmuls and elementwise ops, float32 for softmax and norms."""

import numpy as np
import onnx
import pytest
from conftest import numpy_inputs
from quant_testing import cosine

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import run_graph, sample_inputs


def _attention_like() -> Graph:
    rng = np.random.default_rng(0)
    graph = Graph("mixed", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4, 16)))
    w = graph.add_constant("w", rng.standard_normal((16, 16)).astype(np.float32) / 4)
    scores = graph.add_node("MatMul", [x, w], name="proj").output
    probs = graph.add_node("Softmax", [scores], {"axis": -1}, name="softmax").output
    summed = graph.add_node("Add", [probs, x], name="residual").output
    norm = graph.add_node(
        "LayerNormalization",
        [summed, graph.add_constant("gamma", np.ones(16, np.float32)), graph.add_constant("beta", np.zeros(16, np.float32))],
        {"axis": -1}, name="norm", output_names=["y"],
    ).output
    graph.set_outputs([norm])
    return graph


def test_softmax_and_norms_stay_float32_and_the_rest_runs_in_fp16():
    graph = _attention_like()
    out = graphopt.optimize(graph.clone(), "to-fp16", verify=True)
    nodes = {n.name: n for n in out.nodes}
    assert nodes["proj"].output.dtype == DType.FLOAT16 and nodes["proj"].inputs[1].dtype == DType.FLOAT16
    assert nodes["softmax"].inputs[0].dtype == DType.FLOAT and nodes["softmax"].output.dtype == DType.FLOAT
    assert nodes["residual"].output.dtype == DType.FLOAT16
    assert nodes["norm"].inputs[0].dtype == DType.FLOAT
    assert out.inputs[0].dtype == DType.FLOAT and out.outputs[0].dtype == DType.FLOAT and out.outputs[0].name == "y"
    assert "w" not in out.constants and out.constants["w_f16"].dtype == DType.FLOAT16
    onnx.checker.check_model(out.to_onnx())
    feeds = sample_inputs(graph)
    expected = run_graph(graph, feeds)[0]
    for engine in ("onnxruntime", "torch"):
        got = run_graph(out, feeds, engine=engine)[0]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=2e-2)


def test_to_fp16_twice_changes_nothing():
    once = graphopt.optimize(_attention_like(), "to-fp16")
    twice = graphopt.optimize(once.clone(), "to-fp16")
    assert not twice.report.records[0].changed
    assert str(twice) == str(once)


def test_to_bf16_runs_in_torch():
    graph = _attention_like()
    out = graphopt.optimize(graph.clone(), "to-bf16", verify=True)
    assert out.constants["w_bf16"].dtype == DType.BFLOAT16
    feeds = sample_inputs(graph)
    np.testing.assert_allclose(run_graph(out, feeds, engine="torch")[0], run_graph(graph, feeds)[0], atol=1e-1)


@pytest.mark.parametrize("pipeline, norm_type", [
    ("to-bf16", DType.BFLOAT16),
    ("to-bf16{norms=float32}", DType.FLOAT),
    ("to-fp16", DType.FLOAT),
    ("to-fp16{norms=half}", DType.FLOAT16),
])
def test_norms_run_in_the_half_type_by_default_for_bf16_only(pipeline, norm_type):
    graph = _attention_like()
    out = graphopt.optimize(graph.clone(), pipeline, verify=True)
    norm = next(n for n in out.nodes if n.name == "norm")
    assert [v.dtype for v in norm.inputs] == [norm_type] * 3  # x, gamma and beta alike (valid ONNX)
    assert norm.output.dtype == norm_type and out.outputs[0].dtype == DType.FLOAT
    assert next(n for n in out.nodes if n.name == "softmax").output.dtype == DType.FLOAT
    assert norm.inputs[0].producer.op_type == ("Cast" if norm_type == DType.FLOAT else "Add")  # half: the residual, uncast
    feeds = sample_inputs(graph)
    engines = ("torch",) if "bf16" in pipeline else ("onnxruntime", "torch")
    for engine in engines:
        got = run_graph(out, feeds, engine=engine)[0]
        assert cosine(got, run_graph(graph, feeds)[0]) > 0.999, engine


def test_norms_option_names_its_values():
    with pytest.raises(graphopt.PipelineError, match="option 'norms' must be one of float32, half"):
        graphopt.optimize(_attention_like(), "to-bf16{norms=bf16}")


@pytest.mark.slow
def test_fp16_zoo_bert_after_fuse_stays_faithful(zoo, zoo_onnx):
    graph = graphopt.from_onnx(zoo_onnx("bert"))
    feeds = numpy_inputs(zoo("bert"))
    out = graphopt.optimize(graph.clone(), "fuse,to-fp16", verify=True)
    expected = run_graph(graph, feeds)[0]
    for engine in ("onnxruntime", "torch"):
        assert cosine(run_graph(out, feeds, engine=engine)[0], expected) > 0.999
