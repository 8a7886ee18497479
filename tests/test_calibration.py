"""Calibration data: validation, .npz loading, statistics and ranges, the API and CLI paths."""

import numpy as np
import pytest
import torch
from quant_testing import block_graph, calibration

import graphopt
from graphopt.calibration import (
    CalibrationError, TensorStats, calibrated_range, collect_statistics, load_npz, normalize_calibration,
)
from graphopt.cli import main


def test_dicts_of_numpy_or_torch_and_tuples_are_accepted():
    graph = block_graph()
    array = np.ones((2, 4, 16), np.float32)
    samples = normalize_calibration(graph, [{"x": array}, {"x": torch.zeros(2, 4, 16)}, (array,), [np.ones((4, 16), np.float32)]])
    assert [s["x"].shape for s in samples] == [(2, 4, 16), (2, 4, 16), (2, 4, 16), (1, 4, 16)]
    assert all(isinstance(s["x"], np.ndarray) for s in samples)


@pytest.mark.parametrize("data, message", [
    ([{"y": np.ones((1, 4, 16), np.float32)}], "calibration sample 0: unknown input(s) y (graph inputs: x)"),
    ([{}], "calibration sample 0: missing input(s) x"),
    ([(np.ones((1, 4, 16), np.float32), np.ones(1))], "calibration sample 0: 2 arrays given, the graph has 1 inputs (x)"),
    ([{"x": np.ones((1, 4, 16), np.float64)}], "calibration sample 0, input 'x': dtype float64 given, the graph expects float32"),
    ([{"x": np.ones((1, 1, 4, 16), np.float32)}], "calibration sample 0, input 'x': rank 4 given, the graph expects rank 3 f32[batch, 4, 16]"),
    ([{"x": np.ones((1, 5, 16), np.float32)}], "calibration sample 0, input 'x': shape [1, 5, 16] given, the graph expects f32[batch, 4, 16] (axis 1)"),
    ([], "calibration data is empty"),
    ({"x": np.ones((1, 4, 16))}, "calibration data must be an iterable of samples (dicts or tuples), got dict"),
    ([3], "calibration sample 0: expected a dict or a tuple, got int"),
])
def test_bad_calibration_data_is_reported_exactly(data, message):
    with pytest.raises(CalibrationError) as info:
        normalize_calibration(block_graph(), data)
    assert str(info.value) == message


def test_npz_first_axis_is_samples(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.arange(3 * 4 * 16, dtype=np.float32).reshape(3, 4, 16))
    samples = normalize_calibration(block_graph(), load_npz(path))
    assert len(samples) == 3 and samples[1]["x"].shape == (1, 4, 16) and samples[1]["x"][0, 0, 0] == 64
    np.savez(path, a=np.ones((3, 2)), b=np.ones((2, 2)))
    with pytest.raises(CalibrationError, match=r"every array needs the same number of samples on its first axis \(a: 3, b: 2\)"):
        load_npz(path)


def test_statistics_match_numpy_and_are_deterministic():
    graph = block_graph()
    data = calibration(graph)
    stats = collect_statistics(graph, data, ["x", "k"], histogram=True)
    stacked = np.concatenate([d["x"] for d in data])
    assert stats["x"].min == pytest.approx(float(stacked.min())) and stats["x"].max == pytest.approx(float(stacked.max()))
    np.testing.assert_allclose(stats["x"].channel_absmax, np.abs(stacked).reshape(-1, 16).max(0))
    assert stats["x"].histogram.sum() == stacked.size
    again = collect_statistics(graph, data, ["x", "k"], histogram=True)
    for name in stats:
        assert (again[name].min, again[name].max) == (stats[name].min, stats[name].max)
        np.testing.assert_array_equal(again[name].histogram, stats[name].histogram)


def test_ranges_clip_outliers_except_minmax():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(100_000), [50.0]]).astype(np.float32)
    counts, _ = np.histogram(np.abs(values), bins=2048, range=(0, 50.0))
    stats = TensorStats(float(values.min()), 50.0, np.array([50.0], np.float32), counts)
    assert calibrated_range(stats, "minmax") == (float(values.min()), 50.0)
    for method in ("percentile", "entropy"):
        low, high = calibrated_range(stats, method)
        assert 2.0 < high < 10.0 and low == max(float(values.min()), -high), method
    # mse weighs the one outlier's squared clipping error against 100k rounding errors:
    # it clips less, but still below the maximum
    assert 10.0 < calibrated_range(stats, "mse")[1] < 50.0
    with pytest.raises(CalibrationError, match="unknown calibration method 'best'"):
        calibrated_range(stats, "best")


def test_optimize_passes_calibration_data_to_the_passes():
    graph = block_graph()
    out = graphopt.optimize(graph, "quantize", calibration_data=[(d["x"],) for d in calibration(graph)])
    assert out.report.records[0].stats["quantized"] == 3


def test_cli_reads_calibration_npz(tmp_path, capsys):
    model, output, data = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz"
    graph = block_graph()
    graph.save_onnx(model)
    np.savez(data, x=np.concatenate([d["x"][:1] for d in calibration(graph)]))
    assert main(["optimize", str(model), "-o", str(output), "-p", "quantize", "--calibration-data", str(data), "-q"]) == 0
    assert graphopt.from_onnx(output).op_counts()["QuantizeLinear"] == 2
    np.savez(data, y=np.ones((2, 4, 16), np.float32))
    assert main(["optimize", str(model), "-o", str(output), "-p", "quantize", "--calibration-data", str(data), "-q"]) == 2
    assert "calibration sample 0: unknown input(s) y (graph inputs: x)" in capsys.readouterr().err


def test_values_are_fetched_in_groups_under_the_memory_cap():
    from graphopt.calibration import collect_statistics, value_groups
    from graphopt.ir.dtypes import DType
    from graphopt.ir.graph import Graph
    from graphopt.ir.types import TensorType

    graph = Graph("chain", opset_imports={"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 256)))
    names = []
    value = x
    for _ in range(4):
        value = graph.add_node("Relu", [value]).output
        names.append(value.name)
    graph.set_outputs([value])
    samples = [{"x": np.linspace(-1, 1, 2 * 256, dtype=np.float32).reshape(2, 256)}]
    groups = value_groups(graph, samples, names, cap=2 * 2 * 256 * 4)
    assert groups == [names[:2], names[2:]]
    assert value_groups(graph, samples, names) == [names]
    stats = collect_statistics(graph, samples, names)
    assert all(stats[n].max == 1.0 and stats[n].min == 0.0 for n in names)
