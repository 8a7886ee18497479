"""LLM decoding on CPU: prefill and per-token decode latency of a KV-cache decoder, every path side by side.

    python benchmarks/llm_decode_cpu.py [--models small,100m] [--batches 1,4] [--past 128,512] [--prefill 128]
                                        [--threads 2] [--warmup 2] [--repeats 10] [--greedy-steps 32]
                                        [--out benchmarks/results/llm_decode_cpu.md]

Models: LLaMA-style decoders built from `transformers.LlamaConfig` with random weights (seed 0, no
downloads): `small` (hidden 256, 4 layers, 8 heads, 2 KV heads, FFN 688, vocab 1000) and `100m`
(hidden 1024, 8 layers, 16 heads, 4 KV heads, FFN 2816, vocab 32000; about 150M parameters with
the untied embedding and LM head), plus `tiny` (hidden 32, 1 layer) for smoke tests. Each is
exported once by the TorchScript exporter (opset 17) in the Optimum "with past" form of
`tests/decoder_zoo.py` (inputs input_ids, attention_mask, position_ids,
past_key_values.{i}.key/value [batch, kv_heads, past, head_dim], batch, seq and past dynamic, past
may be 0; outputs logits, present.{i}.key/value).

Contenders (one column each, all in one process, `--threads` intra-op threads):
- ORT plain: the export in ONNX Runtime (ORT_ENABLE_ALL, as every ORT column);
- ORT optimizer: `onnxruntime.transformers.optimizer.optimize_model(path, model_type="gpt2",
  num_heads, hidden_size)` (the closest type: ORT has no LLaMA type; "qwen3" is gpt2 at level 0);
- onnxscript: `onnxscript.rewriter.ort_fusions.optimize_for_ort` on the export;
- graphopt ORT: `graphopt.compile(path, "onnxruntime:cpu{threads=N}", "fuse")`;
- graphopt ORT, cache in place: the same compiled model with its KV cache in preallocated buffers
  that GroupQueryAttention extends in place (`CompiledModel.in_place_kv_cache`, the loop `graphopt.generate` runs):
  a decode call's buffers hold the row's past, so it copies no cache; prefill copies its presents in;
- graphopt torch: `graphopt.compile(path, "torch", "fuse")` (run on torch tensors);
- torch eager: the HF model (sdpa attention) in the flat signature of `decoder_zoo.DecoderWithPast`
  (a fresh `DynamicCache` from the past tensors on every call, as the ONNX graphs concatenate),
  under no_grad;
- torch inductor: `torch.compile(wrapper, dynamic=True)`;
- torch.compile graphopt: `torch.compile(wrapper, backend="graphopt", dynamic=True)`.

For every model, batch (`--batches`) and step (prefill: seq `--prefill`, past 0; decode: seq 1,
each past in `--past`), every contender is called once untimed (its first-call seconds are
reported: for the torch.compile columns that call compiles; dynamo specializes sizes 0 and 1, so
prefill and decode, and batch 1 and larger batches, compile separately), then all are timed
side by side in blocks (`graphopt.timing.time_interleaved`, `--warmup` untimed calls each,
median of `--repeats`). The latency table gives each median with its ratio to ORT optimizer
in the same row. A contender that fails to build or run gets its error in its cells instead
of numbers. Then `--greedy-steps` greedy tokens (batch 1, an 8-token prompt, `decoder_zoo.greedy_tokens`)
from every contender are compared with torch eager's. The issue's targets (#20: graphopt's best
CPU path <= 0.75x ORT optimizer per decoded token on the ~100M config; torch.compile graphopt <=
inductor) are checked on every decode row. Inductor starts from an empty on-disk cache (a fresh
`TORCHINDUCTOR_CACHE_DIR` unless one is set), as graphopt keeps none. The build table gives
each column's setup seconds, and a last table the fused ops (attention, rotary, RMS norm) in
each ONNX column's graph and graphopt's graphs, which explain the ORT columns' differences.

A progress line per build and measurement goes to stderr; the markdown (with the machine and
library versions) goes to stdout and to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import decoder_zoo  # noqa: E402

import graphopt  # noqa: E402
import graphopt.backend  # noqa: E402
from graphopt.bench import machine_description  # noqa: E402
from graphopt.timing import time_interleaved  # noqa: E402

CONFIGS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=64),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=688, vocab_size=1000),
    "100m": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, vocab_size=32000),
}
BASELINE = "ORT optimizer"
IN_PLACE = "graphopt ORT, cache in place"
GRAPHOPT_PATHS = ("graphopt ORT", IN_PLACE, "graphopt torch", "torch.compile graphopt")
"""The columns that are graphopt's CPU paths, for the issue's target."""
TARGET_VS_ORT_OPT = 0.75
GREEDY_PROMPT = 8
KERNELS = (
    "GroupQueryAttention", "MultiHeadAttention", "Attention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization", "RMSNormalization", "RMSNorm", "SkipLayerNorm",
)
"""Fused ops counted in each ONNX and graphopt graph (ORT contrib, ONNX opset 23 and graphopt's own), by op type."""

Feeds = dict[str, np.ndarray]
Step = Callable[[Feeds], tuple[np.ndarray, list[np.ndarray]]]


def _say(text: str) -> None:
    print(f"llm_decode_cpu: {text}", file=sys.stderr, flush=True)


def build_model(name: str) -> tuple[torch.nn.Module, Any]:
    """The LLaMA-style causal LM `name` (sdpa attention, weights from seed 0) wrapped in the flat
    with-past signature, and its config."""
    import transformers

    if name not in CONFIGS:
        raise SystemExit(f"unknown model {name!r}; expected one of {', '.join(CONFIGS)}")
    config = transformers.LlamaConfig(**CONFIGS[name], pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=True)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
    return decoder_zoo.DecoderWithPast(model).eval(), config


def export(wrapper: torch.nn.Module, config: Any, path: Path) -> Path:
    """TorchScript export (opset 17) of `wrapper` with batch, seq and past dynamic (example past 3, seq 2)."""
    names, outputs = decoder_zoo.input_names(config), decoder_zoo.output_names(config)
    feeds = decoder_zoo.decoder_inputs(config, batch=2, seq=2, past=3)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "past_seq"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes |= {name: {0: "batch", 2: "past"} for name in names[3:]}
    axes |= {name: {0: "batch", 2: "past_seq"} for name in outputs[1:]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, tuple(torch.from_numpy(feeds[n]) for n in names), str(path), dynamo=False, opset_version=17,
            input_names=names, output_names=outputs, dynamic_axes=axes,
        )
    return path


@dataclasses.dataclass
class Contender:
    """One column: `prepare(feeds)` returns a no-argument call for timing; `step` runs one greedy step;
    `op_types()` lists the op types of the graph it runs (None for the torch columns)."""

    label: str
    prepare: Callable[[Feeds], Callable[[], Any]] | None = None
    step: Step | None = None
    op_types: Callable[[], Iterable[str]] | None = None
    build_s: float | None = None
    error: str | None = None
    kernels: str = "-"


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")


def _kernels(op_types: Iterable[str]) -> str:
    """"8 GroupQueryAttention, 8 RotaryEmbedding": how many ops of each of KERNELS, or "none"."""
    counts = Counter(op for op in op_types if op in KERNELS)
    return ", ".join(f"{counts[op]} {op}" for op in KERNELS if counts[op]) or "none"


def _torch_inputs(config: Any, feeds: Feeds) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in decoder_zoo.input_names(config))


def _torch_contender(label: str, fn: Callable[..., Any], config: Any) -> Contender:
    def prepare(feeds: Feeds) -> Callable[[], Any]:
        inputs = _torch_inputs(config, feeds)

        def run() -> Any:
            with torch.no_grad():
                return fn(*inputs)
        return run

    def step(feeds: Feeds) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *presents = prepare(feeds)()
        return logits.numpy(), [p.numpy() for p in presents]

    return Contender(label, prepare, step)


def _session_contender(label: str, path: Path, threads: int) -> Contender:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Contender(label, lambda feeds: lambda: session.run(None, feeds), decoder_zoo.ort_step(session),
                     lambda: [node.op_type for node in onnx.load(str(path)).graph.node])


def _compiled_contender(label: str, compiled: Any, config: Any, torch_tensors: bool) -> Contender:
    def prepare(feeds: Feeds) -> Callable[[], Any]:
        inputs = _torch_inputs(config, feeds) if torch_tensors else tuple(feeds[n] for n in decoder_zoo.input_names(config))

        def run() -> Any:
            with torch.no_grad():
                return compiled(*inputs)
        return run

    def step(feeds: Feeds) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *presents = (np.asarray(out) for out in prepare(feeds)())
        return logits, list(presents)

    return Contender(label, prepare, step, lambda: [node.op_type for node in compiled.graph.nodes])


def _in_place_contender(label: str, compiled: Any, config: Any) -> Contender:
    """graphopt ORT with the KV cache in place (`graphopt.generate`'s decoding loop): a decode
    step reads and extends preallocated buffers loaded with the row's past; prefill runs the
    prompt and copies its presents in."""
    names = decoder_zoo.input_names(config)

    def session_and_call(feeds: Feeds) -> tuple[Any, Callable[[], Any]]:
        new = {name: feeds[name] for name in names[:3]}
        session = compiled.in_place_kv_cache(batch=feeds["input_ids"].shape[0], capacity=feeds["attention_mask"].shape[1])
        if feeds[names[3]].shape[2] == 0:
            return session, lambda: session.prefill(new)
        session.load({name: feeds[name] for name in names[3:]})
        return session, lambda: session.step(new)

    def step(feeds: Feeds) -> tuple[np.ndarray, list[np.ndarray]]:
        session, call = session_and_call(feeds)
        logits = call()
        return logits, [session.arrays[name].copy() for name in names[3:]]

    return Contender(label, lambda feeds: session_and_call(feeds)[1], step,
                     lambda: [node.op_type for node in compiled.graph.nodes] if compiled.graph is not None else [])


def _ort_optimizer(path: Path, config: Any, threads: int) -> Contender:
    from onnxruntime.transformers.optimizer import optimize_model

    out = path.with_suffix(".ortopt.onnx")
    optimized = optimize_model(str(path), model_type="gpt2", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    optimized.save_model_to_file(str(out))
    return _session_contender(BASELINE, out, threads)


def _onnxscript(path: Path, threads: int) -> Contender:
    from onnxscript import ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    out = path.with_suffix(".onnxscript.onnx")
    model, _ = optimize_for_ort(ir.load(str(path)))
    ir.save(model, str(out))
    return _session_contender("onnxscript", out, threads)


def build_contenders(wrapper: torch.nn.Module, config: Any, path: Path, threads: int) -> list[Contender]:
    """Every column, built in turn (build seconds recorded); a failed build keeps its error."""
    factories: list[tuple[str, Callable[[], Contender]]] = [
        ("ORT plain", lambda: _session_contender("ORT plain", path, threads)),
        (BASELINE, lambda: _ort_optimizer(path, config, threads)),
        ("onnxscript", lambda: _onnxscript(path, threads)),
        ("graphopt ORT", lambda: _compiled_contender(
            "graphopt ORT", graphopt.compile(str(path), target=f"onnxruntime:cpu{{threads={threads}}}", pipeline="fuse"),
            config, torch_tensors=False)),
        (IN_PLACE, lambda: _in_place_contender(
            IN_PLACE, graphopt.compile(str(path), target=f"onnxruntime:cpu{{threads={threads}}}", pipeline="fuse"), config)),
        ("graphopt torch", lambda: _compiled_contender(
            "graphopt torch", graphopt.compile(str(path), target="torch", pipeline="fuse"), config, torch_tensors=True)),
        ("torch eager", lambda: _torch_contender("torch eager", wrapper, config)),
        ("torch inductor", lambda: _torch_contender("torch inductor", torch.compile(wrapper, dynamic=True), config)),
        ("torch.compile graphopt", lambda: _torch_contender(
            "torch.compile graphopt", torch.compile(wrapper, backend="graphopt", dynamic=True), config)),
    ]
    contenders = []
    for label, factory in factories:
        start = time.perf_counter()
        try:
            contender = factory()
        except Exception as exc:  # a failing tool is a result, recorded in its cells
            contender = Contender(label, error=_error(exc))
        contender.build_s = time.perf_counter() - start
        if contender.op_types is not None:
            contender.kernels = _kernels(contender.op_types())
        _say(f"built {label} in {contender.build_s:.1f} s" + (f" (failed: {contender.error})" if contender.error else ""))
        contenders.append(contender)
    return contenders


@dataclasses.dataclass
class Row:
    """One measurement (model, batch, step): per column the median ms, the first-call s, or an error."""

    model: str
    batch: int
    step: str
    median_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    first_s: dict[str, float] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


def measure(model: str, config: Any, contenders: list[Contender], batch: int, seq: int, past: int,
            warmup: int, repeats: int) -> Row:
    """One row: every column's first call on random feeds (seconds kept), then all timed side by side."""
    row = Row(model, batch, f"prefill (seq {seq})" if past == 0 else f"decode past {past}")
    feeds = decoder_zoo.decoder_inputs(config, batch=batch, seq=seq, past=past)
    runners = {}
    for contender in contenders:
        if contender.error is not None:
            row.errors[contender.label] = "build failed"
            continue
        start = time.perf_counter()
        try:
            run = contender.prepare(feeds)
            run()
        except Exception as exc:
            row.errors[contender.label] = _error(exc)
            continue
        row.first_s[contender.label] = time.perf_counter() - start
        runners[contender.label] = run
    if runners:
        times = time_interleaved(runners, repeats, warmup=warmup)
        row.median_ms = {label: statistics.median(ms) for label, ms in times.items()}
    summary = ", ".join(f"{label} {ms:.2f} ms" for label, ms in row.median_ms.items())
    _say(f"{model} batch {batch} {row.step}: {summary}" + (f"; failed: {', '.join(row.errors)}" if row.errors else ""))
    return row


def greedy_check(config: Any, contenders: list[Contender], steps: int) -> dict[str, str]:
    """Per column: "same" as torch eager's `steps` greedy tokens, "differs at step k" (1-based), or the error."""
    prompt = np.random.default_rng(0).integers(4, config.vocab_size, size=(1, GREEDY_PROMPT), dtype=np.int64)
    tokens: dict[str, np.ndarray] = {}
    verdict: dict[str, str] = {}
    for contender in contenders:
        if contender.error is not None:
            verdict[contender.label] = "build failed"
            continue
        try:
            tokens[contender.label] = decoder_zoo.greedy_tokens(contender.step, prompt, steps, config=config)
        except Exception as exc:
            verdict[contender.label] = _error(exc)
    reference = tokens.get("torch eager")
    for label, got in tokens.items():
        if reference is None:
            verdict[label] = "no eager reference"
            continue
        differs = np.flatnonzero((got != reference).any(axis=0))
        verdict[label] = "same" if differs.size == 0 else f"differs at step {differs[0] + 1}"
    return {c.label: verdict[c.label] for c in contenders}


def _cell(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def _versions() -> str:
    parts = []
    for package in ("graphopt", "onnxruntime", "torch", "transformers", "onnx", "onnxscript"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def latency_table(rows: list[Row], labels: list[str]) -> list[str]:
    """Median ms per column with its ratio to ORT optimizer's in the row, or the column's error."""
    lines = ["| model | batch | step | " + " | ".join(labels) + " |", "| --- " * (3 + len(labels)) + "|"]
    for row in rows:
        base = row.median_ms.get(BASELINE)
        cells = []
        for label in labels:
            if label in row.errors:
                cells.append(_cell(f"error: {row.errors[label]}"))
            elif base:
                cells.append(f"{row.median_ms[label]:.2f} ({row.median_ms[label] / base:.2f}x)")
            else:
                cells.append(f"{row.median_ms[label]:.2f}")
        lines.append(f"| {row.model} | {row.batch} | {row.step} | " + " | ".join(cells) + " |")
    return lines


def first_call_table(rows: list[Row], labels: list[str]) -> list[str]:
    """Seconds of each column's first (untimed) call per row; "-" where it failed."""
    lines = ["| model | batch | step | " + " | ".join(labels) + " |", "| --- " * (3 + len(labels)) + "|"]
    for row in rows:
        cells = [f"{row.first_s[label]:.2f}" if label in row.first_s else "-" for label in labels]
        lines.append(f"| {row.model} | {row.batch} | {row.step} | " + " | ".join(cells) + " |")
    return lines


def target_lines(rows: list[Row]) -> list[str]:
    """The issue's two targets on every decode row."""
    lines = []
    for row in rows:
        if not row.step.startswith("decode"):
            continue
        where = f"{row.model}, batch {row.batch}, {row.step}"
        measured = {label: row.median_ms[label] for label in GRAPHOPT_PATHS if label in row.median_ms}
        base = row.median_ms.get(BASELINE)
        if measured and base:
            best = min(measured, key=measured.get)
            ratio = measured[best] / base
            met = "met" if ratio <= TARGET_VS_ORT_OPT else "not met"
            lines.append(f"- {where}: best graphopt path {best} at {ratio:.2f}x ORT optimizer "
                         f"(target <= {TARGET_VS_ORT_OPT}: {met})")
        ours, inductor = row.median_ms.get("torch.compile graphopt"), row.median_ms.get("torch inductor")
        if ours and inductor:
            met = "met" if ours <= inductor else "not met"
            lines.append(f"- {where}: torch.compile graphopt at {ours / inductor:.2f}x inductor (target <= 1: {met})")
    return lines


def report(rows: list[Row], labels: list[str], builds: dict[str, tuple[float, list[Contender]]],
           greedy: dict[str, dict[str, str]], backend_stats: dict[str, dict[str, int]], args: argparse.Namespace) -> str:
    """The markdown: latency table, the issue's targets, first-call and build seconds, greedy verdicts."""
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine_description()}; {_versions()}.",
        "",
        f"LLaMA-style decoders (random weights), TorchScript export with past, {args.threads} threads; median of "
        f"{args.repeats} calls after {args.warmup} warm-up calls, all columns timed side by side in blocks. "
        f"Milliseconds per call (a decode call makes one token per sequence), ratio to {BASELINE} in the same row "
        "(below 1 is faster).",
        "",
        *latency_table(rows, labels),
        "",
        "Issue #20 targets on the decode rows:",
        "",
        *(target_lines(rows) or ["- (no decode row has the columns to compare)"]),
        "",
        "First call of each measurement, seconds (the torch.compile columns compile here):",
        "",
        *first_call_table(rows, labels),
        "",
        "Build seconds per model (export: TorchScript; ORT columns: optimizer / graphopt.compile plus session; "
        "torch.compile columns: wrapping only):",
        "",
        "| model | export | " + " | ".join(labels) + " |",
        "| --- " * (2 + len(labels)) + "|",
    ]
    for model, (export_s, contenders) in builds.items():
        cells = [f"{c.build_s:.1f}" if c.error is None else _cell(f"error: {c.error}") for c in contenders]
        lines.append(f"| {model} | {export_s:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Fused ops in each graph (ORT's own graph-level fusions at session creation not counted):", "",
              "| model | " + " | ".join(labels) + " |", "| --- " * (1 + len(labels)) + "|"]
    for model, (_, contenders) in builds.items():
        lines.append(f"| {model} | " + " | ".join(c.kernels for c in contenders) + " |")
    lines += [
        "",
        f"Greedy decoding, batch 1, {GREEDY_PROMPT}-token prompt, {args.greedy_steps} tokens, compared with torch eager's:",
        "",
        "| model | " + " | ".join(labels) + " |",
        "| --- " * (1 + len(labels)) + "|",
    ]
    for model, verdicts in greedy.items():
        lines.append(f"| {model} | " + " | ".join(_cell(verdicts[label]) for label in labels) + " |")
    lines += ["", "torch.compile graphopt, graphs per model (graphopt.backend.cache_info()):", ""]
    for model, stats in backend_stats.items():
        lines.append(f"- {model}: {stats['compiled']} optimized, {stats['fallbacks']} fell back to the original graph, "
                     f"{stats['cache_hits']} cache hits")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Runs the benchmark; writes the markdown to `--out` and stdout and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,100m")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--past", default="128,512")
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--greedy-steps", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "llm_decode_cpu.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="graphopt-bench-inductor-"))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    builds: dict[str, tuple[float, list[Contender]]] = {}
    greedy: dict[str, dict[str, str]] = {}
    backend_stats: dict[str, dict[str, int]] = {}
    labels: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="graphopt-llm-decode-") as tmp, \
                torch._dynamo.config.patch(recompile_limit=64), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' deprecation notices, once per call
            for name in args.models.split(","):
                torch._dynamo.reset()
                graphopt.backend.clear_cache()
                wrapper, config = build_model(name)
                start = time.perf_counter()
                path = export(wrapper, config, Path(tmp) / f"{name}.onnx")
                export_s = time.perf_counter() - start
                _say(f"{name}: exported in {export_s:.1f} s")
                contenders = build_contenders(wrapper, config, path, args.threads)
                builds[name] = (export_s, contenders)
                labels = [c.label for c in contenders]
                for batch in _ints(args.batches):
                    for seq, past in [(args.prefill, 0), *((1, p) for p in _ints(args.past))]:
                        rows.append(measure(name, config, contenders, batch, seq, past, args.warmup, args.repeats))
                greedy[name] = greedy_check(config, contenders, args.greedy_steps)
                _say(f"{name}: greedy tokens vs eager: {greedy[name]}")
                backend_stats[name] = graphopt.backend.cache_info()
    finally:
        torch.set_num_threads(threads_before)
        torch._dynamo.reset()
    text = report(rows, labels, builds, greedy, backend_stats, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
