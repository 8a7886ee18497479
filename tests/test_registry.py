"""The one registry type behind passes and targets (graphopt/registry.py)."""

import dataclasses

import pytest

from graphopt.errors import GraphoptError
from graphopt.pass_base import PipelineError
from graphopt.registry import Registry, get_pass
from graphopt.target_base import TargetError
from graphopt.target_registry import get_target


class Widget:
    name = ""


class WidgetError(GraphoptError):
    pass


def _registry() -> Registry:
    return Registry("widget", Widget, "graphopt.test-widgets-none", WidgetError, "graphopt widgets")


def test_registry_registers_dataclasses_and_lists_them_sorted():
    widgets = _registry()

    @widgets.register
    class Zeta(Widget):
        """The last widget."""
        name = "zeta"
        size: int = 1

    @widgets.register
    class Alpha(Widget):
        """The first widget."""
        name = "alpha"

    assert list(widgets.all()) == ["alpha", "zeta"]
    assert widgets.get("zeta") is Zeta and dataclasses.is_dataclass(Zeta)
    assert Zeta(size=3).size == 3


def test_a_subclass_of_a_registered_class_gets_its_own_dataclass_fields():
    widgets = _registry()

    @widgets.register
    class Base(Widget):
        """A base."""
        name = "base"
        a: int = 1

    @widgets.register
    class Derived(Base):
        """Adds an option."""
        name = "derived"
        b: int = 2

    assert [f.name for f in dataclasses.fields(Derived)] == ["a", "b"]


@pytest.mark.parametrize("name, doc, error, message", [
    ("Bad Name", "Doc.", ValueError, "widget class W needs a lowercase `name` such as 'my-widget', got 'Bad Name'"),
    ("ok", None, ValueError, "widget 'ok' needs a docstring saying what it needs and what it changes"),
])
def test_malformed_classes_are_refused(name, doc, error, message):
    widgets = _registry()
    cls = type("W", (Widget,), {"name": name, "__doc__": doc})
    with pytest.raises(error) as info:
        widgets.register(cls)
    assert str(info.value) == message
    with pytest.raises(TypeError, match="register_widget expects a Widget subclass, got 3"):
        widgets.register(3)


def test_a_taken_name_is_refused():
    widgets = _registry()
    widgets.register(type("One", (Widget,), {"name": "w", "__doc__": "One.", "__module__": "m1"}))
    with pytest.raises(ValueError, match=r"widget name 'w' is taken by m1.One"):
        widgets.register(type("Two", (Widget,), {"name": "w", "__doc__": "Two.", "__module__": "m2"}))


def test_unknown_names_raise_the_kinds_error_with_suggestions_or_the_listing():
    widgets = _registry()
    widgets.register(type("W", (Widget,), {"name": "sprocket", "__doc__": "A sprocket."}))
    with pytest.raises(WidgetError, match=r"^unknown widget 'sprocet'; did you mean 'sprocket'\?$"):
        widgets.get("sprocet")
    with pytest.raises(WidgetError, match=r"^unknown widget 'gear'; run `graphopt widgets` to list them$"):
        widgets.get("gear")


def test_passes_and_targets_use_the_same_lookup():
    with pytest.raises(PipelineError, match=r"^unknown pass 'fuse-atention'; did you mean 'fuse-attention'"):
        get_pass("fuse-atention")
    with pytest.raises(TargetError, match=r"^unknown target 'tpu'; run `graphopt targets` to list them$"):
        get_target("tpu")
