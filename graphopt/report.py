"""`graphopt optimize --report FILE.md|FILE.html`: what a pipeline did to a model.

The report has: the model, pipeline, totals (nodes, parameters, estimated FLOPs before and
after); the per-pass table (time, nodes before -> after, what changed, max error when
`--check` ran; nested passes by their path, e.g. ``fuse/cleanup/fold-constants``, the rounds
of a fixed-point pipeline merged into one row); the op histogram before and after with the difference; the fidelity line of
`--check`; and the graph drawn before and after as Graphviz DOT files written beside the
report (`<report>.before.dot`, `<report>.after.dot`; render with `dot -Tsvg`). The optimized
.onnx itself opens in Netron. All files are written atomically.
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Any, Optional

from graphopt.errors import GraphoptError
from graphopt.exporters.files import atomic_write
from graphopt.instruments import row_cells


@dataclasses.dataclass
class GraphSnapshot:
    """What the report needs of a graph at one point: op histogram, sizes and its drawing."""

    nodes: int
    ops: dict[str, int]
    parameters: int
    flops: Optional[int]
    dot: str

    @classmethod
    def of(cls, graph: Any, sizes: Optional[dict[str, int]] = None) -> "GraphSnapshot":
        from graphopt.flops import estimate_flops

        try:
            flops: Optional[int] = int(estimate_flops(graph, sizes)["total"])
        except GraphoptError:
            flops = None
        parameters = int(sum(v.const.size for v in graph.constants.values()))  # type: ignore[union-attr]
        return cls(len(graph), graph.op_counts(), parameters, flops, graph_dot(graph))


def graph_dot(graph: Any) -> str:
    """The graph as Graphviz DOT: a box per node labelled with its op, edges named by value."""
    view = graph.to_networkx()
    ids = {name: f"n{index}" for index, name in enumerate(view.nodes)}
    lines = [f"digraph {_quote(graph.name)} {{", "  rankdir=TB; node [shape=box, fontsize=10];"]
    for name, data in view.nodes(data=True):
        lines.append(f"  {ids[name]} [label={_quote(data['op'] + chr(10) + name)}];")
    for source, target, data in view.edges(data=True):
        lines.append(f"  {ids[source]} -> {ids[target]} [label={_quote(', '.join(data['values'])[:40])}, fontsize=8];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_report(
    path: str, model: str, pipeline: str, before: GraphSnapshot, after: GraphSnapshot, report: Any, fidelity: Optional[str] = None
) -> list[str]:
    """Write the report (format from the extension) and the two DOT files; return the paths written."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".md", ".html", ".htm"):
        raise GraphoptError(f"--report {path}: use a .md or .html file name")
    stem = os.path.splitext(path)[0]
    dots = [f"{stem}.before.dot", f"{stem}.after.dot"]
    sections = _sections(model, pipeline, before, after, report, fidelity, [os.path.basename(d) for d in dots])
    text = _html(model, sections) if extension != ".md" else _markdown(sections)
    atomic_write(path, text.encode())
    atomic_write(dots[0], before.dot.encode())
    atomic_write(dots[1], after.dot.encode())
    return [path, *dots]


def _sections(
    model: str, pipeline: str, before: GraphSnapshot, after: GraphSnapshot, report: Any, fidelity: Optional[str], dots: list[str]
) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, table head, rows) for each section."""

    def flops(value: Optional[int]) -> str:
        return "-" if value is None else f"{value / 1e9:.3f}"

    totals = [
        ["model", model, ""], ["pipeline", pipeline, ""],
        ["nodes", str(before.nodes), str(after.nodes)],
        ["parameters", f"{before.parameters:,}", f"{after.parameters:,}"],
        ["GFLOPs (estimated)", flops(before.flops), flops(after.flops)],
        ["graph drawing (DOT)", dots[0], dots[1]],
    ]
    if fidelity:
        totals.append(["fidelity", fidelity, ""])
    passes = []
    for record in report.rows():
        name, _, nodes, changed, error, stats = row_cells(record, full_path=True)
        passes.append([name, f"{record.seconds * 1000:.1f}", nodes, changed, error, stats])
    ops = []
    for op in sorted(set(before.ops) | set(after.ops), key=lambda o: (-max(before.ops.get(o, 0), after.ops.get(o, 0)), o)):
        a, b = before.ops.get(op, 0), after.ops.get(op, 0)
        ops.append([op, str(a), str(b), f"{b - a:+d}" if a != b else ""])
    return [
        ("Summary", ["", "before", "after"], totals),
        ("Passes", ["pass", "ms", "nodes", "changed", "max err", "stats"], passes),
        ("Ops", ["op", "before", "after", "change"], ops),
    ]


def _markdown(sections: list[tuple[str, list[str], list[list[str]]]]) -> str:
    lines = ["# graphopt optimize report", ""]
    for title, head, rows in sections:
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def _html(model: str, sections: list[tuple[str, list[str], list[list[str]]]]) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>graphopt report</title>",
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>",
        f"<h1>graphopt optimize report: {html.escape(model)}</h1>",
    ]
    for title, head, rows in sections:
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    return "\n".join(parts) + "\n"
