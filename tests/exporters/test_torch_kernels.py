"""Each torch kernel must agree with ONNX's own semantics.

Every case builds a one-node ONNX model at a given opset, runs it with the ONNX
reference evaluator (or onnxruntime where the reference departs from the
spec), and runs the kernel on the same inputs, with the node's attributes
decoded to Python values the way the exporter passes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from graphopt.exporters import torch_kernels
from graphopt.exporters.torch_kernels import MULTI_OUTPUT_KERNELS, MULTI_OUTPUT_OPS, OPSET_SENSITIVE_OPS, TORCH_KERNELS, get_kernel

RNG = np.random.default_rng(20240607)
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


@dataclass(frozen=True)
class Case:
    op: str
    inputs: tuple[np.ndarray | None, ...]
    attrs: dict[str, Any]
    opset: int
    outputs: int
    runtime: str
    kernel_kwargs: dict[str, Any] = field(default_factory=dict)


def case(
    op: str,
    *inputs: np.ndarray | None,
    opset: int = 18,
    outputs: int = 1,
    id: str = "",  # noqa: A002
    runtime: str = "reference",
    kernel_kwargs: dict[str, Any] | None = None,
    **attrs: Any,
) -> Any:
    spec = Case(op, inputs, attrs, opset, outputs, runtime, kernel_kwargs or {})
    return pytest.param(spec, id=f"{op}{opset}-{id}" if id else f"{op}{opset}")


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def f16(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float16)


def pos32(*shape: int) -> np.ndarray:
    return RNG.uniform(0.1, 3.0, shape).astype(np.float32)


def ints(*shape: int, low: int = -5, high: int = 6, dtype: type = np.int64) -> np.ndarray:
    return RNG.integers(low, high, shape).astype(dtype)


def bools(*shape: int) -> np.ndarray:
    return RNG.random(shape) < 0.5


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def scalar(value: Any, dtype: type) -> np.ndarray:
    return np.array(value, dtype=dtype)


def with_specials(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.flat[:4] = [np.nan, np.inf, -np.inf, 0.0]
    return x


# --- elementwise -----------------------------------------------------------

ELEMENTWISE = [
    case("Add", f32(2, 3, 4), f32(3, 1), id="broadcast"),
    case("Add", ints(3, 4, dtype=np.int32), ints(4, dtype=np.int32), id="int32"),
    case("Sub", f32(2, 3), f32(2, 3)),
    case("Mul", f32(4, 1, 3), f32(2, 3), id="broadcast"),
    case("Div", f32(2, 3), pos32(2, 3)),
    case("Div", ints(40, low=-50, high=50, dtype=np.int32), np.tile(i64(3, -3, 7, -7).astype(np.int32), 10), id="int-trunc"),
    case("Div", ints(8, low=-50, high=50), i64(2), id="int64-broadcast"),
    case("Mod", ints(20, low=-20, high=20), np.tile(i64(3, -3, 7, -7), 5), id="int"),
    case("Mod", ints(20, low=-20, high=20, dtype=np.int32), np.tile(i64(3, -3, 7, -7).astype(np.int32), 5), id="int-fmod", fmod=1),
    case("Mod", f32(12) * 10, np.tile(np.array([3.0, -2.5], np.float32), 6), id="float-fmod", fmod=1),
    case("Pow", pos32(3, 4), f32(3, 4)),
    case("Pow", f32(3, 4), ints(4, low=0, high=4), id="int-exponent"),
    case("Pow", ints(6, low=0, high=6, dtype=np.int32), np.array([0.5, 2.0, 1.5, 3.0, 0.0, 2.5], np.float32), id="int-base-float-exp"),
    case("Pow", ints(6, low=-4, high=5), ints(6, low=0, high=4), id="int-int"),
    case("Neg", f32(3, 4)),
    case("Neg", ints(5, dtype=np.int32), id="int32"),
    case("Abs", f32(3, 4)),
    case("Abs", ints(5, dtype=np.int8), id="int8"),
    case("Sign", np.array([-2.0, 0.0, 3.5, -0.0], np.float32)),
    case("Reciprocal", pos32(3, 4)),
    case("Floor", f32(3, 4) * 3),
    case("Ceil", f32(3, 4) * 3),
    case("Round", np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4, 2.6, -2.6], np.float32)),
    case("Sqrt", pos32(3, 4)),
    case("Exp", f32(3, 4)),
    case("Log", pos32(3, 4)),
    case("Sin", f32(3, 4)),
    case("Cos", f32(3, 4)),
    case("Erf", f32(3, 4)),
    case("Erf", f16(3, 4), id="fp16"),
    case("Min", f32(2, 3), f32(3), f32(1, 3), id="variadic"),
    case("Min", ints(4, dtype=np.int32), id="single"),
    case("Max", f32(2, 3), f32(3), f32(1, 3), id="variadic"),
    case("Max", ints(2, 3), ints(3), id="int64"),
    case("Sum", f32(2, 3), f32(3), f32(2, 1), id="variadic"),
    case("Sum", f32(2, 3), id="single"),
    case("Mean", f32(2, 3), f32(3), f32(2, 1), id="variadic"),
    case("Clip", f32(3, 4), scalar(-0.5, np.float32), scalar(0.5, np.float32), opset=13),
    case("Clip", f32(3, 4), None, scalar(0.2, np.float32), opset=13, id="max-only"),
    case("Clip", f32(3, 4), scalar(-0.2, np.float32), opset=13, id="min-only"),
    case("Clip", f32(3, 4), opset=13, id="no-bounds"),
    case("Clip", ints(3, 4, dtype=np.int32), scalar(-2, np.int32), scalar(3, np.int32), opset=13, id="int32"),
    case("Clip", f32(3, 4), opset=6, id="attrs", min=-0.3, max=0.4),
]

ACTIVATIONS = [
    case("Relu", f32(3, 4)),
    case("Relu", ints(6, dtype=np.int32), id="int32"),
    case("Sigmoid", f32(3, 4)),
    case("Tanh", f32(3, 4)),
    case("Softplus", f32(3, 4) * 5),
    case("Mish", f32(3, 4) * 3),
    case("Gelu", f32(3, 4) * 3, opset=20),
    case("Gelu", f32(3, 4) * 3, opset=20, id="tanh", approximate="tanh"),
    case("LeakyRelu", f32(3, 4)),
    case("LeakyRelu", f32(3, 4), id="alpha", alpha=0.3),
    case("PRelu", f32(2, 3, 4), f32(4)),
    case("PRelu", f32(2, 3, 4), f32(3, 1), id="channel"),
    case("Elu", f32(3, 4), alpha=0.7),
    case("Selu", f32(3, 4)),
    case("Selu", f32(3, 4), id="attrs", alpha=1.5, gamma=2.0),
    case("HardSigmoid", f32(3, 4) * 4),
    case("HardSigmoid", f32(3, 4) * 4, id="attrs", alpha=0.3, beta=0.4),
    case("HardSwish", f32(3, 4) * 4),
    case("Softmax", f32(2, 3, 4), opset=11, runtime="onnxruntime", id="coerced-default"),
    case("Softmax", f32(2, 3, 4), opset=11, runtime="onnxruntime", id="coerced-axis2", axis=2),
    case("Softmax", f32(2, 3, 4), opset=13),
    case("Softmax", f32(2, 3, 4), opset=13, id="axis1", axis=1),
    case("LogSoftmax", f32(2, 3, 4), opset=11, runtime="onnxruntime", id="coerced-default"),
    case("LogSoftmax", f32(2, 3, 4), opset=13, id="axis0", axis=0),
    case("Hardmax", f32(2, 3, 4), opset=11, runtime="onnxruntime", id="coerced-default"),
    case("Hardmax", f32(2, 3, 4), opset=13),
    case("Hardmax", np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 1.0]], np.float32), opset=13, id="ties"),
]

LOGIC = [
    case("Equal", ints(3, 4, low=0, high=3), ints(4, low=0, high=3)),
    case("Equal", bools(3, 4), bools(3, 4), id="bool"),
    case("Less", ints(3, 4, low=0, high=3).astype(np.float32), ints(4, low=0, high=3).astype(np.float32)),
    case("LessOrEqual", ints(3, 4, low=0, high=3), ints(3, 4, low=0, high=3)),
    case("Greater", ints(3, 4, low=0, high=3, dtype=np.int32), ints(1, low=0, high=3, dtype=np.int32)),
    case("GreaterOrEqual", ints(3, 4, low=0, high=3).astype(np.float32), ints(3, 4, low=0, high=3).astype(np.float32)),
    case("Not", bools(3, 4)),
    case("And", bools(3, 4), bools(4)),
    case("Or", bools(3, 4), bools(3, 4)),
    case("Xor", bools(3, 4), bools(3, 1)),
    case("IsNaN", with_specials(f32(3, 4))),
    case("IsInf", with_specials(f32(3, 4))),
    case("IsInf", with_specials(f32(3, 4)), id="negative-only", detect_positive=0),
    case("IsInf", with_specials(f32(3, 4)), id="positive-only", detect_negative=0),
    case("Where", bools(3, 4), f32(3, 4), f32(4)),
    case("Where", bools(3, 1), ints(4), ints(3, 4), id="int64"),
]

# --- linear algebra ----------------------------------------------------------

LINEAR = [
    case("MatMul", f32(3, 4), f32(4, 5)),
    case("MatMul", f32(2, 1, 3, 4), f32(5, 4, 2), id="batched-broadcast"),
    case("MatMul", f32(4), f32(2, 4, 3), id="vector-left"),
    case("MatMul", f32(2, 3, 4), f32(4), id="vector-right"),
    case("MatMul", f32(4), f32(4), id="vectors"),
    case("MatMul", ints(3, 4), ints(4, 2), id="int64"),
    case("Gemm", f32(3, 4), f32(4, 5), f32(5)),
    case("Gemm", f32(4, 3), f32(5, 4), f32(3, 5), id="transposed", transA=1, transB=1, alpha=0.5, beta=2.0),
    case("Gemm", f32(3, 4), f32(4, 5), id="no-c", alpha=1.5),
    case("Gemm", f32(3, 4), f32(5, 4), scalar(1.5, np.float32), id="scalar-c", transB=1),
    case("Einsum", f32(2, 3, 4), f32(2, 4, 5), equation="bij,bjk->bik"),
    case("Einsum", f32(3, 4), id="transpose", equation="ij->ji"),
    case("Einsum", f32(5), f32(5), id="implicit-dot", equation="i,i"),
    case("Einsum", f32(2, 3, 4), f32(4, 6), id="ellipsis-spaces", equation="...ij, jk -> ...ik"),
    case("MatMulInteger", ints(3, 4, low=0, high=255, dtype=np.uint8), ints(4, 5, low=0, high=255, dtype=np.uint8)),
    case(
        "MatMulInteger",
        ints(2, 3, 4, low=0, high=255, dtype=np.uint8),
        ints(4, 5, low=-128, high=127, dtype=np.int8),
        scalar(128, np.uint8),
        scalar(-3, np.int8),
        id="scalar-zero-points",
    ),
    case(
        "MatMulInteger",
        ints(3, 4, low=-128, high=127, dtype=np.int8),
        ints(4, 5, low=-128, high=127, dtype=np.int8),
        scalar(7, np.int8),
        ints(5, low=-10, high=10, dtype=np.int8),
        id="per-column",
    ),
    case("Conv", f32(1, 2, 7, 7), f32(4, 2, 3, 3), f32(4)),
    case("Conv", f32(2, 4, 8, 9), f32(6, 2, 3, 2), id="group-strides-pads", group=2, strides=[2, 1], pads=[1, 0, 2, 1]),
    case("Conv", f32(1, 2, 9, 9), f32(3, 2, 3, 3), id="dilations", dilations=[2, 3], pads=[1, 1, 1, 1]),
    case("Conv", f32(1, 2, 7, 8), f32(3, 2, 4, 3), id="same-upper", auto_pad="SAME_UPPER", strides=[2, 3]),
    case("Conv", f32(1, 2, 7, 8), f32(3, 2, 4, 3), id="same-lower", auto_pad="SAME_LOWER", strides=[2, 3]),
    case("Conv", f32(1, 2, 7, 8), f32(3, 2, 4, 3), id="same-upper-stride1", auto_pad="SAME_UPPER"),
    case("Conv", f32(1, 2, 7, 8), f32(3, 2, 4, 3), id="valid", auto_pad="VALID", strides=[2, 2]),
    case("Conv", f32(2, 3, 10), f32(4, 3, 3), f32(4), id="1d", strides=[2], pads=[2, 1], kernel_shape=[3]),
    case("Conv", f32(1, 2, 5, 4, 4), f32(2, 2, 2, 2, 2), id="3d"),
]

# --- normalization -----------------------------------------------------------

NORMALIZATION = [
    case("LayerNormalization", f32(2, 3, 8), f32(8), f32(8), opset=17, outputs=3),
    case("LayerNormalization", f32(2, 3, 4), f32(3, 4), opset=17, outputs=3, id="axis1-no-bias", axis=1, epsilon=1e-3),
    case("LayerNormalization", f32(4, 6), f32(6), f32(6), opset=21, outputs=1, id="y-only"),
    case("LayerNormalization", f16(2, 3, 8), f16(8), f16(8), opset=17, outputs=3, id="fp16-ort", runtime="onnxruntime"),
    case("BatchNormalization", f32(2, 3, 4, 5), f32(3), f32(3), f32(3), pos32(3), opset=15),
    case("BatchNormalization", f32(2, 3, 4), f32(3), f32(3), f32(3), pos32(3), opset=15, id="rank3", epsilon=1e-2),
    case(
        "BatchNormalization",
        f32(4, 3, 5),
        f32(3),
        f32(3),
        f32(3),
        pos32(3),
        opset=15,
        outputs=3,
        id="training",
        training_mode=1,
        momentum=0.8,
    ),
    case("InstanceNormalization", f32(2, 3, 4, 5), f32(3), f32(3)),
    case("GroupNormalization", f32(2, 6, 4, 3), f32(3), f32(3), opset=18, id="per-group", num_groups=3),
    case("GroupNormalization", f32(2, 6, 4, 3), f32(6), f32(6), opset=21, id="per-channel", num_groups=3),
    case("GroupNormalization", f32(2, 4, 5), f32(4), f32(4), opset=21, id="groups-eq-channels", num_groups=4, epsilon=1e-3),
]

# --- reductions --------------------------------------------------------------


def reduce_cases(op: str, data: np.ndarray) -> list[Any]:
    attr_opset = 13 if op != "ReduceSum" else 11
    return [
        case(op, data, opset=attr_opset, id="attr-axes", axes=[1], keepdims=0),
        case(op, data, opset=attr_opset, id="attr-all"),
        case(op, data, i64(0, -1), opset=18, id="input-axes"),
        case(op, data, i64(-2), opset=18, id="input-axes-drop", keepdims=0),
        case(op, data, opset=18, id="no-axes-all", keepdims=0),
        case(op, data, opset=18, id="noop", noop_with_empty_axes=1),
    ]


REDUCTIONS = [
    *reduce_cases("ReduceSum", f32(2, 3, 4)),
    *reduce_cases("ReduceMean", f32(2, 3, 4)),
    *reduce_cases("ReduceMax", f32(2, 3, 4)),
    *reduce_cases("ReduceMin", f32(2, 3, 4)),
    *reduce_cases("ReduceProd", pos32(2, 3, 4)),
    *reduce_cases("ReduceL1", f32(2, 3, 4)),
    *reduce_cases("ReduceL2", f32(2, 3, 4)),
    *reduce_cases("ReduceSumSquare", f32(2, 3, 4)),
    *reduce_cases("ReduceLogSum", pos32(2, 3, 4)),
    *reduce_cases("ReduceLogSumExp", f32(2, 3, 4)),
    case("ReduceSum", ints(2, 3, 4, dtype=np.int32), i64(1), opset=13, id="int32"),
    case("ReduceSum", f32(2, 3), np.zeros(0, np.int64), opset=13, id="empty-axes-all"),
    case("ReduceMax", ints(2, 3, 4), i64(2), opset=18, id="int64"),
    case("ReduceProd", ints(2, 3, 4, low=1, high=4, dtype=np.int32), i64(0, 2), opset=18, id="int32"),
    case("ReduceMean", ints(2, 3, 4, low=-9, high=9), i64(1), opset=18, id="int64-truncates"),
    case("ArgMax", f32(3, 4, 5)),
    case("ArgMax", f32(3, 4, 5), id="axis-keepdims0", axis=-1, keepdims=0),
    case("ArgMax", ints(3, 6, low=0, high=3), id="ties-first", axis=1),
    case("ArgMax", ints(3, 6, low=0, high=3), id="ties-last", axis=1, select_last_index=1),
    case("ArgMin", f32(3, 4, 5), axis=2),
    case("ArgMin", ints(3, 6, low=0, high=3, dtype=np.int32), id="ties-last", axis=1, keepdims=0, select_last_index=1),
    case("CumSum", f32(3, 4), scalar(1, np.int64)),
    case("CumSum", f32(3, 4), scalar(0, np.int32), id="exclusive", exclusive=1),
    case("CumSum", f32(3, 4), scalar(-1, np.int64), id="reverse", reverse=1),
    case("CumSum", ints(3, 4, dtype=np.int32), scalar(1, np.int64), id="int32-exclusive-reverse", exclusive=1, reverse=1),
    case("TopK", f32(3, 6), i64(3), outputs=2),
    case("TopK", f32(3, 6, 2), i64(2), opset=11, outputs=2, id="smallest-axis1", axis=1, largest=0),
    case("TopK", ints(2, 8, low=0, high=3), i64(5), outputs=2, id="ties"),
    case("TopK", ints(2, 8, low=0, high=3), i64(5), outputs=2, id="ties-smallest", largest=0),
    case("TopK", f32(4, 3), opset=1, outputs=2, id="attr-k", k=2, axis=0),
]

# --- shapes ------------------------------------------------------------------

SHAPES = [
    case("Identity", f32(2, 3)),
    case("Shape", f32(2, 3, 4), opset=13),
    case("Shape", f32(2, 3, 4, 5), opset=15, id="start-end", start=1, end=-1),
    case("Shape", f32(2, 3, 4), opset=15, id="clamped", start=-10, end=10),
    case("Size", f32(2, 3, 4)),
    case("Reshape", f32(2, 3, 4), i64(0, -1)),
    case("Reshape", f32(2, 3, 4), i64(4, 0, 2), id="copy-dim"),
    case("Reshape", np.zeros((0, 3), np.float32), i64(3, 0), opset=14, id="allowzero", allowzero=1),
    case("Flatten", f32(2, 3, 4)),
    case("Flatten", f32(2, 3, 4), id="axis0", axis=0),
    case("Flatten", f32(2, 3, 4), id="axis-neg", axis=-1),
    case("Squeeze", f32(1, 3, 1, 2), opset=11, id="attr", axes=[0, -2]),
    case("Squeeze", f32(1, 3, 1, 2), i64(2), opset=13, id="input"),
    case("Squeeze", f32(1, 3, 1, 2), opset=13, id="all"),
    case("Unsqueeze", f32(3, 2), opset=11, id="attr", axes=[0, 3]),
    case("Unsqueeze", f32(3, 2), i64(-1, 0), opset=13, id="input-negative"),
    case("Unsqueeze", f32(3, 2), i64(3, 1), opset=21, id="unsorted"),
    case("Transpose", f32(2, 3, 4)),
    case("Transpose", f32(2, 3, 4), id="perm", perm=[1, 2, 0]),
    case("Concat", f32(2, 3), f32(2, 1), f32(2, 4), axis=-1),
    case("Concat", ints(1, 3), ints(2, 3), id="axis0", axis=0),
    case("Split", f32(6, 4), i64(2, 4), opset=13, outputs=2, id="input"),
    case("Split", f32(3, 7), opset=11, outputs=3, id="attr", axis=1, split=[1, 4, 2]),
    case("Split", f32(6, 4), opset=13, outputs=3, id="equal", kernel_kwargs={"num_outputs": 3}),
    case("Split", f32(2, 7), opset=18, outputs=3, id="num-outputs-uneven", axis=-1, num_outputs=3),
    case("Split", f32(8, 2), opset=18, outputs=4, id="num-outputs", num_outputs=4),
    case("Slice", f32(5, 6), i64(1, -4), i64(4, INT64_MAX)),
    case("Slice", f32(5, 6), i64(-100), i64(100), i64(1), opset=13, id="clamped"),
    case("Slice", f32(5, 6, 7), i64(0, 1), i64(5, 6), i64(0, 2), i64(2, 3), id="steps"),
    case("Slice", f32(5, 6), i64(-1, 4), i64(INT64_MIN, 0), i64(0, 1), i64(-1, -2), id="negative-steps"),
    case("Slice", f32(7), i64(10), i64(-10), i64(0), i64(-3), id="negative-step-clamped"),
    case("Slice", f32(7), i64(3), i64(3), id="empty"),
    case("Slice", f32(4, 5), i64(1), i64(-1), i64(-1), id="negative-axis"),
    case("Slice", f32(4, 5), opset=9, id="attrs", starts=[1, -3], ends=[100, -1], axes=[1, 0]),
    case("Expand", f32(3, 1), i64(2, 1, 4)),
    case("Expand", f32(2, 3), i64(1, 1), id="smaller-shape"),
    case("Expand", ints(1, 3), i64(4, 1), id="int64"),
    case("Tile", f32(2, 3), i64(2, 3)),
    case("Tile", ints(2, 1, 2), i64(1, 3, 1), id="int64"),
    case("Pad", f32(3, 4), i64(1, 0, 2, 3)),
    case("Pad", f32(3, 4), i64(1, 2, 0, 1), scalar(2.5, np.float32), id="value"),
    case("Pad", ints(3, 4, dtype=np.int32), i64(1, 1, 1, 1), scalar(7, np.int32), id="int32"),
    case("Pad", f32(3, 4), i64(-1, 1, 1, -2), id="negative", runtime="onnxruntime"),
    case("Pad", f32(3, 4), i64(2, 3, 1, 2), id="reflect", mode="reflect"),
    case("Pad", f32(3, 4), i64(2, 3, 1, 5), id="edge", mode="edge"),
    case("Pad", f32(2, 3, 4), i64(1, 3), None, i64(-1), id="axes", mode="edge"),
    case("Pad", f32(2, 3, 4), i64(1, 2, 0, 1), scalar(-1.0, np.float32), i64(0, 2), id="axes-constant"),
    case("Pad", f32(3, 4), i64(1, 2, 3, 1), opset=19, id="wrap", mode="wrap"),
    case("Pad", f32(3, 4), i64(-1, 2, 1, -1), opset=13, id="reflect-negative", mode="reflect", runtime="onnxruntime"),
    case("Pad", f32(3, 4), opset=2, id="attrs", pads=[0, 1, 2, 0], value=1.5),
    case("Trilu", f32(4, 5)),
    case("Trilu", f32(2, 4, 5), scalar(1, np.int64), id="upper-k1"),
    case("Trilu", f32(2, 4, 5), scalar(-1, np.int64), id="lower-k-1", upper=0),
    case("Trilu", bools(4, 4), id="lower-bool", upper=0),
]

# --- indexing ----------------------------------------------------------------

SCATTER_DATA = f32(4, 3, 2)
SCATTER_ND_INDICES = np.array([[1, 0], [-1, 2], [1, 0]], np.int64)
SCATTER_ND_UPDATES = f32(3, 2)
SCATTER_EL_INDICES = np.array([[1, 0, 2], [0, -1, 1]], np.int64)

INDEXING = [
    case("Gather", f32(5, 3), np.array([0, -1, 2, 2], np.int64)),
    case("Gather", f32(2, 5, 3), np.array([[0, 4], [-2, 1]], np.int32), id="axis1-2d-int32", axis=1),
    case("Gather", f32(4, 3), scalar(-1, np.int64), id="scalar-index"),
    case("Gather", f32(4, 3), np.array([2, 0], np.int64), id="axis-neg", axis=-1),
    case("GatherElements", f32(2, 4), np.array([[0, -1, 2], [1, 0, 3]], np.int64), axis=1),
    case("GatherElements", f32(3, 4), np.array([[2, 1, -3, 0]], np.int32), id="axis0"),
    case("GatherND", f32(3, 4, 2), np.array([[0, 1], [2, -1]], np.int64)),
    case("GatherND", f32(3, 4, 2), np.array([[[0, 1, 1]], [[2, 3, 0]]], np.int64), id="full-depth"),
    case("GatherND", f32(2, 4, 3), np.array([[1], [3]], np.int64), id="batch-dims", batch_dims=1),
    case("GatherND", f32(2, 3, 4, 5), np.array([[[[1, 2], [0, 0]]], [[[2, 3], [1, 1]]]], np.int64), id="batch-dims-3d", batch_dims=1),
    case("ScatterND", SCATTER_DATA, SCATTER_ND_INDICES[:2], SCATTER_ND_UPDATES[:2], opset=13),
    case("ScatterND", SCATTER_DATA, SCATTER_ND_INDICES, SCATTER_ND_UPDATES, opset=16, id="add", reduction="add"),
    case("ScatterND", SCATTER_DATA, SCATTER_ND_INDICES, SCATTER_ND_UPDATES, opset=16, id="mul", reduction="mul"),
    case("ScatterND", SCATTER_DATA, SCATTER_ND_INDICES, SCATTER_ND_UPDATES, opset=18, id="max", reduction="max"),
    case("ScatterND", SCATTER_DATA, SCATTER_ND_INDICES, SCATTER_ND_UPDATES, opset=18, id="min", reduction="min"),
    case("ScatterND", SCATTER_DATA, np.array([[0], [3]], np.int64), f32(2, 3, 2), id="slices"),
    case("ScatterElements", f32(3, 4), SCATTER_EL_INDICES, f32(2, 3), opset=13, axis=1),
    case("ScatterElements", f32(3, 4), SCATTER_EL_INDICES, f32(2, 3), opset=16, id="add", axis=0, reduction="add"),
    case("ScatterElements", f32(3, 4), SCATTER_EL_INDICES, f32(2, 3), opset=18, id="max", axis=0, reduction="max"),
    case("ScatterElements", ints(3, 4), SCATTER_EL_INDICES, ints(2, 3), opset=18, id="int-mul", axis=1, reduction="mul"),
    case("NonZero", ints(3, 4, low=0, high=2)),
    case("NonZero", bools(2, 3, 2), id="bool"),
    case("OneHot", np.array([0, 2, -1, 5], np.int64), scalar(4, np.int64), np.array([0.0, 1.0], np.float32)),
    case(
        "OneHot",
        np.array([[1, 0], [-3, 2]], np.int32),
        scalar(3.0, np.float32),
        np.array([-1, 7], np.int64),
        id="axis0",
        axis=0,
    ),
    case("OneHot", np.array([[1, 0], [2, 2]], np.int64), scalar(3, np.int64), np.array([2, 5], np.int32), id="axis1", axis=1),
    case("Unique", np.array([3, 1, 3, 2, 1, 5], np.float32), outputs=4),
    case("Unique", np.array([3, 1, 3, 2, 1, 5], np.int64), outputs=4, id="unsorted", sorted=0),
    case("Unique", np.array([[1, 2], [3, 4], [1, 2], [0, 9]], np.int64), outputs=4, id="axis0", axis=0),
    case("Unique", np.array([[1, 1, 2], [3, 3, 4]], np.int64), outputs=4, id="axis1", axis=1),
]

# --- creation and conversion ---------------------------------------------------


def cast_cases() -> list[Any]:
    values = np.array([-3.7, -1.2, -0.5, 0.0, 0.5, 1.5, 2.6, 100.2], np.float32)
    targets = {
        "bool": TensorProto.BOOL,
        "int8": TensorProto.INT8,
        "int16": TensorProto.INT16,
        "int32": TensorProto.INT32,
        "int64": TensorProto.INT64,
        "float16": TensorProto.FLOAT16,
        "float64": TensorProto.DOUBLE,
        "bfloat16": TensorProto.BFLOAT16,
        "float32": TensorProto.FLOAT,
    }
    cases = [case("Cast", values, id=f"to-{name}", to=to) for name, to in targets.items()]
    cases += [
        case("Cast", np.abs(values), id="to-uint8", to=TensorProto.UINT8),
        case("Cast", ints(8, low=-300, high=300), id="int64-to-int8-wraps", to=TensorProto.INT8),
        case("Cast", bools(6), id="bool-to-float", to=TensorProto.FLOAT),
        case("Cast", ints(6, dtype=np.int32), id="int32-to-float16", to=TensorProto.FLOAT16),
        case("Cast", f16(6), id="float16-to-float", to=TensorProto.FLOAT),
        case("Cast", ints(6, low=-600, high=600, dtype=np.int32), opset=19, id="int32-to-e4m3fn", to=TensorProto.FLOAT8E4M3FN),
    ]
    wide = np.array([1.0, -3.3, 300.0, 460.0, 470.0, -1000.0, 60000.0, 1e6, np.inf, -np.inf, np.nan], np.float32)
    for name, to in (("e4m3fn", TensorProto.FLOAT8E4M3FN), ("e5m2", TensorProto.FLOAT8E5M2)):
        cases += [
            case("Cast", wide, opset=19, id=f"{name}-saturate", to=to),
            case("Cast", wide, opset=19, id=f"{name}-no-saturate", to=to, saturate=0),
        ]
    return cases


CREATION = [
    *cast_cases(),
    case("CastLike", f32(6) * 10, ints(1, dtype=np.int16)),
    case("CastLike", ints(6), np.zeros(1, np.float64), id="to-float64"),
    case("Constant", id="tensor", value=numpy_helper.from_array(f32(2, 3))),
    case("Constant", id="tensor-int32", value=numpy_helper.from_array(ints(4, dtype=np.int32))),
    case("Constant", id="value-float", value_float=2.5),
    case("Constant", id="value-floats", value_floats=[1.0, -2.5]),
    case("Constant", id="value-int", value_int=7),
    case("Constant", id="value-ints", value_ints=[3, -1, 4]),
    case("ConstantOfShape", i64(2, 3)),
    case("ConstantOfShape", i64(4), id="int64", value=numpy_helper.from_array(np.array([5], np.int64))),
    case("ConstantOfShape", i64(2, 2), id="bool", value=numpy_helper.from_array(np.array([True]))),
    case("ConstantOfShape", np.zeros(0, np.int64), id="scalar", value=numpy_helper.from_array(np.array([1.5], np.float32))),
    case("Range", scalar(1, np.int64), scalar(10, np.int64), scalar(3, np.int64)),
    case("Range", scalar(10, np.int32), scalar(-3, np.int32), scalar(-4, np.int32), id="negative-int32"),
    case("Range", scalar(0.5, np.float32), scalar(2.0, np.float32), scalar(0.25, np.float32), id="float"),
    case("Range", scalar(5, np.int64), scalar(1, np.int64), scalar(1, np.int64), id="empty"),
    case("Dropout", f32(3, 4), opset=13, outputs=2),
    case("Dropout", f32(3, 4), scalar(0.3, np.float32), opset=13, outputs=2, id="ratio"),
    case("Dropout", f32(3, 4), scalar(0.3, np.float32), np.array(False), opset=13, outputs=2, id="not-training"),
    case("Dropout", f32(3, 4), opset=11, outputs=2, id="attr-ratio", ratio=0.2),
]

# --- quantization ------------------------------------------------------------

QUANT_X = f32(2, 4, 6) * 3

QUANTIZATION = [
    case("QuantizeLinear", QUANT_X, scalar(0.02, np.float32), scalar(128, np.uint8), opset=13),
    case("QuantizeLinear", QUANT_X, scalar(0.05, np.float32), opset=13, id="default-uint8"),
    case("QuantizeLinear", QUANT_X, np.array([0.01, 0.02, 0.04, 0.08], np.float32), ints(4, dtype=np.int8), opset=13, id="per-axis-int8"),
    case(
        "QuantizeLinear",
        QUANT_X,
        np.array([0.03, 0.01, 0.05, 0.02, 0.04, 0.06], np.float32),
        ints(6, low=0, high=255, dtype=np.uint8),
        opset=19,
        id="per-last-axis",
        axis=-1,
    ),
    case(
        "QuantizeLinear",
        QUANT_X,
        pos32(2, 4, 2) * 0.05,
        ints(2, 4, 2, dtype=np.int8),
        opset=21,
        id="blocked",
        axis=2,
        block_size=3,
    ),
    case("QuantizeLinear", QUANT_X, scalar(0.02, np.float32), opset=21, id="output-dtype-int8", output_dtype=TensorProto.INT8),
    case(
        "QuantizeLinear",
        np.array([-1.0, 0.5, 1.5, 2.5, 3.0, 900.0], np.float32),
        scalar(1.0, np.float32),
        id="half-to-even-int8",
        output_dtype=TensorProto.INT8,
        opset=21,
    ),
    case("DequantizeLinear", ints(2, 4, 6, low=0, high=255, dtype=np.uint8), scalar(0.02, np.float32), scalar(128, np.uint8), opset=19),
    case(
        "DequantizeLinear",
        ints(2, 4, 6, low=-128, high=127, dtype=np.int8),
        scalar(0.1, np.float32),
        opset=13,
        id="no-zero-point",
        runtime="onnxruntime",
    ),
    case(
        "DequantizeLinear",
        ints(2, 4, 6, low=-128, high=127, dtype=np.int8),
        np.array([0.01, 0.02, 0.04, 0.08], np.float32),
        ints(4, dtype=np.int8),
        opset=19,
        id="per-axis",
    ),
    case(
        "DequantizeLinear",
        ints(2, 4, 6, low=-128, high=127, dtype=np.int8),
        pos32(2, 2, 6) * 0.05,
        ints(2, 2, 6, dtype=np.int8),
        opset=21,
        id="blocked",
        axis=1,
        block_size=2,
    ),
    case("DequantizeLinear", ints(6, low=-1000, high=1000, dtype=np.int32), scalar(0.5, np.float32), opset=21, id="int32"),
    case("DynamicQuantizeLinear", QUANT_X, outputs=3, opset=11),
    case("DynamicQuantizeLinear", pos32(3, 4), outputs=3, opset=11, id="positive"),
    case("DynamicQuantizeLinear", np.zeros((2, 2), np.float32), outputs=3, opset=11, id="zeros"),
]

TRANSFORMER_OPS = [
    case("Attention", f32(2, 4, 3, 8), f32(2, 2, 5, 8), f32(2, 2, 5, 8), bools(3, 5), opset=23, runtime="onnxruntime", is_causal=1),
    case("RMSNormalization", f32(2, 3, 8), f32(8), opset=23, epsilon=1e-3),
    case("RotaryEmbedding", f32(2, 4, 3, 8), f32(6, 4), f32(6, 4), ints(2, 3, low=0, high=6), opset=23, interleaved=1),
]

# ops added for the ONNX backend node tests (issue 18)
BACKEND_OPS = [
    *(case(op, np.clip(f32(3, 4), -0.9, 0.9)) for op in ("Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Atanh")),
    case("Acosh", pos32(3, 4) + 1),
    case("Softsign", f32(3, 4) * 3),
    case("ThresholdedRelu", f32(3, 4) * 2, opset=10, alpha=0.5),
    case("Celu", f32(3, 4) * 2, opset=12, alpha=0.7),
    case("Swish", f32(3, 4) * 3, opset=24, alpha=1.5),
    case("Shrink", f32(3, 4) * 2, opset=9, bias=0.3, lambd=0.6),
    case("Shrink", ints(12, low=-9, high=9, dtype=np.int8), opset=9, id="int8", bias=1.5, lambd=2.0),
    *(case(op, ints(3, 4, low=0, high=255, dtype=np.uint16), ints(4, low=0, high=255, dtype=np.uint16), opset=18)
      for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor")),
    case("BitwiseNot", ints(3, 4, low=-100, high=100, dtype=np.int32), opset=18),
    case("BitwiseNot", ints(3, 4, low=0, high=65535, dtype=np.uint16), opset=18, id="uint16"),
    case("BitShift", ints(6, low=0, high=60000, dtype=np.uint32), ints(6, low=0, high=12, dtype=np.uint32), opset=11, direction="LEFT"),
    case("BitShift", np.array([2**63 + 5, 2**64 - 1, 7, 1], np.uint64), np.array([1, 63, 0, 0], np.uint64), opset=11, id="uint64-right", direction="RIGHT"),
    case("GlobalAveragePool", f32(2, 3, 4, 5)),
    case("GlobalMaxPool", f32(2, 3, 4, 5)),
    case("GlobalMaxPool", f32(2, 3, 4), id="1d", runtime="onnxruntime"),
    case("DepthToSpace", f32(1, 8, 2, 3), opset=13, blocksize=2),
    case("DepthToSpace", f32(1, 8, 2, 3), opset=13, id="crd", blocksize=2, mode="CRD"),
    case("SpaceToDepth", f32(1, 2, 4, 6), opset=13, blocksize=2),
    case("EyeLike", f32(3, 5), opset=22, k=1),
    case("EyeLike", f32(4, 3), opset=22, id="dtype", k=-1, dtype=TensorProto.INT32),
    case("Compress", f32(3, 4), np.array([True, False, True]), opset=11, axis=0),
    case("Compress", f32(3, 4), np.array([False, True, True, False, True]), opset=11, id="flat"),
    case("MeanVarianceNormalization", f32(2, 3, 4, 5), opset=13),
    case("MeanVarianceNormalization", f32(2, 3, 4), opset=13, id="axes", axes=[1, -1]),
    case("Det", f32(2, 3, 3)),
    case("ReverseSequence", f32(5, 3, 2), i64(5, 0, 3), opset=10),
    case("ReverseSequence", ints(3, 4, low=0, high=99), i64(1, 4, 2), opset=10, id="batch-first", batch_axis=0, time_axis=1),
    case("CumProd", f32(3, 4), scalar(1, np.int64), opset=26),
    case("CumProd", ints(2, 5, low=1, high=4), scalar(-1, np.int64), opset=26, id="exclusive-reverse", exclusive=1, reverse=1),
]

ALL_CASES = [
    *ELEMENTWISE,
    *ACTIVATIONS,
    *LOGIC,
    *LINEAR,
    *NORMALIZATION,
    *REDUCTIONS,
    *SHAPES,
    *INDEXING,
    *CREATION,
    *QUANTIZATION,
    *BACKEND_OPS,
    *TRANSFORMER_OPS,
]


# --- harness -----------------------------------------------------------------


def _input_name(i: int) -> str:
    return f"in{i}"


def one_node_model(spec: Case) -> onnx.ModelProto:
    names = ["" if a is None else _input_name(i) for i, a in enumerate(spec.inputs)]
    outputs = [f"out{i}" for i in range(spec.outputs)]
    node = helper.make_node(spec.op, names, outputs, **spec.attrs)
    graph_inputs = [
        helper.make_tensor_value_info(_input_name(i), helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for i, a in enumerate(spec.inputs)
        if a is not None
    ]
    graph_outputs = [helper.make_empty_tensor_value_info(name) for name in outputs]
    graph = helper.make_graph([node], "one_node", graph_inputs, graph_outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)])


def feeds(spec: Case) -> dict[str, np.ndarray]:
    return {_input_name(i): a for i, a in enumerate(spec.inputs) if a is not None}


def run_onnx(spec: Case) -> list[np.ndarray]:
    model = one_node_model(spec)
    if spec.runtime == "onnxruntime":
        model.ir_version = 10
        model = onnx.shape_inference.infer_shapes(model)
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, feeds(spec))
    return ReferenceEvaluator(model).run(None, feeds(spec))


def python_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """Attributes decoded the way the exporter hands them to kernels."""
    attrs = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        attrs[attr.name] = value
    return attrs


ML_DTYPES = {np.dtype(t): getattr(torch, np.dtype(t).name) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)}


def to_torch(array: np.ndarray) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype in ML_DTYPES:
        return torch.from_numpy(array.astype(np.float32)).to(ML_DTYPES[array.dtype])
    return torch.from_numpy(array.copy())


TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float8_e4m3fn: 0.0, torch.float8_e5m2: 0.0}


def assert_same(got: torch.Tensor, want: np.ndarray) -> None:
    expected = to_torch(want)
    assert got.dtype == expected.dtype
    assert tuple(got.shape) == tuple(expected.shape)
    if expected.is_floating_point():
        tol = TOLERANCE.get(expected.dtype, 1e-5)
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol, equal_nan=True)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("spec", ALL_CASES)
def test_kernel_matches_onnx(spec: Case) -> None:
    expected = run_onnx(spec)
    kernel = get_kernel("", spec.op)
    attrs = python_attrs(one_node_model(spec).graph.node[0])
    if spec.op in OPSET_SENSITIVE_OPS:
        attrs["opset"] = spec.opset
    inputs = [None if a is None else to_torch(a) for a in spec.inputs]
    result = kernel(*inputs, **attrs, **spec.kernel_kwargs)
    outputs = result if spec.op in MULTI_OUTPUT_OPS or ("", spec.op) in MULTI_OUTPUT_KERNELS else (result,)
    assert len(expected) == spec.outputs
    for got, want in zip(outputs, expected):
        assert_same(got, want)


# --- behaviour outside the one-node comparisons -------------------------------


def test_get_kernel_unknown_op_is_none() -> None:
    assert get_kernel("", "NoSuchOp") is None
    assert get_kernel("com.microsoft", "Add") is None


def test_get_kernel_default_domain_alias() -> None:
    assert get_kernel("ai.onnx", "Add") is get_kernel("", "Add") is torch_kernels.onnx_Add


def test_table_is_consistent() -> None:
    assert {domain for domain, _ in TORCH_KERNELS} == {"", "graphopt", "com.microsoft"}
    for (domain, op), kernel in TORCH_KERNELS.items():
        assert kernel.__name__ == f"{(domain or 'onnx').replace('.', '_')}_{op}"
    ops = {op for domain, op in TORCH_KERNELS if domain == ""}
    assert MULTI_OUTPUT_OPS <= {op for _, op in TORCH_KERNELS}
    assert OPSET_SENSITIVE_OPS <= ops


def test_every_kernel_is_exercised() -> None:
    covered = {param.values[0].op for param in ALL_CASES}
    assert {op for domain, op in TORCH_KERNELS if domain == ""} == covered


def test_dropout_training_mode_scales_kept_values() -> None:
    x = torch.ones(200, 50)
    y, mask = torch_kernels.onnx_Dropout(x, torch.tensor(0.25), torch.tensor(True), seed=0)
    assert mask.dtype == torch.bool
    assert torch.equal(y, mask.float() / 0.75)
    assert 0.2 < 1 - mask.float().mean().item() < 0.3


def test_matmul_integer_per_row_zero_point() -> None:
    a = ints(3, 4, low=-128, high=127, dtype=np.int8)
    b = ints(4, 5, low=-128, high=127, dtype=np.int8)
    a_zero, b_zero = ints(3, dtype=np.int8), ints(5, dtype=np.int8)
    expected = (a.astype(np.int32) - a_zero[:, None].astype(np.int32)) @ (b.astype(np.int32) - b_zero.astype(np.int32))
    got = torch_kernels.onnx_MatMulInteger(*map(to_torch, (a, b, a_zero, b_zero)))
    assert_same(got, expected)


def test_split_without_sizes_needs_num_outputs() -> None:
    with pytest.raises(ValueError, match="Split.*num_outputs"):
        torch_kernels.onnx_Split(torch.zeros(4))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: torch_kernels.onnx_Conv(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3), auto_pad="SAME"), "Conv.*auto_pad"),
        (lambda: torch_kernels.onnx_Pad(torch.zeros(3), torch.tensor([1, 1]), mode="mirror"), "Pad.*mode"),
        (lambda: torch_kernels.onnx_Cast(torch.zeros(3), to=8), "Cast.*to"),
        (lambda: torch_kernels.onnx_Gelu(torch.zeros(3), approximate="fast"), "Gelu.*approximate"),
        (lambda: torch_kernels.onnx_Constant(value_string="x"), "Constant.*value_string"),
        (lambda: torch_kernels.onnx_ScatterND(torch.zeros(3), torch.zeros(1, 1), torch.zeros(1), reduction="sub"), "ScatterND.*reduction"),
        (lambda: torch_kernels.onnx_Slice(torch.zeros(3), [0], [2], [0], [0]), "Slice.*steps"),
    ],
)
def test_unsupported_attribute_values_raise(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
