"""prune-heads: physically smaller attention, exactly lossless on zero-importance heads, GQA groups kept whole."""

import numpy as np
import pytest

import graphopt
from graphopt import PassContext
from graphopt.calibration import GraphRunner
from graphopt.check import max_abs_error, run_graph, sample_inputs
from graphopt.passes._structured import CompressionError, bias_slot, constant_weight, count_params, replace_vector
from graphopt.passes._taylor import gate_gradients, label_free_noise
from graphopt.passes.prune_heads import PruneHeads, _taylor, find_layers

FORMS = {"fused-qkv": "fuse", "separate": "cleanup,fuse-attention"}


@pytest.fixture(scope="module")
def graphs(zoo_onnx):
    cache = {}

    def get(model: str, form: str = "fused-qkv"):
        if (model, form) not in cache:
            cache[model, form] = graphopt.optimize(str(zoo_onnx(model)), FORMS[form])
        return cache[model, form].clone()

    return get


def _zero_heads(graph, heads: dict[int, list[int]]) -> None:
    """Zero the Q/K/V columns (and biases) and output-projection rows of the given heads."""
    layers = find_layers(graph)[0]
    for index, chosen in heads.items():
        layer = layers[index]
        group = layer.heads // layer.kv_heads
        for inp, size, units in ((layer.q, layer.head_dim, chosen), (layer.k, layer.head_dim, sorted({h // group for h in chosen})), (layer.v, layer.v_dim, sorted({h // group for h in chosen}))):
            cols = np.concatenate([np.arange(h * size, (h + 1) * size) for h in units]) + inp.columns.offset
            weight = inp.columns.weight.copy()
            weight[:, cols] = 0
            replace_vector(graph, inp.columns.matmul, 1, weight)
            for add, shift in ((inp.columns.bias_add, -inp.columns.offset), (inp.columns.fused_bias_add, 0)):
                if add is not None:
                    slot = bias_slot(add)
                    bias = add.inputs[slot].const.numpy().copy()
                    bias[cols + shift] = 0
                    replace_vector(graph, add, slot, bias)
        rows = np.concatenate([np.arange(h * layer.v_dim, (h + 1) * layer.v_dim) for h in chosen])
        out = constant_weight(layer.out_proj).copy()
        out[rows] = 0
        replace_vector(graph, layer.out_proj, 1, out)


@pytest.mark.parametrize("form", FORMS)
def test_half_the_heads_go_with_their_weights(graphs, form):
    graph = graphs("bert", form)
    feeds = sample_inputs(graph)
    before = count_params(graph)
    hidden = 32
    biases = sum(
        add.inputs[bias_slot(add)].const.size
        for layer in find_layers(graph)[0] for inp in (layer.q, layer.k, layer.v)
        for add in (inp.columns.bias_add, inp.columns.fused_bias_add) if add is not None
    )
    result = PruneHeads(ratio=0.5).run(graph, PassContext())
    graph.verify()
    layers = find_layers(graph)[0]
    assert [(layer.heads, layer.kv_heads) for layer in layers] == [(2, 2), (2, 2)]
    assert result.stats["heads"] == "8 -> 4"
    for layer in layers:
        assert layer.q.columns.width == layer.k.columns.width == layer.v.columns.width == 2 * layer.head_dim
        assert constant_weight(layer.out_proj).shape == (2 * layer.v_dim, hidden)
    removed_heads, head_dim = 4, 8
    assert before - count_params(graph) == removed_heads * 4 * hidden * head_dim + biases // 2
    assert result.stats["params"] == f"{before} -> {count_params(graph)}"
    assert max_abs_error(run_graph(graph, feeds), run_graph(graph, feeds, engine="torch")) < 1e-4


@pytest.mark.parametrize("form", FORMS)
def test_zero_importance_heads_are_pruned_exactly(graphs, form):
    graph = graphs("bert", form)
    _zero_heads(graph, {0: [1], 1: [0, 3]})
    feeds = sample_inputs(graph)
    expected = run_graph(graph, feeds)
    result = PruneHeads(ratio=3 / 8).run(graph, PassContext())
    graph.verify()
    assert result.stats["removed"] == {0: [1], 1: [0, 3]}
    assert max_abs_error(expected, run_graph(graph, feeds)) < 1e-5
    assert max_abs_error(expected, run_graph(graph, feeds, engine="torch")) < 1e-4


def test_explicit_heads_per_layer(graphs):
    graph = graphs("bert")
    result = PruneHeads(heads={1: [2]}).run(graph, PassContext())
    assert result.stats["removed"] == {1: [2]}
    assert [layer.heads for layer in find_layers(graph)[0]] == [4, 3]


def test_grouped_query_attention_loses_whole_groups(graphs):
    graph = graphs("llama")
    layer = find_layers(graph)[0][0]
    assert (layer.heads, layer.kv_heads) == (4, 2)
    _zero_heads(graph, {0: [2, 3], 1: [0, 1]})
    feeds = sample_inputs(graph)
    expected = run_graph(graph, feeds)
    result = PruneHeads(ratio=0.5).run(graph, PassContext())
    graph.verify()
    assert result.stats["removed"] == {0: [2, 3], 1: [0, 1]}
    for layer in find_layers(graph)[0]:
        assert (layer.heads, layer.kv_heads) == (2, 1)
        assert layer.k.columns.width == layer.v.columns.width == layer.head_dim
        assert layer.q.columns.width == 2 * layer.head_dim
    assert max_abs_error(expected, run_graph(graph, feeds)) < 1e-5
    assert max_abs_error(expected, run_graph(graph, feeds, engine="torch")) < 1e-4


def test_a_group_listed_in_part_is_refused(graphs):
    with pytest.raises(CompressionError, match=r"^pass 'prune-heads': option 'heads' layer 0: grouped-query attention removes whole groups of 2 query heads; group\(s\) \[0\] are listed only in part$"):
        PruneHeads(heads={0: [1]}).run(graphs("llama"), PassContext())


def test_every_layer_keeps_a_head(graphs):
    with pytest.raises(CompressionError, match=r"^pass 'prune-heads': option 'heads' layer 0: at least one head must remain$"):
        PruneHeads(heads={0: [0, 1, 2, 3]}).run(graphs("bert"), PassContext())
    graph = graphs("bert")
    PruneHeads(ratio=0.9, scope="per-layer").run(graph, PassContext())
    assert [layer.heads for layer in find_layers(graph)[0]] == [1, 1]


def test_activation_score_needs_calibration(graphs):
    with pytest.raises(CompressionError, match=r"^pass 'prune-heads': score=activation needs calibration data"):
        PruneHeads(ratio=0.25, score="activation").run(graphs("bert"), PassContext())


@pytest.mark.parametrize("options, calibrated, resolved", [
    ({}, True, ("activation", True)),
    ({}, False, ("magnitude", False)),
    ({"score": "magnitude"}, True, ("magnitude", False)),  # magnitude+compensate measured worse (module doc)
    ({"score": "taylor"}, True, ("taylor", True)),
    ({"compensate": False}, True, ("activation", False)),
    ({"compensate": True}, False, ("magnitude", True)),  # then run() says compensate=true needs data
    ({"heads": {0: [1]}}, True, ("activation", True)),
])
def test_auto_options_mean_the_best_measured_setting_and_explicit_ones_are_kept(graphs, caplog, options, calibrated, resolved):
    graph = graphs("bert")
    ctx = PassContext(calibration=[sample_inputs(graph)] if calibrated else None)
    options = {"ratio": 0.25, **options} if "heads" not in options else options
    chosen = PruneHeads(**options).resolved(ctx)
    assert (chosen.score, chosen.compensate) == resolved
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == (not calibrated and "score" not in options)
    if warned:
        assert "score=activation,compensate=true" in warned[0] and "needs calibration data" in warned[0] and "--calibration-data" in warned[0]


def test_without_calibration_data_the_default_prunes_by_magnitude_and_reports_it(graphs, caplog):
    graph = graphs("bert")
    result = PruneHeads(ratio=0.25).run(graph, PassContext())
    assert (result.stats["score"], result.stats["compensate"]) == ("magnitude", False)
    assert result.stats["removed"] == PruneHeads(ratio=0.25, score="magnitude", compensate=False).run(graphs("bert"), PassContext()).stats["removed"]
    assert "prune-heads: no calibration data" in caplog.text


def test_compensation_reduces_the_error_on_calibration_data(graphs):
    original = graphs("bert")
    samples = [sample_inputs(original, seed=s) for s in range(4)]
    ctx = PassContext(calibration=samples)
    expected = [run_graph(original, s) for s in samples]
    errors = {}
    for compensate in (False, True):
        graph = original.clone()
        PruneHeads(ratio=0.25, score="activation", compensate=compensate).run(graph, ctx)
        graph.verify()
        errors[compensate] = float(np.mean([np.mean((e[0] - run_graph(graph, s)[0]) ** 2) for e, s in zip(expected, samples)]))
    assert errors[True] < 0.8 * errors[False]


def test_options_are_checked():
    with pytest.raises(graphopt.PipelineError, match="ratio must be in"):
        graphopt.optimize(graphopt.Graph("g"), "fuse,prune-heads{ratio=1.5}")


def test_pipeline_text_with_calibration_data(zoo_onnx):
    path = str(zoo_onnx("bert"))
    samples = [sample_inputs(graphopt.optimize(path, "cleanup"), seed=s) for s in range(2)]
    graph = graphopt.optimize(path, "fuse,prune-heads{ratio=0.25,score=activation,compensate=true}", calibration_data=samples, verify=True)
    record = next(r for r in graph.report.records if r.name == "prune-heads")
    assert record.stats["heads"] == "8 -> 6"
    with pytest.raises(graphopt.PipelineError, match="pass 'prune-heads' .* needs 'attention-fused'"):
        graphopt.optimize(path, "prune-heads{ratio=0.25}")


TAYLOR_CASES = {"bert, no labels": ("bert", None), "bert, float targets": ("bert", "float"), "llama (GQA), token labels": ("llama", "int")}


def _labelled(graph, kind, seed: int) -> dict:
    """Sample inputs, with `labels` for the first output: float targets, or class indices (one ignored)."""
    sample = sample_inputs(graph, seed=seed)
    shape = run_graph(graph, sample)[0].shape
    rng = np.random.default_rng(seed)
    if kind == "float":
        sample["labels"] = rng.standard_normal(shape).astype(np.float32)
    elif kind == "int":
        sample["labels"] = rng.integers(0, shape[-1], shape[:-1])
        sample["labels"][0, 0] = -100
    return sample


def _losses(y: np.ndarray, labels, index: int) -> np.ndarray:
    """score=taylor's documented losses of sample `index` (label-free: one per draw, up to
    terms whose gradient is zero at the unpruned model), computed in numpy (float64)."""
    y = y.astype(np.float64)
    if labels is None:
        noise = label_free_noise(y.shape, 0, index)
        return -(noise * y).reshape(len(noise), -1).sum(1)
    if labels.dtype.kind == "f":
        return np.array([0.5 * np.sum((y - labels) ** 2)])
    flat, target = y.reshape(-1, y.shape[-1]), labels.reshape(-1)
    top = flat.max(1, keepdims=True)
    log_probs = flat - top - np.log(np.exp(flat - top).sum(1, keepdims=True))
    kept = target != -100
    return np.array([-log_probs[kept, target[kept]].sum()])


def _slopes(graph, index: int, samples: list, eps: float = 1e-2) -> np.ndarray:
    """[samples * losses per sample, units]: central-difference slope of each loss when one
    unit's output-projection rows (so its output) are scaled by 1 +- eps."""
    layer = find_layers(graph)[0][index]
    columns = []
    for unit in range(layer.kv_heads):
        heads = range(unit * layer.group, (unit + 1) * layer.group)
        rows = np.concatenate([np.arange(h * layer.v_dim, (h + 1) * layer.v_dim) for h in heads])
        losses = []
        for sign in (1, -1):
            scaled = graph.clone()
            out_proj = find_layers(scaled)[0][index].out_proj
            weight = constant_weight(out_proj).copy()
            weight[rows] *= 1 + sign * eps
            replace_vector(scaled, out_proj, 1, weight)
            runner = GraphRunner(scaled, [scaled.outputs[0].name])
            losses.append(np.concatenate([_losses(runner.run(sample)[scaled.outputs[0].name], sample.get("labels"), s) for s, sample in enumerate(samples)]))
        columns.append((losses[0] - losses[1]) / (2 * eps))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("case", TAYLOR_CASES)
def test_taylor_scores_are_the_loss_slope_of_each_head_gate(graphs, case):
    model, kind = TAYLOR_CASES[case]
    graph = graphs(model)
    samples = [_labelled(graph, kind, seed) for seed in range(2)]
    ctx = PassContext(calibration=samples)
    layers = find_layers(graph)[0]
    gradients = gate_gradients(graph, ctx, [(layer.attention.output.name, (layer.heads, 1, 1)) for layer in layers], "prune-heads")
    scores = _taylor(graph, ctx, layers)
    for index, (layer, gradient, score) in enumerate(zip(layers, gradients, scores)):
        slopes = _slopes(graph, index, samples)
        per_unit = gradient.reshape(len(gradient), layer.kv_heads, layer.group).sum(2)
        np.testing.assert_allclose(per_unit, slopes, rtol=1e-2, atol=1e-2 * np.abs(slopes).max())
        expected = np.abs(slopes).mean(0)
        np.testing.assert_allclose(score, expected / np.linalg.norm(expected), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("model, silent", [("bert", {0: [1], 1: [0, 3]}), ("llama", {0: [2, 3], 1: [0, 1]})])
def test_taylor_prunes_heads_with_no_output_first_exactly(graphs, model, silent):
    graph = graphs(model)
    for index, heads in silent.items():
        layer = find_layers(graph)[0][index]
        weight = constant_weight(layer.out_proj).copy()
        weight[np.concatenate([np.arange(h * layer.v_dim, (h + 1) * layer.v_dim) for h in heads])] = 0
        replace_vector(graph, layer.out_proj, 1, weight)
    samples = [sample_inputs(graph, seed=s) for s in range(2)]
    expected = run_graph(graph, samples[0])
    layers = find_layers(graph)[0]
    scores = _taylor(graph, PassContext(calibration=samples), layers)
    for index, (layer, score) in enumerate(zip(layers, scores)):
        silent_units = {h // layer.group for h in silent[index]}
        assert [u for u in range(layer.kv_heads) if score[u] == 0] == sorted(silent_units)
    result = PruneHeads(ratio=sum(map(len, silent.values())) / 8, score="taylor").run(graph, PassContext(calibration=samples))
    graph.verify()
    assert result.stats["removed"] == silent
    for layer in find_layers(graph)[0]:
        assert layer.heads // layer.kv_heads == (2 if model == "llama" else 1)
    assert max_abs_error(expected, run_graph(graph, samples[0])) < 1e-5
    assert max_abs_error(expected, run_graph(graph, samples[0], engine="torch")) < 1e-4


def test_taylor_score_needs_calibration_and_fitting_labels(graphs):
    with pytest.raises(CompressionError, match=r"^pass 'prune-heads': score=taylor needs calibration data: graphopt.optimize"):
        PruneHeads(ratio=0.25, score="taylor").run(graphs("bert"), PassContext())
    graph = graphs("llama")
    sample = sample_inputs(graph) | {"labels": np.zeros((2, 5), np.int64)}
    with pytest.raises(CompressionError, match=(
        r"^pass 'prune-heads': score=taylor: calibration sample 0: labels of shape \[2, 5\] do not fit the first graph output "
        r"\[2, 8, 256\] \(integer labels: one class index per position, \[2, 8\]; float labels: targets of its shape\)$"
    )):
        PruneHeads(ratio=0.25, score="taylor").run(graph, PassContext(calibration=[sample]))


def test_taylor_labels_pass_the_calibration_checks_without_a_batch_axis(graphs, zoo_onnx):
    graph = graphs("llama")
    samples = [_labelled(graph, "int", seed) for seed in range(3)]
    first_rows = PassContext(calibration=[{name: array[:1] for name, array in s.items()} for s in samples])
    direct = PruneHeads(ratio=0.5, score="taylor").run(graph, first_rows).stats["removed"]
    unbatched = [{name: array[0] for name, array in s.items()} for s in samples]
    optimized = graphopt.optimize(str(zoo_onnx("llama")), "fuse,prune-heads{ratio=0.5,score=taylor}", calibration_data=unbatched, verify=True)
    record = next(r for r in optimized.report.records if r.name == "prune-heads")
    assert record.stats["heads"] == "8 -> 4"
    assert record.stats["removed"] == direct
