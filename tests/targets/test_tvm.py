"""The `tvm` target: parity with ONNX Runtime on the zoo, dynamic batch, save/load, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tvm")

from conftest import ROUNDTRIP_ARCHITECTURES, max_abs_diff  # noqa: E402

from graphopt.api import compile, load_compiled  # noqa: E402
from graphopt.errors import UnsupportedOpError  # noqa: E402
from graphopt.ir.graph import Graph  # noqa: E402
from graphopt.ir.dtypes import DType  # noqa: E402
from graphopt.ir.types import TensorType  # noqa: E402
from graphopt.target_base import TargetError  # noqa: E402
from graphopt.target_registry import get_target  # noqa: E402


def _ort_outputs(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


def _feeds(zoo, name: str, batch: int) -> dict[str, np.ndarray]:
    """The zoo's batch-2 inputs cut or repeated to `batch` rows (no second model build)."""
    inputs = {k: v.numpy() for k, v in zoo(name).inputs.items()}
    return {k: np.concatenate([v] * batch)[:batch] for k, v in inputs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_tvm_matches_onnxruntime_on_zoo_for_batch_1_and_3_from_one_build(zoo, zoo_onnx, name):
    path = zoo_onnx(name)
    compiled = compile(str(path), "tvm:llvm", "fuse")
    for batch in (1, 3):
        feeds = _feeds(zoo, name, batch)
        outputs = compiled(**{n: feeds[n] for n in compiled.input_names})
        assert outputs[0].shape[0] == batch
        assert max_abs_diff(_ort_outputs(path, feeds), outputs) <= 1e-4, f"{name}, batch {batch}"


def _reshape_graph() -> Graph:
    """y = Relu(Reshape(x, [Shape(x)[0], -1]) @ w): shape arithmetic on a symbolic batch."""
    graph = Graph("reshape", opset_imports={"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 2, 3)))
    first = graph.add_node("Gather", [graph.add_node("Shape", [x]).output, graph.add_constant("zero", np.array(0, np.int64))], {"axis": 0}).output
    shape = graph.add_node("Concat", [graph.add_node("Unsqueeze", [first, graph.add_constant("axes", np.array([0], np.int64))]).output,
                                      graph.add_constant("rest", np.array([-1], np.int64))], {"axis": 0}).output
    flat = graph.add_node("Reshape", [x, shape]).output
    weight = graph.add_constant("w", np.arange(6 * 5, dtype=np.float32).reshape(6, 5) / 10 - 1)
    graph.set_outputs([graph.add_node("Relu", [graph.add_node("MatMul", [flat, weight]).output]).output])
    graph.rename_value(graph.outputs[0], "y")
    return graph


def _reshape_expected(x: np.ndarray) -> np.ndarray:
    return np.maximum(x.reshape(x.shape[0], -1) @ (np.arange(30, dtype=np.float32).reshape(6, 5) / 10 - 1), 0)


def test_tvm_evaluates_shape_arithmetic_on_a_symbolic_batch():
    compiled = compile(_reshape_graph(), "tvm:llvm", "cleanup")
    for batch in (1, 4, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 2, 3)).astype(np.float32)
        np.testing.assert_allclose(compiled(x)[0], _reshape_expected(x), rtol=1e-5, atol=1e-5)


def test_tvm_model_saved_and_loaded_in_a_fresh_process_gives_the_same_outputs(tmp_path, zoo, zoo_onnx):
    compiled = compile(str(zoo_onnx("llama")), "tvm:llvm", "fuse")
    folder = compiled.save(tmp_path / "artifact")
    feeds = _feeds(zoo, "llama", 2)
    np.savez(tmp_path / "feeds.npz", **feeds)
    script = (
        "import numpy as np, sys, graphopt.api as api;"
        "m = api.load_compiled(sys.argv[1]); feeds = dict(np.load(sys.argv[2]));"
        "np.save(sys.argv[3], m(**{n: feeds[n] for n in m.input_names})[0])"
    )
    subprocess.run([sys.executable, "-c", script, folder, str(tmp_path / "feeds.npz"), str(tmp_path / "y.npy")], check=True)
    expected = compiled(**{n: feeds[n] for n in compiled.input_names})[0]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == ["manifest.json", "model.so", "params.npz"]
    np.testing.assert_array_equal(load_compiled(folder)(**{n: feeds[n] for n in compiled.input_names})[0], expected)


def test_tvm_names_the_node_and_op_it_cannot_run():
    graph = _reshape_graph()
    graph.set_outputs([graph.add_node("NonZero", [graph.outputs[0]]).output])
    with pytest.raises(UnsupportedOpError) as info:
        compile(graph, "tvm:llvm", "eliminate-common-subexpressions")
    assert "target 'tvm:llvm' cannot run 1 node(s): NonZero (" in str(info.value)
    assert graph.nodes[-1].label in str(info.value)


@pytest.mark.parametrize("spec, message", [
    ("tvm{num_cores=-2}", "target 'tvm': num_cores must be >= 0 (0: all cores), got -2"),
    ("tvm{num_cores=two}", "target 'tvm': option 'num_cores' must be int, got 'two'"),
    ("tvm{tune=1}", "target 'tvm' has no option 'tune' (options: mcpu, num_cores)"),
    ("tvm{mcpu='-O3 x'}", "target 'tvm': mcpu must be an LLVM CPU name such as 'znver4' or 'skylake-avx512', got '-O3 x'"),
    ("tvm:gpu", "target 'tvm' has no variant 'gpu'; use one of llvm, cuda"),
])
def test_bad_tvm_options_raise_errors_naming_the_option(spec, message):
    with pytest.raises(TargetError) as info:
        get_target(spec)
    assert str(info.value) == message


def test_an_mcpu_llvm_does_not_know_is_refused_naming_the_option():
    with pytest.raises(TargetError) as info:
        compile(_reshape_graph(), "tvm:llvm{mcpu=notacpu}", "cleanup")
    assert str(info.value) == "target 'tvm:llvm{mcpu='notacpu'}' cannot run here: LLVM does not know the CPU in option mcpu='notacpu'"


def test_graphopt_ops_without_a_relax_rule_are_decomposed_first(monkeypatch):
    from graphopt.ir.schema import GRAPHOPT_DOMAIN
    from graphopt.targets import tvm_relax

    graph = _reshape_graph()
    graph.set_outputs([graph.add_node("Gelu", [graph.outputs[0]], domain=GRAPHOPT_DOMAIN).output])
    monkeypatch.delitem(tvm_relax._RULES, (GRAPHOPT_DOMAIN, "Gelu"))
    compiled = compile(graph, "tvm:llvm", "eliminate-common-subexpressions")
    x = np.random.default_rng(0).standard_normal((2, 2, 3)).astype(np.float32)
    y = _reshape_expected(x)
    from math import erf

    expected = 0.5 * y * (1 + np.vectorize(erf)(y / np.sqrt(2)))
    np.testing.assert_allclose(compiled(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_gather_nd_wraps_negative_indices_on_a_symbolic_axis():
    graph = Graph("gather_nd", opset_imports={"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 3, 4)))
    indices = graph.add_constant("indices", np.array([[0, -1], [-1, 2]], np.int64))
    graph.set_outputs([graph.add_node("GatherND", [x, indices]).output])
    compiled = compile(graph, "tvm:llvm", "eliminate-common-subexpressions")
    data = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    np.testing.assert_array_equal(compiled(data)[0], np.stack([data[0, -1], data[-1, 2]]))
