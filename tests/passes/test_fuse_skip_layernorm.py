"""fuse-skip-layernorm: residual Add (+ bias Add) + LayerNorm / RMSNorm -> graphopt::SkipLayerNorm."""

import numpy as np
import pytest

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import max_abs_error, run_graph

HIDDEN = 8


def _graph(norm: str, *, bias: bool, sum_read: bool, skip_shape=("batch", "seq", HIDDEN)) -> Graph:
    graph = Graph("skip", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", "seq", HIDDEN)))
    skip = graph.add_input("skip", TensorType(DType.FLOAT, skip_shape))
    rng = np.random.default_rng(0)

    def const(shape):
        return graph.add_constant(graph.unique_name("c"), rng.standard_normal(shape).astype(np.float32))

    projected = graph.add_node("MatMul", [x, const((HIDDEN, HIDDEN))]).output
    if bias:
        projected = graph.add_node("Add", [const(HIDDEN), projected]).output
    total = graph.add_node("Add", [skip, projected], output_names=["residual"]).output
    if norm == "layernorm":
        y = graph.add_node("LayerNormalization", [total, const(HIDDEN), const(HIDDEN)], {"axis": -1, "epsilon": 1e-5}).output
    else:
        y = graph.add_node("RMSNorm", [total, const(HIDDEN)], {"axis": -1, "epsilon": 1e-6}, domain="graphopt").output
    outputs = [graph.add_node("Relu", [y], output_names=["y"]).output]
    if sum_read:
        outputs.append(graph.add_node("Add", [total, y], output_names=["next"]).output)
    graph.set_outputs(outputs)
    return graph


NORMS = "canonicalize,fuse-layernorm,fuse-rmsnorm,"
"""fuse-skip-layernorm requires "layernorm-fused" and "rmsnorm-fused"; the graphs hold the
norm ops already, so these find nothing to raise."""


def _stats(graph: Graph, name: str) -> dict:
    return next(record.stats for record in graph.report.records if record.name == name)


def _feeds(graph):
    rng = np.random.default_rng(1)
    return {v.name: rng.standard_normal([2 if d == "batch" else 5 if d == "seq" else d for d in v.shape]).astype(np.float32) for v in graph.inputs}


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("bias,sum_read", [(True, True), (False, False)])
def test_residual_add_is_folded_into_the_norm(norm, bias, sum_read):
    graph = _graph(norm, bias=bias, sum_read=sum_read)
    fused = graphopt.optimize(graph.clone(), NORMS + "fuse-skip-layernorm", verify=True)
    assert _stats(fused, "fuse-skip-layernorm") == {"fused": 1}
    (node,) = [n for n in fused.nodes if n.op_type == "SkipLayerNorm"]
    assert node.attrs["simplified"] == (norm == "rmsnorm")
    assert len(node.outputs) == (2 if sum_read else 1)
    assert (len(node.inputs) > 4 and node.inputs[4] is not None) == bias
    assert "LayerNormalization" not in fused.op_counts() and "graphopt::RMSNorm" not in fused.op_counts()
    if sum_read:
        assert node.outputs[1].name == "residual"
    feeds = _feeds(graph)
    expected = run_graph(graph, feeds)
    assert max_abs_error(expected, run_graph(fused, feeds)) <= 1e-5
    assert max_abs_error(expected, run_graph(fused, feeds, engine="torch")) <= 1e-5


def test_a_broadcast_residual_is_left_alone():
    graph = _graph("layernorm", bias=False, sum_read=False, skip_shape=(1, "seq", HIDDEN))
    fused = graphopt.optimize(graph.clone(), NORMS + "fuse-skip-layernorm", verify=True)
    assert "graphopt::SkipLayerNorm" not in fused.op_counts()


def test_running_it_without_the_norm_fusions_is_refused_before_anything_runs():
    with pytest.raises(graphopt.PipelineError, match="needs 'layernorm-fused'"):
        graphopt.optimize(_graph("layernorm", bias=False, sum_read=False), "fuse-skip-layernorm")
