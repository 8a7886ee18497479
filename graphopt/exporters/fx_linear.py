"""Prepacked oneDNN linears for the CPU torch target.

`plan_linears(graph)` finds the matmuls with a constant float32 or bfloat16 weight that can
run as `torch.ops.mkldnn._linear_pointwise` over a weight reordered once, at build time, into
oneDNN's blocked layout (what inductor does only with `freezing=True`):

- `MatMul(x, W)` with W a constant [K, N] matrix and x of rank >= 2;
- `Gemm(A, B, C)` with alpha = beta = 1, transA = 0 and a constant B (transB either way);
- the bias of a following `Add(matmul, b)` (b a constant [N] vector of the weight's type, the
  matmul read by that Add only) is folded into the linear, and so is a following
  `graphopt::Gelu` (its bias too) as the linear's fused "gelu" post-op.

bfloat16 linears (the graphs of `to-bf16`) accumulate in float32 inside oneDNN and round once,
after the bias and GELU, where the unfused graph rounds the matmul, the bias sum and the GELU
to bfloat16 each: the fused result is the more exact one. They are planned only where oneDNN
runs bfloat16 on this CPU (`prepacked_dtypes`).

Measured on a 2-core AMD EPYC (Zen 4, torch 2.13): a [128, 768] x [768, 3072] float32 linear
runs 1.5-2x faster prepacked than `F.linear`, which goes through MKL's sgemm; in bfloat16
(avx512_bf16) the prepacked linear reaches ~385-410 GFLOP/s against ~340-390 for `torch.matmul`.
Float32 results match the plain matmul within float32 rounding (another summation order).
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from typing import Any, Optional

import numpy as np

from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.ir.ops.onnx import is_plain_gemm
from graphopt.ir.schema import GRAPHOPT_DOMAIN

_LOG = logging.getLogger("graphopt")


@dataclasses.dataclass
class LinearPlan:
    """A matmul node run as one prepacked linear; `absorbed` nodes are folded into it."""

    weight: np.ndarray
    """[N, K] float32 or bfloat16 (ml_dtypes), as `F.linear` takes it."""
    bias: Optional[np.ndarray] = None
    gelu: Optional[str] = None
    absorbed: list[Node] = dataclasses.field(default_factory=list)

    @property
    def last(self) -> Node:
        """The node whose output the linear's result stands for."""
        return self.absorbed[-1]


def prepacked_linear_available() -> bool:
    import torch

    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def prepacked_dtypes() -> frozenset[DType]:
    """The weight types oneDNN's prepacked linear runs here: float32 where torch has oneDNN,
    bfloat16 too where oneDNN runs it on this CPU (avx512bw and up; natively with avx512_bf16
    or AMX, else emulated)."""
    import torch

    if not prepacked_linear_available():
        return frozenset()
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return frozenset({DType.FLOAT, DType.BFLOAT16})
    return frozenset({DType.FLOAT})


def missing_cpu_bf16_features() -> Optional[str]:
    """On an x86 CPU without native bfloat16 matmuls, the features it lacks ("avx512_bf16 and
    AMX (amx_tile)"), else None (also on other architectures, whose bfloat16 support torch
    does not report)."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return "avx512_bf16 and AMX (amx_tile)"


def warn_if_bf16_emulated(graph: Graph) -> None:
    """Log a warning (logger "graphopt") when `graph` has bfloat16 matmuls and this CPU would
    emulate them (`missing_cpu_bf16_features`). Call it for graphs built to run on the CPU."""
    if not any(
        n.domain == "" and n.op_type in ("MatMul", "Gemm") and any(v is not None and v.dtype == DType.BFLOAT16 for v in n.inputs)
        for n in graph.nodes
    ):
        return
    missing = missing_cpu_bf16_features()
    if missing is not None:
        _LOG.warning(
            "graph '%s': this CPU lacks %s, so its bfloat16 matmuls are emulated and run slower than float32 "
            "(results stay right); run the float32 graph (without to-bf16) for speed on this machine",
            graph.name, missing,
        )


def plan_linears(graph: Graph, dtypes: frozenset[DType] = frozenset({DType.FLOAT})) -> dict[int, LinearPlan]:
    """{id(matmul node): plan} for every matmul whose constant weight is of one of `dtypes`
    that can run as a prepacked linear."""
    plans: dict[int, LinearPlan] = {}
    for node in graph.nodes:
        if node.domain != "":
            continue
        weight = _weight(node, dtypes)
        if weight is None:
            continue
        plan = LinearPlan(weight, absorbed=[node])
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = _bias_vector(node.inputs[2], weight.shape[0], weight.dtype)
            if bias is None:
                continue
            plan.bias = bias
        absorb_epilogue(plan, weight.shape[0], weight.dtype)
        plans[id(node)] = plan
    return plans


def _weight(node: Node, dtypes: frozenset[DType]) -> Optional[np.ndarray]:
    if node.op_type == "MatMul":
        x, w = node.inputs
        data = _constant_of(w, dtypes) if w is not None else None
        if data is None or data.ndim != 2 or x is None or x.type.rank is None or x.type.rank < 2:
            return None
        return np.ascontiguousarray(data.T)
    if is_plain_gemm(node):
        data = _constant_of(node.inputs[1], dtypes) if node.inputs[1] is not None else None
        if data is None or data.ndim != 2:
            return None
        return np.ascontiguousarray(data if int(node.attrs.get("transB", 0)) else data.T)
    return None


def _constant_of(value: Value, dtypes: frozenset[DType]) -> Optional[np.ndarray]:
    """The constant data of `value` if it is of one of `dtypes`."""
    return constant_data(value, limit=None) if value.dtype in dtypes else None


def _bias_vector(value: Value, width: int, dtype: np.dtype) -> Optional[np.ndarray]:
    data = constant_data(value, limit=None)
    if data is None or data.dtype != dtype:
        return None
    if data.size == width and data.shape[-1:] == (width,):
        return np.ascontiguousarray(data.reshape(width))
    return None


def sole_user(value: Value) -> Optional[Node]:
    """The one node reading `value`, if nothing else (no other node, no graph output) does."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output:
        return None
    return uses[0].node


def absorb_epilogue(plan: Any, width: int, dtype: np.dtype) -> None:
    """Fold into `plan` (a `LinearPlan` or `fx_qlinear.QLinearPlan`: `absorbed`, `bias`, `gelu`)
    a bias Add and then a Gelu that read the matmul's result (and nothing else does); the bias
    must be a constant [width] vector of `dtype`."""
    user = sole_user(plan.last.output)
    if plan.bias is None and user is not None and user.domain == "" and user.op_type == "Add":
        other = user.inputs[1] if user.inputs[0] is plan.last.output else user.inputs[0]
        bias = _bias_vector(other, width, dtype) if other is not None and other is not plan.last.output else None
        if bias is not None:
            plan.bias = bias
            plan.absorbed.append(user)
            user = sole_user(user.output)
    if user is not None and user.domain == GRAPHOPT_DOMAIN and user.op_type == "Gelu" and user.inputs[0] is plan.last.output:
        approximate = str(user.attrs.get("approximate", "none"))
        gelu_bias = user.inputs[1] if len(user.inputs) > 1 else None
        if gelu_bias is not None:
            if plan.bias is not None:
                return
            bias = _bias_vector(gelu_bias, width, dtype)
            if bias is None:
                return
            plan.bias = bias
        plan.gelu = approximate
        plan.absorbed.append(user)


def pack_weight(weight: np.ndarray) -> Any:
    """The [N, K] weight reordered into oneDNN's blocked layout."""
    import torch

    from graphopt.ir.torch_arrays import to_torch

    return torch.ops.mkldnn._reorder_linear_weight(to_torch(weight), None)


def packed_linear(x: Any, weight: Any, bias: Any = None, *, gelu: Optional[str] = None) -> Any:
    """y = x @ W^T (+ bias), gelu'd if asked, with the prepacked weight."""
    import torch

    if not x.is_contiguous():
        x = x.contiguous()
    if gelu is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], gelu)
