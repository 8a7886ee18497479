"""ONNX -> IR: `from_onnx(path_or_model)`.

Keeps everything a round trip needs: value names, symbolic dims, opset imports, model
metadata, node doc strings, custom-domain ops (as opaque nodes with their attributes) and
model-local functions. Weights are not copied: initializers in a file (inline or external
data) become `FileTensor`s mapped on use, initializers of an in-memory ModelProto become
`ProtoTensor`s converted on use.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from graphopt.errors import GraphError, ModelLoadError
from graphopt.frontends.onnx_file import WireFormatError, read_model_skeleton
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value
from graphopt.ir.tensor import ArrayTensor, ConstTensor, FileTensor, ProtoTensor
from graphopt.ir.types import TensorType, UNKNOWN, merge_types


class OpaqueAttribute:
    """An ONNX attribute the IR does not model (subgraph, sparse tensor, type proto).

    Holds the serialized AttributeProto so the exporter can write it back unchanged.
    """

    def __init__(self, proto: Any) -> None:
        self.serialized = proto.SerializeToString()
        self.kind = proto.type

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OpaqueAttribute) and other.serialized == self.serialized

    def __hash__(self) -> int:
        return hash(self.serialized)


def from_onnx(model: Any) -> Graph:
    """Import an ONNX model given as a path or an `onnx.ModelProto`."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return _convert(model, base_dir="", ranges={}, source="<ModelProto>")
    if not isinstance(model, (str, os.PathLike)):
        raise ModelLoadError(f"from_onnx expects a path or an onnx.ModelProto, got {type(model).__name__}")
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory, not an .onnx file")
    try:
        proto, ranges = read_model_skeleton(path)
    except (WireFormatError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model ({exc})") from None
    except Exception as exc:  # protobuf's DecodeError has no stable import path
        raise ModelLoadError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from None
    if proto.ir_version == 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (no ir_version or no graph in the file)")
    return _convert(proto, base_dir=os.path.dirname(os.path.abspath(path)), ranges=ranges, source=path)


def _convert(model: Any, base_dir: str, ranges: dict[str, tuple[int, int]], source: str) -> Graph:
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    graph = Graph(model.graph.name or "graph", opsets)
    graph.metadata.update(_model_metadata(model))
    onnx_graph = model.graph
    types = {vi.name: _value_type(vi) for vi in list(onnx_graph.value_info) + list(onnx_graph.output)}
    scope: dict[str, Value] = {}

    initializer_names = set()
    for init in onnx_graph.initializer:
        scope[init.name] = graph.add_constant(init.name, _tensor(init, base_dir, ranges, source))
        initializer_names.add(init.name)
    for sparse in onnx_graph.sparse_initializer:
        scope[sparse.values.name] = graph.add_constant(sparse.values.name, ArrayTensor(_sparse_to_dense(sparse)))
    overridable = []
    for vi in onnx_graph.input:
        if vi.name in initializer_names:
            overridable.append(vi.name)
            continue
        scope[vi.name] = graph.add_input(vi.name, _value_type(vi))
    if overridable:
        graph.metadata["initializer_inputs"] = overridable

    for proto in _topological(onnx_graph, set(scope), source):
        node = _node(proto, scope, source)
        graph.insert(node)
        for out in node.outputs:
            out.type = types.get(out.name, UNKNOWN)
            scope[out.name] = out
        try:
            graph.infer_types(node)
        except GraphError as exc:
            raise ModelLoadError(f"{source}: {exc}") from None

    outputs = []
    for vi in onnx_graph.output:
        if vi.name not in scope:
            raise ModelLoadError(f"{source}: graph output '{vi.name}' is not produced by any node")
        value = scope[vi.name]
        value.type = merge_types(value.type, _value_type(vi))
        outputs.append(value)
    graph.set_outputs(outputs)
    return graph


def _model_metadata(model: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "ir_version": model.ir_version,
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "domain": model.domain,
        "model_version": model.model_version,
        "doc_string": model.doc_string,
        "graph_doc_string": model.graph.doc_string,
        "metadata_props": {p.key: p.value for p in model.metadata_props},
    }
    if len(model.functions):
        meta["functions"] = [f.SerializeToString() for f in model.functions]
    return meta


def _topological(onnx_graph: Any, known: set[str], source: str) -> list[Any]:
    """The graph's nodes in an order where every input is defined first (ONNX requires it,
    but some producers write unsorted graphs)."""
    nodes = list(onnx_graph.node)
    defined = set(known)
    ordered: list[Any] = []
    pending = nodes
    while pending:
        progress = []
        waiting = []
        for proto in pending:
            if all(name == "" or name in defined for name in proto.input):
                progress.append(proto)
                defined.update(name for name in proto.output if name)
            else:
                waiting.append(proto)
        if not progress:
            proto = waiting[0]
            missing = next(name for name in proto.input if name and name not in defined)
            label = proto.name or proto.op_type
            raise ModelLoadError(
                f"{source}: node '{label}' ({proto.op_type}) reads '{missing}', which no node, input or initializer defines"
            )
        ordered.extend(progress)
        pending = waiting
    return ordered


def _node(proto: Any, scope: dict[str, Value], source: str) -> Node:
    inputs: list[Optional[Value]] = [scope[name] if name else None for name in proto.input]
    while inputs and inputs[-1] is None:
        inputs.pop()
    out_names = list(proto.output)
    while out_names and out_names[-1] == "":
        out_names.pop()
    origin: dict[str, Any] = {}
    omitted = [i for i, name in enumerate(out_names) if name == ""]
    if omitted:
        origin["omitted_outputs"] = omitted
    if proto.doc_string:
        origin["doc_string"] = proto.doc_string
    if len(proto.metadata_props):
        origin["metadata_props"] = {p.key: p.value for p in proto.metadata_props}
    if proto.overload:
        origin["overload"] = proto.overload
    attrs: dict[str, Any] = {}
    empty_lists: dict[str, int] = {}
    for attr in proto.attribute:
        try:
            attrs[attr.name] = _attribute(attr)
        except ValueError as exc:
            raise ModelLoadError(f"{source}: node '{proto.name}' ({proto.op_type}): {exc}") from None
        if attrs[attr.name] == ():
            empty_lists[attr.name] = attr.type
    if empty_lists:
        origin["empty_list_types"] = empty_lists
    return Node(
        proto.op_type, inputs, attrs, domain=proto.domain,
        output_names=[name or f"{proto.name or proto.op_type}_unused{i}" for i, name in enumerate(out_names)],
        name=proto.name, origin=origin,
    )


def _attribute(attr: Any) -> Any:
    from onnx import AttributeProto

    kind = attr.type
    if kind == AttributeProto.FLOAT:
        return float(attr.f)
    if kind == AttributeProto.INT:
        return int(attr.i)
    if kind == AttributeProto.STRING:
        return attr.s.decode("utf-8")
    if kind == AttributeProto.TENSOR:
        return _inline_tensor(attr.t)
    if kind == AttributeProto.FLOATS:
        return tuple(float(v) for v in attr.floats)
    if kind == AttributeProto.INTS:
        return tuple(int(v) for v in attr.ints)
    if kind == AttributeProto.STRINGS:
        return tuple(v.decode("utf-8") for v in attr.strings)
    if kind == AttributeProto.TENSORS:
        return tuple(_inline_tensor(t) for t in attr.tensors)
    if kind in (AttributeProto.GRAPH, AttributeProto.GRAPHS, AttributeProto.SPARSE_TENSOR,
                AttributeProto.SPARSE_TENSORS, AttributeProto.TYPE_PROTO, AttributeProto.TYPE_PROTOS):
        return OpaqueAttribute(attr)
    raise ValueError(f"attribute '{attr.name}' has unknown type {kind}")


def _inline_tensor(proto: Any) -> ConstTensor:
    from onnx import numpy_helper

    return ArrayTensor(numpy_helper.to_array(proto), DType(proto.data_type))


def _tensor(proto: Any, base_dir: str, ranges: dict[str, tuple[int, int]], source: str) -> ConstTensor:
    from onnx import TensorProto

    try:
        dtype = DType(proto.data_type)
    except ValueError:
        raise ModelLoadError(f"{source}: initializer '{proto.name}' has unknown data type {proto.data_type}") from None
    shape = tuple(int(d) for d in proto.dims)
    try:
        if proto.name in ranges:
            offset, length = ranges[proto.name]
            return FileTensor(source, offset, length, dtype, shape)
        if proto.data_location == TensorProto.EXTERNAL:
            return _external_tensor(proto, base_dir, dtype, shape, source)
    except ValueError as exc:
        raise ModelLoadError(f"{source}: initializer '{proto.name}': {exc}") from None
    return ProtoTensor(proto)


def _external_tensor(proto: Any, base_dir: str, dtype: DType, shape: tuple[int, ...], source: str) -> ConstTensor:
    info = {entry.key: entry.value for entry in proto.external_data}
    location = info.get("location")
    if not location:
        raise ModelLoadError(f"{source}: initializer '{proto.name}' is external but names no location")
    path = os.path.normpath(os.path.join(base_dir, location))
    if not os.path.exists(path):
        raise ModelLoadError(f"{source}: initializer '{proto.name}' reads external data '{location}', which does not exist")
    offset = int(info.get("offset", 0))
    default_length = os.path.getsize(path) - offset
    length = int(info.get("length", default_length))
    if offset + length > os.path.getsize(path):
        raise ModelLoadError(f"{source}: initializer '{proto.name}' reads past the end of '{location}' (truncated data file?)")
    return FileTensor(path, offset, length, dtype, shape)


def _sparse_to_dense(sparse: Any) -> Any:
    import numpy as np
    from onnx import numpy_helper

    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def _value_type(vi: Any) -> TensorType:
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        return UNKNOWN
    tensor_type = vi.type.tensor_type
    try:
        dtype: Optional[DType] = DType(tensor_type.elem_type) if tensor_type.elem_type else None
    except ValueError:
        dtype = None
    if not tensor_type.HasField("shape"):
        return TensorType(dtype, None)
    dims = []
    for dim in tensor_type.shape.dim:
        which = dim.WhichOneof("value")
        if which == "dim_value" and dim.dim_value >= 0:
            dims.append(int(dim.dim_value))
        elif which == "dim_param" and dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return TensorType(dtype, tuple(dims))
