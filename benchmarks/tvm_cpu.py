"""TVM (graphopt's `tvm:llvm` target) untuned, static and tuned, against ONNX Runtime fp32 and
TVM's own MetaSchedule flow, on CPU, one run, side by side.

For each model (the real all-MiniLM-L6-v2; BERT-base with random weights), batch 1, seq 128:

- **ORT fp32**: an ONNX Runtime session on the plain export (the reference of the ratios);
- **graphopt symbolic**: `tvm:llvm` with symbolic batch/seq (one build serves every shape);
- **graphopt static**: `tune_shapes={batch: 1, seq: 128}`, hand schedules, no tuning;
- **graphopt tuned N min**: the same bucket tuned for N minutes (a fresh database each);
- **TVM MetaSchedule**: TVM's own flow on the same model: `torch.export` and
  `relax.frontend.torch.from_exported_program` (TVM's ONNX importer fails on the export),
  legalize + fuse, `meta_schedule.tune_relax` with as many trials as graphopt measured in its
  longest budget, `MetaScheduleApplyDatabase` and `tvm.compile` (graphopt's kernel builder, as
  the stock one times out importing tensor intrinsics on 2 cores; `compile_relax` returns
  an unscheduled build in 0.27).

Times are medians of interleaved rounds with ORT (`graphopt.timing.time_interleaved`), all
with the same thread count; tuning time is its own column. Prints markdown.

    python benchmarks/tvm_cpu.py [--models minilm,bert-base] [--minutes 2,5,10] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

Runner = Callable[[], Any]


def _say(text: str) -> None:
    print(f"[tvm_cpu {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _export(name: str, folder: str, seq: int) -> tuple[Any, pathlib.Path, dict[str, np.ndarray]]:
    """(torch module, ONNX export, feeds of one real sentence padded to `seq`)."""
    import quantization_cpu

    module, tokenizer, _, _ = quantization_cpu.load_model(name)
    path = pathlib.Path(folder) / f"{name}.onnx"
    quantization_cpu.export(module, tokenizer, path, seq)
    feeds = quantization_cpu.encode(tokenizer, ["The quick brown fox jumps over the lazy dog. " * 12], seq)[0]
    return module, path, feeds


def _graphopt(path: pathlib.Path, spec: str) -> tuple[Any, float]:
    import graphopt

    start = time.perf_counter()
    compiled = graphopt.compile(str(path), spec, "fuse")
    return compiled, time.perf_counter() - start


def _tvm_metaschedule(module: Any, feeds: dict[str, np.ndarray], threads: int, trials: int, work_dir: str) -> tuple[Runner, float, Any]:
    """TVM's own flow: torch.export, `relax.frontend.torch` import, legalize + fuse,
    tune_relax, the database applied, tvm.compile (TVM's ONNX importer fails on these exports:
    broadcast_to)."""
    import torch
    import tvm
    from tvm import relax
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.s_tir import meta_schedule as ms
    from tvm.target import codegen

    from graphopt.targets.tvm_tuning import build_kernel

    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(module, tuple(torch.from_numpy(v) for v in feeds.values()))
        mod, params = detach_params(from_exported_program(program, keep_params_as_input=True))
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": threads})
    with target:
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    builder = ms.builder.LocalBuilder(max_workers=threads, f_build=build_kernel, timeout_sec=60.0)
    with contextlib.redirect_stdout(sys.stderr):  # MetaSchedule binds its INFO log handler to stdout here
        database = ms.relax_integration.tune_relax(mod, {}, target, work_dir, max_trials_global=trials, builder=builder,
                                                   num_trials_per_iter=32)
    # meta_schedule.compile_relax (0.27) re-runs legalization and returns an unscheduled build
    # (MiniLM: 1970 ms against 63 ms for the same 64-trial database applied as below).
    with target, database, tvm.transform.PassContext(opt_level=3):
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    executable = tvm.compile(mod, target)
    seconds = time.perf_counter() - start
    vm = relax.VirtualMachine(executable, tvm.cpu())
    weights = [tvm.runtime.tensor(p) for p in params["main"]]
    inputs = [tvm.runtime.tensor(feeds[name]) for name in feeds]

    def outputs() -> list[np.ndarray]:
        result = vm["main"](*inputs, *weights)
        return [r.numpy() for r in (result if not hasattr(result, "numpy") else [result])]

    return lambda: vm["main"](*inputs, *weights), seconds, outputs


def run_model(name: str, args: argparse.Namespace, folder: str) -> tuple[list[str], list[str]]:
    """The model's rows of the main table and of the kernel table."""
    import quantization_cpu

    from graphopt.timing import time_interleaved

    _say(f"exporting {name}")
    module, path, feeds = _export(name, folder, args.seq)
    session = quantization_cpu.session(str(path), args.threads)
    expected = session.run(None, feeds)[0]
    base = f"tvm:llvm{{num_cores={args.threads}"
    shapes = f"tune_shapes={{batch:1,seq:{args.seq}}}"
    columns: dict[str, tuple[Runner, float, float, int]] = {}  # label: (runner, build s, max err, trials)

    def add(label: str, compiled: Any, seconds: float, trials: int = 0) -> None:
        error = float(np.abs(compiled(**feeds)[0] - expected).max())
        columns[label] = (lambda: compiled(**feeds), seconds, error, trials)

    _say(f"{name}: graphopt symbolic")
    add("graphopt symbolic", *_graphopt(path, base + "}"))
    _say(f"{name}: graphopt static")
    add("graphopt static (hand schedules)", *_graphopt(path, f"{base},{shapes}}}"))
    most_trials, kernels = 0, []
    for minutes in args.minutes:
        _say(f"{name}: graphopt tuned {minutes:g} min")
        database = tempfile.mkdtemp(prefix=f"db-{name}-{minutes:g}-", dir=folder)
        compiled, seconds = _graphopt(path, f"{base},{shapes},tune_minutes={minutes},tuning_db={database!r}}}")
        report = compiled.buckets[0].report
        most_trials = max(most_trials, report["trials"])
        kernels = report["kernels"]
        timed = ", ".join(f"{label} {ms:.1f} ms" for label, ms in report.get("module_ms", {}).items())
        add(f"graphopt tuned {minutes:g} min (uses the {report['uses']} module; at build: {timed})", compiled, seconds, report["trials"])
    if args.metaschedule and most_trials:
        _say(f"{name}: TVM MetaSchedule, {most_trials} trials")
        runner, seconds, outputs = _tvm_metaschedule(module, feeds, args.threads, most_trials, tempfile.mkdtemp(prefix="ms-", dir=folder))
        error = float(np.abs(outputs()[0] - expected).max())
        columns[f"TVM MetaSchedule ({most_trials} trials)"] = (runner, seconds, error, most_trials)

    _say(f"{name}: timing")
    runners = {"ORT fp32": lambda: session.run(None, feeds), **{label: c[0] for label, c in columns.items()}}
    for runner in runners.values():
        runner()
    times = time_interleaved(runners, args.repeats)
    ort_ms = float(np.median(times["ORT fp32"]))
    rows = [f"| {name} | ORT fp32 | {ort_ms:.1f} | 1.00x | - | - | - |"]
    for label, (_, seconds, error, trials) in columns.items():
        median = float(np.median(times[label]))
        rows.append(f"| {name} | {label} | {median:.1f} | {median / ort_ms:.2f}x | {seconds:.0f} | {trials or '-'} | {error:.1e} |")
    return rows, _kernel_rows(name, kernels, args.minutes[-1] if args.minutes else 0)


def _kernel_rows(name: str, kernels: list[dict[str, Any]], minutes: float) -> list[str]:
    """The costliest kernels of the longest tuning run: hand and tuned time per call, calls."""
    measured = sorted((k for k in kernels if k["hand_ms"] is not None), key=lambda k: -k["hand_ms"] * k["calls"])
    total = sum(k["hand_ms"] * k["calls"] for k in measured) or 1.0
    return [f"| {name} | `{k['name']}` | {k['calls']} | {k['hand_ms']:.3f} | {k['best_ms']:.3f} | {k['hand_ms'] * k['calls'] / total:.0%} |"
            for k in measured[:8]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--minutes", default="2,5,10", help="tuning budgets, comma-separated")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-metaschedule", dest="metaschedule", action="store_false", help="skip TVM's own flow")
    args = parser.parse_args()
    args.minutes = [float(m) for m in args.minutes.split(",") if m]
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import logging

    import run_all

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)  # its INFO tables go to stdout

    rows, kernel_rows = [], []
    with tempfile.TemporaryDirectory(prefix="graphopt-tvm-bench-") as folder:
        for name in args.models.split(","):
            model_rows, model_kernels = run_model(name, args, folder)
            rows += model_rows
            kernel_rows += model_kernels
            _say("rows so far:\n" + "\n".join(rows + kernel_rows))
    print(run_all.header())
    print(f"\nBatch 1, seq {args.seq}, {args.threads} threads; pipeline `fuse`; ms: median of {args.repeats} interleaved calls; "
          "ratio to ORT fp32 in the same run (below 1 is faster); build s includes tuning.\n")
    print("| model | build | ms | vs ORT fp32 | build s | trials | max abs diff vs ORT |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if kernel_rows:
        print(f"\nCostliest kernels of the {args.minutes[-1]:g}-minute run (graphopt's static module; ms per call, "
              "measured by MetaSchedule's runner; share of the hand-scheduled total):\n")
        print("| model | kernel | calls | hand ms | best ms | share |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join(kernel_rows))


if __name__ == "__main__":
    main()
