"""The `tvm` target's static buckets and MetaSchedule tuning: budgets, the database, RPC, save/load."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("tvm")
pytest.importorskip("psutil")

from graphopt.api import compile, load_compiled  # noqa: E402
from graphopt.ir.dtypes import DType  # noqa: E402
from graphopt.ir.graph import Graph  # noqa: E402
from graphopt.ir.types import TensorType  # noqa: E402
from graphopt.target_base import TargetError  # noqa: E402
from graphopt.target_registry import get_target  # noqa: E402

HIDDEN = 64


def _linear_graph() -> Graph:
    """y = Relu(x @ w + b) on x: [batch, seq, 64]: one matmul kernel with a fused epilogue."""
    graph = Graph("linear", opset_imports={"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", "seq", HIDDEN)))
    rng = np.random.default_rng(0)
    weight = graph.add_constant("w", rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 8)
    bias = graph.add_constant("b", rng.standard_normal(HIDDEN).astype(np.float32))
    added = graph.add_node("Add", [graph.add_node("MatMul", [x, weight]).output, bias]).output
    graph.set_outputs([graph.add_node("Relu", [added]).output])
    graph.rename_value(graph.outputs[0], "y")
    return graph


def _x(batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(batch * 100 + seq).standard_normal((batch, seq, HIDDEN)).astype(np.float32)


def _expected(x: np.ndarray) -> np.ndarray:
    graph = _linear_graph()
    weight, bias = (graph.constants[name].const.numpy() for name in ("w", "b"))
    return np.maximum(x @ weight + bias, 0)


def _records(folder) -> int:
    """Tuning records in a MetaSchedule JSON database folder."""
    path = folder / "database_tuning_record.json"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_tune_shapes_alone_builds_a_static_bucket_that_calls_with_those_dims_run():
    compiled = compile(_linear_graph(), "tvm:llvm{tune_shapes={batch:1,seq:[8,16]}}", "cleanup")
    assert [b.dims for b in compiled.buckets] == [{"batch": 1, "seq": 8}, {"batch": 1, "seq": 16}]
    assert all(b.report == {} for b in compiled.buckets)  # no budget: hand schedules, nothing measured
    for batch, seq, in_bucket in [(1, 8, True), (1, 16, True), (2, 8, False), (1, 5, False)]:
        x = _x(batch, seq)
        assert (compiled.machine_for({"x": x}) is not compiled.vm) == in_bucket
        np.testing.assert_allclose(compiled(x=x)[0], _expected(x), rtol=1e-5, atol=1e-5)


def test_tuning_with_a_tiny_budget_keeps_or_beats_each_hand_schedule_and_a_second_run_measures_nothing(tmp_path):
    database = tmp_path / "db"
    spec = f"tvm:llvm{{tune_trials=4,tune_shapes={{batch:1,seq:32}},tuning_db='{database}'}}"
    untuned = compile(_linear_graph(), "tvm:llvm", "cleanup")
    tuned = compile(_linear_graph(), spec, "cleanup")
    report = tuned.buckets[0].report
    assert report["dims"] == {"batch": 1, "seq": 32}
    assert report["trials"] >= 4 and not report["interrupted"]
    measured = [k for k in report["kernels"] if k["hand_ms"] is not None]
    assert measured, report
    for kernel in measured:
        assert kernel["best_ms"] <= kernel["hand_ms"], kernel  # the hand schedule is the baseline the tuner must beat
    assert set(report["module_ms"]) == {"hand", "tuned"}  # both modules timed end to end; the faster is kept
    assert report["uses"] == min(report["module_ms"], key=report["module_ms"].__getitem__)
    x = _x(1, 32)
    np.testing.assert_allclose(tuned(x=x)[0], untuned(x=x)[0], rtol=1e-5, atol=1e-5)
    records = _records(database)
    assert records > len(measured)  # hand baselines plus measured candidates

    again = compile(_linear_graph(), spec, "cleanup").buckets[0].report
    assert again["trials"] == 0
    assert _records(database) == records
    assert [k["best_ms"] for k in again["kernels"]] == [k["best_ms"] for k in report["kernels"]]


def test_a_tuned_module_slower_end_to_end_than_the_hand_one_is_not_used(tmp_path, monkeypatch):
    import graphopt.timing

    monkeypatch.setattr(graphopt.timing, "median_ms", lambda runners, repeats: {"hand": 1.0, "tuned": 2.0})
    compiled = compile(_linear_graph(), f"tvm:llvm{{tune_trials=2,tune_shapes={{batch:1,seq:8}},tuning_db='{tmp_path}'}}", "cleanup")
    assert compiled.buckets[0].report["uses"] == "hand"
    assert "uses the hand one" in compiled.build_notes()[0]
    x = _x(1, 8)
    np.testing.assert_allclose(compiled(x=x)[0], _expected(x), rtol=1e-5, atol=1e-5)


def test_ctrl_c_during_the_search_keeps_what_was_measured_and_builds(tmp_path, monkeypatch):
    from tvm.s_tir import meta_schedule

    def interrupted(**_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(meta_schedule, "tune_tasks", interrupted)
    compiled = compile(_linear_graph(), f"tvm:llvm{{tune_minutes=5,tune_shapes={{batch:2,seq:4}},tuning_db='{tmp_path}'}}", "cleanup")
    report = compiled.buckets[0].report
    assert report["interrupted"] and report["trials"] == 0
    assert all(k["hand_ms"] is not None for k in report["kernels"] if k["name"].startswith("fused_matmul"))
    x = _x(2, 4)
    np.testing.assert_allclose(compiled(x=x)[0], _expected(x), rtol=1e-5, atol=1e-5)


def test_measurements_go_through_an_rpc_tracker_to_two_servers_on_localhost(tmp_path):
    from tvm import rpc
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
    servers = [Server(host="127.0.0.1", port=9300, port_end=9400, key="graphopt-test", tracker_addr=("127.0.0.1", tracker.port), silent=True)
               for _ in range(2)]
    try:
        deadline = time.monotonic() + 30
        while _free_servers(rpc, tracker.port) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # the servers register with the tracker in the background
        assert _free_servers(rpc, tracker.port) == 2
        spec = (f"tvm:llvm{{tune_trials=4,tune_shapes={{batch:1,seq:16}},tuning_db='{tmp_path}',"
                f"rpc={{tracker:'127.0.0.1:{tracker.port}',key:graphopt-test}}}}")
        compiled = compile(_linear_graph(), spec, "cleanup")
    finally:
        for server in servers:
            server.terminate()
        tracker.terminate()
    report = compiled.buckets[0].report
    assert report["trials"] >= 4
    assert any(k["hand_ms"] is not None for k in report["kernels"])  # measured on the servers
    x = _x(1, 16)
    np.testing.assert_allclose(compiled(x=x)[0], _expected(x), rtol=1e-5, atol=1e-5)


def _free_servers(rpc, port: int) -> int:
    queue = rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]
    return queue.get("graphopt-test", {}).get("free", 0)


def test_a_saved_tuned_model_loads_its_buckets_without_tuning(tmp_path, monkeypatch):
    database = tmp_path / "db"
    compiled = compile(_linear_graph(), f"tvm:llvm{{tune_trials=2,tune_shapes={{batch:1,seq:8}},tuning_db='{database}'}}", "cleanup")
    folder = compiled.save(tmp_path / "artifact")
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["tuning_db"] == str(database)
    assert [(b["dims"], b["file"]) for b in manifest["buckets"]] == [({"batch": 1, "seq": 8}, "bucket0.so")]
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == ["bucket0.so", "manifest.json", "model.so", "params.npz"]

    from graphopt.targets import tvm_tuning

    def no_tuning(*_: object) -> None:
        raise AssertionError("loading must not tune")

    monkeypatch.setattr(tvm_tuning, "tune", no_tuning)
    loaded = load_compiled(folder)
    x = _x(1, 8)
    assert loaded.machine_for({"x": x}) is not loaded.vm
    np.testing.assert_array_equal(loaded(x=x)[0], compiled(x=x)[0])
    np.testing.assert_allclose(loaded(x=_x(3, 5))[0], _expected(_x(3, 5)), rtol=1e-5, atol=1e-5)


def test_batch_and_sequence_dims_default_to_1_and_128_and_other_symbols_are_named():
    target = get_target("tvm:llvm{tune_minutes=1}")
    assert target.buckets(_linear_graph()) == [{"batch": 1, "seq": 128}]
    assert get_target("tvm:llvm{tune_minutes=1,tune_shapes={seq:[16,32]}}").buckets(_linear_graph()) == [
        {"batch": 1, "seq": 16}, {"batch": 1, "seq": 32}]
    graph = _linear_graph()
    graph.inputs[0].type = TensorType(DType.FLOAT, ("batch", "rows", HIDDEN))
    with pytest.raises(TargetError) as info:
        compile(graph, "tvm:llvm{tune_minutes=1}", "cleanup")
    assert str(info.value) == ("target 'tvm': tuning (and tune_shapes) needs a size for every symbolic dim of the inputs; "
                               "give tune_shapes={batch: 1, rows: 64} (no size for: rows)")


@pytest.mark.parametrize("spec, message", [
    ("tvm{tune_shapes=7}", "option tune_shapes must be a mapping such as {batch: 1, seq: [128, 256]}, got 7"),
    ("tvm{rpc=localhost}", "option rpc must be a mapping such as {tracker: \"127.0.0.1:9190\", key: cpu}, got 'localhost'"),
    ("tvm{rpc={tracker:localhost,key:cpu}}", "option 'rpc' needs tracker \"host:port\" and the servers' key"),
    ("tvm{rpc={tracker:'h:1',key:cpu,port:2}}", "option 'rpc': unknown entries ['port']; it takes tracker and key"),
    ("tvm{tune_minutes=-1}", "tune_minutes and tune_trials must be >= 0"),
])
def test_bad_tuning_options_are_refused_naming_the_option(spec, message):
    with pytest.raises(TargetError) as info:
        get_target(spec)
    assert message in str(info.value)


def test_tune_shapes_sizes_must_be_positive_ints():
    with pytest.raises(TargetError) as info:
        compile(_linear_graph(), "tvm:llvm{tune_shapes={batch:1,seq:[8,0]}}", "cleanup")
    assert "option 'tune_shapes': 'seq' needs sizes >= 1 (an int or a list of ints), got [8, 0]" in str(info.value)


def test_graphopt_compile_tunes_prints_what_it_did_and_saves_the_bucket(tmp_path, capsys):
    import graphopt
    from graphopt.cli import main

    source = tmp_path / "linear.onnx"
    graphopt.save_onnx(_linear_graph(), source)
    spec = f"tvm:llvm{{tune_trials=2,tune_shapes={{batch:1,seq:8}},tuning_db='{tmp_path / 'db'}'}}"
    assert main(["compile", str(source), "-t", spec, "-p", "cleanup", "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "static module for batch=1, seq=8: " in printed and " trials in " in printed and "measured kernels " in printed
    assert (tmp_path / "out" / "bucket0.so").exists()
