"""FX -> IR -> FX on real Hugging Face architectures: outputs equal to eager within 1e-5."""

import pytest
import torch

import graphopt
import model_zoo
from conftest import ROUNDTRIP_ARCHITECTURES, max_abs_diff

QUICK = ("bert", "llama", "vit", "whisper-encoder")


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}, [m.training for m in module.modules()]


def _export_roundtrip(zm):
    args = tuple(zm.inputs.values())
    with torch.no_grad():
        expected = zm.model(*args)
    batch = torch.export.Dim("batch")
    program = torch.export.export(zm.model, args, dynamic_shapes=tuple({0: batch} for _ in args))
    graph = graphopt.from_fx(program)
    graph.verify()
    assert all(isinstance(v.shape[0], str) for v in graph.inputs), "the dynamic batch dim stays symbolic"
    module = graph.to_fx()
    assert max_abs_diff(expected, module(*args)) <= 1e-5
    return graph, module


@pytest.mark.parametrize("name", QUICK)
def test_torch_export_roundtrip(name, zoo):
    _export_roundtrip(zoo(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ROUNDTRIP_ARCHITECTURES if n not in QUICK])
def test_torch_export_roundtrip_zoo(name, zoo):
    _export_roundtrip(zoo(name))


def test_torch_export_roundtrip_runs_other_batch_sizes(zoo):
    zm = zoo("llama")
    _, module = _export_roundtrip(zm)
    bigger = model_zoo.build("llama", batch=3)
    with torch.no_grad():
        expected = bigger.model(*bigger.inputs.values())
    assert max_abs_diff(expected, module(*bigger.inputs.values())) <= 1e-5


def _compile_with_graphopt_hook(model, dynamic):
    """torch.compile with a backend that runs every captured graph through
    from_fx -> IR -> to_fx (converted on first call, outside dynamo's compile step)."""
    graphs = []

    def backend(gm, example_inputs):
        state = {}

        def run(*args):
            if not state:
                graph = graphopt.from_fx(gm, example_inputs)
                graph.verify()
                graphs.append(graph)
                state["kinds"] = graph.metadata["fx_input_kinds"]
                state["module"] = graph.to_fx()
            return state["module"](*[a for a, kind in zip(args, state["kinds"]) if kind == "input"])

        return run

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=dynamic), graphs


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "vit"])
def test_torch_compile_backend_hook_roundtrip(name, dynamic, zoo):
    zm = zoo(name)
    before = _state(zm.model)
    compiled, graphs = _compile_with_graphopt_hook(zm.model, dynamic)
    other = model_zoo.build(name, batch=3, seq=5)
    with torch.no_grad():
        expected, expected_other = zm.model(*zm.inputs.values()), zm.model(*other.inputs.values())
        assert max_abs_diff(expected, compiled(*zm.inputs.values())) <= 1e-5
        assert max_abs_diff(expected_other, compiled(*other.inputs.values())) <= 1e-5
    kinds = graphs[0].metadata["fx_input_kinds"]
    assert kinds.count("input") == len(graphs[0].inputs) == len(zm.inputs)
    assert kinds.count("constant") > 0, "weights became IR constants"
    if dynamic:
        assert len(graphs) == 1, "one graph serves both shapes"
        assert any(isinstance(d, str) for v in graphs[0].inputs for d in v.shape)
    after = _state(zm.model)
    assert after[1] == before[1]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_from_fx_rejects_wrong_arguments():
    with pytest.raises(graphopt.GraphoptError, match="expects a torch.fx.GraphModule or a torch.export.ExportedProgram, got Linear"):
        graphopt.from_fx(torch.nn.Linear(2, 2))
    traced = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(graphopt.GraphoptError, match="needs its example_inputs"):
        graphopt.from_fx(traced)
    with pytest.raises(graphopt.GraphoptError, match="1 placeholders but 2 example inputs"):
        graphopt.from_fx(traced, [torch.zeros(2), torch.zeros(2)])


def test_symbolic_trace_graph_module_imports():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2)).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4)
    graph = graphopt.from_fx(traced, [x])
    with torch.no_grad():
        assert max_abs_diff([model(x)], graph.to_fx()(x)) <= 1e-6
