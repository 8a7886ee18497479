"""The pass manager times, verifies, dumps and checks every pass."""

import dataclasses

import numpy as np
import pytest

import graphopt
from graphopt import DType, Graph, Pass, PassResult, TensorType, register_pass
from graphopt.check import CheckError
from graphopt.pass_manager import PassManager, run_to_fixed_point
from graphopt.pipeline import build_pipeline


def _graph() -> Graph:
    graph = Graph("g", {"": 18})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4)))
    w = graph.add_constant("w", np.eye(4, dtype=np.float32) * 2)
    mm = graph.add_node("MatMul", [x, w], output_names=["h"])
    relu = graph.add_node("Relu", [mm.output], output_names=["y"])
    graph.set_outputs([relu.output])
    return graph


@register_pass
@dataclasses.dataclass
class _DoubleWeights(Pass):
    """Test pass that (wrongly, for a lossless pass) doubles every weight."""

    name = "test-double-weights"

    def run(self, graph, ctx):
        for value in graph.constants.values():
            value.const = graphopt.ir.ArrayTensor(value.const.numpy() * 2)
        return PassResult(True, {"doubled": len(graph.constants)})


@register_pass
@dataclasses.dataclass
class _AddNeg(Pass):
    """Test pass that appends Neg(Neg(y)) before the output: lossless, adds two nodes."""

    name = "test-add-double-neg"

    def run(self, graph, ctx):
        out = graph.outputs[0]
        first = graph.add_node("Neg", [out])
        second = graph.add_node("Neg", [first.output])
        graph.set_outputs([second.output])
        return PassResult(True, {"added": 2})


@register_pass
@dataclasses.dataclass
class _BreakUses(Pass):
    """Test pass that corrupts a use list."""

    name = "test-break-uses"

    def run(self, graph, ctx):
        graph.inputs[0]._uses.clear()
        return PassResult(True)


@register_pass
@dataclasses.dataclass
class _Countdown(Pass):
    """Test pass that changes the graph `left` more times."""

    name = "test-countdown"
    left: int = 3

    def run(self, graph, ctx):
        self.left -= 1
        return PassResult(self.left >= 0, {"ticks": 1})


def test_report_records_time_and_node_counts():
    graph = _graph()
    report = PassManager(build_pipeline("test-add-double-neg")).run(graph)
    (record,) = report.records
    assert (record.name, record.nodes_before, record.nodes_after, record.changed) == ("test-add-double-neg", 2, 4, True)
    assert record.seconds >= 0 and record.stats == {"added": 2}
    table = report.table()
    assert "test-add-double-neg" in table and "2 -> 4" in table and "added=2" in table


def test_check_mode_names_first_pass_that_changes_outputs():
    graph = _graph()
    manager = PassManager(build_pipeline("test-add-double-neg,test-double-weights,test-add-double-neg"), check=True)
    with pytest.raises(CheckError, match=r"pass 'test-double-weights' changed the outputs by .* it is the first pass to do so"):
        manager.run(graph)


def test_check_mode_records_zero_error_for_lossless_pass():
    report = PassManager(build_pipeline("test-add-double-neg"), check=True).run(_graph())
    assert report.records[0].max_error == 0.0


def test_verify_each_names_the_pass():
    with pytest.raises(graphopt.VerificationError, match="after pass 'test-break-uses'"):
        PassManager(build_pipeline("test-break-uses"), verify_each=True).run(_graph())


def test_dump_ir_writes_before_and_after(tmp_path):
    PassManager(build_pipeline("test-add-double-neg"), dump_ir=["test-add-double-neg"], dump_dir=str(tmp_path)).run(_graph())
    before = (tmp_path / "01-test-add-double-neg.before.txt").read_text()
    after = (tmp_path / "01-test-add-double-neg.after.txt").read_text()
    assert before.count("Neg(") == 0 and after.count("Neg(") == 2


def test_fixed_point_stops_when_nothing_changes(caplog):
    ctx = graphopt.PassContext()
    changed, stats = run_to_fixed_point(_graph(), [_Countdown(left=2)], ctx, max_iterations=10)
    assert changed and stats["iterations"] == 3 and stats["test-countdown.ticks"] == 3
    changed, stats = run_to_fixed_point(_graph(), [_Countdown(left=50)], ctx, max_iterations=4)
    assert stats["iterations"] == 4
    assert "did not reach a fixed point in 4 iterations" in caplog.text


def test_optimize_never_modifies_the_input_file(tmp_path):
    path = tmp_path / "m.onnx"
    _graph().save_onnx(path)
    original = path.read_bytes()
    graph = graphopt.optimize(str(path), "test-add-double-neg", check=True, verify=True)
    assert path.read_bytes() == original
    assert len(graph) == 4
    assert graph.metadata["pipeline_report"].records[0].max_error == 0.0
