"""graphopt.check: output comparison used by check mode (sequences, optionals, low-precision floats)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

import graphopt
from graphopt.check import max_abs_error


def test_float32_differences_are_absolute() -> None:
    assert max_abs_error([np.array([1.0], np.float32)], [np.array([1.5], np.float32)]) == 0.5
    assert max_abs_error([np.array([np.inf, np.nan])], [np.array([np.inf, np.nan])]) == 0.0
    assert max_abs_error([np.array([np.inf])], [np.array([-np.inf])]) == float("inf")
    assert max_abs_error([np.array([np.nan])], [np.array([0.0])]) == float("inf")
    assert max_abs_error([np.array(1.0)], [np.array(1.25)]) == 0.25
    assert max_abs_error([np.array(0.4, np.float16)], [np.nextafter(np.float16(0.4), np.float16(1))]) == 0.0


def test_low_precision_rounding_is_not_an_error() -> None:
    half = np.array([0.4, 1.0, -3.0], np.float16)
    one_ulp = np.nextafter(half, np.float16(10))
    assert max_abs_error([half], [one_ulp]) == 0.0
    assert max_abs_error([half], [half * np.float16(1.01)]) > 0.009
    bf = np.array([1.0, 2.0], ml_dtypes.bfloat16)
    assert max_abs_error([bf], [np.array([1.0, 3.0], ml_dtypes.bfloat16)]) == 1.0
    assert max_abs_error([bf], [bf]) == 0.0


def test_sequences_and_optionals_compare_elementwise() -> None:
    seq = [np.ones((2,), np.float32), np.zeros((3,), np.float32)]
    assert max_abs_error([seq], [[s.copy() for s in seq]]) == 0.0
    assert max_abs_error([seq], [[seq[0] + 0.25, seq[1]]]) == 0.25
    assert max_abs_error([seq], [seq[:1]]) == float("inf")
    assert max_abs_error([None], [None]) == 0.0
    assert max_abs_error([None], [np.ones(1)]) == float("inf")


def test_check_mode_runs_a_model_with_sequence_outputs() -> None:
    nodes = [
        helper.make_node("Concat", ["x", "x"], ["y"], axis=0),
        helper.make_node("SequenceConstruct", ["x", "y"], ["seq"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    optimized = graphopt.optimize(model, "cleanup", check=True, check_inputs={"x": np.array([1.0, 2.0], np.float32)})
    assert optimized.report.records[0].max_error == 0.0


def test_run_graph_takes_and_returns_bfloat16_and_float8() -> None:
    from graphopt.check import run_graph
    from graphopt.frontends.onnx_import import from_onnx

    nodes = [
        helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["wide"], ["y"], to=TensorProto.FLOAT8E4M3FN),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, [3]), helper.make_tensor_value_info("wide", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = np.array([0.5, -2.0, 3.0], ml_dtypes.bfloat16)
    y, wide = run_graph(from_onnx(model), {"x": x})
    assert y.dtype == ml_dtypes.float8_e4m3fn and wide.dtype == np.float32
    np.testing.assert_array_equal(y.astype(np.float32), [0.5, -2.0, 3.0])
    np.testing.assert_array_equal(wide, [0.5, -2.0, 3.0])
