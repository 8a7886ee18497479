"""Every case of the bad-input corpus (scripts/make_bad_corpus.py) gives its one-line error.

For each case: the CLI (`graphopt optimize`, and `graphopt inspect` for models, run
in-process through `graphopt.cli.main`) exits with status 2 and prints exactly one line,
`graphopt: error: ...`, containing the case's expected fragment and no traceback; the
Python API raises a `GraphoptError` with that fragment on one line, without a chained
exception. Around every run the corpus folder tree (names, sizes, modes, mtimes) is
snapshotted and must not change, no output file appears, and an audit hook records every
file opened: nothing under the corpus folder outside the case's own files may be opened
(external data pointing outside the model's folder must be refused, not read), and nothing
anywhere may be opened for writing. A few cases also run in a subprocess to show that no
traceback reaches the terminal.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import subprocess
import sys
from typing import Any, Iterator, Optional

import onnx
import pytest

import graphopt
from graphopt.cli import main
from graphopt.errors import GraphoptError

_REPO = pathlib.Path(__file__).resolve().parents[2]


def _load_corpus_script() -> Any:
    spec = importlib.util.spec_from_file_location("make_bad_corpus", _REPO / "scripts" / "make_bad_corpus.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


corpus_script = _load_corpus_script()
CASES = corpus_script.corpus_cases()
FILE_CASES = [case for case in CASES if case.kind != "target"]
MODEL_CASES = [case for case in CASES if case.kind == "model"]
TARGET_CASES = [case for case in CASES if case.kind == "target"]

# ----------------------------------------------------------------------------- file access audit
_opened: Optional[list[tuple[str, bool]]] = None
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event: str, args: tuple) -> None:
    if _opened is None or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path, mode, flags = args
    path = os.fsdecode(path)
    writes = bool(set(mode or "") & set("wax+")) or bool((flags or 0) & _WRITE_FLAGS)
    _opened.append((os.path.realpath(path), writes))


sys.addaudithook(_audit)


@contextlib.contextmanager
def _recording_opens() -> Iterator[list[tuple[str, bool]]]:
    """Record (real path, opened for writing) of every file opened inside the block."""
    global _opened
    _opened = record = []
    try:
        yield record
    finally:
        _opened = None


def _snapshot(root: pathlib.Path) -> dict[str, tuple[int, int, int]]:
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            state[os.path.relpath(path, root)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return state


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("bad-corpus")
    corpus_script.write_corpus(root)
    return root


@contextlib.contextmanager
def _guarded(corpus: pathlib.Path, case: Any, out_dir: pathlib.Path) -> Iterator[None]:
    """Fail if the block changes the corpus, writes anything or reads outside the case's files."""
    before = _snapshot(corpus)
    allowed = [corpus / case.subject.split("/")[0], corpus / "good", corpus / "pipelines", out_dir]
    allowed = [os.path.realpath(path) for path in allowed]
    with _recording_opens() as opened:
        yield
    assert _snapshot(corpus) == before, "the corpus folder changed"
    assert not any(out_dir.iterdir()), f"something was written: {sorted(out_dir.iterdir())}"
    root = os.path.realpath(corpus)
    for path, writes in opened:
        if writes and f"{os.sep}__pycache__{os.sep}" not in path:  # lazy imports may cache bytecode
            pytest.fail(f"{path} was opened for writing")
        if path.startswith(root + os.sep):
            assert any(path == a or path.startswith(a + os.sep) for a in allowed), f"{path} was read"


def _cli_argv(corpus: pathlib.Path, case: Any, output: pathlib.Path, command: str = "optimize") -> list[str]:
    good = str(corpus / corpus_script.GOOD_MODEL)
    if command == "inspect":
        return ["inspect", str(corpus / case.subject)]
    if case.kind == "model":
        return ["optimize", str(corpus / case.subject), "-o", str(output), "-p", "cleanup,fuse"]
    if case.kind == "pipeline":
        return ["optimize", good, "-o", str(output), "-p", case.subject]
    return ["optimize", good, "-o", str(output), "--pipeline-file", str(corpus / case.subject)]


def _assert_one_line_error(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("graphopt: error: ")
    assert expected in lines[0]


@pytest.mark.parametrize("case", FILE_CASES, ids=lambda case: case.name)
def test_cli_optimize_gives_one_line_error_and_exit_2(corpus, case, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with _guarded(corpus, case, out_dir):
        status = main(_cli_argv(corpus, case, out_dir / "optimized.onnx"))
    captured = capsys.readouterr()
    assert status == 2, captured.err
    _assert_one_line_error(captured.err, case.expected)
    assert captured.out == ""


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda case: case.name)
def test_cli_inspect_gives_one_line_error_and_exit_2(corpus, case, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with _guarded(corpus, case, out_dir):
        status = main(_cli_argv(corpus, case, out_dir / "unused.onnx", command="inspect"))
    captured = capsys.readouterr()
    assert status == 2, captured.err
    _assert_one_line_error(captured.err, case.expected)


@pytest.mark.parametrize("case", [c for c in FILE_CASES if c.kind == "pipeline_file"], ids=lambda case: case.name)
def test_cli_pipeline_file_given_as_p(corpus, case, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    good = str(corpus / corpus_script.GOOD_MODEL)
    with _guarded(corpus, case, out_dir):
        status = main(["optimize", good, "-o", str(out_dir / "o.onnx"), "-p", str(corpus / case.subject)])
    assert status == 2
    _assert_one_line_error(capsys.readouterr().err, case.expected)


def _one_line_exception(call: Any, expected: str) -> GraphoptError:
    with pytest.raises(GraphoptError) as info:
        call()
    error = info.value
    assert "\n" not in str(error)
    assert expected in str(error)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return error


@pytest.mark.parametrize("case", FILE_CASES, ids=lambda case: case.name)
def test_python_api_raises_one_line_graphopt_error(corpus, case, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    good = corpus / corpus_script.GOOD_MODEL
    with _guarded(corpus, case, out_dir):
        if case.kind == "model":
            _one_line_exception(lambda: graphopt.optimize(corpus / case.subject, "cleanup"), case.expected)
            _one_line_exception(lambda: graphopt.from_onnx(str(corpus / case.subject)), case.expected)
        elif case.kind == "pipeline":
            _one_line_exception(lambda: graphopt.optimize(good, case.subject), case.expected)
        else:
            _one_line_exception(lambda: graphopt.optimize(good, corpus / case.subject), case.expected)


def test_bad_models_as_protos_are_refused_too(corpus):
    """The same checks hold for an in-memory ModelProto (structure cases that parse)."""
    import onnx

    for name in ("cycle", "duplicate-node-outputs", "unknown-op", "declared-dtype-contradiction", "empty-graph"):
        case = next(c for c in MODEL_CASES if c.name == name)
        proto = onnx.load(str(corpus / case.subject))
        _one_line_exception(lambda: graphopt.from_onnx(proto), case.expected)


@pytest.mark.parametrize("case", TARGET_CASES, ids=lambda case: case.name)
def test_bad_target_spec_raises_one_line_target_error(case):
    from graphopt.target_base import TargetError
    from graphopt.target_registry import get_target

    error = _one_line_exception(lambda: get_target(case.subject), case.expected)
    assert isinstance(error, TargetError)


@pytest.mark.parametrize("case", TARGET_CASES, ids=lambda case: case.name)
def test_cli_compile_with_a_bad_target_gives_one_line_error_and_writes_nothing(case, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(_small_model_bytes())
    before = _snapshot(tmp_path)
    assert main(["compile", str(model), "-t", case.subject, "-o", str(tmp_path / "artifact")]) == 2
    _assert_one_line_error(capsys.readouterr().err, case.expected)
    assert _snapshot(tmp_path) == before


def _small_model_bytes() -> bytes:
    import onnx.helper as h

    graph = h.make_graph(
        [h.make_node("Relu", ["x"], ["y"])], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])], [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("name", ["truncated", "external-parent-path", "cycle", "pipeline-file-not-utf8"])
def test_no_traceback_reaches_a_terminal(corpus, name, tmp_path):
    case = next(c for c in CASES if c.name == name)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = _snapshot(corpus)
    done = subprocess.run(
        [sys.executable, "-m", "graphopt.cli", *_cli_argv(corpus, case, out_dir / "o.onnx")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    _assert_one_line_error(done.stderr, case.expected)
    assert done.stdout == ""
    assert _snapshot(corpus) == before
    assert not any(out_dir.iterdir())



def test_the_guard_catches_a_read_outside_the_case(corpus, tmp_path):
    case = next(c for c in MODEL_CASES if c.name == "external-parent-path")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(AssertionError, match="secret.data was read"):
        with _guarded(corpus, case, out_dir):
            (corpus / corpus_script.SECRET).read_bytes()
