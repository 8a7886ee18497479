"""The ONNX export of a graph at opset >= 23 writes ONNX's own RMSNormalization and
RotaryEmbedding for graphopt's ops, with the results of their formulas (ONNX Runtime runs both)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import graphopt
from graphopt.exporters.onnx_lowering import decompose_graphopt_ops
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.ir.types import TensorType

B, H, S, D = 2, 3, 5, 8


def _graph(opset: int, rotary_dim: int = 0, interleaved: int = 0, shared_tables: bool = False) -> Graph:
    """q = RotaryEmbedding(RMSNorm(x) as [B, H, S, D], cos, sin), n = SkipLayerNorm(x, skip) (simplified)."""
    graph = Graph("g", opset_imports={"": opset})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", "seq", H * D)))
    skip = graph.add_input("skip", TensorType(DType.FLOAT, ("batch", "seq", H * D)))
    half = (rotary_dim or D) // 2
    table = ("seq", half) if shared_tables else ("batch", "seq", half)
    cos = graph.add_input("cos", TensorType(DType.FLOAT, table))
    sin = graph.add_input("sin", TensorType(DType.FLOAT, table))
    scale = graph.add_constant("scale", np.linspace(0.5, 2.0, H * D, dtype=np.float32))
    norm = graph.add_node("RMSNorm", [x, scale], {"epsilon": 1e-5}, domain=GRAPHOPT_DOMAIN).output
    heads = graph.add_node("Reshape", [norm, graph.add_constant("shape", np.array([0, 0, H, D], np.int64))]).output
    heads = graph.add_node("Transpose", [heads], {"perm": [0, 2, 1, 3]}).output
    attrs = {"interleaved": interleaved, **({"rotary_dim": rotary_dim} if rotary_dim else {})}
    rotated = graph.add_node("RotaryEmbedding", [heads, cos, sin], attrs, domain=GRAPHOPT_DOMAIN, output_names=["q"]).output
    summed = graph.add_node("SkipLayerNorm", [x, skip, scale], {"epsilon": 1e-5, "simplified": 1}, domain=GRAPHOPT_DOMAIN,
                            num_outputs=2, output_names=["n", "sum"])
    graph.set_outputs([rotated, summed.outputs[0]])
    return graph


def _feeds(rotary_dim: int = 0, shared_tables: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    half = (rotary_dim or D) // 2
    angles = rng.uniform(0, 6, (S, half) if shared_tables else (B, S, half)).astype(np.float32)
    return {"x": rng.standard_normal((B, S, H * D)).astype(np.float32), "skip": rng.standard_normal((B, S, H * D)).astype(np.float32),
            "cos": np.cos(angles), "sin": np.sin(angles)}


def _run(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(graphopt.to_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("rotary_dim, interleaved", [(0, 0), (0, 1), (4, 0)])
def test_opset_23_export_writes_rmsnormalization_and_rotaryembedding_equal_to_the_formulas(rotary_dim, interleaved):
    graph = _graph(23, rotary_dim, interleaved)
    exported = decompose_graphopt_ops(graph)
    counts = exported.op_counts()
    assert counts["RMSNormalization"] == 2 and counts["RotaryEmbedding"] == 1
    assert "ReduceMean" not in counts and not any(n.domain == GRAPHOPT_DOMAIN for n in exported.nodes)
    formulas = decompose_graphopt_ops(graph, standard_ops=False)
    assert "RMSNormalization" not in formulas.op_counts() and "RotaryEmbedding" not in formulas.op_counts()
    feeds = _feeds(rotary_dim)
    for standard, formula in zip(_run(graph, feeds), _run(formulas, feeds)):
        np.testing.assert_allclose(standard, formula, rtol=1e-5, atol=1e-5)


def test_below_opset_23_and_for_tables_shared_by_the_batch_the_formulas_stay():
    assert "RMSNormalization" not in decompose_graphopt_ops(_graph(18)).op_counts()
    shared = decompose_graphopt_ops(_graph(23, shared_tables=True)).op_counts()
    assert "RotaryEmbedding" not in shared and shared["RMSNormalization"] == 2
    feeds = _feeds(shared_tables=True)
    for standard, formula in zip(_run(_graph(23, shared_tables=True), feeds), _run(decompose_graphopt_ops(_graph(23, shared_tables=True), standard_ops=False), feeds)):
        np.testing.assert_allclose(standard, formula, rtol=1e-5, atol=1e-5)


def test_the_decompose_pass_of_target_lowerings_keeps_the_formulas_at_opset_23():
    from graphopt.passes.decompose_graphopt_ops import DecomposeGraphoptOps
    from graphopt.pass_base import PassContext

    graph = _graph(23)
    DecomposeGraphoptOps().run(graph, PassContext())
    assert "RMSNormalization" not in graph.op_counts() and "RotaryEmbedding" not in graph.op_counts()
