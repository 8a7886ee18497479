"""Ranks for tests/test_distributed_calibration.py: spawned gloo ranks and in-process thread ranks.

- `rank_main(rank, world, port, cases, folder)`: the body of one spawned process: joins a gloo
  group on 127.0.0.1:`port`, runs `graphopt.optimize(..., distributed=True)` for every case on
  its shard and pickles {case id: (constants, pass stats)} into `folder/rank<R>.pkl`.
- `ThreadReducer` / `run_threads(fn, world)`: the same collectives between threads of one
  process (barrier exchanges), for cheap checks of many shardings without process start-up.
- `constants(graph)`, `pass_stats(graph)`: what two results are compared on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pickle
import threading
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import numpy as np

from graphopt.distributed_calibration import Reducer


@dataclasses.dataclass
class Case:
    """One distributed optimization: the model file, the pipeline, each rank's samples, and
    module constants to set while it runs ({"module:NAME": value})."""

    id: str
    model: str
    pipeline: str
    shards: list[list[dict[str, np.ndarray]]]
    patch: dict[str, Any] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def patched(settings: dict[str, Any]) -> Iterator[None]:
    saved = []
    try:
        for key, value in settings.items():
            module, name = key.split(":")
            target = importlib.import_module(module)
            saved.append((target, name, getattr(target, name)))
            setattr(target, name, value)
        yield
    finally:
        for target, name, value in reversed(saved):
            setattr(target, name, value)


def constants(graph: Any) -> dict[str, np.ndarray]:
    return {name: value.const.numpy() for name, value in graph.constants.items() if value.const is not None}


def pass_stats(graph: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(record.path, record.stats) for record in graph.report.walk()]


def rank_main(rank: int, world: int, port: int, cases: list[Case], folder: str) -> None:
    import logging

    import torch.distributed as dist

    import graphopt

    logging.getLogger("graphopt").setLevel(logging.ERROR)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        results = {}
        for case in cases:
            with patched(case.patch):
                graph = graphopt.optimize(case.model, case.pipeline, calibration_data=case.shards[rank], distributed=True)
            results[case.id] = (constants(graph), pass_stats(graph))
        with open(os.path.join(folder, f"rank{rank}.pkl"), "wb") as handle:
            pickle.dump(results, handle)
    finally:
        dist.destroy_process_group()


class _Group:
    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots: list[Optional[np.ndarray]] = [None] * world


class ThreadReducer(Reducer):
    """Collectives between the threads of one `_Group` (every thread must call them in the
    same order, as processes must): each call puts this rank's array in its slot, waits for
    all, reads every slot, and waits again before a slot may be reused."""

    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world

    def _exchange(self, array: np.ndarray) -> list[np.ndarray]:
        group = self.group
        group.slots[self.rank] = np.array(array, copy=True)
        group.barrier.wait()
        parts = [np.array(p, copy=True) for p in group.slots]  # type: ignore[arg-type]
        group.barrier.wait()
        return parts

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        parts = self._exchange(array)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total.astype(np.asarray(array).dtype)

    def all_reduce_max(self, array: np.ndarray) -> np.ndarray:
        return np.maximum.reduce(self._exchange(array))

    def all_reduce_min(self, array: np.ndarray) -> np.ndarray:
        return np.minimum.reduce(self._exchange(array))

    def all_gather(self, array: np.ndarray) -> list[np.ndarray]:
        return self._exchange(array)


def run_threads(fn: Callable[[Reducer, int], Any], world: int) -> list[Any]:
    """[fn(reducer, rank) for every rank], the ranks running as threads; the first exception
    of any rank is raised (the others are released from their barrier)."""
    group = _Group(world)
    results: list[Any] = [None] * world
    errors: list[tuple[int, BaseException]] = []

    def work(rank: int) -> None:
        try:
            results[rank] = fn(ThreadReducer(group, rank), rank)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append((rank, exc))
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    real = [e for e in errors if not isinstance(e[1], threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0][1]
    return results
