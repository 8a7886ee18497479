"""fuse: every fusion, in the order that lets each one see the canonical form it needs."""

from __future__ import annotations

import dataclasses
from typing import Any

from graphopt.pass_base import Pass, PassResult
from graphopt.pass_manager import Pipeline
from graphopt.registry import register_pass


@register_pass
@dataclasses.dataclass
class Fuse(Pipeline):
    """Run cleanup, every fusion (norms, GELU, rotary, attention, bias-GELU, skip-norm, QKV, Gemm), then cleanup again.

    A pipeline. Cleanup (no same-type Casts, folded shape arithmetic) and canonicalize
    (constants second, constant Mul/Div chains folded) first put the graph in the canonical
    form the fusion patterns assume. The norm, GELU and rotary fusions come before
    fuse-attention (whose Q and K are then RotaryEmbedding outputs), fuse-bias-gelu and fuse-skip-layernorm after the ops they extend exist,
    and fuse-qkv after fuse-attention, whose patterns follow each projection on its own.
    Cleanup last removes what the fusions left dead. Needs nothing; provides what its
    fusions provide ("attention-fused", ...). Stats: what each fusion raised.
    """

    name = "fuse"
    steps = (
        "cleanup", "canonicalize", "fuse-layernorm", "fuse-gelu", "fuse-rmsnorm", "fuse-rotary", "fuse-attention",
        "fuse-bias-gelu", "fuse-skip-layernorm", "fuse-qkv", "fuse-matmul-add", "cleanup",
    )

    def summarize(self, results: list[tuple[Pass, PassResult]]) -> dict[str, Any]:
        """{fusion name: nodes it fused} (cleanup's and canonicalize's stats are left out)."""
        stats: dict[str, Any] = {}
        for item, result in results:
            if item.name not in ("cleanup", "canonicalize"):
                stats[item.name] = stats.get(item.name, 0) + result.stats.get("fused", 0)
        return stats
