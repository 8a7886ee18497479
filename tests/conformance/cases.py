"""ONNX backend node test cases, generated from the installed onnx package and cached.

The onnx wheel ships the generators of its backend node tests (`onnx.backend.test.case.node`),
not their data. `all_cases()` runs them once per onnx version and keeps each case as
`<name>.onnx` + `<name>.pkl` (inputs, expected outputs: numpy arrays, lists for sequences,
None for empty optionals) under `cache_dir()`, so later runs only read files.

`ort_verdicts()` runs ONNX Runtime on every original model and compares with the expected
outputs the way onnx's backend runner does; the verdicts are cached next to the cases (one
file per onnxruntime version). Only the cases ORT passes are run through graphopt: a case ORT
itself fails says nothing about graphopt.

The cache folder is `$GRAPHOPT_CONFORMANCE_CACHE` or `~/.cache/graphopt`.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np

@dataclass
class Case:
    """One backend node test: the model, its inputs and the outputs ONNX specifies."""

    name: str
    model: Any  # onnx.ModelProto
    inputs: list[Any]
    outputs: list[Any]
    rtol: float
    atol: float
    op_type: str


def cache_dir() -> pathlib.Path:
    """Folder of the generated cases for the installed onnx version."""
    import onnx

    root = pathlib.Path(os.environ.get("GRAPHOPT_CONFORMANCE_CACHE") or pathlib.Path.home() / ".cache" / "graphopt")
    return root / f"onnx-node-cases-{onnx.__version__}"


def _to_data(value: Any) -> Any:
    """A case input/output as numpy: TensorProto converted, lists kept as lists, None as None."""
    from onnx import TensorProto, numpy_helper

    if value is None:
        return None
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [_to_data(v) for v in value]
    return np.asarray(value)


def _main_op(model: Any) -> str:
    """The op a case tests: the single node's op type (a function-expanded case has several
    nodes; the index records the op of the case it expands)."""
    ops = [n.op_type for n in model.graph.node]
    return ops[0] if len(ops) == 1 else "+".join(sorted(set(ops)))


def _generate(final: pathlib.Path) -> None:
    """Write every node test case and the index {name: {op, rtol, atol}} into `final` (built in
    a private folder renamed into place, so concurrent runs never read a half-written case)."""
    from onnx.backend.test.case import node

    folder = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        testcases = node.collect_testcases()
    index: dict[str, dict[str, Any]] = {}
    for case in testcases:
        (inputs, outputs), = case.data_sets
        (folder / f"{case.name}.onnx").write_bytes(case.model.SerializeToString())
        with open(folder / f"{case.name}.pkl", "wb") as f:
            pickle.dump({"inputs": [_to_data(v) for v in inputs], "outputs": [_to_data(v) for v in outputs]}, f)
        index[case.name] = {"op": _main_op(case.model), "rtol": case.rtol, "atol": case.atol}
    for name, entry in index.items():
        for suffix in ("_expanded_ver18", "_expanded"):
            base = name[: -len(suffix)] if name.endswith(suffix) else None
            if base in index:
                entry["op"] = index[base]["op"]
                break
    (folder / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    try:
        folder.rename(final)
    except OSError:  # another process put its copy in place first
        shutil.rmtree(folder)


@lru_cache(maxsize=1)
def case_index() -> dict[str, dict[str, Any]]:
    """{case name: {"op", "rtol", "atol"}} for every node test case (generated on first use)."""
    path = cache_dir() / "index.json"
    if not path.exists():
        _generate(cache_dir())
    return json.loads(path.read_text())


def load_case(name: str) -> Case:
    """The cached case `name`."""
    import onnx

    entry = case_index()[name]
    folder = cache_dir()
    model = onnx.load_model_from_string((folder / f"{name}.onnx").read_bytes())
    with open(folder / f"{name}.pkl", "rb") as f:
        data = pickle.load(f)
    return Case(name, model, data["inputs"], data["outputs"], entry["rtol"], entry["atol"], entry["op"])


_TWO_ULPS = {"bfloat16": 2**-6, "float16": 2**-9}
"""Relative tolerance floors: two ulps. onnx's runner has the bfloat16 one; float16 gets the
same rule here, since torch and TVM compute float16 ops with float32 intermediates (one ulp
off onnx's numpy reference, which rounds after every step)."""


def compare_outputs(expected: list[Any], actual: list[Any], rtol: float, atol: float) -> Optional[str]:
    """None if `actual` matches `expected` as onnx's backend runner requires (count, shape,
    dtype, allclose; bfloat16 and float16 with at least two ulps of rtol; sequences
    element-wise), else the first
    difference in words."""
    if len(expected) != len(actual):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (ref, out) in enumerate(zip(expected, actual)):
        if isinstance(ref, list) or isinstance(out, (list, tuple)):
            if not isinstance(ref, list) or not isinstance(out, (list, tuple)):
                return f"output {i}: got {type(out).__name__}, expected {type(ref).__name__}"
            problem = compare_outputs(ref, list(out), rtol, atol)
            if problem:
                return f"output {i}: {problem}"
            continue
        if ref is None or out is None:
            if ref is not out:
                return f"output {i}: got {type(out).__name__}, expected {type(ref).__name__}"
            continue
        out = np.asarray(out)
        if out.shape != ref.shape:
            return f"output {i}: shape {out.shape}, expected {ref.shape}"
        if ref.dtype == object:
            if not np.array_equal(out, ref):
                return f"output {i}: strings differ"
            continue
        if out.dtype != ref.dtype:
            return f"output {i}: dtype {out.dtype}, expected {ref.dtype}"
        rt = max(rtol, _TWO_ULPS.get(ref.dtype.name, 0.0))
        if ref.dtype.kind not in "biufc" or ref.dtype.name == "bfloat16":
            out, ref = out.astype(np.float32), ref.astype(np.float32)
        try:
            np.testing.assert_allclose(out, ref, rtol=rt, atol=atol)
        except AssertionError as exc:
            lines = [line.strip() for line in str(exc).strip().splitlines()]
            detail = "; ".join(line for line in lines if line.startswith(("Mismatched", "Max absolute", "Max relative")))
            return f"output {i}: {detail}"
    return None


def run_ort(model: Any, inputs: list[Any], optimize: bool = True) -> list[Any]:
    """Outputs of `model` on `inputs` (positional, over the graph inputs that are not
    initializers) computed by ONNX Runtime on CPU.

    ORT's Python API neither takes nor returns bfloat16, float8, float4 or 2/4-bit integer
    arrays, so graph inputs and outputs of those types are widened: the session runs a copy of
    `model` whose such inputs are float32/int8/uint8 followed by a Cast to the original type,
    and whose such outputs are Cast to the wide type (all exact), and the results are cast back.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model, wide_inputs, narrow_outputs = _widened(model)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {name: x.astype(wide_inputs[name]) if name in wide_inputs else x for name, x in zip(names, inputs)}
    outputs = session.run(None, feeds)
    return [out.astype(narrow_outputs[i]) if i in narrow_outputs else out for i, out in enumerate(outputs)]


def _numpy_of(onnx_type: int) -> Any:
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(onnx_type)


def _low_precision_types() -> dict[int, int]:
    from onnx import TensorProto as T

    floats = ("BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "FLOAT4E2M1")
    wide = {getattr(T, name): T.FLOAT for name in floats if hasattr(T, name)}
    wide.update({getattr(T, name): T.INT8 for name in ("INT4", "INT2") if hasattr(T, name)})
    wide.update({getattr(T, name): T.UINT8 for name in ("UINT4", "UINT2") if hasattr(T, name)})
    return wide


_WIDE: dict[int, int] = {}
"""{narrow element type: the ONNX type whose values include all of its values} (filled on first use)."""


def _widened(model: Any) -> tuple[Any, dict[str, Any], dict[int, Any]]:
    """(a copy of `model` with its low-precision graph inputs and outputs widened, {widened
    input name: its numpy dtype}, {output index: numpy dtype to cast that output back to});
    `model` itself if it has none."""
    import onnx
    from onnx import helper

    if not _WIDE:
        _WIDE.update(_low_precision_types())
    graph = model.graph
    narrow_in = [i for i in graph.input if i.type.tensor_type.elem_type in _WIDE]
    narrow_out = [o for o in graph.output if o.type.tensor_type.elem_type in _WIDE]
    if not narrow_in and not narrow_out:
        return model, {}, {}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    casts, wide_inputs = [], {}
    for value in copy.graph.input:
        code = value.type.tensor_type.elem_type
        if code in _WIDE:
            wide_name = f"{value.name}__wide"
            casts.append(helper.make_node("Cast", [wide_name], [value.name], to=code))
            value.name = wide_name
            value.type.tensor_type.elem_type = _WIDE[code]
            wide_inputs[wide_name] = _numpy_of(_WIDE[code])
    back = {}
    for index, value in enumerate(copy.graph.output):
        code = value.type.tensor_type.elem_type
        if code in _WIDE:
            wide_name = f"{value.name}__wide"
            copy.graph.node.append(helper.make_node("Cast", [value.name], [wide_name], to=_WIDE[code]))
            value.name = wide_name
            value.type.tensor_type.elem_type = _WIDE[code]
            back[index] = _numpy_of(code)
    nodes = casts + list(copy.graph.node)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy, wide_inputs, back


def ort_verdicts() -> dict[str, str]:
    """{case name: "pass" or why ONNX Runtime fails the original model} (cached per
    onnxruntime version)."""
    import onnxruntime as ort

    path = cache_dir() / f"ort-{ort.__version__}.json"
    index = case_index()
    verdicts: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [name for name in sorted(index) if name not in verdicts]
    for name in missing:
        verdicts[name] = _ort_verdict(load_case(name))
    if missing:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(verdicts, indent=1, sort_keys=True))
        tmp.replace(path)
    return verdicts


def _ort_verdict(case: Case) -> str:
    try:
        outputs = run_ort(case.model, case.inputs)
    except Exception as exc:  # noqa: BLE001 - any ORT failure makes the case unusable
        return "fail: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    problem = compare_outputs(case.outputs, outputs, case.rtol, case.atol)
    return "pass" if problem is None else "fail: " + problem[:200]


def passing_cases() -> list[str]:
    """Names of the cases ONNX Runtime passes, sorted."""
    return sorted(name for name, verdict in ort_verdicts().items() if verdict == "pass")
