"""`verify(graph)`: structural and type checks, each problem reported with the node named.

Checks, in order:
1. every value name is unique and every value has one producer (SSA);
2. use lists match the node inputs and captures (outer values read by If/Loop/Scan bodies)
   exactly (no stale or missing uses);
3. every input or capture a node reads is a graph input, a constant, or an output of a node
   in this graph (a dangling value otherwise);
4. nodes are in topological order: a value is produced before it is read (a cycle is
   reported as such, with the nodes on it);
5. graph outputs are defined in the graph and keep the names `set_outputs` gave them;
6. for ops with a schema: input/output counts are in range, inputs that must share an
   element type do, and recorded output types agree with what inference derives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from graphopt.errors import VerificationError
from graphopt.ir.types import TensorType

if TYPE_CHECKING:
    from graphopt.ir.graph import Graph, Node, Value


def verify(graph: "Graph") -> None:
    """Raise `VerificationError` listing every problem in `graph`; return None if sound."""
    problems: list[str] = []
    owned = _check_names(graph, problems)
    _check_uses(graph, problems)
    _check_order(graph, owned, problems)
    for out in graph.outputs:
        if id(out) not in owned:
            problems.append(f"graph output %{out.name} is not defined in graph '{graph.name}'")
    for out, name in zip(graph.outputs, graph.output_names):
        if out.name != name:
            problems.append(
                f"graph output '{name}' was renamed to '{out.name}' (replace values with Graph.replace_value, "
                "which keeps output names; to rename an output on purpose, call set_outputs again)"
            )
    if not problems:
        for node in graph.nodes:
            _check_types(graph, node, problems)
    if problems:
        raise VerificationError(problems)


def _check_names(graph: "Graph", problems: list[str]) -> set[int]:
    owned: set[int] = set()
    seen: dict[str, str] = {}
    for value in graph.values():
        where = "an input" if value.producer is None and value.const is None else (
            "a constant" if value.const is not None else f"node {value.producer.label}"  # type: ignore[union-attr]
        )
        if value.name in seen:
            problems.append(f"value name %{value.name} is defined twice ({seen[value.name]} and {where})")
        seen[value.name] = where
        owned.add(id(value))
    for node in graph.nodes:
        for index, out in enumerate(node.outputs):
            if out.producer is not node or out.output_index != index:
                problems.append(f"node {node.label}: output %{out.name} records a different producer")
    return owned


def _check_uses(graph: "Graph", problems: list[str]) -> None:
    expected: dict[int, list] = {}
    values: dict[int, "Value"] = {}
    for node in graph.nodes:
        for index, value in node.read_slots():
            expected.setdefault(id(value), []).append((id(node), index))
            values[id(value)] = value
    for value in graph.values():
        values[id(value)] = value
    for key, value in values.items():
        actual = sorted((id(use.node), use.index) for use in value.uses())
        if actual != sorted(expected.get(key, [])):
            problems.append(f"value %{value.name}: its use list does not match the nodes that read it")


def _check_order(graph: "Graph", owned: set[int], problems: list[str]) -> None:
    defined = {id(v) for v in graph.inputs} | {id(v) for v in graph.constants.values()}
    late = []
    for node in graph.nodes:
        for value in node.reads:
            if id(value) in defined:
                continue
            if id(value) not in owned:
                problems.append(
                    f"node {node.label} reads %{value.name}, which is dangling: no node, input or "
                    f"constant of graph '{graph.name}' defines it"
                )
            else:
                late.append((node, value))
        defined.update(id(out) for out in node.outputs)
    if late:
        cycle = _find_cycle(graph)
        if cycle:
            problems.append("cycle through nodes " + " -> ".join(cycle))
        for node, value in late:
            problems.append(f"node {node.label} reads %{value.name} before it is defined (use before def)")


def _find_cycle(graph: "Graph") -> list[str]:
    import networkx as nx

    try:
        edges = nx.find_cycle(graph.to_networkx())
    except nx.NetworkXNoCycle:
        return []
    names = [src for src, _ in edges]
    return [repr(n) for n in names + names[:1]]


def _check_types(graph: "Graph", node: "Node", problems: list[str]) -> None:
    schema = node.schema
    if schema is None:
        return
    n_in, n_out = len(node.inputs), len(node.outputs)
    if not schema.min_inputs <= n_in <= schema.max_inputs:
        problems.append(f"node {node.label} has {n_in} inputs; {schema.qualified_name} takes {schema.min_inputs} to {schema.max_inputs}")
        return
    if not schema.min_outputs <= n_out <= schema.max_outputs:
        problems.append(f"node {node.label} has {n_out} outputs; {schema.qualified_name} gives {schema.min_outputs} to {schema.max_outputs}")
        return
    for group in schema.same_dtype_inputs:
        indices = range(n_in) if group == (-1,) else [i for i in group if i < n_in]
        dtypes = {(i, node.inputs[i].dtype) for i in indices if node.inputs[i] is not None and node.inputs[i].dtype is not None}  # type: ignore[union-attr]
        if len({d for _, d in dtypes}) > 1:
            listed = ", ".join(f"%{node.inputs[i].name}: {d.short}" for i, d in sorted(dtypes))  # type: ignore[union-attr]
            problems.append(f"node {node.label}: inputs must share one element type, got {listed}")
            return
    try:
        inferred = schema.infer(graph.inference_context(node))
    except ValueError as exc:
        problems.append(f"node {node.label}: {exc}")
        return
    for out, found in zip(node.outputs, inferred):
        mismatch = type_mismatch(out.type, found)
        if mismatch:
            problems.append(f"node {node.label}: output %{out.name} is recorded as {out.type} but its inputs give {found} ({mismatch})")


def type_mismatch(recorded: TensorType, inferred: TensorType) -> str:
    """How two known types of one value contradict each other ('' when they agree)."""
    if recorded.dtype is not None and inferred.dtype is not None and recorded.dtype != inferred.dtype:
        return "element type differs"
    if recorded.shape is not None and inferred.shape is not None:
        if len(recorded.shape) != len(inferred.shape):
            return "rank differs"
        for axis, (a, b) in enumerate(zip(recorded.shape, inferred.shape)):
            if isinstance(a, int) and isinstance(b, int) and a != b:
                return f"dim {axis} differs"
    return ""
