"""Pipelines: which passes run, in which order, with which options.

Accepted forms (all give a list of `PassSpec`):
- text: ``"cleanup,fuse-attention,prune-heads{ratio=0.25,scope=global}"``; option values
  are Python literals (numbers, True/False, quoted strings, [lists], {dicts}) or bare words;
- a .json / .yaml / .yml file (or the parsed object): a list whose items are pass names or
  ``{name: {option: value}}`` mappings, optionally under a top-level ``pipeline`` key;
- a Python list of names, `PassSpec`s, `(name, options)` pairs or `Pass` instances.

`build_pipeline` turns specs into configured `Pass` objects and checks, before anything
runs, that every name exists, every option has the right type and every pass's `requires`
holds where it runs (`graphopt.facts`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence, Union

from graphopt.facts import check_facts
from graphopt.options import Spec, split_top_level
from graphopt.pass_base import Pass, PipelineError
from graphopt.registry import get_pass


class PassSpec(Spec):
    """One pipeline entry before it is bound to a pass class (`name{option=value,...}`)."""

    what = "pipeline entry"
    example = "'prune-heads{ratio=0.25}'"
    error = PipelineError


PipelineLike = Union[str, os.PathLike, Sequence[Any], dict]


def parse_pipeline(pipeline: PipelineLike) -> list[PassSpec]:
    """Parse any accepted pipeline form into specs (see the module docstring)."""
    if isinstance(pipeline, os.PathLike) or (isinstance(pipeline, str) and _looks_like_file(pipeline)):
        return _parse_structured(_load_file(os.fspath(pipeline)), source=os.fspath(pipeline))
    if isinstance(pipeline, str):
        items = split_top_level(pipeline, ",", lambda problem: PipelineError(f"cannot read pipeline {pipeline!r}: {problem}"))
        return [_parse_item(item) for item in items if item.strip()]
    if isinstance(pipeline, dict):
        return _parse_structured(pipeline, source="pipeline")
    if isinstance(pipeline, Sequence):
        return _parse_structured(list(pipeline), source="pipeline")
    raise PipelineError(f"a pipeline is a string, a file path or a list, got {type(pipeline).__name__}")


def build_pipeline(pipeline: Union[PipelineLike, Sequence[Pass]]) -> list[Pass]:
    """Configured passes for `pipeline`, validated as a whole before anything runs."""
    if isinstance(pipeline, Sequence) and not isinstance(pipeline, str) and all(isinstance(p, Pass) for p in pipeline):
        passes = list(pipeline)  # type: ignore[arg-type]
    else:
        passes = []
        for spec in parse_pipeline(pipeline):  # type: ignore[arg-type]
            passes.append(get_pass(spec.name).from_options(spec.options))
    if not passes:
        raise PipelineError("the pipeline is empty")
    check_order(passes)
    return passes


def check_order(passes: Sequence[Pass]) -> None:
    """Raise PipelineError if a pass needs a fact that does not hold where it runs: one no
    earlier pass provides, or one an imported graph starts with (`graphopt.facts.INITIAL_FACTS`)
    that an earlier pass removed."""
    check_facts(passes)


def format_pipeline(passes: Sequence[Pass]) -> str:
    """The text form of configured passes (round-trips through `parse_pipeline`)."""
    return ",".join(p.describe() for p in passes)


def _looks_like_file(text: str) -> bool:
    return text.strip().lower().endswith((".json", ".yaml", ".yml")) and "{" not in text and "," not in text


def _load_file(path: str) -> Any:
    if not os.path.exists(path):
        raise PipelineError(f"{path}: no such pipeline file")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a pipeline file is JSON or YAML") from None
    if path.lower().endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{path}: not valid JSON ({exc})") from None
    try:
        import yaml
    except ImportError:
        raise PipelineError(f"{path}: reading YAML pipelines needs PyYAML (pip install pyyaml), or use JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def _parse_structured(data: Any, source: str) -> list[PassSpec]:
    if isinstance(data, dict) and "pipeline" in data:
        data = data["pipeline"]
    if isinstance(data, str):
        return parse_pipeline(data)
    if not isinstance(data, list):
        raise PipelineError(f"{source}: a pipeline is a list of passes, got {type(data).__name__}")
    specs = []
    for position, item in enumerate(data, start=1):
        if isinstance(item, PassSpec):
            specs.append(item)
        elif isinstance(item, str):
            specs.append(_parse_item(item))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict):
            specs.append(PassSpec(item[0], options=dict(item[1])))
        elif isinstance(item, dict) and len(item) == 1:
            name, options = next(iter(item.items()))
            if options is None:
                options = {}
            if not isinstance(options, dict):
                raise PipelineError(f"{source}: entry {position} ('{name}'): options must be a mapping, got {options!r}")
            specs.append(PassSpec(str(name), options=dict(options)))
        else:
            raise PipelineError(f"{source}: entry {position} is not a pass name or {{name: options}}: {item!r}")
    return specs


def _parse_item(text: str) -> PassSpec:
    spec = PassSpec.parse(text)
    if spec.variant is not None:
        raise PipelineError(f"cannot read pipeline entry {text.strip()!r}: a pass takes no ':{spec.variant}' variant")
    return spec
