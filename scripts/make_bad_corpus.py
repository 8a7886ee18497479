"""Write graphopt's corpus of bad inputs into a folder; each case names the error it must give.

    python scripts/make_bad_corpus.py OUT_DIR        # writes the files, prints one line per case

`write_corpus(folder)` returns the cases (`Case`: name, kind, subject, expected error
fragment). Kinds:
- "model": `subject` is an .onnx file (relative to the folder) that loading must refuse:
  truncated and corrupt protobufs, wrong magic, empty graphs, cycles, dangling inputs,
  duplicate names, unknown opsets and ops, shape/dtype contradictions, missing required
  attributes, external data outside the model's folder (`../`, absolute, a symlink),
  missing or short external data, impossible declared shapes;
- "pipeline": `subject` is a malformed pipeline text;
- "pipeline_file": `subject` is a malformed .json/.yaml pipeline file (relative path);
- "target": `subject` is a bad target spec.

Every model case lives in its own sub-folder `<name>/`; `outside/secret.data` is a file
beside them that external-data cases point at and that must never be read. `good/model.onnx`
is a valid model for the pipeline cases. Everything is deterministic.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import zipfile
from typing import Any, Callable

import numpy as np

GOOD_MODEL = "good/model.onnx"
SECRET = "outside/secret.data"
_F32 = 1
_I64 = 7


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input and a fragment of the one-line error it must give."""

    name: str
    kind: str
    subject: str
    expected: str


def corpus_cases() -> list[Case]:
    """Every case, without writing anything (paths are relative to the corpus folder)."""
    cases = [Case(name, "model", f"{name}/model.onnx", expected) for name, expected, _ in _MODEL_CASES]
    cases += [Case(name, "pipeline", text, expected) for name, text, expected in _PIPELINE_TEXTS]
    cases += [Case(name, "pipeline_file", f"pipelines/{file_name}", expected) for name, file_name, _, expected in _PIPELINE_FILES]
    cases += [Case(name, "target", spec, expected) for name, spec, expected in _TARGET_SPECS]
    return cases


def write_corpus(folder: "str | os.PathLike[str]") -> list[Case]:
    """Write every case's files under `folder` (created if needed); return the cases."""
    root = os.path.abspath(os.fspath(folder))
    os.makedirs(os.path.join(root, "outside"), exist_ok=True)
    with open(os.path.join(root, SECRET), "wb") as handle:
        handle.write(np.arange(64, dtype=np.float32).tobytes())
    _write(root, GOOD_MODEL, _serialize(_matmul_relu()))
    for name, _, build in _MODEL_CASES:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        _write(root, f"{name}/model.onnx", build(root, name))
    for _, file_name, content, _ in _PIPELINE_FILES:
        if content is not None:
            _write(root, f"pipelines/{file_name}", content if isinstance(content, bytes) else content.encode("utf-8"))
    return corpus_cases()


# ----------------------------------------------------------------------------- model builders
def _helper() -> Any:
    from onnx import helper

    return helper


def _matmul_relu(weight: Any = None, nodes: Any = None, opsets: Any = (("", 17),), **graph_fields: Any) -> Any:
    """y = Relu(x @ w) with x: f32[1, 4], w: f32[4, 4] (or the pieces given instead)."""
    from onnx import numpy_helper

    helper = _helper()
    if weight is None:
        weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    fields: dict[str, Any] = {
        "nodes": [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "inputs": [helper.make_tensor_value_info("x", _F32, [1, 4])],
        "outputs": [helper.make_tensor_value_info("y", _F32, [1, 4])],
        "initializer": [weight],
    }
    if nodes is not None:
        fields["nodes"] = nodes
    fields.update(graph_fields)
    graph = helper.make_graph(fields.pop("nodes"), "g", fields.pop("inputs"), fields.pop("outputs"), **fields)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


def _serialize(model: Any) -> bytes:
    return model.SerializeToString()


def _external_weight(location: str, offset: int = 0, length: int = 64) -> Any:
    from onnx import TensorProto

    tensor = TensorProto(name="w", data_type=_F32, dims=[4, 4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _with_external(location: Callable[[str, str], str], **kwargs: Any) -> Callable[[str, str], bytes]:
    return lambda root, name: _serialize(_matmul_relu(_external_weight(location(root, name), **kwargs)))


def _large_model_bytes() -> bytes:
    from onnx import numpy_helper

    weight = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "w")
    helper = _helper()
    model = _matmul_relu(
        weight, inputs=[helper.make_tensor_value_info("x", _F32, [1, 64])],
        outputs=[helper.make_tensor_value_info("y", _F32, [1, 64])],
    )
    return _serialize(model)


def _truncated(root: str, name: str) -> bytes:
    data = _large_model_bytes()
    return data[: int(len(data) * 0.6)]


def _bad_wire_type(root: str, name: str) -> bytes:
    return _serialize(_matmul_relu()) + b"\x0f\x00\x00\x00"


def _noise(root: str, name: str) -> bytes:
    return np.random.default_rng(9).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def _zip_of_model(root: str, name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model.onnx", _serialize(_matmul_relu()))
    return buffer.getvalue()


def _png(root: str, name: str) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def _graph_proto_alone(root: str, name: str) -> bytes:
    return _matmul_relu().graph.SerializeToString()


def _empty_graph(root: str, name: str) -> bytes:
    return _serialize(_matmul_relu(nodes=[], inputs=[], outputs=[], initializer=[]))


def _cycle(root: str, name: str) -> bytes:
    helper = _helper()
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="second"),
        helper.make_node("Identity", ["b"], ["y"], name="out"),
    ]
    return _serialize(_matmul_relu(nodes=nodes, initializer=[]))


def _dangling(root: str, name: str) -> bytes:
    helper = _helper()
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "bias"], ["y"], name="add_bias")]
    return _serialize(_matmul_relu(nodes=nodes))


def _duplicate_outputs(root: str, name: str) -> bytes:
    helper = _helper()
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Neg", ["x"], ["h"], name="neg"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    return _serialize(_matmul_relu(nodes=nodes))


def _duplicate_inputs(root: str, name: str) -> bytes:
    helper = _helper()
    inputs = [helper.make_tensor_value_info("x", _F32, [1, 4]), helper.make_tensor_value_info("x", _F32, [1, 4])]
    return _serialize(_matmul_relu(inputs=inputs))


def _duplicate_initializers(root: str, name: str) -> bytes:
    from onnx import numpy_helper

    model = _matmul_relu()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((4, 4), dtype=np.float32), "w"))
    return _serialize(model)


def _input_shadows_node_output(root: str, name: str) -> bytes:
    helper = _helper()
    model = _matmul_relu()
    model.graph.input.append(helper.make_tensor_value_info("h", _F32, [1, 4]))
    return _serialize(model)


def _missing_output(root: str, name: str) -> bytes:
    helper = _helper()
    return _serialize(_matmul_relu(outputs=[helper.make_tensor_value_info("logits", _F32, [1, 4])]))


def _future_opset(root: str, name: str) -> bytes:
    return _serialize(_matmul_relu(opsets=(("", 999),)))


def _unimported_domain(root: str, name: str) -> bytes:
    helper = _helper()
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Warp", ["h"], ["y"], name="warp", domain="com.example.custom")]
    return _serialize(_matmul_relu(nodes=nodes))


def _unknown_default_op(root: str, name: str) -> bytes:
    helper = _helper()
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relux", ["h"], ["y"], name="act")]
    return _serialize(_matmul_relu(nodes=nodes))


def _dtype_clash(root: str, name: str) -> bytes:
    from onnx import numpy_helper

    weight = numpy_helper.from_array(np.eye(4, dtype=np.int64), "w")
    return _serialize(_matmul_relu(weight))


def _shape_clash(root: str, name: str) -> bytes:
    from onnx import numpy_helper

    return _serialize(_matmul_relu(numpy_helper.from_array(np.ones((5, 3), dtype=np.float32), "w")))


def _declared_type_clash(root: str, name: str) -> bytes:
    helper = _helper()
    return _serialize(_matmul_relu(outputs=[helper.make_tensor_value_info("y", _I64, [1, 4])]))


def _declared_shape_clash(root: str, name: str) -> bytes:
    helper = _helper()
    return _serialize(_matmul_relu(outputs=[helper.make_tensor_value_info("y", _F32, [2, 7])]))


def _cast_without_to(root: str, name: str) -> bytes:
    helper = _helper()
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Cast", ["h"], ["y"], name="cast")]
    return _serialize(_matmul_relu(nodes=nodes))


def _concat_without_axis(root: str, name: str) -> bytes:
    helper = _helper()
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Concat", ["h", "h"], ["y"], name="join")]
    return _serialize(_matmul_relu(nodes=nodes, outputs=[helper.make_tensor_value_info("y", _F32, None)]))


def _relu_with_two_inputs(root: str, name: str) -> bytes:
    helper = _helper()
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h", "x"], ["y"], name="act")]
    return _serialize(_matmul_relu(nodes=nodes))


def _huge_initializer_shape(root: str, name: str) -> bytes:
    from onnx import TensorProto

    weight = TensorProto(name="w", data_type=_F32, dims=[2**20, 2**20, 4])
    weight.raw_data = np.ones(16, dtype=np.float32).tobytes()
    return _serialize(_matmul_relu(weight))


def _negative_initializer_dim(root: str, name: str) -> bytes:
    from onnx import TensorProto

    weight = TensorProto(name="w", data_type=_F32, dims=[-4, -4])
    weight.raw_data = np.ones(16, dtype=np.float32).tobytes()
    return _serialize(_matmul_relu(weight))


def _huge_external_shape(root: str, name: str) -> bytes:
    _write(root, f"{name}/weights.data", np.ones(16, dtype=np.float32).tobytes())
    weight = _external_weight("weights.data", length=2**62)
    weight.dims[:] = [2**30, 2**30]
    return _serialize(_matmul_relu(weight))


def _symlink_out(root: str, name: str) -> bytes:
    link = os.path.join(root, name, "weights.data")
    if not os.path.lexists(link):
        os.symlink(os.path.join("..", SECRET), link)
    return _serialize(_matmul_relu(_external_weight("weights.data")))


def _short_external(root: str, name: str) -> bytes:
    _write(root, f"{name}/weights.data", np.ones(5, dtype=np.float32).tobytes())
    return _serialize(_matmul_relu(_external_weight("weights.data")))


def _bad_offset(root: str, name: str) -> bytes:
    _write(root, f"{name}/weights.data", np.ones(16, dtype=np.float32).tobytes())
    weight = _external_weight("weights.data")
    weight.external_data[1].value = "sixteen"
    return _serialize(_matmul_relu(weight))


def _external_is_folder(root: str, name: str) -> bytes:
    os.makedirs(os.path.join(root, name, "weights.data"), exist_ok=True)
    return _serialize(_matmul_relu(_external_weight("weights.data")))


_MODEL_CASES: list[tuple[str, str, Callable[[str, str], bytes]]] = [
    ("empty-file", "the file is empty", lambda root, name: b""),
    ("truncated", "truncated file?", _truncated),
    ("bad-wire-type", "unsupported wire type 7", _bad_wire_type),
    ("random-bytes", "not a valid ONNX model", _noise),
    ("zip-archive", "not a valid ONNX model", _zip_of_model),
    ("png-image", "not a valid ONNX model", _png),
    ("json-text", "not a valid ONNX model", lambda root, name: json.dumps({"model": "bert"}).encode() * 20),
    ("graph-not-model", "not an ONNX model (no ir_version or no graph", _graph_proto_alone),
    ("empty-graph", "the graph has no outputs", _empty_graph),
    ("cycle", "the nodes form a cycle: 'first' (Add) -> 'second' (Relu) -> 'first' (Add)", _cycle),
    ("dangling-input", "node 'add_bias' (Add) reads 'bias', which no node, input or initializer defines", _dangling),
    ("duplicate-node-outputs", "'h' is defined twice", _duplicate_outputs),
    ("duplicate-inputs", "'x' is defined twice", _duplicate_inputs),
    ("duplicate-initializers", "'w' is defined twice", _duplicate_initializers),
    ("input-shadows-node-output", "'h' is defined twice", _input_shadows_node_output),
    ("missing-graph-output", "graph output 'logits' is not produced by any node", _missing_output),
    ("future-opset", "imports ONNX opset 999", _future_opset),
    ("unimported-domain", "uses domain 'com.example.custom', which the model's opset_import does not list", _unimported_domain),
    ("unknown-op", "unknown op 'Relux'", _unknown_default_op),
    ("dtype-contradiction", "node 'mm' (MatMul): inputs must share one element type, got %x: f32, %w: i64", _dtype_clash),
    ("shape-contradiction", "node 'mm' (MatMul): MatMul: inner dims 4 and 5 differ", _shape_clash),
    ("declared-dtype-contradiction", "declares 'y' as i64[1, 4] but node 'relu' (Relu) gives f32[1, 4]", _declared_type_clash),
    ("declared-shape-contradiction", "declares 'y' as f32[2, 7] but node 'relu' (Relu) gives f32[1, 4]", _declared_shape_clash),
    ("cast-without-to", "node 'cast' (Cast): Cast: required attribute 'to' is missing", _cast_without_to),
    ("concat-without-axis", "node 'join' (Concat): Concat: required attribute 'axis' is missing", _concat_without_axis),
    ("relu-with-two-inputs", "node 'act' (Relu) has 2 inputs", _relu_with_two_inputs),
    ("huge-initializer-shape", "initializer 'w' declares f32[1048576, 1048576, 4] (4398046511104 elements) but holds 16",
     _huge_initializer_shape),
    ("negative-initializer-dim", "initializer 'w' has a negative dim in its shape [-4, -4]", _negative_initializer_dim),
    ("huge-external-shape", "initializer 'w' reads past the end of 'weights.data'", _huge_external_shape),
    ("external-parent-path", "reads external data '../outside/secret.data', which is outside the model's folder",
     _with_external(lambda root, name: "../" + SECRET)),
    ("external-absolute-path", "outside the model's folder", _with_external(lambda root, name: os.path.join(root, SECRET))),
    ("external-symlink-out", "reads external data 'weights.data', which is outside the model's folder", _symlink_out),
    ("external-missing", "'absent.data', which does not exist", _with_external(lambda root, name: "absent.data")),
    ("external-short", "reads past the end of 'weights.data'", _short_external),
    ("external-bad-offset", "external data offset 'sixteen'", _bad_offset),
    ("external-is-folder", "reads external data 'weights.data', which is not a file", _external_is_folder),
]

_PIPELINE_TEXTS = [
    ("pipeline-empty", "", "the pipeline is empty"),
    ("pipeline-only-commas", " , ,", "the pipeline is empty"),
    ("pipeline-unknown-pass", "cleanup,fuse-everything", "unknown pass 'fuse-everything'"),
    ("pipeline-unclosed-brace", "cleanup,fold-constants{max_elements=10", "unbalanced"),
    ("pipeline-stray-brace", "cleanup}", "unbalanced"),
    ("pipeline-semicolons", "cleanup;fuse", "cannot read pipeline entry 'cleanup;fuse'"),
    ("pipeline-unknown-option", "cleanup{rounds=3}", "has no option 'rounds'"),
    ("pipeline-option-type", "fold-constants{max_elements='lots'}", "max_elements"),
    ("pipeline-option-no-value", "fold-constants{max_elements}", "not of the form key=value"),
]

_PIPELINE_FILES: list[tuple[str, str, Any, str]] = [
    ("pipeline-file-bad-json", "bad.json", '["cleanup", ', "not valid JSON"),
    ("pipeline-file-bad-yaml", "bad.yaml", "- cleanup\n- {fuse: [\n", "not valid YAML"),
    ("pipeline-file-not-utf8", "binary.json", b"\xff\xfe\x00\x81\x9c", "not UTF-8 text"),
    ("pipeline-file-wrong-type", "number.json", json.dumps({"pipeline": 3}), "a pipeline is a list of passes, got int"),
    ("pipeline-file-bad-entry", "entry.yaml", "- cleanup\n- 42\n", "entry 2 is not a pass name"),
    ("pipeline-file-options-not-mapping", "options.json", json.dumps([{"cleanup": 5}]), "options must be a mapping"),
    ("pipeline-file-unknown-pass", "unknown.yaml", "pipeline:\n  - cleanup\n  - sharpen\n", "unknown pass 'sharpen'"),
    ("pipeline-file-empty", "empty.yaml", "", "a pipeline is a list of passes, got NoneType"),
    ("pipeline-file-missing", "absent.json", None, "no such pipeline file"),
]

_TARGET_SPECS = [
    ("target-unknown", "tpu", "unknown target 'tpu'"),
    ("target-empty", "", "cannot read target spec ''"),
    ("target-unclosed", "onnxruntime{threads=2", "cannot read target spec"),
    ("target-bad-variant", "onnxruntime:gpu99", "has no variant 'gpu99'"),
    ("target-unknown-option", "onnxruntime{bogus=1}", "has no option 'bogus'"),
    ("target-option-type", "onnxruntime{threads='two'}", "threads"),
]


def _write(root: str, relative: str, data: bytes) -> None:
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/make_bad_corpus.py OUT_DIR", file=sys.stderr)
        return 2
    for case in write_corpus(argv[0]):
        print(f"{case.kind:14} {case.name:36} {case.subject!r} -> {case.expected!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
