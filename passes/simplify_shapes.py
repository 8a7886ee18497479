"""`simplify-shapes`: static shape arithmetic and shorter chains of layout ops."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.ir.schema import SymbolicValue
from graphopt.ir.types import Shape
from graphopt.passes.fold_constants import fold_known_outputs
from graphopt.passes.noops import known_constant
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass

SHAPE_OPS = frozenset({"Shape", "Size", "Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Reshape", "Cast"})
"""Ops that compute shape vectors; their outputs become constants when fully known."""

RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
"""Ops that only change the shape: the row-major data stays as it is."""


def _sole_reader(value: Value, node: Node) -> bool:
    """True when `node` is the only reader of `value` and it is not a graph output."""
    return value.users() == [node] and not value.is_graph_output


def _erase_if_unused(graph: Graph, node: Node) -> None:
    if not any(out.uses() or out.is_graph_output for out in node.outputs):
        graph.erase(node)


def _producer(node: Node, op_types: frozenset[str]) -> Optional[Node]:
    """The default-domain producer of `node`'s first input, if its op is in `op_types`."""
    value = node.inputs[0] if node.inputs else None
    producer = None if value is None else value.producer
    if producer is None or producer.domain != "" or producer.op_type not in op_types:
        return None
    return producer


def _axes(graph: Graph, node: Node) -> Optional[list[int]]:
    """The `axes` of a Squeeze/Unsqueeze, from its input (opset 13) or attribute."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        data = known_constant(graph, node.inputs[1])
        return None if data is None else [int(a) for a in data.reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _normalized(axes: Sequence[int], rank: Optional[int]) -> Optional[list[int]]:
    if rank is None or any(not -rank <= a < rank for a in axes):
        return None
    return sorted(a % rank for a in axes)


def _rank(value: Value) -> Optional[int]:
    return None if value.shape is None else len(value.shape)


def _set_axes(graph: Graph, node: Node, axes: list[int]) -> None:
    """Give a Squeeze/Unsqueeze new axes, in the form (input or attribute) it uses."""
    if "axes" in node.attrs:
        node.attrs["axes"] = tuple(axes)
    else:
        name = graph.unique_name(f"{node.outputs[0].name}_axes")
        node.replace_input(1, graph.add_constant(name, np.array(axes, dtype=np.int64)))


def resolve_reshape_target(source: Shape, target: SymbolicValue, allowzero: bool) -> Optional[list[int]]:
    """A constant Reshape target (read with allowzero off) equivalent to the partly known
    `target` for input dims `source`.

    Known ints stay; a symbol equal to the input dim at the same position becomes 0 (copy
    that dim: the same size, even when it is 0); one remaining unknown becomes -1 (inferred
    from the element count). None when that gives no valid target, or when `allowzero` is
    on and a known entry is a literal 0 (an empty dim, not a copy).
    """
    if allowzero and 0 in target:
        return None
    result: list[int] = []
    for index, dim in enumerate(target):
        if isinstance(dim, int):
            result.append(dim)
        elif dim is not None and source is not None and index < len(source) and source[index] == dim:
            result.append(0)
        else:
            result.append(-1)
    return result if result.count(-1) <= 1 else None


def _known_shape_vectors(graph: Graph, node: Node) -> bool:
    return node.op_type in SHAPE_OPS and fold_known_outputs(graph, node) > 0


def _reshape_target(graph: Graph, node: Node) -> bool:
    target = node.inputs[1]
    if target.symbolic is None or constant_data(target) is not None:
        return False
    allowzero = bool(node.attrs.get("allowzero", 0))
    resolved = resolve_reshape_target(node.inputs[0].shape, target.symbolic, allowzero)
    if resolved is None:
        return False
    constant = graph.add_constant(graph.unique_name(target.name), np.array(resolved, dtype=np.int64))
    node.replace_input(1, constant)
    if allowzero:
        node.attrs["allowzero"] = 0
    return True


def _reshape_chain(graph: Graph, node: Node) -> bool:
    inner = _producer(node, RESHAPES)
    target = known_constant(graph, node.inputs[1])
    if inner is None or target is None or not _sole_reader(inner.outputs[0], node):
        return False
    source, middle = inner.inputs[0], inner.outputs[0]
    if not node.attrs.get("allowzero", 0):
        for index in np.flatnonzero(target.reshape(-1) == 0):
            if not _same_dim(source.shape, middle.shape, int(index)):
                return False
    node.replace_input(0, source)
    graph.erase(inner)
    return True


def _same_dim(a: Shape, b: Shape, index: int) -> bool:
    if a is None or b is None or index >= min(len(a), len(b)):
        return False
    return a[index] is not None and a[index] == b[index]


def _transpose_chain(graph: Graph, node: Node) -> bool:
    inner = _producer(node, frozenset({"Transpose"}))
    if inner is None:
        return False
    source = inner.inputs[0]
    first, second = _perm(inner, _rank(source)), _perm(node, _rank(inner.outputs[0]))
    if first is None or second is None or len(first) != len(second):
        return False
    composed = [first[axis] for axis in second]
    if composed == list(range(len(composed))):
        if not graph.can_replace_value(node.outputs[0], source):
            return False
        graph.replace_value(node.outputs[0], source, keep_name=False)
        graph.erase(node)
    elif _sole_reader(inner.outputs[0], node):
        node.replace_input(0, source)
        node.attrs["perm"] = tuple(composed)
    else:
        return False
    _erase_if_unused(graph, inner)
    return True


def _perm(node: Node, rank: Optional[int]) -> Optional[list[int]]:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if rank is None else list(reversed(range(rank)))


def _squeeze_pair(graph: Graph, node: Node) -> bool:
    """Squeeze(Unsqueeze(x, a), a) -> x and Unsqueeze(Squeeze(x, a), a) -> x."""
    inverse = "Unsqueeze" if node.op_type == "Squeeze" else "Squeeze"
    inner = _producer(node, frozenset({inverse}))
    if inner is None:
        return False
    inner_axes, outer_axes = _axes(graph, inner), _axes(graph, node)
    if inner_axes is None or outer_axes is None:
        return False
    # both lists count positions in the larger (unsqueezed) rank
    larger_rank = _rank(inner.outputs[0] if inverse == "Unsqueeze" else inner.inputs[0])
    axes = _normalized(inner_axes, larger_rank)
    if axes is None or axes != _normalized(outer_axes, larger_rank):
        return False
    if not graph.can_replace_value(node.outputs[0], inner.inputs[0]):
        return False
    graph.replace_value(node.outputs[0], inner.inputs[0], keep_name=False)
    graph.erase(node)
    _erase_if_unused(graph, inner)
    return True


def _unsqueeze_chain(graph: Graph, node: Node) -> bool:
    """Unsqueeze(Unsqueeze(x, a), b) -> Unsqueeze(x, a and b in the final positions)."""
    inner = _producer(node, frozenset({"Unsqueeze"}))
    if inner is None or not _sole_reader(inner.outputs[0], node):
        return False
    if ("axes" in inner.attrs) != ("axes" in node.attrs):  # both axes inputs, or both attributes
        return False
    inner_axes, outer_axes = _axes(graph, inner), _axes(graph, node)
    rank = _rank(node.outputs[0])
    if inner_axes is None or outer_axes is None or rank is None:
        return False
    outer = _normalized(outer_axes, rank)
    inner_rank = rank - len(outer_axes)
    inner_norm = _normalized(inner_axes, inner_rank)
    if outer is None or inner_norm is None:
        return False
    kept = [axis for axis in range(rank) if axis not in outer]
    combined = sorted(outer + [kept[axis] for axis in inner_norm])
    node.replace_input(0, inner.inputs[0])
    _set_axes(graph, node, combined)
    graph.erase(inner)
    return True


Rule = Callable[[Graph, Node], bool]

RULES: dict[str, tuple[Rule, ...]] = {
    "Reshape": (_reshape_target, _reshape_chain),
    "Transpose": (_transpose_chain,),
    "Squeeze": (_squeeze_pair,),
    "Unsqueeze": (_squeeze_pair, _unsqueeze_chain),
}


MAX_SWEEPS = 16
"""Bound on sweeps in one run (each sweep that changes something removes or merges nodes)."""


@register_pass
@dataclasses.dataclass
class SimplifyShapes(Pass):
    """Do shape arithmetic at compile time and shorten chains of layout ops.

    Rules, for default-domain nodes:
    1. For any y = Shape(x), Size(x), or Gather/Slice/Concat/Squeeze/Unsqueeze/Reshape/Cast
       of shape vectors, whose contents are fully known (Value.symbolic all ints: the dims
       read are static), readers of y read a constant.
    2. For any y = Reshape(x, s) whose target s is computed and known up to symbols, s
       becomes a constant: known ints stay, a symbol equal to x's dim at the same position
       becomes 0 (copy it), and at most one other dim becomes -1; allowzero is turned off
       (only done when no known entry is a literal 0).
       (With zero-sized dims the -1 cannot be inferred; shapes here are taken as nonempty.)
    3. For any y = Reshape(Reshape/Flatten/Squeeze/Unsqueeze(x), s) with s constant and the
       inner result read only there, y = Reshape(x, s) (a 0 in s must copy a dim that is
       provably the same in x).
    4. For any y = Transpose(Transpose(x, p), q): y = x when the composed permutation is the
       identity, else y = Transpose(x, p∘q) when the inner result is read only there.
    5. For any y = Squeeze(Unsqueeze(x, a), a) or y = Unsqueeze(Squeeze(x, a), a) with the
       same axes (as positions in the larger rank): y = x.
    6. For any y = Unsqueeze(Unsqueeze(x, a), b) with the inner result read only there:
       y = Unsqueeze(x, c), c the positions of both insertions in y.

    Needs: types and symbolic contents on values. Changes: removes or rewires the matched
    nodes and adds small int64 constants; graph output names are kept.
    """

    name = "simplify-shapes"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = {"known_shape_vectors": 0, "rewritten": 0}
        for _ in range(MAX_SWEEPS):
            before = dict(stats)
            self._sweep(graph, stats)
            if stats == before:
                break
        else:
            ctx.logger.warning("graphopt: simplify-shapes still rewriting after %d sweeps; stopping", MAX_SWEEPS)
        return PassResult(any(stats.values()), stats)

    def _sweep(self, graph: Graph, stats: dict[str, int]) -> None:
        """One pass over the graph in order; a later rewrite can enable an earlier one
        (e.g. a Squeeze/Unsqueeze pair cancelling leaves an Unsqueeze chain to merge), so
        `run` sweeps until nothing changes."""
        for node in graph:
            if node.graph is not graph or node.domain != "":
                continue
            if _known_shape_vectors(graph, node):
                stats["known_shape_vectors"] += 1
                continue
            if any(rule(graph, node) for rule in RULES.get(node.op_type, ())):
                stats["rewritten"] += 1
