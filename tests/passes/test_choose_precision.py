"""choose-precision: per-matmul precision from measured latency and calibrated sensitivity.

Latencies are measured, so which matmul gets which type may vary between runs; the tests
assert what holds whatever the timings: the fidelity bound, the path's ends, the explored
table and that the graph runs on the target within the bound."""

import numpy as np
import pytest
from quant_testing import cosine

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import run_graph
from graphopt.errors import GraphoptError
from graphopt.passes.choose_precision import PRECISIONS, _bf16, _path, apply_precisions


def _ffn_graph(seed: int = 0) -> Graph:
    """x [batch, 64, 128] -> up [128, 512] -> Relu -> down [512, 128] -> + x -> LayerNorm = y."""
    rng = np.random.default_rng(seed)
    graph = Graph("ffn", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 64, 128)))
    up = graph.add_node("MatMul", [x, graph.add_constant("w_up", (rng.standard_normal((128, 512)) / 11).astype(np.float32))], name="up").output
    hidden = graph.add_node("Relu", [up]).output
    down = graph.add_node("MatMul", [hidden, graph.add_constant("w_down", (rng.standard_normal((512, 128)) / 16).astype(np.float32))], name="down").output
    total = graph.add_node("Add", [down, x]).output
    norm = graph.add_node("LayerNormalization", [total, graph.add_constant("g", np.ones(128, np.float32)), graph.add_constant("b", np.zeros(128, np.float32))],
                          {"axis": -1}, output_names=["y"]).output
    graph.set_outputs([norm])
    return graph


def _samples(count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((1, 64, 128)).astype(np.float32)} for _ in range(count)]


def _choose(graph: Graph, options: str) -> tuple[Graph, dict]:
    out = graphopt.optimize(graph.clone(), f"choose-precision{{{options}}}", calibration_data=_samples(), verify=True)
    return out, out.report.records[-1].stats


@pytest.mark.parametrize("target", ["onnxruntime:cpu{threads=1}", "torch"])
def test_the_chosen_graph_keeps_the_fidelity_bound_on_its_target(target):
    graph = _ffn_graph()
    out, stats = _choose(graph, f"fidelity=0.999,target={target}")
    assert sum(stats[p] for p in PRECISIONS) == 2
    assert stats["fidelity"] >= 0.999
    table = stats["pareto"]
    assert table[0].counts == {"fp32": 2} and table[0].fidelity == 1.0
    assert [p.chosen for p in table].count(True) == 1
    assert all(a.predicted_ms >= b.predicted_ms for a, b in zip(table, table[1:]))  # each step is faster
    feeds = _samples(1)[0]
    compiled = graphopt.compile(out, target=target, pipeline="eliminate-dead-code")
    assert cosine(run_graph(graph, feeds)[0], np.asarray(compiled(feeds["x"])[0])) >= 0.999
    assert "| step | fp32 | bf16 | int8 | int4 |" in table.markdown()


def test_fidelity_one_keeps_every_matmul_float_and_changes_nothing():
    graph = _ffn_graph()
    out, stats = _choose(graph, "fidelity=1.0,target=onnxruntime:cpu{threads=1}")
    assert stats["fp32"] == 2 and out.op_counts()["MatMul"] == 2
    assert not out.report.records[-1].changed


def test_fidelity_zero_takes_the_fastest_measured_type_of_every_matmul():
    graph = _ffn_graph()
    out, stats = _choose(graph, "fidelity=0.0,target=onnxruntime:cpu{threads=1},precisions=['fp32','int8','int4']")
    assert stats["pareto"][-1].chosen  # the path's last point: every matmul at its fastest type
    assert "bf16" not in stats  # not among the precisions asked for
    counts = out.op_counts()
    assert counts.get("MatMul", 0) == stats["fp32"]
    assert counts.get("com.microsoft::MatMulNBits", 0) == stats["int4"] and counts.get("MatMulInteger", 0) == stats["int8"]


def test_onnxruntime_cpu_never_gets_bf16_matmuls():
    """ONNX Runtime's CPU kernels have no bfloat16 MatMul: the target refuses it when measured."""
    _, stats = _choose(_ffn_graph(), "fidelity=0.0,target=onnxruntime:cpu{threads=1}")
    assert stats["bf16"] == 0


def test_path_moves_the_cheapest_error_per_millisecond_first():
    latency = {"a": {"fp32": 10.0, "int8": 4.0, "int4": 2.0}, "b": {"fp32": 10.0, "int4": 5.0}}
    errors = {"a": {"fp32": 0.0, "int8": 0.01, "int4": 0.05}, "b": {"fp32": 0.0, "int4": 0.001}}
    assert _path(latency, errors) == [
        {"a": "fp32", "b": "fp32"},
        {"a": "fp32", "b": "int4"},  # 0.001 / 5 ms
        {"a": "int8", "b": "int4"},  # 0.01 / 6 ms
        {"a": "int4", "b": "int4"},  # 0.04 / 2 ms
    ]


def test_apply_precisions_rewrites_each_matmul_to_its_type():
    graph = _ffn_graph()
    apply_precisions(graph, {"up": "bf16", "down": "int4"}, 32, 4)
    counts = graph.op_counts()
    assert counts["com.microsoft::MatMulNBits"] == 1 and counts["MatMul"] == 1
    up = next(n for n in graph.nodes if n.op_type == "MatMul")
    assert up.inputs[0].dtype == DType.BFLOAT16 and up.inputs[1].dtype == DType.BFLOAT16
    assert graph.outputs[0].dtype == DType.FLOAT
    feeds = _samples(1)[0]
    assert cosine(run_graph(_ffn_graph(), feeds)[0], run_graph(graph, feeds, engine="torch")[0]) >= 0.995


def test_bf16_rounding_matches_torch():
    import torch

    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(_bf16(values), expected)


def test_without_calibration_data_it_says_how_to_give_it():
    with pytest.raises(GraphoptError, match=r"pass 'choose-precision' needs calibration data"):
        graphopt.optimize(_ffn_graph(), "choose-precision")


@pytest.mark.parametrize("options, message", [
    ("fidelity=1.5", "fidelity is a cosine similarity in [0, 1], got 1.5"),
    ("precisions=['int8','int4']", "precisions must include fp32"),
    ("precisions=['fp32','fp8']", "precisions must include fp32 and come from fp32, bf16, int8, int4; got fp32, fp8"),
])
def test_bad_options_are_rejected(options, message):
    with pytest.raises(GraphoptError, match=message.replace("[", r"\[").replace("]", r"\]")):
        graphopt.optimize(_ffn_graph(), f"choose-precision{{{options}}}")
