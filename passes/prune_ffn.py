"""prune-ffn: remove intermediate neurons of feed-forward blocks (both matmuls sliced).

Structure: a "down" `MatMul(h, W2)` with W2 a constant [I, N] whose input h [..., I] is
computed from the columns of one or more constant-weight MatMuls [K, I] (+ bias Add, or
one output of a last-axis Split: the fused gate/up form of `fuse-qkv`) by elementwise ops
only (activations such as graphopt::Gelu, Relu, Sigmoid, Tanh, Erf, and Mul/Add/Sub/Div
whose constant operands are scalars or vectors over I), with at least one activation in
between and nothing outside the block reading its intermediate values. Plain MLPs and gated
ones (SwiGLU: silu(x W_gate) * (x W_up)) both fit.

Rule: neuron j is kept or removed everywhere at once: column j of every up/gate weight and
bias, entry j of every per-neuron constant in the block (e.g. graphopt::Gelu's bias), row j
of W2. `ratio` of the neurons go in every block (`scope=per-block`) or over all blocks
(`scope=global`: activation scores divided by the energy of each block's output, taylor
scores by their block's L2 norm); at least one stays per block; the lowest scored go:
`score=magnitude`: ||W2[j, :]||^2 times the sum of the squared up/gate column norms (no
data); `score=activation`: E[h_j^2] ||W2[j, :]||^2 over calibration tokens (the energy of
the neuron's contribution to the output; its variance when `compensate`); `score=taylor`:
first-order Taylor importance (Molchanov et al. 2019; see `graphopt.passes._taylor`): mean
over calibration samples of |dL/dxi_j| = |sum over tokens of dL/dh_j * h_j| for a gate xi_j
on the down projection's input h, L a loss on the first output (cross-entropy or squared
error against a sample's `labels` entry; without labels, squared error against targets
sampled around the unpruned output).
`compensate=true` refits the kept rows of W2 and a bias by ridge least squares, block by
block in graph order, so that the kept neurons in the graph as pruned so far reproduce the
original block output on the calibration tokens, as `prune-heads` does.
Defaults (`score=auto`, `compensate=auto`): with calibration data, `score=activation` and
`compensate=true`; without, `score=magnitude` and no compensation, and a warning names the
better setting. Measured on all-MiniLM-L6-v2 (ratio=0.25, per-block, 20 calibration
sentences, mean sentence cosine on 20 others): magnitude 0.86, magnitude+compensate 0.94,
activation 0.92, activation+compensate 0.97 (scope=global 0.97 too, but 0.91 against
per-block's 0.92 at ratio=0.5, so per-block stays the default). Options the user sets are
kept as given. Lossy. Stats: neurons before/after per
block count, parameters before/after.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

import numpy as np

from graphopt.distributed_calibration import Reducer, has_samples, mean_rows, summed
from graphopt.ir.graph import Graph, Node
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.passes._structured import (
    CALIBRATION_HINT, Columns, CompressionError, add_output_bias, capture, constant_weight, count_params, find_columns,
    lowest_under_budget, refit, reinfer, replace_vector, slice_columns, slice_rows,
)
from graphopt.passes._taylor import gate_gradients, importance

ACTIVATIONS = {("graphopt", "Gelu"), ("", "Gelu"), ("", "Relu"), ("", "Sigmoid"), ("", "Tanh"), ("", "Erf"), ("", "Softplus"), ("com.microsoft", "Gelu"), ("com.microsoft", "FastGelu")}
ELEMENTWISE = {("", "Mul"), ("", "Add"), ("", "Sub"), ("", "Div"), ("", "Neg"), ("", "Cast"), ("", "Identity")}


@dataclasses.dataclass
class _Block:
    down: Node
    sources: list[Columns]
    nodes: list[Node]
    vectors: list[tuple[Node, int]]
    """(node, input index) of per-neuron constant operands inside the block."""
    width: int


def _trace(down: Node) -> Optional[_Block]:
    weight = constant_weight(down)
    hidden = down.inputs[0]
    if weight is None or hidden is None:
        return None
    width = weight.shape[0]
    sources: dict[int, Columns] = {}
    nodes: dict[int, Node] = {}
    vectors: list[tuple[Node, int]] = []
    frontier = [hidden]
    while frontier:
        value = frontier.pop()
        if value.shape is None or not value.shape or value.shape[-1] != width:
            return None
        columns = find_columns(value)
        if columns is not None:
            if columns.width != width:
                return None
            sources[id(value)] = columns
            continue
        node = value.producer
        if node is None or len(nodes) > 32:
            return None
        if id(node) in nodes:
            continue
        key = (node.domain, node.op_type)
        if key not in ACTIVATIONS and key not in ELEMENTWISE:
            return None
        nodes[id(node)] = node
        for index, operand in enumerate(node.inputs):
            if operand is None:
                continue
            if operand.const is not None:
                if operand.const.size == width and operand.shape[-1] == width:  # type: ignore[index]
                    vectors.append((node, index))
                elif operand.const.size != 1:
                    return None
            elif operand.producer is not None and operand.producer.op_type == "Constant":
                return None
            else:
                frontier.append(operand)
    if not sources or not any((n.domain, n.op_type) in ACTIVATIONS for n in nodes.values()):
        return None
    inside = set(nodes) | {id(down)}
    for node in nodes.values():
        for out in node.outputs:
            if out.is_graph_output or any(id(u.node) not in inside for u in out.uses()):
                return None
    for columns in sources.values():
        if columns.value.is_graph_output or any(id(u.node) not in inside for u in columns.value.uses()):
            return None
    return _Block(down, list(sources.values()), list(nodes.values()), vectors, width)


def find_blocks(graph: Graph) -> list[_Block]:
    """Feed-forward blocks in graph order (see the module doc)."""
    return [b for b in (_trace(n) for n in graph if n.op_type == "MatMul" and not n.domain) if b is not None]


def _source_columns(columns: Columns) -> np.ndarray:
    return columns.weight[:, columns.offset:columns.offset + columns.width]


def _magnitude(block: _Block) -> np.ndarray:
    down = constant_weight(block.down).astype(np.float64)  # type: ignore[union-attr]
    return (down**2).sum(1) * sum((_source_columns(c).astype(np.float64) ** 2).sum(0) for c in block.sources)


def _taylor(graph: Graph, ctx: PassContext, blocks: list[_Block]) -> list[np.ndarray]:
    """Taylor importance of every block's neurons: one gate per neuron on the down input."""
    gradients = gate_gradients(graph, ctx, [(b.down.inputs[0].name, (b.width,)) for b in blocks], "prune-ffn")  # type: ignore[union-attr]
    return [importance(g) for g in gradients]


@register_pass
@dataclasses.dataclass
class PruneFFN(Pass):
    """Remove feed-forward intermediate neurons by slicing the up/gate and down weights.

    See `graphopt.passes.prune_ffn`. Needs constant-weight MatMuls with float weights (fact
    ``constant-float-weights``: run it before quantize and to-bf16); calibration data for
    score=activation, score=taylor or compensate. Defaults: with calibration data
    score=activation and compensate=true (the most faithful measured), without it
    score=magnitude and no compensation, with a warning. Changes weight and bias shapes; lossy.
    """

    name = "prune-ffn"
    lossless = False
    requires = ("constant-float-weights",)
    ratio: float = 0.25
    """Fraction of each block's intermediate neurons to remove."""
    score: Literal["auto", "magnitude", "activation", "taylor"] = "auto"
    """How neurons are ranked (see the module doc); activation and taylor need calibration data.
    `auto`: activation when calibration data is given, else magnitude (with a warning)."""
    scope: Literal["per-block", "global"] = "per-block"
    """`global` (score=activation or taylor): rank all neurons together, each block's scores
    normalized (see the module doc), so blocks that matter less give more."""
    compensate: Union[bool, Literal["auto"]] = "auto"
    """Least-squares refit of the down projection (+ bias) on calibration activations.
    `auto`: true when calibration data is given, else false."""
    neurons: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    """Explicit neurons to remove per block index (overrides ratio and score)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.scope == "global" and self.score == "magnitude":
            raise ValueError("scope=global needs score=activation or score=taylor (magnitudes of different blocks do not compare)")

    def resolved(self, ctx: PassContext) -> "PruneFFN":
        """This pass with `auto` options replaced by what they mean given ctx's calibration
        data (see the module doc); warns when a missing calibration set makes it pick the
        less faithful setting."""
        data = has_samples(ctx.calibration, ctx.reducer)
        score = self.score if self.score != "auto" else ("activation" if data else "magnitude")
        if score == "magnitude" and self.scope == "global":
            raise CompressionError(f"pass 'prune-ffn': scope=global needs score=activation or score=taylor, which need calibration data: {CALIBRATION_HINT}")
        compensate = data if self.compensate == "auto" else self.compensate
        if not data and self.score == "auto" and not self.neurons and self.ratio:
            ctx.logger.warning(
                "prune-ffn: no calibration data, so neurons are ranked by weight magnitude without compensation "
                "(score=magnitude, compensate=false). score=activation,compensate=true, the default when calibration data "
                "is given, keeps far more of the output (all-MiniLM-L6-v2, ratio=0.25: sentence cosine 0.97 instead of "
                "0.86) but needs calibration data: %s. Set score=magnitude to keep this choice without the warning", CALIBRATION_HINT)
        return dataclasses.replace(self, score=score, compensate=compensate)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return self.resolved(ctx)._run(graph, ctx)

    def _run(self, graph: Graph, ctx: PassContext) -> PassResult:
        blocks = find_blocks(graph)
        params_before = count_params(graph)
        bad = sorted(i for i in self.neurons if not 0 <= i < len(blocks))
        if bad:
            raise CompressionError(f"pass 'prune-ffn': option 'neurons' names block(s) {bad}; the graph has {len(blocks)} feed-forward blocks")
        hidden: list[Optional[np.ndarray]] = [None] * len(blocks)
        if blocks and (self.compensate or (self.score == "activation" and not self.neurons)):
            option = "compensate=true" if self.compensate else "score=activation"
            outputs = capture(graph, ctx, [b.down.inputs[0].name for b in blocks], self.name, option)  # type: ignore[union-attr]
            hidden = [np.concatenate([o[b.down.inputs[0].name].reshape(-1, b.width) for o in outputs]).astype(np.float64) for b in blocks]  # type: ignore
        before = after = 0
        chosen = [self._explicit(i, b) for i, b in enumerate(blocks)] if self.neurons else self._lowest(graph, ctx, blocks, hidden)
        pruned_any = False
        for block, data, remove in zip(blocks, hidden, chosen):
            before += block.width
            after += block.width - len(remove)
            if not len(remove):
                continue
            current = data
            if self.compensate and pruned_any:
                name = block.down.inputs[0].name  # type: ignore[union-attr]
                current = np.concatenate([o[name].reshape(-1, block.width) for o in capture(graph, ctx, [name], self.name, "compensate=true")]).astype(np.float64)
            self._prune(graph, block, np.setdiff1d(np.arange(block.width), remove), current, data, ctx.reducer)
            pruned_any = True
        stats = {"blocks": len(blocks), "neurons": f"{before} -> {after}", "params": f"{params_before} -> {count_params(graph)}",
                 "score": "explicit neurons" if self.neurons else self.score, "compensate": self.compensate}
        return PassResult(after < before, stats)

    def _scores(self, block: _Block, data: np.ndarray, reducer: Optional[Reducer] = None) -> np.ndarray:
        """Energy of each neuron's contribution to the block output, over the whole output's
        (over every rank's tokens: the mean and the sums of squares are reduced)."""
        down = constant_weight(block.down).astype(np.float64)  # type: ignore[union-attr]
        x = data - mean_rows(data, reducer) if self.compensate else data
        sums = summed(np.concatenate([(x**2).sum(0), [float(np.sum((x @ down) ** 2)), float(len(x))]]), reducer)
        tokens, outputs = sums[-1], down.shape[1]
        energy = sums[:-2] / tokens  # E[h_j^2]; the next line's denominator: E[y^2] * outputs
        return energy * (down**2).sum(1) / max(float(sums[-2] / (tokens * outputs)) * outputs, 1e-30)

    def _lowest(self, graph: Graph, ctx: PassContext, blocks: list[_Block], hidden: list[Optional[np.ndarray]]) -> list[np.ndarray]:
        """The lowest-scored neurons of each block: `ratio` of each, or of all (scope=global)."""
        if self.score == "taylor":
            scores = _taylor(graph, ctx, blocks)
        elif self.score == "activation":
            scores = [self._scores(b, h, ctx.reducer) for b, h in zip(blocks, hidden)]  # type: ignore[arg-type]
        else:
            scores = [_magnitude(b) for b in blocks]
        if self.scope == "global":
            return [np.array(c, np.int64) for c in lowest_under_budget(scores, self.ratio, [b.width - 1 for b in blocks])]
        return [np.sort(np.argsort(s, kind="stable")[: min(int(round(self.ratio * len(s))), len(s) - 1)]) for s in scores]

    def _explicit(self, index: int, block: _Block) -> np.ndarray:
        wanted = np.array(sorted(set(self.neurons.get(index, []))), np.int64)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= block.width or wanted.size >= block.width):
            raise CompressionError(f"pass 'prune-ffn': option 'neurons' block {index}: indices must lie in [0, {block.width}) and leave at least one")
        return wanted

    def _prune(self, graph: Graph, block: _Block, keep: np.ndarray, current: Optional[np.ndarray], original: Optional[np.ndarray],
               reducer: Optional[Reducer] = None) -> None:
        """Keep neurons `keep`; with compensate, refit W2 so that the kept neurons in the graph
        as pruned so far (`current`) reproduce the original block output (from `original`)."""
        changed = slice_columns(graph, [(c, keep) for c in block.sources])
        for node, index in block.vectors:
            value = node.inputs[index]
            vector = value.const.numpy()  # type: ignore[union-attr]
            replace_vector(graph, node, index, vector[..., keep])
        if self.compensate and current is not None and original is not None:
            down = constant_weight(block.down).astype(np.float64)  # type: ignore[union-attr]
            weight, bias = refit(current[:, keep], original @ down, down[keep], reducer)
            slice_rows(graph, block.down, keep, weight)
            add_output_bias(graph, block.down, bias)
        else:
            slice_rows(graph, block.down, keep)
        reinfer(graph, [*changed, *block.nodes, block.down])

