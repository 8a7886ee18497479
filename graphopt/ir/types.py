"""Tensor types of IR values: an element type and a shape of static or symbolic dims.

A dim is an `int` (static), a `str` (a named symbolic dim such as "batch" that stands for
the same size wherever it appears) or `None` (unknown). A shape is a tuple of dims, or
`None` when even the rank is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from graphopt.ir.dtypes import DType

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
        if self.shape is None:
            return f"{dtype}[*]"
        return f"{dtype}[{', '.join(format_dim(d) for d in self.shape)}]"


UNKNOWN = TensorType()


def format_dim(dim: Dim) -> str:
    return "?" if dim is None else str(dim)


def _check_dim(dim: object) -> Dim:
    if dim is None or isinstance(dim, str):
        return dim
    if isinstance(dim, bool) or not isinstance(dim, int):
        if isinstance(dim, np.integer):
            return int(dim)
        raise TypeError(f"a dim must be int, str or None, got {dim!r}")
    if dim < 0:
        raise ValueError(f"a static dim must be >= 0, got {dim}")
    return dim


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
    """The more specific of two descriptions of the same dim (int over str over None)."""
    if isinstance(a, int):
        return a
    if isinstance(b, int):
        return b
    return a if a is not None else b


def merge_types(a: TensorType, b: TensorType) -> TensorType:
    """Combine two descriptions of one value, keeping what each knows."""
    dtype = a.dtype if a.dtype is not None else b.dtype
    if a.shape is None:
        shape = b.shape
    elif b.shape is None or len(a.shape) != len(b.shape):
        shape = a.shape
    else:
        shape = tuple(merge_dims(x, y) for x, y in zip(a.shape, b.shape))
    return TensorType(dtype, shape)
