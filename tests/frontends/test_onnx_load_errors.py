"""Bad model files give one-line errors that name the file, and never a traceback."""

import pytest

import graphopt
from graphopt import ModelLoadError


@pytest.fixture
def good_model_bytes():
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    weight = numpy_helper.from_array(np.random.default_rng(0).random((64, 64), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight],
    )
    return helper.make_model(graph).SerializeToString()


def _one_line_error(path) -> str:
    with pytest.raises(ModelLoadError) as info:
        graphopt.from_onnx(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return message


def test_missing_file(tmp_path):
    assert "no such file" in _one_line_error(tmp_path / "absent.onnx")


def test_directory(tmp_path):
    assert "is a directory" in _one_line_error(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert "not a valid ONNX model" in _one_line_error(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model, just some text\n" * 10)
    assert "not" in _one_line_error(path)


def test_random_bytes(tmp_path):
    import numpy as np

    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _one_line_error(path)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_file(tmp_path, good_model_bytes, keep):
    path = tmp_path / "cut.onnx"
    path.write_bytes(good_model_bytes[: int(len(good_model_bytes) * keep)])
    _one_line_error(path)


def test_missing_external_data(tmp_path, good_model_bytes):
    graph = graphopt.from_onnx(_write(tmp_path / "m.onnx", good_model_bytes))
    graph.save_onnx(tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    assert "ext.onnx.data" in _one_line_error(tmp_path / "ext.onnx")


def test_truncated_external_data(tmp_path, good_model_bytes):
    graph = graphopt.from_onnx(_write(tmp_path / "m.onnx", good_model_bytes))
    graph.save_onnx(tmp_path / "ext.onnx", external_data=True)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    assert "past the end" in _one_line_error(tmp_path / "ext.onnx")


def test_dangling_input_names_node(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"], name="lost")], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = _write(tmp_path / "dangling.onnx", helper.make_model(graph).SerializeToString())
    assert "node 'lost' (Relu) reads 'nowhere'" in _one_line_error(path)


def test_not_a_path_or_model():
    with pytest.raises(ModelLoadError, match="expects a path or an onnx.ModelProto, got int"):
        graphopt.from_onnx(42)


def _write(path, data):
    path.write_bytes(data)
    return path
