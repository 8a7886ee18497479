"""smooth-quant: lossless in float, absorbed by norms where it can be, idempotent, helps int8."""

import numpy as np
import pytest
from quant_testing import block_graph, calibration, cosine, mlp_graph, residual_graph

import graphopt
from graphopt import PassContext
from graphopt.check import max_abs_error, run_graph, sample_inputs
from graphopt.passes.quantize import QuantizationError
from graphopt.passes.smooth_quant import SmoothQuant


def _smoothed(graph, pipeline="smooth-quant", data=None):
    out = graphopt.optimize(graph.clone(), pipeline, verify=True, calibration_data=data or calibration(graph))
    return out, out.report.records[0].stats


def test_factors_are_absorbed_by_the_norm_and_outputs_do_not_change():
    graph = block_graph(outlier=30.0)
    out, stats = _smoothed(graph)
    assert stats == {"smoothed": 2, "absorbed": 1, "mul_inserted": 1}  # norm output; Relu output needs a Mul
    assert out.op_counts()["Mul"] == 1
    feeds = sample_inputs(graph)
    assert max_abs_error(run_graph(graph, feeds), run_graph(out, feeds)) <= 1e-4
    gamma = out.nodes[0].inputs[1].const.numpy()
    assert gamma[3] < 30.0 / 2  # the outlier channel moved into the weights
    # the activation range is now balanced against the weights: s_j = sqrt(a_j / w_j)
    weights = np.maximum(np.abs(graph.constants["wq"].const.numpy()).max(1), np.abs(graph.constants["wk"].const.numpy()).max(1))
    new_weights = np.maximum(np.abs(out.nodes[1].inputs[1].const.numpy()).max(1), np.abs(out.nodes[2].inputs[1].const.numpy()).max(1))
    factors = new_weights / weights
    np.testing.assert_allclose(gamma, graph.constants["ln_scale"].const.numpy() / factors, rtol=1e-5)


def test_a_norm_with_another_reader_gets_a_mul_and_stays_lossless():
    graph = residual_graph()
    out, stats = _smoothed(graph)
    assert stats == {"smoothed": 1, "absorbed": 0, "mul_inserted": 1}
    assert out.constants["ln_scale"].const.numpy()[5] == 20.0
    feeds = sample_inputs(graph)
    assert max_abs_error(run_graph(graph, feeds), run_graph(out, feeds)) <= 1e-4


@pytest.mark.parametrize("make", [block_graph, residual_graph])
def test_smoothing_twice_changes_nothing(make):
    graph = make()
    data = calibration(graph)
    once, _ = _smoothed(graph, data=data)
    twice, stats = _smoothed(once, data=data)
    assert stats["smoothed"] == 0
    assert str(twice) == str(once)


def test_smoothing_makes_int8_more_faithful_on_an_outlier_channel():
    graph = residual_graph()
    data = calibration(graph, 16)
    feeds = sample_inputs(graph)
    expected = run_graph(graph, feeds)[0]
    plain, _ = _smoothed(graph, "quantize{smooth=false}", data)
    smooth, _ = _smoothed(graph, "smooth-quant,quantize", data)
    assert graph.op_counts()["MatMul"] == 1
    plain_error = np.abs(run_graph(plain, feeds)[0] - expected).max()
    smooth_error = np.abs(run_graph(smooth, feeds)[0] - expected).max()
    assert smooth_error < plain_error
    assert cosine(run_graph(smooth, feeds, engine="torch")[0], expected) > 0.999


def test_smooth_quant_without_calibration_data_names_the_pass():
    with pytest.raises(QuantizationError, match="^pass 'smooth-quant' needs calibration data"):
        SmoothQuant().run(block_graph(), PassContext())


def test_alpha_out_of_range_is_rejected():
    with pytest.raises(graphopt.PipelineError, match=r"alpha must be in \[0, 1\], got 1.5"):
        graphopt.optimize(block_graph(), "smooth-quant{alpha=1.5}")


@pytest.mark.parametrize("alpha", ["auto", "per-layer"])
def test_searched_alpha_is_lossless_and_recorded_so_a_second_run_keeps_it(tmp_path, alpha):
    graph = residual_graph()
    data = calibration(graph, 16)
    once, stats = _smoothed(graph, f"smooth-quant{{alpha={alpha}}}", data)
    assert stats["smoothed"] == 1 and stats["alpha"] in ("per-layer", 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    feeds = sample_inputs(graph)
    expected = run_graph(graph, feeds)[0]
    assert max_abs_error([expected], run_graph(once, feeds)) <= 1e-4
    path = tmp_path / "smoothed.onnx"
    once.save_onnx(path)
    again = graphopt.optimize(str(path), f"smooth-quant{{alpha={alpha}}},quantize", calibration_data=data)
    records = again.report.records
    assert records[0].stats == {"smoothed": 0, "alpha": str(stats["alpha"])}
    plain, _ = _smoothed(graph, "quantize{smooth=false}", data)
    searched_error = np.abs(run_graph(again, feeds)[0] - expected).max()
    assert searched_error < np.abs(run_graph(plain, feeds)[0] - expected).max()


def test_gelu_outputs_false_leaves_the_down_projection_input_unsmoothed():
    graph = mlp_graph()
    data = calibration(graph)
    every, stats = _smoothed(graph, "smooth-quant{alpha=0.8}", data)
    assert stats == {"smoothed": 2, "absorbed": 0, "mul_inserted": 2}
    out, stats = _smoothed(graph, "smooth-quant{alpha=0.8,gelu_outputs=false}", data)
    assert stats == {"smoothed": 1, "absorbed": 0, "mul_inserted": 1}
    gelu = next(n for n in out.nodes if n.op_type == "Gelu")
    (down,) = [u.node for u in gelu.output.uses()]
    assert down.op_type == "MatMul" and down.inputs[1].name == "w2"  # its weight as it was
    feeds = sample_inputs(graph)
    assert max_abs_error(run_graph(graph, feeds), run_graph(out, feeds)) <= 1e-4


def test_attention_outputs_are_absorbed_by_the_value_projection(zoo, zoo_onnx):
    from conftest import numpy_inputs

    graph = graphopt.optimize(graphopt.from_onnx(zoo_onnx("bert")), "fuse")
    feeds = numpy_inputs(zoo("bert"))
    samples = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(2)]
    out, stats = _smoothed(graph, "smooth-quant{alpha=0.8}", samples)
    attentions = [n for n in out.nodes if n.qualified_op == "graphopt::Attention"]
    assert len(attentions) >= 2 and stats["absorbed"] == len(attentions)
    assert stats["mul_inserted"] == stats["smoothed"] - len(attentions)
    for attention in attentions:  # Attention -> Transpose -> Reshape -> the output projection, no Mul
        (merge,) = [u.node for u in attention.output.uses()[0].node.output.uses()]
        assert [u.node.op_type for u in merge.output.uses()] == ["MatMul"]
    expected, got = run_graph(graph, feeds), run_graph(out, feeds)
    assert max_abs_error(expected, got) <= 1e-4 * max(float(np.abs(e).max()) for e in expected)
