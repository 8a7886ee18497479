"""Limits: constant folding within its memory cap, bounded fixed-point loops, bounded samples.

- fold-constants evaluates a node only when each output's size is known beforehand and
  within `max_elements`: a ConstantOfShape whose shape only ONNX Runtime would compute (4 TiB
  here) is never run, and what can be folded around it still is;
- a model declaring huge shapes goes through `cleanup` untouched by allocation, and
  `--check` refuses sample inputs past `MAX_SAMPLE_BYTES` with a one-line error;
- `cleanup` and `simplify-shapes` stop after their bound with a warning naming them;
- a large graph written in reverse order with unnamed nodes loads without hanging.
"""

from __future__ import annotations

import logging
import resource

import numpy as np
import pytest

import graphopt
from graphopt import DType, Graph, PassContext, TensorType
from graphopt.check import max_abs_error, run_graph, sample_inputs
from graphopt.cli import main
from graphopt.registry import get_pass

TIB = 2**40


def _hidden_huge_fill(side: int) -> Graph:
    """y = x + ConstantOfShape(Max(s, t)): the fill's shape is known only after Max runs."""
    graph = Graph("hostile", {"": 18})
    x = graph.add_input("x", TensorType(DType.FLOAT, (1,)))
    shape = graph.add_node("Max", [graph.add_constant("s", np.array([side, side], np.int64)),
                                   graph.add_constant("t", np.array([1, 1], np.int64))], output_names=["shape"])
    fill = graph.add_node("ConstantOfShape", [shape.output], output_names=["fill"])
    graph.set_outputs([graph.add_node("Add", [x, fill.output], output_names=["y"]).output])
    return graph


def test_fold_constants_never_evaluates_an_output_of_unknown_size(caplog):
    graph = _hidden_huge_fill(2**20)
    assert graph.find_value("fill").type.numel() is None
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        result = get_pass("fold-constants")().run(graph, PassContext())
    assert result.stats["evaluated"] == 1
    assert graph.op_counts() == {"ConstantOfShape": 1, "Add": 1}
    assert graph.constants["shape"].const.numpy().tolist() == [2**20, 2**20]
    assert caplog.records == []
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) * 1024 < 256 * 2**20


def test_fold_constants_respects_max_elements_on_known_sizes():
    graph = _hidden_huge_fill(64)
    cleanup = get_pass("cleanup")()
    cleanup.run(graph, PassContext())
    assert graph.op_counts() == {"Add": 1}
    small_cap = _hidden_huge_fill(64)
    get_pass("fold-constants").from_options({"max_elements": 64 * 64 - 1}).run(small_cap, PassContext())
    assert small_cap.op_counts() == {"ConstantOfShape": 1, "Add": 1}


def _huge_shape_model(path, side: int = 2**40):
    import onnx
    from onnx import helper

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["n", side])],
                              [helper.make_tensor_value_info("y", 1, ["n", side])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_huge_declared_shapes_optimize_without_allocating(tmp_path, capsys):
    model = _huge_shape_model(tmp_path / "huge.onnx")
    assert main(["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "-p", "cleanup", "-q"]) == 0
    assert graphopt.from_onnx(tmp_path / "out.onnx").op_counts() == {"Relu": 1}
    assert main(["inspect", str(model), "--dim", "n=1000000"]) == 0
    assert "FLOPs: 1,099,511,627,776,000,000" in capsys.readouterr().out


def test_check_refuses_sample_inputs_past_the_cap(tmp_path, capsys):
    model = _huge_shape_model(tmp_path / "huge.onnx")
    status = main(["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "-p", "cleanup", "--check"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip() == (
        "graphopt: error: sample inputs would take more than 1024 MiB (input %x is f32[2, 1099511627776]); "
        "give smaller symbolic sizes (e.g. --dim seq=128) or inputs explicitly"
    )
    assert not (tmp_path / "out.onnx").exists()


def _transpose_pair() -> Graph:
    graph = Graph("pair", {"": 18})
    x = graph.add_input("x", TensorType(DType.FLOAT, (2, 3, 4)))
    inner = graph.add_node("Transpose", [x], {"perm": (1, 0, 2)})
    neg = graph.add_node("Neg", [graph.add_node("Transpose", [inner.output], {"perm": (0, 2, 1)}).output])
    graph.set_outputs([neg.output])
    return graph


@pytest.mark.parametrize("sweeps, warned", [(1, True), (16, False)])
def test_simplify_shapes_stops_after_its_sweep_bound_with_a_warning(monkeypatch, caplog, sweeps, warned):
    from graphopt.passes import simplify_shapes

    monkeypatch.setattr(simplify_shapes, "MAX_SWEEPS", sweeps)
    graph = _transpose_pair()
    feeds = sample_inputs(graph)
    expected = run_graph(graph, feeds)
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        result = get_pass("simplify-shapes")().run(graph, PassContext())
    assert result.changed and graph.op_counts() == {"Transpose": 1, "Neg": 1}
    graph.verify()
    assert max_abs_error(expected, run_graph(graph, feeds)) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert messages == (["graphopt: simplify-shapes still rewriting after 1 sweeps; stopping"] if warned else [])


def test_cleanup_stops_after_max_iterations_with_a_warning(caplog):
    graph = _transpose_pair()
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        result = get_pass("cleanup").from_options({"max_iterations": 1}).run(graph, PassContext())
    assert result.stats["iterations"] == 1
    assert [r.getMessage() for r in caplog.records] == [
        "graphopt: cleanup did not reach a fixed point in 1 iterations; stopping"
    ]
    graph.verify()


def test_a_large_unsorted_unnamed_graph_loads_without_hanging():
    """20,000 unnamed nodes written in reverse order: the importer's sort and node naming are
    linear (before, both were quadratic: several minutes here). The bound only guards
    against a hang; it is not a speed figure."""
    import time

    from onnx import helper

    count = 20_000
    nodes = [helper.make_node("Neg", [f"v{i}" if i else "x"], [f"v{i + 1}"]) for i in range(count)]
    graph = helper.make_graph(list(reversed(nodes)), "chain", [helper.make_tensor_value_info("x", 1, [2])],
                              [helper.make_tensor_value_info(f"v{count}", 1, [2])])
    start = time.perf_counter()
    loaded = graphopt.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert time.perf_counter() - start < 60
    assert [node.inputs[0].name for node in loaded.nodes[:2]] == ["x", "v1"]
    assert loaded.nodes[-1].name == f"Neg_{count - 1}"
