"""The check every cleanup-pass unit test runs: verified, same results, idempotent, deterministic."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from graphopt import Graph, Pass, PassContext, PassResult
from graphopt.check import run_graph, sample_inputs


def run_checked(pass_: Pass, graph: Graph, *, numeric: bool = True, sizes: Sequence[Optional[dict[str, int]]] = (None,)) -> PassResult:
    """Run `pass_` on `graph` and assert: the graph verifies; its outputs are bit-identical
    (dtype included) on sample inputs for each entry of `sizes`; a second run changes
    nothing; the same pass on a clone prints the same IR."""
    twin = graph.clone()
    feeds = [sample_inputs(graph, sizes=s) for s in sizes] if numeric else []
    expected = [run_graph(graph, f) for f in feeds]
    result = pass_.run(graph, PassContext())
    graph.verify()
    for f, outputs in zip(feeds, expected):
        for before, after in zip(outputs, run_graph(graph, f)):
            np.testing.assert_array_equal(before, after)
            assert before.dtype == after.dtype
    assert not dataclasses.replace(pass_).run(graph, PassContext()).changed
    dataclasses.replace(pass_).run(twin, PassContext())
    assert str(twin) == str(graph)
    return result
