"""Shared machinery of the structured compression passes (prune-heads, prune-ffn, low-rank).

- `Columns` / `find_columns(value)`: a value whose last axis is a slice of the output
  columns of `MatMul(x, W)` with W a constant [K, N], optionally through a constant bias
  `Add` and one output of a last-axis `Split` (the fused QKV / gate-up form of `fuse-qkv`).
- `slice_columns(graph, selections)`: keeps chosen columns of such values: the weight
  columns, the bias entries and the Split sizes of one MatMul are sliced together.
- `slice_rows(graph, matmul, keep)`: keeps chosen rows of a MatMul's constant weight.
- `reinfer(graph, nodes)`: recomputes the types of nodes whose shapes a slice changed.
- `require_calibration(ctx, ...)`: the calibration samples, or an error naming the option
  (`CALIBRATION_HINT` says how to give them).
- `capture(graph, ctx, names)`: the named values on every calibration sample (ORT).
- `refit(...)` / `add_output_bias(...)`: least-squares compensation of a projection (its
  sums reduced across ranks with a distributed `PassContext.reducer`).
- `count_params(graph)`: elements of the float constants (weights and biases).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from graphopt.distributed_calibration import Reducer, mean_rows, summed
from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.ir.types import TensorType
from graphopt.pass_base import PassContext

REFIT_RIDGE = 1.0
"""Ridge strength of the least-squares refit, relative to the mean diagonal of A^T A; the
refit is pulled towards the original weights, which keeps it stable on few tokens.
Measured on all-MiniLM-L6-v2 (20 calibration sentences, ~250 tokens; 50% of heads or FFN
neurons removed; mean sentence cosine on 20 other sentences): 0.001 gave 0.68 / 0.90,
0.05 0.89 / 0.92, 0.5-2 0.92 / 0.92, 1000 (bias correction only) 0.91 / 0.90."""


CALIBRATION_HINT = "graphopt.optimize(..., calibration_data=[...]) or `graphopt optimize --calibration-data inputs.npz`"
"""How a user gives calibration data (the Python API, the command line), for messages."""


class CompressionError(GraphoptError):
    """A compression pass cannot do what its options ask (names the pass and the option)."""


@dataclasses.dataclass
class Columns:
    """`value`[..., :] are columns offset..offset + width of `matmul`'s constant weight."""

    value: Value
    matmul: Node
    bias_add: Optional[Node]
    """Adds a constant vector to exactly these columns (after the Split, if any)."""
    split: Optional[Node]
    offset: int
    width: int
    fused_bias_add: Optional[Node] = None
    """Adds a constant vector to all the MatMul's columns, before the Split."""

    @property
    def weight(self) -> np.ndarray:
        return self.matmul.inputs[1].const.numpy()  # type: ignore[union-attr]

def constant_weight(node: Node) -> Optional[np.ndarray]:
    """The constant float 2-D weight of `MatMul(x, W)`, else None."""
    if node.op_type != "MatMul" or node.domain or len(node.inputs) != 2:
        return None
    x, w = node.inputs
    if x is None or w is None or x.is_constant or w.const is None or len(w.const.shape) != 2:
        return None
    data = w.const.numpy()
    return data if data.dtype.kind == "f" else None


def _bias_index(add: Node, other: Value) -> Optional[int]:
    """The input index of add's constant vector operand (a weight), when the other is `other`."""
    if add.op_type != "Add" or add.domain or len(add.inputs) != 2 or other not in add.inputs:
        return None
    index = 1 - add.inputs.index(other)
    operand = add.inputs[index]
    if operand is None or operand.const is None or len(operand.const.shape) != 1 or add.output.shape != other.shape:
        return None
    return index


def bias_slot(add: Node) -> int:
    """The input index of a bias Add's constant vector."""
    return next(i for i, v in enumerate(add.inputs) if v is not None and v.const is not None and len(v.const.shape) == 1)


def split_sizes(split: Node) -> Optional[list[int]]:
    """The sizes of a last-axis Split, from its input or attribute, else None."""
    if split.op_type != "Split" or split.domain:
        return None
    rank = split.inputs[0].type.rank  # type: ignore[union-attr]
    axis = split.attrs.get("axis", 0)
    if rank is None or axis not in (-1, rank - 1):
        return None
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = constant_data(split.inputs[1])
        return None if sizes is None else [int(s) for s in sizes]
    sizes = split.attrs.get("split")
    return None if sizes is None else [int(s) for s in sizes]  # type: ignore[union-attr]


def _strip_bias(value: Value) -> tuple[Optional[Node], Value]:
    """(the bias Add producing `value`, its other operand) or (None, value)."""
    add = value.producer
    if add is None or add.op_type != "Add" or add.domain:
        return None, value
    for operand in add.inputs:
        if operand is not None and operand.producer is not None and operand.producer.op_type in ("MatMul", "Split") and len(operand.uses()) == 1:
            if _bias_index(add, operand) is not None:
                return add, operand
    return None, value


def find_columns(value: Value) -> Optional[Columns]:
    """`value` as columns of a constant-weight MatMul (see the module doc), else None."""
    bias_add, inner = _strip_bias(value)
    producer = inner.producer
    split, fused_bias, offset, width = None, None, 0, None
    if producer is not None and producer.op_type == "Split":
        sizes = split_sizes(producer)
        fused = producer.inputs[0]
        if sizes is None or fused is None or len(fused.uses()) != 1:
            return None
        split, offset, width = producer, sum(sizes[: inner.output_index]), sizes[inner.output_index]
        fused_bias, fused = _strip_bias(fused)
        producer = fused.producer
    if producer is None:
        return None
    weight = constant_weight(producer)
    if weight is None or (split is None and len(producer.output.uses()) != 1 and producer.output is not value):
        return None
    width = weight.shape[1] if width is None else width
    for add, size in ((bias_add, width), (fused_bias, weight.shape[1])):
        if add is not None and add.inputs[bias_slot(add)].const.size != size:  # type: ignore[union-attr]
            return None
    return Columns(value, producer, bias_add, split, offset, width, fused_bias)


def _slice_bias(graph: Graph, add: Node, keep: np.ndarray) -> None:
    index = bias_slot(add)
    replace_constant(graph, add, index, add.inputs[index].const.numpy()[keep], "pruned")  # type: ignore[union-attr]


def replace_constant(graph: Graph, node: Node, index: int, data: np.ndarray, suffix: str) -> None:
    """Put `data` (a new constant named after the old one plus `suffix`) in place of node's
    constant input `index`; the old constant goes when nothing else reads it."""
    old = node.inputs[index]
    new = graph.add_constant(graph.unique_name(f"{old.name}_{suffix}"), np.ascontiguousarray(data))  # type: ignore[union-attr]
    node.replace_input(index, new)
    if old is not None and old.const is not None and not old.uses() and not old.is_graph_output and old.graph is graph:
        graph.remove_constant(old)


def slice_columns(graph: Graph, selections: Sequence[tuple[Columns, np.ndarray]]) -> list[Node]:
    """Keep columns `keep` (indices within each Columns' slice) of every selection; returns
    the nodes whose outputs changed shape (for `reinfer`)."""
    groups: dict[int, list[tuple[Columns, np.ndarray]]] = {}
    for columns, keep in selections:
        groups.setdefault(id(columns.matmul), []).append((columns, np.asarray(keep, np.int64)))
    changed = []
    for group in groups.values():
        first = group[0][0]
        total = first.weight.shape[1]
        if first.split is None:
            keep = group[0][1]
        else:
            sizes = split_sizes(first.split)
            offsets = np.cumsum([0, *sizes])  # type: ignore[misc]
            kept = [np.arange(s, dtype=np.int64) for s in sizes]  # type: ignore[union-attr]
            for columns, cols in group:
                kept[int(np.searchsorted(offsets, columns.offset))] = cols
            keep = np.concatenate([offsets[i] + k for i, k in enumerate(kept)])
            new_sizes = np.array([len(k) for k in kept], np.int64)
            if len(first.split.inputs) > 1 and first.split.inputs[1] is not None:
                replace_constant(graph, first.split, 1, new_sizes, "pruned")
            else:
                first.split.attrs["split"] = tuple(int(s) for s in new_sizes)
            changed.append(first.split)
        for columns, cols in group:
            if columns.bias_add is not None and len(cols) != columns.width:
                _slice_bias(graph, columns.bias_add, cols)
                changed.append(columns.bias_add)
        if len(keep) == total and np.array_equal(keep, np.arange(total)):
            continue
        replace_constant(graph, first.matmul, 1, first.weight[:, keep], "pruned")
        changed.append(first.matmul)
        if first.fused_bias_add is not None:
            _slice_bias(graph, first.fused_bias_add, keep)
            changed.append(first.fused_bias_add)
    return changed


def slice_rows(graph: Graph, matmul: Node, keep: np.ndarray, rows: Optional[np.ndarray] = None) -> None:
    """Keep rows `keep` of matmul's constant weight (or put `rows` there instead)."""
    weight = matmul.inputs[1].const.numpy()  # type: ignore[union-attr]
    replace_constant(graph, matmul, 1, weight[keep] if rows is None else rows.astype(weight.dtype), "pruned")


def replace_vector(graph: Graph, node: Node, index: int, data: np.ndarray) -> None:
    """Put `data` in place of node's constant input `index`."""
    replace_constant(graph, node, index, data, "pruned")


def reinfer(graph: Graph, nodes: Sequence[Node]) -> None:
    """Recompute, in graph order, the types of `nodes` and of everything downstream of them
    up to (and including) nodes whose output types come out unchanged."""
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    pending = {id(n): n for n in nodes}
    while pending:
        node = min(pending.values(), key=lambda n: order[id(n)])
        del pending[id(node)]
        before = [out.type for out in node.outputs]
        for out in node.outputs:
            out.type = TensorType(out.dtype, None)
        graph.infer_types(node)
        for out, old in zip(node.outputs, before):
            if out.type.shape is None:
                out.type = old
            if out.type != old:
                for use in out.uses():
                    pending[id(use.node)] = use.node


def require_calibration(ctx: PassContext, pass_name: str, option: str) -> list[dict[str, np.ndarray]]:
    """ctx's calibration samples; a CompressionError naming the pass and `option` when there are none."""
    if not ctx.calibration:
        raise CompressionError(f"pass '{pass_name}': {option} needs calibration data: {CALIBRATION_HINT}")
    return ctx.calibration


def capture(graph: Graph, ctx: PassContext, names: Sequence[str], pass_name: str, option: str) -> list[dict[str, np.ndarray]]:
    """The named values on every calibration sample, computed by ONNX Runtime."""
    from graphopt.calibration import GraphRunner

    samples = require_calibration(ctx, pass_name, option)
    runner = GraphRunner(graph, list(dict.fromkeys(names)))
    return [runner.run(sample) for sample in samples]


def refit(inputs: np.ndarray, target: np.ndarray, start: np.ndarray, reducer: Optional[Reducer] = None) -> tuple[np.ndarray, np.ndarray]:
    """(W, c) minimizing ||inputs @ W + c - target||^2 + ridge * ||W - start||^2.

    inputs [T, k], target [T, n], start [k, n] (the weights before the refit). With a
    distributed `reducer` the rows are every rank's: the means, then the centred X^T X and
    X^T Y are summed over ranks (rows never travel)."""
    x = inputs.astype(np.float64)
    y = target.astype(np.float64)
    x_mean, y_mean = mean_rows(x, reducer), mean_rows(y, reducer)
    xc, yc = x - x_mean, y - y_mean
    gram, cross = summed(xc.T @ xc, reducer), summed(xc.T @ yc, reducer)
    ridge = REFIT_RIDGE * max(float(np.trace(gram)) / max(len(gram), 1), 1e-12)
    weight = np.linalg.solve(gram + ridge * np.eye(len(gram)), cross + ridge * start.astype(np.float64))
    return weight, y_mean - x_mean @ weight


def add_output_bias(graph: Graph, matmul: Node, bias: np.ndarray) -> None:
    """Add the vector `bias` to matmul's output: folded into a constant bias that follows
    (an Add, or a SkipLayerNorm's bias input), else one new Add node."""
    out = matmul.output
    uses = out.uses()
    if len(uses) == 1 and not out.is_graph_output:
        user, slot = uses[0]
        if user.op_type == "Add" and not user.domain:
            index = _bias_index(user, out)
            if index is not None and user.inputs[index].const.size == bias.size:  # type: ignore[union-attr]
                old = user.inputs[index].const.numpy()  # type: ignore[union-attr]
                replace_vector(graph, user, index, (old + bias).astype(old.dtype))
                return
        if user.domain == "graphopt" and user.op_type == "SkipLayerNorm" and slot in (0, 1) and len(user.inputs) > 4 and user.inputs[4] is not None:
            old = constant_data(user.inputs[4], limit=None)
            if old is not None and old.size == bias.size:
                replace_vector(graph, user, 4, (old + bias).astype(old.dtype))
                return
    constant = graph.add_constant(graph.unique_name(f"{out.name}_compensation"), bias.astype(np.float32))
    add = graph.add_node("Add", [out, constant], after=matmul)
    for use in uses:
        use.node.replace_input(use.index, add.output)
    if out.is_graph_output:
        graph.set_outputs([add.output if v is out else v for v in graph.outputs])


def lowest_under_budget(scores: Sequence[np.ndarray], ratio: float, caps: Sequence[int]) -> list[list[int]]:
    """Global ranking: the `ratio` share of all units with the lowest scores, at most `caps[i]`
    from layer i (so each layer keeps some); per layer, the chosen unit indices in order."""
    ranked = sorted((float(v), i, j) for i, layer_scores in enumerate(scores) for j, v in enumerate(layer_scores))
    budget = int(round(ratio * len(ranked)))
    chosen: list[list[int]] = [[] for _ in scores]
    for _, i, j in ranked:
        if budget == 0:
            break
        if len(chosen[i]) < caps[i]:
            chosen[i].append(j)
            budget -= 1
    return [sorted(c) for c in chosen]


def count_params(graph: Graph) -> int:
    """Elements of the graph's float constants (weights, biases, norm scales)."""
    return int(sum(v.const.size for v in graph.constants.values() if v.const is not None and v.dtype is not None and v.dtype.is_float))
