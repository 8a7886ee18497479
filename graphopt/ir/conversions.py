"""Conversions of a `Graph` to other formats, reached by format name.

The IR does not know its exporters: an exporter package registers a function per format
(`register_conversion("onnx", fn)`), and `Graph.to_onnx` and friends call `convert`. Keeping
the exporters out of the IR's imports makes the IR the bottom layer of graphopt (see
docs/architecture.md); `import graphopt` registers the built-in formats ("onnx",
"onnx-file", "fx") as thunks that import the exporter only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from graphopt.errors import ExportError

if TYPE_CHECKING:
    from graphopt.ir.graph import Graph

Conversion = Callable[..., Any]
"""`fn(graph, *args, **options)`: the graph in another format (or written to a file)."""

_CONVERSIONS: dict[str, Conversion] = {}


def register_conversion(name: str, fn: Conversion) -> None:
    """Make `convert(name, graph, ...)` call `fn(graph, ...)`; a second registration of one
    name replaces the first."""
    _CONVERSIONS[name] = fn


def registered_conversions() -> list[str]:
    """The names of the formats a graph can be converted to, sorted."""
    return sorted(_CONVERSIONS)


def convert(name: str, graph: "Graph", *args: Any, **options: Any) -> Any:
    """`graph` converted by the conversion registered for format `name`."""
    fn = _CONVERSIONS.get(name)
    if fn is None:
        known = ", ".join(registered_conversions()) or "none"
        raise ExportError(
            f"no conversion to '{name}' is registered (registered: {known}); "
            "`import graphopt` registers the built-in exporters, a plugin registers its own "
            "with graphopt.ir.conversions.register_conversion"
        )
    return fn(graph, *args, **options)
