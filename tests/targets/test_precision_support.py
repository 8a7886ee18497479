"""bf16, fp16, int4 and int8 graphs on every target: each compiles and runs within a stated bound
of the float32 graph, or is refused at compile time by a message naming the op and the dtype.

The tiny BERT of the zoo, optimized by each pipeline, on torch, onnxruntime:cpu and tvm:llvm
(compiled and run) and tensorrt (`unsupported_nodes` only: TensorRT is not installed here).
What each target does with each pipeline is pinned in `EXPECTED`, so a target that starts
refusing what it ran, or running what it refused, fails here.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from conftest import numpy_inputs

import graphopt
from graphopt.api import compile, optimize
from graphopt.check import run_graph
from graphopt.errors import UnsupportedOpError
from graphopt.target_registry import get_target


@dataclasses.dataclass(frozen=True)
class Bound:
    """How far a target's output may be from the float32 graph's: cosine similarity at least
    `cosine`, and max |got - expected| at most `relative` times max |expected|."""

    cosine: float
    relative: float


BF16, FP16 = "fuse,to-bf16", "fuse,to-fp16"
INT4 = "cleanup,quantize{mode=weight-only,dtype=int4}"
"""cleanup first: the raw export computes its mask's Expand shape from tensor data, which the
tvm target refuses (naming the Expand) whatever the precision."""
INT8 = "fuse,quantize{mode=dynamic}"

BOUNDS = {
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per op): measured on torch,
    # cosine 0.999997, max error 0.4% of the largest output
    BF16: Bound(cosine=0.999, relative=2e-2),
    # float16's 11 bits: measured cosine 1 - 1e-7, 0.04%
    FP16: Bound(cosine=0.9999, relative=2e-3),
    # 4-bit weights in blocks of 32 (one scale each), activations float32: measured cosine
    # 0.999998, 0.2-0.3%
    INT4: Bound(cosine=0.999, relative=2e-2),
    # int8 weights per column and int8 activations per tensor: measured cosine 1 - 1e-7, 0.03%
    INT8: Bound(cosine=0.9999, relative=2e-3),
}

RUNS = "runs"
EXPECTED = {
    "torch": {BF16: RUNS, FP16: RUNS, INT4: RUNS, INT8: RUNS},
    # ORT 1.32's CPU provider has bfloat16 kernels for data movement (Gather, Reshape, Cast)
    # but none for Add, MatMul or Where; float16 nodes without a kernel run in float32
    "onnxruntime:cpu": {BF16: "bfloat16", FP16: RUNS, INT4: RUNS, INT8: RUNS},
    # the Relax translation takes no bfloat16 tensors
    "tvm:llvm": {BF16: "bfloat16", FP16: RUNS, INT4: RUNS, INT8: RUNS},
}
"""Per target and pipeline: RUNS (within BOUNDS), or the dtype the refusal must name."""


@pytest.fixture(scope="module")
def bert(zoo, zoo_onnx):
    path = zoo_onnx("bert")
    feeds = numpy_inputs(zoo("bert"))
    return path, feeds, run_graph(graphopt.from_onnx(path), feeds)


def _assert_within(expected: list[np.ndarray], got: list[np.ndarray], bound: Bound, what: str) -> None:
    for want, have in zip(expected, got, strict=True):
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        cosine = float((want * have).sum() / (np.linalg.norm(want) * np.linalg.norm(have)))
        relative = float(np.abs(want - have).max() / np.abs(want).max())
        assert cosine >= bound.cosine and relative <= bound.relative, f"{what}: cosine {cosine:.7f}, max relative error {relative:.2e}, bound {bound}"


@pytest.mark.parametrize("pipeline", list(BOUNDS))
@pytest.mark.parametrize("spec", list(EXPECTED))
def test_a_low_precision_graph_runs_within_its_bound_or_is_refused_naming_op_and_dtype(bert, spec, pipeline):
    missing = get_target(spec).available()
    if missing:
        pytest.skip(missing)
    path, feeds, expected = bert
    outcome = EXPECTED[spec][pipeline]
    if outcome != RUNS:
        with pytest.raises(UnsupportedOpError) as info:
            compile(str(path), spec, pipeline, calibration_data=[feeds])
        message = str(info.value)
        assert message.startswith(f"target '{spec}' cannot run ")
        assert re.search(rf"\b(Add|MatMul|Where|Gather)\({outcome}\b", message), message
        assert "use target 'torch'" in message and "to-bf16" in message
        return
    compiled = compile(str(path), spec, pipeline, calibration_data=[feeds])
    got = compiled(**{name: feeds[name] for name in compiled.input_names})
    _assert_within(expected, got, BOUNDS[pipeline], f"{spec}, {pipeline}")


def test_onnxruntime_runs_the_bfloat16_nodes_it_has_no_kernel_for_in_torch_when_partitioned(bert):
    path, feeds, expected = bert
    compiled = compile(str(path), "onnxruntime:cpu", BF16, partition=True)
    assert compiled.report.summary().startswith("onnxruntime cannot run 19 node(s) (op Add, MatMul, Where, graphopt::Attention, graphopt::Gelu, graphopt::SkipLayerNorm)")
    _assert_within(expected, compiled(**feeds), BOUNDS[BF16], "onnxruntime:cpu + torch")


@pytest.mark.parametrize("pipeline, refused", [
    (BF16, set()),
    (FP16, set()),
    (INT4, {"com.microsoft::MatMulNBits"}),
    (INT8, {"DynamicQuantizeLinear", "MatMulInteger"}),
])
def test_tensorrt_keeps_bf16_and_fp16_graphs_and_names_the_quantized_ops_it_cannot_parse(bert, pipeline, refused):
    path, feeds, _ = bert
    graph = optimize(str(path), pipeline, calibration_data=[feeds])
    assert {n.qualified_op for n in get_target("tensorrt").unsupported_nodes(graph)} == refused


def test_tensorrt_refuses_float64_and_int4_outside_qdq_naming_op_and_dtype():
    from graphopt import DType, Graph, TensorType
    from graphopt.api import check_supported

    graph = Graph("types", {"": 21})
    x = graph.add_input("x", TensorType(DType.DOUBLE, ("n", 8)))
    packed = graph.add_constant("w", np.arange(-4, 4, dtype=np.int8).astype(DType.INT4.to_numpy()))
    wide = graph.add_node("Cast", [packed], {"to": int(DType.DOUBLE)}, name="widen").output
    quantized = graph.add_node("DequantizeLinear", [packed, graph.add_constant("s", np.float32(0.5))], name="dq").output
    graph.set_outputs([graph.add_node("Add", [x, wide], name="sum").output, quantized])
    target = get_target("tensorrt")
    assert [n.name for n in target.unsupported_nodes(graph)] == ["widen", "sum"]
    with pytest.raises(UnsupportedOpError) as info:
        check_supported(target, graph)
    message = str(info.value)
    assert "TensorRT takes no int4, float64 tensors in these nodes" in message
    assert "Cast(int4) -> float64, Add(float64, float64) -> float64" in message


def test_onnxruntime_probes_each_signature_once(bert, monkeypatch):
    from graphopt.targets import onnxruntime_kernels

    path, feeds, _ = bert
    graph = optimize(str(path), BF16)
    probes = []
    real = onnxruntime_kernels._probe
    monkeypatch.setattr(onnxruntime_kernels, "_VERDICTS", {})
    monkeypatch.setattr(onnxruntime_kernels, "_probe", lambda node, *rest: probes.append(node) or real(node, *rest))
    target = get_target("onnxruntime:cpu")
    first = target.unsupported_nodes(graph)
    count = len(probes)
    assert 0 < count < len(graph.nodes)  # the two layers share their signatures
    assert target.unsupported_nodes(graph) == first
    assert len(probes) == count
