"""oneDNN int8 linears for the quantized matmuls of the CPU torch target.

`plan_qlinears(graph)` finds the matmuls `quantize{mode=static}` writes and runs each as one
`torch.ops.onednn.qlinear_pointwise` over an int8 weight packed once, at build time, by
`torch.ops.onednn.qlinear_prepack`:

- `MatMul(DequantizeLinear(a, s, z), DequantizeLinear(W, w_scale, 0))` (or a `Gemm`, alpha =
  beta = 1, transA = 0, transB either way) where `a` is a uint8 activation with a constant
  scalar scale and zero point, and W a constant int8 matrix with a zero zero point and a scale
  per output channel (or one per tensor). A Gemm's bias (float, or int32 through a
  DequantizeLinear as quantize writes it) becomes the linear's float bias;
- a following bias `Add` and `graphopt::Gelu` fold in as in `fx_linear` (`absorb_epilogue`);
- without a Gelu, a `graphopt::SkipLayerNorm` that alone reads the float result as its `x`
  gives the linear its residual add (oneDNN's binary "add" post-op, with the norm's bias
  added to the linear's): the norm then normalizes the linear's sum (`residual_norm`). Its
  skip input is read, not written. Measured at batch 8 (MiniLM's [1024, 384] x [384, 384]):
  0.47 ms fused against 2.4 ms for the linear, bias and residual adds apart;
- when the result is read only by a `QuantizeLinear` (uint8, constant scalar scale and zero
  point) whose output only such int8 linears read, the linear writes that uint8 tensor itself
  (oneDNN requantizes with the QuantizeLinear's scale and zero point): no float tensor and no
  separate quantize kernel;
- the DequantizeLinear nodes only the matmul reads are not run;
- a QuantizeLinear or DynamicQuantizeLinear whose uint8 output only these linears read runs
  as one `torch.quantize_per_tensor` pass (`quantize_uint8`, `dynamic_quantize_uint8`), with a
  smooth-quant factor Mul in front of it folded in;
- `quantize{mode=dynamic}`'s chain `Mul(Cast(MatMulInteger(a, W, a_zero, 0)), Mul(a_scale,
  w_scale))` over a `DynamicQuantizeLinear`'s (a, a_scale, a_zero) runs as one int8 linear that
  reads the scale and zero point as tensors (the DynamicQuantizeLinear still runs), with the
  same epilogues folded in.

Results. The int32 accumulation is exact, so a float output differs from the unlowered graph's
`x_dq @ W_dq + b` only by float32 rounding (oneDNN scales the int32 sum once by
`s * w_scale` where the graph multiplies dequantized values; relative error ~1e-6 of the
result's magnitude, as any float32 matmul). A requantized uint8 output equals
`round(y / scale) + zero` of that float y, except that a y within float32 rounding of a
rounding boundary may land one step (one `scale`) away. ONNX Runtime's int8 kernels on the same
graph obey the same bound.

Measured on a 2-core AMD EPYC (Zen 4, avx512_vnni, torch 2.13): a [128, 384] x [384, 1536]
u8s8 linear reaches ~600 GOP/s here against ~390 for ONNX Runtime's MatMulIntegerToFloat.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional, Union

import numpy as np

from graphopt.exporters.fx_linear import absorb_epilogue, sole_user
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.ir.ops.onnx import is_plain_gemm
from graphopt.ir.schema import GRAPHOPT_DOMAIN


@dataclasses.dataclass
class QLinearPlan:
    """A quantized matmul run as one oneDNN int8 linear."""

    activation: Value
    """The uint8 activation the matmul dequantizes."""
    activation_scale: Union[float, Value]
    """A constant (static) or the scale output of a DynamicQuantizeLinear."""
    activation_zero: Union[int, Value]
    weight: np.ndarray
    """int8 [N, K]."""
    weight_scale: np.ndarray
    """float32 [N]."""
    absorbed: list[Node]
    """The matmul, then the bias Add, Gelu and requantizing QuantizeLinear folded into it."""
    dequantized: list[Node]
    """The DequantizeLinear nodes of its inputs that only the matmul reads (not run)."""
    bias: Optional[np.ndarray] = None
    gelu: Optional[str] = None
    output: Optional[tuple[float, int]] = None
    """(scale, zero point) of the uint8 output when the linear requantizes; None: float32."""
    residual: Optional[Value] = None
    """The skip input of the SkipLayerNorm whose residual add the linear does."""
    norm: Optional[Node] = None
    """That SkipLayerNorm: it normalizes the linear's result (the sum), adding nothing."""

    @property
    def last(self) -> Node:
        """The node whose output the linear's result stands for."""
        return self.absorbed[-1]

    @property
    def skipped(self) -> list[Node]:
        """The graph's nodes this linear stands for besides the matmul itself."""
        return self.absorbed[1:] + self.dequantized


def qlinear_available() -> bool:
    """Whether torch has oneDNN's int8 linear here."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.onednn.qlinear_pointwise.default
        torch.ops.onednn.qlinear_prepack.default
    except (AttributeError, RuntimeError):
        return False
    return True


def plan_qlinears(graph: Graph) -> dict[int, QLinearPlan]:
    """{id(MatMul, Gemm or MatMulInteger node): plan} for every quantized matmul that runs as
    an int8 linear."""
    plans: dict[int, QLinearPlan] = {}
    for node in graph.nodes:
        plan = _plan(node)
        if plan is not None:
            plans[id(node)] = plan
    read_by_linears = _activation_dequantizers(plans)
    for plan in plans.values():
        _requantize(plan, read_by_linears)
    return plans


def _activation_dequantizers(plans: dict[int, QLinearPlan]) -> set[int]:
    """Ids of the DequantizeLinear nodes that only an int8 linear's activation reads (not run)."""
    return {
        id(dq) for plan in plans.values() for dq in plan.dequantized if dq is plan.absorbed[0].inputs[0].producer  # type: ignore[union-attr]
    }


@dataclasses.dataclass
class QuantizePlan:
    """A QuantizeLinear feeding only int8 linears, run as one `torch.quantize_per_tensor`."""

    source: Value
    """The float32 tensor quantized: the QuantizeLinear's input, or the folded Mul's."""
    scale: float
    zero: int
    multiplier: Optional[np.ndarray]
    """float32 [K]: a folded Mul's constant factors divided by `scale` (then the scale used is 1)."""
    absorbed: list[Node]
    """The folded Mul, if any, then the QuantizeLinear."""

    @property
    def last(self) -> Node:
        return self.absorbed[-1]


def fast_quantize_available() -> bool:
    """Whether this torch has `quantize_per_tensor` (deprecated in torch 2.13's docs)."""
    import torch

    return hasattr(torch, "quantize_per_tensor")


def plan_quantizers(graph: Graph, plans: dict[int, QLinearPlan]) -> dict[int, QuantizePlan]:
    """{id(QuantizeLinear): plan} for each uint8 QuantizeLinear (constant scalar scale and zero
    point, float32 input) whose output only int8 linears of `plans` read, and that no linear
    already requantizes into. A Mul by a constant float32 vector along the last axis, read only
    by the QuantizeLinear (smooth-quant's factors), folds into it."""
    read_by_linears = _activation_dequantizers(plans)
    folded = {id(node) for plan in plans.values() for node in plan.skipped}
    quantizers: dict[int, QuantizePlan] = {}
    for node in graph.nodes:
        if node.domain != "" or node.op_type != "QuantizeLinear" or id(node) in folded or node.inputs[0] is None:
            continue
        if node.inputs[0].dtype != DType.FLOAT or node.output.dtype != DType.UINT8 or node.output.is_graph_output:
            continue
        if int(node.attrs.get("block_size", 0)) or int(node.attrs.get("saturate", 1)) != 1:
            continue
        params = _scalar_params(node, DType.UINT8)
        uses = node.output.uses()
        if params is None or not uses or any(id(u.node) not in read_by_linears for u in uses):
            continue
        plan = QuantizePlan(node.inputs[0], params[0], params[1], None, [node])
        _fold_factors(plan)
        quantizers[id(node)] = plan
    return quantizers


def plan_dynamic_quantizers(graph: Graph, plans: dict[int, QLinearPlan]) -> set[int]:
    """Ids of the DynamicQuantizeLinear nodes (float32 input) whose uint8 output only int8
    linears of `plans` read: `dynamic_quantize_uint8` runs them."""
    dynamic = set()
    for node in graph.nodes:
        if node.domain != "" or node.op_type != "DynamicQuantizeLinear" or node.inputs[0] is None or node.inputs[0].dtype != DType.FLOAT:
            continue
        uses = node.outputs[0].uses()
        if uses and not node.outputs[0].is_graph_output and all(id(u.node) in plans and u.index == 0 for u in uses):
            dynamic.add(id(node))
    return dynamic


def _fold_factors(plan: QuantizePlan) -> None:
    """Fold `Mul(x, c)` (c a constant float32 vector over x's last axis, the Mul read only by
    the QuantizeLinear) into `plan`: it then quantizes x * (c / scale) with scale 1."""
    mul = plan.source.producer
    if mul is None or mul.domain != "" or mul.op_type != "Mul" or len(mul.inputs) != 2 or sole_user(plan.source) is not plan.last:
        return
    for x, c in (mul.inputs, reversed(mul.inputs)):
        factors = constant_data(c, limit=None) if c is not None else None
        if x is None or factors is None or factors.dtype != np.float32 or x.type.rank is None or x.type.rank < 1:
            continue
        width = x.type.shape[-1]
        if not isinstance(width, int) or factors.size != width or factors.shape[-1:] != (width,) or factors.ndim > x.type.rank:
            continue
        if x.dtype != DType.FLOAT or x.const is not None or not np.all(np.isfinite(factors)):
            continue
        plan.multiplier = np.ascontiguousarray(factors.reshape(width) / np.float32(plan.scale), dtype=np.float32)
        plan.source, plan.scale = x, 1.0
        plan.absorbed.insert(0, mul)
        return


def quantize_uint8(x: Any, scale: float, zero: int, multiplier: Any = None) -> Any:
    """round(x / scale) + zero (or round(x * multiplier) + zero, with scale 1), clamped to
    [0, 255], as a plain uint8 tensor: one vectorized `torch.quantize_per_tensor` pass whose
    quint8 storage is viewed as uint8 (no copy). torch multiplies by 1 / scale where ONNX
    divides, and rounds ties to even after adding the zero point where ONNX rounds before, so
    a value on or within float32 rounding of a rounding boundary may land one step away."""
    if multiplier is not None:
        x = x * multiplier
    return _quantized_codes(x, scale, zero)


def dynamic_quantize_uint8(x: Any) -> tuple[Any, Any, Any]:
    """DynamicQuantizeLinear's (y, y_scale, y_zero_point), y from one `torch.quantize_per_tensor`
    pass as in `quantize_uint8` (with its rounding); the scale and zero point are exact."""
    import torch

    from graphopt.exporters.torch_kernels import dynamic_quantize_params

    scale, zero_point = dynamic_quantize_params(x)
    return _quantized_codes(x, scale, zero_point.long()), scale, zero_point.to(torch.uint8)


def _quantized_codes(x: Any, scale: Any, zero: Any) -> Any:
    """`torch.quantize_per_tensor(x, scale, zero, quint8)`'s codes as a plain uint8 tensor:
    the quint8 tensor's storage, viewed (no copy)."""
    import torch

    with warnings.catch_warnings():  # the quantized tensor type is deprecated; only its storage is used
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_tensor(x, scale, zero, torch.quint8)
    codes = torch.empty((0,), dtype=torch.uint8, device=quantized.device)
    return codes.set_(quantized.untyped_storage(), quantized.storage_offset(), quantized.shape, quantized.stride())


def _plan(node: Node) -> Optional[QLinearPlan]:
    if node.domain == "" and node.op_type == "MatMulInteger":
        return _plan_dynamic(node)
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None or x.type.rank is None or x.type.rank < 2:
        return None
    activation = _activation(x)
    weight = _weight(node, w)
    if activation is None or weight is None:
        return None
    plan = QLinearPlan(activation[0], activation[1], activation[2], weight[0], weight[1], absorbed=[node], dequantized=[])
    width = weight[0].shape[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        plan.bias = _gemm_bias(node.inputs[2], width)
        if plan.bias is None:
            return None
    absorb_epilogue(plan, width, np.dtype(np.float32))
    _absorb_residual(plan, width)
    plan.dequantized = [
        v.producer for v in node.inputs
        if v is not None and v.producer is not None and v.producer.op_type == "DequantizeLinear" and sole_user(v) is node
    ]
    return plan


def _plan_dynamic(node: Node) -> Optional[QLinearPlan]:
    """`Mul(Cast(MatMulInteger(a, W, a_zero, 0), float), Mul(a_scale, w_scale))` with (a, a_scale,
    a_zero) the outputs of one DynamicQuantizeLinear: quantize{mode=dynamic}'s chain."""
    a, w = node.inputs[0], node.inputs[1]
    quantizer = a.producer if a is not None else None
    if quantizer is None or quantizer.domain != "" or quantizer.op_type != "DynamicQuantizeLinear" or a is not quantizer.outputs[0]:
        return None
    if len(node.inputs) < 3 or node.inputs[2] is not quantizer.outputs[2] or a.type.rank is None or a.type.rank < 2:
        return None
    data = constant_data(w, limit=None) if w is not None else None
    w_zero = node.inputs[3] if len(node.inputs) > 3 else None
    zero = None if w_zero is None else constant_data(w_zero, limit=None)
    if data is None or data.dtype != np.int8 or data.ndim != 2 or (w_zero is not None and (zero is None or np.any(zero != 0))):
        return None
    cast = sole_user(node.output)
    if cast is None or cast.domain != "" or cast.op_type != "Cast" or int(cast.attrs.get("to", 0)) != DType.FLOAT.value:
        return None
    mul = sole_user(cast.output)
    if mul is None or mul.domain != "" or mul.op_type != "Mul":
        return None
    scales = mul.inputs[1] if mul.inputs[0] is cast.output else mul.inputs[0]
    product = scales.producer if scales is not None else None
    if product is None or product.domain != "" or product.op_type != "Mul" or quantizer.outputs[1] not in product.inputs:
        return None
    other = product.inputs[1] if product.inputs[0] is quantizer.outputs[1] else product.inputs[0]
    w_scale = constant_data(other, limit=None) if other is not None else None
    width = data.shape[1]
    if w_scale is None or w_scale.dtype != np.float32 or w_scale.size not in (1, width) or w_scale.shape[-1:] not in ((1,), (width,), ()):
        return None
    plan = QLinearPlan(a, quantizer.outputs[1], quantizer.outputs[2], np.ascontiguousarray(data.T),
                       np.ascontiguousarray(np.broadcast_to(w_scale.reshape(-1), (width,))), absorbed=[node, cast, mul], dequantized=[])
    absorb_epilogue(plan, width, np.dtype(np.float32))
    _absorb_residual(plan, width)
    plan.dequantized = [product] if sole_user(scales) is mul else []
    return plan


def _absorb_residual(plan: QLinearPlan, width: int) -> None:
    """Give `plan` the residual add of the `graphopt::SkipLayerNorm` that alone reads its float
    result as `x` (no Gelu folded; the skip a float32 tensor of the result's own shape, so
    nothing broadcasts): the norm's bias joins the linear's bias."""
    result = plan.last.output
    norm = sole_user(result)
    if plan.gelu is not None or norm is None or norm.domain != GRAPHOPT_DOMAIN or norm.op_type != "SkipLayerNorm":
        return
    skip = norm.inputs[1] if len(norm.inputs) > 1 else None
    if norm.inputs[0] is not result or skip is None or skip is result or skip.dtype != DType.FLOAT:
        return
    if skip.type.shape is None or result.type.shape is None or tuple(skip.type.shape) != tuple(result.type.shape):
        return
    norm_bias = norm.inputs[4] if len(norm.inputs) > 4 else None
    if norm_bias is not None:
        extra = constant_data(norm_bias, limit=None)
        if extra is None or extra.dtype != np.float32 or extra.size != width or extra.shape[-1:] != (width,):
            return
        extra = extra.reshape(width)
        plan.bias = extra.copy() if plan.bias is None else plan.bias + extra
    plan.residual, plan.norm = skip, norm


def _dequantize_node(value: Value) -> Optional[Node]:
    """The plain DequantizeLinear (float32 output, no blocks) producing `value`."""
    node = value.producer
    if node is None or node.domain != "" or node.op_type != "DequantizeLinear" or value.dtype != DType.FLOAT:
        return None
    if int(node.attrs.get("block_size", 0)) or int(node.attrs.get("output_dtype", 0)) not in (0, DType.FLOAT.value):
        return None
    return node


def _scalar_params(node: Node, zero_type: DType) -> Optional[tuple[float, int]]:
    """(scale, zero point) of a Q/DQ node with a constant scalar scale and zero point."""
    scale = constant_data(node.inputs[1]) if node.inputs[1] is not None else None
    zero_value = node.inputs[2] if len(node.inputs) > 2 else None
    zero = np.zeros(1) if zero_value is None else constant_data(zero_value)
    if scale is None or zero is None or scale.size != 1 or zero.size != 1 or scale.dtype != np.float32:
        return None
    if zero_value is not None and zero_value.dtype != zero_type:
        return None
    return float(scale.reshape(())), int(zero.reshape(()))


def _activation(x: Value) -> Optional[tuple[Value, float, int]]:
    node = _dequantize_node(x)
    if node is None or node.inputs[0] is None or node.inputs[0].dtype != DType.UINT8 or node.inputs[0].const is not None:
        return None
    params = _scalar_params(node, DType.UINT8)
    return None if params is None else (node.inputs[0], *params)


def _weight(matmul: Node, w: Value) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """([N, K] int8 weight, [N] float32 scales) of a matmul's dequantized constant weight."""
    node = _dequantize_node(w)
    if node is None or node.inputs[0] is None:
        return None
    data = constant_data(node.inputs[0], limit=None)
    if data is None or data.dtype != np.int8 or data.ndim != 2:
        return None
    transposed = False
    if matmul.op_type == "Gemm":
        if not is_plain_gemm(matmul):
            return None
        transposed = bool(int(matmul.attrs.get("transB", 0)))
    out_axis = 0 if transposed else 1
    width = data.shape[out_axis]
    scale = constant_data(node.inputs[1], limit=None) if node.inputs[1] is not None else None
    zero_value = node.inputs[2] if len(node.inputs) > 2 else None
    zero = None if zero_value is None else constant_data(zero_value, limit=None)
    if scale is None or scale.dtype != np.float32 or (zero_value is not None and (zero is None or np.any(zero != 0))):
        return None
    if scale.size == 1:
        scale = np.full(width, float(scale.reshape(())), np.float32)
    elif scale.ndim != 1 or scale.size != width or int(node.attrs.get("axis", 1)) % 2 != out_axis:
        return None
    matrix = data if transposed else data.T
    return np.ascontiguousarray(matrix), np.ascontiguousarray(scale)


def _gemm_bias(c: Value, width: int) -> Optional[np.ndarray]:
    """A Gemm's bias as a float32 [width] vector: a float constant, or a constant int32 vector
    through a DequantizeLinear (computed as that DequantizeLinear does)."""
    data = constant_data(c, limit=None)
    if data is None:
        node = _dequantize_node(c)
        if node is None or any(v is None for v in node.inputs[:2]):
            return None
        q, scale = constant_data(node.inputs[0], limit=None), constant_data(node.inputs[1], limit=None)
        zero = constant_data(node.inputs[2], limit=None) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(1, np.int32)
        if q is None or scale is None or zero is None or q.dtype != np.int32 or scale.dtype != np.float32:
            return None
        data = (q.astype(np.float32) - zero.astype(np.float32)) * scale
    if data.dtype != np.float32 or data.size != width or data.shape[-1:] != (width,):
        return None
    return np.ascontiguousarray(data.reshape(width))


def _requantize(plan: QLinearPlan, read_by_linears: set[int]) -> None:
    """Fold the QuantizeLinear that alone reads the result when only int8 linears (through
    DequantizeLinear nodes they absorb) read its uint8 output."""
    quant = sole_user(plan.last.output)
    if quant is None or quant.domain != "" or quant.op_type != "QuantizeLinear" or quant.inputs[0] is not plan.last.output:
        return
    if quant.output.dtype != DType.UINT8 or quant.output.is_graph_output or int(quant.attrs.get("block_size", 0)):
        return
    params = _scalar_params(quant, DType.UINT8)
    uses = quant.output.uses()
    if params is None or not uses or any(id(u.node) not in read_by_linears for u in uses):
        return
    plan.output = params
    plan.absorbed.append(quant)


def pack_weight(weight: np.ndarray) -> Any:
    """The int8 [N, K] weight reordered into oneDNN's blocked layout."""
    import torch

    return torch.ops.onednn.qlinear_prepack.default(torch.tensor(weight), None)


def qlinear_call(
    plan: QLinearPlan, x: Any, x_scale: Any, x_zero: Any, weight: Any, weight_scale: Any, weight_zero: Any, bias: Any,
    residual: Any = None,
) -> tuple[Any, tuple[Any, ...]]:
    """(op, args) of the `qlinear_pointwise` call computing `plan` on the (fx) values given;
    `x_scale`/`x_zero` are the activation's (numbers, or tensors for a dynamic activation);
    `residual`: the contiguous skip tensor a plan with a residual adds."""
    import torch

    scale, zero = plan.output if plan.output is not None else (1.0, 0)
    dtype = torch.uint8 if plan.output is not None else torch.float32
    post = ("gelu", plan.gelu) if plan.gelu is not None else ("none", "")
    op = torch.ops.onednn.qlinear_pointwise
    static = isinstance(plan.activation_scale, float)
    if plan.residual is not None:  # no Gelu then (`_absorb_residual`)
        args = (x, x_scale, x_zero, weight, weight_scale, weight_zero, residual, bias, scale, zero, dtype, 1.0, 0, "add", 1.0, "none", [], "")
        return (op.binary if static else op.binary_tensor), args
    args = (x, x_scale, x_zero, weight, weight_scale, weight_zero, bias, scale, zero, dtype, post[0], [], post[1])
    return (op.default if static else op.tensor), args
