"""FLOP estimates: exact counts on small graphs, symbol sizes, and a plausible zoo BERT figure."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt import DType, Graph, TensorType
from graphopt.check import sample_inputs
from graphopt.flops import estimate_flops
from graphopt.frontends.onnx_import import from_onnx


def f32(*shape) -> TensorType:
    return TensorType(DType.FLOAT, shape)


def weight(graph: Graph, name: str, *shape: int):
    return graph.add_constant(name, np.ones(shape, dtype=np.float32))


def single_op(op: str, operands: list, **attrs) -> Graph:
    """A graph running one `op` on graph inputs (TensorTypes) and constants (shape tuples)."""
    graph = Graph("one_op")
    inputs = [
        weight(graph, f"c{index}", *operand) if isinstance(operand, tuple) else graph.add_input(f"x{index}", operand)
        for index, operand in enumerate(operands)
    ]
    node = graph.add_node(op, inputs, attrs)
    graph.set_outputs([node.output])
    return graph


@pytest.mark.parametrize("op, operands, attrs, flops", [
    ("MatMul", [f32(4, 8), (8, 16)], {}, 2 * 4 * 16 * 8),
    ("MatMul", [f32(2, 3, 4, 5), f32(2, 3, 5, 6)], {}, 2 * (2 * 3 * 4 * 6) * 5),
    ("MatMul", [f32(2, 1, 4, 5), f32(3, 5, 6)], {}, 2 * (2 * 3 * 4 * 6) * 5),
    ("MatMul", [f32(5), f32(5, 7)], {}, 2 * 7 * 5),
    ("Gemm", [f32(4, 8), (16, 8), (16,)], {"transB": 1}, 2 * 4 * 16 * 8 + 4 * 16),
    ("Gemm", [f32(8, 4), (8, 16)], {"transA": 1}, 2 * 4 * 16 * 8),
    ("Conv", [f32(1, 3, 8, 8), (6, 3, 3, 3), (6,)], {"pads": (1, 1, 1, 1)}, 2 * (6 * 8 * 8) * 27 + 6 * 8 * 8),
    ("Conv", [f32(1, 4, 8, 8), (4, 1, 3, 3)], {"group": 4}, 2 * (4 * 6 * 6) * 9),
    ("Add", [f32(3, 4), f32(4)], {}, 12),
    ("Where", [TensorType(DType.BOOL, (3, 1)), f32(1, 4), f32(3, 4)], {}, 12),
    ("Softmax", [f32(2, 8)], {"axis": -1}, 5 * 16),
    ("LayerNormalization", [f32(2, 8), (8,), (8,)], {"axis": -1}, 7 * 16),
    ("ReduceMean", [f32(2, 3, 4)], {"axes": (2,)}, 24),
    ("Reshape", [f32(2, 3, 4), TensorType(DType.INT64, (2,))], {}, 0),
])
def test_exact_counts(op, operands, attrs, flops):
    graph = single_op(op, operands, **attrs)
    report = estimate_flops(graph)
    assert report["total"] == flops
    assert report["by_op"] == ({op: flops} if flops else {})
    assert report["uncounted"] == {}


def test_attention_counts_every_score():
    graph = Graph("attention")
    q = graph.add_input("q", f32(1, 4, 8, 16))
    k, v = graph.add_input("k", f32(1, 2, 8, 16)), graph.add_input("v", f32(1, 2, 8, 16))
    node = graph.add_node("Attention", [q, k, v], {"num_heads": 4, "num_kv_heads": 2}, domain="graphopt")
    graph.set_outputs([node.output])
    scores = 1 * 4 * 8 * 8
    assert estimate_flops(graph)["by_op"] == {"graphopt::Attention": scores * (2 * 16 + 2 * 16 + 1 + 5)}


def test_symbolic_dims_take_given_or_default_sizes():
    graph = single_op("MatMul", [f32("batch", "seq", 8), (8, 4)])
    defaults = estimate_flops(graph)
    assert defaults["sizes"] == {"batch": 2, "seq": 8}
    assert defaults["total"] == 2 * (2 * 8 * 4) * 8
    given = estimate_flops(graph, {"seq": 100})
    assert given["sizes"] == {"batch": 2, "seq": 100}
    assert given["total"] == 2 * (2 * 100 * 4) * 8


def test_default_sizes_match_sample_inputs():
    graph = Graph("sizes")
    for name, shape in (("ids", ("batch", "seq_len")), ("pixels", ("batch", 3, None))):
        graph.add_input(name, f32(*shape))
    node = graph.add_node("Relu", [graph.inputs[0]])
    graph.set_outputs([node.output, graph.inputs[1]])
    sizes = estimate_flops(graph)["sizes"]
    feeds = sample_inputs(graph)
    assert feeds["ids"].shape == (sizes["batch"], sizes["seq_len"])
    assert feeds["pixels"].shape == (sizes["batch"], 3, sizes["?pixels"])


def test_unknown_intermediate_shapes_are_inferred_for_the_sample_sizes():
    """[batch, seq, 8] -> Reshape [-1, 8] is recorded as [batch*seq, 8]; the estimate sizes it from its symbols."""
    graph = Graph("reshape")
    x = graph.add_input("x", f32("batch", "seq", 8))
    flat = graph.add_node("Reshape", [x, graph.add_constant("shape", np.array([-1, 8]))])
    assert flat.output.shape == ("batch*seq", 8)
    product = graph.add_node("MatMul", [flat.output, weight(graph, "w", 8, 4)], infer=False)
    graph.set_outputs([product.output])
    assert estimate_flops(graph)["by_op"] == {"MatMul": 2 * (16 * 4) * 8}


def test_unknown_ops_are_reported_not_guessed():
    graph = Graph("custom", {"": 18, "my.domain": 1})
    x = graph.add_input("x", f32(2, 4))
    custom = graph.add_node("Mystery", [x], domain="my.domain")
    relu = graph.add_node("Relu", [x])
    graph.set_outputs([custom.output, relu.output])
    report = estimate_flops(graph)
    assert report["uncounted"] == {"my.domain::Mystery": 1}
    assert report["total"] == 8


def test_zoo_bert_is_dominated_by_its_matmuls(zoo_onnx):
    """Weight MatMuls cost 2 * params * tokens; attention and elementwise ops add a little."""
    graph = from_onnx(zoo_onnx("bert"))
    report = estimate_flops(graph)
    tokens = report["sizes"]["batch"] * report["sizes"]["seq"]
    matmul_params = sum(
        value.const.size for node in graph.nodes if node.op_type in ("MatMul", "Gemm")
        for value in node.inputs if value is not None and value.const is not None
    )
    expected = 2 * matmul_params * tokens
    assert report["uncounted"] == {}
    assert report["by_op"]["MatMul"] == pytest.approx(expected, rel=0.10)
    assert expected < report["total"] < 1.3 * expected
    assert set(report["by_op"]) >= {"MatMul", "Add", "Softmax", "LayerNormalization", "Erf"}
