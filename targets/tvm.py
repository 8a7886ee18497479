"""The `tvm` target: the graph as a Relax module, compiled by Apache TVM (0.27) for CPU or CUDA.

Spec: ``tvm[:llvm|:cuda]{mcpu=NAME, num_cores=N}``.

- The graph becomes a Relax function (`tvm_relax.to_relax`); symbolic batch/sequence dims
  stay symbolic, so one build serves any batch. Weights are parameters, kept in numpy
  (matmul weights pre-packed in column panels). The target's lowering (`lowering()`, run
  by `graphopt.compile` as a visible pipeline) decomposes the graphopt ops without a Relax
  translation into standard ONNX (`decompose-graphopt-ops`).
- llvm: TVM's CPU pipeline (fast math, legalize, fuse), then graphopt's CPU schedules
  (`tvm_schedule`: register-tiled, vectorized, parallel matmuls with fused epilogues;
  dlight's CPU reductions; parallel vectorized elementwise kernels). `mcpu` defaults to the
  host CPU (LLVM's detection), `num_cores` (the target's ``num-cores``) to `os.cpu_count()`;
  the kernels run on TVM's runtime thread pool (all cores, or ``TVM_NUM_THREADS``).
- cuda: dlight's GPU schedules (matmul, GEMV, reductions, fallback); only cross-compiled
  (for sm_90, without a GPU), never run.

No MetaSchedule tuning: its records are keyed by the kernel with its shapes, so a build
with symbolic batch/sequence dims cannot use records tuned at one shape. (The untuned
schedules measured 1.3-1.9x ONNX Runtime on MiniLM in `benchmarks/tvm_cpu.py`; ANCHORS.md
has MetaSchedule at 2.8x after 531 s of tuning, a different run.)

The saved artifact is `model.so` (`export_library`) and `params.npz` (the weights, in the
order ``main`` takes them after the inputs).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.native_logs import native_stderr_to_log
from graphopt.pass_base import Pass
from graphopt.registry import get_pass
from graphopt.target_base import CompiledModel, IOSpec, Target, TargetError
from graphopt.targets.dtype_support import refused_types_reason

LIBRARY_FILE = "model.so"
PARAMS_FILE = "params.npz"


@dataclasses.dataclass
class TvmTarget(Target):
    """Apache TVM: Relax compiled for CPU (llvm, graphopt's schedules) or CUDA (dlight)."""

    name = "tvm"
    variants = ("llvm", "cuda")
    mcpu: str = ""
    num_cores: int = 0

    def __post_init__(self) -> None:
        if self.num_cores < 0:
            raise ValueError(f"num_cores must be >= 0 (0: all cores), got {self.num_cores}")
        if self.mcpu and not self.mcpu.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"mcpu must be an LLVM CPU name such as 'znver4' or 'skylake-avx512', got {self.mcpu!r}")

    def available(self) -> Optional[str]:
        try:
            import tvm
        except ImportError:
            return "the tvm package is not installed (pip install apache-tvm==0.27.0)"
        if self.variant == "cuda" and not tvm.cuda(0).exist:
            return "TVM sees no CUDA device"
        if self.variant == "llvm" and self.mcpu:
            from tvm.target import codegen

            if not codegen.llvm_is_valid_cpu(self.mcpu, codegen.llvm_get_system_triple()):
                return f"LLVM does not know the CPU in option mcpu={self.mcpu!r}"
        return None

    def unsupported_nodes(self, graph: Graph) -> list[Any]:
        from graphopt.errors import ExportError
        from graphopt.targets.tvm_relax import unsupported_nodes

        missing = unsupported_nodes(graph)
        if not any(n.domain == GRAPHOPT_DOMAIN for n in missing):
            return missing
        try:
            return unsupported_nodes(self.lower(graph))
        except ExportError:
            return missing

    def unsupported_reason(self, nodes: Sequence[Any]) -> str:
        """The element types the translation refuses, with the nodes' signatures; "" for
        nodes that only lack a translation rule (their op names say it)."""
        from graphopt.targets.tvm_relax import unsupported_dtypes

        return refused_types_reason(nodes, unsupported_dtypes, "the TVM target")

    def lowering(self) -> list[Pass]:
        """`decompose-graphopt-ops`, keeping the graphopt ops that have a Relax translation
        (`tvm_relax.native_graphopt_ops`) and LayerNormalization (translated at any opset)."""
        from graphopt.targets.tvm_relax import native_graphopt_ops

        return [get_pass("decompose-graphopt-ops")(keep=sorted(native_graphopt_ops() | {"LayerNormalization"}))]

    def tvm_target(self) -> Any:
        """The `tvm.target.Target` this spec builds for."""
        import tvm

        if self.variant == "cuda":
            return tvm.target.Target({"kind": "cuda", "arch": _cuda_arch()})
        from tvm.target import codegen

        return tvm.target.Target({
            "kind": "llvm",
            "mcpu": self.mcpu or codegen.llvm_get_system_cpu(),
            "num-cores": self.num_cores or os.cpu_count() or 1,
        })

    def compile(self, graph: Graph) -> "TvmModel":
        from graphopt.targets.tvm_build import build
        from graphopt.targets.tvm_relax import to_relax

        with native_stderr_to_log("TVM"):
            relax_module = to_relax(self.lower(graph), pack_weights=self.variant == "llvm")
            executable = build(relax_module.module, self)
            inputs = [IOSpec.of(v) for v in graph.inputs]
            outputs = [IOSpec.of(v) for v in graph.outputs]
            return TvmModel(self, inputs, outputs, executable, relax_module.params)

    def load(self, directory: str, manifest: dict[str, Any]) -> "TvmModel":
        import tvm

        inputs = [IOSpec.from_json(d) for d in manifest["inputs"]]
        outputs = [IOSpec.from_json(d) for d in manifest["outputs"]]
        with native_stderr_to_log("TVM"):
            library = tvm.runtime.load_module(os.path.join(directory, LIBRARY_FILE))
            with np.load(os.path.join(directory, PARAMS_FILE)) as archive:
                params = [archive[f"p{i}"] for i in range(len(archive.files))]
            return TvmModel(self, inputs, outputs, library, params)


class TvmModel(CompiledModel):
    """A Relax virtual machine over the compiled module, with the weights on the device."""

    def __init__(self, target: TvmTarget, inputs: list[IOSpec], outputs: list[IOSpec], executable: Any, params: list[np.ndarray]) -> None:
        super().__init__(target, inputs, outputs)
        import tvm
        from tvm import relax

        self.executable = executable
        self.params = params
        self.device = tvm.cuda(0) if target.variant == "cuda" else tvm.cpu(0)
        self.vm = relax.VirtualMachine(executable, self.device)
        self._weights = [tvm.runtime.tensor(p, self.device) for p in params]

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import tvm

        args = [tvm.runtime.tensor(np.require(feeds[name], requirements="C"), self.device) for name in self.input_names]
        try:
            results = self.vm["main"](*args, *self._weights)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise GraphoptError(f"TVM failed to run the model: {text[-1] if text else type(exc).__name__}") from None
        return [r.numpy() for r in results]

    def _save_files(self, directory: str) -> list[str]:
        try:
            with native_stderr_to_log("TVM"):
                self.executable.export_library(os.path.join(directory, LIBRARY_FILE))
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise TargetError(f"TVM could not write {LIBRARY_FILE} (export_library needs a C compiler): {text[-1] if text else exc}") from None
        np.savez(os.path.join(directory, PARAMS_FILE), **{f"p{i}": p for i, p in enumerate(self.params)})
        return [LIBRARY_FILE, PARAMS_FILE]


def _cuda_arch() -> str:
    import tvm

    major, minor = tvm.cuda(0).compute_version.split(".")
    return f"sm_{major}{minor}"
