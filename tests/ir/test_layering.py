"""graphopt's folders form layers, and no module imports from a layer above its own.

    graphopt.errors  <  graphopt/ir  <  graphopt/frontends, graphopt/exporters
        <  the root modules (graphopt/*.py)  <  passes (graphopt.passes)  <  targets (graphopt.targets)

Every import is read with `ast`, top-level, inside functions and under TYPE_CHECKING alike,
so a lazy import cannot hide a dependency; and the imports between folders must not form a
circle (frontends and exporters share a layer, so only this catches a circle between them).
"""

from __future__ import annotations

import ast
import pathlib
from typing import Iterator, Optional

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {"graphopt": ROOT / "graphopt", "graphopt.passes": ROOT / "passes", "graphopt.targets": ROOT / "targets"}
LAYERS = {"errors": 0, "ir": 1, "frontends": 2, "exporters": 2, "root": 3, "passes": 4, "targets": 5}
"""Folder -> layer; a module may import only from its own layer or those below."""


def project_modules() -> dict[str, str]:
    """Dotted name -> source of every module of graphopt, passes and targets."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path.read_text()
    return modules


def folder(module: str) -> Optional[str]:
    """The layered folder a graphopt module belongs to (None for other packages)."""
    parts = module.split(".")
    if parts[0] != "graphopt":
        return None
    if len(parts) == 1:
        return "root"
    if parts[1] == "errors":
        return "errors"
    return parts[1] if parts[1] in LAYERS and parts[1] != "root" else "root"


def imports(module: str, source: str, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported graphopt module, line) for every import statement in `source`; `from m
    import x` counts as importing m.x when that is a module of `known`."""
    is_package = any(k.startswith(module + ".") for k in known)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno


def check_layers(modules: dict[str, str]) -> list[str]:
    """Every import of a higher layer, and every circle between folders, as messages."""
    known = set(modules)
    problems = []
    edges: dict[tuple[str, str], str] = {}
    for module, source in sorted(modules.items()):
        here = folder(module)
        for imported, line in imports(module, source, known):
            there = folder(imported)
            if there is None or here is None:
                continue
            where = f"{module} (line {line}) imports {imported}"
            if here == "errors":
                problems.append(f"{where}: graphopt.errors must import nothing from graphopt")
            elif LAYERS[there] > LAYERS[here]:
                problems.append(f"{where}: {there} is a layer above {here}")
            if there != here:
                edges.setdefault((here, there), where)
    view = nx.DiGraph(list(edges))
    for cycle in nx.simple_cycles(view):
        steps = [edges[(a, b)] for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        problems.append("folders import each other in a circle: " + "; ".join(steps))
    return problems


def test_no_module_imports_from_a_higher_layer_and_no_folder_circle():
    problems = check_layers(project_modules())
    assert not problems, "\n".join(problems)


def test_every_module_is_in_a_layer():
    modules = project_modules()
    assert {"graphopt.ir.graph", "graphopt.exporters.onnx_export", "graphopt.passes.noops", "graphopt.targets.torch"} <= set(modules)
    assert folder("graphopt.ir.graph") == "ir" and folder("graphopt.api") == "root" and folder("graphopt") == "root"
    assert folder("graphopt.passes.noops") == "passes" and folder("numpy") is None


OLD_CIRCLE = {
    "graphopt.ir.graph": "def to_onnx(self):\n    from graphopt.exporters.onnx_export import to_onnx\n",
    "graphopt.exporters.onnx_export": "from graphopt.frontends.onnx_import import OpaqueAttribute\nfrom graphopt.files import file_mode\n",
    "graphopt.frontends.onnx_import": "from graphopt.ir.graph import Graph\n",
    "graphopt.files": "from graphopt.errors import GraphoptError\n",
    "graphopt.errors": "",
}


def test_finds_the_lazy_import_of_an_exporter_in_the_ir_and_the_circle_it_closes():
    problems = check_layers(OLD_CIRCLE)
    assert "graphopt.ir.graph (line 2) imports graphopt.exporters.onnx_export: exporters is a layer above ir" in problems
    assert "graphopt.exporters.onnx_export (line 2) imports graphopt.files: root is a layer above exporters" in problems
    circles = [p for p in problems if p.startswith("folders import each other in a circle")]
    assert len(circles) == 1  # ir -> exporters -> frontends -> ir
    assert any("graphopt.frontends.onnx_import (line 1) imports graphopt.ir.graph" in c for c in circles)


@pytest.mark.parametrize(
    "modules, expected",
    [
        (
            {"graphopt.frontends.a": "import graphopt.exporters.b\n", "graphopt.exporters.b": "from graphopt.frontends import a\n"},
            "folders import each other in a circle",
        ),
        ({"graphopt.passes.p": "from graphopt.targets.t import x\n", "graphopt.targets.t": ""}, "targets is a layer above passes"),
        ({"graphopt.api": "import graphopt.passes.p\n", "graphopt.passes.p": ""}, "passes is a layer above root"),
        ({"graphopt.errors": "from graphopt.ir import Graph\n", "graphopt.ir": ""}, "graphopt.errors must import nothing"),
        ({"graphopt.ir.graph": "from ..frontends import onnx_import\n", "graphopt.frontends.onnx_import": ""}, "frontends is a layer above ir"),
    ],
)
def test_reports_each_kind_of_violation(modules, expected):
    assert any(expected in problem for problem in check_layers(modules))
