"""Distributed calibration: ranks holding shards of the samples build the one-process graph.

Two gloo ranks (spawned processes) each get part of 7 samples (4 and 3: uneven shards) and run
`graphopt.optimize(..., distributed=True)`; every pass's constants and stats must equal those
of one process given all 7. Exact (bit for bit) where the reduced statistics are min/max,
integer histograms or gathered values; within 1e-6 of each tensor's largest magnitude where
float64 sums over tokens are added in another order (Gram matrices, refit means and moments:
low-rank, GPTQ, prune-heads/prune-ffn compensation), with the same decisions (pruned units,
ranks) either way. Thread ranks (`calibration_ranks.ThreadReducer`) check more shardings, 3
ranks, ranks holding none of a subset, and the refusals cheaply.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket

import numpy as np
import pytest

import graphopt
from calibration_ranks import Case, constants, pass_stats, patched, rank_main, run_threads
from graphopt.calibration import CalibrationError, collect_gram, collect_rows, collect_statistics
from graphopt.check import sample_inputs
from graphopt.distributed_calibration import DistributedCalibrationError
from quant_testing import block_graph, calibration

SAMPLES = 7
SPLIT = 4
"""Rank 0 holds samples[:4], rank 1 samples[4:]."""
FEW = {"graphopt.passes.smooth_quant:SEARCH_SAMPLES": 2, "graphopt.passes.quantize:SENSITIVITY_SAMPLES": 2}
"""With 2 search samples smooth-quant's fit (global samples 0, 2) and held-out (1, 3) subsets,
and fidelity_budget's sensitivity subset (0, 1), lie on rank 0 only: rank 1 joins with none."""

CASES = {  # id: (model, pipeline, constants patched while it runs, bit-exact)
    "quantize-minmax": ("bert", "fuse,quantize{smooth=false}", {}, True),
    "quantize-entropy": ("bert", "fuse,quantize{calibrate=entropy,smooth=false}", {}, True),
    "quantize-percentile-smooth-auto": ("bert", "fuse,quantize{calibrate=percentile}", FEW, True),
    "quantize-fidelity-budget": ("bert", "fuse,quantize{fidelity_budget=0.001,smooth=false}", FEW, True),
    "smooth-quant-auto": ("bert", "fuse,smooth-quant{alpha=auto}", {}, True),
    "smooth-quant-per-layer": ("bert", "fuse,smooth-quant{alpha=per-layer}", {}, True),
    "prune-heads": ("bert", "fuse,prune-heads{ratio=0.25}", {}, False),
    "prune-ffn": ("bert", "fuse,prune-ffn{ratio=0.25}", {}, False),
    "low-rank": ("bert", "fuse,low-rank{ratio=0.25,min_size=256}", {}, False),
    "gptq": ("llama", "fuse,quantize{mode=weight-only,dtype=int4,method=gptq}", {}, False),
    "awq": ("llama", "fuse,quantize{mode=weight-only,dtype=int4,method=awq}", {}, True),
    "prune-heads-taylor": ("llama", "fuse,prune-heads{ratio=0.25,score=taylor}", {}, False),
    "prune-ffn-global": ("llama", "fuse,prune-ffn{ratio=0.25,scope=global}", {}, False),
}
TOLERANCE = 1e-6


@pytest.fixture(scope="module", autouse=True)
def quiet():
    logger = logging.getLogger("graphopt")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def models(zoo_onnx):
    """name -> (.onnx path, SAMPLES samples)."""
    found = {}
    for name in ("bert", "llama"):
        path = str(zoo_onnx(name))
        graph = graphopt.optimize(path, "cleanup")
        found[name] = (path, [sample_inputs(graph, seed=i) for i in range(SAMPLES)])
    return found


@pytest.fixture(scope="module")
def gloo(models, tmp_path_factory):
    """(one-process results, [rank 0's, rank 1's]) per case: {id: (constants, pass stats)}."""
    import torch.multiprocessing as mp

    folder = str(tmp_path_factory.mktemp("gloo_ranks"))
    cases = [Case(id, models[model][0], pipeline, [models[model][1][:SPLIT], models[model][1][SPLIT:]], patch)
             for id, (model, pipeline, patch, _) in CASES.items()]
    context = mp.start_processes(rank_main, args=(2, _free_port(), cases, folder), nprocs=2, join=False, start_method="spawn")
    single = {}
    for case in cases:  # while the ranks start and run
        with patched(case.patch):
            graph = graphopt.optimize(case.model, case.pipeline, calibration_data=[s for shard in case.shards for s in shard])
        single[case.id] = (constants(graph), pass_stats(graph))
    while not context.join(timeout=300):
        pass
    ranks = []
    for rank in range(2):
        with open(os.path.join(folder, f"rank{rank}.pkl"), "rb") as handle:
            ranks.append(pickle.load(handle))
    return single, ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_same_graph(expected, actual, exact: bool) -> None:
    """Same constants (bit for bit, or floats within TOLERANCE of each tensor's largest
    magnitude and integers exactly) and the same pass stats (the decisions)."""
    (want, want_stats), (got, got_stats) = expected, actual
    assert got_stats == want_stats
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        other = got[name]
        assert other.dtype == value.dtype and other.shape == value.shape, name
        if exact or value.dtype.kind != "f":
            assert np.array_equal(other, value), name
        else:
            scale = max(float(np.abs(value).max(initial=0.0)), 1e-30)
            assert float(np.abs(other.astype(np.float64) - value).max(initial=0.0)) <= TOLERANCE * scale, name


@pytest.mark.parametrize("case", CASES)
def test_gloo_ranks_build_the_one_process_graph(gloo, case):
    single, ranks = gloo
    for rank in ranks:
        assert_same_graph(single[case], rank[case], CASES[case][3])


def test_pruned_heads_are_the_same_on_every_rank(gloo):
    single, ranks = gloo
    for case in ("prune-heads", "prune-heads-taylor"):
        removed = [stats["removed"] for path, stats in single[case][1] if path == "prune-heads"]
        assert removed and removed[0]
        assert all([stats["removed"] for path, stats in rank[case][1] if path == "prune-heads"] == removed for rank in ranks)


def _shards(samples, sizes):
    bounds = np.cumsum([0, *sizes])
    return [samples[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]


@pytest.mark.parametrize("sizes", [(1, 6), (6, 1), (3, 2, 2)])
def test_thread_ranks_match_one_process_for_any_split(models, sizes):
    path, samples = models["bert"]
    for pipeline, patch, exact in (("fuse,smooth-quant{alpha=auto}", FEW, True), ("fuse,prune-heads{ratio=0.25},prune-ffn{ratio=0.25}", {}, False)):
        with patched(patch):
            single = graphopt.optimize(path, pipeline, calibration_data=samples)
            ranks = run_threads(lambda reducer, rank: graphopt.optimize(path, pipeline, calibration_data=_shards(samples, sizes)[rank], distributed=reducer), len(sizes))
        for graph in ranks:
            assert_same_graph((constants(single), pass_stats(single)), (constants(graph), pass_stats(graph)), exact)


@pytest.mark.parametrize("sizes", [(2, 3), (0, 5), (5, 0, 0)])
def test_collectors_reduce_to_the_one_process_statistics(sizes):
    graph = block_graph(outlier=8.0)
    samples = calibration(graph, 5)
    names = ["x", "k", graph.find_value("k").producer.inputs[0].name]
    stats = collect_statistics(graph, samples, names, histogram=True)
    rows = collect_rows(graph, samples, names, max_rows=7)
    grams = collect_gram(graph, samples, names)

    def collect(reducer, rank):
        mine = _shards(samples, sizes)[rank]
        return (collect_statistics(graph, mine, names, histogram=True, reducer=reducer), collect_rows(graph, mine, names, max_rows=7, reducer=reducer),
                collect_gram(graph, mine, names, reducer=reducer))

    for got_stats, got_rows, got_grams in run_threads(collect, len(sizes)):
        for name in names:
            want, got = stats[name], got_stats[name]
            assert (got.min, got.max) == (want.min, want.max)
            assert np.array_equal(got.channel_absmax, want.channel_absmax) and np.array_equal(got.histogram, want.histogram)
            assert np.array_equal(got_rows[name], rows[name])
            assert got_grams[name].rows == grams[name].rows
            np.testing.assert_allclose(got_grams[name].matrix, grams[name].matrix, rtol=1e-12, atol=1e-12 * np.abs(grams[name].matrix).max())


def _errors(fn, world):
    def guarded(reducer, rank):
        try:
            fn(reducer, rank)
        except Exception as exc:  # noqa: BLE001 - compared below
            return exc
        return None

    return run_threads(guarded, world)


def test_a_rank_without_samples_is_refused_on_every_rank(models):
    path, samples = models["bert"]
    shards = [samples, None]
    errors = _errors(lambda reducer, rank: graphopt.optimize(path, "fuse,quantize", calibration_data=shards[rank], distributed=reducer), 2)
    assert all(isinstance(e, CalibrationError) and "rank(s) [1] hold no calibration samples" in str(e) for e in errors)
    shards = [samples, []]
    errors = _errors(lambda reducer, rank: graphopt.optimize(path, "fuse,quantize", calibration_data=shards[rank], distributed=reducer), 2)
    assert isinstance(errors[1], CalibrationError) and "empty" in str(errors[1])
    assert isinstance(errors[0], DistributedCalibrationError) and "rank(s) [1] refused" in str(errors[0])


def test_ranks_must_run_one_pipeline_without_choose_precision(models):
    path, samples = models["bert"]
    pipelines = ["fuse,quantize", "fuse,quantize{calibrate=mse}"]
    errors = _errors(lambda reducer, rank: graphopt.optimize(path, pipelines[rank], calibration_data=samples[rank::2], distributed=reducer), 2)
    assert all(isinstance(e, DistributedCalibrationError) and "same pipeline" in str(e) for e in errors)
    errors = _errors(lambda reducer, rank: graphopt.optimize(path, "fuse,choose-precision", calibration_data=samples[rank::2], distributed=reducer), 2)
    assert all(isinstance(e, DistributedCalibrationError) and "pass 'choose-precision' cannot calibrate across ranks" in str(e) for e in errors)


def test_distributed_true_needs_a_process_group():
    with pytest.raises(DistributedCalibrationError, match="init_process_group"):
        graphopt.optimize(block_graph(), "cleanup", distributed=True)
