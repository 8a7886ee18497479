"""Tensor-parallel execution on torch.distributed: `compile_sharded(model, tp=2, ...)`.

The process that calls `compile_sharded` (the launcher) gets a `ShardedModel`, a
`CompiledModel` it calls like any other; behind it run `tp` worker processes, one per rank:

1. The launcher imports the model, runs the pipeline's passes before `shard` (e.g. `fuse`)
   once, checks that the graph splits `tp` ways (`ShardError` naming the layer, before any
   process starts), runs `shard{tp, rank=R}` for each rank on a copy (the weights shared until
   sliced) and writes each rank's graph to a temporary folder as ONNX with graphopt's ops kept.
2. It starts `tp` processes (torch.multiprocessing, spawn). Rank R sets MASTER_ADDR /
   MASTER_PORT (127.0.0.1, a free port), joins the process group (gloo on CPU, NCCL for a
   `torch:cuda` target, rank R on cuda:R), loads its own graph (weights memory-mapped), runs
   the passes after `shard`, and compiles for the target (with its lowering). So each rank
   maps, reads and holds only its own slices of the split weights plus the
   replicated ones (norms, position embeddings): `ShardedModel.ranks` reports each rank's
   float weight bytes, all constant bytes and peak resident memory.
   The collectives the pass inserted run inside each rank's module (the torch target's
   kernels of graphopt::AllReduce / AllGather call torch.distributed).
3. A call sends the inputs to every rank over a pipe; each runs its module; rank 0's outputs,
   the full outputs, come back (numpy in, numpy out; torch tensors are converted as by every
   CompiledModel). Calls are serialized.
4. `close()` (also `with ShardedModel ...:`, garbage collection and interpreter exit) asks
   the ranks to leave the process group and exit, and joins them (terminates what does not
   exit within 10 s): no process outlives it, none is left a zombie. A rank that raises
   (building or running) makes the launcher stop every rank (one waiting in a collective for
   the failed one could not finish) and raise the rank's exception again, its message and
   type kept (a `DistributedError` when it cannot be rebuilt) with the rank's traceback as
   its cause; the model is closed then. A rank that dies without a word (killed, crashed)
   raises a `DistributedError` naming it and its exit code; `timeout` bounds every wait.

As with any spawned process, a script that calls this must guard its entry point with
`if __name__ == "__main__":`. Passes after `shard` run on each rank without calibration data
(their ONNX Runtime runs cannot run collectives): calibrate before `shard`.
`ShardedModel.save(DIR)` has each rank write its own artifact into `DIR/rank<R>/` (its shard
only) under one manifest; `graphopt.load_compiled(DIR)` (and `graphopt run DIR`) starts the
ranks again, each loading its folder, and `torchrun --standalone --nproc-per-node N -m
graphopt.distributed DIR -i inputs.npz` runs the saved ranks under torchrun instead
(`torchrun_main`; without --standalone, torchrun's own rendezvous options across machines).
Not done yet: keeping the KV cache on the ranks between calls (the presents are gathered
and returned whole each call).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import traceback
import weakref
from datetime import timedelta
from typing import Any, Optional, Sequence, Union

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.pass_base import Pass, PassContext
from graphopt.pipeline import PipelineLike
from graphopt.target_base import CompiledModel, IOSpec, TargetError

SHUTDOWN_WAIT_S = 10.0
"""How long `close` waits for a rank to exit by itself before terminating it."""


class DistributedError(GraphoptError):
    """A rank failed, died or did not answer; or the sharded model was used after close()."""


class _RemoteTraceback(Exception):
    """The traceback of an exception raised on a rank (the `__cause__` of the re-raised one)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


@dataclasses.dataclass
class _RankConfig:
    """What one rank needs to build its part (pickled to the spawned process)."""

    rank: int
    tp: int
    port: int
    graph_path: str
    passes: list[Pass]
    target: str
    backend: str
    threads: int
    timeout_s: float
    seed: int
    artifact: Optional[str] = None
    """A saved rank artifact to load instead of building from `graph_path` and `passes`."""
    shard_stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The shard pass's stats for this rank (it ran in the launcher)."""


def compile_sharded(
    model: Any,
    tp: int = 2,
    pipeline: Union[PipelineLike, Sequence[Pass]] = "fuse",
    target: Any = "torch",
    *,
    example_inputs: Optional[Sequence[Any]] = None,
    calibration: Optional[list[dict[str, Any]]] = None,
    calibration_data: Any = None,
    check: bool = False,
    verify: bool = False,
    dump_ir: Sequence[str] = (),
    dump_dir: Optional[str] = None,
    seed: int = 0,
    threads: Optional[int] = None,
    timeout: float = 300.0,
) -> "ShardedModel":
    """`model` split over `tp` ranks by the `shard` pass, run by `tp` processes (see the module doc).

    `model`: as for `graphopt.compile` (a Graph, an .onnx path, a ModelProto, an
    ExportedProgram, or an nn.Module with `example_inputs`). `pipeline`: the passes; those
    before `shard{tp=...}` run once here, those after it on each rank; without a `shard` in
    it, `shard{tp=tp}` is appended. `target`: a target that runs graphopt::AllReduce (the
    torch target). `check`, `verify`, `dump_ir`, `calibration` apply to the passes run here.
    `threads`: torch threads per rank (default: this machine's cores divided by `tp`).
    `timeout`: seconds to wait for a rank (start-up, each call, each collective).
    """
    from graphopt.api import _graph_for_compile, optimize
    from graphopt.pass_manager import PassManager
    from graphopt.target_registry import get_target

    if tp < 1:
        raise DistributedError(f"tp must be at least 1, got {tp}")
    chosen = get_target(target)
    missing = chosen.available()
    if missing:
        raise TargetError(f"target '{chosen.spec}' cannot run here: {missing}")
    _check_collectives(chosen)
    backend = "nccl" if chosen.variant == "cuda" else "gloo"
    if backend == "nccl":
        _check_devices(tp)
    before, shard, after = _split_pipeline(pipeline, tp)
    graph = _graph_for_compile(model, example_inputs)
    if before:
        graph = optimize(
            graph, before, calibration=calibration, calibration_data=calibration_data, check=check, verify=verify,
            dump_ir=dump_ir, dump_dir=dump_dir, seed=seed,
        )
    shard.validate(graph)  # type: ignore[attr-defined]
    folder = tempfile.mkdtemp(prefix="graphopt-shard-")
    try:
        cores = os.cpu_count() or 1
        configs = []
        for rank in range(tp):  # each rank's graph written apart, so a rank maps and reads only its own slices
            part = graph.clone()
            PassManager([dataclasses.replace(shard, rank=rank)]).run(part, PassContext(seed=seed))
            path = os.path.join(folder, f"rank{rank}.onnx")
            part.save_onnx(path, keep_graphopt_ops=True)
            stats = part.report.records[-1].stats if part.report else {}
            del part
            configs.append(_RankConfig(
                rank, tp, 0, path, list(after), str(chosen.spec), backend, threads or max(1, cores // tp), timeout, seed,
                shard_stats=dict(stats),
            ))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    compiled = ShardedModel(chosen, [IOSpec.of(v) for v in graph.inputs], [IOSpec.of(v) for v in graph.outputs], configs, folder, timeout)
    compiled.pipeline_report = graph.report
    return compiled


def _check_collectives(target: Any) -> None:
    """TargetError unless `target` compiles graphopt::AllReduce (tried on a one-node graph)."""
    from graphopt.ir.dtypes import DType
    from graphopt.ir.schema import GRAPHOPT_DOMAIN
    from graphopt.ir.types import TensorType

    probe = Graph("collectives", {"": 17, GRAPHOPT_DOMAIN: 1})
    x = probe.add_input("x", TensorType(DType.FLOAT, (1,)))
    probe.set_outputs([probe.add_node("AllReduce", [x], {"world_size": 2}, domain=GRAPHOPT_DOMAIN).output])
    reason = "it has no kernel for it" if target.unsupported_nodes(probe) else None
    if reason is None:
        try:
            target.compile(probe)
        except GraphoptError as exc:
            reason = str(exc)
    if reason is not None:
        raise TargetError(
            f"target '{target.spec}' cannot run the collectives (graphopt::AllReduce) a sharded model needs ({reason}); use target='torch'"
        )


def _check_devices(tp: int) -> None:
    """TargetError unless there is one CUDA device per rank (NCCL runs one rank per device)."""
    import torch

    if torch.cuda.device_count() < tp:
        raise TargetError(f"{tp} ranks on CUDA need {tp} devices (one per rank, as NCCL requires); torch sees {torch.cuda.device_count()}")


def _split_pipeline(pipeline: Union[PipelineLike, Sequence[Pass]], tp: int) -> tuple[list[Pass], Pass, list[Pass]]:
    """(passes before shard, the shard pass, passes after it), validated as one pipeline."""
    from graphopt.pipeline import build_pipeline, check_order
    from graphopt.registry import get_pass

    passes = build_pipeline(pipeline)
    positions = [i for i, p in enumerate(passes) if p.name == "shard"]
    if len(positions) > 1:
        raise DistributedError(f"the pipeline names 'shard' {len(positions)} times; a model is split once")
    if not positions:
        passes = [*passes, get_pass("shard").from_options({"tp": tp})]
        check_order(passes)
        positions = [len(passes) - 1]
    index = positions[0]
    shard = passes[index]
    if shard.tp != tp:  # type: ignore[attr-defined]
        raise DistributedError(f"the pipeline's {shard.describe()} does not match the {tp} ranks asked for")
    return passes[:index], shard, passes[index + 1:]


class ShardedModel(CompiledModel):
    """A model split over `tp` ranks, each a worker process; called like any CompiledModel.

    `ranks`: per rank, what it reported when it was built: `rank`, `pid`, `weight_bytes`
    (float constants of its graph: its slices plus the replicated weights), `constant_bytes`
    (every constant), `peak_rss_bytes` (the rank process's own peak resident memory after building,
    torch included) and `shard` (the shard pass's stats). `close()` stops the ranks.
    """

    def __init__(self, target: Any, inputs: list[IOSpec], outputs: list[IOSpec], configs: list[_RankConfig], folder: str, timeout: float) -> None:
        super().__init__(target, inputs, outputs)
        self.tp = len(configs)
        self.ranks: list[dict[str, Any]] = []
        self._timeout = timeout
        self._backend = configs[0].backend if configs else "gloo"
        self._lock = threading.Lock()
        self._processes: list[Any] = []
        self._conns: list[Any] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._conns, folder)
        try:
            self._start(configs)
            self.ranks = self._answers()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<ShardedModel tp={self.tp} target={self.target.spec} inputs={self.input_names} outputs={self.output_names}>"

    def __enter__(self) -> "ShardedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop every rank (they leave the process group and exit) and delete the temporary
        graph; calling the model afterwards raises DistributedError. Idempotent."""
        self._closed = True
        self._finalizer()

    def _start(self, configs: list[_RankConfig]) -> None:
        import torch.multiprocessing as mp

        context = mp.get_context("spawn")
        port = _free_port()
        for config in configs:
            parent, child = context.Pipe(duplex=True)
            process = context.Process(
                target=_rank_main, args=(dataclasses.replace(config, port=port), child),
                name=f"graphopt-rank-{config.rank}", daemon=True,
            )
            process.start()
            child.close()
            self._processes.append(process)
            self._conns.append(parent)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            if self._closed:
                raise DistributedError("this sharded model is closed (close() was called or a rank failed); compile it again")
            payload = {name: np.ascontiguousarray(value) for name, value in feeds.items()}
            try:
                for conn in self._conns:
                    try:
                        conn.send(("run", payload))
                    except (OSError, EOFError):
                        pass  # that rank is gone; _answers names it
                return self._answers()[0]
            except BaseException:
                self.close()  # interrupted mid-call (Ctrl-C): the ranks' answers would arrive out of step
                raise

    def _answers(self) -> list[Any]:
        """Every rank's answer to the last message, in rank order. When a rank died without
        answering (first, since the others' errors may only follow from it), raised, or a wait
        passed the timeout: stop every rank and raise."""
        from multiprocessing.connection import wait

        answers: list[Any] = [None] * self.tp
        pending = set(range(self.tp))
        while pending:
            waitables = [self._conns[r] for r in pending] + [self._processes[r].sentinel for r in pending]
            if not wait(waitables, timeout=self._timeout):
                self._fail(DistributedError(f"rank(s) {sorted(pending)} did not answer within {self._timeout:g} s; stopped every rank"))
            errors, dead = [], []
            for rank in sorted(pending):
                conn, process = self._conns[rank], self._processes[rank]
                if conn.poll():
                    try:
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        kind, payload = "closed", None
                    if kind == "error":
                        errors.append((rank, payload))
                        continue
                    if kind != "closed":
                        answers[rank] = payload
                        pending.discard(rank)
                        continue
                if not process.is_alive():
                    dead.append(rank)
            if dead:
                process = self._processes[dead[0]]
                process.join()
                self._fail(DistributedError(
                    f"rank {dead[0]} of {self.tp} exited (exit code {process.exitcode}) without answering; stopped every rank"
                ))
            if errors:
                self._fail(_rebuild_error(errors[0][0], self.tp, errors[0][1]))
        return answers

    def _fail(self, error: BaseException) -> None:
        self.close()
        raise error

    def _save_files(self, directory: str) -> list[str]:
        """Each rank saves its own artifact into `rank<R>/` (its shard's graph, loadable alone
        by a process of that rank: `load_compiled` or torchrun, see `torchrun_main`)."""
        with self._lock:
            if self._closed:
                raise DistributedError("this sharded model is closed; compile it again to save it")
            for rank, conn in enumerate(self._conns):
                conn.send(("save", os.path.join(directory, f"rank{rank}")))
            listed = self._answers()
        return [f"rank{rank}/{name}" for rank, names in enumerate(listed) for name in names]

    def _manifest_extra(self) -> dict[str, Any]:
        return {"world_size": self.tp, "backend": self._backend}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _shutdown(processes: list[Any], conns: list[Any], folder: str) -> None:
    """Ask each rank to exit, join it (terminate, then kill, what does not exit), close the
    pipes and delete the temporary graph."""
    for conn in conns:
        try:
            conn.send(("close", None))
        except (OSError, EOFError, ValueError):
            pass
    for process in processes:
        process.join(SHUTDOWN_WAIT_S)
        if process.is_alive():
            process.terminate()
            process.join(SHUTDOWN_WAIT_S)
        if process.is_alive():
            process.kill()
            process.join()
    for conn in conns:
        conn.close()
    shutil.rmtree(folder, ignore_errors=True)


def _rebuild_error(rank: int, tp: int, payload: dict[str, Any]) -> BaseException:
    """The exception a rank raised (its pickled self when it unpickles to the same message,
    else a DistributedError carrying its type and message), caused by its traceback."""
    error: Optional[BaseException] = None
    if payload.get("pickled") is not None:
        try:
            error = pickle.loads(payload["pickled"])
        except Exception:
            error = None
    if not isinstance(error, BaseException) or str(error) != payload["message"]:
        error = DistributedError(f"rank {rank} of {tp} raised {payload['type']}: {payload['message']}")
    elif hasattr(error, "add_note"):
        error.add_note(f"(raised on rank {rank} of {tp} by graphopt.distributed)")
    error.__cause__ = _RemoteTraceback(payload["traceback"])
    return error


# ----------------------------------------------------------------------------- ranks


def _rank_main(config: _RankConfig, conn: Any) -> None:
    """A rank's process: join the group, build the shard, answer the launcher until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle; it stops the ranks
    dist = None
    try:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(config.port)
        import torch
        import torch.distributed as dist

        torch.set_num_threads(config.threads)
        if config.backend == "nccl":
            torch.cuda.set_device(config.rank)
        dist.init_process_group(config.backend, rank=config.rank, world_size=config.tp, timeout=timedelta(seconds=config.timeout_s))
        compiled, info = _build_rank(config)
        conn.send(("ready", info))
        while True:
            try:
                kind, feeds = conn.recv()
            except (EOFError, OSError):
                break  # the launcher is gone
            if kind == "save":
                conn.send(("ok", _save_rank(compiled, feeds)))
                continue
            if kind != "run":
                break
            outputs = compiled(**feeds)
            conn.send(("ok", outputs if config.rank == 0 else None))
    except BaseException as exc:
        _send_error(conn, exc)
    finally:
        if dist is not None and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        conn.close()


def _save_rank(compiled: CompiledModel, directory: str) -> list[str]:
    """Save this rank's artifact into `directory`; the file names written, its manifest included."""
    compiled.save(directory)
    return sorted(name for name in os.listdir(directory))


def _build_rank(config: _RankConfig) -> tuple[CompiledModel, dict[str, Any]]:
    """This rank's compiled model (built, or loaded from its saved artifact), and what it reports about itself."""
    from graphopt.api import load_compiled, with_lowering
    from graphopt.frontends.onnx_import import from_onnx
    from graphopt.partition import compile_for_target
    from graphopt.pass_manager import PassManager
    from graphopt.target_registry import get_target

    if config.artifact is not None:
        compiled = load_compiled(config.artifact)
        graph = compiled.graph  # type: ignore[attr-defined]
    else:
        target = get_target(config.target)
        graph = from_onnx(config.graph_path)
        PassManager(with_lowering(config.passes, target)).run(graph, PassContext(seed=config.seed))
        compiled = compile_for_target(graph, target, partition=False)
    info = {
        "rank": config.rank,
        "pid": os.getpid(),
        "weight_bytes": weight_bytes(graph),
        "constant_bytes": int(sum(v.const.nbytes for v in graph.constants.values() if v.const is not None)),
        "peak_rss_bytes": peak_rss_bytes(),
        "shard": config.shard_stats,
    }
    return compiled, info


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM of /proc/self/status on Linux. (getrusage's
    ru_maxrss is not used there: a spawned process inherits the peak of the parent it was forked
    from, so every rank would report the launcher's peak.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def weight_bytes(graph: Graph) -> int:
    """Bytes of the float constants (weights, biases, norm scales) of `graph`: what a rank
    holds of the model's weights."""
    return int(sum(v.const.nbytes for v in graph.constants.values() if v.const is not None and v.dtype is not None and v.dtype.is_float))


def _send_error(conn: Any, exc: BaseException) -> None:
    try:
        pickled: Optional[bytes] = pickle.dumps(exc)
    except Exception:
        pickled = None
    payload = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(), "pickled": pickled}
    try:
        conn.send(("error", payload))
    except (OSError, EOFError, ValueError):
        pass


# ----------------------------------------------------------------------------- saved artifacts


def load_sharded(directory: str, manifest: dict[str, Any], *, threads: Optional[int] = None, timeout: float = 300.0) -> ShardedModel:
    """The sharded model `ShardedModel.save` wrote into `directory`: one process per saved rank,
    each loading its own artifact (`rank<R>/`), called from here like any CompiledModel."""
    from graphopt.target_registry import get_target

    tp = int(manifest["world_size"])
    for rank in range(tp):
        if not os.path.isfile(os.path.join(directory, f"rank{rank}", "manifest.json")):
            raise TargetError(f"{directory}: the artifact of rank {rank} of {tp} (rank{rank}/) is missing")
    chosen = get_target(manifest["spec"])
    cores = os.cpu_count() or 1
    configs = [
        _RankConfig(
            rank, tp, 0, "", [], str(chosen.spec), manifest.get("backend", "gloo"), threads or max(1, cores // tp),
            timeout, 0, artifact=os.path.join(directory, f"rank{rank}"),
        )
        for rank in range(tp)
    ]
    inputs = [IOSpec.from_json(d) for d in manifest["inputs"]]
    outputs = [IOSpec.from_json(d) for d in manifest["outputs"]]
    return ShardedModel(chosen, inputs, outputs, configs, tempfile.mkdtemp(prefix="graphopt-shard-"), timeout)


def torchrun_main(argv: Optional[Sequence[str]] = None) -> int:
    """One rank of a saved sharded model under torchrun (which sets RANK, WORLD_SIZE, MASTER_*):

        torchrun --standalone --nproc-per-node 2 -m graphopt.distributed DIR -i INPUTS.npz [-o OUTPUTS.npz]

    Each process joins the group, loads `DIR/rank<RANK>/` and runs the inputs; rank 0 prints
    the output shapes (and writes them with -o)."""
    import argparse
    import json

    import torch.distributed as dist

    from graphopt.api import load_compiled
    from graphopt.calibration import load_input_arrays

    parser = argparse.ArgumentParser(prog="python -m graphopt.distributed", description=torchrun_main.__doc__.splitlines()[0])
    parser.add_argument("artifact", metavar="DIR")
    parser.add_argument("-i", "--inputs", required=True)
    parser.add_argument("-o", "--output")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("python -m graphopt.distributed runs under torchrun (RANK and WORLD_SIZE are not set)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with open(os.path.join(args.artifact, "manifest.json")) as handle:
        manifest = json.load(handle)
    if int(manifest.get("world_size", 1)) != world:
        raise SystemExit(f"{args.artifact} was saved for {manifest.get('world_size', 1)} ranks; torchrun started {world}")
    dist.init_process_group(manifest.get("backend", "gloo"), rank=rank, world_size=world)
    try:
        compiled = load_compiled(os.path.join(args.artifact, f"rank{rank}"))
        outputs = compiled(**load_input_arrays(args.inputs, compiled.input_names))
        if rank == 0:
            for name, value in zip(compiled.output_names, outputs):
                print(f"{name}: {np.asarray(value).dtype} {list(np.shape(value))}")
            if args.output:
                from graphopt.cli_targets import save_outputs

                save_outputs(args.output, dict(zip(compiled.output_names, outputs)))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(torchrun_main())
