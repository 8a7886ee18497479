"""ONNX Runtime on CPU: the plain export vs ORT's transformer optimizer vs graphopt `fuse`.

BERT-base (random weights, `transformers.BertModel(BertConfig())`, transformers' default
SDPA attention; `bert-base-eager` is the same with eager attention) and the real
all-MiniLM-L6-v2 (`model_zoo.minilm()`, eager attention), exported once by the TorchScript exporter (opset
17, dynamic batch and sequence axes, with the attention-mask input), run at seq 128 and
batch 1 and 8 with 2 intra-op threads, in one process, the variants interleaved call by
call. The last batch row is right-padded by a quarter, so the mask matters.

- ORT plain: the export as is (ORT_ENABLE_ALL, as every variant);
- ORT optimizer: `onnxruntime.transformers.optimizer.optimize_model(path, "bert", num_heads=12,
  hidden_size=...)` (given the head count, it fuses attention where it can);
- graphopt: `graphopt.api.compile(path, "onnxruntime:cpu{threads=2}", "fuse")` (fused ops
  lowered to ORT contrib kernels), and the same with `contrib_ops=false` (fused ops
  decomposed back to standard ONNX) to show what the contrib lowering buys.

Prints a markdown table: median and fastest milliseconds and their ratios to ORT's optimizer
(below 1 is faster; on a shared machine the fastest call is the least disturbed one), plus
each variant's max abs output difference from the plain export.

    python benchmarks/onnxruntime_cpu.py [--repeats 10] [--models minilm,bert-base,bert-base-eager]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import model_zoo  # noqa: E402

import graphopt.api  # noqa: E402
from graphopt.timing import time_interleaved  # noqa: E402

THREADS = 2
SEQ = 128
BATCHES = (1, 8)


class _Encoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state


def _export(name: str, folder: Path) -> Path:
    import transformers

    if name == "minilm":
        module = _Encoder(model_zoo.minilm().model.hf_model).eval()
    else:
        torch.manual_seed(0)
        config = transformers.BertConfig()
        if name == "bert-base-eager":
            config._attn_implementation = "eager"
        module = _Encoder(transformers.BertModel(config)).eval()
    feeds = _feeds(2, 16)
    path = folder / f"{name}.onnx"
    dynamic = {k: {0: "batch", 1: "seq"} for k in feeds} | {"last_hidden_state": {0: "batch", 1: "seq"}}
    with torch.no_grad():
        torch.onnx.export(
            module, tuple(torch.from_numpy(v) for v in feeds.values()), str(path), dynamo=False, opset_version=17,
            input_names=list(feeds), output_names=["last_hidden_state"], dynamic_axes=dynamic,
        )
    return path


def _feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    mask = np.ones((batch, seq), np.int64)
    if batch > 1:
        mask[-1, seq - seq // 4:] = 0
    return {
        "input_ids": rng.integers(1000, 20000, (batch, seq)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }


def _session(path: str) -> Callable[[dict], list]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


HEADS_AND_HIDDEN = {"bert-base": (12, 768), "bert-base-eager": (12, 768), "minilm": (12, 384)}


def _variants(path: Path, folder: Path) -> dict[str, Callable[[dict], list]]:
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = folder / (path.stem + ".ortopt.onnx")
    heads, hidden = HEADS_AND_HIDDEN[path.stem]
    optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden).save_model_to_file(str(optimized))
    contrib = graphopt.api.compile(str(path), f"onnxruntime:cpu{{threads={THREADS}}}", "fuse")
    standard = graphopt.api.compile(str(path), f"onnxruntime:cpu{{threads={THREADS},contrib_ops=false}}", "fuse")
    return {
        "ORT plain": _session(str(path)),
        "ORT optimizer": _session(str(optimized)),
        "graphopt fuse (contrib ops)": lambda feeds: contrib(**feeds),
        "graphopt fuse (standard ops)": lambda feeds: standard(**feeds),
    }


def _measure(variants: dict[str, Callable[[dict], list]], feeds: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Milliseconds of every call, per variant (taken side by side, see graphopt.timing), and max abs output
    differences from the plain export."""
    reference = variants["ORT plain"](feeds)[0]
    errors = {name: float(np.abs(np.asarray(run(feeds)[0]) - reference).max()) for name, run in variants.items()}
    times = time_interleaved({name: functools.partial(run, feeds) for name, run in variants.items()}, repeats)
    return times, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", default="minilm,bert-base,bert-base-eager")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print("| model | batch | variant | median ms | min ms | median ratio to ORT optimizer | min ratio | max abs diff vs plain |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            variants = _variants(_export(name, folder), folder)
            for batch in BATCHES:
                times, errors = _measure(variants, _feeds(batch, SEQ), args.repeats)
                median_base, min_base = statistics.median(times["ORT optimizer"]), min(times["ORT optimizer"])
                for variant, ms in times.items():
                    median, fastest = statistics.median(ms), min(ms)
                    print(
                        f"| {name} | {batch} | {variant} | {median:.1f} | {fastest:.1f} | {median / median_base:.3f} "
                        f"| {fastest / min_base:.3f} | {errors[variant]:.1e} |", flush=True,
                    )


if __name__ == "__main__":
    main()
