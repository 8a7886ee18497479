"""fuse-rotary: raise `x * cos + rotate_half(x) * sin` into one graphopt `RotaryEmbedding` op.

The match is anchored on each Add (inputs in either order, Mul inputs too):

1. Add(Mul(x, C), Mul(rotate_half(x), S)), x rank 4 [B, H, S, D] with a static last dim R.
   rotate_half(x) is `Concat(Neg(Slice(x, R/2:)), Slice(x, :R/2))` on the last axis (LLaMA,
   Qwen2, Mistral, Gemma, Phi-3 in both torch exporters), or, interleaved (GPT-J),
   `Reshape(Concat(Unsqueeze(Neg(x[..., 1::2]), -1), Unsqueeze(x[..., 0::2], -1), axis=-1))`
   back to x's shape. The slices must split x exactly there (steps 1, resp. 2).
2. C and S broadcast over the heads: `Unsqueeze(c, 1)` of c [B, S, R] (or c [S, R], or a
   [B, 1, S, R] tensor, squeezed). c must be the rows of a cosine, s of a sine, each entry
   duplicated as the rotation needs (halves equal; interleaved: pairs equal). Proven by
   walking c through Cast / Identity / Mul and Div by a scalar constant (the
   `attention_scaling` of scaled variants) to `Cos(Concat(a, a))` (interleaved: `Cos` of
   `Reshape(Concat(Unsqueeze(a, -1), Unsqueeze(a, -1)))`), or to a constant table (also
   behind `Gather(table, position_ids)` on axis 0 or a Slice of its rows) whose halves are
   equal, which is a cosine table when row 0 (position 0) is non-zero and a sine table when
   it is all zero. The cos/sin computation stays as it is; the op reads its first half
   (interleaved: its even entries) through a new Slice.
3. Partial rotary (Phi-3, GPT-NeoX): when x above is `Slice(x_full, :R)` on the last axis and
   the Add is read only by `Concat(Add, Slice(x_full, R:))`, that Concat's output is
   replaced and the op gets x_full with `rotary_dim` R.

Legality comes from `graphopt.rewrite` (one check): an intermediate value read outside the
match (e.g. rotate_half(x) reused elsewhere) refuses the match. Adds with a rotate_half-like
operand that do not match are counted under a reason in the stats ("missed: ...").

Needs: the canonical form (`cleanup`, `canonicalize`: folded shape arithmetic, so slice
bounds are constants; fact "canonical-form"). Changes: each matched Add/Mul/Neg/Slice/Concat
group becomes one `graphopt::RotaryEmbedding(x, cos_half, sin_half)` (plus a Slice of cos and
of sin, and a Squeeze where C had no Unsqueeze); the output keeps its name.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import numpy as np

from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.rewrite import RewritePattern, Rewriter, RewriteRuleSet

_PASS_THROUGH = ("Cast", "Identity")


@register_pass
@dataclasses.dataclass
class FuseRotary(Pass):
    """Raise rotary position embeddings (half-split or interleaved, partial, cached or computed cos/sin) into graphopt::RotaryEmbedding.

    Rules: see the module docstring of `graphopt.passes.fuse_rotary`. Needs the canonical
    form (fact "canonical-form"); provides "rotary-fused". Stats: "fused", and
    "missed: <reason>" for rotate_half-like Adds left as they were.
    """

    name = "fuse-rotary"
    requires = ("canonical-form",)
    provides = ("rotary-fused",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        rules = RewriteRuleSet([RotaryPattern()])
        fused = rules.apply(graph)[RotaryPattern.name]
        remaining = {n.name for n in graph if n.op_type == "Add" and n.domain == ""}
        missed: dict[str, int] = {}
        for refusal in rules.refusals:
            if refusal.node in remaining:
                missed[refusal.reason] = missed.get(refusal.reason, 0) + 1
        stats: dict[str, object] = {"fused": fused}
        stats.update({f"missed: {reason}": count for reason, count in sorted(missed.items())})
        return PassResult(fused > 0, stats)


@dataclasses.dataclass
class _Rotation:
    """rotate_half(x) as found: its source x, layout, nodes and constant operands."""

    x: Value
    interleaved: int
    nodes: list[Node]


class RotaryPattern(RewritePattern):
    """The walk of this module, anchored on each Add; commits through `graphopt.rewrite`."""

    name = "rotary"
    root_ops = (("", "Add"),)
    depth = 6

    def match_and_rewrite(self, graph: Graph, node: Node, rewriter: Rewriter) -> Union[bool, str]:
        if len(node.inputs) != 2:
            return False
        found = None
        for cos_term, sin_term in (node.inputs, node.inputs[::-1]):
            split = _sin_term(sin_term)
            if split is not None:
                found = (cos_term, sin_term, *split)
                break
        if found is None:
            return False
        cos_term, sin_term, rotation, sin_factor = found
        if isinstance(rotation, str):
            return rotation
        x = rotation.x
        cos_factor = _other_factor(cos_term, x)
        if cos_factor is None:
            return "the other Add term is not x * cos of the x that rotate_half reads"
        rotary = x.shape[-1]  # type: ignore[index]
        cos_rows, sin_rows = _rows(cos_factor), _rows(sin_factor)
        if isinstance(cos_rows, str) or isinstance(sin_rows, str):
            return cos_rows if isinstance(cos_rows, str) else sin_rows  # type: ignore[return-value]
        for rows, want in ((cos_rows[0], "cos"), (sin_rows[0], "sin")):
            if rows.shape is None or rows.shape[-1] != rotary:
                return f"the {want} rows do not have the rotated size {rotary} as last dim"
            if rows.dtype != x.dtype:
                return f"the {want} rows' element type differs from x's"
            kind = _angle_kind(rows, rotation.interleaved)
            if kind != want:
                other = "the term multiplying x" if want == "cos" else "the term multiplying rotate_half(x)"
                return f"{other} is not a {want} with each entry duplicated for the rotation" + (
                    f" (it is a {kind})" if kind else ""
                )
        matched = [node, cos_term.producer, sin_term.producer, *rotation.nodes]
        output, source, partial = node.output, x, None
        outer = _pass_through(node, x)
        if outer is not None:
            concat, source, kept = outer
            matched += [concat, x.producer, kept]
            output, partial = concat.output, rotary
        constants = [v for n in matched for v in n.inputs[1:] if v is not None and v.is_constant]
        edit = rewriter.edit(matched, [output], constants)  # type: ignore[arg-type]
        halves = []
        for rows, needs_squeeze in (cos_rows, sin_rows):
            if needs_squeeze:
                rows = edit.op.Squeeze(rows, edit.op.constant(np.array([1], np.int64), "rotary_axis"))
            if rotation.interleaved:
                bounds = ([0], [rotary], [-1], [2])
            else:
                bounds = ([0], [rotary // 2], [-1], [1])
            halves.append(edit.op.Slice(rows, *(edit.op.constant(np.array(b, np.int64), "rotary_half") for b in bounds)))
        attrs: dict[str, int] = {}
        if rotation.interleaved:
            attrs["interleaved"] = 1
        if partial is not None:
            attrs["rotary_dim"] = partial
        fused = edit.op.RotaryEmbedding(source, *halves, _domain=GRAPHOPT_DOMAIN, **attrs)
        problem = edit.commit([fused])
        return True if problem is None else problem


# ---------------------------------------------------------------------------- rotate_half
def _ints(value: Optional[Value]) -> Optional[list[int]]:
    data = None if value is None else constant_data(value)
    return None if data is None or data.dtype.kind not in "iu" else [int(v) for v in data.reshape(-1)]


def _slice_of(value: Value, step: int = 1) -> Optional[tuple[Value, int, int]]:
    """(source, start, end) when `value` = Slice(source, start:end:step) on the last axis only."""
    node = value.producer
    if node is None or node.op_type != "Slice" or node.domain or len(node.inputs) < 4:
        return None
    source = node.inputs[0]
    rank = None if source is None else source.type.rank
    starts, ends, axes = (_ints(v) for v in node.inputs[1:4])
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if not rank or starts is None or ends is None or axes is None or steps != [step] or len(starts) != 1:
        return None
    if axes[0] % rank != rank - 1:
        return None
    return source, starts[0], ends[0]  # type: ignore[return-value]


def _last_axis(node: Node, rank: Optional[int]) -> bool:
    return rank is not None and int(node.attrs.get("axis", 0)) % rank == rank - 1


def _sin_term(term: Optional[Value]) -> Optional[tuple[Union[_Rotation, str], Value]]:
    """(rotate_half(x) or why it is not one, the other factor) when `term` = Mul(r, s) and r
    looks like rotate_half (a Concat with a Neg input, or a Reshape of one); else None."""
    mul = None if term is None else term.producer
    if mul is None or mul.op_type != "Mul" or mul.domain or len(mul.inputs) != 2:
        return None
    for candidate, factor in (mul.inputs, mul.inputs[::-1]):
        rotation = _rotation(candidate)  # type: ignore[arg-type]
        if rotation is not None:
            return rotation, factor  # type: ignore[return-value]
    return None


def _rotation(value: Value) -> Optional[Union[_Rotation, str]]:
    producer = value.producer
    if producer is None or producer.domain:
        return None
    if producer.op_type == "Concat" and len(producer.inputs) == 2 and _is_neg(producer.inputs[0]):
        return _half_split(value, producer)
    if producer.op_type == "Reshape" and producer.inputs[0] is not None:
        inner = producer.inputs[0].producer
        if inner is not None and inner.op_type == "Concat" and len(inner.inputs) == 2:
            first = inner.inputs[0].producer if inner.inputs[0] is not None else None
            if first is not None and first.op_type == "Unsqueeze" and _is_neg(first.inputs[0]):
                return _interleaved(value, producer, inner)
    return None


def _is_neg(value: Optional[Value]) -> bool:
    return value is not None and value.producer is not None and value.producer.op_type == "Neg" and not value.producer.domain


def _half_split(value: Value, concat: Node) -> Union[_Rotation, str]:
    neg = concat.inputs[0].producer  # type: ignore[union-attr]
    high, low = _slice_of(neg.inputs[0]), _slice_of(concat.inputs[1])  # type: ignore[union-attr,arg-type]
    if high is None or low is None or high[0] is not low[0]:
        return "rotate_half is not two last-axis slices of one tensor"
    x = high[0]
    size = x.shape[-1] if x.shape else None
    if x.type.rank != 4 or not isinstance(size, int) or size % 2:
        return "rotate_half's input is not rank 4 with a static, even last dim"
    if not _last_axis(concat, 4) or value.shape is None or value.shape[-1] != size:
        return "rotate_half's Concat is not on the last axis"
    half = size // 2
    if low[1] != 0 or low[2] != half or high[1] != half or high[2] < size:
        return "rotate_half's slices do not split x at the middle"
    return _Rotation(x, 0, [concat, neg, neg.inputs[0].producer, concat.inputs[1].producer])  # type: ignore[union-attr,list-item,arg-type]


def _unsqueezed_last(value: Optional[Value]) -> Optional[tuple[Node, Value]]:
    """(the Unsqueeze, its input) when `value` = Unsqueeze(v, [-1 | rank(v)])."""
    node = None if value is None else value.producer
    if node is None or node.op_type != "Unsqueeze" or node.domain or node.inputs[0] is None:
        return None
    axes = _ints(node.inputs[1]) if len(node.inputs) > 1 else list(node.attrs.get("axes", ()))  # type: ignore[arg-type]
    rank = node.inputs[0].type.rank
    if axes is None or len(axes) != 1 or rank is None or axes[0] % (rank + 1) != rank:
        return None
    return node, node.inputs[0]


def _interleaved(value: Value, reshape: Node, concat: Node) -> Union[_Rotation, str]:
    odd_u, even_u = _unsqueezed_last(concat.inputs[0]), _unsqueezed_last(concat.inputs[1])
    if odd_u is None or even_u is None or not _last_axis(concat, 5):
        return "interleaved rotate_half is not two last-axis slices stacked on a new last axis"
    neg = odd_u[1].producer
    odd, even = _slice_of(neg.inputs[0], step=2), _slice_of(even_u[1], step=2)  # type: ignore[union-attr,arg-type]
    if odd is None or even is None or odd[0] is not even[0]:
        return "interleaved rotate_half is not two step-2 slices of one tensor"
    x = odd[0]
    size = x.shape[-1] if x.shape else None
    if x.type.rank != 4 or not isinstance(size, int) or size % 2 or value.shape != x.shape:
        return "interleaved rotate_half's input is not rank 4 with a static, even last dim, reshaped back"
    if even[1] != 0 or odd[1] != 1 or min(odd[2], even[2]) < size - 1:
        return "interleaved rotate_half's slices are not the even and odd features"
    nodes = [reshape, concat, odd_u[0], even_u[0], neg, neg.inputs[0].producer, even_u[1].producer]  # type: ignore[union-attr,list-item]
    return _Rotation(x, 1, nodes)  # type: ignore[arg-type]


def _other_factor(term: Optional[Value], x: Value) -> Optional[Value]:
    """C when `term` = Mul(x, C)."""
    mul = None if term is None else term.producer
    if mul is None or mul.op_type != "Mul" or mul.domain or len(mul.inputs) != 2:
        return None
    a, b = mul.inputs
    return b if a is x else a if b is x else None


def _pass_through(add: Node, x: Value) -> Optional[tuple[Node, Value, Node]]:
    """(outer Concat, x_full, pass-through Slice) for a partial rotary of x = x_full[..., :R]."""
    rot = _slice_of(x)
    readers = add.output.uses()
    if rot is None or rot[1] != 0 or add.output.is_graph_output or len(readers) != 1 or readers[0].index != 0:
        return None
    concat = readers[0].node
    if concat.op_type != "Concat" or concat.domain or len(concat.inputs) != 2 or not _last_axis(concat, 4):
        return None
    full, size = rot[0], x.shape[-1]  # type: ignore[index]
    kept = _slice_of(concat.inputs[1])  # type: ignore[arg-type]
    full_size = full.shape[-1] if full.shape else None
    if kept is None or kept[0] is not full or kept[1] != size or not isinstance(full_size, int) or kept[2] < full_size:
        return None
    if rot[2] != size or full_size <= size:
        return None
    return concat, full, concat.inputs[1].producer  # type: ignore[union-attr,return-value]


# ---------------------------------------------------------------------------- cos / sin
def _rows(factor: Optional[Value]) -> Union[tuple[Value, bool], str]:
    """(rows [B, S, R] or [S, R], whether they still need a Squeeze of axis 1) for a factor that
    broadcasts over the heads of x [B, H, S, R]."""
    if factor is None or factor.type.rank is None:
        return "cos/sin have no known rank"
    if factor.type.rank == 2:
        return factor, False
    if factor.type.rank != 4 or factor.shape[1] != 1:  # type: ignore[index]
        return "cos/sin do not broadcast over the heads as [batch, 1, seq, dim]"
    unsqueeze = factor.producer
    if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" and not unsqueeze.domain:
        axes = _ints(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else list(unsqueeze.attrs.get("axes", ()))  # type: ignore[arg-type]
        if axes is not None and [a % 4 for a in axes] == [1]:
            return unsqueeze.inputs[0], False  # type: ignore[return-value]
    return factor, True


def _angle_kind(rows: Value, interleaved: int) -> Optional[str]:
    """"cos" or "sin" when `rows` provably holds cosines (sines) with each entry duplicated as
    the layout needs (see the module docstring), else None."""
    value: Optional[Value] = rows
    while value is not None:
        data = constant_data(value, limit=None)
        if data is not None:
            return _table_kind(data, interleaved)
        node = value.producer
        if node is None or node.domain:
            return None
        if node.op_type in _PASS_THROUGH:
            value = node.inputs[0]
        elif node.op_type in ("Mul", "Div") and len(node.inputs) == 2:
            scalar = [v for v in node.inputs if v is not None and _is_scalar_constant(v)]
            if not scalar or (node.op_type == "Div" and node.inputs[1] is not scalar[0]):
                return None
            value = node.inputs[1] if node.inputs[0] is scalar[0] else node.inputs[0]
        elif node.op_type in ("Cos", "Sin"):
            return node.op_type.lower() if _duplicated(node.inputs[0], interleaved) else None
        elif node.op_type == "Gather" and int(node.attrs.get("axis", 0)) == 0:
            table = None if node.inputs[0] is None else constant_data(node.inputs[0], limit=None)
            return None if table is None or table.ndim != 2 else _table_kind(table, interleaved)
        elif node.op_type == "Slice" and node.inputs[0] is not None and _rows_slice(node):
            value = node.inputs[0]
        else:
            return None
    return None


def _is_scalar_constant(value: Value) -> bool:
    data = constant_data(value)
    return data is not None and data.size == 1


def _rows_slice(node: Node) -> bool:
    """A Slice that leaves the last axis whole (e.g. the first `seq` rows of a cached table)."""
    rank = node.inputs[0].type.rank  # type: ignore[union-attr]
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    return rank is not None and axes is not None and all(a % rank != rank - 1 for a in axes)


def _duplicated(value: Optional[Value], interleaved: int) -> bool:
    """`value` = Concat(a, a) on the last axis (interleaved: Reshape(Concat(Unsqueeze(a, -1) twice)))."""
    node = None if value is None else value.producer
    if node is None or node.domain:
        return False
    if not interleaved:
        return node.op_type == "Concat" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] and _last_axis(node, value.type.rank)  # type: ignore[union-attr]
    inner = node.inputs[0].producer if node.op_type == "Reshape" and node.inputs[0] is not None else None
    if inner is None or inner.op_type != "Concat" or len(inner.inputs) != 2 or not _last_axis(inner, inner.output.type.rank):
        return False
    first, second = _unsqueezed_last(inner.inputs[0]), _unsqueezed_last(inner.inputs[1])
    return first is not None and second is not None and first[1] is second[1]


def _table_kind(data: np.ndarray, interleaved: int) -> Optional[str]:
    """"cos"/"sin" for a constant table of angles' cosines/sines (rows = positions, row 0 =
    position 0) with entries duplicated as the layout needs, else None."""
    if data.ndim < 2 or data.shape[-1] % 2 or data.dtype.kind != "f":
        return None
    first, second = (data[..., 0::2], data[..., 1::2]) if interleaved else np.split(data, 2, axis=-1)
    if not np.array_equal(first, second):
        return None
    origin = data.reshape(-1, data.shape[-2], data.shape[-1])[0, 0]
    if np.all(origin == 0):
        return "sin"
    return "cos" if np.all(origin == origin[0]) and origin[0] != 0 else None
