"""Small graphs and helpers for the quantization tests (quantize, smooth-quant, to-fp16, calibration)."""

from __future__ import annotations

import collections
import os
import tempfile

import numpy as np

from graphopt import DType, Graph, TensorType

INT8_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger", "QGemm", "MatMulNBits")


def block_graph(seed: int = 0, outlier: float = 0.0) -> Graph:
    """x [batch, 4, 16] -> LayerNorm -> two projections (q_proj, k_proj: [16, 24]);
    q -> Relu -> o_proj [24, 16] -> + x = y; outputs (y, k).

    The norm output is read by both projections (one activation, two consumer branches) and
    by nothing else, so smooth-quant can absorb into the norm. `outlier` scales input
    channel 3 of the norm to make an activation outlier.
    """
    rng = np.random.default_rng(seed)
    graph = Graph("block", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4, 16)))
    gamma = np.ones(16, np.float32) + 0.1 * rng.standard_normal(16).astype(np.float32)
    if outlier:
        gamma[3] = outlier
    norm = graph.add_node(
        "LayerNormalization",
        [x, graph.add_constant("ln_scale", gamma), graph.add_constant("ln_bias", 0.1 * rng.standard_normal(16).astype(np.float32))],
        {"axis": -1, "epsilon": 1e-5}, name="ln",
    ).output
    wq = graph.add_constant("wq", (rng.standard_normal((16, 24)) / 4).astype(np.float32))
    wk = graph.add_constant("wk", (rng.standard_normal((16, 24)) / 4).astype(np.float32))
    wo = graph.add_constant("wo", (rng.standard_normal((24, 16)) / 5).astype(np.float32))
    q = graph.add_node("MatMul", [norm, wq], name="q_proj").output
    k = graph.add_node("MatMul", [norm, wk], name="k_proj", output_names=["k"]).output
    hidden = graph.add_node("Relu", [q]).output
    out = graph.add_node("MatMul", [hidden, wo], name="o_proj").output
    y = graph.add_node("Add", [out, x], output_names=["y"]).output
    graph.set_outputs([y, k])
    return graph


def gemm_graph() -> Graph:
    """y = Gemm(x [batch, 16], w [8, 16], b [8], transB=1): a transposed weight and a bias vector."""
    rng = np.random.default_rng(0)
    graph = Graph("gemm", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 16)))
    w = graph.add_constant("w", rng.standard_normal((8, 16)).astype(np.float32))
    b = graph.add_constant("b", rng.standard_normal(8).astype(np.float32))
    graph.set_outputs([graph.add_node("Gemm", [x, w, b], {"transB": 1}, output_names=["y"]).output])
    return graph


def residual_graph(seed: int = 0) -> Graph:
    """x -> LayerNorm -> h; h read by a MatMul [16, 16] *and* a residual Add (so a norm
    cannot absorb smoothing factors); output y = h + h @ W."""
    rng = np.random.default_rng(seed)
    graph = Graph("residual", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4, 16)))
    gamma = np.ones(16, np.float32)
    gamma[5] = 20.0
    h = graph.add_node(
        "LayerNormalization",
        [x, graph.add_constant("ln_scale", gamma), graph.add_constant("ln_bias", np.zeros(16, np.float32))],
        {"axis": -1}, name="ln",
    ).output
    w = graph.add_constant("w", (rng.standard_normal((16, 16)) / 4).astype(np.float32))
    proj = graph.add_node("MatMul", [h, w], name="proj").output
    graph.set_outputs([graph.add_node("Add", [h, proj], output_names=["y"]).output])
    return graph


def mlp_graph() -> Graph:
    """x @ W1 + b1 -> Gelu -> @ W2 + b2: after quantize the Gelu output is requantized for W2 only."""
    rng = np.random.default_rng(0)
    graph = Graph("mlp", opset_imports={"": 17, "graphopt": 1})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4, 16)))
    w1 = graph.add_constant("w1", (rng.standard_normal((16, 32)) / 4).astype(np.float32))
    b1 = graph.add_constant("b1", rng.standard_normal(32).astype(np.float32))
    w2 = graph.add_constant("w2", (rng.standard_normal((32, 8)) / 4).astype(np.float32))
    b2 = graph.add_constant("b2", rng.standard_normal(8).astype(np.float32))
    h = graph.add_node("Add", [graph.add_node("MatMul", [x, w1]).output, b1]).output
    act = graph.add_node("Gelu", [h], domain="graphopt").output
    y = graph.add_node("Add", [graph.add_node("MatMul", [act, w2]).output, b2], output_names=["y"]).output
    graph.set_outputs([y])
    return graph


def calibration(graph: Graph, count: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    value = graph.inputs[0]
    shape = [2 if isinstance(d, str) else d for d in value.shape]
    return [{value.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def ort_kernel_counts(graph: Graph) -> dict[str, int]:
    """Op counts of the model ONNX Runtime actually runs (its session-optimized graph)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = path
        ort.InferenceSession(graph.to_onnx().SerializeToString(), options, providers=["CPUExecutionProvider"])
        return dict(collections.Counter(node.op_type for node in onnx.load(path).graph.node))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
