"""`graphopt optimize --report FILE.md|FILE.html`: what a pipeline did to a model.

The report has: the model, pipeline, totals (nodes, parameters, estimated FLOPs before and
after); the per-pass table (time, nodes before -> after, what changed, max error when
`--check` ran; nested passes by their path, e.g. ``fuse/cleanup/fold-constants``, the rounds
of a fixed-point pipeline merged into one row); the op histogram before and after with the difference; the fidelity line of
`--check`; and the graph before and after as Graphviz DOT files written beside the report
(`<report>.before.dot`, `<report>.after.dot`). The HTML report also draws both graphs inline
(`graphopt.graph_drawing`: by Graphviz's `dot` when installed, else by graphopt's own layered
layout), side by side in scrollable panes; the page needs no network (a few lines of inline
script open each pane at its first nodes and add a fit-to-pane switch). The
optimized .onnx itself opens in Netron. All files are written atomically.
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Any, Optional

from graphopt.errors import GraphoptError
from graphopt.exporters.files import atomic_write
from graphopt.graph_drawing import DrawnGraph, graph_svg
from graphopt.instruments import row_cells


@dataclasses.dataclass
class GraphSnapshot:
    """What the report needs of a graph at one point: op histogram, sizes and its drawing
    (`dot`: the DOT text; `drawing`: nodes and edges for the inline HTML drawing)."""

    nodes: int
    ops: dict[str, int]
    parameters: int
    flops: Optional[int]
    dot: str
    drawing: Optional[DrawnGraph] = None

    @classmethod
    def of(cls, graph: Any, sizes: Optional[dict[str, int]] = None) -> "GraphSnapshot":
        from graphopt.flops import estimate_flops

        try:
            flops: Optional[int] = int(estimate_flops(graph, sizes)["total"])
        except GraphoptError:
            flops = None
        parameters = int(sum(v.const.size for v in graph.constants.values()))  # type: ignore[union-attr]
        return cls(len(graph), graph.op_counts(), parameters, flops, graph_dot(graph), DrawnGraph.of(graph))


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
    """Write the report (format from the extension), the two DOT files and, beside a Markdown
    report, the two drawings as SVG files it shows; return the paths written."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".md", ".html", ".htm"):
        raise GraphoptError(f"--report {path}: use a .md or .html file name")
    stem = os.path.splitext(path)[0]
    dots = [f"{stem}.before.dot", f"{stem}.after.dot"]
    sections = _sections(model, pipeline, before, after, report, fidelity, [os.path.basename(d) for d in dots])
    svgs: list[str] = []
    if extension == ".md":  # drawings as SVG files beside it, shown as images
        drawn = [(f"{stem}.{title}.svg", graph_svg(snapshot.dot, snapshot.drawing, title)[0]) for title, snapshot in (("before", before), ("after", after))]
        svgs = [file for file, svg in drawn if svg]
        text = _markdown(sections) + "".join(f"\n![{title}]({os.path.basename(file)})\n" for title, (file, svg) in zip(("before", "after"), drawn) if svg)
        for file, svg in drawn:
            if svg:
                atomic_write(file, svg.encode())
    else:
        text = _html(model, sections, _drawings(before, after, dots))
    atomic_write(path, text.encode())
    atomic_write(dots[0], before.dot.encode())
    atomic_write(dots[1], after.dot.encode())
    return [path, *dots, *svgs]


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
        lines += ["| " + " | ".join(cell.replace("|", "\\|").replace("\n", "<br>") for cell in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


_STYLE = (
    "body{font-family:sans-serif;margin:16px}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left;white-space:pre-line}"
    ".graphs{display:flex;gap:12px}.graphs figure{flex:1 1 0;min-width:0;margin:0}"
    ".graphs figcaption{font-weight:bold;margin:4px 0}"
    ".drawing{overflow:auto;max-height:70vh;border:1px solid #bbb;background:#fff}.drawing svg{display:block}"
    ".drawing.fit svg{width:100%;height:auto}.graphs button{font-size:small;margin-bottom:4px}"
)


def _drawings(before: GraphSnapshot, after: GraphSnapshot, dots: list[str]) -> str:
    """The "Graphs" section: both graphs drawn inline, side by side, each in a scrollable pane."""
    figures, engines = [], set()
    for title, snapshot, dot in (("before", before, dots[0]), ("after", after, dots[1])):
        svg, engine = graph_svg(snapshot.dot, snapshot.drawing, title)
        engines.add(engine)
        link = f'<a href="{html.escape(os.path.basename(dot))}">{html.escape(os.path.basename(dot))}</a>'
        body = f'<div class="drawing">{svg}</div>' if svg else f"<p>{html.escape(engine)}</p>"
        figures.append(f"<figure><figcaption>{title}: {snapshot.nodes} nodes (DOT source: {link})</figcaption>{body}</figure>")
    note = "; ".join(sorted(engines)) + (
        ". Scroll inside a drawing (it opens at its first nodes) or switch it to fit the pane;"
        " hover a box for the node's full name, an arrow for the values it carries."
    )
    return f"<h2>Graphs</h2><p>{html.escape(note)}</p><div class=\"graphs\">{''.join(figures)}</div>{_PANE_SCRIPT}"


_PANE_SCRIPT = """<script>
// Optional: each pane opens scrolled to the left-most node of the top row; "fit" scales the drawing to the pane.
for (const pane of document.querySelectorAll('.drawing')) {
  const rects = [...pane.querySelectorAll('.node rect, .node polygon, .node ellipse')];
  const top = Math.min(...rects.map(r => r.getBoundingClientRect().top));
  const first = rects.filter(r => r.getBoundingClientRect().top === top).map(r => r.getBoundingClientRect().left);
  if (first.length) pane.scrollLeft = Math.max(0, Math.min(...first) - pane.getBoundingClientRect().left - 20);
  const button = document.createElement('button');
  button.textContent = 'fit to pane / full size';
  button.onclick = () => pane.classList.toggle('fit');
  pane.before(button);
}
</script>"""


def _html(model: str, sections: list[tuple[str, list[str], list[list[str]]]], drawings: str = "") -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>graphopt report</title>",
        f"<style>{_STYLE}</style>",
        f"<h1>graphopt optimize report: {html.escape(model)}</h1>",
    ]
    for index, (title, head, rows) in enumerate(sections):
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
        if index == 0:
            parts.append(drawings)  # right after the summary: the first thing a reader looks for
    return "\n".join(parts) + "\n"
