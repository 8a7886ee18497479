"""graphopt.recover: distillation brings a pruned tiny BERT back towards the original, and
changes nothing but the trained weights of a copy."""

import re

import numpy as np
import pytest

import graphopt
from graphopt.check import run_graph
from graphopt.errors import UnsupportedOpError
from graphopt.recovery import RecoveryError, trainable_constants

PIPELINE = "fuse,prune-heads{ratio=0.5},prune-ffn{ratio=0.5}"
FAST = {"steps": 30, "lr": 3e-3, "progress": False}


def _sentences(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    """Random token sequences of 6 or 8 tokens (two shapes, so steps mix batched and separate runs)."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        length = int(rng.choice([6, 8]))
        samples.append({
            "input_ids": rng.integers(4, 256, (1, length)),
            "attention_mask": np.ones((1, length), np.int64),
            "token_type_ids": np.zeros((1, length), np.int64),
        })
    return samples


def _arrays(graph):
    return {name: np.array(value.const.numpy()) for name, value in graph.constants.items()}


def _mse(graph, reference, feeds) -> float:
    return float(np.mean([np.mean((run_graph(graph, f)[0] - run_graph(reference, f)[0]) ** 2) for f in feeds]))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Matmuls this small run faster on one thread than on two competing for shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert(zoo_onnx, one_torch_thread):
    """(original, compressed, their printed IR and arrays before recovery, the recovered graph)."""
    path = str(zoo_onnx("bert"))
    original = graphopt.from_onnx(path)
    compressed = graphopt.optimize(path, PIPELINE)
    before = (str(original), str(compressed), _arrays(original), _arrays(compressed))
    recovered = graphopt.recover(compressed, original, _sentences(0, 24), **FAST)
    return original, compressed, before, recovered


def test_recovery_reduces_the_distillation_loss_and_the_output_error(bert):
    original, compressed, _, recovered = bert
    report = recovered.metadata["recovery_report"]
    assert report.samples == 24 and report.steps == 30
    assert report.loss_after < 0.2 * report.loss_before
    held_out = _sentences(1, 6)
    assert _mse(recovered, original, held_out) < 0.3 * _mse(compressed, original, held_out)


def test_recovered_graph_has_the_compressed_structure_and_new_weights(bert):
    _, compressed, _, recovered = bert
    recovered.verify()
    assert recovered.op_counts() == compressed.op_counts()
    assert [(n.qualified_op, [v and v.name for v in n.inputs], [v.name for v in n.outputs]) for n in recovered.nodes] == [
        (n.qualified_op, [v and v.name for v in n.inputs], [v.name for v in n.outputs]) for n in compressed.nodes
    ]
    report = recovered.metadata["recovery_report"]
    assert report.trained == sorted(trainable_constants(compressed))
    mine, theirs = recovered.constants, compressed.constants
    assert {n: v.type for n, v in mine.items()} == {n: v.type for n, v in theirs.items()}
    tables = {n.inputs[0].name for n in compressed.nodes if n.op_type == "Gather"}
    assert tables and not tables & set(report.trained)
    for name in mine:
        same = np.array_equal(mine[name].const.numpy(), theirs[name].const.numpy())
        assert same == (name not in report.trained), name
    assert report.parameters == sum(theirs[n].const.size for n in report.trained)
    norms = [n.outputs[0].name for n in compressed.nodes if n.op_type in ("LayerNormalization", "SkipLayerNorm")]
    assert report.hidden == [n for n in norms if n not in {v.name for v in compressed.outputs}] and len(report.hidden) == 4


def test_inputs_are_left_unchanged(bert):
    original, compressed, (original_text, compressed_text, original_arrays, compressed_arrays), _ = bert
    assert str(original) == original_text and str(compressed) == compressed_text
    for graph, arrays in ((original, original_arrays), (compressed, compressed_arrays)):
        for name, value in graph.constants.items():
            np.testing.assert_array_equal(value.const.numpy(), arrays[name])


def test_same_seed_same_weights(bert):
    original, compressed, _, _ = bert
    data = _sentences(0, 12)
    runs = [graphopt.recover(compressed, original, data, steps=4, batch_size=4, lr=1e-3, progress=False, seed=s) for s in (0, 0, 1)]
    trained = runs[0].metadata["recovery_report"].trained
    weights = [[r.constants[n].const.numpy() for n in trained] for r in runs]
    assert all(np.array_equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(weights[0], weights[2]))


def test_npz_data_and_progress_lines(bert, tmp_path, capsys):
    original, compressed, _, _ = bert
    rng = np.random.default_rng(2)
    path = tmp_path / "train.npz"
    np.savez(path, input_ids=rng.integers(4, 256, (5, 1, 7)), attention_mask=np.ones((5, 1, 7), np.int64),
             token_type_ids=np.zeros((5, 1, 7), np.int64))
    recovered = graphopt.recover(compressed, original, path, steps=2, hidden_loss=False)
    report = recovered.metadata["recovery_report"]
    assert report.samples == 5 and report.hidden == []
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r" loss .*", "", line) for line in lines] == ["recover: step 1/2", "recover: step 2/2"]


def _renamed_input(graph):
    copy = graph.clone()
    copy.rename_value(copy.inputs[2], "segment_ids")
    return copy


def _opaque_output(graph):
    copy = graph.clone()
    node = copy.add_node("FusedThing", [copy.outputs[0]], domain="com.example", name="fancy", infer=False)
    copy.set_outputs([node.output, *copy.outputs[1:]])
    return copy


@pytest.mark.parametrize("case, error, message", [
    ("inputs", RecoveryError, r"^recover: the compressed graph's inputs \(input_ids, attention_mask, token_type_ids\) differ from the original's \(input_ids, attention_mask, segment_ids\)"),
    ("empty", RecoveryError, r"^recover: training data: calibration data is empty$"),
    ("steps", RecoveryError, r"^recover: steps must be at least 1, got 0$"),
    ("frozen", RecoveryError, r"^recover: graph '.*' has no trainable weights .*; check `freeze`$"),
    ("unknown", RecoveryError, r"^recover: freeze names no_such_weight, which are not constants of graph"),
    ("unsupported", UnsupportedOpError, r"^recover: the compressed graph cannot be trained in torch: .*com\.example::FusedThing \(first at node 'fancy'"),
])
def test_errors_say_what_to_change(bert, case, error, message):
    original, compressed, _, _ = bert
    data = _sentences(0, 2)
    kwargs = {"steps": 1, "progress": False}
    if case == "inputs":
        original = _renamed_input(original)
    elif case == "empty":
        data = []
    elif case == "steps":
        kwargs["steps"] = 0
    elif case == "frozen":
        kwargs["freeze"] = list(compressed.constants)
    elif case == "unknown":
        kwargs["freeze"] = ["no_such_weight"]
    else:
        compressed = _opaque_output(compressed)
    with pytest.raises(error, match=message):
        graphopt.recover(compressed, original, data, **kwargs)
