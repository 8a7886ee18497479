"""The same input and pipeline give byte-identical output files.

Zoo models (both exporters) go through `graphopt optimize -p cleanup,fuse` twice in this
process, and one model twice in fresh processes with different hash seeds (so set and dict
orders of strings differ between the runs); the written files (model and external data)
must be equal byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from graphopt.cli import main

PIPELINE = "cleanup,fuse"


@pytest.mark.slow
@pytest.mark.parametrize("name, dynamo", [("bert", False), ("llama", True), ("gpt2", False)])
def test_two_runs_write_identical_bytes(zoo_onnx, tmp_path, name, dynamo):
    model = zoo_onnx(name, dynamo=dynamo)
    written = []
    for run in range(2):
        out = tmp_path / f"run{run}" / "out.onnx"
        out.parent.mkdir()
        assert main(["optimize", str(model), "-o", str(out), "-p", PIPELINE, "-q", "--external-data"]) == 0
        written.append({p.name: p.read_bytes() for p in sorted(out.parent.iterdir())})
    assert set(written[0]) == {"out.onnx", "out.onnx.data"}
    assert written[0] == written[1]


@pytest.mark.slow
def test_two_processes_with_different_hash_seeds_write_identical_bytes(zoo_onnx, tmp_path):
    model = zoo_onnx("llama", dynamo=False)
    written = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"out{hash_seed}.onnx"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        done = subprocess.run(
            [sys.executable, "-m", "graphopt.cli", "optimize", str(model), "-o", str(out), "-p", PIPELINE, "-q"],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert done.returncode == 0, done.stderr
        written.append(out.read_bytes())
    assert written[0] == written[1]
