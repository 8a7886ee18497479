"""`fuse` on the zoo: attention, GELU and RMSNorm raised in every layer, outputs unchanged,
dynamic axes kept, and the saved model runs in ONNX Runtime."""

import model_zoo
import onnx
import onnxruntime as ort
import pytest
from conftest import ROUNDTRIP_ARCHITECTURES, max_abs_diff, numpy_inputs
from fusion_expectations import GELU_LAYERS, LAYERS, RMSNORMS, SKIP_LAYERNORM_DYNAMO_MISSES, SKIP_LAYERNORMS

import graphopt


def _ort(model, feeds):
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_fuse_raises_every_layer_and_keeps_outputs(name, dynamo, zoo, zoo_onnx, tmp_path):
    path = zoo_onnx(name, dynamo=dynamo)
    fused = graphopt.optimize(str(path), "fuse", verify=True)
    counts = fused.op_counts()
    assert counts.get("graphopt::Attention", 0) == LAYERS
    assert counts.get("graphopt::Gelu", 0) == GELU_LAYERS.get(name, 0)
    skip_norms = SKIP_LAYERNORMS[name] - (SKIP_LAYERNORM_DYNAMO_MISSES.get(name, 0) if dynamo else 0)
    assert counts.get("graphopt::SkipLayerNorm", 0) == skip_norms
    assert counts.get("graphopt::RMSNorm", 0) == RMSNORMS.get(name, 0) - sum(
        1 for n in fused.nodes if n.op_type == "SkipLayerNorm" and n.attrs.get("simplified")
    )
    assert len(fused) < len(graphopt.from_onnx(path))
    out = tmp_path / "fused.onnx"
    fused.save_onnx(out)
    onnx.checker.check_model(str(out), full_check=True)
    for feeds in (numpy_inputs(zoo(name)), numpy_inputs(model_zoo.build(name, batch=3, seq=5))):
        assert max_abs_diff(_ort(path, feeds), _ort(out, feeds)) <= 1e-4


def test_fuse_is_a_pipeline_whose_nested_passes_are_checked_and_reported(zoo_onnx):
    fused = graphopt.optimize(str(zoo_onnx("bert")), "fuse", check=True, verify=True)
    (record,) = fused.report.records
    fusions = [
        "fuse-layernorm", "fuse-gelu", "fuse-rmsnorm", "fuse-rotary", "fuse-attention", "fuse-bias-gelu",
        "fuse-skip-layernorm", "fuse-qkv", "fuse-matmul-add",
    ]
    assert [child.path for child in record.children] == ["fuse/cleanup", "fuse/canonicalize", *(f"fuse/{f}" for f in fusions), "fuse/cleanup"]
    assert record.children[0].children[0].path == "fuse/cleanup/fold-constants"
    assert list(record.stats) == fusions and record.stats["fuse-attention"] == LAYERS
    assert record.stats["fuse-attention"] == record.children[6].stats["fused"]
    assert all(r.max_error is not None and r.max_error <= 1e-4 for r in fused.report.walk())
    assert "attention-fused" in graphopt.get_pass("fuse")().provides
