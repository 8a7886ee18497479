"""prune-heads: physically smaller attention, exactly lossless on zero-importance heads, GQA groups kept whole."""

import numpy as np
import pytest

import graphopt
from graphopt import PassContext
from graphopt.check import max_abs_error, run_graph, sample_inputs
from graphopt.passes._structured import CompressionError, bias_slot, constant_weight, count_params, replace_vector
from graphopt.passes.prune_heads import PruneHeads, find_layers

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
    record = next(r for r in graph.metadata["pipeline_report"].records if r.name == "prune-heads")
    assert record.stats["heads"] == "8 -> 6"
    with pytest.raises(graphopt.PipelineError, match="pass 'prune-heads' .* needs 'attention-fused'"):
        graphopt.optimize(path, "prune-heads{ratio=0.25}")
