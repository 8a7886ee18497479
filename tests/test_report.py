"""`graphopt optimize --report`: sections, op histograms that match the models, DOT drawings."""

from __future__ import annotations

import re

import pytest

import model_zoo
from graphopt.cli import main
from graphopt.api import optimize
from graphopt.frontends.onnx_import import from_onnx


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "bert.onnx"
    return str(model_zoo.export_onnx(model_zoo.build("bert"), path))


def test_markdown_report_tables_match_the_models_before_and_after(bert_onnx, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.md"
    assert main(["optimize", bert_onnx, "-o", str(out), "-p", "cleanup,fuse", "--check", "--report", str(report), "-q"]) == 0
    text = report.read_text()
    for section in ("## Summary", "## Passes", "## Ops"):
        assert section in text
    before, after = from_onnx(bert_onnx), optimize(bert_onnx, "cleanup,fuse")
    assert f"| nodes | {len(before)} | {len(after)} |" in text
    rows = re.findall(r"^\| ([\w:.]+) \| (\d+) \| (\d+) \|", text.split("## Ops")[1], flags=re.M)
    ops = {op: (int(a), int(b)) for op, a, b in rows}
    assert {op: counts[0] for op, counts in ops.items() if counts[0]} == before.op_counts()
    assert {op: counts[1] for op, counts in ops.items() if counts[1]} == after.op_counts()
    assert re.search(r"^\| cleanup \| [\d.]+ \| \d+ -> \d+ \| yes \|", text, flags=re.M)
    assert re.search(r"\| fidelity \| check: .*out\.onnx vs the input on sample inputs .*: last_hidden_state: max abs [\d.e+-]+, relative", text)
    drawing = (tmp_path / "report.after.dot").read_text()
    assert drawing.startswith('digraph "') and drawing.count("[label=") - drawing.count("->") == len(after)
    for title, graph in (("before", before), ("after", after)):  # drawings beside it, shown as images
        assert f"![{title}](report.{title}.svg)" in text
        svg = (tmp_path / f"report.{title}.svg").read_text()
        assert svg.startswith("<svg") and svg.count("<rect ") >= len(graph)


def test_html_report_and_a_bad_report_name(bert_onnx, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["optimize", bert_onnx, "-o", str(out), "-p", "cleanup", "--report", str(tmp_path / "r.html"), "-q"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "<h2>Passes</h2>" in page and "<h2>Graphs</h2>" in page
    assert page.count("<svg") == 2 and '<a href="r.before.dot">' in page, "both graphs drawn inline, the DOT files linked"
    out.unlink()
    assert main(["optimize", bert_onnx, "-o", str(out), "-p", "cleanup", "--report", str(tmp_path / "r.pdf")]) == 2
    assert "graphopt: error: --report " in capsys.readouterr().err
    assert not out.exists(), "nothing is written when an option is bad"


def test_layered_drawing_gives_every_node_a_box_and_no_two_boxes_overlap(bert_onnx):
    from graphopt.graph_drawing import DrawnGraph, layered_svg

    graph = from_onnx(bert_onnx)
    svg = layered_svg(DrawnGraph.of(graph))
    boxes = [tuple(map(float, b)) for b in re.findall(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', svg)]
    assert len(boxes) == len(graph) and svg.count("marker-end=") == graph.to_networkx().number_of_edges()
    rows: dict[float, list[tuple[float, float]]] = {}
    for x, y, w, _ in boxes:
        rows.setdefault(y, []).append((x, x + w))
    for spans in rows.values():
        spans.sort()
        assert all(right <= left for (_, right), (left, _) in zip(spans, spans[1:])), "boxes in one row overlap"
