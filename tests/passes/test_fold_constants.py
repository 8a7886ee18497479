"""fold-constants: what only depends on constants is computed once, bit-exactly."""

import numpy as np
import pytest
from graphopt.passes.fold_constants import FoldConstants
from pass_testing import run_checked as checked

from graphopt import DType, Graph, TensorType
from graphopt.check import run_graph, sample_inputs
from graphopt.ir.tensor import ArrayTensor
from graphopt.pass_base import PassResult

F32 = DType.FLOAT
ONE = ArrayTensor(np.ones(1, np.float32))


def run_checked(graph: Graph, numeric: bool = True, **options: int) -> PassResult:
    return checked(FoldConstants(**options), graph, numeric=numeric)


def test_folds_constant_nodes_arithmetic_and_static_shapes():
    graph = Graph("fold")
    x = graph.add_input("x", TensorType(F32, ("batch", 4)))
    two = graph.add_node("Constant", [], {"value_float": 2.0}, output_names=["two"])
    three_data = ArrayTensor(np.array([3.0], np.float32))
    three = graph.add_node("Constant", [], {"value": three_data}, output_names=["three"])
    six = graph.add_node("Mul", [two.output, three.output], output_names=["six"])
    shape = graph.add_node("Shape", [x], output_names=["shape"])
    index = graph.add_constant("index", np.array(1, np.int64))
    width = graph.add_node("Gather", [shape.output, index], {"axis": 0}, output_names=["width"])
    width_f = graph.add_node("Cast", [width.output], {"to": int(F32)}, output_names=["width_f"])
    scaled = graph.add_node("Mul", [x, six.output], output_names=["scaled"])
    out = graph.add_node("Div", [scaled.output, width_f.output], output_names=["y"])
    graph.set_outputs([out.output])

    result = run_checked(graph)

    assert result.stats == {"constant_nodes": 2, "aliases": 0, "known_shapes": 1, "evaluated": 2}
    assert str(graph) == (
        "graph fold (\n"
        "  %x: f32[batch, 4]\n"
        ") {\n"
        "  %index: i64[] = const [1]\n"
        "  %two: f32[] = const [2.0]\n"
        "  %three: f32[1] = const [3.0]\n"
        "  %width: i64[] = const [4]\n"
        "  %width_f: f32[] = const [4.0]\n"
        "  %six: f32[1] = const [6.0]\n"
        "  %shape: i64[2] = Shape(%x)\n"
        "  %scaled: f32[batch, 4] = Mul(%x, %six)\n"
        "  %y: f32[batch, 4] = Div(%scaled, %width_f)\n"
        "  return %y\n"
        "}\n"
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_folded_floats_are_bit_exact_with_onnxruntime(dtype):
    graph = Graph("exact")
    data = graph.add_constant("data", np.random.default_rng(0).standard_normal((4, 64)).astype(dtype))
    value = graph.add_node("Exp", [data]).output
    value = graph.add_node("Erf", [value]).output
    value = graph.add_node("Sqrt", [value]).output
    value = graph.add_node("Div", [value, data]).output
    value = graph.add_node("Tanh", [value]).output
    axes = graph.add_constant("axes", np.array([1], np.int64))
    value = graph.add_node("ReduceMean", [value, axes], {"keepdims": 0}).output
    out = graph.add_node("Identity", [value], output_names=["y"])
    graph.set_outputs([out.output])

    assert run_checked(graph).stats["evaluated"] == 6
    assert [node.op_type for node in graph] == ["Identity"]
    assert graph.nodes[0].inputs[0].const.numpy().dtype == dtype


def test_identities_of_weights_are_bypassed_without_copies():
    graph = Graph("tied")
    x = graph.add_input("x", TensorType(F32, ("batch", 4)))
    weight = graph.add_constant("weight", np.eye(4, dtype=np.float32))
    tied = graph.add_node("Identity", [weight], output_names=["tied"])
    again = graph.add_node("Identity", [tied.output], output_names=["again"])
    graph.set_outputs([graph.add_node("MatMul", [x, again.output], output_names=["y"]).output])

    assert run_checked(graph).stats["aliases"] == 2
    assert list(graph.constants) == ["weight"] and graph.nodes[0].inputs == (x, weight)


def test_symbolic_dims_are_not_folded():
    graph = Graph("dynamic")
    x = graph.add_input("x", TensorType(F32, ("batch", "seq")))
    shape = graph.add_node("Shape", [x])
    ones = graph.add_node("ConstantOfShape", [shape.output], {"value": ONE})
    graph.set_outputs([graph.add_node("Add", [x, ones.output], output_names=["y"]).output])

    assert not run_checked(graph).changed
    assert run_graph(graph, sample_inputs(graph, sizes={"batch": 3, "seq": 5}))[0].shape == (3, 5)


def test_outputs_larger_than_max_elements_stay():
    graph = Graph("large")
    shape = graph.add_constant("shape", np.array([64, 64], np.int64))
    big = graph.add_node("ConstantOfShape", [shape], {"value": ONE}, output_names=["big"])
    total = graph.add_node("ReduceSum", [big.output], {"keepdims": 0}, output_names=["total"])
    graph.set_outputs([graph.add_node("Identity", [total.output], output_names=["y"]).output])

    assert not run_checked(graph, max_elements=1000).changed
    assert run_checked(graph).stats["evaluated"] == 2
    assert graph.nodes[0].inputs[0].const.numpy() == 4096.0


def test_every_output_of_a_multi_output_node_folds():
    graph = Graph("split")
    x = graph.add_input("x", TensorType(F32, (2,)))
    data = graph.add_constant("data", np.arange(4, dtype=np.float32))
    split = graph.add_node("Split", [data], {"axis": 0, "num_outputs": 2}, num_outputs=2, output_names=["lo", "hi"])
    graph.set_outputs([graph.add_node("Add", [x, value]).output for value in split.outputs])

    assert run_checked(graph).stats["evaluated"] == 1
    assert [graph.constants[name].const.numpy().tolist() for name in ("lo", "hi")] == [[0.0, 1.0], [2.0, 3.0]]


def test_random_ops_graph_outputs_and_overridable_constants_stay():
    graph = Graph("kept")
    data = graph.add_constant("data", np.ones(4, np.float32))
    default = graph.add_constant("default", np.ones(4, np.float32))
    graph.initializer_inputs = {"default"}
    noise = graph.add_node("RandomUniformLike", [data], output_names=["noise"])
    doubled = graph.add_node("Add", [data, data], output_names=["doubled"])
    scaled = graph.add_node("Mul", [default, noise.output], output_names=["scaled"])
    graph.set_outputs([doubled.output, scaled.output])

    assert not run_checked(graph, numeric=False).changed
