"""The `torch` target: the graph as a torch.fx GraphModule built from torch kernels.

Spec: ``torch[:cpu|:cuda]{prepack=True|False,keep_heap=True|False}``. Fused attention runs as
`scaled_dot_product_attention` (bfloat16/float16 on CPU: two batched GEMMs around a softmax;
the keys a right-padded batch's mask blocks in every row left out, exactly; see
`graphopt.exporters.graphopt_kernels`); on CPU, matmuls with constant float32 or bfloat16 weights run
as oneDNN linears over weights packed once at compile time (bias and GELU folded in), unless
`prepack=False`. With `prepack`, the int8 matmuls of `quantize{mode=static}` and
`quantize{mode=dynamic}` run as oneDNN int8 linears too (`torch.ops.onednn.qlinear_pointwise`:
weights prepacked, bias and GELU folded, uint8 outputs where only int8 linears read the
requantized result) where torch has them, else as reference kernels. A CPU graph with
bfloat16 matmuls compiled on an x86 CPU without avx512_bf16 or AMX logs a warning (logger
"graphopt"): the bfloat16 arithmetic is emulated there, slower than float32; the results are
still right. On CPU, `keep_heap` (default on) keeps freed tensor memory in the process heap
for the next call instead of glibc returning it to the OS (`graphopt.cpu_heap`, process-wide),
as ONNX Runtime's CPU arena does.
Called with torch tensors it returns torch tensors on the target's device; with numpy
arrays, numpy arrays. The saved artifact is the optimized graph as ONNX with graphopt's
own ops kept (`graph.onnx`); loading rebuilds the module from it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from graphopt import cpu_heap
from graphopt.exporters import fx_linear, torch_kernels
from graphopt.ir.graph import Graph
from graphopt.target_base import CompiledModel, IOSpec, Target
from graphopt.ir.torch_arrays import to_numpy, to_torch

GRAPH_FILE = "graph.onnx"


@dataclasses.dataclass
class TorchTarget(Target):
    """PyTorch eager kernels (SDPA for fused attention) in a torch.fx GraphModule."""

    name = "torch"
    variants = ("cpu", "cuda")
    prepack: bool = True
    """CPU: run matmuls with constant weights (float32, bfloat16, int8 quantized) as oneDNN
    linears over prepacked weights."""
    keep_heap: bool = True
    """CPU: keep freed tensor memory in the process heap for reuse (glibc malloc tuning, process-wide;
    `graphopt.cpu_heap`, where the measurements are)."""

    def available(self) -> Optional[str]:
        try:
            import torch
        except ImportError:
            return "the torch package is not installed"
        if self.variant == "cuda" and not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None

    def unsupported_nodes(self, graph: Graph) -> list[Any]:
        return [n for n in graph.nodes if torch_kernels.get_kernel(n.domain, n.op_type) is None]

    def compile(self, graph: Graph) -> "TorchModel":
        return TorchModel(self, graph)

    def load(self, directory: str, manifest: dict[str, Any]) -> "TorchModel":
        from graphopt.frontends.onnx_import import from_onnx

        return TorchModel(self, from_onnx(os.path.join(directory, GRAPH_FILE)))


class TorchModel(CompiledModel):
    """A GraphModule on the target's device."""

    def __init__(self, target: TorchTarget, graph: Graph) -> None:
        super().__init__(target, [IOSpec.of(v) for v in graph.inputs], [IOSpec.of(v) for v in graph.outputs])
        self.graph = graph
        self.device = target.variant or "cpu"
        prepack = target.prepack and self.device == "cpu"
        if self.device == "cpu" and target.keep_heap:
            cpu_heap.keep_freed_memory()
        if self.device == "cpu" and not prepack:
            fx_linear.warn_if_bf16_emulated(graph)  # to_fx warns itself when it prepacks
        self.module = graph.to_fx(prepack_linears=prepack).to(self.device)

    def _call(self, feeds: dict[str, Any]) -> list[Any]:
        import torch

        as_numpy = not any(isinstance(v, torch.Tensor) for v in feeds.values())
        args = [to_torch(feeds[name], self.device) for name in self.input_names]
        with torch.no_grad():
            outputs = self.module(*args)
        if as_numpy:
            return [to_numpy(o) for o in outputs]
        return list(outputs)

    def _save_files(self, directory: str) -> list[str]:
        self.graph.save_onnx(os.path.join(directory, GRAPH_FILE), keep_graphopt_ops=True)
        return sorted(name for name in os.listdir(directory) if name.startswith(GRAPH_FILE))

