"""The pattern rewriter: one rule per shape of computation, one central legality check."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest

from graphopt import DType, Graph, TensorType, Value
from graphopt.check import max_abs_error, run_graph, sample_inputs
from graphopt.ir.tensor import ArrayTensor
from graphopt.ir.graph import Node
from graphopt.rewrite import Const, RewriteError, RewritePattern, Rewriter, RewriteRule, RewriteRuleSet, Var

F32 = DType.FLOAT


def golden(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def erf_gelu(op, x):
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Div(x, math.sqrt(2))), 1.0))


def graphopt_gelu(op, x):
    return op.Gelu(x, _domain="graphopt")


def onnx_gelu(op, x):
    return op.Gelu(x)


ERF_GELU = RewriteRule("erf-gelu", erf_gelu, graphopt_gelu)


def times_one(op, x):
    return op.Mul(x, 1.0)


def identity(op, x):
    return op.Identity(x)


def scalar(graph: Graph, name: str, number: float) -> Value:
    return graph.add_constant(name, np.array(number, dtype=np.float32))


def gelu_graph(opset: int = 18) -> Graph:
    """Two erf-GELUs: (x*0.5) * (erf(x/sqrt2)+1), and (1+erf(z/sqrt2)) * (0.5*z)."""
    graph = Graph("gelus", {"": opset})
    x = graph.add_input("x", TensorType(F32, ("batch", 4)))
    half, one, root2 = scalar(graph, "half", 0.5), scalar(graph, "one", 1.0), scalar(graph, "root2", math.sqrt(2))
    scaled = graph.add_node("Div", [x, root2], output_names=["scaled"]).output
    erf = graph.add_node("Erf", [scaled], output_names=["erf"]).output
    shifted = graph.add_node("Add", [erf, one], output_names=["shifted"]).output
    halved = graph.add_node("Mul", [x, half], output_names=["halved"]).output
    first = graph.add_node("Mul", [halved, shifted], output_names=["first"]).output
    z = graph.add_node("Tanh", [first], output_names=["z"]).output
    scaled2 = graph.add_node("Div", [z, root2], output_names=["scaled2"]).output
    erf2 = graph.add_node("Erf", [scaled2], output_names=["erf2"]).output
    shifted2 = graph.add_node("Add", [one, erf2], output_names=["shifted2"]).output
    halved2 = graph.add_node("Mul", [half, z], output_names=["halved2"]).output
    second = graph.add_node("Mul", [shifted2, halved2], output_names=["y"]).output
    graph.set_outputs([second])
    return graph


def assert_same_outputs(before: Graph, after: Graph, tolerance: float = 1e-5) -> None:
    feeds = sample_inputs(before)
    assert max_abs_error(run_graph(before, feeds), run_graph(after, feeds)) <= tolerance


def test_one_erf_gelu_rule_matches_both_multiplication_orders():
    graph = gelu_graph()
    assert str(graph) == golden("""
        graph gelus (
          %x: f32[batch, 4]
        ) {
          %half: f32[] = const [0.5]
          %one: f32[] = const [1.0]
          %root2: f32[] = const [1.4142135381698608]
          %scaled: f32[batch, 4] = Div(%x, %root2)
          %erf: f32[batch, 4] = Erf(%scaled)
          %shifted: f32[batch, 4] = Add(%erf, %one)
          %halved: f32[batch, 4] = Mul(%x, %half)
          %first: f32[batch, 4] = Mul(%halved, %shifted)
          %z: f32[batch, 4] = Tanh(%first)
          %scaled2: f32[batch, 4] = Div(%z, %root2)
          %erf2: f32[batch, 4] = Erf(%scaled2)
          %shifted2: f32[batch, 4] = Add(%one, %erf2)
          %halved2: f32[batch, 4] = Mul(%half, %z)
          %y: f32[batch, 4] = Mul(%shifted2, %halved2)
          return %y
        }
        """)
    rules = RewriteRuleSet([ERF_GELU])
    assert rules.apply(graph) == {"erf-gelu": 2}
    graph.verify()
    assert str(graph) == golden("""
        graph gelus (
          %x: f32[batch, 4]
        ) {
          %first: f32[batch, 4] = graphopt::Gelu(%x)
          %z: f32[batch, 4] = Tanh(%first)
          %y: f32[batch, 4] = graphopt::Gelu(%z)
          return %y
        }
        """)
    assert rules.refusals == []


def test_erf_gelu_to_onnx_gelu_keeps_outputs():
    graph = gelu_graph(opset=20)
    before = graph.clone()
    assert RewriteRuleSet([RewriteRule("erf-gelu", erf_gelu, onnx_gelu)]).apply(graph) == {"erf-gelu": 2}
    graph.verify()
    assert graph.op_counts() == {"Gelu": 2, "Tanh": 1}
    assert_same_outputs(before, graph)


def test_interior_value_with_another_reader_is_refused():
    graph = gelu_graph()
    erf = graph.find_value("erf")
    spy = graph.add_node("Neg", [erf], name="spy", output_names=["spy"])
    graph.set_outputs([*graph.outputs, spy.output])
    rules = RewriteRuleSet([ERF_GELU])
    assert rules.apply(graph) == {"erf-gelu": 1}
    assert graph.op_counts() == {"Add": 1, "Div": 1, "Erf": 1, "Mul": 2, "Neg": 1, "Tanh": 1, "graphopt::Gelu": 1}
    [refusal] = rules.refusals
    assert refusal.rule == "erf-gelu"
    assert graph.find_value("first").producer.name == refusal.node
    assert refusal.reason == "interior value %erf is also read by 'spy' (Neg)"


def test_interior_graph_output_is_refused():
    graph = gelu_graph()
    graph.set_outputs([*graph.outputs, graph.find_value("halved2")])
    rules = RewriteRuleSet([ERF_GELU])
    assert rules.apply(graph) == {"erf-gelu": 1}
    assert [r.reason for r in rules.refusals] == ["interior value %halved2 is a graph output"]


def test_rule_check_refusal_is_reported_with_its_reason():
    def rank_two_only(graph, match):
        return True if match["x"].shape == ("batch", 4) and match["x"].name == "x" else "x is not the graph input"

    rules = RewriteRuleSet([RewriteRule("erf-gelu", erf_gelu, graphopt_gelu, check=rank_two_only)])
    graph = gelu_graph()
    assert rules.apply(graph) == {"erf-gelu": 1}
    assert [(r.rule, r.reason) for r in rules.refusals] == [("erf-gelu", "x is not the graph input")]
    assert graph.op_counts()["graphopt::Gelu"] == 1


def test_check_returning_false_refuses_with_a_generic_reason():
    rules = RewriteRuleSet([RewriteRule("erf-gelu", erf_gelu, graphopt_gelu, check=lambda graph, match: False)])
    graph = gelu_graph()
    printed = str(graph)
    assert rules.apply(graph) == {"erf-gelu": 0}
    assert str(graph) == printed
    assert {r.reason for r in rules.refusals} == {"refused by the rule's check"}


def chain_graph() -> Graph:
    graph = Graph("chain")
    x = graph.add_input("x", TensorType(F32, (2, 3)))
    r = graph.add_node("Relu", [x], output_names=["r"]).output
    later = graph.add_node("Neg", [r], output_names=["later"]).output
    graph.set_outputs([graph.add_node("Mul", [later, x], output_names=["y"]).output])
    return graph


def test_replacement_that_would_create_a_cycle_is_refused():
    graph = chain_graph()

    def reads_downstream(op, x):
        return op.Add(x, graph.find_value("later"))

    rules = RewriteRuleSet([RewriteRule("relu-to-add", lambda op, x: op.Relu(x), reads_downstream)])
    printed = str(graph)
    assert rules.apply(graph) == {"relu-to-add": 0}
    assert [r.reason for r in rules.refusals] == [
        "the replacement would create a cycle: it reads %later, which depends on the match"
    ]
    assert str(graph) == printed
    graph.verify()


def test_replacement_reading_a_later_independent_value_is_refused():
    graph = chain_graph()
    late = graph.add_node("Sigmoid", [graph.inputs[0]], output_names=["late"]).output
    rules = RewriteRuleSet([RewriteRule("relu-to-add", lambda op, x: op.Relu(x), lambda op, x: op.Add(x, late))])
    assert rules.apply(graph) == {"relu-to-add": 0}
    assert [r.reason for r in rules.refusals] == ["the replacement reads %late, which is computed after the match"]
    graph.verify()


def constants_graph() -> Graph:
    """x*1 with 1 as a broadcastable graph constant, as a Constant node, and as a non-match."""
    graph = Graph("consts")
    x = graph.add_input("x", TensorType(F32, (2, 3)))
    ones = graph.add_constant("ones", np.ones((1, 3), np.float32))
    mixed = graph.add_constant("mixed", np.array([1.0, 2.0, 1.0], np.float32))
    a = graph.add_node("Mul", [x, ones], output_names=["a"]).output
    one = graph.add_node("Constant", [], {"value": ArrayTensor(np.float32(1.0))}, output_names=["one"]).output
    b = graph.add_node("Mul", [one, a], output_names=["b"]).output
    c = graph.add_node("Mul", [b, mixed], output_names=["c"]).output
    graph.set_outputs([graph.add_node("Relu", [c], output_names=["y"]).output])
    return graph


def test_number_patterns_match_graph_constants_and_constant_nodes():
    graph = constants_graph()
    before = graph.clone()
    assert str(graph) == golden("""
        graph consts (
          %x: f32[2, 3]
        ) {
          %ones: f32[1, 3] = const [1.0, 1.0, 1.0]
          %mixed: f32[3] = const [1.0, 2.0, 1.0]
          %a: f32[2, 3] = Mul(%x, %ones)
          %one: f32[] = Constant() {value=tensor<f32[]>[1.0]}
          %b: f32[2, 3] = Mul(%one, %a)
          %c: f32[2, 3] = Mul(%b, %mixed)
          %y: f32[2, 3] = Relu(%c)
          return %y
        }
        """)
    assert RewriteRuleSet([RewriteRule("mul-by-one", times_one, identity)]).apply(graph) == {"mul-by-one": 2}
    graph.verify()
    assert str(graph) == golden("""
        graph consts (
          %x: f32[2, 3]
        ) {
          %mixed: f32[3] = const [1.0, 2.0, 1.0]
          %a: f32[2, 3] = Identity(%x)
          %b: f32[2, 3] = Identity(%a)
          %c: f32[2, 3] = Mul(%b, %mixed)
          %y: f32[2, 3] = Relu(%c)
          return %y
        }
        """)
    assert_same_outputs(before, graph, tolerance=0.0)


def test_constant_that_broadcasts_to_a_new_shape_is_refused():
    graph = Graph("widen")
    x = graph.add_input("x", TensorType(F32, (3,)))
    ones = graph.add_constant("ones", np.ones((2, 3), np.float32))
    wide = graph.add_node("Mul", [x, ones], output_names=["wide"]).output
    graph.set_outputs([graph.add_node("Neg", [wide], output_names=["y"]).output])
    rules = RewriteRuleSet([RewriteRule("mul-by-one", times_one, identity)])
    assert rules.apply(graph) == {"mul-by-one": 0}
    assert [r.reason for r in rules.refusals] == ["the replacement has type f32[3], the matched output %wide has f32[2, 3]"]


def test_constant_tolerance_follows_the_element_type():
    graph = Graph("near")
    x = graph.add_input("x", TensorType(F32, (3,)))
    near = graph.add_constant("near", np.float32(1.0 + 1e-7))
    far = graph.add_constant("far", np.float32(1.001))
    y = graph.add_node("Mul", [graph.add_node("Mul", [x, near]).output, far], output_names=["y"]).output
    graph.set_outputs([graph.add_node("Neg", [y]).output])
    assert RewriteRuleSet([RewriteRule("mul-by-one", times_one, identity)]).apply(graph) == {"mul-by-one": 1}
    assert graph.op_counts() == {"Identity": 1, "Mul": 1, "Neg": 1}


def negations_graph() -> Graph:
    graph = Graph("negs")
    x = graph.add_input("x", TensorType(F32, (2,)))
    minus = scalar(graph, "minus", -1.0)
    a = graph.add_node("Mul", [x, minus], output_names=["a"]).output
    b = graph.add_node("Mul", [minus, a], output_names=["b"]).output
    c = graph.add_node("Neg", [graph.add_node("Neg", [b], output_names=["nb"]).output], output_names=["c"]).output
    graph.set_outputs([graph.add_node("Relu", [c], output_names=["y"]).output])
    return graph


NEGATION_RULES = [
    RewriteRule("mul-minus-one", lambda op, x: op.Mul(x, -1.0), lambda op, x: op.Neg(x)),
    RewriteRule("double-negation", lambda op, x: op.Neg(op.Neg(x)), lambda op, x: x),
]


def test_rule_set_reaches_a_fixed_point():
    graph = negations_graph()
    rules = RewriteRuleSet(NEGATION_RULES)
    assert rules.apply(graph) == {"mul-minus-one": 2, "double-negation": 2}
    graph.verify()
    assert str(graph) == golden("""
        graph negs (
          %x: f32[2]
        ) {
          %y: f32[2] = Relu(%x)
          return %y
        }
        """)
    assert rules.apply(graph) == {"mul-minus-one": 0, "double-negation": 0}


def test_rewriting_is_deterministic():
    results = set()
    for _ in range(3):
        graph = gelu_graph()
        RewriteRuleSet([ERF_GELU, *NEGATION_RULES]).apply(graph)
        results.add(str(graph))
    assert len(results) == 1


def test_graph_output_keeps_its_name_when_replaced_by_an_existing_value():
    graph = Graph("out")
    x = graph.add_input("x", TensorType(F32, (2,)))
    r = graph.add_node("Relu", [x], output_names=["r"]).output
    graph.set_outputs([graph.add_node("Neg", [graph.add_node("Neg", [r]).output], output_names=["y"]).output])
    assert RewriteRuleSet(NEGATION_RULES).apply(graph) == {"mul-minus-one": 0, "double-negation": 1}
    assert str(graph) == golden("""
        graph out (
          %x: f32[2]
        ) {
          %y: f32[2] = Relu(%x)
          return %y
        }
        """)


def test_graph_output_is_not_renamed_onto_a_graph_input():
    graph = Graph("out")
    x = graph.add_input("x", TensorType(F32, (2,)))
    graph.set_outputs([graph.add_node("Neg", [graph.add_node("Neg", [x]).output], output_names=["y"]).output])
    rules = RewriteRuleSet(NEGATION_RULES)
    assert rules.apply(graph) == {"mul-minus-one": 0, "double-negation": 0}
    assert [r.reason for r in rules.refusals] == [
        "graph output %y would be renamed: the replacement %x is a graph input, constant or output"
    ]


def test_attribute_vars_bind_and_predicates_filter():
    def two_transposes(op, x):
        return op.Transpose(op.Transpose(x, perm=Var("inner")), perm=Var("outer", check=lambda p: p is not None))

    def one_transpose(op, x, inner, outer):
        return op.Transpose(x, perm=tuple(inner[i] for i in outer))

    graph = Graph("perm")
    x = graph.add_input("x", TensorType(F32, (2, 3, 4)))
    t = graph.add_node("Transpose", [x], {"perm": (1, 2, 0)}, output_names=["t"]).output
    graph.set_outputs([graph.add_node("Transpose", [t], {"perm": (0, 2, 1)}, output_names=["y"]).output])
    before = graph.clone()
    assert RewriteRuleSet([RewriteRule("compose", two_transposes, one_transpose)]).apply(graph) == {"compose": 1}
    assert str(graph) == golden("""
        graph perm (
          %x: f32[2, 3, 4]
        ) {
          %y: f32[3, 2, 4] = Transpose(%x) {perm=[1, 0, 2]}
          return %y
        }
        """)
    assert_same_outputs(before, graph, tolerance=0.0)


def test_multi_output_pattern_nodes():
    def split_glu(op, x):
        a, b = op.Split(x, axis=-1, num_outputs=2, _outputs=2)
        return op.Mul(a, op.Sigmoid(b))

    def glu(op, x):
        return op.Glu(x, _domain="graphopt")

    graph = Graph("glu")
    x = graph.add_input("x", TensorType(F32, (2, 8)))
    a, b = graph.add_node("Split", [x], {"axis": -1, "num_outputs": 2}, num_outputs=2, output_names=["a", "b"]).outputs
    gate = graph.add_node("Sigmoid", [b], output_names=["gate"]).output
    graph.set_outputs([graph.add_node("Mul", [gate, a], output_names=["y"]).output])
    assert RewriteRuleSet([RewriteRule("glu", split_glu, glu)]).apply(graph) == {"glu": 1}
    assert str(graph) == golden("""
        graph glu (
          %x: f32[2, 8]
        ) {
          %y: f32[2, 4] = graphopt::Glu(%x)
          return %y
        }
        """)


def test_allow_other_outputs_matches_a_node_with_unused_extra_outputs():
    graph = Graph("drop", {"": 18})
    x = graph.add_input("x", TensorType(F32, (2,)))
    dropped, _mask = graph.add_node("Dropout", [x], num_outputs=2, output_names=["d", "mask"]).outputs
    graph.set_outputs([graph.add_node("Relu", [dropped], output_names=["y"]).output])
    strict = RewriteRuleSet([RewriteRule("drop", lambda op, x: op.Relu(op.Dropout(x)), lambda op, x: op.Relu(x))])
    assert strict.apply(graph) == {"drop": 0}
    loose = RewriteRuleSet(
        [RewriteRule("drop", lambda op, x: op.Relu(op.Dropout(x, _allow_other_outputs=True)), lambda op, x: op.Relu(x))]
    )
    assert loose.apply(graph) == {"drop": 1}
    assert graph.op_counts() == {"Relu": 1}


def test_named_constants_reach_the_replacement_as_numbers():
    def scaled_add(op, x, y):
        return op.Add(op.Mul(x, Const("alpha")), y)

    def fused(op, x, y, alpha):
        return op.ScaledAdd(x, y, alpha=alpha, _domain="graphopt")

    graph = Graph("axpy")
    x, y = graph.add_input("x", TensorType(F32, (2,))), graph.add_input("y", TensorType(F32, (2,)))
    scaled = graph.add_node("Mul", [scalar(graph, "alpha", 0.25), x], output_names=["scaled"]).output
    graph.set_outputs([graph.add_node("Add", [y, scaled], output_names=["z"]).output])
    assert RewriteRuleSet([RewriteRule("axpy", scaled_add, fused)]).apply(graph) == {"axpy": 1}
    assert str(graph) == golden("""
        graph axpy (
          %x: f32[2]
          %y: f32[2]
        ) {
          %z: f32[2] = graphopt::ScaledAdd(%x, %y) {alpha=0.25}
          return %z
        }
        """)


def test_replacement_asking_for_an_unbound_name_is_rejected_when_the_rule_is_built():
    with pytest.raises(RewriteError, match=r"asks for \['y'\]"):
        RewriteRule("bad", lambda op, x: op.Relu(x), lambda op, y: op.Relu(y))


def test_duplicate_rule_names_are_rejected():
    with pytest.raises(RewriteError, match="repeated: erf-gelu"):
        RewriteRuleSet([ERF_GELU, ERF_GELU])


def test_rules_that_undo_each_other_stop_with_an_error():
    flip = RewriteRule("flip", lambda op, x: op.Relu(x), lambda op, x: op.Abs(op.Relu(x)))
    graph = chain_graph()
    with pytest.raises(RewriteError, match="did not reach a fixed point in 5 sweeps"):
        RewriteRuleSet([flip], max_rounds=5).apply(graph)
    graph.verify()


def test_a_var_binds_the_same_value_everywhere():
    graph = Graph("two")
    x, z = graph.add_input("x", TensorType(F32, (4,))), graph.add_input("z", TensorType(F32, (4,)))
    erf = graph.add_node("Erf", [graph.add_node("Div", [z, scalar(graph, "root2", math.sqrt(2))]).output]).output
    shifted = graph.add_node("Add", [erf, scalar(graph, "one", 1.0)]).output
    halved = graph.add_node("Mul", [x, scalar(graph, "half", 0.5)]).output
    graph.set_outputs([graph.add_node("Mul", [halved, shifted], output_names=["y"]).output])
    rules = RewriteRuleSet([ERF_GELU])
    assert rules.apply(graph) == {"erf-gelu": 0}
    assert rules.refusals == []


def test_failing_replacement_leaves_the_graph_unchanged():
    def broken(op, x):
        op.Neg(x)
        raise ValueError("replacement bug")

    graph = chain_graph()
    printed = str(graph)
    with pytest.raises(ValueError, match="replacement bug"):
        RewriteRuleSet([RewriteRule("broken", lambda op, x: op.Relu(x), broken)]).apply(graph)
    assert str(graph) == printed
    graph.verify()


# ---------------------------------------------------------------------------- multi-output rules
def skip_norm_pattern(op, x, skip, scale, bias):
    total = op.Add(x, skip)
    return op.LayerNormalization(total, scale, bias, axis=-1), total


def skip_norm(op, x, skip, scale, bias):
    return op.SkipLayerNorm(x, skip, scale, bias, _domain="graphopt", _outputs=2, epsilon=1e-5, simplified=0)


SKIP_NORM = RewriteRule("skip-norm", skip_norm_pattern, skip_norm)


def residual_graph(sum_is_output: bool = False) -> Graph:
    """y = LayerNorm(x + skip); the sum also feeds a Relu (or is itself a graph output)."""
    graph = Graph("residual", {"": 17})
    x = graph.add_input("x", TensorType(F32, (2, 4)))
    skip = graph.add_input("skip", TensorType(F32, (2, 4)))
    scale = graph.add_constant("scale", np.linspace(0.5, 2.0, 4, dtype=np.float32))
    bias = graph.add_constant("bias", np.linspace(-1.0, 1.0, 4, dtype=np.float32))
    total = graph.add_node("Add", [x, skip], output_names=["sum"]).output
    y = graph.add_node("LayerNormalization", [total, scale, bias], {"axis": -1}, output_names=["y"]).output
    other = total if sum_is_output else graph.add_node("Relu", [total], output_names=["r"]).output
    graph.set_outputs([y, other])
    return graph


def test_multi_output_rule_replaces_every_matched_output():
    graph = residual_graph()
    before = graph.clone()
    assert RewriteRuleSet([SKIP_NORM]).apply(graph) == {"skip-norm": 1}
    graph.verify()
    assert str(graph) == golden("""
        graph residual (
          %x: f32[2, 4]
          %skip: f32[2, 4]
        ) {
          %scale: f32[4] = const [0.5, 1.0, 1.5, 2.0]
          %bias: f32[4] = const [-1.0, -0.3333333432674408, 0.3333333432674408, 1.0]
          %y: f32[2, 4], %sum: f32[2, 4] = graphopt::SkipLayerNorm(%x, %skip, %scale, %bias) {epsilon=1e-05, simplified=0}
          %r: f32[2, 4] = Relu(%sum)
          return %y, %r
        }
        """)
    assert_same_outputs(before, graph)


def test_multi_output_rule_keeps_the_name_of_a_graph_output_it_replaces():
    graph = residual_graph(sum_is_output=True)
    before = graph.clone()
    assert RewriteRuleSet([SKIP_NORM]).apply(graph) == {"skip-norm": 1}
    graph.verify()
    assert [v.name for v in graph.outputs] == ["y", "sum"]
    assert graph.op_counts() == {"graphopt::SkipLayerNorm": 1}
    assert_same_outputs(before, graph)


def test_multi_output_rule_checks_the_type_of_every_output():
    def wrong_sum_type(op, x, skip, scale, bias):
        norm, total = skip_norm(op, x, skip, scale, bias)
        return norm, op.Cast(total, to=11)  # 11: double

    graph = residual_graph()
    printed = str(graph)
    rules = RewriteRuleSet([RewriteRule("skip-norm", skip_norm_pattern, wrong_sum_type)])
    assert rules.apply(graph) == {"skip-norm": 0}
    assert [r.reason for r in rules.refusals] == ["the replacement has type f64[2, 4], the matched output %sum has f32[2, 4]"]
    assert str(graph) == printed


def test_multi_output_replacement_must_give_one_value_per_output():
    rules = RewriteRuleSet([RewriteRule("skip-norm", skip_norm_pattern, lambda op, x, skip, scale, bias: op.Relu(x))])
    graph = residual_graph()
    printed = str(graph)
    with pytest.raises(TypeError, match="must return a tuple of 2 Values"):
        rules.apply(graph)
    assert str(graph) == printed


def test_multi_output_pattern_outputs_must_lie_in_the_first_outputs_pattern():
    with pytest.raises(RewriteError, match="every pattern output after the first must be computed inside"):
        RewriteRule("apart", lambda op, x, y: (op.Relu(x), op.Neg(y)), lambda op, x, y: (x, y))


# ---------------------------------------------------------------------------- hand-written patterns
class ReluChain(RewritePattern):
    """Relu(Relu(...Relu(x))) of any length -> one Relu: a walk no fixed pattern expresses."""

    name = "relu-chain"
    root_ops = (("", "Relu"),)
    depth = 1

    def match_and_rewrite(self, graph: Graph, node: Node, rewriter: Rewriter):
        if any(use.node.op_type == "Relu" for use in node.output.uses()):
            return False  # not the end of a chain
        chain = [node]
        while chain[-1].inputs[0].producer is not None and chain[-1].inputs[0].producer.op_type == "Relu":
            chain.append(chain[-1].inputs[0].producer)
        if len(chain) < 2:
            return False
        edit = rewriter.edit(chain, [node.output])
        problem = edit.commit([edit.op.Relu(chain[-1].inputs[0])])
        return True if problem is None else problem


def relu_chain_graph(length: int, middle_is_output: bool = False) -> Graph:
    graph = Graph("relus")
    x = graph.add_input("x", TensorType(F32, (3,)))
    values = [x]
    for i in range(length):
        values.append(graph.add_node("Relu", [values[-1]], output_names=[f"r{i}"]).output)
    y = graph.add_node("Neg", [values[-1]], output_names=["y"]).output
    graph.set_outputs([y, values[2]] if middle_is_output else [y])
    return graph


def test_hand_written_pattern_commits_through_the_engine():
    graph = relu_chain_graph(4)
    rules = RewriteRuleSet([ReluChain()])
    assert rules.apply(graph) == {"relu-chain": 1}
    graph.verify()
    assert str(graph) == golden("""
        graph relus (
          %x: f32[3]
        ) {
          %r3: f32[3] = Relu(%x)
          %y: f32[3] = Neg(%r3)
          return %y
        }
        """)


def test_hand_written_pattern_gets_the_same_legality_check():
    graph = relu_chain_graph(4, middle_is_output=True)
    printed = str(graph)
    rules = RewriteRuleSet([ReluChain()])
    assert rules.apply(graph) == {"relu-chain": 0}
    assert [r.reason for r in rules.refusals] == ["interior value %r1 is a graph output"]
    assert str(graph) == printed
    graph.verify()


def test_hand_written_pattern_that_claims_an_uncommitted_rewrite_is_an_error():
    class Liar(RewritePattern):
        name = "liar"
        root_ops = (("", "Relu"),)

        def match_and_rewrite(self, graph, node, rewriter):
            return True

    with pytest.raises(RewriteError, match="rule 'liar' reported a rewrite it did not commit"):
        RewriteRuleSet([Liar()]).apply(relu_chain_graph(2))


def test_rules_and_hand_written_patterns_run_in_one_rule_set():
    graph = relu_chain_graph(3)
    double_neg = RewriteRule("neg-to-mul", lambda op, x: op.Neg(x), lambda op, x: op.Mul(x, -1.0))
    assert RewriteRuleSet([ReluChain(), double_neg]).apply(graph) == {"relu-chain": 1, "neg-to-mul": 1}
    assert graph.op_counts() == {"Relu": 1, "Mul": 1}


def test_worklist_revisits_what_a_rewrite_made_matchable():
    """Rewriting the later Relu chain turns an earlier Neg's reader into a Neg: found in the next round."""
    rules = [
        RewriteRule("mul-minus-one", lambda op, x: op.Mul(x, -1.0), lambda op, x: op.Neg(x)),
        RewriteRule("double-negation", lambda op, x: op.Neg(op.Neg(x)), lambda op, x: x),
    ]
    graph = Graph("late")
    x = graph.add_input("x", TensorType(F32, (2,)))
    minus = scalar(graph, "minus", -1.0)
    first = graph.add_node("Neg", [x], output_names=["first"]).output
    second = graph.add_node("Mul", [first, minus], output_names=["second"]).output
    graph.set_outputs([graph.add_node("Relu", [second], output_names=["y"]).output])
    assert RewriteRuleSet(rules).apply(graph) == {"mul-minus-one": 1, "double-negation": 1}
    assert graph.op_counts() == {"Relu": 1}
    assert graph.outputs[0].producer.inputs[0] is x


def test_worklist_does_not_sweep_the_whole_graph_again_after_a_rewrite():
    class CountVisits(RewritePattern):
        name = "count"
        root_ops = (("", "Relu"),)
        visits = 0

        def match_and_rewrite(self, graph, node, rewriter):
            CountVisits.visits += 1
            return False

    graph = Graph("long")
    value = graph.add_input("x", TensorType(F32, (2,)))
    value = graph.add_node("Mul", [value, scalar(graph, "minus", -1.0)]).output
    for i in range(40):
        value = graph.add_node("Relu", [value], output_names=[f"r{i}"]).output
    graph.set_outputs([value])
    minus_one = RewriteRule("mul-minus-one", lambda op, x: op.Mul(x, -1.0), lambda op, x: op.Neg(x))
    assert RewriteRuleSet([minus_one, CountVisits()]).apply(graph) == {"mul-minus-one": 1, "count": 0}
    assert CountVisits.visits == 41  # every Relu once, then only the one reading the new Neg
