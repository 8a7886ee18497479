"""The Python entry points: `graphopt.optimize(...)`."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.pass_base import Pass, PassContext
from graphopt.pass_manager import PassManager, PipelineReport
from graphopt.pipeline import PipelineLike, build_pipeline


def load_graph(model: Any) -> Graph:
    """A Graph from a Graph (returned as is), a path or an onnx.ModelProto."""
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto":
        from graphopt.frontends.onnx_import import from_onnx

        return from_onnx(model)
    raise GraphoptError(f"expected a Graph, an .onnx path or an onnx.ModelProto, got {type(model).__name__}")


def optimize(
    model: Any,
    pipeline: Union[PipelineLike, Sequence[Pass]] = "cleanup",
    *,
    check: bool = False,
    check_inputs: Optional[dict[str, Any]] = None,
    verify: bool = False,
    dump_ir: Sequence[str] = (),
    dump_dir: Optional[str] = None,
    calibration: Optional[list[dict[str, Any]]] = None,
    target: Any = None,
    seed: int = 0,
) -> Graph:
    """Run `pipeline` over `model` (a Graph, an .onnx path or a ModelProto); return the Graph.

    A Graph argument is optimized in place; files and ModelProtos are never modified. The
    pipeline is validated before anything runs. `check=True` compares outputs after every
    pass (see `PassManager`); `verify=True` verifies the IR after every pass. The per-pass
    report is in `graph.metadata["pipeline_report"]`.
    """
    passes = build_pipeline(pipeline)
    graph = load_graph(model)
    manager = PassManager(passes, verify_each=verify, dump_ir=dump_ir, dump_dir=dump_dir, check=check, check_inputs=check_inputs)
    report: PipelineReport = manager.run(graph, PassContext(calibration=calibration, target=target, seed=seed))
    graph.metadata["pipeline_report"] = report
    return graph
