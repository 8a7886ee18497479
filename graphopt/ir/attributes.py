"""Attributes the IR keeps without modelling them."""

from __future__ import annotations

from typing import Any


class OpaqueAttribute:
    """An attribute from the source format that the IR does not model (an ONNX subgraph,
    sparse tensor or type proto).

    Holds the serialized attribute (e.g. an ONNX AttributeProto's bytes) and its kind, so
    the exporter can write it back unchanged; the IR compares it by those bytes.
    """

    def __init__(self, proto: Any) -> None:
        self.serialized: bytes = proto.SerializeToString()
        self.kind: int = proto.type

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OpaqueAttribute) and other.serialized == self.serialized

    def __hash__(self) -> int:
        return hash(self.serialized)
