"""Data-parallel calibration: every rank holds a shard of the samples, statistics are reduced.

`graphopt.optimize(model, pipeline, calibration_data=my_shard, distributed=True)`, called on
every rank of a torch.distributed process group the caller initialized (gloo or NCCL), runs the
pipeline on each rank with that rank's samples, and every data-aware pass ends with the
statistics, and hence the decisions and constants, one process would compute on all samples.

Rules.
- The global sample list is rank 0's shard, then rank 1's, and so on (contiguous shards in rank
  order; any sizes, a rank may hold more than another). Every rank must hold at least one
  sample (or no rank any: then passes run as without calibration data); `optimize` checks this,
  and that every rank runs the same pipeline on the same graph inputs, before any pass runs,
  and refuses on every rank at once (no rank is left waiting in a collective).
- Passes never see torch.distributed: `PassContext.reducer` is a `Reducer` (`LOCAL`, a no-op,
  by default), and the collectors of `graphopt.calibration` and the passes' own sums call it
  where a statistic is final. A `Reducer` has `all_reduce_sum`, `all_reduce_max`,
  `all_reduce_min` (elementwise over ranks, numpy in and out) and `all_gather` (one array per
  rank, in rank order; first axes may differ). `TorchReducer` implements them with
  torch.distributed; every rank must make the same calls in the same order, which holds because
  passes are deterministic and take every branch on reduced (hence equal) values.
- What is reduced how (who calls it in brackets):
  - min, max, per-channel |max| of activations: MIN / MAX (`collect_statistics`: quantize's
    static ranges, smooth-quant's a_j). Exact.
  - histograms of |x| (percentile, entropy, mse ranges): the bin edges depend on |max|, so the
    range is agreed first (MAX above), then every rank counts on the common edges and the counts
    are summed (SUM of int64). Exact.
  - Gram matrices X^T X (GPTQ's Hessian, low-rank's activation second moment): SUM of each
    rank's float64 sum, with the row count. Equal to one process up to float64 summation order
    (relative ~1e-16 on the matrix).
  - means, X^T X and X^T Y of least-squares refits (prune-heads / prune-ffn `compensate`), and
    the sums of squares behind `score=activation`: the global mean first (SUM of sums and counts),
    then centred sums (SUM). Same rounding caveat as Gram matrices.
  - small per-sample or bounded things are gathered, so that the arithmetic on them is exactly
    one process's: `collect_rows`' subsample (at most `max_rows` rows per value in all: each rank
    sends only its rows among the first `max_rows` of the global order; AWQ, smooth-quant
    per-layer), the per-vector cosines of `mean_cosine` (smooth-quant alpha=auto's and
    quantize fidelity_budget's scores: one float per output vector of the scored samples), and
    the per-sample gate gradients of `score=taylor` (one float per unit per sample). Exact.
  - sample subsets (smooth-quant's even/odd samples, quantize's first SENSITIVITY_SAMPLES):
    `global_slice` takes a slice of the global order; each rank keeps its part, possibly none.
    The label-free targets of `score=taylor` are seeded by the global sample index.
- Not reduced: `choose-precision` (its sensitivity runs and compiled trials are per-sample
  runs this module does not distribute); `optimize(distributed=...)` refuses a pipeline that
  holds it (`LOCAL_ONLY_PASSES`). A third-party pass that reads `ctx.calibration` itself must
  reduce its statistics through `ctx.reducer` (or use the collectors with `reducer=`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence, TypeVar

import numpy as np

from graphopt.errors import GraphoptError

T = TypeVar("T")

LOCAL_ONLY_PASSES = {
    "choose-precision": "its sensitivity and fidelity runs are not reduced across ranks; run it in one process",
}
"""Passes that read calibration data without reducing it: refused in distributed mode."""

_MAX_NDIM = 8


class DistributedCalibrationError(GraphoptError):
    """Distributed calibration cannot run as asked (no process group, ranks that disagree)."""


class Reducer:
    """One process (world size 1): every reduction returns its input; the base of all reducers."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Elementwise sum over ranks (same shape and dtype on every rank)."""
        return np.array(array, copy=True)

    def all_reduce_max(self, array: np.ndarray) -> np.ndarray:
        """Elementwise maximum over ranks."""
        return np.array(array, copy=True)

    def all_reduce_min(self, array: np.ndarray) -> np.ndarray:
        """Elementwise minimum over ranks."""
        return np.array(array, copy=True)

    def all_gather(self, array: np.ndarray) -> list[np.ndarray]:
        """Every rank's array, in rank order (same dtype everywhere; shapes may differ)."""
        return [np.array(array, copy=True)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


LOCAL = Reducer()
"""The no-op reducer of a single process (PassContext's default)."""


class TorchReducer(Reducer):
    """Reductions over a torch.distributed process group (the default group when `group` is
    None) that the caller initialized. Arrays travel as CPU tensors for gloo, as tensors on
    the current CUDA device for NCCL; they are widened to float64 / int64 on the way, so that
    MAX and MIN of float32 values and SUM of counts are exact."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise DistributedCalibrationError(
                "distributed calibration needs an initialized torch.distributed process group: call "
                "torch.distributed.init_process_group(...) on every rank first (gloo on CPU, nccl on CUDA)"
            )
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._device = "cpu"
        if dist.get_backend(group) == "nccl":
            import torch

            self._device = f"cuda:{torch.cuda.current_device()}"

    def _tensor(self, array: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(np.array(array, dtype=_wide(array.dtype), copy=True)).to(self._device)

    def _reduce(self, array: np.ndarray, op: Any) -> np.ndarray:
        array = np.asarray(array)
        tensor = self._tensor(array)
        self._dist.all_reduce(tensor, op=op, group=self.group)
        return tensor.cpu().numpy().astype(array.dtype, copy=False).reshape(array.shape)

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        return self._reduce(array, self._dist.ReduceOp.SUM)

    def all_reduce_max(self, array: np.ndarray) -> np.ndarray:
        return self._reduce(array, self._dist.ReduceOp.MAX)

    def all_reduce_min(self, array: np.ndarray) -> np.ndarray:
        return self._reduce(array, self._dist.ReduceOp.MIN)

    def all_gather(self, array: np.ndarray) -> list[np.ndarray]:
        import torch

        array = np.asarray(array)
        if array.ndim > _MAX_NDIM:
            raise DistributedCalibrationError(f"all_gather takes arrays of rank <= {_MAX_NDIM}, got {array.ndim}")
        shape = np.zeros(_MAX_NDIM + 1, np.int64)
        shape[0] = array.ndim
        shape[1:1 + array.ndim] = array.shape
        shapes = [self._tensor(np.zeros_like(shape)) for _ in range(self.world_size)]
        self._dist.all_gather(shapes, self._tensor(shape), group=self.group)
        dims = [tuple(int(d) for d in s.cpu().numpy()[1:1 + int(s[0])]) for s in shapes]
        sizes = [int(np.prod(d)) for d in dims]
        longest = max(sizes)
        if longest == 0:
            return [np.zeros(d, array.dtype) for d in dims]
        padded = np.zeros(longest, _wide(array.dtype))
        padded[: array.size] = array.reshape(-1)
        parts = [torch.zeros(longest, dtype=torch.from_numpy(padded[:1]).dtype, device=self._device) for _ in range(self.world_size)]
        self._dist.all_gather(parts, self._tensor(padded), group=self.group)
        return [p.cpu().numpy()[:size].astype(array.dtype, copy=False).reshape(d) for p, size, d in zip(parts, sizes, dims)]


def _wide(dtype: np.dtype) -> type:
    """The dtype arrays travel in: float64 for floats, int64 for integers and booleans."""
    return np.float64 if np.dtype(dtype).kind == "f" else np.int64


def reducer_for(distributed: Any) -> Reducer:
    """`LOCAL` for False/None, a `TorchReducer` over the default group for True, a `Reducer` as is."""
    if distributed is None or distributed is False:
        return LOCAL
    if distributed is True:
        return TorchReducer()
    if isinstance(distributed, Reducer):
        return distributed
    raise DistributedCalibrationError(f"distributed takes True, False or a Reducer, got {type(distributed).__name__}")


def shard_offset(count: int, reducer: Optional[Reducer]) -> tuple[int, int]:
    """(global index of this rank's first item, global item count) for a rank holding `count`
    consecutive items of a list sharded in rank order."""
    reducer = reducer or LOCAL
    if not reducer.distributed:
        return 0, count
    counts = np.concatenate(reducer.all_gather(np.array([count], np.int64)))
    return int(counts[: reducer.rank].sum()), int(counts.sum())


def global_slice(items: Sequence[T], reducer: Optional[Reducer], start: Optional[int] = None, stop: Optional[int] = None,
                 step: Optional[int] = None) -> list[T]:
    """This rank's part of `global_items[start:stop:step]`, where the global list is every
    rank's `items` in rank order; the parts, in rank order, are that slice again."""
    offset, total = shard_offset(len(items), reducer)
    chosen = range(total)[slice(start, stop, step)]
    return [items[i - offset] for i in chosen if offset <= i < offset + len(items)]


def has_samples(samples: Optional[Sequence[Any]], reducer: Optional[Reducer]) -> bool:
    """Whether any rank holds a sample (every rank gets the same answer)."""
    return shard_offset(len(samples or ()), reducer)[1] > 0


def gather_rows(array: np.ndarray, reducer: Optional[Reducer]) -> np.ndarray:
    """Every rank's rows (first axis) concatenated in rank order: the one-process array when
    each rank holds its shard's rows."""
    reducer = reducer or LOCAL
    if not reducer.distributed:
        return array
    parts = reducer.all_gather(np.ascontiguousarray(array))
    filled = [p for p in parts if p.size]
    return np.concatenate(filled) if filled else array


def summed(array: Any, reducer: Optional[Reducer]) -> np.ndarray:
    """`array` summed over ranks (itself in one process)."""
    reducer = reducer or LOCAL
    return reducer.all_reduce_sum(np.asarray(array)) if reducer.distributed else np.asarray(array)


def mean_rows(rows: np.ndarray, reducer: Optional[Reducer]) -> np.ndarray:
    """The mean over every rank's rows (`rows.mean(0)` in one process, bit for bit)."""
    reducer = reducer or LOCAL
    if not reducer.distributed:
        return rows.mean(0)
    totals = summed(np.concatenate([rows.sum(0).reshape(-1), [float(len(rows))]]), reducer)
    return (totals[:-1] / totals[-1]).reshape(rows.shape[1:])


def check_ranks(reducer: Reducer, samples: Optional[Sequence[Any]], error: Optional[BaseException], fingerprint: str) -> None:
    """Refuse, on every rank at once, a run whose ranks disagree: a rank that failed before any
    pass (`error`: its calibration data, or a pass `refuse_local_only` refused), a rank without samples while others have some, or ranks whose
    `fingerprint` (pipeline and graph inputs) differs. Raises `error` itself on the rank that had it."""
    from graphopt.calibration import CalibrationError

    digest = int.from_bytes(hashlib.sha256(fingerprint.encode()).digest()[:7], "little")
    mine = np.array([len(samples or ()), int(error is not None), digest], np.int64)
    table = np.stack(reducer.all_gather(mine))
    failed = [r for r in range(reducer.world_size) if table[r, 1]]
    if failed:
        if error is not None:
            raise error
        raise DistributedCalibrationError(f"distributed calibration: rank(s) {failed} refused the run before any pass (see their error)")
    if len(set(table[:, 2].tolist())) > 1:
        raise DistributedCalibrationError(
            "distributed calibration: the ranks do not run the same pipeline on the same graph inputs; every rank must "
            "call graphopt.optimize with the same model and pipeline (only calibration_data differs)")
    counts = table[:, 0].tolist()
    empty = [r for r, c in enumerate(counts) if c == 0]
    if empty and len(empty) < len(counts):
        raise CalibrationError(
            f"distributed calibration: rank(s) {empty} hold no calibration samples (samples per rank: {counts}); "
            "give every rank at least one sample, or none to all")


def refuse_local_only(pass_names: Sequence[str]) -> None:
    """Raise for a pass of `pass_names` whose calibration is not reduced across ranks."""
    for name in pass_names:
        if name in LOCAL_ONLY_PASSES:
            raise DistributedCalibrationError(f"pass '{name}' cannot calibrate across ranks: {LOCAL_ONLY_PASSES[name]}")
