"""torch.fx -> IR: `from_fx(graph_module_or_exported_program, example_inputs)`.

ATen-to-ONNX translation is torch's own (`torch.onnx.export(..., dynamo=True)`, built on
onnxscript's torchlib), so every ATen op that torch can export is covered without a
hand-written table; the resulting ONNX model is then imported like any other.

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
import warnings
from typing import Any, Optional, Sequence

from graphopt.errors import GraphoptError, UnsupportedOpError
from graphopt.frontends.onnx_import import from_onnx
from graphopt.ir.graph import Graph

DEFAULT_OPSET = 18


def from_fx(module: Any, example_inputs: Optional[Sequence[Any]] = None, *, opset: int = DEFAULT_OPSET) -> Graph:
    """Import a GraphModule or an ExportedProgram into an IR graph (see module docstring)."""
    import torch

    if isinstance(module, torch.export.ExportedProgram):
        program = module
        kinds = ["input"] * len(program.graph_signature.user_inputs)
        specialized = {}
    elif isinstance(module, torch.fx.GraphModule):
        if example_inputs is None:
            raise GraphoptError("from_fx: a GraphModule needs its example_inputs (the backend's second argument)")
        program, kinds, specialized = _export_graph_module(module, list(example_inputs))
    else:
        raise GraphoptError(
            f"from_fx expects a torch.fx.GraphModule or a torch.export.ExportedProgram, got {type(module).__name__}"
        )
    with _quiet():
        try:
            onnx_program = torch.onnx.export(program, dynamo=True, optimize=True, verbose=False, opset_version=opset)
        except Exception as exc:
            op = _untranslatable_op(exc)
            if op:
                raise UnsupportedOpError(f"from_fx: no ONNX translation for op {op}; torch.onnx cannot export it") from exc
            raise UnsupportedOpError(f"from_fx: torch could not translate the graph to ONNX ops: {_first_line(exc)}") from exc
    graph = from_onnx(onnx_program.model_proto)
    graph.metadata["fx_input_kinds"] = kinds
    graph.metadata["fx_specialized"] = specialized
    graph.metadata["fx_output_spec"] = program.call_spec.out_spec
    graph.metadata["producer_name"] = "graphopt.from_fx"
    return graph


def _export_graph_module(gm: Any, example_inputs: list[Any]) -> tuple[Any, list[str], dict[int, int]]:
    import torch

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise GraphoptError(
            f"from_fx: the GraphModule has {len(placeholders)} placeholders but {len(example_inputs)} example inputs were given"
        )
    kinds, constants, sizes, tensors = _classify(placeholders, example_inputs)
    gm = _inline_scalar_items(gm, constants)
    wrapper = _placeholder_feeder(gm, kinds, constants, sizes)
    real = [_real_example(example_inputs[i], placeholders[i]) for i in tensors]
    dynamic = tuple(_dynamic_dims(placeholders[i], example_inputs[i]) for i in tensors)
    with _quiet():
        try:
            program = torch.export.export(wrapper, tuple(real), dynamic_shapes=(dynamic,) if any(dynamic) else None, strict=False)
        except Exception as exc:
            raise UnsupportedOpError(f"from_fx: torch.export could not trace the GraphModule: {_first_line(exc)}") from exc
    specialized = {i: constants[i] for i, kind in enumerate(kinds) if kind == "specialized"}
    return program, kinds, specialized


def _classify(placeholders: list[Any], example_inputs: list[Any]) -> tuple[list[str], dict[int, Any], dict[int, tuple[int, int]], list[int]]:
    import torch

    kinds: list[str] = []
    constants: dict[int, Any] = {}
    sizes: dict[int, tuple[int, int]] = {}
    tensors: list[int] = []
    for index, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(example, torch.nn.Parameter) or is_module_state(node) or _is_plain_scalar(example):
            kinds.append("constant")
            constants[index] = _concrete(example)
        elif isinstance(example, (torch.SymInt, int)) and not isinstance(example, bool):
            owner = _size_owner(node, placeholders)
            if owner is None:
                kinds.append("specialized")
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
    L_fn_... (a module compiled directly: torch.compile(module) traces it as `fn`) and G_..."""
    return str(node.target).startswith(("L_self_", "L_fn_", "G_"))


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
