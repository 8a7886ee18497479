"""The `tvm` target: the graph as a Relax module, compiled by Apache TVM (0.27) for CPU or CUDA.

Spec: ``tvm[:llvm|:cuda]{mcpu=NAME, num_cores=N, tune_minutes=M, tune_trials=N,
tune_shapes={batch: 1, seq: [128, 256]}, tuning_db=DIR, rpc={tracker: "host:port", key: NAME}}``.

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

Static buckets and tuning: `tune_shapes` builds one extra module per *bucket*, each
combination of its sizes (every symbol of the inputs' dims needs one: batch dims default to
1, sequence dims to 128, any other missing one is refused, naming it), with the dims constant. Static kernels alone run far faster than the
symbolic ones (MiniLM at seq 128: 16.6 against 48.9 ms, see `tvm_schedule` on runtime row
counts). With `tune_minutes` and/or `tune_trials` > 0 each bucket is also tuned by
`tvm_tuning.tune` against the hand schedules (per kernel, then the whole module: the tuned
build is kept only when it runs faster end to end than the hand one, `faster_module`), with the database in `tuning_db` (default
`~/.cache/graphopt/tvm-tuning`, shared across runs and models). A call whose dims equal a
bucket's runs that bucket's module; any other call runs the symbolic one.

The saved artifact is `model.so` (`export_library`), one `bucket{i}.so` per tuned bucket
(the manifest lists their dims, the database folder and the tuning reports; loading tunes
nothing) and `params.npz` (the weights, in the order ``main`` takes them after the inputs).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Optional, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.ir.symbolic import dim_symbols
from graphopt.native_logs import native_stderr_to_log
from graphopt.pass_base import Pass
from graphopt.registry import get_pass
from graphopt.target_base import CompiledModel, IOSpec, Target, TargetError
from graphopt.targets.dtype_support import refused_types_reason
from graphopt.targets.tvm_build import last_line
from graphopt.targets.tvm_tuning import default_database_dir, faster_module

LIBRARY_FILE = "model.so"
PARAMS_FILE = "params.npz"
_EXAMPLES = {"tune_shapes": "{batch: 1, seq: [128, 256]}", "rpc": '{tracker: "127.0.0.1:9190", key: cpu}'}


@dataclasses.dataclass
class TvmTarget(Target):
    """Apache TVM: Relax compiled for CPU (llvm, graphopt's schedules) or CUDA (dlight)."""

    name = "tvm"
    variants = ("llvm", "cuda")
    mcpu: str = ""
    """LLVM CPU name (default: the host's)."""
    num_cores: int = 0
    """Cores the kernels are built for (0: all)."""
    tune_minutes: float = 0.0
    """MetaSchedule tuning time per bucket of tune_shapes (0: none unless tune_trials)."""
    tune_trials: int = 0
    """Most candidates measured per bucket (0: limited by tune_minutes only)."""
    tune_shapes: Any = None
    """Sizes to build static modules for (tuned when a budget is given), per symbol of the inputs' dims:
    {batch: 1, seq: [128, 256]} (a list: one module each). With a budget, batch dims default to 1 and
    sequence dims to 128; other symbols need a size."""
    tuning_db: str = ""
    """MetaSchedule database folder, reused across runs and models (default ~/.cache/graphopt/tvm-tuning)."""
    rpc: Any = None
    """Measure through TVM's RPC tracker: {tracker: "host:port", key: NAME}."""

    def __post_init__(self) -> None:
        from graphopt.options import mapping_literal

        if self.num_cores < 0:
            raise ValueError(f"num_cores must be >= 0 (0: all cores), got {self.num_cores}")
        if self.tune_minutes < 0 or self.tune_trials < 0:
            raise ValueError("tune_minutes and tune_trials must be >= 0")
        for option in ("tune_shapes", "rpc"):
            value = getattr(self, option)
            if value is None:
                continue
            mapping = mapping_literal(value)
            if mapping is None:
                raise ValueError(f"option {option} must be a mapping such as {_EXAMPLES[option]}, got {value!r}")
            setattr(self, option, mapping)
        if self.rpc is not None:
            from graphopt.targets.tvm_tuning import rpc_address

            rpc_address(self.rpc)
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

    @property
    def tuning(self) -> bool:
        return self.tune_minutes > 0 or self.tune_trials > 0

    def buckets(self, graph: Graph) -> list[dict[str, int]]:
        """The static sizes to build (and tune) for: one dict per combination of `tune_shapes`,
        over every symbol of the inputs' dims; [] without `tune_shapes` and without tuning.
        TargetError naming missing symbols."""
        if not self.tuning and not self.tune_shapes:
            return []
        symbols = sorted({s for v in graph.inputs for d in (v.shape or ()) if isinstance(d, str) for s in dim_symbols(d)})
        given = {s: _default_size(s) for s in symbols if _default_size(s) is not None}
        given.update(self.tune_shapes or {})
        missing = [s for s in symbols if s not in given]
        if missing:
            example = ", ".join(f"{s}: {given.get(s, 64)}" for s in symbols)
            raise TargetError(f"target 'tvm': tuning (and tune_shapes) needs a size for every symbolic dim of the inputs; give tune_shapes={{{example}}} "
                              f"(no size for: {', '.join(missing)})")
        sizes = []
        for symbol in symbols:
            values = given[symbol] if isinstance(given[symbol], (list, tuple)) else [given[symbol]]
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
                raise TargetError(f"target 'tvm': option 'tune_shapes': {symbol!r} needs sizes >= 1 (an int or a list of ints), got {given[symbol]!r}")
            sizes.append(values)
        return [dict(zip(symbols, combo)) for combo in itertools.product(*sizes)]

    def compile(self, graph: Graph) -> "TvmModel":
        from graphopt.targets.tvm_build import build
        from graphopt.targets.tvm_relax import to_relax

        lowered = self.lower(graph)
        buckets = self.buckets(lowered)
        with native_stderr_to_log("TVM"):
            relax_module = to_relax(lowered, pack_weights=self.variant == "llvm")
            executable, _ = build(relax_module.module, self)
            inputs = [IOSpec.of(v) for v in graph.inputs]
            outputs = [IOSpec.of(v) for v in graph.outputs]
            tuned = []
            for dims in buckets:
                static = to_relax(lowered, pack_weights=self.variant == "llvm", static_dims=dims)
                hand, _ = build(static.module, self)
                if not self.tuning:
                    tuned.append(Bucket(dims, hand, {}))
                    continue
                candidate, report = build(static.module, self, tuning_dims=dims)
                chosen, timings = faster_module({"hand": hand, "tuned": candidate}, inputs, dims, relax_module.params, self)
                tuned.append(Bucket(dims, hand if chosen == "hand" else candidate, {**report.to_json(), "module_ms": timings, "uses": chosen}))
            return TvmModel(self, inputs, outputs, executable, relax_module.params, tuned)

    def load(self, directory: str, manifest: dict[str, Any]) -> "TvmModel":
        import tvm

        inputs = [IOSpec.from_json(d) for d in manifest["inputs"]]
        outputs = [IOSpec.from_json(d) for d in manifest["outputs"]]
        with native_stderr_to_log("TVM"):
            library = tvm.runtime.load_module(os.path.join(directory, LIBRARY_FILE))
            buckets = [Bucket(entry["dims"], tvm.runtime.load_module(os.path.join(directory, entry["file"])), entry.get("report", {}))
                       for entry in manifest.get("buckets", [])]
            with np.load(os.path.join(directory, PARAMS_FILE)) as archive:
                params = [archive[f"p{i}"] for i in range(len(archive.files))]
            return TvmModel(self, inputs, outputs, library, params, buckets)


@dataclasses.dataclass
class Bucket:
    """A module built and tuned for static dims (`dims`: symbol -> size)."""

    dims: dict[str, int]
    executable: Any
    report: dict[str, Any]
    """`tvm_tuning.TuningReport.to_json()`."""


class TvmModel(CompiledModel):
    """A Relax virtual machine over the compiled module, with the weights on the device; calls
    whose dims equal a tuned bucket's run that bucket's machine."""

    def __init__(self, target: TvmTarget, inputs: list[IOSpec], outputs: list[IOSpec], executable: Any, params: list[np.ndarray],
                 buckets: Sequence[Bucket] = ()) -> None:
        super().__init__(target, inputs, outputs)
        import tvm
        from tvm import relax

        self.executable = executable
        self.params = params
        self.buckets = list(buckets)
        self.device = tvm.cuda(0) if target.variant == "cuda" else tvm.cpu(0)
        self.vm = relax.VirtualMachine(executable, self.device)
        self._bucket_vms = [(b.dims, relax.VirtualMachine(b.executable, self.device)) for b in self.buckets]
        self._weights = [tvm.runtime.tensor(p, self.device) for p in params]

    def machine_for(self, feeds: dict[str, np.ndarray]) -> Any:
        """The virtual machine that runs `feeds`: the tuned bucket whose dims they have, else
        the symbolic build."""
        if not self._bucket_vms:
            return self.vm
        sizes: dict[str, int] = {}
        for spec in self.inputs:
            for dim, size in zip(spec.shape, np.shape(feeds[spec.name])):
                if isinstance(dim, str) and dim_symbols(dim) == (dim,):
                    sizes[dim] = int(size)
        for dims, machine in self._bucket_vms:
            if all(sizes.get(symbol) == size for symbol, size in dims.items()):
                return machine
        return self.vm

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import tvm

        args = [tvm.runtime.tensor(np.require(feeds[name], requirements="C"), self.device) for name in self.input_names]
        try:
            results = self.machine_for(feeds)["main"](*args, *self._weights)
        except Exception as exc:
            raise GraphoptError(f"TVM failed to run the model: {last_line(str(exc)) or type(exc).__name__}") from None
        return [r.numpy() for r in results]

    def _save_files(self, directory: str) -> list[str]:
        files = [(LIBRARY_FILE, self.executable)] + [(_bucket_file(i), b.executable) for i, b in enumerate(self.buckets)]
        for name, executable in files:
            try:
                with native_stderr_to_log("TVM"):
                    executable.export_library(os.path.join(directory, name))
            except Exception as exc:
                raise TargetError(f"TVM could not write {name} (export_library needs a C compiler): {last_line(str(exc)) or exc}") from None
        np.savez(os.path.join(directory, PARAMS_FILE), **{f"p{i}": p for i, p in enumerate(self.params)})
        return [name for name, _ in files] + [PARAMS_FILE]

    def build_notes(self) -> list[str]:
        """One line per static bucket: its dims and, when tuned, trials, seconds and the
        measured kernel total before and after."""
        lines = []
        for bucket in self.buckets:
            dims = ", ".join(f"{k}={v}" for k, v in bucket.dims.items())
            report = bucket.report
            if not report:
                lines.append(f"static module for {dims}: hand schedules")
                continue
            kernels = [k for k in report["kernels"] if k["hand_ms"] is not None and k["best_ms"] is not None]
            hand = sum(k["hand_ms"] * k["calls"] for k in kernels)
            best = sum(k["best_ms"] * k["calls"] for k in kernels)
            tuned = sum(1 for k in kernels if k["tuned"])
            stopped = ", interrupted" if report.get("interrupted") else ""
            timings = report.get("module_ms", {})
            whole = (f"; whole module {timings['hand']:.2f} ms with hand schedules, {timings['tuned']:.2f} ms tuned: "
                     f"uses the {report['uses']} one") if timings else ""
            lines.append(f"static module for {dims}: {report['trials']} trials in {report['seconds']:.0f} s{stopped}; "
                         f"{tuned} of {len(report['kernels'])} kernels tuned; measured kernels {hand:.2f} -> {best:.2f} ms{whole}")
        return lines

    def _manifest_extra(self) -> dict[str, Any]:
        if not self.buckets:
            return {}
        target: TvmTarget = self.target  # type: ignore[assignment]
        database = {"tuning_db": os.path.abspath(target.tuning_db or default_database_dir())} if target.tuning else {}
        return {**database, "buckets": [{"dims": b.dims, "file": _bucket_file(i), "report": b.report} for i, b in enumerate(self.buckets)]}


def _default_size(symbol: str) -> Optional[int]:
    """The size a symbol is tuned for when `tune_shapes` does not name it: 1 for a batch, 128
    for a sequence length; None for any other symbol."""
    name = symbol.lower()
    if "batch" in name:
        return 1
    if "seq" in name or "sequence" in name or name in ("tokens", "length"):
        return 128
    return None


def _bucket_file(index: int) -> str:
    return f"bucket{index}.so"


def _cuda_arch() -> str:
    import tvm

    major, minor = tvm.cuda(0).compute_version.split(".")
    return f"sm_{major}{minor}"
