"""Every target's lowering: a pipeline of registered passes that leaves a lowered graph as it is."""

from __future__ import annotations

import pytest

import graphopt
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.pass_manager import PassManager
from graphopt.target_registry import get_target


@pytest.mark.parametrize("spec", ["onnxruntime:cpu", "onnxruntime:cuda", "onnxruntime{contrib_ops=False}", "tvm:llvm", "tensorrt"])
def test_a_lowered_graph_is_left_unchanged_by_a_second_lowering(spec, zoo_onnx):
    passes = get_target(spec).lowering()
    assert passes, f"{spec} has no lowering"
    graph = graphopt.optimize(str(zoo_onnx("bert")), "fuse")
    first = PassManager(passes).run(graph)
    assert any(r.changed for r in first.records) or spec.startswith("tvm"), f"{spec}: the lowering did nothing to a fused BERT"
    if not spec.startswith("tvm"):
        assert not any(n.domain == GRAPHOPT_DOMAIN for n in graph.nodes)
    printed = str(graph)
    again = PassManager(passes).run(graph)
    assert [r.name for r in again.records if r.changed] == []
    assert str(graph) == printed
