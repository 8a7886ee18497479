"""canonicalize: each rule on a tiny graph (expression after, numerics before/after within
float rounding, idempotence, determinism), the cases each rule must leave alone, and the
exporter variants of one computation reaching one form."""

import math

import numpy as np
import pytest

import graphopt
from graphopt import DType, Graph, PassContext, TensorType
from graphopt.check import run_graph
from graphopt.registry import get_pass


class _Builder:
    """b.Mul(a, 0.5) adds a node; numbers become f32 scalar constants."""

    def __init__(self, shape=("n", 8), dtype=DType.FLOAT, opset=17):
        self.graph = Graph("g", {"": opset})
        self.x = self.graph.add_input("x", TensorType(dtype, shape))
        self.y = self.graph.add_input("y", TensorType(dtype, shape))

    def __getattr__(self, op_type):
        def build(*inputs, **attrs):
            values = [v if isinstance(v, graphopt.Value) else self.const(v) for v in inputs]
            return self.graph.add_node(op_type, values, attrs).output

        return build

    def const(self, value, dtype=np.float32):
        return self.graph.add_constant(self.graph.unique_name("c"), np.asarray(value, dtype))

    def finish(self, *outputs):
        self.graph.set_outputs([self.graph.add_node("Identity", [v], output_names=[f"out{i}"]).output for i, v in enumerate(outputs)])
        return self.graph


def _expr(value) -> str:
    """`value` as an expression: inputs by name, constants by value, nodes as Op(args)."""
    if value.const is not None:
        data = value.const.numpy()
        return f"{data.item():.6g}" if data.size == 1 else f"const{list(data.shape)}"
    if value.producer is None:
        return value.name
    node = value.producer
    if node.op_type == "Identity":
        return _expr(node.inputs[0])
    return f"{node.op_type}({', '.join(_expr(v) for v in node.inputs)})"


def _canonicalize(graph: Graph, rtol: float = 1e-6) -> tuple[Graph, dict]:
    """Run canonicalize on a clone and check: verifies, outputs equal within `rtol`, a second
    run changes nothing, and a run on another clone prints the same IR."""
    result_graph = graph.clone()
    result = get_pass("canonicalize")().run(result_graph, PassContext())
    result_graph.verify()
    feeds = {"x": np.linspace(-3, 3, 16, dtype=np.float32).reshape(2, 8), "y": np.linspace(0.5, 2, 16, dtype=np.float32).reshape(2, 8)}
    feeds = {v.name: feeds[v.name].astype(v.dtype.to_numpy()) for v in graph.inputs}
    for before, after in zip(run_graph(graph, feeds), run_graph(result_graph, feeds)):
        assert before.dtype == after.dtype and before.shape == after.shape
        np.testing.assert_allclose(after, before, rtol=rtol, atol=1e-7)
    assert not get_pass("canonicalize")().run(result_graph, PassContext()).changed
    twin = graph.clone()
    get_pass("canonicalize")().run(twin, PassContext())
    assert str(twin) == str(result_graph)
    return result_graph, result.stats


def test_constants_go_second_in_commutative_ops():
    b = _Builder()
    graph = b.finish(b.Add(1.0, b.x), b.Mul(b.const(np.full(8, 2.0)), b.x), b.Max(0.0, b.y), b.Add(b.x, b.y))
    out, stats = _canonicalize(graph)
    assert [_expr(v) for v in out.outputs] == ["Add(x, 1)", "Mul(x, const[8])", "Max(y, 0)", "Add(x, y)"]
    assert stats == {"constant-right-add": 1, "constant-right-mul": 1, "constant-right-max": 1}


def test_division_by_a_float_constant_becomes_a_product():
    b = _Builder()
    graph = b.finish(b.Div(b.x, math.sqrt(2.0)), b.Div(b.x, b.const(np.linspace(1, 4, 8))))
    out, stats = _canonicalize(graph)
    assert [_expr(v) for v in out.outputs] == ["Mul(x, 0.707107)", "Mul(x, const[8])"]
    assert stats == {"divide-by-constant": 2}
    assert sorted(out.constants) == sorted(c for c in out.constants if out.constants[c].uses())  # the divisors are gone


@pytest.mark.parametrize("divisor,printed", [(0.0, "0"), (1e-45, "1.4013e-45")])
def test_division_without_a_finite_reciprocal_stays(divisor, printed):
    b = _Builder()
    out, stats = _canonicalize(b.finish(b.Div(b.x, divisor)))
    assert stats == {} and _expr(out.outputs[0]) == f"Div(x, {printed})"


def test_integer_division_and_overridable_divisors_stay():
    b = _Builder(dtype=DType.INT64)
    graph = b.finish(b.Div(b.x, b.const(3, np.int64)))
    out, stats = _canonicalize(graph)
    assert stats == {} and _expr(out.outputs[0]) == "Div(x, 3)"
    b = _Builder()
    scale = b.const(4.0)
    b.graph.initializer_inputs.add(scale.name)  # a graph input with a default: may be overridden
    out, stats = _canonicalize(b.finish(b.Div(b.x, scale)))
    assert stats == {}


def test_one_over_is_reciprocal_and_times_reciprocal_is_division():
    b = _Builder()
    root = b.Sqrt(b.Add(b.y, 1e-6))
    graph = b.finish(b.Div(1.0, b.Sqrt(b.y)), b.Mul(b.x, b.Div(1.0, root)), b.Mul(b.Reciprocal(b.y), b.x))
    out, stats = _canonicalize(graph)
    assert [_expr(v) for v in out.outputs] == ["Reciprocal(Sqrt(y))", "Div(x, Sqrt(Add(y, 1e-06)))", "Div(x, y)"]
    assert stats == {"one-over": 2, "times-reciprocal": 2}


def test_a_shared_reciprocal_stays():
    b = _Builder()
    inverse = b.Reciprocal(b.y)
    out, stats = _canonicalize(b.finish(b.Mul(b.x, inverse), inverse))
    assert [_expr(v) for v in out.outputs] == ["Mul(x, Reciprocal(y))", "Reciprocal(y)"]


def test_squares_become_products_and_other_powers_stay():
    b = _Builder()
    graph = b.finish(b.Pow(b.x, 2.0), b.Pow(b.x, 3.0), b.Pow(b.x, b.const(np.full((1, 1, 1), 2.0))))
    out, stats = _canonicalize(graph)
    assert [_expr(v) for v in out.outputs] == ["Mul(x, x)", "Pow(x, 3)", "Pow(x, 2)"]  # the last would broadcast x up
    assert stats == {"square": 1}


def test_constant_factors_fold_and_move_outermost():
    b = _Builder()
    chain = b.Mul(b.Mul(b.Mul(b.x, 2.0), 3.0), b.const(np.linspace(1, 2, 8)))
    graph = b.finish(chain, b.Mul(b.Mul(0.5, b.x), b.Mul(b.Exp(b.x), 4.0)))
    out, stats = _canonicalize(graph)
    assert [_expr(v) for v in out.outputs] == ["Mul(x, const[8])", "Mul(Mul(x, Exp(x)), 2)"]
    np.testing.assert_allclose(out.outputs[0].producer.inputs[0].producer.inputs[1].const.numpy(), 6.0 * np.linspace(1, 2, 8), rtol=1e-6)


def test_a_factor_does_not_move_past_a_separate_expression():
    """T5's gated GELU, gelu(x) * y: the 0.5 stays with the GELU's own product."""
    b = _Builder()
    gelu = b.Mul(b.Mul(0.5, b.x), b.Add(b.Tanh(b.x), 1.0))
    out, stats = _canonicalize(b.finish(b.Mul(gelu, b.y), b.Mul(b.Mul(b.x, 3.0), b.y)))
    assert [_expr(v) for v in out.outputs] == ["Mul(Mul(Mul(x, Add(Tanh(x), 1)), 0.5), y)", "Mul(Mul(x, 3), y)"]
    assert stats["scale-outward"] == 1


def test_a_factor_read_twice_is_not_moved():
    b = _Builder()
    half = b.Mul(b.x, 0.5)
    out, stats = _canonicalize(b.finish(b.Mul(half, b.Exp(b.x)), half))
    assert [_expr(v) for v in out.outputs] == ["Mul(Mul(x, 0.5), Exp(x))", "Mul(x, 0.5)"]
    assert stats == {}


GELU_FORMS = {
    "0.5*x*inner": lambda b, inner: b.Mul(b.Mul(0.5, b.x), inner),
    "(x*0.5)*inner": lambda b, inner: b.Mul(b.Mul(b.x, 0.5), inner),
    "(x*inner)*0.5": lambda b, inner: b.Mul(b.Mul(b.x, inner), 0.5),
    "x*(inner*0.5)": lambda b, inner: b.Mul(b.x, b.Mul(inner, 0.5)),
    "x*(0.5*inner)": lambda b, inner: b.Mul(b.x, b.Mul(0.5, inner)),
}


@pytest.mark.parametrize("divide", [True, False])
@pytest.mark.parametrize("form", list(GELU_FORMS))
def test_every_grouping_of_erf_gelu_reaches_one_form(form, divide):
    b = _Builder()
    argument = b.Div(b.x, math.sqrt(2.0)) if divide else b.Mul(1.0 / math.sqrt(2.0), b.x)
    out, _ = _canonicalize(b.finish(GELU_FORMS[form](b, b.Add(1.0, b.Erf(argument)))))
    assert _expr(out.outputs[0]) == "Mul(Mul(x, Add(Erf(Mul(x, 0.707107)), 1)), 0.5)"


@pytest.mark.parametrize("reciprocal", [True, False])
def test_rmsnorm_forms_reach_one_form(reciprocal):
    b = _Builder(opset=18)
    mean = b.ReduceMean(b.Pow(b.x, 2.0), b.const([-1], np.int64), keepdims=1)
    root = b.Sqrt(b.Add(mean, 1e-6))
    weight = b.const(np.linspace(0.5, 1.5, 8))
    out, _ = _canonicalize(b.finish(b.Mul(weight, b.Mul(b.x, b.Reciprocal(root) if reciprocal else b.Div(1.0, root)))))
    assert _expr(out.outputs[0]) == "Mul(Div(x, Sqrt(Add(ReduceMean(Mul(x, x), -1), 1e-06))), const[8])"


def test_canonicalize_is_registered_with_its_fact():
    cls = get_pass("canonicalize")
    assert cls.provides == ("canonical-form",) and "Needs nothing" in cls.__doc__
