"""prune-ffn: narrower feed-forward blocks (plain and gated), exactly lossless on dead neurons."""

import numpy as np
import pytest

import graphopt
from graphopt import PassContext
from graphopt.check import max_abs_error, run_graph, sample_inputs
from graphopt.passes._structured import CompressionError, bias_slot, constant_weight, count_params, replace_vector
from graphopt.passes._taylor import LABEL_FREE_DRAWS, label_free_noise
from graphopt.passes.prune_ffn import PruneFFN, _taylor, find_blocks


@pytest.fixture(scope="module")
def graphs(zoo_onnx):
    cache = {}

    def get(model: str):
        if model not in cache:
            cache[model] = graphopt.optimize(str(zoo_onnx(model)), "fuse")
        return cache[model].clone()

    return get


def _kill(graph, neurons: dict[int, list[int]]) -> None:
    """Zero the down-projection rows of the given neurons: they contribute nothing."""
    blocks = find_blocks(graph)
    for index, chosen in neurons.items():
        weight = constant_weight(blocks[index].down).copy()
        weight[chosen] = 0
        replace_vector(graph, blocks[index].down, 1, weight)


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_half_the_neurons_go_from_every_matmul(graphs, model):
    graph = graphs(model)
    feeds = sample_inputs(graph)
    blocks = find_blocks(graph)
    assert len(blocks) == 2 and all(b.width == 64 for b in blocks)
    gated = model == "llama"
    assert [len(b.sources) for b in blocks] == [2 if gated else 1] * 2
    hidden = constant_weight(blocks[0].down).shape[1]
    biases = sum(
        add.inputs[bias_slot(add)].const.size
        for b in blocks for c in b.sources for add in (c.bias_add, c.fused_bias_add) if add is not None
    )
    before = count_params(graph)
    result = PruneFFN(ratio=0.5).run(graph, PassContext())
    graph.verify()
    assert result.stats["neurons"] == "128 -> 64"
    for block in find_blocks(graph):
        assert block.width == 32
        assert constant_weight(block.down).shape == (32, hidden)
        assert all(c.width == 32 for c in block.sources)
    per_neuron = (2 if gated else 1) * hidden + hidden
    removed = before - count_params(graph)
    assert removed - biases // 2 - 32 * sum(len(b.vectors) for b in blocks) == 64 * per_neuron
    assert max_abs_error(run_graph(graph, feeds), run_graph(graph, feeds, engine="torch")) < 1e-4


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_dead_neurons_are_pruned_exactly(graphs, model):
    graph = graphs(model)
    dead = {0: [1, 5, 9, 33], 1: [0, 2, 63, 40]}
    _kill(graph, dead)
    feeds = sample_inputs(graph)
    expected = run_graph(graph, feeds)
    PruneFFN(ratio=4 / 64).run(graph, PassContext())
    graph.verify()
    assert [b.width for b in find_blocks(graph)] == [60, 60]
    assert max_abs_error(expected, run_graph(graph, feeds)) < 1e-5
    assert max_abs_error(expected, run_graph(graph, feeds, engine="torch")) < 1e-4


def _biased_mlp() -> graphopt.Graph:
    """x -> MatMul + bias -> Relu -> Mul by a per-neuron scale -> MatMul + bias."""
    rng = np.random.default_rng(0)
    graph = graphopt.Graph("mlp", {"": 17})
    x = graph.add_input("x", graphopt.TensorType(graphopt.DType.FLOAT, ("b", 8)))
    h = graph.add_node("MatMul", [x, graph.add_constant("w1", rng.standard_normal((8, 16)).astype(np.float32))]).output
    h = graph.add_node("Add", [h, graph.add_constant("b1", rng.standard_normal(16).astype(np.float32))]).output
    h = graph.add_node("Relu", [h]).output
    h = graph.add_node("Mul", [h, graph.add_constant("scale", rng.standard_normal(16).astype(np.float32))]).output
    w2 = rng.standard_normal((16, 8)).astype(np.float32)
    w2[[2, 7, 11]] = 0
    y = graph.add_node("MatMul", [h, graph.add_constant("w2", w2)]).output
    graph.set_outputs([graph.add_node("Add", [y, graph.add_constant("b2", np.ones(8, np.float32))], output_names=["y"]).output])
    return graph


def test_biases_and_per_neuron_constants_are_sliced_too():
    graph = _biased_mlp()
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)}
    expected = run_graph(graph, feeds)
    result = PruneFFN(ratio=3 / 16).run(graph, PassContext())
    graph.verify()
    assert result.stats == {"blocks": 1, "neurons": "16 -> 13", "params": f"{8 * 16 + 16 + 16 + 16 * 8 + 8} -> {8 * 13 + 13 + 13 + 13 * 8 + 8}",
                            "score": "magnitude", "compensate": False}
    assert {v.name.split("_")[0]: v.shape for v in graph.constants.values()} == {"w1": (8, 13), "b1": (13,), "scale": (13,), "w2": (13, 8), "b2": (8,)}
    assert max_abs_error(expected, run_graph(graph, feeds)) < 1e-5


def test_explicit_neurons_and_bad_indices(graphs):
    graph = graphs("bert")
    PruneFFN(neurons={1: [3, 4]}).run(graph, PassContext())
    assert [b.width for b in find_blocks(graph)] == [64, 62]
    with pytest.raises(CompressionError, match=r"^pass 'prune-ffn': option 'neurons' names block\(s\) \[7\]; the graph has 2 feed-forward blocks$"):
        PruneFFN(neurons={7: [0]}).run(graphs("bert"), PassContext())


def test_compensation_reduces_the_error_on_calibration_data(graphs):
    original = graphs("bert")
    samples = [sample_inputs(original, seed=s) for s in range(4)]
    ctx = PassContext(calibration=samples)
    expected = [run_graph(original, s) for s in samples]
    errors = {}
    for compensate in (False, True):
        graph = original.clone()
        PruneFFN(ratio=0.5, score="activation", compensate=compensate).run(graph, ctx)
        graph.verify()
        errors[compensate] = float(np.mean([np.mean((e[0] - run_graph(graph, s)[0]) ** 2) for e, s in zip(expected, samples)]))
    assert errors[True] < 0.8 * errors[False]
    with pytest.raises(CompressionError, match=r"^pass 'prune-ffn': compensate=true needs calibration data"):
        PruneFFN(compensate=True).run(original.clone(), PassContext())


@pytest.mark.parametrize("options, calibrated, resolved", [
    ({}, True, ("activation", True)),
    ({}, False, ("magnitude", False)),
    ({"score": "magnitude"}, True, ("magnitude", True)),  # magnitude+compensate measured better than magnitude (module doc)
    ({"compensate": False}, True, ("activation", False)),
    ({"score": "taylor"}, True, ("taylor", True)),
])
def test_auto_options_mean_the_best_measured_setting_and_explicit_ones_are_kept(graphs, caplog, options, calibrated, resolved):
    graph = graphs("bert")
    chosen = PruneFFN(**options).resolved(PassContext(calibration=[sample_inputs(graph)] if calibrated else None))
    assert (chosen.score, chosen.compensate) == resolved
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == (not calibrated and "score" not in options)
    if warned:
        assert "score=activation,compensate=true" in warned[0] and "needs calibration data" in warned[0]


def test_global_scope_meets_the_overall_ratio(graphs):
    graph = graphs("bert")
    ctx = PassContext(calibration=[sample_inputs(graph, seed=s) for s in range(2)])
    result = PruneFFN(ratio=0.5, score="activation", scope="global").run(graph, ctx)
    graph.verify()
    assert result.stats["neurons"] == "128 -> 64"
    assert sum(b.width for b in find_blocks(graph)) == 64
    with pytest.raises(graphopt.PipelineError, match="scope=global needs score=activation"):
        graphopt.optimize(graph, "prune-ffn{scope=global,score=magnitude}")
    with pytest.raises(CompressionError, match=r"^pass 'prune-ffn': scope=global needs score=activation or score=taylor, which need calibration data: graphopt.optimize"):
        graphopt.optimize(graph, "prune-ffn{scope=global}")  # score=auto is magnitude without data


@pytest.mark.parametrize("labelled", [False, True], ids=["label-free", "float targets"])
def test_taylor_scores_are_the_gate_gradient_formula(labelled):
    graph = _biased_mlp()
    weights = {v.name: v.const.numpy().astype(np.float64) for v in graph.constants.values()}
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((5, 8)).astype(np.float32)} for _ in range(3)]
    slopes = []
    for index, sample in enumerate(samples):
        hidden = np.maximum(sample["x"] @ weights["w1"] + weights["b1"], 0) * weights["scale"]
        y = hidden @ weights["w2"] + weights["b2"]
        if labelled:
            sample["labels"] = rng.standard_normal((5, 8)).astype(np.float32)
            upstream = (y - sample["labels"])[None]
        else:
            upstream = -label_free_noise(y.shape, 0, index)
        slopes.extend(((u @ weights["w2"].T) * hidden).sum(0) for u in upstream)
    slopes = np.array(slopes)
    assert len(slopes) == len(samples) * (1 if labelled else LABEL_FREE_DRAWS)
    expected = np.abs(slopes).mean(0)
    [scores] = _taylor(graph, PassContext(calibration=samples), find_blocks(graph))
    np.testing.assert_allclose(scores, expected / np.linalg.norm(expected), rtol=1e-4, atol=1e-6)
    assert np.all(scores[[2, 7, 11]] == 0)
    result = PruneFFN(ratio=3 / 16, score="taylor").run(graph, PassContext(calibration=samples))
    assert result.stats["neurons"] == "16 -> 13"
    assert {v.name.split("_")[0]: v.shape for v in graph.constants.values()}["w2"] == (13, 8)


@pytest.mark.parametrize("model, scope", [("bert", "per-block"), ("llama", "global")])
def test_taylor_prunes_dead_neurons_first_exactly(graphs, model, scope):
    graph = graphs(model)
    dead = {0: [1, 5, 9, 33], 1: [0, 2, 63, 40]}
    _kill(graph, dead)
    samples = [sample_inputs(graph, seed=s) for s in range(2)]
    ctx = PassContext(calibration=samples)
    scores = _taylor(graph, ctx, find_blocks(graph))
    assert [np.flatnonzero(s == 0).tolist() for s in scores] == [sorted(d) for d in dead.values()]
    expected = run_graph(graph, samples[0])
    result = PruneFFN(ratio=4 / 64, score="taylor", scope=scope).run(graph, ctx)
    graph.verify()
    assert result.stats["neurons"] == "128 -> 120"
    assert [b.width for b in find_blocks(graph)] == [60, 60]
    assert max_abs_error(expected, run_graph(graph, samples[0])) < 1e-5
    assert max_abs_error(expected, run_graph(graph, samples[0], engine="torch")) < 1e-4


def test_taylor_score_needs_calibration(graphs):
    with pytest.raises(CompressionError, match=r"^pass 'prune-ffn': score=taylor needs calibration data: graphopt.optimize"):
        PruneFFN(score="taylor", scope="global").run(graphs("bert"), PassContext())
