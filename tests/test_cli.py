"""The `graphopt` command: help, optimize, passes, inspect, and one-line errors without tracebacks."""

import dataclasses
import io
import json
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

import graphopt
from graphopt import Pass, PassResult, register_pass
from graphopt.check import sample_inputs
from graphopt.cli import main
from graphopt.pass_manager import Pipeline


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "inspect" in capsys.readouterr().out


def test_inspect_prints_the_summary_first_and_the_ir_only_when_asked(zoo_onnx, capsys):
    assert main(["inspect", "--ir", str(zoo_onnx("bert"))]) == 0
    out = capsys.readouterr().out
    summary, listing = out.split("\ngraph main_graph (\n", 1)
    assert summary.startswith(f"{zoo_onnx('bert')}: graph 'main_graph', ") and "ops:" in summary
    assert listing.startswith("  %input_ids: i64[batch, seq]")
    assert "= LayerNormalization(" in listing


def test_inspect_ops_histogram(zoo_onnx, capsys):
    assert main(["inspect", str(zoo_onnx("llama"))]) == 0
    out = capsys.readouterr().out
    assert "nodes" in out and "MatMul" in out
    assert "graph main_graph (" not in out and len(out.splitlines()) < 80


def test_bad_file_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"graphopt: error: {bad}")
    assert "Traceback" not in result.stderr


def test_console_script_is_installed():
    script = pathlib.Path(sys.executable).parent / "graphopt"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "inspect" in result.stdout


# ----------------------------------------------------------------------------- optimize
# Passes defined here, registered for this process (main() runs in-process below).

@register_pass
@dataclasses.dataclass
class DropIdentities(Pass):
    """Remove Identity nodes (CLI test pass). Needs nothing; their readers read the input."""

    name = "cli-test-drop-identities"
    limit: int = 0
    """Remove at most this many (0: all)."""

    def run(self, graph, ctx):
        removed = 0
        for node in graph:
            if node.op_type != "Identity" or node.output.is_graph_output or 0 < self.limit <= removed:
                continue
            node.output.replace_all_uses_with(node.inputs[0])
            graph.erase(node)
            removed += 1
        return PassResult(changed=removed > 0, stats={"removed": removed})


@register_pass
@dataclasses.dataclass
class Provides(Pass):
    """Change nothing (CLI test pass); provides the fact 'cli-test-fact'."""

    name = "cli-test-provides"
    provides = ("cli-test-fact",)

    def run(self, graph, ctx):
        return PassResult(changed=False)


@register_pass
@dataclasses.dataclass
class Requires(Pass):
    """Change nothing (CLI test pass); requires the fact 'cli-test-fact'."""

    name = "cli-test-requires"
    requires = ("cli-test-fact",)

    def run(self, graph, ctx):
        return PassResult(changed=False)


@register_pass
@dataclasses.dataclass
class Crash(Pass):
    """Raise RuntimeError (CLI test pass): a buggy pass."""

    name = "cli-test-crash"

    def run(self, graph, ctx):
        raise RuntimeError("the pass has a bug")


@register_pass
@dataclasses.dataclass
class DoubleOutputs(Pass):
    """Multiply every float graph output by 2 (CLI test pass): claims to be lossless, is not."""

    name = "cli-test-double-outputs"

    def run(self, graph, ctx):
        two = graph.add_constant("cli_test_two", np.array(2.0, dtype=np.float32))
        outputs = [graph.add_node("Mul", [out, two]).output for out in graph.outputs]
        graph.set_outputs(outputs)
        return PassResult(changed=True)


@register_pass
@dataclasses.dataclass
class Nested(Pipeline):
    """Drop identities, then double the outputs (CLI test pipeline): a wrong lossless pass nested in a pipeline."""

    name = "cli-test-nested"
    steps = ("cli-test-drop-identities", "cli-test-double-outputs")


def tiny_model(path: pathlib.Path) -> pathlib.Path:
    """y = Relu(Identity(x)) @ w: a model that loads and runs in milliseconds."""
    graph = graphopt.Graph("tiny")
    x = graph.add_input("x", graphopt.TensorType(graphopt.DType.FLOAT, ("batch", 4)))
    hidden = graph.add_node("Relu", [graph.add_node("Identity", [x]).output])
    w = graph.add_constant("w", np.arange(12, dtype=np.float32).reshape(4, 3))
    graph.set_outputs([graph.add_node("MatMul", [hidden.output, w], output_names=["y"]).output])
    graph.save_onnx(path)
    return path


def ort_outputs(path: pathlib.Path, feeds: dict) -> list:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_one_line_error(capsys, code: int, expected_code: int = 2) -> str:
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert err.startswith("graphopt: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_optimize_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["optimize", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--pipeline-file", "--check", "--verify", "--dump-ir", "--dump-dir", "--no-external-data", "-q"):
        assert flag in out


def test_optimize_zoo_bert(zoo_onnx, tmp_path, capsys):
    source, target = zoo_onnx("bert"), tmp_path / "bert-opt.onnx"
    code = main(["optimize", str(source), "-o", str(target), "-p", "cli-test-drop-identities,cli-test-provides"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].split() == ["pass", "time", "nodes", "max", "err", "stats"]
    assert "cli-test-drop-identities" in out and "removed=19" in out
    assert f"wrote {target}" in out
    assert "Identity" not in graphopt.from_onnx(target).op_counts()
    feeds = sample_inputs(graphopt.from_onnx(source))
    for want, got in zip(ort_outputs(source, feeds), ort_outputs(target, feeds)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert-opt.onnx"]


def test_optimize_check_prints_the_max_error(tmp_path, capsys):
    source = tiny_model(tmp_path / "in.onnx")
    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "-p", "cli-test-drop-identities", "--check"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^check: .*out\.onnx vs the input on sample inputs \(batch=2\):\n  y: max abs 0, relative 0, token cosine 1\.00000 \(min 1\.00000\)$", out, re.M)
    assert "0.00e+00" in out  # the per-pass column of the table


def test_check_names_the_pass_that_changed_the_outputs(tmp_path, capsys):
    source, target = tiny_model(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    pipeline = "cli-test-drop-identities,cli-test-double-outputs,cli-test-provides"
    code = main(["optimize", str(source), "-o", str(target), "-p", pipeline, "--check"])
    err = assert_one_line_error(capsys, code)
    assert "pass 'cli-test-double-outputs' changed the outputs" in err
    assert not target.exists()


def test_check_names_a_pass_nested_in_a_pipeline_by_its_path(tmp_path, capsys):
    source, target = tiny_model(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    code = main(["optimize", str(source), "-o", str(target), "-p", "cli-test-nested", "--check"])
    err = assert_one_line_error(capsys, code)
    assert re.search(r"pass 'cli-test-nested/cli-test-double-outputs' changed the outputs by [\d.]+ \(tolerance", err)
    assert not target.exists()


def test_dump_ir_takes_a_nested_pass_by_name_or_path(tmp_path, capsys):
    source = tiny_model(tmp_path / "in.onnx")
    for selector in ("cli-test-drop-identities", "cli-test-nested/cli-test-drop-identities"):
        dumps = tmp_path / selector.replace("/", "_")
        args = ["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "-p", "cli-test-nested", "--dump-ir", selector]
        assert main([*args, "--dump-dir", str(dumps)]) == 0, capsys.readouterr().err
        assert sorted(p.name for p in dumps.iterdir()) == [
            "02-cli-test-nested.cli-test-drop-identities.after.txt", "02-cli-test-nested.cli-test-drop-identities.before.txt",
        ]
    table = capsys.readouterr().out
    assert re.search(r"^cli-test-nested .*3 -> 3 .*cli-test-drop-identities.removed=1$", table, re.M)
    assert re.search(r"^  cli-test-drop-identities .*3 -> 2 .*removed=1$", table, re.M)
    assert re.search(r"^  cli-test-double-outputs .*2 -> 3", table, re.M)


def test_compile_dumps_checks_and_reports_the_lowering(zoo_onnx, tmp_path, capsys):
    dumps = tmp_path / "dumps"
    args = ["compile", str(zoo_onnx("bert")), "-t", "onnxruntime:cpu", "-o", str(tmp_path / "art"), "--check", "--verify"]
    assert main([*args, "--dump-ir", "all", "--dump-dir", str(dumps)]) == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    names = sorted(p.name for p in dumps.iterdir())
    (lowered,) = [n for n in names if n.endswith("-lowering.lower-onnxruntime.after.txt")]
    (cleaned,) = [n for n in names if n.endswith("-lowering.eliminate-dead-code.after.txt")]
    assert any(n.endswith("-fuse.cleanup.fold-constants.before.txt") for n in names)
    assert "com.microsoft::Attention(" in (dumps / lowered).read_text()
    assert "graphopt::Attention(" in (dumps / lowered).read_text()  # replaced, dead until eliminate-dead-code
    assert "graphopt::Attention(" not in (dumps / cleaned).read_text()
    lowering_row = re.search(r"^lowering .*$", table, re.M).group(0)
    assert re.search(r"\d\.\d\de[-+]\d\d", lowering_row)  # --check measured the lowered graph
    assert re.search(r"^  lower-onnxruntime .*lowered=\d+$", table, re.M)


def test_compile_dump_ir_names_must_be_in_the_pipeline_or_the_lowering(tmp_path, capsys):
    source = tiny_model(tmp_path / "in.onnx")
    args = ["compile", str(source), "-t", "onnxruntime", "-o", str(tmp_path / "art"), "-p", "cli-test-drop-identities", "--dump-dir", str(tmp_path / "d")]
    assert main([*args, "--dump-ir", "lower-onnxruntime"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["04-lowering.lower-onnxruntime.after.txt", "04-lowering.lower-onnxruntime.before.txt"]
    capsys.readouterr()
    err = assert_one_line_error(capsys, main([*args, "--dump-ir", "fold-constants"]))
    assert "--dump-ir: pass 'fold-constants' is not in the pipeline (cli-test-drop-identities, lowering), nor nested in it" in err


def test_compile_refuses_a_bfloat16_model_onnxruntime_has_no_kernels_for_in_one_line_writing_nothing(zoo_onnx, tmp_path, capsys):
    source, artifact = tmp_path / "bf16.onnx", tmp_path / "art"
    assert main(["optimize", "-q", str(zoo_onnx("bert")), "-o", str(source), "-p", "fuse,to-bf16"]) == 0
    err = assert_one_line_error(capsys, main(["compile", str(source), "-t", "onnxruntime:cpu", "-o", str(artifact)]))
    assert err.startswith("graphopt: error: target 'onnxruntime:cpu' cannot run ")
    assert "CPUExecutionProvider cannot run Add(bfloat16, bfloat16) -> bfloat16" in err
    assert "use target 'torch'" in err and "without to-bf16" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16.onnx"]


def test_optimize_quiet_prints_nothing(tmp_path, capsys):
    source, target = tiny_model(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    assert main(["optimize", "-q", str(source), "-o", str(target), "-p", "cli-test-drop-identities"]) == 0
    assert capsys.readouterr() == ("", "")
    assert target.exists()


def test_pipeline_file_verify_dumps_and_external_data(tmp_path, capsys):
    source, target = tiny_model(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    pipeline = tmp_path / "pipeline.json"
    pipeline.write_text(json.dumps({"pipeline": [{"cli-test-drop-identities": {"limit": 1}}, "cli-test-provides"]}))
    dumps = tmp_path / "dumps"
    code = main([
        "optimize", str(source), "-o", str(target), "--pipeline-file", str(pipeline), "--verify",
        "--dump-ir", "cli-test-drop-identities", "--dump-dir", str(dumps), "--external-data",
    ])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in dumps.iterdir()) == [
        "01-cli-test-drop-identities.after.txt", "01-cli-test-drop-identities.before.txt",
    ]
    assert "Identity(" in (dumps / "01-cli-test-drop-identities.before.txt").read_text()
    assert "Identity(" not in (dumps / "01-cli-test-drop-identities.after.txt").read_text()
    assert (tmp_path / "out.onnx.data").exists()
    feeds = {"x": np.ones((2, 4), dtype=np.float32)}
    np.testing.assert_array_equal(ort_outputs(target, feeds)[0], ort_outputs(source, feeds)[0])


def test_pipeline_option_takes_a_yaml_file(tmp_path, capsys):
    pytest.importorskip("yaml")
    source, target = tiny_model(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("- cli-test-drop-identities:\n    limit: 1\n- cli-test-provides\n")
    assert main(["optimize", str(source), "-o", str(target), "-p", str(pipeline)]) == 0
    out = capsys.readouterr().out
    assert "removed=1" in out and "cli-test-provides" in out


def test_progress_goes_to_a_terminal_only(tmp_path, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    source = tiny_model(tmp_path / "in.onnx")
    args = ["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "-p", "cli-test-drop-identities{limit=1},cli-test-provides"]
    assert main(args) == 0
    assert capsys.readouterr().err == ""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(args) == 0
    assert terminal.getvalue() == "[1/2] cli-test-drop-identities{limit=1}\n[2/2] cli-test-provides\n"
    terminal.truncate(0)
    assert main(args + ["-q"]) == 0
    assert terminal.getvalue() == ""


@pytest.mark.parametrize("output", ["same", "relative", "symlink"])
def test_refuses_to_overwrite_the_input(tmp_path, capsys, monkeypatch, output):
    source = tiny_model(tmp_path / "model.onnx")
    before = source.read_bytes()
    monkeypatch.chdir(tmp_path)
    if output == "symlink":
        (tmp_path / "link.onnx").symlink_to(source)
    target = {"same": str(source), "relative": "./sub/../model.onnx", "symlink": "link.onnx"}[output]
    (tmp_path / "sub").mkdir()
    err = assert_one_line_error(capsys, main(["optimize", str(source), "-o", target, "-p", "cli-test-drop-identities"]))
    assert "is the input model" in err
    assert source.read_bytes() == before


@pytest.mark.parametrize("pipeline, message", [
    ("cli-test-drop-identites", "unknown pass 'cli-test-drop-identites'; did you mean 'cli-test-drop-identities'"),
    ("cli-test-drop-identities{limit=many}", "pass 'cli-test-drop-identities': option 'limit' must be int, got 'many'"),
    ("cli-test-drop-identities{limt=1}", "pass 'cli-test-drop-identities' has no option 'limt' (options: limit)"),
    ("cli-test-requires,cli-test-provides", "pass 'cli-test-requires' (position 1) needs 'cli-test-fact', which no "
     "earlier pass provides; move 'cli-test-provides' before it"),
    ("cli-test-drop-identities{limit=1", "unbalanced"),
    ("missing.json", "missing.json: no such pipeline file"),
])
def test_bad_pipelines_fail_before_loading(tmp_path, capsys, pipeline, message):
    """The model path does not even exist: the pipeline is checked first."""
    code = main(["optimize", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "out.onnx"), "-p", pipeline])
    assert message in assert_one_line_error(capsys, code)


@pytest.mark.parametrize("extra, message", [
    (["--dump-ir", "all"], "--dump-ir needs --dump-dir"),
    (["--dump-ir", "cli-test-crash", "--dump-dir", "d"], "pass 'cli-test-crash' is not in the pipeline"),
    (["-o", "no/such/folder/out.onnx"], "does not exist"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    source = tiny_model(tmp_path / "in.onnx")
    code = main(["optimize", str(source), "-o", "out.onnx", "-p", "cli-test-drop-identities", *extra])
    assert message in assert_one_line_error(capsys, code)
    assert not (tmp_path / "out.onnx").exists()


def test_a_crashing_pass_leaves_no_output(tmp_path, capsys):
    source, target = tiny_model(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    code = main(["optimize", str(source), "-o", str(target), "-p", "cli-test-drop-identities,cli-test-crash"])
    err = assert_one_line_error(capsys, code, expected_code=1)
    assert err == ("graphopt: error: pass 'cli-test-crash' crashed: RuntimeError: the pass has a bug "
                   "(rerun with -v for the traceback)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_verbose_shows_the_traceback(tmp_path, capsys):
    source = tiny_model(tmp_path / "in.onnx")
    assert main(["-v", "optimize", str(source), "-o", str(tmp_path / "out.onnx"), "-p", "cli-test-crash"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: the pass has a bug" in err
    assert err.splitlines()[-1].startswith("graphopt: error: pass 'cli-test-crash' crashed")


def test_errors_from_the_installed_script_are_one_line(tmp_path):
    script = pathlib.Path(sys.executable).parent / "graphopt"
    result = subprocess.run(
        [str(script), "optimize", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "out.onnx"), "-p", "cleanup{no_such_option=1}"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("graphopt: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- passes
def test_passes_lists_test_passes_with_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^cli-test-drop-identities +Remove Identity nodes \(CLI test pass\)\. Needs nothing; "
                     r"their readers read the input\.\n    limit: int = 0\n", out, re.M)
    assert re.search(r"^cli-test-requires +Change nothing .*\n    \(requires: cli-test-fact\)\n", out, re.M)


def test_passes_json(capsys):
    assert main(["passes", "--json"]) == 0
    passes = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert passes["cli-test-drop-identities"]["options"] == [
        {"name": "limit", "type": "int", "default": 0, "doc": "Remove at most this many (0: all)."}
    ]
    assert passes["cli-test-provides"]["provides"] == ["cli-test-fact"]
    assert passes["cli-test-crash"]["lossless"] is True


# ----------------------------------------------------------------------------- inspect
def test_inspect_json(zoo_onnx, capsys):
    assert main(["inspect", "--json", str(zoo_onnx("bert"))]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ops"]["MatMul"] == 16 and summary["nodes"] == sum(summary["ops"].values())
    params = summary["parameters"]
    constants = graphopt.from_onnx(zoo_onnx("bert")).constants.values()
    floats = sum(v.const.size for v in constants if v.dtype == graphopt.DType.FLOAT)
    assert floats > 20_000 and params["bytes"] == 4 * floats + 8 * (params["count"] - floats)  # weights f32, shapes i64
    assert summary["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    assert summary["outputs"][0]["shape"] == ["batch", "seq", 32]
    assert summary["opsets"]["ai.onnx"] >= 13
    assert summary["flops"]["sizes"] == {"batch": 2, "seq": 8}
    assert summary["flops"]["total"] > summary["flops"]["by_op"]["MatMul"] > 0


def test_inspect_summary_sizes_can_be_chosen(tmp_path, capsys):
    source = tiny_model(tmp_path / "in.onnx")
    assert main(["inspect", "--dim", "batch=10", str(source)]) == 0
    out = capsys.readouterr().out
    assert "parameters: 12 (48 B) in 1 tensors" in out
    assert "  x: float[batch, 4]" in out
    assert f"FLOPs: {2 * 10 * 3 * 4 + 10 * 4:,} " in out and "assuming batch=10" in out


def test_passes_names_show_the_whole_doc_and_unknown_names_get_suggestions(capsys):
    assert main(["passes", "fuse-rotary"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fuse-rotary") and "Stats:" in out and "fuse-attention" not in out
    assert main(["passes", "fuse-rotery"]) == 2
    assert "unknown pass 'fuse-rotery'; did you mean 'fuse-rotary'" in capsys.readouterr().err


def test_short_version_flag_and_python_dash_m(capsys):
    with pytest.raises(SystemExit):
        main(["-V"])
    assert capsys.readouterr().out.startswith("graphopt ")
    done = subprocess.run([sys.executable, "-m", "graphopt", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("graphopt ")


def test_run_takes_an_npy_for_a_one_input_model_and_says_what_a_multi_input_one_needs(tmp_path, capsys):
    from graphopt.calibration import load_input_arrays
    from graphopt.errors import GraphoptError

    path = tmp_path / "x.npy"
    np.save(path, np.ones((2, 4), np.float32))
    assert list(load_input_arrays(str(path), ["x"])) == ["x"]
    with pytest.raises(GraphoptError, match=r"an \.npy holds one unnamed array, but the model takes 2 inputs \(ids, mask\)"):
        load_input_arrays(str(path), ["ids", "mask"])


def test_completion_script_completes_commands_passes_and_targets(capsys):
    import shutil

    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -o filenames -F _graphopt_complete graphopt" in script
    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    probe = (
        script + "\nCOMP_WORDS=(graphopt passes prune); COMP_CWORD=2; _graphopt_complete; echo \"${COMPREPLY[@]}\""
        "\nCOMP_WORDS=(graphopt compile m.onnx -t onnx); COMP_CWORD=4; _graphopt_complete; echo \"${COMPREPLY[@]}\""
        "\nCOMP_WORDS=(graphopt exp); COMP_CWORD=1; _graphopt_complete; echo \"${COMPREPLY[@]}\""
    )
    lines = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines == ["prune-ffn prune-heads", "onnxruntime onnxruntime:cpu onnxruntime:cuda", "export"]


def test_ctrl_c_inside_a_native_library_reads_as_an_interruption(tmp_path, capsys, monkeypatch):
    """TVM turns a Ctrl-C during its compile into RuntimeError('RuntimeError'); the CLI says interrupted."""
    import os
    import signal

    def compile_like_tvm(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            raise RuntimeError("RuntimeError") from None
        return 0

    monkeypatch.setattr("graphopt.cli._optimize", compile_like_tvm)
    source = tiny_model(tmp_path / "in.onnx")
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where a shell started the tests in the background
    assert main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "-p", "cleanup"]) == 130
    assert capsys.readouterr().err == "graphopt: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is before


def test_tvm_native_warnings_stay_off_the_terminal_unless_verbose(tmp_path, capfd):
    pytest.importorskip("tvm")
    source = tiny_model(tmp_path / "in.onnx")
    artifact = tmp_path / "tiny.tvm"
    assert main(["compile", str(source), "-t", "tvm:llvm", "-o", str(artifact), "-p", "cleanup", "-q"]) == 0
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), dtype=np.float32))
    assert main(["run", str(artifact), "-i", str(tmp_path / "x.npz"), "-q"]) == 0
    assert capfd.readouterr().err == ""
    assert main(["run", str(artifact), "-i", str(tmp_path / "x.npz"), "-v"]) == 0
    assert "TVM: " in capfd.readouterr().err
