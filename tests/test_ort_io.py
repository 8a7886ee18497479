"""The one CPU reference session (graphopt.ort_io.reference_session) that check,
calibration and bench build."""

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as h
import pytest

from graphopt.ort_io import reference_session


def _model(elem_type: int = onnx.TensorProto.FLOAT, op: str = "Relu") -> onnx.ModelProto:
    graph = h.make_graph(
        [h.make_node(op, ["x"], ["y"])], "g",
        [h.make_tensor_value_info("x", elem_type, [3])], [h.make_tensor_value_info("y", elem_type, [3])],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def _int4_model() -> onnx.ModelProto:
    graph = h.make_graph(
        [h.make_node("Cast", ["x"], ["x8"], to=onnx.TensorProto.INT8), h.make_node("Neg", ["x8"], ["n"]),
         h.make_node("Cast", ["n"], ["y"], to=onnx.TensorProto.INT4)], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.INT4, [3])], [h.make_tensor_value_info("y", onnx.TensorProto.INT4, [3])],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("threads, optimize, intra, level", [
    (0, False, 0, "ORT_DISABLE_ALL"),
    (1, False, 1, "ORT_DISABLE_ALL"),
    (3, True, 3, "ORT_ENABLE_ALL"),
])
def test_reference_session_is_a_cpu_session_with_the_asked_threads_and_level(threads, optimize, intra, level):
    session, _ = reference_session(_model(), threads=threads, optimize=optimize)
    options = session.get_session_options()
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert options.intra_op_num_threads == intra
    assert options.inter_op_num_threads == (1 if threads else 0)
    assert options.graph_optimization_level.name == level


def test_reference_session_feeds_and_reads_low_precision_io_from_a_proto_or_a_file(tmp_path):
    x = np.array([-1.5, 0.0, 2.25], dtype=ml_dtypes.bfloat16)
    session, io = reference_session(_model(onnx.TensorProto.BFLOAT16, "Identity"))
    (out,) = io.run(session, {"x": x})
    assert io and out.dtype == ml_dtypes.bfloat16 and out.astype(np.float32).tolist() == [-1.5, 0.0, 2.25]
    path = tmp_path / "m.onnx"
    onnx.save(_int4_model(), path)
    session, io = reference_session(str(path))
    (out,) = io.run(session, {"x": np.array([-3, 0, 5], dtype=ml_dtypes.int4)})
    assert out.dtype == ml_dtypes.int4 and out.astype(np.int8).tolist() == [3, 0, -5]


def test_without_widening_the_session_runs_the_model_as_given():
    model = _int4_model()
    session, io = reference_session(model, widen_io=False)
    assert not io
    assert [i.type for i in session.get_inputs()] == ["tensor(int4)"]
    assert [i.name for i in model.graph.input] == ["x"]
