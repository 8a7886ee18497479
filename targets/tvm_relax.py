"""Translate a graphopt IR graph into a Relax module (one function, ``main``).

`to_relax(graph)` builds the module with `relax.BlockBuilder`, node by node:

- Symbolic dims of the graph inputs (``batch``, ``seq``) become TIR variables, so one build
  serves any batch and sequence length.
- Shape arithmetic (`Shape`, then `Gather`/`Slice`/`Concat`/`Add`/... on small integer
  vectors) is evaluated here, on lists of TIR expressions, and handed to the ops that take a
  shape (`Reshape`, `Expand`, `Range`, `ConstantOfShape`, ...), as Relax needs shapes to be
  shape expressions, not tensors.
- Weights (constants of more than `INLINE_LIMIT` elements) become parameters of ``main``
  after the graph inputs, in the order of `RelaxModule.params`; small constants are inlined.
- Data movement, elementwise and shape ops are translated here; the compute ops (matmuls
  with packed weights, norms, softmax, conv, graphopt's Attention, Gelu, RMSNorm and
  SkipLayerNorm) in `tvm_relax_compute`, the quantization ops (Quantize/DequantizeLinear,
  DynamicQuantizeLinear, MatMulInteger, com.microsoft MatMulNBits; constant MatMulNBits
  weights dequantized at build time) in `tvm_relax_quant`; both register into the same rule table.

Ops without a rule here, and nodes reading or writing an element type the translation does
not take (bfloat16, float8, int4: see `_TVM_DTYPES`), are reported by `unsupported_nodes` (the
target names them and the types). A rule refuses what it cannot compute as ONNX specifies by
raising `RelaxConversionError`; any other exception from a rule is a bug and propagates as it
is (with a note naming the node), never disguised as a refusal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from graphopt.errors import UnsupportedOpError
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value
from graphopt.ir.schema import GRAPHOPT_DOMAIN
from graphopt.ir.symbolic import evaluate_dim
from graphopt.targets.dtype_support import node_dtypes

INLINE_LIMIT = 64
"""Constants with more elements than this are passed as parameters of the Relax function."""

PACK = 32
"""Column panel width of packed matmul weights: [K, N] is stored as [N / PACK, K, PACK], so
the CPU matmul schedule reads each panel contiguously (no cache-set conflicts between rows)."""

_INT_MAX = 2**62
_LOWEST = float(np.finfo(np.float32).min)


class RelaxConversionError(UnsupportedOpError):
    """A node could not be translated to Relax: a deliberate refusal of an op, attribute
    value or dtype the translation cannot compute exactly (never a bug in a rule)."""


@dataclasses.dataclass
class RelaxModule:
    """The module and the weights ``main`` takes after the graph inputs."""

    module: Any
    params: list[np.ndarray]


@dataclasses.dataclass
class _Sym:
    """A small integer tensor whose elements are known here: ints or TIR expressions."""

    data: np.ndarray  # dtype object
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.data, np.ndarray):
            scalar = np.empty((), dtype=object)
            scalar[()] = self.data
            self.data = scalar


@dataclasses.dataclass
class _Packed:
    """A [K, N] weight passed as [N / PACK, K, PACK]; only `MatMul` and `Gemm` read it."""

    var: Any


def _is_packable_weight(value: Value, data: np.ndarray) -> bool:
    """A float 2-D weight whose every use is as the right operand of a MatMul (or a Gemm
    without transposes)."""
    uses = value.uses()
    return (data.ndim == 2 and data.dtype == np.float32 and data.shape[1] % PACK == 0 and bool(uses) and not value.is_graph_output
            and all(u.node.domain == "" and u.index == 1 and (u.node.op_type == "MatMul" or _plain_gemm(u.node)) for u in uses))


def _plain_gemm(node: Node) -> bool:
    return node.op_type == "Gemm" and not node.attrs.get("transA", 0) and not node.attrs.get("transB", 0)


def to_relax(graph: Graph, *, pack_weights: bool = True, static_dims: Optional[dict[str, int]] = None) -> RelaxModule:
    """`graph` as a Relax IRModule whose ``main`` takes (inputs..., params...);
    `pack_weights`: matmul weights in CPU column panels (see `PACK`); `static_dims`: sizes
    of symbolic dims (by symbol) to build the module for, so the input dims that are those
    symbols, or expressions over them only, become constants (tuning needs static shapes).
    Constant MatMulNBits weights are dequantized first (`tvm_relax_quant.dequantize_nbits_weights`)."""
    from graphopt.targets.tvm_relax_quant import dequantize_nbits_weights

    return _Converter(dequantize_nbits_weights(graph), pack_weights, static_dims or {}).run()


def unsupported_nodes(graph: Graph) -> list[Node]:
    """Nodes whose op has no translation rule, or that read or write an element type the
    translation refuses (`unsupported_dtypes`)."""
    return [n for n in graph.nodes if _rule(n) is None or unsupported_dtypes(n)]


def unsupported_dtypes(node: Node) -> list[DType]:
    """The element types `node` reads or writes that are not `_TVM_DTYPES` (bfloat16, float8,
    int4, strings, ...): refused before translation, naming the node, rather than when the
    translation meets the first such value."""
    return [d for d in node_dtypes(node) if d == DType.STRING or d.to_numpy().name not in _TVM_DTYPES]


def native_graphopt_ops() -> frozenset[str]:
    """graphopt-domain ops translated directly (others must be decomposed first)."""
    return frozenset(name for (domain, name) in _RULES if domain == GRAPHOPT_DOMAIN)


def _rule(node: Node) -> Optional[Callable[..., Any]]:
    return _RULES.get((node.domain, node.op_type))


class _Converter:
    def __init__(self, graph: Graph, pack_weights: bool, static_dims: dict[str, int]) -> None:
        from tvm import relax, tirx as tir

        self.relax, self.tir = relax, tir
        self.graph = graph
        self.pack_weights = pack_weights
        self.static_dims = static_dims
        self.bb = relax.BlockBuilder()
        self.env: dict[Value, Any] = {}
        self.dims: dict[str, Any] = {}
        self.params: list[np.ndarray] = []
        self.param_vars: list[Any] = []
        from tvm import sym

        self.analyzer = sym.Analyzer()

    def run(self) -> RelaxModule:
        relax = self.relax
        inputs = [relax.Var(_ident(v.name), self._struct_info(v)) for v in self.graph.inputs]
        for value, var in zip(self.graph.inputs, inputs):
            self.env[value] = var
        for value in self.graph.constants.values():
            data = value.const.numpy()  # type: ignore[union-attr]
            if data.dtype.name not in _TVM_DTYPES:
                raise RelaxConversionError(f"constant '{value.name}': element type {data.dtype.name} is not supported by the TVM target")
            if data.size <= INLINE_LIMIT:
                self.env[value] = data
                continue
            packed = self.pack_weights and _is_packable_weight(value, data)
            if packed:
                data = data.reshape(data.shape[0], -1, PACK).transpose(1, 0, 2)
            var = relax.Var(f"p{len(self.params)}", relax.TensorType(data.shape, _dtype(data.dtype)))
            self.params.append(np.ascontiguousarray(data))
            self.param_vars.append(var)
            self.env[value] = _Packed(var) if packed else var
        with self.bb.function("main", inputs + self.param_vars):
            with self.bb.dataflow():
                for node in self.graph.nodes:
                    self._convert(node)
                outputs = [self.tensor(self.env[v], v.dtype.to_numpy() if v.dtype is not None else None) for v in self.graph.outputs]
                result = self.bb.emit_output(relax.Tuple(outputs))
            self.bb.emit_func_output(result)
        return RelaxModule(self.bb.get(), self.params)

    def _struct_info(self, value: Value) -> Any:
        from tvm.ir import Range

        if value.shape is None or value.dtype is None:
            raise RelaxConversionError(f"graph input '{value.name}': TVM needs its rank and dtype to be known")
        try:
            dtype = _dtype(value.dtype.to_numpy())
        except (RelaxConversionError, TypeError) as exc:
            raise RelaxConversionError(f"graph input '{value.name}': {exc}") from None
        shape = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                shape.append(dim)
                continue
            size = evaluate_dim(dim, self.static_dims) if isinstance(dim, str) and self.static_dims else None
            if size is not None:
                shape.append(size)
                continue
            name = dim if isinstance(dim, str) else f"{value.name}_dim{axis}"
            if name not in self.dims:
                self.dims[name] = self.tir.Var(_ident(name), "int64")
                self.analyzer.bind(self.dims[name], Range.from_min_extent(1, 2**31))
            shape.append(self.dims[name])
        return self.relax.TensorType(shape, dtype)

    def _convert(self, node: Node) -> None:
        rule = _rule(node)
        if rule is None:
            raise RelaxConversionError(f"node {node.label}: op {node.qualified_op} has no TVM translation")
        args = [None if v is None else self.env[v] for v in node.inputs]
        try:
            results = rule(self, node, *args)
        except RelaxConversionError as exc:
            raise RelaxConversionError(f"node {node.label}: {exc}") from None
        except Exception as exc:
            exc.add_note(f"graphopt: raised while translating node {node.label} to Relax (a bug in targets/tvm_relax*.py)")
            raise
        if not isinstance(results, list):
            results = [results]
        for out in node.outputs[len(results):]:
            if out.uses() or out.is_graph_output:
                raise RelaxConversionError(f"node {node.label}: output '{out.name}' is not computed by the TVM translation")
        for out, result in zip(node.outputs, results):
            self.env[out] = result

    # --- values ---------------------------------------------------------------------
    def emit(self, expr: Any) -> Any:
        return self.bb.normalize(self.bb.emit(expr))

    def tensor(self, value: Any, dtype: Any = None) -> Any:
        """A Relax tensor expression for a Relax value, numpy constant or `_Sym`."""
        relax = self.relax
        if isinstance(value, np.ndarray):
            if dtype is not None and value.dtype != np.dtype(dtype):
                value = value.astype(dtype)
            return relax.const(value, _dtype(value.dtype))
        if isinstance(value, _Sym):
            if all(isinstance(e, (int, np.integer)) for e in value.data.flat):
                return relax.const(value.data.astype(value.dtype), value.dtype)
            if value.dtype == "bool":
                raise RelaxConversionError("a boolean shape computation depends on runtime dims")
            flat = self.emit(relax.op.shape_to_tensor(relax.ShapeExpr([_prim(e) for e in value.data.flat])))
            if value.data.ndim != 1:
                flat = self.emit(relax.op.reshape(flat, list(value.data.shape)))
            if value.dtype != "int64":
                flat = self.emit(relax.op.astype(flat, value.dtype))
            return flat
        return value

    def sym(self, value: Any) -> Optional[_Sym]:
        """`value` as a `_Sym` when it is a small integer constant or already one."""
        if isinstance(value, _Sym):
            return value
        if isinstance(value, np.ndarray) and value.dtype.kind in "iub" and value.size <= INLINE_LIMIT:
            return _Sym(np.array(value.tolist(), dtype=object).reshape(value.shape), value.dtype.name)
        return None

    def ints(self, value: Any) -> list[Any]:
        """A shape-like operand as a list of ints / TIR expressions."""
        sym = self.sym(value)
        if sym is None:
            raise RelaxConversionError("a shape operand is computed from tensor data; TVM needs it from shapes or constants")
        return [self.simplify(e) for e in sym.data.reshape(-1).tolist()]

    def shape(self, expr: Any) -> list[Any]:
        info = self.bb.normalize(expr).ty
        if info.shape is None:
            raise RelaxConversionError("a tensor's rank is unknown")
        return [_unwrap(d) for d in info.shape.values]

    def cast_shape(self, expr: Any, dims: list[Any]) -> Any:
        """`expr` with its shape stated as `dims` where Relax could not infer it."""
        info = expr.ty
        if info.shape is not None:
            return expr
        return self.bb.match_cast(expr, self.relax.TensorType([_prim(d) for d in dims], str(info.dtype)))

    def rank(self, expr: Any) -> int:
        return len(self.shape(expr))

    def simplify(self, expr: Any) -> Any:
        if isinstance(expr, (int, np.integer, bool, np.bool_)):
            return int(expr)
        return _unwrap(self.analyzer.simplify(expr))


def _ident(name: str) -> str:
    text = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return text if text and not text[0].isdigit() else f"v_{text}"


_TVM_DTYPES = frozenset({"bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})
"""Element types the translation passes to TVM (others, e.g. bfloat16, float8, strings, are refused)."""


def _dtype(dtype: Any) -> str:
    """TVM's name of a numpy dtype; RelaxConversionError for a type TVM does not take here."""
    name = np.dtype(dtype).name
    if name not in _TVM_DTYPES:
        raise RelaxConversionError(f"element type {name} is not supported by the TVM target")
    return name


def _unwrap(expr: Any) -> Any:
    from tvm import tirx as tir

    if isinstance(expr, tir.IntImm):
        return int(expr.value)
    return expr


def _prim(expr: Any) -> Any:
    from tvm import tirx as tir

    if isinstance(expr, (int, np.integer)):
        return tir.IntImm("int64", int(expr))
    return expr


def _is_sym(c: _Converter, values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(c.sym(v) is not None for v in present) and any(isinstance(v, _Sym) for v in present)


# --- rules: each takes (converter, node, *inputs) and returns a value or a list --------

_RULES: dict[tuple[str, str], Callable[..., Any]] = {}


def _rule_for(*names: str, domain: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            _RULES[(domain, name)] = fn
        return fn

    return register


_BINARY = {  # ONNX op: Relax op
    "Add": "add",
    "Sub": "subtract",
    "Mul": "multiply",
    "Div": "divide",
    "Pow": "power",
    "Equal": "equal",
    "Less": "less",
    "Greater": "greater",
    "LessOrEqual": "less_equal",
    "GreaterOrEqual": "greater_equal",
    "And": "logical_and",
    "Or": "logical_or",
}

_VARIADIC = {"Max": ("Max", "maximum"), "Min": ("Min", "minimum"), "Sum": ("Add", "add"), "Mean": ("Add", "add")}
"""Ops over any number of inputs: the pairwise op folded over them (`_sym_binary`'s name, Relax op)."""


def _sym_binary(c: _Converter, op: str, a: _Sym, b: _Sym) -> _Sym:
    from tvm import tirx as tir

    def apply(x: Any, y: Any) -> Any:
        if isinstance(x, int) and isinstance(y, int):
            return {"Add": x + y, "Sub": x - y, "Mul": x * y, "Div": _truncated_quotient(x, y), "Equal": x == y, "Less": x < y,
                    "Greater": x > y, "LessOrEqual": x <= y, "GreaterOrEqual": x >= y, "And": bool(x and y), "Or": bool(x or y),
                    "Min": min(x, y), "Max": max(x, y)}[op]
        x, y = _prim(x) if isinstance(x, int) else x, _prim(y) if isinstance(y, int) else y
        table = {"Add": lambda: x + y, "Sub": lambda: x - y, "Mul": lambda: x * y, "Div": lambda: tir.truncdiv(x, y),
                 "Equal": lambda: x == y, "Less": lambda: x < y, "Greater": lambda: x > y, "LessOrEqual": lambda: x <= y,
                 "GreaterOrEqual": lambda: x >= y, "Min": lambda: tir.min(x, y), "Max": lambda: tir.max(x, y)}
        if op not in table:
            raise RelaxConversionError(f"{op} on runtime dims is not supported")
        return c.simplify(table[op]())

    da, db = np.broadcast_arrays(a.data, b.data)
    out = np.empty(da.shape, dtype=object)
    for index in np.ndindex(da.shape):
        out[index] = apply(da[index], db[index])
    boolean = op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or")
    return _Sym(out, "bool" if boolean else a.dtype)


def _truncated_quotient(x: int, y: int) -> int:
    """x / y rounded toward zero, as ONNX's integer Div (0 for a zero divisor, which ONNX leaves undefined)."""
    if not y:
        return 0
    quotient = abs(x) // abs(y)
    return quotient if (x >= 0) == (y > 0) else -quotient


@_rule_for(*_BINARY)
def _binary(c: _Converter, node: Node, a: Any, b: Any) -> Any:
    if node.op_type == "Pow":
        return _pow(c, node, a, b)
    return _apply_binary(c, node.op_type, _BINARY[node.op_type], a, b, _input_dtype(node))


def _input_dtype(node: Node) -> Optional[np.dtype]:
    """The numpy dtype of the node's first input, when known."""
    return node.inputs[0].dtype.to_numpy() if node.inputs[0].dtype is not None else None  # type: ignore[union-attr]


def _apply_binary(c: _Converter, op: str, relax_name: str, a: Any, b: Any, dtype: Optional[np.dtype]) -> Any:
    """ONNX binary `op` (broadcasting) on two operands of `dtype`; integer Div truncates
    toward zero (Relax's floor_divide of a - truncmod(a, b), which b divides exactly); float
    Max / Min give NaN where either operand is NaN (as ONNX Runtime; TVM's would drop it)."""
    from tvm import relax

    if _is_sym(c, [a, b]):
        return _sym_binary(c, op, c.sym(a), c.sym(b))  # type: ignore[arg-type]
    x, y = c.tensor(a, dtype), c.tensor(b, dtype)
    if op == "Div" and dtype is not None and np.dtype(dtype).kind in "iu":
        return c.emit(relax.op.floor_divide(relax.op.subtract(x, relax.op.mod(x, y)), y))
    result = c.emit(getattr(relax.op, relax_name)(x, y))
    if op in ("Max", "Min") and dtype is not None and np.dtype(dtype).kind == "f":
        return c.emit(relax.op.where(relax.op.logical_or(relax.op.isnan(x), relax.op.isnan(y)), relax.op.add(x, y), result))
    return result


def _pow(c: _Converter, node: Node, a: Any, b: Any) -> Any:
    """Pow of a float base; an integer base is refused (TVM's power takes floats only, and
    through float64 an int64 power would round)."""
    from tvm import relax

    base = node.inputs[0].dtype
    if base is not None and np.dtype(base.to_numpy()).kind in "iub":
        raise RelaxConversionError(f"Pow of an integer base ({base.to_numpy().name}) is not supported")
    dtype = _input_dtype(node)
    x, y = c.tensor(a, dtype), c.tensor(b, dtype)
    if isinstance(b, np.ndarray) and b.size == 1 and float(b.reshape(-1)[0]) == 2.0:
        return c.emit(relax.op.multiply(x, x))
    if dtype is not None and str(y.ty.dtype) != _dtype(dtype):
        y = c.emit(relax.op.astype(y, _dtype(dtype)))
    return c.emit(relax.op.power(x, y))


@_rule_for(*_VARIADIC)
def _variadic(c: _Converter, node: Node, *operands: Any) -> Any:
    """Max / Min / Sum / Mean of one or more inputs (broadcast): the pairwise op folded left to right."""
    from tvm import relax

    op, relax_name = _VARIADIC[node.op_type]
    dtype = _input_dtype(node)
    result = operands[0]
    for operand in operands[1:]:
        result = _apply_binary(c, op, relax_name, result, operand, dtype)
    if node.op_type != "Mean":
        return result
    x = c.tensor(result, dtype)
    return c.emit(relax.op.divide(x, relax.const(len(operands), str(x.ty.dtype))))


_UNARY = {
    "Relu": "nn.relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
    "Abs": "abs", "Neg": "negative", "Sign": "sign", "Ceil": "ceil", "Floor": "floor", "Cos": "cos", "Sin": "sin",
    "Not": "logical_not", "Reciprocal": None, "Identity": None,
}


@_rule_for(*_UNARY)
def _unary(c: _Converter, node: Node, x: Any) -> Any:
    from tvm import relax

    if node.op_type == "Identity":
        return x
    if node.op_type == "Neg" and _is_sym(c, [x]):
        return _sym_binary(c, "Sub", _Sym(np.zeros_like(c.sym(x).data), c.sym(x).dtype), c.sym(x))  # type: ignore[union-attr]
    x = c.tensor(x)
    if node.op_type == "Reciprocal":
        return c.emit(relax.op.divide(relax.const(1.0, str(x.ty.dtype)), x))
    op = relax.op
    for part in _UNARY[node.op_type].split("."):  # type: ignore[union-attr]
        op = getattr(op, part)
    return c.emit(op(x))


@_rule_for("Shape")
def _shape(c: _Converter, node: Node, x: Any) -> Any:
    dims = c.shape(c.tensor(x))
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    dims = dims[start:] if end is None else dims[start:int(end)]
    return _Sym(np.array(dims + [None], dtype=object)[:-1], "int64")


@_rule_for("Cast")
def _cast(c: _Converter, node: Node, x: Any) -> Any:
    from tvm import relax

    target = node.outputs[0].dtype.to_numpy()  # type: ignore[union-attr]
    sym = c.sym(x)
    if sym is not None and np.dtype(target).kind in "iu" and (isinstance(x, _Sym) or isinstance(x, np.ndarray)):
        return _Sym(sym.data, np.dtype(target).name)
    if isinstance(x, np.ndarray):
        return x.astype(target)
    return c.emit(relax.op.astype(c.tensor(x), _dtype(target)))


@_rule_for("Where")
def _where(c: _Converter, node: Node, cond: Any, a: Any, b: Any) -> Any:
    from tvm import relax, tirx as tir

    if _is_sym(c, [cond, a, b]):
        sc, sa, sb = c.sym(cond), c.sym(a), c.sym(b)
        dc, da, db = np.broadcast_arrays(sc.data, sa.data, sb.data)  # type: ignore[union-attr]
        out = np.empty(dc.shape, dtype=object)
        for index in np.ndindex(dc.shape):
            k, x, y = dc[index], da[index], db[index]
            out[index] = (x if k else y) if isinstance(k, (bool, int)) else c.simplify(tir.Select(k, _prim(x), _prim(y)))
        return _Sym(out, sa.dtype)  # type: ignore[union-attr]
    dtype = node.outputs[0].dtype.to_numpy() if node.outputs[0].dtype is not None else None
    return c.emit(relax.op.where(c.tensor(cond, np.bool_), c.tensor(a, dtype), c.tensor(b, dtype)))


@_rule_for("Gather")
def _gather(c: _Converter, node: Node, data: Any, indices: Any) -> Any:
    from tvm import relax

    axis = int(node.attrs.get("axis", 0))
    if isinstance(data, _Sym) and isinstance(indices, np.ndarray):
        return _Sym(np.take(data.data, indices.astype(np.int64), axis=axis), data.dtype)
    x = c.tensor(data)
    axis = _axis(c.rank(x), axis)
    dim = c.shape(x)[axis]
    if isinstance(indices, np.ndarray) and isinstance(dim, int):
        index = relax.const(np.where(indices < 0, indices + dim, indices).astype(np.int64), "int64")
    else:
        index = _wrap_negative(c, c.tensor(indices), dim)
    return c.emit(relax.op.take(x, index, axis=axis))


@_rule_for("GatherElements")
def _gather_elements(c: _Converter, node: Node, data: Any, indices: Any) -> Any:
    from tvm import relax

    x = c.tensor(data)
    axis = _axis(c.rank(x), int(node.attrs.get("axis", 0)))
    index = _wrap_negative(c, c.tensor(indices), c.shape(x)[axis])
    return c.emit(relax.op.gather_elements(x, index, axis))


def _axis(rank: int, axis: int) -> int:
    """An ONNX axis attribute in [-rank, rank) as a nonnegative axis."""
    if not -rank <= axis < rank:
        raise RelaxConversionError(f"axis {axis} is out of range for a rank-{rank} input")
    return axis + rank if axis < 0 else axis


def _wrap_negative(c: _Converter, index: Any, dim: Any) -> Any:
    """Run-time indices into an axis of `dim` elements, negative ones counted from the end
    (ONNX: ``where(i < 0, i + dim, i)``)."""
    from tvm import relax

    dtype = str(index.ty.dtype)
    extent = relax.const(dim, dtype) if isinstance(dim, int) else c.tensor(_Sym(np.array(dim, dtype=object), dtype))
    return c.emit(relax.op.where(relax.op.less(index, relax.const(0, dtype)), relax.op.add(index, extent), index))


@_rule_for("GatherND")
def _gather_nd(c: _Converter, node: Node, data: Any, indices: Any) -> Any:
    from tvm import relax

    batch = int(node.attrs.get("batch_dims", 0))
    x, index = c.tensor(data), c.tensor(indices)
    if str(index.ty.dtype) != "int64":
        index = c.emit(relax.op.astype(index, "int64"))
    depth = c.shape(index)[-1]
    if not isinstance(depth, int):
        raise RelaxConversionError("GatherND needs the index tuple length (last dim of indices) to be static")
    extents = c.tensor(_Sym(np.array([*c.shape(x)[batch:batch + depth], None], dtype=object)[:-1], "int64"))
    wrapped = c.emit(relax.op.add(index, extents))
    index = c.emit(relax.op.where(relax.op.less(index, relax.const(0, "int64")), wrapped, index))
    return c.emit(relax.op.gather_nd(x, index, batch))


def _axes(node: Node, operand: Any, c: _Converter) -> Optional[list[int]]:
    if operand is not None:
        return [int(a) for a in c.ints(operand)]
    attr = node.attrs.get("axes")
    return None if attr is None else [int(a) for a in attr]  # type: ignore[union-attr]


@_rule_for("Unsqueeze")
def _unsqueeze(c: _Converter, node: Node, x: Any, axes_in: Any = None) -> Any:
    from tvm import relax

    axes = _axes(node, axes_in, c) or []
    if isinstance(x, (_Sym, np.ndarray)) and c.sym(x) is not None:
        sym = c.sym(x)
        rank = sym.data.ndim + len(axes)  # type: ignore[union-attr]
        return _Sym(np.expand_dims(sym.data, [a % rank for a in axes]), sym.dtype)  # type: ignore[union-attr]
    x = c.tensor(x)
    rank = c.rank(x) + len(axes)
    return c.emit(relax.op.expand_dims(x, sorted(a % rank for a in axes)))


@_rule_for("Squeeze")
def _squeeze(c: _Converter, node: Node, x: Any, axes_in: Any = None) -> Any:
    from tvm import relax

    axes = _axes(node, axes_in, c)
    if isinstance(x, _Sym):
        return _Sym(np.squeeze(x.data, axis=None if axes is None else tuple(axes)), x.dtype)
    return c.emit(relax.op.squeeze(c.tensor(x), axes))


@_rule_for("Concat")
def _concat(c: _Converter, node: Node, *parts: Any) -> Any:
    from tvm import relax

    axis = int(node.attrs["axis"])
    if _is_sym(c, list(parts)):
        return _Sym(np.concatenate([c.sym(p).data for p in parts], axis=axis), c.sym(parts[0]).dtype)  # type: ignore[union-attr]
    dtype = node.outputs[0].dtype.to_numpy() if node.outputs[0].dtype is not None else None
    return c.emit(relax.op.concat([c.tensor(p, dtype) for p in parts], axis=axis))


@_rule_for("Slice")
def _slice(c: _Converter, node: Node, x: Any, starts: Any, ends: Any, axes_in: Any = None, steps: Any = None) -> Any:
    from tvm import relax

    begin, end = c.ints(starts), c.ints(ends)
    axes = c.ints(axes_in) if axes_in is not None else list(range(len(begin)))
    stride = c.ints(steps) if steps is not None else [1] * len(begin)
    if isinstance(x, _Sym) and all(isinstance(v, int) for v in begin + end + axes + stride):
        index = [slice(None)] * x.data.ndim
        for a, b, e, s in zip(axes, begin, end, stride):
            index[a] = slice(b, e, s)
        return _Sym(x.data[tuple(index)], x.dtype)
    x = c.tensor(x)
    dims = c.shape(x)
    axes = [a % len(dims) for a in axes]
    out_dims = list(dims)
    lows, highs, strides, flipped = [], [], [], []
    for a, b, e, step in zip(axes, begin, end, stride):
        if not isinstance(step, int) or step == 0:
            raise RelaxConversionError("Slice steps must be nonzero integers")
        low, high, count = _slice_window(c, dims[a], b, e, step)
        lows.append(low)
        highs.append(high)
        strides.append(abs(step))
        out_dims[a] = count
        if step < 0:
            flipped.append(a)
    sliced = c.cast_shape(c.emit(relax.op.strided_slice(x, axes, lows, highs, strides, assume_inbound=True)), out_dims)
    for a in flipped:
        sliced = c.emit(relax.op.flip(sliced, a))
    return sliced


def _slice_window(c: _Converter, dim: Any, begin: Any, end: Any, step: int) -> tuple[Any, Any, Any]:
    """(low, high, count): the elements of ``[begin:end:step]`` (ONNX / python semantics)
    as the ascending slice ``[low:high:|step|]`` of `count` elements, 0 <= low <= high <= dim
    (reversed afterwards for a negative step), so Relax never sees a negative bound."""
    low, high = _slice_bounds(c, dim, begin, end, step)
    if step > 0:
        high = _max(c, high, low)
        return low, high, _max(c, c.simplify((high - low + step - 1) // step), 0)
    size = -step
    count = _max(c, c.simplify((low - high + size - 1) // size), 0)
    first = c.simplify(low + 1 - _max(c, c.simplify(count * size - size + 1), 0))
    return first, c.simplify(low + 1), count


def _max(c: _Converter, a: Any, b: Any) -> Any:
    """max(a, b) of ints or TIR expressions."""
    from tvm import tirx as tir

    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return c.simplify(tir.max(_prim(a), _prim(b)))


def _slice_bounds(c: _Converter, dim: Any, begin: Any, end: Any, step: int) -> tuple[Any, Any]:
    """Begin and end of a slice clamped into [0, dim] (python semantics; [-1, dim - 1] for
    a negative step); a constant bound on a runtime-sized axis is clamped at run time (it
    may lie outside the axis), a runtime bound is assumed to lie within it."""
    from tvm import tirx as tir

    def clamp(v: Any, lowest: int) -> Any:
        if not isinstance(v, int):
            return v
        if isinstance(dim, int):
            if v < 0:
                v += dim
            return min(max(v, lowest), dim + lowest)
        if v >= _INT_MAX // 2:
            return dim + lowest
        if v <= -_INT_MAX // 2:
            return lowest + 0
        bound = dim + v if v < 0 else _prim(v)
        return c.simplify(tir.max(tir.min(bound, dim + lowest), _prim(lowest)))

    lowest = 0 if step > 0 else -1
    return clamp(begin, lowest), clamp(end, lowest)


@_rule_for("Split")
def _split(c: _Converter, node: Node, x: Any, split: Any = None) -> Any:
    from tvm import relax

    x = c.tensor(x)
    axis = int(node.attrs.get("axis", 0))
    sizes = c.ints(split) if split is not None else node.attrs.get("split")
    if sizes is None:
        parts: Any = int(node.attrs.get("num_outputs", len(node.outputs)))
    else:
        parts = list(np.cumsum([int(s) for s in sizes])[:-1])
    result = c.emit(relax.op.split(x, parts, axis=axis))
    return [c.emit(relax.TupleGetItem(result, i)) for i in range(len(node.outputs))]


@_rule_for("Reshape")
def _reshape(c: _Converter, node: Node, x: Any, shape: Any) -> Any:
    from tvm import relax

    target = c.ints(shape)
    if isinstance(x, _Sym):
        return _Sym(x.data.reshape([int(t) for t in target]), x.dtype)
    x = c.tensor(x)
    dims = c.shape(x)
    if not node.attrs.get("allowzero", 0):
        target = [dims[i] if isinstance(t, int) and t == 0 else t for i, t in enumerate(target)]
    return c.emit(relax.op.reshape(x, target))


@_rule_for("Flatten")
def _flatten(c: _Converter, node: Node, x: Any) -> Any:
    from tvm import relax

    x = c.tensor(x)
    dims = c.shape(x)
    axis = int(node.attrs.get("axis", 1))
    if not -len(dims) <= axis <= len(dims):
        raise RelaxConversionError(f"axis {axis} is out of range for a rank-{len(dims)} input")
    axis = axis + len(dims) if axis < 0 else axis
    return c.emit(relax.op.reshape(x, [c.simplify(_product(dims[:axis])), c.simplify(_product(dims[axis:]))]))


def _same_dims(c: _Converter, a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(c.simplify(x - y) == 0 for x, y in zip(a, b))


def _product(dims: list[Any]) -> Any:
    total: Any = 1
    for d in dims:
        total = total * d
    return total


@_rule_for("Expand")
def _expand(c: _Converter, node: Node, x: Any, shape: Any) -> Any:
    from tvm import relax

    target = c.ints(shape)
    x = c.tensor(x)
    dims = c.shape(x)
    rank = max(len(dims), len(target))
    dims = [1] * (rank - len(dims)) + dims
    target = [1] * (rank - len(target)) + target
    out = [d if isinstance(t, int) and t == 1 else t for d, t in zip(dims, target)]
    return c.emit(relax.op.broadcast_to(x, out))


@_rule_for("Tile")
def _tile(c: _Converter, node: Node, x: Any, repeats: Any) -> Any:
    from tvm import relax

    counts = c.ints(repeats)
    x = c.tensor(x)
    if all(isinstance(n, int) for n in counts):
        return c.emit(relax.op.tile(x, counts))
    dims = c.shape(x)
    spread = c.emit(relax.op.expand_dims(x, list(range(0, 2 * len(dims), 2))))
    paired = [v for pair in zip(counts, dims) for v in pair]
    tiled = c.emit(relax.op.broadcast_to(spread, paired))
    return c.emit(relax.op.reshape(tiled, [c.simplify(n * d) for n, d in zip(counts, dims)]))


@_rule_for("ConstantOfShape")
def _constant_of_shape(c: _Converter, node: Node, shape: Any) -> Any:
    from tvm import relax

    fill = node.attrs.get("value")
    array = fill.numpy().reshape(-1) if fill is not None else np.zeros(1, np.float32)  # type: ignore[union-attr]
    return c.emit(relax.op.full(c.ints(shape), relax.const(array[0], _dtype(array.dtype)), _dtype(array.dtype)))


@_rule_for("Range")
def _range(c: _Converter, node: Node, start: Any, limit: Any, delta: Any) -> Any:
    from tvm import relax

    dtype = _dtype(node.outputs[0].dtype.to_numpy())  # type: ignore[union-attr]
    if not all(c.sym(v) is not None for v in (start, limit, delta)):
        raise RelaxConversionError("Range bounds must come from shapes or integer constants")
    (s,), (e,), (d,) = c.ints(start), c.ints(limit), c.ints(delta)
    return c.emit(relax.op.arange(s, e, d, dtype))


@_rule_for("CumSum")
def _cumsum(c: _Converter, node: Node, x: Any, axis: Any) -> Any:
    from tvm import relax

    (a,) = c.ints(axis)
    x = c.tensor(x)
    reverse = bool(node.attrs.get("reverse", 0))
    if reverse:
        x = c.emit(relax.op.flip(x, a))
    out = c.emit(relax.op.cumsum(x, axis=a, exclusive=bool(node.attrs.get("exclusive", 0))))
    return c.emit(relax.op.flip(out, a)) if reverse else out


@_rule_for("Clip")
def _clip(c: _Converter, node: Node, x: Any, low: Any = None, high: Any = None) -> Any:
    from tvm import relax

    x = c.tensor(x)
    dtype = str(x.ty.dtype)
    if low is not None:
        x = c.emit(relax.op.maximum(x, c.tensor(low, dtype)))
    if high is not None:
        x = c.emit(relax.op.minimum(x, c.tensor(high, dtype)))
    return x


@_rule_for("Transpose")
def _transpose(c: _Converter, node: Node, x: Any) -> Any:
    from tvm import relax

    perm = node.attrs.get("perm")
    return c.emit(relax.op.permute_dims(c.tensor(x), None if perm is None else [int(p) for p in perm]))  # type: ignore[union-attr]


from graphopt.targets import tvm_relax_compute  # noqa: E402,F401  (registers the compute rules)
from graphopt.targets import tvm_relax_quant  # noqa: E402,F401  (registers the quantization rules)
from graphopt.targets import tvm_relax_onnx23  # noqa: E402,F401  (registers Attention, RMSNormalization, RotaryEmbedding)
