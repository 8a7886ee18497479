"""If/Loop/Scan bodies that read values of the outer graph: the values are uses (captures),
so cleanup and fuse keep them, and renamed or replaced captures are renamed in the bodies."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import GraphError, ModelLoadError
from graphopt.frontends.onnx_import import from_onnx

FLOAT = TensorProto.FLOAT


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "outer", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _if_model() -> onnx.ModelProto:
    """y = If(cond): then (t * scale) else (w_else + x); t = x + w (outer), scale and
    w_else are initializers only the bodies read."""
    then_body = helper.make_graph(
        [helper.make_node("Mul", ["t", "scale"], ["then_out"])], "then", [],
        [helper.make_tensor_value_info("then_out", FLOAT, [2, 3])],
    )
    else_body = helper.make_graph(
        [helper.make_node("Add", ["w_else", "x"], ["else_out"])], "else", [],
        [helper.make_tensor_value_info("else_out", FLOAT, [2, 3])],
    )
    nodes = [
        helper.make_node("Add", ["x", "w"], ["t"]),
        helper.make_node("Identity", ["t"], ["t_copy"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_body, else_branch=else_body),
        helper.make_node("Relu", ["t_copy"], ["z"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, [2, 3]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 3]), helper.make_tensor_value_info("z", FLOAT, [2, 3])],
        [_const("w", np.full((2, 3), 0.5)), _const("scale", [[2.0, 3.0, 4.0]] * 2), _const("w_else", np.arange(6).reshape(2, 3))],
    )


def _loop_model() -> onnx.ModelProto:
    """A Loop whose body adds an outer initializer `step` and an outer value `bias` (a node
    output) each iteration, with a nested If reading the top-level input `x`."""
    inner_then = helper.make_graph(
        [helper.make_node("Add", ["acc_next", "x"], ["inner_out"])], "inner_then", [],
        [helper.make_tensor_value_info("inner_out", FLOAT, [3])],
    )
    inner_else = helper.make_graph(
        [helper.make_node("Identity", ["acc_next"], ["inner_else_out"])], "inner_else", [],
        [helper.make_tensor_value_info("inner_else_out", FLOAT, [3])],
    )
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "step"], ["acc_sum"]),
            helper.make_node("Add", ["acc_sum", "bias"], ["acc_next"]),
            helper.make_node("If", ["use_x"], ["acc_out"], then_branch=inner_then, else_branch=inner_else),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", FLOAT, [3])],
    )
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["bias"]),
        helper.make_node("Loop", ["trips", "", "init"], ["final"], body=body),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, [3]), helper.make_tensor_value_info("use_x", TensorProto.BOOL, []),
         helper.make_tensor_value_info("init", FLOAT, [3])],
        [helper.make_tensor_value_info("final", FLOAT, [3])],
        [_const("step", [1.0, 2.0, 3.0]), _const("two", [2.0]), numpy_helper.from_array(np.array(3, dtype=np.int64), "trips")],
    )


def _scan_model() -> onnx.ModelProto:
    """A Scan whose body multiplies each row by an outer initializer."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["row", "gain"], ["scaled"]), helper.make_node("Add", ["carry", "scaled"], ["carry_out"])],
        "scan_body",
        [helper.make_tensor_value_info("carry", FLOAT, [4]), helper.make_tensor_value_info("row", FLOAT, [4])],
        [helper.make_tensor_value_info("carry_out", FLOAT, [4])],
    )
    nodes = [helper.make_node("Scan", ["zeros", "rows"], ["total"], body=body, num_scan_inputs=1)]
    return _model(
        nodes, [helper.make_tensor_value_info("rows", FLOAT, [5, 4])], [helper.make_tensor_value_info("total", FLOAT, [4])],
        [_const("zeros", np.zeros(4)), _const("gain", [1.0, -1.0, 0.5, 2.0])],
    )


CASES = {
    "if": (_if_model, lambda cond: {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2, "cond": np.array(cond)}),
    "loop": (_loop_model, lambda cond: {"x": np.array([1.0, -2.0, 0.5], np.float32), "use_x": np.array(cond),
                                        "init": np.array([0.25, 0.5, 1.0], np.float32)}),
    "scan": (_scan_model, lambda cond: {"rows": np.arange(20, dtype=np.float32).reshape(5, 4) / 3}),
}


def test_cleanup_simplifies_inside_bodies_and_recomputes_captures():
    model = _if_model()
    then_branch = model.graph.node[2].attribute[0].g
    then_branch.node.insert(0, helper.make_node("Identity", ["scale"], ["scale_copy"]))
    then_branch.node[1].input[1] = "scale_copy"
    graph = graphopt.optimize(model, "cleanup")
    node = next(n for n in graph.nodes if n.op_type == "If")
    written = graph.to_onnx()
    bodies = {a.name: a.g for n in written.graph.node if n.op_type == "If" for a in n.attribute}
    assert [n.op_type for n in bodies["then_branch"].node] == ["Mul"]
    assert "scale" in node.capture_names
    assert [r.name for r in graph.report.records] == ["cleanup"]
    feeds = CASES["if"][1](True)
    np.testing.assert_allclose(_run(written, feeds)[0], _run(model, feeds)[0])


def test_outer_values_read_by_bodies_are_captures():
    graph = from_onnx(_if_model())
    node = next(n for n in graph.nodes if n.op_type == "If")
    assert sorted(node.capture_names) == ["scale", "t", "w_else", "x"]
    scale = graph.constants["scale"]
    assert [use.is_capture for use in scale.uses()] == [True]
    assert "captures(" in str(graph)
    graph.verify()


@pytest.mark.parametrize("pipeline", ["cleanup", "fuse", "eliminate-dead-code{remove_opaque=true}"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bodies_keep_what_they_read(case, pipeline, tmp_path):
    build, feeds = CASES[case]
    model = build()
    optimized = graphopt.optimize(model, pipeline)
    written = optimized.to_onnx()
    onnx.checker.check_model(written, full_check=True)
    for cond in (True, False):
        expected = _run(model, feeds(cond))
        actual = _run(written, feeds(cond))
        for e, a in zip(expected, actual):
            np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def test_replaced_capture_is_renamed_inside_the_body():
    model = _if_model()
    graph = from_onnx(model)
    copy = next(n for n in graph.nodes if n.op_type == "Identity")
    # the then-branch reads `t`: replace `t` everywhere by an equal value of another name
    t = graph.find_value("t")
    fresh = graph.add_node("Add", [graph.find_value("x"), graph.constants["w"]], output_names=["t_again"], before=copy)
    t.replace_all_uses_with(fresh.output)
    graph.erase(t.producer)
    graph.verify()
    written = graph.to_onnx()
    onnx.checker.check_model(written, full_check=True)
    feeds = CASES["if"][1](True)
    np.testing.assert_allclose(_run(written, feeds)[0], _run(model, feeds)[0])
    names = [name for node in written.graph.node if node.op_type == "If" for a in node.attribute for name in a.g.node[0].input]
    assert "t_again" in names and "t" not in names


def test_erasing_a_captured_value_is_refused():
    graph = from_onnx(_if_model())
    t_producer = graph.find_value("t").producer  # `t` is read by the Identity and the If's body
    graph.find_value("t_copy").replace_all_uses_with(graph.find_value("t"))
    graph.erase(graph.find_value("t_copy").producer)
    with pytest.raises(GraphError, match=r"used by .*\(If\)"):
        graph.erase(t_producer)


def test_new_values_never_take_a_body_name():
    graph = from_onnx(_if_model())
    assert graph.unique_name("then_out") != "then_out"
    assert graph.clone().unique_name("else_out") != "else_out"


def test_body_reading_an_undefined_value_is_refused():
    model = _if_model()
    then_branch = model.graph.node[2].attribute[0].g
    then_branch.node[0].input[1] = "nowhere"
    with pytest.raises(ModelLoadError, match="subgraph of node .* reads 'nowhere'"):
        from_onnx(model)


# ---------------------------------------------------------------- a merged decoder, as Optimum builds it
class _TinyDecoder:
    """One attention layer with a KV cache, as a torch module built on the fly (torch is
    imported lazily so the cheap tests above need none)."""

    @staticmethod
    def build(with_past: bool):
        import torch

        class Decoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.embed = torch.nn.Embedding(32, 16)
                self.qkv = torch.nn.Linear(16, 48)
                self.out = torch.nn.Linear(16, 16)
                self.head = torch.nn.Linear(16, 32, bias=False)

            def forward(self, input_ids, past_key=None, past_value=None):
                h = self.embed(input_ids)
                batch, seq = input_ids.shape
                q, k, v = self.qkv(h).view(batch, seq, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
                if with_past:
                    k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
                scores = q @ k.transpose(-1, -2) / 8 ** 0.5
                context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, 16)
                return self.head(h + self.out(context)), k, v

        return Decoder().eval()

    @staticmethod
    def export(with_past: bool, path) -> onnx.ModelProto:
        import torch

        model = _TinyDecoder.build(with_past)
        ids = torch.tensor([[1, 5, 9]])
        past = torch.zeros(1, 2, 2, 8)
        args = (ids, past, past) if with_past else (ids,)
        names = ["input_ids", "past_key", "past_value"][: len(args)]
        axes = {"input_ids": {0: "batch", 1: "seq"}, "past_key": {0: "batch", 2: "past"}, "past_value": {0: "batch", 2: "past"}}
        torch.onnx.export(
            model, args, str(path), input_names=names, output_names=["logits", "present_key", "present_value"],
            dynamic_axes={k: v for k, v in axes.items() if k in names}, opset_version=17, dynamo=False,
        )
        return onnx.load(str(path))


SHAPES = (["batch", "seq", 32], ["batch", 2, "total", 8], ["batch", 2, "total", 8])


def _merged_decoder(tmp_path) -> onnx.ModelProto:
    """The with-cache and without-cache exports as two branches of one If on
    `use_cache_branch`, their weights as outer initializers read only inside the branches."""
    outer_inputs = {"input_ids", "past_key", "past_value"}
    initializers: dict[str, onnx.TensorProto] = {}
    branches = []
    for with_past in (True, False):
        part = _TinyDecoder.export(with_past, tmp_path / f"decoder_{with_past}.onnx")
        prefix = "with_past/" if with_past else "no_past/"
        renames = {}
        for init in part.graph.initializer:
            data = numpy_helper.to_array(init)
            same = initializers.get(init.name)
            if same is None or not np.array_equal(numpy_helper.to_array(same), data):
                renames[init.name] = init.name if same is None else prefix + init.name
                initializers[renames[init.name]] = numpy_helper.from_array(data, renames[init.name])
        local = {out for node in part.graph.node for out in node.output if out}
        renames.update({name: prefix + name for name in local})

        def name(n):
            return renames.get(n, n) if n not in outer_inputs else n

        nodes = []
        for node in part.graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = prefix + node.name
            copy.input[:] = [name(n) for n in node.input]
            copy.output[:] = [name(n) for n in node.output]
            nodes.append(copy)
        outputs = [helper.make_tensor_value_info(name(o.name), FLOAT, shape) for o, shape in zip(part.graph.output, SHAPES)]
        branches.append(helper.make_graph(nodes, prefix.strip("/"), [], outputs))
    if_node = helper.make_node(
        "If", ["use_cache_branch"], ["logits", "present_key", "present_value"], then_branch=branches[0], else_branch=branches[1],
    )
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("past_key", FLOAT, ["batch", 2, "past", 8]),
        helper.make_tensor_value_info("past_value", FLOAT, ["batch", 2, "past", 8]),
        helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, []),
    ]
    outputs = [helper.make_tensor_value_info(n, FLOAT, s) for n, s in zip(("logits", "present_key", "present_value"), SHAPES)]
    return _model([if_node], inputs, outputs, list(initializers.values()), opset=17)


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript")
@pytest.mark.parametrize("pipeline", ["cleanup", "fuse"])
def test_merged_with_and_without_cache_decoder_survives(pipeline, tmp_path):
    model = _merged_decoder(tmp_path)
    graph = from_onnx(model)
    assert len(graph.constants) == len(model.graph.initializer)
    optimized = graphopt.optimize(model, pipeline)
    written = optimized.to_onnx()
    onnx.checker.check_model(written, full_check=True)
    branch_sizes = [[len(a.g.node) for a in m.graph.node[0].attribute] for m in (model, written)]
    assert all(after < before / 2 for before, after in zip(*branch_sizes)), branch_sizes  # cleaned inside
    rng = np.random.default_rng(0)
    ids = np.array([[3, 7, 11, 2]], dtype=np.int64)
    for use_cache, past in ((True, 3), (False, 0)):
        feeds = {
            "input_ids": ids, "use_cache_branch": np.array(use_cache),
            "past_key": rng.standard_normal((1, 2, past, 8), dtype=np.float32),
            "past_value": rng.standard_normal((1, 2, past, 8), dtype=np.float32),
        }
        expected, actual = _run(model, feeds), _run(written, feeds)
        assert [e.shape for e in expected] == [a.shape for a in actual]
        for e, a in zip(expected, actual):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
