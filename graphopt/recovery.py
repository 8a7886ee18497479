"""Knowledge-distillation recovery of a compressed graph: `recover(compressed, original, data)`.

After `prune-heads`, `prune-ffn` or `low-rank`, the compressed graph (the student) is
fine-tuned in torch to reproduce the original graph (the teacher) on the given samples:

- Both graphs are lowered with `to_fx`. The teacher's constants stay buffers and run
  without gradients; the student's trainable constants become `torch.nn.Parameter`s
  (copies: the input graphs and their arrays are never changed). Trainable: float32/float64
  constants with more than one element that a node reads (matmul weights, biases, norm
  scales), minus `freeze` (default: the embedding tables, i.e. constants read as the data of
  a `Gather`). Scalars (attention scales, GELU constants) and integer constants never train.
- Loss: for each float graph output and (with `hidden_loss`) each matched hidden value, the
  squared error relative to the teacher's mean square, `mean((s - t)^2) / mean(t^2)`; the
  loss is the mean over the outputs plus the mean over the hidden values, so the default
  weights work whatever the scale of a model's activations. Hidden values are the outputs of
  the student's normalization nodes (`LayerNormalization`, `graphopt::SkipLayerNorm`,
  `graphopt::RMSNorm`, `RMSNormalization`: the residual stream of a Transformer) that the
  teacher also has, by name, with the same type; pruning keeps those names. They become
  extra outputs of a copy of each graph before lowering.
- Optimizer: Adam, `lr` warmed up linearly over the first tenth of the steps and decayed
  linearly to zero, gradient norm clipped at `MAX_GRAD_NORM`. One step draws `batch_size`
  samples (reshuffled every pass over the data, from `seed`, so runs are deterministic).
  Samples of one step whose inputs have the same shapes are concatenated on the batch axis
  (when every input's first dim is symbolic) and run together; the others run one after
  another, gradients accumulated. Unpadded sentences of many lengths therefore work as is;
  padding them to a few lengths (with their attention mask) makes the steps faster.

The returned graph is a copy of `compressed` (same structure, names and op counts) whose
trained constants hold the new weights; `graph.metadata["recovery_report"]` is a
`RecoveryReport` (the distillation loss over all samples before and after, what trained).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any, Collection, Iterable, Optional, Sequence

import numpy as np

from graphopt.errors import GraphoptError, UnsupportedOpError
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph
from graphopt.ir.tensor import ArrayTensor

DEFAULT_LR = 1e-4
DEFAULT_BATCH_SIZE = 8
WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
NORM_OPS = {("", "LayerNormalization"), ("", "RMSNormalization"), ("graphopt", "SkipLayerNorm"), ("graphopt", "RMSNorm")}
"""Ops whose first output is a residual-stream value matched between student and teacher."""
TRAINABLE_DTYPES = (DType.FLOAT, DType.DOUBLE)

_LOG = logging.getLogger("graphopt")


class RecoveryError(GraphoptError):
    """`recover` cannot train the compressed graph as asked (names the argument to change)."""


@dataclasses.dataclass
class RecoveryReport:
    """What `recover` did; in the returned graph's `metadata["recovery_report"]`."""

    steps: int
    samples: int
    trained: list[str]
    """Names of the constants that were trained."""
    parameters: int
    """Elements of the trained constants."""
    hidden: list[str]
    """Hidden values matched between student and teacher (empty without `hidden_loss`)."""
    loss_before: float
    """Distillation loss over all samples with the compressed graph's weights."""
    loss_after: float
    seconds: float

    def describe(self) -> str:
        return (
            f"recover: loss {self.loss_before:.4g} -> {self.loss_after:.4g} over {self.samples} samples; "
            f"{self.steps} steps, {len(self.trained)} constants ({self.parameters} elements) trained, "
            f"{len(self.hidden)} hidden values matched, {self.seconds:.1f} s"
        )


def recover(
    compressed: Any,
    original: Any,
    data: Any,
    *,
    steps: int = 200,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    hidden_loss: bool = True,
    freeze: Optional[Collection[str]] = None,
    progress: bool = True,
    seed: int = 0,
) -> Graph:
    """Fine-tune `compressed` to match `original`'s outputs on `data`; return a new Graph.

    `compressed`, `original`: Graphs, .onnx paths or ModelProtos with the same input names
    (neither is changed). `data`: samples as for calibration (an iterable of dicts name ->
    numpy array / torch tensor, or tuples in input order; or an .npz path), checked against
    the inputs; see the module doc for batching. `steps` optimizer steps of `batch_size`
    samples at peak learning rate `lr`. `hidden_loss`: also match the residual-stream values
    both graphs have. `freeze`: names of constants of `compressed` to keep as they are
    (default None: its embedding tables; `()` trains those too). `progress`: a status line
    on stderr. Raises RecoveryError for unusable arguments, UnsupportedOpError naming an op
    the torch lowering lacks.
    """
    import torch

    from graphopt.api import load_graph

    started = time.perf_counter()
    student_graph, teacher_graph = load_graph(compressed), load_graph(original)
    _check_arguments(student_graph, teacher_graph, steps, batch_size, lr)
    samples = _samples(student_graph, data)
    trained = trainable_constants(student_graph, freeze)
    if not trained:
        raise RecoveryError(
            f"recover: graph '{student_graph.name}' has no trainable weights (float32/float64 constants of more than one "
            "element that a node reads, not frozen); check `freeze`"
        )
    hidden = matched_hidden_values(student_graph, teacher_graph) if hidden_loss else []
    student = _lower(student_graph, hidden, trained, "compressed")
    teacher = _lower(teacher_graph, hidden, (), "original")
    parameters = {name: student.get_parameter(attr) for name, attr in student.graphopt_parameters.items()}
    loss = _Distillation(student, teacher, student_graph, hidden, samples)
    batches = _Batches(len(samples), batch_size, seed)
    loss_before = loss.over_all(batch_size)
    _LOG.info("recover: %d constants (%d elements) to train, %d hidden values matched; loss %.4g on %d samples",
              len(parameters), sum(p.numel() for p in parameters.values()), len(hidden), loss_before, len(samples))
    optimizer = torch.optim.Adam(list(parameters.values()), lr=lr)
    warmup = max(1, int(steps * WARMUP_FRACTION))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
    )
    bar = _ProgressLine(steps, progress)
    student.train()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        value = loss.accumulate(batches.next())
        torch.nn.utils.clip_grad_norm_(list(parameters.values()), MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        bar.update(step + 1, value)
    student.eval()
    loss_after = loss.over_all(batch_size)
    result = student_graph.clone()
    constants = result.constants
    for name, parameter in parameters.items():
        constants[name].const = ArrayTensor(parameter.detach().numpy().copy())
    report = RecoveryReport(
        steps, len(samples), sorted(parameters), sum(p.numel() for p in parameters.values()), hidden,
        loss_before, loss_after, time.perf_counter() - started,
    )
    result.metadata["recovery_report"] = report
    _LOG.info("%s", report.describe())
    return result


def trainable_constants(graph: Graph, freeze: Optional[Collection[str]] = None) -> list[str]:
    """Names of the constants `recover` trains in `graph` (see the module doc); `freeze`
    None leaves out the embedding tables, otherwise exactly the names given (each must be a
    constant of `graph`)."""
    constants = graph.constants
    if freeze is None:
        frozen = {n.inputs[0].name for n in graph.nodes if n.op_type == "Gather" and not n.domain and n.inputs[0] is not None}
    else:
        frozen = set(freeze)
        unknown = sorted(frozen - set(constants))
        if unknown:
            raise RecoveryError(f"recover: freeze names {_listed(unknown)}, which are not constants of graph '{graph.name}'")
    return [
        name for name, value in constants.items()
        if name not in frozen and value.dtype in TRAINABLE_DTYPES and value.const is not None and value.const.size > 1 and value.uses()
    ]


def matched_hidden_values(student: Graph, teacher: Graph) -> list[str]:
    """Names of the student's normalization outputs (not graph outputs) that the teacher
    computes too, with the same type, in student graph order."""
    theirs = {v.name: v for v in teacher.values() if v.producer is not None}
    names = []
    for node in student.nodes:
        if (node.domain, node.op_type) not in NORM_OPS:
            continue
        value = node.outputs[0]
        other = theirs.get(value.name)
        if other is not None and other.type == value.type and not value.is_graph_output and value.dtype in TRAINABLE_DTYPES:
            names.append(value.name)
    return names


def _check_arguments(student: Graph, teacher: Graph, steps: int, batch_size: int, lr: float) -> None:
    mine, theirs = [v.name for v in student.inputs], [v.name for v in teacher.inputs]
    if mine != theirs:
        raise RecoveryError(
            f"recover: the compressed graph's inputs ({', '.join(mine)}) differ from the original's ({', '.join(theirs)}); "
            "pass the original model the compressed one was made from"
        )
    if len(student.outputs) != len(teacher.outputs):
        raise RecoveryError(
            f"recover: the compressed graph has {len(student.outputs)} outputs, the original {len(teacher.outputs)}; "
            "pass the original model the compressed one was made from"
        )
    if steps < 1:
        raise RecoveryError(f"recover: steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise RecoveryError(f"recover: batch_size must be at least 1, got {batch_size}")
    if not lr > 0:
        raise RecoveryError(f"recover: lr must be positive, got {lr}")


def _samples(graph: Graph, data: Any) -> list[dict[str, np.ndarray]]:
    from graphopt.calibration import CalibrationError, load_npz, normalize_calibration

    try:
        return normalize_calibration(graph, load_npz(data) if isinstance(data, (str, os.PathLike)) else data)
    except CalibrationError as exc:
        raise RecoveryError(f"recover: training data: {exc}") from None


def _lower(graph: Graph, hidden: Sequence[str], trainable: Collection[str], role: str) -> Any:
    """`graph` as a torch module returning its outputs then the `hidden` values."""
    from graphopt.exporters.fx_export import to_fx

    copy = graph.clone()
    if hidden:
        values = {v.name: v for v in copy.values()}
        copy.set_outputs([*copy.outputs, *(values[name] for name in hidden)])
    try:
        return to_fx(copy, trainable=trainable)
    except UnsupportedOpError as exc:
        raise UnsupportedOpError(f"recover: the {role} graph cannot be trained in torch: {exc}") from None


class _Distillation:
    """The distillation loss of the student against the teacher on chosen samples."""

    def __init__(self, student: Any, teacher: Any, graph: Graph, hidden: Sequence[str], samples: Sequence[dict[str, np.ndarray]]) -> None:
        self.student, self.teacher, self.samples = student, teacher, samples
        self.names = [v.name for v in graph.inputs]
        self.outputs = [i for i, v in enumerate(graph.outputs) if v.dtype in TRAINABLE_DTYPES]
        self.hidden = list(range(len(graph.outputs), len(graph.outputs) + len(hidden)))
        if not self.outputs and not self.hidden:
            raise RecoveryError(f"recover: graph '{graph.name}' has no float outputs or matched hidden values to learn from")
        self.batchable = all(v.shape and not isinstance(v.shape[0], int) for v in graph.inputs)

    def accumulate(self, indices: Sequence[int]) -> float:
        """Backpropagate the mean loss over the samples `indices`; returns it."""
        total = 0.0
        for group in self._groups(indices):
            loss = self._loss(group) * (len(group) / len(indices))
            loss.backward()
            total += float(loss.detach())
        return total

    def over_all(self, batch_size: int) -> float:
        """The mean loss over every sample, without gradients."""
        import torch

        indices = range(len(self.samples))
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(self.samples), batch_size):
                chunk = indices[start:start + batch_size]
                total += sum(float(self._loss(group)) * len(group) for group in self._groups(chunk))
        return total / len(self.samples)

    def _groups(self, indices: Sequence[int]) -> list[list[int]]:
        if not self.batchable:
            return [[i] for i in indices]
        groups: dict[tuple, list[int]] = {}
        for index in indices:
            groups.setdefault(tuple(a.shape for a in self.samples[index].values()), []).append(index)
        return list(groups.values())

    def _loss(self, group: Sequence[int]) -> Any:
        import torch

        feeds = [torch.from_numpy(np.concatenate([self.samples[i][name] for i in group])) for name in self.names]
        with torch.no_grad():
            expected = self.teacher(*feeds)
        got = self.student(*feeds)
        terms = [_relative_error(got[i], expected[i]) for i in self.outputs]
        loss = torch.stack(terms).mean() if terms else 0.0
        if self.hidden:
            loss = loss + torch.stack([_relative_error(got[i], expected[i]) for i in self.hidden]).mean()
        return loss


def _relative_error(got: Any, expected: Any) -> Any:
    if got.shape != expected.shape:
        raise RecoveryError(
            f"recover: an output of the compressed graph has shape {list(got.shape)}, the original's {list(expected.shape)}"
        )
    return (got - expected).pow(2).mean() / expected.pow(2).mean().clamp_min(1e-12)


class _Batches:
    """Sample indices, `size` at a time, reshuffled from `seed` on every pass over the data."""

    def __init__(self, count: int, size: int, seed: int) -> None:
        self.count, self.size = count, size
        self.rng = np.random.default_rng(seed)
        self.pending: list[int] = []

    def next(self) -> list[int]:
        picked: list[int] = []
        while len(picked) < min(self.size, self.count):
            if not self.pending:
                self.pending = [int(i) for i in self.rng.permutation(self.count)]
            picked.append(self.pending.pop())
        return picked


class _ProgressLine:
    """The step and smoothed loss on stderr: one line rewritten in place on a terminal,
    else a line every tenth of the steps."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.started = time.perf_counter()
        self.smoothed = math.nan

    def update(self, step: int, loss: float) -> None:
        self.smoothed = loss if math.isnan(self.smoothed) else 0.9 * self.smoothed + 0.1 * loss
        if not self.enabled:
            return
        stream = sys.stderr
        line = f"recover: step {step}/{self.total} loss {self.smoothed:.4g} ({time.perf_counter() - self.started:.0f} s)"
        if stream.isatty():
            stream.write(f"\r{line}" + ("\n" if step == self.total else ""))
        elif step == self.total or step % max(1, self.total // 10) == 0:
            stream.write(line + "\n")
        stream.flush()


def _listed(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
