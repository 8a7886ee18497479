"""The tensorrt target short of building an engine: availability, lowering, profiles, Q/DQ, flags.

No engine is built here (no tensorrt, no GPU): the lowered ONNX is checked with the ONNX
checker and run in ONNX Runtime against the original model; `build_engine` is driven with a
recording stand-in of the tensorrt module to check the flags, profile and workspace it sets.
"""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import numpy_inputs
from quant_testing import block_graph, calibration

import model_zoo
from graphopt.api import compile, optimize
from graphopt.cli import main
from graphopt.cli_targets import target_info
from graphopt.errors import UnsupportedOpError
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.ir.types import TensorType
from graphopt.target_base import TargetError
from graphopt.target_registry import get_target
from graphopt.targets.tensorrt import NOT_INSTALLED
from graphopt.targets.tensorrt_engine import build_engine, engine_key
from graphopt.targets.tensorrt_profiles import DEFAULT_BATCH, DEFAULT_OTHER

NO_TENSORRT = "the tensorrt package is not installed (pip install tensorrt); it also needs an NVIDIA GPU"


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _as_engine_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds in the lowered model's input dtypes (int64 ids become int32, as the runner does)."""
    types_ = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return {name: value.astype(types_[name]) for name, value in feeds.items()}


def _two_input_graph() -> Graph:
    """ids [batch, seq] int64, mask [batch, seq] int64, image [?, 3, 8] float -> one float output, one int64 output."""
    graph = Graph("two_inputs", opset_imports={"": 17})
    ids = graph.add_input("ids", TensorType(DType.INT64, ("batch", "seq")))
    mask = graph.add_input("mask", TensorType(DType.INT64, ("batch", "seq")))
    image = graph.add_input("image", TensorType(DType.FLOAT, (None, 3, 8)))
    table = graph.add_constant("table", np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32))
    embedded = graph.add_node("Gather", [table, ids]).output
    mask_f = graph.add_node("Cast", [mask], {"to": DType.FLOAT.value}).output
    masked = graph.add_node("Mul", [embedded, graph.add_node("Unsqueeze", [mask_f, graph.add_constant("axis", np.array([2]))]).output]).output
    best = graph.add_node("ArgMax", [masked], {"axis": 2, "keepdims": 0}, output_names=["best"]).output
    pooled = graph.add_node("ReduceSum", [image, graph.add_constant("axes", np.array([1, 2]))], {"keepdims": 0}, output_names=["pooled"]).output
    graph.set_outputs([best, pooled])
    return graph


# ----------------------------------------------------------------------------- availability
def test_compile_without_tensorrt_raises_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert get_target("tensorrt").available() == NO_TENSORRT == NOT_INSTALLED
    with pytest.raises(TargetError) as info:
        compile(_two_input_graph(), "tensorrt", "cleanup")
    assert str(info.value) == f"target 'tensorrt' cannot run here: {NO_TENSORRT}"


def test_graphopt_targets_lists_tensorrt_as_unavailable_with_the_reason(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    info = target_info(type(get_target("tensorrt")))
    assert info["available"] == NO_TENSORRT
    assert [o["name"] for o in info["options"]] == ["precision", "workspace_gb", "profiles", "engine_cache"]
    assert main(["targets"]) == 0
    assert f"tensorrt  {info['summary']} (unavailable: {NO_TENSORRT})" in capsys.readouterr().out


def test_importing_graphopt_and_configuring_the_target_does_not_import_tensorrt():
    script = (
        "import sys, graphopt, graphopt.targets.tensorrt\n"
        "from graphopt.target_registry import get_target\n"
        "get_target('tensorrt{precision=fp16}')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorrt'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("spec, message", [
    ("tensorrt{precision=int4}", "target 'tensorrt': option 'precision' must be one of fp32, fp16, int8, got 'int4'"),
    ("tensorrt{workspace_gb=0}", "target 'tensorrt': workspace_gb must be > 0 (the builder's scratch memory limit in GiB), got 0.0"),
    ("tensorrt{profiles={seq:[1,256,128]}}", "target 'tensorrt': option 'profiles': dim 'seq': max 128 < opt 256; need min <= opt <= max"),
    ("tensorrt{profiles={seq:[4,2,8]}}", "target 'tensorrt': option 'profiles': dim 'seq': opt 2 < min 4; need min <= opt <= max"),
    ("tensorrt{profiles={batch:[0,1,8]}}", "target 'tensorrt': option 'profiles': dim 'batch': min 0 must be >= 1"),
    ("tensorrt{profiles={batch:[1,8]}}", "target 'tensorrt': option 'profiles': dim 'batch' needs [min, opt, max] (three ints) or one int, got [1, 8]"),
    ("tensorrt{profiles={batch:'big'}}", "target 'tensorrt': option 'profiles': dim 'batch' needs [min, opt, max] (three ints) or one int, got 'big'"),
    ("tensorrt{profiles=[1,8,32]}", "target 'tensorrt': option 'profiles' must be a mapping such as {batch: [1, 8, 32], seq: [1, 128, 512]}, got [1, 8, 32]"),
])
def test_bad_options_are_named_in_the_error(spec, message):
    with pytest.raises(TargetError) as info:
        get_target(spec)
    assert str(info.value) == message


def test_profiles_option_takes_bare_or_quoted_dim_names_and_single_ints():
    bare = get_target("tensorrt{profiles={batch:[1,4,16], seq:[8,64,256]}, precision=fp16, workspace_gb=2}")
    quoted = get_target("tensorrt{profiles={'batch': [1, 4, 16], 'seq': [8, 64, 256]}}")
    assert bare.dim_ranges == quoted.dim_ranges == {"batch": (1, 4, 16), "seq": (8, 64, 256)}
    assert (bare.precision, bare.workspace_gb) == ("fp16", 2.0)
    assert get_target("tensorrt{profiles={batch:1}}").dim_ranges == {"batch": (1, 1, 1)}
    for target in (bare, quoted):
        assert get_target(str(target.spec)).dim_ranges == target.dim_ranges, "a manifest's spec must parse back"


# ----------------------------------------------------------------------------- profiles
def test_profiles_share_symbolic_dims_across_inputs_and_fix_static_dims():
    prepared = get_target("tensorrt{profiles={seq:[2,16,64]}}").prepare(_two_input_graph())
    batch_seq = ((DEFAULT_BATCH[0], 2), (DEFAULT_BATCH[1], 16), (DEFAULT_BATCH[2], 64))
    assert prepared.profiles == {
        "ids": batch_seq,
        "mask": batch_seq,
        "image": ((DEFAULT_BATCH[0], 3, 8), (DEFAULT_BATCH[1], 3, 8), (DEFAULT_BATCH[2], 3, 8)),
    }


def test_profiles_default_to_documented_ranges_and_name_unnamed_dims_by_input_and_axis():
    prepared = get_target("tensorrt{profiles={'image.0': [2, 2, 2]}}").prepare(_two_input_graph())
    assert prepared.profiles["ids"] == tuple((DEFAULT_BATCH[i], DEFAULT_OTHER[i]) for i in range(3))
    assert prepared.profiles["image"] == ((2, 3, 8), (2, 3, 8), (2, 3, 8))


def test_static_graphs_get_no_profile():
    graph = Graph("static", opset_imports={"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, (2, 4)))
    graph.set_outputs([graph.add_node("Relu", [x], output_names=["y"]).output])
    assert get_target("tensorrt").prepare(graph).profiles == {}


@pytest.mark.parametrize("profiles, message", [
    ("{bach:[1,2,4]}", "target 'tensorrt': option 'profiles' names 'bach', which no input has as a dynamic dim (dynamic dims: batch, seq, image.0)"),
    ("{'image.1':[3,3,3]}", "target 'tensorrt': option 'profiles': dim 1 of input 'image' is static (3) and takes no range"),
])
def test_profiles_naming_no_dynamic_dim_are_rejected(profiles, message):
    target = get_target(f"tensorrt{{profiles={profiles}}}")
    with pytest.raises(TargetError) as info:
        target.prepare(_two_input_graph())
    assert str(info.value) == message


# ----------------------------------------------------------------------------- lowering
def test_int64_inputs_and_outputs_become_int32_engine_io_with_the_same_results():
    graph = _two_input_graph()
    model = get_target("tensorrt").prepare(graph).graph.to_onnx()
    assert [v.dtype for v in graph.inputs] == [DType.INT64, DType.INT64, DType.FLOAT], "prepare must not change its input graph"
    onnx.checker.check_model(model, full_check=True)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert dtypes == {"ids": onnx.TensorProto.INT32, "mask": onnx.TensorProto.INT32, "image": onnx.TensorProto.FLOAT,
                      "best": onnx.TensorProto.INT32, "pooled": onnx.TensorProto.FLOAT}
    rng = np.random.default_rng(2)
    feeds = {"ids": rng.integers(0, 50, (3, 5)), "mask": rng.integers(0, 2, (3, 5)), "image": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    expected = _ort(graph.to_onnx(), feeds)
    actual = _ort(model, _as_engine_feeds(model, feeds))
    np.testing.assert_array_equal(actual[0].astype(np.int64), expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama", "vit"])
def test_lowered_zoo_models_are_valid_onnx_and_match_the_original(zoo_onnx, name):
    path = zoo_onnx(name)
    graph = optimize(str(path), "fuse")
    assert any(n.domain == GRAPHOPT_DOMAIN for n in graph.nodes), "fuse raised no graphopt ops to lower"
    prepared = get_target("tensorrt").prepare(graph)
    model = prepared.graph.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {""}
    assert onnx.TensorProto.INT64 not in {i.type.tensor_type.elem_type for i in model.graph.input}
    if name == "vit":
        assert prepared.profiles == {"pixel_values": tuple((DEFAULT_BATCH[i], 3, 32, 32) for i in range(3))}
    else:
        shared = tuple((DEFAULT_BATCH[i], DEFAULT_OTHER[i]) for i in range(3))
        assert set(prepared.profiles.values()) == {shared} and len(prepared.profiles) == len(graph.inputs)
    for feeds in (numpy_inputs(model_zoo.build(name)), numpy_inputs(model_zoo.build(name, batch=3, seq=11))):
        expected = _ort(onnx.load(str(path)), feeds)
        actual = _ort(model, _as_engine_feeds(model, feeds))
        for want, got in zip(expected, actual, strict=True):
            assert np.abs(want - got).max() <= 1e-4, f"{name}: max abs error {np.abs(want - got).max():.2e}"


def test_the_lowering_runs_checked_dumped_and_reported_as_a_pipeline(zoo_onnx, tmp_path):
    """What `graphopt compile -t tensorrt --check --dump-ir all` runs before the engine build
    (compile itself refuses the target here: no GPU)."""
    from graphopt.api import with_lowering
    from graphopt.pipeline import build_pipeline

    passes = with_lowering(build_pipeline("fuse"), get_target("tensorrt"))
    graph = optimize(str(zoo_onnx("bert")), passes, check=True, dump_ir=["all"], dump_dir=str(tmp_path))
    assert {n.domain for n in graph.nodes} == {""}
    rows = {r.path: r for r in graph.report.walk()}
    decomposed = rows["lowering/decompose-graphopt-ops"]
    assert decomposed.stats["decomposed"] > 0 and decomposed.max_error is not None
    (before,) = tmp_path.glob("*-lowering.decompose-graphopt-ops.before.txt")
    (after,) = tmp_path.glob("*-lowering.decompose-graphopt-ops.after.txt")
    assert "graphopt::Attention(" in before.read_text() and "graphopt::" not in after.read_text()
    assert [v.dtype for v in graph.inputs] == [DType.INT64] * len(graph.inputs), "int32 engine I/O is a build step, not lowering"


# ----------------------------------------------------------------------------- precision, Q/DQ
def _quantized(activations: str) -> Graph:
    graph = block_graph()
    return optimize(graph, f"quantize{{activations={activations}}}", calibration_data=calibration(graph))


def test_int8_keeps_explicit_qdq_and_builds_strongly_typed():
    graph = _quantized("int8")
    counts = graph.op_counts()
    prepared = get_target("tensorrt{precision=int8}").prepare(graph)
    lowered = prepared.graph.op_counts()
    assert (lowered["QuantizeLinear"], lowered["DequantizeLinear"]) == (counts["QuantizeLinear"], counts["DequantizeLinear"]) != (0, 0)
    assert (prepared.network_flags, prepared.builder_flags, prepared.qdq_count) == (["STRONGLY_TYPED"], [], counts["QuantizeLinear"] + counts["DequantizeLinear"])
    model = prepared.graph.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    feeds = calibration(graph, count=1, seed=5)[0]
    for want, got in zip(_ort(graph.to_onnx(), feeds), _ort(model, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_int8_without_qdq_asks_for_the_quantize_pass():
    with pytest.raises(TargetError) as info:
        get_target("tensorrt{precision=int8}").prepare(block_graph())
    assert str(info.value) == (
        "target 'tensorrt{precision=int8}': the graph has no QuantizeLinear/DequantizeLinear nodes; TensorRT 10 builds "
        "int8 only from explicit Q/DQ (implicit calibration is gone): run the quantize pass first, e.g. pipeline "
        "'fuse,quantize{activations=int8}' with calibration data"
    )


def test_asymmetric_uint8_qdq_is_refused_naming_the_node():
    with pytest.raises(UnsupportedOpError) as info:
        get_target("tensorrt{precision=int8}").prepare(_quantized("uint8"))
    message = str(info.value)
    assert "QuantizeLinear uses uint8 zero point" in message
    assert message.endswith("TensorRT takes symmetric int8 Q/DQ only (run quantize{mode=static, dtype=int8, activations=int8})")


@pytest.mark.parametrize("precision, builder_flags", [("fp32", []), ("fp16", ["FP16"])])
def test_float_precisions_set_the_builder_flags_and_refuse_qdq_graphs(precision, builder_flags):
    prepared = get_target(f"tensorrt{{precision={precision}}}").prepare(block_graph())
    assert (prepared.network_flags, prepared.builder_flags, prepared.qdq_count) == ([], builder_flags, 0)
    with pytest.raises(TargetError, match=rf"precision={precision}\}}': the graph carries \d+ QuantizeLinear/DequantizeLinear node\(s\); build it with precision=int8"):
        get_target(f"tensorrt{{precision={precision}}}").prepare(_quantized("int8"))


def test_ops_tensorrt_cannot_parse_are_reported():
    graph = block_graph()
    weight_only = optimize(graph, "quantize{mode=weight-only}")
    dynamic = optimize(block_graph(), "quantize{mode=dynamic}")
    target = get_target("tensorrt")
    assert {n.qualified_op for n in target.unsupported_nodes(weight_only)} == {"com.microsoft::MatMulNBits"}
    assert {n.op_type for n in target.unsupported_nodes(dynamic)} == {"DynamicQuantizeLinear", "MatMulInteger"}
    assert target.unsupported_nodes(block_graph()) == []


# ----------------------------------------------------------------------------- engine key and build calls
def test_engine_key_changes_with_everything_the_engine_depends_on(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"graph one")
    profiles = {"x": ((1, 4), (8, 4), (32, 4))}
    base = ([str(model)], profiles, "fp16", 4.0, "10.9.0", "NVIDIA H100")
    key = engine_key(*base)
    assert engine_key(*base) == key and len(key) == 64
    variants = [
        (base[0], {"x": ((1, 4), (8, 4), (64, 4))}, *base[2:]),
        (*base[:2], "fp32", *base[3:]),
        (*base[:3], 8.0, *base[4:]),
        (*base[:4], "10.13.0", base[5]),
        (*base[:5], "NVIDIA A100"),
    ]
    assert len({engine_key(*v) for v in variants} | {key}) == 6
    model.write_bytes(b"graph two")
    assert engine_key(*base) != key


class _Recorder:
    """A stand-in for the parts of the tensorrt module `build_engine` calls, recording them."""

    def __init__(self, parse_ok: bool = True) -> None:
        self.calls: list[tuple] = []
        recorder = self

        class Network:
            pass

        class Config:
            def set_memory_pool_limit(self, pool, size):
                recorder.calls.append(("workspace", pool, size))

            def set_flag(self, flag):
                recorder.calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                recorder.calls.append(("profile", profile.shapes))

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (low, opt, high)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                recorder.calls.append(("network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                recorder.calls.append(("build",))
                return b"serialized"

        class Error:
            def node_name(self):
                return "/encoder/Softmax"

            def node(self):
                return 7

            def node_operator(self):
                return "Softmax"

            def desc(self):
                return "unsupported axis"

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                recorder.calls.append(("parse", path))
                return parse_ok

            def get_error(self, index):
                return Error()

        self.module = types.SimpleNamespace(
            __version__="10.9.0",
            Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
            Builder=Builder, OnnxParser=Parser,
            NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
            BuilderFlag=types.SimpleNamespace(FP16="FP16"),
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        )


@pytest.mark.parametrize("precision, qdq, network_flags, flags", [("fp32", 0, 0, []), ("fp16", 0, 0, [("flag", "FP16")]), ("int8", 4, 1 << 1, [])])
def test_build_engine_sets_network_flags_builder_flags_profile_and_workspace(precision, qdq, network_flags, flags):
    trt = _Recorder()
    profiles = {"ids": ((1, 1), (1, 128), (32, 512))}
    assert build_engine(trt.module, "/models/model.onnx", profiles, precision, qdq, 1.5) == b"serialized"
    assert trt.calls == [
        ("network", network_flags), ("parse", "/models/model.onnx"), ("workspace", "WORKSPACE", 3 << 29),
        *flags, ("profile", profiles), ("build",),
    ]


def test_build_engine_reports_parser_errors_with_the_node():
    with pytest.raises(TargetError) as info:
        build_engine(_Recorder(parse_ok=False).module, "/models/model.onnx", {}, "fp32", 0, 1.0)
    assert str(info.value) == "TensorRT's ONNX parser rejected /models/model.onnx: node /encoder/Softmax (Softmax): unsupported axis"
