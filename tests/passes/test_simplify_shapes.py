"""simplify-shapes: static shape arithmetic, shorter layout chains, dynamic dims intact."""

import numpy as np
from graphopt.passes.simplify_shapes import SimplifyShapes, resolve_reshape_target
from pass_testing import run_checked as checked

from graphopt import DType, Graph, TensorType
from graphopt.pass_base import PassContext, PassResult

F32 = DType.FLOAT
OTHER_SIZES = {"batch": 3, "seq": 5}


def run_checked(graph: Graph) -> PassResult:
    return checked(SimplifyShapes(), graph, sizes=(None, OTHER_SIZES))


def _split_heads_graph() -> Graph:
    """x [batch, seq, 8] reshaped to [batch, seq, 2, 4] through a computed target."""
    graph = Graph("heads")
    x = graph.add_input("x", TensorType(F32, ("batch", "seq", 8)))
    zero, one, two = (graph.add_constant(f"i{i}", np.array(i, np.int64)) for i in range(3))
    axes = graph.add_constant("axes", np.array([0], np.int64))
    tail = graph.add_constant("tail", np.array([2, 4], np.int64))
    shape = graph.add_node("Shape", [x], output_names=["shape"]).output
    dims = [
        graph.add_node("Gather", [shape, index], {"axis": 0}, output_names=[f"d{i}"]).output
        for i, index in enumerate((zero, one, two))
    ]
    lead = [graph.add_node("Unsqueeze", [d, axes], output_names=[f"u{i}"]).output for i, d in enumerate(dims[:2])]
    target = graph.add_node("Concat", [*lead, tail], {"axis": 0}, output_names=["target"]).output
    heads = graph.add_node("Reshape", [x, target], output_names=["heads"]).output
    width = graph.add_node("Cast", [dims[2]], {"to": int(F32)}, output_names=["width"]).output
    graph.set_outputs([graph.add_node("Div", [heads, width], output_names=["y"]).output])
    return graph


def test_shape_arithmetic_becomes_constants():
    graph = _split_heads_graph()

    result = run_checked(graph)

    assert result.stats == {"known_shape_vectors": 1, "rewritten": 1}
    assert str(graph) == (
        "graph heads (\n"
        "  %x: f32[batch, seq, 8]\n"
        ") {\n"
        "  %i0: i64[] = const [0]\n"
        "  %i1: i64[] = const [1]\n"
        "  %i2: i64[] = const [2]\n"
        "  %axes: i64[1] = const [0]\n"
        "  %tail: i64[2] = const [2, 4]\n"
        "  %d2: i64[] = const [8]\n"
        "  %target_1: i64[4] = const [0, 0, 2, 4]\n"
        "  %shape: i64[3] = Shape(%x)\n"
        "  %d0: i64[] = Gather(%shape, %i0) {axis=0}\n"
        "  %d1: i64[] = Gather(%shape, %i1) {axis=0}\n"
        "  %u0: i64[1] = Unsqueeze(%d0, %axes)\n"
        "  %u1: i64[1] = Unsqueeze(%d1, %axes)\n"
        "  %target: i64[4] = Concat(%u0, %u1, %tail) {axis=0}\n"
        "  %heads: f32[batch, seq, 2, 4] = Reshape(%x, %target_1)\n"
        "  %width: f32[] = Cast(%d2) {to=1}\n"
        "  %y: f32[batch, seq, 2, 4] = Div(%heads, %width)\n"
        "  return %y\n"
        "}\n"
    )


def test_reshape_target_resolution():
    assert resolve_reshape_target(("batch", "seq", 8), ("batch", "seq", 2, 4), False) == [0, 0, 2, 4]
    assert resolve_reshape_target(("batch", "seq", 8), ("batch", None, 2, 4), False) == [0, -1, 2, 4]
    assert resolve_reshape_target(("batch", "seq", 8), (None, "seq", 2, -1), False) is None
    assert resolve_reshape_target(("seq", "batch", 8), ("batch", "seq", 8), False) is None
    assert resolve_reshape_target(("batch", 8), ("batch", 8), True) == [0, 8]
    assert resolve_reshape_target(("batch", 8), ("batch", 0, 8), True) is None


def test_reshape_chains_collapse():
    graph = Graph("chain")
    x = graph.add_input("x", TensorType(F32, ("batch", 4, 6)))
    flat = graph.add_constant("flat", np.array([0, 24], np.int64))
    split = graph.add_constant("split", np.array([0, 2, 12], np.int64))
    last = graph.add_constant("last", np.array([-1, 8, 3], np.int64))
    first = graph.add_node("Reshape", [x, flat], output_names=["a"])
    second = graph.add_node("Reshape", [first.output, split], output_names=["b"])
    third = graph.add_node("Reshape", [second.output, last], output_names=["c"])
    graph.set_outputs([graph.add_node("Relu", [third.output], output_names=["y"]).output])

    assert run_checked(graph).stats["rewritten"] == 2
    assert [str(node) for node in graph] == ["%c = Reshape(%x, %last)", "%y = Relu(%c)"]


def test_reshape_copying_a_dim_that_differs_stays_chained():
    graph = Graph("copy")
    x = graph.add_input("x", TensorType(F32, (2, 12)))
    first_target = graph.add_constant("s1", np.array([4, 6], np.int64))
    second_target = graph.add_constant("s2", np.array([0, 3, 2], np.int64))
    first = graph.add_node("Reshape", [x, first_target])
    second = graph.add_node("Reshape", [first.output, second_target])
    graph.set_outputs([second.output])

    assert not run_checked(graph).changed


def test_transposes_compose_and_cancel():
    graph = Graph("transposes")
    x = graph.add_input("x", TensorType(F32, ("batch", "seq", 2, 4)))
    a = graph.add_node("Transpose", [x], {"perm": (0, 2, 1, 3)}, output_names=["a"])
    b = graph.add_node("Transpose", [a.output], {"perm": (0, 1, 3, 2)}, output_names=["b"])
    c = graph.add_node("Transpose", [x], {"perm": (0, 2, 1, 3)}, output_names=["c"])
    d = graph.add_node("Transpose", [c.output], {"perm": (0, 2, 1, 3)}, output_names=["d"])
    graph.set_outputs([b.output, graph.add_node("Relu", [d.output], output_names=["y"]).output])

    assert run_checked(graph).stats["rewritten"] == 2
    assert str(graph).splitlines()[3:6] == [
        "  %b: f32[batch, 2, 4, seq] = Transpose(%x) {perm=[0, 2, 3, 1]}",
        "  %y: f32[batch, seq, 2, 4] = Relu(%x)",
        "  return %b, %y",
    ]


def test_squeeze_unsqueeze_pairs_cancel_and_unsqueezes_merge():
    graph = Graph("squeezes")
    x = graph.add_input("x", TensorType(F32, ("batch", "seq")))
    one = graph.add_constant("one", np.array([1], np.int64))
    last = graph.add_constant("last", np.array([-1], np.int64))
    up = graph.add_node("Unsqueeze", [x, one], output_names=["up"])
    down = graph.add_node("Squeeze", [up.output, one], output_names=["down"])
    mask = graph.add_node("Unsqueeze", [down.output, one], output_names=["m1"])
    mask = graph.add_node("Unsqueeze", [mask.output, last], output_names=["m2"])
    graph.set_outputs([graph.add_node("Relu", [mask.output], output_names=["y"]).output])

    assert run_checked(graph).stats["rewritten"] == 2
    assert str(graph).splitlines()[5:8] == [
        "  %m2_axes: i64[2] = const [1, 3]",
        "  %m2: f32[batch, 1, seq, 1] = Unsqueeze(%x, %m2_axes)",
        "  %y: f32[batch, 1, seq, 1] = Relu(%m2)",
    ]


def test_squeeze_of_other_axes_stays():
    graph = Graph("other")
    x = graph.add_input("x", TensorType(F32, (1, 4)))
    up = graph.add_node("Unsqueeze", [x, graph.add_constant("a", np.array([2], np.int64))])
    down = graph.add_node("Squeeze", [up.output, graph.add_constant("b", np.array([0], np.int64))])
    graph.set_outputs([down.output])

    assert not run_checked(graph).changed


def test_second_run_changes_nothing_when_a_late_rewrite_enables_an_early_one():
    """Found by the differential fuzzer: cancelling Squeeze(Unsqueeze(x)) leaves the first
    Unsqueeze with one reader, which makes the Unsqueeze chain mergeable."""
    from graphopt import get_pass

    graph = Graph("g", {"": 18})
    x = graph.add_input("x", TensorType(DType.FLOAT, (2,)))
    axes = graph.add_constant("axes", np.array([0], np.int64))
    u1 = graph.add_node("Unsqueeze", [x, axes], output_names=["u1"])
    u2 = graph.add_node("Unsqueeze", [u1.output, axes], output_names=["u2"])
    squeezed = graph.add_node("Squeeze", [u1.output, axes], output_names=["s"])
    neg = graph.add_node("Neg", [squeezed.output], output_names=["n"])
    graph.set_outputs([u2.output, neg.output])
    simplify = get_pass("simplify-shapes")()
    assert simplify.run(graph, PassContext()).changed
    assert not simplify.run(graph, PassContext()).changed
    assert [n.op_type for n in graph.nodes] == ["Unsqueeze", "Neg"]
    graph.verify()
