"""Build, cache and run TensorRT engines (TensorRT 10's Python API).

- `builder_plan(precision, qdq_count)`: the network flags and builder flags a precision
  needs. fp32: none; fp16: the FP16 builder flag (TensorRT picks fp16 kernels where faster);
  int8: the graph must carry explicit QuantizeLinear/DequantizeLinear (TensorRT 10 dropped
  implicit calibration), and the network is created STRONGLY_TYPED, so tensor types come
  from the graph (int8 where Q/DQ say so, float elsewhere, fp16 if `to-fp16` ran first) and
  no precision flag is set (TensorRT rejects them on strongly typed networks). A Q/DQ graph
  with fp32/fp16 is refused rather than built with its quantization ignored.
- `engine_key`: sha256 of the ONNX bytes, the profiles, the precision, the workspace limit,
  the TensorRT version and the GPU name; the engine cache holds ``<key>.plan`` files.
- `build_engine(trt, onnx_path, ...)`: OnnxParser -> one optimization profile -> serialized
  plan; parser and builder errors become TargetErrors naming the node. Every TensorRT 10
  network is explicit-batch (the EXPLICIT_BATCH creation flag is deprecated and ignored), so
  no flag is passed for it.
- `EngineRunner`: deserializes a plan and runs it with torch CUDA tensors through
  `set_input_shape`, `set_tensor_address` and `execute_async_v3` on torch's current stream.

Only the pure parts (flags, key) are exercised without a GPU; this module is untested on one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Optional

from graphopt.target_base import TargetError

Profiles = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def builder_plan(precision: str, qdq_count: int) -> tuple[list[str], list[str]]:
    """(NetworkDefinitionCreationFlag names, BuilderFlag names) for `precision`."""
    if precision == "int8":
        if not qdq_count:
            raise TargetError(
                "target 'tensorrt{precision=int8}': the graph has no QuantizeLinear/DequantizeLinear nodes; "
                "TensorRT 10 builds int8 only from explicit Q/DQ (implicit calibration is gone): "
                "run the quantize pass first, e.g. pipeline 'fuse,quantize{activations=int8}' with calibration data"
            )
        return ["STRONGLY_TYPED"], []
    if qdq_count:
        raise TargetError(
            f"target 'tensorrt{{precision={precision}}}': the graph carries {qdq_count} QuantizeLinear/DequantizeLinear "
            "node(s); build it with precision=int8 (a strongly typed network that keeps them)"
        )
    return [], (["FP16"] if precision == "fp16" else [])


def engine_key(onnx_files: list[str], profiles: Profiles, precision: str, workspace_gb: float, trt_version: str, gpu_name: str) -> str:
    """sha256 hex of everything an engine depends on."""
    digest = hashlib.sha256()
    for path in sorted(onnx_files):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    settings = {"profiles": profiles, "precision": precision, "workspace_gb": workspace_gb, "tensorrt": trt_version, "gpu": gpu_name}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def build_engine(trt: Any, onnx_path: str, profiles: Profiles, precision: str, qdq_count: int, workspace_gb: float) -> bytes:
    """Parse `onnx_path` and build a serialized engine (plan bytes)."""
    network_flags, builder_flags = builder_plan(precision, qdq_count)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        text = "; ".join(f"node {e.node_name() or e.node()} ({e.node_operator()}): {e.desc()}" for e in errors[:3]) or "no error reported"
        raise TargetError(f"TensorRT's ONNX parser rejected {onnx_path}: {text}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for name in builder_flags:
        if not hasattr(trt.BuilderFlag, name):
            raise TargetError(
                f"TensorRT {trt.__version__} has no BuilderFlag.{name} (weakly typed precision flags are gone): "
                "run the to-fp16 pass and build with precision=fp32, so the graph's own types are built"
            )
        config.set_flag(getattr(trt.BuilderFlag, name))
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profiles.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TargetError(f"TensorRT could not build an engine from {onnx_path} (precision={precision}); its log above says why")
    return bytes(plan)


def cached_plan(cache_dir: str, key: str) -> Optional[bytes]:
    path = os.path.join(cache_dir, f"{key}.plan")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as handle:
        return handle.read()


def store_plan(cache_dir: str, key: str, plan: bytes) -> None:
    """Write ``<key>.plan`` atomically (a temporary file renamed into place)."""
    os.makedirs(cache_dir, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".plan.tmp", dir=cache_dir)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(plan)
        os.replace(temporary, os.path.join(cache_dir, f"{key}.plan"))
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


class EngineRunner:
    """A deserialized engine and one execution context; runs on torch CUDA tensors."""

    def __init__(self, trt: Any, plan: bytes) -> None:
        import torch

        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise TargetError(f"TensorRT {trt.__version__} could not deserialize the engine (built by another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: _torch_dtype(torch, trt, self.engine.get_tensor_dtype(n)) for n in names}

    def run(self, feeds: dict[str, Any], output_order: list[str]) -> list[Any]:
        """Outputs (CUDA torch tensors, in `output_order`) for CUDA torch tensor `feeds`."""
        import torch

        device = next(iter(feeds.values())).device if feeds else torch.device("cuda")
        keep = []
        for name in self.input_names:
            tensor = feeds[name].to(device=device, dtype=self.dtypes[name]).contiguous()
            keep.append(tensor)
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise TargetError(f"input {name!r}: shape {tuple(tensor.shape)} is outside the engine's optimization profile {self._profile(name)}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TargetError(f"output {name!r} has a data-dependent shape {shape}; this target does not allocate such outputs")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TargetError("TensorRT failed to run the engine (execute_async_v3 returned False)")
        stream.synchronize()
        return [outputs[name] for name in output_order]

    def _profile(self, name: str) -> str:
        low, opt, high = self.engine.get_tensor_profile_shape(name, 0)
        return f"min {tuple(low)}, opt {tuple(opt)}, max {tuple(high)}"


def _torch_dtype(torch: Any, trt: Any, dtype: Any) -> Any:
    table = {
        trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
        trt.int8: torch.int8, trt.bool: torch.bool, trt.uint8: torch.uint8,
    }
    for name, torch_dtype in (("int64", torch.int64), ("bfloat16", torch.bfloat16)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = torch_dtype
    if dtype not in table:
        raise TargetError(f"engine tensor dtype {dtype} has no torch equivalent")
    return table[dtype]
