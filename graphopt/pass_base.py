"""What a pass is: `Pass` (options as typed dataclass fields), `PassContext`, `PassResult`.

A pass is a dataclass subclass of `Pass` with a registered `name`, a docstring whose first
line says what it does (the rest: what it needs and what it changes), typed option fields,
and `run(graph, ctx) -> PassResult`. Passes must be deterministic functions of (graph,
options, ctx): the same input gives the same output.

    @dataclasses.dataclass
    class DropIdentities(Pass):
        \"\"\"Remove Identity nodes. Needs nothing; rewires their readers to their input.\"\"\"
        name = "drop-identities"
        keep_outputs: bool = True

        def run(self, graph, ctx):
            ...
            return PassResult(changed=True, stats={"removed": n})

Facts (`requires` / `provides` / `invalidates`, see `graphopt.facts`) let the pipeline
builder check ordering before running anything: a pass that `requires = ("attention-fused",)`
must come after one that `provides = ("attention-fused",)`; one that requires a fact an
imported graph starts with (``float32-weights``) must come before any pass that
`invalidates` it.

A pass made of passes subclasses `graphopt.pass_manager.Pipeline` and lists them in
`steps` (see `passes/cleanup.py`); never call another pass's `run` from a pass on the same
graph: the pass manager's instruments (verify, IR dumps, check mode, the report) only see
passes run through it.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Union

from graphopt.errors import GraphoptError

if TYPE_CHECKING:
    from graphopt.ir.graph import Graph


class PipelineError(GraphoptError):
    """A pipeline or a pass option is invalid; raised before any pass runs."""


@dataclasses.dataclass
class PassResult:
    """What a pass did: whether it changed the graph, and figures worth reporting."""

    changed: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassContext:
    """What every pass may consult besides the graph.

    `calibration`: sample inputs (list of {input name: array}) for data-aware passes;
    `target`: the target the graph is bound for (hardware-aware passes ask it, never
    import it); `seed`: for any randomness; `options`: free-form settings;
    `instrumentation`: set by the pass manager while it runs (its instruments and the
    path of the running pipelines); passes leave it alone.
    """

    calibration: Optional[list[dict[str, Any]]] = None
    target: Any = None
    seed: int = 0
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("graphopt"))
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    instrumentation: Any = dataclasses.field(default=None, repr=False)


class Pass:
    """Base class of all passes; subclasses are dataclasses whose fields are options."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    invalidates: ClassVar[tuple[str, ...]] = ()
    """Facts that stop holding after this pass (see `graphopt.facts`)."""
    lossless: ClassVar[bool] = True
    tolerance: ClassVar[float] = 1e-4
    """For lossless passes: the largest output change check mode accepts."""

    def run(self, graph: "Graph", ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "Pass":
        """Instantiate from option values (strings from a pipeline text are converted)."""
        fields = {f.name: f for f in cls.option_fields()}
        hints = typing.get_type_hints(cls) if fields else {}
        values = {}
        for key, raw in options.items():
            if key not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise PipelineError(f"pass '{cls.name}' has no option '{key}' (options: {known})")
            values[key] = coerce_option(cls.name, key, raw, hints.get(key, Any))
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"pass '{cls.name}': {exc}") from None

    def describe(self) -> str:
        """`name{option=value,...}` with the options that differ from their defaults."""
        parts = []
        for field in self.option_fields():
            value = getattr(self, field.name)
            default = field.default if field.default is not dataclasses.MISSING else (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING  # type: ignore[misc]
            )
            if value != default:
                parts.append(f"{field.name}={value}")
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")


def coerce_option(pass_name: str, key: str, value: Any, hint: Any) -> Any:
    """Convert `value` to the option's annotated type, or raise PipelineError naming both."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce_option(pass_name, key, value, option)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(errors[0] if len(errors) == 1 else f"pass '{pass_name}': option '{key}'={value!r} matches none of {_type_name(hint)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise PipelineError(f"pass '{pass_name}': option '{key}' must be one of {', '.join(map(str, args))}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            items = [coerce_option(pass_name, key, v, item) for v in value]
            return items if origin is list else tuple(items)
    elif origin is dict:
        if isinstance(value, dict):
            key_type, value_type = args if args else (Any, Any)
            return {
                coerce_option(pass_name, key, k, key_type): coerce_option(pass_name, key, v, value_type)
                for k, v in value.items()
            }
    hint_text = ""
    if origin in (list, tuple) and isinstance(value, str) and value.lstrip().startswith("["):
        hint_text = " (quote the items of a list: ['a*', 'b'])"
    raise PipelineError(f"pass '{pass_name}': option '{key}' must be {_type_name(hint)}, got {value!r}{hint_text}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
