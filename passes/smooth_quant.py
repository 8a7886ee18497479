"""smooth-quant: move activation outliers into the weights before int8 quantization.

Rule (SmoothQuant, Xiao et al. 2023): for each float activation x read by matmuls with
constant weights (the candidates of `quantize`), with a_j = max |x_j| over the calibration
data per input channel j and w_j = max |W[j, :]| over those matmuls' weights,

    s_j = a_j^alpha / w_j^(1 - alpha)      (s_j = 1 where a_j or w_j is 0)
    x_j -> x_j / s_j,   W[j, :] -> W[j, :] * s_j

which leaves x @ W unchanged. The division is absorbed, exactly, by x's producer when only
those matmuls read x: a LayerNormalization, graphopt::RMSNorm or graphopt::SkipLayerNorm
(first output) has its scale (and beta) divided by s, a Mul by a constant per-channel vector
has that vector divided by s, and an attention output with its heads merged (x = Reshape(
Transpose(graphopt::Attention(q, k, v)))) has the columns of v's projection (weight and bias,
also within a fused QKV projection) divided by s: attention is linear in its values. Otherwise
one `Mul(x, 1/s)` feeds the matmuls (an elementwise
op; folding 1/s into a per-channel QuantizeLinear scale instead was measured 4x slower in
ONNX Runtime, whose per-axis QuantizeLinear is not vectorized). Running it again computes
s = 1 everywhere (a' = a/s, w' = w*s) and changes nothing.

Searched alphas (measured on all-MiniLM-L6-v2: alpha=0.5 barely helped, 0.6-0.8 did, 0.3
made int8 much worse, so the best value depends on the model):
- `alpha=auto`: one alpha for the graph, from AUTO_ALPHAS, or none, by trial: each is
  applied to a copy (statistics from the even-numbered calibration samples, at most
  SEARCH_SAMPLES) followed by `quantize` (static, or the calling quantize's own settings),
  and the one whose outputs on the odd-numbered samples (held out, at most SEARCH_SAMPLES)
  have the highest mean cosine similarity to the float graph's wins (the smaller on a tie;
  not smoothing at all wins ties; a single sample serves for both). Scoring on samples the statistics did not see matters:
  scored on the same samples, alpha=0.8 won on all-MiniLM-L6-v2 and generalized worse to
  other sentences (8 calibration sentences: sentence cosine 0.9932, below the unsmoothed
  0.9942) than the held-out choice 0.6 (0.9968). With calibration samples padded to a fixed
  length (pad tokens' activations enter the statistics) no alpha beat not smoothing.
- `alpha=per-layer`: for each smoothed activation, the alpha of AUTO_ALPHAS (or no
  smoothing) whose simulated int8 matmuls (uint8 min/max activations, per-channel int8
  weights) have the smallest relative squared output error on LOCAL_ROWS calibration
  activation vectors. Cheaper than `auto` (no graph runs per trial).
The alpha applied (a number, or the searched choice) is recorded in the model's metadata
(`graphopt.smooth_quant.alpha`, kept in the ONNX file); a later searched run on such a graph,
and `quantize`'s own smoothing (its option `smooth`, which calls `smooth` here with its own
settings as the trial quantizer), leave it as it is.

Needs: calibration data. Changes: the weights of those matmuls, the scales of the absorbing
norms or Muls, or one new Mul per smoothed activation; lossless in float.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, Optional, Sequence, Union

import numpy as np

from graphopt.distributed_calibration import global_slice, has_samples, shard_offset
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.passes._structured import CALIBRATION_HINT, bias_slot, find_columns, replace_constant
from graphopt.passes.quantize import Candidate, QuantizationError, find_candidates

if TYPE_CHECKING:
    from graphopt.passes.quantize import Quantize

AUTO_ALPHAS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
LOCAL_ROWS = 512
"""alpha=per-layer scores each alpha on this many activation vectors per smoothed value."""
SEARCH_SAMPLES = 8
"""alpha=auto smooths, calibrates and scores each trial on this many calibration samples."""
ALPHA_KEY = "graphopt.smooth_quant.alpha"
SCALE_RANGE = (1e-5, 1e5)
UNCHANGED = 1e-3
"""Factors within this relative distance of 1 everywhere leave an activation as it is."""

_GELUS = ("Gelu", "FastGelu", "BiasGelu")

# op -> (input index of the scale, input index of the shift or None) of norms whose output 0
# is scale * normalized + shift over the last axis
_NORMS = {
    ("", "LayerNormalization"): (1, 2),
    ("graphopt", "RMSNorm"): (1, None),
    ("graphopt", "SkipLayerNorm"): (2, 3),
}


@register_pass
@dataclasses.dataclass
class SmoothQuant(Pass):
    """Migrate activation outliers into matmul weights (SmoothQuant), losslessly in float.

    See `graphopt.passes.smooth_quant`. Run before `quantize{mode=static}` or
    `quantize{mode=dynamic}` (whose default `smooth=auto` does the same as alpha=auto
    when calibration data is given and no smooth-quant ran before it). Needs
    calibration data and float32 constant weights (facts ``constant-float-weights``,
    ``float32-weights``: run it before quantize, to-fp16 and to-bf16); changes weights,
    norm scales or adds one Mul per smoothed activation.
    """

    name = "smooth-quant"
    requires = ("constant-float-weights", "float32-weights")
    tolerance = 1e-3
    alpha: Union[float, Literal["auto", "per-layer"]] = 0.5
    """Migration strength: 0 leaves activations, 1 moves all their range into the weights;
    `auto` / `per-layer`: searched on the calibration data (see the module doc)."""
    exclude: list[str] = dataclasses.field(default_factory=list)
    """fnmatch patterns of matmul node or weight names not to smooth."""
    gelu_outputs: bool = True
    """Smooth the activations a Gelu writes (a Transformer's FFN down-projection inputs).
    No producer absorbs their factors, and on the torch target their Mul keeps the
    up-projection's int8 linear from writing the quantized activation itself (see
    docs/quantization.md for what `false` costs and gains)."""

    def __post_init__(self) -> None:
        if self.alpha not in ("auto", "per-layer") and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from graphopt.passes.quantize import Quantize

        trial = Quantize(exclude=list(self.exclude), smooth=False)
        return smooth(graph, ctx, self.alpha, list(self.exclude), trial, gelu_outputs=self.gelu_outputs)


def smooth(
    graph: Graph, ctx: PassContext, alpha: Union[float, str], exclude: Sequence[str], trial: "Quantize", *, gelu_outputs: bool = True,
) -> PassResult:
    """Smooth the activations of `quantize`'s candidates (not matching `exclude`; without
    `gelu_outputs`, not those a Gelu writes) with `alpha`: a number, `auto` (scored by
    quantizing copies with `trial`, a `quantize` pass that does not smooth) or `per-layer`
    (see the module doc), and record the alpha in graph's metadata. A searched alpha leaves
    a graph whose metadata already records one as it is."""
    properties = graph.metadata.get("metadata_props") or {}
    if alpha in ("auto", "per-layer") and ALPHA_KEY in properties:
        return PassResult(False, {"smoothed": 0, "alpha": properties[ALPHA_KEY]})
    if alpha == "auto":
        chosen: Union[float, str, None] = _search(graph, ctx, list(exclude), trial, gelu_outputs)
    else:
        chosen = alpha if alpha == "per-layer" else float(alpha)
    result = PassResult(False, {"smoothed": 0}) if chosen is None else _smooth(graph, ctx, chosen, list(exclude), gelu_outputs)
    graph.metadata["metadata_props"] = {**properties, ALPHA_KEY: "none" if chosen is None else str(chosen)}
    if alpha in ("auto", "per-layer"):
        result.stats["alpha"] = "none" if chosen is None else chosen
    return result


def _search(graph: Graph, ctx: PassContext, exclude: list[str], trial: "Quantize", gelu_outputs: bool) -> Optional[float]:
    """The alpha of AUTO_ALPHAS whose smoothed-then-quantized (by `trial`) copy is most
    faithful, or None when quantizing without smoothing is (see the module doc)."""
    from graphopt.calibration import GraphRunner
    from graphopt.passes.quantize import mean_cosine

    _require_calibration(ctx)
    samples, reducer = ctx.calibration, ctx.reducer
    if shard_offset(len(samples), reducer)[1] > 1:  # slices of the samples of all ranks, in rank order
        fit, held = global_slice(samples, reducer, 0, None, 2), global_slice(samples, reducer, 1, None, 2)
    else:
        fit, held = samples, samples
    subset = dataclasses.replace(ctx, calibration=global_slice(fit, reducer, stop=SEARCH_SAMPLES))
    held = global_slice(held, reducer, stop=SEARCH_SAMPLES)
    outputs = [v.name for v in graph.outputs if v.dtype is not None and v.dtype.is_float]
    baseline = GraphRunner(graph, outputs)
    reference = [baseline.run(s) for s in held]
    scores = {}
    for alpha in (None, *AUTO_ALPHAS):
        copy = graph.clone()
        if alpha is not None:
            _smooth(copy, subset, alpha, exclude, gelu_outputs)
        trial.run(copy, subset)
        runner = GraphRunner(copy, outputs, optimize=True)
        scores[alpha] = mean_cosine(reference, [runner.run(s) for s in held], reducer)
    ctx.logger.info("smooth-quant: fidelity by alpha (None: not smoothed) %s", scores)
    return max(scores, key=lambda a: (scores[a], -(a or 0.0)))


def _smooth(graph: Graph, ctx: PassContext, alpha: Union[float, str], exclude: list[str], gelu_outputs: bool = True) -> PassResult:
    """Smooth with one alpha, or `per-layer`'s alpha per activation."""
    from graphopt.calibration import collect_rows, collect_statistics

    groups: dict[str, list[Candidate]] = {}
    for c in find_candidates(graph, exclude)[0]:
        if not gelu_outputs and _written_by_gelu(c.activation):
            continue
        channels = c.activation.shape[-1] if c.activation.shape else None
        if isinstance(channels, int) and channels > 0:
            groups.setdefault(c.activation.name, []).append(c)
    if not groups:
        return PassResult(False, {"smoothed": 0})
    _require_calibration(ctx)
    stats = collect_statistics(graph, ctx.calibration, list(groups), reducer=ctx.reducer)
    rows = collect_rows(graph, ctx.calibration, list(groups), LOCAL_ROWS, reducer=ctx.reducer) if alpha == "per-layer" else {}
    counts = {"smoothed": 0, "absorbed": 0, "mul_inserted": 0}
    for name, group in groups.items():
        chosen = _local_alpha(rows[name], stats[name].channel_absmax, group) if alpha == "per-layer" else alpha
        if chosen is None:
            continue
        factors = _factors(stats[name].channel_absmax, group, chosen)
        if np.all(np.abs(factors - 1.0) <= UNCHANGED):
            continue
        for c in group:
            weight = c.weight.const.numpy()  # type: ignore[union-attr]
            scaled = weight * (factors[None, :] if c.transposed else factors[:, None])
            c.node.replace_input(1, graph.add_constant(f"{c.weight.name}_smoothed", scaled.astype(np.float32)))
            if not c.weight.uses() and c.weight.graph is graph:
                graph.remove_constant(c.weight)
        counts["absorbed" if divide_activation(graph, group, factors) else "mul_inserted"] += 1
        counts["smoothed"] += 1
    return PassResult(counts["smoothed"] > 0, counts)


def _written_by_gelu(value: Value) -> bool:
    """Whether a Gelu (graphopt's, ONNX's or com.microsoft's Gelu / FastGelu / BiasGelu) writes `value`."""
    producer = value.producer
    return producer is not None and producer.op_type in _GELUS and producer.domain in ("", "graphopt", "com.microsoft")


def _local_alpha(rows: np.ndarray, activation_max: np.ndarray, group: list[Candidate]) -> Optional[float]:
    """The alpha of AUTO_ALPHAS, or None for no smoothing, whose int8 simulation of the
    group's matmuls on `rows` has the smallest relative squared output error."""
    from graphopt.passes.quantize_weights import rounded_activation, rounded_weight

    weights = [c.matrix for c in group]
    exact = [rows @ w for w in weights]
    errors = {}
    for alpha in (None, *AUTO_ALPHAS):
        factors = np.ones_like(activation_max) if alpha is None else _factors(activation_max, group, alpha)
        restored = rounded_activation(rows / factors)
        error = 0.0
        for w, want in zip(weights, exact):
            error += float(np.sum((restored @ rounded_weight(w * factors[:, None]) - want) ** 2) / max(np.sum(want**2), 1e-30))
        errors[alpha] = error
    return min(errors, key=lambda a: (errors[a], -1.0 if a is None else a))


def _require_calibration(ctx: PassContext) -> None:
    if not has_samples(ctx.calibration, ctx.reducer):
        raise QuantizationError(f"pass 'smooth-quant' needs calibration data: {CALIBRATION_HINT}")


def _factors(activation_max: np.ndarray, group: list[Candidate], alpha: float) -> np.ndarray:
    weight_max = np.zeros_like(activation_max, dtype=np.float32)
    for c in group:
        weight = np.abs(c.weight.const.numpy())  # type: ignore[union-attr]
        weight_max = np.maximum(weight_max, weight.max(axis=0) if c.transposed else weight.max(axis=1))
    valid = (activation_max > 0) & (weight_max > 0)
    safe_a = np.where(valid, activation_max, 1.0).astype(np.float64)
    safe_w = np.where(valid, weight_max, 1.0).astype(np.float64)
    factors = np.where(valid, safe_a**alpha / safe_w ** (1.0 - alpha), 1.0)
    return np.clip(factors, *SCALE_RANGE).astype(np.float32)


def divide_activation(graph: Graph, group: list[Candidate], factors: np.ndarray) -> bool:
    """Make the matmuls of `group` (all reading one activation x) read x / `factors`: inside x's
    producer when only they read x (returns True), else through one new Mul (False)."""
    if _absorb(graph, group[0].activation, {c.node for c in group}, factors):
        return True
    _insert_mul(graph, group, factors)
    return False


def _absorb(graph: Graph, x: Value, readers: set[Node], factors: np.ndarray) -> bool:
    """Divide x by `factors` inside its producer, when only `readers` read x."""
    producer = x.producer
    if producer is None or x.is_graph_output or any(use.node not in readers for use in x.uses()):
        return False
    slots = _NORMS.get((producer.domain, producer.op_type))
    if slots is not None and x.output_index == 0 and _last_axis(producer):
        indices = [i for i in slots if i is not None and i < len(producer.inputs) and producer.inputs[i] is not None]
        if not all(_vector(producer.inputs[i], factors.size) is not None for i in indices):
            return False
        for i in indices:
            _divide_input(graph, producer, i, factors)
        return True
    if producer.op_type == "Mul" and not producer.domain:
        for i in (0, 1):
            if _vector(producer.inputs[i], factors.size) is not None and producer.inputs[1 - i] is not None and producer.inputs[1 - i].shape == x.shape:
                _divide_input(graph, producer, i, factors)
                return True
    return _absorb_into_values(graph, x, factors)


_HEADS_TO_SEQUENCE = (0, 2, 1, 3)
"""The Transpose between [B, H, S, D] and [B, S, H, D] (either way)."""


def _absorb_into_values(graph: Graph, x: Value, factors: np.ndarray) -> bool:
    """Attention is linear in its values: x = Reshape(Transpose(graphopt::Attention(q, k, v)))
    merging the heads ([B, S, H*D], channel h*D + d), with v = Transpose(Reshape(p)) split into
    heads from a projection p = x' @ W (+ b), or one part of a fused projection's last-axis
    Split, is divided by dividing the matching columns of W and b. Only where every value on
    the way has one reader, the attention has no KV cache and as many value heads as query
    heads, and W and b are constants."""
    merge = x.producer
    if merge is None or (merge.domain, merge.op_type) != ("", "Reshape") or x.type.rank != 3:
        return False
    merged = merge.inputs[0].type.shape if merge.inputs[0] is not None else None
    if merged is None or x.type.shape is None or len(merged) != 4 or tuple(merged[:2]) != tuple(x.type.shape[:2]):
        return False  # not [B, S, H, D] -> [B, S, H*D]
    to_sequence = _sole_producer(merge.inputs[0])
    attention = _sole_producer(to_sequence.inputs[0]) if _head_transpose(to_sequence) else None
    if attention is None or (attention.domain, attention.op_type) != ("graphopt", "Attention"):
        return False
    kv_heads = attention.attrs.get("num_kv_heads")
    if len(attention.outputs) != 1 or len(attention.inputs) > 4 or (kv_heads is not None and kv_heads != attention.attrs.get("num_heads")):
        return False
    to_heads = _sole_producer(attention.inputs[2])
    split_heads = _sole_producer(to_heads.inputs[0]) if _head_transpose(to_heads) else None
    if split_heads is None or (split_heads.domain, split_heads.op_type) != ("", "Reshape"):
        return False
    projection = split_heads.inputs[0]
    shape, heads_shape = projection.type.shape, split_heads.output.type.shape
    if shape is None or heads_shape is None or len(shape) != 3 or len(heads_shape) != 4 or tuple(heads_shape[:2]) != tuple(shape[:2]):
        return False
    if shape[2] != factors.size or x.type.shape[-1] != factors.size or len(projection.uses()) != 1 or projection.is_graph_output:
        return False
    columns = find_columns(projection)
    if columns is None or columns.width != factors.size or columns.weight.dtype != np.float32:
        return False
    spread = np.ones(columns.weight.shape[1], np.float32)  # the factors at v's columns of the (fused) weight
    spread[columns.offset:columns.offset + columns.width] = factors
    biases = [(add, by) for add, by in ((columns.bias_add, factors), (columns.fused_bias_add, spread)) if add is not None]
    if any(_vector(add.inputs[bias_slot(add)], by.size) is None for add, by in biases):
        return False
    replace_constant(graph, columns.matmul, 1, columns.weight / spread, "smoothed")
    for add, by in biases:
        _divide_input(graph, add, bias_slot(add), by)
    return True


def _sole_producer(value: Optional[Value]) -> Optional[Node]:
    """The node writing `value` when one node alone reads it (no graph output)."""
    if value is None or value.is_graph_output or len(value.uses()) != 1:
        return None
    return value.producer


def _head_transpose(node: Optional[Node]) -> bool:
    return node is not None and (node.domain, node.op_type) == ("", "Transpose") and tuple(node.attrs.get("perm", ())) == _HEADS_TO_SEQUENCE


def _last_axis(node: Node) -> bool:
    axis = node.attrs.get("axis", -1)
    rank = node.outputs[0].type.rank
    return axis == -1 or (rank is not None and axis == rank - 1)


def _vector(value: Optional[Value], channels: int) -> Optional[np.ndarray]:
    """The data of a constant holding one value per channel of the last axis, else None."""
    data = None if value is None else constant_data(value, limit=None)
    if data is None or data.dtype != np.float32 or data.size != channels or data.shape[-1] != channels:
        return None
    return data


def _divide_input(graph: Graph, node: Node, index: int, factors: np.ndarray) -> None:
    data = _vector(node.inputs[index], factors.size)
    replace_constant(graph, node, index, (data / factors.reshape(data.shape)).astype(np.float32), "smoothed")  # type: ignore[union-attr]


def _insert_mul(graph: Graph, group: list[Candidate], factors: np.ndarray) -> None:
    x = group[0].activation
    inverse = graph.add_constant(f"{x.name}_smooth_factors", (1.0 / factors).astype(np.float32))
    mul = graph.add_node("Mul", [x, inverse], before=group[0].node)
    for c in group:
        c.node.replace_input(0, mul.output)
