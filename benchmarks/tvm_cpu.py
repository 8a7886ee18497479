"""TVM (graphopt's `tvm:llvm` target) against ONNX Runtime fp32 on CPU, one run, side by side.

Exports a model from the test zoo (default: the real all-MiniLM-L6-v2), compiles it with
graphopt's `fuse` pipeline for `tvm:llvm` and, for reference, with TVM's stock `tvm.compile`
(no schedules) on the same Relax module, and times both against an ONNX Runtime session on
the plain export, interleaved rounds, same thread count. Prints a markdown table: ORT ms,
TVM ms, ratio, build seconds (no tuning is done), max abs difference.

    python benchmarks/tvm_cpu.py --model minilm --batch 1 --seq 128 --threads 2
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _token_input(name: str, batch: int, seq: int) -> np.ndarray:
    """Random word-piece ids, a full attention mask, segment 0."""
    if name == "input_ids":
        return np.random.default_rng(0).integers(1000, 30000, (batch, seq), dtype=np.int64)
    if name == "attention_mask":
        return np.ones((batch, seq), dtype=np.int64)
    return np.zeros((batch, seq), dtype=np.int64)


def _graphopt_build(path: pathlib.Path, args: argparse.Namespace):
    from graphopt.api import compile

    compiled = compile(str(path), f"tvm:llvm{{num_cores={args.threads}}}", args.pipeline)
    return lambda feeds: compiled(**{name: feeds[name] for name in compiled.input_names})


def _stock_build(path: pathlib.Path, args: argparse.Namespace):
    """The same Relax module through `tvm.compile`'s default pipeline (no schedules)."""
    import tvm
    from tvm import relax

    from graphopt.api import optimize
    from graphopt.targets.tvm_relax import to_relax

    graph = optimize(str(path), args.pipeline)
    module = to_relax(graph)
    target = tvm.target.Target({"kind": "llvm", "num-cores": args.threads})
    vm = relax.VirtualMachine(tvm.compile(module.module, target), tvm.cpu())
    weights = [tvm.runtime.tensor(p) for p in module.params]
    names = [v.name for v in graph.inputs]
    return lambda feeds: [r.numpy() for r in vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in names], *weights)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="'minilm' or a model_zoo architecture name")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved ORT/TVM rounds; the median round is reported")
    parser.add_argument("--stock", action="store_true", help="also time TVM's stock tvm.compile (slow: ~100x ORT)")
    parser.add_argument("--pipeline", default="fuse")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    import model_zoo
    import onnxruntime as ort

    zm = model_zoo.minilm() if args.model == "minilm" else model_zoo.build(args.model, batch=args.batch, seq=args.seq)
    folder = tempfile.mkdtemp(prefix="graphopt-tvm-bench-")
    path = model_zoo.export_onnx(zm, pathlib.Path(folder) / f"{args.model}.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: _token_input(i.name, args.batch, args.seq) if args.model == "minilm" else zm.inputs[i.name].numpy() for i in session.get_inputs()}
    expected = session.run(None, feeds)

    builds = {"graphopt tvm:llvm": (lambda: _graphopt_build(path, args), args.repeats)}
    if args.stock:
        builds["TVM stock tvm.compile"] = (lambda: _stock_build(path, args), 2)
    rows = []
    for label, (make, repeats) in builds.items():
        start = time.perf_counter()
        run = make()
        build_s = time.perf_counter() - start
        error = max(float(np.abs(a - b).max()) for a, b in zip(expected, run(feeds)))
        rounds = []
        for _ in range(args.rounds):
            ort_ms = _median_ms(lambda: session.run(None, feeds), args.repeats)
            tvm_ms = _median_ms(lambda: run(feeds), repeats)
            rounds.append((tvm_ms / ort_ms, ort_ms, tvm_ms))
        ratio, ort_ms, tvm_ms = sorted(rounds)[len(rounds) // 2]
        rows.append((label, ort_ms, tvm_ms, ratio, build_s, error))

    print(f"\n{args.model}, batch {args.batch}, seq {args.seq}, {args.threads} threads, pipeline '{args.pipeline}'\n")
    print("| build | ORT ms | TVM ms | TVM / ORT | build s (no tuning) | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, ort_ms, tvm_ms, ratio, build_s, error in rows:
        print(f"| {label} | {ort_ms:.1f} | {tvm_ms:.1f} | {ratio:.2f}x | {build_s:.0f} | {error:.1e} |")


if __name__ == "__main__":
    main()
