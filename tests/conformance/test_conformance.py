"""ONNX backend node tests through every graphopt step (see `runner.py` for the steps and
outcomes, `expected_refusals.json` for the refusals expected).

The lean subset (the first cases of each op type, every step) runs by default; the other
cases are marked `conformance` and deselected unless asked for (see conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conformance import cases, expectations
from conformance.runner import FAILURES, NO_OP_NAMED, STEPS, case_feeds, named_op, run_case


LEAN_PER_OP = 2
"""Cases of each op type in the lean subset (the first ones by name)."""


def _lean_and_rest() -> tuple[list[str], list[str]]:
    index = cases.case_index()
    per_op: dict[str, list[str]] = {}
    names = cases.passing_cases()
    for name in names:
        chosen_for_op = per_op.setdefault(index[name]["op"], [])
        if len(chosen_for_op) < LEAN_PER_OP:
            chosen_for_op.append(name)
    lean = sorted(n for group in per_op.values() for n in group)
    chosen = set(lean)
    return lean, [n for n in names if n not in chosen]


LEAN, REST = _lean_and_rest()


def _check(name: str, step: str) -> None:
    outcome = run_case(cases.load_case(name), step)
    if outcome.kind in FAILURES:
        pytest.fail(f"{name} through {step}: {outcome.kind}: {outcome.detail}")
    problem = expectations.problem(name, step, outcome)
    if problem:
        pytest.fail(problem)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("name", LEAN)
def test_lean(name: str, step: str) -> None:
    _check(name, step)


@pytest.mark.conformance
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("name", REST)
def test_full(name: str, step: str) -> None:
    _check(name, step)


@pytest.mark.parametrize("name", LEAN)
def test_check_mode_runs_the_case(name: str) -> None:
    """`optimize(..., check=True)` runs the graph after every pass on the case's own inputs
    (sequences, optionals, bfloat16/float8 included) and finds no lossless pass that moved an output."""
    import graphopt

    case = cases.load_case(name)
    graphopt.optimize(case.model, "cleanup", check=True, check_inputs=case_feeds(case))


def test_expectation_file_names_existing_cases_and_steps() -> None:
    data = json.loads(expectations.PATH.read_text())
    assert data["onnx"] == onnx.__version__, "expected_refusals.json was written for another onnx version"
    passing = set(cases.passing_cases())
    for step, entries in data["refusals"].items():
        assert step in STEPS
        stale = sorted(set(entries) - passing)
        assert not stale, f"{step}: cases that are not run: {stale}"


def test_lean_subset_covers_every_op() -> None:
    index = cases.case_index()
    assert {index[n]["op"] for n in LEAN} == {index[n]["op"] for n in cases.passing_cases()}
    assert len(cases.passing_cases()) > 1500


def test_compare_outputs_checks_shape_dtype_values_and_sequences() -> None:
    ref = [np.array([1.0, 2.0], np.float32)]
    assert cases.compare_outputs(ref, [np.array([1.0, 2.0005], np.float32)], 1e-3, 1e-7) is None
    assert "dtype" in cases.compare_outputs(ref, [np.array([1.0, 2.0])], 1e-3, 1e-7)
    assert "shape" in cases.compare_outputs(ref, [np.array([[1.0, 2.0]], np.float32)], 1e-3, 1e-7)
    assert "Mismatched elements: 1 / 2" in cases.compare_outputs(ref, [np.array([1.0, 2.01], np.float32)], 1e-3, 1e-7)
    half = [np.array([0.4], np.float16)]
    one_ulp_off = [np.nextafter(half[0], np.float16(1))]
    assert cases.compare_outputs(half, one_ulp_off, 1e-3, 1e-7) is None
    assert cases.compare_outputs(half, [half[0] * np.float16(1.01)], 1e-3, 1e-7) is not None
    assert cases.compare_outputs([ref], [[np.array([1.0, 2.0], np.float32)]], 1e-3, 1e-7) is None
    assert cases.compare_outputs([ref], [[]], 1e-3, 1e-7) is not None


def _single_node_case(op_type: str, domain: str = "") -> cases.Case:
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    x = np.array([-1.0, 2.0], np.float32)
    return cases.Case("test_" + op_type.lower(), model, [x], [np.abs(x)], 1e-3, 1e-7, op_type)


def test_run_case_outcomes() -> None:
    abs_case = _single_node_case("Abs")
    assert run_case(abs_case, "roundtrip").kind == "equal"
    wrong = cases.Case(abs_case.name, abs_case.model, abs_case.inputs, [np.zeros(2, np.float32)], 1e-3, 1e-7, "Abs")
    assert run_case(wrong, "roundtrip").kind == "wrong"
    unknown = _single_node_case("NoSuchOp", domain="example.custom")
    outcome = run_case(unknown, "to_fx")
    assert (outcome.kind, outcome.op) == ("refused", "NoSuchOp"), outcome


def test_named_op_prefers_the_op_the_message_names_first() -> None:
    case = _single_node_case("Abs")
    assert named_op(case, "to_fx: no torch implementation for op(s) Abs (first at node 'Abs_0')") == "Abs"
    assert named_op(case, "something else") == NO_OP_NAMED
