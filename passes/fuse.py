"""fuse: every fusion, in the order that lets each one see the canonical form it needs."""

from __future__ import annotations

import dataclasses

from graphopt.ir.graph import Graph
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import get_pass, register_pass

FUSION_ORDER = (
    "cleanup", "fuse-layernorm", "fuse-gelu", "fuse-rmsnorm", "fuse-attention",
    "fuse-bias-gelu", "fuse-skip-layernorm", "fuse-qkv", "fuse-matmul-add", "cleanup",
)


@register_pass
@dataclasses.dataclass
class Fuse(Pass):
    """Run cleanup, every fusion (norms, GELU, attention, bias-GELU, skip-norm, QKV, Gemm), then cleanup again.

    Cleanup first puts the graph in canonical form (no same-type Casts, folded shape
    arithmetic), which the fusion patterns assume. The norm and GELU fusions come before
    fuse-attention, fuse-bias-gelu and fuse-skip-layernorm after the ops they extend exist,
    and fuse-qkv after fuse-attention, whose patterns follow each projection on its own.
    Cleanup last removes what the fusions left dead. Needs nothing; provides
    "attention-fused". Stats: what each fusion raised.
    """

    name = "fuse"
    provides = ("attention-fused",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        changed = False
        stats: dict[str, object] = {}
        for step in FUSION_ORDER:
            result = get_pass(step)().run(graph, ctx)
            changed |= result.changed
            if step != "cleanup":
                stats[step] = result.stats.get("fused", 0)
        return PassResult(changed, stats)
