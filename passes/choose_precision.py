"""choose-precision: each matmul's type (fp32, bf16, int8, int4) from measured latency and sensitivity.

Rules. The candidates are `quantize`'s (matmuls with a constant float32 weight). For each:

1. **Latency, measured on the target** (`target`, e.g. `onnxruntime:cpu{threads=2}` or `torch`):
   a one-matmul graph of the candidate's weight shape, fed as many rows as the first
   calibration sample gives it, is converted to each precision of `precisions` (the same
   rewrites as step 4), compiled and timed side by side (`graphopt.timing`, median of
   LATENCY_CALLS calls each; each shape measured once). A precision the target refuses (ONNX
   Runtime's CPU kernels have no bf16) or that is not faster than the next more precise one is
   dropped for that shape.
2. **Sensitivity, per matmul, on calibration data**: the relative squared error of x @ W in
   that precision on up to SENSITIVITY_ROWS calibration activation rows of its input
   (bf16: inputs and weights rounded to bfloat16; int8: uint8 per-tensor activations and
   per-channel int8 weights, as quantize{mode=dynamic}; int4: quantize{mode=weight-only}'s
   round-to-nearest blocks).
3. **A path of assignments**: from all-fp32, repeatedly move the matmul whose next faster
   precision costs the least error per millisecond saved; every step is a point of
   (predicted latency = the sum of the chosen matmuls' latencies, predicted error).
   The graph's **fidelity** at a point is measured on the target: mean cosine similarity of
   its float outputs' last-axis vectors to the fp32 graph's, on the first `samples`
   calibration samples. A binary search finds the furthest point whose fidelity is at least
   `fidelity`; the points it measured are the explored Pareto table (stats["pareto"],
   also logged).
4. The chosen point is applied: int8 matmuls as `quantize{mode=dynamic}`, int4 as
   `quantize{mode=weight-only,dtype=int4}` (its block_size, accuracy_level), then bf16 ones
   as `to-bf16` restricted to them.

Needs calibration data and float32 constant weights (run it before to-fp16/to-bf16/quantize;
after fuse). Changes: the chosen matmuls as above. Lossy; stats: matmuls per precision, the
fidelity reached, predicted matmul milliseconds and the explored points. Timing makes the
choice depend on the machine (and its load): run it where the model will run.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import heapq
from typing import Any, Optional

import numpy as np

from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph
from graphopt.ir.types import TensorType
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.timing import median_ms
from graphopt.passes.quantize import Candidate, QuantizationError, Quantize, find_candidates, mean_cosine

PRECISIONS = ("fp32", "bf16", "int8", "int4")
SENSITIVITY_ROWS = 512
LATENCY_CALLS = 15
LATENCY_BLOCK = 5
LATENCY_PAUSE_S = 0.05
"""Each shape's precisions are timed side by side (`graphopt.timing`): rounds of a pause, then a
block of calls each, so one precision's spinning worker threads do not slow the next one's."""
COMPILE_PIPELINE = "eliminate-dead-code"
"""What the pass runs before its trial compiles (the target's lowering follows)."""


@dataclasses.dataclass(frozen=True)
class ParetoPoint:
    """One measured assignment on the path: matmuls per precision, predicted matmul time, fidelity."""

    step: int
    counts: dict[str, int]
    predicted_ms: float
    fidelity: float
    chosen: bool = False


class ParetoTable(list):
    """The explored points, most precise first; `markdown()` renders them."""

    def markdown(self) -> str:
        lines = ["| step | " + " | ".join(PRECISIONS) + " | matmul ms (predicted) | fidelity | chosen |",
                 "|" + " --- |" * (len(PRECISIONS) + 4)]
        for p in self:
            counts = " | ".join(str(p.counts.get(name, 0)) for name in PRECISIONS)
            lines.append(f"| {p.step} | {counts} | {p.predicted_ms:.3f} | {p.fidelity:.5f} | {'yes' if p.chosen else ''} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{len(self)} points"


@register_pass
@dataclasses.dataclass
class ChoosePrecision(Pass):
    """Assign each matmul fp32, bf16, int8 or int4 from measured latency on `target` and
    calibrated sensitivity, keeping the output fidelity (mean cosine) >= `fidelity`.

    See `graphopt.passes.choose_precision`. Needs calibration data and float32 constant weights
    (facts ``constant-float-weights``, ``float32-weights``); changes the chosen matmuls
    (invalidates both facts when it quantizes or halves any); lossy.
    """

    name = "choose-precision"
    lossless = False
    requires = ("constant-float-weights", "float32-weights")
    invalidates = ("constant-float-weights", "float32-weights")
    fidelity: float = 0.995
    """Lowest mean cosine similarity of the outputs to the fp32 graph's on the calibration samples."""
    target: str = "onnxruntime:cpu"
    """Where latencies are measured and fidelity is checked: the target the model will be compiled for."""
    precisions: list[str] = dataclasses.field(default_factory=lambda: list(PRECISIONS))
    """The precisions a matmul may get (from fp32, bf16, int8, int4)."""
    samples: int = 4
    """Calibration samples the fidelity is measured on."""
    block_size: int = 32
    """int4 weights per scale along K."""
    accuracy_level: int = 4
    """int4: MatMulNBits' lowest compute precision (see quantize)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.fidelity <= 1.0:
            raise ValueError(f"fidelity is a cosine similarity in [0, 1], got {self.fidelity}")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or "fp32" not in self.precisions:
            raise ValueError(f"precisions must include fp32 and come from {', '.join(PRECISIONS)}; got {', '.join(self.precisions)}")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        candidates = find_candidates(graph)[0]
        if not candidates:
            return PassResult(False, {"matmuls": 0})
        if not ctx.calibration:
            raise QuantizationError(
                "pass 'choose-precision' needs calibration data: graphopt.optimize(..., calibration_data=[...]) "
                "or `graphopt optimize --calibration-data inputs.npz`"
            )
        samples = ctx.calibration[: self.samples]
        rows, tokens = _activation_rows(graph, samples, candidates)
        latency = self._latencies(candidates, tokens, ctx)
        errors = {c.node.name: {p: _simulated_error(rows[c.activation.name], c, p, self.block_size) for p in latency[c.node.name]}
                  for c in candidates}
        path = _path(latency, errors)
        table, chosen = self._search(graph, path, latency, samples, ctx)
        ctx.logger.info("choose-precision: explored\n%s", table.markdown())
        assignment = path[chosen]
        apply_precisions(graph, assignment, self.block_size, self.accuracy_level)
        counts = _counts(assignment)
        point = next(p for p in table if p.chosen)
        stats: dict[str, Any] = {**{name: counts.get(name, 0) for name in self.precisions}, "fidelity": round(point.fidelity, 6),
                                 "matmul_ms": round(point.predicted_ms, 3), "fp32_matmul_ms": round(table[0].predicted_ms, 3), "pareto": table}
        return PassResult(any(p != "fp32" for p in assignment.values()), stats)

    # ------------------------------------------------------------------ latency
    def _latencies(self, candidates: list[Candidate], tokens: dict[str, int], ctx: PassContext) -> dict[str, dict[str, float]]:
        """{matmul: {precision: ms}} with only the precisions the target runs faster than the
        more precise ones (fp32 always), measured once per (rows, K, N)."""
        measured: dict[tuple[int, int, int], dict[str, float]] = {}
        result = {}
        for c in candidates:
            key = (tokens[c.activation.name], *c.in_out)
            if key not in measured:
                measured[key] = self._measure_shape(*key, ctx)
            result[c.node.name] = measured[key]
        return result

    def _measure_shape(self, rows: int, k: int, n: int, ctx: PassContext) -> dict[str, float]:
        import graphopt

        weight = (np.random.default_rng(0).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
        runners: dict[str, Any] = {}
        for precision in self.precisions:
            single = _single_matmul(rows, weight)
            apply_precisions(single, {"matmul": precision}, self.block_size, self.accuracy_level)
            try:
                compiled = graphopt.compile(single, target=self.target, pipeline=COMPILE_PIPELINE)
            except Exception as exc:  # the target refuses this precision: not a choice here
                if precision == "fp32":
                    raise
                ctx.logger.info("choose-precision: %s cannot run %s matmuls: %s", self.target, precision, str(exc).splitlines()[0])
                continue
            runners[precision] = functools.partial(compiled, x)
        times = median_ms(runners, LATENCY_CALLS, warmup=1, block=LATENCY_BLOCK, pause_s=LATENCY_PAUSE_S)
        kept, fastest = {"fp32": times["fp32"]}, times["fp32"]
        for precision in PRECISIONS[1:]:
            if precision in times and times[precision] < fastest:
                kept[precision] = fastest = times[precision]
        ctx.logger.debug("choose-precision: [%d, %d] x [%d, %d] ms %s, kept %s", rows, k, k, n, times, list(kept))
        return kept

    # ------------------------------------------------------------------ search
    def _search(self, graph: Graph, path: list[dict[str, str]], latency: dict[str, dict[str, float]],
                samples: list[dict[str, np.ndarray]], ctx: PassContext) -> tuple[ParetoTable, int]:
        """The measured points of a binary search for the last point of `path` within `fidelity`."""
        import graphopt

        outputs = [v.name for v in graph.outputs if v.dtype is not None and v.dtype.is_float]
        if not outputs:
            raise QuantizationError(f"choose-precision: graph '{graph.name}' has no float output to compare")
        reference_model = graphopt.compile(graph, target=self.target, pipeline=COMPILE_PIPELINE)
        reference = [_named(reference_model, s, outputs) for s in samples]
        measured: dict[int, float] = {0: 1.0}

        def fidelity(step: int) -> float:
            if step not in measured:
                trial = graph.clone()
                apply_precisions(trial, path[step], self.block_size, self.accuracy_level)
                compiled = graphopt.compile(trial, target=self.target, pipeline=COMPILE_PIPELINE)
                measured[step] = mean_cosine(reference, [_named(compiled, s, outputs) for s in samples])
            return measured[step]

        low, high, best = 1, len(path) - 1, 0
        while low <= high:
            middle = (low + high) // 2
            if fidelity(middle) >= self.fidelity:
                best, low = middle, middle + 1
            else:
                high = middle - 1
        table = ParetoTable(
            ParetoPoint(step, _counts(path[step]), sum(latency[name][p] for name, p in path[step].items()), measured[step], step == best)
            for step in sorted(measured)
        )
        return table, best


def apply_precisions(graph: Graph, assignment: dict[str, str], block_size: int, accuracy_level: int) -> None:
    """Rewrite the matmuls named in `assignment` to their precision (fp32: left as is)."""
    from graphopt.passes.to_fp16 import ToBf16

    by_precision: dict[str, set[str]] = {}
    for name, precision in assignment.items():
        by_precision.setdefault(precision, set()).add(name)
    if by_precision.get("int8"):
        Quantize(mode="dynamic").apply(graph, by_precision["int8"], {})
    if by_precision.get("int4"):
        Quantize(mode="weight-only", dtype="int4", block_size=block_size, accuracy_level=accuracy_level).apply(graph, by_precision["int4"], {})
    if by_precision.get("bf16"):
        ToBf16(include=[glob.escape(name) for name in sorted(by_precision["bf16"])]).run(graph, PassContext())


def _single_matmul(rows: int, weight: np.ndarray) -> Graph:
    graph = Graph("matmul", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, (rows, weight.shape[0])))
    graph.set_outputs([graph.add_node("MatMul", [x, graph.add_constant("w", weight)], name="matmul", output_names=["y"]).output])
    return graph


def _named(compiled: Any, sample: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    results = compiled(*(sample[spec.name] for spec in compiled.inputs))
    by_name = {spec.name: np.asarray(value) for spec, value in zip(compiled.outputs, results)}
    return {name: by_name[name] for name in names}


def _activation_rows(graph: Graph, samples: list[dict[str, np.ndarray]], candidates: list[Candidate]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """({activation: calibration rows}, {activation: rows of it in the first sample})."""
    from graphopt.calibration import GraphRunner, collect_rows

    names = list(dict.fromkeys(c.activation.name for c in candidates))
    first = GraphRunner(graph, names).run(samples[0])
    tokens = {name: int(np.prod(array.shape[:-1])) if array.ndim > 1 else 1 for name, array in first.items()}
    return collect_rows(graph, samples, names, SENSITIVITY_ROWS), tokens


def _simulated_error(rows: np.ndarray, c: Candidate, precision: str, block_size: int) -> float:
    """Relative squared error of rows @ W computed in `precision` (see the module doc)."""
    from graphopt.passes.quantize_weights import rounded_activation, rounded_blocks, rounded_weight

    if precision == "fp32":
        return 0.0
    weight = c.matrix
    exact = rows @ weight
    if precision == "bf16":
        approx = _bf16(rows) @ _bf16(weight)
    elif precision == "int8":
        approx = rounded_activation(rows) @ rounded_weight(weight)
    else:
        approx = rows @ rounded_blocks(weight, 4, block_size)
    return float(np.sum((approx - exact).astype(np.float64) ** 2) / max(float(np.sum(exact.astype(np.float64) ** 2)), 1e-30))


def _bf16(array: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept as float32."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def _path(latency: dict[str, dict[str, float]], errors: dict[str, dict[str, float]]) -> list[dict[str, str]]:
    """Assignments from all-fp32, each moving one matmul to its next faster precision: the move
    with the least added error per millisecond saved first."""
    ladders = {name: sorted(times, key=lambda p: -times[p]) for name, times in latency.items()}
    current = {name: "fp32" for name in latency}
    position = {name: 0 for name in latency}
    heap: list[tuple[float, int, str]] = []
    order = {name: i for i, name in enumerate(latency)}

    def push(name: str) -> None:
        ladder, index = ladders[name], position[name]
        if index + 1 < len(ladder):
            here, there = ladder[index], ladder[index + 1]
            saved = latency[name][here] - latency[name][there]
            cost = max(errors[name][there] - errors[name][here], 0.0)
            heapq.heappush(heap, (cost / max(saved, 1e-9), order[name], name))

    for name in latency:
        push(name)
    path = [dict(current)]
    while heap:
        _, _, name = heapq.heappop(heap)
        position[name] += 1
        current[name] = ladders[name][position[name]]
        path.append(dict(current))
        push(name)
    return path


def _counts(assignment: dict[str, str]) -> dict[str, int]:
    return dict(collections.Counter(assignment.values()))
