"""Calibration data and per-tensor statistics for data-aware passes (quantization, pruning).

- `normalize_calibration(graph, data)`: checks user-given samples against the graph inputs and
  returns a list of `{input name: numpy array}`. A sample is a dict (name -> numpy array or
  torch tensor) or a tuple/list in input order; a sample one rank short of its input (no
  batch axis) gets a batch axis of 1. Unknown or missing names, wrong dtypes, ranks and
  static dims raise `CalibrationError` naming the sample, the input and both types. A dict
  sample may also carry an entry `labels` (`LABELS`, when no graph input has that name): the
  targets of the graph's first output, kept as given for gradient-based scores (prune-heads
  and prune-ffn `score=taylor`); other passes ignore it.
- `load_npz(path)`: samples from an .npz file whose arrays are named by input, first axis =
  samples (what `graphopt optimize --calibration-data` reads).
- `collect_statistics(graph, samples, values)`: runs the graph in ONNX Runtime with the chosen
  values as extra outputs (one thread, no graph rewrites, so results are deterministic) and
  returns a `TensorStats` per value: min, max, per-channel |max| over the last axis and, when
  asked, a histogram of |x| that `calibrated_range` turns into a clipping range.
  Values are fetched in groups whose activations stay under `MEMORY_CAP` bytes per run
  (`value_groups`), so a large model is calibrated in several runs rather than at once.
- `collect_rows(graph, samples, values)`: a deterministic subsample of each value's last-axis
  vectors, for passes that try alternatives on real activations (smooth-quant's per-layer alpha).
- `collect_gram(graph, samples, values)`: X^T X of each named value's last-axis vectors over
  every sample (GPTQ's Hessian), accumulated in float64 one sample at a time.
- Data-parallel calibration: each collector takes `reducer=` (a `PassContext.reducer`); with
  a distributed one, every rank passes its shard of the samples and gets the statistics of all
  of them (`graphopt.distributed_calibration` says what is reduced how).
- `calibrated_range(stats, method)`: the (low, high) range a quantizer should cover:
  `minmax`, `percentile` (99.99th percentile of |x|), `entropy` (the KL-divergence threshold
  of TensorRT's int8 calibrator) or `mse` (the threshold minimizing the expected squared
  quantization plus clipping error).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from graphopt.distributed_calibration import LOCAL, Reducer, gather_rows, shard_offset
from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph

HISTOGRAM_BINS = 2048
PERCENTILE = 99.99
RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")
LABELS = "labels"
"""The calibration sample entry that holds targets of the first output rather than an input."""


class CalibrationError(GraphoptError):
    """Calibration data does not fit the graph, or statistics could not be collected."""


@dataclasses.dataclass
class TensorStats:
    """What calibration saw of one value over all samples."""

    min: float
    max: float
    channel_absmax: np.ndarray
    """max |x| per index of the last axis (SmoothQuant's per-channel activation range)."""
    histogram: Optional[np.ndarray] = None
    """Counts of |x| over HISTOGRAM_BINS equal bins of [0, absmax]."""

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))


def normalize_calibration(graph: Graph, data: Iterable[Any], label: str = "calibration sample {index}") -> list[dict[str, np.ndarray]]:
    """Validate `data` against `graph`'s inputs; return the samples as dicts of numpy arrays.
    Errors name a sample by `label` formatted with its index."""
    if isinstance(data, (dict, str, bytes, os.PathLike)) or not hasattr(data, "__iter__"):
        raise CalibrationError(
            f"calibration data must be an iterable of samples (dicts or tuples), got {type(data).__name__}"
        )
    names = [v.name for v in graph.inputs]
    samples = []
    for index, sample in enumerate(data):
        where = label.format(index=index)
        if isinstance(sample, dict):
            unknown = sorted(set(sample) - set(names) - {LABELS})
            if unknown:
                raise CalibrationError(
                    f"{where}: unknown input(s) {', '.join(unknown)} (graph inputs: {', '.join(names)})"
                )
            missing = [n for n in names if n not in sample]
            if missing:
                raise CalibrationError(f"{where}: missing input(s) {', '.join(missing)}")
            items = [(n, sample[n]) for n in names]
        elif isinstance(sample, (tuple, list)):
            if len(sample) != len(names):
                raise CalibrationError(
                    f"{where}: {len(sample)} arrays given, the graph has {len(names)} inputs ({', '.join(names)})"
                )
            items = list(zip(names, sample))
        else:
            raise CalibrationError(f"{where}: expected a dict or a tuple, got {type(sample).__name__}")
        checked = {name: _checked_array(graph, where, name, array) for name, array in items}
        if isinstance(sample, dict) and LABELS in sample and LABELS not in names:
            checked[LABELS] = _numpy(sample[LABELS])
        samples.append(checked)
    if not samples:
        raise CalibrationError("calibration data is empty")
    return samples


def _numpy(array: Any) -> np.ndarray:
    return np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)


def _checked_array(graph: Graph, sample: str, name: str, array: Any) -> np.ndarray:
    array = _numpy(array)
    value = next(v for v in graph.inputs if v.name == name)
    where = f"{sample}, input '{name}'"
    if value.dtype is not None and array.dtype != value.dtype.to_numpy():
        raise CalibrationError(f"{where}: dtype {array.dtype} given, the graph expects {value.dtype.to_numpy()}")
    shape = value.shape
    if shape is None:
        return array
    if array.ndim == len(shape) - 1:
        array = array[None]
    if array.ndim != len(shape):
        raise CalibrationError(f"{where}: rank {array.ndim} given, the graph expects rank {len(shape)} {value.type}")
    for axis, (got, want) in enumerate(zip(array.shape, shape)):
        if isinstance(want, int) and got != want:
            raise CalibrationError(f"{where}: shape {list(array.shape)} given, the graph expects {value.type} (axis {axis})")
    return array


def load_npz(path: "str | os.PathLike[str]") -> list[dict[str, np.ndarray]]:
    """Samples from an .npz file: one array per input, named by it, first axis = samples."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None
    if not arrays:
        raise CalibrationError(f"{path}: holds no arrays")
    counts = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        listed = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise CalibrationError(f"{path}: every array needs the same number of samples on its first axis ({listed})")
    total = next(iter(counts.values()))
    return [{name: array[i] for name, array in arrays.items()} for i in range(total)]


def load_input_arrays(path: str, input_names: Sequence[str]) -> dict[str, Any]:
    """The arrays of an .npz (named by input), or of an .npy for a model of one input: one
    sample, as `--inputs` and `graphopt run -i` take it."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise GraphoptError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise GraphoptError(f"{path}: not a readable .npz file of arrays ({exc})") from None
    if isinstance(loaded, np.ndarray):
        if len(input_names) != 1:
            raise GraphoptError(
                f"{path}: an .npy holds one unnamed array, but the model takes {len(input_names)} inputs "
                f"({', '.join(input_names)}); save them named in an .npz: np.savez('inputs.npz', {input_names[0] if input_names else 'name'}=...)"
            )
        return {input_names[0]: loaded}
    with loaded as data:
        return {name: data[name] for name in data.files}


def load_inputs(path: str, graph: Graph) -> dict[str, np.ndarray]:
    """`load_input_arrays` of `path`, checked against `graph`'s inputs (names, ranks, dtypes) by
    `normalize_calibration`, so a wrong file fails with a message naming it."""
    arrays = load_input_arrays(path, [value.name for value in graph.inputs])
    return normalize_calibration(graph, [arrays], label=path)[0]


def collect_statistics(
    graph: Graph, samples: Sequence[dict[str, np.ndarray]], values: Sequence[str], *, histogram: bool = False,
    reducer: Optional[Reducer] = None,
) -> dict[str, TensorStats]:
    """Statistics of the named float values over `samples` (see the module doc); with a
    distributed `reducer`, over every rank's samples (this rank's may be none)."""
    if not values:
        return {}
    reducer = reducer or LOCAL
    runners = [GraphRunner(graph, group) for group in value_groups(graph, samples, values)]
    ranges: dict[str, list[Any]] = {}
    for sample in samples:
        for name, array in _run_all(runners, sample):
            flat = np.abs(array).reshape(-1, array.shape[-1]) if array.ndim else np.abs(array).reshape(1, 1)
            channel = flat.max(axis=0) if flat.size else np.zeros(flat.shape[-1], np.float32)
            low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
            if name in ranges:
                seen = ranges[name]
                seen[0], seen[1] = min(seen[0], low), max(seen[1], high)
                seen[2] = np.maximum(seen[2], channel)
            else:
                ranges[name] = [low, high, channel]
    if reducer.distributed:
        ranges = _reduced_ranges(ranges, list(values), reducer)
    stats = {name: TensorStats(lo, hi, ch.astype(np.float32)) for name, (lo, hi, ch) in ranges.items()}
    if histogram:
        for stat in stats.values():
            stat.histogram = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
        for sample in samples:
            for name, array in _run_all(runners, sample):
                stat = stats[name]
                top = stat.absmax or 1.0
                counts, _ = np.histogram(np.abs(array), bins=HISTOGRAM_BINS, range=(0.0, top))
                stat.histogram += counts
        if reducer.distributed:
            names = list(stats)
            total = reducer.all_reduce_sum(np.stack([stats[name].histogram for name in names]))
            for name, counts in zip(names, total):
                stats[name].histogram = counts
    return stats


def _reduced_ranges(ranges: dict[str, list[Any]], values: list[str], reducer: Reducer) -> dict[str, list[Any]]:
    """[min, max, channel |max|] of every value over all ranks (MIN, MAX, MAX): the channel
    counts are agreed first, so a rank without samples takes part with neutral entries."""
    channels = reducer.all_reduce_max(np.array([len(ranges[n][2]) if n in ranges else 0 for n in values], np.int64))
    lows = np.array([ranges[n][0] if n in ranges else np.inf for n in values])
    highs = np.array([ranges[n][1] if n in ranges else -np.inf for n in values])
    absmax = np.concatenate([ranges[n][2].astype(np.float32) if n in ranges else np.zeros(int(c), np.float32) for n, c in zip(values, channels)])
    lows, highs, absmax = reducer.all_reduce_min(lows), reducer.all_reduce_max(highs), reducer.all_reduce_max(absmax)
    bounds = np.cumsum([0, *channels.tolist()])
    return {n: [float(lows[i]), float(highs[i]), absmax[bounds[i]:bounds[i + 1]]] for i, n in enumerate(values) if np.isfinite(lows[i])}


def collect_rows(
    graph: Graph, samples: Sequence[dict[str, np.ndarray]], values: Sequence[str], max_rows: int = 512, *,
    reducer: Optional[Reducer] = None,
) -> dict[str, np.ndarray]:
    """A deterministic subsample of each named value's last-axis vectors: [rows, channels],
    evenly spaced rows from every sample, at most `max_rows` in all. With a distributed
    `reducer`, the subsample of every rank's samples in rank order, the same on every rank:
    each rank picks from its own samples and sends only its rows among the first `max_rows`."""
    reducer = reducer or LOCAL
    runners = [GraphRunner(graph, group) for group in value_groups(graph, samples, values)]
    total = shard_offset(len(samples), reducer)[1]
    per_sample = max(1, -(-max_rows // total)) if total else 1
    rows: dict[str, list[np.ndarray]] = {name: [] for name in values}
    for sample in samples:
        for name, array in _run_all(runners, sample):
            flat = array.reshape(-1, array.shape[-1])
            picked = np.linspace(0, len(flat) - 1, num=min(per_sample, len(flat))).astype(np.int64)
            rows[name].append(flat[picked])
    if not reducer.distributed:
        return {name: np.concatenate(parts)[:max_rows].astype(np.float32) for name, parts in rows.items()}
    local = {name: np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32) for name, parts in rows.items()}
    counts = np.stack(reducer.all_gather(np.array([len(local[name]) for name in values], np.int64)))  # [ranks, values]
    before = counts[: reducer.rank].sum(0)
    result = {}
    for index, name in enumerate(values):
        wanted = local[name][: max(0, max_rows - int(before[index]))]
        result[name] = gather_rows(wanted, reducer)[:max_rows]
    return result


@dataclasses.dataclass
class Gram:
    """X^T X of a value's last-axis vectors (float64 [C, C]) and how many vectors it sums."""

    matrix: np.ndarray
    rows: int


def collect_gram(
    graph: Graph, samples: Sequence[dict[str, np.ndarray]], values: Sequence[str], *, reducer: Optional[Reducer] = None
) -> dict[str, Gram]:
    """{name: the Gram matrix of the value's last-axis vectors over all samples}; with a
    distributed `reducer`, over every rank's samples (each rank's float64 sum, summed)."""
    reducer = reducer or LOCAL
    runners = [GraphRunner(graph, group) for group in value_groups(graph, samples, values)]
    grams: dict[str, Gram] = {}
    for sample in samples:
        for name, array in _run_all(runners, sample):
            flat = array.reshape(-1, array.shape[-1]).astype(np.float64)
            if name in grams:
                grams[name].matrix += flat.T @ flat
                grams[name].rows += len(flat)
            else:
                grams[name] = Gram(flat.T @ flat, len(flat))
    if not reducer.distributed:
        return grams
    channels = reducer.all_reduce_max(np.array([len(grams[n].matrix) if n in grams else 0 for n in values], np.int64))
    reduced = {}
    for name, size in zip(values, channels.tolist()):
        local = grams.get(name) or Gram(np.zeros((size, size)), 0)
        totals = reducer.all_reduce_sum(np.concatenate([local.matrix.reshape(-1), [float(local.rows)]]))
        reduced[name] = Gram(totals[:-1].reshape(size, size), int(totals[-1]))
    return reduced


MEMORY_CAP = 1 << 30
"""Bytes of requested activations one calibration run may hold; more values are split over runs."""


def value_groups(
    graph: Graph, samples: Sequence[dict[str, np.ndarray]], values: Sequence[str], cap: Optional[int] = None
) -> list[list[str]]:
    """`values` split so that one sample's activations of a group stay under `cap` bytes
    (estimated from the values' types, symbolic dims sized from the largest sample; a symbol
    no input has, a length computed inside the graph such as drop-padding's kept prefix,
    sized as the largest input dim; a value whose size is unknown runs alone)."""
    cap = MEMORY_CAP if cap is None else cap
    sizes: dict[str, int] = {}
    for sample in samples:
        for value in graph.inputs:
            if value.name in sample:
                for dim, size in zip(value.shape or (), np.shape(sample[value.name])):
                    if isinstance(dim, str):
                        sizes[dim] = max(sizes.get(dim, 0), int(size))
    by_name = {v.name: v for v in graph.values()}
    inner = max(sizes.values(), default=0)
    if inner:
        for value in by_name.values():
            for dim in value.shape or ():
                if isinstance(dim, str):
                    sizes.setdefault(dim, inner)
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in values:
        estimate = _estimated_bytes(by_name.get(name), sizes)
        if estimate is None or (current and used + estimate > cap):
            if current:
                groups.append(current)
            current, used = [], 0
        if estimate is None:
            groups.append([name])
            continue
        current.append(name)
        used += estimate
    if current:
        groups.append(current)
    return groups


def _estimated_bytes(value: Any, sizes: dict[str, int]) -> Optional[int]:
    if value is None or value.shape is None or value.dtype is None:
        return None
    count = 1
    for dim in value.shape:
        size = dim if isinstance(dim, int) else sizes.get(dim) if isinstance(dim, str) else None
        if size is None:
            return None
        count *= size
    return count * np.dtype(value.dtype.to_numpy()).itemsize


def _run_all(runners: Sequence["GraphRunner"], sample: dict[str, np.ndarray]) -> Iterable[tuple[str, np.ndarray]]:
    """(name, activation) of every runner's values on `sample`, one runner's group at a time."""
    for runner in runners:
        yield from runner.run(sample).items()


class GraphRunner:
    """Runs a graph in ONNX Runtime and returns chosen values (inputs, outputs or inner)."""

    def __init__(self, graph: Graph, values: Sequence[str], *, optimize: bool = False) -> None:
        import onnx

        from graphopt.ort_io import reference_session

        self.values = list(values)
        model = graph.to_onnx()
        known = {o.name for o in model.graph.output}
        infos = {vi.name: vi for vi in model.graph.value_info}
        kinds = {v.name: v for v in graph.values()}
        for name in self.values:
            if name in known:
                continue
            value = kinds.get(name)
            if value is None:
                raise CalibrationError(f"graph '{graph.name}' has no value named '{name}'")
            info = infos.get(name)
            if info is None:
                info = onnx.helper.make_tensor_value_info(name, value.dtype.value if value.dtype else 0, None)
            model.graph.output.append(info)
        try:
            self.session, _ = reference_session(model, threads=1, optimize=optimize, widen_io=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()
            raise CalibrationError(f"ONNX Runtime could not load graph '{graph.name}' for calibration: {first[0] if first else exc}") from None
        self._inputs = {i.name for i in self.session.get_inputs()}

    def run(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self.session.run(self.values, {k: v for k, v in sample.items() if k in self._inputs})
        except Exception as exc:
            first = str(exc).strip().splitlines()
            raise CalibrationError(f"ONNX Runtime failed on a calibration sample: {first[0] if first else exc}") from None
        return dict(zip(self.values, results))


def calibrated_range(stats: TensorStats, method: str, levels: int = 256) -> tuple[float, float]:
    """The (low, high) range, low <= 0 <= high, that a quantizer with `levels` steps should cover."""
    low, high = min(stats.min, 0.0), max(stats.max, 0.0)
    if method == "minmax" or stats.absmax == 0.0:
        return low, high
    if stats.histogram is None:
        raise CalibrationError(f"calibration method '{method}' needs histograms (collect_statistics(histogram=True))")
    if method == "percentile":
        threshold = _percentile_threshold(stats)
    elif method == "entropy":
        threshold = _entropy_threshold(stats, levels)
    elif method == "mse":
        threshold = _mse_threshold(stats, levels)
    else:
        raise CalibrationError(f"unknown calibration method '{method}' (use one of {', '.join(RANGE_METHODS)})")
    return max(low, -threshold), min(high, threshold)


def _bin_width(stats: TensorStats) -> float:
    return stats.absmax / HISTOGRAM_BINS


def _percentile_threshold(stats: TensorStats) -> float:
    cumulative = np.cumsum(stats.histogram)
    index = int(np.searchsorted(cumulative, cumulative[-1] * PERCENTILE / 100.0))
    return (index + 1) * _bin_width(stats)


def _entropy_threshold(stats: TensorStats, levels: int) -> float:
    """TensorRT's calibrator: the clip point whose quantized distribution has the smallest KL
    divergence from the clipped one (levels // 2 quantization bins over |x|)."""
    hist = stats.histogram.astype(np.float64)
    target = levels // 2
    best, best_index = np.inf, HISTOGRAM_BINS
    for index in range(target, HISTOGRAM_BINS + 1, 16):
        reference = hist[:index].copy()
        reference[-1] += hist[index:].sum()
        chunks = np.array_split(hist[:index], target)
        expanded = []
        for chunk in chunks:
            nonzero = chunk != 0
            mean = chunk.sum() / max(int(nonzero.sum()), 1)
            expanded.append(np.where(nonzero, mean, 0.0))
        candidate = np.concatenate(expanded)
        divergence = _kl(reference, candidate)
        if divergence < best:
            best, best_index = divergence, index
    return best_index * _bin_width(stats)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / max(p.sum(), 1e-12)
    q = q / max(q.sum(), 1e-12)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


def _mse_threshold(stats: TensorStats, levels: int) -> float:
    hist = stats.histogram.astype(np.float64)
    width = _bin_width(stats)
    centers = (np.arange(HISTOGRAM_BINS) + 0.5) * width
    best, best_threshold = np.inf, stats.absmax
    for index in range(HISTOGRAM_BINS // 32, HISTOGRAM_BINS + 1, 8):
        threshold = index * width
        step = 2 * threshold / (levels - 1)
        clipped = np.maximum(centers - threshold, 0.0)
        error = np.sum(hist * (clipped**2 + np.where(centers <= threshold, step**2 / 12, 0.0)))
        if error < best:
            best, best_threshold = error, threshold
    return best_threshold
