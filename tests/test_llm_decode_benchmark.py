"""benchmarks/llm_decode_cpu.py: the table has every column, ratios come from the medians, greedy tokens are checked."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import llm_decode_cpu  # noqa: E402

LABELS = [
    "ORT plain", "ORT optimizer", "onnxscript", "graphopt ORT", "graphopt ORT, cache in place", "graphopt torch", "torch eager", "torch inductor",
    "torch.compile graphopt",
]
CELL = re.compile(r"^(\d+\.\d\d) \((\d+\.\d\d)x\)$")


def _table(lines: list[str], title: str) -> list[list[str]]:
    """The header and rows (cells split) of the first markdown table after the line starting with `title`."""
    after = next(i for i, line in enumerate(lines) if line.startswith(title))
    start = next(i for i in range(after, len(lines)) if lines[i].startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [rows[0], *rows[2:]]


def test_main_on_a_tiny_decoder_fills_every_column_and_checks_greedy_tokens(tmp_path):
    out = tmp_path / "llm.md"
    text = llm_decode_cpu.main([
        "--models", "tiny", "--batches", "1", "--past", "4", "--prefill", "4", "--repeats", "1", "--warmup", "0",
        "--out", str(out),
    ])
    assert out.read_text() == text
    lines = text.splitlines()
    assert lines[0].startswith("Measured ") and "onnxruntime" in lines[0] and "transformers" in lines[0]

    header, *rows = _table(lines, "LLaMA-style decoders")
    assert header == ["model", "batch", "step", *LABELS]
    assert [row[:3] for row in rows] == [["tiny", "1", "prefill (seq 4)"], ["tiny", "1", "decode past 4"]]
    for row in rows:
        cells = dict(zip(LABELS, row[3:], strict=True))
        parsed = {label: CELL.match(cell) for label, cell in cells.items()}
        assert all(parsed.values()), cells
        base = float(parsed["ORT optimizer"].group(1))
        assert parsed["ORT optimizer"].group(2) == "1.00"
        for match in parsed.values():
            ms, ratio = float(match.group(1)), float(match.group(2))
            rounding = 0.005 + ratio * (0.005 / ms + 0.005 / base)  # both medians are printed to 0.01 ms
            assert ratio == pytest.approx(ms / base, abs=rounding)

    header, *greedy = _table(lines, "Greedy decoding")
    assert header == ["model", *LABELS] and len(greedy) == 1
    verdicts = dict(zip(LABELS, greedy[0][1:], strict=True))
    assert verdicts["torch eager"] == "same"
    assert all(re.fullmatch(r"same|differs at step \d+", v) for v in verdicts.values()), verdicts

    header, kernels = _table(lines, "Fused ops in each graph")
    assert header == ["model", *LABELS]
    kernels = dict(zip(LABELS, kernels[1:], strict=True))
    assert kernels["ORT plain"] == "none" and kernels["torch eager"] == "-"
    assert re.fullmatch(r"\d+ \w+(, \d+ \w+)*", kernels["graphopt ORT"]) and "RMSNorm" in kernels["graphopt torch"]

    assert any(line.startswith("- tiny, batch 1, decode past 4: best graphopt path ") for line in lines)
    assert any(line.startswith("- tiny: ") and "optimized" in line for line in lines)


def _config() -> types.SimpleNamespace:
    return types.SimpleNamespace(vocab_size=16, num_hidden_layers=1, num_key_value_heads=1, head_dim=2,
                                 hidden_size=2, num_attention_heads=1)


def _step(diverge_at: int | None):
    """A step whose greedy token is its past length (0, then 8 to 14), or 15 from greedy step `diverge_at` (1-based) on.

    Step 1 feeds the 8-token prompt with past 0, step k > 1 one token with past 8 + k - 2.
    """

    def step(feeds):
        past = feeds["past_key_values.0.key"].shape[2]
        seq = feeds["input_ids"].shape[1]
        index = 1 if past == 0 else past - llm_decode_cpu.GREEDY_PROMPT + 2
        token = 15 if diverge_at is not None and index >= diverge_at else past
        logits = np.zeros((1, seq, 16), np.float32)
        logits[:, -1, token] = 1.0
        present = np.zeros((1, 1, past + seq, 2), np.float32)
        return logits, [present, present]

    return step


def test_greedy_check_names_the_first_differing_step_and_errors():
    def broken(feeds):
        raise RuntimeError("kernel missing\nmore detail")

    contenders = [
        llm_decode_cpu.Contender("torch eager", step=_step(None)),
        llm_decode_cpu.Contender("same one", step=_step(None)),
        llm_decode_cpu.Contender("late", step=_step(5)),
        llm_decode_cpu.Contender("broken", step=broken),
        llm_decode_cpu.Contender("unbuilt", error="ValueError: no"),
    ]
    verdicts = llm_decode_cpu.greedy_check(_config(), contenders, steps=8)
    assert verdicts == {
        "torch eager": "same", "same one": "same", "late": "differs at step 5",
        "broken": "RuntimeError: kernel missing", "unbuilt": "build failed",
    }
