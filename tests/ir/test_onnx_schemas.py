"""The ONNX-domain op schemas: inference checked against onnx's own shape inference on static
shapes, hand-written symbolic cases, value propagation chains and inconsistency errors."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphopt.ir.dtypes import DType
from graphopt.ir.ops.onnx import ALL_INPUTS, SLICE_TO_END
from graphopt.ir.schema import InferenceContext, SymbolicValue, get_schema, registered_ops
from graphopt.ir.types import UNKNOWN, TensorType

ONNX_OPS = [name for name in registered_ops() if "::" not in name]

F32, F16, I64, I32, U8, I8, BOOL = (
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT32,
    TensorProto.UINT8, TensorProto.INT8, TensorProto.BOOL,
)

# An input spec: (elem_type, shape) for a graph input, an array for a constant (initializer),
# or None for an omitted optional input.
Spec = Union[tuple[int, Sequence[int]], np.ndarray, None]


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def onnx_output_types(
    op: str, inputs: Sequence[Spec], attrs: dict[str, Any], opset: int, num_outputs: int
) -> list[TensorType]:
    """Output types from onnx.shape_inference on a one-node model."""
    names = [f"in{i}" if spec is not None else "" for i, spec in enumerate(inputs)]
    graph_inputs, initializers = [], []
    for name, spec in zip(names, inputs):
        if isinstance(spec, np.ndarray):
            initializers.append(numpy_helper.from_array(spec, name))
        elif spec is not None:
            graph_inputs.append(helper.make_tensor_value_info(name, spec[0], list(spec[1])))
    outputs = [f"out{i}" for i in range(num_outputs)]
    node = helper.make_node(op, names, outputs, **attrs)
    graph = helper.make_graph([node], "g", graph_inputs, [], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    found = {vi.name: vi.type.tensor_type for vi in model.graph.value_info}
    result = []
    for name in outputs:
        tensor_type = found[name]
        # onnx names the dims it cannot know "unk__N"; graphopt says None
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else None
            if d.dim_param.startswith("unk__") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
        shape = dims if tensor_type.HasField("shape") else None
        result.append(TensorType(DType(tensor_type.elem_type), shape))
    return result


def context_from_specs(
    op: str, inputs: Sequence[Spec], attrs: dict[str, Any], opset: int, num_outputs: int
) -> InferenceContext:
    """The InferenceContext an IR would build for the same node (attributes as onnx gives them)."""
    types: list[Optional[TensorType]] = []
    constants: list[Optional[np.ndarray]] = []
    for spec in inputs:
        if isinstance(spec, np.ndarray):
            types.append(TensorType(DType.from_numpy(spec.dtype), spec.shape))
            constants.append(spec)
        elif spec is None:
            types.append(None)
            constants.append(None)
        else:
            types.append(TensorType(DType(spec[0]), tuple(spec[1])))
            constants.append(None)
    node = helper.make_node(op, [], [], **attrs)
    onnx_attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return InferenceContext(op, "", types, onnx_attrs, num_outputs, opset, constants)


def infer(
    op: str,
    types: Sequence[Optional[TensorType]],
    attrs: Optional[dict[str, Any]] = None,
    *,
    constants: Sequence[Optional[np.ndarray]] = (),
    symbolic: Sequence[Optional[SymbolicValue]] = (),
    num_outputs: int = 1,
    opset: int = 18,
) -> list[TensorType]:
    ctx = InferenceContext(op, "", types, attrs or {}, num_outputs, opset, constants, symbolic)
    schema = get_schema("", op)
    assert schema is not None
    return schema.infer(ctx)


def propagate(
    op: str,
    types: Sequence[Optional[TensorType]],
    attrs: Optional[dict[str, Any]] = None,
    *,
    constants: Sequence[Optional[np.ndarray]] = (),
    symbolic: Sequence[Optional[SymbolicValue]] = (),
    opset: int = 18,
) -> Optional[SymbolicValue]:
    ctx = InferenceContext(op, "", types, attrs or {}, 1, opset, constants, symbolic)
    schema = get_schema("", op)
    assert schema is not None and schema.propagate is not None
    return schema.propagate(ctx)[0]


def f32(*dims: Any) -> TensorType:
    return TensorType(DType.FLOAT, dims)


def int64(*dims: Any) -> TensorType:
    return TensorType(DType.INT64, dims)


def s64(value: int) -> np.ndarray:
    """An int64 scalar constant."""
    return np.array(value, dtype=np.int64)


VEC1, VEC2, VEC3, VEC4 = int64(1), int64(2), int64(3), int64(4)
SCALAR_I64 = int64()

# (op, inputs, attrs, opset, num_outputs)
STATIC_CASES: list[tuple[str, list[Spec], dict[str, Any], int, int]] = [
    ("Add", [(F32, [2, 1, 4]), (F32, [3, 1])], {}, 17, 1),
    ("Sub", [(I64, [5]), (I64, [])], {}, 17, 1),
    ("Mul", [(F16, [1, 8, 1, 64]), (F16, [8, 1, 1])], {}, 17, 1),
    ("Div", [(F32, [2, 3]), (F32, [2, 3])], {}, 17, 1),
    ("Pow", [(F32, [2, 3]), (I64, [])], {}, 17, 1),
    ("Mod", [(I32, [4, 1]), (I32, [5])], {}, 17, 1),
    ("Equal", [(I64, [3, 1]), (I64, [4])], {}, 17, 1),
    ("Less", [(F32, [2, 3]), (F32, [3])], {}, 17, 1),
    ("GreaterOrEqual", [(F32, [2, 3]), (F32, [1])], {}, 17, 1),
    ("And", [(BOOL, [2, 3]), (BOOL, [2, 1])], {}, 17, 1),
    ("Not", [(BOOL, [2, 3])], {}, 17, 1),
    ("IsNaN", [(F32, [2, 3])], {}, 17, 1),
    ("Where", [(BOOL, [1, 4]), (F32, [3, 1]), (F32, [])], {}, 17, 1),
    ("Max", [(F32, [2, 1]), (F32, [3]), (F32, [1, 1, 1])], {}, 17, 1),
    ("Sum", [(F32, [4]), (F32, [2, 4])], {}, 17, 1),
    ("Clip", [(F32, [2, 3]), np.array(0.0, np.float32), np.array(6.0, np.float32)], {}, 17, 1),
    ("Gelu", [(F32, [2, 3])], {"approximate": "tanh"}, 20, 1),
    ("PRelu", [(F32, [2, 3, 4]), (F32, [3, 1])], {}, 17, 1),
    ("Softmax", [(F32, [2, 3, 4])], {"axis": 1}, 17, 1),
    ("Trilu", [(F32, [3, 4]), i64(1)], {"upper": 0}, 17, 1),
    ("CumSum", [(F32, [3, 4]), np.array(1, np.int64)], {}, 17, 1),
    ("MatMul", [(F32, [2, 1, 3, 4]), (F32, [5, 4, 6])], {}, 17, 1),
    ("MatMul", [(F32, [4]), (F32, [2, 4, 6])], {}, 17, 1),
    ("MatMul", [(F32, [2, 3, 4]), (F32, [4])], {}, 17, 1),
    ("Gemm", [(F32, [4, 3]), (F32, [5, 4]), (F32, [5])], {"transA": 1, "transB": 1}, 17, 1),
    ("MatMulInteger", [(U8, [2, 3]), (I8, [3, 4])], {}, 17, 1),
    ("Einsum", [(F32, [2, 3, 4]), (F32, [2, 4, 5])], {"equation": "bij,bjk->bik"}, 17, 1),
    ("Einsum", [(F32, [7, 2, 3]), (F32, [3, 5])], {"equation": "...ij,jk"}, 17, 1),
    ("Conv", [(F32, [1, 4, 9, 10]), (F32, [6, 2, 3, 3])], {"group": 2, "strides": [2, 1], "pads": [1, 0, 1, 2]},
     17, 1),
    ("Conv", [(F32, [1, 3, 11]), (F32, [8, 3, 3])], {"auto_pad": "SAME_UPPER", "strides": [2]}, 17, 1),
    ("Conv", [(F32, [1, 3, 11, 11]), (F32, [8, 3, 3, 3])], {"dilations": [2, 2]}, 17, 1),
    ("MaxPool", [(F32, [1, 3, 9, 9])], {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, 17, 2),
    ("AveragePool", [(F32, [1, 3, 8, 8])], {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1]}, 17, 1),
    ("GlobalAveragePool", [(F32, [2, 3, 5, 7])], {}, 17, 1),
    ("Transpose", [(F32, [2, 3, 4, 5])], {"perm": [0, 2, 1, 3]}, 17, 1),
    ("Transpose", [(F32, [2, 3, 4])], {}, 17, 1),
    ("Reshape", [(F32, [2, 3, 32]), i64(0, 0, 4, 8)], {}, 17, 1),
    ("Reshape", [(F32, [2, 3, 4, 8]), i64(0, -1, 32)], {}, 17, 1),
    ("Reshape", [(F32, [2, 0, 4]), i64(0, 0, 2, 2)], {"allowzero": 1}, 17, 1),
    ("Flatten", [(F32, [2, 3, 4, 5])], {"axis": -1}, 17, 1),
    ("Flatten", [(F32, [2, 3])], {"axis": 0}, 17, 1),
    ("Squeeze", [(F32, [1, 3, 1, 4]), i64(0, -2)], {}, 17, 1),
    ("Squeeze", [(F32, [1, 3, 1, 4])], {}, 17, 1),
    ("Squeeze", [(F32, [1, 3, 1, 4])], {"axes": [2]}, 11, 1),
    ("Unsqueeze", [(F32, [3, 4]), i64(0, -1)], {}, 17, 1),
    ("Unsqueeze", [(F32, [3, 4])], {"axes": [1]}, 11, 1),
    ("Concat", [(F32, [2, 3]), (F32, [2, 5]), (F32, [2, 0])], {"axis": -1}, 17, 1),
    ("Split", [(F32, [2, 10]), i64(3, 7)], {"axis": 1}, 17, 2),
    ("Split", [(F32, [6, 4])], {}, 17, 3),
    ("Split", [(F32, [7, 4])], {"num_outputs": 3}, 18, 3),
    ("Split", [(F32, [6, 4])], {"split": [2, 4]}, 11, 2),
    ("Slice", [(F32, [10, 20, 30]), i64(1, -5), i64(SLICE_TO_END, 100), i64(0, 2), i64(2, 1)], {}, 17, 1),
    ("Slice", [(F32, [10, 20]), i64(-1), i64(-(2**63)), i64(1), i64(-1)], {}, 17, 1),
    ("Slice", [(F32, [10, 20]), i64(2, 3), i64(5, 30)], {}, 17, 1),
    ("Gather", [(F32, [5, 6, 7]), (I64, [2, 3])], {"axis": 1}, 17, 1),
    ("Gather", [(F32, [5, 6]), np.array(2, np.int64)], {"axis": 0}, 17, 1),
    ("GatherElements", [(F32, [3, 4]), (I64, [3, 2])], {"axis": 1}, 17, 1),
    ("GatherND", [(F32, [2, 3, 4, 5]), (I64, [2, 6, 2])], {"batch_dims": 1}, 17, 1),
    ("ScatterND", [(F32, [4, 5]), (I64, [2, 1]), (F32, [2, 5])], {}, 17, 1),
    ("ScatterElements", [(F32, [4, 5]), (I64, [2, 5]), (F32, [2, 5])], {"axis": 0}, 17, 1),
    ("Expand", [(F32, [3, 1]), i64(2, 1, 6)], {}, 17, 1),
    ("Tile", [(F32, [2, 3]), i64(3, 1)], {}, 17, 1),
    ("Pad", [(F32, [2, 3]), i64(1, 2, 0, 3)], {}, 17, 1),
    ("Pad", [(F32, [2, 3, 4]), i64(1, -1), np.array(0.0, np.float32), i64(2)], {}, 18, 1),
    ("Cast", [(F32, [2, 3])], {"to": TensorProto.FLOAT16}, 17, 1),
    ("CastLike", [(F32, [2, 3]), (I32, [])], {}, 17, 1),
    ("Shape", [(F32, [2, 3, 4, 5])], {"start": 1, "end": -1}, 17, 1),
    ("Size", [(F32, [2, 3])], {}, 17, 1),
    ("ConstantOfShape", [i64(2, 3)], {"value": helper.make_tensor("v", I32, [1], [7])}, 17, 1),
    ("Constant", [], {"value": numpy_helper.from_array(np.ones((2, 3), np.float16))}, 17, 1),
    ("Constant", [], {"value_ints": [1, 2, 3]}, 17, 1),
    ("Range", [np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)], {}, 17, 1),
    ("Range", [np.array(0.0, np.float32), np.array(1.0, np.float32), np.array(0.3, np.float32)], {}, 17, 1),
    ("Dropout", [(F32, [2, 3])], {}, 17, 2),
    ("ReduceMean", [(F32, [2, 3, 4])], {"axes": [-1], "keepdims": 1}, 17, 1),
    ("ReduceMean", [(F32, [2, 3, 4]), i64(0, 2)], {"keepdims": 0}, 18, 1),
    ("ReduceSum", [(F32, [2, 3, 4]), i64(1)], {}, 13, 1),
    ("ReduceMax", [(F32, [2, 3, 4])], {"keepdims": 0}, 18, 1),
    ("ReduceL2", [(F32, [2, 3, 4])], {"noop_with_empty_axes": 1}, 18, 1),
    ("ArgMax", [(F32, [2, 3, 4])], {"axis": 1, "keepdims": 0}, 17, 1),
    ("TopK", [(F32, [3, 10]), i64(4)], {"axis": 1}, 17, 2),
    ("LayerNormalization", [(F32, [2, 5, 8]), (F32, [8]), (F32, [8])], {"axis": -1}, 17, 3),
    ("LayerNormalization", [(F16, [2, 5, 8]), (F16, [5, 8])], {"axis": 1}, 17, 3),
    ("BatchNormalization", [(F32, [2, 3, 4]), (F32, [3]), (F32, [3]), (F32, [3]), (F32, [3])], {}, 15, 1),
    ("InstanceNormalization", [(F32, [2, 3, 4]), (F32, [3]), (F32, [3])], {}, 17, 1),
    ("NonZero", [(F32, [2, 3])], {}, 17, 1),
    ("OneHot", [(I64, [2, 3]), np.array(10, np.int64), (F32, [2])], {"axis": 1}, 17, 1),
    ("QuantizeLinear", [(F32, [2, 3]), np.array(0.1, np.float32), np.array(0, np.int8)], {}, 17, 1),
    ("QuantizeLinear", [(F32, [2, 3]), np.array(0.1, np.float32)], {}, 17, 1),
    ("DequantizeLinear", [(I8, [2, 3]), np.array(0.1, np.float16)], {}, 21, 1),
    ("DynamicQuantizeLinear", [(F32, [2, 3])], {}, 17, 3),
    ("RandomNormalLike", [(F32, [2, 3])], {"dtype": TensorProto.DOUBLE}, 17, 1),
    ("Bernoulli", [(F32, [2, 3])], {}, 17, 1),
    ("RandomNormal", [], {"shape": [2, 3]}, 17, 1),
    ("Multinomial", [(F32, [3, 5])], {"sample_size": 4}, 17, 1),
    # operands that were attributes in older opsets
    ("Pad", [(F32, [2, 3])], {"pads": [1, 0, 1, 0]}, 10, 1),
    ("Clip", [(F32, [2, 3])], {"min": 0.0}, 10, 1),
    ("Slice", [(F32, [10, 20])], {"starts": [1], "ends": [5], "axes": [1]}, 9, 1),
    ("Shape", [(F32, [2, 3, 4])], {}, 13, 1),
    ("BatchNormalization", [(F16, [2, 3, 4]), (F16, [3]), (F16, [3]), (F32, [3]), (F32, [3])],
     {"training_mode": 1}, 15, 3),
    ("Dropout", [(F32, [2, 3]), np.array(0.5, np.float32), np.array(True)], {}, 13, 2),
    ("OneHot", [(I64, [3]), np.array(4.0, np.float32), (I64, [2])], {}, 11, 1),
    ("Range", [np.array(5, np.int32), np.array(1, np.int32), np.array(-2, np.int32)], {}, 13, 1),
    ("Einsum", [(F32, [4, 2, 3]), (F32, [4, 3, 5])], {"equation": "b i j , b j k -> b i k"}, 13, 1),
    ("LpPool", [(F32, [1, 3, 8, 8])], {"kernel_shape": [3, 3], "strides": [2, 2]}, 18, 1),
]


@pytest.mark.parametrize(
    "op, inputs, attrs, opset, num_outputs",
    STATIC_CASES,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(STATIC_CASES)],
)
def test_matches_onnx_shape_inference(
    op: str, inputs: list[Spec], attrs: dict[str, Any], opset: int, num_outputs: int
) -> None:
    expected = onnx_output_types(op, inputs, attrs, opset, num_outputs)
    schema = get_schema("", op)
    assert schema is not None
    ctx = context_from_specs(op, inputs, attrs, opset, num_outputs)
    assert schema.infer(ctx) == expected


def test_every_listed_op_has_a_schema() -> None:
    listed = """Add Sub Mul Div Pow Mod Neg Abs Sqrt Reciprocal Exp Log Erf Tanh Sigmoid Relu LeakyRelu
    Elu Selu Gelu HardSigmoid HardSwish Softplus Mish PRelu Sin Cos Floor Ceil Round Sign IsNaN IsInf
    Not And Or Xor Equal Less Greater LessOrEqual GreaterOrEqual Min Max Sum Mean Where Clip Softmax
    LogSoftmax Hardmax MatMul Gemm MatMulInteger Einsum Conv Transpose Reshape Flatten Squeeze
    Unsqueeze Concat Split Slice Gather GatherElements GatherND ScatterND ScatterElements Expand Tile
    Pad Cast CastLike Shape Size ConstantOfShape Constant Range Identity Dropout Trilu CumSum
    ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceSumSquare
    ReduceLogSumExp ArgMax ArgMin TopK LayerNormalization BatchNormalization InstanceNormalization
    GroupNormalization NonZero OneHot QuantizeLinear DequantizeLinear DynamicQuantizeLinear
    RandomNormalLike RandomUniformLike Bernoulli""".split()
    assert set(listed) <= set(ONNX_OPS)
    impure = {name for name in ONNX_OPS if not get_schema("", name).pure}  # type: ignore[union-attr]
    random_ops = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"}
    assert impure == random_ops


def test_schema_facts() -> None:
    add, where, concat, clip = (get_schema("", n) for n in ("Add", "Where", "Concat", "Clip"))
    assert add is not None and add.same_dtype_inputs == ((0, 1),)
    assert (add.min_inputs, add.max_inputs) == (2, 2)
    assert where is not None and where.same_dtype_inputs == ((1, 2),)
    assert concat is not None and concat.same_dtype_inputs == (ALL_INPUTS,) == ((-1,),)
    assert clip is not None and (clip.min_inputs, clip.max_inputs) == (1, 3)
    assert all(get_schema("", n).doc for n in ONNX_OPS)  # type: ignore[union-attr]


# Minimal attributes an op cannot do without.
_REQUIRED_ATTRS = {"Cast": {"to": 1}, "Concat": {"axis": 0}, "Einsum": {"equation": "ij,jk->ik"}}


@pytest.mark.parametrize("op", ONNX_OPS)
def test_unknown_inputs_never_raise(op: str) -> None:
    schema = get_schema("", op)
    assert schema is not None
    num_inputs = min(max(schema.min_inputs, 2 if op == "Einsum" else 1), schema.max_inputs)
    num_outputs = min(max(schema.min_outputs, 2), schema.max_outputs)
    attrs = dict(_REQUIRED_ATTRS.get(op, {}))
    if op == "Constant":
        attrs["value_int"] = 3
    if op in ("MaxPool", "AveragePool", "LpPool"):
        attrs["kernel_shape"] = [2, 2]
    ctx = InferenceContext(op, "", [UNKNOWN] * num_inputs, attrs, num_outputs, 18)
    outputs = schema.infer(ctx)
    assert len(outputs) == (num_outputs if schema.max_outputs > 1 else 1)
    assert all(isinstance(t, TensorType) for t in outputs)
    if schema.propagate is not None:
        schema.propagate(ctx)


# ---- symbolic dims ---------------------------------------------------------------------


def test_matmul_symbolic() -> None:
    assert infer("MatMul", [f32("batch", "seq", 64), f32(64, 128)]) == [f32("batch", "seq", 128)]
    assert infer("MatMul", [f32("b", 1, "s", "d"), f32("h", "d", "t")]) == [f32("b", "h", "s", "t")]
    assert infer("MatMul", [f32("b", "s", 64), UNKNOWN]) == [TensorType(DType.FLOAT, None)]


def test_transpose_and_gemm_symbolic() -> None:
    assert infer("Transpose", [f32("b", "s", 12, 64)], {"perm": [0, 2, 1, 3]}) == [f32("b", 12, "s", 64)]
    assert infer("Transpose", [UNKNOWN], {"perm": [1, 0]}) == [TensorType(None, (None, None))]
    assert infer("Gemm", [f32("m", 8), UNKNOWN]) == [f32("m", None)]


def test_reshape_zero_and_minus_one() -> None:
    def reshape(source: TensorType, *target: int, allowzero: int = 0) -> TensorType:
        attrs = {"allowzero": allowzero}
        [result] = infer("Reshape", [source, int64(len(target))], attrs, constants=[None, i64(*target)])
        return result

    assert reshape(f32("batch", "seq", 32), 0, 0, 4, 8) == f32("batch", "seq", 4, 8)
    assert reshape(f32("batch", "seq", 4, 8), 0, -1, 32) == f32("batch", "seq", 32)
    assert reshape(f32("b", 4, 8), 0, -1) == f32("b", 32)
    assert reshape(f32(2, "s", 8), 2, 8, -1) == f32(2, 8, "s")  # the symbol is what is left
    assert reshape(f32("b", "s"), -1) == f32("b*s")
    assert reshape(f32("b", 6), 0, 4, -1) == f32("b", 4, None)
    assert reshape(f32(2, 0), 0, 5, allowzero=1) == f32(0, 5)
    assert reshape(f32(2, 0), 0, 0) == f32(2, 0)


def test_reshape_from_propagated_shape_vector() -> None:
    hidden = f32("batch", "seq", 32)
    assert infer("Reshape", [hidden, VEC4], symbolic=[None, ("batch", "seq", 4, 8)]) == [f32("batch", "seq", 4, 8)]
    assert infer("Reshape", [hidden, VEC3], symbolic=[None, ("batch", None, 32)]) == [f32("batch", None, 32)]
    assert infer("Reshape", [hidden, VEC3], symbolic=[None, (0, -1, 8)]) == [f32("batch", "4*seq", 8)]
    assert infer("Reshape", [hidden, VEC3], symbolic=[None, (0, -1, 7)]) == [f32("batch", None, 7)]
    assert infer("Reshape", [f32("b", 32), VEC3]) == [f32(None, None, None)]
    assert infer("Reshape", [f32("b", 32), UNKNOWN]) == [TensorType(DType.FLOAT, None)]


def test_expand_and_tile_symbolic() -> None:
    result = infer("Expand", [f32(1, "seq", 1), VEC3], symbolic=[None, ("batch", 1, 64)])
    assert result == [f32("batch", "seq", 64)]
    assert infer("Expand", [f32(3, 1), VEC3]) == [f32(None, 3, None)]
    assert infer("Tile", [f32("b", 4), VEC2], constants=[None, i64(1, 3)]) == [f32("b", 12)]
    assert infer("Tile", [f32(1, 4, 8), VEC3], symbolic=[None, ("b", None, 1)]) == [f32("b", None, 8)]


def test_concat_symbolic_axis() -> None:
    assert infer("Concat", [f32("b", "past", 64), f32("b", "seq", 64)], {"axis": 1}) == [f32("b", "past + seq", 64)]
    assert infer("Concat", [f32("b", "past", 64), f32(None, "seq", 64)], {"axis": 1}) == [f32("b", "past + seq", 64)]
    assert infer("Concat", [f32("b", None, 64), f32("b", "seq", 64)], {"axis": 1}) == [f32("b", None, 64)]
    assert infer("Concat", [f32("b", 0, 64), f32("b", "seq", 64)], {"axis": -2}) == [f32("b", "seq", 64)]
    assert infer("Concat", [f32("b", 2, 64), f32(None, 3, 64)], {"axis": 1}) == [f32("b", 5, 64)]
    assert infer("Concat", [f32("b", 2, 64), UNKNOWN], {"axis": 1}) == [f32("b", None, 64)]


def test_slice_gather_squeeze_symbolic() -> None:
    x = f32("b", "s", 64)
    to_end = i64(SLICE_TO_END, SLICE_TO_END)
    assert infer("Slice", [x, VEC2, VEC2, VEC2], constants=[None, i64(0, -1), to_end, i64(0, 1)]) == [
        f32("b", None, 64)
    ]
    # x[:, :s] where s is the symbolic length of that axis
    start_and_axis = [None, i64(0), None, i64(1)]
    assert infer("Slice", [x, VEC1, VEC1, VEC1], constants=start_and_axis, symbolic=[None, None, ("s",)]) == [x]
    assert infer("Slice", [x, VEC1, VEC1, VEC1], constants=start_and_axis) == [f32("b", None, 64)]
    assert infer("Gather", [f32("vocab", 768), int64("b", "s")]) == [f32("b", "s", 768)]
    assert infer("Squeeze", [f32("b", 1, "s"), VEC1], constants=[None, i64(1)]) == [f32("b", "s")]
    assert infer("Squeeze", [f32("b", 1, "s")]) == [TensorType(DType.FLOAT, None)]
    assert infer("Unsqueeze", [f32("b", "s"), VEC2], constants=[None, i64(1, 2)]) == [f32("b", 1, 1, "s")]


def test_shape_range_constant_of_shape_symbolic() -> None:
    assert infer("Shape", [f32("b", "s", 64)], {"start": -2}) == [int64(2)]
    assert infer("Shape", [UNKNOWN]) == [int64(None)]
    positions = infer("Range", [SCALAR_I64] * 3, constants=[s64(0), None, s64(1)], symbolic=[None, ("seq",)])
    assert positions == [int64("seq")]
    tail = infer("Range", [SCALAR_I64] * 3, constants=[None, None, s64(1)], symbolic=[("past",), ("past + seq",)])
    assert tail == [int64("seq")]
    # seq - 1 may be below 1 (an empty range): not expressible
    assert infer("Range", [SCALAR_I64] * 3, constants=[s64(1), None, s64(1)], symbolic=[None, ("seq",)]) == [int64(None)]
    padded = infer("Pad", [f32("b", "s"), VEC4], constants=[None, i64(0, 1, 0, 2)])
    assert padded == [f32("b", "s + 3")]
    assert infer("Pad", [f32("b", "s"), VEC4], constants=[None, i64(0, -1, 0, 0)]) == [f32("b", None)]
    filled = infer("ConstantOfShape", [VEC2], {"value": np.array([1], np.int64)}, symbolic=[("b", "s")])
    assert filled == [int64("b", "s")]


def test_split_symbolic_and_opsets() -> None:
    thirds = infer("Split", [f32("b", 96), VEC3], {"axis": -1}, constants=[None, i64(32, 32, 32)], num_outputs=3)
    assert thirds == [f32("b", 32)] * 3
    assert infer("Split", [f32("b", "s")], {"axis": 1}, num_outputs=2) == [f32("b", None)] * 2
    assert infer("Split", [f32("b", "2*s")], {"axis": 1}, num_outputs=2) == [f32("b", "s")] * 2
    halves = infer("Split", [f32("b", "past + seq"), VEC2], {"axis": 1}, symbolic=[None, ("past", "seq")], num_outputs=2)
    assert halves == [f32("b", "past"), f32("b", "seq")]
    with pytest.raises(ValueError, match="sums to seq"):
        infer("Split", [f32("b", "seq + 1"), VEC2], {"axis": 1}, symbolic=[None, ("seq", 0)], num_outputs=2)
    assert infer("Split", [f32(6, 2)], {"split": [1, 5]}, num_outputs=2, opset=11) == [f32(1, 2), f32(5, 2)]


def test_conv_and_pool_symbolic() -> None:
    weight = f32(64, 3, 3, 3)
    assert infer("Conv", [f32("n", 3, "h", "w"), weight], {"pads": [1, 1, 1, 1]}) == [f32("n", 64, "h", "w")]
    assert infer("Conv", [f32("n", 3, "h", "w"), weight], {"strides": [2, 2]}) == [f32("n", 64, None, None)]
    assert infer("Conv", [f32("n", 3, "h", "w"), weight], {"pads": [0, 2, 0, 2]}) == [f32("n", 64, "h - 2", "w + 2")]
    assert infer("Conv", [UNKNOWN, weight]) == [f32(None, 64, None, None)]
    # onnxruntime (and the spec's wording) drop a window that would start in the right
    # padding; onnx's own shape inference does not, and says 4 here
    pool = {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1]}
    assert infer("MaxPool", [f32(1, 1, 5, 5)], pool) == [f32(1, 1, 3, 3)]


def test_einsum_symbolic() -> None:
    q, k = f32("b", "h", "s", 64), f32("b", "h", "t", 64)
    assert infer("Einsum", [q, k], {"equation": "bhsd,bhtd->bhst"}) == [f32("b", "h", "s", "t")]
    assert infer("Einsum", [f32("x", 2, 3), UNKNOWN], {"equation": b"...ij,jk->...ik"}) == [f32("x", 2, None)]
    assert infer("Einsum", [UNKNOWN, f32(3, 4)], {"equation": "...ij,jk->...ik"}) == [TensorType(None, None)]
    assert infer("Einsum", [f32(5, 5)], {"equation": "ii->i"}) == [f32(5)]
    assert infer("Einsum", [f32(2, 3), UNKNOWN], {"equation": "ij,jk"}) == [f32(2, None)]


def test_group_normalization_keeps_shape() -> None:
    # onnx defines GroupNormalization as a function, so its shape inference gives nothing to compare
    x = f32("b", 32, "s")
    assert infer("GroupNormalization", [x, f32(32), f32(32)], {"num_groups": 8}, opset=21) == [x]


def test_reductions_and_norms_symbolic() -> None:
    x = f32("b", "s", 768)
    assert infer("ReduceMean", [x, VEC1], {"keepdims": 1}, constants=[None, i64(-1)]) == [f32("b", "s", 1)]
    assert infer("ReduceMean", [x], {"axes": [-1], "keepdims": 0}, opset=13) == [f32("b", "s")]
    assert infer("ReduceSum", [x, VEC1], {"keepdims": 1}) == [f32(None, None, None)]
    assert infer("ReduceSum", [x, VEC1], {"keepdims": 0}) == [TensorType(DType.FLOAT, None)]
    layer_norm = infer("LayerNormalization", [x, f32(768), f32(768)], num_outputs=3)
    assert layer_norm == [x, f32("b", "s", 1), f32("b", "s", 1)]
    assert infer("ArgMax", [x], {"axis": -1}) == [int64("b", "s", 1)]
    assert infer("TopK", [x, VEC1], constants=[None, i64(5)], num_outputs=2) == [f32("b", "s", 5), int64("b", "s", 5)]


def test_dtype_rules() -> None:
    i8, f16 = DType.INT8, DType.FLOAT16

    def dtype_of(op: str, types: list[TensorType], attrs: Optional[dict] = None, opset: int = 18) -> Any:
        return infer(op, types, attrs, opset=opset)[0].dtype

    assert dtype_of("Pow", [TensorType(f16, (2,)), f32()]) == f16
    assert infer("Cast", [f32("b")], {"to": int(DType.INT64)}) == [int64("b")]
    assert infer("Cast", [f32("b")], {"to": 999}) == [TensorType(None, ("b",))]
    assert dtype_of("QuantizeLinear", [f32(2), f32()], {"output_dtype": int(i8)}, opset=21) == i8
    assert dtype_of("QuantizeLinear", [f32(2), f32(), TensorType(i8, ())]) == i8
    assert dtype_of("DequantizeLinear", [TensorType(i8, (2,)), TensorType(f16, ())], opset=13) == DType.FLOAT
    assert dtype_of("DequantizeLinear", [TensorType(i8, (2,)), TensorType(f16, ())], opset=19) == f16
    assert infer("RandomUniformLike", [f32(2)]) == [f32(2)]
    assert infer("Multinomial", [f32("b", 10)], {"sample_size": 4}) == [TensorType(DType.INT32, ("b", 4))]
    assert infer("Constant", [], {"value": np.zeros((2, 3), np.int32)}) == [TensorType(DType.INT32, (2, 3))]


# ---- value propagation -----------------------------------------------------------------


def test_shape_gather_unsqueeze_concat_reshape_chain() -> None:
    hidden = f32("batch", "seq", 768)
    shape = propagate("Shape", [hidden])
    assert shape == ("batch", "seq", 768)
    batch = propagate("Gather", [VEC3, SCALAR_I64], {"axis": 0}, constants=[None, s64(0)], symbolic=[shape])
    assert batch == ("batch",)
    assert infer("Gather", [VEC3, SCALAR_I64], constants=[None, s64(0)]) == [SCALAR_I64]
    batch_1d = propagate("Unsqueeze", [SCALAR_I64, VEC1], constants=[None, i64(0)], symbolic=[batch])
    assert batch_1d == ("batch",)
    seq_1d = propagate("Gather", [VEC3, VEC1], constants=[None, i64(-2)], symbolic=[shape])
    assert seq_1d == ("seq",)
    heads = propagate("Constant", [], {"value": np.array([12, 64], np.int64)})
    target = propagate("Concat", [VEC1, VEC1, VEC2], {"axis": 0}, symbolic=[batch_1d, seq_1d, heads])
    assert target == ("batch", "seq", 12, 64)
    assert infer("Reshape", [hidden, VEC4], symbolic=[None, target]) == [f32("batch", "seq", 12, 64)]


def test_propagate_shape_slice_cast_and_constants() -> None:
    assert propagate("Shape", [f32("b", "s", 12, 64)], {"start": 1, "end": -1}) == ("s", 12)
    assert propagate("Shape", [UNKNOWN]) is None
    dims = ("b", "s", 12, 64)
    last_two = propagate("Slice", [VEC4, VEC1, VEC1], constants=[None, i64(-2), i64(SLICE_TO_END)], symbolic=[dims])
    assert last_two == (12, 64)
    # a backward slice starting before -dim starts at 0 in ONNX (a Python slice would be empty)
    backward = [VEC4, VEC1, VEC1, VEC1, VEC1]
    first = propagate("Slice", backward, constants=[None, i64(-8), i64(-(2**63)), i64(0), i64(-2)], symbolic=[dims])
    assert first == ("b",)
    assert propagate("Cast", [VEC2], {"to": int(DType.INT32)}, symbolic=[("b", 3)]) == ("b", 3)
    assert propagate("Cast", [VEC2], {"to": int(DType.FLOAT)}, symbolic=[("b", 3)]) is None
    assert propagate("Constant", [], {"value_int": 5}) == (5,)
    assert propagate("Constant", [], {"value_ints": [1, -1]}) == (1, -1)
    assert propagate("Constant", [], {"value": np.ones(3, np.float32)}) is None
    assert propagate("Identity", [VEC2], symbolic=[("b", 1)]) == ("b", 1)
    assert propagate("Squeeze", [VEC1], symbolic=[("b",)]) == ("b",)
    assert propagate("Reshape", [VEC2, VEC1], constants=[None, i64(2)], symbolic=[("b", "s")]) == ("b", "s")
    assert propagate("Size", [f32(2, 3, 4)]) == (24,)


def test_propagate_arithmetic() -> None:
    assert propagate("Mul", [VEC3, SCALAR_I64], constants=[i64(2, 3, 4), s64(2)]) == (4, 6, 8)
    assert propagate("Mul", [VEC3, SCALAR_I64], constants=[None, s64(1)], symbolic=[("b", 3, None)]) == ("b", 3, None)
    assert propagate("Add", [VEC3, VEC3], constants=[None, i64(1, 1, 1)], symbolic=[("b", 3, 4)]) == ("b + 1", 4, 5)
    assert propagate("Add", [VEC3, VEC3], constants=[None, i64(1, 1, 1)], symbolic=[("b", 3, None)]) == ("b + 1", 4, None)
    assert propagate("Sub", [SCALAR_I64, SCALAR_I64], symbolic=[("s",), ("s",)]) == (0,)
    assert propagate("Div", [VEC3, SCALAR_I64], constants=[i64(-7, 7, 768), s64(2)]) == (-3, 3, 384)
    assert propagate("Div", [SCALAR_I64, SCALAR_I64], constants=[s64(7), s64(0)]) == (None,)
    ones = np.ones(2, np.float32)
    assert propagate("Mul", [f32(2), f32(2)], constants=[ones, ones]) is None
    assert propagate("Add", [VEC2, VEC3], constants=[i64(1, 2), i64(1, 2, 3)]) is None


def test_propagate_expand_shape_pattern() -> None:
    """torch's `x.expand(b, -1, -1)`: Where(Equal(shape, -1), ones, shape)."""
    shape = ("b", -1, -1)
    ones = propagate("ConstantOfShape", [VEC1], {"value": np.array([1], np.int64)}, constants=[i64(3)])
    assert ones == (1, 1, 1)
    minus_ones = propagate("Mul", [VEC3, SCALAR_I64], constants=[None, s64(-1)], symbolic=[ones])
    assert minus_ones == (-1, -1, -1)
    is_minus = propagate("Equal", [VEC3, VEC3], symbolic=[shape, minus_ones])
    assert is_minus == (0, 1, 1)
    mask_type = TensorType(DType.BOOL, (3,))
    chosen = propagate("Where", [mask_type, VEC3, VEC3], symbolic=[is_minus, ones, shape])
    assert chosen == ("b", 1, 1)
    mask = np.array([False, True, True])
    assert propagate("Where", [mask_type, VEC3, VEC3], constants=[mask], symbolic=[None, ones, shape]) == chosen
    assert infer("Expand", [f32(1, "s", 64), VEC3], symbolic=[None, chosen]) == [f32("b", "s", 64)]


# ---- inconsistent inputs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "op, types, attrs, constants, message, num_outputs",
    [
        ("MatMul", [f32("b", 64), f32(32, 8)], {}, [], "inner dims 64 and 32", 1),
        ("MatMul", [f32(2, 3, 4), f32(5, 4, 6)], {}, [], "do not broadcast", 1),
        ("Gemm", [f32(3, 4), f32(5, 6)], {}, [], "inner dims", 1),
        ("Add", [f32(2, 3), f32(4)], {}, [], "do not broadcast", 1),
        ("Concat", [f32(2, 3), f32(2, 3, 1)], {"axis": 0}, [], "different ranks", 1),
        ("Concat", [f32(2, 3), f32(4, 3)], {"axis": 1}, [], "dim 0 differs", 1),
        ("Concat", [f32(2, 3)], {"axis": 2}, [], "out of range", 1),
        ("Reshape", [f32(2, 3), VEC1], {}, [None, i64(5)], "6 elements", 1),
        ("Reshape", [f32(2, 3), VEC2], {}, [None, i64(-1, -1)], "more than one -1", 1),
        ("Reshape", [f32(2, 3), VEC2], {}, [None, i64(4, -1)], "cannot reshape", 1),
        ("Transpose", [f32(2, 3)], {"perm": [0, 0]}, [], "not a permutation", 1),
        ("Squeeze", [f32(2, 3), VEC1], {}, [None, i64(0)], "size 2", 1),
        ("Unsqueeze", [f32(2, 3), VEC2], {}, [None, i64(0, 0)], "repeat", 1),
        ("Split", [f32(7, 2), VEC2], {}, [None, i64(3, 3)], "sums to 6", 2),
        ("Split", [f32(7, 2)], {}, [], "evenly", 2),
        ("Slice", [f32(4), VEC1, VEC1, VEC1, VEC1], {}, [None, i64(0), i64(2), i64(0), i64(0)], "non-zero", 1),
        ("Conv", [f32(1, 4, 8, 8), f32(6, 3, 3, 3)], {}, [], "channels", 1),
        ("Conv", [f32(1, 3, 2, 2), f32(6, 3, 3, 3)], {}, [], "does not fit", 1),
        ("Gather", [f32(), SCALAR_I64], {}, [], "out of range", 1),
        ("Expand", [f32(3), VEC1], {}, [None, i64(2)], "do not broadcast", 1),
        ("Tile", [f32(3), VEC2], {}, [None, i64(2, 2)], "rank 1", 1),
        ("Pad", [f32(3), VEC2], {}, [None, i64(-2, -2)], "remove more", 1),
        ("TopK", [f32(3), VEC1], {}, [None, i64(4)], "exceeds", 1),
        ("Einsum", [f32(2, 3), f32(4, 5)], {"equation": "ij,jk->ik"}, [], "label 'j'", 1),
        ("Cast", [f32(3)], {}, [], "'to'", 1),
    ],
)
def test_inconsistent_inputs_raise(
    op: str,
    types: list[TensorType],
    attrs: dict[str, Any],
    constants: list[Optional[np.ndarray]],
    message: str,
    num_outputs: int,
) -> None:
    with pytest.raises(ValueError, match=op) as info:
        infer(op, types, attrs, constants=constants, num_outputs=num_outputs)
    assert message in str(info.value)


# ---- properties against onnx and numpy ---------------------------------------------------

_dims = st.lists(st.integers(0, 5), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, database=None)
@given(shape=_dims, data=st.data())
def test_slice_matches_onnx(shape: list[int], data: st.DataObject) -> None:
    """Slice clamps like numpy except for backward slices starting before -dim."""
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    start = data.draw(st.integers(-8, 8))
    end = data.draw(st.one_of(st.integers(-8, 8), st.just(SLICE_TO_END), st.just(-(2**63))))
    step = data.draw(st.sampled_from([-3, -2, -1, 1, 2, 3]))
    inputs: list[Spec] = [(F32, shape), i64(start), i64(end), i64(axis), i64(step)]
    expected = onnx_output_types("Slice", inputs, {}, 17, 1)
    schema = get_schema("", "Slice")
    assert schema is not None and schema.infer(context_from_specs("Slice", inputs, {}, 17, 1)) == expected
    if len(shape) == 1:
        contents = tuple(range(shape[0]))
        constants = [None, i64(start), i64(end), i64(axis), i64(step)]
        sliced = propagate("Slice", [int64(shape[0])] + [VEC1] * 4, constants=constants, symbolic=[contents])
        assert sliced is not None and (len(sliced),) == expected[0].shape


@settings(max_examples=60, deadline=None, database=None)
@given(a=_dims, b=_dims, batch=st.lists(st.sampled_from([1, 3]), max_size=2))
def test_matmul_and_broadcast_match_numpy(a: list[int], b: list[int], batch: list[int]) -> None:
    left, right = batch + a, b
    if len(right) >= 2:
        right = right[:-2] + [left[-1], right[-1]]
    elif right:
        right = [left[-1]]
    try:
        expected = np.matmul(np.zeros(left), np.zeros(right)).shape
    except ValueError:
        with pytest.raises(ValueError, match="MatMul"):
            infer("MatMul", [f32(*left), f32(*right)])
    else:
        assert infer("MatMul", [f32(*left), f32(*right)]) == [f32(*expected)]
    try:
        broadcast = np.broadcast_shapes(tuple(a), tuple(b))
    except ValueError:
        with pytest.raises(ValueError, match="Add"):
            infer("Add", [f32(*a), f32(*b)])
    else:
        assert infer("Add", [f32(*a), f32(*b)]) == [f32(*broadcast)]
