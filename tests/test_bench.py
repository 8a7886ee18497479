"""`graphopt bench`: the table's structure, ratios computed from the measured times, outputs."""

from __future__ import annotations

import json
import statistics

import pytest
import transformers

import model_zoo
from graphopt.bench import BASELINE, run_bench
from graphopt.cli import main
from graphopt.errors import GraphoptError


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bert.onnx"
    return str(model_zoo.export_onnx(model_zoo.build("bert"), path))


def test_bench_rows_ratios_and_fidelity_come_from_the_measurements(bert_onnx):
    result = run_bench(bert_onnx, "fuse", "onnxruntime:cpu", ["ort", "ort-opt", "inductor"], batch=2, seq=16, threads=1, warmup=1, repeats=4)
    labels = [r.label for r in result.rows]
    assert labels == [BASELINE, "graphopt (fuse -> onnxruntime:cpu{threads=1})", "ort-opt", "inductor"]
    baseline = result.row(BASELINE)
    for row in result.rows[:3]:
        assert len(row.times_ms) == 4 and all(t > 0 for t in row.times_ms)
        assert row.median_ms == statistics.median(row.times_ms)
        assert row.ratio == pytest.approx(row.median_ms / baseline.median_ms)
        assert row.max_error is not None and row.max_error < 1e-4 and row.cosine > 0.99999
        assert row.parameters > 0 and row.flops > 0
    assert baseline.max_error == 0.0 and baseline.ratio == 1.0
    inductor = result.row("inductor")
    assert inductor.times_ms == [] and inductor.note.startswith("needs a PyTorch model")
    table = result.table().splitlines()
    assert table[0].startswith("| contender | build s | median ms | p25-p75 ms | ratio |")
    assert len(table) == 2 + len(result.rows)
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert f"| {result.rows[2].ratio:.2f} |" in table[4]


def test_bench_builds_torch_contenders_from_a_hugging_face_config(tmp_path):
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100, max_position_embeddings=64
    )
    config.save_pretrained(tmp_path)
    result = run_bench(str(tmp_path / "config.json"), "fuse", "onnxruntime", ["eager"], batch=1, seq=8, threads=1, warmup=1, repeats=2)
    eager = result.row("eager")
    assert len(eager.times_ms) == 2 and eager.max_error < 1e-4
    assert eager.parameters >= result.row(BASELINE).parameters  # the export drops the unused pooler


def test_cli_bench_writes_json_and_prints_the_table(bert_onnx, tmp_path, capsys):
    out = tmp_path / "bench.json"
    html = tmp_path / "bench.html"
    code = main(["bench", bert_onnx, "--against", "none", "--batch", "1", "--seq", "8", "--repeats", "2", "--warmup", "1",
                 "--threads", "1", "--json", str(out), "--html", str(html)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "batch 1, seq 8, 1 threads" in printed and "| original (ort) |" in printed
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["rows"]][0] == BASELINE and data["settings"]["repeats"] == 2
    assert data["rows"][1]["ratio"] == pytest.approx(data["rows"][1]["median_ms"] / data["rows"][0]["median_ms"])
    assert "<table>" in html.read_text()


@pytest.mark.parametrize("args, message", [
    (["--against", "ort-fast"], "unknown contender(s) ort-fast"),
    (["--repeats", "0"], "batch, seq and repeats must be >= 1"),
])
def test_cli_bench_rejects_bad_options(bert_onnx, capsys, args, message):
    assert main(["bench", bert_onnx, *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_names_a_missing_model():
    with pytest.raises(GraphoptError, match="nothere.onnx: no such file"):
        run_bench("nothere.onnx")


def test_cli_bench_draws_the_charts_as_png(bert_onnx, tmp_path):
    png = tmp_path / "bench.png"
    assert main(["bench", bert_onnx, "--against", "ort-opt", "--seq", "8", "--repeats", "2", "--warmup", "1", "--threads", "1", "--png", str(png), "-q"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("model, message", [
    ("hf:bret", "unknown model type 'bret'; closest: bert"),
    ("hf:zzzzzz", "unknown model type 'zzzzzz'; e.g. bert, llama, vit"),
])
def test_cli_bench_names_an_unknown_model_type_in_one_line(capsys, model, message):
    assert main(["bench", model]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err) < 300


def test_cli_bench_says_a_folder_is_a_folder(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a folder without config.json; give an .onnx file or a Hugging Face model folder" in capsys.readouterr().err
