"""The same fusions fire on the ONNX export and on the FX capture of one model.

The zoo's Hugging Face models start with zero biases, which cleanup removes; here the biases
are made nonzero (on a fresh copy of the model) so that fuse-bias-gelu and the bias input
of fuse-skip-layernorm have something to fold.
"""

import model_zoo
import pytest
import torch

import graphopt
from graphopt.check import max_abs_error, run_graph

EXPECTED = {
    "bert": {"graphopt::Attention": 2, "graphopt::Gelu": 2, "graphopt::SkipLayerNorm": 4, "LayerNormalization": 1, "bias-gelu": 2, "skip-bias": 4},
    "llama": {"graphopt::Attention": 2, "graphopt::SkipLayerNorm": 4, "graphopt::RMSNorm": 1, "bias-gelu": 0, "skip-bias": 0},
}
"""Op counts after `fuse` (zero counts left out), Gelus with a folded bias, SkipLayerNorms with
a folded bias. LLaMA has no biases in its projections and SiLU gating, so nothing to fold."""


def _with_biases(name: str) -> model_zoo.ZooModel:
    zm = model_zoo.build(name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, parameter in zm.model.named_parameters():
            if key.endswith("bias"):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return zm


def _summary(graph) -> dict:
    counts = graph.op_counts()
    found = {k: counts[k] for k in EXPECTED_KEYS if counts.get(k)}
    found["bias-gelu"] = sum(1 for n in graph.nodes if n.op_type == "Gelu" and len(n.inputs) > 1)
    found["skip-bias"] = sum(1 for n in graph.nodes if n.op_type == "SkipLayerNorm" and len(n.inputs) > 4 and n.inputs[4] is not None)
    return found


EXPECTED_KEYS = ("graphopt::Attention", "graphopt::Gelu", "graphopt::SkipLayerNorm", "graphopt::RMSNorm", "LayerNormalization")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_onnx_export_and_fx_capture_fuse_alike(name, tmp_path):
    zm = _with_biases(name)
    feeds = {k: v.numpy() for k, v in zm.inputs.items()}
    with torch.no_grad():
        reference = [t.numpy() for t in zm.model(**zm.inputs)]
    from_onnx = graphopt.optimize(str(model_zoo.export_onnx(zm, tmp_path / f"{name}.onnx")), "fuse", verify=True)
    program = torch.export.export(zm.model, tuple(zm.inputs.values()))
    from_fx = graphopt.optimize(graphopt.from_fx(program), "fuse", verify=True)
    for graph in (from_onnx, from_fx):
        assert _summary(graph) == EXPECTED[name]
        names = {v.name for v in graph.inputs}
        outputs = run_graph(graph, {k: v for k, v in feeds.items() if k in names})
        assert max_abs_error(reference, outputs[: len(reference)]) <= 1e-4
