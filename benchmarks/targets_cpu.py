"""Every graphopt target side by side with ONNX Runtime and torch.compile, on CPU, one run.

    python benchmarks/targets_cpu.py [--models minilm,bert-base] [--batch 1] [--seq 128] [--threads 2]

Per model: ORT on the plain export (the baseline), graphopt `fuse` compiled for each target
(onnxruntime, torch, tvm:llvm), torch eager and torch.compile (inductor). Build time (for
torch.compile: its first, compiling call) is its own column; latencies are medians of
side-by-side rounds (`graphopt.timing`), ratios to the baseline; fidelity is the max abs error
against the baseline's outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _module(name: str):
    import torch
    import transformers

    from graphopt.hf_export import LastHiddenState

    if name == "minilm":
        import model_zoo

        hf = model_zoo.minilm().model.hf_model
    else:
        torch.manual_seed(0)
        hf = transformers.BertModel(transformers.BertConfig())
    return LastHiddenState(hf, ("input_ids", "attention_mask")).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--targets", default="onnxruntime,torch,tvm:llvm")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from graphopt import bench
    from graphopt.frontends.onnx_import import from_onnx
    from graphopt.model_sources import ModelSource

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    print(f"batch {args.batch}, seq {args.seq}, {args.threads} threads, {args.repeats} timed calls each, side by side (graphopt.timing); machine: {bench.machine_description()}")
    for name in args.models.split(","):
        module = _module(name)
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "model.onnx")
            ids = torch.ones(2, 16, dtype=torch.int64)
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
            with torch.no_grad():
                torch.onnx.export(module, (ids, torch.ones_like(ids)), path, dynamo=False, opset_version=17,
                                  input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"], dynamic_axes=axes)
            module.eval()
            original = from_onnx(path)
            feeds = bench.bench_inputs(original, args.batch, args.seq)
            sizes = {"batch": args.batch, "seq": args.seq}
            source = ModelSource(path, module, ("input_ids", "attention_mask"))
            contenders = [bench._ort_contender("ORT (plain export)", path, args.threads, original, sizes)]
            for target in args.targets.split(","):
                try:
                    contenders.append(bench._graphopt_contender(path, "fuse", target, args.threads, sizes))
                except Exception as exc:
                    print(f"{name}: graphopt -> {target} failed: {str(exc).splitlines()[0]}")
            contenders += [bench._torch_contender("eager", source, args.threads), bench._torch_contender("inductor", source, args.threads)]
            bench._time_all(contenders, feeds, args.warmup, args.repeats, args.threads, lambda message: None)
            bench._fill_ratios_and_fidelity(contenders, feeds)
        print(f"\n**{name}**\n")
        print("| contender | build s | median ms | ratio to ORT | max err |")
        print("| --- | --- | --- | --- | --- |")
        for c in contenders:
            r = c.row
            build = "-" if r.build_s is None else f"{r.build_s:.1f}"
            median = "-" if r.median_ms is None else f"{r.median_ms:.1f}"
            ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
            error = "-" if r.max_error is None else f"{r.max_error:.1e}"
            print(f"| {r.label} | {build} | {median} | {ratio} | {error} |")


if __name__ == "__main__":
    main()
