import pytest

from graphopt.timing import median_ms, time_interleaved


def test_each_round_settles_then_times_a_block_per_runner():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = time_interleaved(runners, repeats=5, block=2, settle=1, pause_s=0)
    assert {name: len(t) for name, t in times.items()} == {"a": 5, "b": 5}
    # 3 rounds: per runner 1 settle + 2, 2, then 1 timed call
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_median_and_progress():
    rounds = []
    medians = median_ms({"x": lambda: None}, 4, block=3, settle=0, pause_s=0, on_round=lambda i, n: rounds.append((i, n)))
    assert set(medians) == {"x"} and medians["x"] >= 0
    assert rounds == [(0, 2), (1, 2)]


@pytest.mark.parametrize("options", [{"repeats": 0}, {"repeats": 3, "block": 0}, {"repeats": 3, "settle": -1}, {"repeats": 3, "pause_s": -1}, {"repeats": 3, "warmup": -1}])
def test_bad_counts_are_refused(options):
    with pytest.raises(ValueError, match="time_interleaved"):
        time_interleaved({"x": lambda: None}, **options)


def test_each_turn_starts_with_the_pause(monkeypatch):
    import graphopt.timing

    events = []
    monkeypatch.setattr(graphopt.timing.time, "sleep", lambda s: events.append(("sleep", s)))
    time_interleaved({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, repeats=1, block=1, settle=0, pause_s=0.25)
    assert events == [("sleep", 0.25), "a", ("sleep", 0.25), "b"]


def test_warmup_calls_come_before_the_first_round():
    calls = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=1, block=1, settle=0, pause_s=0, warmup=2)
    assert calls == ["a", "a", "b", "b", "a", "b"]
    assert {name: len(t) for name, t in times.items()} == {"a": 1, "b": 1}
