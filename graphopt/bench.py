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
and fidelity of its first output against the baseline's (`graphopt.fidelity`: max absolute and
relative error, token and pooled cosine, top-1 agreement for logits).

Contenders (`against`; `ort`, the original model in ONNX Runtime, is always the baseline):
- `ort-opt`: ONNX Runtime's `transformers.optimizer.optimize_model` output;
- `ort-int8`: that output through `quantize_dynamic` (int8 weights);
- `eager`, `inductor`: PyTorch eager / `torch.compile()` (needs a PyTorch model: any MODEL
  but an .onnx file);
- `tvm-default`: TVM's ONNX importer and default `relax.build` (needs apache-tvm).

MODEL is anything `graphopt.model_sources` resolves: an .onnx file, a Hugging Face model
folder, a `config.json` or `hf:<model_type>` (e.g. `hf:bert`: the architecture's default
config, random weights, no download), a .pt2 ExportedProgram or `module:function`; all but
an .onnx file are exported to ONNX in a temporary folder.
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
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.exporters.files import atomic_write
from graphopt.timing import time_interleaved

if TYPE_CHECKING:
    from graphopt.model_sources import ModelSource

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
    relative_error: Optional[float] = None
    token_cosine: Optional[float] = None
    pooled_cosine: Optional[float] = None
    top1: Optional[float] = None
    note: str = ""

    @property
    def cosine(self) -> Optional[float]:
        """The cosine the charts plot: the mean per-token cosine."""
        return self.token_cosine

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
        rows = [["contender", "build s", "median ms", "p25-p75 ms", "ratio", "params", "MB", "est. GFLOPs (graph run)", "max err", "rel err", "token cos", "pooled cos", "top-1", "note"]]
        for r in self.rows:
            spread = r.spread_ms
            rows.append([
                r.label, _num(r.build_s, ".1f"), _num(r.median_ms, ".2f"),
                f"{spread[0]:.2f}-{spread[1]:.2f}" if spread else "-", _num(r.ratio, ".2f"),
                f"{r.parameters:,}" if r.parameters is not None else "-",
                _num(None if r.bytes is None else r.bytes / 1e6, ".1f"),
                _num(None if r.flops is None else r.flops / 1e9, ".2f"),
                _num(r.max_error, ".2e"), _num(r.relative_error, ".2e"), _num(r.token_cosine, ".6f"),
                _num(r.pooled_cosine, ".6f"), _num(None if r.top1 is None else 100 * r.top1, ".1f"), r.note,
            ])
        return rows

    def footnotes(self) -> list[str]:
        """What the columns that describe each contender's own graph mean (under the table in --html)."""
        return [
            "ratio: the contender's median latency / the original's (below 1 is faster). "
            "max err, rel err (||y - y0|| / ||y0||), token cos (mean cosine per token vector), pooled cos (cosine "
            "of the mask-weighted mean over tokens: a sentence embedding's) and top-1 (% of positions whose argmax "
            "agrees, for logits): its first output against the original's, on the same inputs.",
            "params, MB and est. GFLOPs (graph run) describe the graph each contender runs: the original, ONNX Runtime's "
            "optimized or int8-quantized graph, graphopt's output. est. GFLOPs is graphopt's static estimate "
            "(graphopt.flops), not a measurement: ops it does not know (e.g. MatMulInteger of an int8 graph, ONNX Runtime's "
            "com.microsoft fused ops) count 0, so a lower figure on another graph does not mean less work. Compare latency, "
            "not this column, across contenders.",
        ]

    def table(self) -> str:
        """A markdown table of `cells()`."""
        head, *rows = self.cells()
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        return "\n".join(lines)

    def header(self) -> str:
        s = self.settings
        shape = f"inputs {s['inputs']}" if s.get("inputs") else f"batch {s['batch']}, seq {s['seq']}"
        return (
            f"{self.model}: {shape}, {s['threads']} threads, "
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
    inputs: Optional[str] = None,
    calibration_data: Any = None,
) -> BenchResult:
    """Build and time every contender on the same inputs; see the module docstring.

    `inputs`: an .npz of real inputs (one array per input) used instead of random token ids;
    `calibration_data`: samples (or an .npz path) for graphopt's data-aware passes."""
    against = [name for name in against if name != "ort"]  # "ort" is the baseline, always run
    unknown = [name for name in against if name not in CONTENDERS]
    if unknown:
        raise GraphoptError(f"bench: unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    if min(batch, seq, repeats) < 1 or warmup < 0 or threads < 0:
        raise GraphoptError("bench: batch, seq and repeats must be >= 1; warmup and threads >= 0")
    say = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as scratch:
        from graphopt.model_sources import resolve_model

        source = resolve_model(model, scratch)
        from graphopt.frontends.onnx_import import from_onnx

        original = from_onnx(source.onnx_path)
        if inputs:
            from graphopt.calibration import load_inputs

            feeds = load_inputs(inputs, original)
        else:
            feeds = bench_inputs(original, batch, seq, dims)
        sizes = _symbol_sizes(original, feeds)
        say("building the original model in ONNX Runtime")
        contenders = [_ort_contender(BASELINE, source.onnx_path, threads, original, sizes)]
        say(f"optimizing with '{pipeline}' and compiling for {target}")
        contenders.append(_graphopt_contender(source.onnx_path, pipeline, target, threads, sizes, calibration_data))
        for name in against:
            say(f"building {name}")
            contenders.append(_build_contender(name, source, scratch, threads, sizes))
        _time_all(contenders, feeds, warmup, repeats, threads, say)
    rows = [c.row for c in contenders]
    _fill_ratios_and_fidelity(contenders, feeds, original.outputs[0].name)
    settings = {
        "batch": batch, "seq": seq, "inputs": inputs, "threads": threads, "warmup": warmup, "repeats": repeats,
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
    if graph is not None:
        _graph_figures(row, graph, sizes)
    names = {i.name for i in session.get_inputs()}
    return _Contender(label, lambda feeds: session.run(None, {k: v for k, v in feeds.items() if k in names}), row)


def _graphopt_contender(path: str, pipeline: Any, target: str, threads: int, sizes: dict[str, int], calibration_data: Any = None) -> _Contender:
    from graphopt.api import compile
    from graphopt.target_base import TargetSpec

    spec = TargetSpec.parse(target)
    if spec.name == "onnxruntime" and threads and "threads" not in spec.options:
        spec = TargetSpec(spec.name, spec.variant, {**spec.options, "threads": threads})
    label = f"graphopt ({pipeline} -> {spec})"
    start = time.perf_counter()
    compiled = compile(path, spec, pipeline, calibration_data=calibration_data)
    row = BenchRow(label, build_s=time.perf_counter() - start)
    graph = getattr(compiled, "graph", None)
    if graph is not None:
        _graph_figures(row, graph, sizes)
    return _Contender(label, lambda feeds: compiled(**feeds), row)


def _build_contender(name: str, source: "ModelSource", scratch: str, threads: int, sizes: dict[str, int]) -> _Contender:
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
    try:
        graph = from_onnx(out)
    except GraphoptError:  # ONNX Runtime's own ops (SimplifiedLayerNormalization) graphopt cannot read: no figures
        graph = None
    contender = _ort_contender(name, out, threads, graph, sizes)
    contender.row.build_s = time.perf_counter() - start
    return contender


def _torch_contender(name: str, source: "ModelSource", threads: int) -> _Contender:
    if source.module is None:
        raise _Skip("needs a PyTorch model: give a Hugging Face folder, hf:<model_type>, a config.json or module:function")
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
        return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else [out])]

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


def _fill_ratios_and_fidelity(contenders: list[_Contender], feeds: dict[str, np.ndarray], output_name: str) -> None:
    from graphopt.fidelity import compare_outputs

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
        try:
            (fidelity,) = compare_outputs(expected[:1], actual[:1], [output_name], feeds)
        except ValueError:
            row.note = (row.note + "; " if row.note else "") + "output shape differs from the original"
            continue
        row.max_error, row.relative_error, row.top1 = fidelity.max_abs, fidelity.relative, fidelity.top1
        row.token_cosine, row.pooled_cosine = fidelity.token_cosine, fidelity.pooled_cosine


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
    """A self-contained HTML page: settings, the table with its footnotes, and the charts as
    inline SVG (`graphopt.bench_page`; no matplotlib, no script, no network)."""
    from graphopt.bench_page import bench_page

    atomic_write(path, bench_page(result, result.footnotes()).encode())


def chart_png(result: BenchResult) -> bytes:
    """A PNG: median latency per contender (bars), and cosine vs speed-up (scatter) with the
    points numbered as in the legend beside it, numbers placed so that none overlap."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graphopt.bench_page import COLORS

    numbered = [(n, r) for n, r in enumerate(result.rows, 1) if r.median_ms is not None]
    figure, (bars, scatter) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1]})
    bars.barh([f"{n} {r.label}" for n, r in numbered], [r.median_ms for _, r in numbered],
              color=[COLORS[(n - 1) % len(COLORS)] for n, _ in numbered])
    bars.set_xlabel("median latency (ms)")
    bars.tick_params(axis="y", labelsize=8)
    bars.invert_yaxis()
    points = [(n, r, 1 / r.ratio, r.cosine) for n, r in numbered if r.ratio and r.cosine is not None]
    for n, r, x, y in points:
        scatter.scatter(x, y, color=COLORS[(n - 1) % len(COLORS)], label=f"{n} {r.label}", zorder=3)
    scatter.set_xlabel("speed-up vs original")
    scatter.set_ylabel("output cosine vs original")
    scatter.ticklabel_format(useOffset=False)
    if points:
        scatter.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    figure.tight_layout()
    _number_points(figure, scatter, points)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _number_points(figure: Any, axes: Any, points: list[tuple[int, BenchRow, float, float]]) -> None:
    """Writes each point's number next to it, placed in pixels by `graphopt.svg.place_labels`."""
    from graphopt.svg import Box, place_labels

    if not points:
        return
    figure.canvas.draw()
    height = figure.bbox.height
    to_pixels = axes.transData.transform
    anchors = [(float(px), height - float(py)) for px, py in (to_pixels((x, y)) for _, _, x, y in points)]
    frame = axes.bbox
    area = Box(frame.x0 + 2, height - frame.y1 + 2, frame.x1 - 2, height - frame.y0 - 2)
    sizes = [(8.0 * len(str(n)) + 6, 14.0) for n, _, _, _ in points]
    centres = place_labels(anchors, sizes, area, [Box.around(ax, ay, 10, 10) for ax, ay in anchors])
    points_per_pixel = 72 / figure.dpi
    for (n, _, x, y), (ax, ay), (cx, cy) in zip(points, anchors, centres):
        axes.annotate(
            str(n), (x, y), xytext=((cx - ax) * points_per_pixel, (ay - cy) * points_per_pixel), textcoords="offset points",
            ha="center", va="center", fontsize=8, fontweight="bold", color="#222",
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "#666"} if abs(cx - ax) + abs(cy - ay) > 16 else None,
        )


def save_png(result: BenchResult, path: str) -> None:
    try:
        atomic_write(path, chart_png(result))
    except ImportError:
        raise GraphoptError("--png needs matplotlib (pip install matplotlib)") from None
