"""Types of IR values: tensors (an element type and a shape of static or symbolic dims) and
the other ONNX value kinds (sequences, optionals, sparse tensors, maps).

A dim is an `int` (static), a `str` (a symbolic dim: a symbol such as "batch" that stands
for the same size wherever it appears, or an expression over symbols such as "past + seq",
kept in the canonical form of `graphopt.ir.symbolic`, so equal expressions are equal strings)
or `None` (unknown). A shape is a tuple of dims, or `None` when even the rank is unknown.

`SequenceType`, `OptionalType`, `SparseTensorType` and `MapType` subclass `TensorType`
with `dtype` and `shape` both None, so code written for tensors sees them as values of
unknown type and leaves them alone; `is_tensor` tells them apart, and `merge_types` never
lets a tensor type inferred by an op that does not know them replace them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from graphopt.ir.dtypes import DType
from graphopt.ir.symbolic import canonical_dim, dims_equal

Dim = Union[int, str, None]
Shape = Optional[tuple[Dim, ...]]


@dataclass(frozen=True)
class TensorType:
    """The static type of a value: element type and shape, either possibly unknown."""

    dtype: Optional[DType] = None
    shape: Shape = None

    def __post_init__(self) -> None:
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(_check_dim(d) for d in self.shape))

    @property
    def is_tensor(self) -> bool:
        """True for a (dense) tensor type, known or not; False for sequence, optional,
        sparse tensor and map types."""
        return True

    @property
    def rank(self) -> Optional[int]:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        """True when every dim is a known integer."""
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Optional[int]:
        """The element count when the shape is static, else None."""
        if not self.is_static:
            return None
        count = 1
        for d in self.shape:  # type: ignore[union-attr]
            count *= d  # type: ignore[operator]
        return count

    def __str__(self) -> str:
        dtype = self.dtype.short if self.dtype is not None else "?"
        return f"{dtype}{format_shape(self.shape)}"


UNKNOWN = TensorType()


@dataclass(frozen=True, init=False)
class _NonTensorType(TensorType):
    """Base of the value types that are not dense tensors: no element type or shape of their
    own (both None), and `is_tensor` False."""

    def _set(self, **fields: object) -> None:
        object.__setattr__(self, "dtype", None)
        object.__setattr__(self, "shape", None)
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def is_tensor(self) -> bool:
        return False


@dataclass(frozen=True, init=False)
class SequenceType(_NonTensorType):
    """`seq(elem)`: an ONNX sequence whose elements all have type `elem`."""

    elem: TensorType = UNKNOWN

    def __init__(self, elem: TensorType = UNKNOWN) -> None:
        self._set(elem=elem)

    def __str__(self) -> str:
        return f"seq({self.elem})"


@dataclass(frozen=True, init=False)
class OptionalType(_NonTensorType):
    """`optional(elem)`: an ONNX optional holding a value of type `elem`, or nothing."""

    elem: TensorType = UNKNOWN

    def __init__(self, elem: TensorType = UNKNOWN) -> None:
        self._set(elem=elem)

    def __str__(self) -> str:
        return f"optional({self.elem})"


@dataclass(frozen=True, init=False)
class SparseTensorType(_NonTensorType):
    """`sparse(dense)`: an ONNX sparse tensor standing for a dense tensor of type `dense`."""

    dense: TensorType = UNKNOWN

    def __init__(self, dense: TensorType = UNKNOWN) -> None:
        self._set(dense=dense)

    def __str__(self) -> str:
        return f"sparse({self.dense})"


@dataclass(frozen=True, init=False)
class MapType(_NonTensorType):
    """`map(key, value)`: an ONNX map from `key` elements to values of type `value`."""

    key: Optional[DType] = None
    value: TensorType = UNKNOWN

    def __init__(self, key: Optional[DType], value: TensorType = UNKNOWN) -> None:
        self._set(key=key, value=value)

    def __str__(self) -> str:
        key = self.key.short if self.key is not None else "?"
        return f"map({key}, {self.value})"


def format_dim(dim: Dim) -> str:
    return "?" if dim is None else str(dim)


def format_shape(shape: Optional[Sequence[Dim]]) -> str:
    """`[batch, seq, 384]` (an unknown dim `?`), `[*]` for an unknown rank."""
    return "[*]" if shape is None else "[" + ", ".join(format_dim(d) for d in shape) + "]"


def _check_dim(dim: object) -> Dim:
    if isinstance(dim, str):
        dim = canonical_dim(dim)
    if dim is None or isinstance(dim, str):
        return dim
    if isinstance(dim, bool) or not isinstance(dim, int):
        if isinstance(dim, np.integer):
            return int(dim)
        raise TypeError(f"a dim must be int, str or None, got {dim!r}")
    if dim < 0:
        raise ValueError(f"a static dim must be >= 0, got {dim}")
    return dim


def same_shape(a: Optional[Sequence[Dim]], b: Optional[Sequence[Dim]]) -> bool:
    """True when two known shapes of one rank agree dim by dim (ints equal, expressions
    proven equal), an unknown dim agreeing with any (a scalar shape `()` is never "known the
    same": it carries no dims to compare)."""
    if a is None or b is None or len(a) != len(b) or not a:
        return False
    return all(x is None or y is None or dims_equal(x, y) for x, y in zip(a, b))


def broadcast_shapes(*shapes: Shape) -> Shape:
    """Numpy-style broadcast of shapes with symbolic dims.

    Unknown rank anywhere gives unknown rank. Where one side is 1 the other wins; a static
    dim other than 1 wins over symbols and unknowns (the program is only valid if they
    agree). Symbolic dims are assumed never to be 1 at run time, as torch.export assumes
    of its dynamic dims: so a symbol against an unknown dim gives the symbol, and two
    different symbols must be equal (the first is kept).
    """
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes), default=0)  # type: ignore[arg-type]
    result: list[Dim] = []
    for axis in range(rank):
        dims = [s[len(s) - rank + axis] for s in shapes if len(s) - rank + axis >= 0]  # type: ignore[arg-type, index]
        result.append(_broadcast_dims(dims))
    return tuple(result)


def _broadcast_dims(dims: Sequence[Dim]) -> Dim:
    not_one = [d for d in dims if d != 1]
    if not not_one:
        return 1
    statics = {d for d in not_one if isinstance(d, int)}
    if len(statics) > 1:
        raise ValueError(f"dims {sorted(statics)} do not broadcast")
    if statics:
        return statics.pop()
    symbols = [d for d in not_one if isinstance(d, str)]
    return symbols[0] if symbols else None


def merge_dims(a: Dim, b: Dim) -> Dim:
    """The more specific of two descriptions of the same dim (int over str over None; of two
    symbolic dims, the first: expressions proven equal have one canonical text)."""
    if isinstance(a, int):
        return a
    if isinstance(b, int):
        return b
    return a if a is not None else b


def merge_types(a: TensorType, b: TensorType) -> TensorType:
    """Combine two descriptions of one value, keeping what each knows.

    A sequence, optional, sparse tensor or map type wins over a tensor type (a tensor
    type beside one comes from an op or a declaration that does not know the value's kind).
    """
    if not a.is_tensor or not b.is_tensor:
        if type(a) is type(b):
            return _merge_kinds(a, b)
        return a if not a.is_tensor else b
    dtype = a.dtype if a.dtype is not None else b.dtype
    if a.shape is None:
        shape = b.shape
    elif b.shape is None or len(a.shape) != len(b.shape):
        shape = a.shape
    else:
        shape = tuple(merge_dims(x, y) for x, y in zip(a.shape, b.shape))
    return TensorType(dtype, shape)


def _merge_kinds(a: TensorType, b: TensorType) -> TensorType:
    """`merge_types` of two sequence, optional, sparse tensor or map types of one class."""
    if isinstance(a, SequenceType):
        return SequenceType(merge_types(a.elem, b.elem))  # type: ignore[attr-defined]
    if isinstance(a, OptionalType):
        return OptionalType(merge_types(a.elem, b.elem))  # type: ignore[attr-defined]
    if isinstance(a, SparseTensorType):
        return SparseTensorType(merge_types(a.dense, b.dense))  # type: ignore[attr-defined]
    assert isinstance(a, MapType) and isinstance(b, MapType)
    return MapType(a.key if a.key is not None else b.key, merge_types(a.value, b.value))
