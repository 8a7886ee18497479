"""Exporters: turn IR graphs back into ONNX models and runnable torch.fx GraphModules.

Importing this package registers the formats "onnx" (`to_onnx`), "onnx-file" (`save_onnx`)
and "fx" (`to_fx`) with `graphopt.ir.conversions`, as thunks that import the exporter (and
onnx or torch) only when called, so `Graph.to_onnx()` works without the IR importing any
exporter.
"""

from __future__ import annotations

from typing import Any

from graphopt.ir.conversions import register_conversion


def _to_onnx(graph: Any, **options: Any) -> Any:
    from graphopt.exporters.onnx_export import to_onnx

    return to_onnx(graph, **options)


def _save_onnx(graph: Any, path: Any, **options: Any) -> None:
    from graphopt.exporters.onnx_export import save_onnx

    save_onnx(graph, path, **options)


def _to_fx(graph: Any, **options: Any) -> Any:
    from graphopt.exporters.fx_export import to_fx

    return to_fx(graph, **options)


register_conversion("onnx", _to_onnx)
register_conversion("onnx-file", _save_onnx)
register_conversion("fx", _to_fx)
