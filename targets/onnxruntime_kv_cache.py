"""An in-place KV cache for decoders compiled for ONNX Runtime.

A decoder exported with a KV cache (Optimum's with-past form: `input_ids`, `attention_mask`
[batch, past + seq], `past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim] in;
`logits` (the first output) and `present.{i}.key/value` out) copies its whole cache on every
step: each present is a new tensor holding the past plus the new token. `KVCacheSession`
keeps one preallocated buffer per past instead, [batch, kv_heads, capacity, head_dim], bound
by IO binding as both the past input and the present output, so ONNX Runtime's
GroupQueryAttention appends the new keys and values in place (its `past_present_share_buffer`
mode) and a step copies nothing.

It needs a graph where GroupQueryAttention is the only reader of each past (besides Shape
nodes) and writes each present: what the onnxruntime target's lowering of graphopt's
KV-cache Attention gives. `unavailable_reason(model)` says why a model does not qualify. The
session's graph reads the past length from the attention mask (its length minus the new
tokens' count) instead of from the pasts' shapes, which are now the capacity; everything else
is the compiled graph unchanged, so the logits are the compiled model's.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.generation import PAST, present_name


class _Unavailable(Exception):
    """Why a model's graph cannot keep its cache in place."""


def unavailable_reason(model: Any) -> Optional[str]:
    """Why `model` (an `OnnxRuntimeModel`) cannot keep its KV cache in place (None when it can)."""
    if model.target.variant != "cpu":
        return "the in-place KV cache runs on onnxruntime:cpu only (on CUDA, the cache would be bound on the device)"
    prepared = _prepared(model)
    return prepared if isinstance(prepared, str) else None


def _prepared(model: Any) -> Any:
    """(session, {past: (kv_heads, head_dim, dtype)}) of `model`'s in-place graph, or why there
    is none; made once per model (a second session holds its own copy of the weights)."""
    cached = model.__dict__.get("_kv_cache_in_place")
    if cached is None:
        try:
            source, external_folder, shapes = _rewritten(model)
        except _Unavailable as reason:
            cached = str(reason)
        else:
            options = model.target.session_options()
            if external_folder is not None:
                options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_folder)
            cached = (model.target.session(source, options), shapes)
        model.__dict__["_kv_cache_in_place"] = cached
    return cached


class KVCacheSession:
    """Decoding steps of a compiled decoder over an in-place KV cache of `capacity` positions.

    `prefill(feeds)` runs the prompt (pasts empty) and copies its presents into the buffers;
    each `step(feeds)` then runs one step whose past is the first `past` positions of the
    buffers (feeds: `input_ids`, `attention_mask` [batch, past + seq], the rest of the model's
    inputs but the pasts) and returns the logits. The caller keeps `past + seq <= capacity`.
    """

    def __init__(self, model: Any, *, batch: int, capacity: int) -> None:
        import onnxruntime as ort

        reason = unavailable_reason(model)
        if reason is not None:
            raise GraphoptError(f"no in-place KV cache: {reason}")
        self.session, shapes = _prepared(model)
        self.capacity = capacity
        self.arrays = {name: np.zeros((batch, heads, capacity, size), dtype=dtype) for name, (heads, size, dtype) in shapes.items()}
        """The buffers; ONNX Runtime reads and writes this memory (on CPU an OrtValue wraps a numpy array without a copy)."""
        self.buffers = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self.arrays.items()}
        self._empty = {name: array[:, :, :0] for name, array in self.arrays.items()}
        self._logits = self.session.get_outputs()[0].name
        self._binding = self.session.io_binding()
        for name, buffer in self.buffers.items():
            self._binding.bind_ortvalue_input(name, buffer)
            self._binding.bind_ortvalue_output(present_name(name), buffer)
        self._binding.bind_output(self._logits)

    def prefill(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        outputs = self.session.run(None, {**feeds, **self._empty})
        names = [o.name for o in self.session.get_outputs()]
        self.load({name: outputs[names.index(present_name(name))] for name in self.buffers})
        return outputs[names.index(self._logits)]

    def load(self, pasts: dict[str, np.ndarray]) -> None:
        """Copy a cache ({past name: [batch, kv_heads, past, head_dim]}) into the buffers."""
        for name, array in self.arrays.items():
            past = pasts[name]
            if past.shape[2] > self.capacity:
                raise GraphoptError(f"{past.shape[2]} cached positions do not fit a KV cache of capacity {self.capacity}")
            array[:, :, : past.shape[2]] = past

    def step(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        total = feeds["attention_mask"].shape[1]
        if total > self.capacity:
            raise GraphoptError(f"a step over {total} positions does not fit a KV cache of capacity {self.capacity}")
        for name, value in feeds.items():
            self._binding.bind_cpu_input(name, np.ascontiguousarray(value))
        self.session.run_with_iobinding(self._binding)
        return self._binding.get_outputs()[-1].numpy()  # outputs come back in binding order: the logits last


def _rewritten(model: Any) -> tuple[Any, Optional[str], dict[str, tuple[int, int, np.dtype]]]:
    """(session source, external-data folder or None, {past: (kv_heads, head_dim, dtype)}) of
    `model`'s graph with the past lengths read from the mask."""
    import onnx

    from graphopt.ort_io import widen_session_model

    if model.path is not None:  # saved with external data: read the graph, leave the weights on disk
        proto = onnx.load(model.path, load_external_data=False)
        folder = os.path.dirname(os.path.abspath(model.path))
    else:
        proto = model.graph.to_onnx(keep_graphopt_ops=True)
        folder = None
    if widen_session_model(proto):
        raise _Unavailable("the model has inputs or outputs that numpy cannot hold natively (bfloat16, float8, int4)")
    graph = proto.graph
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    pasts = [name for name in inputs if PAST.match(name)]
    for needed in ("input_ids", "attention_mask"):
        if needed not in inputs:
            raise _Unavailable(f"the model has no {needed!r} input (it needs Optimum's with-past signature)")
    if not pasts:
        raise _Unavailable("the model has no past_key_values.{i}.key/value inputs")
    shapes = {name: _cache_shape(inputs[name]) for name in pasts}
    writers = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name not in shapes:
                continue
            if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and index in (3, 4):
                writers[name] = node.output[index - 2] if len(node.output) > index - 2 else ""
            elif node.op_type != "Shape":
                raise _Unavailable(f"{name} is read by {node.op_type} node {node.name!r}, not only by GroupQueryAttention")
    for name in pasts:
        if writers.get(name) != present_name(name) or present_name(name) not in outputs:
            raise _Unavailable(f"{name}'s GroupQueryAttention does not write {present_name(name)}")
    _read_past_lengths_from_mask(graph, shapes)
    for name in pasts:
        dims = outputs[present_name(name)].type.tensor_type.shape.dim
        if len(dims) == 4:
            dims[2].Clear()
            dims[2].dim_param = "kv_cache_capacity"
    return proto.SerializeToString(), folder, shapes


def _cache_shape(value: Any) -> tuple[int, int, np.dtype]:
    from onnx import helper

    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].HasField("dim_value") or not dims[3].HasField("dim_value"):
        raise _Unavailable(f"{value.name} must be [batch, kv_heads, past, head_dim] with kv_heads and head_dim fixed")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
    if dtype not in (np.float32, np.float16):
        raise _Unavailable(f"{value.name} is {dtype.name}; the in-place KV cache holds float32 or float16")
    return dims[1].dim_value, dims[3].dim_value, dtype


def _read_past_lengths_from_mask(graph: Any, shapes: dict[str, tuple[int, int, np.dtype]]) -> None:
    """Replace each Shape(past) by Concat(batch, kv_heads, mask length - seq, head_dim), sliced
    as the Shape's start/end attributes say."""
    from onnx import TensorProto, helper

    shape_nodes = [n for n in graph.node if n.op_type == "Shape" and n.input[0] in shapes]
    if not shape_nodes:
        return
    prefix = "kv_cache_in_place"
    one_d = {"zero": 0, "one": 1, "two": 2}
    constants = [helper.make_tensor(f"{prefix}_{k}", TensorProto.INT64, [1], [v]) for k, v in one_d.items()]
    nodes = [
        helper.make_node("Shape", ["input_ids"], [f"{prefix}_ids_shape"]),
        helper.make_node("Shape", ["attention_mask"], [f"{prefix}_mask_shape"]),
        helper.make_node("Slice", [f"{prefix}_ids_shape", f"{prefix}_zero", f"{prefix}_one"], [f"{prefix}_batch"]),
        helper.make_node("Slice", [f"{prefix}_ids_shape", f"{prefix}_one", f"{prefix}_two"], [f"{prefix}_seq"]),
        helper.make_node("Slice", [f"{prefix}_mask_shape", f"{prefix}_one", f"{prefix}_two"], [f"{prefix}_total"]),
        helper.make_node("Sub", [f"{prefix}_total", f"{prefix}_seq"], [f"{prefix}_past"]),
    ]
    for node in shape_nodes:  # replaced in place: the Concat takes the Shape's slot and output
        heads, size, _ = shapes[node.input[0]]
        name = node.output[0]
        constants += [helper.make_tensor(f"{name}_{prefix}_heads", TensorProto.INT64, [1], [heads]),
                      helper.make_tensor(f"{name}_{prefix}_size", TensorProto.INT64, [1], [size])]
        pieces = [f"{prefix}_batch", f"{name}_{prefix}_heads", f"{prefix}_past", f"{name}_{prefix}_size"]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        start, end = attributes.get("start", 0), attributes.get("end", 4)
        start, end = (start + 4 if start < 0 else start), (end + 4 if end < 0 else end)
        if not pieces[max(start, 0):min(end, 4)]:
            raise _Unavailable(f"Shape node {node.name!r} of {node.input[0]} reads no dimension")
        node.CopyFrom(helper.make_node("Concat", pieces[max(start, 0):min(end, 4)], [name], axis=0))
    for offset, node in enumerate(nodes):
        graph.node.insert(offset, node)
    graph.initializer.extend(constants)
