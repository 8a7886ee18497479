"""Fusion coverage over the model zoo: what `fuse` raises per architecture, exporter and
mask input, the max output error vs the unfused export (ONNX Runtime, zoo inputs) and the
wall-clock time of `fuse` itself.

    python benchmarks/fusion_coverage.py > docs/fusion_coverage.md
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import model_zoo  # noqa: E402

import graphopt  # noqa: E402
from graphopt.check import max_abs_error, run_graph  # noqa: E402


class _WithoutMask(torch.nn.Module):
    """The zoo model with its attention-mask input replaced by ones inside the graph."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        extra = {"attention_mask": torch.ones_like(input_ids), "token_type_ids": torch.zeros_like(input_ids)}
        return self.model(input_ids, *[extra[n] for n in self.names[1:]])


def _export(zm: model_zoo.ZooModel, masked: bool, dynamo: bool, folder: Path) -> tuple[Path, dict]:
    path = folder / f"{zm.name}-{masked}-{dynamo}.onnx"
    if masked:
        return model_zoo.export_onnx(zm, path, dynamo=dynamo), {k: v.numpy() for k, v in zm.inputs.items()}
    module = _WithoutMask(zm.model, list(zm.inputs)).eval()
    ids = zm.inputs["input_ids"]
    if dynamo:
        torch.onnx.export(module, (ids,), str(path), dynamo=True, input_names=["input_ids"], dynamic_shapes=({0: "batch", 1: "seq"},), verbose=False)
    else:
        torch.onnx.export(module, (ids,), str(path), dynamo=False, input_names=["input_ids"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}}, opset_version=17)
    return path, {"input_ids": ids.numpy()}


def _norm_counts(graph: graphopt.Graph) -> list[int]:
    """Attention, GELU, RMSNorm (incl. RMS skip-norms), LayerNorm (incl. skip-norms), skip-norms, bias-GELU."""
    counts = graph.op_counts()
    skips = [n for n in graph.nodes if n.op_type == "SkipLayerNorm"]
    rms_skips = sum(1 for n in skips if n.attrs.get("simplified"))
    return [
        counts.get("graphopt::Attention", 0), counts.get("graphopt::Gelu", 0), counts.get("graphopt::RMSNorm", 0) + rms_skips,
        counts.get("LayerNormalization", 0) + len(skips) - rms_skips, len(skips),
        sum(1 for n in graph.nodes if n.op_type == "Gelu" and len(n.inputs) > 1),
    ]


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print("| architecture | exporter | mask input | attention | GELU | RMSNorm | LayerNorm | of which skip-norms | bias-GELU | nodes before -> after | max abs error | fuse time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in model_zoo.ARCHITECTURES:
            zm = model_zoo.build(name)
            variants = [True, False] if "input_ids" in zm.inputs and "attention_mask" in zm.inputs else [True]
            for masked in variants:
                for dynamo in (False, True):
                    try:
                        path, feeds = _export(zm, masked, dynamo, Path(tmp))
                        graph = graphopt.from_onnx(path)
                        copy = graph.clone()
                        start = time.perf_counter()
                        fused = graphopt.optimize(copy, "fuse")
                        seconds = time.perf_counter() - start
                        fused.verify()
                        error = max_abs_error(run_graph(graph, feeds), run_graph(fused, feeds))
                        cells = [str(c) for c in _norm_counts(fused)] + [
                            f"{len(graph)} -> {len(fused)}", f"{error:.1e}", f"{seconds * 1000:.0f} ms",
                        ]
                    except Exception as exc:
                        cells = ["-"] * 8 + [f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"]
                    exporter = "dynamo" if dynamo else "TorchScript"
                    print(f"| {name} | {exporter} | {'yes' if masked else 'no'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
