"""Element types of IR tensors, with their ONNX, numpy and torch equivalents.

`DType` values are the ONNX `TensorProto.DataType` numbers, so converting to and from
ONNX is the identity; numpy and torch equivalents are looked up lazily so the IR does
not import torch. `torch_dtypes()` is the one DType <-> torch.dtype table.
"""

from __future__ import annotations

import enum
import functools
from typing import Any

import numpy as np


class DType(enum.IntEnum):
    """A tensor element type; the integer value is the ONNX data-type number."""

    FLOAT = 1
    UINT8 = 2
    INT8 = 3
    UINT16 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    STRING = 8
    BOOL = 9
    FLOAT16 = 10
    DOUBLE = 11
    UINT32 = 12
    UINT64 = 13
    COMPLEX64 = 14
    COMPLEX128 = 15
    BFLOAT16 = 16
    FLOAT8E4M3FN = 17
    FLOAT8E4M3FNUZ = 18
    FLOAT8E5M2 = 19
    FLOAT8E5M2FNUZ = 20
    UINT4 = 21
    INT4 = 22
    FLOAT4E2M1 = 23
    FLOAT8E8M0 = 24
    UINT2 = 25
    INT2 = 26
    FLOAT6E2M3 = 27
    FLOAT6E3M2 = 28

    @property
    def short(self) -> str:
        """The compact name the IR printer uses (f32, i64, bool, ...)."""
        return _SHORT_NAMES[self]

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_integer(self) -> bool:
        return self in _INTEGERS

    @property
    def itemsize(self) -> int:
        """Bytes per element (rounded up for the 2-, 4- and 6-bit types)."""
        return _ITEMSIZE[self]

    @property
    def bits(self) -> int:
        """Bits per element in ONNX storage: 2, 4 or 6 for the packed sub-byte types, whose
        elements are stored as one little-endian bit stream (least significant bits first)."""
        return _SUB_BYTE_BITS.get(self, 8 * _ITEMSIZE[self])

    def packed_nbytes(self, count: int) -> int:
        """Bytes that `count` elements take in ONNX raw data (sub-byte types packed)."""
        return (count * self.bits + 7) // 8

    def to_numpy(self) -> np.dtype:
        """The numpy dtype holding this element type (ml_dtypes for bfloat16, float8, float6,
        float4, int4 and int2: one byte per element for the sub-byte types)."""
        return np.dtype(_numpy_type(self))

    def to_torch(self) -> Any:
        """The torch.dtype for this element type; raises ValueError if torch has none."""
        table = torch_dtypes()
        if self not in table:
            raise ValueError(f"torch has no dtype for {self.name}")
        return table[self]

    @classmethod
    def from_numpy(cls, dtype: Any) -> DType:
        """The DType of a numpy dtype (or anything `np.dtype` accepts)."""
        dtype = np.dtype(dtype)
        for member in cls:
            try:
                if np.dtype(_numpy_type(member)) == dtype:
                    return member
            except (TypeError, ValueError):
                continue
        raise ValueError(f"no IR dtype for numpy dtype {dtype}")

    @classmethod
    def from_torch(cls, dtype: Any) -> DType:
        """The DType of a torch.dtype."""
        for member, torch_dtype in torch_dtypes().items():
            if torch_dtype == dtype:
                return member
        raise ValueError(f"no IR dtype for torch dtype {dtype}")


@functools.cache
def torch_dtypes() -> dict[DType, Any]:
    """Every element type torch has, with its torch.dtype, in ONNX number order: the one
    DType <-> torch table (torch is imported on the first call, never by importing the IR)."""
    import torch

    return {
        DType.FLOAT: torch.float32, DType.UINT8: torch.uint8, DType.INT8: torch.int8,
        DType.UINT16: torch.uint16, DType.INT16: torch.int16, DType.INT32: torch.int32,
        DType.INT64: torch.int64, DType.BOOL: torch.bool, DType.FLOAT16: torch.float16,
        DType.DOUBLE: torch.float64, DType.UINT32: torch.uint32, DType.UINT64: torch.uint64,
        DType.COMPLEX64: torch.complex64, DType.COMPLEX128: torch.complex128,
        DType.BFLOAT16: torch.bfloat16, DType.FLOAT8E4M3FN: torch.float8_e4m3fn,
        DType.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz, DType.FLOAT8E5M2: torch.float8_e5m2,
        DType.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz, DType.FLOAT8E8M0: torch.float8_e8m0fnu,
    }


_SHORT_NAMES = {
    DType.FLOAT: "f32", DType.UINT8: "u8", DType.INT8: "i8", DType.UINT16: "u16",
    DType.INT16: "i16", DType.INT32: "i32", DType.INT64: "i64", DType.STRING: "str",
    DType.BOOL: "bool", DType.FLOAT16: "f16", DType.DOUBLE: "f64", DType.UINT32: "u32",
    DType.UINT64: "u64", DType.COMPLEX64: "c64", DType.COMPLEX128: "c128",
    DType.BFLOAT16: "bf16", DType.FLOAT8E4M3FN: "f8e4m3fn", DType.FLOAT8E4M3FNUZ: "f8e4m3fnuz",
    DType.FLOAT8E5M2: "f8e5m2", DType.FLOAT8E5M2FNUZ: "f8e5m2fnuz", DType.UINT4: "u4",
    DType.INT4: "i4", DType.FLOAT4E2M1: "f4e2m1", DType.FLOAT8E8M0: "f8e8m0", DType.UINT2: "u2",
    DType.INT2: "i2", DType.FLOAT6E2M3: "f6e2m3", DType.FLOAT6E3M2: "f6e3m2",
}
_FLOATS = frozenset({
    DType.FLOAT, DType.FLOAT16, DType.DOUBLE, DType.BFLOAT16, DType.FLOAT8E4M3FN,
    DType.FLOAT8E4M3FNUZ, DType.FLOAT8E5M2, DType.FLOAT8E5M2FNUZ, DType.FLOAT4E2M1,
    DType.FLOAT8E8M0, DType.FLOAT6E2M3, DType.FLOAT6E3M2,
})
_INTEGERS = frozenset({
    DType.UINT8, DType.INT8, DType.UINT16, DType.INT16, DType.INT32, DType.INT64,
    DType.UINT32, DType.UINT64, DType.UINT4, DType.INT4, DType.UINT2, DType.INT2,
})
_ITEMSIZE = {
    DType.FLOAT: 4, DType.UINT8: 1, DType.INT8: 1, DType.UINT16: 2, DType.INT16: 2,
    DType.INT32: 4, DType.INT64: 8, DType.STRING: 8, DType.BOOL: 1, DType.FLOAT16: 2,
    DType.DOUBLE: 8, DType.UINT32: 4, DType.UINT64: 8, DType.COMPLEX64: 8,
    DType.COMPLEX128: 16, DType.BFLOAT16: 2, DType.FLOAT8E4M3FN: 1, DType.FLOAT8E4M3FNUZ: 1,
    DType.FLOAT8E5M2: 1, DType.FLOAT8E5M2FNUZ: 1, DType.UINT4: 1, DType.INT4: 1,
    DType.FLOAT4E2M1: 1, DType.FLOAT8E8M0: 1, DType.UINT2: 1, DType.INT2: 1, DType.FLOAT6E2M3: 1,
    DType.FLOAT6E3M2: 1,
}
_SUB_BYTE_BITS = {
    DType.UINT4: 4, DType.INT4: 4, DType.FLOAT4E2M1: 4, DType.UINT2: 2, DType.INT2: 2,
    DType.FLOAT6E2M3: 6, DType.FLOAT6E3M2: 6,
}


def _numpy_type(dtype: DType) -> Any:
    plain = {
        DType.FLOAT: np.float32, DType.UINT8: np.uint8, DType.INT8: np.int8,
        DType.UINT16: np.uint16, DType.INT16: np.int16, DType.INT32: np.int32,
        DType.INT64: np.int64, DType.STRING: np.object_, DType.BOOL: np.bool_,
        DType.FLOAT16: np.float16, DType.DOUBLE: np.float64, DType.UINT32: np.uint32,
        DType.UINT64: np.uint64, DType.COMPLEX64: np.complex64, DType.COMPLEX128: np.complex128,
    }
    if dtype in plain:
        return plain[dtype]
    import ml_dtypes

    extended = {
        DType.BFLOAT16: ml_dtypes.bfloat16, DType.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn,
        DType.FLOAT8E4M3FNUZ: ml_dtypes.float8_e4m3fnuz, DType.FLOAT8E5M2: ml_dtypes.float8_e5m2,
        DType.FLOAT8E5M2FNUZ: ml_dtypes.float8_e5m2fnuz, DType.UINT4: ml_dtypes.uint4,
        DType.INT4: ml_dtypes.int4, DType.FLOAT4E2M1: ml_dtypes.float4_e2m1fn,
        DType.FLOAT8E8M0: ml_dtypes.float8_e8m0fnu, DType.UINT2: ml_dtypes.uint2,
        DType.INT2: ml_dtypes.int2, DType.FLOAT6E2M3: ml_dtypes.float6_e2m3fn,
        DType.FLOAT6E3M2: ml_dtypes.float6_e3m2fn,
    }
    return extended[dtype]
