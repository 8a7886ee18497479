"""The target registry: built-in and third-party targets, found by name.

Targets register with `@register_target`, and packages (graphopt's own `graphopt.targets`
included) announce them through the `graphopt.targets` entry-point group, so the core never
imports a target module by path. Entry points load the first time a name is looked up.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TypeVar

from graphopt.registry import load_plugins
from graphopt.target_base import Target, TargetError, TargetSpec

ENTRY_POINT_GROUP = "graphopt.targets"
_TARGETS: dict[str, type[Target]] = {}
_loaded_entry_points = False

T = TypeVar("T", bound=type[Target])


def register_target(cls: T) -> T:
    """Class decorator: make a `Target` subclass available by its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Target)):
        raise TypeError(f"register_target expects a Target subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"target class {cls.__qualname__} needs a `name` such as 'my-target'")
    if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
        cls = dataclasses.dataclass(cls)  # type: ignore[assignment]
    _TARGETS[cls.name] = cls
    return cls


def get_target(spec: "str | TargetSpec") -> Target:
    """A configured target for `spec` ('onnxruntime:cpu{threads=2}'); TargetError if unknown."""
    parsed = TargetSpec.parse(spec)
    if parsed.name not in _TARGETS:
        _load_entry_points()
    cls = _TARGETS.get(parsed.name)
    if cls is None:
        close = difflib.get_close_matches(parsed.name, list(_TARGETS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(sorted(_TARGETS)) or "none"
        raise TargetError(f"unknown target '{parsed.name}'{hint} (targets: {known})")
    return cls.from_spec(parsed)


def registered_targets() -> dict[str, type[Target]]:
    """Every registered target by name, sorted."""
    _load_entry_points()
    return dict(sorted(_TARGETS.items()))


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    load_plugins(ENTRY_POINT_GROUP, Target, register_target, "target")
