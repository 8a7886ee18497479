"""eliminate-noops: ops that return their input go; graph output names stay."""

import numpy as np
import pytest
from graphopt.passes.noops import EliminateNoops
from pass_testing import run_checked as checked

from graphopt import DType, Graph, TensorType, Value
from graphopt.pass_base import PassResult

F32 = DType.FLOAT


def ints(graph: Graph, name: str, *values: int) -> Value:
    return graph.add_constant(name, np.array(values, np.int64))


def run_checked(graph: Graph) -> PassResult:
    return checked(EliminateNoops(), graph)


def test_removes_each_kind_of_noop():
    graph = Graph("noops")
    x = graph.add_input("x", TensorType(F32, ("batch", 4)))
    zeros = graph.add_constant("zeros", np.zeros(4, np.float32))
    ones = graph.add_constant("ones", np.ones((1, 4), np.float32))
    shape = ints(graph, "shape", 0, 4)
    value = graph.add_node("Identity", [x], output_names=["a"]).output
    value = graph.add_node("Cast", [value], {"to": int(F32)}, output_names=["b"]).output
    value = graph.add_node("Reshape", [value, shape], output_names=["c"]).output
    value = graph.add_node("Transpose", [value], {"perm": (0, 1)}, output_names=["d"]).output
    value = graph.add_node("Add", [zeros, value], output_names=["e"]).output
    value = graph.add_node("Mul", [value, ones], output_names=["f"]).output
    value = graph.add_node("Concat", [value], {"axis": 0}, output_names=["g"]).output
    value = graph.add_node("Dropout", [value], output_names=["h"]).output
    relu = graph.add_node("Relu", [value], output_names=["y"])
    graph.set_outputs([relu.output])

    result = run_checked(graph)

    assert result.changed and result.stats == {"removed": 8}
    assert str(graph) == (
        "graph noops (\n"
        "  %x: f32[batch, 4]\n"
        ") {\n"
        "  %zeros: f32[4] = const [0.0, 0.0, 0.0, 0.0]\n"
        "  %ones: f32[1, 4] = const [1.0, 1.0, 1.0, 1.0]\n"
        "  %shape: i64[2] = const [0, 4]\n"
        "  %y: f32[batch, 4] = Relu(%x)\n"
        "  return %y\n"
        "}\n"
    )


def test_keeps_ops_that_change_data_or_shape():
    graph = Graph("kept")
    x = graph.add_input("x", TensorType(F32, (2, 4)))
    zeros = graph.add_constant("zeros", np.zeros((3, 2, 4), np.float32))
    twos = graph.add_constant("twos", np.full(4, 2, np.float32))
    starts, ends = ints(graph, "starts", -1), ints(graph, "ends", -10)
    axes, steps = ints(graph, "axes", 1), ints(graph, "steps", -1)
    broadcast = graph.add_node("Add", [x, zeros], output_names=["broadcast"])
    scaled = graph.add_node("Mul", [x, twos], output_names=["scaled"])
    reversed_ = graph.add_node("Slice", [x, starts, ends, axes, steps], output_names=["reversed"])
    swapped = graph.add_node("Transpose", [x], {"perm": (1, 0)}, output_names=["swapped"])
    halved = graph.add_node("Cast", [x], {"to": int(DType.FLOAT16)}, output_names=["halved"])
    graph.set_outputs([broadcast.output, scaled.output, reversed_.output, swapped.output, halved.output])
    text = str(graph)

    result = run_checked(graph)

    assert not result.changed and str(graph) == text


def test_whole_slice_and_same_shape_expand_go():
    graph = Graph("whole")
    x = graph.add_input("x", TensorType(F32, ("batch", 4)))
    starts, ends = ints(graph, "starts", 0), ints(graph, "ends", 2**63 - 1)
    axes, shape = ints(graph, "axes", 1), ints(graph, "shape", 1, 4)
    sliced = graph.add_node("Slice", [x, starts, ends, axes], output_names=["sliced"])
    expanded = graph.add_node("Expand", [sliced.output, shape], output_names=["expanded"])
    out = graph.add_node("Neg", [expanded.output], output_names=["y"])
    graph.set_outputs([out.output])

    assert run_checked(graph).stats == {"removed": 2}
    assert [node.op_type for node in graph] == ["Neg"]


def test_graph_output_keeps_its_name():
    graph = Graph("named")
    x = graph.add_input("x", TensorType(F32, ("batch", 4)))
    relu = graph.add_node("Relu", [x], output_names=["r"])
    out = graph.add_node("Identity", [relu.output], output_names=["y"])
    graph.set_outputs([out.output])

    run_checked(graph)

    assert str(graph) == (
        "graph named (\n"
        "  %x: f32[batch, 4]\n"
        ") {\n"
        "  %y: f32[batch, 4] = Relu(%x)\n"
        "  return %y\n"
        "}\n"
    )


def test_identity_from_graph_input_to_graph_output_stays():
    graph = Graph("passthrough")
    x = graph.add_input("x", TensorType(F32, (2,)))
    relu = graph.add_node("Relu", [x], output_names=["r"])
    first = graph.add_node("Identity", [x], output_names=["y"])
    second = graph.add_node("Identity", [relu.output], output_names=["z"])
    third = graph.add_node("Identity", [relu.output], output_names=["w"])
    graph.set_outputs([first.output, second.output, third.output])

    result = run_checked(graph)

    # y would expose input x; only one of z and w can take over %r
    assert result.stats == {"removed": 1}
    assert [v.name for v in graph.outputs] == ["y", "z", "w"]
    assert [node.op_type for node in graph] == ["Relu", "Identity", "Identity"]


@pytest.mark.parametrize("training", [None, False, True])
def test_dropout_goes_only_in_inference_with_its_mask_unused(training):
    graph = Graph("dropout")
    x = graph.add_input("x", TensorType(F32, (2, 4)))
    inputs = [x]
    if training is not None:
        ratio = graph.add_constant("ratio", np.array(0.0, np.float32))
        inputs += [ratio, graph.add_constant("training", np.array(training))]
    dropout = graph.add_node("Dropout", inputs, num_outputs=2, output_names=["d", "mask"])
    out = graph.add_node("Relu", [dropout.outputs[0]], output_names=["y"])
    graph.set_outputs([out.output])

    assert run_checked(graph).changed is (not training)


def test_dropout_whose_mask_is_read_stays():
    graph = Graph("mask")
    x = graph.add_input("x", TensorType(F32, (2, 4)))
    dropout = graph.add_node("Dropout", [x], num_outputs=2, output_names=["d", "mask"])
    graph.set_outputs([graph.add_node("Relu", [dropout.outputs[0]]).output, dropout.outputs[1]])

    assert not run_checked(graph).changed


def test_where_with_constant_condition_selects_a_branch():
    graph = Graph("where")
    x = graph.add_input("x", TensorType(F32, (2, 4)))
    y = graph.add_input("y", TensorType(F32, (2, 4)))
    never = graph.add_constant("never", np.zeros((1, 4), bool))
    pick = graph.add_node("Where", [never, x, y], output_names=["pick"])
    graph.set_outputs([graph.add_node("Relu", [pick.output], output_names=["out"]).output])

    run_checked(graph)

    assert graph.nodes[0].op_type == "Relu" and graph.nodes[0].inputs == (y,)
