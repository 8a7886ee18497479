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
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, TypeVar, Union

from graphopt.distributed_calibration import LOCAL, Reducer
from graphopt.errors import GraphoptError
from graphopt.options import Spec

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
    `seed`: for any randomness; `options`: free-form settings;
    `instrumentation`: set by the pass manager while it runs (its instruments and the
    path of the running pipelines); passes leave it alone.
    `reducer`: how statistics of `calibration` combine across ranks when each of several
    processes holds a shard of the samples (`graphopt.distributed_calibration`; the default
    is the no-op of one process). Passes hand it to the collectors of `graphopt.calibration`
    and reduce any other sums over samples through it.
    """

    calibration: Optional[list[dict[str, Any]]] = None
    seed: int = 0
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("graphopt"))
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    instrumentation: Any = dataclasses.field(default=None, repr=False)
    reducer: Reducer = dataclasses.field(default=LOCAL, repr=False)


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
        return configure(cls, options, f"pass '{cls.name}'", PipelineError)

    def describe(self) -> str:
        """`name{option=value,...}` with the options that differ from their defaults, in
        the pipeline text form (`build_pipeline(p.describe())` gives an equal pass)."""
        changed = {f.name: getattr(self, f.name) for f in self.option_fields() if getattr(self, f.name) != field_default(f)}
        return str(Spec(self.name, options=changed))


T = TypeVar("T")


def configure(cls: type[T], options: Mapping[str, Any], owner: str, error: type[GraphoptError], **fixed: Any) -> T:
    """`cls(**fixed, **options)` for a dataclass of options (a pass or a target), each
    option converted to its field's annotated type (`coerce_option`). Raises `error`, naming
    `owner` (e.g. "pass 'prune-heads'", "target 'tvm'"), for an unknown option, a value of
    the wrong type, or a value the class refuses (a TypeError/ValueError it raises)."""
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in fixed] if dataclasses.is_dataclass(cls) else []  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls) if options else {}
    values = {}
    for key, raw in options.items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise error(f"{owner} has no option '{key}' (options: {known})")
        values[key] = coerce_option(owner, key, raw, hints.get(key, Any), error)
    try:
        return cls(**fixed, **values)
    except (TypeError, ValueError) as exc:
        raise error(f"{owner}: {exc}") from None


def field_default(field: dataclasses.Field) -> Any:
    """The field's default value (a fresh one from its factory), or `dataclasses.MISSING`."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def coerce_option(owner: str, key: str, value: Any, hint: Any, error: type[GraphoptError] = PipelineError) -> Any:
    """Convert `value` to the option's annotated type, or raise `error` naming `owner`
    (e.g. "pass 'prune-heads'"), the option and the type."""
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
                return coerce_option(owner, key, value, option, error)
            except error as exc:
                errors.append(str(exc))
        raise error(errors[0] if len(errors) == 1 else f"{owner}: option '{key}'={value!r} matches none of {_type_name(hint)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise error(f"{owner}: option '{key}' must be one of {', '.join(map(str, args))}, got {value!r}")
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
            items = [coerce_option(owner, key, v, item, error) for v in value]
            return items if origin is list else tuple(items)
    elif origin is dict:
        if isinstance(value, dict):
            key_type, value_type = args if args else (Any, Any)
            return {
                coerce_option(owner, key, k, key_type, error): coerce_option(owner, key, v, value_type, error)
                for k, v in value.items()
            }
    hint_text = ""
    if origin in (list, tuple) and isinstance(value, str) and value.lstrip().startswith("["):
        hint_text = " (quote the items of a list: ['a*', 'b'])"
    raise error(f"{owner}: option '{key}' must be {_type_name(hint)}, got {value!r}{hint_text}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
