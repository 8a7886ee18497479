"""Run a graph partly in a target and partly in torch: `compile_partitioned(graph, target)`.

When a target cannot run some nodes (`target.unsupported_nodes(graph)`), the graph is split
into regions, each a subgraph run either by the target (`target.compile(region)`) or by
torch (`to_fx(region)`, which runs every IR op), and the regions run one after the other,
passing tensors between them by value name.

How regions are formed (`split`): nodes are scheduled in a topological order that takes,
from the nodes whose producers have all run, every node of the current side (target or
torch) before switching to the other side; a region is a maximal run of one side in that
order. Both starting sides are tried and the order with fewer regions is kept. Guarantees:

- regions never form a cycle: each region reads only graph inputs, constants and outputs
  of earlier regions, so running them in order is always valid;
- a region is closed only when every node of its side not yet placed depends on a node of
  the other side not yet placed (it cannot grow without breaking the first guarantee in
  this order; it is not a global minimum of the region count);
- target regions that do no real work (only constants, shape reads, views and shape
  arithmetic on small integer tensors) are moved to torch, and regions nothing reads are
  dropped.

Region subgraphs share the original constants (no weight is copied) and keep every value
and node name; their inputs are the values they read from outside, their outputs the
values later regions or the graph's outputs read.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph, Node, Value
from graphopt.target_base import CompiledModel, IOSpec, Target, TargetError

_BOOKKEEPING_OPS = frozenset({"Constant", "Shape", "Size", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
"""Standard ONNX ops that do no real work in a region of their own (views and shape reads)."""


class PartitionError(GraphoptError):
    """A graph cannot be split between a target and torch."""


@dataclasses.dataclass
class Region:
    """One piece of a partitioned graph: a subgraph run by the target or by torch."""

    on_target: bool
    graph: Graph

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.outputs]


@dataclasses.dataclass(frozen=True)
class PartitionReport:
    """What went where: regions and nodes per side, the ops the target cannot run, and every
    op that runs in torch (those plus the trivial pieces moved there), as op -> count."""

    target: str
    target_regions: int
    torch_regions: int
    target_nodes: int
    torch_nodes: int
    unsupported_ops: dict[str, int]
    torch_ops: dict[str, int]

    def summary(self) -> str:
        """One line: what the target cannot run and how the graph was split."""
        unsupported = sum(self.unsupported_ops.values())
        return (
            f"{self.target} cannot run {unsupported} node(s) (op {', '.join(self.unsupported_ops)}); they run in torch "
            f"({self.torch_regions} torch region(s), {self.torch_nodes} node(s); "
            f"{self.target_regions} {self.target} region(s), {self.target_nodes} node(s))"
        )


def split(graph: Graph, unsupported: Iterable[Node]) -> list[Region]:
    """Regions of `graph` in run order; the `unsupported` nodes (of `graph`) go to torch.

    Needs a graph in a valid execution order; does not change it (see the module docstring
    for what the regions guarantee).
    """
    on_target = {id(n): True for n in graph.nodes}
    for node in unsupported:
        on_target[id(node)] = False
    while True:
        runs = min((_schedule(graph.nodes, on_target, first) for first in (True, False)), key=len)
        trivial = [run for side, run in runs if side and all(_is_bookkeeping(n) for n in run)]
        if not trivial:
            break
        for run in trivial:
            on_target.update((id(n), False) for n in run)
    return _regions(graph, runs)


def compile_for_target(graph: Graph, target: Target, *, partition: bool) -> CompiledModel:
    """`target.compile(graph)` when the target runs every node. Otherwise, with `partition`,
    a `PartitionedModel` running those nodes in torch; without, UnsupportedOpError naming them."""
    from graphopt.api import check_supported

    unsupported = target.unsupported_nodes(graph)
    if unsupported and partition:
        return compile_partitioned(graph, target, unsupported)
    if unsupported:
        check_supported(target, graph)
    return target.compile(graph)


def compile_partitioned(graph: Graph, target: Target, unsupported: Optional[Sequence[Node]] = None) -> "PartitionedModel":
    """Compile the regions of `graph` the target can run with `target`, the rest with torch.

    `unsupported`: the nodes the target cannot run (default: `target.unsupported_nodes(graph)`).
    PartitionError if the target names nodes that are not in `graph`. The result is a
    `CompiledModel` (torch tensors or numpy arrays in, the same kind out) with a `report`.
    """
    reported = target.unsupported_nodes(graph) if unsupported is None else list(unsupported)
    nodes = _resolve(graph, reported, target)
    regions = split(graph, nodes)
    return PartitionedModel(target, graph, regions, unsupported_ops=_op_counts(nodes))


class PartitionedModel(CompiledModel):
    """The regions of a split graph, run in order: the target's compiled models for its
    regions, torch.fx modules for the others. Cannot be saved."""

    def __init__(self, target: Target, graph: Graph, regions: Sequence[Region], *, unsupported_ops: dict[str, int]) -> None:
        super().__init__(target, [IOSpec.of(v) for v in graph.inputs], [IOSpec.of(v) for v in graph.outputs])
        self.regions = list(regions)
        self.runners = [target.compile(r.graph) if r.on_target else _TorchRegion(r.graph) for r in self.regions]
        self.constant_outputs = {v.name: v.const for v in graph.outputs if v.const is not None}
        sides = [[r for r in self.regions if r.on_target == side] for side in (True, False)]
        self.report = PartitionReport(
            target=target.name,
            target_regions=len(sides[0]),
            torch_regions=len(sides[1]),
            target_nodes=sum(len(r.graph) for r in sides[0]),
            torch_nodes=sum(len(r.graph) for r in sides[1]),
            unsupported_ops=unsupported_ops,
            torch_ops=_op_counts(n for r in sides[1] for n in r.graph.nodes),
        )

    def _call(self, feeds: dict[str, Any]) -> list[Any]:
        import torch

        as_numpy = not any(isinstance(v, torch.Tensor) for v in feeds.values())
        env = {name: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for name, v in feeds.items()}
        env.update((name, torch.as_tensor(np.array(const.numpy()))) for name, const in self.constant_outputs.items())
        with torch.no_grad():
            for region, runner in zip(self.regions, self.runners):
                results = runner(*[env[name] for name in region.input_names])
                env.update((name, torch.as_tensor(r)) for name, r in zip(region.output_names, results))
        outputs = [env[name] for name in self.output_names]
        return [o.detach().cpu().numpy() for o in outputs] if as_numpy else outputs

    def _save_files(self, directory: str) -> list[str]:
        raise TargetError(
            f"a model split between {self.target.name} and torch cannot be saved "
            f"({self.report.torch_nodes} node(s) run in torch); use target 'torch' for a model that can be saved"
        )


class _TorchRegion:
    """A region's torch.fx module, moved to the device of the tensors it is called with."""

    def __init__(self, graph: Graph) -> None:
        self.module = graph.to_fx()
        self.device: Any = None

    def __call__(self, *args: Any) -> Sequence[Any]:
        device = args[0].device if args else None
        if device is not None and device != self.device:
            self.module.to(device)
            self.device = device
        return self.module(*args)


def _resolve(graph: Graph, reported: Sequence[Node], target: Target) -> list[Node]:
    """The nodes of `graph` the target reported (by identity, else by name)."""
    by_name = {n.name: n for n in graph.nodes}
    own = {id(n) for n in graph.nodes}
    resolved = [n if id(n) in own else by_name.get(n.name) for n in reported]
    foreign = [n.label for n, found in zip(reported, resolved) if found is None]
    if foreign:
        raise PartitionError(
            f"target '{target.spec}' names node(s) that are not in the graph ({', '.join(foreign[:5])}; nodes of a "
            "lowered copy?), so the graph cannot be split between it and torch; use target 'torch' for this graph"
        )
    return resolved  # type: ignore[return-value]


def _schedule(nodes: Sequence[Node], on_target: dict[int, bool], first: bool) -> list[tuple[bool, list[Node]]]:
    """Runs of one side each, in a topological order that exhausts one side before switching."""
    index = {id(n): i for i, n in enumerate(nodes)}
    waiting: list[int] = []
    readers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        producers = {index[id(v.producer)] for v in node.reads if id(v.producer) in index}
        waiting.append(len(producers))
        for p in producers:
            readers[p].append(i)
    ready: dict[bool, list[int]] = {True: [], False: []}
    for i, node in enumerate(nodes):
        if not waiting[i]:
            ready[on_target[id(node)]].append(i)
    runs: list[tuple[bool, list[Node]]] = []
    side = first if ready[first] else not first
    while ready[side]:
        run: list[Node] = []
        heapq.heapify(ready[side])
        while ready[side]:
            i = heapq.heappop(ready[side])
            run.append(nodes[i])
            for r in readers[i]:
                waiting[r] -= 1
                if not waiting[r]:
                    heapq.heappush(ready[on_target[id(nodes[r])]], r)
        runs.append((side, run))
        side = not side
    return runs


def _is_bookkeeping(node: Node) -> bool:
    """No real work: a constant, a shape read or view, or arithmetic on small int tensors."""
    if node.domain == "" and node.op_type in _BOOKKEEPING_OPS:
        return True
    return bool(node.outputs) and all(out.symbolic is not None for out in node.outputs)


def _regions(graph: Graph, runs: Sequence[tuple[bool, list[Node]]]) -> list[Region]:
    """One subgraph per run that something reads, with its boundary values as inputs/outputs."""
    run_of = {id(n): k for k, (_, run) in enumerate(runs) for n in run}
    graph_outputs = {id(v) for v in graph.outputs}
    regions = []
    for k, (side, run) in enumerate(runs):
        outputs = [
            out for node in run for out in node.outputs
            if id(out) in graph_outputs or any(run_of[id(use.node)] != k for use in out.uses())
        ]
        if outputs:
            regions.append(Region(side, subgraph(graph, run, outputs, name=f"{graph.name}_region{len(regions)}")))
    return regions


def subgraph(graph: Graph, nodes: Sequence[Node], outputs: Sequence[Value], *, name: str) -> Graph:
    """A new graph running `nodes` (in this order, all of `graph`) and returning `outputs`.

    Values the nodes read that they do not produce become inputs (constants stay constants,
    sharing their tensors); names and types are kept. `graph` is not changed.
    """
    part = Graph(name, graph.opset_imports)
    mapping: dict[int, Value] = {}

    def local(value: Optional[Value]) -> Optional[Value]:
        if value is None:
            return None
        if id(value) not in mapping:
            if value.const is not None:
                mapping[id(value)] = part.add_constant(value.name, value.const)
            else:
                mapping[id(value)] = part.add_input(value.name, value.type)
                mapping[id(value)].symbolic = value.symbolic
        return mapping[id(value)]

    for node in nodes:
        copy = part.add_node(
            node.op_type, [local(v) for v in node.inputs], node.attrs, domain=node.domain,
            output_names=[o.name for o in node.outputs], name=node.name, infer=False, origin=node.origin,
            captures=[(n, local(v)) for n, v in zip(node.capture_names, node.captures)],
        )
        for old, new in zip(node.outputs, copy.outputs):
            new.type, new.symbolic = old.type, old.symbolic
            mapping[id(old)] = new
    part.set_outputs(mapping[id(v)] for v in outputs)
    return part


def _op_counts(nodes: Iterable[Node]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.qualified_op] = counts.get(node.qualified_op, 0) + 1
    return dict(sorted(counts.items()))
