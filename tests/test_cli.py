"""The `graphopt` command: help, inspect, and one-line errors without tracebacks."""

import pathlib
import subprocess
import sys

import pytest

from graphopt.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "inspect" in capsys.readouterr().out


def test_inspect_prints_ir(zoo_onnx, capsys):
    assert main(["inspect", str(zoo_onnx("bert"))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph main_graph (\n  %input_ids: i64[batch, seq]")
    assert "= LayerNormalization(" in out


def test_inspect_ops_histogram(zoo_onnx, capsys):
    assert main(["inspect", "--ops", str(zoo_onnx("llama"))]) == 0
    out = capsys.readouterr().out
    assert "nodes" in out and "MatMul" in out


def test_bad_file_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"graphopt: error: {bad}")
    assert "Traceback" not in result.stderr


def test_console_script_is_installed():
    script = pathlib.Path(sys.executable).parent / "graphopt"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "inspect" in result.stdout
