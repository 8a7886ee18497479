"""`F.linear` calls for matmuls by the transpose of a weight graph input (the backend's
autograd path): which nodes become one call, equal outputs, gradients reaching the weight."""

from __future__ import annotations

import numpy as np
import torch

from graphopt import DType, Graph, TensorType
from graphopt.check import run_graph
from graphopt.exporters.fx_export import to_fx


def _linear_graph(bias_as_input: bool, shared_transpose: bool = False) -> Graph:
    graph = Graph("linear", opset_imports={"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, (2, 3, 4)))
    w = graph.add_input("w", TensorType(DType.FLOAT, (5, 4)))
    b = graph.add_input("b", TensorType(DType.FLOAT, (5,))) if bias_as_input else graph.add_constant("b", np.arange(5, dtype=np.float32))
    wt = graph.add_node("Transpose", [w], {"perm": (1, 0)}).output
    y = graph.add_node("Add", [graph.add_node("MatMul", [x, wt]).output, b]).output
    outputs = [graph.add_node("Relu", [y]).output]
    if shared_transpose:
        outputs.append(graph.add_node("Neg", [wt]).output)
    graph.set_outputs(outputs)
    return graph


def _feeds(graph: Graph) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in graph.inputs}


def _calls(module, name: str) -> int:
    return sum(name in line for line in module.code.splitlines())


def test_matmul_by_a_transposed_weight_input_and_its_bias_add_become_one_linear():
    for bias_as_input in (True, False):
        graph = _linear_graph(bias_as_input)
        module = to_fx(graph)
        assert _calls(module, "torch._C._nn.linear(") == 1
        assert _calls(module, "onnx_MatMul") == 0 and _calls(module, "onnx_Add") == 0 and _calls(module, "onnx_Transpose") == 0
        feeds = _feeds(graph)
        got = module(*(torch.from_numpy(feeds[v.name]) for v in graph.inputs))[0]
        np.testing.assert_allclose(got.numpy(), run_graph(graph, feeds)[0], rtol=1e-5, atol=1e-6)


def test_a_transpose_read_elsewhere_stays_and_gradients_reach_the_weight():
    graph = _linear_graph(True, shared_transpose=True)
    module = to_fx(graph)
    assert _calls(module, "torch._C._nn.linear(") == 1 and _calls(module, "onnx_Transpose") == 1
    feeds = _feeds(graph)
    x, w, b = (torch.from_numpy(feeds[v.name]).requires_grad_() for v in graph.inputs)
    got = module(x, w, b)
    expected = (torch.relu(x @ w.T + b), -w.T)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    (got[0].sum() + got[1].sum()).backward()
    w_ref = w.detach().clone().requires_grad_()
    (torch.relu(x.detach() @ w_ref.T + b.detach()).sum() - w_ref.T.sum()).backward()
    torch.testing.assert_close(w.grad, w_ref.grad)
