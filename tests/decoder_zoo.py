"""Tiny Hugging Face decoders exported to ONNX in the Optimum "with past" (KV-cache) form.

Each architecture in :data:`ARCHITECTURES` is a 2-layer causal LM with random
weights (no downloads) built by :func:`build_decoder`.  :class:`DecoderWithPast`
gives it the flat signature Optimum's ``-with-past`` exports have::

    input_ids [batch, seq], attention_mask [batch, past + seq], position_ids [batch, seq],
    past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
    -> logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]

:func:`export_decoder` exports it with either torch exporter (batch, seq and
past dynamic; past may be 0) and :func:`decoder_onnx` caches those exports.
:func:`decoder_inputs` builds feeds, :func:`reference_outputs` runs the torch
model on them, and :func:`greedy_tokens` decodes greedily over any step
function (:func:`ort_step`, :func:`torch_step`, or a compiled model's).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import transformers

from graphopt.hf_export import DecoderWithPast, head_dim, kv_heads
from graphopt.hf_export import decoder_step as _step
from graphopt.hf_export import decoder_dynamic_axes
from graphopt.hf_export import decoder_example_inputs as decoder_inputs
from graphopt.hf_export import decoder_input_names as input_names
from graphopt.hf_export import decoder_output_names as output_names
from model_zoo import _quiet

if TYPE_CHECKING:
    import onnxruntime

ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "phi3", "gemma")
EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
ATTENTIONS: tuple[str, ...] = ("sdpa", "eager")

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
FFN = 128
VOCAB = 128
MAX_POSITIONS = 256
SLIDING_WINDOW = 16
"""Mistral's window: smaller than the decode test's past (20), so the window really masks keys."""
GEMMA_HEAD_DIM = 32
"""Gemma's head size, twice HIDDEN // HEADS, as in the real Gemma models."""

EXPORT_PAST = 3
EXPORT_SEQ = 2
"""Example past and sequence lengths of the exports: above 1, so neither is specialized to a constant."""

UNSUPPORTED: dict[tuple[str, str, str], str] = {}
"""(architecture, exporter, attention) -> why that combination cannot be exported here; tests skip them."""

StepFunction = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, Sequence[np.ndarray]]]
"""Takes the flat feeds of one decoding step and returns (logits, presents in output order)."""


def _common(**extra: object) -> dict[str, object]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attention_dropout=0.0,
    ) | extra


_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": lambda: transformers.LlamaConfig(**_common(num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)),
    "mistral": lambda: transformers.MistralConfig(
        **_common(num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, sliding_window=SLIDING_WINDOW)
    ),
    "qwen2": lambda: transformers.Qwen2Config(**_common(num_key_value_heads=KV_HEADS)),
    "phi3": lambda: transformers.Phi3Config(
        **_common(num_key_value_heads=KV_HEADS, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0)
    ),
    "gemma": lambda: transformers.GemmaConfig(**_common(num_key_value_heads=1, head_dim=GEMMA_HEAD_DIM)),
}
"""Qwen2 has q/k/v biases by default, Phi-3 a fused qkv_proj; Gemma is multi-query (one KV head)."""


def _check(name: str, exporter: str | None, attention: str) -> None:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown decoder {name!r}; expected one of {', '.join(ARCHITECTURES)}")
    if exporter is not None and exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {', '.join(EXPORTERS)}")
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; expected one of {', '.join(ATTENTIONS)}")


def build_decoder(
    name: str, attention: str = "sdpa", seed: int = 0
) -> tuple[transformers.PreTrainedModel, transformers.PretrainedConfig]:
    """The tiny ``name`` causal LM in eval mode, weights drawn from ``seed``, and its config.

    ``attention`` is the transformers attention implementation (``"sdpa"`` or
    ``"eager"``).  The global RNG state is left as it was.
    """
    _check(name, None, attention)
    config = _CONFIGS[name]()
    config._attn_implementation = attention
    config.use_cache = True
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    return model, config


def _example_inputs(config: transformers.PretrainedConfig) -> tuple[torch.Tensor, ...]:
    feeds = decoder_inputs(config, batch=2, seq=EXPORT_SEQ, past=EXPORT_PAST)
    return tuple(torch.from_numpy(feeds[key]) for key in input_names(config))


def _dynamic_shapes(config: transformers.PretrainedConfig) -> tuple[object, ...]:
    """torch.export shapes of (input_ids, attention_mask, position_ids, pasts); the mask length gets its own dim."""
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=1, max=MAX_POSITIONS)
    past = torch.export.Dim("past", min=0, max=MAX_POSITIONS)
    past_seq = torch.export.Dim("past_seq", min=1, max=2 * MAX_POSITIONS)
    pasts = tuple({0: batch, 2: past} for _ in input_names(config)[3:])
    return ({0: batch, 1: seq}, {0: batch, 1: past_seq}, {0: batch, 1: seq}, pasts)


def export_decoder(
    name: str, exporter: str, attention: str, path: str | os.PathLike[str], *, seed: int = 0
) -> pathlib.Path:
    """Exports decoder ``name`` with past to a self-contained ONNX file at ``path`` and returns the path.

    ``exporter`` is ``"torchscript"`` (``dynamo=False``, opset 17) or
    ``"dynamo"`` (opset 18).  Batch, seq and past are dynamic: the example
    inputs have past 3 and seq 2 so that neither is specialized, and the
    graph also runs with past 0.  Nothing is printed.

    Raises:
        NotImplementedError: for a combination listed in :data:`UNSUPPORTED`.
    """
    _check(name, exporter, attention)
    if (name, exporter, attention) in UNSUPPORTED:
        raise NotImplementedError(UNSUPPORTED[name, exporter, attention])
    path = pathlib.Path(path)
    model, config = build_decoder(name, attention, seed)
    wrapper = DecoderWithPast(model).eval()
    args = _example_inputs(config)
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            torch.onnx.export(
                wrapper,
                args,
                path,
                dynamo=True,
                opset_version=18,
                input_names=input_names(config),
                output_names=output_names(config),
                dynamic_shapes=_dynamic_shapes(config),
                external_data=False,
                verbose=False,
            )
        else:
            torch.onnx.export(
                wrapper,
                args,
                path,
                dynamo=False,
                opset_version=17,
                input_names=input_names(config),
                output_names=output_names(config),
                dynamic_axes=decoder_dynamic_axes(config, total="past_seq"),
            )
    return path


def _cache_dir() -> pathlib.Path:
    """Export folder keyed by this module's source and the exporting libraries' versions."""
    key = hashlib.sha256(pathlib.Path(__file__).read_bytes())
    for package in ("torch", "transformers", "onnx", "onnxscript"):
        key.update(f"{package}=={importlib.metadata.version(package)}".encode())
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "graphopt-tests" / "decoder-zoo" / key.hexdigest()[:16]


def decoder_onnx(name: str, exporter: str, attention: str) -> pathlib.Path:
    """Path of the export of ``name`` (seed 0), made once and kept under ``~/.cache/graphopt-tests/``.

    The folder is keyed by a hash of this module and of the torch,
    transformers, onnx and onnxscript versions, so an export is never reused
    after either changes.  The file is written to a temporary name and renamed
    into place, so concurrent test workers never read a half-written model.
    """
    _check(name, exporter, attention)
    folder = _cache_dir()
    path = folder / f"{name}-{exporter}-{attention}.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{path.stem}-", suffix=".onnx")
        os.close(fd)
        try:
            export_decoder(name, exporter, attention, staging)
            os.replace(staging, path)
        finally:
            pathlib.Path(staging).unlink(missing_ok=True)
    return path


def reference_outputs(model: transformers.PreTrainedModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Runs the torch ``model`` (no grad) on ``feeds``; returns [logits, *presents] as the export orders them."""
    tensors = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in feeds.items()}
    pasts = [tensors[key] for key in input_names(model.config)[3:]]
    with torch.no_grad():
        logits, *presents = _step(model, tensors["input_ids"], tensors["attention_mask"], tensors["position_ids"], pasts)
    return [tensor.numpy() for tensor in (logits, *presents)]


def torch_step(model: transformers.PreTrainedModel) -> StepFunction:
    """A :data:`StepFunction` running the torch model through :func:`reference_outputs`."""

    def step(feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *presents = reference_outputs(model, feeds)
        return logits, presents

    return step


def ort_step(session: onnxruntime.InferenceSession) -> StepFunction:
    """A :data:`StepFunction` running an ``onnxruntime.InferenceSession`` on the export."""

    def step(feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *presents = session.run(None, feeds)
        return logits, presents

    return step


def greedy_tokens(
    run_step: StepFunction, prompt_ids: np.ndarray, steps: int, *, config: transformers.PretrainedConfig
) -> np.ndarray:
    """Greedily decodes ``steps`` tokens after ``prompt_ids`` [batch, prompt]; returns them as [batch, steps].

    The first step feeds the whole prompt with an empty past (past 0), each
    later step the previous token with the presents of the step before as its
    past; masks are all ones and positions count from 0.  ``config`` gives
    the number of layers and the KV-cache shape.
    """
    batch, prompt = prompt_ids.shape
    empty = np.zeros((batch, kv_heads(config), 0, head_dim(config)), dtype=np.float32)
    pasts: Sequence[np.ndarray] = [empty] * (2 * config.num_hidden_layers)
    ids = prompt_ids.astype(np.int64)
    past = 0
    tokens = []
    for _ in range(steps):
        seq = ids.shape[1]
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy(),
        }
        feeds |= dict(zip(input_names(config)[3:], pasts, strict=True))
        logits, pasts = run_step(feeds)
        ids = logits[:, -1].argmax(axis=-1).astype(np.int64)[:, None]
        tokens.append(ids)
        past += seq
    return np.concatenate(tokens, axis=1)
