"""torch.compile(backend="graphopt"): equal to eager, dynamic shapes, graph breaks, KV-cache
generation, fallback on unknown ops, caching, option errors, user modules left alone."""

import logging

import pytest
import torch
import transformers

import graphopt.backend as backend
import decoder_zoo
import model_zoo
from conftest import max_abs_diff

QUICK = ("bert", "llama", "vit")
ZOO_12 = ("bert", "roberta", "distilbert", "albert", "deberta-v2", "gpt2", "opt", "llama", "qwen2", "phi", "vit", "whisper-encoder")
STRICT = {"check": True, "fallback": False}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}, [m.training for m in module.modules()]


def test_registered_through_the_entry_point():
    assert "graphopt" in torch._dynamo.list_backends()


def _assert_matches_eager(name, dynamic):
    zm = model_zoo.build(name)
    other = model_zoo.build(name, batch=3, seq=5)
    before = _state(zm.model)
    compiled = torch.compile(zm.model, backend="graphopt", dynamic=dynamic, options=STRICT)
    with torch.no_grad():
        for inputs in (zm.inputs, other.inputs):
            assert max_abs_diff(zm.model(*inputs.values()), compiled(*inputs.values())) <= 1e-4
    after = _state(zm.model)
    assert after[1] == before[1] and all(torch.equal(before[0][k], after[0][k]) for k in before[0])


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", QUICK)
def test_outputs_equal_eager(name, dynamic):
    _assert_matches_eager(name, dynamic)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", [n for n in ZOO_12 if n not in QUICK])
def test_outputs_equal_eager_zoo(name, dynamic):
    _assert_matches_eager(name, dynamic)


def test_generate_with_kv_cache_gives_the_same_tokens():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    eager = transformers.LlamaForCausalLM(config).eval()
    compiled = transformers.LlamaForCausalLM(config).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.forward = torch.compile(compiled.forward, backend="graphopt", dynamic=True, options={"fallback": False})
    prompt = torch.randint(4, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = eager.generate(prompt, max_new_tokens=6, do_sample=False)
        actual = compiled.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(expected, actual)


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "default"])
def test_generate_32_tokens_of_a_gqa_decoder_equal_eager(dynamic):
    # The recipe of README's "Generation" section: compile `forward`, call generate().
    eager, _ = decoder_zoo.build_decoder("llama")
    compiled, _ = decoder_zoo.build_decoder("llama")
    options = {"fallback": False} if dynamic else {}
    compiled.forward = torch.compile(compiled.forward, backend="graphopt", dynamic=dynamic, options=options)
    prompt = torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    backend.clear_cache()
    with torch.no_grad():
        expected = eager.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)
        actual = compiled.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert torch.equal(expected, actual)
    if dynamic:
        # a few graphs (prefill, first decode step, decode with a symbolic past) for all 32 steps, none fell back
        assert backend.cache_info()["compiled"] <= 3 and backend.cache_info()["fallbacks"] == 0
        assert backend.cache_info()["auto_onnxruntime"] >= 1  # the decoding steps run in ONNX Runtime


def test_a_decoding_step_is_not_specialized_to_its_cache_length():
    # dynamo passes HF decoders an int it never reads (a cache length): it must not pin the
    # graph to one length (a call at another length would run the original graph)
    from graphopt.frontends.fx_import import from_fx

    model, config = decoder_zoo.build_decoder("llama")
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    step = torch.compile(decoder_zoo.DecoderWithPast(model), backend=capture, dynamic=True)
    for batch, seq, past in ((1, 6, 0), (1, 1, 6)):
        feeds = decoder_zoo.decoder_inputs(config, batch, seq, past)
        with torch.no_grad():
            step(*(torch.from_numpy(feeds[name]) for name in decoder_zoo.input_names(config)))
    graph = from_fx(*captured[-1])
    assert graph.metadata["fx_specialized"] == {}
    assert any(n.op_type == "Attention" for n in graph.nodes)


class _ScaledNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.scaling = torch.nn.LayerNorm(8, eps=1e-6), 0.5

    def forward(self, x):
        return self.norm(x) * self.scaling


def test_module_passed_as_an_argument_keeps_its_float_attributes_constant():
    # transformers >= 5.24 calls forward through a wrapper taking the model as args[0]: dynamo
    # then names its state L_args_0_modules_..., and with dynamic=True its float attributes
    # arrive as 0-d tensors read by .item() (torch.export refused those as data-dependent).
    torch.manual_seed(0)
    model = _ScaledNorm().eval()
    compiled = torch.compile(lambda m, x: m(x), backend="graphopt", dynamic=True, options={"fallback": False})
    backend.clear_cache()
    with torch.no_grad():
        for rows in (3, 5):
            x = torch.randn(rows, 8)
            assert max_abs_diff([model(x)], [compiled(model, x)]) <= 1e-5
    assert backend.cache_info()["compiled"] >= 1


class _WithGraphBreak(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.first(x))
        torch._dynamo.graph_break()
        return torch.softmax(self.second(h), dim=-1)


def test_graph_break_compiles_both_graphs():
    torch.manual_seed(0)
    model = _WithGraphBreak().eval()
    compiled = torch.compile(model, backend="graphopt", options=STRICT)
    x = torch.randn(3, 8)
    backend.clear_cache()
    with torch.no_grad():
        assert max_abs_diff([model(x)], [compiled(x)]) <= 1e-5
    assert backend.cache_info()["compiled"] == 2


@torch.library.custom_op("graphopt_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class _WithUnknownOp(torch.nn.Module):
    def forward(self, x):
        return torch.ops.graphopt_test.mystery(torch.relu(x)) - 1


def test_unknown_op_falls_back_with_one_warning(caplog):
    model = _WithUnknownOp()
    compiled = torch.compile(model, backend="graphopt")
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        for _ in range(3):
            x = torch.randn(4)
            assert torch.equal(compiled(x), model(x))
    warnings = [r for r in caplog.records if "running this graph unoptimized" in r.getMessage()]
    assert len(warnings) == 1
    assert "graphopt_test" in warnings[0].getMessage() or "mystery" in warnings[0].getMessage()


def test_unknown_op_raises_without_fallback():
    compiled = torch.compile(_WithUnknownOp(), backend="graphopt", options={"fallback": False})
    with pytest.raises(Exception, match="from_fx"):
        compiled(torch.randn(4))


def test_second_compile_of_the_same_model_hits_the_cache():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    x = torch.randn(2, 8)
    backend.clear_cache()
    with torch.no_grad():
        torch.compile(model, backend="graphopt")(x)
        torch._dynamo.reset()
        torch.compile(model, backend="graphopt")(x)
    info = backend.cache_info()
    assert info["compiled"] == 1 and info["cache_hits"] == 1
    other = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.allclose(torch.compile(other, backend="graphopt")(x), other(x), atol=1e-6)
    assert backend.cache_info()["compiled"] == 2, "different weights must not share a cache entry"


@pytest.mark.parametrize("options, message", [
    ({"pipelin": "cleanup"}, "unknown option"),
    ({"target": "tensorrtt"}, "unknown target 'tensorrtt'"),
    ({"target": "onnxruntime{threads=x}"}, "option 'threads' must be int"),
    ({"pipeline": "clenup"}, "did you mean 'cleanup'"),
    ({"check": "yes"}, "option 'check' must be True or False"),
])
def test_bad_options_name_the_problem(options, message):
    compiled = torch.compile(torch.nn.Linear(2, 2), backend="graphopt", options=options)
    with pytest.raises(Exception, match=message):
        compiled(torch.randn(1, 2))


def test_onnxruntime_target_runs_the_optimized_graph_with_dynamic_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16)).eval()
    compiled = torch.compile(model, backend="graphopt", dynamic=True, options={"target": "onnxruntime{threads=1}", "fallback": False})
    with torch.no_grad():
        for batch in (2, 5):
            x = torch.randn(batch, 8)
            out = compiled(x)
            assert isinstance(out, torch.Tensor)
            torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


class _TwoGraphs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        y = torch.nn.functional.gelu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(y).softmax(-1)


def test_explain_reports_each_graph_the_breaks_and_what_fusion_did():
    import graphopt

    model = _TwoGraphs().train()
    explanation = graphopt.explain(model, torch.randn(2, 8))
    assert model.training, "explain must leave the module's mode alone"
    assert len(explanation.graphs) == 2 and len(explanation.graph_breaks) == 1
    first = explanation.graphs[0]
    assert first.ops_after.get("graphopt::Gelu") == 1 and "Erf" in first.ops_before
    text = str(explanation)
    assert "2 graph(s), 1 graph break(s)" in text and "new ops: graphopt::Gelu x1" in text


def test_explain_names_why_a_graph_would_run_unoptimized():
    import graphopt

    explanation = graphopt.explain(_WithUnknownOp(), torch.randn(4))
    (graph,) = explanation.graphs
    assert graph.fallback_reason is not None and "mystery" in graph.fallback_reason
    assert "runs unoptimized: UnsupportedOpError" in str(explanation)


def test_explain_works_on_a_gqa_llama_causal_lm():
    """explain imports each graph on its first call, as the backend does (importing inside
    dynamo's compile step corrupted its shape environment: IndexError in guard building)."""
    import graphopt

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    explanation = graphopt.explain(model, torch.randint(0, 128, (1, 8)))
    assert explanation.graphs and all(g.fallback_reason is None for g in explanation.graphs)
    ops = explanation.graphs[0].ops_after
    assert ops.get("graphopt::Attention") == 2 and ops.get("graphopt::RotaryEmbedding") == 4 and ops.get("graphopt::RMSNorm")
    assert "fuse-rotary" in str(explanation) and not model.training
