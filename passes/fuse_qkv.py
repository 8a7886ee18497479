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
nothing else reads them. The group commits through `graphopt.rewrite` as one replacement
of several outputs (one legality check).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import numpy as np
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.ir.tensor import ConstTensor
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.rewrite import RewritePattern, Rewriter, RewriteRuleSet

SPLIT_SIZES_AS_INPUT_OPSET = 13


@dataclasses.dataclass
class _Projection:
    matmul: Node
    weight: ConstTensor
    """Read (`weight.numpy()`) only when the group is fused: external weights load lazily."""
    bias_add: Optional[Node] = None
    bias: Optional[np.ndarray] = None

    @property
    def output(self) -> Value:
        return (self.bias_add or self.matmul).output


def _weight(value: Optional[Value]) -> Optional[ConstTensor]:
    if value is None or not value.is_constant or value.const is None or len(value.const.shape) != 2:
        return None
    return value.const


def _projection(matmul: Node, x: Value) -> Optional[_Projection]:
    if matmul.op_type != "MatMul" or matmul.domain or matmul.inputs[0] is not x or matmul.inputs[1] is x:
        return None
    weight = _weight(matmul.inputs[1])
    if weight is None or weight.dtype != x.dtype or matmul.output.is_graph_output:
        return None
    found = _Projection(matmul, weight)
    uses = matmul.output.uses()
    if len(uses) == 1 and uses[0].node.op_type == "Add" and not uses[0].node.domain:
        add = uses[0].node
        other = add.inputs[1 - uses[0].index]
        bias = None if other is None else constant_data(other)
        if bias is not None and bias.shape == (weight.shape[1],) and bias.dtype == weight.dtype.to_numpy() and add.output.shape == matmul.output.shape:
            found.bias_add, found.bias = add, bias
    return found


def _group(matmul: Node) -> Optional[list[_Projection]]:
    """The projections of `matmul`'s input that share its K, when `matmul` is the first of two or more."""
    x = matmul.inputs[0]
    if x is None or x.is_constant or x.dtype is None or not x.dtype.is_float or x.shape is None or len(x.shape) < 2:
        return None
    readers = dict.fromkeys(use.node for use in x.uses() if use.node.op_type == "MatMul" and use.index == 0)
    mine = _projection(matmul, x) if len(readers) > 1 else None
    if mine is None:
        return None
    depth = mine.weight.shape[0]
    group = [p for p in (_projection(node, x) for node in readers) if p is not None and p.weight.shape[0] == depth]
    return group if len(group) > 1 else None


class QKVPattern(RewritePattern):
    """The rule of this module, anchored on the first MatMul of each group; commits through
    `graphopt.rewrite` as one multi-output replacement (the Split outputs)."""

    name = "qkv"
    root_ops = (("", "MatMul"),)
    depth = 2

    def __init__(self) -> None:
        self.projections = 0

    def match_and_rewrite(self, graph: Graph, node: Node, rewriter: Rewriter) -> Union[bool, str]:
        group = _group(node)
        if group is None:
            return False
        group.sort(key=lambda p: graph.order_key(p.matmul))
        if group[0].matmul is not node:
            return False
        matched = [n for p in group for n in (p.matmul, p.bias_add) if n is not None]
        weights = [v for n in matched for v in n.inputs[1:] if v is not None and v.is_constant]
        edit = rewriter.edit(matched, [p.output for p in group], weights)
        op, sizes = edit.op, [p.weight.shape[1] for p in group]
        fused = op.MatMul(node.inputs[0], op.constant(_concatenate_columns([p.weight.numpy() for p in group]), "qkv_weight"))
        if any(p.bias is not None for p in group):
            biases = [p.bias if p.bias is not None else np.zeros(n, p.weight.dtype.to_numpy()) for p, n in zip(group, sizes)]
            fused = op.Add(fused, op.constant(np.concatenate(biases), "qkv_bias"))
        if graph.opset() >= SPLIT_SIZES_AS_INPUT_OPSET:
            outputs = op.Split(fused, op.constant(np.array(sizes, np.int64), "qkv_split"), axis=-1, _outputs=len(group))
        else:
            outputs = op.Split(fused, axis=-1, split=tuple(sizes), _outputs=len(group))
        problem = edit.commit(outputs)
        if problem is not None:
            return problem
        self.projections += len(group)
        return True


def _concatenate_columns(weights: list[np.ndarray]) -> np.ndarray:
    """concat(weights, axis=1) in the weights' own layout: when each is a transposed view of
    a row-major [N_i, K] array (a torch Linear weight seen as [K, N_i]), the result is the
    transposed view of one row-major [sum N_i, K] array, so neither this copy nor a reader
    wanting the [N, K] form (the prepacked linears) walks memory column by column."""
    if all(w.T.flags.c_contiguous for w in weights):
        return np.concatenate([w.T for w in weights], axis=0).T
    return np.concatenate(weights, axis=1)


@register_pass
@dataclasses.dataclass
class FuseQKV(Pass):
    """Merge MatMuls (with optional constant bias Adds) that read one input with constant weights of one K into one MatMul + Split.

    The rule is in `graphopt.passes.fuse_qkv`. Needs nothing (run it after fuse-attention);
    each group becomes MatMul [+ Add] + Split, keeping the old output names.
    """

    name = "fuse-qkv"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        pattern = QKVPattern()
        fused = RewriteRuleSet([pattern]).apply(graph)[pattern.name]
        return PassResult(fused > 0, {"fused": fused, "projections": pattern.projections})
