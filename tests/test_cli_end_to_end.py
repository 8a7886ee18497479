"""The CLI end to end, as a new user drives it: from a Hugging Face folder (the real
all-MiniLM-L6-v2, real sentences) and from `hf:` configs, through export, optimize, compile,
run and bench on real inputs; every number the CLI prints is checked against the Python API's."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest
import torch
import transformers

import graphopt
import model_zoo
from graphopt.check import run_graph
from graphopt.cli import main
from graphopt.fidelity import compare_outputs
from graphopt.hf_export import build_hf_model, decoder_example_inputs

pytestmark = pytest.mark.skipif(not model_zoo.minilm_available(), reason=model_zoo.MINILM_INSTALL_HINT)

SMALL_LLAMA = "hf:llama{num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,num_key_value_heads=2,vocab_size=256}"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _figure(text: str, output: str, name: str) -> float:
    """A number the CLI printed on an output's fidelity line, e.g. 'relative' of last_hidden_state."""
    line = next(line for line in text.splitlines() if line.strip().startswith(f"{output}:"))
    match = re.search(rf"{name} ([-\d.e+]+)(%?)", line)
    assert match, f"no '{name}' on: {line}"
    return float(match[1]) / (100 if match[2] else 1)


@pytest.fixture(scope="module")
def minilm_folder() -> pathlib.Path:
    folder = model_zoo._minilm_dir()
    assert folder is not None and (folder / "config.json").is_file()
    return folder


@pytest.fixture(scope="module")
def sentences(minilm_folder: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder)
    encoded = tokenizer(list(model_zoo.MINILM_SENTENCES), padding=True, return_tensors="np")
    path = tmp_path_factory.mktemp("inputs") / "sentences.npz"
    np.savez(path, input_ids=encoded["input_ids"].astype(np.int64), attention_mask=encoded["attention_mask"].astype(np.int64))
    return path


def _feeds(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def test_hf_folder_export_optimize_compile_run_bench(minilm_folder, sentences, tmp_path, capsys):
    feeds = _feeds(sentences)
    hf = transformers.AutoModel.from_pretrained(minilm_folder).eval()
    with torch.no_grad():
        eager = hf(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()

    # export: the file computes what the Hugging Face model computes
    exported = tmp_path / "minilm.onnx"
    out = _run(capsys, "export", str(minilm_folder), "-o", str(exported))
    assert "exported as encoder" in out and "attention_mask: int64[batch, seq]" in out
    (onnx_out,) = graphopt.compile(str(exported), "onnxruntime", "cleanup")(**feeds)
    np.testing.assert_allclose(onnx_out, eager, atol=1e-4)

    # optimize straight from the folder, checked on the real sentences
    out = _run(capsys, "optimize", str(minilm_folder), "-o", str(tmp_path / "fused.onnx"), "-p", "fuse", "--inputs", str(sentences))
    fused = graphopt.optimize(str(exported), "fuse")
    expected = compare_outputs([eager], run_graph(fused, feeds), ["last_hidden_state"], feeds)[0]
    assert "standard ONNX, opset 17" in out
    assert _figure(out, "last_hidden_state", "relative") < 1e-5 and expected.relative < 1e-5
    assert _figure(out, "last_hidden_state", "pooled cosine") == pytest.approx(1.0, abs=1e-5)

    # compile a lossy pipeline: the fidelity printed is the API's
    artifact = tmp_path / "minilm.ort"
    pipeline = "fuse,quantize{mode=dynamic}"
    out = _run(capsys, "compile", str(minilm_folder), "-t", "onnxruntime", "-o", str(artifact), "-p", pipeline, "--inputs", str(sentences))
    compiled = graphopt.compile(str(exported), "onnxruntime", pipeline)
    (api_out,) = compiled(**feeds)
    api = compare_outputs([onnx_out], [api_out], ["last_hidden_state"], feeds)[0]
    assert _figure(out, "last_hidden_state", "token cosine") == pytest.approx(api.token_cosine, abs=1e-5)
    assert _figure(out, "last_hidden_state", "pooled cosine") == pytest.approx(api.pooled_cosine, abs=1e-5)
    assert _figure(out, "last_hidden_state", "relative") == pytest.approx(api.relative, rel=5e-3)  # printed to 3 digits
    assert 0.9 < api.pooled_cosine < 1.0  # int8 moved the outputs, a little

    # run the saved artifact: the API's outputs
    saved = tmp_path / "outputs.npz"
    _run(capsys, "run", str(artifact), "-i", str(sentences), "-o", str(saved))
    np.testing.assert_allclose(_feeds(saved)["last_hidden_state"], api_out, atol=1e-5)

    # bench on the real sentences, eager PyTorch beside: the fidelity columns are the API's
    report = tmp_path / "bench.json"
    _run(capsys, "bench", str(minilm_folder), "-p", pipeline, "--inputs", str(sentences), "--against", "eager", "--warmup", "1", "--repeats", "3", "--json", str(report))
    rows = {row["label"]: row for row in json.loads(report.read_text())["rows"]}
    ours = next(row for label, row in rows.items() if label.startswith("graphopt"))
    assert ours["pooled_cosine"] == pytest.approx(api.pooled_cosine, abs=1e-5)
    assert rows["eager"]["relative_error"] < 1e-5
    assert json.loads(report.read_text())["settings"]["inputs"] == str(sentences)


def test_hf_config_decoder_export_compile_run(tmp_path, capsys):
    exported = tmp_path / "llama.onnx"
    out = _run(capsys, "export", SMALL_LLAMA, "-o", str(exported))
    assert "exported as causal-lm" in out and "attention_mask: int64[batch, past + seq]" in out
    model, config = build_hf_model(config=transformers.AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    steps = tmp_path / "step.npz"
    feeds = decoder_example_inputs(config, batch=1, seq=3, past=5)
    np.savez(steps, **feeds)

    # ORT's kernels written into the file, checked on the default sample sizes (batch 2, seq 8,
    # past 2: a batched chunked prefill, which GroupQueryAttention takes one row at a time)
    out = _run(capsys, "optimize", str(exported), "-o", str(tmp_path / "ort.onnx"), "-p", "fuse", "--lower", "onnxruntime", "--check")
    assert "ONNX Runtime kernels: GroupQueryAttention x2" in out and _figure(out, "logits", "top-1 agreement") == 1.0

    artifact = tmp_path / "llama.ort"
    out = _run(capsys, "compile", SMALL_LLAMA, "-t", "onnxruntime", "-o", str(artifact), "--inputs", str(steps))
    assert _figure(out, "logits", "top-1 agreement") == 1.0 and _figure(out, "logits", "relative") < 1e-5

    saved = tmp_path / "outputs.npz"
    _run(capsys, "run", str(artifact), "-i", str(steps), "-o", str(saved))
    from graphopt.hf_export import DecoderWithPast

    with torch.no_grad():
        logits, *presents = DecoderWithPast(model)(*[torch.from_numpy(feeds[n]) for n in feeds])
    outputs = _feeds(saved)
    np.testing.assert_allclose(outputs["logits"], logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(outputs["present.1.value"], presents[-1].numpy(), atol=1e-5)


def test_hf_config_encoder_bench_and_inspect(tmp_path, capsys):
    model = "hf:bert{num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,vocab_size=500}"
    out = _run(capsys, "inspect", model)
    assert out.startswith(f"{model}: graph ") and "input_ids: int64[batch, seq]" in out
    report = tmp_path / "bench.json"
    _run(capsys, "bench", model, "--against", "eager", "--warmup", "1", "--repeats", "3", "--seq", "16", "--json", str(report))
    rows = {row["label"]: row for row in json.loads(report.read_text())["rows"]}
    assert rows["eager"]["token_cosine"] > 0.99999 and rows["eager"]["relative_error"] < 1e-5


def test_export_from_module_function_leaves_the_users_module_unchanged(tmp_path, capsys, monkeypatch):
    (tmp_path / "user_models.py").write_text(
        "import torch\n"
        "torch.manual_seed(0)\n"
        "MODEL = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4))\n"
        "def build():\n"
        "    return MODEL, (torch.randint(0, 50, (2, 7)),)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_models

    weights = {name: tensor.clone() for name, tensor in user_models.MODEL.state_dict().items()}
    assert user_models.MODEL.training
    out_file = tmp_path / "user.onnx"
    out = _run(capsys, "export", "user_models:build", "-o", str(out_file))
    assert "user_models:build: module from a function" in out and "input: int64[batch, seq]" in out
    assert user_models.MODEL.training  # still in train mode, weights untouched
    assert all(torch.equal(weights[name], tensor) for name, tensor in user_models.MODEL.state_dict().items())
    ids = np.random.default_rng(0).integers(0, 50, (3, 5))
    (got,) = graphopt.compile(str(out_file), "onnxruntime", "cleanup")(input=ids)
    with torch.no_grad():
        want = user_models.MODEL.eval()(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_model_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["export", "hf:lama", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "unknown model type 'lama'; closest: llama" in capsys.readouterr().err
    assert main(["export", "hf:llama{num_layers=2}", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "a llama config has no field 'num_layers'; did you mean num_hidden_layers?" in capsys.readouterr().err
    assert main(["optimize", "nowhere.py:build", "-o", str(tmp_path / "x.onnx"), "-p", "cleanup"]) == 2
    assert "nowhere.py:build: no such file nowhere.py" in capsys.readouterr().err
    assert main(["export", "hf:bert", "--task", "speech", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "unknown task 'speech'; choose from auto, encoder, causal-lm" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_pt2_exported_program_through_optimize(tmp_path, capsys):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    saved = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(module, (x,)), str(saved))
    np.savez(tmp_path / "x.npz", **{graphopt.from_fx(torch.export.load(str(saved))).inputs[0].name: x.numpy()})
    out = _run(capsys, "optimize", str(saved), "-o", str(tmp_path / "mlp.onnx"), "-p", "fuse", "--inputs", str(tmp_path / "x.npz"))
    assert _figure(out, next(line.split(":")[0].strip() for line in out.splitlines() if "relative" in line), "relative") < 1e-6
    graph = graphopt.from_onnx(str(tmp_path / "mlp.onnx"))
    (got,) = run_graph(graph, {graph.inputs[0].name: x.numpy()})
    np.testing.assert_allclose(got, module(x).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("model", "task", "names"),
    [
        ("hf:t5{num_layers=2,d_model=64,d_ff=128,num_heads=4,d_kv=16,vocab_size=300}", "seq2seq-encoder", ("input_ids", "attention_mask")),
        ("hf:vit{num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,image_size=32,patch_size=8}", "vision", ("pixel_values",)),
    ],
)
def test_task_presets_export_what_the_model_computes(model, task, names, tmp_path, capsys):
    from graphopt.hf_export import LastHiddenState
    from graphopt.model_sources import _hf_config

    out = _run(capsys, "export", model, "-o", str(tmp_path / "m.onnx"))
    assert f"exported as {task}" in out
    built, config = build_hf_model(config=_hf_config(model))
    rng = np.random.default_rng(0)
    if task == "vision":
        feeds = {"pixel_values": rng.standard_normal((3, 3, 32, 32)).astype(np.float32)}
    else:
        feeds = {"input_ids": rng.integers(0, 300, (3, 9)), "attention_mask": np.ones((3, 9), dtype=np.int64)}
        feeds["attention_mask"][0, 6:] = 0
        built = built.get_encoder()
    with torch.no_grad():
        want = LastHiddenState(built, names)(*[torch.from_numpy(feeds[n]) for n in names]).numpy()
    (got,) = run_graph(graphopt.from_onnx(str(tmp_path / "m.onnx")), feeds)
    np.testing.assert_allclose(got, want, atol=1e-4)
