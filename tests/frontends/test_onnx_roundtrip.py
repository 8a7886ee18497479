"""ONNX -> IR -> ONNX on real Hugging Face architectures: valid, same outputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt
from conftest import ROUNDTRIP_ARCHITECTURES, max_abs_diff, numpy_inputs


def _run(model, feeds):
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def _roundtrip(path, zm, tmp_path):
    graph = graphopt.from_onnx(path)
    graph.verify()
    model = graph.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    feeds = numpy_inputs(zm)
    expected = _run(path, feeds)
    assert max_abs_diff(expected, _run(model.SerializeToString(), feeds)) <= 1e-5
    saved = tmp_path / "roundtrip.onnx"
    graph.save_onnx(saved)
    onnx.checker.check_model(str(saved), full_check=True)
    assert max_abs_diff(expected, _run(saved, feeds)) <= 1e-5
    return graph, model


@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_torchscript_export_roundtrips(name, zoo, zoo_onnx, tmp_path):
    graph, model = _roundtrip(zoo_onnx(name), zoo(name), tmp_path)
    original = onnx.load(str(zoo_onnx(name)))
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    # Constant nodes come back as initializers (the importer turns them into graph constants)
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in original.graph.node if n.op_type != "Constant"]
    batch_dims = [vi.type.tensor_type.shape.dim[0].dim_param for vi in model.graph.input]
    assert all(dim for dim in batch_dims), "the dynamic batch axis stays symbolic"
    assert all(v.shape is not None and isinstance(v.shape[0], str) for v in graph.inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "vit", "whisper-encoder", "qwen2"])
def test_dynamo_export_roundtrips(name, zoo, zoo_onnx, tmp_path):
    _roundtrip(zoo_onnx(name, dynamo=True), zoo(name), tmp_path)


@pytest.mark.parametrize("opset", [13, 15, 17, 19, 21])
def test_opsets_13_to_21_roundtrip(opset, zoo, tmp_path):
    import model_zoo

    zm = zoo("bert")
    path = model_zoo.export_onnx(zm, tmp_path / "bert.onnx", opset=opset)
    graph, model = _roundtrip(path, zm, tmp_path)
    assert graph.opset() == opset
    assert {o.domain: o.version for o in model.opset_import}[""] == opset


def test_symbolic_dims_survive_inference(zoo, zoo_onnx):
    graph = graphopt.from_onnx(zoo_onnx("bert"))
    hidden = graph.outputs[0]
    assert hidden.shape == ("batch", "seq", 32)
    symbolic_values = [v for v in graph.values() if v.shape and any(isinstance(d, str) for d in v.shape)]
    assert len(symbolic_values) > 50


def test_model_metadata_and_custom_domain_ops_roundtrip(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example", name="m", alpha=0.5, tags=["a", "b"])
    node.attribute.append(helper.make_attribute("empty", [], attr_type=onnx.AttributeProto.FLOATS))
    sub = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "body", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    branchy = helper.make_node("Custom2", ["y"], ["w"], domain="com.example", body=sub)
    graph = helper.make_graph(
        [node, branchy], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 2)])
    model.producer_name = "unit-test"
    helper.set_model_props(model, {"author": "me"})
    ir = graphopt.from_onnx(model)
    assert [n.is_opaque for n in ir.nodes] == [True, True]
    back = ir.to_onnx()
    assert back.graph.node[0] == model.graph.node[0]
    assert back.graph.node[1].attribute[0] == model.graph.node[1].attribute[0]
    assert back.producer_name == "unit-test"
    assert {p.key: p.value for p in back.metadata_props} == {"author": "me"}
    assert {o.domain: o.version for o in back.opset_import} == {"": 18, "com.example": 2}
    assert back.graph.input[0].type == model.graph.input[0].type


def test_unsorted_graph_is_imported_in_topological_order():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Neg", ["a"], ["b"]), helper.make_node("Relu", ["x"], ["a"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    ir = graphopt.from_onnx(helper.make_model(graph))
    assert [n.op_type for n in ir.nodes] == ["Relu", "Neg"]
    ir.verify()
    np.testing.assert_array_equal(
        _run(ir.to_onnx().SerializeToString(), {"x": np.array([-1, 2], np.float32)})[0], [-0.0, -2.0]
    )
