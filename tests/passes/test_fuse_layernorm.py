"""fuse-layernorm: decomposed layer norms become LayerNormalization (one rule over the canonical
form, plus the affine parts taken in), also below opset 17."""

import numpy as np
import onnx
import pytest

import graphopt
from graphopt import DType, Graph, PipelineError, TensorType
from graphopt.check import max_abs_error, run_graph

AFFINE_FORMS = ("scale-shift", "scale", "none")


def _layernorm_graph(opset: int, *, pow_square: bool, affine, reciprocal: bool = False, axes=(-1,), gamma_first: bool = True) -> Graph:
    """affine: True/"scale-shift", "scale", or False/"none"."""
    affine = {True: "scale-shift", False: "none"}.get(affine, affine)
    graph = Graph("ln", {"": opset})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", "seq", 16)))
    rng = np.random.default_rng(0)

    def mean(value):
        if opset >= 18:
            return graph.add_node("ReduceMean", [value, graph.add_constant(graph.unique_name("axes"), np.array(axes, np.int64))], {"keepdims": 1}).output
        return graph.add_node("ReduceMean", [value], {"axes": axes, "keepdims": 1}).output

    def const(value):
        return graph.add_constant(graph.unique_name("c"), np.asarray(value, np.float32))

    centered = graph.add_node("Sub", [x, mean(x)]).output
    square = graph.add_node("Pow", [centered, const(2.0)]) if pow_square else graph.add_node("Mul", [centered, centered])
    root = graph.add_node("Sqrt", [graph.add_node("Add", [mean(square.output), const(1e-6)]).output]).output
    if reciprocal:
        y = graph.add_node("Mul", [centered, graph.add_node("Reciprocal", [root]).output]).output
    else:
        y = graph.add_node("Div", [centered, root]).output
    if affine != "none":
        gamma = const(rng.standard_normal(16))
        y = graph.add_node("Mul", [gamma, y] if gamma_first else [y, gamma]).output
    if affine == "scale-shift":
        y = graph.add_node("Add", [y, const(rng.standard_normal(16))]).output
    graph.set_outputs([graph.add_node("Relu", [y], output_names=["out"]).output])
    return graph


def _feeds():
    return {"x": np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32) * 3 + 1}


@pytest.mark.parametrize("affine", AFFINE_FORMS)
@pytest.mark.parametrize("reciprocal", [False, True])
@pytest.mark.parametrize("pow_square", [True, False])
@pytest.mark.parametrize("opset", [17, 18])
def test_every_decomposed_layernorm_variant_becomes_one_node(opset, pow_square, reciprocal, affine):
    graph = _layernorm_graph(opset, pow_square=pow_square, affine=affine, reciprocal=reciprocal, gamma_first=pow_square)
    fused = graphopt.optimize(graph.clone(), "canonicalize,fuse-layernorm,eliminate-dead-code", verify=True)
    assert fused.report.records[1].stats == {"fused": 1}
    assert fused.op_counts() == {"LayerNormalization": 1, "Relu": 1}
    (norm,) = [n for n in fused.nodes if n.op_type == "LayerNormalization"]
    assert norm.attrs["axis"] == -1 and norm.attrs["epsilon"] == pytest.approx(1e-6)
    assert len(norm.inputs) == (3 if affine == "scale-shift" else 2)
    assert [v.const.numpy().shape for v in norm.inputs[1:]] == [(16,)] * (len(norm.inputs) - 1)
    assert max_abs_error(run_graph(graph, _feeds()), run_graph(fused, _feeds())) <= 1e-5


def test_the_affine_part_of_an_existing_layernorm_is_taken_in():
    graph = Graph("ln", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, (2, 5, 16)))
    rng = np.random.default_rng(2)
    scale, gamma, beta = (graph.add_constant(n, rng.standard_normal(16).astype(np.float32)) for n in ("s", "g", "b"))
    norm = graph.add_node("LayerNormalization", [x, scale], {"axis": -1, "epsilon": 1e-5}).output
    y = graph.add_node("Add", [graph.add_node("Mul", [norm, gamma]).output, beta], output_names=["out"]).output
    graph.set_outputs([y])
    fused = graphopt.optimize(graph.clone(), "canonicalize,fuse-layernorm,eliminate-dead-code", verify=True)
    assert fused.op_counts() == {"LayerNormalization": 1}
    assert fused.report.records[1].stats == {"fused": 0}  # nothing raised, only taken in
    assert max_abs_error(run_graph(graph, _feeds()), run_graph(fused, _feeds())) <= 1e-5


def test_fuse_layernorm_requires_the_canonical_form_and_declares_its_fact():
    from graphopt.registry import get_pass

    assert get_pass("fuse-layernorm").provides == ("layernorm-fused",)
    with pytest.raises(PipelineError, match="needs 'canonical-form'"):
        graphopt.optimize(_layernorm_graph(17, pow_square=True, affine=True), "fuse-layernorm")


def test_below_opset_17_the_export_decomposes_it_back(tmp_path):
    graph = _layernorm_graph(16, pow_square=True, affine=True)
    fused = graphopt.optimize(graph.clone(), "canonicalize,fuse-layernorm,eliminate-dead-code", verify=True)
    assert fused.op_counts()["LayerNormalization"] == 1
    path = tmp_path / "ln16.onnx"
    fused.save_onnx(path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert "LayerNormalization" not in {n.op_type for n in model.graph.node}
    assert max_abs_error(run_graph(graph, _feeds()), run_graph(fused, _feeds())) <= 1e-5


def test_a_mean_over_two_axes_is_not_fused():
    graph = _layernorm_graph(17, pow_square=True, affine=True, axes=(-2, -1))
    fused = graphopt.optimize(graph.clone(), "canonicalize,fuse-layernorm", verify=True)
    assert "LayerNormalization" not in fused.op_counts()


@pytest.mark.slow
def test_layernorms_of_an_opset_14_export_are_raised_and_written_back_as_opset_14(zoo, tmp_path):
    """Below opset 17 the TorchScript exporter writes nn.LayerNorm as mean/sub/pow/sqrt/div."""
    import model_zoo
    from conftest import numpy_inputs

    path = model_zoo.export_onnx(zoo("bert"), tmp_path / "bert14.onnx", opset=14)
    graph = graphopt.from_onnx(path)
    assert "LayerNormalization" not in graph.op_counts()
    fused = graphopt.optimize(graph.clone(), "cleanup,canonicalize,fuse-layernorm", verify=True)
    assert fused.op_counts()["LayerNormalization"] == 5  # embeddings + two per layer
    out = tmp_path / "fused14.onnx"
    fused.save_onnx(out)
    assert onnx.load(str(out)).opset_import[0].version == 14
    onnx.checker.check_model(str(out), full_check=True)
    feeds = numpy_inputs(zoo("bert"))
    assert max_abs_error(run_graph(graph, feeds), run_graph(fused, feeds)) <= 1e-4
