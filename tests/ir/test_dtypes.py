"""The one DType table: ONNX numbers, numpy and torch (graphopt/ir/dtypes.py)."""

import subprocess
import sys

import pytest
import torch

from graphopt.exporters.torch_kernels import _ONNX_DTYPES
from graphopt.ir.dtypes import DType, torch_dtypes


def test_torch_table_round_trips_every_dtype_torch_has():
    table = torch_dtypes()
    assert len(set(table.values())) == len(table) == 20
    for dtype, torch_dtype in table.items():
        assert dtype.to_torch() is torch_dtype
        assert DType.from_torch(torch_dtype) is dtype
        assert torch.empty(0, dtype=torch_dtype).element_size() == dtype.itemsize


@pytest.mark.parametrize("dtype", [DType.STRING, DType.INT4, DType.FLOAT4E2M1, DType.FLOAT6E2M3])
def test_types_torch_lacks_raise(dtype):
    with pytest.raises(ValueError, match=f"torch has no dtype for {dtype.name}"):
        dtype.to_torch()


def test_the_torch_kernels_table_is_the_ir_table_keyed_by_onnx_number():
    assert _ONNX_DTYPES == {int(d): t for d, t in torch_dtypes().items()}
    assert list(_ONNX_DTYPES) == sorted(_ONNX_DTYPES)
    with pytest.raises(ValueError, match="no IR dtype for torch dtype torch.quint8"):
        DType.from_torch(torch.quint8)


def test_importing_the_ir_does_not_import_torch():
    code = "import sys, graphopt.ir.dtypes as d; d.DType.FLOAT.to_numpy(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
