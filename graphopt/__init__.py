"""graphopt: a compiler-style graph optimizer for Transformer models.

Models come in from ONNX (`from_onnx`) or torch.fx (`from_fx`) as one IR `Graph`, and go
out as ONNX (`to_onnx`, `save_onnx`, or the `Graph` methods of those names) or a runnable
torch.fx GraphModule (`to_fx`, `Graph.to_fx`). Heavy dependencies (onnx, torch) load only
when a function needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from graphopt.errors import (
    ExportError,
    GraphError,
    GraphoptError,
    ModelLoadError,
    UnsupportedOpError,
    VerificationError,
)
import graphopt.exporters  # noqa: F401  (registers the "onnx", "onnx-file" and "fx" conversions)
from graphopt.ir import DType, Graph, Node, TensorType, Value, verify
from graphopt.pass_base import Pass, PassContext, PassResult, PipelineError
from graphopt.registry import get_pass, register_pass, registered_passes

if TYPE_CHECKING:
    import onnx
    import torch

__version__ = "0.1.0"

__all__ = [
    "DType", "ExportError", "Graph", "GraphError", "GraphoptError", "ModelLoadError", "Node", "Pass",
    "PassContext", "PassResult", "PipelineError", "TensorType", "UnsupportedOpError", "Value",
    "VerificationError", "__version__", "compile", "explain", "from_fx", "generate", "load_compiled", "from_onnx", "get_pass", "optimize",
    "recover", "register_pass", "registered_passes", "save_onnx", "to_fx", "to_onnx", "verify",
]


def from_onnx(model: "str | onnx.ModelProto | Any") -> Graph:
    """Import an ONNX model (a path or a ModelProto) into an IR graph.

    Weights are not copied: those in the file (inline or external data) are memory-mapped
    on use. Raises `ModelLoadError` naming the file for a missing, corrupt or non-ONNX file.
    """
    from graphopt.frontends.onnx_import import from_onnx as _from_onnx

    return _from_onnx(model)


def from_fx(graph_module: "torch.fx.GraphModule | torch.export.ExportedProgram", example_inputs: Any = None) -> Graph:
    """Import a torch.fx GraphModule (dynamo, AOT/ATen) or an ExportedProgram into an IR graph."""
    from graphopt.frontends.fx_import import from_fx as _from_fx

    return _from_fx(graph_module, example_inputs)


def to_onnx(graph: Graph, *, keep_graphopt_ops: bool = False) -> "onnx.ModelProto":
    """`graph` as an ONNX model (weights inline; graphopt's own ops lowered to standard ONNX
    unless `keep_graphopt_ops`)."""
    from graphopt.exporters.onnx_export import to_onnx as _to_onnx

    return _to_onnx(graph, keep_graphopt_ops=keep_graphopt_ops)


def save_onnx(graph: Graph, path: Any, *, external_data: "bool | None" = None, keep_graphopt_ops: bool = False) -> None:
    """Write `graph` as an .onnx file, atomically; large weights go to external data."""
    from graphopt.exporters.onnx_export import save_onnx as _save_onnx

    _save_onnx(graph, path, external_data=external_data, keep_graphopt_ops=keep_graphopt_ops)


def to_fx(graph: Graph, *, prepack_linears: bool = False) -> "torch.fx.GraphModule":
    """`graph` as a runnable torch.fx GraphModule (`prepack_linears`: CPU-only oneDNN linears
    over weights packed once, see `graphopt.exporters.fx_linear`)."""
    from graphopt.exporters.fx_export import to_fx as _to_fx

    return _to_fx(graph, prepack_linears=prepack_linears)


def explain(model: Any, *args: Any, **kwargs: Any) -> Any:
    """What torch.compile(backend="graphopt") does to each graph of `model`; see `graphopt.explanation.explain`."""
    from graphopt.explanation import explain as _explain

    return _explain(model, *args, **kwargs)


def compile(model: Any, target: Any = "onnxruntime", pipeline: Any = "fuse", **options: Any) -> Any:
    """Optimize and compile for a target; returns a CompiledModel. See `graphopt.api.compile`."""
    from graphopt.api import compile as _compile

    return _compile(model, target, pipeline, **options)


def generate(model: Any, input_ids: Any, attention_mask: Any = None, **options: Any) -> Any:
    """Greedy decoding with a compiled decoder (KV cache in place on onnxruntime:cpu); see
    `graphopt.generation.generate`."""
    from graphopt.generation import generate as _generate

    return _generate(model, input_ids, attention_mask, **options)


def load_compiled(directory: Any) -> Any:
    """Load what `CompiledModel.save(directory)` wrote; see `graphopt.api.load_compiled`."""
    from graphopt.api import load_compiled as _load_compiled

    return _load_compiled(directory)


def optimize(model: Any, pipeline: Any = "cleanup", **options: Any) -> Graph:
    """Run a pass pipeline over a Graph, an .onnx path or a ModelProto; see `graphopt.api.optimize`."""
    from graphopt.api import optimize as _optimize

    return _optimize(model, pipeline, **options)


def recover(compressed: Any, original: Any, data: Any, **options: Any) -> Graph:
    """Fine-tune a compressed graph to match the original's outputs (knowledge distillation);
    returns a new Graph. See `graphopt.recovery.recover`."""
    from graphopt.recovery import recover as _recover

    return _recover(compressed, original, data, **options)
