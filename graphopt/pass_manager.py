"""The pass manager: runs a validated pipeline with timing, verification, IR dumps and checks.

    manager = PassManager(build_pipeline("cleanup,my-pass{x=1}"), verify_each=True, check=True)
    report = manager.run(graph, PassContext())
    print(report.table())

Cross-cutting concerns live here, not in the passes: every pass is timed and its node
counts recorded; with `verify_each` the IR is verified after each pass (a failure names the
pass); `dump_ir` writes the printed IR before and after the chosen passes; `check` runs the
graph on sample inputs after each pass and raises `CheckError` naming the first lossless
pass whose outputs moved beyond its tolerance (lossy passes get their error recorded).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from graphopt.check import CheckError, max_abs_error, run_graph, sample_inputs
from graphopt.errors import GraphoptError, VerificationError
from graphopt.ir.graph import Graph
from graphopt.pass_base import Pass, PassContext, PassResult


@dataclasses.dataclass
class PassRecord:
    """What one pass did, for the report."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    changed: bool
    stats: dict[str, Any]
    max_error: Optional[float] = None


@dataclasses.dataclass
class PipelineReport:
    """Per-pass records of one pipeline run."""

    records: list[PassRecord] = dataclasses.field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def table(self) -> str:
        """A fixed-width table: pass, time, nodes before -> after, error, stats."""
        rows = [("pass", "time", "nodes", "max err", "stats")]
        for r in self.records:
            error = "" if r.max_error is None else f"{r.max_error:.2e}"
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            rows.append((r.name, f"{r.seconds * 1000:.1f} ms", f"{r.nodes_before} -> {r.nodes_after}", error, stats))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(line.rstrip() for line in lines)


class PassManager:
    """Runs configured passes in order over one graph (in place)."""

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify_each: bool = False,
        dump_ir: Iterable[str] = (),
        dump_dir: Optional[str] = None,
        check: bool = False,
        check_inputs: Optional[dict[str, Any]] = None,
        check_expected: Optional[list[Any]] = None,
        on_pass_start: Optional[Callable[[int, Pass], None]] = None,
    ) -> None:
        self.passes = list(passes)
        self.verify_each = verify_each
        self.dump_ir = set(dump_ir)
        self.dump_dir = dump_dir
        self.check = check
        self.check_inputs = check_inputs
        self.check_expected = check_expected
        self.on_pass_start = on_pass_start
        if self.dump_ir and not self.dump_dir:
            raise GraphoptError("dump_ir needs dump_dir: the folder the IR dumps go to")

    def run(self, graph: Graph, ctx: Optional[PassContext] = None) -> PipelineReport:
        ctx = ctx or PassContext()
        report = PipelineReport()
        feeds = expected = None
        if self.check:
            feeds = self.check_inputs or sample_inputs(graph, seed=ctx.seed)
            expected = self.check_expected if self.check_expected is not None else run_graph(graph, feeds)
        for index, item in enumerate(self.passes):
            if self.on_pass_start is not None:
                self.on_pass_start(index, item)
            self._dump(graph, index, item, "before")
            before = len(graph)
            start = time.perf_counter()
            result = item.run(graph, ctx)
            seconds = time.perf_counter() - start
            if not isinstance(result, PassResult):
                raise GraphoptError(f"pass '{item.name}' returned {type(result).__name__}, not a PassResult")
            record = PassRecord(item.name, seconds, before, len(graph), result.changed, dict(result.stats))
            report.records.append(record)
            if self.verify_each:
                try:
                    graph.verify()
                except VerificationError as exc:
                    raise VerificationError([f"after pass '{item.name}': {p}" for p in exc.problems]) from None
            self._dump(graph, index, item, "after")
            if self.check:
                record.max_error = max_abs_error(expected, run_graph(graph, feeds))  # type: ignore[arg-type]
                if item.lossless and record.max_error > item.tolerance:
                    raise CheckError(
                        f"pass '{item.name}' changed the outputs by {record.max_error:.3g} "
                        f"(tolerance {item.tolerance:g}); it is the first pass to do so"
                    )
        return report

    def _dump(self, graph: Graph, index: int, item: Pass, when: str) -> None:
        if item.name not in self.dump_ir and "all" not in self.dump_ir:
            return
        os.makedirs(self.dump_dir, exist_ok=True)  # type: ignore[arg-type]
        safe = re.sub(r"[^\w.-]", "_", item.name)
        path = os.path.join(self.dump_dir, f"{index + 1:02d}-{safe}.{when}.txt")  # type: ignore[arg-type]
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(str(graph))


def run_to_fixed_point(graph: Graph, passes: Sequence[Pass], ctx: PassContext, max_iterations: int) -> tuple[bool, dict[str, Any]]:
    """Run `passes` repeatedly until none changes the graph (at most `max_iterations` rounds).

    Returns (changed at all, stats summed per pass plus "iterations"); logs a warning when
    the bound is hit before a fixed point.
    """
    changed_any = False
    totals: dict[str, Any] = {}
    for iteration in range(1, max_iterations + 1):
        changed = False
        for item in passes:
            result = item.run(graph, ctx)
            changed |= result.changed
            for key, value in result.stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    totals[f"{item.name}.{key}"] = totals.get(f"{item.name}.{key}", 0) + value
        changed_any |= changed
        if not changed:
            totals["iterations"] = iteration
            return changed_any, totals
    totals["iterations"] = max_iterations
    ctx.logger.warning("graphopt: %s did not reach a fixed point in %d iterations; stopping", "+".join(p.name for p in passes), max_iterations)
    return changed_any, totals
