"""verify() names the node for each kind of malformed graph."""

import pytest

from graphopt import DType, Graph, TensorType, VerificationError
from graphopt.ir.graph import Node, Use, Value

F32 = DType.FLOAT


def _graph() -> Graph:
    graph = Graph("g")
    x = graph.add_input("x", TensorType(F32, (2, 3)))
    a = graph.add_node("Relu", [x], name="first", output_names=["a"])
    b = graph.add_node("Neg", [a.output], name="second", output_names=["b"])
    graph.set_outputs([b.output])
    return graph


def test_sound_graph_passes():
    _graph().verify()


def test_cycle_is_reported_with_its_nodes():
    graph = _graph()
    first, second = graph.nodes
    first.replace_input(0, second.output)
    with pytest.raises(VerificationError) as info:
        graph.verify()
    text = str(info.value)
    assert "cycle through nodes 'first' -> 'second' -> 'first'" in text or "cycle through nodes 'second' -> 'first' -> 'second'" in text
    assert "node 'first' (Relu) reads %b before it is defined" in text


def test_use_before_def_names_node():
    graph = _graph()
    first, second = graph.nodes
    graph.move_before(second, first)
    with pytest.raises(VerificationError, match=r"node 'second' \(Neg\) reads %a before it is defined"):
        graph.verify()


def test_dangling_value_names_node():
    graph = _graph()
    ghost = Value("ghost", TensorType(F32, (2, 3)))
    graph.nodes[1].replace_input(0, ghost)
    with pytest.raises(VerificationError, match=r"node 'second' \(Neg\) reads %ghost, which is dangling"):
        graph.verify()


def test_type_mismatch_between_inputs_names_node():
    graph = Graph("g")
    x = graph.add_input("x", TensorType(F32, (2,)))
    i = graph.add_input("i", TensorType(DType.INT64, (2,)))
    add = graph.add_node("Add", [x, i], name="mixed", infer=False)
    graph.set_outputs([add.output])
    with pytest.raises(VerificationError, match=r"node 'mixed' \(Add\): inputs must share one element type, got %x: f32, %i: i64"):
        graph.verify()


def test_recorded_type_disagreeing_with_inference_names_node():
    graph = _graph()
    graph.nodes[0].output.type = TensorType(DType.INT64, (2, 3))
    with pytest.raises(VerificationError, match=r"node 'first' \(Relu\): output %a is recorded as i64\[2, 3\] but its inputs give f32\[2, 3\]"):
        graph.verify()


def test_static_shape_mismatch_names_node():
    graph = _graph()
    graph.nodes[1].output.type = TensorType(F32, (2, 4))
    with pytest.raises(VerificationError, match=r"node 'second' \(Neg\).*dim 1 differs"):
        graph.verify()


def test_stale_use_list_is_reported():
    graph = _graph()
    graph.inputs[0]._uses.append(Use(graph.nodes[1], 0))
    with pytest.raises(VerificationError, match="use list does not match"):
        graph.verify()


def test_duplicate_names_are_reported():
    graph = _graph()
    graph.nodes[1].output.name = "a"
    with pytest.raises(VerificationError, match=r"value name %a is defined twice"):
        graph.verify()


def test_wrong_input_count_is_reported():
    graph = Graph("g")
    x = graph.add_input("x", TensorType(F32, (2,)))
    node = graph.add_node("MatMul", [x], name="lonely", infer=False)
    graph.set_outputs([node.output])
    with pytest.raises(VerificationError, match=r"node 'lonely' \(MatMul\) has 1 inputs"):
        graph.verify()


def test_all_problems_listed_at_once():
    graph = _graph()
    graph.nodes[1].output.name = "a"
    graph.inputs[0]._uses.clear()
    with pytest.raises(VerificationError) as info:
        graph.verify()
    assert len(info.value.problems) >= 2


def test_detached_node_output_as_graph_output():
    graph = _graph()
    stray = Node("Relu", [graph.inputs[0]])
    graph._outputs.append(stray.output)
    with pytest.raises(VerificationError, match="is not defined in graph 'g'"):
        graph.verify()
