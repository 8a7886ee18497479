"""The op-schema registry: what each op takes, gives, and how its output types follow.

An `OpSchema` names an op (domain + type), bounds its input and output counts, says which
inputs must share an element type, whether it is pure (no side effects, safe to remove or
deduplicate), and carries two functions:

- `infer(ctx) -> list[TensorType]`: output types from input types, attributes and any
  constant inputs (ONNX semantics for the default domain);
- `propagate(ctx) -> list[tuple[Dim, ...] | None]` (optional): the *contents* of small
  integer outputs when they are known symbolically. This is how `Shape -> Gather -> Concat
  -> Reshape` chains keep symbolic dims such as "batch", "seq" and "past + seq".

Ops without a schema are opaque: the IR keeps them, their attributes and their origin, and
round-trips them, but no pass looks inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from graphopt.ir.types import Dim, TensorType, UNKNOWN

ONNX_DOMAIN = ""
GRAPHOPT_DOMAIN = "graphopt"

SymbolicValue = tuple[Dim, ...]


class InferenceContext:
    """What an inference function may look at for one node."""

    def __init__(
        self,
        op_type: str,
        domain: str,
        input_types: Sequence[Optional[TensorType]],
        attrs: dict[str, Any],
        num_outputs: int,
        opset: int,
        input_constants: Sequence[Optional[np.ndarray]] = (),
        input_symbolic: Sequence[Optional[SymbolicValue]] = (),
    ) -> None:
        self.op_type = op_type
        self.domain = domain
        self._types = list(input_types)
        self._attrs = attrs
        self.num_outputs = num_outputs
        self.opset = opset
        self._constants = list(input_constants)
        self._symbolic = list(input_symbolic)

    @property
    def num_inputs(self) -> int:
        """Number of input slots, counting omitted optional inputs."""
        return len(self._types)

    def has_input(self, index: int) -> bool:
        """True when input `index` is present (not past the end, not an omitted optional)."""
        return index < len(self._types) and self._types[index] is not None

    def input_type(self, index: int) -> TensorType:
        """The type of input `index`; `UNKNOWN` when absent."""
        if not self.has_input(index):
            return UNKNOWN
        return self._types[index]  # type: ignore[return-value]

    def input_constant(self, index: int) -> Optional[np.ndarray]:
        """The data of input `index` when it is a constant (weight, Constant node)."""
        if index < len(self._constants):
            return self._constants[index]
        return None

    def input_symbolic(self, index: int) -> Optional[SymbolicValue]:
        """The known contents of a small integer input, as dims (ints or symbols).

        Falls back to the constant data when the input is a small integer constant.
        """
        if index < len(self._symbolic) and self._symbolic[index] is not None:
            return self._symbolic[index]
        data = self.input_constant(index)
        if data is not None and data.dtype.kind in "iu" and data.ndim <= 1 and data.size <= 64:
            return tuple(int(v) for v in data.reshape(-1))
        return None

    def attr(self, name: str, default: Any = None) -> Any:
        """An attribute value, or `default` when the node does not set it."""
        return self._attrs.get(name, default)


InferFn = Callable[[InferenceContext], list[TensorType]]
PropagateFn = Callable[[InferenceContext], list[Optional[SymbolicValue]]]


@dataclass(frozen=True)
class OpSchema:
    """Static facts about one op. See the module docstring."""

    domain: str
    name: str
    infer: InferFn
    min_inputs: int = 0
    max_inputs: int = 2**31
    min_outputs: int = 1
    max_outputs: int = 1
    same_dtype_inputs: tuple[tuple[int, ...], ...] = ()
    pure: bool = True
    propagate: Optional[PropagateFn] = None
    doc: str = field(default="", compare=False)

    @property
    def qualified_name(self) -> str:
        return f"{self.domain}::{self.name}" if self.domain else self.name


_REGISTRY: dict[tuple[str, str], OpSchema] = {}


def _normalize_domain(domain: str) -> str:
    return ONNX_DOMAIN if domain in ("", "ai.onnx") else domain


def register_schema(schema: OpSchema) -> OpSchema:
    """Add an op schema; registering the same (domain, name) twice is an error."""
    key = (_normalize_domain(schema.domain), schema.name)
    if key in _REGISTRY:
        raise ValueError(f"op schema {schema.qualified_name} is already registered")
    _REGISTRY[key] = schema
    return schema


def get_schema(domain: str, name: str) -> Optional[OpSchema]:
    """The schema of an op, or None for an op the IR treats as opaque."""
    if not _builtins_loaded:
        _load_builtin_schemas()
    return _REGISTRY.get((ONNX_DOMAIN if domain in ("", "ai.onnx") else domain, name))


def registered_ops() -> list[str]:
    """Qualified names of every op with a schema, sorted."""
    _load_builtin_schemas()
    return sorted(schema.qualified_name for schema in _REGISTRY.values())


_builtins_loaded = False


def _load_builtin_schemas() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        import graphopt.ir.ops.graphopt  # noqa: F401  (registers graphopt's own ops)
        import graphopt.ir.ops.onnx  # noqa: F401  (registers the ONNX-domain schemas)
