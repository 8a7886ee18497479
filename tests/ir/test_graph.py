"""The rewrite API keeps use-def chains right and refuses illegal edits."""

import numpy as np
import pytest

from graphopt import DType, Graph, GraphError, TensorType, VerificationError

F32 = DType.FLOAT


def _chain() -> tuple[Graph, list]:
    graph = Graph("chain")
    x = graph.add_input("x", TensorType(F32, ("batch", 4)))
    w = graph.add_constant("w", np.ones((4, 4), np.float32))
    mm = graph.add_node("MatMul", [x, w], output_names=["y"])
    relu = graph.add_node("Relu", [mm.output], output_names=["z"])
    graph.set_outputs([relu.output])
    return graph, [x, w, mm, relu]


def test_uses_follow_inputs():
    graph, (x, w, mm, relu) = _chain()
    assert [u.node for u in x.uses()] == [mm]
    assert mm.output.users() == [relu]
    assert relu.output.is_graph_output


def test_add_node_infers_symbolic_types():
    graph, (_, _, mm, relu) = _chain()
    assert mm.output.type == TensorType(F32, ("batch", 4))
    assert relu.output.type == TensorType(F32, ("batch", 4))


def test_replace_all_uses_with_moves_readers_and_graph_outputs():
    graph, (x, w, mm, relu) = _chain()
    sigmoid = graph.add_node("Sigmoid", [mm.output], after=relu)
    relu.output.replace_all_uses_with(sigmoid.output)
    assert graph.outputs == (sigmoid.output,)
    mm.output.replace_all_uses_with(x)
    assert mm.output.uses() == []
    assert [u.node for u in x.uses()] == [mm, relu, sigmoid]
    graph.erase(relu)
    graph.erase(mm)
    assert [n.op_type for n in graph.nodes] == ["Sigmoid"]
    graph.rename_value(sigmoid.output, "z")
    graph.verify()


def test_verify_reports_a_graph_output_renamed_by_replace_all_uses_with():
    graph, (_, _, mm, relu) = _chain()
    sigmoid = graph.add_node("Sigmoid", [mm.output], after=relu)
    relu.output.replace_all_uses_with(sigmoid.output)
    with pytest.raises(VerificationError, match=r"graph output 'z' was renamed to 'Sigmoid_0_out0'"):
        graph.verify()


def test_replace_value_keeps_the_graph_output_name():
    graph, (x, _, mm, relu) = _chain()
    sigmoid = graph.add_node("Sigmoid", [mm.output], after=relu)
    graph.replace_value(relu.output, sigmoid.output, keep_name=False)
    assert graph.outputs == (sigmoid.output,) and sigmoid.output.name == "z"
    assert relu.output.name == "z_1"
    graph.erase(relu)
    graph.verify()
    assert graph.output_names == ("z",)


def test_replace_value_moves_an_internal_name_only_with_keep_name():
    graph, (x, _, mm, relu) = _chain()
    tanh = graph.add_node("Tanh", [x], before=mm, output_names=["t"])
    graph.replace_value(mm.output, tanh.output, keep_name=False)
    assert tanh.output.name == "t" and [u.node for u in tanh.output.uses()] == [relu]
    graph.erase(mm)
    exp = graph.add_node("Exp", [x], before=relu, output_names=["e"])
    graph.replace_value(tanh.output, exp.output)
    assert exp.output.name == "t" and tanh.output.name == "t_1"
    graph.erase(tanh)
    graph.verify()


def test_replace_value_refuses_to_rename_a_graph_output_onto_an_input():
    graph, (x, w, mm, relu) = _chain()
    assert not graph.can_replace_value(relu.output, x)
    assert not graph.can_replace_value(relu.output, w)
    assert graph.can_replace_value(mm.output, x)
    with pytest.raises(GraphError, match=r"cannot replace graph output %z by %x: a graph output keeps its name"):
        graph.replace_value(relu.output, x)
    graph.replace_value(mm.output, x)
    assert x.name == "x" and mm.output.name == "y"
    graph.verify()


def test_overridable_constants_are_typed_and_kept_by_clone():
    graph, (_, w, _, _) = _chain()
    assert not graph.is_overridable(w)
    graph.initializer_inputs.add("w")
    graph.report = "last run"
    copy = graph.clone()
    assert copy.is_overridable(copy.constants["w"]) and copy.report == "last run"
    copy.initializer_inputs.clear()
    assert graph.is_overridable(w)


def test_clone_keeps_recorded_output_names():
    graph, (_, _, mm, relu) = _chain()
    sigmoid = graph.add_node("Sigmoid", [mm.output], after=relu)
    relu.output.replace_all_uses_with(sigmoid.output)
    with pytest.raises(VerificationError, match="graph output 'z' was renamed"):
        graph.clone().verify()


def test_erase_refuses_node_still_in_use():
    graph, (_, _, mm, relu) = _chain()
    with pytest.raises(GraphError, match=r"cannot erase node 'MatMul_\d+' \(MatMul\): its output %y is used by"):
        graph.erase(mm)
    with pytest.raises(GraphError, match="is a graph output"):
        graph.erase(relu)


def test_insert_before_keeps_order_and_names_unique():
    graph, (x, _, mm, _) = _chain()
    neg = graph.add_node("Neg", [x], before=mm, output_names=["y"])
    assert graph.nodes[0] is neg
    assert neg.output.name != "y"
    assert len({v.name for v in graph.values()}) == len(list(graph.values()))


def test_insert_refuses_values_from_another_graph():
    graph, _ = _chain()
    other = Graph("other")
    foreign = other.add_input("q", TensorType(F32, (4,)))
    with pytest.raises(GraphError, match="does not belong to graph 'chain'"):
        graph.add_node("Relu", [foreign])


def test_remove_constant_only_when_unused():
    graph, (_, w, mm, _) = _chain()
    with pytest.raises(GraphError, match="still used"):
        graph.remove_constant(w)
    mm.replace_input(1, graph.add_constant("w2", np.zeros((4, 4), np.float32)))
    graph.remove_constant(w)
    assert "w" not in graph.constants


def test_clone_is_independent_and_shares_weights():
    graph, (_, w, _, _) = _chain()
    copy = graph.clone()
    assert str(copy) == str(graph)
    assert copy.constants["w"].const is w.const
    copy.add_node("Neg", [copy.inputs[0]])
    assert len(copy) == len(graph) + 1


def test_to_networkx_has_one_edge_per_dataflow():
    graph, (_, _, mm, relu) = _chain()
    view = graph.to_networkx()
    assert list(view.edges) == [(mm.name, relu.name)]
    assert view.nodes[relu.name]["op"] == "Relu"


def test_unknown_op_is_opaque_and_kept():
    graph, (x, _, _, _) = _chain()
    node = graph.add_node("FancyOp", [x], {"alpha": 0.5}, domain="com.example")
    assert node.is_opaque
    assert node.output.type == TensorType()
    graph.verify()


def test_op_counts():
    graph, _ = _chain()
    assert graph.op_counts() == {"MatMul": 1, "Relu": 1}


def test_order_keys_follow_the_node_order_through_many_insertions_at_one_place():
    graph, (x, _, mm, relu) = _chain()
    added = [graph.add_node("Neg", [x], before=relu) for _ in range(60)]
    added += [graph.add_node("Abs", [x], after=mm) for _ in range(60)]
    graph.move_before(relu, mm)
    graph.move_before(relu, graph.nodes[-1])
    nodes = graph.nodes
    keys = [graph.order_key(n) for n in nodes]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) == len(graph) == 122
    assert nodes[0] is mm and nodes[-1] is added[59] and nodes[-2] is relu
    assert graph.runs_before(mm, added[0]) and not graph.runs_before(relu, added[61])
    graph.erase(added[0])
    assert len(graph) == 121 and added[0] not in graph.nodes
    with pytest.raises(GraphError, match="not in graph"):
        graph.order_key(added[0])
