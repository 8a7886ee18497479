"""The example plug-in package (examples/custom_pass): pip-installed, found through its entry
point by the `graphopt` command, and working end to end; uninstalled afterwards."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Iterator

import numpy as np
import pytest

from graphopt import DType, Graph, TensorType
from graphopt.check import run_graph, sample_inputs
from graphopt.frontends.onnx_import import from_onnx

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "custom_pass"
DISTRIBUTION = "graphopt-example-pass"
GRAPHOPT = pathlib.Path(sys.executable).parent / "graphopt"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _installed() -> bool:
    try:
        importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _can_build_offline() -> bool:
    """setuptools builds wheels by itself from 70.1; older ones need the wheel package."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    major, minor = (int(part) for part in importlib.metadata.version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Iterator[None]:
    """Install a copy of the example (so no build files land in the repository); uninstall after."""
    if not _can_build_offline():
        pytest.skip("building the example offline needs setuptools>=70.1 (or setuptools and wheel)")
    if _installed():
        pytest.skip(f"{DISTRIBUTION} is already installed; this test installs and removes it itself")
    source = tmp_path_factory.mktemp("custom_pass") / "custom_pass"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = _pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(source))
    assert result.returncode == 0, result.stderr
    try:
        yield
    finally:
        _pip("uninstall", "--yes", "--quiet", DISTRIBUTION)
        assert not _installed(), f"{DISTRIBUTION} is still installed"


def _double_negation_model(path: pathlib.Path) -> pathlib.Path:
    """y = Neg(Neg(x)) + x, and z = Neg(Neg(x)) as a graph output of its own."""
    graph = Graph("double_negation")
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4)))
    twice = graph.add_node("Neg", [graph.add_node("Neg", [x]).output], output_names=["z"])
    total = graph.add_node("Add", [twice.output, x], output_names=["y"])
    graph.set_outputs([total.output, twice.output])
    graph.save_onnx(path)
    return path


def _graphopt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(GRAPHOPT), *args], capture_output=True, text=True)


def test_passes_lists_the_plugin(installed_example):
    result = _graphopt("passes")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^fold-double-negation +Remove double negations: Neg\(Neg\(x\)\) -> x\.$", result.stdout, re.M)
    assert "limit: Optional[int] = None" in result.stdout
    assert "erase_inner: bool = True" in result.stdout


def test_optimize_with_the_plugin(installed_example, tmp_path):
    source = _double_negation_model(tmp_path / "in.onnx")
    target = tmp_path / "out.onnx"
    result = _graphopt("optimize", str(source), "-o", str(target), "-p", "fold-double-negation", "--check")
    assert result.returncode == 0, result.stderr
    assert "fold-double-negation" in result.stdout and "folded=1" in result.stdout
    before, after = from_onnx(source), from_onnx(target)
    assert before.op_counts()["Neg"] == 2 and "Neg" not in after.op_counts()
    assert [v.name for v in after.outputs] == ["y", "z"]
    feeds = sample_inputs(before)
    for want, got in zip(run_graph(before, feeds), run_graph(after, feeds)):
        np.testing.assert_array_equal(want, got)


def _pre_norm_model(path: pathlib.Path) -> pathlib.Path:
    """y = LayerNorm(x + skip); out = (x + skip) + y: the residual sum is read twice."""
    graph = Graph("pre_norm", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4)))
    skip = graph.add_input("skip", TensorType(DType.FLOAT, ("batch", 4)))
    scale = graph.add_constant("scale", np.linspace(0.5, 2.0, 4, dtype=np.float32))
    bias = graph.add_constant("bias", np.linspace(-1.0, 1.0, 4, dtype=np.float32))
    total = graph.add_node("Add", [x, skip], output_names=["sum"]).output
    y = graph.add_node("LayerNormalization", [total, scale, bias], {"axis": -1}, output_names=["y"]).output
    graph.set_outputs([graph.add_node("Add", [total, y], output_names=["out"]).output])
    graph.save_onnx(path)
    return path


def test_multi_output_rewrite_plugin(installed_example, tmp_path):
    listed = _graphopt("passes")
    assert re.search(r"^fuse-residual-norm +Fold a residual Add whose sum is also read elsewhere", listed.stdout, re.M)
    source = _pre_norm_model(tmp_path / "in.onnx")
    target = tmp_path / "out.onnx"
    result = _graphopt("optimize", str(source), "-o", str(target), "-p", "fuse-residual-norm", "--check")
    assert result.returncode == 0, result.stderr
    assert "fuse-residual-norm" in result.stdout and "fused=1" in result.stdout
    before, after = from_onnx(source), from_onnx(target)  # saved as standard ONNX ops again
    assert [v.name for v in after.outputs] == ["out"]
    feeds = sample_inputs(before)
    for want, got in zip(run_graph(before, feeds), run_graph(after, feeds)):
        np.testing.assert_allclose(want, got, atol=1e-5)
