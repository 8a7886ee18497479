"""`to_fx` on what the ONNX backend node tests found: unsigned integer arithmetic, reductions
over empty sets, Cast's float8 attributes, scalar attention biases after `fuse`, and refusals
at conversion (never at call time) of what torch cannot run.

Each case builds a tiny `onnx.helper` model with run-time inputs and compares the torch
module with the ONNX reference evaluator (exact for integers; ONNX Runtime lacks many
unsigned and float8 kernels) or with ONNX Runtime.
"""

from __future__ import annotations

import collections
import warnings

import ml_dtypes
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import graphopt
from graphopt.errors import UnsupportedOpError
from graphopt.exporters import fx_export, torch_kernels
from graphopt.exporters.fx_export import to_fx
from graphopt.frontends.onnx_import import from_onnx

RNG = np.random.default_rng(18)


def one_node(op: str, inputs: list[np.ndarray], out_type: int, *, opset: int = 21, **attrs: object) -> onnx.ModelProto:
    names = [f"x{i}" for i in range(len(inputs))]
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"], **attrs)],
        op.lower(),
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in zip(names, inputs)],
        [helper.make_tensor_value_info("y", out_type, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.float8_e8m0fnu:
        return torch.from_numpy(array.view(np.uint8).copy()).view(torch.float8_e8m0fnu)
    if array.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"):
        same_width = array.view(np.uint8 if array.itemsize == 1 else np.int16)
        return torch.from_numpy(same_width.copy()).view(getattr(torch, array.dtype.name))
    return torch.from_numpy(np.array(array))


def run_fx(model: onnx.ModelProto, inputs: list[np.ndarray]) -> torch.Tensor:
    return to_fx(from_onnx(model))(*map(to_torch, inputs))[0]


def assert_bits_equal(got: torch.Tensor, want: np.ndarray) -> None:
    """Same dtype, shape and bytes, except that any NaN matches any NaN."""
    assert str(got.dtype).removeprefix("torch.") == want.dtype.name
    assert tuple(got.shape) == want.shape
    if want.dtype == np.bool_:
        np.testing.assert_array_equal(got.numpy(), want)
        return
    width = {1: (torch.uint8, np.uint8), 2: (torch.int16, np.int16), 4: (torch.int32, np.int32), 8: (torch.int64, np.int64)}
    torch_int, np_int = width[want.dtype.itemsize]
    got_bits, want_bits = got.view(torch_int).numpy(), want.view(np_int)
    if "float" in want.dtype.name:
        want_nan = np.isnan(want.astype(np.float64))
        np.testing.assert_array_equal(torch.isnan(got.to(torch.float64)).numpy(), want_nan)
        got_bits, want_bits = got_bits[~want_nan], want_bits[~want_nan]
    np.testing.assert_array_equal(got_bits, want_bits)


# --- unsigned integers --------------------------------------------------------

UNSIGNED = [np.uint16, np.uint32, np.uint64]


def unsigned_operands(dtype: type) -> list[np.ndarray]:
    """Values including the type's extremes (wrap-around for add/sub/mul, order across the
    int64 sign bit for uint64) and no zero divisor."""
    top = np.iinfo(dtype).max
    a = np.array([0, 1, 7, top, top - 1, top // 2 + 3, 12345 % top, 2], dtype=dtype)
    b = np.array([3, top, 2, 2, top, top // 2, 5, top - 7], dtype=dtype)
    return [a, b]


@pytest.mark.parametrize("dtype", UNSIGNED, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    ("op", "out_type"),
    [
        ("Add", None), ("Sub", None), ("Mul", None), ("Max", None), ("Min", None),
        ("Less", TensorProto.BOOL), ("LessOrEqual", TensorProto.BOOL), ("Greater", TensorProto.BOOL),
        ("GreaterOrEqual", TensorProto.BOOL), ("Equal", TensorProto.BOOL),
    ],
)
def test_unsigned_arithmetic_and_comparisons_match_reference(op: str, out_type: int | None, dtype: type) -> None:
    inputs = unsigned_operands(dtype)
    model = one_node(op, inputs, out_type or helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    assert_bits_equal(run_fx(model, inputs), ReferenceEvaluator(model).run(None, dict(zip(["x0", "x1"], inputs)))[0])


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", ["Div", "Mod"])
def test_unsigned_division_matches_reference(op: str, dtype: type) -> None:
    inputs = unsigned_operands(dtype)
    model = one_node(op, inputs, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    assert_bits_equal(run_fx(model, inputs), ReferenceEvaluator(model).run(None, dict(zip(["x0", "x1"], inputs)))[0])


@pytest.mark.parametrize(
    ("op", "dtype"), [("ReduceMax", np.uint64), ("ReduceMin", np.uint32), ("ReduceSum", np.uint64), ("ArgMax", np.uint64)]
)
def test_unsigned_reductions_match_reference(op: str, dtype: type) -> None:
    top = np.iinfo(dtype).max
    x = np.array([[1, top, 5], [top - 3, 0, 2**31]], dtype=dtype)
    out_type = TensorProto.INT64 if op == "ArgMax" else helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = one_node(op, [x], out_type, opset=18, **({"axis": 1} if op == "ArgMax" else {}))
    assert_bits_equal(run_fx(model, [x]), ReferenceEvaluator(model).run(None, {"x0": x})[0])


@pytest.mark.parametrize("op", ["Div", "Mod"])
def test_uint64_division_is_refused_at_conversion(op: str) -> None:
    inputs = unsigned_operands(np.uint64)
    graph = from_onnx(one_node(op, inputs, TensorProto.UINT64))
    with pytest.raises(UnsupportedOpError, match=rf"node '.*' \({op}\).*{op} on element type uint64"):
        to_fx(graph)


def test_string_and_sub_byte_types_are_refused_at_conversion() -> None:
    strings = np.array(["a", "b"], dtype=object)
    graph = from_onnx(one_node("Equal", [strings, strings], TensorProto.BOOL))
    with pytest.raises(UnsupportedOpError, match=r"\(Equal\).*element type string"):
        to_fx(graph)
    cast = from_onnx(one_node("Cast", [np.zeros(4, np.float32)], TensorProto.INT4, to=TensorProto.INT4))
    with pytest.raises(UnsupportedOpError, match=r"\(Cast\).*element type int4"):
        to_fx(cast)


# --- reductions over an empty set ---------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint8, np.uint32, np.bool_], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_max_min_over_empty_set_match_reference(op: str, dtype: type, keepdims: int) -> None:
    x = np.zeros((2, 0, 3), dtype=dtype)
    axes = np.array([1], np.int64)
    model = one_node(op, [x, axes], helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), opset=20, keepdims=keepdims)
    want = ReferenceEvaluator(model).run(None, {"x0": x, "x1": axes})[0]
    assert_bits_equal(run_fx(model, [x, axes]), want)


def test_reduce_max_over_empty_set_matches_onnxruntime() -> None:
    x = np.zeros((0, 4), np.float32)
    axes = np.array([0], np.int64)
    model = one_node("ReduceMax", [x, axes], TensorProto.FLOAT, opset=18, keepdims=1)
    want = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x0": x, "x1": axes})[0]
    assert_bits_equal(run_fx(model, [x, axes]), want)


# --- Cast: round_mode (opset 25) and saturate ----------------------------------

CAST_VALUES = np.array(
    [0.0, 1.0, 1.5, 1.75, 3.0, 0.3, 1e-3, 6e4, 1e30, 3.3e38, 1e-40, np.inf, np.nan, 448.0, 470.0, 57344.0, 61440.0, -2.5, -1e9],
    np.float32,
)


@pytest.mark.parametrize("saturate", [0, 1])
@pytest.mark.parametrize("round_mode", ["up", "down", "nearest"])
@pytest.mark.parametrize("source", [np.float32, np.float16])
def test_cast_to_float8e8m0_matches_reference(round_mode: str, saturate: int, source: type) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x = np.abs(CAST_VALUES).astype(source)
    model = one_node(
        "Cast", [x], TensorProto.FLOAT8E8M0, opset=25, to=TensorProto.FLOAT8E8M0, round_mode=round_mode, saturate=saturate
    )
    assert_bits_equal(run_fx(model, [x]), ReferenceEvaluator(model).run(None, {"x0": x})[0])


def test_cast_from_float8e8m0_matches_reference() -> None:
    x = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
    model = one_node("Cast", [x], TensorProto.FLOAT, opset=25, to=TensorProto.FLOAT)
    assert_bits_equal(run_fx(model, [x]), ReferenceEvaluator(model).run(None, {"x0": x})[0])


@pytest.mark.parametrize("saturate", [0, 1])
@pytest.mark.parametrize(
    "to", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ]
)
def test_cast_to_float8_saturate_matches_reference(to: int, saturate: int) -> None:
    x = np.concatenate([CAST_VALUES, -CAST_VALUES])
    model = one_node("Cast", [x], to, opset=25, to=to, saturate=saturate)
    assert_bits_equal(run_fx(model, [x]), ReferenceEvaluator(model).run(None, {"x0": x})[0])


def test_float8e8m0_constant_becomes_a_buffer() -> None:
    weights = np.arange(0, 256, 5, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "wf"], ["y"])],
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(weights)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    x = RNG.standard_normal(len(weights)).astype(np.float32)
    assert_bits_equal(run_fx(model, [x]), ReferenceEvaluator(model).run(None, {"x": x})[0])


def test_unknown_round_mode_is_refused_at_conversion() -> None:
    graph = from_onnx(one_node("Cast", [CAST_VALUES], TensorProto.FLOAT8E8M0, opset=25, to=TensorProto.FLOAT8E8M0))
    graph.nodes[0].attrs["round_mode"] = "stochastic"
    with pytest.raises(UnsupportedOpError, match=r"\(Cast\).*round_mode='stochastic'"):
        to_fx(graph)


def test_unknown_pad_mode_is_refused_at_conversion() -> None:
    x, pads = np.zeros((2, 3), np.float32), np.array([1, 1, 1, 1], np.int64)
    graph = from_onnx(one_node("Pad", [x, pads], TensorProto.FLOAT, opset=18, mode="reflect"))
    graph.nodes[0].attrs["mode"] = "mirror"
    with pytest.raises(UnsupportedOpError, match=r"\(Pad\).*mode='mirror'"):
        to_fx(graph)


# --- attention with a scalar bias after fuse -----------------------------------


def attention_model(bias_shape: list[int]) -> onnx.ModelProto:
    """softmax(Q K^T * 0.5 + bias) V with a run-time bias of `bias_shape`."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 3, 4]) for n in "qkv"]
    inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, bias_shape))
    graph = helper.make_graph(
        nodes, "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(0.5, np.float32), "scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("bias_shape", [[], [1], [3]], ids=["0d", "size1", "1d-keys"])
def test_fused_attention_with_scalar_bias_matches_onnxruntime(bias_shape: list[int]) -> None:
    model = attention_model(bias_shape)
    feeds = {n: RNG.standard_normal((1, 2, 3, 4)).astype(np.float32) for n in "qkv"}
    feeds["bias"] = RNG.standard_normal(bias_shape).astype(np.float32)
    want = onnxruntime.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    graph = graphopt.optimize(from_onnx(model), "fuse")
    assert [n.qualified_op for n in graph.nodes] == ["graphopt::Attention"]
    got = to_fx(graph)(*[torch.from_numpy(feeds[v.name]) for v in graph.inputs])[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


# --- the partial-dtype table is what torch runs --------------------------------

MEASURED = sorted(torch_kernels.PARTIAL_DTYPES, key=str)


def _typed_input(op: str) -> int:
    return 1 if op == "Where" else 0


def _node_cases() -> dict[str, list]:
    """Single-node ONNX backend test cases per op with a torch kernel, inputs plain numpy;
    the float cases where an op has any (so that int64 indices are never mistaken for data)."""
    from onnx.backend.test.case.node import collect_testcases

    by_op: dict[str, list] = collections.defaultdict(list)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    for case in cases:
        nodes = case.model.graph.node
        if len(nodes) != 1 or not case.data_sets or nodes[0].domain not in ("", "ai.onnx"):
            continue
        op = nodes[0].op_type
        if not all(isinstance(a, (np.ndarray, np.generic)) for a in case.data_sets[0][0]):
            continue
        inputs = [np.asarray(a) for a in case.data_sets[0][0]]
        if torch_kernels.get_kernel("", op) is None or any(a.dtype.kind not in "biuf" or a.dtype.itemsize > 8 for a in inputs):
            continue
        if len(inputs) > _typed_input(op) and inputs[_typed_input(op)].dtype != np.bool_:
            by_op[op].append((case.model, inputs))
    return {op: [c for c in cases if c[1][_typed_input(op)].dtype.kind == "f"] or cases for op, cases in by_op.items()}


def _output_dtypes(model: onnx.ModelProto, inputs: list[np.ndarray], dtype: torch.dtype | None) -> list | None:
    """Output dtypes of the kernel run with the op's typed inputs converted to `dtype`
    (None: as they are), or None where torch cannot run it."""
    module = fx_export._build(from_onnx(model), False, ())
    typed = inputs[_typed_input(model.graph.node[0].op_type)].dtype
    args = [torch.from_numpy(np.array(a)) for a in inputs]
    if dtype is not None:
        args = [t.to(dtype) if a.dtype == typed else t for a, t in zip(inputs, args)]
    try:
        outputs = module(*args)
    except Exception as error:  # noqa: BLE001 - any failure means torch cannot run it
        if "ZeroDivisionError" in str(error):  # integer data made invalid by the conversion
            return [None]
        return None
    return [o.dtype if isinstance(o, torch.Tensor) else None for o in outputs]


@pytest.mark.filterwarnings("ignore")
def test_partial_dtype_table_matches_torch() -> None:
    """Re-measure, on the ONNX node test cases, which partial dtypes each kernel runs with the
    right output types; the table must say exactly that (update it when torch changes)."""
    measured: dict[str, frozenset] = {}
    for op, cases in _node_cases().items():
        runnable = []
        for model, inputs in cases:
            base = _output_dtypes(model, inputs, None)
            if base is not None:
                runnable.append((model, inputs, base))
        supported = set()
        for dtype in MEASURED:
            ok = True
            for model, inputs, base in runnable:
                typed = torch.from_numpy(np.array(inputs[_typed_input(op)])).dtype
                got = _output_dtypes(model, inputs, dtype)
                if got != [None] and got != [dtype if b == typed else b for b in base]:
                    ok = False
                    break
            if ok and runnable:
                supported.add(dtype)
        if supported:
            measured[op] = frozenset(supported)
    hand_listed = ("Cast", "CastLike", "Constant")
    table = {op: dtypes for op, dtypes in torch_kernels.PARTIAL_DTYPE_KERNELS.items() if op not in hand_listed}
    assert {op: sorted(map(str, d)) for op, d in measured.items()} == {op: sorted(map(str, d)) for op, d in table.items()}


@pytest.mark.filterwarnings("ignore:Casting complex values")
@pytest.mark.parametrize("dtype", MEASURED, ids=str)
def test_cast_and_constant_run_every_partial_dtype(dtype: torch.dtype) -> None:
    onnx_dtype = next(k for k, v in torch_kernels._ONNX_DTYPES.items() if v == dtype)
    x = torch.ones(3)
    there = torch_kernels.onnx_Cast(x, to=onnx_dtype)
    assert there.dtype == dtype
    assert torch_kernels.onnx_CastLike(there, x).dtype == torch.float32
