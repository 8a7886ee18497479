"""Peak memory of `cleanup,fuse` and a save/load round trip on a large external-data model.

    python benchmarks/large_model.py [--weight-mib 512] [--count 5] [--dir /tmp]

Builds, in a temporary folder (removed at the end), a model of `--count` MatMul layers whose
weights (`--weight-mib` MiB of float32 each, 2.5 GiB by default as in ANCHORS.md) sit in one
external-data file written a chunk at a time (16 MiB of patterned data), with a bias Add,
an erf-GELU written out in five ops and a pair of Transposes after each MatMul, so both
`cleanup` and `fuse` have work. Then a fresh process loads it, runs `cleanup,fuse`, saves
the result with external data, loads that back, verifies it and checks sampled rows of
every weight against the source. It reports the peak resident set (VmHWM, which counts
mapped weight pages that were touched) as a multiple of the weight bytes, and its growth
over the process's size after imports. ANCHORS.md bar: below 2x; onnx-ir reached 0.04x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

CHUNK_BYTES = 16 * 2**20
DATA_FILE = "weights.data"


def _shapes(weight_mib: int, count: int) -> list[tuple[int, int]]:
    """Alternating [d, 2d] and [2d, d] float32 weights of `weight_mib` MiB each."""
    elements = weight_mib * 2**20 // 4
    d = int(round((elements / 2) ** 0.5))
    return [(d, 2 * d) if i % 2 == 0 else (2 * d, d) for i in range(count)]


def _chunk(index: int, start: int, size: int) -> np.ndarray:
    """Deterministic data for elements [start, start + size) of weight `index`, small values."""
    positions = np.arange(start, start + size, dtype=np.int64)
    return (((positions * 2654435761 + index * 97) % 2001) - 1000).astype(np.float32) * np.float32(1e-5)


def write_model(folder: str, weight_mib: int = 512, count: int = 5) -> tuple[str, int]:
    """Write model.onnx + weights.data into `folder`; return (model path, weight bytes)."""
    from onnx import TensorProto, helper, numpy_helper

    shapes = _shapes(weight_mib, count)
    inits, nodes, offset = [], [], 0
    with open(os.path.join(folder, DATA_FILE), "wb") as data:
        for index, (rows, cols) in enumerate(shapes):
            total = rows * cols
            per_chunk = CHUNK_BYTES // 4
            for start in range(0, total, per_chunk):
                data.write(_chunk(index, start, min(per_chunk, total - start)).tobytes())
            tensor = TensorProto(name=f"w{index}", data_type=TensorProto.FLOAT, dims=[rows, cols])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(total * 4))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            inits.append(tensor)
            offset += total * 4
    previous = "x"
    for index, (rows, cols) in enumerate(shapes):
        inits.append(numpy_helper.from_array(np.full(cols, 0.01, np.float32), f"b{index}"))
        p = f"l{index}_"
        nodes += [
            helper.make_node("MatMul", [previous, f"w{index}"], [p + "mm"]),
            helper.make_node("Add", [p + "mm", f"b{index}"], [p + "h"]),
            helper.make_node("Div", [p + "h", "sqrt2"], [p + "scaled"]),
            helper.make_node("Erf", [p + "scaled"], [p + "erf"]),
            helper.make_node("Add", [p + "erf", "one"], [p + "erf1"]),
            helper.make_node("Mul", [p + "h", p + "erf1"], [p + "prod"]),
            helper.make_node("Mul", [p + "prod", "half"], [p + "gelu"]),
            helper.make_node("Transpose", [p + "gelu"], [p + "t"], perm=[1, 0]),
            helper.make_node("Transpose", [p + "t"], [p + "out"], perm=[1, 0]),
        ]
        previous = p + "out"
    for name, value in (("sqrt2", 2**0.5), ("one", 1.0), ("half", 0.5)):
        inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
    graph = helper.make_graph(
        nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", shapes[0][0]])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["n", shapes[-1][1]])], inits,
    )
    path = os.path.join(folder, "model.onnx")
    with open(path, "wb") as handle:
        handle.write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path, offset


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(entry for entry in status if entry.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child(model: str, output: str) -> dict[str, Any]:
    """In a fresh process: load, cleanup+fuse, save, load back, verify, compare rows."""
    import onnx  # noqa: F401  (imported before the baseline: it is not the model's memory)
    import onnxruntime  # noqa: F401

    import graphopt

    baseline = _vm_hwm_bytes()
    start = time.perf_counter()
    graph = graphopt.optimize(model, "cleanup,fuse")
    optimized = time.perf_counter()
    ops = graph.op_counts()
    graph.save_onnx(output, external_data=True)
    saved = time.perf_counter()
    again = graphopt.from_onnx(output)
    again.verify()
    source = graphopt.from_onnx(model)
    weights = 0
    for name, value in source.constants.items():
        tensor = value.const
        if tensor.nbytes < 2**20:
            continue
        weights += tensor.nbytes
        original, copy = tensor.numpy(), again.constants[name].const.numpy()
        for row in (0, original.shape[0] // 2, original.shape[0] - 1):
            if not np.array_equal(original[row], copy[row]):
                raise SystemExit(f"weight {name} row {row} differs after the round trip")
    return {
        "weight_bytes": weights, "baseline_bytes": baseline, "peak_bytes": _vm_hwm_bytes(),
        "optimize_s": optimized - start, "save_s": saved - optimized, "reload_verify_s": time.perf_counter() - saved,
        "ops_after": ops, "nodes_before": len(source), "nodes_after": sum(ops.values()),
    }


def measure(model: str, output: str) -> dict[str, Any]:
    """Run `child` in a fresh interpreter (so earlier allocations do not count)."""
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", model, output],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight-mib", type=int, default=512, help="MiB per weight (default 512)")
    parser.add_argument("--count", type=int, default=5, help="number of MatMul weights (default 5)")
    parser.add_argument("--dir", default=None, help="where to make the temporary folder (default: the system's)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    folder = tempfile.mkdtemp(prefix="graphopt-large-", dir=args.dir)
    try:
        start = time.perf_counter()
        model, weight_bytes = write_model(folder, args.weight_mib, args.count)
        print(f"wrote {weight_bytes / 2**30:.2f} GiB of weights in {time.perf_counter() - start:.1f} s to {folder}")
        result = measure(model, os.path.join(folder, "optimized.onnx"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    weights = result["weight_bytes"]
    print(f"nodes {result['nodes_before']} -> {result['nodes_after']} ({result['ops_after']})")
    print(f"optimize {result['optimize_s']:.1f} s, save {result['save_s']:.1f} s, reload+verify+compare {result['reload_verify_s']:.1f} s")
    print(f"peak RSS (VmHWM) {result['peak_bytes'] / 2**20:.0f} MiB = {result['peak_bytes'] / weights:.3f}x the "
          f"{weights / 2**20:.0f} MiB of weights; growth after imports {(result['peak_bytes'] - result['baseline_bytes']) / 2**20:.0f} MiB "
          f"= {(result['peak_bytes'] - result['baseline_bytes']) / weights:.3f}x (bar: < 2x; onnx-ir 0.04x)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
