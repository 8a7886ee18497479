"""The target registry: built-in and third-party targets, found by name (a `Registry`).

Targets register with `@register_target`, and packages (graphopt's own `graphopt.targets`
included) announce them through the `graphopt.targets` entry-point group, so the core never
imports a target module by path.
"""

from __future__ import annotations

from typing import TypeVar

from graphopt.registry import Registry
from graphopt.target_base import Target, TargetError, TargetSpec

TARGETS: Registry[type[Target]] = Registry("target", Target, "graphopt.targets", TargetError, "graphopt targets")

T = TypeVar("T", bound=type[Target])


def register_target(cls: T) -> T:
    """Class decorator: make a `Target` subclass available by its `name`."""
    return TARGETS.register(cls)


def get_target(spec: "str | TargetSpec") -> Target:
    """A configured target for `spec` ('onnxruntime:cpu{threads=2}'); TargetError if unknown."""
    parsed = TargetSpec.parse(spec)
    return TARGETS.get(parsed.name).from_spec(parsed)


def registered_targets() -> dict[str, type[Target]]:
    """Every registered target by name, sorted."""
    return TARGETS.all()
