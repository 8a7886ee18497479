"""Pass instruments: what the pass manager does around every pass, nested ones included.

An instrument (as in TVM's PassContext) watches passes without any pass knowing about it:
`before_pass(item, graph, record)` runs before a pass, `after_pass(item, graph, result,
record)` after it, for top-level passes and for every pass a pipeline runs inside itself.
`record` is the pass run's `PassRecord` (its `path`, e.g. ``fuse/cleanup/fold-constants``,
and `depth`, 0 at the top); instruments may fill its `seconds` and `max_error`. Hooks run in
list order before a pass and in reverse order after it, so the first instrument wraps the
others and the last one sits closest to the pass.

- `Timing`: wall time of each pass run;
- `VerifyEach`: `graph.verify()` after each pass; a failure names the pass by its path;
- `DumpIR`: the printed IR before and after chosen passes (by name, by path, or "all");
- `Check`: runs the graph on sample inputs after each pass that changed it and raises
  `CheckError` naming the first lossless pass whose outputs moved beyond its tolerance;
- `Report`: collects the records into a `PipelineReport` tree.
"""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from graphopt.check import CheckError, max_abs_error, run_graph, sample_inputs
from graphopt.errors import GraphoptError, VerificationError

if TYPE_CHECKING:
    from graphopt.ir.graph import Graph
    from graphopt.pass_base import Pass, PassContext, PassResult


@dataclasses.dataclass
class PassRecord:
    """What one run of one pass did, for the report; `children`: the runs of the passes it ran inside itself."""

    name: str
    path: str
    depth: int
    nodes_before: int
    nodes_after: int = 0
    changed: bool = False
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    max_error: Optional[float] = None
    index: int = 0
    """1-based position of this run among all pass runs of the pipeline (nested ones counted)."""
    children: list["PassRecord"] = dataclasses.field(default_factory=list)
    runs: int = 1
    """How many runs of the pass a merged report row stands for (see `PipelineReport.rows`)."""


@dataclasses.dataclass
class PipelineReport:
    """The records of one pipeline run: `records` are the top-level passes, each with its nested runs."""

    records: list[PassRecord] = dataclasses.field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def walk(self) -> Iterator[PassRecord]:
        """Every record, nested ones after their parent, in the order the passes started."""
        stack = list(reversed(self.records))
        while stack:
            record = stack.pop()
            yield record
            stack.extend(reversed(record.children))

    def rows(self) -> list[PassRecord]:
        """The records as the table shows them: nested runs indented under their parent, the
        repeated runs of one nested pass (a fixed-point pipeline's rounds) merged into one row
        (time and stats summed, nodes from the first run's before to the last run's after)."""
        rows: list[PassRecord] = []

        def add(records: list[PassRecord]) -> None:
            merged: dict[str, list[PassRecord]] = {}
            for record in records:
                merged.setdefault(record.path, []).append(record)
            for runs in merged.values():
                rows.append(_merge(runs))
                add([child for run in runs for child in run.children])

        add(self.records)
        return rows

    def table(self) -> str:
        """A fixed-width table: pass (nested ones indented), time, nodes before -> after, error, stats."""
        header = ("pass", "time", "nodes", "max err", "stats")
        rows = [header] + [cells[:3] + cells[4:] for cells in map(row_cells, self.rows())]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        stats_width = max(STATS_WIDTH, TABLE_WIDTH - sum(widths) - 8)
        lines = []
        for row in rows:
            first, *rest = textwrap.wrap(row[4], stats_width, break_on_hyphens=False) or [""]
            left = "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  "
            lines += [left + first] + [" " * len(left) + more for more in rest]
        lines.insert(1, "-" * min(len(lines[0]), TABLE_WIDTH))
        return "\n".join(line.rstrip() for line in lines)


TABLE_WIDTH = 150
"""Characters per line the per-pass table aims at; its stats column wraps to fit."""
STATS_WIDTH = 40
"""The stats column's least width, however wide the other columns are."""


def row_cells(record: PassRecord, full_path: bool = False) -> tuple[str, str, str, str, str, str]:
    """(name, time, nodes, changed, max error, stats) of a report row; the name is indented
    by depth, or with `full_path` the pass's path (``fuse/cleanup/fold-constants``)."""
    error = "" if record.max_error is None else f"{record.max_error:.2e}"
    stats = ", ".join(f"{k}={v}" for k, v in record.stats.items())
    name = record.path if full_path else "  " * record.depth + record.name
    return (
        name + (f" (x{record.runs})" if record.runs > 1 else ""), f"{record.seconds * 1000:.1f} ms", f"{record.nodes_before} -> {record.nodes_after}",
        "yes" if record.changed else "no", error, stats,
    )


def sum_stats(named_stats: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The numeric stats of several pass runs summed per key, each key prefixed by the
    name paired with its stats (`"<prefix>.<stat>"`, or the bare stat for an empty prefix)."""
    totals: dict[str, Any] = {}
    for prefix, stats in named_stats:
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = f"{prefix}.{key}" if prefix else key
                totals[name] = totals.get(name, 0) + value
    return totals


def _merge(runs: list[PassRecord]) -> PassRecord:
    if len(runs) == 1:
        return runs[0]
    stats = sum_stats(("", run.stats) for run in runs)
    first, last = runs[0], runs[-1]
    return PassRecord(
        first.name, first.path, first.depth, first.nodes_before, last.nodes_after, any(r.changed for r in runs),
        stats, sum(r.seconds for r in runs), last.max_error, first.index, runs=len(runs),
    )


class Instrument:
    """Base class of instruments; every hook does nothing by default."""

    def run_start(self, graph: "Graph", ctx: "PassContext") -> None:
        """Once, before the first pass of a pass manager run."""

    def before_pass(self, item: "Pass", graph: "Graph", record: PassRecord) -> None:
        """Before `item` runs (at any depth)."""

    def after_pass(self, item: "Pass", graph: "Graph", result: "PassResult", record: PassRecord) -> None:
        """After `item` ran and returned `result`."""


class Timing(Instrument):
    """Records each pass run's wall time in `record.seconds`."""

    def __init__(self) -> None:
        self._starts: list[float] = []

    def before_pass(self, item: "Pass", graph: "Graph", record: PassRecord) -> None:
        self._starts.append(time.perf_counter())

    def after_pass(self, item: "Pass", graph: "Graph", result: "PassResult", record: PassRecord) -> None:
        record.seconds = time.perf_counter() - self._starts.pop()


class VerifyEach(Instrument):
    """Verifies the IR after every pass; VerificationError naming the pass by its path."""

    def after_pass(self, item: "Pass", graph: "Graph", result: "PassResult", record: PassRecord) -> None:
        try:
            graph.verify()
        except VerificationError as exc:
            raise VerificationError([f"after pass '{record.path}': {p}" for p in exc.problems]) from None


class DumpIR(Instrument):
    """Writes the printed IR before and after the chosen passes into `folder`.

    `passes`: pass names (every run of that pass, at any depth), paths such as
    ``fuse/cleanup``, or "all". Files are ``<NN>-<path>.before.txt`` / ``.after.txt``, NN the
    run's position among all pass runs and the path's "/" written as "." (``03-fuse.cleanup.fold-constants.after.txt``).
    """

    def __init__(self, passes: Iterable[str], folder: str) -> None:
        self.passes = set(passes)
        self.folder = folder

    def before_pass(self, item: "Pass", graph: "Graph", record: PassRecord) -> None:
        self._dump(graph, record, "before")

    def after_pass(self, item: "Pass", graph: "Graph", result: "PassResult", record: PassRecord) -> None:
        self._dump(graph, record, "after")

    def _dump(self, graph: "Graph", record: PassRecord, when: str) -> None:
        if not {"all", record.name, record.path} & self.passes:
            return
        os.makedirs(self.folder, exist_ok=True)
        safe = re.sub(r"[^\w.-]", "_", record.path.replace("/", "."))
        path = os.path.join(self.folder, f"{record.index:02d}-{safe}.{when}.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(str(graph))


class Check(Instrument):
    """Compares the graph's outputs with the original's after every pass, nested ones included.

    `inputs` default to `sample_inputs(graph, seed=ctx.seed)`, `expected` to the graph's
    outputs on them, computed once per run (at `run_start`). The graph is run
    again only after a pass that changed it and whose nested passes did not already measure
    the result, so a pipeline costs one run per changing nested pass. A lossless pass whose
    error exceeds its `tolerance` raises `CheckError` naming it by its path; nested passes are
    checked before their pipeline, so the first culprit is named. Lossy passes only record it.
    """

    def __init__(self, inputs: Optional[dict[str, Any]] = None, expected: Optional[list[Any]] = None) -> None:
        self.inputs = inputs
        self.given_expected = expected
        self.feeds: Optional[dict[str, Any]] = None
        self.expected: Optional[list[Any]] = None
        self._error = 0.0
        self._measurements = 0
        self._marks: list[int] = []

    def run_start(self, graph: "Graph", ctx: "PassContext") -> None:
        self.feeds = self.inputs if self.inputs is not None else sample_inputs(graph, seed=ctx.seed)
        self.expected = self.given_expected if self.given_expected is not None else run_graph(graph, self.feeds)
        self._error, self._measurements, self._marks = 0.0, 0, []

    def before_pass(self, item: "Pass", graph: "Graph", record: PassRecord) -> None:
        self._marks.append(self._measurements)

    def after_pass(self, item: "Pass", graph: "Graph", result: "PassResult", record: PassRecord) -> None:
        measured_inside = self._marks.pop() != self._measurements
        if result.changed and not measured_inside:
            if self.expected is None or self.feeds is None:
                raise GraphoptError("the check instrument was not started (run it through a PassManager)")
            self._error = max_abs_error(self.expected, run_graph(graph, self.feeds))
            self._measurements += 1
        record.max_error = self._error
        if item.lossless and self._error > item.tolerance:
            raise CheckError(
                f"pass '{record.path}' changed the outputs by {self._error:.3g} "
                f"(tolerance {item.tolerance:g}); it is the first pass to do so"
            )


class Report(Instrument):
    """Collects every pass run's record into `report` (nested runs as children of their pipeline's)."""

    def __init__(self) -> None:
        self.report = PipelineReport()
        self._open: list[PassRecord] = []

    def before_pass(self, item: "Pass", graph: "Graph", record: PassRecord) -> None:
        self._open.append(record)

    def after_pass(self, item: "Pass", graph: "Graph", result: "PassResult", record: PassRecord) -> None:
        self._open.pop()
        (self._open[-1].children if self._open else self.report.records).append(record)
