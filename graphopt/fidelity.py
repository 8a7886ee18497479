"""How far a model's outputs moved: the figures that say whether a lossy result is usable.

    report = compare_outputs(expected, actual, names, feeds)   # per output
    print(format_fidelity(report))

Per output (float outputs; integer outputs count as equal or not):
- `max_abs`: the largest absolute difference;
- `relative`: ||actual - expected|| / ||expected|| over the whole tensor;
- `token_cosine`: for outputs of rank >= 2, the mean over vectors (the last axis: one per
  token, or per KV-cache row) of the cosine between expected and actual, and `min_token_cosine`;
- `pooled_cosine`: for rank-3 outputs [batch, seq, hidden] but logits, the mean over the batch of the
  cosine of the mean-pooled vectors (masked by the attention_mask feed when it fits): the
  sentence-embedding figure sentence-transformers models use;
- `top1`: for outputs named like logits, the share of positions whose argmax agrees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np


@dataclasses.dataclass
class OutputFidelity:
    """The figures of one output; see the module doc."""

    name: str
    max_abs: float
    relative: float
    token_cosine: Optional[float] = None
    min_token_cosine: Optional[float] = None
    pooled_cosine: Optional[float] = None
    top1: Optional[float] = None

    def text(self) -> str:
        parts = [f"max abs {self.max_abs:.3g}", f"relative {self.relative:.3g}"]
        if self.token_cosine is not None:
            parts.append(f"token cosine {self.token_cosine:.5f} (min {self.min_token_cosine:.5f})")
        if self.pooled_cosine is not None:
            parts.append(f"pooled cosine {self.pooled_cosine:.5f}")
        if self.top1 is not None:
            parts.append(f"top-1 agreement {self.top1:.1%}")
        return f"{self.name}: " + ", ".join(parts)


def compare_outputs(
    expected: Sequence[Any], actual: Sequence[Any], names: Sequence[str], feeds: Optional[dict[str, Any]] = None
) -> list[OutputFidelity]:
    """One `OutputFidelity` per output pair; `feeds` supplies the attention mask for pooling."""
    if len(expected) != len(actual):
        raise ValueError(f"{len(expected)} expected outputs but {len(actual)} actual ones")
    mask = None if feeds is None else feeds.get("attention_mask")
    return [_compare(name, np.asarray(a), np.asarray(b), mask) for name, a, b in zip(names, expected, actual)]


def _compare(name: str, expected: np.ndarray, actual: np.ndarray, mask: Optional[np.ndarray]) -> OutputFidelity:
    if expected.shape != actual.shape:
        raise ValueError(f"output {name}: shape {list(actual.shape)} differs from the expected {list(expected.shape)}")
    a, b = expected.astype(np.float64), actual.astype(np.float64)
    diff = np.abs(a - b)
    norm = np.linalg.norm(a)
    result = OutputFidelity(
        name, float(diff.max(initial=0.0)), float(np.linalg.norm(a - b) / norm) if norm else float(np.linalg.norm(b) > 0)
    )
    if expected.dtype.kind != "f" or a.ndim < 2 or a.size == 0:
        return result
    cosines = _row_cosines(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
    result.token_cosine, result.min_token_cosine = float(cosines.mean()), float(cosines.min())
    logits = "logit" in name.lower()
    if a.ndim == 3 and not logits:
        weights = _pool_weights(mask, a.shape[:2])
        pooled_a = (a * weights[..., None]).sum(1) / weights.sum(1, keepdims=True)
        pooled_b = (b * weights[..., None]).sum(1) / weights.sum(1, keepdims=True)
        result.pooled_cosine = float(_row_cosines(pooled_a, pooled_b).mean())
    if logits:
        result.top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    return result


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per row; 1 where both rows are zero, 0 where only one is."""
    dots = (a * b).sum(-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    both_zero = (np.linalg.norm(a, axis=-1) == 0) & (np.linalg.norm(b, axis=-1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, cosines)


def _pool_weights(mask: Optional[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The attention mask as pooling weights when it is [batch, seq] with a token in each row, else ones."""
    if mask is not None and tuple(np.shape(mask)) == tuple(shape) and (np.asarray(mask).sum(1) > 0).all():
        return np.asarray(mask, dtype=np.float64)
    return np.ones(shape, dtype=np.float64)


def format_fidelity(report: Sequence[OutputFidelity], limit: int = 4) -> str:
    """One line per output, the first `limit` outputs (a decoder has dozens of cache outputs),
    then the worst relative error of the rest."""
    lines = [item.text() for item in report[:limit]]
    rest = report[limit:]
    if rest:
        worst = max(rest, key=lambda item: item.relative)
        lines.append(f"... {len(rest)} more outputs; worst relative error {worst.relative:.3g} ({worst.name})")
    return "\n".join(lines)
