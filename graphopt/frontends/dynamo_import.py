"""Dynamo's torch-level graph -> IR without tracing it again: `import_dynamo_graph(gm, bindings)`.

The graph dynamo hands a backend calls torch functions (`torch._C._nn.linear`,
`F.layer_norm`, `operator.add`, ...) and tensor methods (`x.view(...)`, `x.to(...)`), and
every node carries torch's fake result (`example_value`). Each call is restated as the ATen
op it stands for, with that op's arguments (`ATEN_CALLS`), and translated by the ATen rules
of `graphopt.frontends.aten_ops`; tensor indexing (`x[:, :128]`, `x[None, :, 0]`,
`mask[rows, cols]`) becomes Slice / Unsqueeze / Gather, or the rule of `aten.index`.

This skips the make_fx trace `graphopt.frontends.aten_import` would otherwise need (most of
from_fx's time on a static graph). A call that is not listed, or is used in a way its entry
does not cover, raises `UntranslatableError`, and `from_fx` traces the graph instead.
Graphs with symbolic sizes are not taken here (their sizes are only known to dynamo's shape
environment).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Sequence

import numpy as np

from graphopt.frontends.aten_import import (
    INT64_MAX, LARGEST_FOLDED, Importer, State, UntranslatableError, fake_value, import_graph, translate_call,
)
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph

AtenCall = tuple[str, tuple, dict]
"""(ATen op overload name, positional arguments, keyword arguments)."""


@dataclasses.dataclass
class _AtenNode:
    """A dynamo call restated as an ATen call: what `translate_call` reads of an fx node."""

    target: Any
    args: tuple
    kwargs: dict
    name: str
    meta: dict
    users: dict


def import_dynamo_graph(gm: Any, bindings: Sequence[Any], *, name: str = "main_graph", opset: int = 18) -> Graph:
    """Translate dynamo's GraphModule `gm` (static shapes) into a new IR graph; `bindings`
    as for `graphopt.frontends.aten_import.import_graph`. Raises `UntranslatableError`."""
    return import_graph(gm, bindings, name=name, opset=opset, translate=_translate)


def _translate(importer: Importer, node: Any, env: dict[Any, Any]) -> Any:
    import torch

    fake = fake_value(node)
    if isinstance(fake, (int, torch.SymInt)) and not isinstance(fake, bool):
        return importer.size(fake)
    if isinstance(fake, torch.Size):
        return tuple(importer.size(d) for d in fake)
    if node.op == "call_function" and node.target is operator.getitem:
        source = env[node.args[0]]
        if isinstance(source, (tuple, list)):
            return source[node.args[1]]
        return _getitem(importer, node, source, node.args[1], env)
    key = (node.target if node.op == "call_method" else getattr(node.target, "__qualname__", None), node.op)
    if node.op == "call_function" and getattr(node.target, "__module__", None) not in _MODULES:
        raise UntranslatableError(f"no translation for {node.op} {node.target}")
    if key in NO_OPS:
        return None
    restate = ATEN_CALLS.get(key)
    if restate is None:
        raise UntranslatableError(f"no translation for {node.op} {node.target}")
    try:
        op, args, kwargs = restate(node, *node.args, **node.kwargs)
    except TypeError as exc:
        raise UntranslatableError(f"{node.op} {node.target} with these arguments: {exc}") from exc
    return translate_call(importer, _AtenNode(_overload(op), args, kwargs, node.name, {"val": fake}, node.users), env)


def _overload(name: str) -> Any:
    import torch

    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


_MODULES = frozenset({"torch", "torch._C", "torch._C._nn", "torch.nn.functional", "_operator", "builtins"})
"""Where the functions `ATEN_CALLS` lists come from (a user function of the same name is not one of them)."""
ATEN_CALLS: dict[tuple[Any, str], Callable[..., Any]] = {}


def _call(*functions: str, methods: Sequence[str] = ()) -> Callable[[Callable[..., AtenCall]], Callable[..., AtenCall]]:
    """Register the decorated restatement for the named functions (qualified names, such as
    "linear" or "_VariableFunctionsClass.matmul") and tensor methods."""

    def register(fn: Callable[..., AtenCall]) -> Callable[..., AtenCall]:
        for name in functions:
            ATEN_CALLS[(name, "call_function")] = fn
        for name in methods:
            ATEN_CALLS[(name, "call_method")] = fn
        return fn

    return register


NO_OPS = frozenset({("_log_api_usage_once", "call_function")})
"""Calls with no effect on the computation."""


def _same(op: str) -> Callable[..., AtenCall]:
    """Arguments as they are (the torch function or method takes the ATen op's arguments)."""

    def restate(node: Any, *args: Any, **kwargs: Any) -> AtenCall:
        return op, args, kwargs

    return restate


def _functions(names: Sequence[str]) -> list[str]:
    return [f"_VariableFunctionsClass.{n}" for n in names]


for _name in ("abs", "sqrt", "rsqrt", "tanh", "log", "exp", "sign", "ceil", "floor", "sin", "cos", "sigmoid", "erf", "neg", "relu", "round"):
    _call(*_functions([_name]), methods=[_name])(_same(f"aten.{_name}.default"))
for _name, _op in (
    ("matmul", "aten.matmul.default"), ("bmm", "aten.bmm.default"), ("gather", "aten.gather.default"), ("cumsum", "aten.cumsum.default"),
    ("index_select", "aten.index_select.default"), ("masked_fill", "aten.masked_fill.Scalar"),
    ("tril", "aten.tril.default"), ("triu", "aten.triu.default"), ("clamp", "aten.clamp.default"),
):
    _call(*_functions([_name]), methods=[_name])(_same(_op))
_call(*_functions(["where"]))(_same("aten.where.self"))
_call("linear")(_same("aten.linear.default"))
_call("matmul")(_same("aten.matmul.default"))
_call(*_functions(["maximum"]), methods=["maximum"])(_same("aten.maximum.default"))
_call(*_functions(["minimum"]), methods=["minimum"])(_same("aten.minimum.default"))
_call("gelu")(_same("aten.gelu.default"))
_call("scaled_dot_product_attention")(_same("aten.scaled_dot_product_attention.default"))
_call(*_functions(["conv1d"]))(_same("aten.conv1d.default"))
_call(*_functions(["conv2d"]))(_same("aten.conv2d.default"))
_call("layer_norm")(_same("aten.layer_norm.default"))
_call("pad")(_same("aten.pad.default"))
_call(*_functions(["stack"]))(_same("aten.stack.default"))
_call(methods=["unbind"])(_same("aten.unbind.int"))
_call(methods=["transpose"])(_same("aten.transpose.int"))
_call(methods=["unsqueeze"])(_same("aten.unsqueeze.default"))
_call(methods=["contiguous"])(_same("aten.contiguous.default"))
_call(methods=["clone"])(_same("aten.clone.default"))
_call(methods=["detach"])(_same("aten.detach.default"))
_call(methods=["t"])(_same("aten.t.default"))
_call(methods=["flatten"])(_same("aten.flatten.using_ints"))
_call(methods=["type_as"])(_same("aten.type_as.default"))


for _names, _op in (
    (("add", "iadd"), "add"), (("sub", "isub"), "sub"), (("mul", "imul"), "mul"), (("truediv", "itruediv"), "div"),
):
    def _arithmetic(node: Any, a: Any, b: Any, *, _op: str = _op, _in_place: bool = False) -> AtenCall:
        if _is_tensor(a):
            return f"aten.{_op}{'_' if _in_place else ''}.Tensor", (a, b), {}
        if _op in ("add", "mul"):
            return f"aten.{_op}.Tensor", (b, a), {}
        return ("aten.rsub.Scalar", (b, a), {}) if _op == "sub" else ("aten.div.Tensor", (a, b), {})

    _call(_names[0], methods=[_names[0] if _names[0] != "truediv" else "div"])(_arithmetic)
    _call(_names[1])(lambda node, a, b, _f=_arithmetic: _f(node, a, b, _in_place=True))


def _comparison(op: str) -> Callable[..., AtenCall]:
    def restate(node: Any, a: Any, b: Any) -> AtenCall:
        if not _is_tensor(a):
            raise UntranslatableError(f"{op} with a number on the left")
        return f"aten.{op}.{'Tensor' if _is_tensor(b) else 'Scalar'}", (a, b), {}

    return restate


for _op in ("eq", "ne", "lt", "le", "gt", "ge"):
    _call(_op, methods=[_op])(_comparison(_op))
_call("and_", methods=["__and__"])(_same("aten.__and__.Tensor"))
_call("or_", methods=["__or__"])(_same("aten.__or__.Tensor"))
_call("invert", "not_")(_same("aten.bitwise_not.default"))
_call("neg")(_same("aten.neg.default"))


def _is_tensor(x: Any) -> bool:
    return hasattr(fake_value(x), "shape") if hasattr(x, "meta") else False


@_call(*_functions(["addmm", "baddbmm"]), methods=["addmm", "baddbmm"])
def _addmm(node: Any, x: Any, a: Any = None, b: Any = None, *, beta: Any = 1, alpha: Any = 1, **names: Any) -> AtenCall:
    """addmm(input, mat1, mat2) and baddbmm(input, batch1, batch2), factors by position or name."""
    a = names.pop("mat1", names.pop("batch1", a))
    b = names.pop("mat2", names.pop("batch2", b))
    if names or a is None or b is None:
        raise UntranslatableError(f"{node.target} with arguments {sorted(names)}")
    op = node.target if isinstance(node.target, str) else node.target.__name__
    return f"aten.{op}.default", (x, a, b), {"beta": beta, "alpha": alpha}


@_call(*_functions(["rsub"]))
def _rsub(node: Any, x: Any, other: Any, alpha: Any = 1) -> AtenCall:
    return f"aten.rsub.{'Tensor' if _is_tensor(other) else 'Scalar'}", (x, other, alpha), {}


@_call("getattr")
def _attribute(node: Any, x: Any, name: str) -> AtenCall:
    ops = {"mT": "aten.mT.default", "T": "aten.numpy_T.default"}
    if name not in ops or not _is_tensor(x):
        raise UntranslatableError(f"attribute {name} of a tensor")
    return ops[name], (x,), {}


@_call("pow", *_functions(["pow"]), methods=["pow"])
def _power(node: Any, a: Any, b: Any) -> AtenCall:
    if not _is_tensor(a):
        return "aten.pow.Scalar", (a, b), {}
    return f"aten.pow.{'Tensor_Tensor' if _is_tensor(b) else 'Tensor_Scalar'}", (a, b), {}


@_call(*_functions(["amax", "amin"]), methods=["amax", "amin"])
def _extreme(node: Any, x: Any, dim: Any = (), keepdim: bool = False) -> AtenCall:
    op = node.target if isinstance(node.target, str) else node.target.__name__
    return f"aten.{op}.default", (x, [dim] if isinstance(dim, int) else list(dim), keepdim), {}


@_call(*_functions(["flip"]), methods=["flip"])
def _flip(node: Any, x: Any, *dims: Any) -> AtenCall:
    values = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else list(dims)
    return "aten.flip.default", (x, values), {}


@_call("dropout")
def _dropout(node: Any, input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> AtenCall:
    return "aten.dropout.default", (input, p, training), {}


@_call("embedding")
def _embedding(node: Any, input: Any, weight: Any, padding_idx: Any = None, max_norm: Any = None, *args: Any, **kwargs: Any) -> AtenCall:
    if max_norm is not None:
        raise UntranslatableError("embedding with max_norm renormalizes its weight")
    return "aten.embedding.default", (weight, input), {}


@_call("softmax", "log_softmax", methods=["softmax", "log_softmax"])
def _softmax(node: Any, input: Any, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> AtenCall:
    if dim is None:
        raise UntranslatableError("softmax without a dim")
    op = node.target if isinstance(node.target, str) else node.target.__name__
    return f"aten.{op}.int", (input, dim), {}


@_call("silu", "relu")
def _activation(node: Any, input: Any, inplace: bool = False) -> AtenCall:
    return f"aten.{node.target.__name__}.default", (input,), {}


@_call(*_functions(["cat"]))
def _cat(node: Any, tensors: Any, dim: int = 0) -> AtenCall:
    return "aten.cat.default", (list(tensors), dim), {}


@_call(*_functions(["min", "max"]), methods=["min", "max"])
def _min_max(node: Any, *args: Any, **kwargs: Any) -> AtenCall:
    if len(args) != 2 or kwargs or not _is_tensor(args[1]):
        raise UntranslatableError(f"{node.target} as a reduction")
    name = node.target if isinstance(node.target, str) else node.target.__name__
    return f"aten.{'minimum' if name == 'min' else 'maximum'}.default", args, {}


@_call(methods=["view", "reshape"])
def _view(node: Any, x: Any, *size: Any) -> AtenCall:
    sizes = list(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else list(size)
    if not all(isinstance(s, int) or hasattr(s, "meta") for s in sizes):
        raise UntranslatableError(f"{node.target} to a dtype")
    return f"aten.{node.target}.default", (x, sizes), {}


@_call(methods=["permute", "repeat", "expand"])
def _dims(node: Any, x: Any, *dims: Any) -> AtenCall:
    values = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else list(dims)
    return f"aten.{node.target}.default", (x, values), {}


@_call(methods=["squeeze"])
def _squeeze(node: Any, x: Any, dim: Any = None) -> AtenCall:
    return ("aten.squeeze.default", (x,), {}) if dim is None else ("aten.squeeze.dim", (x, dim), {})


_call(*_functions(["chunk"]), methods=["chunk"])(_same("aten.chunk.default"))


@_call(methods=["split"])
def _split(node: Any, x: Any, split_size: Any, dim: int = 0) -> AtenCall:
    if isinstance(split_size, int):
        return "aten.split.Tensor", (x, split_size, dim), {}
    return "aten.split_with_sizes.default", (x, list(split_size), dim), {}


@_call(methods=["mean", "sum"])
def _reduce(node: Any, x: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> AtenCall:
    if dim is None:
        return f"aten.{node.target}.default", (x,), {}
    return f"aten.{node.target}.{'dim' if node.target == 'mean' else 'dim_IntList'}", (x, [dim] if isinstance(dim, int) else list(dim), keepdim), {}


@_call(methods=["to", "float", "double", "half", "bfloat16", "long", "int", "bool", "type"])
def _convert(node: Any, x: Any, *args: Any, **kwargs: Any) -> AtenCall:
    fake = fake_value(node)
    if not hasattr(fake, "dtype"):
        raise UntranslatableError(f"{node.target} gives no tensor")
    return "aten._to_copy.default", (x,), {"dtype": fake.dtype}


@_call(methods=["new_ones", "new_zeros"])
def _new_filled(node: Any, x: Any, *size: Any, **kwargs: Any) -> AtenCall:
    sizes = list(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else list(size)
    return f"aten.{node.target}.default", (x, sizes), {"dtype": fake_value(node).dtype}


@_call(*_functions(["zeros", "ones"]))
def _filled(node: Any, *size: Any, **kwargs: Any) -> AtenCall:
    sizes = list(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else list(size)
    return f"aten.{node.target.__name__}.default", (sizes,), {"dtype": fake_value(node).dtype}


@_call(*_functions(["full"]))
def _full(node: Any, size: Any, fill_value: Any, **kwargs: Any) -> AtenCall:
    return "aten.full.default", (list(size), fill_value), {"dtype": fake_value(node).dtype}


@_call(*_functions(["full_like"]))
def _full_like(node: Any, x: Any, fill_value: Any, **kwargs: Any) -> AtenCall:
    return "aten.full_like.default", (x, fill_value), {"dtype": fake_value(node).dtype}


@_call(*_functions(["zeros_like", "ones_like"]))
def _filled_like(node: Any, x: Any, **kwargs: Any) -> AtenCall:
    return f"aten.{node.target.__name__}.default", (x,), {"dtype": fake_value(node).dtype}


@_call(*_functions(["arange"]))
def _arange(node: Any, *args: Any, **kwargs: Any) -> AtenCall:
    if not 1 <= len(args) <= 3:
        raise UntranslatableError("arange with keyword bounds")
    name = {1: "default", 2: "start", 3: "start_step"}[len(args)]
    return f"aten.arange.{name}", args, {"dtype": fake_value(node).dtype}


@_call(*_functions(["tensor"]))
def _tensor(node: Any, data: Any, **kwargs: Any) -> AtenCall:
    if not isinstance(data, (int, float, bool)):
        raise UntranslatableError("torch.tensor of a sequence")
    return "aten.scalar_tensor.default", (data,), {"dtype": fake_value(node).dtype}


# ----------------------------------------------------------------------------- indexing
def _getitem(importer: Importer, node: Any, source: Any, index: Any, env: dict[Any, Any]) -> Any:
    """x[index]: basic indexing (ints, slices, None, ...) as Gather / Slice / Unsqueeze (or one
    constant when x is), a tuple of index tensors by the rule of aten.index."""
    import torch

    items = index if isinstance(index, tuple) else (index,)
    if items and all(_is_tensor(i) for i in items):
        call = _AtenNode(torch.ops.aten.index.Tensor, (node.args[0], list(items)), {}, node.name, {"val": fake_value(node)}, node.users)
        return translate_call(importer, call, env)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
        raise UntranslatableError("indexing that mixes tensors with other indices")
    if any(isinstance(s, slice) and not all(v is None or isinstance(v, int) for v in (s.start, s.stop, s.step)) for s in items):
        raise UntranslatableError("slicing with computed bounds")
    fake = fake_value(node)
    if isinstance(source, State) and fake.numel() <= LARGEST_FOLDED:
        return importer.graph.add_constant(importer.graph.unique_name(node.name), np.ascontiguousarray(source.tensor.detach().cpu()[index].numpy()))
    value = importer.tensor(source)
    rank = value.type.rank or 0
    explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for item in items:
        expanded += [slice(None)] * (rank - explicit) if item is Ellipsis else [item]
    axis = 0
    for item in expanded:
        if item is None:
            value = importer.op("Unsqueeze", [value, importer.ints([axis])])
            axis += 1
        elif isinstance(item, int):
            value = importer.op("Gather", [value, importer.scalar(item, DType.INT64)], axis=axis)
        else:
            start, stop, step = item.start or 0, INT64_MAX if item.stop is None else item.stop, item.step or 1
            if (start, stop, step) != (0, INT64_MAX, 1):
                value = importer.op("Slice", [value, importer.ints([start]), importer.ints([stop]), importer.ints([axis]), importer.ints([step])])
            axis += 1
    if tuple(value.shape or ()) != tuple(int(d) for d in fake.shape):
        raise UntranslatableError(f"indexing {node.name} gave {value.type}, torch says {list(fake.shape)}")
    if value.producer is not None and value is not source:
        importer.graph.rename_value(value, importer.graph.unique_name(node.name))
    return value

