"""Specs: the ``name[:variant][{key=value,...}]`` text that names a pass or a target with options.

One parser serves pipeline entries (``prune-heads{ratio=0.25}``, `graphopt.pipeline.PassSpec`)
and target specs (``tvm:llvm{mcpu=znver4}``, `graphopt.target_base.TargetSpec`). Option values
are Python literals (numbers, True/False, quoted strings, [lists], {dicts}) or bare words, kept
as strings; the pass or target converts them to its option types
(`graphopt.pass_base.coerce_option`). Errors name the text and the problem, and are raised as
the spec kind's own error type.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Callable, ClassVar, Optional, TypeVar

from graphopt.errors import GraphoptError

_NAME = re.compile(r"[A-Za-z][\w.\-]*")
_VARIANT = re.compile(r"[A-Za-z0-9_\-]+")
_KEY = re.compile(r"[A-Za-z_]\w*")

S = TypeVar("S", bound="Spec")
Fail = Callable[[str], Exception]
"""Builds the exception for a problem found in a spec's text."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed spec: name, optional variant, options (values as written, not yet typed).

    Subclasses name what they parse (`what`, used in errors), an `example` and the `error`
    type their parse errors raise."""

    name: str
    variant: Optional[str] = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    what: ClassVar[str] = "spec"
    example: ClassVar[str] = "'name:variant{option=value}'"
    error: ClassVar[type[GraphoptError]] = GraphoptError

    @classmethod
    def parse(cls: type[S], text: "str | Spec") -> S:
        """``name[:variant][{key=value,...}]``; a spec of this class is returned as is."""
        if isinstance(text, cls):
            return text
        if not isinstance(text, str):
            raise cls.error(f"a {cls.what} is a string such as {cls.example}, got {type(text).__name__}")

        def fail(problem: str) -> Exception:
            return cls.error(f"cannot read {cls.what} {text.strip()!r}: {problem}")

        head, brace, rest = text.partition("{")
        body = None
        if brace:
            if not rest.rstrip().endswith("}"):
                raise fail("unbalanced '{': options end with '}'")
            body = rest.rstrip()[:-1]
            split_top_level(body, ",", fail)  # balance check
        elif "}" in head:
            raise fail("unbalanced '}'")
        name, colon, variant = (part.strip() for part in head.partition(":"))
        if not name:
            raise fail(f"it starts with no name; expected name[:variant][{{option=value,...}}], e.g. {cls.example}")
        if not _NAME.fullmatch(name):
            raise fail(f"{name!r} is not a name (letters, digits, '-', '_', '.'); expected name[:variant][{{option=value,...}}], e.g. {cls.example}")
        if colon and not _VARIANT.fullmatch(variant):
            raise fail(f"{variant!r} after ':' is not a variant name (letters, digits, '-', '_')")
        return cls(name, variant if colon else None, parse_options(body or "", fail))

    def __str__(self) -> str:
        text = self.name + (f":{self.variant}" if self.variant else "")
        if self.options:
            text += "{" + ",".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in self.options.items()) + "}"
        return text


def parse_options(body: str, fail: Fail) -> dict[str, Any]:
    """``key=value,...`` (the text between the braces) as a dict; `fail(problem)` builds
    the exception raised for a malformed entry."""
    options: dict[str, Any] = {}
    for pair in split_top_level(body, ",", fail):
        if not pair.strip():
            continue
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise fail(f"option {pair.strip()!r} is not of the form key=value")
        if not _KEY.fullmatch(key):
            raise fail(f"option name {key!r} is not an identifier")
        if key in options:
            raise fail(f"option '{key}' is given twice")
        options[key] = option_literal(raw.strip())
    return options


def option_literal(text: str) -> Any:
    """A Python literal, or true/false in any case, else the text itself (a bare word)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def mapping_literal(value: Any) -> Optional[dict[str, Any]]:
    """A mapping option's value: a dict as is, or the text ``{key: value, ...}`` whose keys may
    be bare words and whose values are `option_literal`s (so ``{tracker: 127.0.0.1:9190}``
    reads as {"tracker": "127.0.0.1:9190"}); None for anything else."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value.strip().startswith("{") or not value.strip().endswith("}"):
        return None

    def fail(problem: str) -> Exception:
        return ValueError(problem)

    mapping: dict[str, Any] = {}
    try:
        entries = split_top_level(value.strip()[1:-1], ",", fail)
    except ValueError:
        return None
    for entry in entries:
        if not entry.strip():
            continue
        key, sep, raw = entry.partition(":")
        key = key.strip().strip("'\"")
        if not sep or not key:
            return None
        mapping[key] = option_literal(raw.strip())
    return mapping


def split_top_level(text: str, separator: str, fail: Fail) -> list[str]:
    """`text` split at each `separator` outside brackets and quotes; `fail(problem)` builds
    the exception raised when brackets or quotes do not balance."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
            if depth < 0:
                raise fail(f"unbalanced '{char}'")
        elif char == separator and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if depth or quote:
        raise fail("unbalanced brackets or quotes")
    parts.append("".join(current))
    return parts
