"""fuse-attention on models built with transformers' default SDPA attention.

Their exports guard the probabilities with `Where(IsNaN(P), 0, P)` (a -inf mask makes a fully
masked row's softmax NaN); the fused op carries that as `nan_to_zero`. Every layer's
attention must be raised and the outputs must stay equal on every target, also for a fully
padded sequence, where the guarded rows are exercised.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import max_abs_diff

import graphopt
import model_zoo
from graphopt.api import compile

SDPA_ARCHITECTURES = (
    "bert", "roberta", "distilbert", "albert", "electra", "vit", "whisper-encoder", "t5-encoder",
    "gpt2", "opt", "llama", "mistral", "qwen2", "phi",
)
"""The zoo architectures transformers can build with SDPA attention (DeBERTa-v2, MPNet,
GPT-Neo and BLOOM support only their eager attention)."""


@pytest.mark.slow
@pytest.mark.parametrize("name", SDPA_ARCHITECTURES)
def test_sdpa_exports_fuse_every_layer_and_keep_outputs(name, tmp_path):
    zm = model_zoo.build(name, attention="sdpa", batch=3)
    path = str(model_zoo.export_onnx(zm, tmp_path / f"{name}.onnx"))
    graph = graphopt.optimize(path, "fuse")
    fused = [n for n in graph.nodes if n.qualified_op == "graphopt::Attention"]
    assert len(fused) == model_zoo.LAYERS
    feeds = {k: v.numpy().copy() for k, v in zm.inputs.items()}
    if "attention_mask" in feeds:
        feeds["attention_mask"][-1, :] = 0
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    for spec in ("onnxruntime", "onnxruntime{contrib_ops=False}", "torch"):
        actual = compile(path, spec, "fuse")(**feeds)
        assert not any(np.isnan(np.asarray(a)).any() for a in actual), spec
        assert max_abs_diff(expected, actual) <= 1e-4, spec


def test_bert_sdpa_attention_carries_the_nan_guard(tmp_path):
    zm = model_zoo.build("bert", attention="sdpa")
    graph = graphopt.optimize(str(model_zoo.export_onnx(zm, tmp_path / "bert.onnx")), "fuse")
    attrs = [n.attrs for n in graph.nodes if n.qualified_op == "graphopt::Attention"]
    assert attrs and all(a.get("nan_to_zero") == 1 for a in attrs)
    assert "IsNaN" not in graph.op_counts()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_tvm_target_keeps_the_nan_guard(name, tmp_path):
    pytest.importorskip("tvm")
    zm = model_zoo.build(name, attention="sdpa", batch=3)
    path = str(model_zoo.export_onnx(zm, tmp_path / f"{name}.onnx"))
    feeds = {k: v.numpy().copy() for k, v in zm.inputs.items()}
    feeds["attention_mask"][-1, :] = 0
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    assert max_abs_diff(expected, compile(path, "tvm:llvm", "fuse")(**feeds)) <= 1e-4
