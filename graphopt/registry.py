"""Registries: passes and targets, built-in and third-party, found by name.

A `Registry` holds the classes of one kind (a base class, an entry-point group, an error
type). Classes register with a decorator (`register_pass`, `graphopt.target_registry.register_target`),
and packages (graphopt's own `graphopt.passes` and `graphopt.targets` included) announce them
through the kind's entry-point group, so the core never imports a pass or target module by
path. Entry points are loaded the first time a name is missing or the list is asked for.

This module also holds the pass registry: `register_pass`, `get_pass`, `registered_passes`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import logging
import re
from typing import Generic, TypeVar

from graphopt.errors import GraphoptError
from graphopt.pass_base import Pass, PipelineError

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*$")
_log = logging.getLogger("graphopt")

C = TypeVar("C", bound=type)


class Registry(Generic[C]):
    """Classes of one `kind` ("pass", "target") by name: subclasses of `base`, dataclasses
    (decorated on registration if needed), announced by plug-ins in entry-point `group`;
    lookups of unknown names raise `error` naming close names or the `listing` command."""

    def __init__(self, kind: str, base: type, group: str, error: type[GraphoptError], listing: str) -> None:
        self.kind, self.base, self.group, self.error, self.listing = kind, base, group, error, listing
        self._classes: dict[str, C] = {}
        self._loaded_entry_points = False

    def register(self, cls: C) -> C:
        """Class decorator: make `cls` available by its `name`; ValueError/TypeError if it
        is not a well-formed class of this kind (a lowercase name, a docstring)."""
        kind, base = self.kind, self.base
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"register_{kind} expects a {base.__name__} subclass, got {cls!r}")
        name = getattr(cls, "name", "")
        if not _NAME.match(name or ""):
            raise ValueError(f"{kind} class {cls.__qualname__} needs a lowercase `name` such as 'my-{kind}', got {name!r}")
        doc = (cls.__doc__ or "").strip()
        if not doc or doc.startswith(cls.__name__ + "("):
            raise ValueError(f"{kind} '{name}' needs a docstring saying what it needs and what it changes")
        if "__dataclass_fields__" not in cls.__dict__:
            cls = dataclasses.dataclass(cls)  # type: ignore[assignment]
        existing = self._classes.get(name)
        if existing is not None and existing is not cls and _qualname(existing) != _qualname(cls):
            raise ValueError(f"{kind} name '{name}' is taken by {_qualname(existing)}")
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> C:
        """The class registered as `name`; `error` with suggestions otherwise."""
        if name not in self._classes:
            self._load_entry_points()
        if name not in self._classes:
            close = difflib.get_close_matches(name, list(self._classes), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"run `{self.listing}` to list them"
            raise self.error(f"unknown {self.kind} '{name}'; {hint}")
        return self._classes[name]

    def all(self) -> dict[str, C]:
        """Every registered class by name, sorted."""
        self._load_entry_points()
        return dict(sorted(self._classes.items()))

    def _load_entry_points(self) -> None:
        """Register every class the entry points of `group` name; a broken or wrong plug-in
        is logged and skipped, never fatal."""
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        for entry in importlib.metadata.entry_points(group=self.group):
            try:
                cls = entry.load()
            except Exception as exc:  # a broken plug-in must not take graphopt down
                _log.warning("graphopt: could not load %s '%s' from %s: %s", self.kind, entry.name, entry.value, exc)
                continue
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                _log.warning("graphopt: entry point '%s' (%s) is not a %s subclass; ignored", entry.name, entry.value, self.base.__name__)
                continue
            if getattr(cls, "name", entry.name) != entry.name:
                _log.warning("graphopt: entry point '%s' names %s '%s'; registering it as '%s'", entry.name, self.kind, cls.name, cls.name)
            try:
                self.register(cls)
            except (TypeError, ValueError) as exc:
                _log.warning("graphopt: entry point '%s' (%s) cannot be registered: %s", entry.name, entry.value, exc)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


PASSES: Registry[type[Pass]] = Registry("pass", Pass, "graphopt.passes", PipelineError, "graphopt passes")

P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator: make a `Pass` subclass (a dataclass) available by its `name`."""
    return PASSES.register(cls)


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`; PipelineError with suggestions otherwise."""
    return PASSES.get(name)


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, sorted."""
    return PASSES.all()
