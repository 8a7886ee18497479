"""torch.fx -> IR: `from_fx(graph_module_or_exported_program, example_inputs)`.

Graphs are translated op by op, with the module's weights shared as numpy views:
- a dynamo GraphModule of static shapes as it is (`graphopt.frontends.dynamo_import`: no
  trace at all), else its make_fx trace to ATen (pre-dispatch, over fake tensors);
- a GraphModule with symbolic sizes through `torch.export`, and an ExportedProgram as it
  is, by the ATen rules (`graphopt.frontends.aten_import`).
A graph holding an op no rule covers goes through torch's own exporter instead
(`torch.onnx.export(..., dynamo=True)`, built on onnxscript's torchlib, so every ATen op
that torch can export is covered) and the resulting ONNX model is imported like any other.
`graph.metadata["fx_importer"]` says which path was taken: "dynamo", "aten" (the ATen
graph of a make_fx trace or of torch.export) or "torch.onnx".

Accepted inputs:
- a `torch.export.ExportedProgram` (symbolic dims come from its range constraints);
- a `torch.fx.GraphModule` from torch.compile (dynamo or AOT/ATen level) with the
  backend's `example_inputs`. Placeholders holding parameters or buffers become IR
  constants (their values are read from `example_inputs`); SymInt placeholders that are
  sizes of tensor inputs are recomputed from those tensors; symbolic dims of fake example
  values stay symbolic. `graph.metadata["fx_input_kinds"]` records, per placeholder,
  whether it became an "input", a "constant" or a "size", so a caller knows which
  arguments the IR graph still takes; `graph.metadata["fx_output_spec"]` is the pytree
  spec of the module's outputs (the IR's outputs are their flattened leaves).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Any, Callable, Optional, Sequence

from graphopt.errors import GraphoptError, UnsupportedOpError
from graphopt.frontends.aten_import import (
    GraphInput, State, UntranslatableError, import_graph, import_program, random_draw, state_mutation,
)
from graphopt.frontends.dynamo_import import import_dynamo_graph
from graphopt.frontends.onnx_import import from_onnx
from graphopt.ir.graph import Graph

DEFAULT_OPSET = 18
_LOG = logging.getLogger("graphopt")


def from_fx(
    module: Any, example_inputs: Optional[Sequence[Any]] = None, *, opset: int = DEFAULT_OPSET, trainable: bool = False,
) -> Graph:
    """Import a GraphModule or an ExportedProgram into an IR graph (see module docstring).

    `trainable` (GraphModules only): parameters that require grad stay graph inputs (kind
    "input", named after their module path) instead of becoming constants, so a module built
    from the graph takes them at each call and autograd reaches them; no pass can fold them."""
    import torch

    if isinstance(module, torch.export.ExportedProgram):
        graph = _import_program(module, opset)
        kinds = ["input"] * len(module.graph_signature.user_inputs)
        specialized: dict[int, int] = {}
        out_spec = module.call_spec.out_spec
    elif isinstance(module, torch.fx.GraphModule):
        if example_inputs is None:
            raise GraphoptError("from_fx: a GraphModule needs its example_inputs (the backend's second argument)")
        graph, kinds, specialized, out_spec = _import_graph_module(module, list(example_inputs), opset, trainable)
    else:
        raise GraphoptError(
            f"from_fx expects a torch.fx.GraphModule or a torch.export.ExportedProgram, got {type(module).__name__}"
        )
    graph.metadata["fx_input_kinds"] = kinds
    graph.metadata["fx_specialized"] = specialized
    graph.metadata["fx_output_spec"] = out_spec
    graph.metadata["producer_name"] = "graphopt.from_fx"
    return graph


def _import_program(program: Any, opset: int, input_names: Sequence[str] = (), constant_names: Optional[dict[str, str]] = None) -> Graph:
    """The program translated op by op, else through torch.onnx; neither for a program that
    updates state in place (the IR is functional, and the ONNX export drops the update too)
    or, through torch.onnx, one that draws random numbers."""
    translated = _attempt("aten", lambda: import_program(program, opset=opset, input_names=input_names, constant_names=constant_names))
    if translated is not None:
        return translated
    with _quiet():
        # functionalized: in-place updates, also those inside ops such as batch_norm, become outputs
        functional = program.run_decompositions({})
    mutation = state_mutation(functional, constant_names)
    if mutation:
        raise UnsupportedOpError(f"from_fx: {mutation}")
    draw = random_draw(program.graph_module)
    if draw:
        raise UnsupportedOpError(
            f"from_fx: {draw} (training mode) and the graph holds an op graphopt does not translate; torch.onnx, "
            "the other way in, exports dropout as inference does"
        )
    return _import_through_onnx(functional, opset)


def _attempt(importer: str, translate: Callable[[], Graph]) -> Optional[Graph]:
    """`translate()`, its graph marked as coming from `importer`; None (logged) when it
    cannot translate the graph."""
    try:
        graph = translate()
    except UntranslatableError as exc:
        _LOG.info("graphopt: from_fx cannot translate this graph by its %s path: %s", importer, exc)
        return None
    graph.metadata["fx_importer"] = importer
    return graph


def _import_graph_module(gm: Any, example_inputs: list[Any], opset: int, trainable: bool) -> tuple[Graph, list[str], dict[int, int], Any]:
    """(graph, placeholder kinds, specialized sizes, output spec) of a dynamo GraphModule.

    A graph of static shapes is translated as it is (`dynamo_import`), else traced to ATen
    with make_fx over fake tensors (a third of torch.export's time) and translated op by op;
    a graph with symbolic sizes is exported with torch.export first; what none of these
    translates goes through torch.onnx."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise GraphoptError(
            f"from_fx: the GraphModule has {len(placeholders)} placeholders but {len(example_inputs)} example inputs were given"
        )
    kinds, constants, sizes, tensors = _classify(placeholders, example_inputs, trainable)
    input_names = [_display_name(placeholders[i].target) for i in tensors]
    static = "size" not in kinds and "specialized" not in kinds and all(_is_real(e) for e in example_inputs)
    if static:
        bindings = [
            GraphInput(input_names[tensors.index(i)]) if kind == "input" else
            State(_display_name(node.target), constants[i]) if hasattr(constants[i], "detach") else constants[i]
            for i, (node, kind) in enumerate(zip(placeholders, kinds))
        ]
        graph = _import_static(gm, example_inputs, bindings, opset)
        if graph is not None:
            return graph, kinds, {}, _output_spec(gm)
    program = _export_graph_module(gm, example_inputs, placeholders, kinds, constants, sizes, tensors)
    specialized = {i: constants[i] for i, kind in enumerate(kinds) if kind == "specialized"}
    constant_names = {f"const_{i}": _display_name(placeholders[i].target) for i, kind in enumerate(kinds) if kind == "constant"}
    return _import_program(program, opset, input_names, constant_names), kinds, specialized, program.call_spec.out_spec


def _import_static(gm: Any, example_inputs: list[Any], bindings: list[Any], opset: int) -> Optional[Graph]:
    """The static-shape graph `gm` translated as it is, else through a make_fx trace (pre-dispatch,
    so ops such as linear and layer_norm stay whole); None when neither works."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = _attempt("dynamo", lambda: import_dynamo_graph(gm, bindings, opset=opset))
    if graph is not None:
        return graph
    try:
        with torch.no_grad(), _quiet():
            traced = make_fx(gm, tracing_mode="fake", pre_dispatch=True, _allow_non_fake_inputs=True, record_stack_traces=False)(*example_inputs)
    except Exception as exc:
        _LOG.info("graphopt: from_fx exports this graph with torch.export: make_fx failed: %s", _first_line(exc))
        return None
    return _attempt("aten", lambda: import_graph(traced, bindings, opset=opset))


def _is_real(value: Any) -> bool:
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, torch.Tensor):
        return not isinstance(value, FakeTensor) and not any(isinstance(d, torch.SymInt) for d in value.shape)
    return _is_plain_scalar(value)


def _output_spec(gm: Any) -> Any:
    """The pytree spec of a GraphModule's outputs (the IR's outputs are its leaves)."""
    import torch

    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    return torch.utils._pytree.tree_structure(output.args[0])


def _import_through_onnx(program: Any, opset: int) -> Graph:
    """`program` exported by torch.onnx (torchlib, onnxscript's optimizer), then imported."""
    import torch

    with _quiet():
        try:
            onnx_program = torch.onnx.export(program, dynamo=True, optimize=True, verbose=False, opset_version=opset)
        except Exception as exc:
            op = _untranslatable_op(exc)
            if op:
                raise UnsupportedOpError(f"from_fx: no ONNX translation for op {op}; torch.onnx cannot export it") from exc
            raise UnsupportedOpError(f"from_fx: torch could not translate the graph to ONNX ops: {_first_line(exc)}") from exc
    graph = from_onnx(onnx_program.model_proto)
    graph.metadata["fx_importer"] = "torch.onnx"
    return graph


def _display_name(target: str) -> str:
    """A dynamo placeholder's source as a dotted path: L_self_modules_encoder_parameters_weight_
    -> encoder.weight, L_input_ids_ -> input_ids."""
    name = re.sub(r"^(L_self_|L_fn_|L_|G_)", "", str(target)).rstrip("_")
    return re.sub(r"(^|_)(modules|parameters|buffers)_", lambda m: "." if m.group(1) else "", name) or str(target)


def _export_graph_module(
    gm: Any, example_inputs: list[Any], placeholders: list[Any], kinds: list[str], constants: dict[int, Any],
    sizes: dict[int, tuple[int, int]], tensors: list[int],
) -> Any:
    """`gm` exported by torch.export, its placeholders fed as `_classify` sorted them."""
    import torch

    gm = _inline_scalar_items(gm, constants)
    wrapper = _placeholder_feeder(gm, kinds, constants, sizes)
    real = [_real_example(example_inputs[i], placeholders[i]) for i in tensors]
    dynamic = tuple(_dynamic_dims(placeholders[i], example_inputs[i]) for i in tensors)
    with _quiet():
        try:
            program = torch.export.export(wrapper, tuple(real), dynamic_shapes=(dynamic,) if any(dynamic) else None, strict=False)
        except Exception as exc:
            raise UnsupportedOpError(f"from_fx: torch.export could not trace the GraphModule: {_first_line(exc)}") from exc
    return program


def _classify(
    placeholders: list[Any], example_inputs: list[Any], trainable: bool,
) -> tuple[list[str], dict[int, Any], dict[int, tuple[int, int]], list[int]]:
    import torch

    kinds: list[str] = []
    constants: dict[int, Any] = {}
    sizes: dict[int, tuple[int, int]] = {}
    tensors: list[int] = []
    for index, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if trainable and isinstance(example, torch.Tensor) and example.requires_grad:
            kinds.append("input")
            tensors.append(index)
        elif isinstance(example, torch.nn.Parameter) or is_module_state(node) or _is_plain_scalar(example):
            kinds.append("constant")
            constants[index] = _concrete(example)
        elif isinstance(example, (torch.SymInt, int)) and not isinstance(example, bool):
            owner = _size_owner(node, placeholders)
            if owner is None:
                # a size the graph reads gets its example value (a call with another one runs the
                # original graph); one it never reads (dynamo passes some: HF decoders' cache
                # lengths) cannot change the results, so it is a constant of no consequence
                kinds.append("specialized" if node.users else "constant")
                constants[index] = _concrete(node.meta.get("example_value", example))
            else:
                kinds.append("size")
                sizes[index] = owner
        elif isinstance(example, torch.Tensor):
            kinds.append("input")
            tensors.append(index)
        else:
            raise UnsupportedOpError(
                f"from_fx: placeholder '{node.name}' holds a {type(example).__name__}; graphopt imports tensor inputs only"
            )
    return kinds, constants, sizes, tensors


def _inline_scalar_items(gm: Any, constants: dict[int, Any]) -> Any:
    """A copy of `gm` where `.item()` of a 0-d constant (dynamo passes float module
    attributes such as `eps` this way under dynamic=True) is replaced by its Python value,
    so torch.export does not see a data-dependent scalar. `gm` itself is not changed."""
    import copy

    import torch
    from torch.fx.node import map_aggregate

    scalars = {i: v.item() for i, v in constants.items() if isinstance(v, torch.Tensor) and v.dim() == 0}
    if not scalars:
        return gm
    graph = copy.deepcopy(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for index, value in scalars.items():
        for item in list(placeholders[index].users):
            if item.op != "call_method" or item.target != "item":
                continue
            for user in list(item.users):
                user.args = map_aggregate(user.args, lambda a: value if a is item else a)
                user.kwargs = map_aggregate(user.kwargs, lambda a: value if a is item else a)
            graph.erase_node(item)
    return torch.fx.GraphModule(gm, graph)


def _is_plain_scalar(value: Any) -> bool:
    """Python numbers dynamo passed as inputs: it guards on their values, so they are
    constants of this graph (a different value recompiles)."""
    return isinstance(value, (int, float, bool)) and not hasattr(value, "node")


def is_module_state(node: Any) -> bool:
    """True for placeholders dynamo lifted from module state or globals (weights, buffers,
    float/int attributes such as eps), as opposed to arguments of the compiled call.
    Dynamo names those placeholders after their source: L_self_... (a method's module),
    L_fn_... (a module compiled directly: torch.compile(module) traces it as `fn`), G_...,
    and, for a module passed as an argument (transformers >= 5.24 calls `forward` through
    a wrapper taking the model as `args[0]`), the mangled root of the module paths in the
    node's `nn_module_stack` (L['args'][0] -> L_args_0_...)."""
    target = str(node.target)
    if target.startswith(("L_self_", "L_fn_", "G_")):
        return True
    stack = node.meta.get("nn_module_stack") or {}
    roots = {re.sub(r"[^A-Za-z0-9]+", "_", str(path).split(".")[0]) for path, _ in stack.values()}
    return any(root.endswith("_") and len(root) > 2 and target.startswith(root) for root in roots)


def _concrete(example: Any) -> Any:
    import torch

    if isinstance(example, torch.SymInt):
        return int(example.node.hint)
    return example.detach() if isinstance(example, torch.Tensor) else example


def _size_owner(node: Any, placeholders: list[Any]) -> Optional[tuple[int, int]]:
    """(placeholder index, axis) of a tensor input whose size this SymInt placeholder is."""
    import torch

    symbol = node.meta.get("example_value")
    if not isinstance(symbol, torch.SymInt):
        return None
    for index, other in enumerate(placeholders):
        shape = getattr(other.meta.get("example_value"), "shape", None)
        if shape is None or is_module_state(other):
            continue
        for axis, dim in enumerate(shape):
            if isinstance(dim, torch.SymInt) and str(dim.node.expr) == str(symbol.node.expr):
                return index, axis
    return None


def _real_example(example: Any, node: Any) -> Any:
    """A real tensor with the example's shape (fake tensors are materialized as zeros)."""
    import torch

    from torch._subclasses.fake_tensor import FakeTensor

    if not isinstance(example, FakeTensor):
        return example.detach()
    shape = [int(d) if not isinstance(d, torch.SymInt) else int(d.node.hint or 2) for d in example.shape]
    return torch.zeros(shape, dtype=example.dtype)


def _dynamic_dims(node: Any, example: Any) -> Optional[dict[int, Any]]:
    import torch

    fake = node.meta.get("example_value", node.meta.get("val", example))
    shape = getattr(fake, "shape", ())
    dims = {axis: torch.export.Dim.AUTO for axis, d in enumerate(shape) if isinstance(d, torch.SymInt)}
    return dims or None


def _placeholder_feeder(gm: Any, kinds: list[str], constants: dict[int, Any], sizes: dict[int, tuple[int, int]]) -> Any:
    """The nn.Module torch.export traces: tensor inputs in, the GraphModule's other
    placeholders (weights, sizes) filled in from constants and tensor sizes."""
    import torch

    class Feeder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gm = gm
            self.plain: dict[int, Any] = {}
            for index, value in constants.items():
                if isinstance(value, torch.Tensor):
                    self.register_buffer(f"const_{index}", value)
                else:
                    self.plain[index] = value

        def forward(self, *tensors: Any) -> Any:
            remaining = iter(tensors)
            args: list[Any] = []
            for index, kind in enumerate(kinds):
                if kind == "input":
                    args.append(next(remaining))
                elif kind in ("constant", "specialized"):
                    args.append(self.plain[index] if index in self.plain else getattr(self, f"const_{index}"))
                else:
                    args.append(None)
            for index, (owner, axis) in sizes.items():
                args[index] = args[owner].size(axis)
            return self.gm(*args)

    return Feeder()


@contextlib.contextmanager
def _quiet():
    """Silence torch's exporter chatter (warnings and log lines) for one call."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _untranslatable_op(exc: BaseException) -> str:
    """The ATen/custom op named in torch.onnx's "No ONNX function found" error, if any."""
    import re

    match = re.search(r"OpOverload\(op='([^']+)', overload='([^']+)'\)", str(exc))
    return f"{match.group(1)}.{match.group(2)}" if match else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
