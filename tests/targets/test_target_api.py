"""The target interface: spec parsing, option validation, calling, saving and loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from graphopt.api import compile, load_compiled
from graphopt.cli import main
from graphopt.errors import UnsupportedOpError
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph
from graphopt.ir.types import TensorType
from graphopt.target_base import TargetError, TargetSpec
from graphopt.target_registry import get_target, registered_targets


def _small_graph() -> Graph:
    graph = Graph("small", opset_imports={"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4)))
    w = graph.add_constant("w", np.arange(12, dtype=np.float32).reshape(4, 3) / 10)
    y = graph.add_node("MatMul", [x, w]).output
    graph.set_outputs([graph.add_node("Relu", [y]).output])
    graph.rename_value(graph.outputs[0], "y")
    return graph


def _expected(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ (np.arange(12, dtype=np.float32).reshape(4, 3) / 10), 0)


@pytest.mark.parametrize("text, expected", [
    ("onnxruntime", TargetSpec("onnxruntime")),
    ("onnxruntime:cuda", TargetSpec("onnxruntime", "cuda")),
    ("tvm:llvm{mcpu=znver4, tune_trials=64}", TargetSpec("tvm", "llvm", {"mcpu": "znver4", "tune_trials": 64})),
    (" torch : cpu ", TargetSpec("torch", "cpu")),
])
def test_target_spec_parses_name_variant_and_options(text, expected):
    assert TargetSpec.parse(text) == expected


@pytest.mark.parametrize("spec, message", [
    ("onnx runtime", "cannot read target spec 'onnx runtime': 'onnx runtime' is not a name"),
    ("onnxruntime{threads=}", "target 'onnxruntime': option 'threads' must be int, got ''"),
    ("onnxruntime{threads=2", "cannot read target spec 'onnxruntime{threads=2': unbalanced '{'"),
    ("onnxruntime:{threads=2}", "cannot read target spec 'onnxruntime:{threads=2}': '' after ':' is not a variant name"),
    ("onnxruntime{threads=2,threads=3}", "cannot read target spec 'onnxruntime{threads=2,threads=3}': option 'threads' is given twice"),
    ("onnxruntme", "unknown target 'onnxruntme'; did you mean 'onnxruntime'?"),
    ("onnxruntime:gpu", "target 'onnxruntime' has no variant 'gpu'; use one of cpu, cuda"),
    ("onnxruntime{threds=2}", "target 'onnxruntime' has no option 'threds' (options: contrib_ops, optimization_level, threads)"),
    ("onnxruntime{threads=two}", "target 'onnxruntime': option 'threads' must be int, got 'two'"),
    ("onnxruntime{threads=-1}", "threads must be >= 0"),
    ("onnxruntime{optimization_level=max}", "option 'optimization_level' must be one of disable, basic, extended, all"),
])
def test_bad_target_specs_raise_errors_naming_the_problem(spec, message):
    with pytest.raises(TargetError) as info:
        get_target(spec)
    assert message in str(info.value)


def test_targets_are_found_through_entry_points():
    assert {"onnxruntime", "torch"} <= set(registered_targets())
    assert str(get_target("onnxruntime{threads=2}").spec) == "onnxruntime:cpu{threads=2}"


@pytest.mark.parametrize("spec", ["onnxruntime", "onnxruntime{contrib_ops=False,optimization_level='disable'}", "torch"])
def test_compiled_model_takes_positional_or_named_numpy_or_torch_inputs(spec):
    import torch

    graph = _small_graph()
    compiled = compile(graph, spec, "cleanup")
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    expected = _expected(x)
    (by_position,) = compiled(x)
    (by_name,) = compiled(x=x)
    (from_torch,) = compiled(torch.from_numpy(x))
    assert isinstance(by_position, np.ndarray) and isinstance(from_torch, torch.Tensor)
    for out in (by_position, by_name, from_torch.numpy()):
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert len(graph.nodes) == 2, "compile must not modify a Graph it is given"


@pytest.mark.parametrize("call, message", [
    (lambda m, x: m(x, x), "the model takes 1 input(s) (x), got 2 positional"),
    (lambda m, x: m(z=x), "the model has no input 'z'; inputs: x"),
    (lambda m, x: m(), "missing input(s): x (the model takes x)"),
    (lambda m, x: m(x, x=x), "input 'x' given both positionally and by name"),
    (lambda m, x: m(x[0]), "input 'x': expected rank 2 [batch, 4], got shape (4,)"),
    (lambda m, x: m(x[:, :3]), "input 'x': dim 1 must be 4 [batch, 4], got shape (5, 3)"),
    (lambda m, x: m(x.astype(np.float64)), "input 'x': expected dtype float32, got float64"),
])
def test_compiled_model_rejects_bad_calls_with_clear_errors(call, message):
    compiled = compile(_small_graph(), "onnxruntime", "cleanup")
    x = np.ones((5, 4), np.float32)
    with pytest.raises(TargetError) as info:
        call(compiled, x)
    assert str(info.value) == message


def test_unsupported_ops_are_named_before_compiling():
    graph = _small_graph()
    graph.add_node("Frobnicate", [graph.outputs[0]], domain="example.custom")
    with pytest.raises(UnsupportedOpError) as info:
        compile(graph, "torch", "eliminate-common-subexpressions")
    assert "target 'torch:cpu' cannot run 1 node(s): example.custom::Frobnicate" in str(info.value)


@pytest.mark.parametrize("spec, artifact", [("onnxruntime", "model.onnx"), ("torch", "graph.onnx")])
def test_saved_artifact_loads_in_a_fresh_process_with_the_same_outputs(tmp_path, spec, artifact):
    compiled = compile(_small_graph(), spec, "cleanup")
    folder = compiled.save(tmp_path / "artifact")
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["target"] == spec and manifest["files"] == [artifact]
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import numpy as np, graphopt.api as api, sys;"
        f"m = api.load_compiled({folder!r}); np.save(sys.argv[1], m(np.load(sys.argv[2]))[0])"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "y.npy"), str(tmp_path / "x.npy")], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), _expected(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(load_compiled(folder)(x)[0], _expected(x), rtol=1e-6, atol=1e-6)


def test_save_replaces_an_artifact_but_refuses_other_folders(tmp_path):
    compiled = compile(_small_graph(), "onnxruntime", "cleanup")
    compiled.save(tmp_path / "a")
    compiled.save(tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["manifest.json", "model.onnx"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(TargetError, match="folder is not empty and holds no graphopt artifact"):
        compiled.save(tmp_path / "b")
    assert os.listdir(tmp_path / "b") == ["notes.txt"]
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_load_compiled_rejects_missing_or_escaping_files(tmp_path):
    with pytest.raises(TargetError, match="not a compiled graphopt model"):
        load_compiled(tmp_path)
    folder = compile(_small_graph(), "onnxruntime", "cleanup").save(tmp_path / "a")
    manifest_path = os.path.join(folder, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    manifest["files"] = ["../outside.onnx"]
    open(manifest_path, "w").write(json.dumps(manifest))
    with pytest.raises(TargetError, match="artifact file '../outside.onnx' is missing or outside the folder"):
        load_compiled(folder)


def test_compile_of_a_module_leaves_it_unchanged():
    import torch

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5), torch.nn.ReLU()).train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(2, 4)
    compiled = compile(module, "torch", "fuse", example_inputs=(x,))
    assert module.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    with torch.no_grad():
        expected = module.eval()(x)
    torch.testing.assert_close(compiled(x)[0], expected)


def test_cli_compile_run_and_targets(tmp_path, capsys):
    source = tmp_path / "m.onnx"
    _small_graph().save_onnx(source)
    assert main(["compile", str(source), "-t", "onnxruntime{threads=1}", "-o", str(tmp_path / "art"), "-q"]) == 0
    x = np.ones((2, 4), np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(tmp_path / "art"), "-i", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["y"], _expected(x), rtol=1e-6)
    assert "y: float32 [2, 3]" in capsys.readouterr().out
    assert main(["compile", str(source), "-t", "nope", "-o", str(tmp_path / "x")]) == 2
    assert "graphopt: error: unknown target 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["targets", "--json"]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert listed["onnxruntime"]["variants"] == ["cpu", "cuda"] and listed["onnxruntime"]["available"] is None


def test_saved_files_get_the_usual_permissions_not_temporary_ones(tmp_path):
    import stat

    from graphopt.exporters.files import file_mode, folder_mode

    graph = _small_graph()
    graph.save_onnx(tmp_path / "m.onnx")
    folder = compile(graph, "onnxruntime", "cleanup").save(tmp_path / "artifact")
    assert stat.S_IMODE(os.stat(tmp_path / "m.onnx").st_mode) == file_mode()
    assert stat.S_IMODE(os.stat(folder).st_mode) == folder_mode()
    assert stat.S_IMODE(os.stat(os.path.join(folder, "model.onnx")).st_mode) == file_mode()


@pytest.mark.parametrize("target", ["torch", "onnxruntime", "tvm:llvm"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_scalar_inputs_and_outputs_keep_their_0d_shape(target, kind):
    import torch

    graph = Graph("scalar", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ()))
    graph.set_outputs([graph.add_node("Neg", [x], output_names=["y"]).output])
    compiled = compile(graph, target, "cleanup")
    value = np.array(2.0, np.float32)
    (out,) = compiled(torch.from_numpy(value) if kind == "torch" else value)
    assert tuple(out.shape) == () and float(out) == -2.0


def test_torch_target_takes_and_gives_bfloat16_and_float8_numpy_arrays():
    import ml_dtypes

    graph = Graph("low_precision")
    for name, dtype in (("b", DType.BFLOAT16), ("f8", DType.FLOAT8E4M3FN)):
        value = graph.add_input(name, TensorType(dtype, (3,)))
        widened = graph.add_node("Cast", [value], {"to": int(DType.FLOAT)}, output_names=[f"{name}_f32"])
        copy = graph.add_node("Identity", [value], output_names=[f"{name}_copy"])
        graph.set_outputs(list(graph.outputs) + [widened.output, copy.output])
    model = compile(graph, target="torch")
    b = np.array([1.5, 2.25, -3.0], dtype=ml_dtypes.bfloat16)
    f8 = np.array([0.5, -448.0, 3.0], dtype=ml_dtypes.float8_e4m3fn)
    b32, b_copy, f32, f8_copy = model(b, f8)
    np.testing.assert_array_equal(b32, b.astype(np.float32))
    np.testing.assert_array_equal(f32, f8.astype(np.float32))
    assert b_copy.dtype == b.dtype and f8_copy.dtype == f8.dtype
    np.testing.assert_array_equal(b_copy.view(np.uint16), b.view(np.uint16))
    np.testing.assert_array_equal(f8_copy.view(np.uint8), f8.view(np.uint8))


@pytest.mark.parametrize("spec", ["onnxruntime", "torch"])
def test_sequence_and_optional_inputs_pass_through_as_lists_and_none(spec):
    import onnx
    from onnx import TensorProto, helper

    seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, None))
    opt = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["xs"], ["ys"]), helper.make_node("Identity", ["maybe"], ["still"])], "seq",
        [helper.make_value_info("xs", seq), helper.make_value_info("maybe", opt)],
        [helper.make_value_info("ys", seq), helper.make_value_info("still", opt)],
    )
    model = compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), target=spec)
    ragged = [np.arange(3, dtype=np.float32), np.ones((2, 2), dtype=np.float32)]
    ys, still = model(ragged, np.array([1.0, 2.0], dtype=np.float32))
    assert isinstance(ys, list) and [y.shape for y in ys] == [(3,), (2, 2)]
    for y, x in zip(ys, ragged):
        np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(still, [1.0, 2.0])


def test_a_list_for_a_tensor_input_is_refused_naming_the_input():
    graph = Graph("tensor_in")
    x = graph.add_input("x", TensorType(DType.FLOAT, (2,)))
    graph.set_outputs([graph.add_node("Relu", [x]).output])
    model = compile(graph, target="onnxruntime")
    with pytest.raises(TargetError, match="input 'x' is a tensor: pass an array, not list"):
        model([np.zeros(2, np.float32), np.zeros(3, np.float32)])
