"""IR -> ONNX: `to_onnx(graph)` builds a ModelProto, `save_onnx(graph, path)` writes a file.

Writes back what the importer kept (names, symbolic dims, opsets, metadata, doc strings,
opaque attributes, model-local functions), less the constants nothing reads any more. A
symbolic dim is written as a dim_param holding its text, expressions included ("past + seq":
ONNX allows any string, and `from_onnx` reads it back as the same expression).
`save_onnx` writes atomically (a temporary file renamed into place) and moves weights to an
external-data file when they would exceed protobuf's 2 GB limit, streaming them from their
source without building them in memory.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import numpy as np

from graphopt.errors import ExportError
from graphopt.exporters.files import file_mode
from graphopt.exporters.onnx_lowering import decompose_graphopt_ops
from graphopt.frontends.onnx_subgraphs import rename_outer_reads, subgraphs
from graphopt.ir.attributes import OpaqueAttribute
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value
from graphopt.ir.tensor import ConstTensor, FileTensor, ProtoTensor
from graphopt.ir.types import Dim, MapType, OptionalType, SequenceType, Shape, SparseTensorType, TensorType

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Total weight bytes above which `save_onnx` writes external data by default."""

EXTERNAL_TENSOR_MIN_BYTES = 1024
"""Tensors smaller than this stay inline even in an external-data save."""

_ALIGNMENT = 4096


def to_onnx(graph: Graph, *, keep_graphopt_ops: bool = False) -> Any:
    """The graph as an `onnx.ModelProto` with every weight inline.

    graphopt's own ops (fused attention, norms) are decomposed into standard ONNX ops so
    any ONNX runtime can run the model, unless `keep_graphopt_ops` asks for the IR as is.
    """
    if not keep_graphopt_ops:
        graph = decompose_graphopt_ops(graph)
    return _model(graph, lambda value: _tensor_proto(value.name, value.const))  # type: ignore[arg-type]


def save_onnx(graph: Graph, path: Any, *, external_data: Optional[bool] = None, keep_graphopt_ops: bool = False) -> None:
    """Write the graph to `path` atomically (graphopt's own ops lowered as in `to_onnx`).

    `external_data=None` picks external data only when the weights exceed ~1.8 GB; the data
    goes to `<file name>.data` beside the model. Refuses to overwrite a file the graph's own
    weights are read from.
    """
    if not keep_graphopt_ops:
        graph = decompose_graphopt_ops(graph)
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ExportError(f"{path}: the folder {directory} does not exist")
    data_name = os.path.basename(path) + ".data"
    data_path = os.path.join(directory, data_name)
    sources = _weight_sources(graph)
    for target in (path, data_path):
        if os.path.exists(target) and any(os.path.samefile(target, src) for src in sources):
            raise ExportError(
                f"{target}: the graph's weights are read from this file; save to another path"
            )
    total = sum(v.const.nbytes for v in saved_constants(graph))  # type: ignore[union-attr]
    use_external = total > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    model_tmp = _temp_path(directory, ".onnx")
    data_tmp = _temp_path(directory, ".data") if use_external else None
    try:
        if use_external:
            with open(data_tmp, "wb") as data_file:  # type: ignore[arg-type]
                model = _model(graph, lambda value: _external_or_inline(value, data_file, data_name))
        else:
            model = _model(graph, lambda value: _tensor_proto(value.name, value.const))  # type: ignore[arg-type]
        if model.ByteSize() > 2**31 - 1:
            raise ExportError(f"{path}: the model exceeds protobuf's 2 GB limit; save with external_data=True")
        with open(model_tmp, "wb") as handle:
            handle.write(model.SerializeToString())
        if data_tmp is not None:
            os.replace(data_tmp, data_path)
        os.replace(model_tmp, path)
    except BaseException:
        for leftover in (model_tmp, data_tmp):
            if leftover is not None and os.path.exists(leftover):
                os.unlink(leftover)
        raise


def _temp_path(directory: str, suffix: str) -> str:
    handle, name = tempfile.mkstemp(prefix=".graphopt-", suffix=suffix, dir=directory)
    os.chmod(name, file_mode())
    os.close(handle)
    return name


def saved_constants(graph: Graph) -> list[Value]:
    """The constants written as initializers: those something reads (a node or a body),
    graph outputs, and overridable ones (graph inputs); a weight a pass stopped reading is
    not saved."""
    return [
        value for value in graph.constants.values()
        if value.uses() or value.is_graph_output or graph.is_overridable(value)
    ]


def _weight_sources(graph: Graph) -> set[str]:
    sources = set()
    for value in graph.constants.values():
        if isinstance(value.const, FileTensor) and os.path.exists(value.const.path):
            sources.add(value.const.path)
    return sources


def _model(graph: Graph, initializer: Any) -> Any:
    import onnx
    from onnx import helper

    meta = graph.metadata
    constants = saved_constants(graph)
    initializers = [initializer(value) for value in constants]
    inputs = [_value_info(v) for v in graph.inputs]
    inputs += [_value_info(v) for v in constants if graph.is_overridable(v)]
    outputs = [_value_info(v) for v in graph.outputs]
    boundary = {v.name for v in graph.inputs} | {v.name for v in graph.outputs} | set(graph.constants)
    value_info = [
        _value_info(out) for node in graph.nodes for out in node.outputs
        if out.name not in boundary and _is_known(out.type)
    ]
    onnx_graph = helper.make_graph(
        [_node_proto(node) for node in graph.nodes], graph.name, inputs, outputs,
        initializer=initializers, doc_string=meta.get("graph_doc_string") or None, value_info=value_info,
    )
    versions = dict(graph.opset_imports)
    for node in graph.nodes:
        versions.setdefault(node.domain, 1)
    opsets = [helper.make_opsetid(domain, version) for domain, version in sorted(versions.items())]
    model = helper.make_model(onnx_graph, opset_imports=opsets)
    model.ir_version = meta.get("ir_version") or helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    for key in ("producer_name", "producer_version", "domain", "doc_string"):
        if meta.get(key):
            setattr(model, key, meta[key])
    if meta.get("model_version"):
        model.model_version = meta["model_version"]
    if meta.get("metadata_props"):
        helper.set_model_props(model, dict(meta["metadata_props"]))
    for serialized in meta.get("functions", ()):
        function = onnx.FunctionProto()
        function.ParseFromString(serialized)
        model.functions.append(function)
    return model


def _is_known(type_: TensorType) -> bool:
    return not type_.is_tensor or type_.dtype is not None


def _value_info(value: Value) -> Any:
    from onnx import helper

    type_ = value.type
    if type_.is_tensor and type_.dtype is None:
        return helper.make_empty_tensor_value_info(value.name)
    return helper.make_value_info(value.name, type_proto(type_))


def type_proto(type_: TensorType) -> Any:
    """The ONNX TypeProto of an IR type: tensor, sequence, optional, sparse tensor or map
    (an empty TypeProto for an unknown tensor type), as the importer read it."""
    from onnx import TypeProto, helper

    if isinstance(type_, SequenceType):
        return helper.make_sequence_type_proto(type_proto(type_.elem))
    if isinstance(type_, OptionalType):
        return helper.make_optional_type_proto(type_proto(type_.elem))
    if isinstance(type_, MapType):
        return helper.make_map_type_proto(int(type_.key or 0), type_proto(type_.value))
    if isinstance(type_, SparseTensorType):
        dense = type_.dense
        return helper.make_sparse_tensor_type_proto(int(dense.dtype or 0), _dims(dense.shape))
    if type_.dtype is None and type_.shape is None:
        return TypeProto()
    return helper.make_tensor_type_proto(int(type_.dtype or 0), _dims(type_.shape))


def _dims(shape: Shape) -> Optional[list[Dim]]:
    return None if shape is None else list(shape)


def _node_proto(node: Node) -> Any:
    from onnx import helper

    omitted = set(node.origin.get("omitted_outputs", ()))
    outputs = ["" if i in omitted else out.name for i, out in enumerate(node.outputs)]
    inputs = ["" if v is None else v.name for v in node.inputs]
    proto = helper.make_node(
        node.op_type, inputs, outputs, name=node.name, domain=node.domain or None,
        doc_string=node.origin.get("doc_string"), overload=node.origin.get("overload"),
    )
    empty_types = node.origin.get("empty_list_types", {})
    for name, value in node.attrs.items():
        proto.attribute.append(_attribute(node, name, value, empty_types.get(name)))
    renames = {old: value.name for old, value in zip(node.capture_names, node.captures) if value.name != old}
    for body in subgraphs(proto) if renames else ():
        rename_outer_reads(body, renames)
    for key, value in node.origin.get("metadata_props", {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def _attribute(node: Node, name: str, value: Any, empty_type: Optional[int]) -> Any:
    from onnx import AttributeProto, helper

    if isinstance(value, OpaqueAttribute):
        proto = AttributeProto()
        proto.ParseFromString(value.serialized)
        proto.name = name
        return proto
    if isinstance(value, ConstTensor):
        return helper.make_attribute(name, _tensor_proto("", value))
    if isinstance(value, (tuple, list)):
        if not value:
            return helper.make_attribute(name, [], attr_type=empty_type or AttributeProto.INTS)
        if all(isinstance(v, ConstTensor) for v in value):
            return helper.make_attribute(name, [_tensor_proto("", v) for v in value])
        if any(isinstance(v, float) for v in value) and all(isinstance(v, (int, float)) for v in value):
            return helper.make_attribute(name, [float(v) for v in value], attr_type=AttributeProto.FLOATS)
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    try:
        return helper.make_attribute(name, value)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"node {node.label}: attribute '{name}'={value!r} cannot be written to ONNX ({exc})") from None


def _tensor_proto(name: str, tensor: ConstTensor) -> Any:
    from onnx import TensorProto, numpy_helper

    if isinstance(tensor, ProtoTensor) and tensor.proto.data_location != TensorProto.EXTERNAL:
        proto = TensorProto()
        proto.CopyFrom(tensor.proto)
        proto.name = name
        return proto
    array = _c_contiguous(tensor.numpy())
    proto = numpy_helper.from_array(array, name)
    if proto.data_type != int(tensor.dtype):
        raise ExportError(f"constant '{name}': numpy gives {proto.data_type}, IR says {tensor.dtype.name}")
    return proto


def _external_or_inline(value: Value, data_file: Any, data_name: str) -> Any:
    from onnx import TensorProto

    tensor: ConstTensor = value.const  # type: ignore[assignment]
    if tensor.nbytes < EXTERNAL_TENSOR_MIN_BYTES or tensor.dtype is DType.STRING:  # ONNX has no raw strings
        return _tensor_proto(value.name, tensor)
    position = data_file.tell()
    padding = (-position) % _ALIGNMENT
    data_file.write(b"\0" * padding)
    offset = position + padding
    length = _write_tensor_bytes(tensor, data_file)
    proto = TensorProto()
    proto.name = value.name
    proto.data_type = int(tensor.dtype)
    proto.dims.extend(tensor.shape)
    proto.data_location = TensorProto.EXTERNAL
    for key, entry in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
        item = proto.external_data.add()
        item.key, item.value = key, entry
    return proto


def _write_tensor_bytes(tensor: ConstTensor, handle: Any, chunk: int = 16 * 1024 * 1024) -> int:
    if isinstance(tensor, FileTensor):
        view = memoryview(bytearray(min(chunk, tensor.length)))
        with open(tensor.path, "rb") as source:
            source.seek(tensor.offset)
            remaining = tensor.length
            while remaining:
                got = source.readinto(view[: min(chunk, remaining)])
                if not got:
                    raise ExportError(f"{tensor.path}: ended early while copying a weight (file changed?)")
                handle.write(view[:got])
                remaining -= got
        return tensor.length
    if tensor.dtype.bits < 8:
        packed = _tensor_proto("", tensor).raw_data
        handle.write(packed)
        return len(packed)
    array = _c_contiguous(tensor.numpy())
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    raw = array.reshape(-1).view(np.uint8)
    handle.write(raw)
    return raw.size


def _c_contiguous(array: np.ndarray) -> np.ndarray:
    """`array` in C order, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    return array if array.flags.c_contiguous else np.array(array, order="C")
