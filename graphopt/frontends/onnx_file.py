"""Read an .onnx file without copying its weights.

`onnx.load` parses the whole file into memory, so a model's inline weights are held once
by the file buffer and once by the parsed message (2x the weights at peak). Here the file is
memory-mapped and walked at the protobuf wire level: every initializer's `raw_data` larger
than `INLINE_LIMIT` bytes is cut out of the message and recorded as a (offset, length) byte
range of the file instead; only the remaining skeleton (graph structure, small tensors) is
parsed. The IR then maps each weight from the file on use, like external data.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

INLINE_LIMIT = 1024

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_NAME = 8
_TENSOR_RAW_DATA = 9
_LENGTH_DELIMITED = 2


class WireFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_model_skeleton(path: str) -> tuple[Any, dict[str, tuple[int, int]]]:
    """Parse `path` as an ONNX ModelProto, leaving large initializer data in the file.

    Returns the parsed model (large initializers without data) and, for each of those
    initializers, the (file offset, byte length) of its raw little-endian data.
    """
    import onnx

    size = os.path.getsize(path)
    if size == 0:
        raise WireFormatError("the file is empty")
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        buf = memoryview(mapped)
        ranges: dict[str, tuple[int, int]] = {}
        skeleton = bytearray()
        for number, wire, start, body, end in _fields(buf, 0, len(buf)):
            if number == _MODEL_GRAPH and wire == _LENGTH_DELIMITED:
                _append_field(skeleton, number, _strip_graph(buf, body, end, ranges))
            else:
                skeleton += buf[start:end]
        del buf
    finally:
        try:
            mapped.close()
        except BufferError:
            pass  # a failed parse's traceback still holds views of the map; it unmaps when they go
    model = onnx.ModelProto()
    model.ParseFromString(bytes(skeleton))
    return model, ranges


def _strip_graph(buf: memoryview, start: int, end: int, ranges: dict[str, tuple[int, int]]) -> bytes:
    out = bytearray()
    for number, wire, field_start, body, field_end in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wire == _LENGTH_DELIMITED:
            _append_field(out, number, _strip_tensor(buf, body, field_end, ranges))
        else:
            out += buf[field_start:field_end]
    return bytes(out)


def _strip_tensor(buf: memoryview, start: int, end: int, ranges: dict[str, tuple[int, int]]) -> bytes:
    out = bytearray()
    name = None
    raw: tuple[int, int] | None = None
    for number, wire, field_start, body, field_end in _fields(buf, start, end):
        if number == _TENSOR_NAME and wire == _LENGTH_DELIMITED:
            name = bytes(buf[body:field_end]).decode("utf-8", errors="replace")
        if number == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED and field_end - body > INLINE_LIMIT:
            raw = (body, field_end - body)
            continue
        out += buf[field_start:field_end]
    if raw is not None:
        if name is None or name in ranges:
            raise WireFormatError(f"initializer {name!r} has no name or appears twice")
        ranges[name] = raw
    return bytes(out)


def _fields(buf: memoryview, start: int, end: int):
    """Yield (field number, wire type, field start, payload start, field end)."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireFormatError(f"field number 0 at byte {field_start}")
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            body = field_start
        elif wire == 1:
            body, pos = pos, pos + 8
        elif wire == 2:
            length, body = _varint(buf, pos, end)
            pos = body + length
        elif wire == 5:
            body, pos = pos, pos + 4
        else:
            raise WireFormatError(f"unsupported wire type {wire} at byte {field_start}")
        if pos > end:
            raise WireFormatError(f"field at byte {field_start} runs past the end of its message (truncated file?)")
        yield number, wire, field_start, body, pos


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError(f"malformed varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _append_field(out: bytearray, number: int, payload: bytes) -> None:
    out += _encode_varint((number << 3) | _LENGTH_DELIMITED)
    out += _encode_varint(len(payload))
    out += payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
