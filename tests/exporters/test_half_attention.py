"""The torch target's half-precision CPU attention (two batched GEMMs around a softmax instead
of SDPA's flash kernel) and the process heap setting that keeps freed tensor memory.

Bound: against SDPA on the same bfloat16/float16 inputs (unit-normal q, k, v, a seeded bias),
|a - b| <= tol * (1 + |b|) with tol = 2^-4 for bfloat16 and 2^-7 for float16. Both accumulate
in float32; the GEMM path rounds the scores to the half type once, which moves a score of
magnitude 8-16 by up to half a unit in the last place (bf16 2^-4, fp16 2^-7) and the output by
about that times |v|. A wrong scale, mask or layout is off by O(1).
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt import DType, Graph, TensorType, cpu_heap
from graphopt.exporters import graphopt_kernels
from graphopt.exporters.graphopt_kernels import graphopt_Attention

TOLERANCE = {torch.bfloat16: 2.0**-4, torch.float16: 2.0**-7}


def _qkv(dtype: torch.dtype, batch: int = 2, heads: int = 4, seq: int = 16, size: int = 32):
    generator = torch.Generator().manual_seed(0)
    # [B, S, H, D] transposed to [B, H, S, D], as the graphs hand them over (not contiguous)
    return [torch.randn(batch, seq, heads, size, generator=generator).to(dtype).transpose(1, 2) for _ in range(3)]


def _padding(dtype: torch.dtype, batch: int, seq: int, rows: int = 1) -> torch.Tensor:
    mask = torch.zeros(batch, 1, rows, seq, dtype=dtype)
    mask[0, ..., seq // 2:] = torch.finfo(dtype).min
    return mask


def _sdpa(q, k, v, mask=None, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["none", "padding [B,1,1,S]", "full [B,1,S,S]", "shared [S,S]"])
def test_half_attention_on_cpu_equals_sdpa(dtype, mask_kind, monkeypatch):
    q, k, v = _qkv(dtype)
    mask = {
        "none": None,
        "padding [B,1,1,S]": _padding(dtype, 2, 16),
        "full [B,1,S,S]": _padding(dtype, 2, 16, rows=16),
        "shared [S,S]": torch.randn(16, 16, generator=torch.Generator().manual_seed(1)).to(dtype),
    }[mask_kind]
    calls = []
    original = graphopt_kernels._half_attention_by_matmuls
    monkeypatch.setattr(graphopt_kernels, "_half_attention_by_matmuls", lambda *a: calls.append(1) or original(*a))
    (out,) = graphopt_Attention(q, k, v, mask, num_heads=4, scale=0.3)
    assert calls, "the GEMM path was not taken"
    assert out.dtype == dtype and out.shape == (2, 4, 16, 32)
    torch.testing.assert_close(out.float(), _sdpa(q, k, v, mask, 0.3).float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_fully_masked_rows_answer_zero_as_sdpa_does():
    q, k, v = _qkv(torch.bfloat16)
    mask = torch.zeros(2, 1, 1, 16, dtype=torch.bfloat16)
    mask[1] = float("-inf")  # every key of batch 1 blocked
    (out,) = graphopt_Attention(q, k, v, mask, num_heads=4)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out.float(), _sdpa(q, k, v, mask).float(), atol=TOLERANCE[torch.bfloat16], rtol=TOLERANCE[torch.bfloat16])
    mask[1] = 0  # the same mask object, edited in place: the cached answer must not be reused
    (out,) = graphopt_Attention(q, k, v, mask, num_heads=4)
    assert out[1].abs().sum() > 0
    torch.testing.assert_close(out.float(), _sdpa(q, k, v, mask).float(), atol=TOLERANCE[torch.bfloat16], rtol=TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_nan_to_zero_zeroes_only_blocked_rows_and_rechecks_an_edited_mask(kind):
    q, k, v = _qkv(torch.float32)
    allowed = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    mask = allowed.clone() if kind == "bool" else torch.zeros(2, 1, 16, 16)
    plain = _sdpa(q, k, v, mask)
    for _ in range(2):  # the second call reads the kept answer: no row blocked, nothing zeroed
        (out,) = graphopt_Attention(q, k, v, mask, num_heads=4, nan_to_zero=1)
        assert torch.equal(out, plain)
    blocked = (slice(1, 2), slice(None), slice(3, 5))  # rows 3-4 of batch 1 see no key
    if kind == "bool":
        mask[blocked] = False
    else:
        mask[blocked] = float("-inf")
    (out,) = graphopt_Attention(q, k, v, mask, num_heads=4, nan_to_zero=1)
    assert torch.equal(out[1, :, 3:5], torch.zeros_like(out[1, :, 3:5]))
    expected = _sdpa(q, k, v, mask)
    keep = torch.ones(2, 1, 16, 1, dtype=torch.bool)
    keep[1, :, 3:5] = False
    assert torch.equal(torch.where(keep, out, 0.0), torch.where(keep, expected, 0.0))


def test_a_mask_with_equal_query_rows_runs_as_one_row_with_the_same_output(monkeypatch):
    q, k, v = _qkv(torch.float32)
    mask = _padding(torch.float32, 2, 16, rows=16)  # [B, 1, Q, K], every query row the same
    expected = _sdpa(q, k, v, mask)
    shapes = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, attn_mask=None, **kw: shapes.append(tuple(attn_mask.shape)) or sdpa(*a, attn_mask=attn_mask, **kw))
    for _ in range(2):  # the second call reads the kept answer
        (out,) = graphopt_Attention(q, k, v, mask, num_heads=4)
        assert torch.equal(out, expected)
    mask[1, 0, 3, 0] = torch.finfo(torch.float32).min  # edited in place: row 3 differs now
    (out,) = graphopt_Attention(q, k, v, mask, num_heads=4)
    assert shapes == [(2, 1, 1, 16), (2, 1, 1, 16), (2, 1, 16, 16)]
    assert torch.equal(out, sdpa(q, k, v, attn_mask=mask))


def test_inference_mode_tensors_work_without_the_cache():
    q, k, v = _qkv(torch.bfloat16)
    with torch.inference_mode():
        mask = _padding(torch.bfloat16, 2, 16)
        (out,) = graphopt_Attention(q, k, v, mask, num_heads=4)
    torch.testing.assert_close(out.float(), _sdpa(q, k, v, mask).float(), atol=TOLERANCE[torch.bfloat16], rtol=TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("case", ["float32", "grouped-query", "boolean mask", "kv cache"])
def test_other_attention_keeps_sdpa(case, monkeypatch):
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    q, k, v = _qkv(dtype)
    kwargs: dict = {"num_heads": 4}
    mask = None
    if case == "grouped-query":
        k, v = k[:, :2], v[:, :2]
        kwargs["num_kv_heads"] = 2
    if case == "boolean mask":
        mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    args = [q, k, v, mask]
    if case == "kv cache":
        args += [k[:, :, :3], v[:, :, :3]]
    monkeypatch.setattr(graphopt_kernels, "_half_attention_by_matmuls", lambda *a: pytest.fail("GEMM path taken"))
    graphopt_Attention(*args, **kwargs)


def test_keep_freed_memory_takes_effect_once_on_glibc(monkeypatch):
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        assert cpu_heap.keep_freed_memory() is False
        return
    assert cpu_heap.keep_freed_memory() is True
    monkeypatch.setattr(cpu_heap, "_tune", lambda: pytest.fail("tuned twice"))
    assert cpu_heap.keep_freed_memory() is True


@pytest.mark.parametrize("spec, expected", [("torch", 1), ("torch{keep_heap=false}", 0)])
def test_the_torch_target_keeps_the_heap_unless_told_not_to(spec, expected, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_heap, "keep_freed_memory", lambda: calls.append(1) or True)
    graph = Graph("relu", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, (2, 3)))
    graph.set_outputs([graph.add_node("Relu", [x], output_names=["y"]).output])
    compiled = graphopt.compile(graph, target=spec, pipeline="eliminate-dead-code")
    np.testing.assert_array_equal(compiled(x=-np.ones((2, 3), np.float32))[0], np.zeros((2, 3), np.float32))
    assert len(calls) == expected


def test_the_mask_shortcuts_stay_off_under_a_tracer():
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = _qkv(torch.float32)
    mask = _padding(torch.float32, 2, 16, rows=16)

    def attend(q, k, v, mask):
        return graphopt_Attention(q, k, v, mask, num_heads=4, nan_to_zero=1)[0]

    traced = make_fx(attend)(q, k, v, mask)  # no value is read while tracing (the autograd backend's AOT path)
    assert "_local_scalar_dense" not in traced.code and "where" in traced.code
    assert torch.equal(traced(q, k, v, mask), attend(q, k, v, mask))


def _right_padded(dtype: torch.dtype, lengths: list[int], seq: int, rows: int = 1) -> torch.Tensor:
    """A [B, 1, rows, seq] padding mask: batch item b attends to its first lengths[b] keys."""
    if dtype == torch.bool:
        return torch.arange(seq).expand(len(lengths), 1, rows, seq) < torch.tensor(lengths).view(-1, 1, 1, 1)
    mask = torch.zeros(len(lengths), 1, rows, seq, dtype=dtype)
    for b, length in enumerate(lengths):
        mask[b, ..., length:] = torch.finfo(dtype).min if dtype != torch.float64 else float("-inf")
    return mask


def _key_counts(monkeypatch) -> list[int]:
    counts: list[int] = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, *a, **kw: counts.append(k.shape[-2]) or sdpa(q, k, *a, **kw))
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
@pytest.mark.parametrize("rows", [1, 40])
def test_a_padding_tail_is_left_out_of_attention_with_the_same_output(dtype, rows, monkeypatch):
    q, k, v = (x.double() if dtype == torch.float64 else x for x in _qkv(torch.float32, seq=40))
    mask = _right_padded(dtype, [5, 9], 40, rows)
    expected = _sdpa(q, k, v, mask)
    counts = _key_counts(monkeypatch)
    for _ in range(2):  # the second call reads the kept answer
        (out,) = graphopt_Attention(q, k, v, mask, num_heads=4)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert counts == [16, 16]  # 9 attended keys, rounded up to a multiple of 16 (blocked keys fill the rest)
    if dtype == torch.bool:
        mask[1, ..., 30] = True  # edited in place: key 30 is attended now
    else:
        mask[1, ..., 30] = 0.0
    (out,) = graphopt_Attention(q, k, v, mask, num_heads=4)
    assert counts[-1] == 32
    torch.testing.assert_close(out, _sdpa(q, k, v, mask), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ["a row blocks every key", "no padding tail", "padding at the front", "causal", "kv cache", "broadcast keys"])
def test_attention_keeps_every_key_where_leaving_some_out_could_change_the_output(case, monkeypatch):
    q, k, v = _qkv(torch.float32, seq=40)
    mask = _right_padded(torch.float32, [5, 9], 40)
    kwargs: dict = {"num_heads": 4}
    past: list = []
    if case == "a row blocks every key":  # Hugging Face's finfo.min mask averages every value there
        mask[0] = torch.finfo(torch.float32).min
    elif case == "no padding tail":
        mask = _right_padded(torch.float32, [5, 40], 40)
    elif case == "padding at the front":
        mask = mask.flip(-1)
    elif case == "causal":
        kwargs["causal"] = 1
    elif case == "kv cache":
        past = [k[:, :, :3], v[:, :, :3]]
        mask = _right_padded(torch.float32, [5, 9], 43)
    elif case == "broadcast keys":
        mask = mask[..., :1].clone()  # [B, 1, 1, 1]: one bias for every key
    counts = _key_counts(monkeypatch)
    outputs = graphopt_Attention(q, k, v, mask, *past, **kwargs)
    assert counts == [43 if case == "kv cache" else 40]
    assert torch.isfinite(outputs[0]).all()


def test_a_right_padded_batch_on_the_torch_target_attends_to_fewer_keys_with_the_same_output(monkeypatch, tmp_path):
    import model_zoo
    from graphopt.check import run_graph

    zm = model_zoo.build("bert")
    graph = graphopt.from_onnx(model_zoo.export_onnx(zm, tmp_path / "bert.onnx"))
    generator = np.random.default_rng(0)
    feeds = {value.name: np.zeros((2, 40), np.int64) for value in graph.inputs}
    feeds["input_ids"] = generator.integers(1, 100, (2, 40))
    feeds["attention_mask"][0, :5] = 1
    feeds["attention_mask"][1, :9] = 1
    compiled = graphopt.compile(graph.clone(), target="torch", pipeline="fuse")
    counts = _key_counts(monkeypatch)
    got = compiled(**feeds)
    assert counts and set(counts) == {16}, counts  # every layer: 9 attended keys, rounded up to 16
    np.testing.assert_allclose(got[0], run_graph(graph, feeds)[0], atol=1e-5, rtol=1e-5)
