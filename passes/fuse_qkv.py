"""fuse-qkv: projections that read the same input become one MatMul on concatenated weights.

Rule: for each computed value x read by two or more `MatMul(x, W_i)` with W_i constant
[K, N_i] (one K, one element type), each optionally followed by `Add(., b_i)` with b_i a
constant vector [N_i] (the MatMul read only by that Add):

    y_i = x @ W_i (+ b_i)   ->   y = x @ concat(W_i, axis=1) (+ concat(b_i)); y_0, y_1, ... = Split(y, N_i, axis=-1)

A projection without a bias gets zeros in the concatenated bias when another one has
one (adding zero changes nothing). Typically the Q, K and V projections of an attention
block; ORT's packed `Attention` kernel and one large GEMM both want them this way.

Needs: nothing; run after fuse-attention, whose patterns follow each projection
separately. Changes: the MatMuls (and bias Adds) of a group become MatMul [+ Add] + Split;
the old outputs' names are kept on the Split outputs; the old weights are removed when
nothing else reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass

SPLIT_SIZES_AS_INPUT_OPSET = 13


@dataclasses.dataclass
class _Projection:
    matmul: Node
    weight: np.ndarray
    bias_add: Optional[Node] = None
    bias: Optional[np.ndarray] = None

    @property
    def output(self) -> Value:
        return (self.bias_add or self.matmul).output


def _weight(value: Optional[Value]) -> Optional[np.ndarray]:
    if value is None or not value.is_constant or value.const is None or len(value.const.shape) != 2:
        return None
    return value.const.numpy()


def _projection(matmul: Node, x: Value) -> Optional[_Projection]:
    if matmul.op_type != "MatMul" or matmul.domain or matmul.inputs[0] is not x or matmul.inputs[1] is x:
        return None
    weight = _weight(matmul.inputs[1])
    if weight is None or weight.dtype != x.dtype.to_numpy() or matmul.output.is_graph_output:  # type: ignore[union-attr]
        return None
    found = _Projection(matmul, weight)
    uses = matmul.output.uses()
    if len(uses) == 1 and uses[0].node.op_type == "Add" and not uses[0].node.domain:
        add = uses[0].node
        other = add.inputs[1 - uses[0].index]
        bias = None if other is None else constant_data(other)
        if bias is not None and bias.shape == (weight.shape[1],) and bias.dtype == weight.dtype and add.output.shape == matmul.output.shape:
            found.bias_add, found.bias = add, bias
    return found


def _groups(graph: Graph) -> list[list[_Projection]]:
    found = []
    for value in list(graph.values()):
        if value.is_constant or value.dtype is None or not value.dtype.is_float or value.shape is None or len(value.shape) < 2:
            continue
        projections = [p for p in (_projection(use.node, value) for use in value.uses()) if p is not None]
        by_depth: dict[int, list[_Projection]] = {}
        for p in projections:
            by_depth.setdefault(p.weight.shape[0], []).append(p)
        found += [group for group in by_depth.values() if len(group) > 1]
    return found


def _concatenate_columns(weights: list[np.ndarray]) -> np.ndarray:
    """concat(weights, axis=1) in the weights' own layout: when each is a transposed view of
    a row-major [N_i, K] array (a torch Linear weight seen as [K, N_i]), the result is the
    transposed view of one row-major [sum N_i, K] array, so neither this copy nor a reader
    wanting the [N, K] form (the prepacked linears) walks memory column by column."""
    if all(w.T.flags.c_contiguous for w in weights):
        return np.concatenate([w.T for w in weights], axis=0).T
    return np.concatenate(weights, axis=1)


def _fuse_group(graph: Graph, group: list[_Projection]) -> None:
    positions = {id(n): i for i, n in enumerate(graph.nodes)}
    group.sort(key=lambda p: positions[id(p.matmul)])
    first = group[0].matmul
    x = first.inputs[0]
    sizes = [p.weight.shape[1] for p in group]
    weight = graph.add_constant(graph.unique_name("qkv_weight"), _concatenate_columns([p.weight for p in group]))
    fused = graph.add_node("MatMul", [x, weight], before=first).output
    if any(p.bias is not None for p in group):
        biases = [p.bias if p.bias is not None else np.zeros(n, p.weight.dtype) for p, n in zip(group, sizes)]
        bias = graph.add_constant(graph.unique_name("qkv_bias"), np.concatenate(biases))
        fused = graph.add_node("Add", [fused, bias], before=first).output
    if graph.opset() >= SPLIT_SIZES_AS_INPUT_OPSET:
        split_sizes = graph.add_constant(graph.unique_name("qkv_split"), np.array(sizes, np.int64))
        split = graph.add_node("Split", [fused, split_sizes], {"axis": -1}, num_outputs=len(group), before=first)
    else:
        split = graph.add_node("Split", [fused], {"axis": -1, "split": tuple(sizes)}, num_outputs=len(group), before=first)
    old_weights = []
    for projection, out in zip(group, split.outputs):
        name = projection.output.name
        projection.output.replace_all_uses_with(out)
        if projection.bias_add is not None:
            old_weights.append(projection.bias_add.inputs[1] if projection.bias_add.inputs[0] is projection.matmul.output else projection.bias_add.inputs[0])
            graph.erase(projection.bias_add)
        old_weights.append(projection.matmul.inputs[1])
        graph.erase(projection.matmul)
        graph.rename_value(out, name)
    for value in dict.fromkeys(old_weights):
        if value is not None and value.is_constant and not value.uses() and not value.is_graph_output and value.graph is graph:
            graph.remove_constant(value)


@register_pass
@dataclasses.dataclass
class FuseQKV(Pass):
    """Merge MatMuls (with optional constant bias Adds) that read one input with constant weights of one K into one MatMul + Split.

    The rule is in `graphopt.passes.fuse_qkv`. Needs nothing (run it after fuse-attention);
    each group becomes MatMul [+ Add] + Split, keeping the old output names.
    """

    name = "fuse-qkv"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        groups = _groups(graph)
        for group in groups:
            _fuse_group(graph, group)
        return PassResult(bool(groups), {"fused": len(groups), "projections": sum(len(g) for g in groups)})
