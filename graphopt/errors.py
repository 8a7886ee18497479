"""Exceptions graphopt raises. Every message names what the user can act on."""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class GraphError(GraphoptError):
    """An illegal edit of an IR graph (e.g. erasing a node whose outputs are still used)."""


class VerificationError(GraphoptError):
    """`verify()` found the graph malformed; the message lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("graph verification failed:\n  " + "\n  ".join(problems))


class ModelLoadError(GraphoptError):
    """A model file or object could not be read as what it claims to be."""


class UnsupportedOpError(GraphoptError):
    """An op that a frontend, exporter or target cannot handle; names the op."""


class ExportError(GraphoptError):
    """A graph could not be written or converted to the requested format."""
