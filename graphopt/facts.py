"""Pass ordering facts: what a pass `requires`, `provides` and `invalidates`, checked before anything runs.

A fact is a name for something true of the graph that some pass relies on. A pass that
`requires` a fact must run where it holds: after a pass that `provides` it, or, for the
facts an imported graph starts with (`INITIAL_FACTS`), before any pass that `invalidates`
it. `check_facts` walks a list of passes once and raises `PipelineError` at the first pass
whose fact does not hold there; both the pipeline builder (`graphopt.pipeline.check_order`)
and a nested `Pipeline` use it.

The initial facts:
- ``constant-float-weights``: the matmul weights are constants of a float type numpy reads
  (float32 or float16), the form the weight-editing passes (quantize, smooth-quant,
  prune-heads, prune-ffn, low-rank) find them in; quantize (int8 weights behind
  DequantizeLinear) and to-bf16 (bfloat16 weights) remove it;
- ``float32-weights``: those weights are float32 (to-fp16 and to-bf16 remove it); quantize
  and smooth-quant need it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Sequence

from graphopt.pass_base import PipelineError

if TYPE_CHECKING:
    from graphopt.pass_base import Pass

INITIAL_FACTS: tuple[str, ...] = ("constant-float-weights", "float32-weights")
"""Facts every pipeline run starts with (an imported graph holds them)."""


@dataclasses.dataclass(frozen=True)
class FactFlow:
    """What a list of passes does to the facts, seen from outside it."""

    requires: tuple[str, ...]
    """Facts it needs from before it (none of its passes provides them first)."""
    provides: tuple[str, ...]
    """Facts it leaves holding that its passes provided."""
    invalidates: tuple[str, ...]
    """Facts it leaves removed."""


def check_facts(passes: Sequence["Pass"], *, given: Optional[Sequence[str]] = INITIAL_FACTS, pipeline: Optional[str] = None) -> FactFlow:
    """Check that each pass's `requires` holds where it runs; return the passes' `FactFlow`.

    `given`: the facts holding before the first pass (`INITIAL_FACTS` for a whole
    pipeline); None inside a nested pipeline, where a fact none of its passes provides
    becomes the pipeline's own requirement (the outer check decides). `pipeline`: the name
    of the nested pipeline, for the error text ("step" instead of "position").
    """
    where, step = (f"inside pipeline '{pipeline}': ", "step") if pipeline else ("", "position")
    holding: set[str] = set(given or ())
    provided: set[str] = set()
    removed: dict[str, tuple[str, int]] = {}
    outer: list[str] = []
    for index, item in enumerate(passes, start=1):
        for fact in item.requires:
            if fact in holding:
                continue
            if fact in removed:
                by, at = removed[fact]
                hint = f"run '{item.name}' once" if by == item.name else f"move '{item.name}' before it"
                raise PipelineError(
                    f"{where}pass '{item.name}' ({step} {index}) needs '{fact}', which '{by}' ({step} {at}) removed; {hint}"
                )
            if fact in outer:
                continue
            later = [p.name for p in passes[index:] if fact in p.provides]
            if given is None and not later:
                outer.append(fact)
                continue
            if given is None:
                raise PipelineError(
                    f"{where}pass '{item.name}' ({step} {index}) needs '{fact}', which '{later[0]}' provides only after it; "
                    f"move '{later[0]}' before it"
                )
            hint = f"; move '{later[0]}' before it" if later else "; add a pass that provides it earlier"
            raise PipelineError(f"{where}pass '{item.name}' ({step} {index}) needs '{fact}', which no earlier pass provides{hint}")
        for fact in item.invalidates:
            holding.discard(fact)
            provided.discard(fact)
            removed[fact] = (item.name, index)
        for fact in item.provides:
            holding.add(fact)
            provided.add(fact)
            removed.pop(fact, None)
    return FactFlow(tuple(outer), tuple(sorted(provided)), tuple(sorted(removed)))
