"""The Python entry points: `graphopt.optimize(...)`, `graphopt.compile(...)`, `graphopt.load_compiled(...)`."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Iterable, Optional, Sequence, Union

from graphopt.errors import GraphoptError, UnsupportedOpError
from graphopt.ir.graph import Graph
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.pass_manager import PassManager, Pipeline
from graphopt.pipeline import PipelineLike, build_pipeline
from graphopt.target_base import CompiledModel, TargetError


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
    calibration_data: "Optional[Iterable[Any] | str | os.PathLike[str]]" = None,
    seed: int = 0,
    distributed: Any = False,
) -> Graph:
    """Run `pipeline` over `model` (a Graph, an .onnx path or a ModelProto); return the Graph.

    A Graph argument is optimized in place; files and ModelProtos are never modified. The
    pipeline is validated before anything runs. `check=True` compares outputs after every
    pass, nested ones included (see `PassManager`); `verify=True` verifies the IR after every
    pass; `dump_ir` (pass names, paths such as "fuse/cleanup", or "all") writes the IR before
    and after those passes into `dump_dir`. The per-pass report is in `graph.report`.
    `calibration_data`: samples for data-aware passes, an iterable of dicts (input name ->
    numpy array or torch tensor) or tuples in input order, or the path of an .npz holding
    one array per input with the samples along the first axis; checked against the graph's
    inputs (see `graphopt.calibration`).
    `distributed=True`: data-parallel calibration. Call it on every rank of a
    torch.distributed process group you initialized (`torch.distributed.init_process_group`,
    gloo or NCCL), with the same model and pipeline everywhere and each rank's own shard of
    the samples as `calibration_data` (the global order is rank 0's shard, then rank 1's, ...;
    every rank holds at least one sample). Data-aware passes reduce their statistics across
    ranks, so every rank returns the graph one process would build from all the samples
    (`graphopt.distributed_calibration` lists what is reduced how, and which statistics are
    equal only up to float summation order). A `Reducer` object instead of True reduces
    through it. Refused with `choose-precision` in the pipeline; a rank that fails inside a
    pass leaves the others waiting until the process group's timeout.
    """
    from graphopt.distributed_calibration import check_ranks, reducer_for, refuse_local_only

    passes = build_pipeline(pipeline)
    graph = load_graph(model)
    reducer = reducer_for(distributed)
    error = None
    try:
        if reducer.distributed:
            refuse_local_only([p.name for p in _walk(passes)])
        if calibration_data is not None:
            from graphopt.calibration import load_npz, normalize_calibration

            if isinstance(calibration_data, (str, os.PathLike)):
                calibration_data = load_npz(calibration_data)
            calibration = normalize_calibration(graph, calibration_data)
    except GraphoptError as exc:
        if not reducer.distributed:
            raise
        error = exc
    if reducer.distributed:
        inputs = ",".join(f"{v.name}:{v.type}" for v in graph.inputs)
        check_ranks(reducer, calibration, error, f"{[p.describe() for p in _walk(passes)]}|{inputs}|{seed}")
    manager = PassManager(passes, verify_each=verify, dump_ir=dump_ir, dump_dir=dump_dir, check=check, check_inputs=check_inputs)
    manager.run(graph, PassContext(calibration=calibration, seed=seed, reducer=reducer))
    return graph


def _walk(passes: Sequence[Pass]) -> list[Pass]:
    """`passes` and, depth first, the passes nested in pipelines among them."""
    found = []
    for item in passes:
        found.append(item)
        if isinstance(item, Pipeline):
            found.extend(_walk(item.passes))
    return found


def compile(
    model: Any,
    target: Any = "onnxruntime",
    pipeline: Union[PipelineLike, Sequence[Pass]] = "fuse",
    *,
    example_inputs: Optional[Sequence[Any]] = None,
    calibration: Optional[list[dict[str, Any]]] = None,
    calibration_data: "Optional[Iterable[Any] | str | os.PathLike[str]]" = None,
    check: bool = False,
    verify: bool = False,
    dump_ir: Sequence[str] = (),
    dump_dir: Optional[str] = None,
    seed: int = 0,
    partition: bool = False,
    world_size: int = 1,
    distributed: Any = False,
) -> CompiledModel:
    """Optimize `model` with `pipeline`, lower it and compile it for `target`; return a `CompiledModel`.

    `model`: a Graph (copied, never modified), an .onnx path, an onnx.ModelProto, a
    torch.export.ExportedProgram, or a torch.nn.Module with `example_inputs` (exported with
    torch.export; the module itself is not changed). `target`: a spec such as
    "onnxruntime:cpu{threads=2}", "torch", "tvm:llvm" (see `graphopt targets`).
    The target's lowering runs after `pipeline` as a nested pipeline named "lowering" (see
    `with_lowering`), under the same `check`, `verify` and `dump_ir`/`dump_dir` as the
    pipeline (see `optimize`); `compiled.pipeline_report` lists both. With `partition=True`
    the graph is split before lowering (a torch region must not hold the target's lowered
    ops), so each target region lowers when it is compiled and the report lists only `pipeline`.
    Raises TargetError when the target is unknown or cannot run here, UnsupportedOpError
    naming the nodes the target cannot run unless `partition=True`, which runs those nodes
    in torch and the rest in the target (`graphopt.partition`; such a model cannot be saved).
    `world_size` > 1: tensor-parallel over that many worker processes, the model split by the
    `shard` pass (`graphopt.distributed.compile_sharded`; `partition` does not apply).
    `distributed`: data-parallel calibration over the caller's process group, as in `optimize`.
    """
    from graphopt.target_registry import get_target

    if world_size != 1:
        from graphopt.distributed import compile_sharded

        if partition or distributed:
            raise GraphoptError("compile: world_size > 1 combines with neither partition=True nor distributed calibration")
        return compile_sharded(
            model, world_size, pipeline, target, example_inputs=example_inputs, calibration=calibration,
            calibration_data=calibration_data, check=check, verify=verify, dump_ir=dump_ir, dump_dir=dump_dir, seed=seed,
        )

    chosen = get_target(target)
    missing = chosen.available()
    if missing:
        raise TargetError(f"target '{chosen.spec}' cannot run here: {missing}")
    passes = build_pipeline(pipeline) if partition else with_lowering(build_pipeline(pipeline), chosen)
    graph = _graph_for_compile(model, example_inputs)
    graph = optimize(
        graph, passes, calibration=calibration, calibration_data=calibration_data, check=check, verify=verify,
        dump_ir=dump_ir, dump_dir=dump_dir, seed=seed, distributed=distributed,
    )
    from graphopt.partition import compile_for_target

    compiled = compile_for_target(graph, chosen, partition=partition)
    compiled.pipeline_report = graph.report
    return compiled


def with_lowering(passes: Sequence[Pass], target: Any) -> list[Pass]:
    """`passes` followed by `target`'s lowering as a pipeline named "lowering", which first
    refuses (UnsupportedOpError naming the nodes) a graph the target cannot run: support is
    decided on the IR before the target rewrites it into its own ops. Nothing is added for a
    target without lowering passes."""
    lowering = target.lowering()
    return [*passes, Pipeline.of("lowering", [CheckSupported(target), *lowering])] if lowering else list(passes)


@dataclasses.dataclass
class CheckSupported(Pass):
    """Refuse a graph `target` cannot run, naming its nodes (UnsupportedOpError); changes nothing."""

    name = "check-supported"
    target: Any = None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        check_supported(self.target, graph)
        return PassResult(False)


def check_supported(target: Any, graph: Graph) -> None:
    """UnsupportedOpError naming the nodes (the first five) `target` cannot run, if any, and
    the target's reason (`Target.unsupported_reason`: e.g. the element types it lacks)."""
    unsupported = target.unsupported_nodes(graph)
    if unsupported:
        listed = ", ".join(f"{n.qualified_op} ({n.label})" for n in unsupported[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        reason = target.unsupported_reason(unsupported)
        raise UnsupportedOpError(
            f"target '{target.spec}' cannot run {len(unsupported)} node(s): {listed}{more}" + (f". {reason}" if reason else "")
        )


def load_compiled(directory: "str | os.PathLike[str]") -> CompiledModel:
    """Load a compiled model that `CompiledModel.save(directory)` wrote."""
    import json

    from graphopt.target_base import MANIFEST, MANIFEST_FORMAT
    from graphopt.target_registry import get_target

    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise TargetError(f"{directory}: not a compiled graphopt model (no {MANIFEST}); write one with `graphopt compile`")
    try:
        with open(path) as handle:
            manifest = json.load(handle)
        spec, version = manifest["spec"], manifest["format"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TargetError(f"{path}: unreadable manifest ({exc})") from None
    if version != MANIFEST_FORMAT:
        raise TargetError(f"{path}: manifest format {version} is not supported (this graphopt reads {MANIFEST_FORMAT})")
    for name in manifest.get("files", []):
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") or not os.path.isfile(os.path.join(directory, name)):
            raise TargetError(f"{path}: artifact file {name!r} is missing or outside the folder")
    chosen = get_target(spec)
    missing = chosen.available()
    if missing:
        raise TargetError(f"{directory}: target '{spec}' cannot run here: {missing}")
    if int(manifest.get("world_size", 1)) > 1:  # one artifact per rank: start the ranks again
        from graphopt.distributed import load_sharded

        return load_sharded(directory, manifest)
    return chosen.load(directory, manifest)


def _graph_for_compile(model: Any, example_inputs: Optional[Sequence[Any]]) -> Graph:
    if isinstance(model, Graph):
        return model.clone()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        from graphopt.frontends.fx_import import from_fx

        if isinstance(model, torch.nn.Module):
            model = _export_module(torch, model, example_inputs)
        return from_fx(model)
    return load_graph(model)


def _export_module(torch: Any, module: Any, example_inputs: Optional[Sequence[Any]]) -> Any:
    """torch.export of `module` in eval mode; the module's own mode is restored after."""
    if example_inputs is None:
        raise GraphoptError("compile: a torch.nn.Module needs example_inputs (a tuple of tensors)")
    was_training = module.training
    try:
        module.eval()
        return torch.export.export(module, tuple(example_inputs))
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise GraphoptError(f"compile: torch.export could not capture the module: {first[0] if first else type(exc).__name__}") from None
    finally:
        module.train(was_training)
