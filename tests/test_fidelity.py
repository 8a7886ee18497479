"""graphopt.fidelity: the figures lossy results are reported with, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.fidelity import compare_outputs, format_fidelity


def test_token_pooled_and_relative_figures():
    expected = np.array([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], dtype=np.float32)  # [batch 1, seq 3, hidden 2]
    actual = np.array([[[1.0, 1.0], [0.0, 1.0], [-5.0, -5.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])  # the third token is padding: pooled over the first two only
    (figures,) = compare_outputs([expected], [actual], ["last_hidden_state"], {"attention_mask": mask})
    assert figures.token_cosine == pytest.approx((np.sqrt(0.5) + 1.0 - 1.0) / 3)
    assert figures.min_token_cosine == pytest.approx(-1.0)
    pooled_expected, pooled_actual = np.array([0.5, 0.5]), np.array([0.5, 1.0])
    cosine = pooled_expected @ pooled_actual / np.linalg.norm(pooled_expected) / np.linalg.norm(pooled_actual)
    assert figures.pooled_cosine == pytest.approx(cosine)
    assert figures.relative == pytest.approx(np.linalg.norm(actual - expected) / np.linalg.norm(expected), rel=1e-6)
    assert figures.max_abs == 10.0 and figures.top1 is None


def test_logits_get_top1_and_no_pooled_cosine():
    expected = np.array([[[0.1, 0.9], [0.8, 0.2]]])
    actual = np.array([[[0.2, 0.7], [0.3, 0.6]]])
    (figures,) = compare_outputs([expected], [actual], ["logits"])
    assert figures.top1 == 0.5 and figures.pooled_cosine is None
    assert "top-1 agreement 50.0%" in figures.text()


def test_zero_vectors_integer_outputs_and_shape_mismatch():
    (zeros,) = compare_outputs([np.zeros((2, 3))], [np.zeros((2, 3))], ["y"])
    assert zeros.token_cosine == 1.0 and zeros.relative == 0.0
    (ids,) = compare_outputs([np.array([1, 2])], [np.array([1, 3])], ["ids"])
    assert ids.token_cosine is None and ids.max_abs == 1.0
    with pytest.raises(ValueError, match=r"output y: shape \[3\] differs from the expected \[2\]"):
        compare_outputs([np.zeros(2)], [np.zeros(3)], ["y"])


def test_many_outputs_are_summarized_by_the_worst():
    outputs = [np.ones((1, 2, 2)) for _ in range(6)]
    moved = [o.copy() for o in outputs]
    moved[5][0, 0, 0] = 3.0
    text = format_fidelity(compare_outputs(outputs, moved, [f"present.{i}" for i in range(6)]), limit=2)
    assert text.splitlines()[-1] == "... 4 more outputs; worst relative error 1 (present.5)"
