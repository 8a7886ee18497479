"""`graphopt bench`: the original model, graphopt's result and the alternatives, side by side.

    result = run_bench("model.onnx", pipeline="fuse", target="onnxruntime:cpu",
                       against=["ort-opt", "ort-int8"], batch=1, seq=128, threads=2)
    print(result.table())

Everything runs in one process on the same inputs. Each contender is built first (its
build time is reported), warmed up, and then timed side by side in rounds (each round gives every contender one
untimed and three timed calls: see `graphopt.timing`), so drift on a shared machine hits
them alike. Per contender: median latency and
spread (25th-75th percentile), the ratio of its median to the baseline's median (the
original model in ONNX Runtime), parameters and bytes of the graph it runs, estimated FLOPs,
and fidelity against the baseline's outputs (max and mean absolute error, cosine).

Contenders (`against`; `ort`, the original model in ONNX Runtime, is always the baseline):
- `ort-opt`: ONNX Runtime's `transformers.optimizer.optimize_model` output;
- `ort-int8`: that output through `quantize_dynamic` (int8 weights);
- `eager`, `inductor`: PyTorch eager / `torch.compile()` (needs a PyTorch model: give an
  `hf:<model_type>` or a Hugging Face config.json as MODEL);
- `tvm-default`: TVM's ONNX importer and default `relax.build` (needs apache-tvm).

MODEL is an .onnx file, a Hugging Face `config.json`, or `hf:<model_type>` (e.g. `hf:bert`:
the architecture's default config, random weights; exported to ONNX in a temporary folder;
no download).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.exporters.files import atomic_write
from graphopt.timing import time_interleaved

CONTENDERS = ("ort-opt", "ort-int8", "eager", "inductor", "tvm-default")
BASELINE = "original (ort)"


@dataclasses.dataclass
class BenchRow:
    """One contender's figures. `times_ms` are the raw timed calls."""

    label: str
    build_s: Optional[float] = None
    times_ms: list[float] = dataclasses.field(default_factory=list)
    ratio: Optional[float] = None
    parameters: Optional[int] = None
    bytes: Optional[int] = None
    flops: Optional[int] = None
    max_error: Optional[float] = None
    mean_error: Optional[float] = None
    cosine: Optional[float] = None
    note: str = ""

    @property
    def median_ms(self) -> Optional[float]:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def spread_ms(self) -> Optional[tuple[float, float]]:
        if len(self.times_ms) < 2:
            return None
        q = np.percentile(self.times_ms, [25, 75])
        return float(q[0]), float(q[1])


@dataclasses.dataclass
class BenchResult:
    """All rows of one run and how it was run."""

    model: str
    rows: list[BenchRow]
    settings: dict[str, Any]

    def row(self, label: str) -> BenchRow:
        return next(r for r in self.rows if r.label == label)

    def cells(self) -> list[list[str]]:
        """The table as text cells: the head row, then one row per contender (baseline first)."""
        rows = [["contender", "build s", "median ms", "p25-p75 ms", "ratio", "params", "MB", "GFLOPs", "max err", "mean err", "cosine", "note"]]
        for r in self.rows:
            spread = r.spread_ms
            rows.append([
                r.label, _num(r.build_s, ".1f"), _num(r.median_ms, ".2f"),
                f"{spread[0]:.2f}-{spread[1]:.2f}" if spread else "-", _num(r.ratio, ".2f"),
                f"{r.parameters:,}" if r.parameters is not None else "-",
                _num(None if r.bytes is None else r.bytes / 1e6, ".1f"),
                _num(None if r.flops is None else r.flops / 1e9, ".2f"),
                _num(r.max_error, ".2e"), _num(r.mean_error, ".2e"), _num(r.cosine, ".6f"), r.note,
            ])
        return rows

    def table(self) -> str:
        """A markdown table of `cells()`."""
        head, *rows = self.cells()
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        return "\n".join(lines)

    def header(self) -> str:
        s = self.settings
        return (
            f"{self.model}: batch {s['batch']}, seq {s['seq']}, {s['threads']} threads, "
            f"{s['warmup']} warm-up + {s['repeats']} timed calls each (side by side, in blocks of 3 after 1 untimed call); "
            f"machine: {s['machine']}; {s['versions']}"
        )

    def to_json(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            row = dataclasses.asdict(r)
            row["median_ms"], row["spread_ms"] = r.median_ms, r.spread_ms
            rows.append(row)
        return {"model": self.model, "settings": self.settings, "rows": rows}


def _num(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


@dataclasses.dataclass
class _Contender:
    label: str
    run: Optional[Callable[[dict[str, np.ndarray]], list[Any]]]
    row: BenchRow


def run_bench(
    model: str,
    pipeline: Any = "fuse",
    target: str = "onnxruntime:cpu",
    against: Sequence[str] = ("ort-opt",),
    *,
    batch: int = 1,
    seq: int = 128,
    threads: int = 2,
    warmup: int = 3,
    repeats: int = 10,
    dims: Optional[dict[str, int]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> BenchResult:
    """Build and time every contender on the same inputs; see the module docstring."""
    against = [name for name in against if name != "ort"]  # "ort" is the baseline, always run
    unknown = [name for name in against if name not in CONTENDERS]
    if unknown:
        raise GraphoptError(f"bench: unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    if min(batch, seq, repeats) < 1 or warmup < 0 or threads < 0:
        raise GraphoptError("bench: batch, seq and repeats must be >= 1; warmup and threads >= 0")
    say = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as scratch:
        source = _ModelSource.resolve(model, scratch)
        from graphopt.frontends.onnx_import import from_onnx

        original = from_onnx(source.onnx_path)
        feeds = bench_inputs(original, batch, seq, dims)
        sizes = _symbol_sizes(original, feeds)
        say("building the original model in ONNX Runtime")
        contenders = [_ort_contender(BASELINE, source.onnx_path, threads, original, sizes)]
        say(f"optimizing with '{pipeline}' and compiling for {target}")
        contenders.append(_graphopt_contender(source.onnx_path, pipeline, target, threads, sizes))
        for name in against:
            say(f"building {name}")
            contenders.append(_build_contender(name, source, scratch, threads, sizes))
        _time_all(contenders, feeds, warmup, repeats, threads, say)
    rows = [c.row for c in contenders]
    _fill_ratios_and_fidelity(contenders, feeds)
    settings = {
        "batch": batch, "seq": seq, "threads": threads, "warmup": warmup, "repeats": repeats,
        "pipeline": str(pipeline), "target": str(target), "sizes": sizes, "machine": machine_description(),
        "versions": _versions(), "date": time.strftime("%Y-%m-%d"),
    }
    return BenchResult(model, rows, settings)


def bench_inputs(graph: Any, batch: int, seq: int, dims: Optional[dict[str, int]] = None) -> dict[str, np.ndarray]:
    """Inputs for `graph`: symbolic dims named like a batch get `batch`, like a sequence `seq`
    (else axis 0 -> batch, axis 1 -> seq); integer inputs whose name says mask are all ones."""
    from graphopt.check import sample_inputs

    sizes = dict(dims or {})
    for value in graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, str) and dim not in sizes:
                lowered = dim.lower()
                if "batch" in lowered:
                    sizes[dim] = batch
                elif "seq" in lowered or "len" in lowered or "token" in lowered:
                    sizes[dim] = seq
                else:
                    sizes[dim] = batch if axis == 0 else seq
    feeds = sample_inputs(graph, seed=0, sizes=sizes)
    for name, array in feeds.items():
        if "mask" in name.lower() and array.dtype.kind in "iub":
            feeds[name] = np.ones_like(array)
    return feeds


def _symbol_sizes(graph: Any, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    sizes = {}
    for value in graph.inputs:
        for dim, size in zip(value.shape or (), feeds[value.name].shape):
            if isinstance(dim, str):
                sizes[dim] = int(size)
    return sizes


@dataclasses.dataclass
class _ModelSource:
    """Where the model comes from: an ONNX path, and the PyTorch module when known."""

    onnx_path: str
    module: Any = None
    input_names: Sequence[str] = ()

    @classmethod
    def resolve(cls, model: str, scratch: str) -> "_ModelSource":
        if model.startswith("hf:") or model.endswith(".json"):
            return cls._from_hf_config(model, scratch)
        if os.path.isdir(model):
            raise GraphoptError(
                f"{model}: is a folder; give an .onnx file, a Hugging Face config.json (random weights) or hf:<model_type>"
            )
        if not os.path.isfile(model):
            raise GraphoptError(f"{model}: no such file (give an .onnx file, a Hugging Face config.json or hf:<model_type>)")
        return cls(model)

    @classmethod
    def _from_hf_config(cls, model: str, scratch: str) -> "_ModelSource":
        import torch
        import transformers

        try:
            if model.startswith("hf:"):
                config = transformers.AutoConfig.for_model(model[3:])
            else:
                config = transformers.AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(model)))
        except (ValueError, OSError, KeyError) as exc:
            raise GraphoptError(f"{model}: not a Hugging Face config transformers can build ({_short_reason(model, exc)})") from None
        if getattr(config, "vocab_size", None) is None:
            raise GraphoptError(f"{model}: only text models (with a vocab_size) can be built from a config here; export other models to ONNX")
        torch.manual_seed(0)
        module = _last_hidden(transformers.AutoModel.from_config(config)).eval()
        ids = torch.ones(2, 16, dtype=torch.int64)
        path = os.path.join(scratch, "model.onnx")
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"}}
        with torch.no_grad():
            torch.onnx.export(
                module, (ids, torch.ones_like(ids)), path, dynamo=False, opset_version=17,
                input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"], dynamic_axes=axes,
            )
        module.eval()
        return cls(path, module, ("input_ids", "attention_mask"))


def _last_hidden(model: Any) -> Any:
    """Wraps a Hugging Face model: (input_ids, attention_mask) -> last hidden state."""
    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return LastHidden()


def _graph_figures(row: BenchRow, graph: Any, sizes: dict[str, int]) -> None:
    from graphopt.flops import estimate_flops

    constants = [v.const for v in graph.constants.values()]
    row.parameters = int(sum(c.size for c in constants))
    row.bytes = int(sum(c.nbytes for c in constants))
    row.flops = int(estimate_flops(graph, sizes)["total"])


def _ort_contender(label: str, path: str, threads: int, graph: Any, sizes: dict[str, int]) -> _Contender:
    from graphopt.ort_io import reference_session

    start = time.perf_counter()
    session, _ = reference_session(path, threads=threads, optimize=True, widen_io=False)
    row = BenchRow(label, build_s=time.perf_counter() - start)
    _graph_figures(row, graph, sizes)
    names = {i.name for i in session.get_inputs()}
    return _Contender(label, lambda feeds: session.run(None, {k: v for k, v in feeds.items() if k in names}), row)


def _graphopt_contender(path: str, pipeline: Any, target: str, threads: int, sizes: dict[str, int]) -> _Contender:
    from graphopt.api import compile
    from graphopt.target_base import TargetSpec

    spec = TargetSpec.parse(target)
    if spec.name == "onnxruntime" and threads and "threads" not in spec.options:
        spec = TargetSpec(spec.name, spec.variant, {**spec.options, "threads": threads})
    label = f"graphopt ({pipeline} -> {spec})"
    start = time.perf_counter()
    compiled = compile(path, spec, pipeline)
    row = BenchRow(label, build_s=time.perf_counter() - start)
    graph = getattr(compiled, "graph", None)
    if graph is not None:
        _graph_figures(row, graph, sizes)
    return _Contender(label, lambda feeds: compiled(**feeds), row)


def _build_contender(name: str, source: _ModelSource, scratch: str, threads: int, sizes: dict[str, int]) -> _Contender:
    """The contender `name`, or a row with a note saying why it could not be built."""
    try:
        if name in ("ort-opt", "ort-int8"):
            return _ort_optimizer_contender(name, source.onnx_path, scratch, threads, sizes)
        if name in ("eager", "inductor"):
            return _torch_contender(name, source, threads)
        return _tvm_default_contender(source.onnx_path, threads)
    except _Skip as skip:
        return _Contender(name, None, BenchRow(name, note=str(skip)))


class _Skip(Exception):
    """A contender that cannot run here; the message goes into the row's note."""


def _ort_optimizer_contender(name: str, path: str, scratch: str, threads: int, sizes: dict[str, int]) -> _Contender:
    import logging

    import onnx
    from onnxruntime.transformers import optimizer

    from graphopt.frontends.onnx_import import from_onnx

    start = time.perf_counter()
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    try:
        optimized = optimizer.optimize_model(path, model_type="bert", num_heads=0, hidden_size=0)
    except Exception as exc:
        raise _Skip(f"optimize_model failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    out = os.path.join(scratch, "ort_opt.onnx")
    optimized.save_model_to_file(out)
    if name == "ort-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = os.path.join(scratch, "ort_int8.onnx")
        quantize_dynamic(out, quantized, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        out = quantized
    contender = _ort_contender(name, out, threads, from_onnx(out), sizes)
    contender.row.build_s = time.perf_counter() - start
    return contender


def _torch_contender(name: str, source: _ModelSource, threads: int) -> _Contender:
    if source.module is None:
        raise _Skip("needs a PyTorch model: give hf:<model_type> or a config.json")
    import torch

    if threads:
        torch.set_num_threads(threads)
    module = source.module
    start = time.perf_counter()
    runner = torch.compile(module) if name == "inductor" else module
    row = BenchRow(name)
    row.parameters = sum(p.numel() for p in module.parameters())
    row.bytes = sum(p.numel() * p.element_size() for p in module.parameters())

    def run(feeds: dict[str, np.ndarray]) -> list[Any]:
        with torch.no_grad():
            out = runner(*[torch.from_numpy(feeds[n]) for n in source.input_names])
        return [out.numpy()]

    if name == "inductor":
        row.note = "build s includes the first (compiling) call"
        return _Contender(name, _first_call_timed(run, row, start), row)
    row.build_s = 0.0
    return _Contender(name, run, row)


def _first_call_timed(run: Callable[[dict[str, np.ndarray]], list[Any]], row: BenchRow, start: float) -> Callable[[dict[str, np.ndarray]], list[Any]]:
    """Counts the first call (torch.compile compiles lazily) as build time."""
    state = {"first": True}

    def wrapped(feeds: dict[str, np.ndarray]) -> list[Any]:
        result = run(feeds)
        if state["first"]:
            state["first"] = False
            row.build_s = time.perf_counter() - start
        return result

    return wrapped


def _tvm_default_contender(path: str, threads: int) -> _Contender:
    try:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx
    except ImportError:
        raise _Skip("apache-tvm is not installed") from None
    import onnx

    start = time.perf_counter()
    try:
        module = tvm_from_onnx(onnx.load(path), keep_params_in_input=False)
        target = tvm.target.Target({"kind": "llvm", "num-cores": threads or os.cpu_count()})
        executable = relax.build(module, target=target)
        machine = relax.VirtualMachine(executable, tvm.cpu())
    except Exception as exc:
        raise _Skip(f"TVM failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    row = BenchRow("tvm-default", build_s=time.perf_counter() - start)
    names = [i.name for i in onnx.load(path, load_external_data=False).graph.input]

    def run(feeds: dict[str, np.ndarray]) -> list[Any]:
        out = machine["main"](*[tvm.runtime.tensor(feeds[n]) for n in names if n in feeds])
        return [o.numpy() for o in (out if isinstance(out, (list, tuple)) or hasattr(out, "__len__") else [out])]

    return _Contender("tvm-default", run, row)


def _time_all(contenders: list[_Contender], feeds: dict[str, np.ndarray], warmup: int, repeats: int, threads: int, say: Callable[[str], None]) -> None:
    runnable = [c for c in contenders if c.run is not None]
    for contender in runnable:
        say(f"warming up {contender.label}")
        try:
            for _ in range(max(warmup, 1)):
                contender.outputs = contender.run(feeds)  # type: ignore[attr-defined,misc]
        except Exception as exc:
            contender.row.note = f"failed to run: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            contender.run = None
    runnable = [c for c in runnable if c.run is not None]
    runners = {c.label: functools.partial(c.run, feeds) for c in runnable}  # type: ignore[arg-type]
    times = time_interleaved(runners, repeats, on_round=lambda index, rounds: say(f"timing round {index + 1}/{rounds}"))
    for contender in runnable:
        contender.row.times_ms.extend(times[contender.label])


def _fill_ratios_and_fidelity(contenders: list[_Contender], feeds: dict[str, np.ndarray]) -> None:
    baseline = contenders[0]
    base_median = baseline.row.median_ms
    expected = getattr(baseline, "outputs", None)
    for contender in contenders:
        row = contender.row
        if row.median_ms is not None and base_median:
            row.ratio = row.median_ms / base_median
        actual = getattr(contender, "outputs", None)
        if expected is None or actual is None:
            continue
        a = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in expected[:1]])
        b = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in actual[:1]])
        if a.shape != b.shape:
            row.note = (row.note + "; " if row.note else "") + "output shape differs from the original"
            continue
        diff = np.abs(a - b)
        row.max_error, row.mean_error = float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0
        norms = np.linalg.norm(a) * np.linalg.norm(b)
        row.cosine = float(a @ b / norms) if norms else 1.0


def machine_description() -> str:
    """CPU model and core count (Linux /proc/cpuinfo when readable), OS."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def _versions() -> str:
    import importlib.metadata

    parts = []
    for package in ("graphopt", "onnxruntime", "torch", "onnx"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def save_json(result: BenchResult, path: str) -> None:
    atomic_write(path, json.dumps(result.to_json(), indent=2).encode())


def save_html(result: BenchResult, path: str) -> None:
    """A self-contained HTML page: settings, the table, and the charts when matplotlib is installed."""
    import base64
    import html

    cells = result.cells()
    table = "<table>" + "".join(
        "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in row) + "</tr>"
        for i, row in enumerate(cells)
    ) + "</table>"
    chart = ""
    try:
        png = chart_png(result)
        chart = f'<img alt="latency and fidelity" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    except ImportError:
        chart = "<p>(install matplotlib for charts)</p>"
    page = (
        "<!doctype html><meta charset='utf-8'><title>graphopt bench</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}</style>"
        f"<h1>graphopt bench: {html.escape(result.model)}</h1><p>{html.escape(result.header())}</p>{table}{chart}"
    )
    atomic_write(path, page.encode())


def chart_png(result: BenchResult) -> bytes:
    """A PNG: median latency per contender (bars), and cosine vs speed-up (scatter)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.median_ms is not None]
    figure, (bars, scatter) = plt.subplots(1, 2, figsize=(11, 4))
    bars.barh([r.label for r in rows], [r.median_ms for r in rows])
    bars.set_xlabel("median latency (ms)")
    bars.invert_yaxis()
    for r in rows:
        if r.ratio and r.cosine is not None:
            scatter.scatter(1 / r.ratio, r.cosine)
            scatter.annotate(r.label, (1 / r.ratio, r.cosine), fontsize=7)
    scatter.set_xlabel("speed-up vs original")
    scatter.set_ylabel("output cosine vs original")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def save_png(result: BenchResult, path: str) -> None:
    try:
        atomic_write(path, chart_png(result))
    except ImportError:
        raise GraphoptError("--png needs matplotlib (pip install matplotlib)") from None


def _short_reason(model: str, exc: BaseException) -> str:
    """Why transformers cannot build `model`, in one line: for an unknown `hf:<type>`, the
    closest known model types (transformers' own message lists all ~500 of them)."""
    import difflib

    import transformers

    if model.startswith("hf:"):
        known = list(transformers.CONFIG_MAPPING.keys())
        if model[3:] not in known:
            close = difflib.get_close_matches(model[3:], known, n=5)
            return f"unknown model type '{model[3:]}'" + (f"; closest: {', '.join(close)}" if close else "; e.g. bert, llama, vit")
    return str(exc).splitlines()[0][:300]
