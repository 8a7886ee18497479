"""fuse-rotary raises one RotaryEmbedding per q and per k per layer in real HF exports, and
refuses the look-alikes that are not rotary embeddings."""

import numpy as np
import pytest
import torch
import transformers
from model_zoo import _quiet

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import run_graph
from graphopt.exporters import torch_kernels
from graphopt.exporters.onnx_lowering import _Builder
from graphopt.exporters.rotary_kernels import graphopt_RotaryEmbedding
from graphopt.exporters.rotary_lowering import decompose_rotary
from graphopt.targets.onnxruntime_rotary import lower_rotary_contrib

LAYERS = 2
BATCH, SEQ = 2, 8
ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "phi3")


def _config(name: str) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=128,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "mistral": lambda: transformers.MistralConfig(**common),
        "gemma": lambda: transformers.GemmaConfig(head_dim=16, **common),
        "phi3": lambda: transformers.Phi3Config(partial_rotary_factor=0.5, pad_token_id=0, **common),
    }
    config = configs[name]()
    config._attn_implementation = "eager"
    return config


class _Forward(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.logits


def _export(name: str, dynamo: bool, path) -> Graph:
    with torch.random.fork_rng(devices=[]), _quiet(), torch.no_grad():
        torch.manual_seed(0)
        model = _Forward(transformers.AutoModelForCausalLM.from_config(_config(name))).eval()
        ids = torch.randint(4, 256, (BATCH, SEQ))
        args = (ids, torch.ones(BATCH, SEQ, dtype=torch.long), torch.arange(SEQ).expand(BATCH, SEQ).contiguous())
        names = ["input_ids", "attention_mask", "position_ids"]
        if dynamo:
            torch.onnx.export(
                model, args, path, dynamo=True, opset_version=18, input_names=names, output_names=["logits"],
                dynamic_shapes={k: {0: "batch", 1: "seq"} for k in names}, external_data=False, verbose=False,
            )
        else:
            torch.onnx.export(
                model, args, path, dynamo=False, opset_version=17, input_names=names, output_names=["logits"],
                dynamic_axes={k: {0: "batch", 1: "seq"} for k in [*names, "logits"]},
            )
    return graphopt.from_onnx(path)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    cache = {}

    def get(name, dynamo):
        if (name, dynamo) not in cache:
            path = tmp_path_factory.mktemp("rotary") / f"{name}_{'dynamo' if dynamo else 'ts'}.onnx"
            cache[name, dynamo] = _export(name, dynamo, path)
        return cache[name, dynamo]

    return get


@pytest.fixture
def rotary_kernel(monkeypatch):
    """The torch kernel registered for to_fx (until graphopt_kernels.GRAPHOPT_KERNELS lists it)."""
    monkeypatch.setitem(torch_kernels.TORCH_KERNELS, ("graphopt", "RotaryEmbedding"), graphopt_RotaryEmbedding)


def decompose(graph: Graph) -> Graph:
    """A copy with each RotaryEmbedding replaced by `decompose_rotary`'s standard ops."""
    graph = graph.clone()
    for node in [n for n in graph.nodes if n.domain == "graphopt" and n.op_type == "RotaryEmbedding"]:
        graph.replace_value(node.output, decompose_rotary(_Builder(graph, node), node))
        graph.erase(node)
    return graph


def _feeds(rng=np.random.default_rng(0), offset=5):
    return {
        "input_ids": rng.integers(4, 256, (BATCH, SEQ)).astype(np.int64),
        "attention_mask": np.ones((BATCH, SEQ), np.int64),
        # positions past the sequence, different per row, as in decoding with a cache
        "position_ids": (np.arange(SEQ)[None, :] + np.array([[offset], [2 * offset]])).astype(np.int64),
    }


def _fuse(graph: Graph, pipeline: str = "cleanup,canonicalize,fuse-rotary") -> tuple[Graph, dict]:
    fused = graphopt.optimize(graph.clone(), pipeline, verify=True)
    return fused, fused.report.records[-1].stats


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fuses_q_and_k_in_every_layer(name, dynamo, exports, rotary_kernel):
    graph = exports(name, dynamo)
    feeds = _feeds()
    expected = run_graph(graph, feeds)[0]
    fused, stats = _fuse(graph)
    assert stats == {"fused": 2 * LAYERS}
    rotary = [n for n in fused.nodes if n.op_type == "RotaryEmbedding"]
    assert fused.op_counts()["graphopt::RotaryEmbedding"] == 2 * LAYERS
    assert "Neg" not in fused.op_counts()
    partial = {n.attrs.get("rotary_dim") for n in rotary}
    assert partial == ({8} if name == "phi3" else {None})
    np.testing.assert_allclose(run_graph(fused, feeds, engine="torch")[0], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(run_graph(decompose(fused), feeds)[0], expected, atol=1e-5, rtol=0)
    lowered = fused.clone()
    for node in [n for n in lowered.nodes if n.op_type == "RotaryEmbedding"]:
        assert lower_rotary_contrib(lowered, node) is not None
    assert lowered.op_counts()["com.microsoft::RotaryEmbedding"] == 2 * LAYERS
    np.testing.assert_allclose(run_graph(lowered, feeds)[0], expected, atol=1e-5, rtol=0)


def test_attention_still_fuses_after_rotary(exports):
    """fuse-attention finds Q and K as RotaryEmbedding outputs (the order the `fuse` pipeline is to run them in)."""
    fused = graphopt.optimize(exports("llama", False).clone(), "cleanup,canonicalize,fuse-rotary,fuse-attention", verify=True)
    counts = fused.op_counts()
    assert counts["graphopt::RotaryEmbedding"] == 2 * LAYERS
    assert counts["graphopt::Attention"] == LAYERS
    assert [n.inputs[0].producer.op_type for n in fused.nodes if n.op_type == "Attention"] == ["RotaryEmbedding"] * LAYERS


# ---------------------------------------------------------------------------- hand-made graphs
HEADS, HEAD_DIM, POSITIONS = 2, 8, 32


def _tables(interleaved: bool) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    angles = np.outer(np.arange(POSITIONS), inv_freq)
    full = np.repeat(angles, 2, axis=-1) if interleaved else np.concatenate([angles, angles], axis=-1)
    return np.cos(full).astype(np.float32), np.sin(full).astype(np.float32)


def _ints(graph: Graph, name: str, values) -> "graphopt.ir.graph.Value":
    return graph.add_constant(name, np.array(values, np.int64))


def _rotary_graph(*, interleaved=False, split=HEAD_DIM // 2, swap=False, pair_tables=None) -> Graph:
    """y = x * cos[pos] + rotate(x) * sin[pos], cos/sin gathered from constant tables (laid out
    for `pair_tables`, by default for `interleaved`)."""
    graph = Graph("rotary")
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", HEADS, "seq", HEAD_DIM)))
    pos = graph.add_input("position_ids", TensorType(DType.INT64, ("batch", "seq")))
    cos_table, sin_table = _tables(interleaved if pair_tables is None else pair_tables)
    if swap:
        cos_table, sin_table = sin_table, cos_table
    one, last = _ints(graph, "one", [1]), _ints(graph, "last", [-1])

    def add(op, *inputs, **attrs):
        return graph.add_node(op, list(inputs), attrs or None).output

    cos = add("Unsqueeze", add("Gather", graph.add_constant("cos_table", cos_table), pos, axis=0), one)
    sin = add("Unsqueeze", add("Gather", graph.add_constant("sin_table", sin_table), pos, axis=0), one)
    if interleaved:
        two = _ints(graph, "two", [2])
        even = add("Slice", x, _ints(graph, "zero", [0]), _ints(graph, "end", [HEAD_DIM]), last, two)
        odd = add("Slice", x, one, _ints(graph, "end2", [HEAD_DIM]), last, two)
        pairs = add("Concat", add("Unsqueeze", add("Neg", odd), last), add("Unsqueeze", even, last), axis=-1)
        rotated = add("Reshape", pairs, _ints(graph, "shape", [0, 0, 0, HEAD_DIM]))
    else:
        low = add("Slice", x, _ints(graph, "zero", [0]), _ints(graph, "mid", [split]), last)
        high = add("Slice", x, _ints(graph, "mid2", [split]), _ints(graph, "end", [HEAD_DIM]), last)
        rotated = add("Concat", add("Neg", high), low, axis=-1)
    y = add("Add", add("Mul", x, cos), add("Mul", rotated, sin))
    graph.set_outputs([y])
    return graph


def _hand_feeds():
    rng = np.random.default_rng(1)
    return {
        "x": rng.standard_normal((2, HEADS, 5, HEAD_DIM)).astype(np.float32),
        "position_ids": np.array([[0, 1, 2, 3, 4], [7, 9, 11, 13, 20]], np.int64),
    }


@pytest.mark.parametrize("interleaved", [False, True], ids=["half-split", "interleaved"])
def test_cached_tables_gathered_by_position(interleaved, rotary_kernel):
    graph = _rotary_graph(interleaved=interleaved)
    feeds = _hand_feeds()
    expected = run_graph(graph, feeds)[0]
    fused, stats = _fuse(graph)
    assert stats == {"fused": 1}
    (node,) = [n for n in fused.nodes if n.op_type == "RotaryEmbedding"]
    assert node.attrs.get("interleaved", 0) == int(interleaved)
    assert "Neg" not in fused.op_counts()
    np.testing.assert_allclose(run_graph(fused, feeds, engine="torch")[0], expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(run_graph(decompose(fused), feeds)[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "options, reason",
    [
        ({"split": 3}, "rotate_half's slices do not split x at the middle"),
        ({"swap": True}, "the term multiplying x is not a cos with each entry duplicated for the rotation (it is a sin)"),
        ({"pair_tables": True}, "the term multiplying x is not a cos with each entry duplicated for the rotation"),
        ({"interleaved": True, "pair_tables": False}, "the term multiplying x is not a cos with each entry duplicated for the rotation"),
    ],
    ids=["wrong-split", "cos-sin-swapped", "pair-tables-for-halves", "half-tables-for-pairs"],
)
def test_look_alikes_are_refused_with_a_reason(options, reason):
    graph = _rotary_graph(**options)
    fused, stats = _fuse(graph)
    assert stats == {"fused": 0, f"missed: {reason}": 1}
    assert "graphopt::RotaryEmbedding" not in fused.op_counts()

