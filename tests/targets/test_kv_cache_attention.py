"""KV-cache decoders (Optimum's "with past" exports of tests/decoder_zoo.py) through fuse and the
onnxruntime and torch targets: one GroupQueryAttention per layer with the model's true KV head
count, rotary embeddings raised, outputs equal to the export's at prefill, decode and with left
padding, and the same greedy tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import decoder_zoo  # noqa: E402

CASES = [(name, exporter, "sdpa") for name in decoder_zoo.ARCHITECTURES for exporter in decoder_zoo.EXPORTERS] + [
    ("llama", "torchscript", "eager"), ("llama", "dynamo", "eager"), ("mistral", "torchscript", "eager"),
]
STEPS = [  # batch, seq, past, left padding
    (1, 5, 0, False), (2, 1, 20, False), (2, 4, 0, True), (2, 1, 6, True),
    (2, 3, 4, True),  # batched chunked prefill: ORT's CPU GroupQueryAttention refuses it; the target runs it row by row
]


def _skip_unsupported(case: tuple[str, str, str]) -> None:
    if case in decoder_zoo.UNSUPPORTED:
        pytest.skip(decoder_zoo.UNSUPPORTED[case])


def _run(compiled: graphopt.target_base.CompiledModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    result = compiled(**feeds)
    return [np.asarray(v) for v in (result.values() if isinstance(result, dict) else result)]


def _saved_model(compiled: object, tmp_path: Path) -> onnx.ModelProto:
    compiled.save(tmp_path / "saved")  # type: ignore[attr-defined]
    (path,) = (tmp_path / "saved").glob("*.onnx")
    return onnx.load(path)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_onnxruntime_target_runs_group_query_attention_with_the_cache(case: tuple[str, str, str], tmp_path: Path) -> None:
    _skip_unsupported(case)
    name, exporter, attention = case
    path = decoder_zoo.decoder_onnx(name, exporter, attention)
    _, config = decoder_zoo.build_decoder(name, attention)
    compiled = graphopt.compile(path, target="onnxruntime:cpu", pipeline="fuse")
    nodes = _saved_model(compiled, tmp_path).graph.node
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == config.num_hidden_layers
    for node in gqa:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["kv_num_heads"] == decoder_zoo.kv_heads(config)
        assert attrs["num_heads"] == config.num_attention_heads
    assert not [n for n in nodes if n.op_type == "Softmax"]
    assert sum(n.op_type == "RotaryEmbedding" for n in nodes) == 2 * config.num_hidden_layers
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seq, past, left in STEPS:
        feeds = decoder_zoo.decoder_inputs(config, batch, seq, past, left_padding=left)
        want, got = reference.run(None, feeds), _run(compiled, feeds)
        for expected, actual in zip(want, got, strict=True):
            np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4, err_msg=f"batch {batch} seq {seq} past {past} left {left}")


@pytest.mark.parametrize("target", ["onnxruntime:cpu", "torch"])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_tokens_equal_the_export(name: str, target: str) -> None:
    path = decoder_zoo.decoder_onnx(name, "torchscript", "sdpa")
    _, config = decoder_zoo.build_decoder(name)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compiled = graphopt.compile(path, target=target, pipeline="fuse")

    def step(feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *presents = _run(compiled, feeds)
        return logits, presents

    prompt = np.random.default_rng(3).integers(4, config.vocab_size, size=(2, 6))
    want = decoder_zoo.greedy_tokens(decoder_zoo.ort_step(reference), prompt, 32, config=config)
    got = decoder_zoo.greedy_tokens(step, prompt, 32, config=config)
    np.testing.assert_array_equal(got, want)


def test_fuse_attention_absorbs_the_cache_concats() -> None:
    path = decoder_zoo.decoder_onnx("llama", "dynamo", "sdpa")
    graph = graphopt.optimize(graphopt.from_onnx(path), "fuse")
    attention = [n for n in graph.nodes if n.op_type == "Attention"]
    assert len(attention) == decoder_zoo.LAYERS
    for index, node in enumerate(attention):
        # torchlib's K^T (heads merged into the batch) and repeat_kv are both seen through
        assert node.attrs["num_kv_heads"] == decoder_zoo.KV_HEADS
        assert node.inputs[4].name == f"past_key_values.{index}.key" and node.inputs[5].name == f"past_key_values.{index}.value"
        assert [v.name for v in node.outputs[1:]] == [f"present.{index}.key", f"present.{index}.value"]
        assert str(node.outputs[1].type) == f"f32[batch, {decoder_zoo.KV_HEADS}, past + seq, {decoder_zoo.HEAD_DIM}]"
    assert not [n for n in graph.nodes if n.op_type == "Concat" and n.output.name.startswith("present")]


def test_tvm_names_its_own_build_failure_on_a_kv_cache_decoder() -> None:
    # TVM 0.27's FuseTIR fails on these graphs (KV caches with symbolic past + seq lengths):
    # a TargetError quoting TVM, never a raw TVM traceback (the onnxruntime and torch targets run them)
    pytest.importorskip("tvm")
    from graphopt.target_base import TargetError

    path = decoder_zoo.decoder_onnx("llama", "torchscript", "eager")
    with pytest.raises(TargetError, match="TVM could not build the model for tvm:llvm"):
        graphopt.compile(path, target="tvm:llvm", pipeline="fuse")
