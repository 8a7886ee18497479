"""graphopt's two HTML pages rendered in a real headless Chromium, their layout measured there.

For each page (`graphopt optimize --report r.html`, `graphopt bench --html b.html`) the test
1. screenshots the page as written (1280 px wide) into $GRAPHOPT_ARTIFACTS (else a temporary
   folder; the paths are printed), and
2. loads a copy with a script appended that, after load, writes the bounding boxes
   (getBoundingClientRect) of every SVG, SVG text, chart point and graph box into
   <pre id="layout">, dumps the DOM (--dump-dom) and checks in Python that the drawings are
   there with a non-zero size, no two texts of a drawing overlap, chart numbers cover no
   point, every graph label fits in its box, chart labels lie inside the window, and the
   page needs no horizontal scrolling and nothing from the network.
A self-test renders the bench page with its numbers at their points (as the old matplotlib
chart annotated them) and requires the checks to report the overlaps.

Needs Chromium (`chromium` on PATH; `apt-get install chromium`): skipped without it, except
under CI (env CI or GRAPHOPT_ARTIFACTS set, as .ci/run does), where its absence fails.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import json
import os
import pathlib
import re
import shutil
import subprocess
from typing import Any

import pytest

from graphopt import bench_page, graph_drawing
from graphopt.bench import BASELINE, BenchResult, BenchRow, save_html
from graphopt.cli import main

WINDOW = (1280, 2400)
_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}",
]
_MEASURE = """
<script>
addEventListener('load', () => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const layout = {
    width: innerWidth,
    scrollWidth: document.documentElement.scrollWidth,
    panes: [...document.querySelectorAll('.drawing')].map(box),
    svgs: [...document.querySelectorAll('svg')].map(svg => ({
      cls: svg.getAttribute('class') || '',
      box: box(svg),
      texts: [...svg.querySelectorAll('text')].map(t => ({text: t.textContent, cls: t.getAttribute('class') || '', box: box(t)})),
      points: [...svg.querySelectorAll('.point')].map(box),
      nodes: [...svg.querySelectorAll('g.node')].map(g => ({rect: box(g.querySelector('rect, polygon, ellipse')), texts: [...g.querySelectorAll('text')].map(box)})),
    })),
  };
  const pre = document.createElement('pre');
  pre.id = 'layout';
  pre.textContent = JSON.stringify(layout);
  document.body.appendChild(pre);
});
</script>
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found:
        return found
    if os.environ.get("CI") or os.environ.get("GRAPHOPT_ARTIFACTS"):
        pytest.fail("Chromium is not installed, and CI (env CI or GRAPHOPT_ARTIFACTS set) must render the HTML pages: "
                    "apt-get install chromium (see .ci/run)")
    pytest.skip("Chromium is not installed (apt-get install chromium); CI runs this test")


@pytest.fixture
def artifacts(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = pathlib.Path(os.environ.get("GRAPHOPT_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _run(chromium: str, profile: pathlib.Path, *args: str) -> str:
    done = subprocess.run([chromium, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def render(chromium: str, page: pathlib.Path, screenshot: pathlib.Path) -> dict[str, Any]:
    """Screenshot `page` into `screenshot`, then its layout as measured by the browser."""
    profile = page.parent / f"{page.stem}-chromium-profile"
    _run(chromium, profile, f"--screenshot={screenshot}", page.resolve().as_uri())
    assert screenshot.stat().st_size > 10_000, f"{screenshot}: no real screenshot"
    print(f"screenshot: {screenshot}")
    measured = page.with_name(page.stem + ".measured.html")
    measured.write_text(page.read_text() + _MEASURE)
    dom = _run(chromium, profile, "--virtual-time-budget=5000", "--dump-dom", measured.resolve().as_uri())
    found = re.search(r'<pre id="layout">(.*?)</pre>', dom, flags=re.S)
    assert found, "the measuring script did not run"
    return json.loads(html.unescape(found.group(1)))


def _overlaps(boxes: list[list[float]], tolerance: float = 0.5) -> list[tuple[int, int]]:
    """Pairs of boxes (left, top, right, bottom) that overlap by more than `tolerance` px."""
    return [
        (i, j) for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2)
        if min(a[2], b[2]) - max(a[0], b[0]) > tolerance and min(a[3], b[3]) - max(a[1], b[1]) > tolerance
    ]


def _inside(inner: list[float], outer: list[float], tolerance: float = 0.5) -> bool:
    return inner[0] >= outer[0] - tolerance and inner[1] >= outer[1] - tolerance and inner[2] <= outer[2] + tolerance and inner[3] <= outer[3] + tolerance


def _sized(box: list[float]) -> bool:
    return box[2] - box[0] > 50 and box[3] - box[1] > 50


def page_problems(layout: dict[str, Any], kind: str) -> list[str]:
    """What is illegible in a measured page: each overlap or overflow, in words."""
    problems = []
    if layout["scrollWidth"] > layout["width"]:
        problems.append(f"the page is {layout['scrollWidth']} px wide, wider than the {layout['width']} px window")
    for svg in (s for s in layout["svgs"] if s["cls"] == kind):
        texts = svg["texts"]
        for i, j in _overlaps([t["box"] for t in texts]):
            problems.append(f"{kind}: text {texts[i]['text']!r} overlaps {texts[j]['text']!r}")
        for label in (t for t in texts if t["cls"] == "point-label"):
            problems += [f"{kind}: number {label['text']} covers a point" for point in svg["points"] if _overlaps([label["box"], point])]
        if kind == "chart":
            problems += [f"chart: {t['text']!r} is outside the window" for t in texts if t["box"][0] < 0 or t["box"][2] > layout["width"]]
        for node in svg["nodes"]:
            problems += [f"{kind}: a label spills out of its box {node['rect']}" for text in node["texts"] if not _inside(text, node["rect"])]
    return problems


def _no_network(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads something from the network"


def _row(label: str, ms: float, cosine: float, flops: int | None, note: str = "") -> BenchRow:
    times = [ms * f for f in (0.97, 0.99, 1.0, 1.01, 1.04, 1.1)]
    row = BenchRow(label, build_s=0.5, times_ms=times, ratio=ms / 10.0, parameters=22_713_216, bytes=90_852_864, flops=flops, max_error=1e-6, note=note)
    fields = {f.name for f in dataclasses.fields(BenchRow)}
    for name in ("token_cosine", "pooled_cosine") if "token_cosine" in fields else ("cosine",):  # the field the charts plot as `cosine`
        setattr(row, name, cosine)
    return row


def crowded_bench() -> BenchResult:
    """Eight contenders, five of them within 5% speed-up and 1e-7 cosine of each other, two identical."""
    rows = [
        _row(BASELINE, 10.0, 1.0, 2_900_000_000),
        _row("graphopt (fuse -> onnxruntime:cpu{threads=2})", 9.6, 0.99999994, 2_900_000_000),
        _row("ort-opt", 9.5, 0.99999991, 1_200_000_000),
        _row("ort-int8", 7.1, 0.9981, 300_000_000),
        _row("graphopt (fuse,quantize -> onnxruntime:cpu)", 7.2, 0.9983, 600_000_000),
        _row("inductor", 9.7, 0.99999996, None, "build s includes the first (compiling) call"),
        _row("eager", 9.7, 0.99999996, None),
        BenchRow("tvm-default", note="apache-tvm is not installed"),
    ]
    settings = {
        "batch": 1, "seq": 128, "threads": 2, "warmup": 3, "repeats": 12, "pipeline": "fuse", "target": "onnxruntime:cpu",
        "sizes": {"batch": 1, "seq": 128}, "machine": "Intel Xeon, 16 cores, Linux", "versions": "graphopt 0.1.0", "date": "2025-01-01",
    }
    return BenchResult("hf:bert", rows, settings)


def test_bench_page_charts_are_legible_in_chromium(chromium, tmp_path, artifacts):
    page = tmp_path / "bench.html"
    save_html(crowded_bench(), str(page))
    _no_network(page.read_text())
    layout = render(chromium, page, artifacts / "bench.png")
    charts = [s for s in layout["svgs"] if s["cls"] == "chart"]
    assert len(charts) == 2 and all(_sized(c["box"]) for c in charts), "the bars and the scatter are drawn"
    scatter = charts[1]
    assert len(scatter["points"]) == 7
    assert sorted(t["text"] for t in scatter["texts"] if t["cls"] == "point-label") == [str(n) for n in range(1, 8)]
    assert page_problems(layout, "chart") == []


def test_the_check_catches_numbers_written_at_their_points(chromium, tmp_path, artifacts, monkeypatch):
    monkeypatch.setattr(bench_page, "place_labels", lambda anchors, *args, **kwargs: list(anchors))
    page = tmp_path / "bench-unplaced.html"
    save_html(crowded_bench(), str(page))
    problems = page_problems(render(chromium, page, artifacts / "bench-unplaced.png"), "chart")
    assert any("overlaps" in p for p in problems) and any("covers a point" for p in problems), problems


@pytest.fixture(scope="module")
def report_page(zoo_onnx, tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:  # graphopt's own layout, whether or not Graphviz is installed
        patch.setattr(graph_drawing, "_dot_program", lambda: None)
        assert main(["optimize", str(zoo_onnx("bert")), "-o", str(folder / "out.onnx"), "-p", "fuse", "--report", str(folder / "r.html"), "-q"]) == 0
    return folder / "r.html"


def test_optimize_report_draws_both_graphs_legibly_in_chromium(chromium, report_page, artifacts):
    text = report_page.read_text()
    _no_network(text)
    layout = render(chromium, report_page, artifacts / "report.png")
    drawings = [s for s in layout["svgs"] if s["cls"] == "graph-drawing"]
    assert len(drawings) == 2 and all(_sized(d["box"]) for d in drawings), "before and after are drawn"
    before, after = (int(n) for n in re.findall(r"(\d+) nodes \(DOT source", text))
    assert [len(d["nodes"]) for d in drawings] == [before, after] and before > after
    assert len(layout["panes"]) == 2 and all(p[0] >= 0 and p[2] <= layout["width"] and _sized(p) for p in layout["panes"])
    assert page_problems(layout, "graph-drawing") == []


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_optimize_report_uses_graphviz_when_installed(chromium, zoo_onnx, tmp_path, artifacts):
    page = tmp_path / "r.html"
    assert main(["optimize", str(zoo_onnx("bert")), "-o", str(tmp_path / "out.onnx"), "-p", "fuse", "--report", str(page), "-q"]) == 0
    assert "drawn by Graphviz dot" in page.read_text()
    layout = render(chromium, page, artifacts / "report-graphviz.png")
    assert len(layout["panes"]) == 2 and all(_sized(s["box"]) for s in layout["svgs"][:2])
