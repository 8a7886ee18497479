"""Splitting a graph between a target and torch (`graphopt.partition`): equal outputs, regions
that never form a cycle, trivial pieces moved to torch, the report, and the torch.compile
backend and `graphopt.compile` options that use it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from fuzz_graphs import random_graphs
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import graphopt
import model_zoo
from conftest import max_abs_diff
from graphopt.errors import UnsupportedOpError
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph
from graphopt.ir.types import TensorType
from graphopt.partition import PartitionError, compile_partitioned, split
from graphopt.target_base import TargetError
from graphopt.target_registry import get_target
from graphopt.targets.onnxruntime import OnnxRuntimeTarget

ORT = "onnxruntime:cpu{threads=1}"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _declare_unsupported(monkeypatch, *ops: str) -> None:
    """Make the onnxruntime target report every node of `ops` as one it cannot run."""
    monkeypatch.setattr(OnnxRuntimeTarget, "unsupported_nodes", lambda self, graph: [n for n in graph.nodes if n.op_type in ops])


def _diamond() -> Graph:
    """x -> MatMul -> {Softmax, Relu} -> Add -> Tanh, with Softmax listed before Relu."""
    graph = Graph("diamond", opset_imports={"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4)))
    w = graph.add_constant("w", np.arange(16, dtype=np.float32).reshape(4, 4) / 10)
    a = graph.add_node("MatMul", [x, w]).output
    b = graph.add_node("Softmax", [a], {"axis": -1}).output
    c = graph.add_node("Relu", [a]).output
    graph.set_outputs([graph.add_node("Tanh", [graph.add_node("Add", [b, c]).output]).output])
    return graph


def _assert_runs_in_order(graph: Graph, regions) -> None:
    """Every region reads only graph inputs, constants and outputs of earlier regions."""
    defined = {v.name for v in graph.inputs}
    for region in regions:
        assert set(region.input_names) <= defined, f"{region.graph.name} reads a value a later region makes"
        defined |= set(region.output_names)
    assert {v.name for v in graph.outputs} <= defined | set(graph.constants)


def _reference(graph: Graph, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in graph.to_fx()(torch.from_numpy(x))]


def test_one_unsupported_op_runs_in_torch_and_outputs_match():
    graph = _diamond()
    softmax = [n for n in graph.nodes if n.op_type == "Softmax"]
    model = compile_partitioned(graph, get_target(ORT), softmax)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert max_abs_diff(_reference(graph, x), model(x)) <= 1e-5
    assert max_abs_diff(_reference(graph, x), [o.numpy() for o in model(torch.from_numpy(x))]) <= 1e-5
    report = model.report
    assert (report.target_regions, report.torch_regions, report.target_nodes, report.torch_nodes) == (2, 1, 4, 1)
    assert report.unsupported_ops == {"Softmax": 1} and report.torch_ops == {"Softmax": 1}
    assert report.summary().startswith("onnxruntime cannot run 1 node(s) (op Softmax); they run in torch")


def test_regions_never_form_a_cycle_around_an_unsupported_branch():
    graph = _diamond()
    regions = split(graph, [n for n in graph.nodes if n.op_type == "Softmax"])
    # One target region {MatMul, Relu, Add, Tanh} would need Softmax's output before it ran.
    assert [(r.on_target, [n.op_type for n in r.graph.nodes]) for r in regions] == [
        (True, ["MatMul", "Relu"]), (False, ["Softmax"]), (True, ["Add", "Tanh"]),
    ]
    _assert_runs_in_order(graph, regions)
    assert regions[0].output_names == ["MatMul_0_out0", "Relu_0_out0"]
    assert regions[2].input_names == ["Softmax_0_out0", "Relu_0_out0"]


def test_regions_share_the_weights_and_keep_names():
    graph = _diamond()
    first = split(graph, [n for n in graph.nodes if n.op_type == "Softmax"])[0].graph
    assert first.constants["w"].const is graph.constants["w"].const
    assert [n.name for n in first.nodes] == ["MatMul_0", "Relu_0"]
    assert first.inputs[0].type == graph.inputs[0].type
    first.verify()


def test_shape_only_target_regions_go_to_torch():
    graph = Graph("chain", opset_imports={"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, (2, 6)))
    y = graph.add_node("Softmax", [graph.add_node("Relu", [x]).output], {"axis": -1}).output
    shape = graph.add_constant("shape", np.array([3, 4], dtype=np.int64))
    z = graph.add_node("Softmax", [graph.add_node("Reshape", [y, shape]).output], {"axis": -1}).output
    graph.set_outputs([graph.add_node("Tanh", [z]).output])
    model = compile_partitioned(graph, get_target(ORT), [n for n in graph.nodes if n.op_type == "Softmax"])
    assert [(r.on_target, len(r.graph)) for r in model.regions] == [(True, 1), (False, 3), (True, 1)]
    assert model.report.torch_ops == {"Reshape": 1, "Softmax": 2}
    x_value = np.random.default_rng(1).standard_normal((2, 6)).astype(np.float32)
    assert max_abs_diff(_reference(graph, x_value), model(x_value)) <= 1e-5


@settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_graphs(), data=st.data())
def test_random_splits_run_in_order_and_match_torch(graph: Graph, data) -> None:
    unsupported = [n for n in graph.nodes if data.draw(st.booleans())]
    note(f"graph:\n{graph}\nunsupported: {[n.name for n in unsupported]}")
    regions = split(graph, unsupported)
    _assert_runs_in_order(graph, regions)
    target_nodes = {n.name for r in regions if r.on_target for n in r.graph.nodes}
    assert not target_nodes & {n.name for n in unsupported}
    model = compile_partitioned(graph, get_target(ORT), unsupported)
    feeds = {v.name: np.random.default_rng(2).standard_normal(v.shape).astype(np.float32) for v in graph.inputs}
    with torch.no_grad():
        expected = graph.to_fx()(*[torch.from_numpy(a) for a in feeds.values()])
    assert max_abs_diff(expected, model(**feeds)) <= 1e-5


def test_nodes_the_graph_does_not_hold_cannot_be_split():
    graph = _diamond()
    foreign = _diamond().clone()
    foreign_node = foreign.add_node("Neg", [foreign.inputs[0]], name="decomposed_gelu")
    with pytest.raises(PartitionError, match=r"names node\(s\) that are not in the graph \('decomposed_gelu' \(Neg\)"):
        compile_partitioned(graph, get_target(ORT), [foreign_node])


def test_a_split_model_refuses_to_be_saved(tmp_path):
    graph = _diamond()
    model = compile_partitioned(graph, get_target(ORT), [n for n in graph.nodes if n.op_type == "Softmax"])
    with pytest.raises(TargetError, match="split between onnxruntime and torch cannot be saved"):
        model.save(tmp_path / "out")


def test_compile_partitions_only_when_asked(monkeypatch):
    _declare_unsupported(monkeypatch, "Softmax")
    graph = _diamond()
    with pytest.raises(UnsupportedOpError, match=r"cannot run 1 node\(s\): Softmax"):
        graphopt.compile(graph, ORT, "cleanup")
    model = graphopt.compile(graph, ORT, "cleanup", partition=True)
    x = np.ones((2, 4), dtype=np.float32)
    assert model.report.torch_ops == {"Softmax": 1}
    assert max_abs_diff(_reference(graph, x), model(x)) <= 1e-5


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_backend_runs_unsupported_ops_in_torch(monkeypatch, caplog):
    _declare_unsupported(monkeypatch, "Gelu")
    zm = model_zoo.build("bert")
    compiled = torch.compile(zm.model, backend="graphopt", options={"target": ORT, "fallback": False})
    with caplog.at_level(logging.WARNING, logger="graphopt"), torch.no_grad():
        expected = zm.model(*zm.inputs.values())
        for _ in range(2):
            assert max_abs_diff(expected, compiled(*zm.inputs.values())) <= 1e-4
    (line,) = _warnings(caplog, "they run in torch")
    assert line.startswith("graphopt: onnxruntime cannot run 2 node(s) (op graphopt::Gelu); they run in torch")


def test_backend_without_partition_falls_back_as_before(monkeypatch, caplog):
    _declare_unsupported(monkeypatch, "Gelu")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    compiled = torch.compile(model, backend="graphopt", options={"target": ORT, "partition": False})
    with caplog.at_level(logging.WARNING, logger="graphopt"), torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    (line,) = _warnings(caplog, "running this graph unoptimized")
    assert "UnsupportedOpError" in line and "graphopt::Gelu" in line
    assert not _warnings(caplog, "they run in torch")
    torch._dynamo.reset()
    strict = torch.compile(model, backend="graphopt", options={"target": ORT, "partition": False, "fallback": False})
    with pytest.raises(UnsupportedOpError, match="cannot run 1 node"), torch.no_grad():
        strict(x)


def test_backend_partition_option_must_be_a_bool():
    compiled = torch.compile(torch.nn.Linear(2, 2), backend="graphopt", options={"target": ORT, "partition": "yes"})
    with pytest.raises(Exception, match="option 'partition' must be True or False, got 'yes'"):
        compiled(torch.randn(1, 2))
