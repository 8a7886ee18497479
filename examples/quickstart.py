"""graphopt quick start: one real Transformer through both frontends and both exporters.

Builds a small BERT (Hugging Face `transformers`, random weights, no download), then:
1. exports it to ONNX with torch.onnx and imports it into graphopt's IR;
2. prints the IR's op histogram and a few lines of its text form;
3. writes the IR back to ONNX and checks ONNX Runtime gives the same outputs;
4. turns the same IR into a torch.fx GraphModule and checks it too;
5. captures the model with torch.export and goes FX -> IR -> FX.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import pathlib
import tempfile
import warnings

import numpy as np
import onnxruntime as ort
import torch
import transformers

import graphopt


def build_model() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = transformers.BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    inputs = {
        "input_ids": torch.randint(0, 1000, (2, 16)),
        "attention_mask": torch.ones(2, 16, dtype=torch.int64),
    }
    return model, inputs


class LastHiddenState(torch.nn.Module):
    """Returns a plain tensor so exporters see a simple signature."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def main() -> None:
    warnings.filterwarnings("ignore")
    bert, inputs = build_model()
    model = LastHiddenState(bert).eval()
    with torch.no_grad():
        eager = model(**inputs).numpy()
    feeds = {name: tensor.numpy() for name, tensor in inputs.items()}
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="graphopt-quickstart-"))

    onnx_path = workdir / "bert.onnx"
    torch.onnx.export(
        model, (inputs["input_ids"], inputs["attention_mask"]), str(onnx_path), dynamo=False,
        input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
        opset_version=17,
    )
    model.eval()

    graph = graphopt.from_onnx(onnx_path)
    graph.verify()
    print(f"1. imported {onnx_path.name}: {len(graph)} nodes, inputs "
          + ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs))
    top = sorted(graph.op_counts().items(), key=lambda item: -item[1])[:6]
    print("2. most used ops: " + ", ".join(f"{op} x{count}" for op, count in top))
    print("   first lines of the IR:")
    node_lines = [line for line in str(graph).splitlines() if "= const" not in line and "(%" in line]
    for line in node_lines[:5]:
        print("   " + line)

    out_path = workdir / "bert.roundtrip.onnx"
    graph.save_onnx(out_path)
    rerun = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    print(f"3. ONNX -> IR -> ONNX: max |diff| vs eager = {np.abs(rerun - eager).max():.2e}")

    fx_module = graph.to_fx()
    fx_out = fx_module(inputs["input_ids"], inputs["attention_mask"])[0].numpy()
    print(f"4. ONNX -> IR -> torch.fx: max |diff| vs eager = {np.abs(fx_out - eager).max():.2e}")

    program = torch.export.export(model, (inputs["input_ids"], inputs["attention_mask"]))
    fx_graph = graphopt.from_fx(program)
    fx_again = fx_graph.to_fx()(inputs["input_ids"], inputs["attention_mask"])[0].detach().numpy()
    print(f"5. torch.export -> IR -> torch.fx ({len(fx_graph)} nodes): max |diff| vs eager = {np.abs(fx_again - eager).max():.2e}")
    print(f"files written to {workdir}")


if __name__ == "__main__":
    main()
