"""Put an IR graph into the ONNX that TensorRT's ONNX parser builds a network from.

The target's `lowering()` (a pipeline `graphopt.compile` runs, visible to `--dump-ir`,
`--check` and the report) is `decompose-graphopt-ops`: graphopt's own ops become standard
ONNX, `Attention` as MatMul / scale / mask / Softmax / MatMul (the chain TensorRT's
multi-head-attention fusion matches; grouped-query K/V repeated with Expand), `SkipLayerNorm`
as Add and `LayerNormalization` (opset >= 17, parsed into TensorRT's normalization layer),
`RMSNorm` and `Gelu` as their formulas, which TensorRT fuses into pointwise kernels. The
opset-23 `Attention` and `RMSNormalization` ops are not emitted: they would raise the whole
model to opset 23, and which TensorRT 10.x releases parse them could not be checked here.

Build steps (`TensorRTTarget.prepare`, on the lowered copy; not lowering passes, because
they change the model's interface, which a pass must keep):

- `int32_engine_io(graph)`: int64 graph inputs become int32 inputs followed by a Cast to
  int64, and int64 outputs are cast to int32: engine I/O in int32 binds in every TensorRT
  release (before 10 the parser had no int64 tensors at all) and halves the copies; the
  model's own arithmetic stays int64. The runner casts int64 feeds to int32 (checking the
  range) and the outputs back.
- explicit QuantizeLinear / DequantizeLinear nodes are kept as they are; `check_qdq` checks
  they are what TensorRT takes (symmetric int8: zero points 0 of type int8, constant scales).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from graphopt.errors import UnsupportedOpError
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, constant_data
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.ir.types import TensorType

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
UNPARSED_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"})
"""Standard ops TensorRT's ONNX parser rejects (integer-arithmetic quantization forms)."""


def int32_engine_io(graph: Graph) -> None:
    """Give `graph` (in place) int32 inputs and outputs where it has int64 ones (see the module docstring)."""
    _int32_inputs(graph)
    _int32_outputs(graph)


def unparsed_nodes(graph: Graph) -> list[Node]:
    """Nodes TensorRT's parser cannot build: other domains' ops and integer-arithmetic quantization."""
    return [
        node for node in graph.nodes
        if (node.domain not in ("", "ai.onnx", GRAPHOPT_DOMAIN)) or (not node.domain and node.op_type in UNPARSED_OPS)
    ]


def qdq_nodes(graph: Graph) -> list[Node]:
    """The graph's QuantizeLinear / DequantizeLinear nodes."""
    return [node for node in graph.nodes if node.domain in ("", "ai.onnx") and node.op_type in QDQ_OPS]


def check_qdq(graph: Graph) -> None:
    """UnsupportedOpError naming the first Q/DQ node TensorRT cannot take (asymmetric, uint8, int4)."""
    for node in qdq_nodes(graph):
        problem = _qdq_problem(node)
        if problem:
            raise UnsupportedOpError(
                f"node {node.label}: {node.op_type} {problem}; TensorRT takes symmetric int8 Q/DQ only "
                f"(run quantize{{mode=static, dtype=int8, activations=int8}})"
            )


def _qdq_problem(node: Node) -> Optional[str]:
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if scale is None or constant_data(scale) is None:
        return "has a scale that is not a constant"
    if zero is None:
        return None if node.op_type == "DequantizeLinear" or node.attrs.get("output_dtype") in (None, 0, DType.INT8.value) else "quantizes to a type other than int8"
    if zero.dtype != DType.INT8:
        return f"uses {zero.dtype.name.lower() if zero.dtype else 'an unknown'} zero point {zero.name!r}"
    data = constant_data(zero)
    if data is None or np.any(data != 0):
        return f"has a non-zero or non-constant zero point {zero.name!r}"
    return None


def _int32_inputs(graph: Graph) -> None:
    for value in graph.inputs:
        if value.dtype != DType.INT64:
            continue
        uses = value.uses()
        value.type = TensorType(DType.INT32, value.shape)
        first = graph.nodes[0] if graph.nodes else None
        cast = graph.add_node("Cast", [value], {"to": DType.INT64.value}, before=first)
        cast.output.type = TensorType(DType.INT64, value.shape)
        graph.rename_value(cast.output, graph.unique_name(f"{value.name}_int64"))
        for use in uses:
            use.node.replace_input(use.index, cast.output)
        if value.is_graph_output:
            graph.set_outputs([cast.output if out is value else out for out in graph.outputs])


def _int32_outputs(graph: Graph) -> None:
    outputs = list(graph.outputs)
    for index, value in enumerate(outputs):
        if value.dtype != DType.INT64:
            continue
        cast = graph.add_node("Cast", [value], {"to": DType.INT32.value})
        cast.output.type = TensorType(DType.INT32, value.shape)
        name = value.name
        graph.rename_value(value, graph.unique_name(f"{name}_int64"))
        graph.rename_value(cast.output, name)
        outputs[index] = cast.output
    graph.set_outputs(outputs)
