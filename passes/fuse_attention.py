"""fuse-attention: raise softmax(Q.K^T * scale + bias).V into one graphopt `Attention` op.

The match is anchored on each Softmax over the last axis of a rank-4 tensor and follows
the data, not exporter-specific node names or sequences:

1. After the Softmax, optional no-op steps (Cast to the same type, inference Dropout,
   Identity) lead to P; P must be the left input of a MatMul with a rank-4 V: the output.
   A NaN guard `Where(IsNaN(P), 0, P)` on the way (what transformers' SDPA attention exports:
   with a -inf mask, a fully masked row's softmax is NaN and the guard makes it 0) becomes
   the op's `nan_to_zero` attribute.
2. Before the Softmax, walking up the scores: `Add` of a term that does not lead to the
   scores is an additive bias; `Mul`/`Div` by a constant scalar is a scale (applied to the
   bias terms already seen below it); `Where(cond, scores, fill)` or `Where(cond, fill,
   scores)` with a constant fill is a mask, turned into the additive bias
   `Where(cond, 0, fill)`; same-type Casts are skipped. The walk ends at the Q.K^T MatMul.
3. Q and the transposed K may each carry a constant scalar scale (`q * s`, `k * s`), folded
   into the op's scale. K is recovered from K^T by composing its Transpose, or, for
   torchlib's K^T (heads merged into the batch: Reshape [B*H, S, D], Transpose, Reshape
   [B, H, D, S]; dims compared as symbolic expressions), by taking the tensor it started from.
4. Grouped-query attention: K and V that are `repeat_kv` expansions (Unsqueeze on axis 2,
   Expand, Reshape back to rank 4) are replaced by the un-repeated tensors and the op gets
   `num_kv_heads`. Missing this only costs speed: repeated K/V are still correct.
5. KV cache (a second walk, over the raised ops): when K and V are `Concat(past, new)` along
   the sequence axis, the op takes `new` as K/V and `past` as its past_key/past_value inputs,
   and its present outputs replace the Concats (usually the model's `present.*` outputs,
   whose names they keep). The repeat_kv expansions left reading the caches are removed
   first (eliminate-dead-code). An Attention a frontend raised (torch's SDPA, whose
   `enable_gqa` torch.export writes as repeat_kv) gets the same treatment, its repeat_kv
   expansions matched with it, and `num_kv_heads` from the un-repeated K/V.

Legality: the pattern checks head counts; the rewrite commits through `graphopt.rewrite`,
whose one legality check refuses a match with a value read outside it or returned as a
graph output (reported as "an intermediate attention value is used outside the
attention"), a replacement placed before what it reads, or a renamed graph output.
Softmax nodes that do not match are counted under a reason in the stats, so a coverage
report can say why. Needs: static head count and head size (run on an imported graph;
shapes come from inference). Changes: replaces the matched nodes by `graphopt::Attention`
(plus a Transpose for K, Where/Add/Mul for bias terms where needed); the replaced nodes,
and the constants only they read, are erased; the output keeps its name. ONNX's own
opset-23 `Attention` nodes are not Softmax anchors and are left as they are (every target runs them; see `exporters/onnx23_kernels`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import numpy as np
from graphopt.passes.dead_code import EliminateDeadCode
from graphopt.passes.noops import noop_source

from graphopt.ir.graph import Graph, Node, Value, constant_data, uniform_constant
from graphopt.ir.ops.graphopt import has_kv_cache
from graphopt.ir.symbolic import dims_equal, mul_dims
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.rewrite import RewritePattern, Rewriter, RewriteRuleSet

_NOOPS_AFTER_SOFTMAX = ("Identity", "Cast", "Dropout")
_NOOPS_IN_SCORES = ("Identity", "Cast")


@dataclasses.dataclass
class _Match:
    softmax: Node
    output_matmul: Node
    qk_matmul: Node
    query: Value
    key_transposed: Optional[Value]
    key: Optional[Value]
    value: Value
    scale: float
    bias_terms: list[tuple[Value, float, str, bool]]
    interior: list[Node]
    folded: bool
    nan_to_zero: bool = False


@register_pass
@dataclasses.dataclass
class FuseAttention(Pass):
    """Raise scaled dot-product attention (with masks, biases, GQA) into graphopt::Attention.

    Rules: see the module docstring of `graphopt.passes.fuse_attention`. Needs shapes with
    static head counts; provides the fact "attention-fused".
    """

    name = "fuse-attention"
    provides = ("attention-fused",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        rules = RewriteRuleSet([AttentionPattern()])
        fused = rules.apply(graph)[AttentionPattern.name]
        if fused:
            EliminateDeadCode().run(graph, ctx)  # the repeat_kv expansions of K/V left reading the caches
        cached = RewriteRuleSet([KvCachePattern()]).apply(graph)[KvCachePattern.name]
        remaining = {n.name for n in graph if n.op_type == "Softmax" and n.domain == ""}
        missed: dict[str, int] = {}
        for refusal in rules.refusals:
            if refusal.node in remaining:
                missed[refusal.reason] = missed.get(refusal.reason, 0) + 1
        stats: dict[str, object] = {"fused": fused, "kv-cache": cached}
        stats.update({f"missed: {reason}": count for reason, count in sorted(missed.items())})
        return PassResult(fused + cached > 0, stats)


class AttentionPattern(RewritePattern):
    """The walk of this module, anchored on each Softmax; commits through `graphopt.rewrite`."""

    name = "attention"
    root_ops = (("", "Softmax"),)
    depth = 2
    """A fusion changes nothing another Softmax's walk reads, beyond its direct neighbours."""

    def match_and_rewrite(self, graph: Graph, node: Node, rewriter: Rewriter) -> Union[bool, str]:
        match, reason = _match(graph, node)
        if match is None:
            return reason
        return _rewrite(graph, match, rewriter)


class KvCachePattern(RewritePattern):
    """`Attention(q, Concat(past_k, k), Concat(past_v, v), ...)` with both Concats along the
    sequence axis -> `Attention(q, k, v, bias, past_k, past_v)` whose present outputs replace
    the Concats (which are usually the model's `present.*` outputs)."""

    name = "kv-cache"
    root_ops = (("graphopt", "Attention"),)
    depth = 1

    def match_and_rewrite(self, graph: Graph, node: Node, rewriter: Rewriter) -> Union[bool, str]:
        if has_kv_cache(node) or len(node.outputs) > 1:
            return "already has a KV cache"
        attrs = dict(node.attrs)
        key, value, kv_heads = _strip_repeat_kv(node.inputs[1], node.inputs[2], attrs["num_heads"])  # type: ignore[arg-type]
        repeats: list[Node] = []
        if key is not node.inputs[1]:
            # an Attention raised by a frontend (torch's SDPA) over repeat_kv expansions
            repeats = _repeat_chain(node.inputs[1]) + _repeat_chain(node.inputs[2])  # type: ignore[arg-type]
            attrs["num_kv_heads"] = kv_heads
        concats = [_sequence_concat(key), _sequence_concat(value)]  # type: ignore[arg-type]
        if concats[0] is None or concats[1] is None:
            return "K and V are not Concat(past, new) along the sequence axis"
        (past_k, new_k), (past_v, new_v) = (c.inputs for c in concats)  # type: ignore[union-attr]
        outputs = [node.output, concats[0].output, concats[1].output]  # type: ignore[union-attr]
        edit = rewriter.edit([node, *repeats, *concats], outputs, before=node)  # type: ignore[list-item]
        bias = node.inputs[3] if len(node.inputs) > 3 else None
        results = edit.op.Attention(
            node.inputs[0], new_k, new_v, bias, past_k, past_v, _domain="graphopt", _outputs=3, **attrs,
        )
        problem = edit.commit(results)
        return True if problem is None else problem


def _sequence_concat(value: Value) -> Optional[Node]:
    """The Concat of two rank-4 [B, H, S, D] tensors along S that computes `value`, if one does."""
    node = value.producer
    if node is None or node.op_type != "Concat" or node.domain or len(node.inputs) != 2 or node.attrs.get("axis") not in (2, -2):
        return None
    if any(v is None or v.type.rank != 4 for v in node.inputs):
        return None
    return node


def _match(graph: Graph, softmax: Node) -> tuple[Optional[_Match], str]:
    scores_type = softmax.inputs[0].type  # type: ignore[union-attr]
    if scores_type.rank != 4:
        return None, "scores are not rank 4"
    heads = scores_type.shape[1]  # type: ignore[index]
    if not isinstance(heads, int):
        return None, "head count is not static"
    axis = softmax.attrs.get("axis", -1 if graph.opset() >= 13 else 1)
    if axis not in (-1, 3):
        return None, "softmax is not over the last axis"
    interior = [softmax]
    probs = _skip_noops_down(graph, softmax.output, interior)
    guard = _nan_guard(probs)
    if guard is not None:
        interior.extend(guard)
        probs = _skip_noops_down(graph, guard[1].output, interior)
    if len(probs.uses()) != 1:
        return None, "attention probabilities are used more than once"
    folded = _is_fold(probs.uses()[0].node, heads)
    if folded:
        interior.append(probs.uses()[0].node)
        probs = probs.uses()[0].node.output
        if len(probs.uses()) != 1:
            return None, "attention probabilities are used more than once"
    pv = probs.uses()[0]
    if pv.node.op_type != "MatMul" or pv.index != 0:
        return None, f"attention probabilities feed {pv.node.op_type}, not a P.V MatMul"
    value = pv.node.inputs[1]
    if folded:
        value = _unfold(value, heads)  # type: ignore[arg-type]
    if value is None or value.type.rank != 4:
        return None, "V is not a rank-4 [batch, heads, seq, head_dim] tensor"
    interior.append(pv.node)
    walk = _walk_scores(graph, softmax.inputs[0], interior, heads)  # type: ignore[arg-type]
    if isinstance(walk, str):
        return None, walk
    qk, scale, bias_terms = walk
    query, q_scale = _strip_scalar_scale(qk.inputs[0], interior)  # type: ignore[arg-type]
    key_t, k_scale = _strip_scalar_scale(qk.inputs[1], interior)  # type: ignore[arg-type]
    key = None
    if qk.output.type.rank == 3:
        query, key = _unfold(query, heads), _unfold_transposed_key(key_t, heads, interior)  # type: ignore[assignment]
        if query is None or key is None:
            return None, "Q or K with heads folded into the batch is not a reshape of a rank-4 tensor"
        key_t = None  # type: ignore[assignment]
    elif key_t.producer is not None and key_t.producer.op_type == "Transpose" and len(key_t.uses()) == 1:
        interior.append(key_t.producer)
    if query.type.rank != 4 or (key_t is not None and key_t.type.rank != 4):
        return None, "Q or K^T is not rank 4"
    match = _Match(
        softmax, pv.node, qk, query, key_t, key, value, scale * q_scale * k_scale, bias_terms, interior, folded,
        nan_to_zero=guard is not None,
    )
    reason = _check_legal(graph, match)
    return (None, reason) if reason else (match, "")


def _nan_guard(probs: Value) -> Optional[tuple[Node, Node]]:
    """(IsNaN, Where) of `Where(IsNaN(P), 0, P)` when those are P's only readers."""
    readers = [use.node for use in probs.uses()]
    if len(readers) != 2 or probs.is_graph_output:
        return None
    isnan = next((n for n in readers if n.op_type == "IsNaN" and n.domain == ""), None)
    where = next((n for n in readers if n.op_type == "Where" and n.domain == ""), None)
    if isnan is None or where is None or len(isnan.output.uses()) != 1 or isnan.output.is_graph_output:
        return None
    condition, fill, kept = where.inputs
    if condition is not isnan.output or kept is not probs or fill is None:
        return None
    zero = uniform_constant(fill)
    if zero is None or float(zero) != 0.0 or (fill.shape is not None and len(fill.shape) > 0 and fill.shape != probs.shape and any(d != 1 for d in fill.shape)):
        return None
    return isnan, where


def _is_fold(node: Node, heads: int) -> bool:
    """A Reshape of [B, H, S, T] into [B*H, S, T]."""
    if node.op_type != "Reshape" or node.output.type.rank != 3 or node.inputs[0].type.rank != 4:  # type: ignore[union-attr]
        return False
    return _same_dims(node.inputs[0].type.shape[2:], node.output.type.shape[1:])  # type: ignore[index, union-attr]


def _unfold(value: Value, heads: int) -> Optional[Value]:
    """The [B, H, S, D] tensor that a [B*H, S, D] value was reshaped from, if any."""
    node = value.producer
    if node is None or node.op_type != "Reshape" or value.type.rank != 3:
        return None
    source = node.inputs[0]
    if source is None or source.type.rank != 4 or source.type.shape[1] != heads:  # type: ignore[index]
        return None
    return source if _same_dims(source.type.shape[2:], value.type.shape[1:]) else None  # type: ignore[index]


def _unfold_transposed_key(key_t: Value, heads: int, interior: list[Node]) -> Optional[Value]:
    node = key_t.producer
    if node is None or node.op_type != "Transpose" or tuple(node.attrs.get("perm", ())) != (0, 2, 1):
        return None
    if len(key_t.uses()) == 1:
        interior.append(node)
    return _unfold(node.inputs[0], heads)  # type: ignore[arg-type]


def _same_dims(a, b) -> bool:
    """Dims that are provably equal or unknown on one side (symbolic expressions such as
    torch.export's "((seq**2)//seq)" are compared after simplification)."""
    return len(a) == len(b) and all(x is None or y is None or x == y or _equal_expressions(x, y) for x, y in zip(a, b))


def _equal_expressions(x: object, y: object) -> bool:
    if not isinstance(x, str) and not isinstance(y, str):
        return False
    import re

    import sympy

    names = set(re.findall(r"[A-Za-z_]\w*", f"{x} {y}"))
    symbols = {name: sympy.Symbol(name, integer=True, positive=True) for name in names}
    try:
        return sympy.simplify(sympy.sympify(str(x), locals=symbols) - sympy.sympify(str(y), locals=symbols)) == 0
    except (sympy.SympifyError, TypeError, SyntaxError):
        return False


def _skip_noops_down(graph: Graph, value: Value, interior: list[Node]) -> Value:
    while len(value.uses()) == 1:
        node = value.uses()[0].node
        if noop_source(graph, node, _NOOPS_AFTER_SOFTMAX) is not value:
            break
        interior.append(node)
        value = node.outputs[0]
    return value


def _walk_scores(graph: Graph, value: Value, interior: list[Node], heads: int):
    """Follow the scores up to the Q.K^T MatMul; returns (matmul, scale, bias terms) or a reason.

    Bias terms are (value, factor, kind, folded): `folded` terms are [B*H, ...] tensors seen
    above a Reshape that unfolded the heads out of the batch (BLOOM's baddbmm layout)."""
    scale = 1.0
    folded = False
    terms: list[tuple[Value, float, str, bool]] = []
    for _ in range(16):
        node = value.producer
        if node is None:
            return "scores do not come from a MatMul"
        interior.append(node)
        if node.op_type == "MatMul":
            return node, scale, terms
        if node.op_type == "Reshape" and not folded and node.output.type.rank == 4 and node.inputs[0].type.rank == 3:  # type: ignore[union-attr]
            if node.output.type.shape[1] != heads or not _same_dims(node.output.type.shape[2:], node.inputs[0].type.shape[1:]):  # type: ignore[index, union-attr]
                return "scores are reshaped in a way that is not a head unfold"
            folded = True
            value = node.inputs[0]  # type: ignore[assignment]
        elif noop_source(graph, node, _NOOPS_IN_SCORES) is not None:
            value = node.inputs[0]  # type: ignore[assignment]
        elif node.op_type in ("Mul", "Div"):
            factor, other = _scalar_operand(node)
            if factor is None:
                return f"scores are scaled by a non-constant ({node.op_type})"
            scale *= factor
            value = other  # type: ignore[assignment]
        elif node.op_type == "Add":
            left, right = node.inputs
            if _leads_to_matmul(left) and not _leads_to_matmul(right):  # type: ignore[arg-type]
                value, bias = left, right
            elif _leads_to_matmul(right) and not _leads_to_matmul(left):  # type: ignore[arg-type]
                value, bias = right, left
            else:
                return "cannot tell scores from bias in an Add"
            terms.append((bias, scale, "add", folded))  # type: ignore[arg-type]
        elif node.op_type == "Where":
            cond, a, b = node.inputs
            fill_a, fill_b = _scalar(a), _scalar(b)  # type: ignore[arg-type]
            if fill_b is not None and fill_a is None:
                terms.append((cond, fill_b * scale, "keep-if-true", folded))  # type: ignore[arg-type]
                value = a  # type: ignore[assignment]
            elif fill_a is not None and fill_b is None:
                terms.append((cond, fill_a * scale, "keep-if-false", folded))  # type: ignore[arg-type]
                value = b  # type: ignore[assignment]
            else:
                return "Where mask without a constant fill"
        else:
            return f"unexpected {node.op_type} between Q.K^T and Softmax"
    return "scores chain too long"


def _leads_to_matmul(value: Value, depth: int = 8) -> bool:
    for _ in range(depth):
        node = value.producer
        if node is None:
            return False
        if node.op_type == "MatMul":
            return value.type.rank in (3, 4)
        if node.op_type == "Reshape":
            value = node.inputs[0]  # type: ignore[assignment]
        elif node.op_type in ("Mul", "Div", "Add", "Cast", "Identity"):
            candidates = [v for v in node.inputs if v is not None and v.producer is not None and v.type.rank in (3, 4)]
            if not candidates:
                return False
            value = candidates[0]
        elif node.op_type == "Where":
            value = node.inputs[1] if _scalar(node.inputs[2]) is not None else node.inputs[2]  # type: ignore[assignment]
        else:
            return False
    return False


def _strip_scalar_scale(value: Value, interior: list[Node]) -> tuple[Value, float]:
    node = value.producer
    if node is not None and node.op_type in ("Mul", "Div") and len(value.uses()) == 1:
        factor, other = _scalar_operand(node)
        if factor is not None:
            interior.append(node)
            return other, factor  # type: ignore[return-value]
    return value, 1.0


def _scalar_operand(node: Node) -> tuple[Optional[float], Optional[Value]]:
    """For Mul/Div by a constant scalar: (factor applied to the other input, other input)."""
    a, b = node.inputs
    if node.op_type == "Mul":
        for const, other in ((a, b), (b, a)):
            factor = _scalar(const)  # type: ignore[arg-type]
            if factor is not None:
                return factor, other
        return None, None
    divisor = _scalar(b)  # type: ignore[arg-type]
    return (None, None) if divisor in (None, 0.0) else (1.0 / divisor, a)  # type: ignore[operator]


def _scalar(value: Optional[Value]) -> Optional[float]:
    number = uniform_constant(value)
    return float(number) if number is not None and number.dtype.kind in "fiu" else None


def _check_legal(graph: Graph, match: _Match) -> str:
    key = match.key if match.key is not None else match.key_transposed
    heads, kv_heads, v_heads = match.query.type.shape[1], key.type.shape[1], match.value.type.shape[1]  # type: ignore[index, union-attr]
    if not isinstance(heads, int):
        return "head count is not static"
    if isinstance(kv_heads, int) and isinstance(v_heads, int) and (kv_heads != v_heads or heads % kv_heads):
        return "K/V head counts do not divide the query heads"
    return ""


_ESCAPES = "an intermediate attention value is used outside the attention (e.g. returned attention weights)"


def _rewrite(graph: Graph, match: _Match, rewriter: Rewriter) -> Union[bool, str]:
    """Build graphopt::Attention before the P.V MatMul and commit it in its place."""
    anchor = match.output_matmul
    constants = [
        v for n in match.interior for v in n.inputs
        if v is not None and (v.is_constant or (v.producer is not None and v.producer.op_type == "Constant"))
    ]
    edit = rewriter.edit(match.interior, [anchor.output], constants)
    if edit.interior_problem():
        return _ESCAPES
    op = edit.op
    heads = match.query.type.shape[1]  # type: ignore[index]
    key = match.key if match.key is not None else _untranspose_key(op, match.key_transposed)  # type: ignore[arg-type]
    key, value, kv_heads = _strip_repeat_kv(key, match.value, heads)
    bias = _build_bias(op, match.bias_terms, heads)
    attrs = {"num_heads": heads, "num_kv_heads": kv_heads, "scale": float(match.scale)}
    if match.nan_to_zero:
        attrs["nan_to_zero"] = 1
    inputs = [match.query, key, value] + ([bias] if bias is not None else [])
    result = op.Attention(*inputs, _domain="graphopt", **attrs)
    if match.folded:
        result = _reshape_keeping_tail(op, result, [-1], start=2)
    problem = edit.commit([result])
    return True if problem is None else problem


def _untranspose_key(op: Any, key_t: Value) -> Value:
    merged = _head_merged_transpose(key_t)
    if merged is not None:
        return merged
    node = key_t.producer
    if node is not None and node.op_type == "Transpose" and "perm" in node.attrs:
        perm = list(node.attrs["perm"])
        perm[2], perm[3] = perm[3], perm[2]
        source = node.inputs[0]
        if perm == [0, 1, 2, 3]:
            return source  # type: ignore[return-value]
        return op.Transpose(source, perm=tuple(perm))
    return op.Transpose(key_t, perm=(0, 1, 3, 2))
def _head_merged_transpose(key_t: Value) -> Optional[Value]:
    """K when `key_t` is Reshape(Transpose(Reshape(K, [B*H, S, D]), (0, 2, 1)), [B, H, D, S]):
    torchlib's K^T (heads merged into the batch, transposed, split again)."""
    split = key_t.producer
    if split is None or split.op_type != "Reshape" or split.domain:
        return None
    transpose = split.inputs[0].producer  # type: ignore[union-attr]
    if transpose is None or transpose.op_type != "Transpose" or tuple(transpose.attrs.get("perm", ())) != (0, 2, 1):
        return None
    merge = transpose.inputs[0].producer  # type: ignore[union-attr]
    if merge is None or merge.op_type != "Reshape" or merge.domain:
        return None
    key, merged, out = merge.inputs[0], merge.output.type.shape, key_t.type.shape
    shape = key.type.shape if key is not None else None  # type: ignore[union-attr]
    if shape is None or merged is None or out is None or len(shape) != 4 or len(merged) != 3 or len(out) != 4:
        return None
    if not dims_equal(merged[0], mul_dims(shape[0], shape[1])) or not (dims_equal(merged[1], shape[2]) and dims_equal(merged[2], shape[3])):
        return None
    if not all(dims_equal(a, b) for a, b in zip(out, (shape[0], shape[1], shape[3], shape[2]))):
        return None
    return key


def _strip_repeat_kv(key: Value, value: Value, heads: int) -> tuple[Value, Value, int]:
    base_k, base_v = _repeat_source(key), _repeat_source(value)
    if base_k is not None and base_v is not None:
        kv_heads = base_k.type.shape[1]  # type: ignore[index]
        if isinstance(kv_heads, int) and kv_heads == base_v.type.shape[1] and heads % kv_heads == 0:  # type: ignore[index]
            return base_k, base_v, kv_heads
    kv = key.type.shape[1]  # type: ignore[index]
    return key, value, kv if isinstance(kv, int) else heads


def _repeat_chain(value: Value) -> list[Node]:
    """The Reshape, Expand and Unsqueeze of the repeat_kv expansion computing `value`."""
    reshape = value.producer
    expand = reshape.inputs[0].producer  # type: ignore[union-attr]
    return [reshape, expand, expand.inputs[0].producer]  # type: ignore[list-item,union-attr]


def _repeat_source(value: Value) -> Optional[Value]:
    """The [B, Hkv, S, D] tensor that repeat_kv expanded into `value`, if it is one."""
    reshape = value.producer
    if reshape is None or reshape.op_type != "Reshape":
        return None
    expand = reshape.inputs[0].producer  # type: ignore[union-attr]
    if expand is None or expand.op_type != "Expand":
        return None
    unsqueeze = expand.inputs[0].producer  # type: ignore[union-attr]
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    axes = unsqueeze.attrs.get("axes")
    if axes is None and len(unsqueeze.inputs) > 1:
        data = constant_data(unsqueeze.inputs[1])  # type: ignore[arg-type]
        axes = None if data is None else tuple(int(a) for a in data.reshape(-1))
    source = unsqueeze.inputs[0]
    if tuple(axes or ()) not in ((2,), (-3,)) or source is None or source.type.rank != 4:
        return None
    expanded, repeated, base = expand.output.type.shape, value.type.shape, source.type.shape
    if expanded is None or len(expanded) != 5 or repeated is None:
        return None
    copies, kv_heads, heads = expanded[2], base[1], repeated[1]  # type: ignore[index]
    if not all(isinstance(d, int) for d in (copies, kv_heads, heads)) or kv_heads * copies != heads:
        return None
    if repeated[3] != base[3] or expanded[1] != kv_heads:  # type: ignore[index]
        return None
    return source


def _build_bias(op: Any, terms: list[tuple[Value, float, str, bool]], heads: int) -> Optional[Value]:
    total: Optional[Value] = None
    for term, factor, kind, folded in terms:
        if folded:
            term = _reshape_keeping_tail(op, term, [-1, heads], start=1)
        if kind == "add":
            part = term
            if factor != 1.0:
                part = op.Mul(term, _float_constant(op, factor, term))
        else:
            fill = _float_constant(op, factor, None)
            zero = _float_constant(op, 0.0, None)
            branches = [zero, fill] if kind == "keep-if-true" else [fill, zero]
            part = op.Where(term, *branches)
        total = part if total is None else op.Add(total, part)
    return total


def _reshape_keeping_tail(op: Any, value: Value, head: list[int], start: int) -> Value:
    """Reshape `value` to `head` followed by its own dims from `start` on."""
    shape = op.Shape(value)
    tail = op.Slice(shape, _int_constant(op, [start]), _int_constant(op, [2**62]))
    target = op.Concat(_int_constant(op, head), tail, axis=0)
    return op.Reshape(value, target)


def _int_constant(op: Any, values: list[int]) -> Value:
    return op.constant(np.array(values, dtype=np.int64), "attention_shape_constant")


def _float_constant(op: Any, number: float, like: Optional[Value]) -> Value:
    dtype = like.dtype.to_numpy() if like is not None and like.dtype is not None else np.float32
    return op.constant(np.array(number, dtype=dtype), "attention_bias_constant")
