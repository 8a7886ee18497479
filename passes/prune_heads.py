"""prune-heads: remove whole attention heads, physically (narrower Q/K/V and output projections).

Structure found on each `graphopt::Attention` (a layer; layers are numbered in graph order):
each of query, key and value is traced back through head-local ops (the [B, S, H, D] ->
[B, H, S, D] Transpose, graphopt::RotaryEmbedding (on x; cos/sin have no head axis), and
rotary-embedding style Mul/Add/Sub/Neg/Slice/Concat/Cast whose
other operands broadcast over the head axis) to one Reshape [.., .., H, D] whose input is the
columns of a constant-weight MatMul (+ constant bias Add), directly or through one output of a
last-axis Split (the fused QKV MatMul of `fuse-qkv`); the output is followed by Transpose ->
Reshape [.., .., H * Dv] -> MatMul by a constant (the output projection). A layer that does not
fit (a per-head attention bias such as ALiBi, a dynamic head count) is left as it is and
listed in the stats under `skipped`.

Units. With num_kv_heads == num_heads a unit is one head; with grouped-query attention it is
one KV group: the KV head together with its num_heads / num_kv_heads query heads, so groups
stay consistent. Every layer keeps at least one unit.

Rule: removing a unit deletes its columns from the Q (K, V) weights and biases, its rows
from the output projection, and lowers `num_heads` / `num_kv_heads`; Reshape shape constants
that spell out the head count or the merged width are rewritten (-1 and 0 entries need
nothing). Which units go:
- `heads={layer: [query heads]}`: exactly those (with GQA, whole groups only);
- `ratio`: that fraction of the units, the lowest-scored, over all layers (`scope=global`)
  or in each layer (`scope=per-layer`). `score=magnitude`: squared L2 norm of the unit's
  Q/K/V columns and output-projection rows (no data). `score=activation`: energy of the
  unit's contribution to the output projection, sum over calibration tokens of
  ||O_h @ Wo_h||^2 (centered when `compensate`, since the mean is restored), divided by the
  energy of the whole layer's projection so that layers compare under `scope=global`.
  `score=taylor`: first-order Taylor importance (Michel et al. 2019's head-mask gradient; see
  `graphopt.passes._taylor`): mean over calibration samples of |dL/dxi| for a gate xi on the
  unit's attention output (a KV group's query heads share one gate), L a loss on the first
  output (cross-entropy or squared error against a sample's `labels` entry; without labels,
  squared error against targets sampled around the unpruned output), divided by the L2 norm
  of the layer's scores.

Defaults (`score=auto`, `compensate=auto`): with calibration data, `score=activation` and
`compensate=true`; without, `score=magnitude` and no compensation, and a warning names the
better setting. Measured on all-MiniLM-L6-v2 (ratio=0.25, 20 calibration sentences, mean
sentence cosine on 20 others): magnitude 0.81, activation 0.97, activation+compensate 0.98,
taylor+compensate 0.98 (slower: gradients), magnitude+compensate 0.80; so `compensate=auto`
compensates only scores computed from the data (activation, taylor) and explicit `heads`.
Options the user sets are kept as given.

`compensate=true` (needs calibration data): layer by layer, in graph order, the kept rows of
the output projection and a bias are refit by ridge-regularized least squares
(`graphopt.passes._structured.refit`) so that the kept heads' outputs in the graph as pruned
so far reproduce the original graph's projection output on the calibration tokens (so each
layer also absorbs part of the drift of the layers before it; one ONNX Runtime run of the
calibration data per pruned layer). The bias is folded into a following bias Add or
SkipLayerNorm bias, else one Add is inserted.

Lossy. Stats: units removed per layer, heads before/after, parameters before/after.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

import numpy as np

from graphopt.distributed_calibration import Reducer, has_samples, mean_rows, summed
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.passes._structured import (
    CALIBRATION_HINT, Columns, CompressionError, add_output_bias, capture, constant_weight, count_params, find_columns,
    lowest_under_budget, refit, reinfer, replace_vector, slice_columns, slice_rows,
)
from graphopt.passes._taylor import gate_gradients, importance

HEAD_LOCAL = {"Mul", "Add", "Sub", "Div", "Neg", "Slice", "Concat", "Cast", "Identity"}
"""Ops allowed between the head Reshape and the Attention (elementwise or last-axis)."""


@dataclasses.dataclass
class _Input:
    """One of query/key/value: its head Reshape, the columns feeding it, the ops in between."""

    reshape: Node
    columns: Columns
    nodes: list[Node]


@dataclasses.dataclass
class _Layer:
    attention: Node
    q: _Input
    k: _Input
    v: _Input
    merge: Node
    out_proj: Node
    heads: int
    kv_heads: int
    head_dim: int
    v_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _trace_input(value: Value, heads: int, attention: Node) -> Optional[_Input]:
    """Follow `value` [B, H, S, D] back to its head Reshape (see the module doc)."""
    reshapes: dict[int, Node] = {}
    nodes: dict[int, Node] = {}
    frontier = [value]
    while frontier:
        current = frontier.pop()
        node = current.producer
        if node is None or len(nodes) > 32:
            return None
        if id(node) in nodes or id(node) in reshapes:
            continue
        if node.op_type == "Transpose" and not node.domain and tuple(node.attrs.get("perm", ())) == (0, 2, 1, 3):
            source = node.inputs[0].producer  # type: ignore[union-attr]
            shape = node.inputs[0].shape  # type: ignore[union-attr]
            if source is None or source.op_type != "Reshape" or shape is None or len(shape) != 4 or shape[2] != heads:
                return None
            nodes[id(node)] = node
            reshapes[id(source)] = source
            continue
        if node.domain == "graphopt" and node.op_type == "RotaryEmbedding":
            nodes[id(node)] = node  # rotates within each head; cos/sin have no head axis
            frontier.append(node.inputs[0])  # type: ignore[arg-type]
            continue
        if node.op_type not in HEAD_LOCAL or node.domain or not _head_local(node):
            return None
        nodes[id(node)] = node
        for operand in node.inputs:
            if operand is None or operand.is_constant or operand.producer is None:
                continue
            shape = operand.shape
            if shape is None or len(shape) != 4 or shape[1] not in (1, heads):
                return None
            if shape[1] == heads:
                frontier.append(operand)
    if len(reshapes) != 1:
        return None
    reshape = next(iter(reshapes.values()))
    inside = set(nodes) | {id(reshape)}
    for node in [reshape, *nodes.values()]:
        for out in node.outputs:
            if out.is_graph_output or any(id(u.node) not in inside and u.node is not attention for u in out.uses()):
                return None
    source = reshape.inputs[0]
    columns = find_columns(source) if source is not None and len(source.uses()) == 1 else None
    if columns is None:
        return None
    return _Input(reshape, columns, list(nodes.values()))


def _head_local(node: Node) -> bool:
    """Slice and Concat only on the last axis (of a rank-4 value)."""
    if node.op_type == "Concat":
        return node.attrs.get("axis") in (-1, 3)
    if node.op_type == "Slice":
        axes = constant_data(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        return axes is not None and all(int(a) in (-1, 3) for a in axes)
    return True


def _trace_output(attention: Node) -> Optional[tuple[Node, Node]]:
    """(merge Reshape, output projection MatMul) after the Attention, else None."""
    chain = []
    value = attention.outputs[0]
    for op in ("Transpose", "Reshape", "MatMul"):
        uses = value.uses()
        if len(uses) != 1 or value.is_graph_output or uses[0].node.op_type != op or uses[0].index != 0:
            return None
        node = uses[0].node
        if op == "Transpose" and tuple(node.attrs.get("perm", ())) != (0, 2, 1, 3):
            return None
        chain.append(node)
        value = node.output
    if constant_weight(chain[2]) is None:
        return None
    return chain[1], chain[2]


def find_layers(graph: Graph) -> tuple[list[_Layer], list[str]]:
    """Prunable attention layers in graph order, and the reasons others were skipped."""
    layers, skipped = [], []
    for node in graph:
        if node.domain != "graphopt" or node.op_type != "Attention":
            continue
        heads = node.attrs.get("num_heads")
        kv_heads = node.attrs.get("num_kv_heads", heads)
        query, key, value = node.inputs[:3]
        bias = node.inputs[3] if len(node.inputs) > 3 else None
        reason = None
        if bias is not None and (bias.shape is None or len(bias.shape) != 4 or bias.shape[1] != 1):
            reason = "its attention bias may differ per head"
        traced = [_trace_input(v, h, node) for v, h in ((query, heads), (key, kv_heads), (value, kv_heads))]  # type: ignore[arg-type]
        output = _trace_output(node)
        if reason is None and (None in traced or output is None):
            reason = "its projections are not constant MatMuls around head Reshapes"
        if reason is None and not all(isinstance(d, int) for d in (query.shape[3], value.shape[3])):  # type: ignore[union-attr]
            reason = "its head size is not static"
        if reason is not None:
            skipped.append(f"{node.label}: {reason}")
            continue
        q, k, v = traced
        layers.append(_Layer(node, q, k, v, output[0], output[1], heads, kv_heads, query.shape[3], value.shape[3]))  # type: ignore
    return layers, skipped


def _unit_heads(layer: _Layer, unit: int) -> list[int]:
    """The query heads of one unit (a head, or a KV group)."""
    return list(range(unit * layer.group, (unit + 1) * layer.group))


def _cols(heads: list[int], size: int) -> np.ndarray:
    return np.concatenate([np.arange(h * size, (h + 1) * size) for h in heads]) if heads else np.zeros(0, np.int64)


def _columns_of(inp: _Input) -> np.ndarray:
    """inp's slice of its MatMul weight (columns offset..offset+width)."""
    return inp.columns.weight[:, inp.columns.offset:inp.columns.offset + inp.columns.width]


def _magnitude(layer: _Layer) -> np.ndarray:
    wq, wk, wv = (_columns_of(i) ** 2 for i in (layer.q, layer.k, layer.v))
    wo = constant_weight(layer.out_proj) ** 2  # type: ignore[operator]
    scores = []
    for unit in range(layer.kv_heads):
        heads = _unit_heads(layer, unit)
        kv = _cols([unit], layer.head_dim)
        score = wq[:, _cols(heads, layer.head_dim)].sum() + wo[_cols(heads, layer.v_dim)].sum()
        scores.append(score + wk[:, kv].sum() + wv[:, _cols([unit], layer.v_dim)].sum())
    return np.array(scores, np.float64)


def _head_outputs(layer: _Layer, outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Attention output per calibration token: [tokens, heads * v_dim] (the merged layout)."""
    parts = []
    for sample in outputs:
        o = sample[layer.attention.output.name]  # [B, H, S, Dv]
        parts.append(np.transpose(o, (0, 2, 1, 3)).reshape(-1, layer.heads * layer.v_dim))
    return np.concatenate(parts).astype(np.float64)


def _activation(layer: _Layer, merged: np.ndarray, centered: bool, reducer: Optional[Reducer] = None) -> np.ndarray:
    """Each unit's share of the output projection's energy over the calibration tokens (of
    every rank: the mean and the sums of squares are reduced)."""
    wo = constant_weight(layer.out_proj).astype(np.float64)  # type: ignore[union-attr]
    x = merged - mean_rows(merged, reducer) if centered else merged
    energies = [float(np.sum((x @ wo) ** 2))]
    for unit in range(layer.kv_heads):
        rows = _cols(_unit_heads(layer, unit), layer.v_dim)
        energies.append(float(np.sum((x[:, rows] @ wo[rows]) ** 2)))
    energies = summed(np.array(energies), reducer).tolist()
    total = energies[0] or 1.0
    return np.array([energy / total for energy in energies[1:]])


def _taylor(graph: Graph, ctx: PassContext, layers: list[_Layer]) -> list[np.ndarray]:
    """Taylor importance of every layer's units: one gate per query head on the attention
    output [B, H, S, Dv]; a unit's gradient is the sum of its heads' (their gates tied)."""
    gradients = gate_gradients(graph, ctx, [(layer.attention.output.name, (layer.heads, 1, 1)) for layer in layers], "prune-heads")
    return [importance(g.reshape(len(g), layer.kv_heads, layer.group).sum(2)) for g, layer in zip(gradients, layers)]


def _rewrite_shape(graph: Graph, reshape: Node, index: int, old: int, new: int) -> None:
    """Replace entry `index` of reshape's constant shape when it spells out `old`."""
    shape = constant_data(reshape.inputs[1]) if reshape.inputs[1] is not None else None
    if shape is None:
        raise CompressionError(f"pass 'prune-heads': Reshape {reshape.label} has a computed shape; cannot change its head count")
    if int(shape[index]) == old:
        updated = shape.copy()
        updated[index] = new
        replace_vector(graph, reshape, 1, updated)


@register_pass
@dataclasses.dataclass
class PruneHeads(Pass):
    """Remove attention heads (or KV groups) by slicing Q/K/V and output-projection weights.

    See `graphopt.passes.prune_heads`. Needs raised `graphopt::Attention` ops (`fuse` or
    `fuse-attention`), float constant weights (fact ``constant-float-weights``: run it before
    quantize and to-bf16); calibration data for score=activation, score=taylor or compensate.
    Defaults: with calibration data score=activation and compensate=true (the most faithful
    measured), without it score=magnitude and no compensation, with a warning. Changes weight
    shapes, num_heads/num_kv_heads, Reshape shape constants; lossy.
    """

    name = "prune-heads"
    lossless = False
    requires = ("attention-fused", "constant-float-weights")
    ratio: float = 0.0
    """Fraction of units (heads, or KV groups) to remove."""
    heads: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    """Explicit query heads to remove per layer index (instead of ratio)."""
    score: Literal["auto", "magnitude", "activation", "taylor"] = "auto"
    """How units are ranked (see the module doc); activation and taylor need calibration data.
    `auto`: activation when calibration data is given, else magnitude (with a warning)."""
    scope: Literal["global", "per-layer"] = "global"
    """Rank units over all layers, or remove `ratio` of each layer's."""
    compensate: Union[bool, Literal["auto"]] = "auto"
    """Least-squares refit of the output projection (+ bias) on calibration activations.
    `auto`: true when calibration data is given and the units are chosen from it (score
    activation or taylor) or by `heads`; false otherwise."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.ratio and self.heads:
            raise ValueError("give either ratio or heads, not both")

    def resolved(self, ctx: PassContext) -> "PruneHeads":
        """This pass with `auto` options replaced by what they mean given ctx's calibration
        data (see the module doc); warns when a missing calibration set makes it pick the
        less faithful setting."""
        data = has_samples(ctx.calibration, ctx.reducer)
        score = self.score if self.score != "auto" else ("activation" if data else "magnitude")
        compensate = self.compensate
        if compensate == "auto":
            compensate = data and (bool(self.heads) or score != "magnitude")
        if not data and self.score == "auto" and not self.heads and self.ratio:
            ctx.logger.warning(
                "prune-heads: no calibration data, so heads are ranked by weight magnitude without compensation "
                "(score=magnitude, compensate=false). score=activation,compensate=true, the default when calibration data "
                "is given, keeps far more of the output (all-MiniLM-L6-v2, ratio=0.25: sentence cosine 0.98 instead of "
                "0.81) but needs calibration data: %s. Set score=magnitude to keep this choice without the warning", CALIBRATION_HINT)
        return dataclasses.replace(self, score=score, compensate=compensate)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return self.resolved(ctx)._run(graph, ctx)

    def _run(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers, skipped = find_layers(graph)
        params_before = count_params(graph)
        needs_data = self.compensate or (self.score == "activation" and not self.heads)
        merged: list[Optional[np.ndarray]] = [None] * len(layers)
        if needs_data and layers:
            option = "compensate=true" if self.compensate else "score=activation"
            outputs = capture(graph, ctx, [layer.attention.output.name for layer in layers], self.name, option)
            merged = [_head_outputs(layer, outputs) for layer in layers]
        removed = self._choose(graph, ctx, layers, merged)
        heads_before = sum(layer.heads for layer in layers)
        for index, (layer, units, data) in enumerate(zip(layers, removed, merged)):
            if not units:
                continue
            current = data
            if self.compensate and any(removed[:index]):
                current = _head_outputs(layer, capture(graph, ctx, [layer.attention.output.name], self.name, "compensate=true"))
            self._prune(graph, layer, units, current, data, ctx.reducer)
        stats = {
            "heads": f"{heads_before} -> {heads_before - sum(len(u) * l.group for u, l in zip(removed, layers))}",
            "removed": {i: [h for u in units for h in _unit_heads(layers[i], u)] for i, units in enumerate(removed) if units},
            "params": f"{params_before} -> {count_params(graph)}",
            "score": "explicit heads" if self.heads else self.score,
            "compensate": self.compensate,
        }
        if skipped:
            stats["skipped"] = skipped
        return PassResult(any(removed), stats)

    def _choose(self, graph: Graph, ctx: PassContext, layers: list[_Layer], merged: list[Optional[np.ndarray]]) -> list[list[int]]:
        """The units to remove in each layer."""
        if self.heads:
            self._check_layers(layers)
            return [self._explicit(i, layer) for i, layer in enumerate(layers)]
        if self.score == "taylor":
            scores = _taylor(graph, ctx, layers)
        elif self.score == "activation":
            scores = [_activation(layer, data, self.compensate, ctx.reducer) for layer, data in zip(layers, merged)]  # type: ignore[arg-type]
        else:
            scores = [_magnitude(layer) for layer in layers]
        if self.scope == "per-layer":
            return [sorted(np.argsort(s, kind="stable")[: min(int(round(self.ratio * len(s))), len(s) - 1)].tolist()) for s in scores]
        return lowest_under_budget(scores, self.ratio, [layer.kv_heads - 1 for layer in layers])

    def _check_layers(self, layers: list[_Layer]) -> None:
        unknown = sorted(i for i in self.heads if not 0 <= i < len(layers))
        if unknown:
            raise CompressionError(f"pass 'prune-heads': option 'heads' names layer(s) {unknown}; the graph has {len(layers)} prunable attention layers")

    def _explicit(self, index: int, layer: _Layer) -> list[int]:
        wanted = sorted(set(self.heads.get(index, [])))
        bad = [h for h in wanted if not 0 <= h < layer.heads]
        if bad:
            raise CompressionError(f"pass 'prune-heads': option 'heads' layer {index}: head(s) {bad} out of range (it has {layer.heads} heads)")
        units = sorted({h // layer.group for h in wanted})
        partial = [u for u in units if not set(_unit_heads(layer, u)) <= set(wanted)]
        if partial:
            raise CompressionError(
                f"pass 'prune-heads': option 'heads' layer {index}: grouped-query attention removes whole groups of "
                f"{layer.group} query heads; group(s) {partial} are listed only in part"
            )
        if len(units) >= layer.kv_heads:
            raise CompressionError(f"pass 'prune-heads': option 'heads' layer {index}: at least one head must remain")
        return units

    def _prune(self, graph: Graph, layer: _Layer, units: list[int], current: Optional[np.ndarray], original: Optional[np.ndarray],
               reducer: Optional[Reducer] = None) -> None:
        """Remove `units`; with compensate, refit the output projection so that the kept
        heads' outputs in the graph as pruned so far (`current`) reproduce the original
        graph's projection output (from `original`, the unpruned attention output)."""
        kept_units = [u for u in range(layer.kv_heads) if u not in units]
        kept_heads = [h for u in kept_units for h in _unit_heads(layer, u)]
        kv_keep = kept_units if layer.kv_heads < layer.heads else kept_heads
        rows = _cols(kept_heads, layer.v_dim)
        changed = slice_columns(graph, [
            (layer.q.columns, _cols(kept_heads, layer.head_dim)),
            (layer.k.columns, _cols(kv_keep, layer.head_dim)),
            (layer.v.columns, _cols(kv_keep, layer.v_dim)),
        ])
        if self.compensate and current is not None and original is not None:
            wo = constant_weight(layer.out_proj).astype(np.float64)  # type: ignore[union-attr]
            weight, bias = refit(current[:, rows], original @ wo, wo[rows], reducer)
            slice_rows(graph, layer.out_proj, rows, weight)
            add_output_bias(graph, layer.out_proj, bias)
        else:
            slice_rows(graph, layer.out_proj, rows)
        self._rewrite_reshapes(graph, layer, len(kept_heads), len(kv_keep))
        layer.attention.attrs["num_heads"] = len(kept_heads)
        layer.attention.attrs["num_kv_heads"] = len(kv_keep)
        reinfer(graph, [*changed, layer.q.reshape, layer.k.reshape, layer.v.reshape, layer.merge, layer.out_proj])

    @staticmethod
    def _rewrite_reshapes(graph: Graph, layer: _Layer, heads: int, kv_heads: int) -> None:
        for inp, old, new in ((layer.q, layer.heads, heads), (layer.k, layer.kv_heads, kv_heads), (layer.v, layer.kv_heads, kv_heads)):
            _rewrite_shape(graph, inp.reshape, 2, old, new)
        _rewrite_shape(graph, layer.merge, -1, layer.heads * layer.v_dim, heads * layer.v_dim)
