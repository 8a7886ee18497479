"""The `tvm:llvm` target against ONNX Runtime on small ONNX models whose inputs are fed at run
time (nothing folded): the ONNX semantics issue #18 found computed wrongly (negative indices and
axes, integer division, fully masked rows, variadic ops, optional outputs, zero-size tensors)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pytest

pytest.importorskip("tvm")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

import graphopt  # noqa: E402
from graphopt.errors import UnsupportedOpError  # noqa: E402

FLOAT, INT32, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL


def _model(nodes: list[onnx.NodeProto], inputs: Sequence[tuple[str, int, Sequence[Any]]], outputs: Sequence[str], *,
           opset: int = 17, initializers: Sequence[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """A checked model of `nodes`; `inputs` are (name, element type, shape) graph inputs, the
    outputs' types are inferred by ONNX."""
    graph = helper.make_graph(
        nodes, "conformance", [helper.make_tensor_value_info(name, dtype, list(shape)) for name, dtype, shape in inputs],
        [helper.make_empty_tensor_value_info(name) for name in outputs], initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def _ints(name: str, values: Sequence[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, INT64, [len(values)], list(values))


def _onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_like_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, rtol: float = 1e-5,
                             compiled: Optional[Any] = None) -> list[np.ndarray]:
    """Compile `model` for tvm:llvm (unless given), run it on `feeds` and compare every output
    with ONNX Runtime's: same dtype and shape, equal integers and booleans, floats within
    `rtol` (NaN where ONNX Runtime gives NaN, infinities equal)."""
    compiled = compiled or graphopt.compile(model, target="tvm:llvm")
    actual = compiled(**feeds)
    expected = _onnxruntime(model, feeds)
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual):
        assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)
        else:
            np.testing.assert_array_equal(got, want)
    return actual


# --- 1. negative run-time indices -----------------------------------------------------


@pytest.mark.parametrize("rows", [3, "n"])
def test_gather_counts_negative_runtime_indices_from_the_end(rows):
    model = _model([helper.make_node("Gather", ["x", "i"], ["y"], axis=0), helper.make_node("Gather", ["x", "j"], ["z"], axis=-1)],
                   [("x", FLOAT, [rows, 4]), ("i", INT64, [4]), ("j", INT32, [2, 2])], ["y", "z"])
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    feeds = {"x": x, "i": np.array([-1, 0, -3, 2], np.int64), "j": np.array([[-1, -4], [0, 3]], np.int32)}
    y, z = _assert_like_onnxruntime(model, feeds)
    np.testing.assert_array_equal(y, x[[2, 0, 0, 2]])
    np.testing.assert_array_equal(z[0], [[3, 0], [0, 3]])


@pytest.mark.parametrize("rows", [2, "n"])
def test_gather_elements_counts_negative_runtime_indices_from_the_end(rows):
    model = _model([helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1),
                    helper.make_node("GatherElements", ["x", "k"], ["z"], axis=-2)],
                   [("x", FLOAT, [rows, 4]), ("i", INT64, [rows, 3]), ("k", INT32, [1, 4])], ["y", "z"])
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(2, 4), "i": np.array([[-1, 0, -4], [3, -2, 1]], np.int64),
             "k": np.array([[-1, 0, -2, 1]], np.int32)}
    y, z = _assert_like_onnxruntime(model, feeds)
    np.testing.assert_array_equal(y, [[3, 0, 0], [7, 6, 5]])
    np.testing.assert_array_equal(z, [[4, 1, 2, 7]])


# --- 2. negative axes -------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-3, -2, -1, 0, 3])
def test_flatten_takes_a_negative_axis_as_axis_plus_rank(axis):
    model = _model([helper.make_node("Flatten", ["x"], ["y"], axis=axis)], [("x", FLOAT, [2, 3, 4])], ["y"])
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    (y,) = _assert_like_onnxruntime(model, {"x": x})
    split = axis % 3 if axis < 0 else axis
    assert y.shape == (int(np.prod(x.shape[:split])), int(np.prod(x.shape[split:])))


@pytest.mark.parametrize("rows", [5, "n"])
@pytest.mark.parametrize("start, end, step", [(-9, 10, 1), (0, 2, 1), (3, 1, 1), (1, 9, 2), (9, -9, -1), (-1, -10, -2), (3, 0, -1),
                                              (-1, -(2**63), -1), (2**62, 0, -3)])
def test_slice_clamps_constant_bounds_and_takes_negative_steps(rows, start, end, step):
    model = _model([helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])], [("x", FLOAT, [rows, 2])], ["y"],
                   initializers=[_ints("starts", [start]), _ints("ends", [end]), _ints("axes", [0]), _ints("steps", [step])])
    compiled = graphopt.compile(model, target="tvm:llvm")
    for count in ([5] if rows == 5 else [1, 5]):
        x = np.arange(2 * count, dtype=np.float32).reshape(count, 2)
        (y,) = _assert_like_onnxruntime(model, {"x": x}, compiled=compiled)
        np.testing.assert_array_equal(y, x[max(start, -(2**62)):max(end, -(2**62)):step])


def test_softmax_before_opset_13_normalizes_over_every_axis_from_axis_on():
    model = _model([helper.make_node("Softmax", ["x"], ["y"]), helper.make_node("Softmax", ["x"], ["z"], axis=-1)],
                   [("x", FLOAT, [2, 3, 4])], ["y", "z"], opset=11)
    y, _ = _assert_like_onnxruntime(model, {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)})
    np.testing.assert_allclose(y.sum(axis=(1, 2)), [1, 1], rtol=1e-5)


@pytest.mark.parametrize("axes, noop", [([], 0), ([], 1), (None, 1), ([-1, 0], 0)])
def test_reductions_follow_empty_axes_and_noop_with_empty_axes(axes, noop):
    inputs = ["x"] if axes is None else ["x", "axes"]
    nodes = [helper.make_node(op, inputs, [op], keepdims=0, noop_with_empty_axes=noop)
             for op in ("ReduceSum", "ReduceMax", "ReduceMean", "ReduceMin")]
    model = _model(nodes, [("x", FLOAT, [2, 3, 4])], [n.output[0] for n in nodes], opset=18,
                   initializers=[] if axes is None else [_ints("axes", axes)])
    _assert_like_onnxruntime(model, {"x": np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)})


# --- 3. integer division ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [INT32, INT64])
def test_integer_div_truncates_toward_zero(dtype):
    model = _model([helper.make_node("Div", ["a", "b"], ["y"])], [("a", dtype, [6]), ("b", dtype, [6])], ["y"])
    numpy_type = helper.tensor_dtype_to_np_dtype(dtype)
    feeds = {"a": np.array([-7, 7, -7, 7, -6, 5], numpy_type), "b": np.array([2, -2, -2, 2, 3, -7], numpy_type)}
    (y,) = _assert_like_onnxruntime(model, feeds)
    np.testing.assert_array_equal(y, [-3, -3, 3, 3, -2, 0])


def test_integer_div_of_runtime_dims_truncates_toward_zero():
    """(n - 10) / 4 on the symbolic dim n, evaluated as shape arithmetic."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Sub", ["shape", "ten"], ["less"]),
             helper.make_node("Div", ["less", "four"], ["y"])]
    model = _model(nodes, [("x", FLOAT, ["n"])], ["y"], initializers=[_ints("ten", [10]), _ints("four", [4])])
    compiled = graphopt.compile(model, target="tvm:llvm")
    for n in (3, 13):
        (y,) = _assert_like_onnxruntime(model, {"x": np.zeros(n, np.float32)}, compiled=compiled)
        assert y.tolist() == [int((n - 10) / 4)]


# --- 4. fully masked attention rows --------------------------------------------------------


def _masked_attention_model() -> onnx.ModelProto:
    """Attention as ONNX's opset-23 function writes it: a boolean mask made -inf, softmax,
    and rows whose mask is all -inf (ReduceMax == -inf) set to zero before the V matmul."""
    nodes = [
        helper.make_node("Where", ["mask", "zero", "minus_inf"], ["bias"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("ReduceMax", ["bias", "last"], ["row_max"]),
        helper.make_node("Equal", ["row_max", "minus_inf"], ["row_masked"]),
        helper.make_node("Where", ["row_masked", "zero", "probs"], ["safe"]),
        helper.make_node("MatMul", ["safe", "v"], ["y"]),
    ]
    constants = [helper.make_tensor("zero", FLOAT, [], [0.0]), helper.make_tensor("minus_inf", FLOAT, [], [-np.inf]),
                 helper.make_tensor("scale", FLOAT, [], [0.5]), _ints("last", [-1])]
    inputs = [(name, FLOAT, [1, 2, "s", 4]) for name in "qkv"] + [("mask", BOOL, ["s", "s"])]
    return _model(nodes, inputs, ["y", "row_max"], opset=18, initializers=constants)


def test_fully_masked_attention_rows_give_what_onnxruntime_gives_not_nan():
    model = _masked_attention_model()
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((1, 2, 3, 4)).astype(np.float32) for name in "qkv"}
    feeds["mask"] = np.array([[False, False, False], [True, False, True], [True, True, True]])
    y, row_max = _assert_like_onnxruntime(model, feeds)
    np.testing.assert_array_equal(row_max[:, 0], [-np.inf, 0.0, 0.0])
    np.testing.assert_array_equal(y[0, :, 0], np.zeros((2, 4), np.float32))
    assert not np.isnan(y).any()


def test_reduce_max_and_min_over_infinite_rows_give_infinities():
    model = _model([helper.make_node("ReduceMax", ["x"], ["high"], axes=[-1], keepdims=0),
                    helper.make_node("ReduceMin", ["x"], ["low"], axes=[1], keepdims=1)], [("x", FLOAT, [3, "n"])], ["high", "low"])
    x = np.array([[-np.inf, -np.inf], [np.inf, np.inf], [1.0, -np.inf]], np.float32)
    high, low = _assert_like_onnxruntime(model, {"x": x})
    np.testing.assert_array_equal(high, [-np.inf, np.inf, 1.0])
    np.testing.assert_array_equal(low[:, 0], [-np.inf, np.inf, -np.inf])


# --- 5. variadic ops; refusals are deliberate, bugs are not disguised ------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_max_min_sum_mean_take_any_number_of_broadcast_inputs(count):
    names = [f"x{i}" for i in range(count)]
    shapes = [[2, 3], [3], [1, 3], [2, 1]][:count]
    nodes = [helper.make_node(op, names, [op]) for op in ("Max", "Min", "Sum", "Mean")]
    model = _model(nodes, [(n, FLOAT, s) for n, s in zip(names, shapes)], [n.output[0] for n in nodes], opset=13)
    rng = np.random.default_rng(count)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}
    _assert_like_onnxruntime(model, feeds)


def test_integer_max_of_three_inputs_is_exact():
    model = _model([helper.make_node("Max", ["a", "b", "c"], ["y"]), helper.make_node("Min", ["a", "b", "c"], ["z"])],
                   [(n, INT64, [3]) for n in "abc"], ["y", "z"])
    feeds = {"a": np.array([1, 5, -3]), "b": np.array([4, 2, 2**62]), "c": np.array([0, 9, -(2**62)])}
    y, z = _assert_like_onnxruntime(model, feeds)
    np.testing.assert_array_equal(y, [4, 9, 2**62])


def test_float_max_and_min_propagate_nan_from_either_input():
    model = _model([helper.make_node("Max", ["a", "b", "a"], ["y"]), helper.make_node("Min", ["b", "a"], ["z"])],
                   [(n, FLOAT, [4]) for n in "ab"], ["y", "z"])
    feeds = {"a": np.array([np.nan, 1, np.nan, 2], np.float32), "b": np.array([1, np.nan, np.nan, -np.inf], np.float32)}
    y, z = _assert_like_onnxruntime(model, feeds)
    np.testing.assert_array_equal(y, [np.nan, np.nan, np.nan, 2])
    np.testing.assert_array_equal(z, [np.nan, np.nan, np.nan, -np.inf])


def test_a_value_the_translation_cannot_compute_is_refused_naming_the_node():
    model = _model([helper.make_node("Pow", ["a", "b"], ["y"], name="power")], [("a", INT32, [3]), ("b", FLOAT, [3])], ["y"])
    with pytest.raises(UnsupportedOpError) as info:
        graphopt.compile(model, target="tvm:llvm")
    assert str(info.value) == "node 'power' (Pow): Pow of an integer base (int32) is not supported"


def test_a_bug_in_a_translation_rule_is_raised_as_it_is_not_as_a_refusal(monkeypatch):
    from graphopt.targets import tvm_relax

    def broken(c: Any, node: Any, x: Any) -> Any:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(tvm_relax._RULES, ("", "Relu"), broken)
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="act")], [("x", FLOAT, [3])], ["y"])
    with pytest.raises(ZeroDivisionError) as info:
        graphopt.compile(model, target="tvm:llvm")
    assert "while translating node 'act' (Relu) to Relax" in "".join(info.value.__notes__)


# --- 6. optional outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 1])
def test_layer_normalization_gives_its_mean_and_inv_std_dev_outputs(axis):
    model = _model([helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y", "mean", "inv_std"], axis=axis, epsilon=1e-3)],
                   [("x", FLOAT, ["n", 3, 4]), ("scale", FLOAT, [4] if axis == -1 else [3, 4]), ("bias", FLOAT, [4])],
                   ["y", "mean", "inv_std"])
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 3, 4)).astype(np.float32), "bias": rng.standard_normal(4).astype(np.float32),
             "scale": rng.standard_normal((4,) if axis == -1 else (3, 4)).astype(np.float32)}
    _, mean, _ = _assert_like_onnxruntime(model, feeds)
    assert mean.shape == ((2, 3, 1) if axis == -1 else (2, 1, 1))


# --- 7. zero-size tensors ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[2, 0], [0, 3], [0], [2, 0, 3]])
def test_elementwise_kernels_take_zero_size_tensors(shape):
    model = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["x", "x"], ["s"]),
                    helper.make_node("Where", ["c", "x", "r"], ["w"])], [("x", FLOAT, shape), ("c", BOOL, shape)], ["r", "s", "w"])
    outputs = _assert_like_onnxruntime(model, {"x": np.zeros(shape, np.float32), "c": np.zeros(shape, bool)})
    assert all(o.shape == tuple(shape) for o in outputs)


def test_a_zero_size_part_inside_a_fused_kernel_is_computed():
    """Split into 4 and 0 columns, both parts used: the fused kernel has a loop of extent 0."""
    nodes = [helper.make_node("Split", ["x", "sizes"], ["left", "right"], axis=-1), helper.make_node("Mul", ["left", "x"], ["square"]),
             helper.make_node("Concat", ["right", "square", "right"], ["y"], axis=-1)]
    model = _model(nodes, [("x", FLOAT, [2, 3, 4])], ["y"], initializers=[_ints("sizes", [4, 0])])
    x = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    (y,) = _assert_like_onnxruntime(model, {"x": x})
    np.testing.assert_allclose(y, x * x, rtol=1e-6)


@pytest.mark.parametrize("depth", [0, "n"])
def test_reductions_and_matmuls_over_an_empty_axis_give_their_identity(depth):
    nodes = [helper.make_node(op, ["x", "axes"], [op], keepdims=0) for op in ("ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean")]
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["product"]))
    model = _model(nodes, [("x", FLOAT, [2, depth]), ("w", FLOAT, [depth, 3])], [n.output[0] for n in nodes], opset=18,
                   initializers=[_ints("axes", [1])])
    total, high, low, _, product = _assert_like_onnxruntime(model, {"x": np.zeros((2, 0), np.float32), "w": np.zeros((0, 3), np.float32)})
    np.testing.assert_array_equal(high, [-np.inf, -np.inf])
    np.testing.assert_array_equal(product, np.zeros((2, 3), np.float32))
