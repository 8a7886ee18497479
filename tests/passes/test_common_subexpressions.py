"""eliminate-common-subexpressions: duplicate pure nodes and small constants merge."""

import numpy as np
from graphopt.passes.common_subexpressions import EliminateCommonSubexpressions
from pass_testing import run_checked as checked

from graphopt import DType, Graph, TensorType
from graphopt.pass_base import PassResult

F32 = DType.FLOAT


def run_checked(graph: Graph, numeric: bool = True, **options: int) -> PassResult:
    return checked(EliminateCommonSubexpressions(**options), graph, numeric=numeric)


def test_merges_duplicate_chains_and_constants():
    graph = Graph("cse")
    x = graph.add_input("x", TensorType(F32, ("batch", 4)))
    one = graph.add_constant("one", np.array(1.0, np.float32))
    one_again = graph.add_constant("one_again", np.array(1.0, np.float32))
    first = graph.add_node("Relu", [x], output_names=["r1"])
    second = graph.add_node("Relu", [x], output_names=["r2"])
    a = graph.add_node("Add", [first.output, one], output_names=["a1"])
    b = graph.add_node("Add", [second.output, one_again], output_names=["a2"])
    out = graph.add_node("Mul", [a.output, b.output], output_names=["y"])
    graph.set_outputs([out.output])

    result = run_checked(graph)

    assert result.stats == {"merged_constants": 1, "merged_nodes": 2}
    assert str(graph) == (
        "graph cse (\n"
        "  %x: f32[batch, 4]\n"
        ") {\n"
        "  %one: f32[] = const [1.0]\n"
        "  %r1: f32[batch, 4] = Relu(%x)\n"
        "  %a1: f32[batch, 4] = Add(%r1, %one)\n"
        "  %y: f32[batch, 4] = Mul(%a1, %a1)\n"
        "  return %y\n"
        "}\n"
    )


def test_different_attributes_types_or_contents_do_not_merge():
    graph = Graph("distinct")
    x = graph.add_input("x", TensorType(F32, (2, 4)))
    values = [
        graph.add_constant("zero", np.array([0.0], np.float32)),
        graph.add_constant("minus_zero", np.array([-0.0], np.float32)),
        graph.add_constant("zero_f64", np.array([0.0], np.float64)),
        graph.add_constant("zero_2d", np.array([[0.0]], np.float32)),
    ]
    outputs = [graph.add_node("Softmax", [x], {"axis": axis}).output for axis in (0, 1)]
    outputs += [graph.add_node("LeakyRelu", [x], {"alpha": alpha}).output for alpha in (0.0, -0.0)]
    outputs += [graph.add_node("Add", [x, values[0]]).output, graph.add_node("Add", [x, values[1]]).output]
    outputs += [graph.add_node("Identity", [v]).output for v in values[2:]]
    graph.set_outputs(outputs)

    assert not run_checked(graph).changed


def test_large_constants_are_only_equal_to_themselves():
    graph = Graph("large")
    x = graph.add_input("x", TensorType(F32, (2, 4)))
    w1 = graph.add_constant("w1", np.ones((4, 4), np.float32))
    w2 = graph.add_constant("w2", np.ones((4, 4), np.float32))
    m1, m2 = graph.add_node("MatMul", [x, w1]), graph.add_node("MatMul", [x, w2])
    graph.set_outputs([graph.add_node("Add", [m1.output, m2.output], output_names=["y"]).output])

    assert not run_checked(graph, max_elements=8).changed
    assert run_checked(graph).stats == {"merged_constants": 1, "merged_nodes": 1}


def test_impure_and_opaque_nodes_are_not_merged():
    graph = Graph("impure", {"": 18, "com.example": 1})
    x = graph.add_input("x", TensorType(F32, (2,)))
    outputs = [graph.add_node("RandomUniformLike", [x]).output for _ in range(2)]
    outputs += [graph.add_node("Mystery", [x], domain="com.example").output for _ in range(2)]
    graph.set_outputs(outputs)

    assert not run_checked(graph, numeric=False).changed


def test_duplicate_graph_outputs_keep_their_names():
    graph = Graph("outputs")
    x = graph.add_input("x", TensorType(F32, (2,)))
    inner = graph.add_node("Neg", [x], output_names=["inner"])
    copy = graph.add_node("Neg", [x], output_names=["y"])
    both = [graph.add_node("Exp", [x], output_names=[name]) for name in ("e1", "e2")]
    relu = graph.add_node("Relu", [inner.output], output_names=["z"])
    graph.set_outputs([relu.output, copy.output, both[0].output, both[1].output])

    result = run_checked(graph)

    # %inner takes over the name y; e1 and e2 are both graph outputs, so both stay
    assert result.stats == {"merged_constants": 0, "merged_nodes": 1}
    assert [v.name for v in graph.outputs] == ["z", "y", "e1", "e2"]
    assert [str(node) for node in graph] == [
        "%y = Neg(%x)", "%e1 = Exp(%x)", "%e2 = Exp(%x)", "%z = Relu(%y)",
    ]


def test_shape_vectors_with_the_same_symbolic_contents_merge():
    graph = Graph("shapes")
    x = graph.add_input("x", TensorType(F32, ("batch", "seq")))
    mask = graph.add_input("mask", TensorType(DType.INT64, ("batch", "seq")))
    partly = graph.add_input("partly", TensorType(F32, ("batch", None)))
    shapes = [graph.add_node("Shape", [v], output_names=[f"s_{v.name}"]).output for v in (x, mask, partly)]
    ones = [graph.add_node("ConstantOfShape", [s], output_names=[f"ones_{i}"]).output for i, s in enumerate(shapes)]
    total = graph.add_node("Sum", [x, *ones[:2]], output_names=["y"])
    graph.set_outputs([total.output, ones[2]])

    result = run_checked(graph)

    # Shape(mask) is [batch, seq] like Shape(x); Shape(partly) is [batch, ?]
    assert result.stats == {"merged_constants": 0, "merged_nodes": 2}
    assert [str(node) for node in graph] == [
        "%s_x = Shape(%x)", "%s_partly = Shape(%partly)", "%ones_0 = ConstantOfShape(%s_x)",
        "%ones_2 = ConstantOfShape(%s_partly)", "%y = Sum(%x, %ones_0, %ones_0)",
    ]
