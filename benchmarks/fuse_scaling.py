"""How the time of `fuse` grows with graph size: a BERT encoder (hidden 64, 4 heads, random
weights) exported by the TorchScript exporter with more and more layers, fused once each.

    python benchmarks/fuse_scaling.py [--layers 2,12,48] [--repeat 3]

Prints one row per size: nodes before -> after, attention raised, and the best of
`--repeat` wall-clock times of `graphopt.optimize(graph, "fuse")` on fresh copies.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

import graphopt


class _Encoder(torch.nn.Module):
    """BERT with a plain (input_ids, attention_mask) -> last hidden state signature."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_bert(layers: int, folder: Path) -> Path:
    """A random-weight BERT with `layers` layers, exported with a dynamic batch/seq."""
    config = transformers.BertConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=layers,
        vocab_size=128, max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = _Encoder(transformers.BertModel(config)).eval()
    ids = torch.randint(4, 128, (1, 16))
    mask = torch.ones_like(ids)
    path = folder / f"bert-{layers}.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model, (ids, mask), str(path), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
        )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,12,48", help="comma-separated layer counts")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print("| layers | nodes before -> after | attention | fuse time (best of %d) |" % args.repeat)
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (int(x) for x in args.layers.split(",")):
            graph = graphopt.from_onnx(export_bert(layers, Path(tmp)))
            best, fused = float("inf"), None
            for _ in range(args.repeat):
                copy = graph.clone()
                start = time.perf_counter()
                fused = graphopt.optimize(copy, "fuse")
                best = min(best, time.perf_counter() - start)
            attention = fused.op_counts().get("graphopt::Attention", 0)
            print(f"| {layers} | {len(graph)} -> {len(fused)} | {attention} | {best:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
