"""The pass manager times, verifies, dumps and checks every pass, nested pipelines' passes included."""

import dataclasses

import numpy as np
import pytest

import graphopt
from graphopt import DType, Graph, Pass, PassResult, TensorType, register_pass
from graphopt.check import CheckError
from graphopt.pass_manager import PassManager, Pipeline
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


def test_fixed_point_pipeline_stops_when_nothing_changes(caplog):
    pipeline = Pipeline.of("countdown", [_Countdown(left=2)], max_iterations=10)
    report = PassManager([pipeline]).run(_graph())
    (record,) = report.records
    assert record.changed and record.stats == {"test-countdown.ticks": 3, "iterations": 3}
    assert [child.changed for child in record.children] == [True, True, False]
    assert "fixed point" not in caplog.text
    bounded = Pipeline.of("countdown", [_Countdown(left=50)], max_iterations=4)
    assert PassManager([bounded]).run(_graph()).records[0].stats["iterations"] == 4
    assert "countdown did not reach a fixed point in 4 iterations" in caplog.text


def _nested() -> Pipeline:
    """outer = [test-add-double-neg, inner = [test-add-double-neg, test-double-weights]]."""
    inner = Pipeline.of("inner", build_pipeline("test-add-double-neg,test-double-weights"))
    return Pipeline.of("outer", [*build_pipeline("test-add-double-neg"), inner])


def test_report_shows_nested_passes_by_path_and_indented():
    report = PassManager([_nested()]).run(_graph())
    assert [r.path for r in report.walk()] == [
        "outer", "outer/test-add-double-neg", "outer/inner", "outer/inner/test-add-double-neg", "outer/inner/test-double-weights",
    ]
    (outer,) = report.records
    assert (outer.nodes_before, outer.nodes_after) == (2, 6)
    assert outer.stats == {"test-add-double-neg.added": 2, "inner.test-add-double-neg.added": 2, "inner.test-double-weights.doubled": 1}
    lines = report.table().splitlines()
    assert lines[2].startswith("outer ") and lines[3].startswith("  test-add-double-neg ")
    assert lines[4].startswith("  inner ") and lines[6].startswith("    test-double-weights ")


def test_report_table_merges_the_rounds_of_a_fixed_point_pipeline():
    report = PassManager([Pipeline.of("countdown", [_Countdown(left=2)], max_iterations=10)]).run(_graph())
    assert len(list(report.walk())) == 4
    rows = report.table().splitlines()[2:]
    assert len(rows) == 2 and rows[1].startswith("  test-countdown (x3) ") and rows[1].endswith("ticks=3")


def test_check_mode_names_a_nested_pass_by_its_path():
    with pytest.raises(CheckError, match=r"pass 'outer/inner/test-double-weights' changed the outputs by .* first pass"):
        PassManager([_nested()], check=True).run(_graph())


def test_check_mode_runs_the_graph_only_after_passes_that_changed_it(monkeypatch):
    import graphopt.instruments as instruments

    runs = []
    real = instruments.run_graph
    monkeypatch.setattr(instruments, "run_graph", lambda graph, feeds: runs.append(len(graph)) or real(graph, feeds))
    pipeline = Pipeline.of("p", [*build_pipeline("test-add-double-neg"), _Countdown(left=0)], max_iterations=3)
    report = PassManager([pipeline], check=True).run(_graph())
    # the expected outputs, then once per run of test-add-double-neg (3 rounds); none after
    # test-countdown (unchanged) nor for the pipeline itself (its last nested pass measured it)
    assert runs == [2, 4, 6, 8]
    assert [r.max_error for r in report.walk()] == [0.0] * 7


def test_verify_each_names_a_nested_pass_by_its_path():
    pipeline = Pipeline.of("outer", build_pipeline("test-add-double-neg,test-break-uses"))
    with pytest.raises(graphopt.VerificationError, match="after pass 'outer/test-break-uses'"):
        PassManager([pipeline], verify_each=True).run(_graph())


def test_dump_ir_all_writes_nested_passes(tmp_path):
    PassManager([_nested()], dump_ir=["all"], dump_dir=str(tmp_path)).run(_graph())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"{index:02d}-{path}.{when}.txt"
        for index, path in enumerate(["outer", "outer.test-add-double-neg", "outer.inner", "outer.inner.test-add-double-neg", "outer.inner.test-double-weights"], 1)
        for when in ("before", "after")
    )
    assert (tmp_path / "04-outer.inner.test-add-double-neg.after.txt").read_text().count("Neg(") == 4


def test_dump_ir_by_name_dumps_every_run_of_a_nested_pass(tmp_path):
    PassManager([_nested()], dump_ir=["test-add-double-neg"], dump_dir=str(tmp_path)).run(_graph())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "02-outer.test-add-double-neg.after.txt", "02-outer.test-add-double-neg.before.txt",
        "04-outer.inner.test-add-double-neg.after.txt", "04-outer.inner.test-add-double-neg.before.txt",
    ]


def test_pipeline_checks_the_order_of_its_passes_and_provides_their_facts():
    @dataclasses.dataclass
    class Needs(Pass):
        """Test pass that needs "x"."""

        name = "test-needs-x"
        requires = ("x",)

    @dataclasses.dataclass
    class Gives(Pass):
        """Test pass that provides "x" and "y"."""

        name = "test-gives-x"
        provides = ("x", "y")

    with pytest.raises(graphopt.pass_base.PipelineError, match="inside pipeline 'p': pass 'test-needs-x' .* needs 'x', which 'test-gives-x' provides only after it"):
        Pipeline.of("p", [Needs(), Gives()])
    ordered = Pipeline.of("p", [Gives(), Needs()])
    assert (ordered.requires, ordered.provides) == ((), ("x", "y"))
    assert Pipeline.of("q", [Needs()]).requires == ("x",)


def test_optimize_never_modifies_the_input_file(tmp_path):
    path = tmp_path / "m.onnx"
    _graph().save_onnx(path)
    original = path.read_bytes()
    graph = graphopt.optimize(str(path), "test-add-double-neg", check=True, verify=True)
    assert path.read_bytes() == original
    assert len(graph) == 4
    assert graph.report.records[0].max_error == 0.0
