"""The opset-23/24 Transformer ops Attention, RMSNormalization and RotaryEmbedding.

Each case is a one-node model built with `onnx.helper`. It is imported (shapes inferred),
put through `cleanup` and `fuse` (which must keep the op, unfused, and the outputs), and
run on every target; the outputs must equal ONNX Runtime's run of the original model (the
ONNX reference evaluator's where ORT has no kernel for the form). Forms a target cannot
compute exactly are refused at compile time, naming the op and the attribute.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from typing import Any, Optional

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import graphopt
from graphopt.api import compile
from graphopt.errors import GraphoptError, UnsupportedOpError
from graphopt.frontends.onnx_import import from_onnx

RNG = np.random.default_rng(23)
B, HQ, HKV, S, D = 2, 4, 2, 3, 8

Feeds = dict[str, Optional[np.ndarray]]


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


@dataclasses.dataclass
class Case:
    """One node: its op, inputs (None = omitted), output names, attributes and expected output shapes."""

    id: str
    op: str
    inputs: Feeds
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    shapes: tuple[tuple[Any, ...], ...]
    opset: int = 23
    reference: str = "onnxruntime"
    tvm_refusal: str = ""

    def model(self, symbolic_batch: bool = False) -> onnx.ModelProto:
        names = [name if value is not None else "" for name, value in self.inputs.items()]
        while names and not names[-1]:
            names.pop()
        node = helper.make_node(self.op, names, list(self.outputs), **self.attrs)
        inputs = [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                          ["batch", *value.shape[1:]] if symbolic_batch and value.ndim >= 3 else value.shape)
            for name, value in self.inputs.items() if value is not None
        ]
        element = helper.np_dtype_to_tensor_dtype(next(iter(self.inputs.values())).dtype)  # type: ignore[union-attr]
        outputs = [helper.make_tensor_value_info(name, element, None) for name in self.outputs]
        model = helper.make_model(helper.make_graph([node], self.id, inputs, outputs),
                                  opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10
        return model

    def feeds(self) -> dict[str, np.ndarray]:
        return {name: value for name, value in self.inputs.items() if value is not None}

    def expected(self) -> list[np.ndarray]:
        model = self.model()
        if self.reference == "onnxruntime":
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return session.run(None, self.feeds())
        return ReferenceEvaluator(model).run(None, self.feeds())


def heads3d(x: np.ndarray) -> np.ndarray:
    """[B, H, S, D] -> [B, S, H * D]."""
    return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)


def attention(id: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray] = None,  # noqa: A002
              past: Optional[tuple[np.ndarray, np.ndarray]] = None, *, outputs: int = 1,
              shapes: tuple[tuple[Any, ...], ...] = (), **kwargs: Any) -> Any:
    inputs: Feeds = {"Q": q, "K": k, "V": v, "attn_mask": mask,
                     "past_key": past[0] if past else None, "past_value": past[1] if past else None}
    extra = {key: kwargs.pop(key) for key in ("opset", "reference", "tvm_refusal") if key in kwargs}
    if "nonpad_kv_seqlen" in kwargs:
        inputs["nonpad_kv_seqlen"] = kwargs.pop("nonpad_kv_seqlen")
    names = ("Y", "present_key", "present_value", "qk_matmul_output")[:outputs]
    return pytest.param(Case(id, "Attention", inputs, names, kwargs, shapes, **extra), id=id)


def causal_bool(q_len: int, k_len: int) -> np.ndarray:
    return np.tril(np.ones((q_len, k_len), dtype=bool))


Q4, K4, V4 = f32(B, HQ, S, D), f32(B, HQ, S, D), f32(B, HQ, S, D)
KG, VG = f32(B, HKV, S, D), f32(B, HKV, S, D)
KX, VX = f32(B, HQ, 5, D), f32(B, HQ, 5, 6)
PK, PV = f32(B, HKV, 4, D), f32(B, HKV, 4, D)
MASK_BOOL = RNG.random((B, 1, S, S)) < 0.7
MASK_BOOL[1, 0, 2, :] = False  # a fully masked query row: zeros
MASK_FLOAT = f32(B, HQ, S, 7)
MASK_FLOAT[0, 1, 0, :] = -np.inf

ATTENTION = [
    attention("mha-4d", Q4, K4, V4, shapes=((B, HQ, S, D),)),
    attention("cross-4d-dv", Q4, KX, VX, shapes=((B, HQ, S, 6),), scale=0.2),
    attention("gqa-4d-causal", Q4, KG, VG, is_causal=1, shapes=((B, HQ, S, D),)),
    attention("gqa-3d", heads3d(Q4), heads3d(KG), heads3d(VG), q_num_heads=HQ, kv_num_heads=HKV, shapes=((B, S, HQ * D),)),
    attention("gqa-3d-causal-bool-mask", heads3d(Q4), heads3d(KG), heads3d(VG), MASK_BOOL, is_causal=1,
              q_num_heads=HQ, kv_num_heads=HKV, shapes=((B, S, HQ * D),)),
    attention("bool-mask-fully-masked-row", Q4, K4, V4, MASK_BOOL, shapes=((B, HQ, S, D),)),
    attention("mqa-4d-causal-cross", Q4, f32(B, 1, 5, D), f32(B, 1, 5, D), is_causal=1, shapes=((B, HQ, S, D),)),
    attention("gqa-past-causal", Q4, KG, VG, None, (PK, PV), outputs=3, is_causal=1,
              shapes=((B, HQ, S, D), (B, HKV, 7, D), (B, HKV, 7, D))),
    attention("gqa-3d-past-float-mask", heads3d(Q4), heads3d(KG), heads3d(VG), MASK_FLOAT, (PK, PV), outputs=3,
              q_num_heads=HQ, kv_num_heads=HKV, shapes=((B, S, HQ * D), (B, HKV, 7, D), (B, HKV, 7, D))),
    attention("past-causal-float-mask", Q4, KG, VG, MASK_FLOAT, (PK, PV), outputs=3, is_causal=1,
              shapes=((B, HQ, S, D), (B, HKV, 7, D), (B, HKV, 7, D))),
    attention("softcap", Q4, K4, V4, softcap=2.0, shapes=((B, HQ, S, D),)),
    attention("qk-output-mode-2", Q4, KX, VX, MASK_FLOAT[:, :, :, :5], outputs=4, qk_matmul_output_mode=2, softcap=1.5,
              shapes=((B, HQ, S, 6), (B, HQ, 5, D), (B, HQ, 5, 6), (B, HQ, S, 5))),
    attention("qk-output-mode-0", Q4, K4, V4, outputs=4, shapes=((B, HQ, S, D), (B, HQ, S, D), (B, HQ, S, D), (B, HQ, S, S))),
    attention("softmax-precision-double", Q4, K4, V4, softmax_precision=11, shapes=((B, HQ, S, D),)),
    attention("nonpad-kv-seqlen-causal", Q4, KX, VX, nonpad_kv_seqlen=np.array([4, 5], np.int64), is_causal=1,
              opset=24, shapes=((B, HQ, S, 6),)),
    attention("short-bool-mask-padded", Q4, KX, VX, RNG.random((S, 3)) < 0.7, opset=24, reference="reference",
              shapes=((B, HQ, S, 6),)),
]


def rms(id: str, x: np.ndarray, scale: np.ndarray, tvm_refusal: str = "", **attrs: Any) -> Any:  # noqa: A002
    case = Case(id, "RMSNormalization", {"X": x, "scale": scale}, ("Y",), attrs, (x.shape,), tvm_refusal=tvm_refusal)
    return pytest.param(case, id=id)


RMS_NORMALIZATION = [
    rms("last-axis", f32(B, S, 16), f32(16)),
    rms("two-axes-epsilon", f32(B, S, 4, 8), f32(4, 8), axis=-2, epsilon=1e-3),
    rms("axis-1-scalar-scale", f32(B, S, 16), f32(1), axis=1),
    rms("float16", f32(B, S, 16).astype(np.float16), f32(16).astype(np.float16),
        tvm_refusal="RMSNormalization: X/scale of type float16 .only float32. has no exact TVM translation"),
]


def rotary(id: str, x: np.ndarray, cache_rows: tuple[int, ...], positions: Optional[np.ndarray], **attrs: Any) -> Any:  # noqa: A002
    inputs: Feeds = {"X": x, "cos_cache": np.cos(f32(*cache_rows)), "sin_cache": np.sin(f32(*cache_rows)), "position_ids": positions}
    return pytest.param(Case(id, "RotaryEmbedding", inputs, ("Y",), attrs, (x.shape,)), id=id)


POSITIONS = np.array([[0, 1, 2], [5, 3, 7]], dtype=np.int64)
ROTARY_EMBEDDING = [
    rotary("4d-halves", f32(B, HQ, S, D), (8, D // 2), POSITIONS),
    rotary("4d-interleaved", f32(B, HQ, S, D), (8, D // 2), POSITIONS, interleaved=1),
    rotary("3d-partial", f32(B, S, HQ * D), (8, 2), POSITIONS, num_heads=HQ, rotary_embedding_dim=4),
    rotary("3d-interleaved-partial", f32(B, S, HQ * D), (8, 2), POSITIONS, num_heads=HQ, rotary_embedding_dim=4, interleaved=1),
    rotary("4d-caches-per-token", f32(B, HQ, S, D), (B, S, D // 2), None),
]

ALL = ATTENTION + RMS_NORMALIZATION + ROTARY_EMBEDDING


def assert_close(got: list[Any], want: list[np.ndarray], what: str) -> None:
    assert len(got) == len(want), what
    for index, (g, w) in enumerate(zip(got, want)):
        g = np.asarray(g)
        assert g.shape == w.shape, f"{what}: output {index} shape {g.shape} != {w.shape}"
        assert g.dtype == w.dtype, f"{what}: output {index} type {g.dtype} != {w.dtype}"
        assert not np.isnan(g).any(), f"{what}: output {index} has NaN"
        tolerance = 2e-3 if w.dtype == np.float16 else 1e-5
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=10 * tolerance, atol=tolerance,
                                   err_msg=f"{what}: output {index}")


@pytest.mark.parametrize(("mask", "opset", "attrs", "refused"), [
    (MASK_BOOL, 23, {}, "a boolean attn_mask"),
    (None, 23, {"is_causal": 1}, "is_causal=1"),
    (MASK_FLOAT[:, :, :, :S], 23, {}, ""),
])
def test_onnxruntime_refuses_the_scores_output_it_masks_with_the_float_minimum(mask: Optional[np.ndarray], opset: int,
                                                                             attrs: dict[str, Any], refused: str) -> None:
    """ORT 1.32's mode-2 scores hold the float minimum where ONNX adds -inf for a boolean mask
    or the causal frontier; a float mask's own -inf passes through."""
    case = Case("qk", "Attention", {"Q": Q4, "K": K4, "V": V4, "attn_mask": mask}, ("Y", "present_key", "present_value", "qk"),
                {"qk_matmul_output_mode": 2, **attrs}, (), opset=opset, reference="reference")
    if refused:
        with pytest.raises(UnsupportedOpError, match=f"node .*Attention with qk_matmul_output_mode=2 and {refused}"):
            compile(case.model(), "onnxruntime")
        return
    got = compile(case.model(), "onnxruntime")(**case.feeds())
    expected = case.expected()
    np.testing.assert_array_equal(np.isneginf(got[3]), np.isneginf(expected[3]))
    np.testing.assert_allclose(np.where(np.isinf(got[3]), 0, got[3]), np.where(np.isinf(expected[3]), 0, expected[3]), atol=1e-5)


@pytest.mark.parametrize("case", ALL)
def test_import_infers_output_shapes(case: Case) -> None:
    graph = from_onnx(case.model())
    assert [n.op_type for n in graph.nodes] == [case.op]
    assert [tuple(out.type.shape) for out in graph.outputs] == [tuple(s) for s in case.shapes]
    symbolic = from_onnx(case.model(symbolic_batch=True))
    assert [out.type.shape[0] for out in symbolic.outputs] == ["batch"] * len(case.shapes)


@pytest.mark.parametrize("case", ALL)
def test_cleanup_and_fuse_keep_the_op_and_the_outputs(case: Case) -> None:
    expected = case.expected()
    for pipeline in ("cleanup", "fuse"):
        graph = graphopt.optimize(case.model(), pipeline)
        assert [n.op_type for n in graph.nodes] == [case.op], pipeline
        assert_close(compile(graph, "onnxruntime", "cleanup")(**case.feeds()), expected, pipeline)


@pytest.mark.parametrize("case", ALL)
def test_torch_target_and_to_fx_match(case: Case) -> None:
    import torch

    expected = case.expected()
    assert_close(compile(case.model(), "torch")(**case.feeds()), expected, "torch target")
    module = from_onnx(case.model()).to_fx()
    with torch.no_grad():
        outputs = module(*[torch.from_numpy(v) for v in case.feeds().values()])
    assert_close([o.numpy() for o in outputs], expected, "to_fx")


@pytest.mark.parametrize("case", ALL)
def test_tvm_target_matches_or_refuses(case: Case) -> None:
    pytest.importorskip("tvm")
    if case.tvm_refusal:
        with pytest.raises(GraphoptError, match=case.tvm_refusal):
            compile(case.model(), "tvm:llvm")
        return
    expected = case.expected()
    assert_close(compile(case.model(), "tvm:llvm")(**case.feeds()), expected, "tvm:llvm")
    assert_close(compile(case.model(symbolic_batch=True), "tvm:llvm")(**case.feeds()), expected, "tvm:llvm, symbolic batch")


def decoder_block(with_decomposed_attention: bool) -> onnx.ModelProto:
    """x -> RMSNormalization -> Q/K/V projections -> RotaryEmbedding on Q and K -> GQA causal
    Attention (3-D) with a KV cache -> output projection + residual; optionally a second,
    decomposed attention (MatMul, Mul, Softmax, MatMul) over the rotated query heads beside it."""
    hidden, kv_hidden = HQ * D, HKV * D
    weights = {"ln": 1 + 0.1 * f32(hidden), "wq": 0.2 * f32(hidden, hidden), "wk": 0.2 * f32(hidden, kv_hidden),
               "wv": 0.2 * f32(hidden, kv_hidden), "wo": 0.2 * f32(hidden, hidden),
               "cos": np.cos(f32(16, D // 2)), "sin": np.sin(f32(16, D // 2)), "heads": np.array([0, 0, HQ, D], np.int64),
               "scale": np.array(D ** -0.5, np.float32)}
    nodes = [
        helper.make_node("RMSNormalization", ["x", "ln"], ["normed"], epsilon=1e-6),
        helper.make_node("MatMul", ["normed", "wq"], ["q"]),
        helper.make_node("MatMul", ["normed", "wk"], ["k"]),
        helper.make_node("MatMul", ["normed", "wv"], ["v"]),
        helper.make_node("RotaryEmbedding", ["q", "cos", "sin", "positions"], ["q_rot"], num_heads=HQ),
        helper.make_node("RotaryEmbedding", ["k", "cos", "sin", "positions"], ["k_rot"], num_heads=HKV),
        helper.make_node("Attention", ["q_rot", "k_rot", "v", "", "past_key", "past_value"], ["attn", "present_key", "present_value"],
                         is_causal=1, q_num_heads=HQ, kv_num_heads=HKV),
        helper.make_node("MatMul", ["attn", "wo"], ["projected"]),
        helper.make_node("Add", ["x", "projected"], ["y"]),
    ]
    outputs = ["y", "present_key", "present_value"]
    if with_decomposed_attention:
        nodes += [
            helper.make_node("Reshape", ["q_rot", "heads"], ["q4"]),
            helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
            helper.make_node("Transpose", ["q4"], ["kt"], perm=[0, 2, 3, 1]),
            helper.make_node("MatMul", ["qh", "kt"], ["scores"]),
            helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
            helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
            helper.make_node("MatMul", ["probs", "qh"], ["self_attn"]),
        ]
        outputs.append("self_attn")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden]),
              helper.make_tensor_value_info("positions", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, ["batch", HKV, "past", D]),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, ["batch", HKV, "past", D])]
    graph = helper.make_graph(nodes, "decoder", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


BLOCK_FEEDS = {"x": f32(B, S, HQ * D), "positions": np.array([[4, 5, 6], [2, 3, 4]], np.int64),
               "past_key": f32(B, HKV, 4, D), "past_value": f32(B, HKV, 4, D)}


@pytest.mark.parametrize("with_decomposed_attention", [False, True], ids=["ops-only", "beside-decomposed-attention"])
def test_fuse_leaves_the_ops_once_and_keeps_the_outputs(with_decomposed_attention: bool) -> None:
    model = decoder_block(with_decomposed_attention)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, BLOCK_FEEDS)
    graph = graphopt.optimize(model, "fuse")
    counts = graph.op_counts()
    assert (counts["RMSNormalization"], counts["RotaryEmbedding"], counts["Attention"]) == (1, 2, 1)
    assert counts.get("graphopt::RMSNorm", 0) == 0
    assert counts.get("graphopt::Attention", 0) == (1 if with_decomposed_attention else 0)
    assert graph.outputs[0].type.shape == ("batch", "seq", HQ * D)
    specs = ["onnxruntime", "onnxruntime{contrib_ops=False}", "torch"]
    if importlib.util.find_spec("tvm") is not None:
        specs.append("tvm:llvm")
    for spec in specs:
        assert_close(compile(graph, spec, "cleanup")(**BLOCK_FEEDS), expected, spec)


def onnx_node_cases() -> list[Any]:
    """ONNX's own backend node tests of the three ops (generated from the installed onnx
    package: importing a generator module records its cases), without the `_expanded` forms
    and the bfloat16 ones, which ONNX Runtime 1.32 cannot load."""
    import importlib

    import onnx.backend.test.case.node as node_cases

    for module in ("attention", "rmsnormalization", "rotaryembedding"):
        importlib.import_module(f"onnx.backend.test.case.node.{module}")
    pattern = re.compile(r"test_(attention|rms_normalization|rotary_embedding)")
    cases = [c for c in node_cases._NodeTestCases if pattern.match(c.name) and "expanded" not in c.name and "bf16" not in c.name]
    return [pytest.param(c, id=c.name) for c in sorted(cases, key=lambda c: c.name)]


def expected_refusal(model: onnx.ModelProto, target: str) -> str:
    """The refusal each target gives a node test case ("" when it must compute it)."""
    node = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    reads_scores = len(node.output) > 3 and bool(node.output[3])
    if target == "onnxruntime" and reads_scores and attrs.get("qk_matmul_output_mode") == 2 and attrs.get("is_causal"):
        return "qk_matmul_output_mode=2 and is_causal=1.*float minimum"
    return ""


@pytest.mark.parametrize("target", ["onnxruntime", "torch", pytest.param("tvm:llvm", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", onnx_node_cases())
def test_onnx_node_test_cases(case: Any, target: str) -> None:
    if target.startswith("tvm"):
        pytest.importorskip("tvm")
    inputs, expected = case.data_sets[0]
    feeds = dict(zip([i.name for i in case.model.graph.input], inputs))
    refusal = expected_refusal(case.model, target)
    if refusal:
        with pytest.raises(GraphoptError, match=refusal):
            compile(case.model, target, "fuse")
        return
    outputs = compile(case.model, target, "fuse")(**feeds)
    assert len(outputs) == len(expected)
    for index, (got, want) in enumerate(zip(outputs, expected)):
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape, f"output {index}"
        tolerance = 2e-3 if want.dtype == np.float16 else 1e-4
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tolerance, atol=tolerance, err_msg=f"output {index}")


@pytest.mark.parametrize(("op", "inputs", "attrs", "refused"), [
    ("Attention", {"Q": Q4, "K": K4, "V": V4}, {"softmax_precision": 7}, "softmax_precision=7"),
    ("RMSNormalization", {"X": f32(B, S, 16), "scale": f32(16)}, {"stash_type": 6}, "stash_type=6"),
])
def test_to_fx_refuses_attribute_values_at_conversion(op: str, inputs: Feeds, attrs: dict[str, Any], refused: str) -> None:
    graph = from_onnx(Case("bad", op, inputs, ("Y",), attrs, ()).model())
    with pytest.raises(UnsupportedOpError, match=f"node .*{op} does not implement {refused}"):
        graph.to_fx()
