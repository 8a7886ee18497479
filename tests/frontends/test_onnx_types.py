"""Every ONNX type round-trips exactly: ONNX -> IR (`from_onnx`) -> ONNX (`to_onnx`/`save_onnx`).

Element types: every `onnx.TensorProto.DataType` (sub-byte, float8/float6/float4 included) as a
graph input/output, as inline and file-backed initializers (packed raw data and the typed
`*_data` fields) and as a Constant attribute. Value kinds: sequences, optionals, sparse
tensors and maps as graph inputs, outputs and intermediate value_info. Each round trip must
pass `onnx.checker.check_model(full_check=True)`, give back the original TypeProtos and
initializer values, and where ONNX Runtime runs the original model, run with equal outputs
(also after `cleanup`).
"""

from __future__ import annotations

import math
import warnings

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.exporters.onnx_export import save_onnx
from graphopt.frontends.onnx_import import from_onnx
from graphopt.ir.dtypes import DType
from graphopt.ir.types import MapType, OptionalType, SequenceType, SparseTensorType, TensorType, merge_types

ort = pytest.importorskip("onnxruntime")

ELEMENT_TYPES = [name for name, number in TensorProto.DataType.items() if number != TensorProto.UNDEFINED]
NEWEST_OPSET = onnx.defs.onnx_opset_version()
BIG = (64, 80)  # 5120 elements: raw data above 1 KB even at 2 bits, so a file import maps it (FileTensor)


# ----------------------------------------------------------------------------------- helpers


def _values(number: int, count: int) -> np.ndarray:
    """`count` values of an ONNX element type (every code of the float8/6/4 types, NaNs included)."""
    dtype = helper.tensor_dtype_to_np_dtype(number)
    element = DType(number)
    rng = np.random.default_rng(number)
    if element is DType.STRING:
        return np.array([f"s{i}" * (i % 3) for i in range(count)], dtype=object)
    if element is DType.BOOL:
        return rng.integers(0, 2, count).astype(bool)
    if element in (DType.COMPLEX64, DType.COMPLEX128):
        return (rng.standard_normal(count) + 1j * rng.standard_normal(count)).astype(dtype)
    if element.is_float and element.bits <= 8:
        return (np.arange(count) % (1 << element.bits)).astype(np.uint8).view(dtype)
    if element.is_integer:
        info = ml_dtypes.iinfo(dtype)
        kind = np.uint64 if info.min >= 0 else np.int64
        return rng.integers(info.min, info.max, count, endpoint=True, dtype=kind).astype(dtype)
    return (rng.standard_normal(count) * 100).astype(dtype)


def _typed_list(array: np.ndarray, number: int) -> list:
    """`array` as the Python values `helper.make_tensor` takes (stored in the typed *_data field)."""
    if number == TensorProto.STRING:
        return [s.encode() for s in array]
    if number in (TensorProto.BOOL, TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return array.tolist()
    if DType(number).is_integer:
        return [int(v) for v in array]
    return array.astype(np.float32).tolist()


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bits (NaNs compare equal; strings compare as text)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == object:
        return a.tolist() == b.tolist()
    return a.tobytes() == b.tobytes()


def _element_model(number: int) -> onnx.ModelProto:
    """x:T[n, 3] -> Identity -> y; initializers w (big, raw) and ws (typed *_data field), each
    through Identity; a Constant of T. In the oldest opset whose checker accepts T; a graph
    with no nodes (inputs and initializers as outputs) where no opset's Identity takes T."""
    x = helper.make_tensor_value_info("x", number, ["n", 3])
    big = numpy_helper.from_array(_values(number, math.prod(BIG)).reshape(BIG), "w")
    small = helper.make_tensor("ws", number, [5], _typed_list(_values(number, 5), number))
    const = numpy_helper.from_array(_values(number, 3), "c_value")
    outputs = [helper.make_tensor_value_info(name, number, shape) for name, shape in
               (("y", ["n", 3]), ("z", list(BIG)), ("zs", [5]), ("c", [3]))]
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["w"], ["z"]),
        helper.make_node("Identity", ["ws"], ["zs"]), helper.make_node("Constant", [], ["c"], value=const),
    ]
    for opset in range(13, NEWEST_OPSET + 1):
        graph = helper.make_graph(nodes, "types", [x], outputs, initializer=[big, small])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        try:
            onnx.checker.check_model(model, full_check=True)
            return model
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
            continue
    outputs = [x] + [helper.make_tensor_value_info(n, number, s) for n, s in (("w", list(BIG)), ("ws", [5]))]
    graph = helper.make_graph([], "types", [x], outputs, initializer=[big, small])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", NEWEST_OPSET)])


def _round_trips(model: onnx.ModelProto, tmp_path) -> dict[str, onnx.ModelProto]:
    """The model after each round trip: in memory, through files, and with external data."""
    source = tmp_path / "source.onnx"
    onnx.save(model, source)
    results = {"memory": from_onnx(model).to_onnx()}
    save_onnx(from_onnx(str(source)), tmp_path / "file.onnx")
    results["file"] = onnx.load(tmp_path / "file.onnx")
    save_onnx(from_onnx(str(source)), tmp_path / "external.onnx", external_data=True)
    results["external"] = onnx.load(tmp_path / "external.onnx")
    return results


def _assert_same_types(original: onnx.ModelProto, exported: onnx.ModelProto) -> None:
    """Graph inputs, outputs and value_info carry the original TypeProtos, value by value."""
    for field in ("input", "output"):
        got = {vi.name: vi.type for vi in getattr(exported.graph, field)}
        for vi in getattr(original.graph, field):
            assert got[vi.name] == vi.type, f"{field} {vi.name}: {got[vi.name]} != {vi.type}"
    exported_info = {vi.name: vi.type for vi in exported.graph.value_info}
    for vi in original.graph.value_info:
        assert exported_info.get(vi.name) == vi.type, f"value_info {vi.name}"


def _assert_same_initializers(original: onnx.ModelProto, exported: onnx.ModelProto, base_dir: str = "") -> None:
    got = {t.name: t for t in exported.graph.initializer}
    assert set(got) == {t.name for t in original.graph.initializer}
    for tensor in original.graph.initializer:
        assert got[tensor.name].data_type == tensor.data_type
        assert _same_array(numpy_helper.to_array(tensor), numpy_helper.to_array(got[tensor.name], base_dir)), tensor.name
    constants = [n for n in original.graph.node if n.op_type == "Constant"]
    exported_constants = {n.output[0]: n for n in exported.graph.node if n.op_type == "Constant"}
    for node in constants:
        want = numpy_helper.to_array(node.attribute[0].t)
        assert _same_array(want, numpy_helper.to_array(exported_constants[node.output[0]].attribute[0].t))


def _session(model: onnx.ModelProto):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_outputs(model: onnx.ModelProto, feeds: dict) -> list:
    return _session(model).run(None, feeds)


def _assert_same_outputs(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if isinstance(b, list):
            assert isinstance(a, list) and len(a) == len(b)
            _assert_same_outputs(a, b)
        elif isinstance(b, dict):
            assert a == b
        elif b is None:
            assert a is None
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------- dtype table


def test_every_onnx_element_type_has_a_dtype() -> None:
    """DType numbers are ONNX's, with onnx's numpy dtype for each (ml_dtypes for sub-byte)."""
    assert {int(d) for d in DType} == set(TensorProto.DataType.values()) - {TensorProto.UNDEFINED}
    for dtype in DType:
        assert dtype.to_numpy() == helper.tensor_dtype_to_np_dtype(int(dtype)), dtype.name
        assert DType.from_numpy(dtype.to_numpy()) is dtype
    assert (DType.INT2.bits, DType.FLOAT4E2M1.bits, DType.FLOAT6E3M2.bits, DType.FLOAT8E8M0.bits) == (2, 4, 6, 8)
    assert [DType.INT2.packed_nbytes(5), DType.UINT4.packed_nbytes(5), DType.FLOAT6E2M3.packed_nbytes(5)] == [2, 3, 4]


# ----------------------------------------------------------------------------- element types


@pytest.mark.parametrize("name", ELEMENT_TYPES)
def test_element_type_round_trips(name: str, tmp_path) -> None:
    """Input/output TypeProtos and initializer/Constant values come back exactly, and the
    written models pass the full checker, whichever way they were imported and saved."""
    number = getattr(TensorProto, name)
    model = _element_model(number)
    onnx.checker.check_model(model, full_check=True)
    for how, exported in _round_trips(model, tmp_path).items():
        onnx.checker.check_model(exported, full_check=True)
        _assert_same_types(model, exported)
        _assert_same_initializers(model, exported, str(tmp_path))
        assert exported.opset_import == model.opset_import, how


@pytest.mark.parametrize("name", ELEMENT_TYPES)
def test_element_type_prints(name: str) -> None:
    graph = from_onnx(_element_model(getattr(TensorProto, name)))
    short = DType[name].short
    assert f"%x: {short}[n, 3]" in str(graph)
    assert f"%w: {short}[64, 80] = const" in str(graph)


def _cast_model(number: int, foldable: bool = False) -> onnx.ModelProto:
    """The big and small initializers of type T cast to float (ONNX Runtime has no numpy
    type to return bfloat16, float8 or sub-byte tensors in; the cast is exact). `foldable`:
    each Cast feeds an Identity, so the Casts are not graph outputs and fold-constants may
    evaluate them."""
    big = numpy_helper.from_array(_values(number, math.prod(BIG)).reshape(BIG), "w")
    small = helper.make_tensor("ws", number, [5], _typed_list(_values(number, 5), number))
    nodes = [helper.make_node("Cast", [src], [dst + "_cast" if foldable else dst], to=TensorProto.FLOAT)
             for src, dst in (("w", "fw"), ("ws", "fws"))]
    if foldable:
        nodes += [helper.make_node("Identity", [dst + "_cast"], [dst]) for dst in ("fw", "fws")]
    outputs = [helper.make_tensor_value_info("fw", TensorProto.FLOAT, list(BIG)),
               helper.make_tensor_value_info("fws", TensorProto.FLOAT, [5])]
    for opset in (19, 21, 23, 24, 25):
        model = helper.make_model(helper.make_graph(nodes, "cast", [], outputs, initializer=[big, small]),
                                  opset_imports=[helper.make_opsetid("", opset)])
        try:
            onnx.checker.check_model(model, full_check=True)
            return model
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
            continue
    raise AssertionError(f"no opset casts {TensorProto.DataType.Name(number)}")


# ONNX Runtime 1.32 takes numpy inputs of these types (it has no complex kernels at all)
NUMPY_FED = ["FLOAT", "UINT8", "INT8", "UINT16", "INT16", "INT32", "INT64", "STRING", "BOOL", "FLOAT16", "DOUBLE",
             "UINT32", "UINT64"]
# ... and casts these to float (not FLOAT4E2M1 nor the float6 types)
CAST_RUN = ["BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "INT4", "UINT4",
            "INT2", "UINT2"]


@pytest.mark.parametrize("name", NUMPY_FED)
def test_element_type_runs_in_ort_after_round_trip(name: str, tmp_path) -> None:
    number = getattr(TensorProto, name)
    model = _element_model(number)
    feeds = {"x": _values(number, 6).reshape(2, 3)}
    want = _ort_outputs(model, feeds)
    for exported in _round_trips(model, tmp_path).values():
        _assert_same_outputs(_ort_outputs(exported, feeds), want)
    cleaned = graphopt.optimize(model, "cleanup").to_onnx()
    onnx.checker.check_model(cleaned, full_check=True)
    _assert_same_outputs(_ort_outputs(cleaned, feeds), want)


@pytest.mark.parametrize("name", CAST_RUN)
def test_packed_and_8bit_initializers_run_in_ort_after_round_trip(name: str, tmp_path) -> None:
    """Initializers ONNX Runtime can read (through Cast) give the same values after every
    round trip: packed 2- and 4-bit raw data and typed int32_data included."""
    model = _cast_model(getattr(TensorProto, name))
    want = _ort_outputs(model, {})
    for exported in _round_trips(model, tmp_path).values():
        _assert_same_outputs(_ort_outputs(exported, {}), want)


def _reference_outputs(model: onnx.ModelProto, feeds: dict) -> list:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


@pytest.mark.parametrize("name", ELEMENT_TYPES)
def test_cleanup_keeps_element_types(name: str) -> None:
    """`cleanup` on a graph of each element type: full checker, same types, bit-equal
    outputs (ONNX reference evaluator, which runs every type)."""
    number = getattr(TensorProto, name)
    model = _element_model(number)
    cleaned = graphopt.optimize(model, "cleanup").to_onnx()
    onnx.checker.check_model(cleaned, full_check=True)
    _assert_same_types(model, cleaned)
    feeds = {"x": _values(number, 6).reshape(2, 3)}
    for got, want in zip(_reference_outputs(cleaned, feeds), _reference_outputs(model, feeds), strict=True):
        assert _same_array(got, want)


@pytest.mark.parametrize("name", CAST_RUN + ["FLOAT4E2M1"])
def test_cleanup_folds_casts_of_packed_and_8bit_constants_exactly(name: str) -> None:
    """fold-constants evaluates Cast of such constants with ONNX Runtime where it can (and
    keeps the node where ONNX Runtime has no kernel, FLOAT4E2M1): same float values."""
    model = _cast_model(getattr(TensorProto, name), foldable=True)
    cleaned = graphopt.optimize(model, "cleanup").to_onnx()
    onnx.checker.check_model(cleaned, full_check=True)
    assert ("Cast" in {n.op_type for n in cleaned.graph.node}) == (name == "FLOAT4E2M1")
    for got, want in zip(_reference_outputs(cleaned, {}), _reference_outputs(model, {}), strict=True):
        assert _same_array(got, want)


@pytest.mark.parametrize("name", ["INT2", "UINT2", "INT4", "UINT4", "FLOAT4E2M1", "FLOAT6E2M3", "FLOAT6E3M2"])
def test_sub_byte_file_tensor_unpacks_like_onnx(name: str, tmp_path) -> None:
    """A packed initializer imported from a file (memory-mapped) reads as onnx reads it,
    for odd element counts too (padding bits)."""
    number = getattr(TensorProto, name)
    for count in (1, 1029, 4099, 8191):
        tensor = numpy_helper.from_array(_values(number, count), "w")
        out = helper.make_tensor_value_info("w", number, [count])
        model = helper.make_model(helper.make_graph([], "g", [], [out], initializer=[tensor]),
                                  opset_imports=[helper.make_opsetid("", NEWEST_OPSET)])
        onnx.save(model, tmp_path / "m.onnx")
        const = from_onnx(str(tmp_path / "m.onnx")).constants["w"].const
        assert (type(const).__name__ == "FileTensor") == (len(tensor.raw_data) > 1024)
        assert const.nbytes == len(tensor.raw_data)
        assert _same_array(const.numpy(), numpy_helper.to_array(tensor))


def test_sub_byte_initializer_of_the_wrong_length_is_refused() -> None:
    tensor = numpy_helper.from_array(_values(TensorProto.INT2, 12), "w")
    tensor.raw_data = tensor.raw_data[:-1]
    out = helper.make_tensor_value_info("w", TensorProto.INT2, [12])
    model = helper.make_model(helper.make_graph([], "g", [], [out], initializer=[tensor]),
                              opset_imports=[helper.make_opsetid("", NEWEST_OPSET)])
    with pytest.raises(graphopt.errors.ModelLoadError, match="initializer 'w' declares i2\\[12\\]"):
        from_onnx(model)


# ------------------------------------------------------------------- sequences and optionals


def _tensor_type(number: int, shape) -> onnx.TypeProto:
    return helper.make_tensor_type_proto(number, shape)


SEQ_F32 = helper.make_sequence_type_proto(_tensor_type(TensorProto.FLOAT, ["n", 3]))
OPT_I64 = helper.make_optional_type_proto(_tensor_type(TensorProto.INT64, [None]))
OPT_SEQ = helper.make_optional_type_proto(helper.make_sequence_type_proto(_tensor_type(TensorProto.FLOAT, None)))


def _sequence_model() -> onnx.ModelProto:
    """Tensors into a sequence (typed intermediate), element 1 and the length out; a
    sequence input passed through and read."""
    nodes = [
        helper.make_node("SequenceConstruct", ["a", "b", "a"], ["s"]),
        helper.make_node("SequenceAt", ["s", "one"], ["second"]),
        helper.make_node("SequenceLength", ["s"], ["length"]),
        helper.make_node("Identity", ["seq_in"], ["seq_out"]),
        helper.make_node("SequenceLength", ["seq_in"], ["seq_in_length"]),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 3]) for n in ("a", "b")]
    inputs.append(helper.make_value_info("seq_in", SEQ_F32))
    outputs = [
        helper.make_tensor_value_info("second", TensorProto.FLOAT, ["n", 3]),
        helper.make_tensor_value_info("length", TensorProto.INT64, []),
        helper.make_value_info("seq_out", SEQ_F32),
        helper.make_tensor_value_info("seq_in_length", TensorProto.INT64, []),
    ]
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    graph = helper.make_graph(nodes, "seq", inputs, outputs, initializer=[one], value_info=[helper.make_value_info("s", SEQ_F32)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _optional_model() -> onnx.ModelProto:
    """An optional input read by OptionalHasElement/OptionalGetElement; an optional built
    from a tensor (typed intermediate); optional(seq) passed through."""
    nodes = [
        helper.make_node("OptionalHasElement", ["opt_in"], ["has"]),
        helper.make_node("OptionalGetElement", ["opt_in"], ["got"]),
        helper.make_node("Optional", ["t"], ["wrapped"]),
        helper.make_node("OptionalGetElement", ["wrapped"], ["unwrapped"]),
        helper.make_node("Identity", ["opt_seq"], ["opt_seq_out"]),
    ]
    inputs = [helper.make_value_info("opt_in", OPT_I64), helper.make_tensor_value_info("t", TensorProto.FLOAT, [2]),
              helper.make_value_info("opt_seq", OPT_SEQ)]
    outputs = [
        helper.make_tensor_value_info("has", TensorProto.BOOL, []),
        helper.make_tensor_value_info("got", TensorProto.INT64, [None]),
        helper.make_tensor_value_info("unwrapped", TensorProto.FLOAT, [2]),
        helper.make_value_info("opt_seq_out", OPT_SEQ),
    ]
    wrapped = helper.make_value_info("wrapped", helper.make_optional_type_proto(_tensor_type(TensorProto.FLOAT, [2])))
    graph = helper.make_graph(nodes, "opt", inputs, outputs, value_info=[wrapped])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


def _sequence_feeds() -> dict:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    return {"a": a, "b": -a, "seq_in": [a, a * 2, a * 3]}


def _optional_feeds() -> dict:
    return {"opt_in": np.array([4, 5, 6], np.int64), "t": np.array([1.5, -2.0], np.float32),
            "opt_seq": [np.ones(3, np.float32), np.zeros(2, np.float32)]}


@pytest.mark.parametrize("build, feeds", [(_sequence_model, _sequence_feeds), (_optional_model, _optional_feeds)])
def test_sequence_and_optional_values_round_trip_and_run(build, feeds, tmp_path) -> None:
    model = build()
    onnx.checker.check_model(model, full_check=True)
    want = _ort_outputs(model, feeds())
    variants = _round_trips(model, tmp_path)
    variants["cleanup"] = graphopt.optimize(model, "cleanup").to_onnx()
    for how, exported in variants.items():
        onnx.checker.check_model(exported, full_check=True)
        _assert_same_types(model, exported)
        _assert_same_outputs(_ort_outputs(exported, feeds()), want)


def test_ir_shows_sequence_and_optional_types() -> None:
    text = str(from_onnx(_sequence_model())) + str(from_onnx(_optional_model()))
    for line in ("%seq_in: seq(f32[n, 3])", "%s: seq(f32[n, 3]) = SequenceConstruct(%a, %b, %a)",
                 "%seq_out: seq(f32[n, 3]) = Identity(%seq_in)", "%opt_in: optional(i64[?])",
                 "%opt_seq: optional(seq(f32[*]))", "%wrapped: optional(f32[2]) = Optional(%t)"):
        assert line in text, line


def test_absent_optional_input_runs_after_round_trip() -> None:
    node = helper.make_node("OptionalHasElement", ["opt_in"], ["has"])
    graph = helper.make_graph([node], "absent", [helper.make_value_info("opt_in", OPT_I64)],
                              [helper.make_tensor_value_info("has", TensorProto.BOOL, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    exported = from_onnx(model).to_onnx()
    onnx.checker.check_model(exported, full_check=True)
    _assert_same_types(model, exported)
    for feed, has in ((np.array([1], np.int64), True), (None, False)):
        assert _session(exported).run(None, {"opt_in": feed})[0] == has


def _node_test_cases() -> list:
    """ONNX backend node and model test cases whose graphs have sequence or optional values."""
    from onnx.backend.test.case import model, node

    kinds = {"sequence_type", "optional_type"}
    chosen = []
    with warnings.catch_warnings():  # the generators warn about their own inf/nan arithmetic
        warnings.simplefilter("ignore")
        cases = [case for case in node.collect_testcases() + model.collect_testcases() if case.model is not None]
    for case in cases:
        graph = case.model.graph
        infos = list(graph.input) + list(graph.output) + list(graph.value_info)
        if any(vi.type.WhichOneof("value") in kinds for vi in infos) or any(
            node.op_type.startswith(("Sequence", "Optional")) or node.op_type.endswith("Sequence") for node in graph.node
        ):
            chosen.append(case)
    return chosen


NODE_CASES = _node_test_cases()


@pytest.mark.parametrize("case", NODE_CASES, ids=[c.name for c in NODE_CASES])
def test_onnx_node_case_round_trips(case, tmp_path) -> None:
    """Each case: exact types and the full checker after a round trip and after cleanup;
    equal ONNX Runtime outputs where ONNX Runtime runs the original."""
    model = case.model
    variants = {"memory": from_onnx(model).to_onnx(), "cleanup": graphopt.optimize(model, "cleanup").to_onnx()}
    for exported in variants.values():
        onnx.checker.check_model(exported, full_check=True)
        _assert_same_types(model, exported)
    inputs = case.data_sets[0][0]
    feeds = {vi.name: value for vi, value in zip(model.graph.input, inputs)}
    try:
        want = _ort_outputs(model, feeds)
    except Exception as exc:  # noqa: BLE001  (ONNX Runtime 1.32 lacks some of these kernels)
        pytest.skip(f"ONNX Runtime does not run the original: {str(exc)[:100]}")
    for exported in variants.values():
        _assert_same_outputs(_ort_outputs(exported, feeds), want)


def test_node_cases_cover_sequence_and_optional_ops() -> None:
    ops = {node.op_type for case in NODE_CASES for node in case.model.graph.node}
    assert {"SequenceConstruct", "SequenceAt", "SequenceLength", "SequenceInsert", "SequenceErase", "SequenceEmpty",
            "SplitToSequence", "ConcatFromSequence", "SequenceMap", "OptionalHasElement", "OptionalGetElement"} <= ops


# ----------------------------------------------------------------------- maps, sparse tensors


def test_zipmap_sequence_of_maps_round_trips_and_runs(tmp_path) -> None:
    """ai.onnx.ml ZipMap gives seq(map(int64, float)): typed output kept, same dicts from ORT."""
    float_map = helper.make_map_type_proto(TensorProto.INT64, _tensor_type(TensorProto.FLOAT, None))
    seq_map = helper.make_sequence_type_proto(float_map)
    node = helper.make_node("ZipMap", ["x"], ["y"], domain="ai.onnx.ml", classlabels_int64s=[10, 20, 30])
    graph = helper.make_graph([node], "zipmap", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_value_info("y", seq_map)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    onnx.checker.check_model(model, full_check=True)
    assert str(from_onnx(model).outputs[0].type) == "seq(map(i64, f32[*]))"
    feeds = {"x": np.array([[0.25, 0.5, 0.25], [1.0, 0.0, 0.0]], np.float32)}
    want = _ort_outputs(model, feeds)
    for exported in _round_trips(model, tmp_path).values():
        onnx.checker.check_model(exported, full_check=True)
        _assert_same_types(model, exported)
        _assert_same_outputs(_ort_outputs(exported, feeds), want)


def test_sparse_tensor_values_round_trip() -> None:
    """Sparse tensor graph input, output and value_info (read by an opaque custom op) keep
    their element type and dense shape."""
    sparse = helper.make_sparse_tensor_type_proto(TensorProto.FLOAT, [4, "m"])
    nodes = [helper.make_node("Densify", ["sp"], ["mid"], domain="custom"),
             helper.make_node("Sparsify", ["mid"], ["out"], domain="custom")]
    graph = helper.make_graph(nodes, "sparse", [helper.make_value_info("sp", sparse)], [helper.make_value_info("out", sparse)],
                              value_info=[helper.make_value_info("mid", sparse)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("custom", 1)])
    onnx.checker.check_model(model, full_check=True)
    imported = from_onnx(model)
    assert imported.inputs[0].type == SparseTensorType(TensorType(DType.FLOAT, (4, "m")))
    assert "%mid: sparse(f32[4, m]) = custom::Densify(%sp)" in str(imported)
    exported = imported.to_onnx()
    onnx.checker.check_model(exported, full_check=True)
    _assert_same_types(model, exported)


# ------------------------------------------------------------------------------ type merging


def test_inferred_tensor_types_do_not_replace_other_kinds() -> None:
    seq = SequenceType(TensorType(DType.FLOAT, ("n", 3)))
    assert merge_types(TensorType(), seq) == seq
    assert merge_types(seq, TensorType(DType.FLOAT, (2, 3))) == seq
    assert merge_types(SequenceType(), seq) == seq
    assert merge_types(OptionalType(SequenceType()), OptionalType(seq)) == OptionalType(seq)
    assert merge_types(MapType(None, TensorType()), MapType(DType.STRING, TensorType(DType.FLOAT))) == MapType(
        DType.STRING, TensorType(DType.FLOAT))
    assert not seq.is_tensor and seq.dtype is None and seq.shape is None and TensorType().is_tensor
