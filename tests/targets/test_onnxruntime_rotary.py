"""graphopt::RotaryEmbedding lowered to ORT's contrib op and to ONNX's opset-23 op equals the
torch kernel and the standard decomposition; forms the kernels would get wrong are refused."""

import numpy as np
import pytest
import torch

from graphopt import DType, Graph, TensorType
from graphopt.check import run_graph
from graphopt.exporters.onnx_lowering import _Builder
from graphopt.exporters.rotary_kernels import graphopt_RotaryEmbedding
from graphopt.exporters.rotary_lowering import decompose_rotary
from graphopt.targets.onnxruntime_rotary import lower_rotary_contrib, lower_rotary_onnx23

B, H, S, D = 2, 3, 5, 16


def _graph(*, rotary_dim=0, interleaved=0, cos_shape=(B, S), heads=H, opset=17) -> Graph:
    graph = Graph("rotary")
    graph.opset_imports[""] = opset
    half = (rotary_dim or D) // 2
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", heads, "seq", D)))
    dims = tuple("batch" if d == B else "seq" if d == S else d for d in cos_shape)
    cos = graph.add_input("cos", TensorType(DType.FLOAT, (*dims, half)))
    sin = graph.add_input("sin", TensorType(DType.FLOAT, (*dims, half)))
    attrs = {k: v for k, v in (("rotary_dim", rotary_dim), ("interleaved", interleaved)) if v}
    node = graph.add_node("RotaryEmbedding", [x, cos, sin], attrs or None, domain="graphopt")
    graph.set_outputs([node.output])
    return graph


def _feeds(cos_shape, rotary_dim):
    rng = np.random.default_rng(0)
    angles = rng.uniform(-3, 3, (*cos_shape, (rotary_dim or D) // 2)).astype(np.float32)
    return {"x": rng.standard_normal((B, H, S, D)).astype(np.float32), "cos": np.cos(angles), "sin": np.sin(angles)}


def _expected(feeds, rotary_dim, interleaved):
    args = [torch.from_numpy(feeds[k]) for k in ("x", "cos", "sin")]
    return graphopt_RotaryEmbedding(*args, interleaved=interleaved, rotary_dim=rotary_dim).numpy()


def _lowered(graph, lower):
    graph = graph.clone()
    (node,) = [n for n in graph.nodes if n.domain == "graphopt"]
    new = lower(graph, node)
    return graph, new


FORMS = [
    pytest.param(dict(), id="half-split"),
    pytest.param(dict(interleaved=1), id="interleaved"),
    pytest.param(dict(rotary_dim=8), id="partial"),
    pytest.param(dict(rotary_dim=8, interleaved=1), id="partial-interleaved"),
    pytest.param(dict(cos_shape=(1, S)), id="batch-broadcast"),
    pytest.param(dict(cos_shape=(S,)), id="rank-2-cos"),
]


@pytest.mark.parametrize("form", FORMS)
def test_decomposition_equals_the_torch_kernel(form):
    graph = _graph(**form)
    feeds = _feeds(form.get("cos_shape", (B, S)), form.get("rotary_dim", 0))
    expected = _expected(feeds, form.get("rotary_dim", 0), form.get("interleaved", 0))
    (node,) = graph.nodes
    graph.replace_value(node.output, decompose_rotary(_Builder(graph, node), node))
    graph.erase(node)
    assert not any(n.domain for n in graph.nodes)
    np.testing.assert_allclose(run_graph(graph, feeds)[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("lower, opset, op", [
    (lower_rotary_contrib, 17, "com.microsoft::RotaryEmbedding"),
    (lower_rotary_onnx23, 23, "RotaryEmbedding"),
], ids=["contrib", "onnx23"])
def test_ort_kernels_equal_the_torch_kernel(form, lower, opset, op):
    graph, new = _lowered(_graph(opset=opset, **form), lower)
    assert new is not None
    assert graph.op_counts()[op] == 1 and "graphopt::RotaryEmbedding" not in graph.op_counts()
    rotary_dim = form.get("rotary_dim", 0)
    feeds = _feeds(form.get("cos_shape", (B, S)), rotary_dim)
    np.testing.assert_allclose(run_graph(graph, feeds)[0], _expected(feeds, rotary_dim, form.get("interleaved", 0)), atol=1e-6, rtol=0)


def test_contrib_refuses_partial_rotary_without_a_static_head_count():
    graph, new = _lowered(_graph(rotary_dim=8, heads="heads"), lower_rotary_contrib)
    assert new is None
    assert graph.op_counts() == {"graphopt::RotaryEmbedding": 1}


def test_onnx23_refuses_graphs_below_opset_23():
    graph, new = _lowered(_graph(opset=22), lower_rotary_onnx23)
    assert new is None
    assert graph.op_counts() == {"graphopt::RotaryEmbedding": 1}
