"""Side-by-side latency: every contender timed in the same rounds, in blocks.

Timing contenders strictly one call each in turn (A, B, C, A, B, C, ...) is unfair on a
small machine: ONNX Runtime's and OpenMP's worker threads keep spinning for a while after a
call returns, so the next contender's first call competes with the previous one's idle
threads for the cores (on 2 cores this made 9 ms MiniLM calls take 35 ms). An untimed call
first is not enough: the previous contender's threads spin on through several calls (an
8 ms int8 MiniLM call measured 15 ms that way). Here each round gives every contender, in
turn, a pause of `pause_s` (the other threads stop spinning), `settle` untimed calls and
then a block of `block` timed calls; machine noise that drifts over minutes still hits all
contenders alike, and no timed call starts while another contender's threads spin.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping

PAUSE_S = 0.1
"""Default sleep before each contender's turn: ONNX Runtime's spinning workers measured
idle again within 50 ms on a 2-core machine."""


def time_interleaved(
    runners: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    block: int = 3,
    settle: int = 1,
    pause_s: float = PAUSE_S,
    warmup: int = 0,
    on_round: Callable[[int, int], None] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds of `repeats` timed calls of each runner (after warm-up by the caller),
    taken in rounds of a `pause_s` sleep, `settle` untimed then `block` timed calls per runner,
    after `warmup` untimed calls of each runner (first calls that build caches or kernels).
    `on_round(index, rounds)` is called before each round (progress reporting)."""
    if repeats < 1 or block < 1 or settle < 0 or pause_s < 0 or warmup < 0:
        raise ValueError(
            "time_interleaved: repeats and block must be >= 1, settle, pause_s and warmup >= 0, "
            f"got {repeats}, {block}, {settle}, {pause_s}, {warmup}"
        )
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    rounds = -(-repeats // block)
    for index in range(rounds):
        if on_round is not None:
            on_round(index, rounds)
        for name, run in runners.items():
            if pause_s:
                time.sleep(pause_s)
            for _ in range(settle):
                run()
            for _ in range(min(block, repeats - len(times[name]))):
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def median_ms(runners: Mapping[str, Callable[[], Any]], repeats: int, **options: Any) -> dict[str, float]:
    """The median of `time_interleaved`'s calls, per runner."""
    return {name: statistics.median(t) for name, t in time_interleaved(runners, repeats, **options).items()}
