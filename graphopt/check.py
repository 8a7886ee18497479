"""Running an IR graph to compare outputs: sample inputs and an ONNX Runtime executor.

Used by the pass manager's check mode and by `graphopt optimize --check`. Symbolic dims get
one size per symbol (so "batch" is the same everywhere); integer inputs get small values
(0 or 1: valid token ids, masks and positions for any vocabulary).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.ir.symbolic import dim_symbols, evaluate_dim

DEFAULT_SYMBOL_SIZE = 2
SEQUENCE_SYMBOL_SIZE = 8
MAX_SAMPLE_BYTES = 1 << 30
"""The most memory `sample_inputs` allocates, over all inputs together."""


class CheckError(GraphoptError):
    """Outputs changed beyond tolerance; the message names the pass responsible."""


def sample_inputs(graph: Graph, seed: int = 0, sizes: Optional[dict[str, int]] = None) -> dict[str, np.ndarray]:
    """Deterministic random inputs matching the graph's input types (at most
    `MAX_SAMPLE_BYTES` in all; GraphoptError naming the input past that)."""
    rng = np.random.default_rng(seed)
    chosen = dict(sizes or {})
    feeds = {}
    total = 0
    for value in graph.inputs:
        if value.dtype is None or value.shape is None:
            raise GraphoptError(f"input %{value.name} has no known type/shape; pass inputs explicitly")
        shape = []
        for dim in value.shape:
            if isinstance(dim, int):
                shape.append(dim)
            elif dim and dim_symbols(dim) != (dim,):  # an expression (`past + seq`) of its symbols' sizes
                for symbol in dim_symbols(dim):
                    chosen.setdefault(symbol, symbol_size(symbol))
                shape.append(evaluate_dim(dim, chosen))
            else:
                key = dim or f"?{value.name}"
                if key not in chosen:
                    chosen[key] = symbol_size(key)
                shape.append(chosen[key])
        dtype = value.dtype.to_numpy()
        total += int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        if total > MAX_SAMPLE_BYTES:
            raise GraphoptError(
                f"sample inputs would take more than {MAX_SAMPLE_BYTES >> 20} MiB (input %{value.name} is "
                f"{value.dtype.short}{shape}); give smaller symbolic sizes (e.g. --dim seq=128) or inputs explicitly"
            )
        if value.dtype.is_float:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif value.dtype.name == "BOOL":
            feeds[value.name] = np.ones(shape, dtype=bool)
        else:
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def symbol_size(name: str) -> int:
    """The size sample inputs give a symbolic dim: SEQUENCE_SYMBOL_SIZE for names that
    contain "seq", DEFAULT_SYMBOL_SIZE otherwise."""
    return SEQUENCE_SYMBOL_SIZE if "seq" in name.lower() else DEFAULT_SYMBOL_SIZE


def run_graph(graph: Graph, feeds: dict[str, np.ndarray], engine: str = "onnxruntime") -> list[np.ndarray]:
    """Outputs of `graph` on `feeds`, computed on CPU by ONNX Runtime (graphopt's own ops
    lowered to standard ONNX) or by the graph's torch.fx form (`engine="torch"`)."""
    if engine == "torch":
        return _run_fx(graph, feeds)
    if engine != "onnxruntime":
        raise GraphoptError(f"unknown engine {engine!r}: use 'onnxruntime' or 'torch'")
    from graphopt.ort_io import reference_session, run_by_batch_rows

    try:
        session, io = reference_session(graph.to_onnx())
        shapes = {v.name: v.shape for v in graph.inputs}
        return run_by_batch_rows(lambda part: io.run(session, part), feeds, shapes, [v.shape for v in graph.outputs])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphoptError(f"ONNX Runtime could not run graph '{graph.name}': {first}") from None


def _run_fx(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    module = graph.to_fx()
    with torch.no_grad():
        outputs = module(*[torch.from_numpy(np.asarray(feeds[v.name])) for v in graph.inputs])
    return [out.detach().numpy() for out in outputs]


def max_abs_error(expected: Sequence[Any], actual: Sequence[Any]) -> float:
    """Largest absolute difference over paired outputs (inf if shapes, counts, NaN positions
    or non-float contents differ). Sequence outputs (lists) are compared element by element,
    empty optionals (None) must match. In float16, bfloat16 and float8 outputs, differences
    within two ulps of the expected value are that type's rounding and count as zero (a
    lossless rewrite may round differently, e.g. a constant folded once instead of per call)."""
    if len(expected) != len(actual):
        return float("inf")
    worst = 0.0
    for a, b in zip(expected, actual):
        worst = max(worst, _output_error(a, b))
    return worst


def _output_error(a: Any, b: Any) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not isinstance(a, (list, tuple)) or not isinstance(b, (list, tuple)):
            return float("inf")
        return max_abs_error(a, b)
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    low_precision = _low_precision_eps(a.dtype)
    if a.dtype.kind in "fc" or b.dtype.kind in "fc" or low_precision:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if (np.isnan(a64) != np.isnan(b64)).any():
            return float("inf")
        with np.errstate(invalid="ignore"):
            diff = np.array(np.abs(a64 - b64), ndmin=1)
            diff[np.isnan(diff)] = 0.0  # NaN against NaN, or an infinity against the same one
            if low_precision:
                diff[diff <= 2 * low_precision * np.abs(a64).reshape(diff.shape)] = 0.0
        return float(diff.max())
    return 0.0 if np.array_equal(a, b) else float("inf")


def _low_precision_eps(dtype: np.dtype) -> float:
    """Machine epsilon of float16 / bfloat16 / float8 dtypes; 0 for every other dtype."""
    if dtype == np.float16:
        return float(np.finfo(np.float16).eps)
    if dtype.name.startswith(("bfloat16", "float8")):
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps)
    return 0.0
