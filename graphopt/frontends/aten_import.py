"""ATen graph -> IR directly, op by op: `import_program(exported_program)` and
`import_graph(graph_module, bindings)` (a make_fx trace whose placeholders the caller binds).

The fast path of `from_fx`: no ONNX export, no second trace, no weight copies.

- User inputs become graph inputs, typed from torch's fake values; a symbolic dim keeps its
  symbol's name (`s0`, ...), a dim computed from symbols its canonical expression (`s0 + s1`,
  `2*s1`; see `graphopt.ir.symbolic`; unknown when the expression has no canonical form, such
  as `s0//2` or `Max(1, s0)`), and sizes computed from symbols (SymInt nodes, symbolic output
  shapes) become int64 vectors read off the inputs' shapes (`Shape`, `Add`, `Mul`, `Div`).
- Parameters, buffers and lifted constants become IR constants holding numpy views of the
  very tensors (passes never write constants, and `to_fx` shares them again rather than
  copying); a linear layer's weight is held transposed (a view as well), as the [K, N]
  MatMul operand that the passes and the prepacked linears expect.
- Each ATen op is translated by its rule in `graphopt.frontends.aten_ops` into the ONNX ops
  torch's own exporter would give (`scaled_dot_product_attention` into graphopt::Attention).
- An op that reads only constants is computed by torch right away (results up to
  `LARGEST_FOLDED` elements), so cleanup has no constant subgraph left to run through ONNX
  Runtime.
- Every translated value is checked against torch's metadata (dtype, rank, static dims).

An op without a rule, an op use a rule does not cover, or a value that contradicts torch's
metadata raises `UntranslatableError` naming the op, and `from_fx` translates through
torch.onnx instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from graphopt.errors import GraphError, UnsupportedOpError
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Value
from graphopt.ir.tensor import ArrayTensor
from graphopt.ir.symbolic import parse_dim
from graphopt.ir.types import Dim, TensorType, merge_types

INT64_MAX = 2**63 - 1
LARGEST_FOLDED = 1_000_000
"""Ops reading only constants are computed at import when their result has at most this
many elements (fold-constants' default limit)."""


class UntranslatableError(UnsupportedOpError):
    """The graph holds an op, or a use of one, that `import_program` has no rule for."""


@dataclasses.dataclass(frozen=True)
class SymDim:
    """A size known only when the graph runs: an int64 vector of one element."""

    value: Value


@dataclasses.dataclass
class State:
    """A parameter, buffer or lifted constant; it becomes an IR constant when first read."""

    name: str
    tensor: Any


Operand = Union[Value, State, SymDim, bool, int, float]
Rule = Callable[..., Any]


class Importer:
    """The graph being built and the helpers the op rules build it with."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.symbols: dict[str, tuple[Value, int]] = {}
        """Symbol name -> (graph input, axis) whose size it is."""
        self._sizes: dict[str, Value] = {}
        self._state: dict[int, Value] = {}
        self._transposed: dict[int, Value] = {}
        """Constants made of state tensors, by id of the tensor (tied weights share one)."""
        self._scalars: dict[tuple, Value] = {}
        self._vectors: dict[tuple[int, ...], Value] = {}
        self._settled: set[int] = set()

    # ----------------------------------------------------------------- values
    def tensor(self, x: Any) -> Value:
        """The graph value of a tensor argument (a state tensor becomes a constant)."""
        if isinstance(x, Value):
            return x
        if isinstance(x, State):
            if id(x.tensor) not in self._state:
                self._state[id(x.tensor)] = self.graph.add_constant(x.name, ArrayTensor(*_numpy_view(x.tensor)))
            return self._state[id(x.tensor)]
        raise UntranslatableError(f"expected a tensor, got {type(x).__name__}")

    def transposed(self, x: Any) -> Value:
        """x^T of a 2-D tensor: a transposed view for a state tensor, else a Transpose node."""
        if isinstance(x, State) and x.tensor.dim() == 2:
            if id(x.tensor) not in self._transposed:
                array, dtype = _numpy_view(x.tensor)
                self._transposed[id(x.tensor)] = self.graph.add_constant(f"{x.name}_t", ArrayTensor(array.T, dtype))
            return self._transposed[id(x.tensor)]
        return self.op("Transpose", [self.tensor(x)], perm=(1, 0))

    def operand(self, x: Operand, dtype: DType) -> Value:
        """A tensor, state tensor, size or Python number as a value of `dtype`."""
        if isinstance(x, (bool, int, float)):
            return self.scalar(x, dtype)
        if isinstance(x, SymDim):
            return self.cast(self.op("Reshape", [x.value, self.ints([])]), dtype)
        return self.cast(self.tensor(x), dtype)

    def scalar(self, number: Union[bool, int, float], dtype: DType) -> Value:
        """A 0-d constant of `dtype` (one per number and dtype)."""
        key = (dtype, repr(number))
        if key not in self._scalars:
            self._scalars[key] = self.graph.add_constant(self.graph.unique_name("scalar"), np.array(number, dtype=dtype.to_numpy()))
        return self._scalars[key]

    def ints(self, values: Sequence[Union[int, SymDim]]) -> Value:
        """An int64 vector of ints and sizes (a constant when all are ints)."""
        if all(isinstance(v, int) for v in values):
            key = tuple(int(v) for v in values)  # type: ignore[arg-type]
            if key not in self._vectors:
                self._vectors[key] = self.graph.add_constant(self.graph.unique_name("ints"), np.array(key, dtype=np.int64))
            return self._vectors[key]
        pieces: list[Value] = []
        run: list[int] = []
        for v in values:
            if isinstance(v, SymDim):
                if run:
                    pieces.append(self.ints(run))
                    run = []
                pieces.append(v.value)
            elif isinstance(v, int):
                run.append(v)
            else:
                raise UntranslatableError(f"expected a size, got {type(v).__name__}")
        if run:
            pieces.append(self.ints(run))
        return pieces[0] if len(pieces) == 1 else self.op("Concat", pieces, axis=0)

    def cast(self, value: Value, dtype: DType) -> Value:
        """`value` as `dtype` (a Cast node only when it is not already)."""
        return value if value.dtype == dtype else self.op("Cast", [value], to=int(dtype))

    def op(self, op_type: str, inputs: Sequence[Optional[Value]], *, domain: str = "", **attrs: Any) -> Value:
        """Append one single-output node; its output value."""
        return self.graph.add_node(op_type, inputs, attrs, domain=domain).output

    def ops(self, op_type: str, inputs: Sequence[Optional[Value]], outputs: int, **attrs: Any) -> tuple[Value, ...]:
        """Append one node with `outputs` outputs; those values."""
        return self.graph.add_node(op_type, inputs, attrs, num_outputs=outputs).outputs

    # ----------------------------------------------------------------- torch metadata
    def size(self, dim: Any) -> Union[int, SymDim]:
        """A dim of a fake tensor (or a SymInt) as an int or a size computed in the graph."""
        expr = _expr(dim)
        if expr is None:
            return int(dim)
        if expr.is_number:
            return int(expr)
        return SymDim(self._size_value(expr))

    def shape(self, node: Any) -> Value:
        """The int64 shape vector of fx node `node`'s (single tensor) result."""
        return self.ints([self.size(d) for d in _tensor_meta(node).shape])

    def _size_value(self, expr: Any) -> Value:
        import sympy

        from torch.utils._sympy.functions import FloorDiv

        key = str(expr)
        if key in self._sizes:
            return self._sizes[key]
        if expr.is_Symbol:
            if key not in self.symbols:
                raise UntranslatableError(f"size {key} is not a dim of any graph input")
            source, axis = self.symbols[key]
            value = self.op("Shape", [source], start=axis, end=axis + 1)
        elif expr.is_Integer:
            value = self.ints([int(expr)])
        elif isinstance(expr, (sympy.Add, sympy.Mul)):
            parts = [self._size_value(arg) for arg in expr.args]
            value = parts[0]
            for part in parts[1:]:
                value = self.op("Add" if isinstance(expr, sympy.Add) else "Mul", [value, part])
        elif isinstance(expr, FloorDiv):
            value = self.op("Div", [self._size_value(expr.args[0]), self._size_value(expr.args[1])])
        else:
            raise UntranslatableError(f"size expression {key} has no translation")
        self._sizes[key] = value
        return value


def dtype_of(node: Any) -> DType:
    """The IR dtype of fx node `node`'s tensor result."""
    return _dtype(_tensor_meta(node).dtype)


def static_shape(node: Any) -> tuple[Optional[int], ...]:
    """The dims of fx node `node`'s tensor result: ints, None where symbolic."""
    return tuple(_static_dim(d) for d in _tensor_meta(node).shape)


@dataclasses.dataclass(frozen=True)
class GraphInput:
    """Binds a placeholder to a new graph input of this name (typed from torch's metadata)."""

    name: str


def import_program(
    program: Any, *, name: str = "main_graph", opset: int = 18,
    input_names: Sequence[str] = (), constant_names: Optional[dict[str, str]] = None,
) -> Graph:
    """Translate `program` (a torch.export.ExportedProgram) into a new IR graph.

    `input_names` name the graph inputs (default: the placeholders' names); `constant_names`
    maps state names (parameter/buffer/constant names) to constant names. The program is not
    changed; the constants share memory with its tensors. Raises `UntranslatableError` (see
    the module docstring).
    """
    from torch.export.graph_signature import InputKind

    signature = program.graph_signature
    mutation = state_mutation(program)
    if mutation:
        raise UntranslatableError(mutation)
    names = iter(input_names)
    renamed = constant_names or {}
    bindings: list[Any] = []
    for spec in signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            tensor = program.state_dict[spec.target] if spec.target in program.state_dict else program.constants[spec.target]
            bindings.append(State(renamed.get(spec.target, spec.target), tensor))
        elif spec.kind == InputKind.USER_INPUT:
            bindings.append(GraphInput(next(names, spec.arg.name)))
        else:
            raise UntranslatableError(f"program input {spec.arg.name} is a {spec.kind.name}")
    return import_graph(program.graph_module, bindings, name=name, opset=opset)


def state_mutation(program: Any, names: Optional[dict[str, str]] = None) -> Optional[str]:
    """What `program` (an ExportedProgram) updates in place besides its outputs (buffers such
    as batch-norm statistics, inputs), as a sentence naming it (by `names`, state name ->
    user-facing name, where given); None for a functional program. The IR is functional:
    such a program cannot be imported without losing the update. Torch.export's training IR
    keeps updates inside ops (an in-place `add_`, `batch_norm`'s statistics): functionalize it
    (`run_decompositions({})`) for them to show."""
    from torch.export.graph_signature import OutputKind

    for out_spec in program.graph_signature.output_specs:
        if out_spec.kind != OutputKind.USER_OUTPUT:
            target = out_spec.target or out_spec.arg.name
            target = (names or {}).get(target, target)
            return f"the graph updates {target} in place ({out_spec.kind.name.lower()}); graphopt imports functional graphs only"
    return None


def random_draw(module: Any) -> Optional[str]:
    """The first op of the ATen graph `module` that draws random numbers (dropout in training
    mode, attention with dropout, rand/bernoulli...), as a sentence; None when none does."""
    import torch

    for node in module.graph.nodes:
        tags = getattr(node.target, "tags", ())
        if node.op != "call_function" or torch.Tag.nondeterministic_seeded not in tags:
            continue
        name = str(node.target)
        if name.startswith(("aten.dropout.", "aten.feature_dropout.", "aten.alpha_dropout.", "aten.native_dropout.")):
            p, train = (list(node.args[1:3]) + [None, None])[:2]
            if not train or not p:
                continue
        elif name.startswith("aten.scaled_dot_product_attention."):
            p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
            if not p:
                continue
        return f"{name} draws random numbers"
    return None


def import_graph(
    module: Any, bindings: Sequence[Any], *, name: str = "main_graph", opset: int = 18,
    translate: Optional[Callable[[Importer, Any, dict[Any, Any]], Any]] = None,
) -> Graph:
    """Translate the ATen graph of `module` (a torch.fx.GraphModule with torch's metadata on
    its nodes, e.g. a make_fx trace) into a new IR graph.

    `bindings` gives, per placeholder in order, a `GraphInput`, a `State` (a constant) or a
    Python number. Attributes read with get_attr become constants too. `translate(importer,
    node, env)` translates call nodes (default: `translate_call`, for ATen ops; see
    `graphopt.frontends.dynamo_import` for dynamo's torch-level graphs). Raises
    `UntranslatableError` (see the module docstring).
    """
    graph = Graph(name, {"": opset})
    importer = Importer(graph)
    placeholders = iter(bindings)
    call = translate or translate_call
    env: dict[Any, Any] = {}
    for node in module.graph.nodes:
        if node.op == "placeholder":
            env[node] = _placeholder(importer, node, next(placeholders))
        elif node.op == "get_attr":
            env[node] = State(node.target, _attribute(module, node.target))
        elif node.op in ("call_function", "call_method") and (translate is not None or node.op == "call_function"):
            env[node] = call(importer, node, env)
        elif node.op == "output":
            graph.set_outputs(_output(importer, value) for value in _flat(node.args[0], env))
        else:
            raise UntranslatableError(f"{node.op} node {node.name}")
    return graph


def _attribute(module: Any, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    if not hasattr(module, "detach"):
        raise UntranslatableError(f"attribute {target} is a {type(module).__name__}, not a tensor")
    return module


def _placeholder(importer: Importer, node: Any, binding: Any) -> Any:
    if not isinstance(binding, GraphInput):
        return binding
    fake = fake_value(node)
    if not hasattr(fake, "shape"):
        raise UntranslatableError(f"input {node.name} is a {type(fake).__name__}, not a tensor")
    value = importer.graph.add_input(importer.graph.unique_name(binding.name), _tensor_type(fake))
    for axis, dim in enumerate(fake.shape):
        expr = _expr(dim)
        if expr is not None and expr.is_Symbol:
            importer.symbols.setdefault(str(expr), (value, axis))
    return value


def translate_call(importer: Importer, node: Any, env: dict[Any, Any]) -> Any:
    """The IR value(s) of ATen call node `node` (arguments looked up in `env`): a size, an
    element of a tuple, a folded constant, or what the op's rule builds."""
    import operator

    import torch
    from torch.fx.node import map_arg

    from graphopt.frontends.aten_ops import RULES

    meta = fake_value(node)
    if isinstance(meta, (torch.SymInt, int)) and not isinstance(meta, bool):
        return importer.size(meta)
    if isinstance(meta, (torch.SymFloat, torch.SymBool)):
        raise UntranslatableError(f"{node.target} gives a symbolic {type(meta).__name__}")
    if node.target is operator.getitem:
        return env[node.args[0]][node.args[1]]
    op = str(node.target)
    rule = RULES.get(op)
    if rule is None:
        raise UntranslatableError(f"no rule for op {op}")
    args = map_arg(node.args, lambda n: env[n])
    kwargs = map_arg(node.kwargs, lambda n: env[n])
    folded = _fold(importer, node, args, kwargs, meta)
    if folded is not None:
        return folded
    try:
        result = rule(importer, node, *args, **kwargs)
    except (GraphError, ValueError, TypeError, RuntimeError, KeyError, IndexError) as exc:
        raise UntranslatableError(f"op {op} ({node.name}): {type(exc).__name__}: {exc}") from exc
    _settle(importer, node, result, meta)
    return result


def _fold(importer: Importer, node: Any, args: Any, kwargs: Any, meta: Any) -> Optional[Value]:
    """The result of a functional op that reads only constants, computed now by torch as a new
    constant (exactly torch's numbers, and nothing left for fold-constants to run through ONNX
    Runtime); None when the op reads a graph value or a size, reads no tensor at all, or gives
    no single tensor of at most LARGEST_FOLDED elements."""
    import torch
    from torch.fx.node import map_aggregate

    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.is_mutable or "dropout" in str(node.target) or not hasattr(meta, "shape"):
        return None
    count = 1
    for dim in meta.shape:
        static = _static_dim(dim)
        if static is None:
            return None
        count *= static
    if count > LARGEST_FOLDED:
        return None
    constants: list[Any] = []

    def real(x: Any) -> Any:
        if isinstance(x, State):
            constants.append(x)
            return x.tensor
        if isinstance(x, Value) and x.const is not None and x.dtype is not None and x.dtype.to_numpy().kind in "biuf":
            constants.append(x)
            return torch.from_numpy(x.const.numpy())
        if isinstance(x, (Value, SymDim)):
            raise _NotConstant
        return x

    try:
        real_args, real_kwargs = map_aggregate(args, real), map_aggregate(kwargs, real)
    except _NotConstant:
        return None
    if not constants:
        return None
    try:
        with torch.no_grad():
            result = node.target(*real_args, **real_kwargs)
    except (RuntimeError, TypeError, ValueError):
        return None
    if not isinstance(result, torch.Tensor) or result.dtype != meta.dtype or tuple(result.shape) != tuple(meta.shape):
        return None
    return importer.graph.add_constant(importer.graph.unique_name(node.name), ArrayTensor(*_numpy_view(result)))


class _NotConstant(Exception):
    """An argument is only known when the graph runs."""


def _settle(importer: Importer, node: Any, result: Any, meta: Any) -> None:
    """Check the values a rule gave against torch's metadata and name new ones after the node."""
    if isinstance(result, Value):
        results, metas = [result], [meta]
    elif isinstance(result, tuple):
        results, metas = list(result), list(meta) if isinstance(meta, (tuple, list)) else []
    else:
        return
    for index, (value, fake) in enumerate(zip(results, metas)):
        if not isinstance(value, Value) or not hasattr(fake, "shape"):
            continue
        expected = _tensor_type(fake)
        if value.dtype != expected.dtype or (value.shape is not None and len(value.shape) != len(expected.shape)):  # type: ignore[arg-type]
            raise UntranslatableError(f"op {node.target} ({node.name}) gave {value.type}, torch says {expected}")
        if value.shape is not None and any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(value.shape, expected.shape)):  # type: ignore[arg-type]
            raise UntranslatableError(f"op {node.target} ({node.name}) gave {value.type}, torch says {expected}")
        value.type = merge_types(expected, value.type)
        if value.producer is not None and id(value) not in importer._settled:
            importer._settled.add(id(value))
            graph = importer.graph
            graph.rename_value(value, graph.unique_name(node.name if len(results) == 1 else f"{node.name}_{index}"))


def _output(importer: Importer, value: Any) -> Value:
    if isinstance(value, State):
        value = importer.tensor(value)
    if not isinstance(value, Value):
        raise UntranslatableError(f"graph output is a {type(value).__name__}, not a tensor")
    if value.producer is None:
        return importer.op("Identity", [value])
    return value


def _flat(outputs: Any, env: dict[Any, Any]) -> list[Any]:
    from torch.fx.node import map_arg

    flat: list[Any] = []

    def visit(item: Any) -> None:
        if isinstance(item, (list, tuple)):
            for sub in item:
                visit(sub)
        else:
            flat.append(item)

    visit(map_arg(outputs, lambda n: env[n]))
    return flat


def fake_value(node: Any) -> Any:
    """torch's fake result of fx node `node` (`val` in ATen graphs, `example_value` in dynamo's)."""
    meta = getattr(node, "meta", {})
    return meta["val"] if "val" in meta else meta.get("example_value")


def _tensor_meta(node: Any) -> Any:
    fake = fake_value(node)
    if not hasattr(fake, "shape"):
        raise UntranslatableError(f"{getattr(node, 'name', node)} has no tensor metadata")
    return fake


def _tensor_type(fake: Any) -> TensorType:
    return TensorType(_dtype(fake.dtype), tuple(_dim_label(d) for d in fake.shape))


def _dtype(torch_dtype: Any) -> DType:
    try:
        return DType.from_torch(torch_dtype)
    except ValueError as exc:
        raise UntranslatableError(str(exc)) from exc


def _expr(dim: Any) -> Any:
    """The sympy expression of a SymInt, None for a plain int."""
    node = getattr(dim, "node", None)
    return None if node is None else node.expr


def _static_dim(dim: Any) -> Optional[int]:
    expr = _expr(dim)
    if expr is None:
        return int(dim)
    return int(expr) if expr.is_number else None


def _dim_label(dim: Any) -> Dim:
    """A fake tensor's dim as an IR dim: an int, a symbol, a canonical expression of symbols,
    or None when torch's expression has none."""
    expr = _expr(dim)
    if expr is None or expr.is_number:
        return _static_dim(dim)
    return parse_dim(str(expr))


def _numpy_view(tensor: Any) -> tuple[np.ndarray, DType]:
    """A numpy view of a CPU tensor's memory (copied off other devices)."""
    import torch

    dtype = _dtype(tensor.dtype)
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    if data.is_sparse or data.is_quantized or data.is_conj() or data.is_neg():
        raise UntranslatableError(f"constant of layout {data.layout} ({data.dtype}) has no IR form")
    plain = dtype.to_numpy().kind != "V" and data.dtype not in (torch.bfloat16,) and not str(data.dtype).startswith("torch.float8")
    if plain:
        return data.numpy(), dtype
    widths = {1: torch.uint8, 2: torch.int16}
    return data.view(widths[data.element_size()]).numpy().view(dtype.to_numpy()), dtype
