"""ONNX Constant nodes are graph constants from import on; unread constants are not saved."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphopt


def _model(nodes, outputs, initializers=(), inputs=None):
    inputs = inputs if inputs is not None else [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])]
    graph = helper.make_graph(nodes, "consts", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_constant_nodes_become_graph_constants_on_import():
    scale = numpy_helper.from_array(np.full((2, 3), 2.0, np.float32))
    model = _model(
        [
            helper.make_node("Constant", [], ["scale"], value=scale),
            helper.make_node("Constant", [], ["bias"], value_floats=[1.0, 2.0, 3.0]),
            helper.make_node("Constant", [], ["axes"], value_ints=[0]),
            helper.make_node("Mul", ["x", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "bias"], ["shifted"]),
            helper.make_node("ReduceSum", ["shifted", "axes"], ["y"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    graph = graphopt.from_onnx(model)
    assert graph.op_counts() == {"Add": 1, "Mul": 1, "ReduceSum": 1}
    constants = graph.constants
    assert sorted(constants) == ["axes", "bias", "scale"]
    assert constants["bias"].const.numpy().dtype == np.float32 and constants["axes"].const.numpy().tolist() == [0]
    assert str(constants["scale"].type) == "f32[2, 3]"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    exported = graph.to_onnx()
    assert [n.op_type for n in exported.graph.node] == ["Mul", "Add", "ReduceSum"]
    assert sorted(i.name for i in exported.graph.initializer) == ["axes", "bias", "scale"]
    np.testing.assert_array_equal(_run(exported, x)[0], _run(model, x)[0])


def test_a_constant_node_that_is_a_graph_output_stays_a_node():
    model = _model(
        [helper.make_node("Constant", [], ["c"], value_ints=[1, 2]), helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("c", TensorProto.INT64, None)],
    )
    graph = graphopt.from_onnx(model)
    assert graph.op_counts() == {"Constant": 1, "Relu": 1}
    assert [v.name for v in graph.outputs] == ["y", "c"] and not graph.constants


def test_a_constant_read_by_an_if_body_becomes_a_captured_graph_constant():
    then_body = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)]
    )
    else_body = helper.make_graph(
        [helper.make_node("Sub", ["x", "one"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)]
    )
    model = _model(
        [
            helper.make_node("Constant", [], ["one"], value_float=1.0),
            helper.make_node("Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True))),
            helper.make_node("If", ["flag"], ["y"], then_branch=then_body, else_branch=else_body),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    graph = graphopt.from_onnx(model)
    (node,) = graph.nodes
    assert node.op_type == "If" and {v.name for v in node.captures} == {"one", "x"}
    assert graph.constants["one"] in node.captures and node.inputs == (graph.constants["flag"],)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    exported = graph.to_onnx()
    np.testing.assert_array_equal(_run(exported, x)[0], x + 1)


def test_a_weight_nothing_reads_is_not_saved_but_an_overridable_one_is(tmp_path):
    model = _model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers=[
            numpy_helper.from_array(np.ones((2, 3), np.float32), "w"),
            numpy_helper.from_array(np.zeros((2, 3), np.float32), "default"),
        ],
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("default", TensorProto.FLOAT, [2, 3]),
        ],
    )
    graph = graphopt.from_onnx(model)
    assert graph.initializer_inputs == {"default"}
    add = graph.nodes[0]
    fresh = graph.add_constant("w2", np.full((2, 3), 3.0, np.float32))
    add.replace_input(1, fresh)  # a pass replaced the weight; the old one is read by nothing
    path = tmp_path / "out.onnx"
    graphopt.save_onnx(graph, path)
    saved = onnx.load(str(path))
    assert sorted(i.name for i in saved.graph.initializer) == ["default", "w2"]
    assert [i.name for i in saved.graph.input] == ["x", "default"]
    x = np.zeros((2, 3), np.float32)
    np.testing.assert_array_equal(_run(saved, x)[0], x + 3.0)


def test_cleanup_keeps_output_names_with_constant_nodes_folded_on_import():
    model = _model(
        [
            helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.zeros((2, 3), np.float32))),
            helper.make_node("Add", ["x", "zero"], ["sum"]),
            helper.make_node("Identity", ["sum"], ["y"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    graph = graphopt.optimize(graphopt.from_onnx(model), "cleanup")
    assert [v.name for v in graph.outputs] == ["y"]
    graph.verify()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_run(graph.to_onnx(), x)[0], x)
