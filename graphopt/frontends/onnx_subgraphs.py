"""Scopes of ONNX subgraphs (If/Loop/Scan bodies): what a body reads from outer scopes.

ONNX lets a body read any value of an enclosing graph by name. graphopt keeps bodies as
serialized attributes, so these helpers work on the protos: `outer_reads` lists the outer
names a node's bodies read (its captures in the IR), `body_names` the names the bodies
define (which the outer graph must never reuse), and `rename_outer_reads` rewrites a body's
references when the outer value it reads got another name.
"""

from __future__ import annotations

from typing import Any, Iterator


def subgraphs(node: Any) -> Iterator[Any]:
    """The GraphProtos held by the GRAPH/GRAPHS attributes of NodeProto `node`."""
    from onnx import AttributeProto

    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def _defined_here(graph: Any) -> set[str]:
    names = {vi.name for vi in graph.input} | {init.name for init in graph.initializer}
    names |= {sparse.values.name for sparse in graph.sparse_initializer}
    names |= {out for node in graph.node for out in node.output if out}
    return names


def graph_outer_reads(graph: Any) -> list[str]:
    """Names `graph` (a body) and its nested bodies read without defining them, in order."""
    defined = _defined_here(graph)
    reads: dict[str, None] = {}
    for node in graph.node:
        for name in list(node.input) + outer_reads(node):
            if name and name not in defined:
                reads[name] = None
    for out in graph.output:
        if out.name not in defined:
            reads[out.name] = None
    return list(reads)


def outer_reads(node: Any) -> list[str]:
    """Names that the bodies of NodeProto `node` read from the scopes around the node."""
    reads: dict[str, None] = {}
    for body in subgraphs(node):
        reads.update(dict.fromkeys(graph_outer_reads(body)))
    return list(reads)


def body_names(node: Any) -> set[str]:
    """Every value name defined inside the bodies of NodeProto `node`, nested bodies included."""
    names: set[str] = set()
    for body in subgraphs(node):
        names |= _defined_here(body)
        for inner in body.node:
            names |= body_names(inner)
    return names


def rename_outer_reads(graph: Any, renames: dict[str, str]) -> None:
    """Rewrite, in place, the references of body `graph` (and its nested bodies) to outer
    values renamed as in `renames`; names the body defines itself shadow and stay."""
    live = {old: new for old, new in renames.items() if old not in _defined_here(graph)}
    if not live:
        return
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in live:
                node.input[index] = live[name]
        for body in subgraphs(node):
            rename_outer_reads(body, live)
    for out in graph.output:
        if out.name in live:
            out.name = live[out.name]
