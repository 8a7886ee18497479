"""Ordering facts: a pass that needs what an imported graph starts with runs before the passes that remove it."""

from __future__ import annotations

import pathlib
import re

import pytest

from graphopt.facts import INITIAL_FACTS, check_facts
from graphopt.pass_base import PipelineError
from graphopt.pass_manager import Pipeline
from graphopt.pipeline import PassSpec, build_pipeline
from graphopt.registry import get_pass, registered_passes

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("pipeline, message", [
    ("fuse,to-fp16,quantize{mode=dynamic}",
     "pass 'quantize' (position 3) needs 'float32-weights', which 'to-fp16' (position 2) removed; move 'quantize' before it"),
    ("to-fp16,smooth-quant",
     "pass 'smooth-quant' (position 2) needs 'float32-weights', which 'to-fp16' (position 1) removed; move 'smooth-quant' before it"),
    ("fuse,to-bf16,low-rank",
     "pass 'low-rank' (position 3) needs 'constant-float-weights', which 'to-bf16' (position 2) removed; move 'low-rank' before it"),
    ("fuse,quantize{mode=dynamic},prune-heads{ratio=0.5}",
     "pass 'prune-heads' (position 3) needs 'constant-float-weights', which 'quantize' (position 2) removed; move 'prune-heads' before it"),
    ("quantize,prune-ffn",
     "pass 'prune-ffn' (position 2) needs 'constant-float-weights', which 'quantize' (position 1) removed; move 'prune-ffn' before it"),
    ("quantize,smooth-quant",
     "pass 'smooth-quant' (position 2) needs 'constant-float-weights', which 'quantize' (position 1) removed; move 'smooth-quant' before it"),
    ("quantize{mode=dynamic},quantize",
     "pass 'quantize' (position 2) needs 'constant-float-weights', which 'quantize' (position 1) removed; run 'quantize' once"),
])
def test_a_pass_after_one_that_removed_what_it_needs_is_refused_naming_both(pipeline, message):
    with pytest.raises(PipelineError) as info:
        build_pipeline(pipeline)
    assert str(info.value) == message


@pytest.mark.parametrize("pipeline", [
    "fuse,prune-heads{ratio=0.5},prune-ffn,low-rank,smooth-quant,quantize,to-fp16",
    "fuse,to-fp16,low-rank,prune-ffn,prune-heads{ratio=0.5}",  # float16 weights are still float constants
    "fuse,smooth-quant,low-rank,quantize{mode=dynamic}",
])
def test_pipelines_in_the_right_order_build(pipeline):
    assert [p.name for p in build_pipeline(pipeline)] == [PassSpec.parse(s).name for s in pipeline.split(",")]


def test_a_nested_pipeline_carries_its_passes_facts_outward():
    inner = Pipeline.of("compress", [get_pass("quantize")(mode="dynamic"), get_pass("to-fp16")()])
    assert inner.requires == ("constant-float-weights", "float32-weights")
    assert inner.invalidates == ("constant-float-weights", "float32-weights")
    with pytest.raises(PipelineError) as info:
        build_pipeline([inner, get_pass("low-rank")()])
    assert str(info.value) == (
        "pass 'low-rank' (position 2) needs 'constant-float-weights', which 'compress' (position 1) removed; move 'low-rank' before it"
    )
    with pytest.raises(PipelineError) as info:
        Pipeline.of("bad", [get_pass("to-fp16")(), get_pass("smooth-quant")()])
    assert str(info.value) == (
        "inside pipeline 'bad': pass 'smooth-quant' (step 2) needs 'float32-weights', which 'to-fp16' (step 1) removed; "
        "move 'smooth-quant' before it"
    )


def test_a_pass_that_provides_a_removed_fact_again_restores_it():
    class Dequantize:
        name, requires, provides, invalidates = "dequantize", (), ("constant-float-weights",), ()

    flow = check_facts([get_pass("quantize")(mode="dynamic"), Dequantize(), get_pass("low-rank")()])  # type: ignore[list-item]
    assert flow.invalidates == () and flow.provides == ("constant-float-weights",)
    assert set(INITIAL_FACTS) == {"constant-float-weights", "float32-weights"}


def _documented_pipelines() -> list[tuple[str, str]]:
    """Pipeline texts in README.md, docs/ and examples/: `-p`/`--pipeline` arguments and quoted
    or backticked comma lists whose entries are all registered passes (not option grammar
    summaries such as `quantize{dtype=int4|int8}` or `{fidelity_budget=B}`, nor the labels of
    the README's generated benchmark section)."""
    names = set(registered_passes())
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").rglob("*.md")),
             *sorted((ROOT / "examples").rglob("*.py"))]
    entry = r"[a-z][a-z0-9-]*(?:\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})?"
    pattern = re.compile(rf"""(?:-p\s+["']?|--pipeline[= ]["']?|["'`])({entry}(?:,{entry})*)""")
    found = []
    for path in texts:
        text = path.read_text(encoding="utf-8")
        if "<!-- performance:start -->" in text:  # benchmark results: their labels name settings, not pipelines
            before, _, rest = text.partition("<!-- performance:start -->")
            text = before + rest.partition("<!-- performance:end -->")[2]
        for match in pattern.finditer(text):
            text = match.group(1)
            if re.search(r"[|<]|=[A-Z]\b", text):
                continue
            try:
                specs = [PassSpec.parse(item) for item in re.split(r",(?![^{]*\})", text)]
            except PipelineError:
                continue
            if all(s.name in names for s in specs) and (len(specs) > 1 or "{" in text):
                found.append((str(path.relative_to(ROOT)), text))
    return sorted(set(found))


def test_every_pipeline_in_the_docs_and_examples_builds():
    pipelines = _documented_pipelines()
    assert ("README.md", "fuse,prune-heads{ratio=0.25,score=activation,compensate=true}") in pipelines
    assert any("smooth-quant" in text and "quantize" in text for _, text in pipelines)
    failures = []
    for where, text in pipelines:
        try:
            build_pipeline(text)
        except PipelineError as exc:
            failures.append(f"{where}: {text}: {exc}")
    assert not failures, "\n".join(failures)
