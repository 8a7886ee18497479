"""`fold-constants`: compute what does not depend on the graph inputs once, ahead of time."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from graphopt.check import run_graph
from graphopt.errors import GraphoptError
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value, constant_node_tensor
from graphopt.ir.tensor import ConstTensor
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass

def replace_with_constant(graph: Graph, value: Value, data: Union[ConstTensor, np.ndarray]) -> Value:
    """Make every reader of node output `value` read a new graph constant holding `data`.

    The constant takes `value`'s name (the node output is renamed), so printed graphs and
    exported models keep their names. `value` must not be a graph output.
    """
    constant = graph.add_constant(f"{value.name}_folded", data)
    graph.replace_value(value, constant)
    return constant


def known_contents(value: Value) -> Optional[np.ndarray]:
    """The contents of an integer or bool value that symbolic propagation fully knows."""
    symbolic, dtype, shape = value.symbolic, value.dtype, value.shape
    if symbolic is None or dtype is None or not (dtype.is_integer or dtype == DType.BOOL):
        return None
    if not value.type.is_static or value.type.numel() != len(symbolic):
        return None
    if not all(isinstance(v, int) for v in symbolic):
        return None
    # as 64-bit two's complement (uint64 contents above 2**63 included), then cast: wraps like int64 would
    wrapped = np.array([v % (1 << 64) for v in symbolic], dtype=np.uint64)
    return wrapped.astype(dtype.to_numpy()).reshape(shape)


def fold_known_outputs(graph: Graph, node: Node) -> int:
    """Replace each read output of `node` whose contents are fully known by a constant; erase
    the node when nothing reads it any more. Returns the number of outputs replaced."""
    replaced = 0
    for out in node.outputs:
        data = known_contents(out)
        if data is not None and out.uses() and not out.is_graph_output:
            replace_with_constant(graph, out, data)
            replaced += 1
    if replaced and not any(out.uses() or out.is_graph_output for out in node.outputs):
        graph.erase(node)
    return replaced


def _is_pure_onnx(node: Node) -> bool:
    schema = node.schema
    return node.domain == "" and schema is not None and schema.pure and node.op_type != "Constant" and not node.captures


@register_pass
@dataclasses.dataclass
class FoldConstants(Pass):
    """Replace computations whose inputs are all known by the constants they produce.

    Rules:
    1. For any node y = Constant(value=...) (a tensor, or value_int(s)/value_float(s)),
       readers of y read a graph constant named y instead, and the node goes.
    2. For any y = Identity(c) of a graph constant c, readers of y read c (no copy is made).
    3. For any pure default-domain node whose output y is an integer or bool tensor of
       static shape with fully known contents (Value.symbolic all ints: e.g. Shape of a
       tensor of static shape, Gather of its static dims), readers of y read a constant.
    4. Every pure default-domain node whose inputs are all constants (or outputs of nodes
       folded by this rule) is evaluated, all at once, with ONNX Runtime's CPU kernels in
       the element types of the graph (no upcasting), so folded values are bit-exact with
       what ONNX Runtime computes; outputs read by the rest of the graph become constants.
       Nodes reading only constants get their output types inferred again first (an input
       folded since the last inference may settle an output's size).
       `max_elements` caps the memory folding may take: a node is evaluated only when the
       size of each of its outputs is known beforehand and at most `max_elements` elements
       (the default is 4 MB of float32); larger or unknown-size results stay nodes.

    Random ops (impure), opaque ops, nodes whose output is a graph output and
    DequantizeLinear (a quantized weight is stored quantized on purpose: folding it would
    give the runtime a float matmul) are never folded; constants that are also graph inputs
    (overridable) count as unknown.

    Needs: ONNX Runtime. Changes: adds constants and removes the nodes they replace;
    intermediate results that only fed folded nodes are not kept; output types refined by
    inferring again are counted as "retyped" (a stat present only when nonzero).
    """

    name = "fold-constants"
    max_elements: int = 1_000_000
    """Largest output (in elements) a folded node may produce; bigger results stay computed at run time."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = {
            "constant_nodes": self._lift_constant_nodes(graph),
            "aliases": self._bypass_identities(graph),
            "known_shapes": sum(fold_known_outputs(graph, node) for node in graph if _is_pure_onnx(node)),
        }
        retyped = self._refresh_types(graph)
        stats["evaluated"] = self._evaluate_constant_nodes(graph, ctx)
        if retyped:
            stats["retyped"] = retyped
        return PassResult(any(stats.values()), stats)

    def _lift_constant_nodes(self, graph: Graph) -> int:
        lifted = 0
        for node in graph:
            data = constant_node_tensor(node)
            if data is not None and not node.output.is_graph_output:
                replace_with_constant(graph, node.output, data)
                graph.erase(node)
                lifted += 1
        return lifted

    def _bypass_identities(self, graph: Graph) -> int:
        bypassed = 0
        for node in graph:
            if node.op_type != "Identity" or node.domain != "" or node.output.is_graph_output:
                continue
            source = node.inputs[0]
            if source is not None and source.is_constant and not graph.is_overridable(source):
                node.output.replace_all_uses_with(source)
                graph.erase(node)
                bypassed += 1
        return bypassed

    def _refresh_types(self, graph: Graph) -> int:
        """Infer again the output types of nodes that read only constants and have an output
        of unknown size (their inputs may have been folded since); the number refined."""
        refined = 0
        for node in graph:
            inputs = [v for v in node.inputs if v is not None]
            if not _is_pure_onnx(node) or not inputs or not all(v.is_constant for v in inputs):
                continue
            before = [out.type for out in node.outputs]
            if all(t.numel() is not None for t in before):
                continue
            graph.infer_types(node)
            refined += [out.type for out in node.outputs] != before
        return refined

    def _evaluate_constant_nodes(self, graph: Graph, ctx: PassContext) -> int:
        nodes = self._foldable(graph)
        if not nodes:
            return 0
        try:
            results = _evaluate(graph, nodes)
        except GraphoptError as exc:
            ctx.logger.warning("graphopt: fold-constants left %d nodes unfolded: %s", len(nodes), exc)
            return 0
        folded = 0
        for node in reversed(nodes):
            outputs = [out for out in node.outputs if out.uses()]
            if all(_fits(out, results.get(id(out)), self.max_elements) for out in outputs):
                for out in outputs:
                    replace_with_constant(graph, out, results[id(out)])
                graph.erase(node)
                folded += 1
        return folded

    def _foldable(self, graph: Graph) -> list[Node]:
        """Nodes computable from constants alone, in graph order."""
        known = {id(v) for v in graph.constants.values() if not graph.is_overridable(v)}
        nodes = []
        for node in graph:
            inputs = [v for v in node.inputs if v is not None]
            if not inputs or not _is_pure_onnx(node) or node.op_type == "DequantizeLinear" or not all(id(v) in known for v in inputs):
                continue
            if any(out.is_graph_output or not _within(out, self.max_elements) for out in node.outputs):
                continue
            nodes.append(node)
            known.update(id(out) for out in node.outputs)
        return nodes


def _within(value: Value, max_elements: int) -> bool:
    """True when `value`'s element count is known and at most `max_elements`."""
    numel = value.type.numel()
    return numel is not None and numel <= max_elements


def _fits(value: Value, data: Optional[np.ndarray], max_elements: int) -> bool:
    """True when `data` is a usable replacement for `value`: small enough, matching type."""
    if data is None or data.size > max_elements:
        return False
    if value.dtype is not None and np.dtype(value.dtype.to_numpy()) != data.dtype:
        return False
    if value.shape is None:
        return True
    return len(value.shape) == data.ndim and all(
        not isinstance(dim, int) or dim == size for dim, size in zip(value.shape, data.shape)
    )


def _evaluate(graph: Graph, nodes: Sequence[Node]) -> dict[int, np.ndarray]:
    """Run `nodes` (whose inputs are constants or earlier `nodes`) with ONNX Runtime.

    The copies declare no output types, so ONNX Runtime's own inference decides them (the
    caller checks them against the graph's). Returns the data of every output ONNX Runtime
    gives, keyed by id of the output Value.
    """
    sub = Graph(f"{graph.name}_fold", graph.opset_imports)
    mapping: dict[int, Value] = {}
    produced: list[tuple[Value, Value]] = []
    for node in nodes:
        for value in node.inputs:
            if value is not None and id(value) not in mapping:
                mapping[id(value)] = sub.add_constant(value.name, value.const)  # type: ignore[arg-type]
        copy = Node(
            node.op_type, [None if v is None else mapping[id(v)] for v in node.inputs], node.attrs,
            domain=node.domain, output_names=[out.name for out in node.outputs], origin=node.origin,
        )
        sub.insert(copy)
        omitted = set(node.origin.get("omitted_outputs", ()))
        for index, (out, new) in enumerate(zip(node.outputs, copy.outputs)):
            mapping[id(out)] = new
            if index not in omitted:
                produced.append((out, new))
    sub.set_outputs(new for _, new in produced)
    arrays = run_graph(sub, {})
    return {id(out): np.asarray(array) for (out, _), array in zip(produced, arrays)}
