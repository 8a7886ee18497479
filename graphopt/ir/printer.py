"""A stable, readable text form of IR graphs (what `print(graph)` shows).

    graph tiny (
      %x: f32[batch, 4]
    ) {
      %w: f32[4, 4] = const
      %y: f32[batch, 4] = MatMul(%x, %w)
      %z: f32[batch, 4] = Softmax(%y) {axis=-1}
      return %z
    }

Small constants (at most `SHOW_ELEMENTS` elements) print their values; attributes print
sorted by name; output is the same for the same graph, byte for byte.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.ir.tensor import ConstTensor

if TYPE_CHECKING:
    from graphopt.ir.graph import Graph, Node, Value

SHOW_ELEMENTS = 8


def format_graph(graph: "Graph") -> str:
    lines = [f"graph {graph.name} ("]
    lines += [f"  {_typed(v)}" for v in graph.inputs]
    lines.append(") {")
    for value in graph.constants.values():
        lines.append(f"  {_typed(value)} = const{_const_suffix(value.const)}")  # type: ignore[arg-type]
    for node in graph.nodes:
        lines.append(f"  {format_node(node)}")
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


def format_node(node: "Node") -> str:
    outs = ", ".join(_typed(v) for v in node.outputs)
    ins = ", ".join("_" if v is None else f"%{v.name}" for v in node.inputs)
    text = f"{outs} = {node.qualified_op}({ins})"
    if node.captures:
        text += " captures(" + ", ".join(f"%{v.name}" for v in node.captures) + ")"
    if node.attrs:
        text += " {" + ", ".join(f"{k}={format_attr(node.attrs[k])}" for k in sorted(node.attrs)) + "}"
    return text


def format_attr(value: Any) -> str:
    if isinstance(value, ConstTensor):
        return f"tensor<{value.dtype.short}{list(value.shape)}>{_const_suffix(value).strip()}"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, (int, bool)):
        return str(value)
    return f"<{type(value).__name__}>"


def _typed(value: "Value") -> str:
    return f"%{value.name}: {value.type}"


def _const_suffix(tensor: ConstTensor) -> str:
    if tensor.size > SHOW_ELEMENTS:
        return ""
    data = np.asarray(tensor.numpy()).reshape(-1)
    if data.dtype.kind == "f":
        items = [repr(float(x)) for x in data]
    elif data.dtype.kind in "iub":
        items = [str(int(x)) if data.dtype.kind != "b" else str(bool(x)) for x in data]
    else:
        items = [repr(x) for x in data]
    return " [" + ", ".join(items) + "]"
