"""shard + graphopt.distributed: tensor-parallel models that give the unsharded outputs.

Graph-level checks (no processes) merge the rank graphs into one graph whose collectives are
a Sum (AllReduce) or a Concat (AllGather) of the ranks' partial values: what the ranks compute
together. Process checks run 2 gloo ranks on CPU. The zoo models get random biases first
(the zoo's are zeros, which would hide a bias added once per rank).
"""

from __future__ import annotations

import os
import pickle
import re
import signal

import numpy as np
import pytest
import torch

import decoder_zoo
import graphopt
import model_zoo
from graphopt.check import max_abs_error, run_graph
from graphopt.distributed import DistributedError, _rebuild_error, compile_sharded, weight_bytes
from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.pass_base import PassContext, PipelineError
from graphopt.passes._structured import split_sizes
from graphopt.passes.prune_heads import find_layers
from graphopt.passes.shard import Shard, ShardError, shard_graph
from graphopt.target_base import TargetError

MODELS = ("bert", "llama", "gpt2", "vit")
VOCAB_COLLECTIVES = {
    "bert": {"graphopt::AllReduce": 6},
    "llama": {"graphopt::AllReduce": 5, "graphopt::AllGather": 1},
    "gpt2": {"graphopt::AllReduce": 5, "graphopt::AllGather": 1},
    "vit": {"graphopt::AllReduce": 4},
}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (path of the export with random biases, numpy feeds, torch outputs)."""
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("shard_zoo")

    def get(name: str):
        if name not in cache:
            zm = model_zoo.build(name)
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for parameter_name, parameter in zm.model.named_parameters():
                    if parameter_name.endswith("bias"):
                        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
                expected = [t.numpy() for t in zm.model(**zm.inputs)]
            path = model_zoo.export_onnx(zm, root / f"{name}.onnx")
            cache[name] = (path, {k: v.numpy() for k, v in zm.inputs.items()}, expected)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def fused(exported):
    cache: dict[str, Graph] = {}

    def get(name: str) -> Graph:
        if name not in cache:
            cache[name] = graphopt.optimize(str(exported(name)[0]), "fuse")
        return cache[name].clone()

    return get


def merge_ranks(graphs: list[Graph]) -> Graph:
    """One graph computing what the rank graphs compute together: their nodes side by side
    (same inputs), each AllReduce a Sum and each AllGather a Concat of the ranks' values."""
    first = graphs[0]
    merged = Graph(first.name, dict(first.opset_imports))
    inputs = {v.name: merged.add_input(v.name, v.type) for v in first.inputs}
    maps = []
    for rank, graph in enumerate(graphs):
        mapping = {id(v): inputs[v.name] for v in graph.inputs}
        mapping.update({id(v): merged.add_constant(f"rank{rank}/{v.name}", v.const) for v in graph.constants.values()})
        maps.append(mapping)
    for nodes in zip(*(graph.nodes for graph in graphs), strict=True):
        assert len({n.qualified_op for n in nodes}) == 1, "ranks must run the same ops in the same order"
        head = nodes[0]
        if head.domain == "graphopt" and head.op_type in ("AllReduce", "AllGather"):
            parts = [maps[r][id(n.inputs[0])] for r, n in enumerate(nodes)]
            attrs = {"axis": head.attrs["axis"]} if head.op_type == "AllGather" else {}
            total = merged.add_node("Sum" if head.op_type == "AllReduce" else "Concat", parts, attrs).output
            for r, n in enumerate(nodes):
                maps[r][id(n.output)] = total
            continue
        for r, n in enumerate(nodes):
            copy = merged.add_node(
                n.op_type, [None if v is None else maps[r][id(v)] for v in n.inputs], dict(n.attrs),
                domain=n.domain, num_outputs=len(n.outputs), name=f"rank{r}/{n.name}",
            )
            maps[r].update({id(a): b for a, b in zip(n.outputs, copy.outputs)})
    outputs = [maps[0][id(v)] for v in first.outputs]
    for value, name in zip(outputs, first.output_names):
        merged.rename_value(value, name)
    merged.set_outputs(outputs)
    merged.verify()
    return merged


def _counts(graph: Graph) -> dict[str, int]:
    return {op: n for op, n in graph.op_counts().items() if op.startswith("graphopt::All")}


# ----------------------------------------------------------------------------- the graphs


@pytest.mark.parametrize("name", MODELS)
def test_the_ranks_together_compute_the_unsharded_outputs(fused, exported, name):
    graph = fused(name)
    _, feeds, torch_outputs = exported(name)
    ranks = [shard_graph(graph, 2, rank) for rank in range(2)]
    for rank in ranks:
        rank.verify()
        # 2 layers x (attention output, FFN down) + one per vocabulary-split embedding (BERT: word and
        # token-type tables), and the logits gathered from the vocabulary-split LM head
        assert _counts(rank) == VOCAB_COLLECTIVES[name]
        assert [(layer.heads, layer.kv_heads) for layer in find_layers(rank)[0]] == [(2, 1 if name == "llama" else 2)] * 2
    expected = run_graph(graph, feeds, engine="torch")
    assert max_abs_error(torch_outputs, expected) < TOLERANCE
    merged = merge_ranks(ranks)
    assert max_abs_error(expected, run_graph(merged, feeds, engine="torch")) < TOLERANCE
    assert max_abs_error(expected, run_graph(merged, feeds)) < TOLERANCE  # ONNX Runtime too


def test_row_parallel_biases_wait_for_the_sum(fused):
    """The output projections' biases (random here) are read once, after the AllReduce."""
    rank = shard_graph(fused("gpt2"), 2, 1)
    reduces = [n for n in rank.nodes if n.op_type == "AllReduce" and n.inputs[0].producer.op_type != "Mul"]  # not the embedding's
    for node in reduces:
        assert node.inputs[0].producer.op_type == "MatMul"
        (reader,) = node.output.users()
        assert reader.op_type == "Add" and reader.inputs[1].const.shape == (32,)
        assert np.abs(reader.inputs[1].const.numpy()).max() > 0.1
    assert len(reduces) == 4


def test_grouped_query_heads_keep_their_kv_groups(fused):
    graph = fused("llama")
    full = find_layers(graph)[0][0]
    weight = full.q.columns.weight  # packed [32, q 32 | k 16 | v 16]
    for rank in range(2):
        layer = find_layers(shard_graph(graph, 2, rank))[0][0]
        assert (layer.attention.attrs["num_heads"], layer.attention.attrs["num_kv_heads"]) == (2, 1)
        assert split_sizes(layer.q.columns.split) == [16, 8, 8]
        q, k, v = (slice(16 * rank, 16 * rank + 16), slice(32 + 8 * rank, 40 + 8 * rank), slice(48 + 8 * rank, 56 + 8 * rank))
        expected = np.concatenate([weight[:, q], weight[:, k], weight[:, v]], axis=1)  # query heads 2R, 2R+1 read KV head R
        np.testing.assert_array_equal(layer.q.columns.weight, expected)
        np.testing.assert_array_equal(find_layers(graph)[0][0].out_proj.inputs[1].const.numpy()[16 * rank:16 * rank + 16], layer.out_proj.inputs[1].const.numpy())


def test_each_rank_holds_half_of_the_split_weights(fused):
    """LLaMA (hidden 32, 4 heads of 8, 2 KV heads, FFN 64, vocab 256, 2 layers, no biases): per layer
    qkv 32x64 + o 32x32 + gate/up 32x128 + down 64x32 = 9216 floats are split, and by vocabulary the
    embedding and the lm_head (256x32 each); only the norms stay whole: a rank holds half the weights."""
    graph = fused("llama")
    full = weight_bytes(graph)
    layers, vocabulary = 2 * 9216 * 4, 2 * 256 * 32 * 4
    replicated = full - layers - vocabulary
    assert 0 < replicated < 0.01 * full  # the RMSNorm scales
    for rank in range(2):
        assert weight_bytes(shard_graph(graph, 2, rank)) == replicated + (layers + vocabulary) // 2
        without_vocab = graph.clone()
        Shard(tp=2, rank=rank, vocab=False).run(without_vocab, PassContext())
        assert weight_bytes(without_vocab) == full - layers // 2  # vocab=false: embedding and head whole
    # BERT with biases: QKV and FFN-up biases split too (96 + 64 per layer), output biases stay whole.
    bert = fused("bert")
    tables = [n.inputs[0].const.nbytes for n in bert.nodes if n.op_type == "Gather" and n.inputs[1] in bert.inputs]
    assert len(tables) == 2  # word and token-type embeddings: their ids are graph inputs; positions stay whole
    assert weight_bytes(bert) - weight_bytes(shard_graph(bert, 2, 0)) == ((2 * (32 * 96 + 32 * 32 + 32 * 64 + 64 * 32) + 2 * (96 + 64)) * 4 + sum(tables)) // 2


def test_shard_is_a_pipeline_pass(exported):
    graph = graphopt.optimize(str(exported("bert")[0]), "fuse,shard{tp=2,rank=1}")
    record = graph.report.records[-1]
    assert record.name == "shard" and record.stats["rank"] == 1 and record.stats["attention_layers"] == 2
    assert record.stats["ffn_blocks"] == 2 and "replicated" not in record.stats
    with pytest.raises(PipelineError, match="attention-fused"):
        graphopt.optimize(str(exported("bert")[0]), "cleanup,shard{tp=2}")


def test_a_rank_graph_run_without_a_process_group_says_what_it_needs(fused, exported):
    rank = shard_graph(fused("vit"), 2, 0)
    with pytest.raises(GraphoptError, match=r"graphopt::AllReduce over 2 ranks needs a torch.distributed process group .*compile_sharded"):
        run_graph(rank, exported("vit")[1], engine="torch")


def test_tp_1_changes_nothing(fused):
    graph = fused("bert")
    assert str(shard_graph(graph, 1, 0)) == str(graph)


@pytest.mark.parametrize(
    ("name", "tp", "message"),
    [
        ("bert", 3, r"attention layer 0 \('Attention_0' \(graphopt::Attention\)\) has 4 query heads and 4 KV heads; tp=3 must divide both"),
        ("llama", 4, r"has 4 query heads and 2 KV heads; tp=4 must divide both \(grouped-query attention keeps each KV head with its 2 query heads\)"),
        ("gpt2", 3, r"has 4 query heads and 4 KV heads; tp=3"),  # refused before its Gemms are restated
    ],
)
def test_heads_that_do_not_divide_are_refused(fused, name, tp, message):
    graph = fused(name)
    before = str(graph)
    with pytest.raises(ShardError, match=message):
        Shard(tp=tp).run(graph, PassContext())
    assert str(graph) == before


def test_neurons_that_do_not_divide_are_refused(fused):
    graph = graphopt.optimize(fused("bert"), "prune-ffn{neurons={0: [0, 1]}}")  # block 0 keeps 62 neurons
    with pytest.raises(ShardError, match=r"feed-forward block 0 \(down projection .*\) has 62 intermediate neurons, not divisible by tp=4"):
        shard_graph(graph, 4, 0)


def test_kv_cache_decoder_ranks_slice_the_past_and_gather_the_presents():
    graph = graphopt.optimize(str(decoder_zoo.decoder_onnx("llama", "torchscript", "sdpa")), "fuse")
    _, config = decoder_zoo.build_decoder("llama", "sdpa")
    feeds = decoder_zoo.decoder_inputs(config, batch=2, seq=3, past=4)
    ranks = [shard_graph(graph, 2, rank) for rank in range(2)]
    # 2 layers x 2 row-parallel sums + the embedding's; 4 presents + the vocabulary-split logits gathered
    assert _counts(ranks[1]) == {"graphopt::AllReduce": 5, "graphopt::AllGather": 5}
    assert ranks[1].output_names == graph.output_names
    assert [v.shape for v in ranks[1].outputs[1:]] == [v.shape for v in graph.outputs[1:]]  # presents whole: [batch, 2, past + seq, 16]
    expected = run_graph(graph, feeds, engine="torch")
    assert max_abs_error(expected, run_graph(merge_ranks(ranks), feeds, engine="torch")) < TOLERANCE


# ----------------------------------------------------------------------------- two gloo ranks


@pytest.mark.parametrize("name", MODELS)
def test_two_gloo_ranks_give_the_unsharded_outputs(fused, exported, name):
    path, feeds, torch_outputs = exported(name)
    graph = fused(name)
    expected = run_graph(graph, feeds, engine="torch")
    if name == "vit":  # graphopt.compile's own door
        sharded = graphopt.compile(str(path), target="torch", pipeline="fuse", world_size=2)
    else:
        sharded = compile_sharded(path, tp=2, pipeline="fuse", target="torch")
    with sharded as model:
        got = model(**feeds)
        assert max_abs_error(expected, got) < TOLERANCE
        assert max_abs_error(torch_outputs, got) < TOLERANCE
        tensors = model(*[torch.from_numpy(v) for v in feeds.values()])  # torch in, torch out
        assert isinstance(tensors[0], torch.Tensor) and max_abs_error(expected, [t.numpy() for t in tensors]) < TOLERANCE
        assert [r["weight_bytes"] for r in model.ranks] == [weight_bytes(shard_graph(graph, 2, r)) for r in range(2)]
        assert all(r["weight_bytes"] < weight_bytes(graph) for r in model.ranks)
        processes = list(model._processes)
        if name == "bert":  # a rank's exception comes back with its type and message, and stops every rank
            bad = dict(feeds, input_ids=np.full_like(feeds["input_ids"], 10_000))
            with pytest.raises(IndexError, match="index out of range") as caught:
                model(**bad)
            assert "Traceback" in str(caught.value.__cause__)
            assert model.closed and not any(p.is_alive() for p in processes)
            with pytest.raises(DistributedError, match="closed"):
                model(**feeds)
        if name == "vit":  # a rank that dies is named, and the others are stopped
            os.kill(processes[1].pid, signal.SIGKILL)
            with pytest.raises(DistributedError, match=r"rank 1 of 2 exited \(exit code -9\) without answering"):
                model(**feeds)
            assert model.closed
    assert not any(p.is_alive() for p in processes)
    if name in ("llama", "gpt2"):
        assert [p.exitcode for p in processes] == [0, 0]  # left the process group and exited by themselves


def test_sharded_kv_cache_decoding_gives_the_same_greedy_tokens():
    path = decoder_zoo.decoder_onnx("llama", "torchscript", "sdpa")
    model, config = decoder_zoo.build_decoder("llama", "sdpa")
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, size=(2, 5))
    expected = decoder_zoo.greedy_tokens(decoder_zoo.torch_step(model), prompt, 8, config=config)
    with graphopt.compile(str(path), target="torch", pipeline="fuse", world_size=2) as sharded:

        def step(feeds):
            logits, *presents = sharded(**feeds)
            return logits, presents

        np.testing.assert_array_equal(decoder_zoo.greedy_tokens(step, prompt, 8, config=config), expected)
        assert sharded.ranks[0]["shard"]["attention_layers"] == 2


def test_a_target_without_collectives_is_refused_before_any_process_starts(exported):
    with pytest.raises(TargetError, match=r"cannot run the collectives \(graphopt::AllReduce\).*target='torch'"):
        compile_sharded(exported("bert")[0], tp=2, target="onnxruntime")
    with pytest.raises(ShardError, match="tp=3"):
        compile_sharded(exported("bert")[0], tp=3)
    with pytest.raises(DistributedError, match=r"shard\{tp=4\} does not match the 2 ranks"):
        compile_sharded(exported("bert")[0], tp=2, pipeline="fuse,shard{tp=4}")


class _TwoArgumentError(GraphoptError):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def test_an_exception_that_does_not_survive_pickling_comes_back_as_its_message():
    payload = {"type": "Odd", "message": "x/y", "traceback": "Traceback: ...", "pickled": pickle.dumps(_TwoArgumentError("x", "y"))}
    error = _rebuild_error(1, 2, payload)
    assert isinstance(error, DistributedError) and str(error) == "rank 1 of 2 raised Odd: x/y"
    assert "Traceback: ..." in str(error.__cause__)


def test_a_saved_sharded_model_loads_runs_and_launches_under_torchrun(exported, tmp_path, capsys):
    """save() writes one artifact per rank (each holding only its shard); load_compiled and
    `graphopt run` start the ranks again; torchrun runs the saved ranks itself."""
    import subprocess
    import sys

    from graphopt.cli import main

    path, feeds, torch_outputs = exported("llama")
    artifact = tmp_path / "llama.tp2"
    with graphopt.compile(str(path), target="torch", pipeline="fuse", world_size=2) as sharded:
        expected = sharded(**feeds)
        sharded.save(artifact)
        per_rank = [r["weight_bytes"] for r in sharded.ranks]
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "rank0", "rank1"]
    for rank in range(2):  # each rank's folder holds its own shard: its weights, no more
        assert weight_bytes(graphopt.load_compiled(artifact / f"rank{rank}").graph) == per_rank[rank]
    with graphopt.load_compiled(artifact) as loaded:
        assert loaded.tp == 2 and max_abs_error(expected, loaded(**feeds)) == 0.0
    np.savez(tmp_path / "inputs.npz", **feeds)
    assert main(["run", str(artifact), "-i", str(tmp_path / "inputs.npz"), "-o", str(tmp_path / "run.npz")]) == 0
    with np.load(tmp_path / "run.npz") as saved:
        assert max_abs_error(expected, [saved[name] for name in saved.files]) == 0.0
    capsys.readouterr()
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "graphopt.distributed",
         str(artifact), "-i", str(tmp_path / "inputs.npz"), "-o", str(tmp_path / "torchrun.npz")],
        capture_output=True, text=True, timeout=120,
    )
    assert launched.returncode == 0, launched.stderr[-2000:]
    with np.load(tmp_path / "torchrun.npz") as saved:
        assert max_abs_error(torch_outputs, [saved[name] for name in saved.files]) < TOLERANCE


def test_vocabulary_split_embedding_keeps_gathers_index_rules(fused, exported):
    """Negative ids wrap as in Gather; an id outside [-V, V) still fails rather than reading zeros."""
    graph = fused("llama")
    _, feeds, _ = exported("llama")
    merged = merge_ranks([shard_graph(graph, 2, rank) for rank in range(2)])
    wrapped = dict(feeds, input_ids=feeds["input_ids"] - 256)  # the same tokens, counted from the end
    assert max_abs_error(run_graph(graph, feeds, engine="torch"), run_graph(merged, wrapped, engine="torch")) < TOLERANCE
    for bad in (256, -257):
        with pytest.raises(Exception, match="out of"):
            run_graph(merged, dict(feeds, input_ids=np.full_like(feeds["input_ids"], bad)), engine="torch")


def test_cli_compiles_tensor_parallel_and_runs_the_saved_ranks(exported, tmp_path, capsys):
    from graphopt.cli import main

    path, feeds, torch_outputs = exported("bert")
    np.savez(tmp_path / "inputs.npz", **feeds)
    artifact = tmp_path / "bert.tp2"
    assert main(["compile", str(path), "-t", "torch", "--world-size", "2", "-o", str(artifact), "--inputs", str(tmp_path / "inputs.npz")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"compiled for torch\S* as 2 ranks", out) and re.search(r"last_hidden_state: max abs [\d.e-]+, relative", out)
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "rank0", "rank1"]
    assert main(["run", str(artifact), "-i", str(tmp_path / "inputs.npz"), "-o", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as saved:
        assert max_abs_error(torch_outputs, [saved[name] for name in saved.files]) < TOLERANCE
