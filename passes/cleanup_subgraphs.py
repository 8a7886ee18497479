"""`cleanup-subgraphs`: run `cleanup` inside every If/Loop/Scan body."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from graphopt.errors import GraphoptError
from graphopt.exporters.onnx_export import type_proto
from graphopt.frontends.onnx_import import from_onnx
from graphopt.frontends.onnx_subgraphs import body_names, graph_outer_reads, outer_reads, rename_outer_reads
from graphopt.ir.attributes import OpaqueAttribute
from graphopt.ir.graph import Graph, Node, Value
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import get_pass, register_pass


@register_pass
@dataclasses.dataclass
class CleanupSubgraphs(Pass):
    """Simplify the bodies of If, Loop and Scan nodes with `cleanup`, nested bodies included.

    Rules:
    1. Each body is imported as a graph of its own whose inputs are the body's inputs plus
       the outer values it reads (typed as in the outer graph, so they stay unknown to
       constant folding), with every outer name reserved so no new value takes one.
    2. `cleanup` runs on it (and so, through this pass, on the bodies inside it).
    3. When cleanup changed the body, the body is written back in place of the attribute:
       same inputs and outputs in the same order, outer values read by name; the node's
       captures are recomputed (a body may read fewer outer values now), and the names
       defined in the new body are reserved in the outer graph.
    A body that cannot be imported or cleaned (a graphopt error) is left as it was.

    Needs what cleanup needs. Changes: the GRAPH/GRAPHS attributes of If/Loop/Scan nodes
    and those nodes' captures; stats "bodies" (bodies cleaned) and "skipped".
    """

    name = "cleanup-subgraphs"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cleaned = skipped = 0
        values = {v.name: v for v in graph.values()}  # this pass adds and removes no value
        for node in graph:
            bodies = [name for name, value in node.attrs.items() if _holds_graphs(value)]
            for attr_name in bodies:
                done, failed = self._clean_attribute(graph, node, attr_name, values, ctx)
                cleaned, skipped = cleaned + done, skipped + failed
        return PassResult(cleaned > 0, {"bodies": cleaned, "skipped": skipped})

    def _clean_attribute(self, graph: Graph, node: Node, attr_name: str, values: dict[str, Value], ctx: PassContext) -> tuple[int, int]:
        from onnx import AttributeProto

        proto = AttributeProto()
        proto.ParseFromString(node.attrs[attr_name].serialized)
        bodies = [proto.g] if proto.type == AttributeProto.GRAPH else list(proto.graphs)
        renames = {old: value.name for old, value in zip(node.capture_names, node.captures) if value.name != old}
        cleaned = skipped = 0
        for body in bodies:
            rename_outer_reads(body, renames)
            new_body = self._clean_body(graph, node, body, values, ctx)
            if new_body is None:
                skipped += 1
                continue
            body.CopyFrom(new_body)
            cleaned += 1
        if not cleaned:
            return 0, skipped
        proto.name = attr_name
        node.attrs[attr_name] = OpaqueAttribute(proto)
        self._refresh_captures(graph, node, values)
        return cleaned, skipped

    def _clean_body(self, graph: Graph, node: Node, body: Any, values: dict[str, Value], ctx: PassContext) -> Optional[Any]:
        """The cleaned GraphProto of `body`, or None when cleanup changed nothing or failed."""
        from onnx import helper

        formal = [vi.name for vi in body.input]
        wrapper = type(body)()
        wrapper.CopyFrom(body)
        for name in graph_outer_reads(body):
            if name in values:
                wrapper.input.append(helper.make_value_info(name, type_proto(values[name].type)))
        opsets = [helper.make_opsetid(domain, version) for domain, version in graph.opset_imports.items()]
        try:
            inner = from_onnx(helper.make_model(wrapper, opset_imports=opsets))
            inner.reserve_names(graph.taken_names())
            result = get_pass("cleanup")().run(inner, ctx)
            if not result.changed:
                return None
            written = inner.to_onnx().graph
        except GraphoptError as exc:
            ctx.logger.info("graphopt: cleanup-subgraphs left a body of node %s as it was: %s", node.label, exc)
            return None
        inputs = {vi.name: vi for vi in written.input}
        del written.input[:]
        written.input.extend(inputs[name] for name in formal)
        return written

    def _refresh_captures(self, graph: Graph, node: Node, values: dict[str, Value]) -> None:
        """Point the node's captures at what its (rewritten) bodies read now."""
        from onnx import AttributeProto, helper

        stub = helper.make_node(node.op_type, [], [])
        for value in node.attrs.values():
            if _holds_graphs(value):
                proto = AttributeProto()
                proto.ParseFromString(value.serialized)
                stub.attribute.append(proto)
        graph.set_captures(node, [(name, values[name]) for name in outer_reads(stub)])
        graph.reserve_names(body_names(stub))


def _holds_graphs(value: Any) -> bool:
    from onnx import AttributeProto

    return isinstance(value, OpaqueAttribute) and value.kind in (AttributeProto.GRAPH, AttributeProto.GRAPHS)

