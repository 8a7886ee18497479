"""fuse-gelu and fuse-rmsnorm: one rule per op over the canonical form, every exporter variant
the old per-variant rules matched, and every layer of the zoo."""

import math

import numpy as np
import pytest
from conftest import ROUNDTRIP_ARCHITECTURES, numpy_inputs
from fusion_expectations import GELU_LAYERS, RMSNORMS

import graphopt
from graphopt import DType, Graph, PipelineError, TensorType
from graphopt.check import max_abs_error, run_graph


def _fuse(graph, pipeline="eliminate-noops,canonicalize,fuse-gelu,fuse-rmsnorm"):
    fused = graphopt.optimize(graph.clone(), pipeline, verify=True)
    return fused, {r.name: r.stats for r in fused.report.records}


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_every_gelu_and_rmsnorm_of_the_zoo_is_fused(name, dynamo, zoo, zoo_onnx):
    graph = graphopt.from_onnx(zoo_onnx(name, dynamo=dynamo))
    feeds = numpy_inputs(zoo(name))
    fused, stats = _fuse(graph)
    counts = fused.op_counts()
    assert counts.get("graphopt::Gelu", 0) == GELU_LAYERS.get(name, 0), stats
    assert counts.get("graphopt::RMSNorm", 0) == RMSNORMS.get(name, 0), stats
    assert max_abs_error(run_graph(graph, feeds), run_graph(fused, feeds)) <= 1e-4


class _Builder:
    """A tiny expression builder: b.Mul(a, 0.5) adds a node, numbers become f32 constants."""

    def __init__(self, opset: int = 17, shape=("n", 8)):
        self.graph = Graph("g", {"": opset})
        self.x = self.graph.add_input("x", TensorType(DType.FLOAT, shape))

    def __getattr__(self, op_type):
        def build(*inputs, **attrs):
            values = [self.const(v) if not isinstance(v, graphopt.Value) else v for v in inputs]
            return self.graph.add_node(op_type, values, attrs).output

        return build

    def const(self, value, dtype=np.float32):
        return self.graph.add_constant(self.graph.unique_name("c"), np.asarray(value, dtype))

    def finish(self, y):
        self.graph.set_outputs([self.graph.add_node("Identity", [y], output_names=["y"]).output])
        return self.graph


def _half_product(b, x, inner, grouping):
    """x * 0.5 * inner, associated as named (the forms the old rules enumerated, and more)."""
    return {
        "half-first": lambda: b.Mul(b.Mul(x, 0.5), inner),
        "half-first-swapped": lambda: b.Mul(inner, b.Mul(0.5, x)),
        "half-last": lambda: b.Mul(b.Mul(x, inner), 0.5),
        "half-inner": lambda: b.Mul(x, b.Mul(inner, 0.5)),
        "half-inner-swapped": lambda: b.Mul(b.Mul(0.5, inner), x),
    }[grouping]()


GROUPINGS = ("half-first", "half-first-swapped", "half-last", "half-inner", "half-inner-swapped")
FEEDS = {"x": np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)}


def _assert_one_node(graph, pipeline, op, approx=1e-6, **attrs):
    """After `pipeline`, the graph is one `op` node (with `attrs` among its attributes) and
    its outputs equal the unfused graph's within `approx`."""
    fused, stats = _fuse(graph, pipeline + ",eliminate-dead-code")
    assert [n.qualified_op for n in fused.nodes] == [op, "Identity"], stats
    node_attrs = fused.nodes[0].attrs
    assert {key: node_attrs.get(key) for key in attrs} == pytest.approx(attrs)
    assert max_abs_error(run_graph(graph, FEEDS), run_graph(fused, FEEDS)) <= approx
    return fused


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("divide", [True, False])
def test_every_erf_gelu_variant_becomes_one_node(divide, grouping):
    b = _Builder()
    argument = b.Div(b.x, math.sqrt(2.0)) if divide else b.Mul(b.x, 1.0 / math.sqrt(2.0))
    graph = b.finish(_half_product(b, b.x, b.Add(1.0, b.Erf(argument)), grouping))
    _assert_one_node(graph, "canonicalize,fuse-gelu", "graphopt::Gelu", approximate="none")


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_every_tanh_gelu_variant_becomes_one_node(grouping):
    b = _Builder()
    cubic = b.Add(b.x, b.Mul(0.044715, b.Pow(b.x, 3.0)))
    inner = b.Add(b.Tanh(b.Mul(math.sqrt(2.0 / math.pi), cubic)), 1.0)
    graph = b.finish(_half_product(b, b.x, inner, grouping))
    _assert_one_node(graph, "canonicalize,fuse-gelu", "graphopt::Gelu", approximate="tanh")


def test_a_constant_factor_folded_into_the_half_stays_a_product():
    """canonicalize folds (gelu * 0.5-form) / 2 into one factor 0.25; the GELU is still found."""
    b = _Builder()
    gelu = _half_product(b, b.x, b.Add(1.0, b.Erf(b.Div(b.x, math.sqrt(2.0)))), "half-last")
    graph = b.finish(b.Div(gelu, 2.0))
    fused, stats = _fuse(graph, "canonicalize,fuse-gelu,eliminate-dead-code")
    assert stats["canonicalize"]["fold-scales"] == 1 and stats["fuse-gelu"] == {"fused": 1}
    assert [n.qualified_op for n in fused.nodes] == ["graphopt::Gelu", "Mul", "Identity"]
    assert fused.nodes[1].inputs[1].const.numpy() == pytest.approx(0.5)
    assert max_abs_error(run_graph(graph, FEEDS), run_graph(fused, FEEDS)) <= 1e-6


def test_erf_gelu_golden_ir():
    b = _Builder()
    graph = b.finish(_half_product(b, b.x, b.Add(1.0, b.Erf(b.Div(b.x, math.sqrt(2.0)))), "half-first"))
    fused, stats = _fuse(graph, "canonicalize,fuse-gelu,eliminate-dead-code")
    assert stats["fuse-gelu"] == {"fused": 1}
    assert str(fused).splitlines()[3:] == [
        "  %Mul_1_out0: f32[n, 8] = graphopt::Gelu(%x) {approximate='none'}",
        "  %y: f32[n, 8] = Identity(%Mul_1_out0)",
        "  return %y",
        "}",
    ]


def test_gelu_with_an_extra_reader_inside_is_not_fused():
    b = _Builder()
    erf = b.Erf(b.Div(b.x, math.sqrt(2.0)))
    graph = b.finish(_half_product(b, b.x, b.Add(erf, 1.0), "half-first"))
    graph.set_outputs([graph.outputs[0], erf])
    _, stats = _fuse(graph, "canonicalize,fuse-gelu")
    assert stats["fuse-gelu"] == {"fused": 0}


def test_a_wrong_constant_is_not_gelu():
    b = _Builder()
    graph = b.finish(_half_product(b, b.x, b.Add(1.0, b.Erf(b.Div(b.x, 1.5))), "half-last"))
    _, stats = _fuse(graph, "canonicalize,fuse-gelu")
    assert stats["fuse-gelu"] == {"fused": 0}


@pytest.mark.parametrize("attrs", [{}, {"approximate": "tanh"}])
def test_onnx_gelu_op_is_raised_too(attrs):
    graph = Graph("gelu20", {"": 20})
    x = graph.add_input("x", TensorType(DType.FLOAT, (2, 3)))
    graph.set_outputs([graph.add_node("Gelu", [x], attrs, output_names=["y"]).output])
    fused, stats = _fuse(graph, "canonicalize,fuse-gelu")
    assert stats["fuse-gelu"] == {"fused": 1}
    (node,) = fused.nodes
    assert node.qualified_op == "graphopt::Gelu" and node.attrs == {"approximate": attrs.get("approximate", "none")}
    feeds = {"x": np.linspace(-3, 3, 6, dtype=np.float32).reshape(2, 3)}
    assert max_abs_error(run_graph(graph, feeds), run_graph(fused, feeds)) <= 1e-6


def _rmsnorm_graph(opset, reciprocal, weighted, weight_first=False, pow_square=True, axes=(-1,)):
    b = _Builder(opset)
    square = b.Pow(b.x, 2.0) if pow_square else b.Mul(b.x, b.x)
    if opset >= 18:
        mean = b.ReduceMean(square, b.const(np.array(axes), np.int64), keepdims=1)
    else:
        mean = b.ReduceMean(square, axes=axes, keepdims=1)
    root = b.Sqrt(b.Add(mean, 1e-6))
    normalized = b.Mul(b.x, b.Reciprocal(root) if reciprocal else b.Div(1.0, root))
    if weighted:
        weight = b.const(np.linspace(0.5, 1.5, 8))
        normalized = b.Mul(weight, normalized) if weight_first else b.Mul(normalized, weight)
    return b.finish(normalized)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("reciprocal", [True, False])
@pytest.mark.parametrize("opset", [17, 18])
def test_every_rmsnorm_variant_becomes_one_node(opset, reciprocal, weighted):
    graph = _rmsnorm_graph(opset, reciprocal, weighted)
    fused = _assert_one_node(graph, "canonicalize,fuse-rmsnorm", "graphopt::RMSNorm", approx=1e-5, epsilon=1e-6, axis=-1)
    scale = fused.nodes[0].inputs[1]
    assert scale.const.numpy().shape == ((8,) if weighted else ())


@pytest.mark.parametrize("weight_first,pow_square", [(True, True), (False, False)])
def test_rmsnorm_weight_side_and_square_form_do_not_matter(weight_first, pow_square):
    graph = _rmsnorm_graph(18, False, True, weight_first=weight_first, pow_square=pow_square)
    _assert_one_node(graph, "canonicalize,fuse-rmsnorm", "graphopt::RMSNorm", approx=1e-5, epsilon=1e-6)


def test_rmsnorm_over_two_axes_is_not_fused():
    graph = _rmsnorm_graph(18, True, True, axes=(0, 1))
    _, stats = _fuse(graph, "canonicalize,fuse-rmsnorm")
    assert stats["fuse-rmsnorm"] == {"fused": 0}


@pytest.mark.parametrize("fusion", ["fuse-gelu", "fuse-rmsnorm"])
def test_the_fusions_require_the_canonical_form(fusion):
    with pytest.raises(PipelineError, match=f"pass '{fusion}' .* needs 'canonical-form'.*add a pass that provides it earlier"):
        graphopt.optimize(_rmsnorm_graph(18, True, True), fusion)


def test_the_fusions_declare_their_facts():
    from graphopt.registry import get_pass

    assert get_pass("fuse-gelu").provides == ("gelu-fused",)
    assert get_pass("fuse-rmsnorm").provides == ("rmsnorm-fused",)
    assert get_pass("fuse-gelu").requires == get_pass("fuse-rmsnorm").requires == ("canonical-form",)
