"""Weight-only int4: ONNX Runtime's encodings bit for bit, accuracy_level, and the calibrated
AWQ-style and GPTQ-style methods measured against round-to-nearest on the same data."""

import numpy as np
import onnx
import pytest
from quant_testing import cosine

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import run_graph
from graphopt.errors import GraphoptError
from graphopt.passes.quantize_weights import dequantize_blocks, quantize_blocks
from graphopt.passes.weight_only import awq_factors, clipped_blocks, gptq


def _mlp_graph(seed: int = 0) -> Graph:
    """x [batch, 8, 64] -> LayerNorm (a few loud channels) -> up [64, 96] -> Relu -> down [96, 64] = y.

    The norm's output is read by `up` only, so AWQ's division can be absorbed by the norm;
    `down`'s result is the graph output (a "head")."""
    rng = np.random.default_rng(seed)
    graph = Graph("mlp", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 8, 64)))
    gamma = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    gamma[[3, 17, 40]] = [12.0, -9.0, 15.0]
    norm = graph.add_node("LayerNormalization", [x, graph.add_constant("ln_scale", gamma), graph.add_constant("ln_bias", np.zeros(64, np.float32))],
                          {"axis": -1}, name="ln").output
    up = graph.add_node("MatMul", [norm, graph.add_constant("w_up", (rng.standard_normal((64, 96)) / 8).astype(np.float32))], name="up").output
    hidden = graph.add_node("Relu", [up]).output
    down = graph.add_node("MatMul", [hidden, graph.add_constant("w_down", (rng.standard_normal((96, 64)) / 10).astype(np.float32))],
                          name="down", output_names=["y"]).output
    graph.set_outputs([down])
    return graph


def _samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    mixing = (np.eye(64) + 0.5 * rng.standard_normal((64, 64)) / 8).astype(np.float32)
    return [{"x": (rng.standard_normal((2, 8, 64)).astype(np.float32) @ mixing)} for _ in range(count)]


def _relative_error(graph: Graph, quantized: Graph, samples) -> float:
    errors, norms = 0.0, 0.0
    for feeds in samples:
        want, got = run_graph(graph, feeds)[0], run_graph(quantized, feeds, engine="torch")[0]
        errors += float(np.sum((want - got) ** 2))
        norms += float(np.sum(want**2))
    return errors / norms


def _quantize(graph: Graph, options: str, calibration=None) -> Graph:
    return graphopt.optimize(graph.clone(), f"quantize{{mode=weight-only,dtype=int4,block_size=16,{options}}}", calibration_data=calibration, verify=True)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k, n, block", [(64, 4, 32), (96, 8, 32), (80, 8, 16), (768, 16, 128)])
def test_int4_encoding_is_bit_equal_to_onnxruntimes_quantizer(symmetric, k, n, block):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    weight = np.random.default_rng(k + n).standard_normal((k, n)).astype(np.float32)
    blocks = -(-k // block)
    packed, scales = np.zeros((n, blocks, block // 2), np.uint8), np.zeros(n * blocks, np.float32)
    zero_points = np.zeros(n * -(-blocks // 2), np.uint8)
    quantize_matmul_4bits(packed, weight, scales, zero_points, block, n, k, symmetric)
    encoded = quantize_blocks(weight, 4, block, symmetric)
    np.testing.assert_array_equal(encoded.packed, packed)
    np.testing.assert_array_equal(encoded.scales.reshape(-1), scales)
    if symmetric:
        assert encoded.zero_points is None
        codes = np.stack([packed & 15, packed >> 4], axis=-1)
        assert codes.min() == 0 and codes.max() == 15  # all 16 levels: [-8, 7] around the zero point 8
    else:
        np.testing.assert_array_equal(encoded.zero_points.reshape(-1), zero_points)


def test_asymmetric_and_accuracy_level_reach_the_matmulnbits_node_and_run_in_ort_and_torch():
    graph = _mlp_graph()
    feeds = _samples(1, seed=5)[0]
    out = _quantize(graph, "symmetric=false")
    nodes = [n for n in out.nodes if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and all(n.attrs["accuracy_level"] == 4 and len(n.inputs) == 4 for n in nodes)
    assert out.constants[nodes[0].inputs[3].name].dtype == DType.UINT8
    onnx.checker.check_model(out.to_onnx())
    expected = run_graph(graph, feeds)[0]
    in_ort, in_torch = run_graph(out, feeds)[0], run_graph(out, feeds, engine="torch")[0]
    # the torch kernel computes in float; ORT's accuracy_level 4 also rounds the activations to int8 per block
    assert cosine(expected, in_torch) >= 0.995 and cosine(expected, in_ort) >= 0.99
    exact_in_ort = run_graph(_quantize(graph, "symmetric=false,accuracy_level=0"), feeds)[0]
    np.testing.assert_allclose(exact_in_ort, in_torch, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", ["true", "false"])
def test_awq_and_gptq_beat_round_to_nearest_on_held_out_data(symmetric):
    graph = _mlp_graph()
    calibration, held_out = _samples(8, seed=1), _samples(4, seed=2)
    errors = {method: _relative_error(graph, _quantize(graph, f"method={method},symmetric={symmetric}", calibration), held_out)
              for method in ("rtn", "awq", "gptq")}
    assert errors["awq"] < 0.9 * errors["rtn"] and errors["gptq"] < 0.9 * errors["rtn"], errors


def test_awq_division_is_absorbed_by_the_norm_or_added_as_one_mul():
    graph = _mlp_graph()
    out = _quantize(graph, "method=awq", _samples(8, seed=1))
    counts = out.op_counts()
    assert counts["com.microsoft::MatMulNBits"] == 2
    gamma = graph.constants["ln_scale"].const.numpy()
    smoothed = next(v for v in out.constants.values() if v.name.startswith("ln_scale")).const.numpy()
    assert not np.allclose(smoothed, gamma)  # the norm's scale carries 1/s for `up`
    assert counts.get("Mul", 0) <= 1  # `down` reads the Relu: one Mul when its scaling pays


def test_gptq_without_error_feedback_room_equals_round_to_nearest():
    """With a diagonal Hessian no input channel can absorb another's error: GPTQ is RTN."""
    weight = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    for symmetric in (True, False):
        encoded = gptq(weight, np.diag(np.linspace(1.0, 2.0, 64)), 4, 16, symmetric)
        rtn = quantize_blocks(weight, 4, 16, symmetric)
        np.testing.assert_array_equal(encoded.packed, rtn.packed)
        np.testing.assert_allclose(encoded.scales, rtn.scales, rtol=1e-6)


def test_awq_keeps_round_to_nearest_when_scaling_does_not_help():
    rows = np.random.default_rng(0).standard_normal((256, 32)).astype(np.float32)  # every channel alike
    weight = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    factors = awq_factors(rows, [weight], 4, 16, True)
    if factors is not None:  # a scaling may still win on the rows; it must then really be better
        exact = rows @ weight
        plain = quantize_blocks(weight, 4, 16, True)
        scaled = quantize_blocks(weight * factors[:, None], 4, 16, True)
        plain_error = np.sum((rows @ dequantize_blocks(plain.packed, plain.scales, 32, 16, 4, 16) - exact) ** 2)
        scaled_error = np.sum(((rows / factors) @ dequantize_blocks(scaled.packed, scaled.scales, 32, 16, 4, 16) - exact) ** 2)
        assert scaled_error < plain_error


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipping_search_never_loses_to_round_to_nearest_on_its_rows(symmetric):
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((64, 24)).astype(np.float32)
    weight[rng.integers(0, 64, 10), rng.integers(0, 24, 10)] *= 6  # a few outliers stretch their blocks
    rows = rng.standard_normal((128, 64)).astype(np.float32)
    exact = rows @ weight

    def error(encoded):
        return float(np.sum((rows @ dequantize_blocks(encoded.packed, encoded.scales, 64, 24, 4, 16, encoded.zero_points) - exact) ** 2))

    clipped, plain = clipped_blocks(weight, rows, 4, 16, symmetric), quantize_blocks(weight, 4, 16, symmetric)
    assert error(clipped) < 0.97 * error(plain)
    assert np.all(np.abs(clipped.scales) <= np.abs(plain.scales) + 1e-7)  # ranges only shrink


@pytest.mark.parametrize("head, bits", [("float", None), ("int8", 8), ("same", 4)])
def test_head_option_chooses_the_type_of_the_matmul_that_makes_a_graph_output(head, bits):
    out = _quantize(_mlp_graph(), f"head={head}")
    down = next(n for n in out.nodes if n.output.name == "y")
    if bits is None:
        assert down.op_type == "MatMul" and out.report.records[-1].stats["kept_float"] == 1
    else:
        assert down.op_type == "MatMulNBits" and down.attrs["bits"] == bits


def test_calibrated_methods_say_they_need_calibration_data():
    with pytest.raises(GraphoptError, match=r"pass 'quantize' with method=gptq needs calibration data"):
        _quantize(_mlp_graph(), "method=gptq")


def test_gptq_warns_when_the_calibration_gives_fewer_vectors_than_input_channels(caplog):
    graph = _mlp_graph()
    with caplog.at_level("WARNING", logger="graphopt"):
        _quantize(graph, "method=gptq", _samples(1, seed=1))  # 16 vectors for 64 and 96 channels
    assert "gives 16 activation vectors" in caplog.text and "for 96 input channels" in caplog.text and "at least 96 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="graphopt"):
        _quantize(graph, "method=gptq", _samples(8, seed=1))  # 128 vectors
    assert "rank-deficient" not in caplog.text
