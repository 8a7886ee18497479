"""low-rank: W ~ A.B only where it saves, lossless at the weight's exact rank, activation-aware on data."""

import numpy as np
import pytest

import graphopt
from graphopt import DType, Graph, PassContext, TensorType
from graphopt.check import max_abs_error, run_graph, sample_inputs
from graphopt.passes._structured import CompressionError, constant_weight, count_params
from graphopt.passes.low_rank import LowRank


def _mlp(ranks=(8, 6)) -> Graph:
    """x [b, s, 64] -> MatMul [64, 48] (exact rank ranks[0]) -> Relu -> MatMul [48, 64] (rank ranks[1])."""
    rng = np.random.default_rng(0)
    graph = Graph("mlp", {"": 17})
    h = graph.add_input("x", TensorType(DType.FLOAT, ("b", "s", 64)))
    for i, ((m, n), r) in enumerate(zip(((64, 48), (48, 64)), ranks)):
        weight = (rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r * m)).astype(np.float32)
        h = graph.add_node("MatMul", [h, graph.add_constant(f"w{i}", weight)]).output
        if i == 0:
            h = graph.add_node("Relu", [h]).output
    graph.set_outputs([graph.add_node("Identity", [h], output_names=["y"]).output])
    return graph


FEEDS = {"x": np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float32)}


def test_exact_rank_factorization_is_lossless():
    graph = _mlp()
    expected = run_graph(graph, FEEDS)
    result = LowRank(energy=1.0, min_size=1).run(graph, PassContext())
    graph.verify()
    assert result.stats["factorized"] == 2
    assert sorted(result.stats["ranks"].values()) == ["48x64:r6", "64x48:r8"]
    assert graph.op_counts()["MatMul"] == 4
    assert count_params(graph) == 8 * (64 + 48) + 6 * (48 + 64)
    assert max_abs_error(expected, run_graph(graph, FEEDS)) < 1e-5
    assert max_abs_error(expected, run_graph(graph, FEEDS, engine="torch")) < 1e-5


def test_a_rank_that_saves_nothing_leaves_the_weight_dense():
    graph = _mlp()
    before = str(graph)
    # 64 * 48 = 3072 elements; rank 28 costs 28 * 112 = 3136: no saving
    result = LowRank(rank=28, min_size=1).run(graph, PassContext())
    assert not result.changed and result.stats["factorized"] == 0
    assert str(graph) == before
    result = LowRank(rank=27, min_size=1).run(graph, PassContext())
    assert result.stats["factorized"] == 2


def test_global_budget_reaches_the_ratio(zoo_onnx):
    graph = graphopt.optimize(str(zoo_onnx("bert")), "fuse")
    feeds = sample_inputs(graph)
    weights = sum(constant_weight(n).size for n in graph if constant_weight(n) is not None and constant_weight(n).size >= 1024)
    before = count_params(graph)
    result = LowRank(ratio=0.25, min_size=1024).run(graph, PassContext())
    graph.verify()
    assert result.stats["factorized"] > 0
    saved = before - count_params(graph)
    assert 0.24 * weights <= saved <= 0.30 * weights
    assert max_abs_error(run_graph(graph, feeds), run_graph(graph, feeds, engine="torch")) < 1e-4


def test_activation_aware_factors_fit_the_data_better():
    graph = _mlp(ranks=(40, 40))
    rng = np.random.default_rng(2)
    # inputs concentrated in a few directions: plain SVD ignores this, whitening uses it
    basis = rng.standard_normal((6, 64)).astype(np.float32)
    samples = [{"x": (rng.standard_normal((1, 32, 6)).astype(np.float32) @ basis + 0.01 * rng.standard_normal((1, 32, 64)).astype(np.float32))} for _ in range(4)]
    expected = [run_graph(graph, s)[0] for s in samples]
    errors = {}
    for aware in (False, True):
        trial = graph.clone()
        LowRank(rank=6, activation_aware=aware, min_size=1).run(trial, PassContext(calibration=samples))
        trial.verify()
        errors[aware] = float(np.mean([np.mean((e - run_graph(trial, s)[0]) ** 2) for e, s in zip(expected, samples)]))
    assert errors[True] < 0.5 * errors[False]


def test_options_are_checked():
    with pytest.raises(CompressionError, match=r"^pass 'low-rank': give one of the options rank, energy or ratio$"):
        LowRank().run(_mlp(), PassContext())
    with pytest.raises(graphopt.PipelineError, match="give one of rank, energy, ratio, not rank and ratio"):
        graphopt.optimize(_mlp(), "low-rank{rank=4,ratio=0.5}")
    with pytest.raises(CompressionError, match=r"^pass 'low-rank': activation_aware=true needs calibration data"):
        LowRank(rank=4, activation_aware=True, min_size=1).run(_mlp(), PassContext())


@pytest.mark.parametrize("aware, calibrated, resolved, warns", [
    ("auto", True, True, False),
    ("auto", False, False, True),
    (False, True, False, False),
    (False, False, False, False),
])
def test_activation_aware_is_the_default_with_calibration_data(caplog, aware, calibrated, resolved, warns):
    graph = _mlp()
    ctx = PassContext(calibration=[sample_inputs(graph)] if calibrated else None)
    result = LowRank(rank=4, activation_aware=aware, min_size=1).run(graph, ctx)
    assert result.stats["activation_aware"] is resolved
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == warns
    if warns:
        assert "activation_aware=true" in warned[0] and "needs calibration data" in warned[0]
