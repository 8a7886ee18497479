"""canonicalize: rewrite equivalent arithmetic into one form, so one fusion pattern covers it.

Rules (default-domain ops; "constant" means a graph constant small enough to read, see
`graphopt.ir.graph.constant_data`):

1. constant-right: a commutative binary op (Add, Mul, Max, Min, And, Or, Equal) with a
   constant first input and a non-constant second input gets its inputs swapped:
   `Mul(0.5, x)` -> `Mul(x, 0.5)`.
2. divide-by-constant: `Div(x, c)` with x floating point and c a float constant whose
   reciprocal is finite -> `Mul(x, 1/c)` (1/c computed in float64, stored in c's type).
3. one-over: `Div(1, y)` with 1 a single-element float constant -> `Reciprocal(y)`.
4. times-reciprocal: `Mul(x, Reciprocal(y))`, the Reciprocal read only there ->
   `Div(x, y)` (so `x * 1/sqrt(v)`, `x * Reciprocal(Sqrt(v))` and `x / Sqrt(v)` meet).
5. square: `Pow(x, 2)` with a single-element exponent -> `Mul(x, x)`.
6. fold-scales: `Mul(Mul(x, a), b)` with a, b constants, the inner Mul read only there ->
   `Mul(x, a*b)` (when a*b is no larger than the larger of a and b).
7. scale-outward: `Mul(Mul(x, c), y)` with c constant and x, y not, the inner Mul read
   only there, and one of x, y computed from the other (within a walk of 64 nodes) ->
   `Mul(Mul(x, y), c)` (x, y in a fixed order: graph inputs first, then graph order): a
   constant factor moves outermost within one expression, so `0.5 * x * y`,
   `(0.5 * x) * y`, `x * (0.5 * y)` and `(x * y) * 0.5` all become `Mul(Mul(x, y), 0.5)`
   when y is computed from x (GELU's `x * (1 + erf(..))`). It does not move past a factor
   from a separate expression (T5's gate in `gelu(h) * g`), which would take the 0.5 out
   of the GELU. With rule 6, chains of constant factors become one.

Not here, because cleanup already does it (and `fuse` runs cleanup first): layout chains
(Transpose∘Transpose, Reshape∘Reshape, Squeeze/Unsqueeze pairs, Unsqueeze chains) are
composed by simplify-shapes, constant subexpressions folded by fold-constants. Reduction
axes keep their form: ONNX fixes it by opset (an input from opset 18, an attribute
before), so within one graph it is already one form; patterns build it from
`graph.opset()` (see `reduce_mean_pattern`).

Rules 2, 4, 6 and 7 re-associate or round a float product differently, so outputs change
by a few ulps (well inside the lossless tolerance). Applied with the rewrite engine to a
fixed point; deterministic (graph order, rules in the order above).

Needs: nothing. Changes: the rewritten nodes are replaced (graph output names are
kept); provides "canonical-form", which the GELU and norm fusions require.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.rewrite import Match, RewriteRule, RewriteRuleSet, Var

COMMUTATIVE_BINARY_OPS = ("Add", "Mul", "Max", "Min", "And", "Or", "Equal")


def _constant(value: Value) -> Optional[np.ndarray]:
    """The data of a readable constant that cannot be overridden (an initializer that is
    also a graph input is only a default), else None."""
    graph = value.graph
    if graph is not None and graph.is_overridable(value):
        return None
    return constant_data(value)


def _is_constant(value: Value) -> bool:
    return _constant(value) is not None


def _not_constant(value: Value) -> bool:
    return not _is_constant(value)


def _is_float(value: Value) -> bool:
    return value.dtype is not None and value.dtype.is_float


def reduce_mean_pattern(op: Any, graph: Graph, value: Any, axes: Any, **attrs: Any) -> Any:
    """A ReduceMean pattern over `value` in the form `graph`'s opset uses: axes as an input
    (the pattern variable `axes`) from opset 18, as an attribute before."""
    if graph.opset("") >= 18:
        return op.ReduceMean(value, axes, **attrs)
    return op.ReduceMean(value, **attrs)


def reduce_axes(node: Node) -> Optional[tuple[int, ...]]:
    """A Reduce* node's constant axes, from its attribute or its second input (None if unknown)."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        data = constant_data(node.inputs[1])
        axes = None if data is None else data.reshape(-1)
    return None if axes is None else tuple(int(a) for a in axes)


# ---------------------------------------------------------------------------- rules
def _constant_right(op_type: str) -> RewriteRule:
    def pattern(op):
        return getattr(op, op_type)(Var("x", check=_not_constant), Var("c", check=_is_constant))

    def replacement(op, x, c):
        return getattr(op, op_type)(x, c)

    def check(graph: Graph, match: Match) -> bool | str:
        return True if match.root.inputs[0] is match["c"] else "the constant is already the second input"

    return RewriteRule(f"constant-right-{op_type.lower()}", pattern, replacement, check=check)


def _reciprocal_of(value: Value) -> Optional[np.ndarray]:
    data = _constant(value)
    if data is None or data.dtype.kind != "f" or not np.all(data != 0):
        return None
    with np.errstate(all="ignore"):
        result = (1.0 / data.astype(np.float64)).astype(data.dtype)
    return result if np.all(np.isfinite(result)) else None


def _divide_by_constant() -> RewriteRule:
    def pattern(op, x, c):
        return op.Div(x, c)

    def replacement(op, x, c):
        return op.Mul(x, op.constant(_reciprocal_of(c), f"{c.name}_reciprocal"))

    def check(graph: Graph, match: Match) -> bool | str:
        if not _is_float(match["x"]) or _is_constant(match["x"]):
            return "x is not a computed floating-point value"
        return True if _reciprocal_of(match["c"]) is not None else "the divisor is not a float constant with a finite reciprocal"

    return RewriteRule("divide-by-constant", pattern, replacement, check=check)


def _one_over() -> RewriteRule:
    def pattern(op, one, y):
        return op.Div(one, y)

    def replacement(op, y):
        return op.Reciprocal(y)

    def check(graph: Graph, match: Match) -> bool | str:
        one, y = match["one"], match["y"]
        data = _constant(one)
        if data is None or data.size != 1 or data.dtype.kind != "f" or float(data.reshape(-1)[0]) != 1.0:
            return "the dividend is not a single 1.0"
        if y.type.rank is None or data.ndim > y.type.rank:
            return "the 1.0 could broadcast y to a higher rank"
        return True

    return RewriteRule("one-over", pattern, replacement, check=check)


def _times_reciprocal() -> RewriteRule:
    def pattern(op, x, y):
        return op.Mul(x, op.Reciprocal(y))

    def replacement(op, x, y):
        return op.Div(x, y)

    return RewriteRule("times-reciprocal", pattern, replacement, check=lambda g, m: _is_float(m["y"]) or "y is not floating point")


def _square() -> RewriteRule:
    def pattern(op, x, two):
        return op.Pow(x, two)

    def replacement(op, x):
        return op.Mul(x, x)

    def check(graph: Graph, match: Match) -> bool | str:
        x, data = match["x"], _constant(match["two"])
        if data is None or data.size != 1 or float(data.reshape(-1)[0]) != 2.0:
            return "the exponent is not a single 2"
        if not _is_float(x) or x.type.rank is None or data.ndim > x.type.rank:
            return "x is not floating point of a known rank at least the exponent's"
        return True

    return RewriteRule("square", pattern, replacement, check=check)


def _folded_product(a: Value, b: Value) -> Optional[np.ndarray]:
    first, second = _constant(a), _constant(b)
    if first is None or second is None or first.dtype != second.dtype or first.dtype.kind not in "fiu":
        return None
    with np.errstate(all="ignore"):
        product = (first * second).astype(first.dtype)
    return product if product.size <= max(first.size, second.size) else None


def _fold_scales() -> RewriteRule:
    def pattern(op, x, a, b):
        return op.Mul(op.Mul(x, a), b)

    def replacement(op, x, a, b):
        return op.Mul(x, op.constant(_folded_product(a, b), f"{b.name}_folded"))

    def check(graph: Graph, match: Match) -> bool | str:
        if _is_constant(match["x"]) or not (_is_constant(match["a"]) and _is_constant(match["b"])):
            return "not a computed value times two constants"
        return True if _folded_product(match["a"], match["b"]) is not None else "the constants do not fold into one of their size"

    return RewriteRule("fold-scales", pattern, replacement, check=check)


def _scale_outward() -> RewriteRule:
    def pattern(op):
        x, y = Var("x", check=_not_constant), Var("y", check=_not_constant)
        return op.Mul(op.Mul(x, Var("c", check=_is_constant)), y)

    def replacement(op, x, y, c):
        return op.Mul(op.Mul(*sorted((x, y), key=_operand_order)), c)

    def check(graph: Graph, match: Match) -> bool | str:
        x, y = match["x"], match["y"]
        if _reads_nearby(graph, y, x) or _reads_nearby(graph, x, y):
            return True
        return "the factors are separate expressions (neither reads the other nearby)"

    return RewriteRule("scale-outward", pattern, replacement, check=check)


RELATED_WINDOW = 64
"""How many nodes `_reads_nearby` visits at most."""


def _reads_nearby(graph: Graph, later: Value, earlier: Value) -> bool:
    """Whether `later` is computed from `earlier`, found within `RELATED_WINDOW` nodes of a
    walk up from `later` that skips everything computed before `earlier`."""
    if later.producer is None:
        return False
    floor = graph.order_key(earlier.producer) if earlier.producer is not None else None
    seen: set[int] = set()
    stack = [later.producer]
    while stack and len(seen) < RELATED_WINDOW:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for value in node.inputs:
            if value is earlier:
                return True
            producer = value.producer if value is not None else None
            if producer is not None and producer.graph is graph and (floor is None or graph.order_key(producer) > floor):
                stack.append(producer)
    return False


def _operand_order(value: Value) -> tuple[int, int]:
    """Graph inputs first, in input order, then node outputs in graph order: the order of
    the two non-constant factors of a re-associated product, so every grouping gives one form."""
    graph, producer = value.graph, value.producer
    if producer is None or graph is None:
        inputs = graph.inputs if graph is not None else ()
        return (0, next((i for i, v in enumerate(inputs) if v is value), len(inputs)))
    return (1, graph.order_key(producer))


def canonical_rules() -> list[RewriteRule]:
    """The rules of `canonicalize`, in the order they are tried at each node."""
    return [_constant_right(op) for op in COMMUTATIVE_BINARY_OPS] + [
        _divide_by_constant(), _one_over(), _times_reciprocal(), _square(), _fold_scales(), _scale_outward(),
    ]


@register_pass
@dataclasses.dataclass
class Canonicalize(Pass):
    """Put arithmetic into one canonical form: constants second, divisions by constants as
    products, 1/y as Reciprocal, x*Reciprocal(y) as x/y, squares as x*x, constant factors
    folded and moved outermost.

    The rules are in `graphopt.passes.canonicalize`. Needs nothing; rewrites matched nodes
    in place of the old ones (output names kept). Provides "canonical-form", which
    fuse-gelu, fuse-rmsnorm and fuse-layernorm require.
    """

    name = "canonicalize"
    provides = ("canonical-form",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        read_before = [c for c in graph.constants.values() if c.uses()]
        counts = RewriteRuleSet(canonical_rules()).apply(graph)
        stats = {name: count for name, count in counts.items() if count}
        _drop_replaced_constants(graph, read_before)
        return PassResult(bool(stats), stats)


def _drop_replaced_constants(graph: Graph, read_before: list[Value]) -> None:
    """Remove the constants that only rewritten nodes read (e.g. a divisor now stored as its
    reciprocal); overridable initializers stay."""
    for constant in read_before:
        if not constant.uses() and not constant.is_graph_output and not graph.is_overridable(constant):
            graph.remove_constant(constant)
