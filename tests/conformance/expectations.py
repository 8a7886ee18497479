"""The checked-in refusals (`expected_refusals.json`): per step, {case name: op named}.

A case whose outcome is a refusal not listed, a refusal naming another op, or `equal` while
listed, differs from the expectation; `problem()` says so with the exact line to change.
`python benchmarks/conformance.py --update` rewrites the file from a run.
"""

from __future__ import annotations

import json
import pathlib
from functools import lru_cache
from typing import Any, Optional

PATH = pathlib.Path(__file__).with_name("expected_refusals.json")


@lru_cache(maxsize=1)
def load() -> dict[str, dict[str, str]]:
    """{step: {case: op}} from the expectation file (empty if it does not exist)."""
    if not PATH.exists():
        return {}
    return json.loads(PATH.read_text())["refusals"]


def problem(name: str, step: str, outcome: Any) -> Optional[str]:
    """Why `outcome` of `name` in `step` differs from the expectation file, or None."""
    expected = load().get(step, {}).get(name)
    if outcome.kind == "refused":
        if expected is None:
            return (
                f"new refusal in step {step}: {outcome.detail}\n"
                f'add to {PATH.name} under "{step}": "{name}": "{outcome.op}"'
            )
        if expected != outcome.op:
            return f'refusal in step {step} now names {outcome.op!r}: in {PATH.name} under "{step}", set "{name}": "{outcome.op}"'
        return None
    if expected is not None and outcome.kind == "equal":
        return f'{name} now passes step {step}: remove "{name}": "{expected}" from {PATH.name} under "{step}"'
    return None


def differences(results: dict[tuple[str, str], Any]) -> list[str]:
    """`problem()` of every (case, step) result, as lines."""
    lines = []
    for (name, step), outcome in sorted(results.items()):
        text = problem(name, step, outcome)
        if text:
            lines.append(f"EXPECTATION {step} {name}: " + text.replace("\n", " -- "))
    return lines


def update(results: dict[tuple[str, str], Any], steps: list[str], names: set[str]) -> None:
    """Rewrite the file: for the `steps` run, the entries of the cases in `names` become the
    refusals of `results`; other entries are kept."""
    import onnx
    import onnxruntime

    refusals = {step: dict(entries) for step, entries in load().items()}
    for step in steps:
        kept = {n: op for n, op in refusals.get(step, {}).items() if n not in names}
        kept.update({n: o.op for (n, s), o in results.items() if s == step and o.kind == "refused"})
        refusals[step] = dict(sorted(kept.items()))
    data = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "refusals": refusals}
    PATH.write_text(json.dumps(data, indent=1) + "\n")
    load.cache_clear()
