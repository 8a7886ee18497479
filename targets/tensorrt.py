"""The `tensorrt` target: the graph as ONNX, built into a TensorRT engine, run on an NVIDIA GPU.

Spec: ``tensorrt{precision=fp32|fp16|int8, workspace_gb=4, profiles={batch: [1, 8, 32],
seq: [1, 128, 512]}, engine_cache=FOLDER}``.

- Import-gated: without the `tensorrt` package or a CUDA GPU, `available()` says what is
  missing and `graphopt.compile` refuses the target with that sentence; nothing here imports
  tensorrt before a build.
- Lowering (`tensorrt_lowering`): `lowering()` decomposes graphopt's ops into standard ONNX
  (`decompose-graphopt-ops`); the build then gives the engine int32 I/O for int64 inputs and
  outputs, and keeps and checks explicit Q/DQ (symmetric int8).
- `unsupported_nodes`: ops the parser has not (com.microsoft's MatMulNBits from weight-only
  quantization, dynamic quantization's MatMulInteger) and element types it does not take
  (`TENSOR_TYPES`, `QUANTIZED_TYPES`), named with their types at compile time.
- Profiles (`tensorrt_profiles`): one optimization profile covering every dynamic dim, by dim
  name, from the `profiles` option or the defaults documented there.
- Precision and flags (`tensorrt_engine.builder_plan`): fp16 sets the FP16 flag; int8 needs
  the graph's Q/DQ nodes (run `quantize` first) and builds a strongly typed network.
- Engines are cached in `engine_cache` (default ``~/.cache/graphopt/tensorrt``) under a
  hash of the ONNX bytes, profiles, precision, workspace, TensorRT version and GPU name.
- The saved artifact is `model.plan` (the engine), `model.onnx` (the lowered graph, to rebuild
  the engine on another GPU or TensorRT version) and the manifest's `tensorrt` entry;
  `load_compiled` deserializes the plan, or rebuilds from `model.onnx` when the GPU or the
  TensorRT version differs from the one that built it.

Engine building and running are written against TensorRT 10's Python API and have not been
run on a GPU in this repository's tests; the lowering, profiles and flags are tested.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Literal, Optional, Sequence

import numpy as np

from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node
from graphopt.pass_base import Pass
from graphopt.registry import get_pass
from graphopt.target_base import CompiledModel, IOSpec, Target, TargetError
from graphopt.targets.dtype_support import node_dtypes, refused_types_reason
from graphopt.targets.tensorrt_engine import Profiles, builder_plan
from graphopt.targets.tensorrt_lowering import QDQ_OPS, check_qdq, int32_engine_io, qdq_nodes, unparsed_nodes
from graphopt.targets.tensorrt_profiles import compute_profiles, parse_profiles

PLAN_FILE = "model.plan"
MODEL_FILE = "model.onnx"
DEFAULT_ENGINE_CACHE = os.path.join("~", ".cache", "graphopt", "tensorrt")
NOT_INSTALLED = "the tensorrt package is not installed (pip install tensorrt); it also needs an NVIDIA GPU"
_PRECISIONS = ("fp32", "fp16", "int8")

TENSOR_TYPES = frozenset({DType.FLOAT, DType.FLOAT16, DType.BFLOAT16, DType.INT8, DType.UINT8, DType.INT32, DType.INT64, DType.BOOL})
"""Element types TensorRT 10's ONNX parser takes in any node (onnx-tensorrt's operator
support notes; bfloat16 and float16 run as such, so `to-bf16` and `to-fp16` graphs are kept).
float64 it casts to float32, so a float64 graph would compute other values: refused, as are
int16, the wider unsigned ints, strings and complex numbers, which TensorRT has no type for."""

QUANTIZED_TYPES = frozenset({DType.FLOAT8E4M3FN, DType.INT4, DType.FLOAT4E2M1})
"""Types TensorRT has only as quantized values: taken in QuantizeLinear / DequantizeLinear
(which `check_qdq` narrows further at build time), refused in any other node."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a build needs, computed without TensorRT: the lowered graph, profiles and flags."""

    graph: Graph
    profiles: Profiles
    network_flags: list[str]
    builder_flags: list[str]
    qdq_count: int


@dataclasses.dataclass
class TensorRTTarget(Target):
    """NVIDIA TensorRT: an engine built from the lowered ONNX, with optimization profiles and an engine cache."""

    name = "tensorrt"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    workspace_gb: float = 4.0
    profiles: Any = None
    engine_cache: str = ""

    def __post_init__(self) -> None:
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, got {self.precision!r}")
        if not self.workspace_gb > 0:
            raise ValueError(f"workspace_gb must be > 0 (the builder's scratch memory limit in GiB), got {self.workspace_gb}")
        self.dim_ranges = parse_profiles(self.profiles)

    def available(self) -> Optional[str]:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return NOT_INSTALLED
        except Exception as exc:  # a broken install (missing libnvinfer) must read as unavailable
            return f"the tensorrt package failed to import ({exc}); it needs an NVIDIA GPU and its CUDA libraries"
        try:
            import torch
        except ImportError:
            return "the tensorrt target runs engines on torch CUDA tensors, and torch is not installed"
        if not torch.cuda.is_available():
            return "no NVIDIA GPU is visible (torch.cuda.is_available() is False); TensorRT needs one"
        return None

    @property
    def cache_dir(self) -> str:
        return os.path.abspath(os.path.expanduser(self.engine_cache or DEFAULT_ENGINE_CACHE))

    def unsupported_nodes(self, graph: Graph) -> list[Any]:
        """Nodes TensorRT's ONNX parser cannot build (`unparsed_nodes`: other domains' ops,
        integer-arithmetic quantization) and nodes reading or writing an element type it
        does not take there (`unsupported_dtypes`)."""
        unparsed = set(unparsed_nodes(graph))
        return [n for n in graph.nodes if n in unparsed or unsupported_dtypes(n)]

    def unsupported_reason(self, nodes: Sequence[Any]) -> str:
        """The element types the parser refuses, with the nodes' signatures; "" for nodes it
        cannot parse at all (their op names say it)."""
        return refused_types_reason(
            nodes, unsupported_dtypes, "TensorRT",
            " in these nodes (float8e4m3fn, int4 and float4e2m1 only in QuantizeLinear/DequantizeLinear; "
            "float64 it would compute in float32)",
        )

    def lowering(self) -> list[Pass]:
        """`decompose-graphopt-ops` (TensorRT parses standard ONNX only)."""
        return [get_pass("decompose-graphopt-ops")()]

    def prepare(self, graph: Graph) -> Prepared:
        """A lowered copy of `graph` with int32 engine I/O (`int32_engine_io`), its Q/DQ
        checked against `precision`, and the profiles."""
        lowered = self.lower(graph)
        int32_engine_io(lowered)
        qdq_count = len(qdq_nodes(lowered))
        network_flags, builder_flags = builder_plan(self.precision, qdq_count)
        if qdq_count:
            check_qdq(lowered)
        profiles = compute_profiles(lowered, self.dim_ranges)
        return Prepared(lowered, profiles, network_flags, builder_flags, qdq_count)

    def compile(self, graph: Graph) -> "TensorRTModel":
        prepared = self.prepare(graph)
        staging = tempfile.TemporaryDirectory(prefix="graphopt-trt-")
        prepared.graph.save_onnx(os.path.join(staging.name, MODEL_FILE))
        plan, info = self._engine(staging.name, prepared.profiles, prepared.qdq_count)
        inputs = [IOSpec.of(v) for v in graph.inputs]
        outputs = [IOSpec.of(v) for v in graph.outputs]
        return TensorRTModel(self, inputs, outputs, plan=plan, onnx_dir=staging.name, info=info, keep=staging)

    def load(self, directory: str, manifest: dict[str, Any]) -> "TensorRTModel":
        import tensorrt as trt

        from graphopt.targets.tensorrt_engine import gpu_name

        info = manifest.get("tensorrt") or {}
        inputs = [IOSpec.from_json(d) for d in manifest["inputs"]]
        outputs = [IOSpec.from_json(d) for d in manifest["outputs"]]
        if info.get("version") == trt.__version__ and info.get("gpu") == gpu_name():
            with open(os.path.join(directory, PLAN_FILE), "rb") as handle:
                plan = handle.read()
        else:
            profiles = {name: tuple(tuple(s) for s in shapes) for name, shapes in info.get("profiles", {}).items()}
            plan, info = self._engine(directory, profiles, int(info.get("qdq_count", 0)))  # type: ignore[arg-type]
        return TensorRTModel(self, inputs, outputs, plan=plan, onnx_dir=directory, info=info)

    def _engine(self, onnx_dir: str, profiles: Profiles, qdq_count: int) -> tuple[bytes, dict[str, Any]]:
        """The plan for the ONNX in `onnx_dir`: from the cache, or built and cached."""
        import tensorrt as trt

        from graphopt.targets.tensorrt_engine import build_engine, cached_plan, engine_key, gpu_name, store_plan

        files = [os.path.join(onnx_dir, n) for n in sorted(os.listdir(onnx_dir)) if n.startswith(MODEL_FILE)]
        gpu = gpu_name()
        key = engine_key(files, profiles, self.precision, self.workspace_gb, trt.__version__, gpu)
        plan = cached_plan(self.cache_dir, key)
        if plan is None:
            plan = build_engine(trt, os.path.join(onnx_dir, MODEL_FILE), profiles, self.precision, qdq_count, self.workspace_gb)
            store_plan(self.cache_dir, key, plan)
        info = {
            "version": trt.__version__, "gpu": gpu, "engine_key": key, "precision": self.precision,
            "qdq_count": qdq_count, "profiles": {name: [list(s) for s in shapes] for name, shapes in profiles.items()},
        }
        return plan, info


def unsupported_dtypes(node: Node) -> list[DType]:
    """The element types `node` reads or writes that TensorRT does not take in such a node
    (`TENSOR_TYPES`, plus `QUANTIZED_TYPES` in QuantizeLinear / DequantizeLinear)."""
    allowed = TENSOR_TYPES | QUANTIZED_TYPES if not node.domain and node.op_type in QDQ_OPS else TENSOR_TYPES
    return [d for d in node_dtypes(node) if d not in allowed]


class TensorRTModel(CompiledModel):
    """A deserialized engine; takes and returns numpy arrays or torch tensors (CUDA ones stay on the GPU)."""

    def __init__(self, target: TensorRTTarget, inputs: list[IOSpec], outputs: list[IOSpec], *, plan: bytes, onnx_dir: str, info: dict[str, Any], keep: Any = None) -> None:
        super().__init__(target, inputs, outputs)
        import tensorrt as trt

        from graphopt.targets.tensorrt_engine import EngineRunner

        self.plan, self.onnx_dir, self.info, self._keep = plan, onnx_dir, info, keep
        self.runner = EngineRunner(trt, plan)

    def _call(self, feeds: dict[str, Any]) -> list[Any]:
        import torch

        first = next(iter(feeds.values()), None)
        kind = "numpy" if first is None or not hasattr(first, "detach") else ("cuda" if first.device.type == "cuda" else "cpu")
        device = first.device if kind == "cuda" else torch.device("cuda")
        tensors = {}
        for spec in self.inputs:
            value = feeds[spec.name]
            tensor = value if hasattr(value, "detach") else torch.from_numpy(np.require(value, requirements="C"))
            if tensor.dtype == torch.int64 and tensor.numel() and (tensor.min() < -(2**31) or tensor.max() >= 2**31):
                raise TargetError(f"input {spec.name!r}: int64 values outside the int32 range the engine takes")
            tensors[spec.name] = tensor.to(device)
        outputs = self.runner.run(tensors, self.output_names)
        outputs = [o.to(torch.int64) if spec.dtype == "int64" else o for o, spec in zip(outputs, self.outputs)]
        if kind == "numpy":
            return [o.cpu().numpy() for o in outputs]
        return [o.cpu() for o in outputs] if kind == "cpu" else outputs

    def _save_files(self, directory: str) -> list[str]:
        with open(os.path.join(directory, PLAN_FILE), "wb") as handle:
            handle.write(self.plan)
        names = [PLAN_FILE]
        for name in sorted(os.listdir(self.onnx_dir)):
            if name.startswith(MODEL_FILE):
                shutil.copyfile(os.path.join(self.onnx_dir, name), os.path.join(directory, name))
                names.append(name)
        return names

    def _manifest_extra(self) -> dict[str, Any]:
        return {"tensorrt": self.info}
