"""to-fp16 and to-bf16: mixed precision with numerically sensitive ops kept in float32.

Rule: walking the nodes in order, a node whose op is in `HALF_OPS` (matmuls, elementwise
arithmetic, activations, data movement, fused attention) and whose float inputs are all
float32 runs in the half type: its float32 constant inputs are replaced by half copies and
its other float32 inputs are cast (one Cast per value, shared). Every other node (softmax,
norms, reductions, exp/log/pow/sqrt, casts, anything unknown) keeps float32: its half inputs
are cast back. The nodes of a quantized graph's int8 matmuls (`_part_of_int8_matmul`) keep
float32 too, so quantize-then-to-bf16 keeps its int8 kernels. With `norms=half` (to-bf16's
default) the norms of `HALF_NORMS` run in the half type too, their statistics still in
float32. Graph inputs and outputs keep their float32 type (outputs are cast back under their
own names). A graph with no float32 left to convert is unchanged, so a second run does
nothing. With `include` (fnmatch patterns of node names), only the matching nodes of
`HALF_OPS` (and `HALF_NORMS`) run in the half type (choose-precision halves single matmuls
this way).

Needs: nothing. Changes: float32 constants read by half nodes (the float32 copy is removed
when unused), value types, and the Casts at the float32/half boundaries. Lossy (half
precision): check mode reports the error.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import ClassVar, Literal, Optional

import numpy as np

from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass

HALF_OPS = frozenset({
    ("", op) for op in (
        "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Neg", "Relu", "Tanh", "Sigmoid", "Gelu", "Erf",
        "Where", "Transpose", "Reshape", "Concat", "Split", "Slice", "Gather", "Squeeze", "Unsqueeze",
        "Expand", "Flatten", "Identity", "Max", "Min", "Clip",
    )
} | {("graphopt", "Attention"), ("graphopt", "Gelu")})
"""Ops that run in the half type; everything else stays float32."""


HALF_NORMS = frozenset({("", "LayerNormalization"), ("graphopt", "SkipLayerNorm"), ("graphopt", "RMSNorm")})
"""Norms that run in the half type with `norms=half` (scale and beta too; their statistics stay
float32: LayerNormalization's stash_type, graphopt's norms by definition)."""


TYPE_AGNOSTIC = frozenset({("", "Cast"), ("", "CastLike"), ("", "Shape"), ("", "Size")})
"""Ops that read any type: their inputs are left as they are."""


@dataclasses.dataclass
class _MixedPrecision(Pass):
    half: ClassVar[DType] = DType.FLOAT16
    include: list[str] = dataclasses.field(default_factory=list)
    """fnmatch patterns of the node names to convert (empty: every node of HALF_OPS)."""
    norms: Literal["float32", "half"] = "float32"
    """"half": LayerNormalization, SkipLayerNorm and RMSNorm read and return the half type
    (statistics in float32), so the residual stream stays half and the Casts around each norm
    go; "float32": they run in float32, like every other op outside HALF_OPS."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        casts: dict[tuple[int, DType], Value] = {}
        halves: dict[str, Value] = {}
        converted = restored = 0
        for node in graph:
            key = (node.domain, node.op_type)
            if key in TYPE_AGNOSTIC:
                continue
            halved = (key in HALF_OPS and not _part_of_int8_matmul(node)) or (self.norms == "half" and key in HALF_NORMS)
            if halved and (not self.include or any(fnmatch.fnmatchcase(node.name, p) for p in self.include)):
                inputs = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v.dtype == DType.FLOAT]
                for index, value in inputs:
                    node.replace_input(index, self._half_input(graph, node, value, casts, halves))
                if inputs or any(v is not None and v.dtype == self.half for v in node.inputs):
                    graph.infer_types(node)
                converted += bool(inputs)
            else:
                for index, value in enumerate(node.inputs):
                    if value is not None and value.dtype == self.half:
                        node.replace_input(index, _cast(graph, node, value, DType.FLOAT, casts))
                        restored += 1
        outputs_cast = self._restore_outputs(graph)
        for value in list(graph.constants.values()):
            if value.name in halves and not value.uses() and not value.is_graph_output:
                graph.remove_constant(value)
        changed = converted + restored + outputs_cast > 0
        return PassResult(changed, {"converted": converted, "outputs_cast": outputs_cast})

    def _half_input(self, graph: Graph, node: Node, value: Value, casts: dict, halves: dict[str, Value]) -> Value:
        if value.const is None:
            return _cast(graph, node, value, self.half, casts)
        if value.name not in halves:
            half = _to_half(value.const.numpy().astype(np.float32), self.half)
            halves[value.name] = graph.add_constant(f"{value.name}_{self.half.short}", half)
        return halves[value.name]

    def _restore_outputs(self, graph: Graph) -> int:
        """Cast half graph outputs back to float32, under their own names."""
        outputs, restored = [], 0
        for value in graph.outputs:
            if value.dtype != self.half or value.producer is None:
                outputs.append(value)
                continue
            cast = graph.add_node("Cast", [value], {"to": DType.FLOAT.value})
            name = value.name
            graph.rename_value(value, graph.unique_name(f"{name}_{self.half.short}"))
            graph.rename_value(cast.output, name)
            outputs.append(cast.output)
            restored += 1
        graph.set_outputs(outputs)
        return restored


def _part_of_int8_matmul(node: Node) -> bool:
    """A node of a quantized graph's int8 matmul, which stays float32 so that targets still see
    the int8 pattern (and run their int8 kernel) after a later to-fp16/to-bf16: a MatMul/Gemm
    reading a DequantizeLinear (static), or a Mul reading a Cast of a MatMulInteger or a
    DynamicQuantizeLinear's scale (dynamic)."""
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm", "Mul"):
        return False
    producers = [_producer(v) for v in node.inputs]
    ops = [p.op_type for p in producers if p is not None and p.domain == ""]
    if node.op_type != "Mul":
        return "DequantizeLinear" in ops
    casts = [p for p in producers if p is not None and p.domain == "" and p.op_type == "Cast"]
    return "DynamicQuantizeLinear" in ops or any(getattr(_producer(c.inputs[0]), "op_type", None) == "MatMulInteger" for c in casts)


def _producer(value: Optional[Value]) -> Optional[Node]:
    return value.producer if value is not None else None


def _to_half(data: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype == DType.FLOAT16:
        return np.clip(data, -65504.0, 65504.0).astype(np.float16)
    return data.astype(dtype.to_numpy())


def _cast(graph: Graph, reader: Node, value: Value, dtype: DType, casts: dict) -> Value:
    """One Cast of `value` per type, placed before its first (earliest) reader."""
    key = (id(value), dtype)
    if key not in casts:
        casts[key] = graph.add_node("Cast", [value], {"to": dtype.value}, before=reader).output
    return casts[key]


@register_pass
@dataclasses.dataclass
class ToFp16(_MixedPrecision):
    """Run matmuls, elementwise ops and attention in float16; softmax, norms and reductions stay float32.

    See `graphopt.passes.to_fp16`. Needs nothing; changes constant and value types and adds
    Casts at the float32/float16 boundaries; graph inputs and outputs stay float32. Lossy.
    The weights are no longer float32 (invalidates ``float32-weights``: quantize and
    smooth-quant go before it).
    """

    name = "to-fp16"
    lossless = False
    invalidates = ("float32-weights",)
    half = DType.FLOAT16


@register_pass
@dataclasses.dataclass
class ToBf16(_MixedPrecision):
    """Run matmuls, elementwise ops, attention and norms in bfloat16; softmax and reductions stay float32.

    Same rules as `to-fp16` with bfloat16 (wider range, fewer mantissa bits; ONNX Runtime's
    CPU kernels mostly lack it, the torch target runs it), except that the norms run in
    bfloat16 by default (`norms=half`: float32 statistics, bfloat16 in and out), so the
    residual stream stays bfloat16. Measured on the torch target (2 Zen 4 cores, seq 128,
    `benchmarks/precision_cpu.py`): MiniLM batch 8 0.63x ORT float32 against 0.66x with
    `norms=float32`, BERT-base batch 1 0.53x against 0.56x; token cosine 0.99994 / 0.99992
    against 0.99998 (Hugging Face's float32 model, its real weights for MiniLM). Needs nothing;
    lossy. The weights become bfloat16,
    which the weight-editing passes do not read (invalidates ``float32-weights`` and
    ``constant-float-weights``: quantize, smooth-quant, prune-heads, prune-ffn and low-rank go
    before it).
    """

    name = "to-bf16"
    lossless = False
    invalidates = ("constant-float-weights", "float32-weights")
    half = DType.BFLOAT16
    norms: Literal["float32", "half"] = "half"
    """As in `to-fp16`, where float32 is the default: float16's range (65504) is too narrow
    for some residual streams, bfloat16's is float32's."""
