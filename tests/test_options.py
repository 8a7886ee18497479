"""The one spec parser behind pipeline entries and target specs (graphopt/options.py)."""

import pytest

from graphopt.options import Spec
from graphopt.pass_base import PipelineError
from graphopt.pipeline import PassSpec, parse_pipeline
from graphopt.target_base import TargetError, TargetSpec


@pytest.mark.parametrize("text, expected", [
    ("prune-heads", Spec("prune-heads")),
    (" tvm : llvm ", Spec("tvm", "llvm")),
    ("my.pass{ratio=0.25, scope=global, on=TRUE}", Spec("my.pass", None, {"ratio": 0.25, "scope": "global", "on": True})),
    ("t:v{names=['a,b', 'c'], table={0: [1, 2]}, word='x}y'}", Spec("t", "v", {"names": ["a,b", "c"], "table": {0: [1, 2]}, "word": "x}y"})),
])
def test_spec_parses_name_variant_and_typed_literals(text, expected):
    assert Spec.parse(text) == expected


def test_pass_and_target_specs_share_the_parser_and_the_text_form():
    target = TargetSpec.parse("tvm:llvm{mcpu=znver4,trials=64}")
    assert (target.name, target.variant, target.options) == ("tvm", "llvm", {"mcpu": "znver4", "trials": 64})
    assert str(target) == "tvm:llvm{mcpu='znver4',trials=64}"
    assert TargetSpec.parse(str(target)) == target
    (entry,) = parse_pipeline("prune-heads{ratio=0.25}")
    assert entry == PassSpec("prune-heads", options={"ratio": 0.25})


@pytest.mark.parametrize("text, message", [
    ("", "cannot read pipeline entry '': it starts with no name"),
    ("9lives", "cannot read pipeline entry '9lives': '9lives' is not a name"),
    ("cleanup{x=1}}", "cannot read pipeline entry 'cleanup{x=1}}': unbalanced '}'"),
    ("cleanup}", "cannot read pipeline entry 'cleanup}': unbalanced '}'"),
    ("cleanup{x=1}y", "cannot read pipeline entry 'cleanup{x=1}y': unbalanced '{': options end with '}'"),
    ("cleanup{x y=1}", "cannot read pipeline entry 'cleanup{x y=1}': option name 'x y' is not an identifier"),
    ("cleanup{rounds}", "cannot read pipeline entry 'cleanup{rounds}': option 'rounds' is not of the form key=value"),
    ("cleanup{a=1,a=2}", "cannot read pipeline entry 'cleanup{a=1,a=2}': option 'a' is given twice"),
    ("cleanup{a='1}", "cannot read pipeline entry \"cleanup{a='1}\": unbalanced brackets or quotes"),
])
def test_malformed_pipeline_entries_name_the_text_and_the_problem(text, message):
    with pytest.raises(PipelineError) as info:
        PassSpec.parse(text)
    assert str(info.value).startswith(message)


def test_a_pass_takes_no_variant():
    with pytest.raises(PipelineError, match=r"cannot read pipeline entry 'cleanup:fast': a pass takes no ':fast' variant"):
        parse_pipeline("cleanup:fast")


def test_a_spec_that_is_not_text_is_refused_with_its_kind_error():
    with pytest.raises(TargetError, match=r"a target spec is a string such as 'tvm:llvm\{mcpu=znver4\}', got int"):
        TargetSpec.parse(3)  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match="a pipeline entry is a string"):
        PassSpec.parse(None)  # type: ignore[arg-type]


def test_a_whole_pipeline_with_unbalanced_brackets_is_refused():
    with pytest.raises(PipelineError, match=r"cannot read pipeline 'cleanup,fold-constants\{max_elements=10': unbalanced"):
        parse_pipeline("cleanup,fold-constants{max_elements=10")
