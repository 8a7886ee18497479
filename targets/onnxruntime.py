"""The `onnxruntime` target: the graph as ONNX, run in an ONNX Runtime InferenceSession.

Spec: ``onnxruntime[:cpu|:cuda]{threads=N, optimization_level=all|extended|basic|disable,
contrib_ops=True|False}``. graphopt's fused ops are lowered to the com.microsoft contrib
kernels ORT accelerates where `contrib_ops` is on and to standard ONNX otherwise (the
target's `lowering()`: `lower-onnxruntime{device=...}`, eliminate-dead-code, then
`decompose-graphopt-ops` for the rest; see `onnxruntime_lowering`). On CPU its sessions turn off ORT's SkipLayerNormFusion (see
`OnnxRuntimeTarget.disabled_optimizers`). On CUDA, inputs given as CUDA torch tensors are
bound in place (IO binding) and outputs come back as CUDA tensors. Low-precision graph inputs and
outputs (bfloat16, float8, int4/uint4) are fed and returned bit-exactly through `graphopt.ort_io`
(the session's copy of the model is widened; the artifact is not). Nodes the provider has no
kernel for with their element types (bfloat16 Add or MatMul on CPU) are refused at compile
time, naming op and types (`unsupported_nodes`, `onnxruntime_kernels`). The saved artifact is
`model.onnx` (plus `model.onnx.data` for models over ~1.8 GB).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Literal, Optional, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.exporters.onnx_export import EXTERNAL_DATA_THRESHOLD
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph
from graphopt.ort_io import run_by_batch_rows, session_model_file, widen_session_model
from graphopt.pass_base import Pass
from graphopt.registry import get_pass
from graphopt.target_base import CompiledModel, IOSpec, Target, TargetError
from graphopt.targets.dtype_support import advice, listing, node_dtypes, signature
from graphopt.targets.onnxruntime_kernels import MissingKernel, missing_kernel

MODEL_FILE = "model.onnx"
_LEVELS = ("disable", "basic", "extended", "all")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclasses.dataclass
class OnnxRuntimeTarget(Target):
    """ONNX Runtime on CPU or CUDA, with graphopt's fused ops lowered to ORT's contrib kernels."""

    name = "onnxruntime"
    variants = ("cpu", "cuda")
    threads: int = 0
    optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    contrib_ops: bool = True

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: ONNX Runtime's default), got {self.threads}")

    def available(self) -> Optional[str]:
        try:
            import onnxruntime
        except ImportError:
            return "the onnxruntime package is not installed (pip install onnxruntime)"
        if _PROVIDERS[self.variant] not in onnxruntime.get_available_providers():
            return f"this onnxruntime build has no {_PROVIDERS[self.variant]} (pip install onnxruntime-gpu for CUDA)"
        return None

    def unsupported_nodes(self, graph: Graph) -> list[Any]:
        """Nodes the execution provider has no kernel for with the element types they read and
        write (bfloat16 on CPU, mostly), asked of ONNX Runtime itself one node at a time
        (`onnxruntime_kernels`). Where some node has none, a session of the whole lowered graph
        (as `compile` builds it; not for graphs over the external-data threshold) gets the last
        word: ORT's optimizer may remove such a node first (an int4 Identity between Casts)."""
        gaps = self._missing_kernels(graph.nodes)
        if gaps and _weight_bytes(graph) <= EXTERNAL_DATA_THRESHOLD and self._loads(graph):
            return []
        return [gap.node for gap in gaps]

    def unsupported_reason(self, nodes: Sequence[Any]) -> str:
        """The signatures ORT has no kernel for, with the kernel (or op) it lacks, and what to
        use instead; "" when ORT lacks nothing for `nodes`."""
        gaps = self._missing_kernels(nodes)
        if not gaps:
            return ""
        import onnxruntime

        found = listing([f"{signature(g.node)} (no {g.missing})" for g in gaps])
        dtypes = [d for g in gaps for d in node_dtypes(g.node)]
        return f"ONNX Runtime {onnxruntime.__version__}'s {_PROVIDERS[self.variant]} cannot run {found}; {advice(dtypes)}"

    def _missing_kernels(self, nodes: Sequence[Any]) -> list[MissingKernel]:
        settings = (self.variant, self.optimization_level, tuple(self.disabled_optimizers()))
        gaps = (missing_kernel(node, self.session, settings, self.lower) for node in nodes)
        return [gap for gap in gaps if gap is not None]

    def _loads(self, graph: Graph) -> bool:
        """Whether ORT creates a session of the lowered `graph` (low-precision IO widened)."""
        model = self.session_graph(graph).to_onnx(keep_graphopt_ops=True)
        widen_session_model(model)
        try:
            self.session(model.SerializeToString())
        except Exception:  # ORT's own exception classes: the per-node verdicts stand
            return False
        return True

    def session(self, model: Any, options: Any = None) -> Any:
        """An InferenceSession of `model` (bytes or a path) on this target's provider, with
        `options` (default: `session_options()`) and `disabled_optimizers()`."""
        import onnxruntime as ort

        return ort.InferenceSession(
            model, options or self.session_options(), providers=[_PROVIDERS[self.variant]],
            disabled_optimizers=self.disabled_optimizers(),
        )

    def lowering(self) -> list[Pass]:
        """`lower-onnxruntime{device=<variant>}`, eliminate-dead-code and
        eliminate-common-subexpressions (the layers' lowerings build the same shape and
        position computations) where `contrib_ops` is on, then `decompose-graphopt-ops` for
        the graphopt ops left (all of them without `contrib_ops`)."""
        decompose = get_pass("decompose-graphopt-ops")()
        if not self.contrib_ops:
            return [decompose]
        return [
            get_pass("lower-onnxruntime")(device=self.variant), get_pass("eliminate-dead-code")(),
            get_pass("eliminate-common-subexpressions")(), decompose,
        ]

    def session_graph(self, graph: Graph) -> Graph:
        """A lowered copy of `graph` (`lower`), with the opset-23/24 ops in forms ORT computes
        as ONNX specifies (`onnxruntime_onnx23`)."""
        from graphopt.targets.onnxruntime_onnx23 import prepare_onnx23_ops

        return prepare_onnx23_ops(self.lower(graph))

    def compile(self, graph: Graph) -> "OnnxRuntimeModel":
        lowered = self.session_graph(graph)
        inputs = [IOSpec.of(v) for v in graph.inputs]
        outputs = [IOSpec.of(v) for v in graph.outputs]
        return OnnxRuntimeModel(self, inputs, outputs, graph=lowered)

    def load(self, directory: str, manifest: dict[str, Any]) -> "OnnxRuntimeModel":
        inputs = [IOSpec.from_json(d) for d in manifest["inputs"]]
        outputs = [IOSpec.from_json(d) for d in manifest["outputs"]]
        return OnnxRuntimeModel(self, inputs, outputs, path=os.path.join(directory, MODEL_FILE))

    def session_options(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors come back as exceptions, which graphopt reports itself
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization_level]
        return options

    def disabled_optimizers(self) -> list[str]:
        """ORT graph transformers turned off: on CPU, the fusion that would swap Add +
        LayerNormalization for the slower SkipLayerNormalization kernel (the CPU lowering's
        bias-last order escapes it, a norm without a bias does not). Pass the same list to
        an InferenceSession of the saved model to keep that speed."""
        return ["SkipLayerNormFusion"] if self.variant == "cpu" else []


class OnnxRuntimeModel(CompiledModel):
    """An InferenceSession over the lowered model."""

    def __init__(self, target: OnnxRuntimeTarget, inputs: list[IOSpec], outputs: list[IOSpec], *, graph: Optional[Graph] = None, path: Optional[str] = None) -> None:
        super().__init__(target, inputs, outputs)
        self.graph, self.path = graph, path
        self._staging: Optional[Any] = None
        if graph is not None and _weight_bytes(graph) > EXTERNAL_DATA_THRESHOLD:
            self._staging = tempfile.TemporaryDirectory(prefix="graphopt-ort-")
            path = self.path = os.path.join(self._staging.name, MODEL_FILE)
            graph.save_onnx(path, keep_graphopt_ops=True)
            graph = None
        options = target.session_options()
        if graph is not None:
            model = graph.to_onnx(keep_graphopt_ops=True)
            self._io = widen_session_model(model)
            source: Any = model.SerializeToString()
        else:
            source, self._io = session_model_file(path, options)  # type: ignore[arg-type]
        try:
            self.session = target.session(source, options)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            where = path or "the lowered graph"
            raise TargetError(f"ONNX Runtime could not load {where}: {self._io.explain(text[0]) if text else type(exc).__name__}") from None
        self._session_inputs = {i.name for i in self.session.get_inputs()}

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:  # a batched chunked prefill, which GroupQueryAttention refuses, runs one sequence at a time
            return run_by_batch_rows(
                lambda part: self._io.run(self.session, part, self._session_inputs), feeds,
                {spec.name: spec.shape for spec in self.inputs}, [spec.shape for spec in self.outputs],
            )
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise GraphoptError(f"ONNX Runtime failed to run the model: {text[0] if text else type(exc).__name__}") from None

    def _call(self, feeds: dict[str, Any]) -> list[Any]:
        on_cuda = [v for v in feeds.values() if getattr(getattr(v, "device", None), "type", None) == "cuda"]
        if self.target.variant == "cuda" and on_cuda and not self._io:
            return self._run_bound(feeds, on_cuda[0].device)
        return super()._call(feeds)

    def _run_bound(self, feeds: dict[str, Any], device: Any) -> list[Any]:
        """IO binding: CUDA torch tensors in and out, no host copies."""
        import torch

        binding = self.session.io_binding()
        for name, tensor in feeds.items():
            if name not in self._session_inputs:
                continue
            tensor = tensor.contiguous()
            binding.bind_input(name, "cuda", device.index or 0, _numpy_dtype(tensor), tuple(tensor.shape), tensor.data_ptr())
        for output in self.session.get_outputs():
            binding.bind_output(output.name, "cuda", device.index or 0)
        self.session.run_with_iobinding(binding)
        return [torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack") else torch.from_numpy(o.numpy()).to(device) for o in binding.get_outputs()]

    def in_place_kv_cache_unavailable(self) -> Optional[str]:
        from graphopt.targets.onnxruntime_kv_cache import unavailable_reason

        return unavailable_reason(self)

    def in_place_kv_cache(self, *, batch: int, capacity: int) -> Any:
        from graphopt.targets.onnxruntime_kv_cache import KVCacheSession

        return KVCacheSession(self, batch=batch, capacity=capacity)

    def _save_files(self, directory: str) -> list[str]:
        if self.graph is not None:
            self.graph.save_onnx(os.path.join(directory, MODEL_FILE), keep_graphopt_ops=True)
        else:
            source = os.path.dirname(self.path)  # type: ignore[arg-type]
            for name in os.listdir(source):
                if name.startswith(MODEL_FILE):
                    shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))
        return sorted(name for name in os.listdir(directory) if name.startswith(MODEL_FILE))


def _weight_bytes(graph: Graph) -> int:
    return sum(v.const.nbytes for v in graph.constants.values())  # type: ignore[union-attr]


def _numpy_dtype(tensor: Any) -> np.dtype:
    """The numpy dtype of a torch tensor's elements (what ORT's IO binding takes)."""
    return DType.from_torch(tensor.dtype).to_numpy()
