"""shard: split a Transformer for one rank of a tensor-parallel group (Megatron-style), with collectives.

`shard{tp=N, rank=R}` turns the raised graph (after `fuse`) into what rank R of N computes; the N
rank graphs, run together with their collectives (`graphopt.distributed`), compute the
original outputs. The structure is the one the pruning passes find: attention layers by
`prune_heads.find_layers`, feed-forward blocks by `prune_ffn.find_blocks`, so shard splits
exactly the graphs they prune.

Rules, for rank R of N:
1. Attention (a `graphopt::Attention` with H query heads and Hkv KV heads; see
   `graphopt.passes.prune_heads`): rank R keeps query heads [R*H/N, (R+1)*H/N) and KV heads
   [R*Hkv/N, (R+1)*Hkv/N): with grouped-query attention those are exactly the KV heads its
   query heads read, so KV groups stay with their query heads. Q, K and V are column-parallel:
   the columns of those heads in each projection's weight and bias; a packed QKV weight
   (fuse-qkv's MatMul + Split) is sliced in one go and its Split sizes rewritten.
   `num_heads` / `num_kv_heads` are divided by N, and the head Reshape shape constants that
   spell out the head count or the merged width are rewritten (-1 and 0 entries need nothing).
   The output projection is row-parallel (the rows of those heads): its output is a partial sum,
   which `graphopt::AllReduce` sums over the ranks before anything reads it, so its bias (an Add,
   or a SkipLayerNorm's bias input) is added once, after the sum.
2. KV cache (Attention with past_key/past_value): the past inputs keep their full shape, so the
   model's interface does not change; a Slice takes the rank's KV heads, and the presents are
   gathered back along the head axis (`graphopt::AllGather`), so every rank returns them whole.
3. Feed-forward blocks (see `graphopt.passes.prune_ffn`): rank R keeps intermediate neurons
   [R*I/N, (R+1)*I/N): up and gate projections column-parallel (weight columns, bias entries,
   packed gate/up Split sizes, per-neuron constants such as graphopt::Gelu's bias), the down
   projection row-parallel followed by `graphopt::AllReduce`.
4. Vocabulary (`vocab=true`, the default): the LM head (a constant-weight MatMul, + bias,
   whose result is a graph output) is column-parallel over the vocabulary, its logits gathered
   back along the last axis (`graphopt::AllGather`); the token embedding (a Gather on axis 0
   of a constant float table whose indices are a graph input, e.g. input_ids) keeps rows
   [R*V/N, (R+1)*V/N): each rank looks up the ids in its range (the others read row 0 and are
   zeroed by a mask) and `graphopt::AllReduce` sums the rows. Negative ids wrap as Gather's do,
   and an id outside [-V, V) still fails the lookup (it is passed on out of every rank's range). A vocabulary that does not divide
   by N stays whole (stats `vocab_replicated`). Position and token-type tables (indices not
   from a graph input) stay whole.
5. Everything else is replicated on every rank: norms, position embeddings, and any attention
   layer whose structure is not recognized (listed in the stats under `replicated`, with a
   warning): computed whole on each rank, which is correct but saves no memory there.
6. First, GPT-2-style Conv1D projections, `Reshape(x, [-1, K]) -> Gemm(W, b) -> Reshape(back)`,
   are restated as `MatMul(x, W) + b` over x's leading axes (through a `Reshape(x, [0, .., K])`
   when x still has its head axes), the form the rules above find.

Refuses (ShardError naming the layer) when a layer's query heads, KV heads or a block's
neurons do not divide by N; nothing is changed then. N = 1 changes nothing.
Each rank's graph alone computes partial sums, not the model's outputs (so check mode cannot
compare it; the pass is marked lossy); the ranks together reproduce the outputs up to float
reassociation. Stats: tp, rank, layers and blocks split, float weight bytes before/after on
this rank, replicated layers, vocabulary-parallel heads and embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from graphopt.distributed import weight_bytes
from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph, Node, Value, constant_data
from graphopt.ir.ops.graphopt import has_kv_cache
from graphopt.ir.schema import GRAPHOPT_DOMAIN, get_schema
from graphopt.pass_base import Pass, PassContext, PassResult
from graphopt.registry import register_pass
from graphopt.passes._structured import find_columns, reinfer, replace_vector, slice_columns, slice_rows
from graphopt.passes.prune_ffn import _Block, find_blocks
from graphopt.passes.prune_heads import _Layer, _rewrite_shape, find_layers


class ShardError(GraphoptError):
    """A graph cannot be split as `shard` was asked (names the layer and the reason)."""


def shard_graph(graph: Graph, tp: int, rank: int) -> Graph:
    """What rank `rank` of `tp` computes: a copy of `graph` (weights shared until sliced) with
    the `shard` pass applied (see the module doc); `graph` is left as it was."""
    shard = graph.clone()
    Shard(tp=tp, rank=rank).run(shard, PassContext())
    return shard


@register_pass
@dataclasses.dataclass
class Shard(Pass):
    """Split attention heads and FFN neurons for one rank of a tensor-parallel group; add collectives.

    See `graphopt.passes.shard`. Needs raised `graphopt::Attention` ops (`fuse`) and float
    constant weights (run it before quantize and to-bf16). Changes weight shapes (this rank's
    slices only), num_heads/num_kv_heads, Reshape shape constants and Split sizes; adds
    graphopt::AllReduce after row-parallel projections and, with a KV cache, a Slice of the
    past and graphopt::AllGather of the presents; splits the token embedding and the LM head by
    vocabulary (`vocab`), with an AllReduce of the looked-up rows and an AllGather of the logits.
    `graphopt.distributed.compile_sharded` runs the ranks.
    """

    name = "shard"
    lossless = False
    requires = ("attention-fused", "constant-float-weights")
    tp: int = 2
    """Number of ranks (tensor-parallel degree)."""
    rank: int = 0
    """Which rank's part to keep, 0 <= rank < tp."""
    vocab: bool = True
    """Also split the LM head and the token embedding by vocabulary (rule 4 of the module doc)."""

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be at least 1, got {self.tp}")
        if not 0 <= self.rank < self.tp:
            raise ValueError(f"rank must be in [0, {self.tp}), got {self.rank}")

    def validate(self, graph: Graph) -> None:
        """Raise ShardError if `graph` cannot be split `tp` ways; `graph` is not changed."""
        if self.tp > 1:
            probe = graph.clone()
            _restate_flattened_gemms(probe)
            self._find(probe)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.tp == 1:
            return PassResult(False, {"tp": 1})
        if any(_flattened_gemm(node) for node in graph.nodes):
            self.validate(graph)  # refuse before restating anything
        restated = _restate_flattened_gemms(graph)
        layers, blocks, skipped = self._find(graph)
        before = weight_bytes(graph)
        for layer in layers:
            self._shard_attention(graph, layer)
        for block in blocks:
            self._shard_ffn(graph, block)
        heads, embeddings, vocab_whole = self._shard_vocabulary(graph) if self.vocab else (0, 0, [])
        if skipped:
            ctx.logger.warning(
                "shard: %d attention layer(s) stay whole on every rank (correct, but their weights are not split): %s",
                len(skipped), "; ".join(skipped))
        stats = {
            "tp": self.tp, "rank": self.rank, "attention_layers": len(layers), "ffn_blocks": len(blocks),
            "weight_bytes": f"{before} -> {weight_bytes(graph)}",
        }
        if heads or embeddings:
            stats["vocab_parallel"] = f"{heads} head(s), {embeddings} embedding(s)"
        if vocab_whole:
            stats["vocab_replicated"] = vocab_whole
        if restated:
            stats["gemms_restated"] = restated
        if skipped:
            stats["replicated"] = skipped
        return PassResult(bool(layers or blocks or restated or heads or embeddings), stats)

    def _find(self, graph: Graph) -> tuple[list[_Layer], list[_Block], list[str]]:
        """The attention layers and FFN blocks to split (ShardError if one does not divide)
        and the reasons attention layers are left whole."""
        layers, skipped = find_layers(graph)
        blocks = find_blocks(graph)
        for index, layer in enumerate(layers):
            if layer.heads % self.tp or layer.kv_heads % self.tp:
                grouped = f" (grouped-query attention keeps each KV head with its {layer.group} query heads)" if layer.group > 1 else ""
                raise ShardError(
                    f"pass 'shard': attention layer {index} ({layer.attention.label}) has {layer.heads} query heads and "
                    f"{layer.kv_heads} KV heads; tp={self.tp} must divide both{grouped}"
                )
            for reshape in (layer.q.reshape, layer.k.reshape, layer.v.reshape, layer.merge):
                if reshape.inputs[1] is None or constant_data(reshape.inputs[1]) is None:
                    raise ShardError(
                        f"pass 'shard': attention layer {index} ({layer.attention.label}): Reshape {reshape.label} has a "
                        "computed shape, so its head count cannot be rewritten (run cleanup or fuse first)"
                    )
        for index, block in enumerate(blocks):
            if block.width % self.tp:
                raise ShardError(
                    f"pass 'shard': feed-forward block {index} (down projection {block.down.label}) has {block.width} "
                    f"intermediate neurons, not divisible by tp={self.tp}"
                )
        return layers, blocks, skipped

    def _range(self, count: int, size: int) -> np.ndarray:
        """Columns (or rows) of this rank's share of `count` units of `size` elements each."""
        share = count // self.tp
        return np.arange(self.rank * share * size, (self.rank + 1) * share * size, dtype=np.int64)

    def _shard_attention(self, graph: Graph, layer: _Layer) -> None:
        heads, kv_heads = layer.heads // self.tp, layer.kv_heads // self.tp
        changed = slice_columns(graph, [
            (layer.q.columns, self._range(layer.heads, layer.head_dim)),
            (layer.k.columns, self._range(layer.kv_heads, layer.head_dim)),
            (layer.v.columns, self._range(layer.kv_heads, layer.v_dim)),
        ])
        slice_rows(graph, layer.out_proj, self._range(layer.heads, layer.v_dim))
        for inp, old, new in ((layer.q, layer.heads, heads), (layer.k, layer.kv_heads, kv_heads), (layer.v, layer.kv_heads, kv_heads)):
            _rewrite_shape(graph, inp.reshape, 2, old, new)
        _rewrite_shape(graph, layer.merge, -1, layer.heads * layer.v_dim, heads * layer.v_dim)
        attention = layer.attention
        attention.attrs["num_heads"] = heads
        attention.attrs["num_kv_heads"] = kv_heads
        if has_kv_cache(attention):
            self._slice_past(graph, attention, kv_heads)
        reinfer(graph, [*changed, layer.q.reshape, layer.k.reshape, layer.v.reshape, attention, layer.merge, layer.out_proj])
        if has_kv_cache(attention):
            for present in attention.outputs[1:]:
                if present.uses() or present.is_graph_output:
                    _collective_after(graph, present, "AllGather", {"world_size": self.tp, "axis": 1})
        _collective_after(graph, layer.out_proj.output, "AllReduce", {"world_size": self.tp, "reduction": "sum"})

    def _slice_past(self, graph: Graph, attention: Node, kv_heads: int) -> None:
        """Make the Attention read this rank's KV heads of past_key/past_value."""
        start, end = self.rank * kv_heads, (self.rank + 1) * kv_heads
        bounds = [
            graph.add_constant(graph.unique_name(f"{attention.name}_past_{label}"), np.array([v], np.int64))
            for label, v in (("start", start), ("end", end), ("axis", 1))
        ]
        for slot in (4, 5):
            past = attention.inputs[slot]
            part = graph.add_node("Slice", [past, *bounds], before=attention, name=f"{attention.name}_past_shard")
            attention.replace_input(slot, part.output)

    def _shard_ffn(self, graph: Graph, block: _Block) -> None:
        keep = self._range(block.width, 1)
        changed = slice_columns(graph, [(columns, keep) for columns in block.sources])
        for node, index in block.vectors:
            replace_vector(graph, node, index, node.inputs[index].const.numpy()[..., keep])  # type: ignore[union-attr]
        slice_rows(graph, block.down, keep)
        reinfer(graph, [*changed, *block.nodes, block.down])
        _collective_after(graph, block.down.output, "AllReduce", {"world_size": self.tp, "reduction": "sum"})


    def _shard_vocabulary(self, graph: Graph) -> tuple[int, int, list[str]]:
        """Rule 4: (LM heads split, embeddings split, what stayed whole and why)."""
        heads, embeddings, whole = 0, 0, []
        for output in list(graph.outputs):
            columns = find_columns(output)
            if columns is None or columns.split is not None or output.shape is None or output.dtype is None or not output.dtype.is_float:
                continue
            if columns.width % self.tp:
                whole.append(f"head {columns.matmul.label}: vocabulary {columns.width} does not divide by {self.tp}")
                continue
            changed = slice_columns(graph, [(columns, self._range(columns.width, 1))])
            reinfer(graph, [*changed, columns.matmul, *([columns.bias_add] if columns.bias_add else [])])
            _collective_after(graph, output, "AllGather", {"world_size": self.tp, "axis": len(output.shape) - 1})
            heads += 1
        for node in list(graph.nodes):
            table = _token_table(graph, node)
            if table is None:
                continue
            rows = table.const.shape[0]  # type: ignore[union-attr]
            if rows % self.tp:
                whole.append(f"embedding {node.label}: {rows} rows do not divide by {self.tp}")
                continue
            self._shard_embedding(graph, node, table, rows // self.tp)
            embeddings += 1
        return heads, embeddings, whole

    def _shard_embedding(self, graph: Graph, gather: Node, table: Value, share: int) -> None:
        """Rows [rank * share, (rank + 1) * share) of the table; ids outside read row 0, masked to zero; AllReduce."""
        ids = gather.inputs[1]
        kind = ids.dtype.to_numpy()  # type: ignore[union-attr]
        start = self.rank * share

        def constant(label: str, data: np.ndarray) -> Value:
            return graph.add_constant(graph.unique_name(f"{gather.name}_{label}"), data)

        part = constant("rows", np.ascontiguousarray(table.const.numpy()[start:start + share]))  # type: ignore[union-attr]
        first, end = constant("first", np.array(start, kind)), constant("end", np.array(start + share, kind))
        zero, total = constant("zero", np.array(0, kind)), constant("rows_total", np.array(share * self.tp, kind))

        def op(op_type: str, inputs: list, **attrs: object) -> Value:
            return graph.add_node(op_type, inputs, attrs or None, before=gather, name=f"{gather.name}_{op_type.lower()}").output

        def within(value: Value, low: Value, high: Value) -> Value:
            return op("And", [op("GreaterOrEqual", [value, low]), op("Less", [value, high])])

        # Gather's own index rules: negative ids count from the end; an id outside [-V, V) must still
        # fail, so it is passed on unchanged (outside this rank's rows too) instead of being masked.
        wrapped = op("Where", [op("Less", [ids, zero]), op("Add", [ids, total]), ids])
        inside = within(wrapped, first, end)
        elsewhere = op("Where", [within(wrapped, zero, total), zero, ids])  # invalid ids are outside [-V/N, V/N) too
        local = op("Where", [inside, op("Sub", [wrapped, first]), elsewhere])
        mask = op("Unsqueeze", [op("Cast", [inside], to=int(table.dtype)), constant("axis", np.array([-1], np.int64))])  # type: ignore[union-attr]
        rows = op("Gather", [part, local], axis=0)
        masked = graph.add_node("Mul", [rows, mask], before=gather, name=f"{gather.name}_masked")
        graph.replace_value(gather.output, masked.output)
        _collective_after(graph, masked.output, "AllReduce", {"world_size": self.tp, "reduction": "sum"})
        _erase_dead(graph, [gather])


def _token_table(graph: Graph, node: Node) -> Optional[Value]:
    """The constant float [V, H] table of a token-embedding Gather (axis 0, indices a graph input, maybe Cast), else None."""
    if node.op_type != "Gather" or node.domain or node.attrs.get("axis", 0) != 0 or len(node.inputs) != 2:
        return None
    table, ids = node.inputs
    if table is None or table.const is None or len(table.const.shape) != 2 or table.dtype is None or not table.dtype.is_float:
        return None
    while ids is not None and ids.producer is not None and ids.producer.op_type == "Cast" and not ids.producer.domain:
        ids = ids.producer.inputs[0]
    if ids is None or ids not in graph.inputs or node.inputs[1].dtype is None or node.inputs[1].dtype.is_float:  # type: ignore[union-attr]
        return None
    return table


def _collective_after(graph: Graph, value: Value, op: str, attrs: dict) -> Node:
    """Insert `graphopt::<op>(value)` and make every reader of `value` (graph outputs
    included, which keep their names) read its result instead."""
    anchor = value.producer
    node = graph.add_node(op, [value], attrs, domain=GRAPHOPT_DOMAIN, after=anchor, name=f"{anchor.name}_{op}" if anchor else op)
    graph.replace_value(value, node.output, keep_name=False)
    node.replace_input(0, value)  # replace_value redirected the collective's own input too
    return node


def _restate_flattened_gemms(graph: Graph) -> int:
    """Rule 5 of the module doc; returns how many Gemms were restated."""
    count = 0
    for gemm in list(graph.nodes):
        found = _flattened_gemm(gemm)
        if found is None:
            continue
        flatten, unflatten, source, weight, bias = found
        if gemm.attrs.get("transB", 0):
            weight = graph.add_constant(graph.unique_name(f"{weight.name}_t"), np.ascontiguousarray(weight.const.numpy().T))  # type: ignore[union-attr]
        if bias is not None and len(bias.const.shape) != 1:  # type: ignore[union-attr]
            bias = graph.add_constant(graph.unique_name(f"{bias.name}_vector"), bias.const.numpy().reshape(-1))  # type: ignore[union-attr]
        rank = len(unflatten.output.shape)  # type: ignore[arg-type]
        if len(source.shape) != rank:  # type: ignore[arg-type]
            shape = graph.add_constant(graph.unique_name(f"{gemm.name}_input_shape"), np.array([0] * (rank - 1) + [weight.shape[0]], np.int64))  # type: ignore[index]
            source = graph.add_node("Reshape", [source, shape], before=gemm, name=f"{gemm.name}_input").output
        matmul = graph.add_node("MatMul", [source, weight], before=gemm, name=f"{gemm.name}_matmul")
        result = matmul.output
        if bias is not None:
            result = graph.add_node("Add", [result, bias], after=matmul, name=f"{gemm.name}_bias").output
        graph.replace_value(unflatten.output, result)
        _erase_dead(graph, [unflatten, gemm, flatten])
        count += 1
    return count


def _flattened_gemm(gemm: Node) -> Optional[tuple[Node, Node, Value, Value, Optional[Value]]]:
    """(flatten Reshape, unflatten Reshape, x, W, b) of `Reshape(x, [-1, K]) -> Gemm(., W, b) ->
    Reshape(., [d0, .., N])` where x's leading axes are d0.. and its other axes hold K elements
    (W a constant [K, N], or [N, K] with transB; b a constant of N elements, or None)."""
    if gemm.op_type != "Gemm" or gemm.domain or gemm.attrs.get("transA", 0) or gemm.attrs.get("alpha", 1.0) != 1.0:
        return None
    a, w = gemm.inputs[0], gemm.inputs[1]
    c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    if a is None or w is None or w.const is None or len(w.const.shape) != 2 or w.dtype is None or not w.dtype.is_float:
        return None
    k, n = w.const.shape[::-1] if gemm.attrs.get("transB", 0) else w.const.shape
    if c is not None and (c.const is None or c.const.size != n or gemm.attrs.get("beta", 1.0) != 1.0 or len(c.const.shape) > 2):
        return None
    flatten, uses = a.producer, gemm.output.uses()
    if flatten is None or flatten.op_type != "Reshape" or flatten.domain or len(a.uses()) != 1 or a.is_graph_output:
        return None
    if len(uses) != 1 or gemm.output.is_graph_output or uses[0].node.op_type != "Reshape" or uses[0].node.domain or uses[0].index != 0:
        return None
    unflatten, source = uses[0].node, flatten.inputs[0]
    x_shape, out_shape = source.shape if source is not None else None, unflatten.output.shape
    if x_shape is None or out_shape is None or len(out_shape) < 2 or out_shape[-1] != n:
        return None
    lead = len(out_shape) - 1
    rest = x_shape[lead:]
    if len(x_shape) <= lead or list(x_shape[:lead]) != list(out_shape[:lead]) or None in x_shape[:lead]:
        return None
    if not all(isinstance(d, int) for d in rest) or int(np.prod(rest)) != k:
        return None
    return flatten, unflatten, source, w, c  # type: ignore[return-value]


def _erase_dead(graph: Graph, nodes: Sequence[Node]) -> None:
    """Erase `nodes` (in order, each unused by then) and then whatever pure nodes and
    constants only they read."""
    pending = list(nodes)
    while pending:
        node = pending.pop(0)
        if node.graph is not graph or any(out.uses() or out.is_graph_output for out in node.outputs):
            continue
        schema = get_schema(node.domain, node.op_type)
        if node not in nodes and (schema is None or not schema.pure):
            continue
        read = [v for v in node.inputs if v is not None]
        graph.erase(node)
        for value in read:
            if value.uses() or value.is_graph_output:
                continue
            if value.producer is not None:
                pending.append(value.producer)
            elif value.const is not None and graph.constants.get(value.name) is value and not graph.is_overridable(value):
                graph.remove_constant(value)
