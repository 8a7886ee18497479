"""Feeding and reading ONNX Runtime sessions whose graph inputs/outputs have low-precision types.

ORT's Python API takes and returns numpy arrays of the standard types only: bfloat16, float8,
float4, int4/uint4 and int2/uint2 arrays (ml_dtypes) fail at `session.run`, and float8e4m3fn
outputs come back as uint8. `widen_session_model` rewrites a copy of the model given to the
session (never the saved artifact) and returns the `SessionIO` that runs it exactly
(`reference_session` builds the CPU session graphopt's own reference runs use):

- byte-sized types (bfloat16, the float8 types) go in and come out as their raw bytes
  (OrtValues of the ONNX type; a Cast through float32 would drop NaN payloads and, with ORT's
  default saturation, turn float8e5m2 infinities into the largest finite value);
- sub-byte types (ORT packs two or four per byte) are widened by exact Casts: a graph input
  `x` becomes a wide input (float32 for float4e2m1, int8 for int4/int2, uint8 for uint4/uint2)
  followed by ``Cast(to=low type)`` producing `x`, and a graph output gets ``Cast(to=wide)``
  appended; feeds are cast to the wide type and results back, both exact for every value.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

from graphopt.ir.dtypes import DType

RAW_TYPES = (DType.BFLOAT16, DType.FLOAT8E4M3FN, DType.FLOAT8E4M3FNUZ, DType.FLOAT8E5M2, DType.FLOAT8E5M2FNUZ, DType.FLOAT8E8M0)
"""Passed to and read from ORT as raw bytes."""

WIDE_TYPES = {DType.FLOAT4E2M1: DType.FLOAT, DType.INT4: DType.INT8, DType.UINT4: DType.UINT8, DType.INT2: DType.INT8, DType.UINT2: DType.UINT8}
"""Sub-byte types and the type an exact Cast widens each to around the session."""


@dataclasses.dataclass
class SessionIO:
    """How to feed and read a session built on a model `widen_session_model` rewrote."""

    raw_inputs: dict[str, DType] = dataclasses.field(default_factory=dict)
    """Input name: low-precision type fed as raw bytes."""
    wide_inputs: dict[str, tuple[str, DType]] = dataclasses.field(default_factory=dict)
    """Input name: (the session's wide input name, the wide type)."""
    raw_outputs: dict[int, DType] = dataclasses.field(default_factory=dict)
    """Output index: low-precision type read back from raw bytes."""
    wide_outputs: dict[int, DType] = dataclasses.field(default_factory=dict)
    """Output index: the low-precision type a wide result is cast back to."""
    casts: dict[str, str] = dataclasses.field(default_factory=dict)
    """Name of each Cast node added: what it widens (e.g. "input 'x' (FLOAT4E2M1)")."""

    def explain(self, message: str) -> str:
        """`message` (ORT's error on loading the widened model) with, where it names a Cast
        this module added, which graph input/output that Cast widens and why."""
        for node, what in self.casts.items():
            if f"'{node}'" in message or f"({node})" in message:
                return f"{message} (the Cast graphopt adds around {what} so ONNX Runtime's Python API can feed/return it; this ONNX Runtime has no kernel for it)"
        return message

    def __bool__(self) -> bool:
        return bool(self.raw_inputs or self.wide_inputs or self.raw_outputs or self.wide_outputs)

    def run(self, session: Any, feeds: dict[str, Any], wanted: Optional[set[str]] = None) -> list[Any]:
        """Run `session` on numpy `feeds` keyed by the original input names (names the session
        does not take, i.e. not in `wanted`, by default read from the session, are ignored);
        outputs in the model's types (ml_dtypes where low-precision)."""
        if wanted is None:
            wanted = {i.name for i in session.get_inputs()}
        chosen = {}
        for name, array in feeds.items():
            if name in self.wide_inputs:
                wide_name, wide = self.wide_inputs[name]
                chosen[wide_name] = _as_array(array).astype(wide.to_numpy())
            elif name in wanted:
                chosen[name] = array
        if not self.raw_inputs and not self.raw_outputs:
            outputs = session.run(None, chosen)
        else:
            outputs = [self._read(i, o) for i, o in enumerate(session.run_with_ort_values(None, self._ort_values(chosen)))]
        return [out.astype(self.wide_outputs[i].to_numpy()) if i in self.wide_outputs else out for i, out in enumerate(outputs)]

    def _ort_values(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        from onnxruntime import OrtValue

        values = {}
        for name, array in feeds.items():
            array = np.require(_as_array(array), requirements="C")  # keeps 0-d (ascontiguousarray makes it 1-d)
            if name in self.raw_inputs:
                dtype = self.raw_inputs[name]
                if array.dtype != dtype.to_numpy():
                    from graphopt.errors import GraphoptError

                    raise GraphoptError(f"input {name!r}: expected dtype {dtype.to_numpy().name}, got {array.dtype.name}")
                values[name] = OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(f"uint{8 * array.itemsize}"), int(dtype))
            else:
                values[name] = OrtValue.ortvalue_from_numpy(array)
        return values

    def _read(self, index: int, value: Any) -> Any:
        if index not in self.raw_outputs:
            return value.numpy()
        return _raw_array(value, self.raw_outputs[index])


def widen_session_model(model: Any) -> SessionIO:
    """Rewrite ONNX `model` (in place: pass the copy a session is built from) so that ORT's
    Python API can feed and return its low-precision graph inputs/outputs; return the
    `SessionIO` that runs a session on it."""
    io = SessionIO()
    initializers = {t.name for t in model.graph.initializer}
    taken = _all_names(model.graph)
    cast_nodes = []
    for value in model.graph.input:
        dtype = _elem_type(value)
        if value.name in initializers or dtype is None:
            continue
        if dtype in RAW_TYPES:
            io.raw_inputs[value.name] = dtype
        elif dtype in WIDE_TYPES:
            wide = WIDE_TYPES[dtype]
            wide_name = _fresh(f"{value.name}__{wide.name.lower()}", taken)
            cast_nodes.append(_cast(wide_name, value.name, dtype, io.casts, f"input {value.name!r} ({dtype.name})"))
            io.wide_inputs[value.name] = (wide_name, wide)
            value.name = wide_name
            value.type.tensor_type.elem_type = int(wide)
    for index, value in enumerate(model.graph.output):
        dtype = _elem_type(value)
        if dtype in RAW_TYPES:
            io.raw_outputs[index] = dtype
        elif dtype in WIDE_TYPES:
            wide = WIDE_TYPES[dtype]
            wide_name = _fresh(f"{value.name}__{wide.name.lower()}", taken)
            model.graph.node.append(_cast(value.name, wide_name, wide, io.casts, f"output {value.name!r} ({dtype.name})"))
            io.wide_outputs[index] = dtype
            value.name = wide_name
            value.type.tensor_type.elem_type = int(wide)
    if cast_nodes:
        nodes = cast_nodes + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return io


def session_model_file(path: str, options: Any) -> tuple[Any, SessionIO]:
    """The source to build a session from for the saved model at `path` (left as written) and
    its `SessionIO`: `path` itself when no IO needs a Cast, else the serialized widened copy
    (its external data still read from `path`'s folder: `options` is told where)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    io = widen_session_model(model)
    if not io.wide_inputs and not io.wide_outputs:
        return path, io
    folder = os.path.dirname(os.path.abspath(path))
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    return model.SerializeToString(), io


def reference_session(model: Any, *, threads: int = 0, optimize: bool = False, widen_io: bool = True) -> tuple[Any, SessionIO]:
    """A CPU InferenceSession for reference runs of `model` (an onnx.ModelProto, changed in
    place when `widen_io`, or a path) and the `SessionIO` that runs it.

    `threads`: 0 leaves ONNX Runtime's default thread pools, n > 0 runs n intra-op threads and
    one inter-op thread; `optimize`: ORT's full graph optimizations (else none, so the session
    runs the graph as written); `widen_io`: rewrite low-precision graph inputs/outputs so
    `SessionIO.run` can feed and read them (without it the session runs the model as given
    and the `SessionIO` is empty). Errors are ONNX Runtime's own: callers say what failed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions, which graphopt reports itself
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    io = SessionIO()
    if isinstance(model, (str, os.PathLike)):
        source: Any = os.fspath(model)
        if widen_io:
            source, io = session_model_file(source, options)
    else:
        if widen_io:
            io = widen_session_model(model)
        source = model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]), io


def _raw_array(value: Any, dtype: DType) -> Any:
    """A numpy copy of the bytes of CPU tensor OrtValue `value`, viewed as `dtype`."""
    import numpy as np

    shape = tuple(value.shape())
    count = int(np.prod(shape, dtype=np.int64))
    numpy_dtype = dtype.to_numpy()
    if count == 0:
        return np.empty(shape, dtype=numpy_dtype)
    if value.device_name().lower() != "cpu":
        from graphopt.errors import GraphoptError

        raise GraphoptError(f"ONNX Runtime returned a {dtype.name} output on {value.device_name()}; expected it on the CPU")
    nbytes = count * numpy_dtype.itemsize
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(value.data_ptr())).copy()
    return raw.view(numpy_dtype).reshape(shape)


def _as_array(value: Any) -> Any:
    import numpy as np

    return value if isinstance(value, np.ndarray) else np.asarray(value)


def _elem_type(value: Any) -> Optional[DType]:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.elem_type:
        return None
    try:
        return DType(value.type.tensor_type.elem_type)
    except ValueError:
        return None


def _cast(source: str, target: str, to: DType, casts: dict[str, str], what: str) -> Any:
    """Cast `source` to `target`, named after `target` and recorded in `casts` as widening `what`."""
    from onnx import helper

    name = f"graphopt_io_cast_{target}"
    casts[name] = what
    return helper.make_node("Cast", [source], [target], name=name, to=int(to))


def _all_names(graph: Any) -> set[str]:
    names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _fresh(base: str, taken: set[str]) -> str:
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    taken.add(name)
    return name


GQA_BATCH_LIMIT = "batch_size must be 1 when sequence_length > 1 and past context is given"
"""ONNX Runtime's CPU GroupQueryAttention error for a batched chunked prefill (ORT 1.32)."""


def run_by_batch_rows(
    run: Callable[[dict[str, Any]], list[Any]], feeds: dict[str, Any],
    input_shapes: dict[str, Optional[Sequence[Any]]], output_shapes: Sequence[Optional[Sequence[Any]]],
) -> list[Any]:
    """`run(feeds)`; when ONNX Runtime's GroupQueryAttention refuses it (a batch above 1 with
    several new tokens and a non-empty past) and every output and each input with a leading batch
    axis share one symbolic batch dim, each batch row is run alone and the outputs concatenated
    along the batch axis (exact: the rows are independent). Any other error is raised as it is."""
    import numpy as np

    try:
        return run(feeds)
    except Exception as exc:
        if GQA_BATCH_LIMIT not in str(exc):
            raise
        batch = {shape[0] if shape else None for shape in output_shapes}
        if len(batch) != 1 or not isinstance(next(iter(batch)), str):
            raise
        symbol = next(iter(batch))
        split = {name for name, shape in input_shapes.items() if shape and shape[0] == symbol and name in feeds}
        sizes = {np.shape(feeds[name])[0] for name in split}
        if len(sizes) != 1 or min(sizes) < 2:
            raise
    parts = [run({name: value[row:row + 1] if name in split else value for name, value in feeds.items()}) for row in range(sizes.pop())]
    return [np.concatenate([np.asarray(part[index]) for part in parts], axis=0) for index in range(len(output_shapes))]
