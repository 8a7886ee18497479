"""eliminate-dead-code: what reaches no graph output goes, side effects stay."""

import numpy as np
from graphopt.passes.dead_code import EliminateDeadCode
from pass_testing import run_checked as checked

from graphopt import DType, Graph, TensorType
from graphopt.pass_base import PassResult

F32 = DType.FLOAT


def run_checked(graph: Graph, numeric: bool = True, **options: bool) -> PassResult:
    return checked(EliminateDeadCode(**options), graph, numeric=numeric)


def test_removes_unread_nodes_and_constants():
    graph = Graph("dead")
    x = graph.add_input("x", TensorType(F32, ("batch", 4)))
    w = graph.add_constant("w", np.eye(4, dtype=np.float32))
    unused = graph.add_constant("unused", np.ones(4, np.float32))
    bias = graph.add_constant("bias", np.ones(4, np.float32))
    live = graph.add_node("MatMul", [x, w], output_names=["h"])
    dead = graph.add_node("Exp", [live.output], output_names=["dead"])
    graph.add_node("Add", [dead.output, bias], output_names=["deader"])
    out = graph.add_node("Relu", [live.output], output_names=["y"])
    graph.set_outputs([out.output])

    result = run_checked(graph)

    assert result.changed and result.stats == {"removed_nodes": 2, "removed_constants": 2}
    assert unused.graph is None and bias.graph is None
    assert str(graph) == (
        "graph dead (\n"
        "  %x: f32[batch, 4]\n"
        ") {\n"
        "  %w: f32[4, 4] = const\n"
        "  %h: f32[batch, 4] = MatMul(%x, %w)\n"
        "  %y: f32[batch, 4] = Relu(%h)\n"
        "  return %y\n"
        "}\n"
    )


def test_keeps_opaque_ops_unless_asked():
    def build() -> Graph:
        graph = Graph("opaque", {"": 18, "com.example": 1})
        x = graph.add_input("x", TensorType(F32, (2,)))
        graph.add_node("Log", [x], domain="com.example", output_names=["logged"])
        graph.set_outputs([graph.add_node("Relu", [x], output_names=["y"]).output])
        return graph

    kept, removed = build(), build()

    assert not run_checked(kept, numeric=False).changed
    assert run_checked(removed, numeric=False, remove_opaque=True).stats["removed_nodes"] == 1
    assert [node.op_type for node in removed] == ["Relu"]


def test_keeps_random_ops_graph_inputs_and_overridable_initializers():
    graph = Graph("effects")
    x = graph.add_input("x", TensorType(F32, (2,)))
    graph.add_input("spare", TensorType(F32, (2,)))
    graph.add_constant("default", np.zeros(2, np.float32))
    graph.initializer_inputs = {"default"}
    graph.add_node("RandomUniformLike", [x], output_names=["noise"])
    graph.set_outputs([graph.add_node("Relu", [x], output_names=["y"]).output])

    assert not run_checked(graph, numeric=False).changed
    assert [v.name for v in graph.inputs] == ["x", "spare"] and list(graph.constants) == ["default"]


def test_keeps_every_output_of_a_node_with_one_output_read():
    graph = Graph("split")
    x = graph.add_input("x", TensorType(F32, (4,)))
    split = graph.add_node("Split", [x], {"axis": 0, "num_outputs": 2}, num_outputs=2, output_names=["lo", "hi"])
    graph.set_outputs([split.outputs[1]])

    assert not run_checked(graph).changed
