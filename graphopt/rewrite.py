"""Pattern rewriting: fusions and simplifications as (pattern, replacement) rules.

A rule is two small Python functions in the graph's own op language, joined by a name:

    def erf_gelu(op, x):
        return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Div(x, math.sqrt(2))), 1.0))

    def gelu(op, x):
        return op.Gelu(x, _domain="graphopt")

    RULES = RewriteRuleSet([RewriteRule("erf-gelu", erf_gelu, gelu)])
    counts = RULES.apply(graph)          # {"erf-gelu": 2}

Pattern language (`op.<OpType>(*inputs, **attrs)` builds a pattern node):
- the pattern function's parameters are `Var`s: each binds one graph value, the same value
  wherever the name appears; `Var(name, check=fn)` adds a predicate on the value;
- a Python number is a constant pattern: it matches a graph constant or a Constant node of
  any shape whose elements all equal the number (within a relative tolerance that depends on
  the element type); `Const("eps")` binds such a scalar under a name, `Const(value=..,
  rel_tol=..)` sets the tolerance;
- an attribute keyword matches an equal value (floats within 1e-6 relative), a predicate
  `fn(value) -> bool` (the value is None when the node does not set it), or a `Var` that
  binds the attribute value; attributes the pattern does not name are ignored unless
  `_allow_other_attributes=False`;
- `_domain="..."` selects the op domain; `_outputs=n` returns n pattern values for a
  multi-output node, and `_allow_other_outputs=True` lets the node have more outputs;
- inputs of the default-domain commutative ops (`COMMUTATIVE_OPS`) match in any order, so
  one pattern covers `x * 0.5` and `0.5 * x`.

The replacement function receives `op`, a builder over the real graph, and the bindings
its parameters name (`Var`s as Values, `Const`s as Python numbers, attribute `Var`s as
attribute values). It returns the Value that replaces the pattern's output; Python numbers
given as inputs become scalar constants of the element type of the node's other inputs.

Legality, checked centrally for every candidate match (first legal candidate wins):
1. every matched value other than the pattern's output (its interior) is read only by
   matched nodes and is not a graph output;
2. the rule's own `check(graph, match)`, if any, returns True (False, or a string giving
   the reason, refuses);
3. the replacement reads only values defined before the matched output's producer, so it
   cannot create a cycle (a value that depends on the match is reported as a cycle);
4. the replacement's type agrees with the matched output's where both are known, and a
   graph output keeps its name.
A refused candidate leaves the graph as it was; reasons are kept in
`RewriteRuleSet.refusals`.
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph, Node, Value, uniform_constant
from graphopt.ir.tensor import ConstTensor
from graphopt.ir.types import merge_types

COMMUTATIVE_OPS = frozenset({"Add", "Mul", "And", "Or", "Equal", "Max", "Min", "Sum"})
"""Default-domain ops whose inputs may be matched in any order."""

ATTRIBUTE_REL_TOL = 1e-6


class RewriteError(GraphoptError):
    """A rule set is malformed, or its rules keep rewriting each other's results."""


class Var:
    """A pattern variable: binds a graph value (as an input) or an attribute value."""

    def __init__(self, name: str, check: Optional[Callable[[Any], bool]] = None) -> None:
        self.name = name
        self.check = check

    def __repr__(self) -> str:
        return f"Var({self.name!r})"


class Const:
    """A constant-scalar pattern: a constant whose elements all equal one number.

    `value` fixes the number (None: any); `name` binds the number found; `rel_tol`
    overrides the default tolerance (1e-6, or 1e-2 for 8- and 16-bit floats).
    """

    def __init__(
        self,
        name: Optional[str] = None,
        value: Optional[float] = None,
        *,
        check: Optional[Callable[[float], bool]] = None,
        rel_tol: Optional[float] = None,
    ) -> None:
        self.name = name
        self.value = value
        self.check = check
        self.rel_tol = rel_tol

    def __repr__(self) -> str:
        return f"Const({self.name!r}, {self.value!r})"


@dataclass(eq=False)
class PatternNode:
    """One op of a pattern; built by the `op` builder, not by hand."""

    op_type: str
    domain: str
    inputs: tuple["PatternInput", ...]
    attrs: dict[str, Any]
    num_outputs: int = 1
    allow_other_outputs: bool = False
    allow_other_attributes: bool = True


@dataclass(frozen=True, eq=False)
class NodeOutput:
    """Output `index` of a pattern node."""

    node: PatternNode
    index: int = 0


PatternInput = Union[Var, Const, NodeOutput, None]


class Refusal(NamedTuple):
    """A match a rule found but did not rewrite, and why."""

    rule: str
    node: str
    reason: str


@dataclass
class Match:
    """A legal-so-far occurrence of a pattern: what `check` functions receive."""

    rule: str
    output: Value
    nodes: tuple[Node, ...]
    bindings: dict[str, Any]
    constants: tuple[Value, ...] = ()

    @property
    def root(self) -> Node:
        """The node producing the matched output."""
        return self.output.producer  # type: ignore[return-value]

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]


# ---------------------------------------------------------------------------- pattern building
class _PatternBuilder:
    """The `op` a pattern function receives: `op.Mul(a, b)` builds a pattern node."""

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if not op_type[:1].isupper():
            raise AttributeError(op_type)

        def build(
            *inputs: Any,
            _domain: str = "",
            _outputs: int = 1,
            _allow_other_outputs: bool = False,
            _allow_other_attributes: bool = True,
            **attrs: Any,
        ) -> Any:
            node = PatternNode(
                op_type, _normal_domain(_domain), tuple(_pattern_input(i) for i in inputs), attrs,
                _outputs, _allow_other_outputs, _allow_other_attributes,
            )
            outs = tuple(NodeOutput(node, i) for i in range(_outputs))
            return outs[0] if _outputs == 1 else outs

        return build


def _pattern_input(item: Any) -> PatternInput:
    if item is None or isinstance(item, (Var, Const, NodeOutput)):
        return item
    if isinstance(item, (int, float, np.number)):
        return Const(value=float(item))
    raise TypeError(f"pattern inputs are pattern values, Vars, Consts or numbers, got {item!r}")


def _normal_domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _parameters(fn: Callable[..., Any]) -> tuple[list[str], bool]:
    """The names a rule function takes after `op`, and whether it takes **kwargs."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    names = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _pattern_names(output: NodeOutput) -> set[str]:
    """Every binding name a pattern can produce."""
    names: set[str] = set()
    seen: set[int] = set()
    stack = [output.node]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for item in list(node.inputs) + list(node.attrs.values()):
            if isinstance(item, (Var, Const)) and item.name:
                names.add(item.name)
            elif isinstance(item, NodeOutput):
                stack.append(item.node)
    return names


# ---------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class _State:
    """Bindings so far; extended by copying, so backtracking needs no undo."""

    bindings: dict[str, Any] = field(default_factory=dict)
    nodes: dict[int, Node] = field(default_factory=dict)
    constants: tuple[Value, ...] = ()

    def bind(self, name: Optional[str], value: Any, same: Callable[[Any, Any], bool]) -> Optional["_State"]:
        if name is None:
            return self
        if name in self.bindings:
            return self if same(self.bindings[name], value) else None
        return _State({**self.bindings, name: value}, self.nodes, self.constants)


def _match_value(graph: Graph, pattern: PatternInput, value: Optional[Value], state: _State) -> Iterator[_State]:
    """Every way `value` matches `pattern` consistently with `state`."""
    if pattern is None or value is None:
        if pattern is None and value is None:
            yield state
        return
    if isinstance(pattern, Var):
        if pattern.check is None or pattern.check(value):
            found = state.bind(pattern.name, value, lambda a, b: a is b)
            if found is not None:
                yield found
        return
    if isinstance(pattern, Const):
        number = _scalar_constant(value, pattern)
        if number is not None:
            found = state.bind(pattern.name, number, lambda a, b: a == b)
            if found is not None:
                yield _State(found.bindings, found.nodes, found.constants + (value,))
        return
    yield from _match_node_output(graph, pattern, value, state)


def _match_node_output(graph: Graph, pattern: NodeOutput, value: Value, state: _State) -> Iterator[_State]:
    node = value.producer
    if node is None or node.graph is not graph or value.output_index != pattern.index:
        return
    known = state.nodes.get(id(pattern.node))
    if known is not None:
        if known is node:
            yield state
        return
    if not _node_matches(pattern.node, node):
        return
    bindings = _match_attributes(pattern.node, node, state.bindings)
    if bindings is None:
        return
    state = _State(bindings, {**state.nodes, id(pattern.node): node}, state.constants)
    inputs = _trimmed(node.inputs)
    for order in _input_orders(pattern.node):
        yield from _match_all(graph, [(pattern.node.inputs[i], v) for i, v in zip(order, inputs)], state)


def _match_all(graph: Graph, pairs: list[tuple[PatternInput, Optional[Value]]], state: _State) -> Iterator[_State]:
    if not pairs:
        yield state
        return
    (pattern, value), rest = pairs[0], pairs[1:]
    for found in _match_value(graph, pattern, value, state):
        yield from _match_all(graph, rest, found)


def _node_matches(pattern: PatternNode, node: Node) -> bool:
    if node.op_type != pattern.op_type or node.domain != pattern.domain:
        return False
    if len(_trimmed(node.inputs)) != len(_trimmed(pattern.inputs)):
        return False
    outputs = len(node.outputs)
    return outputs == pattern.num_outputs or (pattern.allow_other_outputs and outputs > pattern.num_outputs)


def _trimmed(items: Sequence[Any]) -> tuple[Any, ...]:
    """`items` without trailing Nones (omitted optional inputs)."""
    end = len(items)
    while end and items[end - 1] is None:
        end -= 1
    return tuple(items[:end])


def _input_orders(pattern: PatternNode) -> Iterator[tuple[int, ...]]:
    count = len(_trimmed(pattern.inputs))
    if pattern.domain == "" and pattern.op_type in COMMUTATIVE_OPS:
        yield from itertools.permutations(range(count))
    else:
        yield tuple(range(count))


def _match_attributes(pattern: PatternNode, node: Node, bindings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """`bindings` extended by the pattern's attribute Vars, or None when an attribute differs."""
    if not pattern.allow_other_attributes and set(node.attrs) - set(pattern.attrs):
        return None
    found = dict(bindings)
    for key, expected in pattern.attrs.items():
        actual = node.attrs.get(key)
        if isinstance(expected, Var):
            if expected.check is not None and not expected.check(actual):
                return None
            if expected.name in found and not _attr_equal(found[expected.name], actual):
                return None
            found[expected.name] = actual
        elif callable(expected):
            if not expected(actual):
                return None
        elif not _attr_equal(actual, expected):
            return None
    return found


def _attr_equal(actual: Any, expected: Any) -> bool:
    actual, expected = _plain(actual), _plain(expected)
    if isinstance(actual, (list, tuple)) or isinstance(expected, (list, tuple)):
        if not (isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple))):
            return False
        return len(actual) == len(expected) and all(_attr_equal(a, e) for a, e in zip(actual, expected))
    if isinstance(actual, float) or isinstance(expected, float):
        return isinstance(actual, (int, float)) and math.isclose(actual, expected, rel_tol=ATTRIBUTE_REL_TOL)
    return actual == expected


def _plain(value: Any) -> Any:
    """An attribute value as plain Python: tensors and arrays as lists, bytes as str."""
    if isinstance(value, ConstTensor):
        value = value.numpy()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value.decode() if isinstance(value, bytes) else value


def _scalar_constant(value: Value, pattern: Const) -> Optional[float]:
    """The number every element of constant `value` holds, if it fits `pattern`."""
    first = uniform_constant(value)
    if first is None:
        return None
    kind = first.dtype.kind
    number = first.item() if kind in "iub" else float(first)
    if pattern.value is not None:
        tolerance = pattern.rel_tol if pattern.rel_tol is not None else (1e-6 if first.dtype.itemsize >= 4 else 1e-2)
        if kind in "iub" and number != pattern.value:
            return None
        if not math.isclose(number, pattern.value, rel_tol=tolerance):
            return None
    if pattern.check is not None and not pattern.check(number):
        return None
    return number


# ---------------------------------------------------------------------------- building replacements
class _GraphBuilder:
    """The `op` a replacement function receives: builds nodes right before `anchor`."""

    def __init__(self, graph: Graph, anchor: Node) -> None:
        self._graph = graph
        self._anchor = anchor
        self.nodes: list[Node] = []
        self.constants: list[Value] = []

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if not op_type[:1].isupper():
            raise AttributeError(op_type)

        def build(*inputs: Any, _domain: str = "", _outputs: int = 1, **attrs: Any) -> Any:
            dtype = next((v.dtype for v in inputs if isinstance(v, Value) and v.dtype is not None), None)
            values = [self._as_value(item, dtype) for item in inputs]
            node = self._graph.add_node(
                op_type, values, attrs, domain=_domain, num_outputs=_outputs, before=self._anchor, infer=False,
            )
            self.nodes.append(node)
            self._graph.infer_types(node)
            return node.output if _outputs == 1 else node.outputs

        return build

    def _as_value(self, item: Any, dtype: Any) -> Optional[Value]:
        if item is None or isinstance(item, Value):
            return item
        if not isinstance(item, (int, float, np.number, np.ndarray)):
            raise TypeError(f"replacement inputs are Values, None or numbers, got {item!r}")
        array = np.asarray(item)
        if dtype is not None:
            array = array.astype(dtype.to_numpy())
        elif array.dtype == np.float64:
            array = array.astype(np.float32)
        constant = self._graph.add_constant("c", array)
        self.constants.append(constant)
        return constant

    def rollback(self) -> None:
        """Remove everything built so far."""
        for node in reversed(self.nodes):
            self._graph.erase(node)
        for constant in reversed(self.constants):
            self._graph.remove_constant(constant)


# ---------------------------------------------------------------------------- rules
class RewriteRule:
    """A named (pattern, replacement) pair with an optional rule-specific legality check."""

    def __init__(
        self,
        name: str,
        pattern: Callable[..., Any],
        replacement: Callable[..., Any],
        check: Optional[Callable[[Graph, Match], Union[bool, str]]] = None,
    ) -> None:
        self.name = name
        self.check = check
        self._replacement = replacement
        params, _ = _parameters(pattern)
        output = pattern(_PatternBuilder(), *(Var(p) for p in params))
        if not isinstance(output, NodeOutput):
            raise RewriteError(f"rule '{name}': the pattern must return one op output, got {output!r}")
        self.output = output
        wanted, self._takes_all = _parameters(replacement)
        unknown = set(wanted) - _pattern_names(output)
        if unknown:
            raise RewriteError(f"rule '{name}': the replacement asks for {sorted(unknown)}, which the pattern does not bind")
        self._wanted = wanted

    @property
    def root_op(self) -> tuple[str, str]:
        """(domain, op type) of the pattern's output node."""
        return self.output.node.domain, self.output.node.op_type

    def matches(self, graph: Graph, node: Node) -> Iterator[Match]:
        """Every candidate match whose output is produced by `node`, in a fixed order."""
        if len(node.outputs) <= self.output.index:
            return
        value = node.outputs[self.output.index]
        for state in _match_node_output(graph, self.output, value, _State()):
            nodes = tuple(sorted(set(state.nodes.values()), key=_position_key(graph)))
            yield Match(self.name, value, nodes, state.bindings, state.constants)

    def try_apply(self, graph: Graph, node: Node) -> tuple[bool, Optional[str]]:
        """Rewrite the first legal match rooted at `node`: (applied, first refusal reason)."""
        first_reason = None
        for match in self.matches(graph, node):
            reason = _interior_problem(match) or self._check_problem(graph, match) or self._rewrite(graph, match)
            if reason is None:
                return True, None
            first_reason = first_reason or reason
        return False, first_reason

    def _check_problem(self, graph: Graph, match: Match) -> Optional[str]:
        if self.check is None:
            return None
        verdict = self.check(graph, match)
        if verdict is True:
            return None
        if verdict is False:
            return "refused by the rule's check"
        if isinstance(verdict, str):
            return verdict
        raise TypeError(f"rule '{self.name}': check must return True, False or a reason string, got {verdict!r}")

    def _rewrite(self, graph: Graph, match: Match) -> Optional[str]:
        """Build the replacement and commit it; None when done, else why it was undone."""
        builder = _GraphBuilder(graph, match.root)
        kwargs = match.bindings if self._takes_all else {k: match.bindings.get(k) for k in self._wanted}
        try:
            result = self._replacement(builder, **kwargs)
            if not isinstance(result, Value):
                raise TypeError(f"rule '{self.name}': the replacement must return a Value, got {result!r}")
        except BaseException:
            builder.rollback()
            raise
        fresh = any(result.producer is n for n in builder.nodes)
        problem = (
            _placement_problem(graph, match, builder.nodes, result)
            or _type_problem(match.output, result)
            or _output_name_problem(match.output, result, fresh)
        )
        if problem:
            builder.rollback()
            return problem
        _commit(graph, match, result, fresh)
        return None


def _position_key(graph: Graph) -> Callable[[Node], int]:
    positions = {id(n): i for i, n in enumerate(graph.nodes)}
    return lambda node: positions[id(node)]


def _interior_problem(match: Match) -> Optional[str]:
    inside = {id(n) for n in match.nodes}
    for node in match.nodes:
        for out in node.outputs:
            if out is match.output:
                continue
            if out.is_graph_output:
                return f"interior value %{out.name} is a graph output"
            for use in out.uses():
                if id(use.node) not in inside:
                    return f"interior value %{out.name} is also read by {use.node.label}"
    return None


def _placement_problem(graph: Graph, match: Match, built: list[Node], result: Value) -> Optional[str]:
    """Why the replacement cannot sit before the match's output producer, if it cannot."""
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    limit = position[id(match.root)]
    new = {id(n) for n in built}
    reads = [v for n in built for v in n.inputs if v is not None] + [result]
    for value in reads:
        producer = value.producer
        if producer is None or id(producer) in new or position.get(id(producer), limit) < limit:
            continue
        if producer.name in _downstream(graph, match.nodes):
            return f"the replacement would create a cycle: it reads %{value.name}, which depends on the match"
        return f"the replacement reads %{value.name}, which is computed after the match"
    return None


def _downstream(graph: Graph, nodes: Sequence[Node]) -> set[str]:
    """Names of `nodes` and of every node that depends on them (networkx reachability)."""
    import networkx as nx

    view = graph.to_networkx()
    reached = {n.name for n in nodes}
    for node in nodes:
        reached |= nx.descendants(view, node.name)
    return reached


def _type_problem(old: Value, new: Value) -> Optional[str]:
    a, b = old.type, new.type
    differs = a.dtype is not None and b.dtype is not None and a.dtype != b.dtype
    if a.shape is not None and b.shape is not None:
        differs = differs or len(a.shape) != len(b.shape) or any(
            isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a.shape, b.shape)
        )
    return f"the replacement has type {b}, the matched output %{old.name} has {a}" if differs else None


def _output_name_problem(old: Value, new: Value, fresh: bool) -> Optional[str]:
    if fresh or not old.is_graph_output or (new.producer is not None and not new.is_graph_output):
        return None
    return f"graph output %{old.name} would be renamed: the replacement %{new.name} is a graph input, constant or output"


def _commit(graph: Graph, match: Match, result: Value, fresh: bool) -> None:
    """Rewire the matched output's readers to `result`, erase what died, keep the name."""
    old = match.output
    name, keep_name = old.name, fresh or old.is_graph_output
    if fresh:
        result.type = merge_types(result.type, old.type)
        result.symbolic = result.symbolic or old.symbolic
    old.replace_all_uses_with(result)
    for node in reversed(match.nodes):
        if not any(out.uses() or out.is_graph_output for out in node.outputs):
            graph.erase(node)
    overridable = set(graph.metadata.get("initializer_inputs", ()))
    for constant in dict.fromkeys(match.constants):
        if constant.uses() or constant.is_graph_output or constant.graph is not graph:
            continue
        if constant.is_constant and constant.name not in overridable:
            graph.remove_constant(constant)
        elif constant.producer is not None and len(constant.producer.outputs) == 1:
            graph.erase(constant.producer)
    if keep_name:
        graph.rename_value(result, name)


class RewriteRuleSet:
    """Rules applied greedily, in graph order, until none matches (at most `max_rounds` sweeps).

    Each sweep visits the nodes in graph order and, at each node, tries the rules in the
    order given; the first legal match is rewritten and the sweep moves on. After `apply`,
    `refusals` lists the matches that were found but refused, with their reasons.
    """

    def __init__(self, rules: Sequence[RewriteRule], max_rounds: int = 100) -> None:
        names = [rule.name for rule in rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RewriteError(f"rule names must be unique; repeated: {', '.join(duplicates)}")
        self.rules = list(rules)
        self.max_rounds = max_rounds
        self.refusals: list[Refusal] = []
        self._by_root: dict[tuple[str, str], list[RewriteRule]] = {}
        for rule in self.rules:
            self._by_root.setdefault(rule.root_op, []).append(rule)

    def apply(self, graph: Graph) -> dict[str, int]:
        """Rewrite `graph` in place to a fixed point; how often each rule fired."""
        counts = {rule.name: 0 for rule in self.rules}
        refusals: dict[Refusal, None] = {}
        for _ in range(self.max_rounds):
            changed = False
            for node in graph:
                for rule in self._by_root.get((node.domain, node.op_type), ()):
                    if node.graph is not graph:
                        break
                    applied, reason = rule.try_apply(graph, node)
                    if applied:
                        counts[rule.name] += 1
                        changed = True
                        break
                    if reason is not None:
                        refusals[Refusal(rule.name, node.name, reason)] = None
            if not changed:
                self.refusals = list(refusals)
                return counts
        firing = ", ".join(name for name, count in counts.items() if count)
        raise RewriteError(f"rules did not reach a fixed point in {self.max_rounds} sweeps (still firing: {firing})")
