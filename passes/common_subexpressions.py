"""`eliminate-common-subexpressions`: compute each distinct pure expression once."""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Optional

from graphopt.ir.graph import Graph, Node, Value
from graphopt.ir.tensor import ConstTensor
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass


def tensor_key(tensor: ConstTensor, max_elements: int) -> Hashable:
    """A key equal for tensors of equal type and bytes when small; identity when large."""
    if tensor.size > max_elements:
        return ("id", id(tensor))
    return (int(tensor.dtype), tensor.shape, tensor.numpy().tobytes())


def _attr_key(value: Any, max_elements: int) -> Hashable:
    """A hashable key for an attribute value; floats by bits (0.0 and -0.0 differ)."""
    if isinstance(value, ConstTensor):
        return ("tensor", tensor_key(value, max_elements))
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, (tuple, list)):
        return ("list", tuple(_attr_key(item, max_elements) for item in value))
    if isinstance(value, (bool, int, str, bytes)):
        return (type(value).__name__, value)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return (type(value).__name__, value)


@register_pass
@dataclasses.dataclass
class EliminateCommonSubexpressions(Pass):
    """Merge duplicate constants and duplicate pure nodes, keeping the first of each.

    Rules:
    1. Constants of the same element type, shape and bytes with at most `max_elements`
       elements are one constant: readers of the later ones read the first, and the later
       ones go. Larger constants are only equal to themselves.
    2. For any pure node (it has a schema that is not marked impure) with the same op,
       domain, attributes (tensors compared like constants in rule 1, floats by bits),
       inputs (the same values) and omitted outputs as an earlier node, readers of its
       outputs read the earlier node's outputs, and it goes.
    3. For any pure single-output node whose output contents are fully known as ints and
       symbolic dims (Value.symbolic with no unknown entry, e.g. [batch, seq, 4] gathered
       from a Shape) and equal to those of an earlier node's output of the same element
       type and shape, readers read the earlier output, and it goes: a symbolic dim stands
       for the same size wherever it appears, so such a shape vector is computed once,
       whichever tensor it was read from.

    DequantizeLinear nodes are never merged: quantize writes one per consumer, which is what
    lets a runtime fuse each consumer into an int8 kernel.

    Nodes are visited in graph order, so chains of duplicates collapse in one run.
    Constants that are also graph inputs are never merged; a duplicate whose output is a
    graph output is only merged when the kept node's output can take over its name.

    Needs nothing. Changes: removes constants and nodes; the kept ones keep their names.
    """

    name = "eliminate-common-subexpressions"
    max_elements: int = 1024
    """Constants larger than this many elements are not compared for merging."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = {"merged_constants": self._merge_constants(graph), "merged_nodes": self._merge_nodes(graph)}
        return PassResult(any(stats.values()), stats)

    def _merge_constants(self, graph: Graph) -> int:
        first: dict[Hashable, Value] = {}
        merged = 0
        for value in graph.constants.values():
            if value.is_graph_output or graph.is_overridable(value):
                continue
            key = tensor_key(value.const, self.max_elements)  # type: ignore[arg-type]
            if key not in first:
                first[key] = value
                continue
            value.replace_all_uses_with(first[key])
            graph.remove_constant(value)
            merged += 1
        return merged

    def _merge_nodes(self, graph: Graph) -> int:
        first: dict[Hashable, Node] = {}
        merged = 0
        for node in graph:
            key = self._node_key(node)
            if key is None:
                continue
            kept = first.setdefault(key, node)
            pairs = list(zip(node.outputs, kept.outputs))
            if kept is node or not all(graph.can_replace_value(old, new) for old, new in pairs):
                continue
            for old, new in pairs:
                graph.replace_value(old, new, keep_name=False)
            graph.erase(node)
            merged += 1
        return merged

    def _node_key(self, node: Node) -> Optional[Hashable]:
        schema = node.schema
        if schema is None or not schema.pure or (node.op_type == "DequantizeLinear" and not node.domain):
            return None
        contents = _contents_key(node)
        if contents is not None:
            return contents
        attrs = tuple(sorted((name, _attr_key(value, self.max_elements)) for name, value in node.attrs.items()))
        inputs = tuple(None if value is None else id(value) for value in node.inputs)
        omitted = tuple(node.origin.get("omitted_outputs", ()))
        return (node.domain, node.op_type, len(node.outputs), omitted, inputs, attrs)


def _contents_key(node: Node) -> Optional[Hashable]:
    """For a single-output node whose output contents are fully known as ints and symbols
    (Value.symbolic without unknowns), a key of those contents, its element type and shape."""
    if len(node.outputs) != 1:
        return None
    out = node.outputs[0]
    if out.symbolic is None or None in out.symbolic or out.dtype is None or not out.type.is_static:
        return None
    return ("contents", int(out.dtype), out.shape, out.symbolic)
