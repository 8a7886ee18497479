"""benchmarks/int4_cpu.py on a tiny decoder: every row measured, graphopt's int4 encodings give ORT's logit error."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import int4_cpu  # noqa: E402


def test_decode_part_on_a_tiny_decoder_measures_every_variant(tmp_path):
    out = tmp_path / "int4.md"
    text = int4_cpu.main(["--parts", "decode", "--models", "tiny", "--repeats", "1", "--out", str(out)])
    assert out.read_text() == text
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines())
            if len(cells) == 8 and cells[0] == "tiny"}
    assert set(rows) == {
        "ORT fp32 (optimizer)", "ORT int4 (block 32, symmetric, level 4)", "ORT int4 (block 128, asymmetric, level 4)",
        "graphopt int4 rtn (block 32, symmetric, level 4)", "graphopt int4 gptq (block 32, symmetric, level 4)",
    }
    assert float(rows["ORT fp32 (optimizer)"][6]) == 0.0
    ort, ours = float(rows["ORT int4 (block 32, symmetric, level 4)"][6]), float(rows["graphopt int4 rtn (block 32, symmetric, level 4)"][6])
    assert ort > 0 and abs(ours - ort) <= 0.25 * ort  # the same int4 codes as ORT's quantizer
    assert rows["ORT int4 (block 32, symmetric, level 4)"][5] == "1.00x"
    assert text.count("(target <= 1.0x and no higher error:") == 2
