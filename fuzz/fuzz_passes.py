"""Seeded long fuzz run of the IR, the ONNX round trip and every lossless pass.

    python fuzz/fuzz_passes.py --minutes 10 [--seed 0] [--batch 50]

Draws graphs from `tests/fuzz_graphs.random_graphs()` (the strategy the property tests use)
in batches of `--batch` examples, each batch under its own hypothesis seed (`--seed` + batch
number), so any failure reproduces from the seed printed with it. For every graph:
- the IR verifies, and an ONNX round trip (`to_onnx` -> `from_onnx`) verifies and gives the
  same outputs in ONNX Runtime;
- for each pass `tests/passes/test_differential.py` puts under test (every registered pass
  with `lossless = True`, plus its rewriter-based pass; the sample inputs serve as
  calibration data for passes that want some) on a copy: the graph still verifies
  and keeps its input/output names, outputs stay within 1e-5 (relative above 1), a pass
  reporting no change left the printed IR as it was, and a second run changes nothing.
Failures are recorded, not raised, so the run goes on; each is printed with its seed, pass,
problem and input graph. Ends with the figures: graphs tried, pass runs, failures.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from fuzz_graphs import random_graphs  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

import graphopt  # noqa: E402
from graphopt import Graph, PassContext  # noqa: E402
from graphopt.check import max_abs_error, run_graph, sample_inputs  # noqa: E402

TOLERANCE = 1e-5


class Tally:
    """Running figures of one fuzz run."""

    def __init__(self) -> None:
        self.graphs = 0
        self.pass_runs = 0
        self.failures: list[str] = []
        self.per_pass: dict[str, int] = {}


def _passes() -> list[type]:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "passes"))
    from test_differential import passes_under_test

    return passes_under_test()


def _check_round_trip(graph: Graph, feeds: dict[str, Any], expected: list[Any]) -> Optional[str]:
    back = graphopt.from_onnx(graph.to_onnx())
    back.verify()
    if [v.name for v in back.outputs] != [v.name for v in graph.outputs]:
        return "the ONNX round trip renamed the outputs"
    error = max_abs_error(expected, run_graph(back, feeds))
    return None if error == 0 else f"the ONNX round trip moved the outputs by {error:g}"


def _check_pass(pass_cls: type, graph: Graph, feeds: dict[str, Any], expected: list[Any]) -> Optional[str]:
    work = graph.clone()
    first = pass_cls().run(work, PassContext(calibration=[feeds]))
    printed = str(work)
    work.verify()
    if [v.name for v in work.inputs] != [v.name for v in graph.inputs] or [v.name for v in work.outputs] != [v.name for v in graph.outputs]:
        return "input or output names changed"
    if not first.changed and printed != str(graph):
        return "reported no change but the IR changed"
    scale = max([1.0] + [float(np.max(np.abs(out))) for out in expected if np.size(out)])
    error = max_abs_error(expected, run_graph(work, feeds))
    if error > TOLERANCE * scale:
        return f"outputs moved by {error:g}"
    second = pass_cls().run(work, PassContext(calibration=[feeds]))
    if second.changed or str(work) != printed:
        return f"a second run changed the graph again: {second.stats}"
    return None


def _guarded(check: Callable[[], Optional[str]]) -> Optional[str]:
    try:
        return check()
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"


def run_batch(batch_seed: int, examples: int, passes: list[type], tally: Tally, deadline: float) -> None:
    """Fuzz `examples` graphs drawn under hypothesis seed `batch_seed` (stops at `deadline`)."""

    @seed(batch_seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(graph=random_graphs())
    def fuzz(graph: Graph) -> None:
        if time.monotonic() > deadline:
            return
        tally.graphs += 1
        problems = []
        feeds = sample_inputs(graph)
        expected = run_graph(graph, feeds)
        problem = _guarded(lambda: _check_round_trip(graph, feeds, expected))
        if problem:
            problems.append(("onnx-round-trip", problem))
        for pass_cls in passes:
            tally.pass_runs += 1
            tally.per_pass[pass_cls.name] = tally.per_pass.get(pass_cls.name, 0) + 1
            problem = _guarded(lambda: _check_pass(pass_cls, graph, feeds, expected))
            if problem:
                problems.append((pass_cls.name, problem))
        for name, problem in problems:
            report = f"seed {batch_seed}, example {tally.graphs}, {name}: {problem}\ninput graph:\n{graph}"
            tally.failures.append(report)
            print("FAILURE " + report, flush=True)

    fuzz()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first batch (default 0)")
    parser.add_argument("--batch", type=int, default=50, help="graphs per hypothesis seed (default 50)")
    args = parser.parse_args(argv)
    passes = _passes()
    print(f"passes under test: {', '.join(p.name for p in passes)}", flush=True)
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.minutes * 60
    batch_seed = args.seed
    while time.monotonic() < deadline:
        run_batch(batch_seed, args.batch, passes, tally, deadline)
        elapsed = time.monotonic() - start
        print(f"[{elapsed:6.0f} s] seeds {args.seed}..{batch_seed}: {tally.graphs} graphs, "
              f"{tally.pass_runs} pass runs, {len(tally.failures)} failures", flush=True)
        batch_seed += 1
    elapsed = time.monotonic() - start
    print(f"done: {tally.graphs} graphs ({tally.graphs / elapsed:.1f}/s) through the ONNX round trip and "
          f"{len(passes)} passes = {tally.pass_runs} pass runs in {elapsed:.0f} s, seeds {args.seed}..{batch_seed - 1}; "
          f"failures: {len(tally.failures)}")
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
