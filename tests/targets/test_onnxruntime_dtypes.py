"""The onnxruntime target takes and returns every low-precision element type bit-exactly.

ORT's Python API takes no bfloat16/float8/float4/int4/int2 numpy arrays and returns none
(`graphopt.ort_io` works around it for the session only); outputs here must equal the onnx
reference evaluator's bit for bit, for every bit pattern of each type, after a save/load too.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from graphopt.api import compile, load_compiled
from graphopt.ir.dtypes import DType
from graphopt.ort_io import RAW_TYPES, WIDE_TYPES
from graphopt.ir.torch_arrays import to_numpy, to_torch
from graphopt.errors import UnsupportedOpError
from graphopt.target_base import TargetError

OPSET = 24


def _every_value(dtype: DType) -> np.ndarray:
    """Every bit pattern of a byte-sized type, every value of a sub-byte one."""
    numpy_dtype = dtype.to_numpy()
    if dtype == DType.BFLOAT16:
        return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(numpy_dtype)
    if dtype in RAW_TYPES:
        return np.arange(256, dtype=np.uint16).astype(np.uint8).view(numpy_dtype)
    if dtype == DType.FLOAT4E2M1:
        return np.arange(16, dtype=np.uint8).view(numpy_dtype)
    info = ml_dtypes.iinfo(numpy_dtype)
    return np.arange(int(info.min), int(info.max) + 1).astype(numpy_dtype)


def _bits(array: np.ndarray) -> np.ndarray:
    """The array's bits as unsigned integers (NaN payloads compare too)."""
    array = np.asarray(array)
    if array.dtype.name in ("int4", "uint4", "int2", "uint2"):
        return array.astype(np.int8).view(np.uint8)
    return array.view(f"uint{8 * array.dtype.itemsize}")


def _model(node: onnx.NodeProto, in_type: int, out_type: int, count: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "dtypes",
        [helper.make_tensor_value_info("x", in_type, [count])],
        [helper.make_tensor_value_info("y", out_type, [count])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=11)


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    (out,) = ReferenceEvaluator(model).run(None, {"x": x})
    return out


def _cases() -> list:
    cases = []
    for dtype in list(RAW_TYPES) + list(WIDE_TYPES):
        for kind in ("identity", "to_float", "from_float"):
            cases.append(pytest.param(dtype, kind, id=f"{dtype.name.lower()}-{kind}"))
    return cases


def _model_and_input(dtype: DType, kind: str) -> tuple[onnx.ModelProto, np.ndarray]:
    values = _every_value(dtype)
    code = int(dtype)
    if kind == "identity":
        return _model(helper.make_node("Identity", ["x"], ["y"]), code, code, values.size), values
    if kind == "to_float":
        return _model(helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT), code, TensorProto.FLOAT, values.size), values
    return _model(helper.make_node("Cast", ["x"], ["y"], to=code), TensorProto.FLOAT, code, values.size), values.astype(np.float32)


def _ort_runs(dtype: DType, kind: str) -> bool:
    """ONNX Runtime has no CPU kernels for int2/uint2 and float4e2m1 at opset 24, nor an
    Identity for float8e8m0: those models must be refused at compile time, not at call time."""
    if dtype in (DType.INT2, DType.UINT2, DType.FLOAT4E2M1):
        return False
    return not (kind == "identity" and dtype == DType.FLOAT8E8M0)


def _refusal(dtype: DType) -> tuple[type, str]:
    """How compile refuses what ORT cannot run: int2/uint2 models ORT cannot load at all (the
    session's error); the others by the target's kernel check, naming the op and the type."""
    if dtype in (DType.INT2, DType.UINT2):
        return TargetError, "ONNX Runtime could not load"
    return UnsupportedOpError, rf"cannot run 1 node\(s\): (Identity|Cast) .*\b(Identity|Cast)\(.*\b{dtype.name.lower()}\b"


def _inputs_ort_casts_as_specified(dtype: DType, kind: str, x: np.ndarray) -> np.ndarray:
    """Where ORT's Cast kernel itself differs from the reference (not the IO): float32
    2**-127 (a subnormal) to float8e8m0 is 2**-127 in ORT, 2**-126 in the reference, which
    applies ONNX's round-up rule to the float32 bits."""
    if dtype == DType.FLOAT8E8M0 and kind == "from_float":
        return x != np.float32(2.0**-127)
    return np.ones(x.shape, dtype=bool)


@pytest.mark.parametrize("dtype, kind", _cases())
def test_every_value_round_trips_bit_exactly(dtype, kind, tmp_path):
    model, x = _model_and_input(dtype, kind)
    if not _ort_runs(dtype, kind):
        error, message = _refusal(dtype)
        with pytest.raises(error, match=message):
            compile(model, "onnxruntime", pipeline="cleanup")
        return
    expected = _reference(model, x)
    compiled = compile(model, "onnxruntime", pipeline="cleanup")
    (got,) = compiled(x)
    assert got.dtype == np.asarray(expected).dtype
    kept = _inputs_ort_casts_as_specified(dtype, kind, x)
    _assert_same_bits(got[kept], expected[kept], any_nan=kind == "from_float")

    compiled.save(tmp_path / "artifact")
    saved = onnx.load(str(tmp_path / "artifact" / "model.onnx"))
    assert saved.graph.input[0].type.tensor_type.elem_type == model.graph.input[0].type.tensor_type.elem_type
    assert saved.graph.output[0].type.tensor_type.elem_type == model.graph.output[0].type.tensor_type.elem_type
    (reloaded,) = load_compiled(tmp_path / "artifact")(x)
    assert reloaded.dtype == got.dtype
    np.testing.assert_array_equal(_bits(reloaded), _bits(got))


def _assert_same_bits(got: np.ndarray, expected: np.ndarray, any_nan: bool) -> None:
    """Bit-identical; where `any_nan`, a NaN computed from a NaN may be any NaN encoding
    (ONNX leaves it open: ORT's Cast gives float8e5m2 NaN as 0x7F, the reference 0x7E)."""
    got_bits, expected_bits = _bits(got), _bits(expected)
    if any_nan and np.asarray(expected).dtype.kind not in "iu":
        nan = np.isnan(np.asarray(expected).astype(np.float32))
        np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
        got_bits, expected_bits = got_bits[~nan], expected_bits[~nan]
    np.testing.assert_array_equal(got_bits, expected_bits)


def test_bfloat16_and_float8_torch_tensors_run_and_come_back_as_torch():
    torch = pytest.importorskip("torch")
    values = _every_value(DType.BFLOAT16)
    model = _model(helper.make_node("Identity", ["x"], ["y"]), TensorProto.BFLOAT16, TensorProto.BFLOAT16, values.size)
    compiled = compile(model, "onnxruntime", pipeline="cleanup")
    tensor = to_torch(values)
    assert tensor.dtype == torch.bfloat16
    (out,) = compiled(tensor)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.view(torch.int16), tensor.view(torch.int16))

    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    model = _model(helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT), TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT, 256)
    (out,) = compile(model, "onnxruntime", pipeline="cleanup")(e4m3)
    expected = _reference(model, to_numpy(e4m3))
    np.testing.assert_array_equal(_bits(out.numpy()), _bits(expected))


def test_models_with_external_data_widen_a_copy_and_keep_the_saved_files(tmp_path, monkeypatch):
    """Over the external-data threshold the session is built from a file: the widened copy
    sits in a temporary folder linking to the weights; the saved artifact keeps int4 IO."""
    from graphopt.exporters import onnx_export
    from graphopt.targets import onnxruntime as ort_target

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 8)
    monkeypatch.setattr(ort_target, "EXTERNAL_DATA_THRESHOLD", 8)
    monkeypatch.setattr(onnx_export, "EXTERNAL_TENSOR_MIN_BYTES", 8)
    x = _every_value(DType.INT4)
    weights = helper.make_tensor("w", TensorProto.INT8, [x.size], (np.arange(x.size) - 8).tolist())
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["x8"], to=TensorProto.INT8), helper.make_node("Add", ["x8", "w"], ["s"]),
         helper.make_node("Cast", ["s"], ["y"], to=TensorProto.INT4)],
        "external", [helper.make_tensor_value_info("x", TensorProto.INT4, [x.size])],
        [helper.make_tensor_value_info("y", TensorProto.INT4, [x.size])], [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=11)
    expected = _reference(model, x)
    compiled = compile(model, "onnxruntime", pipeline="cleanup")
    np.testing.assert_array_equal(_bits(compiled(x)[0]), _bits(expected))
    compiled.save(tmp_path / "artifact")
    saved = onnx.load(str(tmp_path / "artifact" / "model.onnx"), load_external_data=False)
    assert saved.graph.initializer[0].data_location == TensorProto.EXTERNAL
    assert [v.type.tensor_type.elem_type for v in (saved.graph.input[0], saved.graph.output[0])] == [TensorProto.INT4] * 2
    np.testing.assert_array_equal(_bits(load_compiled(tmp_path / "artifact")(x)[0]), _bits(expected))


def test_a_float4_input_onnx_runtime_cannot_cast_is_refused_at_compile_naming_it():
    model, _ = _model_and_input(DType.FLOAT4E2M1, "to_float")
    with pytest.raises(UnsupportedOpError, match=r"Cast\(float4e2m1\) -> float32 \(no kernel for Cast\(\d+\)\)"):
        compile(model, "onnxruntime", pipeline="cleanup")


def test_check_run_graph_returns_bfloat16_nan_payloads_and_int4_values_exactly():
    from graphopt.check import run_graph
    from graphopt.frontends.onnx_import import from_onnx

    # run_graph turns ORT's optimizer off, so ORT's missing int4 Identity kernel shows: Cast it
    for dtype, kind in ((DType.BFLOAT16, "identity"), (DType.FLOAT8E5M2, "identity"), (DType.INT4, "to_float"), (DType.UINT4, "from_float")):
        model, x = _model_and_input(dtype, kind)
        expected = _reference(model, x)
        (got,) = run_graph(from_onnx(model), {"x": x})
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(_bits(got), _bits(expected))


def test_a_0d_bfloat16_input_keeps_its_shape():
    x = np.array(-2.5, dtype=ml_dtypes.bfloat16)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "scalar",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [])], [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=11)
    (got,) = compile(model, "onnxruntime", pipeline="cleanup")(x)
    assert got.shape == () and got.dtype == x.dtype
    assert float(got) == -2.5
