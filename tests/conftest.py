"""Shared fixtures: zoo models and their ONNX exports, built once per test session."""

from __future__ import annotations

import pathlib
from typing import Callable

import numpy as np
import pytest

import model_zoo

ROUNDTRIP_ARCHITECTURES = (
    "bert", "roberta", "distilbert", "albert", "electra", "deberta-v2", "mpnet", "vit",
    "whisper-encoder", "t5-encoder", "gpt2", "gpt-neo", "opt", "bloom", "llama", "mistral",
    "qwen2", "phi",
)
"""Encoders (BERT family, DeBERTa-v2, ViT, Whisper and T5 encoders) and decoders (GPT-2,
GPT-Neo, OPT, BLOOM, Phi, and LLaMA/Mistral/Qwen2 with grouped-query attention and rotary
embeddings)."""


@pytest.fixture(scope="session")
def zoo() -> Callable[[str], model_zoo.ZooModel]:
    cache: dict[str, model_zoo.ZooModel] = {}

    def get(name: str) -> model_zoo.ZooModel:
        if name not in cache:
            cache[name] = model_zoo.build(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo_onnx(zoo, tmp_path_factory) -> Callable[..., pathlib.Path]:
    """`zoo_onnx(name, dynamo=False)` -> path of the exported model (exported once)."""
    cache: dict[tuple[str, bool], pathlib.Path] = {}
    root = tmp_path_factory.mktemp("zoo_onnx")

    def get(name: str, dynamo: bool = False) -> pathlib.Path:
        key = (name, dynamo)
        if key not in cache:
            path = root / f"{name}{'-dynamo' if dynamo else ''}.onnx"
            cache[key] = model_zoo.export_onnx(zoo(name), path, dynamo=dynamo)
        return cache[key]

    return get


def numpy_inputs(zm: model_zoo.ZooModel) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in zm.inputs.items()}


def max_abs_diff(expected, actual) -> float:
    """Largest absolute difference over paired output lists (numpy or torch)."""
    assert len(expected) == len(actual), f"{len(expected)} outputs expected, got {len(actual)}"
    worst = 0.0
    for a, b in zip(expected, actual):
        a = a.detach().numpy() if hasattr(a, "detach") else np.asarray(a)
        b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b)
        assert a.shape == b.shape, f"shape {a.shape} expected, got {b.shape}"
        if a.size:
            worst = max(worst, float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()))
    return worst
