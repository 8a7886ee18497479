"""graphopt's own ops: shape inference, torch kernels, ONNX round trip."""

import numpy as np
import pytest
import torch

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.exporters.graphopt_kernels import graphopt_Attention, graphopt_Gelu, graphopt_RMSNorm

F32 = DType.FLOAT


def _attention_graph(kv_heads: int = 2, causal: int = 1, bias: bool = False) -> Graph:
    graph = Graph("attn", {"": 18})
    q = graph.add_input("q", TensorType(F32, ("batch", 4, "seq", 8)))
    k = graph.add_input("k", TensorType(F32, ("batch", kv_heads, "kv", 8)))
    v = graph.add_input("v", TensorType(F32, ("batch", kv_heads, "kv", 6)))
    extra = [graph.add_input("bias", TensorType(F32, (1, 1, 1, "kv")))] if bias else []
    node = graph.add_node("Attention", [q, k, v, *extra], {"num_heads": 4, "num_kv_heads": kv_heads, "causal": causal}, domain="graphopt", output_names=["o"])
    graph.set_outputs([node.output])
    return graph


def _reference_attention(q, k, v, scale, bias=None, causal=False):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        sq, sk = scores.shape[-2:]
        allowed = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def test_attention_infers_output_shape_and_verifies():
    graph = _attention_graph()
    assert graph.outputs[0].type == TensorType(F32, ("batch", 4, "seq", 6))
    graph.verify()
    assert not graph.nodes[0].is_opaque


def test_attention_rejects_head_counts_that_do_not_divide():
    with pytest.raises(graphopt.GraphError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        _attention_graph(kv_heads=3)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("q_len", [5, 1])
def test_attention_kernel_matches_reference(kv_heads, q_len):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 8, generator=gen)
    k = torch.randn(2, kv_heads, 5, 8, generator=gen)
    v = torch.randn(2, kv_heads, 5, 6, generator=gen)
    bias = torch.randn(2, 1, q_len, 5, generator=gen)
    for causal in (0, 1):
        (got,) = graphopt_Attention(q, k, v, bias, num_heads=4, num_kv_heads=kv_heads, scale=0.3, causal=causal)
        want = _reference_attention(q, k, v, 0.3, bias, bool(causal))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_boolean_mask():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=gen) for _ in range(3))
    keep = torch.tensor([True, True, False]).view(1, 1, 1, 3)
    (got,) = graphopt_Attention(q, k, v, keep, num_heads=2, num_kv_heads=2)
    want = _reference_attention(q, k, v, 0.5, torch.zeros(1, 1, 1, 3).masked_fill(~keep, float("-inf")))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rmsnorm_and_gelu_kernels():
    x = torch.randn(2, 3, 8)
    scale = torch.randn(8)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale
    torch.testing.assert_close(graphopt_RMSNorm(x, scale, epsilon=1e-6), want)
    torch.testing.assert_close(graphopt_Gelu(x, approximate="tanh"), torch.nn.functional.gelu(x, approximate="tanh"))
    with pytest.raises(ValueError, match="approximate must be"):
        graphopt_Gelu(x, approximate="fast")


def test_graphopt_ops_roundtrip_through_onnx_and_run_as_fx():
    graph = _attention_graph(causal=0)
    model = graph.to_onnx(keep_graphopt_ops=True)
    assert {o.domain: o.version for o in model.opset_import}["graphopt"] == 1
    again = graphopt.from_onnx(model)
    assert str(again) == str(graph)
    gen = np.random.default_rng(0)
    feeds = {"q": gen.standard_normal((1, 4, 3, 8), dtype=np.float32), "k": gen.standard_normal((1, 2, 5, 8), dtype=np.float32),
             "v": gen.standard_normal((1, 2, 5, 6), dtype=np.float32)}
    from graphopt.check import run_graph

    want = _reference_attention(*(torch.from_numpy(feeds[n]) for n in "qkv"), 8 ** -0.5)
    for engine in ("torch", "onnxruntime"):
        (out,) = run_graph(again, feeds, engine=engine)
        np.testing.assert_allclose(out, want.numpy(), atol=1e-5)


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_lowering_to_standard_onnx_matches_the_torch_kernel(causal, kv_heads):
    import onnx

    graph = _attention_graph(kv_heads=kv_heads, causal=causal, bias=True)
    model = graph.to_onnx()
    assert {o.domain for o in model.opset_import} == {""}
    assert not any(n.domain for n in model.graph.node)
    onnx.checker.check_model(model, full_check=True)
    gen = np.random.default_rng(0)
    feeds = {"q": gen.standard_normal((2, 4, 3, 8), dtype=np.float32), "k": gen.standard_normal((2, kv_heads, 5, 8), dtype=np.float32),
             "v": gen.standard_normal((2, kv_heads, 5, 6), dtype=np.float32), "bias": gen.standard_normal((1, 1, 1, 5), dtype=np.float32)}
    from graphopt.check import run_graph

    np.testing.assert_allclose(run_graph(graph, feeds)[0], run_graph(graph, feeds, engine="torch")[0], atol=1e-5)


def test_rmsnorm_and_gelu_lower_to_standard_onnx():
    from graphopt.check import run_graph

    for opset in (17, 18):
        graph = Graph("norms", {"": opset})
        x = graph.add_input("x", TensorType(F32, ("n", 8)))
        norm = graph.add_node("RMSNorm", [x, graph.add_constant("w", np.linspace(0.5, 2, 8, dtype=np.float32))], {"epsilon": 1e-6}, domain="graphopt")
        erf = graph.add_node("Gelu", [norm.output], domain="graphopt")
        tanh = graph.add_node("Gelu", [erf.output], {"approximate": "tanh"}, domain="graphopt", output_names=["y"])
        graph.set_outputs([tanh.output])
        feeds = {"x": np.random.default_rng(opset).standard_normal((3, 8), dtype=np.float32)}
        np.testing.assert_allclose(run_graph(graph, feeds)[0], run_graph(graph, feeds, engine="torch")[0], atol=1e-5)
        assert graph.to_onnx().graph.output[0].name == "y"
