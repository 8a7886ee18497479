"""ONNX exports of Hugging Face models by task, with the names and dynamic axes Optimum uses.

    model, config = build_hf_model("path/to/folder")          # from_pretrained, local files only
    model, config = build_hf_model(config=AutoConfig.for_model("llama"))   # random weights
    export = export_hf(model, config, "model.onnx", task="auto")

Tasks (`TASKS`; "auto" picks one from the config, see `detect_task`):
- `encoder`: (input_ids, attention_mask) [batch, seq] -> last_hidden_state [batch, seq, hidden];
- `causal-lm`: a decoder with its KV cache in Optimum's "with past" form:
  input_ids [batch, seq], attention_mask [batch, past_seq], position_ids [batch, seq],
  past_key_values.{i}.key/value [batch, kv_heads, past, head_dim] -> logits [batch, seq, vocab],
  present.{i}.key/value [batch, kv_heads, past_seq, head_dim] (past may be 0);
- `seq2seq-encoder`: the encoder of an encoder-decoder model (T5, BART), as `encoder`;
- `vision`: pixel_values [batch, channels, size, size] -> last_hidden_state.

Exports use torch.onnx's TorchScript exporter at opset 17, which graphopt's fusions cover for
every architecture in the test zoo. The model is exported in eval mode and its mode restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings
from typing import Any, Iterator, Optional, Sequence

import torch

from graphopt.errors import GraphoptError
from graphopt.model_sources import TASKS, first_line

EXPORT_OPSET = 17
EXAMPLE_PAST = 3
EXAMPLE_SEQ = 2
"""Example past and sequence lengths of causal-LM exports: above 1, so neither is specialized to a constant."""


@dataclasses.dataclass
class HfExport:
    """An exported model: where it is, its task, and the torch module that computes the same outputs
    from the same inputs, in the same order (a wrapper around the Hugging Face model)."""

    path: str
    task: str
    module: Any
    input_names: list[str]
    output_names: list[str]


def build_hf_model(folder: Optional[str] = None, *, config: Any = None, task: str = "auto", seed: int = 0) -> tuple[Any, Any]:
    """(model, config): `from_pretrained(folder)` from local files, or `config` with random weights.

    `task` chooses the model class (a causal LM gets its LM head); "auto" asks `detect_task`.
    """
    import transformers

    if folder is not None:
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise GraphoptError(f"{folder}: not a Hugging Face model folder transformers can read ({first_line(exc)})") from None
    task = detect_task(config) if task == "auto" else check_task(task)
    model_class = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    with quiet(), _no_progress_bars(transformers):
        try:
            if folder is not None:
                model = model_class.from_pretrained(folder, local_files_only=True)
            else:
                torch.manual_seed(seed)
                model = model_class.from_config(config)
        except (OSError, ValueError, KeyError) as exc:
            where = folder or f"config '{config.model_type}'"
            raise GraphoptError(f"{where}: transformers cannot build a {task} model from it ({first_line(exc)})") from None
    return model.eval(), config


def check_task(task: str) -> str:
    """`task` when it is one of `TASKS`, else a GraphoptError listing them."""
    if task not in TASKS:
        raise GraphoptError(f"unknown task '{task}'; choose from auto, {', '.join(TASKS)}")
    return task


def detect_task(config: Any) -> str:
    """The task a config's model is most likely exported for.

    An architecture named *ForCausalLM / *LMHeadModel, or a model type that has a causal LM and
    no masked LM in transformers, is `causal-lm`; an encoder-decoder is `seq2seq-encoder`; a
    model with image channels and no vocabulary is `vision`; everything else `encoder`.
    """
    from transformers.models.auto import modeling_auto as auto

    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return "causal-lm"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq-encoder"
    if getattr(config, "vocab_size", None) is None and getattr(config, "num_channels", None) is not None:
        return "vision"
    kind = config.model_type
    if kind in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal-lm"
    return "encoder"


def export_hf(model: Any, config: Any, path: str, *, task: str = "auto", opset: int = EXPORT_OPSET) -> HfExport:
    """Export `model` for `task` to `path` (one self-contained file); see the module doc."""

    task = detect_task(config) if task == "auto" else check_task(task)
    wrapper, args, names_in, names_out, axes = _signature(model, config, task)
    was_training = model.training
    model.eval()
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(
                wrapper, args, path, dynamo=False, opset_version=opset,
                input_names=names_in, output_names=names_out, dynamic_axes=axes,
            )
    except Exception as exc:
        raise GraphoptError(f"torch.onnx could not export the {config.model_type} model as {task}: {first_line(exc)}") from None
    finally:
        model.train(was_training)
    return HfExport(path, task, wrapper.eval(), names_in, names_out)


def _signature(model: Any, config: Any, task: str) -> tuple[Any, tuple, list[str], list[str], dict[str, dict[int, str]]]:
    """(wrapper, example args, input names, output names, dynamic axes) for `task`."""

    if task == "causal-lm":
        names_in, names_out = decoder_input_names(config), decoder_output_names(config)
        feeds = decoder_example_inputs(config, batch=2, seq=EXAMPLE_SEQ, past=EXAMPLE_PAST)
        return DecoderWithPast(model), tuple(torch.from_numpy(feeds[n]) for n in names_in), names_in, names_out, decoder_dynamic_axes(config)
    if task == "vision":
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        pixels = torch.randn(2, config.num_channels, size, size)
        axes = {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}}
        return LastHiddenState(model, ("pixel_values",)), (pixels,), ["pixel_values"], ["last_hidden_state"], axes
    if getattr(config, "vocab_size", None) is None:
        raise GraphoptError(f"a {config.model_type} model has no vocabulary: export it with task vision, or write your own export")
    encoder = model.get_encoder() if task == "seq2seq-encoder" else model
    ids = torch.randint(4, config.vocab_size, (2, 16))
    names = ["input_ids", "attention_mask"]
    axes = {name: {0: "batch", 1: "seq"} for name in (*names, "last_hidden_state")}
    return LastHiddenState(encoder, tuple(names)), (ids, torch.ones_like(ids)), names, ["last_hidden_state"], axes


class LastHiddenState(torch.nn.Module):
    """Wraps a Hugging Face model: inputs in `names` order (passed by keyword) -> its last hidden state."""

    def __init__(self, model: Any, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).last_hidden_state


# ----------------------------------------------------------------------------- causal LM with past
def kv_heads(config: Any) -> int:
    """Number of key/value heads: axis 1 of the past and present tensors."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config: Any) -> int:
    """Size of one attention head: axis 3 of the past and present tensors."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def decoder_input_names(config: Any) -> list[str]:
    """The causal-LM export's input names, in order."""
    pasts = [f"past_key_values.{i}.{kind}" for i in range(config.num_hidden_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *pasts]


def decoder_output_names(config: Any) -> list[str]:
    """The causal-LM export's output names, in order."""
    presents = [f"present.{i}.{kind}" for i in range(config.num_hidden_layers) for kind in ("key", "value")]
    return ["logits", *presents]


def decoder_dynamic_axes(config: Any, total: str = "past + seq") -> dict[str, dict[int, str]]:
    """TorchScript-exporter dynamic axes of the causal-LM export. The mask's and the presents'
    length is named `total`: by default the expression `past + seq`, which graphopt's importer
    reads as that sum (Optimum too names it by an expression)."""
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: total},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    for name in decoder_input_names(config)[3:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in decoder_output_names(config)[1:]:
        axes[name] = {0: "batch", 2: total}
    return axes


def decoder_example_inputs(config: Any, batch: int, seq: int, past: int, left_padding: bool = False, seed: int = 0) -> dict[str, Any]:
    """Feeds for one step: random token ids and past keys/values, a mask and the positions HF derives from it.

    With `left_padding` (and batch > 1) the first (past + seq) // 3 columns of row 0's mask are 0.
    position_ids are cumsum(mask) - 1 clipped at 0, last `seq` columns.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    total = past + seq
    input_ids = rng.integers(4, config.vocab_size, size=(batch, seq), dtype=np.int64)
    attention_mask = np.ones((batch, total), dtype=np.int64)
    if left_padding and batch > 1:
        attention_mask[0, : total // 3] = 0
    position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)[:, past:]
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    shape = (batch, kv_heads(config), past, head_dim(config))
    for name in decoder_input_names(config)[3:]:
        feeds[name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def decoder_step(model: Any, input_ids: Any, attention_mask: Any, position_ids: Any, pasts: Sequence[Any]) -> tuple[Any, ...]:
    """One forward step: (logits, *presents), the presents read from the cache the model updated in place.

    The cache is a DynamicCache without a config, so every layer concatenates (the presents are
    past + new, Optimum's convention, sliding-window models included: the mask applies the window).
    It goes in as `past_key_values`, which transformers 5.23 takes and 5.25 still accepts.
    """
    import transformers

    cache = transformers.DynamicCache(list(zip(pasts[0::2], pasts[1::2], strict=True)))
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=cache, use_cache=True, return_dict=True,
    )
    return (out.logits, *(tensor for layer in cache.layers for tensor in (layer.keys, layer.values)))


class DecoderWithPast(torch.nn.Module):
    """A causal LM with the flat Optimum signature: (ids, mask, positions, *pasts) -> (logits, *presents)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *pasts: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return decoder_step(self.model, input_ids, attention_mask, position_ids, pasts)


@contextlib.contextmanager
def _no_progress_bars(transformers: Any) -> Iterator[None]:
    """transformers' weight-loading progress bars off (they go to stderr, past `quiet`)."""
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' and transformers' warnings and prints."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


