"""cleanup: the simplification passes to a fixed point, on small graphs and the model zoo."""

import model_zoo
import numpy as np
import onnx
import pytest
from conftest import ROUNDTRIP_ARCHITECTURES, numpy_inputs

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import max_abs_error, run_graph
from graphopt.pass_base import PassContext

F32 = DType.FLOAT
TOLERANCE = 1e-5
DYNAMO_ARCHITECTURES = ("bert", "gpt2", "llama", "vit")


def _cleanup() -> graphopt.Pass:
    return graphopt.get_pass("cleanup")()


def _small_graph() -> Graph:
    """Duplicate Constant weights, an Identity shape round trip and a no-op Reshape."""
    graph = Graph("small")
    x = graph.add_input("x", TensorType(F32, ("batch", 8)))
    weight = graph.add_node("Constant", [], {"value_floats": (0.5,) * 8}, output_names=["w"])
    twice = graph.add_node("Constant", [], {"value_floats": (0.5,) * 8}, output_names=["w2"])
    shape = graph.add_node("Shape", [x], output_names=["shape"])
    target = graph.add_node("Identity", [shape.output], output_names=["target"])
    scaled = graph.add_node("Mul", [x, weight.output], output_names=["scaled"])
    again = graph.add_node("Mul", [x, twice.output], output_names=["again"])
    total = graph.add_node("Add", [scaled.output, again.output], output_names=["total"])
    same = graph.add_node("Reshape", [total.output, target.output], output_names=["same"])
    graph.set_outputs([graph.add_node("Identity", [same.output], output_names=["y"]).output])
    return graph


def test_cleanup_runs_the_passes_to_a_fixed_point():
    graph = _small_graph()
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    expected = run_graph(graph, feeds)

    result = _cleanup().run(graph, PassContext())

    graph.verify()
    np.testing.assert_array_equal(run_graph(graph, feeds)[0], expected[0])
    assert result.changed and result.stats["iterations"] == 2
    assert str(graph) == (
        "graph small (\n"
        "  %x: f32[batch, 8]\n"
        ") {\n"
        "  %w: f32[8] = const [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]\n"
        "  %scaled: f32[batch, 8] = Mul(%x, %w)\n"
        "  %y: f32[batch, 8] = Add(%scaled, %scaled)\n"
        "  return %y\n"
        "}\n"
    )
    assert not _cleanup().run(graph, PassContext()).changed


def test_cleanup_is_a_pipeline_whose_passes_are_checked_and_reported():
    graph = graphopt.optimize(_small_graph(), "cleanup", check=True, verify=True)
    (record,) = graph.report.records
    steps = [
        "cleanup/fold-constants", "cleanup/simplify-shapes", "cleanup/eliminate-noops",
        "cleanup/eliminate-common-subexpressions", "cleanup/eliminate-dead-code", "cleanup/cleanup-subgraphs",
    ]
    # the last change is eliminate-dead-code's in round 1: round 2 stops once every pass has
    # seen the graph since, so cleanup-subgraphs does not run twice over an unchanged graph
    assert [child.path for child in record.children] == steps + steps[:5]
    assert [child.changed for child in record.children][4:] == [True] + [False] * 6
    assert [child.max_error for child in record.children] == [0.0] * 11 and record.max_error == 0.0
    assert record.stats["iterations"] == 2 and (record.nodes_before, record.nodes_after) == (9, len(graph)) == (9, 2)
    once = graphopt.optimize(_small_graph(), "cleanup{max_iterations=1}")
    assert once.report.records[0].stats["iterations"] == 1 and len(once.report.records[0].children) == 6


def _check_zoo_model(name: str, path) -> tuple[int, int]:
    """Cleanup the exported model; check it and return the node counts before and after."""
    original = graphopt.from_onnx(path)
    graph = graphopt.from_onnx(path)
    before = len(graph)
    assert _cleanup().run(graph, PassContext()).changed
    graph.verify()
    onnx.checker.check_model(graph.to_onnx(), full_check=True)
    for zm in (model_zoo.build(name), model_zoo.build(name, batch=3, seq=5)):
        feeds = numpy_inputs(zm)
        assert max_abs_error(run_graph(original, feeds), run_graph(graph, feeds)) <= TOLERANCE
    twin = graphopt.from_onnx(path)
    _cleanup().run(twin, PassContext())
    assert twin.to_onnx().SerializeToString() == graph.to_onnx().SerializeToString()
    return before, len(graph)


@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_cleanup_shrinks_torchscript_exports_and_keeps_them_exact(name, zoo_onnx):
    before, after = _check_zoo_model(name, zoo_onnx(name))
    assert after < before


@pytest.mark.slow
@pytest.mark.parametrize("name", DYNAMO_ARCHITECTURES)
def test_cleanup_shrinks_dynamo_exports_and_keeps_them_exact(name, zoo_onnx):
    before, after = _check_zoo_model(name, zoo_onnx(name, dynamo=True))
    assert after < before
