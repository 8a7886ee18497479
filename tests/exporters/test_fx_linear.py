"""Prepacked oneDNN linears on the CPU torch target: what is folded, and equal outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import max_abs_diff

import graphopt
from graphopt.exporters.fx_export import to_fx
from graphopt.exporters.fx_linear import plan_linears, prepacked_linear_available
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph
from graphopt.ir.types import TensorType

pytestmark = pytest.mark.skipif(not prepacked_linear_available(), reason="torch built without oneDNN")


def _packed_calls(module) -> int:
    return sum(1 for n in module.graph.nodes if getattr(n.target, "__name__", "") == "packed_linear")


def _mlp(share_matmul: bool = False) -> Graph:
    """x @ W1 + b1 -> Gelu -> @ W2 (+ b2); optionally the first matmul is also an output."""
    rng = np.random.default_rng(0)
    graph = Graph("mlp", opset_imports={"": 17, "graphopt": 1})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", "seq", 8)))
    w1 = graph.add_constant("w1", rng.standard_normal((8, 16)).astype(np.float32))
    b1 = graph.add_constant("b1", rng.standard_normal(16).astype(np.float32))
    w2 = graph.add_constant("w2", rng.standard_normal((16, 4)).astype(np.float32))
    b2 = graph.add_constant("b2", rng.standard_normal(4).astype(np.float32))
    h = graph.add_node("MatMul", [x, w1]).output
    biased = graph.add_node("Add", [h, b1]).output
    act = graph.add_node("Gelu", [biased], domain="graphopt").output
    y = graph.add_node("Add", [b2, graph.add_node("MatMul", [act, w2]).output]).output
    graph.set_outputs([y, h] if share_matmul else [y])
    return graph


def test_bias_and_gelu_fold_into_the_linear_and_outputs_match():
    graph = _mlp()
    plans = list(plan_linears(graph).values())
    assert [len(p.absorbed) for p in plans] == [3, 2]
    assert plans[0].gelu == "none" and plans[0].bias is not None and plans[1].gelu is None
    x = torch.randn(2, 5, 8)
    packed, plain = to_fx(graph, prepack_linears=True), to_fx(graph)
    assert _packed_calls(packed) == 2 and len([n for n in packed.graph.nodes if n.op == "call_function"]) == 2
    with torch.no_grad():
        assert max_abs_diff(plain(x), packed(x)) <= 1e-5


def test_a_matmul_read_elsewhere_keeps_its_own_output():
    graph = _mlp(share_matmul=True)
    first = plan_linears(graph)[id(graph.nodes[0])]
    assert first.absorbed == [graph.nodes[0]] and first.bias is None
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        assert max_abs_diff(to_fx(graph)(x), to_fx(graph, prepack_linears=True)(x)) <= 1e-5


def test_matmuls_without_constant_float_weights_are_left_alone():
    graph = Graph("g", opset_imports={"": 17})
    a = graph.add_input("a", TensorType(DType.FLOAT, (4, 8)))
    b = graph.add_input("b", TensorType(DType.FLOAT, (8, 3)))
    graph.set_outputs([graph.add_node("MatMul", [a, b]).output])
    assert plan_linears(graph) == {}


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit"])
def test_zoo_models_match_with_prepacked_linears(zoo, zoo_onnx, name):
    zm = zoo(name)
    graph = graphopt.optimize(str(zoo_onnx(name)), "fuse")
    packed = to_fx(graph, prepack_linears=True)
    assert _packed_calls(packed) >= 4
    with torch.no_grad():
        assert max_abs_diff(zm.model(**zm.inputs), packed(*zm.inputs.values())) <= 1e-4
