"""Call arguments and results between numpy and torch, bit for bit.

Compiled models take numpy arrays or torch tensors and give back the same kind. Two things
need care: torch cannot read or write the ml_dtypes types numpy uses for bfloat16 and the
float8 types (`torch.from_numpy` and `Tensor.numpy` refuse them), so those move as raw bits
of the same width; and ONNX sequences and optionals arrive as lists and None, converted
element by element. torch is imported only when a conversion needs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt.ir.dtypes import DType


def to_numpy(value: Any) -> Any:
    """`value` as numpy: torch tensors copied to the CPU (bfloat16/float8 as ml_dtypes arrays
    of the same bits), lists element by element, None kept, anything else `np.asarray`."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [to_numpy(v) for v in value]
    if not is_torch(value):
        return np.asarray(value)
    tensor = value.detach().cpu()
    if not _is_torch_ml_dtype(tensor.dtype):
        return tensor.numpy()
    import torch

    raw = tensor.contiguous().view(torch.uint8 if tensor.element_size() == 1 else torch.int16).numpy()
    return raw.view(DType.from_torch(tensor.dtype).to_numpy())


def to_torch(value: Any, device: Any = None) -> Any:
    """`value` as torch (on `device` if given): numpy arrays shared where torch can (C order,
    0-d kept 0-d), ml_dtypes bfloat16/float8 arrays as the torch dtype of the same bits
    (ValueError for types torch lacks, e.g. int4), lists element by element, None kept."""
    import torch

    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [to_torch(v, device) for v in value]
    if isinstance(value, torch.Tensor):
        return value if device is None else value.to(device)
    array = np.require(value, requirements="C")
    if array.dtype.kind == "V":  # ml_dtypes (bfloat16, float8, int4, ...)
        target = DType.from_numpy(array.dtype).to_torch()
        tensor = torch.from_numpy(array.view(np.uint8 if array.itemsize == 1 else np.int16)).view(target)
    else:
        tensor = torch.from_numpy(array)
    return tensor if device is None else tensor.to(device)


def is_torch(value: Any) -> bool:
    """True for a torch tensor (checked without importing torch)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _is_torch_ml_dtype(dtype: Any) -> bool:
    """True for the torch floating types numpy has only through ml_dtypes (bfloat16, float8)."""
    name = str(dtype).removeprefix("torch.")
    return name == "bfloat16" or name.startswith("float8")
