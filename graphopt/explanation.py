"""`graphopt.explain(model, *inputs)`: what torch.compile(backend="graphopt") would do, per graph.

Captures the model the way the backend does (dynamo, graph breaks included), imports each
captured graph, runs the pipeline on it and reports, per graph: the ops before and after,
the per-pass table (time, nodes before -> after, stats) and, for a graph graphopt cannot
take, the reason it would run unoptimized. Graph breaks are listed with dynamo's reasons.
Nothing is compiled for real and the model is not changed (its weights and train/eval mode
are left as they were; it runs under `torch.no_grad()`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from graphopt.errors import GraphoptError


@dataclasses.dataclass
class GraphExplanation:
    """One captured graph: op counts before/after, the pipeline report, or why it falls back."""

    index: int
    inputs: int
    ops_before: dict[str, int] = dataclasses.field(default_factory=dict)
    ops_after: dict[str, int] = dataclasses.field(default_factory=dict)
    report: Any = None
    fallback_reason: Optional[str] = None

    def __str__(self) -> str:
        head = f"graph {self.index} ({self.inputs} tensor inputs incl. weights)"
        if self.fallback_reason is not None:
            return f"{head}: runs unoptimized: {self.fallback_reason}"
        before, after = sum(self.ops_before.values()), sum(self.ops_after.values())
        gained = {op: n for op, n in self.ops_after.items() if n > self.ops_before.get(op, 0)}
        lines = [f"{head}: {before} -> {after} nodes"]
        if gained:
            lines.append("  new ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(gained.items())))
        if self.report is not None:
            lines += ["  " + line for line in self.report.table().splitlines()]
        return "\n".join(lines)


@dataclasses.dataclass
class Explanation:
    """Every captured graph, and the graph breaks between them."""

    graphs: list[GraphExplanation]
    graph_breaks: list[str]
    pipeline: str

    def __str__(self) -> str:
        lines = [f"pipeline: {self.pipeline}", f"{len(self.graphs)} graph(s), {len(self.graph_breaks)} graph break(s)"]
        lines += [f"  break: {reason}" for reason in self.graph_breaks]
        lines += [str(graph) for graph in self.graphs]
        return "\n".join(lines)


def explain(model: Any, *args: Any, pipeline: Any = "fuse", dynamic: Optional[bool] = None, **kwargs: Any) -> Explanation:
    """Run `model(*args, **kwargs)` under dynamo and say what graphopt does to each graph."""
    import torch

    from graphopt.pipeline import build_pipeline

    build_pipeline(pipeline)
    graphs: list[GraphExplanation] = []

    def backend(gm: Any, example_inputs: list[Any]) -> Any:
        entry = GraphExplanation(len(graphs), sum(isinstance(e, torch.Tensor) for e in example_inputs))
        graphs.append(entry)

        def run(*args: Any) -> Any:
            # as the backend does: the graph is imported on its first call, with its real
            # arguments, outside dynamo's compile step (whose shape environment an import
            # tracing the graph again would corrupt)
            if entry.report is None and entry.fallback_reason is None:
                _explain_graph(entry, gm, args, pipeline)
            return gm.forward(*args)

        return run

    modes = {m: m.training for m in model.modules()} if isinstance(model, torch.nn.Module) else {}
    try:
        torch._dynamo.reset()
        with torch.no_grad():
            breaks = torch._dynamo.explain(model)(*args, **kwargs).break_reasons
            torch._dynamo.reset()
            torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
        for module, training in modes.items():
            module.training = training
    reasons = [_break_text(b) for b in breaks]
    return Explanation(graphs, reasons, str(pipeline))


def _explain_graph(entry: GraphExplanation, gm: Any, args: Any, pipeline: Any) -> None:
    """Fill `entry` with what the pipeline does to `gm`, or why graphopt cannot take it."""
    from graphopt.api import optimize
    from graphopt.frontends.fx_import import from_fx
    from graphopt.pipeline import build_pipeline

    try:
        graph = from_fx(gm, args)
        entry.ops_before = graph.op_counts()
        optimize(graph, build_pipeline(pipeline))
        entry.ops_after, entry.report = graph.op_counts(), graph.report
    except GraphoptError as exc:
        lines = str(exc).strip().splitlines()
        entry.fallback_reason = f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _break_text(reason: Any) -> str:
    text = str(getattr(reason, "reason", reason)).strip().splitlines()
    where = ""
    stack = getattr(reason, "user_stack", None)
    if stack:
        frame = stack[-1]
        where = f" ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"
    return (text[0] if text else "unknown") + where
