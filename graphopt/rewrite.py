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
given as inputs become scalar constants of the element type of the node's other inputs, and
`op.constant(array)` adds a constant of the array's own type.

Multi-output rules: a pattern may return a tuple of pattern values (every one after the
first computed inside the first one's pattern, e.g. `return op.LayerNormalization(total,
...), total`); the replacement then returns a tuple of as many Values, each replacing the
matched output at the same position (the readers of a replaced output may lie anywhere).

Hand-written patterns: a `RewritePattern` subclass implements `match_and_rewrite(graph,
node, rewriter)` for walks a pattern cannot express (attention); it builds the replacement
through `rewriter.edit(matched_nodes, outputs, constants)` and commits it with
`edit.commit(values)`, through the same legality check and commit as the rules. Rules and
hand-written patterns run together in one `RewriteRuleSet`.

Legality, checked centrally for every candidate match (first legal candidate wins):
1. every matched value other than the replaced outputs (its interior) is read only by
   matched nodes and is not a graph output;
2. the rule's own `check(graph, match)`, if any, returns True (False, or a string giving
   the reason, refuses);
3. the replacement reads only values defined before the earliest replaced output's
   producer (where its nodes go), so it cannot create a cycle (a value that depends on the
   match is reported as a cycle); order keys make this O(1) per value read;
4. each replacement's type agrees with its matched output's where both are known, and a
   graph output keeps its name.
A refused candidate leaves the graph as it was; reasons are kept in
`RewriteRuleSet.refusals`. A committed one erases the matched nodes nothing reads any more
and the matched constants nothing reads (overridable initializers stay), and a new value
takes the name of the value it replaces.

Driver: `RewriteRuleSet.apply` visits every node once in graph order, then only the nodes
around each rewrite (a worklist), until nothing changes or `max_rounds` rounds ran.
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
    outputs: tuple[Value, ...]
    """The matched values the replacement replaces, in the pattern's output order."""
    nodes: tuple[Node, ...]
    """The matched nodes, in graph order."""
    bindings: dict[str, Any]
    constants: tuple[Value, ...] = ()

    @property
    def output(self) -> Value:
        """The first matched output (the only one of a single-output pattern)."""
        return self.outputs[0]

    @property
    def root(self) -> Node:
        """The node producing the first matched output."""
        return self.outputs[0].producer  # type: ignore[return-value]

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

    def constant(self, data: np.ndarray, name: str = "c") -> Value:
        """A new constant holding `data` exactly (its own element type), removed again if the rewrite is refused."""
        constant = self._graph.add_constant(self._graph.unique_name(name), np.asarray(data))
        self.constants.append(constant)
        return constant

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
        return self.constant(array)

    def rollback(self) -> None:
        """Remove everything built so far."""
        for node in reversed(self.nodes):
            self._graph.erase(node)
        for constant in reversed(self.constants):
            self._graph.remove_constant(constant)
        self.nodes.clear()
        self.constants.clear()


# ---------------------------------------------------------------------------- committing
@dataclass
class Change:
    """What one committed rewrite touched: the driver revisits the nodes around it."""

    new_nodes: list[Node]
    replacements: list[Value]
    """The values the matched outputs' readers read now."""
    neighbours: list[Value]
    """Computed values the new and erased nodes read (their readers changed)."""


class Edit:
    """One replacement in the making: build new nodes with `op`, then `commit` them.

    `nodes` are the matched nodes, `outputs` the matched values that get replaced (their
    readers outside the match move to the replacements), `constants` the matched constants
    that are removed once nothing reads them. New nodes go right before the earliest
    producer of an output, or right before `before` (a matched node: for a replacement that
    reads values computed between the matched nodes; every reader of a replaced output must
    then run after it).
    """

    def __init__(
        self, rewriter: "Rewriter", nodes: Sequence[Node], outputs: Sequence[Value], constants: Sequence[Value] = (),
        before: Optional[Node] = None,
    ) -> None:
        if not outputs:
            raise RewriteError("a rewrite must replace at least one matched output")
        members = {id(n) for n in nodes}
        for out in outputs:
            if out.producer is None or id(out.producer) not in members:
                raise RewriteError(f"replaced value %{out.name} is not computed by a matched node")
        graph = rewriter.graph
        self.graph = graph
        self._rewriter = rewriter
        self.nodes = tuple(sorted(dict.fromkeys(nodes), key=graph.order_key))
        self.outputs = tuple(outputs)
        self.constants = tuple(constants)
        if before is not None and id(before) not in members:
            raise RewriteError(f"a rewrite is placed before a matched node, not {before.label}")
        self.anchor = before or min((out.producer for out in outputs), key=graph.order_key)  # type: ignore[arg-type]
        self.op = _GraphBuilder(graph, self.anchor)

    def interior_problem(self) -> Optional[str]:
        """Why a matched value other than the outputs escapes the match, if one does."""
        inside = {id(n) for n in self.nodes}
        replaced = {id(v) for v in self.outputs}
        for node in self.nodes:
            for out in node.outputs:
                if id(out) in replaced:
                    continue
                if out.is_graph_output:
                    return f"interior value %{out.name} is a graph output"
                for use in out._uses:
                    if id(use.node) not in inside:
                        return f"interior value %{out.name} is also read by {use.node.label}"
        return None

    def commit(self, replacements: Sequence[Value]) -> Optional[str]:
        """Replace each output by the value at the same position; None when done, else
        why not (everything built is then removed and the graph is as it was)."""
        replacements = tuple(replacements)
        if len(replacements) != len(self.outputs) or not all(isinstance(v, Value) for v in replacements):
            self.op.rollback()
            raise RewriteError(
                f"a rewrite of {len(self.outputs)} output(s) must give as many Values, got {replacements!r}"
            )
        if len({id(v) for v in replacements}) != len(replacements):
            self.op.rollback()
            raise RewriteError("a rewrite must give a different Value for each replaced output")
        built = {id(n) for n in self.op.nodes}
        fresh = [v.producer is not None and id(v.producer) in built for v in replacements]
        problem = self.interior_problem() or self._placement_problem(replacements)
        for old, new in zip(self.outputs, replacements):
            problem = problem or _type_problem(old, new) or _output_name_problem(self.graph, old, new)
        if problem:
            self.op.rollback()
            return problem
        self._apply(replacements, fresh)
        return None

    def _placement_problem(self, replacements: Sequence[Value]) -> Optional[str]:
        """Why the replacement cannot run before the anchor, if it cannot (O(1) per value
        read; a walk over the nodes between the match and a late value only when refusing)."""
        graph, limit = self.graph, self.graph.order_key(self.anchor)
        built = {id(n) for n in self.op.nodes}
        inside = {id(n) for n in self.nodes}
        for out in self.outputs:
            for reader in out.users():
                if id(reader) not in inside and graph.order_key(reader) < limit:
                    return f"%{out.name} is read by {reader.label} before the replacement"
        reads = [v for n in self.op.nodes for v in n.inputs if v is not None] + list(replacements)
        for value in reads:
            producer = value.producer
            if producer is None or id(producer) in built or producer.graph is not graph or graph.order_key(producer) < limit:
                continue
            if self._depends_on_match(producer):
                return f"the replacement would create a cycle: it reads %{value.name}, which depends on the match"
            return f"the replacement reads %{value.name}, which is computed after the match"
        return None

    def _depends_on_match(self, node: Node) -> bool:
        """Whether `node` is a matched node or reads one, directly or not: a walk up its
        inputs that stops at nodes running before the earliest matched node."""
        graph = self.graph
        inside = {id(n) for n in self.nodes}
        floor = graph.order_key(self.nodes[0])
        seen: set[int] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if id(current) in inside:
                return True
            if id(current) in seen:
                continue
            seen.add(id(current))
            for value in current.reads:
                producer = value.producer
                if producer is not None and producer.graph is graph and graph.order_key(producer) >= floor:
                    stack.append(producer)
        return False

    def _apply(self, replacements: Sequence[Value], fresh: Sequence[bool]) -> None:
        """Rewire the outputs' readers, erase what died, keep names (a new value takes the
        name of the value it replaces; a graph output always keeps its name)."""
        graph = self.graph
        for old, new, is_fresh in zip(self.outputs, replacements, fresh):
            if is_fresh:
                new.symbolic = new.symbolic or old.symbolic
            graph.replace_value(old, new, keep_name=is_fresh)
        touched: dict[int, Value] = {}
        for node in reversed(self.nodes):
            if node.graph is graph and not any(out._uses or out.is_graph_output for out in node.outputs):
                touched.update((id(v), v) for v in node.reads if v.producer is not None)
                graph.erase(node)
        for constant in dict.fromkeys(self.constants):
            if constant._uses or constant.is_graph_output or constant.graph is not graph:
                continue
            if constant.is_constant and not graph.is_overridable(constant):
                graph.remove_constant(constant)
            elif constant.producer is not None and len(constant.producer.outputs) == 1:
                graph.erase(constant.producer)
        for node in self.op.nodes:
            touched.update((id(v), v) for v in node.reads if v.producer is not None)
        self._rewriter.change = Change(list(self.op.nodes), list(replacements), list(touched.values()))


def _type_problem(old: Value, new: Value) -> Optional[str]:
    a, b = old.type, new.type
    differs = a.dtype is not None and b.dtype is not None and a.dtype != b.dtype
    if a.shape is not None and b.shape is not None:
        differs = differs or len(a.shape) != len(b.shape) or any(
            isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a.shape, b.shape)
        )
    return f"the replacement has type {b}, the matched output %{old.name} has {a}" if differs else None


def _output_name_problem(graph: Graph, old: Value, new: Value) -> Optional[str]:
    if graph.can_replace_value(old, new):
        return None
    return f"graph output %{old.name} would be renamed: the replacement %{new.name} is a graph input, constant or output"


class Rewriter:
    """What `RewritePattern.match_and_rewrite` receives: starts edits that commit through
    the engine's legality check, and remembers what the last commit changed."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.change: Optional[Change] = None

    def edit(
        self, nodes: Sequence[Node], outputs: Sequence[Value], constants: Sequence[Value] = (), before: Optional[Node] = None,
    ) -> Edit:
        """Start replacing `outputs` of the matched `nodes` (see `Edit`)."""
        return Edit(self, nodes, outputs, constants, before)


# ---------------------------------------------------------------------------- rules
class RewritePattern:
    """A rewrite written by hand, for walks a declarative pattern cannot express.

    Subclasses set `name`, `root_ops` (the (domain, op type) pairs of the nodes the driver
    offers as anchors) and `depth` (how far upstream of its anchor the pattern looks: the
    driver revisits anchors up to that many nodes downstream of a change), and implement
    `match_and_rewrite`. A match is committed through `rewriter.edit(...)`:

        edit = rewriter.edit(matched_nodes, [matched_output])
        new = edit.op.Attention(q, k, v, _domain="graphopt", num_heads=8)
        return edit.commit([new]) or True     # a refusal reason (str) or True

    The commit checks what declarative rules get checked, rolls back on refusal, and erases
    the dead matched nodes.
    """

    name: str = ""
    root_ops: tuple[tuple[str, str], ...] = ()
    depth: int = 1

    def match_and_rewrite(self, graph: Graph, node: Node, rewriter: Rewriter) -> Union[bool, str]:
        """Rewrite at `node`: True when done, else False or why not (kept in the refusals)."""
        raise NotImplementedError


class RewriteRule(RewritePattern):
    """A named (pattern, replacement) pair with an optional rule-specific legality check.

    The pattern returns one pattern value or a tuple of them (a multi-output pattern: every
    output after the first must lie inside the first one's pattern); the replacement
    returns as many Values, each replacing the matched output at the same position.
    """

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
        result = pattern(_PatternBuilder(), *(Var(p) for p in params))
        outputs = result if isinstance(result, tuple) else (result,)
        if not outputs or not all(isinstance(o, NodeOutput) for o in outputs):
            raise RewriteError(f"rule '{name}': the pattern must return op outputs, got {result!r}")
        self.outputs: tuple[NodeOutput, ...] = outputs
        self._multi = isinstance(result, tuple)
        reached = _pattern_nodes(outputs[0])
        for extra in outputs[1:]:
            if id(extra.node) not in reached:
                raise RewriteError(f"rule '{name}': every pattern output after the first must be computed inside the first one's pattern")
        wanted, self._takes_all = _parameters(replacement)
        unknown = set(wanted) - _pattern_names(outputs[0])
        if unknown:
            raise RewriteError(f"rule '{name}': the replacement asks for {sorted(unknown)}, which the pattern does not bind")
        self._wanted = wanted
        self.root_ops = ((outputs[0].node.domain, outputs[0].node.op_type),)
        self.depth = _pattern_depth(outputs[0].node)

    def matches(self, graph: Graph, node: Node) -> Iterator[Match]:
        """Every candidate match whose first output is produced by `node`, in a fixed order."""
        first = self.outputs[0]
        if len(node.outputs) <= first.index:
            return
        for state in _match_node_output(graph, first, node.outputs[first.index], _State()):
            outputs = tuple(state.nodes[id(o.node)].outputs[o.index] for o in self.outputs)
            nodes = tuple(sorted(set(state.nodes.values()), key=graph.order_key))
            yield Match(self.name, outputs, nodes, state.bindings, state.constants)

    def match_and_rewrite(self, graph: Graph, node: Node, rewriter: Rewriter) -> Union[bool, str]:
        """Rewrite the first legal match rooted at `node`; else the first refusal reason."""
        first_reason: Optional[str] = None
        for match in self.matches(graph, node):
            edit = rewriter.edit(match.nodes, match.outputs, match.constants)
            reason = edit.interior_problem() or self._check_problem(graph, match) or self._rewrite(edit, match)
            if reason is None:
                return True
            first_reason = first_reason or reason
        return first_reason or False

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

    def _rewrite(self, edit: Edit, match: Match) -> Optional[str]:
        """Build the replacement and commit it; None when done, else why it was undone."""
        kwargs = match.bindings if self._takes_all else {k: match.bindings.get(k) for k in self._wanted}
        try:
            result = self._replacement(edit.op, **kwargs)
            if self._multi and not (isinstance(result, tuple) and len(result) == len(self.outputs)):
                raise TypeError(f"rule '{self.name}': the replacement must return a tuple of {len(self.outputs)} Values, got {result!r}")
            results = result if self._multi else (result,)
            if not all(isinstance(v, Value) for v in results):
                raise TypeError(f"rule '{self.name}': the replacement must return Values, got {result!r}")
        except BaseException:
            edit.op.rollback()
            raise
        return edit.commit(results)


def _pattern_nodes(output: NodeOutput) -> set[int]:
    """ids of the pattern nodes `output` is computed from (itself included)."""
    seen: set[int] = set()
    stack = [output.node]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(i.node for i in node.inputs if isinstance(i, NodeOutput))
    return seen


def _pattern_depth(node: PatternNode) -> int:
    """Nodes on the longest input path of a pattern, `node` included."""
    below = [_pattern_depth(i.node) for i in node.inputs if isinstance(i, NodeOutput)]
    return 1 + max(below, default=0)


class RewriteRuleSet:
    """Rules and hand-written patterns applied greedily by a worklist until none matches.

    The first round visits every node in graph order; at each node the rules rooted at its
    op are tried in the order given, and the first legal match is rewritten. A rewrite puts
    the nodes around it (the new nodes, the readers and producers of the values it touched,
    and their readers up to the deepest pattern's depth) on the next round's worklist,
    visited in graph order again, so results do not depend on anything but the graph. At
    most `max_rounds` rounds run. After `apply`, `refusals` lists the matches that were found
    but refused, with their reasons.
    """

    def __init__(self, rules: Sequence[RewritePattern], max_rounds: int = 100) -> None:
        names = [rule.name for rule in rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RewriteError(f"rule names must be unique; repeated: {', '.join(duplicates)}")
        self.rules = list(rules)
        self.max_rounds = max_rounds
        self.refusals: list[Refusal] = []
        self._by_root: dict[tuple[str, str], list[RewritePattern]] = {}
        for rule in self.rules:
            for root in rule.root_ops:
                self._by_root.setdefault(root, []).append(rule)
        self._depth = max((rule.depth for rule in self.rules), default=1)

    def apply(self, graph: Graph) -> dict[str, int]:
        """Rewrite `graph` in place to a fixed point; how often each rule fired."""
        counts = {rule.name: 0 for rule in self.rules}
        refusals: dict[Refusal, None] = {}
        rewriter = Rewriter(graph)
        worklist = [node for node in graph if (node.domain, node.op_type) in self._by_root]
        for _ in range(self.max_rounds):
            revisit: dict[int, Node] = {}
            for node in worklist:
                for rule in self._by_root.get((node.domain, node.op_type), ()):
                    if node.graph is not graph:
                        break
                    rewriter.change = None
                    outcome = rule.match_and_rewrite(graph, node, rewriter)
                    if outcome is True:
                        if rewriter.change is None:
                            raise RewriteError(f"rule '{rule.name}' reported a rewrite it did not commit through its rewriter")
                        counts[rule.name] += 1
                        self._around(graph, rewriter.change, revisit)
                        break
                    if isinstance(outcome, str):
                        refusals[Refusal(rule.name, node.name, outcome)] = None
            worklist = sorted(
                (n for n in revisit.values() if n.graph is graph and (n.domain, n.op_type) in self._by_root),
                key=graph.order_key,
            )
            if not worklist:
                self.refusals = list(refusals)
                return counts
        firing = ", ".join(name for name, count in counts.items() if count)
        raise RewriteError(f"rules did not reach a fixed point in {self.max_rounds} sweeps (still firing: {firing})")

    def _around(self, graph: Graph, change: Change, revisit: dict[int, Node]) -> None:
        """Put the nodes a rewrite may have made (un)matchable on `revisit`: the new nodes and
        the readers of the replacements, with what reads them up to the deepest pattern's
        depth (a pattern rooted there may now match), and the producers and readers of the
        values the new and erased nodes read (their use counts changed)."""
        for value in change.neighbours:
            if value.producer is not None and value.producer.graph is graph:
                revisit[id(value.producer)] = value.producer
            revisit.update((id(use.node), use.node) for use in value._uses)
        frontier: list[Node] = list(change.new_nodes)
        for value in change.replacements:
            frontier.extend(use.node for use in value._uses)
        seen: set[int] = set()
        for _ in range(self._depth):
            following: list[Node] = []
            for node in frontier:
                if id(node) in seen or node.graph is not graph:
                    continue
                seen.add(id(node))
                revisit[id(node)] = node
                following.extend(use.node for out in node.outputs for use in out._uses)
            frontier = following
