"""Outputs are written atomically and never over an input; failures leave old outputs intact.

`graphopt optimize` refuses an output path that is its input (by any spelling or link) or a
file its weights are read from; `save_onnx` writes a temporary file in the target folder
and renames it into place, so a pass or a write that fails (an exception, a full disk,
Ctrl-C) leaves the previous output as it was and no temporary file behind.
"""

from __future__ import annotations

import errno
import os
import pathlib

import numpy as np
import pytest

import graphopt
from graphopt.cli import main
from graphopt.exporters import onnx_export
from graphopt.registry import get_pass


def _model(path: pathlib.Path, external_location: str = "", rows: int = 64) -> pathlib.Path:
    """x @ w0 @ w1 -> Relu, f32 weights of rows x rows (inline, or in `external_location`)."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((rows, rows)).astype(np.float32), f"w{i}") for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["g"]),
             helper.make_node("Relu", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["n", rows])],
                              [helper.make_tensor_value_info("y", 1, ["n", rows])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external_location:
        onnx.save(model, str(path), save_as_external_data=True, location=external_location, size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def _state(folder: pathlib.Path) -> dict[str, tuple[bytes, int]]:
    """Every file in `folder`: its bytes and inode (a rewrite in place keeps the inode)."""
    return {p.name: (p.read_bytes(), p.stat().st_ino) for p in sorted(folder.iterdir()) if p.is_file()}


def _run(capsys, *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


@pytest.mark.parametrize("spelling", ["same", "dot-slash", "symlink", "hardlink"])
def test_optimize_refuses_to_write_over_its_input(tmp_path, capsys, spelling, monkeypatch):
    model = _model(tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    output = {"same": str(model), "dot-slash": "./sub/../m.onnx", "symlink": "link.onnx", "hardlink": "hard.onnx"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        os.symlink("m.onnx", tmp_path / "link.onnx")
    if spelling == "hardlink":
        os.link(model, tmp_path / "hard.onnx")
    before = _state(tmp_path)
    status, err = _run(capsys, "optimize", str(model), "-o", output, "-p", "cleanup")
    assert status == 2
    assert "is the input model; write the optimized model to another path" in err
    assert _state(tmp_path) == before


def test_optimize_refuses_to_write_over_its_external_data(tmp_path, capsys):
    model = _model(tmp_path / "m.onnx", external_location="out.onnx.data")
    before = _state(tmp_path)
    status, err = _run(capsys, "optimize", str(model), "-o", str(tmp_path / "out.onnx"), "-p", "cleanup", "--external-data")
    assert status == 2
    assert "out.onnx.data: the graph's weights are read from this file; save to another path" in err
    status, err = _run(capsys, "optimize", str(model), "-o", str(tmp_path / "out.onnx.data"), "-p", "cleanup")
    assert status == 2
    assert "weights are read from this file" in err
    assert _state(tmp_path) == before


def test_api_save_over_a_file_it_reads_weights_from_is_refused(tmp_path):
    model = _model(tmp_path / "m.onnx")
    graph = graphopt.from_onnx(model)
    before = _state(tmp_path)
    with pytest.raises(graphopt.ExportError, match="weights are read from this file"):
        graph.save_onnx(model)
    assert _state(tmp_path) == before


def _previous_output(tmp_path: pathlib.Path, capsys, *extra: str) -> tuple[pathlib.Path, pathlib.Path]:
    (tmp_path / "in").mkdir()
    model = _model(tmp_path / "in" / "m.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status, _ = _run(capsys, "optimize", str(model), "-o", str(out_dir / "o.onnx"), "-p", "cleanup", "-q", *extra)
    assert status == 0
    return model, out_dir


def test_a_crashing_pass_leaves_the_previous_output_intact(tmp_path, capsys, monkeypatch):
    model, out_dir = _previous_output(tmp_path, capsys)
    before = _state(out_dir)

    def crash(self, graph, ctx):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(get_pass("fuse"), "run", crash)
    status, err = _run(capsys, "optimize", str(model), "-o", str(out_dir / "o.onnx"), "-p", "cleanup,fuse")
    assert status == 1
    assert err.strip() == "graphopt: error: pass 'fuse' crashed: RuntimeError: simulated bug (rerun with -v for the traceback)"
    assert _state(out_dir) == before


def test_a_pass_error_leaves_the_previous_output_intact(tmp_path, capsys, monkeypatch):
    model, out_dir = _previous_output(tmp_path, capsys)
    before = _state(out_dir)

    def refuse(self, graph, ctx):
        raise graphopt.GraphoptError("fuse: simulated refusal")

    monkeypatch.setattr(get_pass("fuse"), "run", refuse)
    status, err = _run(capsys, "optimize", str(model), "-o", str(out_dir / "o.onnx"), "-p", "fuse")
    assert (status, err.strip()) == (2, "graphopt: error: fuse: simulated refusal")
    assert _state(out_dir) == before


@pytest.mark.parametrize("failure", ["disk-full", "interrupt"])
def test_a_failed_write_leaves_the_previous_output_and_no_temporary_files(tmp_path, capsys, monkeypatch, failure):
    model, out_dir = _previous_output(tmp_path, capsys, "--external-data")
    before = _state(out_dir)
    assert set(before) == {"o.onnx", "o.onnx.data"}
    real_write = onnx_export._write_tensor_bytes
    calls = []

    def failing_write(tensor, handle, *args):
        calls.append(tensor)
        if len(calls) == 2:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device") if failure == "disk-full" else KeyboardInterrupt()
        return real_write(tensor, handle, *args)

    monkeypatch.setattr(onnx_export, "_write_tensor_bytes", failing_write)
    status, err = _run(capsys, "optimize", str(model), "-o", str(out_dir / "o.onnx"), "-p", "cleanup", "-q", "--external-data")
    if failure == "disk-full":
        assert (status, err.strip()) == (2, "graphopt: error: [Errno 28] No space left on device")
    else:
        assert (status, err.strip()) == (130, "graphopt: interrupted")
    assert _state(out_dir) == before


def test_a_new_output_replaces_the_old_file_instead_of_rewriting_it(tmp_path, capsys):
    """A reader that opened the previous output keeps reading it whole (rename, not truncate)."""
    model, out_dir = _previous_output(tmp_path, capsys)
    output = out_dir / "o.onnx"
    old_bytes = output.read_bytes()
    with open(output, "rb") as reader:
        status, _ = _run(capsys, "optimize", str(model), "-o", str(output), "-p", "fuse", "-q")
        assert status == 0
        assert reader.read() == old_bytes
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.onnx"]
    graphopt.from_onnx(output).verify()
