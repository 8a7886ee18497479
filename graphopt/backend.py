"""`torch.compile(model, backend="graphopt", options={...})`: graphopt as a dynamo backend.

Registered through the `torch_dynamo_backends` entry point, so no import is needed.
Each graph dynamo captures is imported (`from_fx`), optimized with the pipeline followed by
the target's lowering passes (as `graphopt.compile` does), and run as the torch.fx module the
torch target builds (fused attention -> scaled_dot_product_attention) or the target's
compiled model.

The conversion happens on the first call of the compiled graph, outside dynamo's own
compile step (torch.export cannot run inside it under dynamic shapes), and is cached per
process, keyed on the graph's code, its input shapes/dtypes/devices, the options and the
versions of graphopt and torch, so a graph seen again (recompiles, a second
`torch.compile` of the same model) is not optimized twice.

Options (all optional):
- `pipeline` (default "fuse"): any pipeline text/list, validated before anything runs;
- `target` (default "auto"): any registered target spec (`graphopt targets`), e.g.
  "onnxruntime:cpu{threads=2}" runs the optimized graph in ONNX Runtime (torch tensors in
  and out); "auto" picks per graph what measured fastest (`benchmarks/llm_decode_cpu.py`,
  `benchmarks/torch_compile_cpu.py`): ONNX Runtime on CPU (as many threads as torch uses)
  for a graph whose attention reads a KV cache (a decoding step: through GroupQueryAttention
  it decodes at 0.3-0.7x inductor's per-token time, the torch target at 0.4-1.3x), the
  torch target for everything else;
- `check` (default False): on the first call, compare against the original graph and fall
  back (or raise) if outputs differ by more than `tolerance` (default 1e-4);
- `partition` (default True): when the target cannot run some nodes, run those in torch and
  the rest in the target (`graphopt.partition`), logging ONE warning naming the ops that run
  in torch; False treats such a graph as a failure (see `fallback`);
- `fallback` (default True): if import, a pass or the target fails, log ONE warning naming
  the problem and run the original graph; False raises instead;
- `verbose` (default False): log what each pass did per graph;
- `mode` (default "auto"): "auto" sends a graph captured with gradients on and an input that
  requires grad (a model in train mode, or in eval mode outside `torch.no_grad()`) down the
  autograd path (`graphopt.autograd_backend`: parameters stay inputs, AOTAutograd derives the
  backward, on the torch target), every other graph down the inference path (weights baked
  in and prepacked); "training" takes the autograd path for every graph; "inference" the
  inference path for every graph, even with gradients on: its outputs then carry no autograd
  history (the fastest way to run a model whose parameters require grad when no backward
  follows).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from typing import Any, Callable, Sequence

from graphopt.errors import GraphoptError
from graphopt.pass_base import PipelineError

_LOG = logging.getLogger("graphopt")
AUTO = "auto"
"""The `target` option's default: a target chosen per graph (see the module doc)."""
_OPTION_DEFAULTS: dict[str, Any] = {
    "pipeline": "fuse", "target": "auto", "check": False, "fallback": True, "verbose": False, "tolerance": 1e-4,
    "partition": True, "mode": "auto",
}
MODES = ("auto", "inference", "training")
_CACHE: dict[str, tuple[Callable[..., Any], list[weakref.ref]]] = {}
_CACHE_LOCK = threading.Lock()
_STATS = {"compiled": 0, "cache_hits": 0, "fallbacks": 0, "auto_onnxruntime": 0}


def graphopt_backend(gm: Any, example_inputs: Sequence[Any], options: dict[str, Any] | None = None, **kwargs: Any) -> Callable[..., Any]:
    """The dynamo backend: returns a callable that runs `gm` optimized by graphopt."""
    from graphopt.autograd_backend import needs_autograd

    settings = validate_options({**(options or {}), **kwargs})
    mode = settings["mode"]
    autograd = mode == "training" or (mode == AUTO and needs_autograd(example_inputs))
    return _LazyCompiled(gm, list(example_inputs), {**settings, "autograd": autograd})


def validate_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options with defaults filled in; PipelineError naming the first bad one."""
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
    if unknown:
        raise PipelineError(f"graphopt backend: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(_OPTION_DEFAULTS))}")
    settings = {**_OPTION_DEFAULTS, **options}
    from graphopt.target_registry import get_target

    target = get_target("torch" if settings["target"] == AUTO else settings["target"])
    missing = target.available()
    if missing:
        raise PipelineError(f"graphopt backend: target '{target.spec}' cannot run here: {missing}")
    for flag in ("check", "fallback", "verbose", "partition"):
        if not isinstance(settings[flag], bool):
            raise PipelineError(f"graphopt backend: option '{flag}' must be True or False, got {settings[flag]!r}")
    if settings["mode"] not in MODES:
        raise PipelineError(f"graphopt backend: option 'mode' must be one of {', '.join(MODES)}, got {settings['mode']!r}")
    from graphopt.pipeline import build_pipeline

    build_pipeline(settings["pipeline"])
    return settings


def cache_info() -> dict[str, int]:
    """Counters of this process: graphs compiled, cache hits, fallbacks, graphs the "auto"
    target sent to ONNX Runtime; and cache size."""
    return {**_STATS, "cached": len(_CACHE)}


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
        for key in _STATS:
            _STATS[key] = 0


class _LazyCompiled:
    """Converts on first call; afterwards calls the optimized module (or the original)."""

    def __init__(self, gm: Any, example_inputs: list[Any], settings: dict[str, Any]) -> None:
        self.gm = gm
        self.example_inputs = example_inputs
        self.settings = settings
        self.state = _module_state(gm, example_inputs)
        self.key = _cache_key(gm, example_inputs, self.state, settings)
        self.run: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.run is None:
            self.run = self._build(args)
        return self.run(*args)

    def _build(self, args: Sequence[Any]) -> Callable[..., Any]:
        with _CACHE_LOCK:
            cached = _CACHE.get(self.key)
        if cached is not None and all(ref() is tensor for ref, tensor in zip(cached[1], self.state)):
            _STATS["cache_hits"] += 1
            return cached[0]
        try:
            run = self._optimize(args)
        except Exception as exc:
            if not self.settings["fallback"]:
                raise
            _STATS["fallbacks"] += 1
            _LOG.warning("graphopt: running this graph unoptimized: %s", _describe(exc))
            run = self.gm.forward
        with _CACHE_LOCK:
            _CACHE[self.key] = (run, [weakref.ref(tensor) for tensor in self.state])
        return run

    def _optimize(self, args: Sequence[Any]) -> Callable[..., Any]:
        run = self._optimize_for_autograd() if self.settings["autograd"] else self._optimize_for_inference(args)
        if self.settings["check"]:
            _check(self.gm, run, args, self.settings["tolerance"])
        _STATS["compiled"] += 1
        return run

    def _optimize_for_autograd(self) -> Callable[..., Any]:
        from graphopt.autograd_backend import compile_with_autograd

        if self.settings["target"] not in (AUTO, "torch"):
            raise GraphoptError(
                f"the graph needs gradients and target '{self.settings['target']}' has no backward; use target 'torch' "
                "or 'auto', or mode 'inference' when no backward follows"
            )
        return compile_with_autograd(self.gm, self.example_inputs, self.settings["pipeline"], self.settings["verbose"])

    def _optimize_for_inference(self, args: Sequence[Any]) -> Callable[..., Any]:
        import torch

        from graphopt.api import optimize, with_lowering
        from graphopt.frontends.fx_import import from_fx
        from graphopt.pipeline import build_pipeline
        from graphopt.target_registry import get_target

        graph = optimize(from_fx(self.gm, self.example_inputs), build_pipeline(self.settings["pipeline"]))
        target = get_target(_chosen_target(self.settings["target"], graph, args))
        if not self.settings["partition"]:
            graph = optimize(graph, with_lowering([], target))  # partitioning splits the graph before lowering
        if self.settings["verbose"]:
            _LOG.warning("graphopt: graph with %d inputs:\n%s", len(graph.inputs), graph.report.table())
        if target.name == "torch":
            on_cpu = all(a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor))
            module = graph.to_fx(prepack_linears=on_cpu and getattr(target, "prepack", True))
            if on_cpu and getattr(target, "keep_heap", True):
                from graphopt.cpu_heap import keep_freed_memory

                keep_freed_memory()
        else:
            from graphopt.partition import PartitionedModel, compile_for_target

            module = compile_for_target(graph, target, partition=self.settings["partition"])
            if isinstance(module, PartitionedModel):
                _LOG.warning("graphopt: %s", module.report.summary())
        kinds = graph.metadata["fx_input_kinds"]
        specialized = graph.metadata["fx_specialized"]
        spec = graph.metadata["fx_output_spec"]
        original = self.gm.forward

        def run(*call_args: Any) -> Any:
            if any(int(call_args[i]) != value for i, value in specialized.items()):
                return original(*call_args)
            outputs = module(*[a for a, kind in zip(call_args, kinds) if kind == "input"])
            return torch.utils._pytree.tree_unflatten(list(outputs), spec)

        return run


def _chosen_target(spec: str, graph: Any, args: Sequence[Any]) -> str:
    """`spec`, or for "auto" the target measured fastest for `graph` (see the module doc)."""
    import torch

    if spec != AUTO:
        return spec
    on_cpu = all(a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor))
    from graphopt.ir.ops.graphopt import has_kv_cache

    decoding = any(n.domain == "graphopt" and n.op_type == "Attention" and has_kv_cache(n) for n in graph.nodes)
    if on_cpu and decoding:
        from graphopt.target_registry import get_target

        if get_target("onnxruntime:cpu").available() is None:
            _STATS["auto_onnxruntime"] += 1
            return f"onnxruntime:cpu{{threads={torch.get_num_threads()}}}"
    return "torch"


def _check(gm: Any, run: Callable[..., Any], args: Sequence[Any], tolerance: float) -> None:
    import torch

    state = torch.get_rng_state()  # both draw the same dropout masks, and the real call draws them again
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(gm(*args))
        torch.set_rng_state(state)
        actual = torch.utils._pytree.tree_leaves(run(*args))
        torch.set_rng_state(state)
    for a, b in zip(expected, actual):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            error = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
            if error > tolerance:
                raise GraphoptError(f"check: outputs differ from the original graph by {error:.3g} (tolerance {tolerance:g})")


def _module_state(gm: Any, example_inputs: Sequence[Any]) -> list[Any]:
    """The weights, buffers and attributes dynamo passes as inputs: the optimized module
    bakes them in, so a cached entry is only valid for these very tensors."""
    import torch

    from graphopt.frontends.fx_import import is_module_state

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [
        value for node, value in zip(placeholders, example_inputs)
        if isinstance(value, torch.Tensor) and (isinstance(value, torch.nn.Parameter) or is_module_state(node))
    ]


def _cache_key(gm: Any, example_inputs: Sequence[Any], state: Sequence[Any], settings: dict[str, Any]) -> str:
    import torch

    import graphopt

    parts = [gm.code, graphopt.__version__, torch.__version__, repr(sorted((k, repr(v)) for k, v in settings.items()))]
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            parts.append(f"{tuple(str(d) for d in value.shape)}:{value.dtype}:{value.device}")
        else:
            parts.append(f"{type(value).__name__}:{value}")
    parts += [str(id(tensor)) for tensor in state]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
