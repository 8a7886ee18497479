"""The IR: `Graph`, `Node` and `Value`, with use-def chains and a checked rewrite API.

A `Value` is produced by exactly one `Node` (or is a graph input or a constant) and knows
its uses. A `Graph` holds its nodes in a valid execution order, as a linked list whose
order keys make "does this node run before that one?" and insertions O(1) (amortized).
Every change goes through `Graph` and `Value` methods (`add_node`, `replace_value`,
`erase`, ...) so use lists can never go stale; passes never edit the lists themselves.
Graph outputs keep the names `set_outputs` gave them (`replace_value` moves the name onto
the replacement; `verify` reports an output renamed any other way).

The IR imports nothing above it: conversions to other formats are registered with
`graphopt.ir.conversions` by the exporters (see docs/architecture.md, "Layout and layers").
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

from graphopt.errors import GraphError
from graphopt.ir.conversions import convert
from graphopt.ir.dtypes import DType
from graphopt.ir.schema import InferenceContext, OpSchema, SymbolicValue, get_schema
from graphopt.ir.tensor import ArrayTensor, ConstTensor
from graphopt.ir.types import UNKNOWN, TensorType, merge_types

if TYPE_CHECKING:
    import networkx
    import onnx
    import torch

ORDER_GAP = 1 << 20
"""Distance between the order keys of neighbouring nodes after a renumbering."""

MAX_INFERENCE_CONSTANT = 4096
"""Constants with more elements than this are not materialized for shape inference."""


class Use(NamedTuple):
    """One use of a value: input slot `index` of `node`, or, for a negative `index`, capture
    slot `-index - 1` (a value the node's subgraphs read from the outer scope)."""

    node: "Node"
    index: int

    @property
    def is_capture(self) -> bool:
        """True when a subgraph of `node` (an If/Loop/Scan body) reads the value."""
        return self.index < 0


class Value:
    """A tensor in the graph: a graph input, a constant, or a node output."""

    __slots__ = ("name", "type", "producer", "output_index", "const", "symbolic", "graph", "_uses")

    def __init__(self, name: str, type: TensorType = UNKNOWN, const: Optional[ConstTensor] = None) -> None:
        self.name = name
        self.type = type
        self.producer: Optional[Node] = None
        self.output_index = 0
        self.const = const
        self.symbolic: Optional[SymbolicValue] = None
        self.graph: Optional[Graph] = None
        self._uses: list[Use] = []

    @property
    def dtype(self) -> Optional[DType]:
        return self.type.dtype

    @property
    def shape(self) -> Optional[tuple]:
        return self.type.shape

    @property
    def is_constant(self) -> bool:
        return self.const is not None

    def uses(self) -> list[Use]:
        """Every (node, input index) reading this value, in insertion order."""
        return list(self._uses)

    def users(self) -> list["Node"]:
        """The distinct nodes reading this value."""
        return list(dict.fromkeys(use.node for use in self._uses))

    @property
    def is_graph_output(self) -> bool:
        return self.graph is not None and id(self) in self.graph._output_ids

    def replace_all_uses_with(self, other: "Value") -> None:
        """Make every reader of this value (and the graph outputs) read `other` instead.

        A graph output that this value was now is `other`, under `other`'s name; unless
        `other` gets the output's name back, `verify` reports the output as renamed. Use
        `Graph.replace_value`, which keeps graph output names."""
        if other is self:
            return
        for use in list(self._uses):
            use.node.replace_input(use.index, other)
        if self.graph is not None:
            self.graph._replace_output(self, other)

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


AttrValue = Union[int, float, str, tuple, ConstTensor, Any]


class Node:
    """One operation: `op_type` in `domain`, reading `inputs`, producing `outputs`.

    `inputs` may contain None for an omitted optional input. `attrs` maps attribute names
    to Python values (int, float, str, tuples of those, `ConstTensor`, or an opaque
    attribute kept from the source format, such as an If/Loop/Scan body). `captures` are the
    outer values those bodies read, and `capture_names` the names the bodies call them by
    (the exporter renames the references when a capture's value is renamed or replaced);
    captures are uses like inputs, so no pass deletes or reorders what a body reads.
    `origin` records where an op came from (e.g. ONNX doc strings or metadata) so it can be
    written back unchanged.
    """

    __slots__ = (
        "op_type", "domain", "name", "attrs", "origin", "graph", "_inputs", "_outputs", "_captures", "capture_names",
        "_prev", "_next", "_order",
    )

    def __init__(
        self,
        op_type: str,
        inputs: Sequence[Optional[Value]] = (),
        attrs: Optional[dict[str, AttrValue]] = None,
        *,
        domain: str = "",
        num_outputs: int = 1,
        output_names: Optional[Sequence[str]] = None,
        name: str = "",
        origin: Optional[dict[str, Any]] = None,
        captures: Sequence[tuple[str, Value]] = (),
    ) -> None:
        self.op_type = op_type
        self.domain = "" if domain == "ai.onnx" else domain
        self.name = name
        self.attrs: dict[str, AttrValue] = dict(attrs or {})
        self.origin: dict[str, Any] = dict(origin or {})
        self.graph: Optional[Graph] = None
        self._prev: Optional[Node] = None
        self._next: Optional[Node] = None
        self._order = 0
        self._inputs: list[Optional[Value]] = []
        for value in inputs:
            if value is not None and not isinstance(value, Value):
                raise TypeError(f"node {op_type}: inputs must be Values or None, got {type(value).__name__}")
            self._inputs.append(value)
        self.capture_names: tuple[str, ...] = tuple(name for name, _ in captures)
        self._captures: list[Value] = [value for _, value in captures]
        names = list(output_names) if output_names is not None else [""] * num_outputs
        self._outputs: list[Value] = []
        for index, out_name in enumerate(names):
            out = Value(out_name)
            out.producer = self
            out.output_index = index
            self._outputs.append(out)

    @property
    def inputs(self) -> tuple[Optional[Value], ...]:
        return tuple(self._inputs)

    @property
    def outputs(self) -> tuple[Value, ...]:
        return tuple(self._outputs)

    @property
    def captures(self) -> tuple[Value, ...]:
        """The outer values this node's subgraphs read (empty for nodes without bodies)."""
        return tuple(self._captures)

    @property
    def reads(self) -> tuple[Value, ...]:
        """Every value the node needs before it runs: its inputs, then its captures."""
        return tuple(v for v in self._inputs if v is not None) + tuple(self._captures)

    def read_slots(self) -> Iterator[tuple[int, Value]]:
        """(use index, value) of every input and capture slot holding a value."""
        for index, value in enumerate(self._inputs):
            if value is not None:
                yield index, value
        for index, value in enumerate(self._captures):
            yield -index - 1, value

    @property
    def output(self) -> Value:
        """The single output; raises for multi-output nodes."""
        if len(self._outputs) != 1:
            raise GraphError(f"node {self.label} has {len(self._outputs)} outputs; use .outputs")
        return self._outputs[0]

    @property
    def schema(self) -> Optional[OpSchema]:
        return get_schema(self.domain, self.op_type)

    @property
    def is_opaque(self) -> bool:
        """True for an op the IR has no schema for (kept and round-tripped as is)."""
        return self.schema is None

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type

    @property
    def label(self) -> str:
        """How messages refer to this node: its name and op."""
        return f"'{self.name}' ({self.qualified_op})" if self.name else f"({self.qualified_op})"

    def replace_input(self, index: int, value: Optional[Value]) -> None:
        """Point input slot `index` (or, for a negative index, capture slot `-index - 1`: see
        `Use`) at `value`, keeping use lists right."""
        slots, slot = (self._inputs, index) if index >= 0 else (self._captures, -index - 1)
        old = slots[slot]
        if old is value:
            return
        if value is None and index < 0:
            raise GraphError(f"node {self.label}: a captured value cannot be replaced by None")
        if old is not None and self.graph is not None:
            old._uses.remove(Use(self, index))
        slots[slot] = value
        if value is not None and self.graph is not None:
            value._uses.append(Use(self, index))

    def __repr__(self) -> str:
        ins = ", ".join("None" if v is None else f"%{v.name}" for v in self._inputs)
        outs = ", ".join(f"%{v.name}" for v in self._outputs)
        return f"{outs} = {self.qualified_op}({ins})"


class Graph:
    """An ordered, use-def-linked graph of nodes with inputs, outputs and constants."""

    def __init__(self, name: str = "graph", opset_imports: Optional[dict[str, int]] = None) -> None:
        self.name = name
        self.opset_imports: dict[str, int] = dict(opset_imports or {"": 18})
        self.metadata: dict[str, Any] = {}
        """What the source format said about the model (producer, doc strings, ...), written
        back by the exporter; graphopt gives no key a meaning."""
        self.initializer_inputs: set[str] = set()
        """Names of constants that are also graph inputs (ONNX initializers listed as inputs):
        a caller may feed another value, so no pass may treat their data as known."""
        self.report: Any = None
        """The report of the last pipeline run on this graph (set by the pass manager; the IR
        does not interpret it)."""
        self._inputs: list[Value] = []
        self._outputs: list[Value] = []
        self._output_ids: set[int] = set()
        self._output_names: list[str] = []
        self._first: Optional[Node] = None
        self._last: Optional[Node] = None
        self._count = 0
        self._constants: dict[str, Value] = {}
        self._names: set[str] = set()
        self._reserved: set[str] = set()
        """Names defined inside subgraph bodies: no value of this graph may take them."""
        self._node_names: set[str] = set()
        self._name_cursor: dict[str, int] = {}
        self._freed_suffixes: dict[str, list[int]] = {}
        """Per base name, a heap of `base_N` suffixes below the cursor that erasing freed."""
        """Per base name, a suffix below which every `base_N` node name is taken."""

    # ----------------------------------------------------------------- reading
    @property
    def inputs(self) -> tuple[Value, ...]:
        return tuple(self._inputs)

    @property
    def outputs(self) -> tuple[Value, ...]:
        return tuple(self._outputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The names the graph outputs were given by `set_outputs`: rewrites must keep them
        (`verify` reports an output whose value now has another name)."""
        return tuple(self._output_names)

    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(self._walk())

    @property
    def constants(self) -> dict[str, Value]:
        """Constants (weights) by name; a copy, so edit through the Graph API."""
        return dict(self._constants)

    def __iter__(self) -> Iterator[Node]:
        """The nodes in order, as a snapshot: nodes may be erased or added while iterating."""
        return iter(list(self._walk()))

    def __len__(self) -> int:
        return self._count

    def _walk(self) -> Iterator[Node]:
        node = self._first
        while node is not None:
            yield node
            node = node._next

    def order_key(self, node: Node) -> int:
        """A number that grows along the node order, in O(1): `order_key(a) < order_key(b)`
        exactly when `a` runs before `b`. Keys may change when nodes are inserted, so
        compare only keys read since the last insertion."""
        if node.graph is not self:
            raise GraphError(f"node {node.label} is not in graph '{self.name}'")
        return node._order

    def runs_before(self, a: Node, b: Node) -> bool:
        """True when node `a` comes before node `b` in this graph's order (O(1))."""
        return self.order_key(a) < self.order_key(b)

    def opset(self, domain: str = "") -> int:
        """The opset version imported for `domain` (default domain: ONNX)."""
        return self.opset_imports.get(domain, self.opset_imports.get("ai.onnx", 0))

    def values(self) -> Iterator[Value]:
        """Every value: inputs, constants, then node outputs in order."""
        yield from self._inputs
        yield from self._constants.values()
        for node in self._walk():
            yield from node._outputs

    def find_value(self, name: str) -> Optional[Value]:
        for value in self.values():
            if value.name == name:
                return value
        return None

    def op_counts(self) -> dict[str, int]:
        """How many nodes of each (qualified) op type the graph holds, sorted by name."""
        counts: dict[str, int] = {}
        for node in self._walk():
            counts[node.qualified_op] = counts.get(node.qualified_op, 0) + 1
        return dict(sorted(counts.items()))

    # ----------------------------------------------------------------- names
    def unique_name(self, base: str) -> str:
        """A value name not yet used in this graph, derived from `base`."""
        base = base or "v"
        if base not in self._names:
            return base
        suffix = 1
        while f"{base}_{suffix}" in self._names:
            suffix += 1
        return f"{base}_{suffix}"

    def taken_names(self) -> frozenset[str]:
        """Every name a new value of this graph may not take (values and reserved names)."""
        return frozenset(self._names)

    def reserve_names(self, names: Iterable[str]) -> None:
        """Keep `names` (values defined inside If/Loop/Scan bodies) from ever naming a value of
        this graph, since ONNX forbids an outer value and a body value sharing a name."""
        fresh = set(names) - self._names
        self._reserved |= fresh
        self._names |= fresh

    def _claim(self, value: Value, base: str) -> None:
        value.name = self.unique_name(base)
        self._names.add(value.name)
        value.graph = self

    # ----------------------------------------------------------------- inputs, outputs, constants
    def add_input(self, name: str, type: TensorType = UNKNOWN) -> Value:
        """Append a graph input; the name must be free."""
        if name in self._names:
            raise GraphError(f"graph '{self.name}' already has a value named '{name}'")
        value = Value(name, type)
        self._claim(value, name)
        self._inputs.append(value)
        return value

    def remove_input(self, value: Value) -> None:
        """Remove an unused graph input."""
        if value not in self._inputs:
            raise GraphError(f"%{value.name} is not an input of graph '{self.name}'")
        if value._uses or value.is_graph_output:
            raise GraphError(f"cannot remove input %{value.name}: it is still used")
        self._inputs.remove(value)
        self._names.discard(value.name)
        value.graph = None

    def add_constant(self, name: str, data: Union[ConstTensor, np.ndarray]) -> Value:
        """Add a named constant (weight). Numpy arrays are wrapped, not copied."""
        tensor = data if isinstance(data, ConstTensor) else ArrayTensor(data)
        value = Value(name, TensorType(tensor.dtype, tensor.shape), const=tensor)
        self._claim(value, name)
        self._constants[value.name] = value
        return value

    def remove_constant(self, value: Value) -> None:
        """Remove a constant nothing reads any more."""
        if self._constants.get(value.name) is not value:
            raise GraphError(f"%{value.name} is not a constant of graph '{self.name}'")
        if value._uses or value.is_graph_output:
            raise GraphError(f"cannot remove constant %{value.name}: it is still used")
        del self._constants[value.name]
        self._names.discard(value.name)
        value.graph = None

    def set_outputs(self, values: Iterable[Value]) -> None:
        """Make `values` the graph outputs, in order, under their current names (which
        every later rewrite must keep; to rename an output on purpose, rename its value and
        call `set_outputs` again)."""
        values = list(values)
        for value in values:
            if value.graph is not self:
                raise GraphError(f"output %{value.name} does not belong to graph '{self.name}'")
        self._assign_outputs(values)
        self._output_names = [value.name for value in values]

    def is_overridable(self, value: Value) -> bool:
        """True for a constant that is also a graph input (`initializer_inputs`): its data
        is only a default."""
        return value.const is not None and value.name in self.initializer_inputs

    def can_replace_value(self, old: Value, new: Value) -> bool:
        """Whether `replace_value(old, new)` is possible: always, unless `old` is a graph
        output whose name `new` cannot take (`new` a graph input, a constant or a graph
        output itself, or `old` a graph input)."""
        if not old.is_graph_output:
            return True
        old_internal = (old.producer is not None or old.const is not None) and not self.is_overridable(old)
        return old_internal and new.producer is not None and not new.is_graph_output

    def replace_value(self, old: Value, new: Value, *, keep_name: bool = True) -> None:
        """Make every reader of `old`, and the graph outputs, read `new` instead; `new`
        keeps what either type knows.

        A graph output never changes its name: when `old` is one, `new` takes `old`'s name
        (and `old` gets a fresh one), and it raises `GraphError` when `new` cannot
        (see `can_replace_value`). Otherwise, with `keep_name`, `new` takes `old`'s name when
        both are renamable (node outputs or constants that are neither graph inputs nor
        outputs), so a rewrite's result reads like what it replaced.
        """
        if old is new:
            return
        for value in (old, new):
            if value.graph is not self:
                raise GraphError(f"%{value.name} does not belong to graph '{self.name}'")
        if not self.can_replace_value(old, new):
            raise GraphError(
                f"cannot replace graph output %{old.name} by %{new.name}: a graph output keeps its name, "
                f"and %{new.name} cannot take it (it is a graph input, a constant or a graph output); "
                "insert an Identity node to produce the output instead"
            )
        new.type = merge_types(new.type, old.type)
        rename = old.is_graph_output or (keep_name and self._renamable(old) and self._renamable(new))
        name = old.name
        if rename:
            self.rename_value(old, self.unique_name(name))
        old.replace_all_uses_with(new)
        if rename:
            self.rename_value(new, name)

    def _renamable(self, value: Value) -> bool:
        """True for a value whose name is internal: not a graph input, graph output or
        overridable constant (those names are the model's interface)."""
        if value.producer is None and value.const is None:
            return False
        return not value.is_graph_output and not self.is_overridable(value)

    def _replace_output(self, old: Value, new: Value) -> None:
        self._assign_outputs([new if out is old else out for out in self._outputs])

    def _assign_outputs(self, values: list[Value]) -> None:
        self._outputs = values
        self._output_ids = {id(value) for value in values}

    # ----------------------------------------------------------------- nodes
    def add_node(
        self,
        op_type: str,
        inputs: Sequence[Optional[Value]] = (),
        attrs: Optional[dict[str, AttrValue]] = None,
        *,
        domain: str = "",
        num_outputs: int = 1,
        output_names: Optional[Sequence[str]] = None,
        name: str = "",
        before: Optional[Node] = None,
        after: Optional[Node] = None,
        infer: bool = True,
        origin: Optional[dict[str, Any]] = None,
        captures: Sequence[tuple[str, Value]] = (),
    ) -> Node:
        """Create a node, insert it (at the end, or before/after an anchor), infer its types."""
        node = Node(
            op_type, inputs, attrs, domain=domain, num_outputs=num_outputs,
            output_names=output_names, name=name, origin=origin, captures=captures,
        )
        self.insert(node, before=before, after=after)
        if infer:
            self.infer_types(node)
        return node

    def insert(self, node: Node, *, before: Optional[Node] = None, after: Optional[Node] = None) -> Node:
        """Insert a detached node at the end, or right before/after `anchor`."""
        if node.graph is not None:
            raise GraphError(f"node {node.label} is already in a graph")
        if before is not None and after is not None:
            raise GraphError("give either before= or after=, not both")
        for _, value in node.read_slots():
            if value.graph is not self:
                raise GraphError(
                    f"node {node.label} reads %{value.name}, which does not belong to graph '{self.name}'"
                )
        for anchor in (before, after):
            if anchor is not None and anchor.graph is not self:
                raise GraphError(f"node {anchor.label} is not in graph '{self.name}'")
        self._link(node, before if after is None else after._next)
        node.graph = self
        if not node.name or node.name in self._node_names:
            node.name = self.unique_node_name(node.name or node.op_type)
        self._node_names.add(node.name)
        for index, value in node.read_slots():
            value._uses.append(Use(node, index))
        for out in node._outputs:
            self._claim(out, out.name or f"{node.name}_out{out.output_index}")
        return node

    def unique_node_name(self, base: str) -> str:
        """A node name not yet used in this graph, derived from `base` (`base_N`, smallest N
        free, so a graph and its clone name new nodes alike)."""
        freed = self._freed_suffixes.get(base)
        while freed and f"{base}_{freed[0]}" in self._node_names:
            heapq.heappop(freed)
        if freed:
            return f"{base}_{freed[0]}"
        suffix = self._name_cursor.get(base, 0)
        while f"{base}_{suffix}" in self._node_names:
            suffix += 1
        self._name_cursor[base] = suffix
        return f"{base}_{suffix}"

    def _link(self, node: Node, successor: Optional[Node]) -> None:
        """Put `node` into the order right before `successor` (None: at the end)."""
        previous = self._last if successor is None else successor._prev
        node._prev, node._next = previous, successor
        if previous is None:
            self._first = node
        else:
            previous._next = node
        if successor is None:
            self._last = node
        else:
            successor._prev = node
        self._count += 1
        low = previous._order if previous is not None else None
        if successor is None:
            node._order = (low if low is not None else 0) + ORDER_GAP
        else:
            high = successor._order
            low = low if low is not None else high - 2 * ORDER_GAP
            if high - low >= 2:
                node._order = (low + high) // 2
            else:
                self._renumber()

    def _unlink(self, node: Node) -> None:
        previous, successor = node._prev, node._next
        if previous is None:
            self._first = successor
        else:
            previous._next = successor
        if successor is None:
            self._last = previous
        else:
            successor._prev = previous
        node._prev = node._next = None
        self._count -= 1

    def _renumber(self) -> None:
        for index, node in enumerate(self._walk(), start=1):
            node._order = index * ORDER_GAP

    def erase(self, node: Node) -> None:
        """Remove a node whose outputs nothing reads; refuses otherwise."""
        for out in node._outputs:
            if out._uses:
                readers = ", ".join(use.node.label for use in out._uses[:3])
                raise GraphError(f"cannot erase node {node.label}: its output %{out.name} is used by {readers}")
            if out.is_graph_output:
                raise GraphError(f"cannot erase node {node.label}: its output %{out.name} is a graph output")
        if node.graph is not self:
            raise GraphError(f"node {node.label} is not in graph '{self.name}'")
        self._unlink(node)
        for index, value in node.read_slots():
            value._uses.remove(Use(node, index))
        for out in node._outputs:
            self._names.discard(out.name)
            out.graph = None
        self._node_names.discard(node.name)
        base, _, index = node.name.rpartition("_")
        if index.isdigit() and self._name_cursor.get(base, 0) > int(index):
            heapq.heappush(self._freed_suffixes.setdefault(base, []), int(index))
        node.graph = None

    def set_captures(self, node: Node, captures: Sequence[tuple[str, Value]]) -> None:
        """Replace what `node`'s bodies read from this graph by `captures` ((name in the
        bodies, value) pairs), after a pass rewrote the bodies; use lists follow."""
        for _, value in captures:
            if value.graph is not self:
                raise GraphError(f"node {node.label} captures %{value.name}, which does not belong to graph '{self.name}'")
        for index, value in enumerate(node._captures):
            value._uses.remove(Use(node, -index - 1))
        node.capture_names = tuple(name for name, _ in captures)
        node._captures = [value for _, value in captures]
        for index, value in enumerate(node._captures):
            value._uses.append(Use(node, -index - 1))

    def move_before(self, node: Node, anchor: Node) -> None:
        """Move `node` to run right before `anchor` (the caller keeps the order valid)."""
        for item in (node, anchor):
            if item.graph is not self:
                raise GraphError(f"node {item.label} is not in graph '{self.name}'")
        if node is anchor:
            return
        self._unlink(node)
        self._link(node, anchor)

    def rename_value(self, value: Value, name: str) -> None:
        """Give a value a new name that is free in this graph."""
        if value.graph is not self:
            raise GraphError(f"%{value.name} does not belong to graph '{self.name}'")
        if name == value.name:
            return
        if name in self._names:
            raise GraphError(f"graph '{self.name}' already has a value named '{name}'")
        self._names.discard(value.name)
        if value.name in self._constants:
            del self._constants[value.name]
            self._constants[name] = value
        value.name = name
        self._names.add(name)

    # ----------------------------------------------------------------- types
    def inference_context(self, node: Node) -> InferenceContext:
        """The inputs, attributes and known data that type inference sees for `node`."""
        types = [None if v is None else v.type for v in node._inputs]
        constants = [None if v is None else constant_data(v) for v in node._inputs]
        symbolic = [None if v is None else v.symbolic for v in node._inputs]
        return InferenceContext(
            node.op_type, node.domain, types, _plain_attrs(node.attrs), len(node._outputs),
            self.opset(node.domain), constants, symbolic,
        )

    def infer_types(self, node: Node) -> None:
        """Refine the output types (and symbolic contents) of `node` from its schema."""
        schema = node.schema
        if schema is None:
            return
        ctx = self.inference_context(node)
        try:
            inferred = schema.infer(ctx)
        except ValueError as exc:
            raise GraphError(f"node {node.label}: {exc}") from exc
        for out, found in zip(node._outputs, inferred):
            out.type = merge_types(found, out.type)
        if schema.propagate is not None:
            for out, sym in zip(node._outputs, schema.propagate(ctx)):
                if sym is not None:
                    out.symbolic = tuple(sym)

    # ----------------------------------------------------------------- views
    def to_networkx(self) -> "networkx.DiGraph":
        """A networkx view: one vertex per node (keyed by node name), one edge per value read.

        Each vertex carries `node` (the Node) and `op`; each edge carries `value` names.
        Graph inputs and constants are not vertices.
        """
        import networkx as nx

        view = nx.DiGraph()
        nodes = self.nodes
        for node in nodes:
            view.add_node(node.name, node=node, op=node.qualified_op)
        for node in nodes:
            for value in node.reads:
                if value.producer is not None and value.producer.graph is self:
                    src = value.producer.name
                    if view.has_edge(src, node.name):
                        view.edges[src, node.name]["values"].append(value.name)
                    else:
                        view.add_edge(src, node.name, values=[value.name])
        return view

    def clone(self) -> "Graph":
        """A structural copy sharing the constant tensors (weights are not copied)."""
        copy = Graph(self.name, self.opset_imports)
        copy.metadata = dict(self.metadata)
        copy.initializer_inputs = set(self.initializer_inputs)
        copy.report = self.report
        copy.reserve_names(self._reserved)
        mapping: dict[int, Value] = {}
        for value in self._inputs:
            new = copy.add_input(value.name, value.type)
            mapping[id(value)] = new
        for value in self._constants.values():
            new = copy.add_constant(value.name, value.const)  # type: ignore[arg-type]
            mapping[id(value)] = new
        for node in self._walk():
            new_node = Node(
                node.op_type, [None if v is None else mapping[id(v)] for v in node._inputs], node.attrs,
                domain=node.domain, output_names=[o.name for o in node._outputs], name=node.name,
                origin=node.origin, captures=[(n, mapping[id(v)]) for n, v in zip(node.capture_names, node._captures)],
            )
            copy.insert(new_node)
            for old_out, new_out in zip(node._outputs, new_node._outputs):
                new_out.type = old_out.type
                new_out.symbolic = old_out.symbolic
                mapping[id(old_out)] = new_out
        copy._assign_outputs([mapping[id(v)] for v in self._outputs])
        copy._output_names = list(self._output_names)
        return copy

    def __str__(self) -> str:
        from graphopt.ir.printer import format_graph

        return format_graph(self)

    def __repr__(self) -> str:
        return f"<Graph '{self.name}': {len(self._inputs)} inputs, {self._count} nodes, {len(self._outputs)} outputs>"

    # ----------------------------------------------------------------- conversions
    def verify(self) -> None:
        """Raise `VerificationError` listing every structural or type problem found."""
        from graphopt.ir.verify import verify

        verify(self)

    def to_onnx(self, *, keep_graphopt_ops: bool = False) -> "onnx.ModelProto":
        """This graph as an ONNX model (weights inline; graphopt's own ops lowered to
        standard ONNX unless `keep_graphopt_ops`)."""
        return convert("onnx", self, keep_graphopt_ops=keep_graphopt_ops)

    def save_onnx(self, path: Any, *, external_data: Optional[bool] = None, keep_graphopt_ops: bool = False) -> None:
        """Write this graph as an .onnx file, atomically; large weights go to external data."""
        convert("onnx-file", self, path, external_data=external_data, keep_graphopt_ops=keep_graphopt_ops)

    def to_fx(self, *, prepack_linears: bool = False) -> "torch.fx.GraphModule":
        """This graph as a runnable torch.fx GraphModule (`prepack_linears`: CPU-only oneDNN
        linears over weights packed once, see `graphopt.exporters.fx_linear`)."""
        return convert("fx", self, prepack_linears=prepack_linears)


CONSTANT_NUMBER_ATTRS = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32, "value_floats": np.float32}
"""The Constant-node attributes holding numbers, with the element type ONNX gives them."""


def constant_node_tensor(node: Node) -> Optional[ConstTensor]:
    """What a default-domain Constant node holds, as a tensor, when it gives one directly
    (`value`, `value_int(s)`, `value_float(s)`); None for other nodes and other forms."""
    if node.op_type != "Constant" or node.domain != "":
        return None
    value = node.attrs.get("value")
    if isinstance(value, ConstTensor):
        return value
    for key, dtype in CONSTANT_NUMBER_ATTRS.items():
        if key in node.attrs:
            return ArrayTensor(np.asarray(node.attrs[key], dtype=dtype))
    return None


def constant_data(value: Value, limit: Optional[int] = MAX_INFERENCE_CONSTANT) -> Optional[np.ndarray]:
    """The data of a constant value (weight or Constant-node output) of at most `limit`
    elements (None: any size), else None."""
    tensor = value.const
    if tensor is None and value.producer is not None:
        tensor = constant_node_tensor(value.producer)
    if tensor is None or (limit is not None and tensor.size > limit):
        return None
    return tensor.numpy()


def uniform_constant(value: Optional[Value]) -> Optional[np.generic]:
    """The one number every element of a small constant holds (a numpy scalar of the
    constant's dtype), or None when `value` is not such a constant."""
    data = None if value is None else constant_data(value)
    if data is None or data.size == 0 or data.dtype.kind in "OSUc":
        return None
    flat = np.asarray(data).reshape(-1)
    return flat[0] if bool(np.all(flat == flat[0])) else None


def _plain_attrs(attrs: dict[str, AttrValue]) -> dict[str, Any]:
    """Attributes as inference functions expect them: tensors as numpy arrays."""
    return {k: (v.numpy() if isinstance(v, ConstTensor) else v) for k, v in attrs.items()}
