"""ORT contrib-op lowering: the lowered graph computes what the fused graph computes."""

import numpy as np
import onnxruntime as ort
import pytest
from conftest import numpy_inputs

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import max_abs_error
from graphopt.target_registry import get_target


def _lower(graph: Graph, device: str = "cpu") -> Graph:
    """The onnxruntime target's lowering (lower-onnxruntime, eliminate-dead-code, decompose-graphopt-ops) on a copy."""
    return get_target(f"onnxruntime:{device}").lower(graph)


def _run(graph: Graph, feeds: dict) -> list:
    session = ort.InferenceSession(graph.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def _contrib_counts(graph: Graph) -> dict:
    return {k: v for k, v in graph.op_counts().items() if k.startswith(("com.microsoft::", "graphopt::")) or k == "SimplifiedLayerNormalization"}


LOWERED = {
    "bert": {"com.microsoft::Attention": 2, "com.microsoft::Gelu": 2},
    "gpt2": {"com.microsoft::FastGelu": 2, "com.microsoft::MultiHeadAttention": 2},
    "t5-encoder": {
        "SimplifiedLayerNormalization": 1, "com.microsoft::Attention": 2, "com.microsoft::FastGelu": 2,
        "com.microsoft::SkipSimplifiedLayerNormalization": 4,
    },
    "llama": {
        "SimplifiedLayerNormalization": 1, "com.microsoft::RotaryEmbedding": 4,
        "com.microsoft::SkipSimplifiedLayerNormalization": 4,
    },
}
"""What each zoo model's fused ops become on CPU (TorchScript export); BERT's and GPT-2's
SkipLayerNorms become Add + LayerNormalization there (see the CPU test below). BERT's and T5's Q/K/V come
from one fused-qkv MatMul (packed Attention); GPT-2's causal attention without a mask
bias becomes MultiHeadAttention(unidirectional); LLaMA's rotary embeddings become ORT's
RotaryEmbedding and its grouped-query attention without a KV cache is decomposed into standard
ONNX (decompose-graphopt-ops; with a cache it becomes GroupQueryAttention:
tests/targets/test_kv_cache_attention.py)."""


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOWERED))
def test_lowered_zoo_model_matches_the_fused_graph(name, zoo, zoo_onnx):
    fused = graphopt.optimize(str(zoo_onnx(name)), "fuse")
    lowered = _lower(fused)
    lowered.verify()
    assert _contrib_counts(lowered) == LOWERED[name]
    if name == "bert":
        assert "Transpose" not in lowered.op_counts()  # the head layout ops went with the attention
    feeds = numpy_inputs(zoo(name))
    assert max_abs_error(_run(fused, feeds), _run(lowered, feeds)) <= 1e-4


def _attention_graph(bias_kind: str) -> Graph:
    """Q/K/V projections split into 2 heads of 4, attention with a [B, 1, S, S] mask, merged back."""
    graph = Graph("mha", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("b", "s", 8)))
    mask_type = DType.BOOL if bias_kind == "bool" else DType.FLOAT
    mask = graph.add_input("mask", TensorType(mask_type, ("b", 1, "s", "s")))
    rng = np.random.default_rng(0)
    heads_shape = graph.add_constant("heads_shape", np.array([0, 0, 2, 4], np.int64))
    heads = []
    for i in range(3):
        projected = graph.add_node("MatMul", [x, graph.add_constant(f"w{i}", rng.standard_normal((8, 8)).astype(np.float32))]).output
        split = graph.add_node("Reshape", [projected, heads_shape]).output
        heads.append(graph.add_node("Transpose", [split], {"perm": (0, 2, 1, 3)}).output)
    attention = graph.add_node("Attention", heads + [mask], {"num_heads": 2, "num_kv_heads": 2}, domain="graphopt").output
    merged = graph.add_node("Transpose", [attention], {"perm": (0, 2, 1, 3)}).output
    out = graph.add_node("Reshape", [merged, graph.add_constant("merged_shape", np.array([0, 0, 8], np.int64))], output_names=["y"])
    graph.set_outputs([out.output])
    return graph


@pytest.mark.parametrize("bias_kind", ["additive", "bool"])
def test_multi_head_attention_equals_softmax_even_on_fully_masked_rows(bias_kind):
    graph = _attention_graph(bias_kind)
    lowered = _lower(graph)
    lowered.verify()
    assert lowered.op_counts().get("com.microsoft::MultiHeadAttention") == 1
    assert "Transpose" not in lowered.op_counts() and "graphopt::Attention" not in lowered.op_counts()
    rng = np.random.default_rng(1)
    allowed = np.ones((2, 1, 5, 5), bool)
    allowed[1, :, :, 3:] = False
    allowed[1, :, 2, :] = False  # a query row that sees no key: softmax gives the mean of V
    mask = allowed if bias_kind == "bool" else np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)
    feeds = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32), "mask": mask}
    expected, actual = _run(graph, feeds), _run(lowered, feeds)
    assert max_abs_error(expected, actual) <= 1e-5
    np.testing.assert_allclose(actual[0][1, 2], expected[0][1, 2], atol=1e-5)


def _grouped_query_graph() -> Graph:
    """2 query heads of 4 sharing 1 K/V head, additive [B, 1, S, S] mask, merged back to [B, S, 8]."""
    graph = Graph("gqa", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("b", "s", 8)))
    mask = graph.add_input("mask", TensorType(DType.FLOAT, ("b", 1, "s", "s")))
    rng = np.random.default_rng(0)
    heads = []
    for i, count in enumerate((2, 1, 1)):
        weight = graph.add_constant(f"w{i}", rng.standard_normal((8, 4 * count)).astype(np.float32))
        shape = graph.add_constant(f"heads_shape{i}", np.array([0, 0, count, 4], np.int64))
        split = graph.add_node("Reshape", [graph.add_node("MatMul", [x, weight]).output, shape]).output
        heads.append(graph.add_node("Transpose", [split], {"perm": (0, 2, 1, 3)}).output)
    attention = graph.add_node("Attention", heads + [mask], {"num_heads": 2, "num_kv_heads": 1}, domain="graphopt").output
    merged = graph.add_node("Transpose", [attention], {"perm": (0, 2, 1, 3)}).output
    out = graph.add_node("Reshape", [merged, graph.add_constant("merged_shape", np.array([0, 0, 8], np.int64))], output_names=["y"])
    graph.set_outputs([out.output])
    return graph


def test_grouped_query_attention_is_left_to_the_decomposition():
    graph = _grouped_query_graph()
    lowered = _lower(graph)
    lowered.verify()
    counts = lowered.op_counts()
    assert not any(op.startswith(("com.microsoft::", "graphopt::")) for op in counts)
    assert counts["Softmax"] == 1 and counts["Expand"] == 2  # K and V repeated for the query heads
    rng = np.random.default_rng(1)
    mask = np.where(rng.random((2, 1, 5, 5)) < 0.8, 0.0, -1e4).astype(np.float32)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    w = [graph.constants[f"w{i}"].const.numpy() for i in range(3)]
    q = (x @ w[0]).reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)
    k, v = ((x @ w[i]).reshape(2, 5, 1, 4).transpose(0, 2, 1, 3).repeat(2, axis=1) for i in (1, 2))
    scores = q @ k.transpose(0, 1, 3, 2) / 2.0 + mask
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = ((probs / probs.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(2, 5, 8)
    np.testing.assert_allclose(_run(lowered, {"x": x, "mask": mask})[0], expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantized_packed_attention_becomes_qattention(mode, zoo, zoo_onnx):
    feeds = numpy_inputs(zoo("bert"))
    padded = {**feeds, "attention_mask": feeds["attention_mask"].copy()}
    padded["attention_mask"][-1, 3:] = 0  # the last sample has padding: the mask reaches QAttention
    quantized = graphopt.optimize(str(zoo_onnx("bert")), f"fuse,quantize{{mode={mode}}}", calibration_data=[feeds])
    lowered = _lower(quantized)
    lowered.verify()
    counts = lowered.op_counts()
    assert counts.get("com.microsoft::QAttention") == 2
    assert "com.microsoft::MultiHeadAttention" not in counts and "Split" not in counts
    for sample in (feeds, padded):
        assert max_abs_error(_run(quantized, sample), _run(lowered, sample)) <= 1e-4
    assert not np.allclose(_run(lowered, padded)[0][-1], _run(lowered, feeds)[0][-1], atol=1e-3)  # the mask is applied


@pytest.mark.parametrize("sum_read", [False, True])
def test_skip_layer_norm_exports_only_the_outputs_that_are_read(sum_read):
    """ORT computes every named output; the mean, inverse std (and an unread pre-norm sum) go out as ""."""
    graph = Graph("skipln", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("b", "s", 8)))
    skip = graph.add_input("skip", TensorType(DType.FLOAT, ("b", "s", 8)))
    rng = np.random.default_rng(0)
    scale, beta = (graph.add_constant(n, rng.standard_normal(8).astype(np.float32)) for n in ("scale", "beta"))
    node = graph.add_node("SkipLayerNorm", [x, skip, scale, beta], {"epsilon": 1e-5}, domain="graphopt",
                          num_outputs=2 if sum_read else 1, output_names=["y", "sum"] if sum_read else ["y"])
    graph.set_outputs(list(node.outputs))
    lowered = _lower(graph, device="cuda")
    (proto,) = [n for n in lowered.to_onnx().graph.node if n.op_type == "SkipLayerNormalization"]
    assert list(proto.output) == ["y", "", "", "sum" if sum_read else ""]
    feeds = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32), "skip": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    assert max_abs_error(_run(graph, feeds), _run(lowered, feeds)) <= 1e-5


def _skip_layer_norm_graph(with_bias: bool, simplified: bool = False) -> Graph:
    graph = Graph("skipln", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("b", 128, 8)))
    skip = graph.add_input("skip", TensorType(DType.FLOAT, ("b", 128, 8)))
    rng = np.random.default_rng(0)
    scale, beta, bias = (graph.add_constant(n, rng.standard_normal(8).astype(np.float32)) for n in ("scale", "beta", "bias"))
    inputs = [x, skip, scale, None if simplified else beta] + ([bias] if with_bias else [])
    node = graph.add_node("SkipLayerNorm", inputs, {"epsilon": 1e-5, "simplified": int(simplified)}, domain="graphopt", output_names=["y"])
    graph.set_outputs([node.output])
    return graph


def _session_ops(model_bytes: bytes, tmp_path, **session_kwargs) -> list[str]:
    import onnx

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"], **session_kwargs)
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_skip_layer_norm_stays_out_of_orts_slow_kernel(with_bias, tmp_path):
    """On CPU, SkipLayerNorm becomes Add(x, skip) [+ bias] + LayerNormalization, in an order
    ORT's SkipLayerNormFusion leaves alone (with a bias), and the target's own session turns
    that fusion off (without one); CUDA keeps the contrib kernel."""
    graph = _skip_layer_norm_graph(with_bias)
    lowered = _lower(graph, device="cpu")
    assert [n.op_type for n in lowered.nodes] == ["Add"] + (["Add"] if with_bias else []) + ["LayerNormalization"]
    if with_bias:
        assert lowered.nodes[1].inputs[1].name == "bias"  # added last: not ORT's fusion pattern
        assert "SkipLayerNormalization" not in _session_ops(lowered.to_onnx().SerializeToString(), tmp_path)
    target = get_target("onnxruntime:cpu")
    assert "SkipLayerNormalization" not in _session_ops(lowered.to_onnx().SerializeToString(), tmp_path, disabled_optimizers=target.disabled_optimizers())
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 128, 8)).astype(np.float32), "skip": rng.standard_normal((2, 128, 8)).astype(np.float32)}
    assert max_abs_error(_run(graph, feeds), _run(lowered, feeds)) <= 1e-5
    assert [n.op_type for n in _lower(graph, device="cuda").nodes] == ["SkipLayerNormalization"]


def test_cpu_keeps_skip_simplified_layer_norm():
    """SkipSimplifiedLayerNormalization is not slower than its decomposition on CPU: it stays."""
    lowered = _lower(_skip_layer_norm_graph(True, simplified=True), device="cpu")
    assert [n.op_type for n in lowered.nodes] == ["SkipSimplifiedLayerNormalization"]


def test_cpu_sessions_turn_off_orts_skip_layer_norm_fusion(monkeypatch):
    """Without a bias, the lowered Add + LayerNormalization is ORT's fusion pattern: the
    target's CPU sessions turn that fusion off."""
    created = []
    real = ort.InferenceSession

    def spy(*args, **kwargs):
        created.append(kwargs.get("disabled_optimizers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    compiled = graphopt.compile(_skip_layer_norm_graph(with_bias=False), "onnxruntime:cpu")
    assert created == [["SkipLayerNormFusion"]]
    assert [n.op_type for n in compiled.graph.nodes] == ["Add", "LayerNormalization"]
