"""Which nodes an ONNX Runtime execution provider has a kernel for, asked of ONNX Runtime itself.

ORT picks a kernel per node when it creates a session, from the op, its domain and opset
version and the element types the node reads and writes; a node no kernel fits fails the
whole session ("NOT_IMPLEMENTED: Could not find an implementation for Mul(14) ..."). On CPU a
float16 node without a float16 kernel still runs (ORT casts around it to float32), while
bfloat16 has no such path and most CPU ops have no bfloat16 kernel; which ops have which
types changes with every release, so nothing here keeps a table.

`missing_kernel(node, session, settings, lower)` builds a one-node model with the node's op,
attributes, the graph's opset imports and the node's input and output types (constants of up
to `PROBE_CONSTANT_LIMIT` elements as they are, larger ones as graph inputs of the same type),
lowered by `lower` first when it is a graphopt op (so the probe holds what the session would:
the contrib kernel or the standard decomposition), and has `session` create an
InferenceSession of it as the target creates its own (same providers, same optimization level:
ORT's optimizer removes some nodes, an int4 Identity say, before it looks for kernels). Only ORT's own "no implementation" (NOT_IMPLEMENTED)
and "not a registered function/op" failures count as missing; any other failure of the probe
(one a constant input would have avoided, say), or a graphopt op whose lowering needs more of
the graph than the node, gives no verdict, so the node counts as runnable and the session
of the whole graph reports whatever is wrong. Verdicts are cached per process on the
signature (the session `settings`, op and domain, opset imports, attributes, input and output types, the
values of small constants), so a graph costs one probe per distinct signature (BERT-base
after fuse,to-bf16: 282 nodes, 19 probes; with the target's whole-graph check ~3 s the first
time, ~1.5 s after; after fuse,to-fp16: 0.04 s). Not probed: nodes that read and write only `COMMON_TYPES`
(every float32 graph, so those compile as before: a kernel missing there still shows as the
session's error), nodes with subgraphs (If, Loop, Scan), and nodes with values of unknown or
non-tensor type.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Hashable, Optional

from graphopt.errors import GraphoptError
from graphopt.ir.attributes import OpaqueAttribute
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.ir.tensor import ConstTensor

PROBE_CONSTANT_LIMIT = 64
"""Constant inputs with at most this many elements go into a probe as constants (shapes, axes,
scalars: what shape inference reads); larger ones become inputs of the same type."""

COMMON_TYPES = frozenset({DType.FLOAT, DType.INT64, DType.INT32, DType.BOOL})
"""The element types of float32 models (values, shapes, indices, masks), which ORT registers
its kernels for first; a node of these types only is not probed."""

_NO_KERNEL = re.compile(r"Could not find an implementation for (\S+?) node")
_NO_OP = re.compile(r"(\S+) is not a registered function/op")
_VERDICTS: dict[Hashable, Optional[str]] = {}


@dataclasses.dataclass(frozen=True)
class MissingKernel:
    """A node ONNX Runtime cannot run on the providers asked: `missing` is what ORT lacks,
    in its words ("kernel for Add(14)", "op custom:Frobnicate")."""

    node: Node
    missing: str


def missing_kernel(
    node: Node, session: Callable[[bytes], Any], settings: Hashable, lower: Callable[[Graph], Graph]
) -> Optional[MissingKernel]:
    """What ORT lacks to run `node` (a node of a graph), or None when it has everything or the
    probe gives no verdict (see the module docstring). `session`: creates the target's
    InferenceSession from model bytes; `settings`: what that session depends on (providers,
    optimization level), part of the cache key; `lower`: the target's lowering, applied to
    the probe of a graphopt op."""
    key = _signature(node, settings)
    if key is None:
        return None
    if key not in _VERDICTS:
        _VERDICTS[key] = _probe(node, session, lower)
    missing = _VERDICTS[key]
    return MissingKernel(node, missing) if missing else None


def _signature(node: Node, settings: Hashable) -> Optional[Hashable]:
    """What a verdict depends on, or None for a node that is not probed."""
    if node.captures or any(isinstance(v, OpaqueAttribute) for v in node.attrs.values()):
        return None
    values = [v for v in (*node.inputs, *node.outputs) if v is not None]
    if any(v.dtype is None or not v.type.is_tensor for v in values) or all(v.dtype in COMMON_TYPES for v in values):
        return None
    reads = tuple(None if v is None else (v.type, _small_constant(v)) for v in node.inputs)
    attrs = tuple(sorted((name, _hashable(value)) for name, value in node.attrs.items()))
    opsets = tuple(sorted(node.graph.opset_imports.items())) if node.graph is not None else ()
    return (settings, node.domain, node.op_type, opsets, attrs, reads, tuple(v.type for v in node.outputs))


def _small_constant(value: Value) -> Optional[Hashable]:
    const = value.const
    if const is None or const.size > PROBE_CONSTANT_LIMIT:
        return None
    return _hashable(const)


def _hashable(value: Any) -> Hashable:
    if isinstance(value, ConstTensor):
        data = value.numpy()
        return ("tensor", str(data.dtype), data.shape, data.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def _probe(node: Node, session: Callable[[bytes], Any], lower: Callable[[Graph], Graph]) -> Optional[str]:
    probe = _probe_graph(node)
    if node.domain == GRAPHOPT_DOMAIN:
        try:
            probe = lower(probe)
        except GraphoptError:
            return None  # this lowering needs more of the graph than the node: no verdict
    try:
        session(probe.to_onnx(keep_graphopt_ops=True).SerializeToString())
    except Exception as exc:  # ORT's own exception classes; only two of its messages are a verdict
        return _missing(str(exc))
    return None


def _missing(message: str) -> Optional[str]:
    kernel = _NO_KERNEL.search(message)
    if kernel:
        return f"kernel for {kernel.group(1)}"
    op = _NO_OP.search(message)
    return f"op {op.group(1)}" if op else None


def _probe_graph(node: Node) -> Graph:
    """A graph of `node` alone: its inputs as graph inputs (small constants as constants),
    its outputs as graph outputs, names and types kept."""
    assert node.graph is not None
    probe = Graph(f"probe_{node.op_type}", dict(node.graph.opset_imports))
    local: dict[int, Value] = {}

    def copy(value: Optional[Value]) -> Optional[Value]:
        if value is None:
            return None
        if id(value) not in local:
            if _small_constant(value) is not None:
                local[id(value)] = probe.add_constant(value.name, value.const)  # type: ignore[arg-type]
            else:
                local[id(value)] = probe.add_input(value.name, value.type)
                local[id(value)].symbolic = value.symbolic
        return local[id(value)]

    twin = probe.add_node(
        node.op_type, [copy(v) for v in node.inputs], node.attrs, domain=node.domain,
        output_names=[o.name for o in node.outputs], name=node.name, infer=False,
    )
    for old, new in zip(node.outputs, twin.outputs):
        new.type, new.symbolic = old.type, old.symbolic
    probe.set_outputs(twin.outputs)
    return probe
