"""The full conformance suite (`@pytest.mark.conformance`) is deselected unless asked for.

Run every case with `GRAPHOPT_CONFORMANCE=1 pytest tests/conformance` (or `python
benchmarks/conformance.py`, which isolates crashes per case); `-m conformance` runs the marked
cases only. The lean subset (unmarked) runs unless deselected.
"""

from __future__ import annotations

import os

import pytest


def _full_suite_wanted(config: pytest.Config) -> bool:
    return os.environ.get("GRAPHOPT_CONFORMANCE") == "1" or "conformance" in (config.option.markexpr or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _full_suite_wanted(config):
        return
    kept = [item for item in items if item.get_closest_marker("conformance") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("conformance")])
        items[:] = kept
