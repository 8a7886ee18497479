"""Golden test of the IR text form: stable, readable, with symbolic types."""

import pathlib

import numpy as np

from graphopt import DType, Graph, TensorType

GOLDEN = pathlib.Path(__file__).parent / "golden" / "printer_small.txt"


def small_attention_like_graph() -> Graph:
    graph = Graph("small", {"": 18, "com.example": 1})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", "seq", 8)))
    w = graph.add_constant("w", np.arange(64, dtype=np.float32).reshape(8, 8) / 64)
    shape = graph.add_constant("heads_shape", np.array([0, 0, 2, 4], dtype=np.int64))
    proj = graph.add_node("MatMul", [x, w], name="proj", output_names=["h"])
    split = graph.add_node("Reshape", [proj.output, shape], name="split_heads", output_names=["heads"])
    perm = graph.add_node("Transpose", [split.output], {"perm": (0, 2, 1, 3)}, name="to_bhsd", output_names=["bhsd"])
    soft = graph.add_node("Softmax", [perm.output], {"axis": -1}, name="softmax", output_names=["probs"])
    halves = graph.add_node("Split", [soft.output], {"axis": 3, "num_outputs": 2}, num_outputs=2, name="halves", output_names=["lo", "hi"])
    custom = graph.add_node("Mystery", [halves.outputs[0], halves.outputs[1]], {"scale": 0.125, "mode": "fast"}, domain="com.example", name="mystery", output_names=["out"])
    graph.set_outputs([custom.output, halves.outputs[1]])
    return graph


def test_printer_matches_golden():
    text = str(small_attention_like_graph())
    assert text == GOLDEN.read_text()


def test_printer_is_stable_across_clones():
    graph = small_attention_like_graph()
    assert str(graph.clone()) == str(graph)
