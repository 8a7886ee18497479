"""A small run of benchmarks/large_model.py: memory does not grow with the weights.

Five 40 MiB external-data MatMul weights (200 MiB) go through `cleanup,fuse`, a save with
external data and a reload in a fresh process; the weights come back bit-exact (sampled
rows) and the peak resident set grows by less than a quarter of the weight bytes over the
process's size after imports (the full 2.5 GiB run is the benchmark itself).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "large_model.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("large_model_benchmark", _SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_200_mib_model_round_trips_without_memory_growing_with_the_weights(tmp_path):
    bench = _benchmark()
    model, weight_bytes = bench.write_model(str(tmp_path), weight_mib=40, count=5)
    result = bench.measure(model, str(tmp_path / "optimized.onnx"))
    assert result["weight_bytes"] == weight_bytes >= 200 * 2**20
    assert result["ops_after"]["MatMul"] == 5
    assert not {"Transpose", "Erf", "Div"} & set(result["ops_after"]), result["ops_after"]
    growth = result["peak_bytes"] - result["baseline_bytes"]
    print(f"peak growth {growth / 2**20:.0f} MiB for {weight_bytes / 2**20:.0f} MiB of weights")
    assert growth < 0.25 * weight_bytes
    assert result["peak_bytes"] < 2 * weight_bytes
