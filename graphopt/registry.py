"""The pass registry: built-in and third-party passes, found by name.

Passes register with `@register_pass`, and packages (graphopt's own `graphopt.passes`
included) announce them through the `graphopt.passes` entry-point group, so the core never
imports a pass module by path. Entry points are loaded the first time a name is looked up
or the list is asked for.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import logging
import re
from typing import Any, Callable, TypeVar

from graphopt.pass_base import Pass, PipelineError

ENTRY_POINT_GROUP = "graphopt.passes"
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*$")
_PASSES: dict[str, type[Pass]] = {}
_loaded_entry_points = False
_log = logging.getLogger("graphopt")

P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator: make a `Pass` subclass (a dataclass) available by its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"register_pass expects a Pass subclass, got {cls!r}")
    if not _NAME.match(cls.name or ""):
        raise ValueError(f"pass class {cls.__qualname__} needs a lowercase `name` such as 'my-pass', got {cls.name!r}")
    doc = (cls.__doc__ or "").strip()
    if not doc or doc.startswith(cls.__name__ + "("):
        raise ValueError(f"pass '{cls.name}' needs a docstring saying what it needs and what it changes")
    if not dataclasses.is_dataclass(cls):
        cls = dataclasses.dataclass(cls)  # type: ignore[assignment]
    existing = _PASSES.get(cls.name)
    if existing is not None and existing is not cls and _qualname(existing) != _qualname(cls):
        raise ValueError(f"pass name '{cls.name}' is taken by {_qualname(existing)}")
    _PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`; PipelineError with suggestions otherwise."""
    if name not in _PASSES:
        _load_entry_points()
    if name not in _PASSES:
        close = difflib.get_close_matches(name, list(_PASSES), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; run `graphopt passes` to list them"
        raise PipelineError(f"unknown pass '{name}'{hint}")
    return _PASSES[name]


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, sorted."""
    _load_entry_points()
    return dict(sorted(_PASSES.items()))


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    load_plugins(ENTRY_POINT_GROUP, Pass, register_pass, "pass")


def load_plugins(group: str, base: type, register: Callable[[Any], Any], kind: str) -> None:
    """Register every class the entry points of `group` name; a broken or wrong plug-in
    is logged and skipped, never fatal."""
    for entry in importlib.metadata.entry_points(group=group):
        try:
            cls = entry.load()
        except Exception as exc:  # a broken plug-in must not take graphopt down
            _log.warning("graphopt: could not load %s '%s' from %s: %s", kind, entry.name, entry.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, base)):
            _log.warning("graphopt: entry point '%s' (%s) is not a %s subclass; ignored", entry.name, entry.value, base.__name__)
            continue
        if getattr(cls, "name", entry.name) != entry.name:
            _log.warning("graphopt: entry point '%s' names %s '%s'; registering it as '%s'", entry.name, kind, cls.name, cls.name)
        register(cls)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
