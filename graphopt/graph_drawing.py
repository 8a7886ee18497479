"""Graph drawings for the HTML report, as inline SVG that needs no network to view.

    svg, engine = graph_svg(dot_text, DrawnGraph.of(graph))

When Graphviz's `dot` program is on PATH, the DOT text is rendered by `dot -Tsvg` (30 s at
most). Otherwise, or when `dot` fails, the graph is laid out here in layers and drawn:
- each node goes one layer below the lowest of its inputs (longest path from the inputs), a
  node without inputs just above its first reader;
- an edge that spans several layers passes through a bend point in each layer between (the
  long edges of one node share their bend points, like a bus);
- a few sweeps order each layer by the mean position of the neighbours in the layer above
  (then below), which removes most crossings;
- nodes are placed under their inputs, each layer packed left to right and right to left
  towards those positions and the two placements averaged, so no two boxes overlap;
- a box per node shows its op and (the end of) its name; hovering a box shows the full name,
  hovering an edge the values it carries. No script.
Graphs of more than MAX_NODES nodes are not drawn (the DOT file is still written).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from typing import Any, Optional

from graphopt.svg import MONOSPACE, escape, shorten, text_width

MAX_NODES = 3000
MAX_BENDS = 20 * MAX_NODES
_OP_SIZE, _NAME_SIZE = 12, 10
_BOX_HEIGHT, _LAYER_GAP, _NODE_GAP, _BEND_WIDTH, _MARGIN = 36, 30, 14, 6, 10


@dataclasses.dataclass(frozen=True)
class DrawnGraph:
    """What a drawing needs of a graph: its nodes (op, name) and edges (source, target, values)."""

    nodes: tuple[tuple[str, str], ...]
    edges: tuple[tuple[int, int, str], ...]

    @classmethod
    def of(cls, graph: Any) -> "DrawnGraph":
        view = graph.to_networkx()
        index = {name: i for i, name in enumerate(view.nodes)}
        nodes = tuple((str(data["op"]), str(name)) for name, data in view.nodes(data=True))
        edges = tuple((index[s], index[t], ", ".join(data["values"])) for s, t, data in view.edges(data=True))
        return cls(nodes, edges)


def graph_svg(dot_text: str, graph: Optional[DrawnGraph], ident: str = "graph") -> tuple[Optional[str], str]:
    """(SVG markup or None, how it was drawn or why not); `ident` keeps ids unique in a page."""
    svg = _graphviz_svg(dot_text)
    if svg is not None:
        return svg, "drawn by Graphviz dot"
    if graph is None:
        return None, "not drawn (no graph structure given)"
    if len(graph.nodes) > MAX_NODES:
        return None, f"not drawn: {len(graph.nodes)} nodes (more than {MAX_NODES}); render the DOT file with Graphviz"
    return layered_svg(graph, ident), "drawn by graphopt's layered layout (Graphviz dot is not installed)"


def _dot_program() -> Optional[str]:
    return shutil.which("dot")


def _graphviz_svg(dot_text: str) -> Optional[str]:
    program = _dot_program()
    if program is None:
        return None
    try:
        done = subprocess.run([program, "-Tsvg"], input=dot_text.encode(), capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    text = done.stdout.decode("utf-8", "replace")
    start = text.find("<svg")
    return text[start:] if start >= 0 else None


def _node_width(op: str, name: str) -> float:
    return max(text_width(shorten(op, 32), _OP_SIZE), text_width(shorten(name, 28, keep_end=True), _NAME_SIZE)) + 12


def _layers(count: int, edges: list[tuple[int, int]]) -> list[int]:
    """Longest-path layer of each node; nodes in a cycle (none in a valid graph) go on top."""
    preds: list[list[int]] = [[] for _ in range(count)]
    succs: list[list[int]] = [[] for _ in range(count)]
    for s, t in edges:
        succs[s].append(t)
        preds[t].append(s)
    waiting = [len(p) for p in preds]
    layer = [0] * count
    ready = [v for v in range(count) if not waiting[v]]
    while ready:
        v = ready.pop()
        for t in succs[v]:
            layer[t] = max(layer[t], layer[v] + 1)
            waiting[t] -= 1
            if not waiting[t]:
                ready.append(t)
    for v in range(count):  # a node without inputs (e.g. Identity of a weight) goes just above its first reader
        if not preds[v] and succs[v]:
            layer[v] = max(layer[v], min(layer[t] for t in succs[v]) - 1)
    return layer


def layered_svg(graph: DrawnGraph, ident: str = "graph") -> str:
    """The graph drawn top to bottom by the layered layout described in the module docstring."""
    count = len(graph.nodes)
    simple = [(s, t) for s, t, _ in graph.edges if s != t]
    layer = _layers(count, simple)
    widths = [_node_width(op, name) for op, name in graph.nodes]
    chains = _bend_chains(graph.edges, layer, widths)
    preds: list[list[int]] = [[] for _ in layer]
    succs: list[list[int]] = [[] for _ in layer]
    for chain, _ in chains:
        for a, b in zip(chain, chain[1:]):
            if layer[b] == layer[a] + 1 and b not in succs[a]:
                succs[a].append(b)
                preds[b].append(a)
    rows: list[list[int]] = [[] for _ in range(max(layer, default=0) + 1)]
    for v, index in enumerate(layer):
        rows[index].append(v)
    x = _place(rows, widths, preds, succs)
    svg_width = max((x[v] + widths[v] / 2 for v in range(len(layer))), default=0) + _MARGIN
    svg_height = len(rows) * (_BOX_HEIGHT + _LAYER_GAP) - _LAYER_GAP + 2 * _MARGIN

    def top(v: int) -> float:
        return _MARGIN + layer[v] * (_BOX_HEIGHT + _LAYER_GAP)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="graph-drawing" width="{svg_width:.0f}" height="{svg_height:.0f}" '
        f'viewBox="0 0 {svg_width:.0f} {svg_height:.0f}" font-family="{escape(MONOSPACE)}">',
        f'<defs><marker id="{ident}-arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" orient="auto">'
        '<path d="M0,0 L8,4 L0,8 z" fill="#666"/></marker></defs>',
    ]
    drawn: set[tuple[int, int]] = set()  # trunk segments already drawn by an earlier edge
    for chain, values in chains:
        if len(chain) < 2 or layer[chain[-1]] <= layer[chain[0]]:
            continue
        start = 0
        while start < len(chain) - 2 and (chain[start], chain[start + 1]) in drawn:
            start += 1
        drawn.update(zip(chain[:-2], chain[1:-1]))
        points = [(x[v], top(v) + (_BOX_HEIGHT if v == chain[0] else _BOX_HEIGHT / 2)) for v in chain[start:-1]]
        points.append((x[chain[-1]], top(chain[-1])))
        path = "M" + " L".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<g><title>{escape(values)}</title><path d="{path}" fill="none" stroke="#888" stroke-width="1.2" marker-end="url(#{ident}-arrow)"/></g>')
    for v, (op, name) in enumerate(graph.nodes):
        left, y = x[v] - widths[v] / 2, top(v)
        fill = "#fde2c4" if "::" in op else "#dde8f6"
        parts.append(
            f'<g class="node"><title>{escape(op)} {escape(name)}</title>'
            f'<rect x="{left:.1f}" y="{y:.1f}" width="{widths[v]:.1f}" height="{_BOX_HEIGHT}" rx="4" fill="{fill}" stroke="#557"/>'
            f'<text x="{x[v]:.1f}" y="{y + 11:.1f}" dominant-baseline="central" text-anchor="middle" font-size="{_OP_SIZE}" font-weight="bold">{escape(shorten(op, 32))}</text>'
            f'<text x="{x[v]:.1f}" y="{y + 26:.1f}" dominant-baseline="central" text-anchor="middle" font-size="{_NAME_SIZE}" fill="#444">{escape(shorten(name, 28, keep_end=True))}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _bend_chains(edges: tuple[tuple[int, int, str], ...], layer: list[int], widths: list[float]) -> list[tuple[list[int], str]]:
    """Each edge as the chain of vertices it passes, one per layer. The long edges of one
    source share one trunk of bend vertices (appended to `layer` and `widths`), so a value
    read in every block adds one column, not one per reader; past MAX_BENDS bends in all,
    long edges are drawn straight."""
    trunks: dict[int, list[int]] = {}
    chains = []
    for s, t, values in edges:
        if s == t or layer[t] <= layer[s] + 1:
            chains.append(([s, t], values))
            continue
        trunk = trunks.setdefault(s, [s])
        while layer[trunk[-1]] < layer[t] - 1 and len(layer) < MAX_BENDS:
            layer.append(layer[trunk[-1]] + 1)
            widths.append(_BEND_WIDTH)
            trunk.append(len(layer) - 1)
        reach = layer[t] - layer[s]
        chains.append((trunk[:reach] + [t] if len(trunk) >= reach else [s, t], values))
    return chains


def _place(rows: list[list[int]], widths: list[float], preds: list[list[int]], succs: list[list[int]]) -> list[float]:
    """x centre of every vertex: rows ordered by barycentre sweeps, then placed under their neighbours."""
    position = {v: i for row in rows for i, v in enumerate(row)}
    for sweep in range(8):
        ordered = rows[1:] if sweep % 2 == 0 else rows[-2::-1]
        for row in ordered:
            neighbours = preds if sweep % 2 == 0 else succs
            key = {v: (sum(position[n] for n in neighbours[v]) / len(neighbours[v]) if neighbours[v] else position[v]) for v in row}
            row.sort(key=lambda v: key[v])
            for i, v in enumerate(row):
                position[v] = i
    x = [0.0] * len(widths)
    for row in rows:
        _pack(row, widths, x, {v: 0.0 for v in row})
    for sweep in range(6):
        ordered = rows[1:] if sweep % 2 == 0 else rows[-2::-1]
        neighbours = preds if sweep % 2 == 0 else succs
        for row in ordered:
            wanted = {v: (sum(x[n] for n in neighbours[v]) / len(neighbours[v]) if neighbours[v] else x[v]) for v in row}
            _pack(row, widths, x, wanted)
    shift = _MARGIN - min((x[v] - widths[v] / 2 for v in range(len(widths))), default=0.0)
    return [value + shift for value in x]


def _pack(row: list[int], widths: list[float], x: list[float], wanted: dict[int, float]) -> None:
    """Centres for `row`, in order and `_NODE_GAP` apart, near `wanted`: the mean of a placement
    packed from the left and one packed from the right (each keeps the gaps, so does the mean)."""
    forward, backward = [], []
    for i, v in enumerate(row):
        least = forward[-1] + (widths[row[i - 1]] + widths[v]) / 2 + _NODE_GAP if i else wanted[v]
        forward.append(max(wanted[v], least))
    for i in range(len(row) - 1, -1, -1):
        v = row[i]
        most = backward[-1] - (widths[row[i + 1]] + widths[v]) / 2 - _NODE_GAP if i < len(row) - 1 else wanted[v]
        backward.append(min(wanted[v], most))
    backward.reverse()
    for v, a, b in zip(row, forward, backward):
        x[v] = (a + b) / 2
