"""Run one ONNX backend node test case through one graphopt step; classify the outcome.

Steps (`STEPS`):
- `roundtrip`: `from_onnx` -> `to_onnx`; the written model must pass
  `onnx.checker.check_model(full_check=True)`, load in ONNX Runtime and give the outputs.
- `cleanup`, `fuse`: `graphopt.optimize(graph, pipeline)`, then as `roundtrip`.
- `to_fx`: the torch.fx module of the imported graph, called on the inputs.
- `torch`, `tvm:llvm`, `onnxruntime`: `graphopt.compile(model, target=...)` (its default
  pipeline, `fuse`), called; `torch` is `to_fx` of the fused graph.

Outcomes (`Outcome.kind`), exactly one per case and step:
- `equal`: outputs match the expected ones (onnx's tolerances, see `cases.compare_outputs`).
- `refused`: a graphopt error (`graphopt.errors`) raised while importing, optimizing,
  exporting, converting or compiling; `Outcome.op` is the case's op type the message names.
  `GraphError` and `VerificationError` are not refusals: they mean a pass broke the IR; an
  error relaying ONNX Runtime's rejection of the model a target built is `invalid`.
- failures: `wrong` (outputs differ), `crash` (any other exception, or any exception while
  running the converted/compiled model), `invalid` (the checker or ONNX Runtime rejects the
  written model).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from conformance.cases import Case, compare_outputs, run_ort

STEPS = ("roundtrip", "cleanup", "fuse", "to_fx", "torch", "tvm:llvm", "onnxruntime")
FAILURES = ("wrong", "crash", "invalid")
KINDS = ("equal", "refused") + FAILURES
NO_OP_NAMED = "(no op named)"


@dataclass
class Outcome:
    """How one case ended in one step: `kind` (one of KINDS), the op a refusal names, and
    the message (first line of the error, or the output difference)."""

    kind: str
    op: str = ""
    detail: str = ""


class _Rejected(Exception):
    """The checker or ONNX Runtime rejected a model graphopt wrote."""


class _CallFailed(Exception):
    """Running the converted or compiled model raised."""


def run_case(case: Case, step: str) -> Outcome:
    """The outcome of `case` through `step`."""
    from graphopt.errors import GraphError, GraphoptError, VerificationError

    runners: dict[str, Callable[[Case], list[Any]]] = {
        "roundtrip": lambda c: _written(c, None),
        "cleanup": lambda c: _written(c, "cleanup"),
        "fuse": lambda c: _written(c, "fuse"),
        "to_fx": _fx,
        "torch": lambda c: _compiled(c, "torch"),
        "tvm:llvm": lambda c: _compiled(c, "tvm:llvm"),
        "onnxruntime": lambda c: _compiled(c, "onnxruntime"),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs = runners[step](case)
    except _Rejected as exc:
        return Outcome("invalid", detail=_first_line(exc.__cause__ or exc))
    except _CallFailed as exc:
        return Outcome("crash", detail="at call time: " + _describe(exc.__cause__ or exc))
    except (GraphError, VerificationError) as exc:
        return Outcome("crash", detail=_describe(exc))
    except GraphoptError as exc:
        if "[ONNXRuntimeError]" in str(exc):
            return Outcome("invalid", detail=_describe(exc))
        return Outcome("refused", op=named_op(case, str(exc)), detail=_describe(exc))
    except Exception as exc:  # noqa: BLE001 - any other exception is a crash by definition
        return Outcome("crash", detail=_describe(exc))
    problem = compare_outputs(case.outputs, outputs, case.rtol, case.atol)
    return Outcome("equal") if problem is None else Outcome("wrong", detail=problem)


def named_op(case: Case, message: str) -> str:
    """The op type of the case's model (subgraphs included) that `message` names first."""
    ops = sorted(_op_types(case.model.graph), key=len, reverse=True)
    found = [(m.start(), op) for op in ops for m in [re.search(rf"(?<![\w]){re.escape(op)}(?![\w])", message)] if m]
    return min(found)[1] if found else NO_OP_NAMED


def _op_types(graph: Any) -> set[str]:
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                ops |= _op_types(sub)
    return ops


def case_feeds(case: Case) -> dict[str, Any]:
    """{input name: value} of the case (graph inputs that are not initializers, in order)."""
    initialized = {i.name for i in case.model.graph.initializer}
    names = [i.name for i in case.model.graph.input if i.name not in initialized]
    return dict(zip(names, case.inputs))


def _written(case: Case, pipeline: Optional[str]) -> list[Any]:
    """Outputs of the model graphopt writes after `pipeline` (None: import and export only),
    checked and run by ONNX Runtime."""
    import onnx

    import graphopt
    from graphopt.frontends.onnx_import import from_onnx

    graph = from_onnx(case.model)
    if pipeline is not None:
        graph = graphopt.optimize(graph, pipeline)
    model = graph.to_onnx()
    try:
        _check(model, case.model)
        return _run_written(model, case_feeds(case))
    except Exception as exc:  # noqa: BLE001 - every rejection counts
        raise _Rejected() from exc


def _check(model: Any, original: Any) -> None:
    """`onnx.checker.check_model(model, full_check=True)`; where the original model itself
    fails the full check (a few onnx function bodies do, e.g. MeanVarianceNormalization at
    opset 13), with the same error, only the check the original passes."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError:
        raise
    except Exception as exc:  # noqa: BLE001 - shape inference errors have several classes
        try:
            onnx.checker.check_model(original, full_check=True)
        except Exception as original_exc:  # noqa: BLE001
            if _unnamed(str(original_exc)) == _unnamed(str(exc)):
                onnx.checker.check_model(model)
                return
        raise


def _unnamed(message: str) -> str:
    """A checker message without node names (graphopt names the nodes it writes)."""
    return re.sub(r",? ?node name: [^)]*", "", message)


def _run_written(model: Any, feeds: dict[str, Any]) -> list[Any]:
    initialized = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initialized]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ValueError(f"written model has inputs the case does not: {missing}")
    return run_ort(model, [feeds[n] for n in names])


def _fx(case: Case) -> list[Any]:
    """Outputs of the torch.fx module of the imported graph."""
    import torch

    from graphopt.frontends.onnx_import import from_onnx

    graph = from_onnx(case.model)
    module = graph.to_fx()
    feeds = case_feeds(case)
    try:
        args = [_to_torch(feeds[v.name]) for v in graph.inputs]
        with torch.no_grad():
            outputs = module(*args)
        return [_from_torch(o) for o in outputs]
    except Exception as exc:  # noqa: BLE001 - anything at call time is a crash
        raise _CallFailed() from exc


def _compiled(case: Case, target: str) -> list[Any]:
    """Outputs of `graphopt.compile(model, target=target)` called on the inputs."""
    import graphopt

    compiled = graphopt.compile(case.model, target=target)
    feeds = case_feeds(case)
    try:
        return list(compiled(*[feeds[name] for name in compiled.input_names]))
    except Exception as exc:  # noqa: BLE001 - anything at call time is a crash
        raise _CallFailed() from exc


_ML_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")


def _to_torch(value: Any) -> Any:
    import torch

    if value is None:
        return None
    if isinstance(value, list):
        return [_to_torch(v) for v in value]
    array = np.asarray(value)
    if array.dtype.name in _ML_NAMES:
        return torch.from_numpy(array.astype(np.float32)).to(getattr(torch, array.dtype.name))
    return torch.from_numpy(np.array(array, copy=True))


def _from_torch(value: Any) -> Any:
    import torch

    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_from_torch(v) for v in value]
    if not isinstance(value, torch.Tensor):
        return np.asarray(value)
    name = str(value.dtype).removeprefix("torch.")
    if name in _ML_NAMES:
        import ml_dtypes

        return value.float().numpy().astype(getattr(ml_dtypes, name))
    return value.detach().numpy()


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"
