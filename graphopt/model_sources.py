"""MODEL arguments of the CLI: a model from wherever a user has it, as an ONNX file.

    with tempfile.TemporaryDirectory() as scratch:
        source = resolve_model("path/to/hf-folder", scratch)   # exported into scratch
        graph = from_onnx(source.onnx_path)

MODEL is one of:
- an `.onnx` file (used as is);
- a Hugging Face model folder (holding config.json): `from_pretrained` on it, local files only;
- a Hugging Face `config.json` file, or `hf:<model_type>` (that type's default config; fields
  may be set, `hf:llama{num_hidden_layers=2,hidden_size=256}`): random weights (seed 0), no download;
- a `.pt2` file saved by `torch.export.save`: imported through torch.fx;
- `package.module:function` or `path/to/file.py:function`: the function returns
  `(module, example_inputs)` or `(module, example_inputs, dynamic_axes)`, where example_inputs
  is a tuple of tensors or a dict name -> tensor; the module is exported with torch.onnx
  (eval mode, its own mode restored after; its weights are not touched).

Hugging Face models are exported by task (see `graphopt.hf_export`: encoder, causal-lm with
KV cache, seq2seq-encoder, vision; "auto" reads the config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import logging
import re
import sys
import tempfile
from typing import Any, Iterator, Optional, Sequence

from graphopt.errors import GraphoptError
from graphopt.options import Spec

_ENTRY_POINT = re.compile(r"^(?P<module>[A-Za-z_][\w.]*|.+\.py):(?P<function>[A-Za-z_]\w*)$")
TASKS = ("encoder", "causal-lm", "seq2seq-encoder", "vision")
TASK_HELP = (
    "what a Hugging Face model is exported for: auto (from its config), encoder (last hidden state), "
    "causal-lm (logits with a KV cache, Optimum's with-past form), seq2seq-encoder, vision (default: auto)"
)
MODEL_HELP = (
    "an .onnx file, a Hugging Face model folder, a config.json or hf:<model_type>[{field=value,...}] (random weights), "
    "a .pt2 ExportedProgram, or module:function returning (nn.Module, example inputs)"
)


@dataclasses.dataclass
class ModelSource:
    """Where a model comes from: its ONNX file and, when known, the torch module computing the same
    outputs from the same inputs in the same order (for eager/inductor comparisons)."""

    onnx_path: str
    module: Any = None
    input_names: Sequence[str] = ()
    task: Optional[str] = None
    origin: str = "ONNX file"

    @property
    def exported(self) -> bool:
        return self.origin != "ONNX file"


def is_onnx_file(model: str) -> bool:
    """Whether MODEL names an existing ONNX file (anything else needs an export first)."""
    return os.path.isfile(model) and not model.endswith((".json", ".pt2", ".py"))


def resolve_model(model: str, scratch: str, *, task: str = "auto", opset: Optional[int] = None) -> ModelSource:
    """`model` as an ONNX file: as is, or exported into the folder `scratch`; see the module doc."""
    from graphopt.hf_export import EXPORT_OPSET

    opset = opset or EXPORT_OPSET
    target = os.path.join(scratch, "model.onnx")
    if model.startswith("hf:") or (os.path.isfile(model) and model.endswith(".json")):
        return _from_hf(model, target, task, opset)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise GraphoptError(f"{model}: is a folder without config.json; give an .onnx file or a Hugging Face model folder")
        return _from_hf(model, target, task, opset)
    if model.endswith(".pt2"):
        _require_file(model)
        return _from_exported_program(model, target)
    match = _ENTRY_POINT.match(model)
    if match and not os.path.isfile(model):
        return _from_function(model, match["module"], match["function"], target, opset)
    _require_file(model)
    if task != "auto":
        raise GraphoptError(f"--task applies to models graphopt exports; {model} is already an ONNX file")
    return ModelSource(model)


def _require_file(model: str) -> None:
    if not os.path.exists(model):
        raise GraphoptError(f"{model}: no such file (MODEL is {MODEL_HELP})")


def _from_hf(model: str, target: str, task: str, opset: int) -> ModelSource:
    from graphopt.hf_export import build_hf_model, export_hf

    _require_transformers(model)
    if os.path.isdir(model):
        built, config = build_hf_model(model, task=task)
        origin = "Hugging Face folder (from_pretrained)"
    else:
        built, config = build_hf_model(config=_hf_config(model), task=task)
        origin = "Hugging Face config (random weights)"
    export = export_hf(built, config, target, task=task, opset=opset)
    return ModelSource(target, export.module, export.input_names, export.task, f"{origin}, exported as {export.task}")


def _hf_config(model: str) -> Any:
    import transformers

    try:
        if model.startswith("hf:"):
            spec = Spec.parse(model[3:])
            _check_overrides(model, transformers.AutoConfig.for_model(spec.name), spec.options)
            return transformers.AutoConfig.for_model(spec.name, **spec.options)
        return transformers.AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(model)), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise GraphoptError(f"{model}: not a Hugging Face config transformers can build ({_unknown_type_reason(model, exc)})") from None


def _check_overrides(model: str, config: Any, overrides: dict[str, Any]) -> None:
    """Refuse a `hf:<type>{key=value,...}` key the type's config lacks, with close matches."""
    import difflib

    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise GraphoptError(f"{model}: a {config.model_type} config has no field '{key}'{hint}")


def _require_transformers(model: str) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise GraphoptError(f"{model}: Hugging Face models need transformers: pip install 'graphopt[hf]'")


def _unknown_type_reason(model: str, exc: BaseException) -> str:
    """Why transformers cannot build `model`, in one line: for an unknown `hf:<type>`, the
    closest known model types (transformers' own message lists all ~500 of them)."""
    import difflib

    import transformers

    if model.startswith("hf:"):
        known = list(transformers.CONFIG_MAPPING.keys())
        kind = model[3:].partition("{")[0].strip()
        if kind not in known:
            close = difflib.get_close_matches(kind, known, n=5)
            return f"unknown model type '{kind}'" + (f"; closest: {', '.join(close)}" if close else "; e.g. bert, llama, vit")
    return str(exc).splitlines()[0][:300]


def _from_exported_program(model: str, target: str) -> ModelSource:
    import torch

    from graphopt.frontends.fx_import import from_fx

    try:
        program = torch.export.load(model)
    except Exception as exc:
        raise GraphoptError(f"{model}: not an ExportedProgram torch.export.load can read ({first_line(exc)})") from None
    from_fx(program).save_onnx(target)
    return ModelSource(target, program.module(), origin="ExportedProgram")


def _from_function(model: str, module_name: str, function_name: str, target: str, opset: int) -> ModelSource:
    function = _load_function(model, module_name, function_name)
    try:
        result = function()
    except Exception as exc:
        raise GraphoptError(f"{model}: the function raised {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise GraphoptError(f"{model}: the function must return (module, example_inputs) or (module, example_inputs, dynamic_axes), got {type(result).__name__}")
    module, inputs, axes = (*result, None) if len(result) == 2 else result
    names, args = _named_inputs(model, module, inputs)
    axes = axes if axes is not None else _default_axes(names, args)
    _export_module(model, module, args, names, axes, target, opset)
    return ModelSource(target, module, names, origin="module from a function (exported in eval mode)")


def _load_function(model: str, module_name: str, function_name: str) -> Any:
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise GraphoptError(f"{model}: no such file {module_name}")
            spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module_name))[0], module_name)
            loaded = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(loaded)  # type: ignore[union-attr]
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            loaded = importlib.import_module(module_name)
    except GraphoptError:
        raise
    except Exception as exc:
        raise GraphoptError(f"{model}: cannot import {module_name} ({type(exc).__name__}: {first_line(exc)})") from None
    function = getattr(loaded, function_name, None)
    if not callable(function):
        raise GraphoptError(f"{model}: {module_name} has no function {function_name}")
    return function


def _named_inputs(model: str, module: Any, inputs: Any) -> tuple[list[str], tuple]:
    import inspect

    import torch

    if not isinstance(module, torch.nn.Module):
        raise GraphoptError(f"{model}: the function must return a torch.nn.Module first, got {type(module).__name__}")
    if isinstance(inputs, dict):
        return list(inputs), tuple(inputs.values())
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise GraphoptError(f"{model}: example inputs must be a tensor, a tuple of tensors or a dict name -> tensor")
    parameters = [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = parameters[: len(inputs)] if len(parameters) >= len(inputs) else [f"input_{i}" for i in range(len(inputs))]
    return names, tuple(inputs)


def _default_axes(names: Sequence[str], args: Sequence[Any]) -> dict[str, dict[int, str]]:
    """Axis 0 of every input is the batch; axis 1 of 2-D integer inputs (token ids, masks) the sequence."""
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in zip(names, args):
        if tensor.dim() >= 1:
            axes[name] = {0: "batch"}
        if tensor.dim() == 2 and not tensor.is_floating_point():
            axes[name][1] = "seq"
    return axes


def _export_module(model: str, module: Any, args: tuple, names: list[str], axes: dict, target: str, opset: int) -> None:
    import torch

    from graphopt.hf_export import quiet

    was_training = module.training
    module.eval()
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(module, args, target, dynamo=False, opset_version=opset, input_names=names, dynamic_axes=axes)
    except Exception as exc:
        raise GraphoptError(f"{model}: torch.onnx could not export the module: {first_line(exc)}") from None
    finally:
        module.train(was_training)



@contextlib.contextmanager
def model_as_onnx(model: str, *, task: str = "auto", opset: Optional[int] = None) -> Iterator[ModelSource]:
    """`resolve_model` into a temporary folder that is removed on exit; says on the log what was exported."""
    if is_onnx_file(model) and task == "auto":
        yield ModelSource(model)
        return
    with tempfile.TemporaryDirectory(prefix="graphopt-model-") as scratch:
        source = resolve_model(model, scratch, task=task, opset=opset)
        logging.getLogger("graphopt").info("%s: %s", model, source.origin)
        yield source


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), at most 300 characters."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
