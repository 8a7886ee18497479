"""The whole ONNX backend node test conformance run: every case ONNX Runtime passes, every step.

    python benchmarks/conformance.py                  # all steps, 2 worker processes
    python benchmarks/conformance.py --jobs 4 --steps roundtrip,to_fx --cases 'test_gather*'
    python benchmarks/conformance.py --update         # also rewrite tests/conformance/expected_refusals.json

Each (case, step) runs in a worker process (`--jobs` of them, each handling many cases); a
worker that dies (a segfault) or runs past `--timeout` seconds gives that case a `crash` and
is replaced. Results are written as JSON lines (`--results`); a full run (no `--cases`, all
steps) also writes the table per step to docs/conformance.md. With `--update`, the refusals
of the steps run replace those steps' entries of the expectation file (for the cases run).
The outcomes are defined in `tests/conformance/runner.py`. Exit status 1 if any case failed
(wrong / crash / invalid) or a refusal differs from the expectation file.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import fnmatch
import json
import os
import pathlib
import platform
import queue
import subprocess
import sys
import threading
import time
from typing import Any, Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
# `conformance` is tests/conformance, not this script: take the script's folder off the path.
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT / "tests"))

from conformance import cases as case_store  # noqa: E402
from conformance import expectations  # noqa: E402
from conformance.runner import FAILURES, KINDS, STEPS, Outcome  # noqa: E402

DOC = ROOT / "docs" / "conformance.md"
MAX_LINES = 60
"""Most failure / expectation lines printed."""


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps (default: all)")
    parser.add_argument("--cases", default=None, help="fnmatch pattern(s) of case names, comma-separated")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case and step")
    parser.add_argument("--results", default=None, help="JSON-lines output (default: a temporary file)")
    parser.add_argument("--update", action="store_true", help="rewrite the expected refusals of the steps run")
    parser.add_argument("--doc", default=None, help="write the table here (default: docs/conformance.md on a full run)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker()
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {unknown}; steps: {', '.join(STEPS)}")
    names = case_store.passing_cases()
    if args.cases:
        patterns = args.cases.split(",")
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    tasks = [(name, step) for step in steps for name in names]
    started = time.time()
    results = _run_all(tasks, args.jobs, args.timeout)
    elapsed = time.time() - started
    results_path = pathlib.Path(args.results) if args.results else None
    if results_path:
        with open(results_path, "w") as f:
            for (name, step), outcome in sorted(results.items()):
                f.write(json.dumps({"case": name, "step": step, **outcome.__dict__}) + "\n")
    table = render_table(results, steps, len(names), elapsed, args.jobs)
    print(table)
    full = args.cases is None and steps == list(STEPS)
    doc = pathlib.Path(args.doc) if args.doc else (DOC if full else None)
    if doc:
        _write_doc(doc, table)
        print(f"wrote {doc}")
    problems = _problems(results)
    if args.update:
        expectations.update({(n, s): o for (n, s), o in results.items()}, steps, set(names))
        print(f"updated {expectations.PATH}")
    else:
        problems += expectations.differences({(n, s): o for (n, s), o in results.items()})
    for line in problems[:MAX_LINES]:
        print(line)
    if len(problems) > MAX_LINES:
        print(f"... and {len(problems) - MAX_LINES} more (--update rewrites the expectation file)")
    return 1 if problems else 0


def _problems(results: dict[tuple[str, str], Outcome]) -> list[str]:
    return [
        f"FAIL {step} {name}: {o.kind}: {o.detail}"
        for (name, step), o in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        if o.kind in FAILURES
    ]


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------


def _worker() -> int:
    """Read "case<TAB>step" lines on stdin, answer one JSON line each on the original stdout
    (everything else the libraries print goes to stderr)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    from conformance.runner import run_case

    for line in sys.stdin:
        name, step = line.rstrip("\n").split("\t")
        outcome = run_case(case_store.load_case(name), step)
        out.write(json.dumps(outcome.__dict__) + "\n")
    return 0


class _Worker:
    """One worker process; `run` gives it a task and returns its outcome, restarting it when
    it dies or times out."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.proc: Optional[subprocess.Popen] = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS="1", TVM_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        return subprocess.Popen(
            [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
        )

    def run(self, name: str, step: str) -> Outcome:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(self.timeout, kill)
        timer.start()
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"{name}\t{step}\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        finally:
            timer.cancel()
        if line:
            return Outcome(**json.loads(line))
        code = proc.wait()
        self.proc = None
        if timed_out.is_set():
            return Outcome("crash", detail=f"timeout: no result after {self.timeout:.0f} s")
        return Outcome("crash", detail=f"worker process died (exit status {code})")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait()


def _run_all(tasks: list[tuple[str, str]], jobs: int, timeout: float) -> dict[tuple[str, str], Outcome]:
    """Outcomes of every (case, step), computed by `jobs` workers, with a progress line."""
    todo: "queue.Queue[tuple[str, str]]" = queue.Queue()
    for task in tasks:
        todo.put(task)
    results: dict[tuple[str, str], Outcome] = {}
    lock = threading.Lock()

    def serve() -> None:
        worker = _Worker(timeout)
        try:
            while True:
                try:
                    name, step = todo.get_nowait()
                except queue.Empty:
                    return
                outcome = worker.run(name, step)
                with lock:
                    results[(name, step)] = outcome
                    if len(results) % 100 == 0 or len(results) == len(tasks):
                        print(f"  {len(results)}/{len(tasks)}", file=sys.stderr, flush=True)
        finally:
            worker.close()

    threads = [threading.Thread(target=serve) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def render_table(results: dict[tuple[str, str], Outcome], steps: list[str], n_cases: int, elapsed: float, jobs: int) -> str:
    """Markdown: outcome counts per step, then refusals grouped by op and every failure."""
    import onnx
    import onnxruntime

    counts = {step: collections.Counter() for step in steps}
    refusals: dict[str, collections.Counter] = {step: collections.Counter() for step in steps}
    for (name, step), outcome in results.items():
        counts[step][outcome.kind] += 1
        if outcome.kind == "refused":
            refusals[step][outcome.op] += 1
    lines = [
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} "
        f"({os.cpu_count()} cores, {jobs} workers, {elapsed / 60:.0f} min): onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, {n_cases} cases (those ONNX Runtime passes).",
        "",
        "| step | " + " | ".join(KINDS) + " |",
        "| --- | " + " | ".join("---:" for _ in KINDS) + " |",
    ]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(str(counts[step][k]) for k in KINDS) + " |")
    lines += ["", "### Refusals by op", ""]
    for step in steps:
        if refusals[step]:
            ops = ", ".join(f"{op} ({n})" if n > 1 else op for op, n in sorted(refusals[step].items()))
            lines.append(f"- **{step}** ({sum(refusals[step].values())}): {ops}")
    failures = [(step, name, o) for (name, step), o in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])) if o.kind in FAILURES]
    lines += ["", "### Failures", ""]
    if not failures:
        lines.append("None.")
    for step, name, o in failures:
        lines.append(f"- {step} `{name}`: {o.kind}: {o.detail.replace('|', '/')[:240]}")
    return "\n".join(lines) + "\n"


_BEGIN = "<!-- conformance table: written by benchmarks/conformance.py -->"
_END = "<!-- end of conformance table -->"


def _write_doc(path: pathlib.Path, table: str) -> None:
    """Replace the generated part of `path` (between the markers) with `table`."""
    text = path.read_text() if path.exists() else f"# Conformance\n\n{_BEGIN}\n{_END}\n"
    head, rest = text.split(_BEGIN, 1)
    _, tail = rest.split(_END, 1)
    path.write_text(f"{head}{_BEGIN}\n{table}{_END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
