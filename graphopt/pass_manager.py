"""The pass manager: runs passes, nested pipelines included, under instruments.

    manager = PassManager(build_pipeline("cleanup,my-pass{x=1}"), verify_each=True, check=True)
    report = manager.run(graph, PassContext())
    print(report.table())

A `Pipeline` is itself a pass: a name and nested passes, run in order and, for a
fixed-point pipeline, repeated until none of them changes the graph (at most `max_iterations` rounds). `cleanup` and `fuse`
are pipelines registered by name; a target's lowering is one too. Every pass a pipeline
runs goes through `run_pass`, so the instruments of the run (`graphopt.instruments`:
timing, verification, IR dumps, check mode, the report) see nested passes as they see
top-level ones, named by their path (``fuse/cleanup/fold-constants``).

`PassManager.run`'s keyword options (`verify_each`, `dump_ir`/`dump_dir`, `check`, ...)
build those instruments; `instruments=` adds others.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable, Optional, Sequence

from graphopt.errors import GraphoptError
from graphopt.facts import check_facts
from graphopt.instruments import Check, DumpIR, Instrument, PassRecord, PipelineReport, Report, Timing, VerifyEach, sum_stats
from graphopt.ir.graph import Graph
from graphopt.pass_base import Pass, PassContext, PassResult, PipelineError


@dataclasses.dataclass
class Instrumentation:
    """What `PassContext.instrumentation` holds while a pass manager runs: the instruments,
    the graph they watch and the path of the pipelines now running."""

    graph: Graph
    instruments: list[Instrument]
    path: list[str] = dataclasses.field(default_factory=list)
    runs: int = 0


def run_pass(item: Pass, graph: Graph, ctx: PassContext) -> PassResult:
    """Run `item` on `graph` under the context's instruments (pipelines call this for each
    nested pass). A pass run on another graph (e.g. cleanup inside an If body) runs plain:
    the instruments watch the graph the pass manager was given."""
    scope = ctx.instrumentation
    if not isinstance(scope, Instrumentation) or graph is not scope.graph:
        return _checked(item, item.run(graph, ctx))
    scope.runs += 1
    record = PassRecord(item.name, "/".join([*scope.path, item.name]), len(scope.path), len(graph), index=scope.runs)
    for instrument in scope.instruments:
        instrument.before_pass(item, graph, record)
    scope.path.append(item.name)
    try:
        result = _checked(item, item.run(graph, ctx))
    finally:
        scope.path.pop()
    record.nodes_after, record.changed, record.stats = len(graph), result.changed, dict(result.stats)
    for instrument in reversed(scope.instruments):
        instrument.after_pass(item, graph, result, record)
    return result


def _checked(item: Pass, result: Any) -> PassResult:
    if not isinstance(result, PassResult):
        raise GraphoptError(f"pass '{item.name}' returned {type(result).__name__}, not a PassResult")
    return result


@dataclasses.dataclass
class Pipeline(Pass):
    """Run nested passes in order, repeated until none changes the graph (at most `max_iterations` rounds).

    The repetition stops as soon as every nested pass has run once on the graph as it is
    (the passes after the last change in a round are not run again). A named pipeline
    subclasses this with `name`, a docstring and `steps` (registered pass names, each built
    with its default options); `Pipeline.of` makes one from pass objects. The nested
    passes' requires/provides/invalidates are checked in order when it is built; it
    requires what they need and none of them provides (an outer pipeline checks that),
    provides what they provide and leave holding, and invalidates what they leave removed.
    Lossless when all of them are. The nested pass objects are built once and reused for
    every round and every run. Stats: the nested passes' numeric stats summed as
    "<pass>.<stat>", plus "iterations" for a `fixed_point` pipeline, which logs a warning
    when the bound stops it before a fixed point.
    """

    name: ClassVar[str] = "pipeline"
    steps: ClassVar[tuple[str, ...]] = ()
    fixed_point: ClassVar[bool] = False
    """True for a pipeline meant to reach a fixed point: it reports "iterations" and warns
    when `max_iterations` stops it first."""
    max_iterations: int = 1
    """Rounds of the nested passes at most (a fixed-point pipeline stops earlier once a round changes nothing)."""

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        self.set_passes(self.build_steps())

    def build_steps(self) -> list[Pass]:
        """The nested passes of a named pipeline, from `steps`."""
        from graphopt.registry import get_pass

        return [get_pass(step)() for step in self.steps]

    def set_passes(self, passes: Sequence[Pass]) -> None:
        """Make `passes` the nested passes. PipelineError when one needs a fact that only a
        later one provides or an earlier one removed (`graphopt.facts.check_facts`); facts
        none of them provides are the pipeline's own `requires`."""
        self.passes = list(passes)
        flow = check_facts(self.passes, given=None, pipeline=self.name)
        self.requires = flow.requires  # type: ignore[misc]
        self.provides = flow.provides  # type: ignore[misc]
        self.invalidates = flow.invalidates  # type: ignore[misc]
        self.lossless = all(item.lossless for item in self.passes)  # type: ignore[misc]
        self.tolerance = max((item.tolerance for item in self.passes), default=Pass.tolerance)  # type: ignore[misc]

    @classmethod
    def of(cls, name: str, passes: Sequence[Pass], max_iterations: int = 1) -> "Pipeline":
        """An unregistered pipeline named `name` over `passes` (e.g. a target's lowering)."""
        pipeline = cls(max_iterations=max_iterations)
        pipeline.name = name  # type: ignore[misc]
        pipeline.fixed_point = max_iterations > 1  # type: ignore[misc]
        pipeline.set_passes(passes)
        return pipeline

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        changed_any = False
        results: list[tuple[Pass, PassResult]] = []
        unchanged_runs = 0  # passes run in a row without changing the graph
        for iteration in range(1, self.max_iterations + 1):
            for item in self.passes:
                result = run_pass(item, graph, ctx)
                results.append((item, result))
                changed_any |= result.changed
                unchanged_runs = 0 if result.changed else unchanged_runs + 1
                if unchanged_runs == len(self.passes):
                    break  # every pass has seen the graph as it is now: a fixed point
            if unchanged_runs == len(self.passes):
                break
        else:
            if self.fixed_point:
                ctx.logger.warning(
                    "graphopt: %s did not reach a fixed point in %d iterations; stopping", self.name, self.max_iterations
                )
        stats = self.summarize(results)
        if self.fixed_point:
            stats["iterations"] = iteration
        return PassResult(changed_any, stats)

    def summarize(self, results: list[tuple[Pass, PassResult]]) -> dict[str, Any]:
        """The pipeline's stats from its nested results (numeric stats summed per pass)."""
        return sum_stats((item.name, result.stats) for item, result in results)


class PassManager:
    """Runs configured passes in order over one graph (in place), under instruments.

    The keyword options build the standard instruments: `verify_each` (`VerifyEach`),
    `dump_ir` + `dump_dir` (`DumpIR`), `check` with optional `check_inputs` /
    `check_expected` (`Check`); timing and the report are always on. `instruments` are
    added after those. After a pass, the IR is verified before it is dumped and dumped
    before it is checked.
    """

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
        instruments: Sequence[Instrument] = (),
    ) -> None:
        self.passes = list(passes)
        dump_ir = list(dump_ir)
        if dump_ir and not dump_dir:
            raise GraphoptError("dump_ir needs dump_dir: the folder the IR dumps go to")
        self.instruments: list[Instrument] = []
        if check:
            self.instruments.append(Check(check_inputs, check_expected))
        if dump_ir:
            self.instruments.append(DumpIR(dump_ir, dump_dir))  # type: ignore[arg-type]
        if verify_each:
            self.instruments.append(VerifyEach())
        self.instruments += list(instruments)

    def run(self, graph: Graph, ctx: Optional[PassContext] = None) -> PipelineReport:
        """Run the passes; return the report (also left in `graph.report`)."""
        ctx = ctx or PassContext()
        report = Report()
        instruments: list[Instrument] = [report, *self.instruments, Timing()]
        for instrument in instruments:
            instrument.run_start(graph, ctx)
        outer = ctx.instrumentation
        ctx.instrumentation = Instrumentation(graph, instruments)
        try:
            for item in self.passes:
                run_pass(item, graph, ctx)
        finally:
            ctx.instrumentation = outer
        graph.report = report.report
        return report.report
