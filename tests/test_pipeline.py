"""Pipelines parse from text, files and lists, and bad ones fail before any work."""

import dataclasses
import json
from typing import Literal, Optional

import pytest

import graphopt
from graphopt import Pass, PassResult, PipelineError, register_pass
from graphopt.pipeline import PassSpec, build_pipeline, format_pipeline, parse_pipeline


@register_pass
@dataclasses.dataclass
class _Tunable(Pass):
    """Test pass with typed options. Needs nothing; changes nothing."""

    name = "test-tunable"
    ratio: float = 0.5
    steps: int = 1
    mode: Literal["fast", "exact"] = "fast"
    heads: Optional[dict[int, list[int]]] = None
    enabled: bool = True

    def run(self, graph, ctx):
        return PassResult(False)


@register_pass
@dataclasses.dataclass
class _Provider(Pass):
    """Test pass that provides a fact."""

    name = "test-provide-fact"
    provides = ("fact-a",)

    def run(self, graph, ctx):
        return PassResult(False)


@register_pass
@dataclasses.dataclass
class _Consumer(Pass):
    """Test pass that needs a fact."""

    name = "test-need-fact"
    requires = ("fact-a",)

    def run(self, graph, ctx):
        return PassResult(False)


def test_text_form_with_options():
    specs = parse_pipeline("test-tunable{ratio=0.25,steps=3,mode='exact',heads={0: [1, 2]},enabled=false}, test-provide-fact")
    assert specs == [
        PassSpec("test-tunable", options={"ratio": 0.25, "steps": 3, "mode": "exact", "heads": {0: [1, 2]}, "enabled": False}),
        PassSpec("test-provide-fact"),
    ]


def test_bare_word_values_and_typed_conversion():
    (tunable,) = build_pipeline("test-tunable{mode=exact,ratio=1,enabled=yes}")
    assert tunable.mode == "exact" and tunable.ratio == 1.0 and isinstance(tunable.ratio, float) and tunable.enabled is True


def test_json_and_list_forms_agree(tmp_path):
    path = tmp_path / "pipe.json"
    path.write_text(json.dumps({"pipeline": ["test-provide-fact", {"test-tunable": {"ratio": 0.25}}]}))
    from_file = build_pipeline(str(path))
    from_list = build_pipeline(["test-provide-fact", ("test-tunable", {"ratio": 0.25})])
    from_text = build_pipeline("test-provide-fact,test-tunable{ratio=0.25}")
    assert format_pipeline(from_file) == format_pipeline(from_list) == format_pipeline(from_text) == "test-provide-fact,test-tunable{ratio=0.25}"


def test_yaml_file(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(["test-provide-fact", {"test-tunable": {"steps": 4}}]))
    assert format_pipeline(build_pipeline(path)) == "test-provide-fact,test-tunable{steps=4}"


def test_unknown_pass_suggests_close_names():
    with pytest.raises(PipelineError, match=r"unknown pass 'test-tunabel'; did you mean 'test-tunable'"):
        build_pipeline("test-tunabel")


def test_unknown_option_lists_the_options():
    with pytest.raises(PipelineError, match=r"pass 'test-tunable' has no option 'ratios' \(options: enabled, heads, mode, ratio, steps\)"):
        build_pipeline("test-tunable{ratios=0.1}")


@pytest.mark.parametrize("text, message", [
    ("test-tunable{steps=0.5}", "option 'steps' must be int, got 0.5"),
    ("test-tunable{ratio=high}", "option 'ratio' must be float, got 'high'"),
    ("test-tunable{mode=slow}", "option 'mode' must be one of fast, exact, got 'slow'"),
    ("test-tunable{heads=[1]}", "option 'heads'"),
    ("smooth-quant{exclude=[MatMul_*,*dense*]}", "option 'exclude' must be list, got .* .quote the items of a list"),
    ("test-tunable{ratio}", "is not of the form key=value"),
    ("test-tunable{ratio=0.1", "unbalanced"),
])
def test_bad_option_values_name_pass_and_option(text, message):
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_pipeline(text)


def test_wrong_order_is_reported_before_running():
    with pytest.raises(PipelineError, match=r"pass 'test-need-fact' \(position 1\) needs 'fact-a', which no earlier pass provides; move 'test-provide-fact' before it"):
        build_pipeline("test-need-fact,test-provide-fact")
    build_pipeline("test-provide-fact,test-need-fact")


def test_empty_and_malformed_pipelines(tmp_path):
    with pytest.raises(PipelineError, match="empty"):
        build_pipeline("")
    with pytest.raises(PipelineError, match="no such pipeline file"):
        build_pipeline(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(PipelineError, match="not valid JSON"):
        build_pipeline(str(bad))
    with pytest.raises(PipelineError, match="entry 1 is not a pass name"):
        build_pipeline([42])


def test_registering_requires_docstring_and_name():
    with pytest.raises(ValueError, match="needs a docstring"):
        @register_pass
        @dataclasses.dataclass
        class NoDoc(Pass):
            name = "test-no-doc"
    with pytest.raises(ValueError, match="needs a lowercase `name`"):
        @register_pass
        class BadName(Pass):
            """Doc."""
            name = "Bad Name"


def test_registered_passes_include_test_passes():
    assert {"test-tunable", "test-provide-fact", "test-need-fact"} <= set(graphopt.registered_passes())
    assert graphopt.get_pass("test-tunable").summary() == "Test pass with typed options. Needs nothing; changes nothing."


@pytest.mark.parametrize("text", [
    "prune-heads{heads={0: [1, 2]},score=activation,scope=per-layer}",
    "quantize{mode=dynamic,exclude=['a*', 'b, c']}",
    "smooth-quant{alpha=auto,exclude=['x']}",
    "low-rank{energy=0.9,min_size=16}",
    "cleanup{max_iterations=4}",
])
def test_describe_round_trips_through_the_pipeline_parser(text):
    (item,) = build_pipeline(["fuse", text])[1:] if text.startswith("prune-heads") else build_pipeline(text)
    again = build_pipeline(["fuse", item.describe()])[1] if item.name == "prune-heads" else build_pipeline(item.describe())[0]
    assert again == item
    assert again.describe() == item.describe()
