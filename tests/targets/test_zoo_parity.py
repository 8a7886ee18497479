"""Every built-in target computes what the original model computes, on the whole zoo,
at the export's batch size and at another one (one compiled model serves both)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
from conftest import ROUNDTRIP_ARCHITECTURES, max_abs_diff, numpy_inputs

import model_zoo
from graphopt.api import compile

TARGETS = ("onnxruntime", "torch")


def _reference(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.slow
@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_targets_match_the_original_model_at_two_batch_sizes(zoo, zoo_onnx, name):
    path = zoo_onnx(name)
    batches = [numpy_inputs(zoo(name)), numpy_inputs(model_zoo.build(name, batch=3))]
    expected = [_reference(path, feeds) for feeds in batches]
    for spec in TARGETS:
        compiled = compile(path, spec, "fuse")
        for feeds, reference in zip(batches, expected):
            error = max_abs_diff(reference, compiled(**feeds))
            assert error <= 1e-4, f"{name} on {spec}, batch {next(iter(feeds.values())).shape[0]}: max abs error {error:.2e}"
