"""Greedy decoding with a compiled decoder: `graphopt.generate`.

For models with Optimum's with-past signature (inputs `input_ids`, `attention_mask`
[batch, past + seq], optionally `position_ids`, and `past_key_values.{i}.key/value`
[batch, kv_heads, past, head_dim]; outputs `logits` first and `present.{i}.key/value`), as
`graphopt export` and Optimum write them, compiled for any target.

The first step runs the whole prompt with empty pasts, each later step the previous tokens
with the cache. Positions follow the mask as Hugging Face's `generate()` counts them (a
left-padded row starts at 0 at its first real token), so batched prompts of different lengths
go in left-padded with their mask.

The KV cache: `kv_cache="in_place"` keeps it in preallocated buffers that ONNX Runtime's
GroupQueryAttention extends in place (`CompiledModel.in_place_kv_cache`, which the
onnxruntime:cpu target provides in `targets/onnxruntime_kv_cache.py`); `"copy"` feeds each
step's presents back as the next step's pasts (any target); `"auto"` (default) takes in place
where the model allows it, else copy.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.target_base import CompiledModel

KVCache = Literal["auto", "in_place", "copy"]

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
"""A past input's name (Optimum's convention); its present is `present.{i}.{key|value}`."""
PRESENT = re.compile(r"present\.(\d+)\.(key|value)$")


def present_name(past: str) -> str:
    """`present.{i}.{key|value}` of the past input `past_key_values.{i}.{key|value}`."""
    match = PAST.match(past)
    if match is None:
        raise ValueError(f"{past!r} is not a past_key_values.{{i}}.key/value name")
    return f"present.{match.group(1)}.{match.group(2)}"


def generate(
    model: CompiledModel,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int = 32,
    eos_token_id: Optional[int] = None,
    kv_cache: KVCache = "auto",
) -> np.ndarray:
    """Greedily decode up to `max_new_tokens` tokens after `input_ids` [batch, prompt] (numpy or
    torch integers; `attention_mask` 0 on left padding, default all ones). Returns the prompt
    followed by the new tokens, [batch, prompt + new] int64. With `eos_token_id`, a row that
    has produced it continues with it, and decoding stops once every row has."""
    signature = _Signature(model)
    ids = _integers(input_ids, "input_ids")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GraphoptError(f"generate: input_ids must be [batch, prompt] with a prompt of at least one token, got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else _integers(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise GraphoptError(f"generate: attention_mask has shape {mask.shape}, input_ids {ids.shape}; they must match")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GraphoptError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if kv_cache not in ("auto", "in_place", "copy"):
        raise GraphoptError(f"generate: kv_cache must be 'auto', 'in_place' or 'copy', got {kv_cache!r}")
    runner = _runner(model, signature, kv_cache, batch=ids.shape[0], capacity=ids.shape[1] + max_new_tokens)
    positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 1)
    step_ids, tokens = ids, [ids]
    finished = np.zeros(ids.shape[0], dtype=bool)
    for index in range(max_new_tokens):
        feeds = {"input_ids": step_ids, "attention_mask": mask}
        if signature.positions:
            feeds["position_ids"] = positions[:, -step_ids.shape[1]:]
        logits = runner(feeds, first=index == 0)
        step_ids = np.asarray(logits[:, -1]).argmax(axis=-1).astype(np.int64)[:, None]
        if eos_token_id is not None:
            step_ids[finished] = eos_token_id
            finished |= step_ids[:, 0] == eos_token_id
        tokens.append(step_ids)
        if eos_token_id is not None and finished.all():
            break
        mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
        positions = np.concatenate([positions, positions[:, -1:] + 1], axis=1)
    return np.concatenate(tokens, axis=1)


class _Signature:
    """The with-past inputs and outputs of `model`, checked."""

    def __init__(self, model: CompiledModel) -> None:
        inputs = {spec.name: spec for spec in model.inputs}
        missing = [name for name in ("input_ids", "attention_mask") if name not in inputs]
        self.pasts = [name for name in inputs if PAST.match(name)]
        if missing or not self.pasts:
            absent = missing + ([] if self.pasts else ["past_key_values.{i}.key/value"])
            raise GraphoptError(
                f"generate: the model lacks input(s) {', '.join(absent)}; it needs a decoder exported with its "
                f"KV cache (Optimum's with-past form; `graphopt export` writes it). Inputs: {', '.join(inputs)}"
            )
        other = sorted(set(inputs) - {"input_ids", "attention_mask", "position_ids", *self.pasts})
        if other:
            raise GraphoptError(f"generate: the model has input(s) generate cannot fill: {', '.join(other)}")
        outputs = model.output_names
        absent = [present_name(p) for p in self.pasts if present_name(p) not in outputs]
        if absent:
            raise GraphoptError(f"generate: the model lacks output(s) {', '.join(absent)} for its pasts")
        if PRESENT.match(outputs[0]):
            raise GraphoptError(f"generate: the model's first output must be the logits, got {outputs[0]!r}")
        self.positions = "position_ids" in inputs
        self.presents = [outputs.index(present_name(p)) for p in self.pasts]
        self.empty = {name: _empty_past(inputs[name]) for name in self.pasts}


def _empty_past(spec: Any) -> Any:
    shape = spec.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise GraphoptError(f"generate: {spec.name} must be [batch, kv_heads, past, head_dim] with kv_heads and head_dim fixed, got {shape}")
    return lambda batch: np.zeros((batch, shape[1], 0, shape[3]), dtype=np.dtype(spec.dtype or "float32"))


def _runner(model: CompiledModel, signature: _Signature, kv_cache: KVCache, *, batch: int, capacity: int) -> Any:
    """A call (feeds, first) -> logits for the chosen cache."""
    if kv_cache != "copy":
        reason = model.in_place_kv_cache_unavailable()
        if reason is None:
            session = model.in_place_kv_cache(batch=batch, capacity=capacity)
            return lambda feeds, first: session.prefill(feeds) if first else session.step(feeds)
        if kv_cache == "in_place":
            raise GraphoptError(f"generate: kv_cache='in_place' is not available: {reason}; use kv_cache='copy'")
    pasts: dict[str, Any] = {name: make(batch) for name, make in signature.empty.items()}

    def run(feeds: dict[str, np.ndarray], first: bool) -> Any:
        outputs = model(**feeds, **pasts)
        pasts.update((name, outputs[index]) for name, index in zip(signature.pasts, signature.presents))
        return _numpy(outputs[0])
    return run


def _integers(value: Any, name: str) -> np.ndarray:
    array = _numpy(value)
    if not np.issubdtype(array.dtype, np.integer):
        raise GraphoptError(f"generate: {name} must hold integers, got {array.dtype}")
    return array.astype(np.int64)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)
