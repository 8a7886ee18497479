"""Constant tensors (weights) held by the IR without needless copies.

Three kinds, one interface (`dtype`, `shape`, `nbytes`, `numpy()`):

- `ArrayTensor` wraps a numpy array as is;
- `FileTensor` is a byte range of a file on disk (ONNX external data, or the raw bytes of
  an initializer inside an .onnx file), memory-mapped read-only on each `numpy()` call, so
  importing a model does not read weights that no pass touches;
- `ProtoTensor` wraps an ONNX `TensorProto` owned by the caller and converts on demand.
"""

from __future__ import annotations

import abc
import mmap
import os
from typing import Any, Optional

import numpy as np

from graphopt.ir.dtypes import DType


class ConstTensor(abc.ABC):
    """A constant tensor of known dtype and static shape."""

    dtype: DType
    shape: tuple[int, ...]

    @abc.abstractmethod
    def numpy(self) -> np.ndarray:
        """The data as a numpy array (read-only views where possible; do not mutate)."""

    @property
    def size(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count

    @property
    def nbytes(self) -> int:
        """Bytes of the data as ONNX stores it (sub-byte types packed)."""
        return self.dtype.packed_nbytes(self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dtype.short}{list(self.shape)})"


class ArrayTensor(ConstTensor):
    """A tensor backed by an in-memory numpy array (not copied)."""

    def __init__(self, array: Any, dtype: Optional[DType] = None) -> None:
        array = np.asarray(array)
        self._array = array
        self.dtype = dtype if dtype is not None else DType.from_numpy(array.dtype)
        self.shape = tuple(int(d) for d in array.shape)

    def numpy(self) -> np.ndarray:
        return self._array


class FileTensor(ConstTensor):
    """A tensor stored as raw little-endian bytes at `offset` in `path`."""

    def __init__(self, path: str, offset: int, length: int, dtype: DType, shape: tuple[int, ...]) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.length = length
        self.dtype = dtype
        self.shape = tuple(shape)
        expected = _packed_nbytes(dtype, self.size)
        if expected != length:
            raise ValueError(
                f"{self.path}: tensor of {dtype.short}{list(self.shape)} needs {expected} bytes "
                f"but the file gives {length}"
            )

    def numpy(self) -> np.ndarray:
        if self.length == 0:
            return np.zeros(self.shape, dtype=self.dtype.to_numpy())
        with open(self.path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        flat = np.frombuffer(mapped, dtype=_storage_dtype(self.dtype), count=_storage_count(self.dtype, self.size), offset=self.offset)
        return _unpack(flat, self.dtype, self.shape)


class ProtoTensor(ConstTensor):
    """A tensor backed by an ONNX TensorProto (converted on each `numpy()` call)."""

    def __init__(self, proto: Any, base_dir: str = "") -> None:
        self.proto = proto
        self.base_dir = base_dir
        self.dtype = DType(proto.data_type)
        self.shape = tuple(int(d) for d in proto.dims)

    def numpy(self) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.proto, self.base_dir)


def _packed_nbytes(dtype: DType, count: int) -> int:
    return dtype.packed_nbytes(count)


def _storage_dtype(dtype: DType) -> np.dtype:
    if dtype.bits < 8:
        return np.dtype(np.uint8)
    return dtype.to_numpy().newbyteorder("<")


def _storage_count(dtype: DType, count: int) -> int:
    return dtype.packed_nbytes(count) if dtype.bits < 8 else count


def _unpack(flat: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    """The elements of ONNX raw data: sub-byte types are one bit stream, least significant
    bits first (4-bit: low nibble first; 6-bit: 4 elements in 3 bytes), viewed as ml_dtypes
    (which hold each element's code in the low bits of one byte)."""
    if dtype.bits >= 8:
        return flat.reshape(shape)
    count = int(np.prod(shape, dtype=np.int64))
    return _bit_codes(flat, dtype.bits, count).view(dtype.to_numpy()).reshape(shape)


def _bit_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """`count` codes of `bits` bits each (2, 4 or 6), one per uint8, from a packed stream."""
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        codes = np.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], axis=-1)
        return codes.reshape(-1)[:count].astype(np.uint8)
    groups = np.zeros(-(-packed.size // 3) * 3, dtype=np.uint32)
    groups[: packed.size] = packed
    word = groups[0::3] | (groups[1::3] << 8) | (groups[2::3] << 16)
    codes = np.stack([(word >> shift) & mask for shift in range(0, 24, bits)], axis=-1)
    return codes.reshape(-1)[:count].astype(np.uint8)
