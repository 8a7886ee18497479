"""MetaSchedule tuning for the `tvm` target, within a time or trial budget.

`tune(module, target, tvm_target)` takes a legalized, fused Relax module built for static
shapes (one bucket of `tune_shapes`) and returns it with every kernel scheduled:

1. **Kernels.** Each distinct PrimFunc is a task, weighted by how often ``main`` calls it.
2. **Baseline.** The hand schedule (`tvm_schedule`'s rules, or dlight's GPU rules) of each
   kernel is measured with the same builder and runner the tuner uses and committed to the
   database as a tuning record (its trace replays exactly). The tuner must beat it: the
   database answers with the fastest record, hand or tuned.
3. **Ranking.** Tasks are ranked by measured time x calls; the budget goes to those making up
   `COVERED` of the total, and only to tasks the database has no tuned record for, so a
   second run with the same shapes reuses the database and measures nothing new. Kernels
   whose measurement fails (gathers read random indices out of bounds) keep the hand schedule.
4. **Search.** `meta_schedule.tune_tasks` (evolutionary search; round-robin over the chosen
   tasks, costliest first: the gradient scheduler's warm-up visits every task whatever the
   budget) until `tune_minutes` or `tune_trials` runs out; a progress line shows trials, elapsed
   time and the estimated total of the best kernels so far. Ctrl-C ends the search and keeps
   what was measured (records are committed as they are measured).
5. **Apply.** Each kernel takes the database's best schedule, else its hand schedule. The
   target then times the tuned module against the hand one end to end (`faster_module`)
   and keeps the faster: kernels timed alone run hotter in cache than inside the model.

Measurements run in local worker processes, or through TVM's RPC tracker
(``rpc={tracker: "host:port", key: NAME}``): any number of `tvm.exec.rpc_server` processes
registered under that key take the measurements. Kernels are compiled with `build_kernel`,
which, unlike MetaSchedule's stock builder, does not import `tvm.s_tir.tensor_intrin` (~30 s
per worker on 2 cores, longer than the builder's time-out).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import tempfile
import time
from typing import Any, Optional

from graphopt.target_base import TargetError
from graphopt.targets.tvm_build import last_line

COVERED = 0.95
"""Share of the measured kernel time whose tasks are tuned."""

TRIALS_PER_ROUND = 32
"""Candidates measured per task per search round."""

TIMED_CALLS = 9
"""Calls per build when the tuned and hand modules are timed end to end."""

log = logging.getLogger("graphopt.targets.tvm")


@dataclasses.dataclass
class Budget:
    """How long to tune: minutes and/or measured trials (0: no limit on that one)."""

    minutes: float = 0.0
    trials: int = 0

    def __bool__(self) -> bool:
        return self.minutes > 0 or self.trials > 0


@dataclasses.dataclass
class KernelRecord:
    """One kernel's outcome: its measured hand schedule, the best found, and which is used."""

    name: str
    calls: int
    hand_ms: Optional[float]
    best_ms: Optional[float]
    tuned: bool
    """Whether the kernel runs a tuned schedule (faster than its hand schedule)."""


@dataclasses.dataclass
class TuningReport:
    """What one bucket's tuning did."""

    dims: dict[str, int]
    kernels: list[KernelRecord]
    trials: int
    seconds: float
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"dims": self.dims, "trials": self.trials, "seconds": round(self.seconds, 1), "interrupted": self.interrupted,
                "kernels": [dataclasses.asdict(k) for k in self.kernels]}


@dataclasses.dataclass
class _Task:
    names: list[str]
    """The module's PrimFuncs that are this kernel (structurally equal), the first naming it."""
    mod: Any
    calls: int
    hand: Any  # the hand Schedule, or None when no rule applies

    @property
    def name(self) -> str:
        return self.names[0]


def default_database_dir() -> str:
    """`$XDG_CACHE_HOME/graphopt/tvm-tuning` (~/.cache when unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "graphopt", "tvm-tuning")


def tune(module: Any, target: Any, tvm_target: Any, dims: dict[str, int]) -> tuple[Any, TuningReport]:
    """`module` with every PrimFunc scheduled (tuned where the database has a faster
    schedule than the hand one), and the report; `target` is the TvmTarget."""
    started = time.perf_counter()
    directory = target.tuning_db or default_database_dir()
    database = _database(directory)
    tasks = _tasks(module, target, tvm_target)
    builder, runner = _builder(target), _runner(target)
    hand = _measure_hand(tasks, database, tvm_target, builder, runner)
    chosen = _to_tune(tasks, hand, database, tvm_target)
    budget = Budget(target.tune_minutes, target.tune_trials)
    trials, interrupted = 0, False
    if chosen and budget:
        trials, interrupted = _search(chosen, database, tvm_target, builder, runner, budget, hand)
    kernels = []
    for task in tasks:
        record = _best_record(database, task, tvm_target)
        best = _record_ms(record) if record is not None else None
        schedule = database.query_schedule(task.mod, tvm_target, workload_name="main") if record is not None else task.hand
        if schedule is None:
            continue
        for name in task.names:
            _replace(module, name, schedule.mod["main"])
        tuned = record is not None and hand.get(task.name) is not None and best is not None and best < hand[task.name]
        kernels.append(KernelRecord(task.name, task.calls, hand.get(task.name), best, tuned))
    return module, TuningReport(dims, kernels, trials, time.perf_counter() - started, interrupted)


def faster_module(builds: dict[str, Any], inputs: list[Any], dims: dict[str, int], params: list[Any], target: Any) -> tuple[str, dict[str, float]]:
    """The label of the fastest of `builds` (executables of one static module) run end to end,
    and each one's median milliseconds, timed side by side (`graphopt.timing`). MetaSchedule
    times each kernel alone, its data hot in cache, which measured small kernels (layer norm,
    softmax) 2-4x faster than they run inside the model: on MiniLM the tuned module, faster
    kernel by kernel, ran 1.09x ORT's time where the hand one ran 0.97x. Inputs: zeros for
    integer inputs (valid indices), normal samples for floats, at the bucket's `dims`."""
    import numpy as np
    import tvm
    from tvm import relax

    from graphopt.ir.symbolic import evaluate_dim
    from graphopt.timing import median_ms

    device = tvm.cuda(0) if target.variant == "cuda" else tvm.cpu(0)
    rng = np.random.default_rng(0)
    feeds = []
    for spec in inputs:
        shape = tuple(d if isinstance(d, int) else evaluate_dim(d, dims) if isinstance(d, str) else None for d in spec.shape or ())
        if spec.shape is None or None in shape or spec.dtype is None:
            return next(reversed(builds)), {}  # an input of unknown size: nothing to time it with
        dtype = np.dtype(spec.dtype)
        data = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
        feeds.append(tvm.runtime.tensor(data, device))
    weights = [tvm.runtime.tensor(p, device) for p in params]
    machines = {label: relax.VirtualMachine(executable, device)["main"] for label, executable in builds.items()}
    runners = {label: (lambda run=run: [r.numpy() for r in run(*feeds, *weights)]) for label, run in machines.items()}
    for runner in runners.values():
        runner()
    timings = median_ms(runners, TIMED_CALLS)
    return min(timings, key=timings.__getitem__), {label: round(ms, 3) for label, ms in timings.items()}


def build_kernel(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's build function for one kernel, without the tensor-intrinsics import."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return build(mod, target=target)


# ----------------------------------------------------------------------------- pieces
def _database(directory: str) -> Any:
    from tvm.s_tir import meta_schedule as ms

    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise TargetError(f"target 'tvm': option 'tuning_db': cannot create the folder {directory!r}: {exc.strerror}") from None
    return ms.database.JSONDatabase(work_dir=directory)


def _tasks(module: Any, target: Any, tvm_target: Any) -> list[_Task]:
    """The distinct PrimFuncs of `module` as task modules, with their call counts (summed
    over structurally equal functions) and hand schedules."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    text = str(module["main"])
    tasks: list[_Task] = []
    for gvar, func in module.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        calls = max(1, len(re.findall(rf"\b{re.escape(gvar.name_hint)}\b", text)))  # call_tir(name, ...) in main's text
        same = next((t for t in tasks if tvm_ffi.structural_equal(t.mod, mod)), None)
        if same is not None:
            same.names.append(gvar.name_hint)
            same.calls += calls
        else:
            tasks.append(_Task([gvar.name_hint], mod, calls, _hand_schedule(mod, target, tvm_target)))
    return tasks


def _replace(module: Any, name: str, scheduled: Any) -> None:
    """Put the scheduled kernel in place of `module`'s PrimFunc `name`, keeping its symbol."""
    gvar = next(g for g in module.functions if g.name_hint == name)
    func = scheduled.without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
    attrs = module[gvar].attrs
    if attrs is not None and "global_symbol" in attrs:
        func = func.with_attr("global_symbol", attrs["global_symbol"])
    module[gvar] = func


def _hand_schedule(mod: Any, target: Any, tvm_target: Any) -> Any:
    """The first hand rule's schedule of `mod`'s kernel (a traced Schedule), or None."""
    from graphopt.targets.tvm_build import schedule_rules

    for rule in schedule_rules(target):
        sch = rule.apply(mod["main"], tvm_target, False)
        if sch is not None:
            return sch
    return None


def _builder(target: Any) -> Any:
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(max_workers=max(1, target.num_cores or os.cpu_count() or 1), f_build=build_kernel, timeout_sec=60.0)


def _runner(target: Any) -> Any:
    from tvm.s_tir import meta_schedule as ms

    if not target.rpc:
        return ms.runner.LocalRunner(timeout_sec=60.0)
    host, port, key = rpc_address(target.rpc)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=60)
    return ms.runner.RPCRunner(rpc_config=config)


def rpc_address(rpc: dict[str, Any]) -> tuple[str, int, str]:
    """(host, port, key) of the `rpc` option; TargetError naming what is wrong."""
    example = "rpc={tracker: \"127.0.0.1:9190\", key: cpu}"
    unknown = sorted(set(rpc) - {"tracker", "key"})
    if unknown:
        raise TargetError(f"target 'tvm': option 'rpc': unknown entries {unknown}; it takes tracker and key, e.g. {example}")
    tracker, key = str(rpc.get("tracker", "")), str(rpc.get("key", ""))
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit() or not key:
        raise TargetError(f"target 'tvm': option 'rpc' needs tracker \"host:port\" and the servers' key, e.g. {example}; got {rpc!r}")
    return host, int(port), key


def _measure_hand(tasks: list[_Task], database: Any, tvm_target: Any, builder: Any, runner: Any) -> dict[str, float]:
    """Milliseconds of each task's hand schedule: read from the database when it holds the
    task already, else measured now and committed; tasks whose measurement fails are left out."""
    from tvm.s_tir import meta_schedule as ms

    known, pending = {}, []
    for task in tasks:
        if task.hand is None:
            continue
        record = _best_record(database, task, tvm_target)
        if record is not None:
            known[task.name] = _hand_ms(database, task, tvm_target)
        else:
            pending.append(task)
    if pending:
        _status(f"tvm tuning: measuring the hand schedules of {len(pending)} kernels")
        built = builder.build([ms.builder.BuilderInput(t.hand.mod, tvm_target) for t in pending])
        inputs, ran = [], []
        for task, result in zip(pending, built):
            if result.error_msg is not None:
                log.info("tvm tuning: kernel %s could not be built for measuring (kept untuned): %s", task.name, last_line(result.error_msg))
            else:
                inputs.append(ms.runner.RunnerInput(result.artifact_path, "cuda" if tvm_target.kind.name == "cuda" else "cpu", ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])))
                ran.append(task)
        for task, future in zip(ran, runner.run(inputs)):
            result = future.result()
            if result.error_msg is not None or not result.run_secs:
                log.info("tvm tuning: kernel %s could not be measured (kept untuned): %s", task.name, last_line(result.error_msg or ""))
                continue
            workload = database.commit_workload(task.mod)
            args = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
            database.commit_tuning_record(ms.database.TuningRecord(task.hand.trace, workload, result.run_secs, tvm_target, args))
            known[task.name] = _secs_ms(result.run_secs)
    return {name: ms_ for name, ms_ in known.items() if ms_ is not None}


def _hand_ms(database: Any, task: _Task, tvm_target: Any) -> Optional[float]:
    """The hand schedule's recorded time: that of the fastest record whose trace samples
    nothing (the hand trace; MetaSchedule's candidates sample tile sizes and unroll factors)."""
    workload = database.commit_workload(task.mod)
    records = database.get_top_k(workload, 1 << 20)
    hand = [r for r in records if not any(i.kind.name.startswith("Sample") for i in r.trace.insts)]
    return _record_ms(hand[0]) if hand else None


def _to_tune(tasks: list[_Task], hand: dict[str, float], database: Any, tvm_target: Any) -> list[_Task]:
    """The untuned tasks among those making up `COVERED` of the measured time, costliest first."""
    measured = sorted((t for t in tasks if t.name in hand), key=lambda t: -hand[t.name] * t.calls)
    total = sum(hand[t.name] * t.calls for t in measured)
    chosen, covered = [], 0.0
    for task in measured:
        if total and covered >= COVERED * total:
            break
        covered += hand[task.name] * task.calls
        workload = database.commit_workload(task.mod)
        if len(database.get_top_k(workload, 2)) < 2:
            chosen.append(task)
    return chosen


def _search(tasks: list[_Task], database: Any, tvm_target: Any, builder: Any, runner: Any, budget: Budget,
            hand: dict[str, float]) -> tuple[int, bool]:
    """Run MetaSchedule on `tasks` within `budget`; (trials measured, interrupted). Only its
    warnings are shown (at INFO it prints tables on stdout); the tasks log to graphopt's
    `graphopt.targets.tvm.search` logger (MetaSchedule's own per-task log files are not
    made: its logging setup fails when called twice in a process with unnamed handlers)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    progress = _Progress(tasks, hand, budget)

    @derived_object
    class _BudgetCallback(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, candidates: Any, builder_results: Any, runner_results: Any) -> None:
            progress.measured(task_id, runner_results)
            if progress.out_of_time():  # tune_tasks itself stops at max_trials_global
                for index, state in enumerate(task_scheduler.tasks_):
                    if not state.is_terminated:
                        task_scheduler.terminate_task(index)

    console = logging.getLogger("tvm.s_tir.meta_schedule")
    if console.level == logging.NOTSET:
        console.setLevel(logging.WARNING)
    search_log = logging.getLogger("graphopt.targets.tvm.search")
    if search_log.level == logging.NOTSET:
        search_log.setLevel(logging.WARNING)
    contexts = [
        ms.TuneContext(mod=t.mod, target=tvm_target, space_generator="post-order-apply", search_strategy=_strategy(budget),
                       task_name=t.name, logger=search_log, rand_state=index + 1, num_threads=max(1, os.cpu_count() or 1)).clone()
        for index, t in enumerate(tasks)
    ]
    limit = budget.trials or 1 << 30
    interrupted = False
    try:
        ms.tune_tasks(tasks=contexts, task_weights=[float(t.calls) for t in tasks], work_dir=tempfile.gettempdir(), max_trials_global=limit,
                      num_trials_per_iter=min(TRIALS_PER_ROUND, budget.trials or TRIALS_PER_ROUND), builder=builder, runner=runner, database=database,
                      cost_model=_cost_model(), measure_callbacks=ms.MeasureCallback.create("default") + [_BudgetCallback()],
                      task_scheduler="round-robin")
    except KeyboardInterrupt:
        interrupted = True
    except RuntimeError as exc:
        if "KeyboardInterrupt" not in str(exc) and "interrupt" not in str(exc).lower():
            raise
        interrupted = True
    progress.done(interrupted)
    return progress.trials, interrupted


def _strategy(budget: Budget) -> Any:
    """MetaSchedule's evolutionary search; its population (512) shrinks for budgets of a few
    trials, where breeding 512 candidates per round would take most of the time."""
    from tvm.s_tir import meta_schedule as ms

    population = 512 if not budget.trials else min(512, max(64, 8 * budget.trials))
    return ms.search_strategy.EvolutionarySearch(population_size=population, init_min_unmeasured=min(50, population))


def _cost_model() -> str:
    """XGBoost's model when xgboost is installed (the `tvm` extra installs it), else random."""
    try:
        import xgboost  # noqa: F401
    except ImportError:
        log.warning("tvm tuning: xgboost is not installed, so MetaSchedule picks candidates at random (pip install 'graphopt[tvm]')")
        return "random"
    return "xgb"


class _Progress:
    """Trials, elapsed time and the estimated total of the best kernels on stderr."""

    def __init__(self, tasks: list[_Task], hand: dict[str, float], budget: Budget) -> None:
        self.tasks, self.budget = tasks, budget
        self.best = {t.name: hand[t.name] for t in tasks}
        self.start_ms = self._total()
        self.started = time.perf_counter()
        self.trials = 0

    def _total(self) -> float:
        return sum(self.best[t.name] * t.calls for t in self.tasks)

    def measured(self, task_id: int, results: Any) -> None:
        task = self.tasks[task_id]
        for result in results:
            self.trials += 1
            if result.error_msg is None and result.run_secs:
                self.best[task.name] = min(self.best[task.name], _secs_ms(result.run_secs))
        _status(self.line(), rewrite=True)

    def out_of_time(self) -> bool:
        return self.budget.minutes > 0 and (time.perf_counter() - self.started) / 60 >= self.budget.minutes

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        limit = f"/{self.budget.minutes:g}" if self.budget.minutes else ""
        trials = f"/{self.budget.trials}" if self.budget.trials else ""
        return (f"tvm tuning: {self.trials}{trials} trials, {elapsed / 60:.1f}{limit} min, "
                f"tuned kernels {self.start_ms:.2f} -> {self._total():.2f} ms")

    def done(self, interrupted: bool) -> None:
        _status(self.line() + (" (interrupted: keeping what was measured)" if interrupted else ""), rewrite=True, final=True)


def _status(line: str, rewrite: bool = False, final: bool = False) -> None:
    log.info("%s", line)
    stream = sys.stderr
    if not stream.isatty():
        return
    stream.write(("\r" if rewrite else "") + line + ("\n" if final or not rewrite else ""))
    stream.flush()


def _best_record(database: Any, task: _Task, tvm_target: Any) -> Any:
    if not database.has_workload(task.mod):
        return None
    return database.query_tuning_record(task.mod, tvm_target, "main")


def _record_ms(record: Any) -> Optional[float]:
    return _secs_ms(record.run_secs) if record is not None and record.run_secs else None


def _secs_ms(run_secs: Any) -> float:
    values = [float(s) for s in run_secs]
    return 1000 * sum(values) / len(values)
