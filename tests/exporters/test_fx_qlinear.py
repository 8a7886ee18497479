"""oneDNN int8 linears for static-quantized matmuls on the CPU torch target: which matmuls run
as `qlinear_pointwise`, uint8 chaining, equal outputs (vs the unlowered graph and ONNX
Runtime on the same quantized graph) and the fallback without oneDNN int8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import numpy_inputs
from quant_testing import block_graph, calibration, cosine, gemm_graph, mlp_graph, residual_graph

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.ir.graph import constant_data
from graphopt.check import run_graph
from graphopt.exporters import fx_qlinear
from graphopt.exporters.fx_export import to_fx
from graphopt.exporters.torch_kernels import onnx_DynamicQuantizeLinear, onnx_QuantizeLinear

pytestmark = pytest.mark.skipif(not fx_qlinear.qlinear_available(), reason="torch without oneDNN int8 linears")

FLOAT_BOUND = 1e-5
"""Float outputs of an int8 linear: exact int32 sums, scaled once; float32 rounding only."""


def _qlinear_calls(module, overload: str = "default") -> tuple[int, int]:
    """(int8 linears, those writing uint8) in the module's code."""
    calls = [line for line in module.code.splitlines() if f"onednn.qlinear_pointwise.{overload}(" in line]
    return len(calls), sum("torch.uint8" in line for line in calls)


def _run(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in module(*(torch.from_numpy(v) for v in feeds.values()))]


def _static(graph: Graph) -> Graph:
    return graphopt.optimize(graph.clone(), "quantize{smooth=false}", calibration_data=calibration(graph))


def test_every_static_matmul_runs_as_an_int8_linear_equal_to_the_unlowered_graph_and_ort():
    quantized = _static(block_graph())
    module = to_fx(quantized, prepack_linears=True)
    assert _qlinear_calls(module) == (3, 0)  # the Relu between q_proj and o_proj keeps a float tensor
    assert "DequantizeLinear" not in module.code and "QuantizeLinear(" not in module.code and module.code.count("quantize_uint8(") == 2
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 4, 16)).astype(np.float32)}
    got, unlowered, in_ort = _run(module, feeds), _run(to_fx(quantized), feeds), run_graph(quantized, feeds)
    for a, b, c in zip(got, unlowered, in_ort):
        np.testing.assert_allclose(a, b, rtol=0, atol=FLOAT_BOUND)
        np.testing.assert_allclose(a, c, rtol=0, atol=FLOAT_BOUND)


def test_a_requantized_result_is_written_as_uint8_by_the_linear_within_one_step():
    graph = mlp_graph()
    quantized = _static(graph)
    plans = list(fx_qlinear.plan_qlinears(quantized).values())
    assert [(p.gelu, p.bias is not None, p.output is not None) for p in plans] == [("none", True, True), (None, True, False)]
    module = to_fx(quantized, prepack_linears=True)
    assert _qlinear_calls(module) == (2, 1) and module.code.count("quantize_uint8(") == 1  # only the input's
    feeds = {"x": np.random.default_rng(3).standard_normal((3, 4, 16)).astype(np.float32)}
    (got,), (unlowered,), (in_ort,) = _run(module, feeds), _run(to_fx(quantized), feeds), run_graph(quantized, feeds)
    # a Gelu output within float32 rounding of a rounding boundary may requantize one step
    # (its scale) away: the output moves by at most that step times the second weight's column sums
    step = float(plans[0].output[0])
    w2 = plans[1].weight.astype(np.float32) * plans[1].weight_scale[:, None]
    bound = step * np.abs(w2).sum(axis=1).max() + FLOAT_BOUND
    assert np.abs(got - unlowered).max() <= bound and np.abs(got - in_ort).max() <= bound
    assert np.mean(np.abs(got - in_ort) <= FLOAT_BOUND) >= 0.9
    assert cosine(run_graph(graph, feeds)[0], got) >= 0.999


def test_quantize_uint8_is_quantize_linear_but_one_step_on_rounding_boundaries():
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.standard_normal((256, 384)) * 2).astype(np.float32))
    scale, zero = 2.0**-6, 131
    x[0, :5] = torch.tensor([1e9, -1e9, 0.0, 3.5 * scale, 2.5 * scale])  # clamped both ways, the zero point, two ties
    factors = torch.from_numpy((rng.random(384) + 0.5).astype(np.float32))
    factors[:5] = 1.0
    expected = onnx_QuantizeLinear(x * factors, torch.tensor(scale), torch.tensor(zero, dtype=torch.uint8))
    plain = fx_qlinear.quantize_uint8(x * factors, scale, zero)
    folded = fx_qlinear.quantize_uint8(x, 1.0, zero, factors / scale)
    for got in (plain, folded):
        assert got.dtype == torch.uint8 and got.shape == x.shape and got.is_contiguous()
        steps = (got.int() - expected.int()).abs()
        assert steps.max() <= 1 and steps.float().mean() < 1e-3
        assert got[0, :3].tolist() == [255, 0, zero]
        assert got[0, 3:5].tolist() == [zero + 3, zero + 3]  # ties to even after adding the odd zero point; ONNX: 4, 2


def test_smooth_quant_factors_fold_into_one_quantize_per_activation_within_one_step():
    assert [[[n.op_type for n in q.absorbed] for q in _quantizers(g).values()] for g in (mlp_graph(), block_graph())] == [
        [["Mul", "QuantizeLinear"]] * 2, [["QuantizeLinear"], ["Mul", "QuantizeLinear"]]  # block: absorbed by the norm
    ]
    graph = residual_graph()  # the norm also feeds the residual Add, so its factors stay a Mul
    quantized = graphopt.optimize(graph.clone(), "smooth-quant{alpha=0.5},quantize", calibration_data=calibration(graph))
    module = to_fx(quantized, prepack_linears=True)
    assert module.code.count("quantize_uint8(") == 1 and "_Mul(" not in module.code and "QuantizeLinear(" not in module.code
    feeds = {"x": np.random.default_rng(3).standard_normal((4, 4, 16)).astype(np.float32)}
    (got,), (unlowered,), (in_ort,) = _run(module, feeds), _run(to_fx(quantized), feeds), run_graph(quantized, feeds)
    # an activation within float32 rounding of a rounding boundary may land one step (the
    # scale) away: the output moves by at most that times a column sum of the dequantized weight
    (plan,) = fx_qlinear.plan_qlinears(quantized).values()
    (quantizer,) = _quantizers(quantized).values()
    step = float(constant_data(quantizer.last.inputs[1]))
    bound = step * np.abs(plan.weight.astype(np.float32) * plan.weight_scale[:, None]).sum(axis=1).max() + FLOAT_BOUND
    assert np.abs(got - unlowered).max() <= bound and np.abs(got - in_ort).max() <= bound
    assert np.mean(np.abs(got - in_ort) <= FLOAT_BOUND) >= 0.9


def test_a_quantized_activation_read_by_more_than_int8_linears_runs_its_quantize_linear():
    quantized = _static(mlp_graph())
    assert len(_quantizers(quantized)) == 1  # the input's; the Gelu's is requantized by the linear
    quant = next(n for n in quantized.nodes if n.op_type == "QuantizeLinear")
    quantized.set_outputs([*quantized.outputs, quant.output])
    assert not _quantizers(quantized)
    module = to_fx(quantized, prepack_linears=True)
    assert "quantize_uint8(" not in module.code and module.code.count("QuantizeLinear(") == 1


def _quantizers(graph: Graph) -> dict:
    if not any(n.op_type == "QuantizeLinear" for n in graph.nodes):
        graph = graphopt.optimize(graph.clone(), "smooth-quant{alpha=0.5},quantize", calibration_data=calibration(graph))
    return fx_qlinear.plan_quantizers(graph, fx_qlinear.plan_qlinears(graph))


def _skip_norm_graph(norm_bias: bool) -> Graph:
    """x @ W + b -> SkipLayerNorm(that, skip, gamma, beta[, bias]) -> (y, sum); the skip is an input."""
    rng = np.random.default_rng(5)
    graph = Graph("skip_norm", opset_imports={"": 17, "graphopt": 1})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4, 16)))
    skip = graph.add_input("skip", TensorType(DType.FLOAT, ("batch", 4, 8)))
    w = graph.add_constant("w", (rng.standard_normal((16, 8)) / 4).astype(np.float32))
    b = graph.add_constant("b", rng.standard_normal(8).astype(np.float32))
    inputs = [graph.add_node("Add", [graph.add_node("MatMul", [x, w]).output, b]).output, skip,
              graph.add_constant("gamma", rng.uniform(0.5, 2, 8).astype(np.float32)), graph.add_constant("beta", rng.standard_normal(8).astype(np.float32))]
    if norm_bias:
        inputs.append(graph.add_constant("norm_bias", rng.standard_normal(8).astype(np.float32)))
    norm = graph.add_node("SkipLayerNorm", inputs, {"epsilon": 1e-5}, domain="graphopt", output_names=["y", "sum"], num_outputs=2)
    graph.set_outputs(list(norm.outputs))
    return graph


@pytest.mark.parametrize("norm_bias", [False, True])
def test_a_skip_layer_norm_after_an_int8_linear_gets_its_residual_added_by_the_linear(norm_bias):
    graph = _skip_norm_graph(norm_bias)
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((2, 4, 16)).astype(np.float32), "skip": rng.standard_normal((2, 4, 8)).astype(np.float32)} for _ in range(4)]
    quantized = graphopt.optimize(graph.clone(), "quantize{smooth=false}", calibration_data=samples)
    module = to_fx(quantized, prepack_linears=True)
    assert _qlinear_calls(module, "binary") == (1, 0) and _qlinear_calls(module) == (0, 0)
    assert module.code.count("skip_layer_norm_of_sum(") == 1 and "graphopt_SkipLayerNorm" not in module.code
    feeds = {"x": rng.standard_normal((3, 4, 16)).astype(np.float32), "skip": rng.standard_normal((3, 4, 8)).astype(np.float32)}
    skip = torch.from_numpy(feeds["skip"].copy())
    with torch.no_grad():
        got = [o.numpy() for o in module(torch.from_numpy(feeds["x"]), skip)]
    assert np.array_equal(skip.numpy(), feeds["skip"])  # read, not written
    for a, b, c in zip(got, _run(to_fx(quantized), feeds), run_graph(quantized, feeds)):
        np.testing.assert_allclose(a, b, rtol=0, atol=FLOAT_BOUND * 10)
        np.testing.assert_allclose(a, c, rtol=0, atol=FLOAT_BOUND * 10)


def test_a_skip_that_broadcasts_keeps_the_norm_adding_it():
    graph = _skip_norm_graph(False)
    graph.inputs[1].type = TensorType(DType.FLOAT, (1, 4, 8))
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((2, 4, 16)).astype(np.float32), "skip": rng.standard_normal((1, 4, 8)).astype(np.float32)} for _ in range(2)]
    quantized = graphopt.optimize(graph.clone(), "quantize{smooth=false}", calibration_data=samples)
    module = to_fx(quantized, prepack_linears=True)
    assert _qlinear_calls(module, "binary") == (0, 0) and _qlinear_calls(module) == (1, 0) and "graphopt_SkipLayerNorm" in module.code


def test_gemm_with_transposed_weight_and_int32_bias_runs_as_an_int8_linear():
    graph = gemm_graph()
    quantized = _static(graph)
    (plan,) = fx_qlinear.plan_qlinears(quantized).values()
    assert plan.weight.shape == (8, 16) and len(plan.dequantized) == 3  # activation, weight and int32 bias
    module = to_fx(quantized, prepack_linears=True)
    assert _qlinear_calls(module) == (1, 0)
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)}
    np.testing.assert_allclose(_run(module, feeds)[0], run_graph(quantized, feeds)[0], rtol=0, atol=FLOAT_BOUND * 10)


def test_static_zoo_bert_after_fuse_runs_every_matmul_int8_and_matches_ort(zoo, zoo_onnx):
    zm = zoo("bert")
    graph = graphopt.from_onnx(zoo_onnx("bert"))
    feeds = numpy_inputs(zm)
    samples = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(2)]
    # smooth=false: smoothing puts a Mul between each Gelu and its down projection, which then reads float
    model = graphopt.compile(graph.clone(), "torch", "fuse,quantize{smooth=false}", calibration_data=samples)
    out = model.graph
    matmuls = model.pipeline_report.records[-1].stats["quantized"]
    calls, chained = _qlinear_calls(model.module)
    residual, _ = _qlinear_calls(model.module, "binary")
    # each FFN's up-projection feeds the down one in uint8; each attention output and FFN
    # down-projection adds the residual of the SkipLayerNorm after it
    assert calls + residual == matmuls and chained == out.op_counts()["graphopt::Gelu"] >= 2
    assert residual == 2 * chained and model.module.code.count("skip_layer_norm_of_sum(") == residual
    got, in_ort = np.asarray(model(*feeds.values())[0]), run_graph(out, feeds)[0]
    np.testing.assert_allclose(got, in_ort, rtol=1e-3, atol=1e-3)
    assert cosine(run_graph(graph, feeds)[0], got) >= 0.99


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_to_bf16_after_quantize_keeps_the_int8_linears(mode, zoo, zoo_onnx):
    zm = zoo("bert")
    graph = graphopt.from_onnx(zoo_onnx("bert"))
    feeds = numpy_inputs(zm)
    samples = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(2)]
    quantize = f"fuse,quantize{{mode={mode},smooth=false}}"
    int8 = graphopt.compile(graph.clone(), "torch", quantize, calibration_data=samples)
    mixed = graphopt.compile(graph.clone(), "torch", quantize + ",to-bf16", calibration_data=samples)
    overloads = ("default", "binary") if mode == "static" else ("tensor", "binary_tensor")

    def linears(module) -> int:
        return sum(_qlinear_calls(module, overload)[0] for overload in overloads)

    assert linears(mixed.module) == linears(int8.module) >= 8
    assert any(n.output.dtype == DType.BFLOAT16 for n in mixed.graph.nodes if n.qualified_op == "graphopt::Attention")
    expected = run_graph(graph, feeds)[0]
    assert cosine(expected, np.asarray(mixed(*feeds.values())[0])) >= cosine(expected, np.asarray(int8(*feeds.values())[0])) - 2e-3


def test_without_onednn_int8_the_quantized_graph_runs_on_the_torch_kernels(monkeypatch):
    quantized = _static(mlp_graph())
    monkeypatch.setattr(fx_qlinear, "qlinear_available", lambda: False)
    module = to_fx(quantized, prepack_linears=True)
    assert _qlinear_calls(module) == (0, 0) and module.code.count("DequantizeLinear(") == 4
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 4, 16)).astype(np.float32)}
    np.testing.assert_allclose(_run(module, feeds)[0], _run(to_fx(quantized), feeds)[0], rtol=0, atol=0)


def test_dynamic_int8_chains_run_as_int8_linears_reading_the_dynamic_scale():
    graph = mlp_graph()
    quantized = graphopt.optimize(graph.clone(), "quantize{mode=dynamic}")
    plans = list(fx_qlinear.plan_qlinears(quantized).values())
    assert [[n.op_type for n in p.absorbed] for p in plans] == [["MatMulInteger", "Cast", "Mul", "Add", "Gelu"], ["MatMulInteger", "Cast", "Mul", "Add"]]
    module = to_fx(quantized, prepack_linears=True)
    assert _qlinear_calls(module, "tensor") == (2, 0)
    assert module.code.count("dynamic_quantize_uint8(") == 2 and "torch_kernels_onnx_" not in module.code  # no Mul, no MatMulInteger
    feeds = {"x": np.random.default_rng(3).standard_normal((3, 4, 16)).astype(np.float32)}
    (got,), (in_ort,) = _run(module, feeds), run_graph(quantized, feeds)
    np.testing.assert_allclose(got, in_ort, rtol=0, atol=FLOAT_BOUND)


def test_dynamic_quantize_uint8_is_dynamic_quantize_linear_but_one_step_on_rounding_boundaries():
    x = torch.from_numpy((np.random.default_rng(0).standard_normal((256, 384)) * 2).astype(np.float32))
    expected = onnx_DynamicQuantizeLinear(x)
    got = fx_qlinear.dynamic_quantize_uint8(x)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
    steps = (got[0].int() - expected[0].int()).abs()
    assert got[0].dtype == torch.uint8 and steps.max() <= 1 and steps.float().mean() < 1e-3


def test_int8_linears_need_torch_built_with_onednn(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not fx_qlinear.qlinear_available()
    assert _qlinear_calls(to_fx(_static(mlp_graph()), prepack_linears=True)) == (0, 0)


@pytest.mark.parametrize("gelu_outputs, chained", [(True, 0), (False, 1)])
def test_unsmoothed_gelu_outputs_let_the_up_projection_write_uint8(gelu_outputs, chained):
    graph = mlp_graph()
    pipeline = f"smooth-quant{{alpha=0.8,gelu_outputs={str(gelu_outputs).lower()}}},quantize"
    quantized = graphopt.optimize(graph.clone(), pipeline, calibration_data=calibration(graph))
    module = to_fx(quantized, prepack_linears=True)
    assert _qlinear_calls(module) == (2, chained)
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 4, 16)).astype(np.float32)}
    got, in_ort = _run(module, feeds)[0], run_graph(quantized, feeds)[0]
    assert cosine(got, in_ort) >= 0.999
