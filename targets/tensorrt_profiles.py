"""TensorRT optimization profiles: a (min, opt, max) range for every dynamic dim of the inputs.

A TensorRT engine with dynamic input dims needs, per input, the smallest, the tuned-for and
the largest shape it will be called with. graphopt states ranges per *dim name*, so inputs
that share a symbolic dim (``input_ids`` and ``attention_mask`` both ``[batch, seq]``) get the
same range, as the model needs them equal at run time:

- the `profiles` option, ``{batch: [1, 8, 32], seq: [1, 128, 512]}`` (bare or quoted names;
  a single int fixes the dim: ``{batch: 1}`` is ``[1, 1, 1]``), overrides the defaults;
- defaults: a dim first seen at axis 0 of an input of rank >= 2 is a batch dim, ``[1, 1, 32]``
  (`DEFAULT_BATCH`); any other dynamic dim (a sequence length) ``[1, 128, 512]``
  (`DEFAULT_OTHER`);
- a dynamic dim without a name (None) is named ``<input>.<axis>`` (e.g. ``pixel_values.0``);
- static dims are fixed at their size and take no range; naming one is an error.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from graphopt.ir.graph import Graph
from graphopt.options import mapping_literal
from graphopt.target_base import TargetError

DimRange = tuple[int, int, int]
DEFAULT_BATCH: DimRange = (1, 1, 32)
"""(min, opt, max) of a dynamic dim at axis 0 of a rank >= 2 input: one sample tuned for, up to 32."""
DEFAULT_OTHER: DimRange = (1, 128, 512)
"""(min, opt, max) of every other dynamic dim (sequence lengths): tuned for 128 tokens, up to 512."""


def parse_profiles(value: "dict[str, Any] | str | None") -> dict[str, DimRange]:
    """The `profiles` option as {dim name: (min, opt, max)}; TargetError naming a bad entry."""
    if value is None or value == "":
        return {}
    given = value
    value = mapping_literal(value)
    if value is None:
        raise TargetError(
            f"target 'tensorrt': option 'profiles' must be a mapping such as "
            f"{{batch: [1, 8, 32], seq: [1, 128, 512]}}, got {given!r}"
        )
    return {str(name): _dim_range(str(name), raw) for name, raw in value.items()}


def _dim_range(name: str, raw: Any) -> DimRange:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = (raw, raw, raw)
    if not isinstance(raw, (list, tuple)) or len(raw) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        raise TargetError(f"target 'tensorrt': option 'profiles': dim {name!r} needs [min, opt, max] (three ints) or one int, got {raw!r}")
    low, opt, high = raw
    if low < 1:
        raise TargetError(f"target 'tensorrt': option 'profiles': dim {name!r}: min {low} must be >= 1")
    if opt < low:
        raise TargetError(f"target 'tensorrt': option 'profiles': dim {name!r}: opt {opt} < min {low}; need min <= opt <= max")
    if high < opt:
        raise TargetError(f"target 'tensorrt': option 'profiles': dim {name!r}: max {high} < opt {opt}; need min <= opt <= max")
    return (low, opt, high)


def dynamic_dims(graph: Graph) -> dict[str, DimRange]:
    """Every dynamic dim of the graph's inputs, by name, with its default range."""
    dims: dict[str, DimRange] = {}
    for value in graph.inputs:
        for axis, dim in enumerate(_shape(value.name, value.shape)):
            if isinstance(dim, int):
                continue
            name = dim if dim is not None else f"{value.name}.{axis}"
            if name not in dims:
                dims[name] = DEFAULT_BATCH if axis == 0 and len(value.shape) >= 2 else DEFAULT_OTHER  # type: ignore[arg-type]
    return dims


def compute_profiles(graph: Graph, overrides: dict[str, DimRange]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """{input name: (min shape, opt shape, max shape)} for the inputs with dynamic dims."""
    ranges = dynamic_dims(graph)
    unknown = [name for name in overrides if name not in ranges]
    if unknown:
        raise TargetError(_unknown_dims_message(graph, unknown, ranges))
    ranges.update(overrides)
    profiles = {}
    for value in graph.inputs:
        shape = _shape(value.name, value.shape)
        if all(isinstance(dim, int) for dim in shape):
            continue
        per_axis = [
            (dim, dim, dim) if isinstance(dim, int) else ranges[dim if dim is not None else f"{value.name}.{axis}"]
            for axis, dim in enumerate(shape)
        ]
        profiles[value.name] = tuple(tuple(r[i] for r in per_axis) for i in range(3))  # type: ignore[misc]
    return profiles  # type: ignore[return-value]


def _shape(name: str, shape: Optional[Sequence[Any]]) -> Sequence[Any]:
    if shape is None:
        raise TargetError(f"input {name!r} has an unknown rank; TensorRT needs every input's rank (give the model input shapes)")
    return shape


def _unknown_dims_message(graph: Graph, unknown: list[str], ranges: dict[str, DimRange]) -> str:
    static = []
    for name in unknown:
        input_name, _, axis = name.rpartition(".")
        value = next((v for v in graph.inputs if v.name == input_name), None)
        if value is not None and axis.isdigit() and value.shape is not None and int(axis) < len(value.shape):
            static.append(f"dim {axis} of input {input_name!r} is static ({value.shape[int(axis)]}) and takes no range")
    if static:
        return "target 'tensorrt': option 'profiles': " + "; ".join(static)
    known = ", ".join(ranges) or "none: every input dim is static"
    listed = ", ".join(repr(n) for n in unknown)
    return f"target 'tensorrt': option 'profiles' names {listed}, which no input has as a dynamic dim (dynamic dims: {known})"
