"""Symbolic dims as expressions: canonical forms, equality, and the frontends, schemas and
exporter that create and keep them (`past + seq` of a KV-cache decoder)."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.ir.symbolic import (
    add_dims,
    canonical_dim,
    dim_at_most,
    dims_equal,
    floordiv_dims,
    mul_dims,
    parse_dim,
    sub_dims,
)
from graphopt.ir.types import TensorType, merge_dims, same_shape


def test_canonical_forms() -> None:
    assert canonical_dim("seq + past") == canonical_dim("past+seq") == "past + seq"
    assert canonical_dim("2*(a+b)") == canonical_dim("2*a + 2*b") == "2*a + 2*b"
    assert canonical_dim("(a*b)//b") == "a"
    assert canonical_dim("s1*2") == "2*s1"
    assert canonical_dim("a - a") == 0
    assert canonical_dim("2*3") == 6
    assert canonical_dim(7) == 7 and canonical_dim(None) is None
    # the canonical text round-trips
    for text in ("past + seq", "-past + seq", "batch*heads", "seq - 1", "a**2 + 1", "2*a*b"):
        assert canonical_dim(canonical_dim(text)) == canonical_dim(text)


def test_opaque_symbols_are_kept() -> None:
    for text in ("unk__123", "batch_size", "Addpast_length_dim_1", "batch size", "N/A", "a//2", "lambda", "a**99"):
        assert canonical_dim(text) == text
    assert canonical_dim("E + I") == "E + I"  # plain symbols, not sympy's constants
    assert parse_dim("a//2") is None and parse_dim("Max(1, s0)") is None and parse_dim("s0") == "s0"
    # an opaque symbol equals only itself; arithmetic on it is unknown except the identities
    assert dims_equal("batch size", "batch size") is True
    assert dims_equal("batch size", "batch") is None
    assert add_dims("batch size", "seq") is None
    assert add_dims("batch size", 0) == "batch size" and mul_dims("batch size", 0) == 0
    assert sub_dims("batch size", "batch size") == 0


def test_dims_equal() -> None:
    assert dims_equal("past + seq", "seq + past") is True
    assert dims_equal("2*(a+b)", "2*a + 2*b") is True
    assert dims_equal("(a*b)//b", "a") is True
    assert dims_equal("seq + 1", "seq") is False
    assert dims_equal("seq + 5", 3) is False  # sizes are nonnegative
    assert dims_equal("seq", -1) is False
    assert dims_equal("batch", "seq") is None  # may be equal at run time
    assert dims_equal("seq", 3) is None
    assert dims_equal(None, "seq") is None and dims_equal(None, None) is None
    assert dims_equal(3, 3) is True and dims_equal(3, 4) is False


def test_arithmetic() -> None:
    assert add_dims("past", "seq") == "past + seq"
    assert sub_dims("past + seq", "past") == "seq"
    assert sub_dims("seq", 1) == "seq - 1"
    assert mul_dims("batch", "heads") == "batch*heads"
    assert floordiv_dims("batch*heads", "heads") == "batch"
    assert floordiv_dims("2*a + 2", 2) == "a + 1"
    assert floordiv_dims("a", 2) is None and floordiv_dims("a", 0) is None
    assert floordiv_dims(7, 2) == 3
    assert add_dims("seq", None) is None and mul_dims(None, 0) == 0
    assert dim_at_most("past", "past + seq") is True
    assert dim_at_most("seq + 1", "seq") is False
    assert dim_at_most(0, "seq - 1") is None


def test_types_use_canonical_expressions() -> None:
    assert TensorType(None, ("seq+past", "s1*2")).shape == ("past + seq", "2*s1")
    assert str(TensorType(None, ("batch", 4, "seq + past", 16))) == "?[batch, 4, past + seq, 16]"
    assert same_shape(("b", "past + seq"), ("b", "seq+past"))
    assert not same_shape(("b", "past"), ("b", "seq"))
    assert merge_dims("past + seq", None) == "past + seq" and merge_dims("past + seq", 5) == 5


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "symbolic", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _kv_concat_model() -> onnx.ModelProto:
    past = helper.make_tensor_value_info("past_key", TensorProto.FLOAT, ["batch", 4, "past", 16])
    key = helper.make_tensor_value_info("key", TensorProto.FLOAT, ["batch", 4, "seq", 16])
    present = helper.make_tensor_value_info("present", TensorProto.FLOAT, None)
    return _model([helper.make_node("Concat", ["past_key", "key"], ["present"], axis=2)], [past, key], [present])


def test_concat_along_an_axis_sums_the_dims() -> None:
    graph = graphopt.from_onnx(_kv_concat_model())
    assert graph.outputs[0].shape == ("batch", 4, "past + seq", 16)
    assert "%present: f32[batch, 4, past + seq, 16] = Concat(%past_key, %key) {axis=2}" in str(graph)


def test_mask_shape_chain_keeps_the_expression() -> None:
    """Shape -> Gather -> Add -> Range -> Unsqueeze, and ConstantOfShape of the same sizes:
    a [seq, past + seq] mask whose last dim is the concatenated keys' length."""
    past = helper.make_tensor_value_info("past_key", TensorProto.FLOAT, ["batch", 4, "past", 16])
    key = helper.make_tensor_value_info("key", TensorProto.FLOAT, ["batch", 4, "seq", 16])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("present", "mask")]
    outputs.append(helper.make_tensor_value_info("positions", TensorProto.INT64, None))
    consts = [
        helper.make_tensor("two", TensorProto.INT64, [], [2]),
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
        helper.make_tensor("one", TensorProto.INT64, [], [1]),
        helper.make_tensor("axis0", TensorProto.INT64, [1], [0]),
    ]
    nodes = [
        helper.make_node("Concat", ["past_key", "key"], ["present"], axis=2),
        helper.make_node("Shape", ["past_key"], ["past_shape"]),
        helper.make_node("Shape", ["key"], ["key_shape"]),
        helper.make_node("Gather", ["past_shape", "two"], ["past_len"], axis=0),
        helper.make_node("Gather", ["key_shape", "two"], ["seq_len"], axis=0),
        helper.make_node("Add", ["past_len", "seq_len"], ["total"]),
        helper.make_node("Range", ["zero", "total", "one"], ["positions"]),
        helper.make_node("Range", ["past_len", "total", "one"], ["new_positions"]),
        helper.make_node("Unsqueeze", ["seq_len", "axis0"], ["rows"]),
        helper.make_node("Unsqueeze", ["total", "axis0"], ["cols"]),
        helper.make_node("Concat", ["rows", "cols"], ["mask_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["mask_shape"], ["mask"]),
    ]
    graph = graphopt.from_onnx(_model(nodes, [past, key], outputs, consts))
    values = {v.name: v for node in graph.nodes for v in node.outputs}
    assert values["total"].symbolic == ("past + seq",)
    assert values["positions"].shape == ("past + seq",)
    assert values["new_positions"].shape == ("seq",)
    assert values["mask_shape"].symbolic == ("seq", "past + seq")
    assert values["mask"].shape == ("seq", "past + seq")
    assert values["mask"].shape[-1] == values["present"].shape[2]


def test_reshape_and_slice_of_expressions() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("heads", "tail")]
    consts = [
        helper.make_tensor("target", TensorProto.INT64, [3], [0, -1, 16]),
        helper.make_tensor("start", TensorProto.INT64, [1], [1]),
        helper.make_tensor("end", TensorProto.INT64, [1], [2**31 - 1]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "target"], ["heads"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["heads", "start", "end", "axes"], ["tail"]),
    ]
    graph = graphopt.from_onnx(_model(nodes, [x], outputs, consts))
    heads, tail = graph.outputs
    assert heads.shape == ("batch", "4*seq", 16)
    assert tail.shape == (None, "4*seq", 16)  # batch - 1 may be clamped at batch 0


def test_onnx_round_trip_keeps_expression_dims(tmp_path) -> None:
    graph = graphopt.from_onnx(_kv_concat_model())
    model = graph.to_onnx()
    [output] = model.graph.output
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch", 4, "past + seq", 16]
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "kv.onnx"
    graph.save_onnx(path)
    again = graphopt.from_onnx(path)
    assert dims_equal(again.outputs[0].shape[2], graph.outputs[0].shape[2]) is True
    assert str(again) == str(graph)


def test_onnx_dim_params_are_read_canonically() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq+past", "batch size"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = graphopt.from_onnx(_model([helper.make_node("Identity", ["x"], ["y"])], [x], [y]))
    assert graph.inputs[0].shape == ("past + seq", "batch size")


def test_import_graphopt_loads_no_sympy() -> None:
    code = "import sys, graphopt; print('sympy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def _kv_step_module():
    """Concatenates a dynamic past with new keys and builds a [batch, 1, seq, past + seq] mask
    from the shapes."""
    import torch

    class KVStep(torch.nn.Module):
        def forward(self, past_key, key):
            present = torch.cat([past_key, key], dim=2)
            batch, seq = key.shape[0], key.shape[2]
            mask = torch.zeros(batch, 1, seq, past_key.shape[2] + seq)
            return present, mask

    return KVStep()


def test_torch_export_concat_imports_as_expression() -> None:
    torch = pytest.importorskip("torch")
    from torch.export import Dim

    past, key = torch.randn(2, 4, 5, 16), torch.randn(2, 4, 3, 16)
    dims = {"past_key": {2: Dim("past")}, "key": {2: Dim("seq")}}
    program = torch.export.export(_kv_step_module(), (past, key), dynamic_shapes=dims)
    graph = graphopt.from_fx(program)
    present, mask = graph.outputs
    past_sym, seq_sym = graph.inputs[0].shape[2], graph.inputs[1].shape[2]
    assert isinstance(past_sym, str) and isinstance(seq_sym, str)
    assert present.shape[2] == add_dims(past_sym, seq_sym)
    assert mask.shape == (2, 1, seq_sym, present.shape[2])
    assert f"f32[2, 4, {add_dims(past_sym, seq_sym)}, 16]" in str(graph)


def test_torchscript_export_mask_matches_the_keys(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "kv_step.onnx"
    past, key = torch.randn(2, 4, 5, 16), torch.randn(2, 4, 3, 16)
    torch.onnx.export(
        _kv_step_module(), (past, key), str(path), dynamo=False, opset_version=17,
        input_names=["past_key", "key"], output_names=["present", "mask"],
        dynamic_axes={"past_key": {0: "batch", 2: "past"}, "key": {0: "batch", 2: "seq"}},
    )
    graph = graphopt.from_onnx(path)
    present, mask = graph.outputs
    assert present.shape[2] == "past + seq"
    assert mask.shape == ("batch", 1, "seq", "past + seq")
    text = str(graph)
    assert "%present: f32[batch, 4, past + seq, 16]" in text
    assert "%mask: f32[batch, 1, seq, past + seq]" in text
