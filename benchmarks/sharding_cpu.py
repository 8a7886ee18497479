"""Tensor parallelism on CPU: 1 process x 2 threads vs 2 gloo ranks x 1 thread.

    python benchmarks/sharding_cpu.py [--repeats 10] [--models bert-base,llama-100m]

Models (random weights, seed 0, exported with `graphopt.hf_export`): BERT-base (encoder,
batch 1, seq 128) and a ~100M-parameter LLaMA (8 layers, hidden 1024, 16 heads / 4 KV heads,
vocabulary 32000) at prefill (seq 128, past 0) and at one decode step (seq 1, past 128).
Contenders, all `fuse` on the torch target, timed side by side in one run (`graphopt.timing`):
- `1 x 2 threads`: `graphopt.compile(..., "torch")` in this process, 2 torch threads;
- `1 x 1 thread`: the same with 1 thread (the work one rank would do without splitting);
- `2 ranks x 1 thread`: `graphopt.compile(..., world_size=2)`: `shard{tp=2}`, two processes,
  one thread each, an all-reduce (gloo, loopback) after every attention output projection and
  FFN down projection, inputs sent to both ranks and the full outputs back over pipes.
Ratios are to `1 x 2 threads`. Per-rank weight bytes and peak resident memory (VmHWM) come
from the ranks themselves; the one-process figure is a fresh process doing what a rank does
(load the fused graph, compile it for the torch target), and the torch-import baseline, a
fresh process that only imports torch and the target, is subtracted from both.
On one 2-core machine tensor parallelism cannot beat two threads in one process: the same
cores do the same arithmetic, plus gloo's all-reduces (2 per layer) and the pipe transfers;
the table says what that costs. What it buys is memory per rank (and, on several machines or
GPUs, compute): see the bytes column.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt.bench import machine_description  # noqa: E402
from graphopt.distributed import compile_sharded, weight_bytes  # noqa: E402
from graphopt.hf_export import build_hf_model, decoder_example_inputs, export_hf  # noqa: E402
from graphopt.timing import time_interleaved  # noqa: E402

LLAMA_100M = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816, vocab_size=32000)


def _say(text: str) -> None:
    print(f"sharding_cpu: {text}", file=sys.stderr, flush=True)


def _export(name: str, folder: str) -> tuple[str, list[tuple[str, dict[str, np.ndarray]]]]:
    """(ONNX path, [(case, feeds)]) of model `name`."""
    import transformers

    path = os.path.join(folder, f"{name}.onnx")
    if name == "bert-base":
        model, config = build_hf_model(config=transformers.BertConfig(), task="encoder")
        export_hf(model, config, path, task="encoder")
        ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 128))
        return path, [("batch 1, seq 128", {"input_ids": ids, "attention_mask": np.ones_like(ids)})]
    if name == "llama-100m":
        model, config = build_hf_model(config=transformers.LlamaConfig(**LLAMA_100M), task="causal-lm")
        export_hf(model, config, path, task="causal-lm")
        return path, [
            ("prefill, seq 128", decoder_example_inputs(config, batch=1, seq=128, past=0)),
            ("decode step, past 128", decoder_example_inputs(config, batch=1, seq=1, past=128)),
        ]
    raise SystemExit(f"unknown model {name!r}; expected bert-base or llama-100m")


_PEAK = """
import json, sys
import graphopt, graphopt.targets.torch
from graphopt.distributed import peak_rss_bytes
if sys.argv[1:]:
    compiled = graphopt.compile(sys.argv[1], "torch", "eliminate-dead-code")
print(json.dumps(peak_rss_bytes()))
"""


def _peak_mb(*args: str) -> float:
    """Peak resident memory (MB) of a fresh process: importing torch and the target, and
    compiling the graph file in `args` if given."""
    out = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1]) / 1e6


def _single(path: str, threads: int):
    torch.set_num_threads(threads)
    compiled = graphopt.compile(path, "torch", "fuse")

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch.set_num_threads(threads)
        return compiled(**feeds)

    return compiled, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert-base,llama-100m")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"1 process x 2 threads vs 2 gloo ranks x 1 thread, fuse on the torch target, {args.repeats} timed calls each, "
          f"side by side (graphopt.timing); machine: {machine_description()}")
    baseline = _peak_mb()
    print(f"peak resident memory of a process that imports torch and the target: {baseline:.0f} MB (subtracted below)\n")
    print("| model | input | 1 x 2 threads ms | 1 x 1 thread ms | 2 ranks x 1 thread ms | tp=2 / 1x2 | max abs diff tp=2 "
          "| weights, one process | weights per rank | peak RSS - torch import, one process | per rank |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            _say(f"exporting {name}")
            path, cases = _export(name, folder)
            two, run_two = _single(path, 2)
            fused = os.path.join(folder, f"{name}.fused.onnx")
            two.graph.save_onnx(fused, keep_graphopt_ops=True)
            single_peak = _peak_mb(fused) - baseline
            _, run_one = _single(path, 1)
            _say(f"starting 2 ranks for {name}")
            with compile_sharded(path, tp=2, pipeline="fuse", target="torch", threads=1) as sharded:
                for case, feeds in cases:
                    runners = {"two": lambda f=feeds: run_two(f), "one": lambda f=feeds: run_one(f), "tp": lambda f=feeds: sharded(**f)}
                    for runner in runners.values():
                        for _ in range(args.warmup):
                            runner()
                    _say(f"timing {name}, {case}")
                    times = time_interleaved(runners, args.repeats)
                    medians = {key: float(np.median(value)) for key, value in times.items()}
                    diff = max(float(np.abs(a - b).max()) for a, b in zip(run_two(feeds), sharded(**feeds)))
                    per_rank = ", ".join(f"{r['weight_bytes'] / 1e6:.0f}" for r in sharded.ranks)
                    rank_peaks = ", ".join(f"{r['peak_rss_bytes'] / 1e6 - baseline:.0f}" for r in sharded.ranks)
                    print(f"| {name} | {case} | {medians['two']:.1f} | {medians['one']:.1f} | {medians['tp']:.1f} | "
                          f"{medians['tp'] / medians['two']:.2f}x | {diff:.1e} | {weight_bytes(two.graph) / 1e6:.0f} MB | {per_rank} MB "
                          f"| {single_peak:.0f} MB | {rank_peaks} MB |")
    print("\nGPU plan (NCCL): the same `graphopt.compile(..., world_size=N)` with target `torch:cuda` runs rank R on "
          "cuda:R with the NCCL backend; it needs N GPUs in one machine (the lent machine has one), so it has not run.")


if __name__ == "__main__":
    main()
