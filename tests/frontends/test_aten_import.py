"""from_fx's op-by-op translation (ATen graphs, and dynamo's own graphs): each rule against
eager torch, dynamic sizes, weights shared rather than copied, the fallbacks, and the zoo
fusing alike on every path."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphopt
import model_zoo
from conftest import ROUNDTRIP_ARCHITECTURES, max_abs_diff
from graphopt.frontends import aten_import, fx_import
from graphopt.frontends.aten_import import UntranslatableError, import_program


class Fn(torch.nn.Module):
    def __init__(self, fn, **weights):
        super().__init__()
        self.fn = fn
        for name, value in weights.items():
            self.register_parameter(name, torch.nn.Parameter(value))

    def forward(self, *args):
        return self.fn(self, *args)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _roundtrip(module, args, dynamic_shapes=None, tolerance=1e-5):
    """Export, translate (asserting the ATen path was taken), run the torch.fx lowering."""
    module.eval()
    program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    graph = graphopt.from_fx(program)
    assert graph.metadata["fx_importer"] == "aten"
    graph.verify()
    with torch.no_grad():
        expected = module(*args)
        actual = graph.to_fx()(*args)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    assert [e.dtype for e in expected] == [a.dtype for a in actual]
    assert max_abs_diff(expected, actual) <= tolerance
    return graph


X = _rand(2, 3, 8)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])

CASES = {
    "promotion": (lambda m, x, i: (x + i.unsqueeze(-1), i * 2, i / 2, x.pow(2) - 1, 2 ** i, torch.rsub(x, 1.5)), (X, MASK)),
    "compare-logic": (lambda m, x, i: ((x > 0) & (i != 0).unsqueeze(-1), (x <= 0.5) | (x > 1), ~(x == x)), (X, MASK)),
    "unary": (lambda m, x: (x.abs().sqrt(), torch.rsqrt(x.abs() + 1), x.exp(), x.sigmoid(), x.relu(), x.sign(),
                            x.ceil(), x.floor(), x.round(), x.tanh(), x.sin() + x.cos(), -x, torch.erf(x)), (X,)),
    "activations": (lambda m, x: (F.gelu(x), F.gelu(x, approximate="tanh"), F.silu(x)), (X,)),
    "where-fill-clamp": (lambda m, x, i: (torch.where(x > 0, x, 0.0), x.masked_fill(i.bool().unsqueeze(-1), -1e9),
                                          x.clamp(-0.5, 0.5), x.clamp(min=0.1), torch.maximum(x, x.flip(0))), (X, MASK)),
    "reductions": (lambda m, x: (x.mean(-1, keepdim=True), x.sum((0, 2)), x.amax(1), x.mean(), x.softmax(-1),
                                 x.log_softmax(1), x.cumsum(1)), (X,)),
    "layout": (lambda m, x: (x.view(2, 24), x.reshape(-1, 4), x.transpose(1, 2).contiguous(), x.permute(2, 0, 1),
                             x.unsqueeze(1), x[:, :1].squeeze(1), x.flatten(1), x.expand(4, 2, 3, 8)[1:3],
                             x.repeat(2, 1, 1), x[..., 2:6:2], x[:, -1], x.split(3, dim=-1)[2], torch.stack([x, x], 1),
                             torch.cat([x, x * 2], -1), x.unbind(1)[1], x.t() if x.dim() == 2 else x.mT), (X,)),
    "indexing": (lambda m, x, i: (x[torch.arange(2)[:, None], i], x.gather(2, i.unsqueeze(-1).expand(2, 3, 2)),
                                  torch.index_select(x, 1, i[0]), F.embedding(i, m.table)), (X, MASK)),
    "creation": (lambda m, x: (torch.arange(x.shape[1]) * 2, torch.zeros(3, 2), torch.ones_like(x), torch.full((2, 2), 7),
                               x.new_ones(2), torch.tril(torch.ones(4, 4)), torch.triu(x[0], 1), F.pad(x, (1, 2))), (X,)),
    "linear-algebra": (lambda m, x: (F.linear(x, m.w, m.b), x @ m.w.T, torch.addmm(m.b, x[0], m.w.T, beta=0.5, alpha=2),
                                     torch.baddbmm(x[:, :, :3], x, x.transpose(1, 2)[..., :3]), torch.bmm(x, x.mT)),
                       (X,)),
    "norms": (lambda m, x: (F.layer_norm(x, (8,), m.b, m.b), F.layer_norm(x, (3, 8)), F.dropout(x, 0.5, training=False)), (X,)),
    "convolutions": (lambda m, x: (F.conv1d(x, m.k1, padding=1), F.conv2d(x.unsqueeze(1), m.k2, stride=(1, 2), dilation=(1, 2))),
                     (X,)),
}
WEIGHTS = {"table": _rand(4, 5), "w": _rand(6, 8, seed=1), "b": _rand(6, seed=2)}


def _weights(name):
    if name == "norms":
        return {"b": _rand(8, seed=3)}
    if name == "convolutions":
        return {"k1": _rand(5, 3, 3, seed=4), "k2": _rand(2, 1, 2, 3, seed=5)}
    return WEIGHTS


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_eager(name):
    fn, args = CASES[name]
    _roundtrip(Fn(fn, **_weights(name)), args)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dynamo_graph_translates_without_a_trace(name):
    fn, args = CASES[name]
    module = Fn(fn, **_weights(name)).eval()
    inputs = {f"args_{i}": a for i, a in enumerate(args)}
    gm, example_inputs = _dynamo_graph(module, inputs)
    graph = fx_import.from_fx(gm, example_inputs)
    assert graph.metadata["fx_importer"] == "dynamo"
    graph.verify()
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(gm(*example_inputs))
        actual = graph.to_fx()(*[a for a, kind in zip(example_inputs, graph.metadata["fx_input_kinds"]) if kind == "input"])
    assert [e.dtype for e in expected] == [a.dtype for a in actual]
    assert max_abs_diff(expected, actual) <= 1e-5


def test_in_place_add_on_a_fresh_tensor_is_translated():
    def fn(m, x):
        y = x * 2
        y.add_(1)
        return y

    _roundtrip(Fn(fn), (X,))


@pytest.mark.parametrize("mask", ["bool", "float", "causal", "none"])
def test_scaled_dot_product_attention_becomes_graphopt_attention(mask):
    q, k, v = _rand(2, 4, 5, 8), _rand(2, 2, 5, 8, seed=1), _rand(2, 2, 5, 8, seed=2)
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    allowed[1, :, 2] = False  # one query row sees no key at all: torch gives zeros there
    masks = {"bool": allowed, "float": torch.where(allowed, 0.0, float("-inf")), "causal": None, "none": None}

    def fn(m, q, k, v, *attn_mask):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask[0] if attn_mask else None, is_causal=mask == "causal", enable_gqa=True, scale=0.3,
        )

    args = (q, k, v) + ((masks[mask],) if masks[mask] is not None else ())
    graph = _roundtrip(Fn(fn), args)
    (attention,) = [n for n in graph.nodes if n.op_type == "Attention"]
    assert attention.attrs["num_heads"] == 4 and attention.attrs["num_kv_heads"] == 2 and attention.attrs["scale"] == 0.3
    assert attention.attrs.get("causal", 0) == (mask == "causal")


def test_symbolic_sizes_are_computed_from_the_inputs():
    def fn(m, x, i):
        batch, seq, _ = x.shape
        heads = x.view(batch, seq, 2, 4).transpose(1, 2)
        positions = torch.arange(seq).expand(batch, seq)
        return heads.reshape(batch * 2, seq, 4), positions + i, x[:, seq - 1]

    dims = (torch.export.Dim("batch"), torch.export.Dim("seq"))
    graph = _roundtrip(Fn(fn), (X, MASK), dynamic_shapes=(({0: dims[0], 1: dims[1]}, {0: dims[0], 1: dims[1]}),))
    x_shape, i_shape = (v.shape for v in graph.inputs)
    assert all(isinstance(d, str) for d in i_shape) and x_shape == (*i_shape, 8), "dims keep their symbols"
    module = graph.to_fx()
    bigger = (_rand(3, 5, 8), torch.ones(3, 5, dtype=torch.int64))
    with torch.no_grad():
        assert max_abs_diff(list(Fn(fn)(*bigger)), module(*bigger)) <= 1e-6


def test_weights_are_views_of_the_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.LayerNorm(6)).eval()
    graph = _roundtrip(model, (X,))
    weight = model[0].weight
    (transposed,) = [v for v in graph.constants.values() if v.shape == (8, 6)]
    data = transposed.const.numpy()
    assert data.T.ctypes.data == weight.data_ptr(), "the transposed weight is a view, not a copy"
    assert np.array_equal(data, weight.detach().numpy().T)
    module = graph.to_fx(prepack_linears=True)
    buffers = dict(module.named_buffers())
    assert buffers["v_1_weight"].data_ptr() == model[1].weight.data_ptr(), "to_fx shares the weights again"
    assert not any(name.startswith("v_0_weight") for name in buffers), "a prepacked weight is not kept twice"


def test_untranslatable_op_falls_back_to_torch_onnx(caplog):
    module = Fn(lambda m, x: torch.logsumexp(x, -1) * 2).eval()
    program = torch.export.export(module, (X,))
    with pytest.raises(UntranslatableError, match="no rule for op aten.logsumexp.default"):
        import_program(program)
    with caplog.at_level(logging.INFO, logger="graphopt"):
        graph = graphopt.from_fx(program)
    assert graph.metadata["fx_importer"] == "torch.onnx"
    assert any("aten.logsumexp.default" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        assert max_abs_diff([module(X)], graph.to_fx()(X)) <= 1e-5


def test_mutating_a_tensor_another_op_reads_is_untranslatable():
    def fn(m, x):
        y = x * 2
        z = y.view(-1)
        y.add_(1)
        return z

    program = torch.export.export(Fn(fn), (X,))
    if not any(str(n.target) == "aten.add_.Tensor" for n in program.graph.nodes):
        pytest.skip("torch.export functionalized the in-place add")
    with pytest.raises(UntranslatableError, match="mutates a tensor that other ops read"):
        import_program(program)


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamo_graph_of_bert_fuses_as_through_torch_onnx(dynamic, monkeypatch):
    _assert_paths_agree("bert", dynamic, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_zoo_fuses_as_through_torch_onnx(name, monkeypatch):
    _assert_paths_agree(name, False, monkeypatch)


def _fused_ops(graph):
    """What fusion made of `graph`: its fused ops, norms and softmaxes, and its matmul count."""
    counts = graphopt.optimize(graph, "fuse").op_counts()
    kept = {k: v for k, v in counts.items() if k.startswith("graphopt::") or k in ("LayerNormalization", "Softmax")}
    return kept, counts.get("MatMul", 0) + counts.get("Gemm", 0)


def _dynamo_graph(model, inputs, dynamic=False):
    """The (GraphModule, example inputs) dynamo hands a backend for `model(*inputs.values())`."""
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=dynamic)(*inputs.values())
    torch._dynamo.reset()
    return captured[0]


def _in_placeholder_order(gm, graph, inputs):
    """The tensors of `inputs` that `graph` takes, in dynamo's placeholder order."""
    names = [str(n.target)[2:-1] for n in gm.graph.nodes if n.op == "placeholder"]
    return [inputs[n] for n, kind in zip(names, graph.metadata["fx_input_kinds"]) if kind == "input"]


def _refuse(*args, **kwargs):
    raise aten_import.UntranslatableError("this test takes another path")


def _assert_paths_agree(name, dynamic, monkeypatch):
    """Every import path of the dynamo graph of a zoo model (dynamo's graph as it is when
    static, its ATen trace, torch.onnx): the same fusions; each op-by-op one equal to eager,
    at another shape too when dynamic."""
    zm = model_zoo.build(name)
    gm, example_inputs = _dynamo_graph(zm.model, zm.inputs, dynamic)
    samples = (zm, model_zoo.build(name, batch=3, seq=5)) if dynamic else (zm,)
    fused = []
    for path, refused in (("dynamo", ()), ("aten", ("import_dynamo_graph",)), ("torch.onnx", ("import_dynamo_graph", "import_graph", "import_program"))):
        if dynamic and path == "dynamo":
            continue
        for attribute in refused:
            monkeypatch.setattr(fx_import, attribute, _refuse)
        graph = fx_import.from_fx(gm, example_inputs)
        assert graph.metadata["fx_importer"] == path
        if path != "torch.onnx":
            module = graph.clone().to_fx(prepack_linears=True)
            for sample in samples:
                with torch.no_grad():
                    expected = zm.model(*sample.inputs.values())
                    assert max_abs_diff(expected, module(*_in_placeholder_order(gm, graph, sample.inputs))) <= 1e-5
        fused.append(_fused_ops(graph))
    assert all(f == fused[0] for f in fused)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_sdpa_models_match_eager_with_a_fully_padded_sequence(name):
    zm = model_zoo.build(name, attention="sdpa", batch=3)
    inputs = {k: v.clone() for k, v in zm.inputs.items()}
    inputs["attention_mask"][-1, :] = 0
    gm, example_inputs = _dynamo_graph(zm.model, inputs)
    graph = fx_import.from_fx(gm, example_inputs)
    assert graph.metadata["fx_importer"] == "dynamo"
    assert graph.op_counts().get("graphopt::Attention") == model_zoo.LAYERS
    module = graphopt.optimize(graph, "fuse").to_fx(prepack_linears=True)
    with torch.no_grad():
        expected = zm.model(*inputs.values())
        actual = module(*_in_placeholder_order(gm, graph, inputs))
    assert not any(torch.isnan(a).any() for a in actual)
    assert max_abs_diff(expected, actual) <= 1e-5


def test_constants_named_like_module_attributes_lower_to_fx():
    graph = graphopt.ir.Graph("g")
    x = graph.add_input("x", graphopt.ir.TensorType(graphopt.ir.DType.FLOAT, (2,)))
    total = graph.add_node("Add", [x, graph.add_constant("to", np.ones(2, np.float32))]).output
    graph.set_outputs([graph.add_node("Mul", [total, graph.add_constant("forward", np.full(2, 3, np.float32))]).output])
    (out,) = graph.to_fx()(torch.zeros(2))
    assert out.tolist() == [3.0, 3.0]
