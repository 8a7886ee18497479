"""`drop-padding`: run an encoder on the attended prefix of a right-padded batch.

A batch padded to a fixed length (`padding="max_length"`) spends most of its work on padding:
one 9-token sentence padded to 128 runs every matmul over 128 rows. Where every row's padding
is on the right, the positions after the last one any row attends change nothing at the
positions before it: an attention mask keeps them out of every attention, and everything
else works position by position. This pass makes the graph compute only that prefix:

- at the start, `kept` = 1 + the last position the attention mask marks in any row (at least 1);
- every input with the mask's sequence axis (input_ids, attention_mask, token_type_ids,
  position_ids) is sliced to its first `kept` positions;
- every output with that axis is multiplied by the mask (padded positions become exact
  zeros) and padded back with zeros to the input's length, under its own name.

Attended positions keep their values exactly (the same computation, fewer rows); padded
positions come out as zeros where the model computed numbers no one reads (Hugging Face's
hidden states at padding, mean pooling masks them out). Left-padded batches run whole. Like
ONNX Runtime's RemovePadding / RestorePadding (GPU BERT) and FasterTransformer's
`remove_padding`, with one prefix per batch instead of packed rows.

Needs: a graph input `mask` (default `attention_mask`) of rank 2 whose axis 1 is a symbolic
dim; that symbol at axis 1 only, in every input and output that has it (an encoder: a KV
cache's `past + seq` mask is refused); opset 11 or newer. Before changing anything the pass
runs the graph both ways on a small right-padded sample (ONNX Runtime) and refuses when an
attended position changes, so a graph that mixes positions outside masked attention (a pooler
over all positions, a convolution) is never trimmed. Place it before `quantize{mode=dynamic}`,
whose per-tensor scales would otherwise see fewer rows than on the untrimmed sample.
Changes: the nodes above; value types say the kept length (a fresh symbol) where they said the
sequence length. Lossy at padded positions only.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node, Value
from graphopt.ir.symbolic import dim_symbols
from graphopt.ir.types import TensorType, format_shape
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass

PROBE_LENGTH = 8
"""The sample's sequence length; its rows attend 5, 4, 3, ... positions."""

NODE_PREFIX = "drop_padding"
"""Name prefix of the nodes this pass adds (a second run finds them and changes nothing)."""


class DropPaddingError(GraphoptError):
    """The graph is not one whose padding can be left out; the message says what is in the way."""


@dataclasses.dataclass(frozen=True)
class _Plan:
    mask: Value
    seq: str
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]


@register_pass
@dataclasses.dataclass
class DropPadding(Pass):
    """Compute an encoder only on the positions up to the last attended one; padded positions output zeros.

    See `graphopt.passes.drop_padding`. Needs a rank-2 attention-mask input whose axis 1 is a
    symbolic sequence length, and that length at axis 1 only in the graph's inputs and outputs;
    checks on a right-padded sample (ONNX Runtime) that attended positions keep their values.
    Changes: slices the sequence inputs, masks and re-pads the sequence outputs. Lossy at
    padded positions only (they become zeros).
    """

    name = "drop-padding"
    lossless = False
    mask: str = "attention_mask"
    """The graph input holding the attention mask (1 or True: attended)."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        plan = self._plan(graph)
        if any(node.name.startswith(NODE_PREFIX) for node in plan.mask.users()):
            return PassResult(False, {"inputs": 0, "outputs": 0})
        probe = graph.clone()
        _drop(probe, _plan_in(probe, plan))
        _check_attended_positions(graph, probe, plan, ctx.seed)
        _drop(graph, plan)
        return PassResult(True, {"inputs": len(plan.inputs), "outputs": len(plan.outputs)})

    def _plan(self, graph: Graph) -> _Plan:
        where = f"pass '{self.name}'"
        mask = next((v for v in graph.inputs if v.name == self.mask), None)
        if mask is None:
            names = ", ".join(v.name for v in graph.inputs) or "none"
            raise DropPaddingError(f"{where}: the graph has no input '{self.mask}' (its inputs: {names}); name the attention mask with mask=<input>")
        if mask.shape is None or len(mask.shape) != 2 or not isinstance(mask.shape[1], str) or dim_symbols(mask.shape[1]) != (mask.shape[1],):
            raise DropPaddingError(
                f"{where}: input '{mask.name}' has shape {'unknown' if mask.shape is None else format_shape(mask.shape)}; it needs [batch, seq] with a symbolic "
                "sequence length of its own (a static length or a KV cache's 'past + seq' cannot be trimmed)"
            )
        if graph.opset() < 11:
            raise DropPaddingError(f"{where}: the graph's opset is {graph.opset()}; it needs 11 or newer (Range, Pad)")
        seq = mask.shape[1]
        for value in graph.inputs:
            other = value.shape[1] if value.shape is not None and len(value.shape) >= 2 else None
            if isinstance(other, str) and other != seq:
                raise DropPaddingError(
                    f"{where}: input '{value.name}' has length '{other}' at axis 1 where '{mask.name}' has '{seq}': "
                    "another length (a KV-cache decoder's, where the mask also covers the cached positions, or a second sequence's) "
                    "cannot be trimmed by this mask"
                )
        inputs = tuple(v for v in graph.inputs if _has_axis(v, seq, "input", where))
        outputs = tuple(v for v in graph.outputs if _has_axis(v, seq, "output", where))
        for value in outputs:
            if value.producer is None:
                raise DropPaddingError(f"{where}: output '{value.name}' is a graph input or constant, not computed from the trimmed inputs")
            if value.dtype is None:
                raise DropPaddingError(f"{where}: output '{value.name}' has no known element type, so its padded positions cannot be zeroed")
        return _Plan(mask, seq, inputs, outputs)


def _has_axis(value: Value, seq: str, kind: str, where: str) -> bool:
    """Whether `value` has the sequence axis (at axis 1); DropPaddingError when it has it elsewhere or its shape is unknown."""
    if value.shape is None:
        raise DropPaddingError(f"{where}: {kind} '{value.name}' has no known shape, so whether it has the sequence axis '{seq}' is unknown")
    axes = [axis for axis, dim in enumerate(value.shape) if isinstance(dim, str) and seq in dim_symbols(dim)]
    if not axes:
        return False
    if axes != [1] or value.shape[1] != seq:
        raise DropPaddingError(
            f"{where}: {kind} '{value.name}' has shape {format_shape(value.shape)}; the sequence length '{seq}' may only be its axis 1 "
            "(an encoder's [batch, seq, ...])"
        )
    return True


def _plan_in(copy: Graph, plan: _Plan) -> _Plan:
    """`plan` with the same-named values of `copy` (a clone of the planned graph)."""
    inputs = {v.name: v for v in copy.inputs}
    outputs = {v.name: v for v in copy.outputs}
    return _Plan(inputs[plan.mask.name], plan.seq, tuple(inputs[v.name] for v in plan.inputs), tuple(outputs[v.name] for v in plan.outputs))


def _drop(graph: Graph, plan: _Plan) -> None:
    kept_symbol = _fresh_symbol(graph, f"{plan.seq}_kept")
    _rename_symbol(graph, plan.seq, kept_symbol)
    first = graph.nodes[0] if graph.nodes else None

    def add(op: str, inputs: list, attrs: Optional[dict] = None) -> Value:
        return graph.add_node(op, inputs, attrs, name=f"{NODE_PREFIX}_{op}", before=first).output

    def constant(name: str, data: np.ndarray) -> Value:
        return graph.add_constant(graph.unique_name(f"{NODE_PREFIX}_{name}"), data)

    one = constant("one", np.array(1, dtype=np.int64))
    ones = constant("one_1d", np.array([1], dtype=np.int64))
    flags = add("Cast", [plan.mask], {"to": DType.BOOL.value})
    length = add("Gather", [add("Shape", [plan.mask]), one], {"axis": 0})
    positions = add("Range", [one, add("Add", [length, one]), one])
    last = add("ReduceMax", [add("Mul", [add("Cast", [flags], {"to": DType.INT64.value}), positions])], {"keepdims": 0})
    kept = add("Max", [add("Reshape", [last, ones]), ones])
    starts = constant("zero_1d", np.array([0], dtype=np.int64))

    def trimmed(value: Value) -> Value:
        out = add("Slice", [value, starts, kept, ones])
        out.type = TensorType(value.dtype, tuple(kept_symbol if axis == 1 else dim for axis, dim in enumerate(value.shape)))
        return out

    kept_flags = trimmed(flags)
    for value in plan.inputs:
        sliced = trimmed(value)
        for use in value.uses():
            if not use.node.name.startswith(NODE_PREFIX):
                use.node.replace_input(use.index, sliced)
    padding = add("Sub", [add("Reshape", [length, ones]), kept])
    outputs = []
    for value in graph.outputs:
        if not any(value is out for out in plan.outputs):
            outputs.append(value)
            continue
        rank = len(value.shape)
        keep = graph.add_node("Cast", [kept_flags], {"to": value.dtype.value}, name=f"{NODE_PREFIX}_Cast").output
        keep = graph.add_node("Reshape", [keep, constant("keep_shape", np.array([0, 0] + [1] * (rank - 2), dtype=np.int64))], name=f"{NODE_PREFIX}_Reshape").output
        masked = graph.add_node("Mul", [value, keep], name=f"{NODE_PREFIX}_Mul").output
        pads = graph.add_node("Concat", [
            constant("pads_before", np.zeros(rank + 1, dtype=np.int64)), padding, constant("pads_after", np.zeros(rank - 2, dtype=np.int64)),
        ], {"axis": 0}, name=f"{NODE_PREFIX}_Concat").output
        padded = graph.add_node("Pad", [masked, pads], name=f"{NODE_PREFIX}_Pad").output
        name, shape = value.name, value.shape
        graph.rename_value(value, graph.unique_name(f"{name}_kept"))
        graph.rename_value(padded, name)
        padded.type = TensorType(value.dtype, tuple(plan.seq if axis == 1 else dim for axis, dim in enumerate(shape)))
        outputs.append(padded)
    graph.set_outputs(outputs)


def _fresh_symbol(graph: Graph, base: str) -> str:
    taken = {symbol for value in graph.values() if value.shape is not None for dim in value.shape for symbol in dim_symbols(dim)}
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}{suffix}"
    return name


def _rename_symbol(graph: Graph, seq: str, kept: str) -> None:
    """Every value downstream of the trimmed inputs has `kept` where it had `seq`; a dim that
    is an expression of `seq` becomes unknown (graph inputs keep their types)."""
    def renamed(dim: object) -> object:
        if dim == seq:
            return kept
        return None if isinstance(dim, str) and seq in dim_symbols(dim) else dim

    inputs = set(map(id, graph.inputs))
    for value in graph.values():
        if id(value) in inputs:
            continue
        if value.shape is not None and any(isinstance(d, str) and seq in dim_symbols(d) for d in value.shape):
            value.type = TensorType(value.dtype, tuple(renamed(d) for d in value.shape))
        if value.symbolic is not None:
            value.symbolic = tuple(renamed(d) for d in value.symbolic)


def _check_attended_positions(graph: Graph, trimmed: Graph, plan: _Plan, seed: int) -> None:
    """Run both graphs on a right-padded sample; DropPaddingError when an attended position of an
    output differs or a padded one is not zero."""
    from graphopt.check import run_graph, sample_inputs

    feeds = sample_inputs(graph, seed=seed, sizes={plan.seq: PROBE_LENGTH})
    batch = feeds[plan.mask.name].shape[0]
    lengths = [max(1, PROBE_LENGTH - 3 - row) for row in range(batch)]
    attended = np.arange(PROBE_LENGTH)[None, :] < np.array(lengths)[:, None]
    feeds[plan.mask.name] = attended.astype(feeds[plan.mask.name].dtype)
    try:
        expected = run_graph(graph, feeds)
        actual = run_graph(trimmed, feeds)
    except GraphoptError as exc:
        raise DropPaddingError(f"pass 'drop-padding': could not run the graph on a padded sample to check it: {exc}") from None
    names = [v.name for v in graph.outputs]
    planned = {v.name for v in plan.outputs}
    for name, want, got in zip(names, expected, actual):
        if name not in planned:
            if not np.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True):
                raise DropPaddingError(f"pass 'drop-padding': output '{name}' changes when the padding is left out, so the graph reads padded positions outside masked attention")
            continue
        want, got = np.asarray(want), np.asarray(got)
        scale = 1e-4 * (1.0 + float(np.max(np.abs(want[attended])))) if want[attended].size else 0.0
        if not np.allclose(got[attended], want[attended], rtol=1e-4, atol=scale, equal_nan=True):
            worst = float(np.max(np.abs(got[attended].astype(np.float64) - want[attended])))
            raise DropPaddingError(
                f"pass 'drop-padding': output '{name}' changes at attended positions (by up to {worst:.3g}) when the padding is "
                "left out: the graph mixes positions outside masked attention (a pooler, a convolution, an unmasked attention)"
            )
        if np.any(got[~attended] != 0):
            raise DropPaddingError(f"pass 'drop-padding': output '{name}' is not zero at padded positions after the rewrite")
