"""Check that graphopt installs and works without its test extras.

    pip install -c constraints/test.txt torch==2.13.0 -e .   # no [test]
    python scripts/check_bare_install.py

CI runs this before it adds the test extras. It fails (exit 1, naming the problem) if a test-only
package is importable, if `import graphopt` pulls in a heavy dependency, if a built-in pass or
target does not load through its entry point, if the CLI cannot optimize a small ONNX model, or
if a Hugging Face MODEL does not name the `hf` extra that it needs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

TEST_ONLY = ("transformers", "pytest", "hypothesis", "tvm", "matplotlib")
HEAVY = ("torch", "onnxruntime", "tvm", "transformers", "matplotlib", "tensorrt")


def _fail(message: str) -> None:
    print(f"check_bare_install: {message}", file=sys.stderr)
    sys.exit(1)


def _small_model(path: str) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Identity", ["y"], ["z"]),
        helper.make_node("Relu", ["z"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "bare", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])], [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def main() -> None:
    present = [name for name in TEST_ONLY if importlib.util.find_spec(name) is not None]
    if present:
        _fail(f"test-only packages are installed, so this is not a bare install: {', '.join(present)}")

    import graphopt  # noqa: F401  (the import itself is the check)

    heavy = [name for name in HEAVY if name in sys.modules]
    if heavy:
        _fail(f"`import graphopt` imports {', '.join(heavy)}; heavy dependencies must load lazily")

    from graphopt.registry import registered_passes
    from graphopt.target_registry import registered_targets

    passes, targets = registered_passes(), registered_targets()
    for needed in ("cleanup", "fuse", "quantize"):
        if needed not in passes:
            _fail(f"built-in pass '{needed}' did not load through the graphopt.passes entry point")
    for needed in ("onnxruntime", "torch", "tvm", "tensorrt"):
        if needed not in targets:
            _fail(f"built-in target '{needed}' did not load through the graphopt.targets entry point")

    with tempfile.TemporaryDirectory() as folder:
        source, optimized = os.path.join(folder, "in.onnx"), os.path.join(folder, "out.onnx")
        _small_model(source)
        command = [sys.executable, "-m", "graphopt.cli", "optimize", source, "-o", optimized, "-p", "cleanup", "--check"]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0 or not os.path.exists(optimized):
            _fail(f"`graphopt optimize` failed on a small model:\n{run.stdout}{run.stderr}")
        command = [sys.executable, "-m", "graphopt.cli", "export", "hf:bert", "-o", os.path.join(folder, "bert.onnx")]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 2 or "pip install 'graphopt[hf]'" not in run.stderr:
            _fail(f"`graphopt export hf:bert` without transformers must say to install graphopt[hf]:\n{run.stdout}{run.stderr}")
    print(f"bare install ok: graphopt {graphopt.__version__}, "
          f"{len(passes)} passes, {len(targets)} targets load without the test extras")


if __name__ == "__main__":
    main()
