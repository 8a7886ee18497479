"""Property tests: every lossless pass keeps a random graph valid, equal and stable.

For each registered pass whose class says `lossless = True` (found through
`graphopt.registered_passes()`, so passes that arrive through entry points are picked up),
plus a rule-based pass defined here that exercises `graphopt.rewrite`, on random graphs from
`fuzz_graphs.random_graphs()`:
- the graph still verifies and keeps its input and output names;
- ONNX Runtime gives the same outputs as before, within 1e-5 (relative for outputs above 1);
- a pass that reports no change left the printed IR as it was;
- a second run reports `changed=False` and leaves the printed IR identical (idempotence).
Passes get the sample inputs as calibration data, so data-aware lossless passes run too.
The examples are derandomized, so CI runs the same graphs every time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fuzz_graphs import random_graphs
from hypothesis import HealthCheck, given, note, settings

from graphopt import DType, Graph, Pass, PassContext, PassResult, registered_passes
from graphopt.check import max_abs_error, run_graph, sample_inputs
from graphopt.rewrite import RewriteRule, RewriteRuleSet

TOLERANCE = 1e-5
TOTAL_EXAMPLES = 1500
"""Examples shared among the passes under test; each gets at least `MIN_EXAMPLES`."""
MIN_EXAMPLES = 60


def _keep(op, x):
    return x


def _compose_perms(op, x, inner, outer):
    return op.Transpose(x, perm=tuple(inner[i] for i in outer))


def _is_identity_perm(perm) -> bool:
    return perm is not None and list(perm) == list(range(len(perm)))


SIMPLIFICATIONS = RewriteRuleSet([
    RewriteRule("mul-one", lambda op, x: op.Mul(x, 1.0), _keep),
    RewriteRule("add-zero", lambda op, x: op.Add(x, 0.0), _keep),
    RewriteRule("sub-zero", lambda op, x: op.Sub(x, 0.0), _keep),
    RewriteRule("double-negation", lambda op, x: op.Neg(op.Neg(x)), _keep),
    RewriteRule("identity", lambda op, x: op.Identity(x), _keep),
    RewriteRule(
        "exact-cast-round-trip",
        lambda op, x: op.Cast(op.Cast(x, to=int(DType.DOUBLE)), to=int(DType.FLOAT)),
        _keep,
        check=lambda graph, match: match["x"].dtype == DType.FLOAT or "x is not float32",
    ),
    RewriteRule("identity-transpose", lambda op, x: op.Transpose(x, perm=_is_identity_perm), _keep),
    RewriteRule(
        "transpose-pair",
        lambda op, x, inner, outer: op.Transpose(op.Transpose(x, perm=inner), perm=outer),
        _compose_perms,
    ),
])


@dataclasses.dataclass
class RewriteSimplifications(Pass):
    """Drop exact no-ops with graphopt.rewrite rules (x*1, x+0, x-0, --x, Identity, f32->f64->f32, Transposes).

    Needs nothing; keeps graph output names. Defined here (not registered) to fuzz the rewriter.
    """

    name = "test-rewrite-simplifications"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        counts = SIMPLIFICATIONS.apply(graph)
        return PassResult(changed=any(counts.values()), stats=counts)


def passes_under_test() -> list[type[Pass]]:
    """graphopt's own lossless passes (not the deliberately wrong ones other test modules register,
    which pytest may have imported first), and the rewriter's simplifications."""
    registered = [cls for cls in registered_passes().values() if cls.lossless and cls.__module__.startswith("graphopt.")]
    return registered + [RewriteSimplifications]


PASSES = passes_under_test()
EXAMPLES_PER_PASS = max(MIN_EXAMPLES, TOTAL_EXAMPLES // len(PASSES))


def _names(values) -> list[str]:
    return [v.name for v in values]


@pytest.mark.parametrize("pass_cls", PASSES, ids=lambda cls: cls.name)
@settings(
    max_examples=EXAMPLES_PER_PASS, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(graph=random_graphs())
def test_lossless_pass_keeps_outputs_and_is_idempotent(pass_cls: type[Pass], graph: Graph) -> None:
    note(f"input graph:\n{graph}")
    feeds = sample_inputs(graph)
    expected = run_graph(graph, feeds)
    work = graph.clone()
    context = PassContext(calibration=[feeds])  # data-aware lossless passes (smooth-quant) calibrate on the sample
    first = pass_cls().run(work, context)
    printed = str(work)
    note(f"after {pass_cls.name} (changed={first.changed}):\n{printed}")
    work.verify()
    assert _names(work.inputs) == _names(graph.inputs)
    assert _names(work.outputs) == _names(graph.outputs)
    if not first.changed:
        assert printed == str(graph), "the pass reported no change but the IR changed"
    scale = max([1.0] + [float(np.max(np.abs(out))) for out in expected if np.size(out)])
    error = max_abs_error(expected, run_graph(work, feeds))
    assert error <= TOLERANCE * scale, f"outputs moved by {error:g}"
    second = pass_cls().run(work, context)
    assert not second.changed, f"a second run changed the graph again: {second.stats}"
    assert str(work) == printed
