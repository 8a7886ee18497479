"""The intermediate representation: graphs of typed values and ops with ONNX semantics."""

from graphopt.ir.attributes import OpaqueAttribute
from graphopt.ir.conversions import convert, register_conversion, registered_conversions
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Use, Value, constant_data
from graphopt.ir.schema import InferenceContext, OpSchema, get_schema, register_schema, registered_ops
from graphopt.ir.tensor import ArrayTensor, ConstTensor, FileTensor, ProtoTensor
from graphopt.ir.types import Dim, MapType, OptionalType, SequenceType, SparseTensorType, TensorType, broadcast_shapes, same_shape
from graphopt.ir.verify import verify

__all__ = [
    "ArrayTensor", "ConstTensor", "DType", "Dim", "FileTensor", "Graph", "InferenceContext", "MapType", "Node",
    "OpSchema", "OpaqueAttribute", "OptionalType", "ProtoTensor", "SequenceType", "SparseTensorType", "TensorType", "Use", "Value",
    "broadcast_shapes", "constant_data", "convert", "register_conversion", "registered_conversions", "same_shape",
    "get_schema", "register_schema", "registered_ops", "verify",
]
