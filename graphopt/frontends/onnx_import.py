"""ONNX -> IR: `from_onnx(path_or_model)`.

Keeps everything a round trip needs: value names, symbolic dims (a dim_param that is an
expression such as "seq+past" is read in its canonical form "past + seq", any other string
as an opaque symbol; see `graphopt.ir.symbolic`), opset imports, model metadata, node doc
strings, custom-domain ops (as opaque nodes with their attributes) and model-local functions.
Constant nodes become graph constants (unless their output is a graph output), so passes
see them as constants from the start. Weights are not copied:
initializers in a file (inline or external data) become `FileTensor`s mapped on use,
initializers of an in-memory ModelProto become `ProtoTensor`s converted on use.

Refuses, with a one-line `ModelLoadError` naming the file and the problem: unknown default-
domain opsets and ops, domains the model does not import, values defined twice, cycles and
dangling inputs, declared types that contradict inference, initializers whose data does not
match their shape, and external data that is missing, short, not a file, or outside the
model's folder (`../`, absolute paths, symlinks leading out: refused before any read).
"""

from __future__ import annotations

import heapq
import os
from typing import Any, Optional, Sequence

from graphopt.errors import GraphError, ModelLoadError, VerificationError
from graphopt.frontends.onnx_file import WireFormatError, read_model_skeleton
from graphopt.frontends.onnx_subgraphs import body_names, outer_reads
from graphopt.ir.attributes import OpaqueAttribute
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value, constant_node_tensor
from graphopt.ir.tensor import ArrayTensor, ConstTensor, FileTensor, ProtoTensor
from graphopt.ir.types import (
    MapType, OptionalType, SequenceType, SparseTensorType, TensorType, UNKNOWN, merge_types,
)
from graphopt.ir.verify import type_mismatch



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
    _check_opsets(opsets, source)
    onnx_graph = model.graph
    if not len(onnx_graph.output):
        raise ModelLoadError(f"{source}: the graph has no outputs, so there is nothing to compute")
    _check_unique_names(onnx_graph, source)
    graph = Graph(model.graph.name or "graph", opsets)
    graph.metadata.update(_model_metadata(model))
    types = {vi.name: _value_type(vi) for vi in list(onnx_graph.value_info) + list(onnx_graph.output)}
    scope: dict[str, Value] = {}

    initializer_names = set()
    for init in onnx_graph.initializer:
        scope[init.name] = graph.add_constant(init.name, _tensor(init, base_dir, ranges, source))
        initializer_names.add(init.name)
    for sparse in onnx_graph.sparse_initializer:
        scope[sparse.values.name] = graph.add_constant(sparse.values.name, ArrayTensor(_sparse_to_dense(sparse)))
    for vi in onnx_graph.input:
        if vi.name in initializer_names:
            graph.initializer_inputs.add(vi.name)
            continue
        scope[vi.name] = graph.add_input(vi.name, _value_type(vi))
    output_names = {vi.name for vi in onnx_graph.output}

    protos = list(onnx_graph.node)  # one wrapper object per node, so ids stay valid below
    captured = {id(proto): outer_reads(proto) for proto in protos if proto.attribute}
    for proto in _topological(protos, set(scope), captured, source):
        _check_op(proto, opsets, source)
        node = _node(proto, scope, captured.get(id(proto), ()), source)
        data = constant_node_tensor(node)
        if data is not None and node.outputs[0].name not in output_names:
            scope[node.outputs[0].name] = graph.add_constant(node.outputs[0].name, data)
            continue
        graph.insert(node)
        for out in node.outputs:
            out.type = types.get(out.name, UNKNOWN)
            scope[out.name] = out
        try:
            graph.infer_types(node)
        except GraphError as exc:
            raise ModelLoadError(f"{source}: {exc}") from None
        for out in node.outputs:
            declared = types.get(out.name, UNKNOWN)
            mismatch = type_mismatch(declared, out.type)
            if mismatch:
                raise ModelLoadError(
                    f"{source}: the model declares '{out.name}' as {declared} but node {node.label} gives {out.type} ({mismatch})"
                )

    outputs = []
    for vi in onnx_graph.output:
        if vi.name not in scope:
            raise ModelLoadError(f"{source}: graph output '{vi.name}' is not produced by any node")
        value = scope[vi.name]
        value.type = merge_types(value.type, _value_type(vi))
        outputs.append(value)
    graph.set_outputs(outputs)
    for proto in protos:
        if proto.attribute:
            graph.reserve_names(body_names(proto))
    try:
        graph.verify()
    except VerificationError as exc:
        more = f" (and {len(exc.problems) - 1} more problems)" if len(exc.problems) > 1 else ""
        raise ModelLoadError(f"{source}: {exc.problems[0]}{more}") from None
    return graph


def _check_opsets(opsets: dict[str, int], source: str) -> None:
    from onnx.defs import onnx_opset_version

    newest = onnx_opset_version()
    version = opsets.get("")
    if version is not None and not 1 <= version <= newest:
        raise ModelLoadError(f"{source}: imports ONNX opset {version}; this graphopt knows opsets 1 to {newest}")


def _check_unique_names(onnx_graph: Any, source: str) -> None:
    """Every value is defined once (an input may repeat an initializer: an overridable weight)."""
    defined: dict[str, str] = {}

    def define(name: str, where: str) -> None:
        if name in defined:
            raise ModelLoadError(f"{source}: value '{name}' is defined twice ({defined[name]} and {where})")
        defined[name] = where

    for init in onnx_graph.initializer:
        define(init.name, "an initializer")
    for sparse in onnx_graph.sparse_initializer:
        define(sparse.values.name, "a sparse initializer")
    initializers = set(defined)
    for vi in onnx_graph.input:
        if vi.name not in initializers:
            define(vi.name, "a graph input")
    for proto in onnx_graph.node:
        for name in proto.output:
            if name:
                define(name, f"node '{proto.name or proto.op_type}' ({proto.op_type})")


def _check_op(proto: Any, opsets: dict[str, int], source: str) -> None:
    """The node's domain is imported and, in the standard domain, its op exists."""
    from onnx.defs import has

    domain = "" if proto.domain == "ai.onnx" else proto.domain
    label = proto.name or proto.op_type
    if domain not in opsets:
        shown = domain or "ai.onnx"
        raise ModelLoadError(
            f"{source}: node '{label}' ({shown}::{proto.op_type}) uses domain '{shown}', which the model's opset_import does not list"
        )
    if domain == "" and not has(proto.op_type):
        raise ModelLoadError(f"{source}: node '{label}' uses unknown op '{proto.op_type}' (not an ONNX standard op)")


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


def _topological(nodes: list[Any], known: set[str], captured: dict[int, list[str]], source: str) -> list[Any]:
    """The graph's nodes in an order where every input, and every outer value a node's bodies
    read (`captured`, by node id), is defined first (ONNX requires it, but some producers
    write unsorted graphs): file order where it allows, in linear time."""
    producer = {name: index for index, proto in enumerate(nodes) for name in proto.output if name}
    waiting_on = [0] * len(nodes)
    readers: list[list[int]] = [[] for _ in nodes]
    for index, proto in enumerate(nodes):
        for name in dict.fromkeys(list(proto.input) + captured.get(id(proto), [])):
            if not name or name in known:
                continue
            if name not in producer:
                label = proto.name or proto.op_type
                where = "" if name in proto.input else "a subgraph of "
                raise ModelLoadError(
                    f"{source}: {where}node '{label}' ({proto.op_type}) reads '{name}', which no node, input or initializer defines"
                )
            waiting_on[index] += 1
            readers[producer[name]].append(index)
    ready = [index for index, count in enumerate(waiting_on) if count == 0]
    ordered: list[Any] = []
    while ready:
        index = heapq.heappop(ready)
        ordered.append(nodes[index])
        for reader in readers[index]:
            waiting_on[reader] -= 1
            if waiting_on[reader] == 0:
                heapq.heappush(ready, reader)
    if len(ordered) < len(nodes):
        placed = {id(proto) for proto in ordered}
        defined = set(known) | {name for proto in ordered for name in proto.output if name}
        raise ModelLoadError(f"{source}: {_cycle([proto for proto in nodes if id(proto) not in placed], defined, captured)}")
    return ordered


def _cycle(waiting: list[Any], defined: set[str], captured: dict[int, list[str]]) -> str:
    """The cycle that keeps `waiting` (nodes whose inputs are all produced by nodes) from running."""
    producers = {name: proto for proto in waiting for name in proto.output if name}
    proto, path = waiting[0], []
    while all(seen is not proto for seen in path):
        path.append(proto)
        reads = list(proto.input) + captured.get(id(proto), [])
        proto = producers[next(name for name in reads if name and name not in defined)]
    cycle = path[next(i for i, seen in enumerate(path) if seen is proto):] + [proto]
    return "the nodes form a cycle: " + " -> ".join(f"'{p.name or p.op_type}' ({p.op_type})" for p in cycle)


def _node(proto: Any, scope: dict[str, Value], captured: Sequence[str], source: str) -> Node:
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
        name=proto.name, origin=origin, captures=[(name, scope[name]) for name in captured],
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
    if any(d < 0 for d in shape):
        raise ModelLoadError(f"{source}: initializer '{proto.name}' has a negative dim in its shape {list(shape)}")
    try:
        if proto.name in ranges:
            offset, length = ranges[proto.name]
            return FileTensor(source, offset, length, dtype, shape)
        if proto.data_location == TensorProto.EXTERNAL:
            return _external_tensor(proto, base_dir, dtype, shape, source)
    except ValueError as exc:
        raise ModelLoadError(f"{source}: initializer '{proto.name}': {exc}") from None
    tensor = ProtoTensor(proto)
    held = _inline_count(proto)
    if held is not None and held != tensor.size:
        raise ModelLoadError(
            f"{source}: initializer '{proto.name}' declares {dtype.short}{list(shape)} ({tensor.size} elements) but holds {held}"
        )
    return tensor


def _inline_count(proto: Any) -> Optional[int]:
    """How many elements an inline TensorProto holds (None for kinds not counted here)."""
    from onnx import TensorProto, helper

    dtype = DType(proto.data_type)
    if dtype.bits < 8:
        return _packed_count(proto, dtype)
    if proto.HasField("raw_data"):
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(proto.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            return None
        return len(proto.raw_data) // itemsize
    field = helper.tensor_dtype_to_field(proto.data_type) if proto.data_type != TensorProto.STRING else "string_data"
    count = len(getattr(proto, field))
    if proto.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return count // 2
    return count


def _packed_count(proto: Any, dtype: DType) -> int:
    """How many elements an inline tensor of a 2-, 4- or 6-bit type holds: raw_data, and
    int32_data of the 2- and 4-bit types, are packed bytes (the declared size when their
    length is exactly what it packs into); 6-bit int32_data has one element per entry."""
    if not proto.HasField("raw_data") and dtype.bits == 6:
        return len(proto.int32_data)
    stored = len(proto.raw_data) if proto.HasField("raw_data") else len(proto.int32_data)
    size = 1
    for dim in proto.dims:
        size *= int(dim)
    return size if dtype.packed_nbytes(size) == stored else stored * 8 // dtype.bits


def _external_tensor(proto: Any, base_dir: str, dtype: DType, shape: tuple[int, ...], source: str) -> ConstTensor:
    info = {entry.key: entry.value for entry in proto.external_data}
    location = info.get("location")
    if not location:
        raise ModelLoadError(f"{source}: initializer '{proto.name}' is external but names no location")
    path = os.path.normpath(os.path.join(base_dir, location))
    folder = os.path.realpath(base_dir or os.curdir)
    if os.path.isabs(location) or os.path.commonpath([folder, os.path.realpath(path)]) != folder:
        raise ModelLoadError(
            f"{source}: initializer '{proto.name}' reads external data '{location}', which is outside the model's folder "
            f"{folder} (refused: external data must sit in or below the model's folder)"
        )
    if not os.path.exists(path):
        raise ModelLoadError(f"{source}: initializer '{proto.name}' reads external data '{location}', which does not exist")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{source}: initializer '{proto.name}' reads external data '{location}', which is not a file")
    offset = _byte_count(info, "offset", 0, proto.name, source)
    length = _byte_count(info, "length", os.path.getsize(path) - offset, proto.name, source)
    if offset + length > os.path.getsize(path):
        raise ModelLoadError(f"{source}: initializer '{proto.name}' reads past the end of '{location}' (truncated data file?)")
    return FileTensor(path, offset, length, dtype, shape)


def _byte_count(info: dict[str, str], key: str, default: int, name: str, source: str) -> int:
    text = info.get(key)
    if text is None:
        return default
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise ModelLoadError(f"{source}: initializer '{name}' has external data {key} {text!r}; expected a byte count >= 0")
    return count


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
    """The IR type of a ValueInfoProto (UNKNOWN when it has none)."""
    return type_from_proto(vi.type)


def type_from_proto(proto: Any) -> TensorType:
    """The IR type of an ONNX TypeProto: tensor, sequence, optional, sparse tensor or map
    (UNKNOWN for an empty TypeProto; the exporter writes each back as it was read)."""
    kind = proto.WhichOneof("value")
    if kind == "tensor_type":
        return _tensor_type(proto.tensor_type)
    if kind == "sequence_type":
        return SequenceType(type_from_proto(proto.sequence_type.elem_type))
    if kind == "optional_type":
        return OptionalType(type_from_proto(proto.optional_type.elem_type))
    if kind == "sparse_tensor_type":
        return SparseTensorType(_tensor_type(proto.sparse_tensor_type))
    if kind == "map_type":
        return MapType(_elem_type(proto.map_type.key_type), type_from_proto(proto.map_type.value_type))
    return UNKNOWN


def _elem_type(number: int) -> Optional[DType]:
    try:
        return DType(number) if number else None
    except ValueError:
        return None


def _tensor_type(tensor_type: Any) -> TensorType:
    """A TypeProto.Tensor or TypeProto.SparseTensor as a TensorType."""
    dtype = _elem_type(tensor_type.elem_type)
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
