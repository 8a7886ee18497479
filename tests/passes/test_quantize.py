"""quantize: static Q/DQ, dynamic and weight-only modes on small graphs and a zoo model."""

import numpy as np
import onnx
import pytest
from conftest import numpy_inputs
from quant_testing import INT8_KERNELS, block_graph, calibration, cosine, gemm_graph, ort_kernel_counts, residual_graph

import graphopt
from graphopt import DType, Graph, PassContext, PipelineError, TensorType
from graphopt.check import run_graph, sample_inputs
from graphopt.passes.quantize import QuantizationError, Quantize
from graphopt.passes.quantize_weights import dequantize_blocks, quantize_blocks, quantize_symmetric


def _quantized(graph: Graph, pipeline: str, **options):
    out = graphopt.optimize(graph.clone(), pipeline, verify=True, **options)
    return out, out.report.records[-1].stats


def _check_runs_everywhere(original: Graph, quantized: Graph, min_cosine: float) -> None:
    onnx.checker.check_model(quantized.to_onnx())
    feeds = sample_inputs(original)
    expected = run_graph(original, feeds)
    in_ort = run_graph(quantized, feeds)
    in_torch = run_graph(quantized, feeds, engine="torch")
    for want, ort_out, torch_out in zip(expected, in_ort, in_torch):
        assert cosine(want, ort_out) >= min_cosine
        np.testing.assert_allclose(torch_out, ort_out, rtol=1e-3, atol=1e-3)


def test_static_puts_one_dequantize_per_consumer_and_ort_runs_int8_kernels():
    graph = block_graph()
    out, stats = _quantized(graph, "quantize{smooth=false}", calibration_data=calibration(graph))
    assert stats == {"quantized": 3, "kept_float": 0, "excluded": 0}
    counts = out.op_counts()
    # two activations (the norm output, shared by q/k, and the Relu output): one Q each;
    # one activation DQ and one weight DQ per matmul
    assert counts["QuantizeLinear"] == 2 and counts["DequantizeLinear"] == 6
    norm_q = next(n for n in out.nodes if n.op_type == "QuantizeLinear" and n.inputs[0].producer.op_type == "LayerNormalization")
    assert len(norm_q.output.uses()) == 2 and all(len(u.node.output.uses()) == 1 for u in norm_q.output.uses())
    assert {v.name for v in out.constants.values() if v.dtype == DType.INT8} >= {"wq_quantized", "wk_quantized", "wo_quantized"}
    assert not {"wq", "wk", "wo"} & set(out.constants)
    _check_runs_everywhere(graph, out, 0.999)
    kernels = ort_kernel_counts(out)
    assert sum(kernels.get(k, 0) for k in INT8_KERNELS) == 3, kernels
    assert kernels.get("MatMul", 0) == 0, kernels


def test_weights_are_per_channel_symmetric_within_half_a_step():
    weight = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)
    weight[:, 5] *= 40.0
    q, scale, zero = quantize_symmetric(weight, axis=1)
    assert q.dtype == np.int8 and scale.shape == (24,) and not zero.any()
    np.testing.assert_allclose(scale, np.abs(weight).max(axis=0) / 127, rtol=1e-6)
    assert np.all(np.abs(q.astype(np.float32) * scale - weight) <= scale / 2 + 1e-6)
    assert np.abs(q).max() == 127
    q8, scale8, zero8 = quantize_symmetric(weight, axis=None, dtype="uint8")
    assert q8.dtype == np.uint8 and scale8.shape == () and zero8 == 128
    assert np.all(np.abs((q8.astype(np.float32) - 128) * scale8 - weight) <= scale8 / 2 + 1e-6)


def test_static_per_channel_scales_in_the_graph_match_the_weights():
    graph = block_graph()
    out, _ = _quantized(graph, "quantize{smooth=false}", calibration_data=calibration(graph))
    scale = out.constants["wq_scale"].const.numpy()
    np.testing.assert_allclose(scale, np.abs(graph.constants["wq"].const.numpy()).max(axis=0) / 127, rtol=1e-6)
    dq = next(n for n in out.nodes if n.op_type == "DequantizeLinear" and n.inputs[0].name == "wq_quantized")
    assert dq.attrs["axis"] == 1


def test_excluded_layers_stay_float():
    graph = block_graph()
    out, stats = _quantized(graph, "quantize{exclude=['o_*', 'wk'],smooth=false}", calibration_data=calibration(graph))
    assert stats == {"quantized": 1, "kept_float": 0, "excluded": 2}
    by_name = {n.name: n for n in out.nodes}
    assert by_name["o_proj"].inputs[1].name == "wo" and by_name["k_proj"].inputs[1].name == "wk"
    assert by_name["q_proj"].inputs[1].producer.op_type == "DequantizeLinear"


def test_running_quantize_twice_changes_nothing_the_second_time():
    graph = block_graph()
    data = calibration(graph)
    once, _ = _quantized(graph, "quantize", calibration_data=data)
    twice, stats = _quantized(once, "quantize", calibration_data=data)
    assert stats == {"quantized": 0, "kept_float": 0, "excluded": 0, "already_quantized": 3}
    assert str(twice) == str(once)
    _, dynamic_stats = _quantized(once, "quantize{mode=dynamic}")
    assert dynamic_stats["quantized"] == 0 and dynamic_stats["already_quantized"] == 3


def test_quantize_is_deterministic():
    graph = block_graph()
    data = calibration(graph)
    a, _ = _quantized(graph, "quantize{calibrate=entropy}", calibration_data=data)
    b, _ = _quantized(graph, "quantize{calibrate=entropy}", calibration_data=data)
    assert str(a) == str(b)
    for name, value in a.constants.items():
        np.testing.assert_array_equal(value.const.numpy(), b.constants[name].const.numpy())


def test_static_without_calibration_data_says_how_to_give_it_or_to_use_dynamic():
    with pytest.raises(QuantizationError, match=(
        r"^pass 'quantize' with mode=static needs calibration data: give it with graphopt.optimize\(\.\.\., calibration_data=\[\.\.\.\]\) "
        r"or `graphopt optimize --calibration-data inputs.npz`, or use mode=dynamic, which needs none$"
    )):
        Quantize().run(block_graph(), PassContext())
    with pytest.raises(QuantizationError, match=r"^pass 'quantize' with smooth=0.6 needs calibration data: give it with graphopt.optimize"):
        Quantize(mode="dynamic", smooth=0.6).run(block_graph(), PassContext())


def test_by_default_static_and_dynamic_smooth_first_exactly_as_smooth_quant_auto_would():
    graph = residual_graph()
    data = calibration(graph, 16)
    for mode in ("static", "dynamic"):
        default, stats = _quantized(graph, f"quantize{{mode={mode}}}", calibration_data=data)
        spelled = graphopt.optimize(graph.clone(), f"smooth-quant{{alpha=auto}},quantize{{mode={mode},smooth=false}}", calibration_data=data)
        assert stats["smoothed"] == 1 and stats["alpha"] in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9), stats
        assert str(default) == str(spelled) and spelled.report.records[0].stats["alpha"] == stats["alpha"]
    feeds = sample_inputs(graph)
    expected = run_graph(graph, feeds)[0]
    plain, _ = _quantized(graph, "quantize{smooth=false}", calibration_data=data)
    smoothed, _ = _quantized(graph, "quantize", calibration_data=data)
    assert np.abs(run_graph(smoothed, feeds)[0] - expected).max() < np.abs(run_graph(plain, feeds)[0] - expected).max()


def test_a_graph_smooth_quant_already_smoothed_is_not_smoothed_again():
    graph = residual_graph()
    data = calibration(graph)
    once = graphopt.optimize(graph.clone(), "smooth-quant{alpha=0.5},quantize", calibration_data=data)
    assert "smoothed" not in once.report.records[-1].stats
    assert once.op_counts()["Mul"] == 1  # smooth-quant's


def test_dynamic_without_calibration_data_warns_that_smoothing_needs_it(caplog):
    _, stats = _quantized(block_graph(), "quantize{mode=dynamic}")
    assert stats["quantized"] == 3 and "smoothed" not in stats
    [message] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert message.startswith("quantize{mode=dynamic}: no calibration data") and "smooth=auto" in message and "needs calibration data" in message
    caplog.clear()
    _quantized(block_graph(), "quantize{mode=dynamic,smooth=false}")
    _quantized(block_graph(), "quantize{mode=weight-only,block_size=16}")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("text, message", [
    ("quantize{dtype=int4}", "dtype=int4 needs mode=weight-only (mode=static runs int8 kernels)"),
    ("quantize{mode=weight-only,dtype=uint8}", "mode=weight-only takes dtype=int4 or int8"),
    ("quantize{mode=weight-only,block_size=24}", "block_size must be a power of two >= 16, got 24"),
    ("quantize{fidelity_budget=1.5}", "fidelity_budget is a drop in cosine similarity, in (0, 1); got 1.5"),
    ("quantize{mode=dynamic,method=gptq}", "method apply to mode=weight-only only (mode=dynamic)"),
    ("quantize{symmetric=false,head=float}", "symmetric, head apply to mode=weight-only only (mode=static)"),
    ("quantize{mode=weight-only,accuracy_level=5}", "accuracy_level is 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8); got 5"),
    ("quantize{mode=weight-only,method=hqq}", "method"),
    ("quantize{smooth=true}", "smooth takes an alpha in .0, 1., auto, per-layer or false; got True"),
    ("quantize{smooth=1.5}", "smooth takes an alpha in .0, 1., auto, per-layer or false; got 1.5"),
    ("quantize{mode=weight-only,dtype=int4,smooth=0.5}", "smooth applies to mode=static and mode=dynamic"),
])
def test_bad_options_are_rejected_before_running(text, message):
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        graphopt.optimize(block_graph(), text)


@pytest.mark.parametrize("calibrate", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibration_method_gives_a_faithful_int8_graph(calibrate):
    graph = block_graph()
    out, _ = _quantized(graph, f"quantize{{calibrate={calibrate},activations=int8}}", calibration_data=calibration(graph, 16))
    _check_runs_everywhere(graph, out, 0.97)  # clipping methods trade outliers for resolution


def test_dynamic_mode_runs_as_ort_dynamic_int8_kernels():
    graph = block_graph()
    out, stats = _quantized(graph, "quantize{mode=dynamic}")
    assert stats["quantized"] == 3
    assert out.op_counts()["DynamicQuantizeLinear"] == 3 and out.op_counts()["MatMulInteger"] == 3
    _check_runs_everywhere(graph, out, 0.999)
    kernels = ort_kernel_counts(out)
    assert sum(kernels.get(k, 0) for k in INT8_KERNELS) == 3 and kernels.get("MatMul", 0) == 0, kernels


@pytest.mark.parametrize("dtype, bits", [("int4", 4), ("int8", 8)])
def test_weight_only_lowers_to_matmulnbits_for_ort_and_torch(dtype, bits):
    graph = block_graph()
    out, stats = _quantized(graph, f"quantize{{mode=weight-only,dtype={dtype},block_size=16,accuracy_level=0}}")
    assert stats["quantized"] == 3 and out.op_counts()["com.microsoft::MatMulNBits"] == 3
    node = next(n for n in out.nodes if n.op_type == "MatMulNBits")
    assert (node.attrs["bits"], node.attrs["K"], node.attrs["N"], node.attrs["block_size"]) == (bits, 16, 24, 16)
    assert "accuracy_level" not in node.attrs  # 0 = unset: ORT computes in float, like the torch kernel
    _check_runs_everywhere(graph, out, 0.995 if bits == 4 else 0.9999)
    _, again = _quantized(out, f"quantize{{mode=weight-only,dtype={dtype},block_size=16}}")
    assert again["quantized"] == 0


@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantization_error_is_within_half_a_step(bits):
    weight = np.random.default_rng(3).standard_normal((40, 8)).astype(np.float32)  # K=40: a partial last block
    for symmetric in (True, False):
        encoded = quantize_blocks(weight, bits, 16, symmetric)
        assert encoded.packed.shape == (8, 3, 16 * bits // 8) and encoded.scales.shape == (8, 3)
        assert (encoded.zero_points is None) == symmetric
        restored = dequantize_blocks(encoded.packed, encoded.scales, 40, 8, bits, 16, encoded.zero_points)
        scales = np.repeat(encoded.scales, 16, axis=1)[:, :40].T
        # symmetric puts the largest magnitude on -2^(bits-1): its negation clips to 2^(bits-1) - 1, one step off
        clipped = weight / scales > 2 ** (bits - 1) - 0.5 if symmetric else np.zeros(weight.shape, bool)
        bound = np.where(clipped, 1.0, 0.5) * np.abs(scales)
        assert np.all(np.abs(restored - weight) <= bound + 1e-6)


def test_gemm_with_transposed_weight_is_quantized_per_output_row_and_runs_int8():
    graph = gemm_graph()
    w = graph.constants["w"]
    for mode in ("static", "dynamic", "weight-only,accuracy_level=0"):
        out, stats = _quantized(graph, f"quantize{{mode={mode},block_size=16}}", calibration_data=calibration(graph))
        assert stats["quantized"] == 1
        _check_runs_everywhere(graph, out, 0.999)
    static, _ = _quantized(graph, "quantize{smooth=false}", calibration_data=calibration(graph))
    np.testing.assert_allclose(static.constants["w_scale"].const.numpy(), np.abs(w.const.numpy()).max(axis=1) / 127, rtol=1e-6)
    dq = next(n for n in static.nodes if n.op_type == "DequantizeLinear" and n.inputs[0].name == "w_quantized")
    assert dq.attrs["axis"] == 0
    assert static.constants["b_quantized"].dtype == DType.INT32
    assert ort_kernel_counts(static) == {"QuantizeLinear": 1, "QGemm": 1}


def test_fidelity_budget_keeps_the_most_sensitive_matmuls_float():
    graph = block_graph(outlier=60.0)
    data = calibration(graph)
    _, everything = _quantized(graph, "quantize{fidelity_budget=0.5}", calibration_data=data)
    assert everything["quantized"] == 3 and everything["fidelity"] >= 0.5
    _, nothing = _quantized(graph, "quantize{fidelity_budget=1e-9}", calibration_data=data)
    assert (nothing["quantized"], nothing["kept_float"], nothing["fidelity"]) == (0, 3, 1.0)
    full_drop = 1.0 - _quantized(graph, "quantize{fidelity_budget=0.9}", calibration_data=data)[1]["fidelity"]
    out, stats = _quantized(graph, f"quantize{{fidelity_budget={full_drop / 2}}}", calibration_data=data)
    assert 0 < stats["kept_float"] < 3 and 1.0 - stats["fidelity"] <= full_drop / 2


def test_static_quantization_of_a_zoo_bert_after_fuse_runs_int8_in_ort(zoo, zoo_onnx):
    zm = zoo("bert")
    graph = graphopt.from_onnx(zoo_onnx("bert"))
    feeds = numpy_inputs(zm)
    samples = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(2)]
    out = graphopt.optimize(graph.clone(), "fuse,quantize", calibration_data=samples, verify=True)
    matmuls = out.report.records[-1].stats["quantized"]
    assert matmuls >= 4 * 2  # per layer at least attention output and the two FFN matmuls
    kernels = ort_kernel_counts(out)
    assert sum(kernels.get(k, 0) for k in INT8_KERNELS) == matmuls, kernels
    expected, got = run_graph(graph, feeds)[0], run_graph(out, feeds)[0]
    assert cosine(expected, got) >= 0.99
    np.testing.assert_allclose(run_graph(out, feeds, engine="torch")[0], got, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_weight_only_decoder_runs_in_ort_and_the_torch_target(zoo, zoo_onnx, dtype):
    zm = zoo("llama")
    graph = graphopt.from_onnx(zoo_onnx("llama"))
    feeds = numpy_inputs(zm)
    out = graphopt.optimize(graph.clone(), f"fuse,quantize{{mode=weight-only,dtype={dtype},block_size=16,accuracy_level=0}}", verify=True)
    quantized = out.report.records[-1].stats["quantized"]
    assert quantized == out.op_counts()["com.microsoft::MatMulNBits"] >= 2 * 4  # q/k/v/o (maybe fused) + MLP per layer
    onnx.checker.check_model(out.to_onnx())
    expected = run_graph(graph, feeds)[0]
    in_ort = graphopt.compile(out, "onnxruntime:cpu")(*feeds.values())[0]
    in_torch = graphopt.compile(out, "torch")(*feeds.values())[0]
    assert cosine(expected, in_ort) >= (0.99 if dtype == "int4" else 0.9999)
    np.testing.assert_allclose(np.asarray(in_torch), np.asarray(in_ort), rtol=1e-3, atol=1e-3)


def test_a_quantized_graph_keeps_its_int8_kernels_through_fuse():
    """fold-constants must not dequantize the weights back to float, nor CSE merge the
    per-consumer DequantizeLinear nodes: either would leave ONNX Runtime float matmuls."""
    graph = block_graph()
    quantized, _ = _quantized(graph, "quantize{smooth=false}", calibration_data=calibration(graph))
    again = graphopt.optimize(quantized.clone(), "fuse", verify=True)
    assert again.op_counts()["DequantizeLinear"] == quantized.op_counts()["DequantizeLinear"] == 6
    kernels = ort_kernel_counts(again)
    assert sum(kernels.get(k, 0) for k in INT8_KERNELS) == 3 and kernels.get("MatMul", 0) == 0, kernels
