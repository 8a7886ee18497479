"""quantize: int8 Q/DQ, dynamic int8 and weight-only int4/int8 matmuls.

Rules. A *candidate* is a MatMul whose second input is a constant float32 [K, N] weight and
whose first input is a float32 activation, or a Gemm (transA=0, alpha=beta=1) with a constant
B; nodes or weights matching an `exclude` pattern (fnmatch) are skipped, and so are matmuls
already quantized (their weight is a DequantizeLinear output), so a second run changes nothing.

- mode=static: the weight becomes a constant int8 (or uint8) tensor, symmetric, per output
  channel (or per tensor), read through a DequantizeLinear (a Gemm's constant bias becomes
  int32 through a DequantizeLinear, without which ONNX Runtime leaves the Gemm in float); the
  activation gets one
  QuantizeLinear (range calibrated on `ctx.calibration` with `calibrate`) and one
  DequantizeLinear *per consumer*, so ONNX Runtime fuses every matmul into an int8 kernel
  (a DequantizeLinear shared by Q, K and V projections left half of them in float32).
- mode=dynamic: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul by the scales (the form
  ONNX Runtime fuses into DynamicQuantizeMatMul), one chain per matmul; no calibration.
- mode=weight-only: com.microsoft MatMulNBits (dtype int4 or int8, blocks of `block_size` along
  K); activations stay float. For ONNX Runtime and the torch target. `symmetric=true` uses
  every level ([-8, 7] for int4, largest magnitude on -8) like ONNX Runtime's quantizer;
  `symmetric=false` adds a zero point per block. `method`: `rtn` rounds to nearest; `awq`
  scales each activation's input channels by their calibrated importance first (the division
  absorbed by the producing norm or a per-channel Mul, as smooth-quant does, else one Mul)
  and clips each block's range where that lowers the block's output error;
  `gptq` spreads rounding errors over the not yet quantized input channels through the
  calibration Hessian (`graphopt.passes.weight_only`). `accuracy_level` is MatMulNBits' lowest
  allowed compute precision (4: int8 activations, ONNX Runtime's fastest CPU kernel; targets
  that compute in float are more precise). `head`: the matmuls whose result is a graph
  output (a decoder's lm_head) may get int8 or stay float.

`smooth` (static and dynamic): first migrate activation outliers into the weights with
smooth-quant's rewrite (`graphopt.passes.smooth_quant.smooth`, lossless in float): an alpha,
`auto` (searched: each alpha, and no smoothing, is tried by quantizing a copy with this
pass's own settings and scored on held-out calibration samples) or `per-layer`, or false.
The default `auto` smooths with a searched alpha when calibration data is given, the mode is
static or dynamic and no smooth-quant ran on the graph before (its alpha is in the graph's
metadata); without calibration data (mode=dynamic) it skips smoothing with a warning.
Measured on all-MiniLM-L6-v2 (20 calibration sentences, mean sentence / mean token cosine of
the last hidden state on 20 others; `benchmarks/recipes_minilm.py`): static 0.9940 / 0.9918,
static + smooth 0.9983 / 0.9977; dynamic 0.9945 / 0.9926, dynamic + smooth 0.9978 / 0.9971.
The price is one Mul per smoothed activation where no norm can absorb the factors (all 24 on
MiniLM, whose norm outputs also feed the residual): 0.42x instead of 0.40x ORT fp32's time at
batch 1 (benchmarks/results/precision_cpu.md); `smooth=false` for the last few percent.

`fidelity_budget` (static and dynamic): measures each candidate's sensitivity (the drop in
mean cosine similarity of the graph's float outputs, per last-axis vector, over the
calibration samples, when only that matmul is quantized), then keeps the most sensitive ones
in float, as few as possible, until the drop with everything else quantized is at most the
budget. Needs: calibration data for static mode, `fidelity_budget` and methods awq/gptq. Changes: candidate
matmuls as above; their float weights are removed once unused. Lossy: reports `quantized`,
`kept_float`, `excluded` and, with a budget, the `fidelity` reached on the calibration data.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np

from graphopt.distributed_calibration import Reducer, gather_rows, global_slice, has_samples
from graphopt.errors import GraphoptError
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value
from graphopt.ir.ops.onnx import is_plain_gemm
from graphopt.ir.types import TensorType
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.passes._structured import CALIBRATION_HINT
from graphopt.passes.quantize_weights import activation_params, quantize_blocks, quantize_symmetric

MICROSOFT_DOMAIN = "com.microsoft"
WEIGHT_ONLY_OPTIONS = ("symmetric", "method", "head")
"""Options that mean something for mode=weight-only only (set with another mode: an error)."""
AWQ_ROWS = 512
"""method=awq searches each activation's scaling on this many calibration vectors."""
SENSITIVITY_SAMPLES = 8
"""fidelity_budget measures each matmul's sensitivity on this many calibration samples."""


class QuantizationError(GraphoptError):
    """A quantization pass cannot run as configured on this graph."""


@dataclasses.dataclass
class Candidate:
    """A matmul the pass can quantize: its node, its constant weight and how B is laid out."""

    node: Node
    weight: Value
    transposed: bool

    @property
    def activation(self) -> Value:
        return self.node.inputs[0]  # type: ignore[return-value]

    @property
    def in_out(self) -> tuple[int, int]:
        """(K, N) of y = x @ W."""
        rows, columns = self.weight.shape  # type: ignore[misc]
        return (columns, rows) if self.transposed else (rows, columns)

    @property
    def matrix(self) -> np.ndarray:
        """The weight as the [K, N] matrix of y = x @ W."""
        data = self.weight.const.numpy()  # type: ignore[union-attr]
        return np.ascontiguousarray(data.T) if self.transposed else data


def find_candidates(graph: Graph, exclude: Sequence[str] = ()) -> tuple[list[Candidate], list[str], int]:
    """(candidates, names of excluded matmuls, number of matmuls already quantized)."""
    candidates, excluded, quantized = [], [], 0
    for node in graph.nodes:
        if node.domain or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        activation, weight = node.inputs[0], node.inputs[1]
        if weight is not None and weight.producer is not None and weight.producer.op_type == "DequantizeLinear":
            quantized += 1
            continue
        if activation is None or weight is None or weight.const is None or activation.const is not None:
            continue
        if activation.dtype != DType.FLOAT or weight.dtype != DType.FLOAT or weight.type.rank != 2:
            continue
        if node.op_type == "Gemm" and not is_plain_gemm(node):
            continue
        if any(fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(weight.name, p) for p in exclude):
            excluded.append(node.name)
            continue
        candidates.append(Candidate(node, weight, node.op_type == "Gemm" and bool(node.attrs.get("transB", 0))))
    return candidates, excluded, quantized


@register_pass
@dataclasses.dataclass
class Quantize(Pass):
    """Quantize matmuls with constant weights: static int8 Q/DQ, dynamic int8 or weight-only int4/int8.

    See the module doc of `graphopt.passes.quantize` for the rules. `dtype`: the weights' type
    (int8 or uint8 for static/dynamic; int4 or int8 for weight-only); `activations`: the
    static activations' type (uint8 is ONNX Runtime's fast x86 path); `smooth`: SmoothQuant
    first (by default with a searched alpha whenever calibration data is given; without it, a
    warning). Needs calibration data for mode=static, `fidelity_budget` and an explicit
    `smooth`, and float32 constant weights (facts
    ``constant-float-weights``, ``float32-weights``: run it before to-fp16/to-bf16, and once).
    Changes: candidate matmuls only, whose weights are no longer float constants
    (invalidates ``constant-float-weights``); lossy.
    """

    name = "quantize"
    lossless = False
    requires = ("constant-float-weights", "float32-weights")
    invalidates = ("constant-float-weights",)
    mode: Literal["static", "dynamic", "weight-only"] = "static"
    """static: int8 activations with calibrated ranges (needs calibration data); dynamic: activation ranges computed at run time; weight-only: int4/int8 weights, float activations (MatMulNBits)."""
    dtype: Literal["int8", "uint8", "int4"] = "int8"
    """The weights' type."""
    activations: Literal["uint8", "int8"] = "uint8"
    """Static mode: the activations' type (uint8 is ONNX Runtime's fast x86 path)."""
    per_channel: bool = True
    """One weight scale per output channel (else one per tensor)."""
    calibrate: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    """Static mode: how activation ranges are chosen from the calibration statistics."""
    block_size: int = 32
    """Weight-only: weights per scale along K (a power of two, at least 16)."""
    exclude: list[str] = dataclasses.field(default_factory=list)
    """fnmatch patterns of node or weight names to keep in float."""
    fidelity_budget: Optional[float] = None
    """Largest allowed drop in mean output cosine similarity on the calibration data."""
    symmetric: bool = True
    """Weight-only: no zero points (False: one zero point per block)."""
    method: Literal["rtn", "awq", "gptq"] = "rtn"
    """Weight-only: round-to-nearest, or the calibrated AWQ-style or GPTQ-style methods."""
    accuracy_level: int = 4
    """Weight-only: MatMulNBits' lowest allowed compute precision (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8)."""
    head: Literal["same", "int8", "float"] = "same"
    """Weight-only: the type of matmuls whose result is a graph output (a decoder's lm_head)."""
    smooth: Union[bool, float, Literal["auto", "per-layer"]] = "auto"
    """Static and dynamic: smooth-quant first, with this alpha (in [0, 1]), `auto` or `per-layer`
    (searched), or false. `auto` (default): a searched alpha when calibration data is given
    and no smooth-quant ran before, else none (with a warning when the data is missing)."""

    def __post_init__(self) -> None:
        if self.mode == "weight-only" and self.dtype == "uint8":
            raise ValueError("mode=weight-only takes dtype=int4 or int8 (MatMulNBits stores unsigned values itself)")
        if self.mode != "weight-only" and self.dtype == "int4":
            raise ValueError(f"dtype=int4 needs mode=weight-only (mode={self.mode} runs int8 kernels)")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.fidelity_budget is not None and not 0.0 < self.fidelity_budget < 1.0:
            raise ValueError(f"fidelity_budget is a drop in cosine similarity, in (0, 1); got {self.fidelity_budget}")
        if self.accuracy_level not in range(5):
            raise ValueError(f"accuracy_level is 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8); got {self.accuracy_level}")
        if self.mode != "weight-only":
            changed = [f.name for f in dataclasses.fields(self) if f.name in WEIGHT_ONLY_OPTIONS and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"{', '.join(changed)} apply to mode=weight-only only (mode={self.mode})")
        if self.smooth is True or (self.smooth not in ("auto", "per-layer") if isinstance(self.smooth, str)
                                   else not isinstance(self.smooth, bool) and not 0.0 <= self.smooth <= 1.0):
            raise ValueError(f"smooth takes an alpha in [0, 1], auto, per-layer or false; got {self.smooth}")
        if self.mode == "weight-only" and self.smooth != "auto" and self.smooth is not False:
            raise ValueError("smooth applies to mode=static and mode=dynamic (weight-only: method=awq scales channels itself)")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        candidates, excluded, already = find_candidates(graph, list(self.exclude))
        stats: dict[str, object] = {"quantized": 0, "kept_float": 0, "excluded": len(excluded)}
        if already:
            stats["already_quantized"] = already
        if not candidates:
            return PassResult(False, stats)
        reasons = [why for why, needed in (("mode=static", self.mode == "static"), (f"method={self.method}", self.method != "rtn"),
                                           ("fidelity_budget", self.fidelity_budget is not None),
                                           (f"smooth={self.smooth}", self.smooth != "auto" and self.smooth is not False)) if needed]
        if reasons and not has_samples(ctx.calibration, ctx.reducer):
            other = ", or use mode=dynamic, which needs none" if reasons[0] == "mode=static" else ""
            raise QuantizationError(f"pass 'quantize' with {reasons[0]} needs calibration data: give it with {CALIBRATION_HINT}{other}")
        alpha = self._smooth_alpha(graph, ctx)
        if alpha is not None:
            from graphopt.passes.smooth_quant import smooth

            smoothed = smooth(graph, ctx, alpha, list(self.exclude), dataclasses.replace(self, smooth=False, fidelity_budget=None))
            stats.update(smoothed.stats)
            candidates = find_candidates(graph, list(self.exclude))[0]
        if self.mode == "weight-only" and self.head == "float":
            heads = [c for c in candidates if _is_head(c)]
            candidates = [c for c in candidates if not _is_head(c)]
            stats["kept_float"] = len(heads)
            if not candidates:
                return PassResult(False, stats)
        if self.mode == "static":
            plan = self._activation_plan(graph, candidates, ctx)
        elif self.method != "rtn":
            plan = self._weight_only_plan(graph, candidates, ctx)
        else:
            plan = {}
        chosen = [c.node.name for c in candidates]
        if self.fidelity_budget is not None:
            chosen, fidelity = self._within_budget(graph, chosen, plan, ctx)
            stats["fidelity"] = round(fidelity, 6)
        self.apply(graph, set(chosen), plan)
        stats["quantized"] = len(chosen)
        stats["kept_float"] = int(stats["kept_float"]) + len(candidates) - len(chosen)
        return PassResult(bool(chosen), stats)

    def _smooth_alpha(self, graph: Graph, ctx: PassContext) -> Union[float, str, None]:
        """The smooth-quant alpha to apply first (see the module doc), or None."""
        if self.smooth is False or self.mode == "weight-only":
            return None
        if self.smooth != "auto":
            return self.smooth
        from graphopt.passes.smooth_quant import ALPHA_KEY

        if ALPHA_KEY in (graph.metadata.get("metadata_props") or {}):
            return None
        if not has_samples(ctx.calibration, ctx.reducer):
            ctx.logger.warning(
                "quantize{mode=%s}: no calibration data, so activations are not smoothed first. smooth=auto, the default "
                "when calibration data is given (SmoothQuant with a searched alpha), keeps more of the output "
                "(all-MiniLM-L6-v2, int8 dynamic: sentence cosine 0.998 instead of 0.9945) but needs calibration data: %s. "
                "Set smooth=false to keep this choice without the warning", self.mode, CALIBRATION_HINT)
            return None
        return "auto"

    # ------------------------------------------------------------------ planning
    def _activation_plan(self, graph: Graph, candidates: list[Candidate], ctx: PassContext) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Scale and zero point of every candidate activation, from calibration."""
        from graphopt.calibration import calibrated_range, collect_statistics

        names = list(dict.fromkeys(c.activation.name for c in candidates))
        stats = collect_statistics(graph, ctx.calibration, names, histogram=self.calibrate != "minmax", reducer=ctx.reducer)
        plan = {}
        for name in names:
            low, high = calibrated_range(stats[name], self.calibrate)
            plan[name] = activation_params(low, high, self.activations)
        return plan

    def _weight_only_plan(self, graph: Graph, candidates: list[Candidate], ctx: PassContext) -> dict[str, Any]:
        """{activation name: Gram matrix of its calibration vectors} (method=gptq), or
        {activation name: (AWQ factors or None, calibration rows)} (method=awq)."""
        from graphopt.calibration import collect_gram, collect_rows
        from graphopt.passes.weight_only import awq_factors

        names = list(dict.fromkeys(c.activation.name for c in candidates))
        if self.method == "gptq":
            grams = collect_gram(graph, ctx.calibration, names, reducer=ctx.reducer)
            short = [(name, gram.rows, gram.matrix.shape[0]) for name, gram in grams.items() if gram.rows < gram.matrix.shape[0]]
            if short:
                name, rows, channels = max(short, key=lambda item: item[2] - item[1])
                ctx.logger.warning(
                    "quantize method=gptq: the calibration data gives %d activation vectors of '%s' for %d input channels "
                    "(%d matmul inputs short of that): the Hessian is rank-deficient and GPTQ may fit the calibration data "
                    "rather than the model; give at least %d tokens", rows, name, channels, len(short), channels)
            return {name: gram.matrix for name, gram in grams.items()}
        rows = collect_rows(graph, ctx.calibration, names, AWQ_ROWS, reducer=ctx.reducer)
        plan: dict[str, Any] = {}
        for name in names:
            group = [c for c in candidates if c.activation.name == name]
            bits = {self._bits(c) for c in group}
            factors = awq_factors(rows[name], [c.matrix for c in group], 4, self.block_size, self.symmetric) if bits == {4} else None
            plan[name] = (factors, rows[name])
        ctx.logger.info("quantize: AWQ scaled %d of %d activations", sum(f is not None for f, _ in plan.values()), len(names))
        return plan

    def _bits(self, c: Candidate) -> int:
        return 8 if self.dtype == "int8" or (self.head == "int8" and _is_head(c)) else 4

    def _within_budget(self, graph: Graph, names: list[str], plan: dict, ctx: PassContext) -> tuple[list[str], float]:
        """The largest set of `names` (dropping the most sensitive first) within the budget."""
        from graphopt.calibration import GraphRunner

        outputs = [v.name for v in graph.outputs if v.dtype is not None and v.dtype.is_float]
        if not outputs:
            raise QuantizationError(f"fidelity_budget: graph '{graph.name}' has no float output to compare")
        baseline = GraphRunner(graph, outputs)
        reference = [baseline.run(s) for s in ctx.calibration]

        def fidelity(subset: set[str], count: Optional[int] = None) -> float:
            trial = graph.clone()
            self.apply(trial, subset, plan)
            runner = GraphRunner(trial, outputs, optimize=True)
            samples = global_slice(ctx.calibration, ctx.reducer, stop=count)
            return mean_cosine(reference, [runner.run(s) for s in samples], ctx.reducer)

        sensitivity = {name: 1.0 - fidelity({name}, SENSITIVITY_SAMPLES) for name in names}
        order = sorted(names, key=lambda n: (-sensitivity[n], names.index(n)))
        ctx.logger.debug("quantize: sensitivity %s", ", ".join(f"{n}={sensitivity[n]:.2e}" for n in order))
        low, high = 0, len(order)
        best = (order[len(order):], 1.0)
        while low <= high:
            keep = (low + high) // 2
            subset = order[keep:]
            reached = fidelity(set(subset)) if subset else 1.0
            if 1.0 - reached <= self.fidelity_budget:
                best, high = (subset, reached), keep - 1
            else:
                low = keep + 1
        chosen = set(best[0])
        ctx.logger.info("quantize: kept %d of %d matmuls in float for fidelity %.5f", len(names) - len(chosen), len(names), best[1])
        return [n for n in names if n in chosen], best[1]

    # ------------------------------------------------------------------ rewriting
    def apply(self, graph: Graph, names: set[str], plan: dict) -> None:
        """Quantize the candidates of `graph` named in `names` (plan: static activation params)."""
        candidates = [c for c in find_candidates(graph, list(self.exclude))[0] if c.node.name in names]
        weights: dict[str, tuple[Value, ...]] = {}
        if self.mode == "static":
            by_activation: dict[str, list[Candidate]] = {}
            for c in candidates:
                by_activation.setdefault(c.activation.name, []).append(c)
            for group in by_activation.values():
                self._static(graph, group, plan[group[0].activation.name], weights)
        elif self.mode == "dynamic":
            for c in candidates:
                self._dynamic(graph, c, weights)
        else:
            awq = self._awq_scale(graph, candidates, plan) if self.method == "awq" else {}
            for c in candidates:
                self._weight_only(graph, c, weights, awq.get(c.node.name), plan.get(c.activation.name) if self.method == "gptq" else None)
        for c in candidates:
            if not c.weight.uses() and c.weight.graph is graph:
                graph.remove_constant(c.weight)

    def _weight_constants(self, graph: Graph, c: Candidate, weights: dict, as_stored: bool) -> tuple[Value, Value, Value, int]:
        """(quantized, scale, zero point, channel axis) constants of a candidate's weight, per
        output channel, made once: in its stored layout (`as_stored`) or as a [K, N] matrix."""
        layout = as_stored or not c.transposed
        key = (c.weight.name, layout)
        axis = 0 if (c.transposed and as_stored) else 1
        if key not in weights:
            data = c.weight.const.numpy()  # type: ignore[union-attr]
            matrix = data if layout else np.ascontiguousarray(data.T)
            q, scale, zero = quantize_symmetric(matrix, axis if self.per_channel else None, self.dtype)
            suffix = "" if layout else "_t"
            weights[key] = (
                graph.add_constant(f"{c.weight.name}{suffix}_quantized", q),
                graph.add_constant(f"{c.weight.name}{suffix}_scale", scale),
                graph.add_constant(f"{c.weight.name}{suffix}_zero_point", zero),
            )
        return (*weights[key], axis)  # type: ignore[return-value]

    def _static(self, graph: Graph, group: list[Candidate], params: tuple[np.ndarray, np.ndarray], weights: dict) -> None:
        activation = group[0].activation
        scale = graph.add_constant(f"{activation.name}_scale", params[0])
        zero = graph.add_constant(f"{activation.name}_zero_point", params[1])
        quant = graph.add_node("QuantizeLinear", [activation, scale, zero], before=group[0].node)
        for c in group:
            dq_act = graph.add_node("DequantizeLinear", [quant.output, scale, zero], before=c.node)
            q, w_scale, w_zero, axis = self._weight_constants(graph, c, weights, as_stored=True)
            attrs = {"axis": axis} if self.per_channel else {}
            dq_weight = graph.add_node("DequantizeLinear", [q, w_scale, w_zero], attrs, before=c.node)
            c.node.replace_input(0, dq_act.output)
            c.node.replace_input(1, dq_weight.output)
            if c.node.op_type == "Gemm" and len(c.node.inputs) > 2 and c.node.inputs[2] is not None:
                self._quantize_bias(graph, c.node, params[0] * w_scale.const.numpy())  # type: ignore[union-attr]

    def _quantize_bias(self, graph: Graph, gemm: Node, scale: np.ndarray) -> None:
        """A Gemm's constant bias vector as int32 (scale = activation scale * weight scale)
        through a DequantizeLinear: ONNX Runtime fuses the Gemm into QGemm only then."""
        bias = gemm.inputs[2]
        n = gemm.output.shape[-1] if gemm.output.shape else None
        if bias.const is None or bias.type.rank != 1 or bias.shape[0] != n:  # type: ignore[union-attr]
            return
        scale = np.broadcast_to(scale.astype(np.float32), (n,)).copy()
        q = np.clip(np.rint(bias.const.numpy() / scale), -(2**31), 2**31 - 1).astype(np.int32)  # type: ignore[union-attr]
        values = [graph.add_constant(f"{bias.name}_quantized", q), graph.add_constant(f"{bias.name}_scale", scale),
                  graph.add_constant(f"{bias.name}_zero_point", np.zeros(n, np.int32))]
        gemm.replace_input(2, graph.add_node("DequantizeLinear", values, {"axis": 0}, before=gemm).output)
        if not bias.uses() and bias.graph is graph:
            graph.remove_constant(bias)

    def _dynamic(self, graph: Graph, c: Candidate, weights: dict) -> None:
        q, w_scale, w_zero, _ = self._weight_constants(graph, c, weights, as_stored=False)
        node = c.node
        dynamic = graph.add_node("DynamicQuantizeLinear", [c.activation], num_outputs=3, before=node)
        a_q, a_scale, a_zero = dynamic.outputs
        product = graph.add_node("MatMulInteger", [a_q, q, a_zero, w_zero], before=node)
        as_float = graph.add_node("Cast", [product.output], {"to": DType.FLOAT.value}, before=node)
        scales = graph.add_node("Mul", [a_scale, w_scale], before=node)
        result = graph.add_node("Mul", [as_float.output, scales.output], before=node)
        self._replace(graph, node, result)

    def _awq_scale(self, graph: Graph, candidates: list[Candidate], plan: dict[str, Any]) -> dict[str, tuple[Optional[np.ndarray], np.ndarray]]:
        """Divide each activation with AWQ factors by them (absorbed by its producer when only
        these matmuls read it, else one Mul); {matmul name: (factors its weight rows get, the
        calibration rows as the matmul now sees them)}."""
        from graphopt.passes.smooth_quant import divide_activation

        by_activation: dict[str, list[Candidate]] = {}
        for c in candidates:
            if c.activation.name in plan:
                by_activation.setdefault(c.activation.name, []).append(c)
        scaled = {}
        for name, group in by_activation.items():
            factors, rows = plan[name]
            if factors is not None:
                divide_activation(graph, group, factors)
                rows = rows / factors
            scaled.update({c.node.name: (factors, rows) for c in group})
        return scaled

    def _weight_only(self, graph: Graph, c: Candidate, weights: dict, awq: Optional[tuple[Optional[np.ndarray], np.ndarray]],
                     gram: Optional[np.ndarray]) -> None:
        from graphopt.passes.weight_only import clipped_blocks, gptq

        bits = self._bits(c)
        matrix = c.matrix
        k, n = matrix.shape
        key = (c.weight.name, bits, c.activation.name if self.method != "rtn" else None)
        if key not in weights:
            if gram is not None:
                encoded = gptq(matrix, gram, bits, self.block_size, self.symmetric)
            elif awq is not None:
                factors, rows = awq
                scaled = matrix if factors is None else matrix * factors[:, None]
                encoded = clipped_blocks(scaled, rows, bits, self.block_size, self.symmetric)
            else:
                encoded = quantize_blocks(matrix, bits, self.block_size, self.symmetric)
            tag = graph.unique_name(f"{c.weight.name}_q{bits}")
            inputs = [graph.add_constant(tag, encoded.packed), graph.add_constant(f"{tag}_scales", encoded.scales.reshape(-1))]
            if encoded.zero_points is not None:
                inputs.append(graph.add_constant(f"{tag}_zero_points", encoded.zero_points.reshape(-1)))
            weights[key] = inputs
        graph.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
        attrs = {"K": k, "N": n, "bits": bits, "block_size": self.block_size}
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        node = graph.add_node("MatMulNBits", [c.activation, *weights[key]], attrs, domain=MICROSOFT_DOMAIN, before=c.node)
        shape = c.activation.shape
        node.output.type = TensorType(DType.FLOAT, None if shape is None else (*shape[:-1], n))
        self._replace(graph, c.node, node)

    def _replace(self, graph: Graph, old: Node, new: Node) -> None:
        """Make `new` stand for the matmul `old` (adding a Gemm's bias C), and erase `old`."""
        result = new.output
        if old.op_type == "Gemm" and len(old.inputs) > 2 and old.inputs[2] is not None:
            result = graph.add_node("Add", [result, old.inputs[2]], before=old).output
        name = old.output.name
        old.output.replace_all_uses_with(result)
        graph.erase(old)
        graph.rename_value(result, name)


def _is_head(c: Candidate) -> bool:
    """Whether the matmul's result, or its sum with a bias, is a graph output (an lm_head)."""
    result = c.node.output
    if result.is_graph_output:
        return True
    uses = result.uses()
    return len(uses) == 1 and uses[0].node.op_type == "Add" and not uses[0].node.domain and uses[0].node.output.is_graph_output


def mean_cosine(reference: list[dict[str, np.ndarray]], actual: list[dict[str, np.ndarray]], reducer: Optional[Reducer] = None) -> float:
    """Mean cosine similarity of last-axis vectors over every sample and output; with a
    distributed `reducer`, over every rank's samples (the cosines are gathered in rank order,
    so the mean is one process's to the bit)."""
    cosines = []
    for ref, got in zip(reference, actual):
        for name, expected in ref.items():
            a = expected.reshape(-1, expected.shape[-1] if expected.ndim else 1).astype(np.float64)
            b = got[name].reshape(a.shape).astype(np.float64)
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            cosines.append(np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-30), 1.0))
    return float(np.mean(gather_rows(np.concatenate(cosines) if cosines else np.zeros(0), reducer)))
