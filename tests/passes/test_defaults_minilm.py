"""Best by default (issue #22), on the real all-MiniLM-L6-v2: given calibration data, each lossy
pass's default options are its most faithful measured setting; without, it falls back to what
needs no data and logs a warning naming the better option.

Data: the first CALIBRATION sentences of tests/data/minilm_sentences.json's calibration set,
each tokenized on its own (unpadded); fidelity on its 20 evaluation sentences (never seen in
calibration), against the plain export, both run by ONNX Runtime: sentence cosine = cosine of
the mean-pooled last hidden states (as sentence-transformers pools), token cosine = mean over
every token of the cosine of its last hidden state. Measured (8 sentences; mean sentence /
mean token cosine): prune-heads{ratio=0.25} 0.981 / 0.982 (magnitude, without data: 0.813 /
0.869), quantize 0.997 / 0.996, quantize{mode=dynamic} 0.996 / 0.995, prune-ffn 0.952 (0.862
without data), low-rank{ratio=0.25} 0.847 (0.601 without data).
"""

import json
import logging
import pathlib

import numpy as np
import pytest

import model_zoo

import graphopt
from graphopt.calibration import GraphRunner
from graphopt.passes.quantize import QuantizationError

pytestmark = pytest.mark.skipif(not model_zoo.minilm_available(), reason=f"all-MiniLM-L6-v2 not installed ({model_zoo.MINILM_INSTALL_HINT})")

SENTENCES = pathlib.Path(__file__).resolve().parents[1] / "data" / "minilm_sentences.json"
CALIBRATION = 8


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(path of the exported model, calibration samples, evaluation samples, reference outputs)."""
    import transformers

    zm = model_zoo.minilm()
    axes = {name: {0: "batch", 1: "seq"} for name in [*zm.inputs, *zm.output_names]}
    path = model_zoo.export_onnx(
        model_zoo.ZooModel(zm.name, zm.model, dict(zm.inputs), axes, zm.output_names), tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_zoo._minilm_dir())
    texts = json.loads(SENTENCES.read_text())

    def encode(sentences):
        return [{k: v.astype(np.int64) for k, v in tokenizer([s], return_tensors="np").items()} for s in sentences]

    evaluation = encode(texts["evaluation"])
    reference = _outputs(graphopt.from_onnx(str(path)), evaluation)
    return path, encode(texts["calibration"][:CALIBRATION]), evaluation, reference


def _outputs(graph, samples) -> list[np.ndarray]:
    runner = GraphRunner(graph, [graph.outputs[0].name], optimize=True)
    return [runner.run(s)[graph.outputs[0].name][0].astype(np.float64) for s in samples]


def _fidelity(minilm, pipeline: str, calibrated: bool = True) -> tuple[float, float]:
    """(mean sentence cosine, mean token cosine) of `pipeline` over the evaluation sentences."""
    path, calibration, evaluation, reference = minilm
    graph = graphopt.optimize(str(path), pipeline, calibration_data=calibration if calibrated else None)
    sentences, tokens = [], []
    for a, b in zip(reference, _outputs(graph, evaluation)):
        tokens.extend(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        pa, pb = a.mean(0), b.mean(0)
        sentences.append(pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb)))
    return float(np.mean(sentences)), float(np.mean(tokens))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("graphopt")]


def test_prune_heads_defaults_with_calibration_data_keep_the_sentence_embedding(minilm, caplog):
    sentence, token = _fidelity(minilm, "fuse,prune-heads{ratio=0.25}")
    assert sentence >= 0.97 and token >= 0.97, (sentence, token)  # measured 0.981 / 0.982
    assert not _warnings(caplog)


def test_prune_heads_without_calibration_data_warns_and_names_the_better_option(minilm, caplog):
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        sentence, _ = _fidelity(minilm, "fuse,prune-heads{ratio=0.25}", calibrated=False)
    assert sentence < 0.9  # measured 0.813: magnitude, no compensation
    [message] = _warnings(caplog)
    assert "score=activation,compensate=true" in message and "needs calibration data" in message
    assert "--calibration-data" in message and "calibration_data=" in message


def test_quantize_defaults_with_calibration_data_meet_the_int8_targets(minilm, caplog):
    sentence, token = _fidelity(minilm, "fuse,quantize")
    assert sentence >= 0.995 and token >= 0.99, (sentence, token)  # measured 0.9968 / 0.9961 (0.9942 / 0.9921 unsmoothed)
    dynamic = _fidelity(minilm, "fuse,quantize{mode=dynamic}")
    assert dynamic[0] >= 0.995 and dynamic[1] >= 0.99, dynamic  # measured 0.9960 / 0.9953
    assert not _warnings(caplog)


def test_quantize_without_calibration_data_says_what_to_do(minilm, caplog):
    with pytest.raises(QuantizationError, match=r"mode=static needs calibration data: .*--calibration-data.*, or use mode=dynamic"):
        _fidelity(minilm, "fuse,quantize", calibrated=False)
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        sentence, _ = _fidelity(minilm, "fuse,quantize{mode=dynamic}", calibrated=False)
    assert sentence >= 0.99  # measured 0.9945
    [message] = _warnings(caplog)
    assert "smooth=auto" in message and "needs calibration data" in message and "--calibration-data" in message and "smooth=false" in message


@pytest.mark.parametrize("pipeline, floor", [("fuse,prune-ffn", 0.94), ("fuse,low-rank{ratio=0.25}", 0.8)])
def test_prune_ffn_and_low_rank_default_to_their_calibrated_forms(minilm, caplog, pipeline, floor):
    calibrated, _ = _fidelity(minilm, pipeline)  # measured 0.952 (prune-ffn), 0.847 (low-rank)
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        blind, _ = _fidelity(minilm, pipeline, calibrated=False)  # measured 0.862, 0.601
    assert calibrated >= floor and calibrated > blind + 0.05, (calibrated, blind)
    [message] = _warnings(caplog)
    assert "no calibration data" in message and "needs calibration data" in message and "--calibration-data" in message
