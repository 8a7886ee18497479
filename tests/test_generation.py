"""`graphopt.generate`: greedy decoding of compiled KV-cache decoders (tests/decoder_zoo.py's
Optimum-style exports) equal to Hugging Face's `generate()` with left padding, with the cache
in place on onnxruntime:cpu (GroupQueryAttention extending preallocated buffers) and copied
on other targets, and clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import graphopt
from graphopt.errors import GraphoptError

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decoder_zoo  # noqa: E402

NEW_TOKENS = 16
CASES = [("llama", "torchscript"), ("llama", "dynamo"), ("gemma", "torchscript"), ("mistral", "torchscript")]
"""GQA from both exporters (dynamo's Shape nodes slice), MQA, and a sliding window shorter than the decode."""


def _prompts(config: object) -> tuple[np.ndarray, np.ndarray]:
    """Two prompts of 7 tokens, the second left-padded to 4 real ones."""
    ids = np.random.default_rng(0).integers(4, config.vocab_size, size=(2, 7))  # type: ignore[attr-defined]
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def _hf_generate(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, new: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0,
        )
    return out.numpy()


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_generate_with_the_cache_in_place_equals_hf_generate_with_left_padding(case: tuple[str, str]) -> None:
    name, exporter = case
    model, config = decoder_zoo.build_decoder(name, "sdpa")
    compiled = graphopt.compile(str(decoder_zoo.decoder_onnx(name, exporter, "sdpa")), "onnxruntime:cpu", "fuse")
    assert compiled.in_place_kv_cache_unavailable() is None
    ids, mask = _prompts(config)
    expected = _hf_generate(model, ids, mask, NEW_TOKENS)
    in_place = graphopt.generate(compiled, ids, mask, max_new_tokens=NEW_TOKENS, kv_cache="in_place")
    copied = graphopt.generate(compiled, ids, mask, max_new_tokens=NEW_TOKENS, kv_cache="copy")
    assert in_place.shape == (2, 7 + NEW_TOKENS) and in_place.dtype == np.int64
    np.testing.assert_array_equal(in_place, expected)
    np.testing.assert_array_equal(copied, expected)


def test_a_saved_model_keeps_its_cache_in_place_reading_the_graph_from_its_file(tmp_path: Path) -> None:
    model, config = decoder_zoo.build_decoder("llama", "sdpa")
    compiled = graphopt.compile(str(decoder_zoo.decoder_onnx("llama", "dynamo", "sdpa")), "onnxruntime:cpu", "fuse")
    compiled.save(tmp_path / "saved")
    loaded = graphopt.load_compiled(tmp_path / "saved")
    assert loaded.graph is None and loaded.in_place_kv_cache_unavailable() is None
    ids, mask = _prompts(config)
    np.testing.assert_array_equal(graphopt.generate(loaded, ids, mask, max_new_tokens=8, kv_cache="in_place"), _hf_generate(model, ids, mask, 8))


def test_a_step_extends_the_buffers_in_place_with_the_presents_the_model_returns() -> None:
    _, config = decoder_zoo.build_decoder("llama", "sdpa")
    compiled = graphopt.compile(str(decoder_zoo.decoder_onnx("llama", "torchscript", "sdpa")), "onnxruntime:cpu", "fuse")
    past = decoder_zoo.decoder_inputs(config, batch=2, seq=1, past=20)
    names = decoder_zoo.input_names(config)
    logits, *presents = compiled(**past)
    session = compiled.in_place_kv_cache(batch=2, capacity=32)
    session.load({name: past[name] for name in names[3:]})
    before = {name: id(array) for name, array in session.arrays.items()}
    got = session.step({name: past[name] for name in names[:3]})
    np.testing.assert_allclose(got, logits, rtol=0, atol=1e-5)
    for name, present in zip(names[3:], presents):
        assert id(session.arrays[name]) == before[name]  # the same buffers, written by the step
        np.testing.assert_allclose(session.arrays[name][:, :, :21], present, rtol=0, atol=1e-6)
        assert not session.arrays[name][:, :, 21:].any()
    with pytest.raises(GraphoptError, match="capacity 32"):
        session.load({name: np.zeros((2, config.num_key_value_heads, 40, 16), np.float32) for name in names[3:]})


def test_other_targets_and_unlowered_graphs_copy_the_cache() -> None:
    model, config = decoder_zoo.build_decoder("llama", "sdpa")
    path = str(decoder_zoo.decoder_onnx("llama", "torchscript", "sdpa"))
    ids, mask = _prompts(config)
    expected = _hf_generate(model, ids, mask, 8)
    on_torch = graphopt.compile(path, "torch", "fuse")
    assert "onnxruntime target" in on_torch.in_place_kv_cache_unavailable()  # type: ignore[operator]
    np.testing.assert_array_equal(graphopt.generate(on_torch, torch.from_numpy(ids), torch.from_numpy(mask), max_new_tokens=8), expected)
    with pytest.raises(GraphoptError, match="kv_cache='in_place' is not available: .*onnxruntime target"):
        graphopt.generate(on_torch, ids, mask, max_new_tokens=8, kv_cache="in_place")
    with pytest.raises(GraphoptError, match="no in-place KV cache: .*onnxruntime target"):
        on_torch.in_place_kv_cache(batch=2, capacity=16)
    unfused = graphopt.compile(path, "onnxruntime:cpu", "cleanup")  # attention stays decomposed: Concat reads the past
    assert "not only by GroupQueryAttention" in unfused.in_place_kv_cache_unavailable()  # type: ignore[operator]
    np.testing.assert_array_equal(graphopt.generate(unfused, ids, mask, max_new_tokens=8), expected)


def test_generation_stops_when_every_row_has_produced_the_eos_token() -> None:
    _, config = decoder_zoo.build_decoder("llama", "sdpa")
    compiled = graphopt.compile(str(decoder_zoo.decoder_onnx("llama", "torchscript", "sdpa")), "onnxruntime:cpu", "fuse")
    ids, mask = _prompts(config)
    free = graphopt.generate(compiled, ids, mask, max_new_tokens=6)
    eos = int(free[0, 7])  # row 0's first new token
    stopped = graphopt.generate(compiled, ids, mask, max_new_tokens=6, eos_token_id=eos)
    after = np.flatnonzero(free[1, 7:] == eos)
    if after.size:  # row 1 reaches it too: both rows end there
        assert stopped.shape[1] == 7 + after[0] + 1
    else:
        assert stopped.shape[1] == 13 and (stopped[0, 7:] == eos).all()
        np.testing.assert_array_equal(stopped[1], free[1])


def test_generate_explains_what_it_cannot_run() -> None:
    compiled = graphopt.compile(str(decoder_zoo.decoder_onnx("llama", "torchscript", "sdpa")), "onnxruntime:cpu", "fuse")
    ids = np.ones((1, 3), np.int64)
    with pytest.raises(GraphoptError, match="max_new_tokens must be a positive integer, got 0"):
        graphopt.generate(compiled, ids, max_new_tokens=0)
    with pytest.raises(GraphoptError, match="attention_mask has shape"):
        graphopt.generate(compiled, ids, np.ones((1, 4), np.int64))
    with pytest.raises(GraphoptError, match="input_ids must hold integers"):
        graphopt.generate(compiled, ids.astype(np.float32))
    with pytest.raises(GraphoptError, match="kv_cache must be"):
        graphopt.generate(compiled, ids, kv_cache="paged")  # type: ignore[arg-type]
    reordered = graphopt.compile(str(decoder_zoo.decoder_onnx("llama", "torchscript", "sdpa")), "onnxruntime:cpu", "fuse")
    reordered.outputs = reordered.outputs[1:] + reordered.outputs[:1]
    with pytest.raises(GraphoptError, match="first output must be the logits, got 'present.0.key'"):
        graphopt.generate(reordered, ids)
    encoder = graphopt.Graph("encoder", {"": 17})
    x = encoder.add_input("input_ids", graphopt.TensorType(graphopt.DType.INT64, ("batch", "seq")))
    encoder.set_outputs([encoder.add_node("Identity", [x], output_names=["y"]).output])
    with pytest.raises(GraphoptError, match=r"lacks input\(s\) attention_mask, past_key_values.*KV cache"):
        graphopt.generate(graphopt.compile(encoder, "onnxruntime:cpu", "cleanup"), ids)
