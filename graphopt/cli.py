"""The `graphopt` command line.

    graphopt optimize MODEL -o OUT.onnx -p "cleanup,my-pass{x=1}" [--check] [--inputs X.npz] [--verify]
    graphopt passes [PASS ...] [--json]       every registered pass (or the named ones, with their whole doc) and options
    graphopt inspect MODEL [--json] [--ir] [--dim seq=128]
    graphopt export MODEL -o OUT.onnx [--task T]  a Hugging Face folder, hf:<type>, .pt2 or module:function to ONNX
    graphopt compile MODEL -t SPEC -o DIR    optimize + compile for a target, save the artifact
    graphopt run DIR -i INPUTS.npz           run a saved artifact
    graphopt targets [--json]                the registered targets, variants and options
    graphopt bench MODEL [-p P] [--against ort-opt,ort-int8,inductor]   side-by-side timings
    graphopt completion bash|zsh             a shell completion script

MODEL is an .onnx file or anything `graphopt.model_sources` exports to one first (a Hugging
Face model folder, a config.json, hf:<model_type>, a .pt2 ExportedProgram, module:function).

Global flags (before or after the command): `-v` shows tracebacks of unexpected errors and
info logging, `-q` prints nothing but errors (and the result `--check` asked for).

Exit status: 0 on success; 2 for errors graphopt raises on purpose (`GraphoptError`: bad
pipelines, unreadable models, failed checks), for OS errors (missing folders, permissions)
and for bad usage, printed as one line `graphopt: error: ...`; 1 for anything unexpected
(a bug, e.g. a pass that crashes), printed as one line with a hint to rerun with `-v`,
which shows the traceback. No traceback reaches the user otherwise.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import pathlib
import sys
import textwrap
import time
import traceback
import typing
from typing import Any, Iterator, Optional, Sequence, TextIO

from graphopt.errors import GraphoptError
from graphopt.instruments import Instrument, PassRecord
from graphopt.ir.types import format_shape

if typing.TYPE_CHECKING:
    from graphopt.instruments import PipelineReport
    from graphopt.ir.graph import Graph, Value
    from graphopt.pass_base import Pass, PassResult

_LOGGER = "graphopt"


class PassCrash(Exception):
    """A pass raised something other than a GraphoptError: a bug in that pass."""

    def __init__(self, pass_name: str, error: BaseException) -> None:
        super().__init__(f"pass '{pass_name}' crashed: {type(error).__name__}: {_one_line(error)}")


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from graphopt import __version__

    parser = argparse.ArgumentParser(
        prog="graphopt",
        description="A compiler-style graph optimizer for Transformer models.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"graphopt {__version__}")
    _add_verbosity(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_optimize(commands)
    _add_passes(commands)
    _add_inspect(commands)
    from graphopt.cli_export import add_command as add_export

    add_export(commands, _add_verbosity)
    from graphopt.cli_targets import add_commands

    add_commands(commands, _add_verbosity)
    from graphopt.cli_bench import add_command

    add_command(commands, _add_verbosity, _add_dims)
    from graphopt.cli_completion import add_command as add_completion

    add_completion(commands, _add_verbosity)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, top_level: bool) -> None:
    """-v/-q on the main parser and on each command (so they may follow the command)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v", "--verbose", action="store_true", default=False if top_level else argparse.SUPPRESS,
        help="show info logging, and the traceback of unexpected errors",
    )
    group.add_argument(
        "-q", "--quiet", action="store_true", default=False if top_level else argparse.SUPPRESS,
        help="print nothing but errors (and the result --check asks for)",
    )


def _add_optimize(commands: Any) -> None:
    from graphopt.model_sources import MODEL_HELP

    cmd = commands.add_parser(
        "optimize", help="run a pass pipeline over a model and write the result as ONNX",
        description="Validate PIPELINE, load MODEL, run the passes in order and write OUT atomically "
        f"(nothing is written when a pass fails). Prints a per-pass table unless -q. MODEL is {MODEL_HELP}.",
    )
    _add_verbosity(cmd, top_level=False)
    cmd.add_argument("model", metavar="MODEL", help="the model to optimize (never modified)")
    cmd.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the result; must differ from IN")
    source = cmd.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "-p", "--pipeline", metavar="PIPELINE",
        help="passes in order, e.g. 'cleanup,my-pass{ratio=0.5}', or a .json/.yaml pipeline file",
    )
    source.add_argument("--pipeline-file", metavar="FILE", help="a JSON or YAML pipeline file")
    cmd.add_argument(
        "--check", action="store_true",
        help="compare outputs after every pass and OUT vs MODEL on sample inputs (or --inputs); print "
        "the fidelity: relative error, token and pooled cosine, top-1 for logits "
        "(fails naming the first lossless pass that changed them)",
    )
    add_inputs_option(cmd, "real inputs for --check (implies --check)")
    cmd.add_argument(
        "--lower", choices=("onnx", "onnxruntime"), default="onnx",
        help="what OUT holds: onnx (default) standard ONNX ops at the model's opset, graphopt's fused ops "
        "written back as their exact decompositions, so any ONNX runtime loads it; onnxruntime: ONNX Runtime's "
        "fused contrib kernels (Attention/MultiHeadAttention/GroupQueryAttention, SkipLayerNormalization, "
        "Gelu, RotaryEmbedding, ...), as `graphopt compile -t onnxruntime` runs them",
    )
    cmd.add_argument("--verify", action="store_true", help="verify the IR before the first pass and after every pass")
    cmd.add_argument(
        "--report", metavar="FILE.md|FILE.html",
        help="write a report: per-pass table, op histograms before/after, sizes, fidelity, DOT drawings beside it",
    )
    cmd.add_argument(
        "--dump-ir", metavar="PASS[,PASS]|all",
        help="write the IR before and after these passes: names (every run, nested ones too), paths such as "
        "fuse/cleanup, or all (needs --dump-dir)",
    )
    cmd.add_argument("--dump-dir", metavar="DIR", help="folder for --dump-ir files")
    cmd.add_argument(
        "--external-data", action=argparse.BooleanOptionalAction, default=None,
        help="write weights to OUT.data beside OUT (default: only when they exceed ~1.8 GB)",
    )
    _add_dims(cmd, "sizes of symbolic input dims for --check")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the sample inputs and of the passes (default 0)")
    from graphopt.cli_targets import add_calibration_option

    add_calibration_option(cmd)
    cmd.set_defaults(run=_optimize)


def _add_passes(commands: Any) -> None:
    cmd = commands.add_parser(
        "passes", help="list the registered passes and their options",
        description="List every registered pass (built-in and from installed plug-ins) with its "
        "one-line doc and its options as `name: type = default`; given pass names, only those, "
        "each with its whole doc (what it needs, what it changes, what its options mean).",
    )
    _add_verbosity(cmd, top_level=False)
    cmd.add_argument("names", nargs="*", metavar="PASS", help="show only these passes, with their whole doc")
    cmd.add_argument("--json", action="store_true", help="print JSON instead of text")
    cmd.set_defaults(run=_passes)


def _add_inspect(commands: Any) -> None:
    from graphopt.model_sources import MODEL_HELP

    cmd = commands.add_parser(
        "inspect", help="print a model's summary (ops, parameters, I/O, FLOPs) and, with --ir, its IR",
        description="Load a model into graphopt's IR, verify it and print a summary: nodes, op "
        "histogram, parameters, inputs/outputs, opsets and estimated FLOPs for the sample input "
        f"sizes; with --ir, the IR listing after it. MODEL is {MODEL_HELP}.",
    )
    _add_verbosity(cmd, top_level=False)
    cmd.add_argument("model", metavar="MODEL", help="the model to inspect")
    cmd.add_argument("--ir", action="store_true", help="also print the whole IR, after the summary")
    cmd.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_dims(cmd, "sizes of symbolic input dims for the FLOP estimate")
    cmd.set_defaults(run=_inspect)


def add_inputs_option(cmd: argparse.ArgumentParser, purpose: str) -> None:
    cmd.add_argument(
        "--inputs", metavar="INPUTS.npz",
        help=f"{purpose}: one array per model input, named by input (an .npy for a one-input model)",
    )


def _add_dims(cmd: argparse.ArgumentParser, purpose: str) -> None:
    cmd.add_argument(
        "--dim", dest="dims", action="append", type=_dim_size, default=[], metavar="NAME=SIZE",
        help=f"{purpose}, e.g. --dim seq=128 (repeatable; others get the sample-input defaults)",
    )


def _dim_size(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or not name.strip() or not size.strip().isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE with a positive SIZE, got {text!r}")
    return name.strip(), int(size)


# ----------------------------------------------------------------------------- optimize
def _optimize(args: argparse.Namespace) -> int:
    from graphopt.api import load_graph
    from graphopt.pipeline import build_pipeline

    passes = build_pipeline(pathlib.Path(args.pipeline_file) if args.pipeline_file else args.pipeline)
    if args.lower == "onnxruntime":
        from graphopt.api import with_lowering
        from graphopt.target_registry import get_target

        passes = with_lowering(passes, get_target("onnxruntime:cpu"))
    dump_ir = dump_ir_names(args, passes)
    _check_output_path(args.model, args.output)
    if args.report and os.path.splitext(args.report)[1].lower() not in (".md", ".html", ".htm"):
        raise GraphoptError(f"--report {args.report}: use a .md or .html file name")
    from graphopt.model_sources import model_as_onnx

    with model_as_onnx(args.model) as source:
        return _optimize_loaded(args, load_graph(source.onnx_path), passes, dump_ir)


def _optimize_loaded(args: argparse.Namespace, graph: "Graph", passes: Sequence["Pass"], dump_ir: list[str]) -> int:
    start = time.perf_counter()
    nodes_in = len(graph)
    if args.verify:
        graph.verify()
    check = _prepare_check(graph, args) if args.check or args.inputs else None
    before = _snapshot(graph, args) if args.report else None
    report = _run_passes(graph, passes, args, dump_ir, check)
    graph.save_onnx(args.output, external_data=args.external_data, keep_graphopt_ops=args.lower == "onnxruntime")
    if not args.quiet:
        print(report.table())
        print(f"{args.model}: {nodes_in} -> {len(graph)} nodes in {time.perf_counter() - start:.2f} s; wrote {args.output} ({_written_form(graph, args.lower)})")
    fidelity = _check_output(args.output, check, args.lower) if check is not None else None
    if fidelity is not None:
        print(fidelity)
    if before is not None:
        from graphopt.report import write_report

        pipeline = args.pipeline_file or args.pipeline
        one_line = None if fidelity is None else fidelity.replace(":\n  ", ": ").replace("\n  ", "; ")
        written = write_report(args.report, args.model, pipeline, before, _snapshot(graph, args), report, one_line)
        if not args.quiet:
            print(f"report: {', '.join(written)}")
    return 0


def _written_form(graph: "Graph", lower: str) -> str:
    """What the written file holds: standard ONNX, or which ONNX Runtime contrib kernels."""
    if lower == "onnx":
        return f"standard ONNX, opset {graph.opset()}; --lower onnxruntime writes ONNX Runtime's fused kernels"
    counts = collections.Counter(node.op_type for node in graph.nodes if node.domain not in ("", "ai.onnx"))
    listed = ", ".join(f"{op} x{count}" for op, count in sorted(counts.items()))
    return f"ONNX Runtime kernels: {listed}" if listed else "ONNX Runtime: no contrib kernel applied"


def _snapshot(graph: "Graph", args: argparse.Namespace) -> Any:
    from graphopt.report import GraphSnapshot

    return GraphSnapshot.of(graph, dict(args.dims))


def dump_ir_names(args: argparse.Namespace, passes: Sequence["Pass"]) -> list[str]:
    """The --dump-ir pass names or paths, checked against the pipeline (nested passes included)."""
    if not args.dump_ir:
        if args.dump_dir:
            raise GraphoptError("--dump-dir needs --dump-ir PASS[,PASS]|all")
        return []
    if not args.dump_dir:
        raise GraphoptError("--dump-ir needs --dump-dir DIR: the folder the IR dumps go to")
    names = [name.strip() for name in args.dump_ir.split(",") if name.strip()]
    known = _pass_names(passes, "")
    for name in names:
        if name != "all" and name not in known:
            listed = ", ".join(p.name for p in passes)
            raise GraphoptError(f"--dump-ir: pass '{name}' is not in the pipeline ({listed}), nor nested in it")
    return names


def _pass_names(passes: Sequence["Pass"], prefix: str) -> set[str]:
    """Names and paths (``fuse/cleanup``) of `passes` and of the passes nested in them."""
    names: set[str] = set()
    for item in passes:
        path = prefix + item.name
        names |= {item.name, path} | _pass_names(getattr(item, "passes", ()), path + "/")
    return names


def _check_output_path(model: str, output: str) -> None:
    """Refuse to overwrite the input (also via a link or another spelling) or write nowhere."""
    if os.path.exists(output) and os.path.exists(model) and os.path.samefile(model, output):
        raise GraphoptError(f"-o {output} is the input model; write the optimized model to another path")
    if os.path.isdir(output):
        raise GraphoptError(f"-o {output} is a folder; give the path of the .onnx file to write")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise GraphoptError(f"-o {output}: the folder {folder} does not exist")


@dataclasses.dataclass
class _Check:
    """What `--check` compares OUT against: IN's outputs on fixed sample inputs or on --inputs."""

    feeds: dict[str, Any]
    expected: list[Any]
    where: str


def _prepare_check(graph: "Graph", args: argparse.Namespace) -> _Check:
    from graphopt.calibration import load_inputs
    from graphopt.check import run_graph, sample_inputs

    if args.inputs:
        feeds = load_inputs(args.inputs, graph)
        where = f"on {args.inputs}"
    else:
        feeds = sample_inputs(graph, seed=args.seed, sizes=dict(args.dims))
        sizes = ", ".join(f"{name}={size}" for name, size in _sizes_used(graph.inputs, feeds).items())
        where = "on sample inputs" + (f" ({sizes})" if sizes else "")
    return _Check(feeds, run_graph(graph, feeds), where)


def _sizes_used(inputs: Sequence["Value"], feeds: dict[str, Any]) -> dict[str, int]:
    """The size each symbolic input dim got in `feeds`."""
    sizes = {}
    for value in inputs:
        for dim, size in zip(value.shape or (), feeds[value.name].shape):
            if isinstance(dim, str):
                sizes[dim] = int(size)
    return sizes


def _run_passes(
    graph: "Graph", passes: Sequence["Pass"], args: argparse.Namespace, dump_ir: list[str], check: Optional[_Check]
) -> "PipelineReport":
    """Run the pipeline through the PassManager; a crashing pass becomes a `PassCrash`."""
    from graphopt.pass_base import PassContext
    from graphopt.pass_manager import PassManager

    progress = Progress(len(passes), enabled=not args.quiet)
    manager = PassManager(
        passes, verify_each=args.verify, dump_ir=dump_ir, dump_dir=args.dump_dir, check=check is not None,
        check_inputs=None if check is None else check.feeds,
        check_expected=None if check is None else check.expected, instruments=[progress],
    )
    try:
        return manager.run(graph, PassContext(seed=args.seed, calibration=_calibration(graph, args)))
    except (GraphoptError, OSError):  # failures graphopt reports itself (OSError: e.g. writing dumps)
        raise
    except Exception as exc:
        raise PassCrash(progress.current, exc) from exc


def _calibration(graph: "Graph", args: argparse.Namespace) -> Optional[list[dict[str, Any]]]:
    """The --calibration-data samples, checked against the graph's inputs (None without it)."""
    if not getattr(args, "calibration_data", None):
        return None
    from graphopt.calibration import load_npz, normalize_calibration

    return normalize_calibration(graph, load_npz(args.calibration_data))


def _check_output(output: str, check: _Check, lower: str) -> str:
    """Run the written OUT on the check's inputs; the lines reporting its fidelity vs IN."""
    from graphopt.check import run_graph
    from graphopt.fidelity import compare_outputs, format_fidelity
    from graphopt.frontends.onnx_import import from_onnx

    if lower == "onnxruntime":  # ONNX Runtime's own ops: the file runs in ORT as written, as the target runs it
        names, actual = _run_ort_file(output, check.feeds)
    else:
        graph = from_onnx(output)
        names, actual = [v.name for v in graph.outputs], run_graph(graph, check.feeds)
    report = compare_outputs(check.expected, actual, names, check.feeds)
    return f"check: {output} vs the input {check.where}:\n" + textwrap.indent(format_fidelity(report), "  ")


def _run_ort_file(path: str, feeds: dict[str, Any]) -> tuple[list[str], list[Any]]:
    """(output names, outputs) of an ONNX file holding ORT's own ops (which graphopt's importer
    does not read), run in ONNX Runtime as the onnxruntime target runs it (a batched chunked
    prefill row by row, see `ort_io.run_by_batch_rows`)."""
    import onnx

    from graphopt.ort_io import reference_session, run_by_batch_rows

    def shapes(values: Any) -> dict[str, list[Any]]:
        return {v.name: [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in v.type.tensor_type.shape.dim] for v in values}

    graph = onnx.load(path, load_external_data=False).graph
    session, io = reference_session(path)
    outputs = run_by_batch_rows(lambda part: io.run(session, part), feeds, shapes(graph.input), list(shapes(graph.output).values()))
    return [o.name for o in session.get_outputs()], outputs


class Progress(Instrument):
    """Instrument: one line per top-level pass on stderr, only on a terminal.

    Silent when disabled (-q), when stderr is not a TTY, or for a single-pass pipeline.
    Remembers the innermost pass running now (by its path) so a crash can name it.
    """

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total = total
        self.enabled = enabled and total > 1
        self.started = 0
        self.running: list[str] = []

    @property
    def current(self) -> str:
        return self.running[-1] if self.running else "?"

    def before_pass(self, item: "Pass", graph: "Graph", record: PassRecord) -> None:
        self.running.append(record.path)
        if record.depth:
            return
        self.started += 1
        stream: TextIO = sys.stderr
        if self.enabled and stream.isatty():
            stream.write(f"[{self.started}/{self.total}] {item.describe()}\n")
            stream.flush()

    def after_pass(self, item: "Pass", graph: "Graph", result: "PassResult", record: PassRecord) -> None:
        self.running.pop()


# ----------------------------------------------------------------------------- passes
def _passes(args: argparse.Namespace) -> int:
    from graphopt.registry import get_pass, registered_passes

    chosen = [get_pass(name) for name in args.names] or list(registered_passes().values())
    infos = [pass_info(cls) for cls in chosen]
    if args.names:
        for info, cls in zip(infos, chosen):
            doc = inspect.cleandoc(cls.__doc__ or "")
            info["doc"] = doc[len(info["summary"]):].strip() if doc.startswith(info["summary"]) else doc
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 0
    if not infos:
        print("no passes registered")
    width = max((len(info["name"]) for info in infos), default=0)
    for info in infos:
        print(f"{info['name']:{width}}  {info['summary']}".rstrip())
        for option in info["options"]:
            default = f" = {option['default']!r}" if "default" in option else " (required)"
            print(f"    {option['name']}: {option['type']}{default}")
            if option.get("doc"):
                print(textwrap.fill(option["doc"], width=100, initial_indent=" " * 8, subsequent_indent=" " * 8))
        if "steps" in info:
            print(f"    (pipeline: {', '.join(info['steps'])})")
        facts = [f"{key}: {', '.join(info[key])}" for key in ("requires", "provides", "invalidates") if info[key]]
        if facts:
            print(f"    ({'; '.join(facts)})")
        if info.get("doc"):
            print("\n" + textwrap.indent(info["doc"], "    ") + "\n")
    return 0


def pass_info(cls: type["Pass"]) -> dict[str, Any]:
    """What `graphopt passes` shows about one pass class (a pipeline's facts and lossless
    flag are its nested passes', read from an instance with default options)."""
    from graphopt.pass_manager import Pipeline

    facts: Any = cls() if issubclass(cls, Pipeline) else cls
    docs = option_docs(cls)
    return {
        "name": cls.name,
        "summary": cls.summary(),
        "options": [{**_option_info(cls, field), **({"doc": docs[field.name]} if field.name in docs else {})} for field in cls.option_fields()],
        "requires": list(facts.requires),
        "provides": list(facts.provides),
        "invalidates": list(facts.invalidates),
        "lossless": facts.lossless,
        "module": cls.__module__,
        **({"steps": list(cls.steps)} if issubclass(cls, Pipeline) else {}),
    }


def option_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a class's (and its bases') annotated fields: `name: type = x` then `\"\"\"meaning\"\"\"`."""
    import ast

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # built-ins, classes defined at a prompt
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for field, after in zip(body, body[1:]):
            if (
                isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
            ):
                docs[field.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _option_info(cls: type, field: dataclasses.Field) -> dict[str, Any]:
    try:
        hint = typing.get_type_hints(cls).get(field.name, field.type)
    except (NameError, TypeError):  # a plug-in's annotation that cannot be resolved here
        hint = field.type
    info: dict[str, Any] = {"name": field.name, "type": _type_text(hint)}
    if field.default is not dataclasses.MISSING:
        info["default"] = field.default
    elif field.default_factory is not dataclasses.MISSING:
        info["default"] = field.default_factory()
    return info


def _type_text(hint: Any) -> str:
    if isinstance(hint, str):
        return hint
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


# ----------------------------------------------------------------------------- inspect
def _inspect(args: argparse.Namespace) -> int:
    from graphopt.api import load_graph
    from graphopt.model_sources import model_as_onnx

    with model_as_onnx(args.model) as source:
        graph = load_graph(source.onnx_path)
        graph.verify()
        summary = model_summary(graph, dict(args.dims))
        if args.json:
            print(json.dumps({"model": args.model, **summary}, indent=2))
            return 0
        print(_format_summary(args.model, summary))
        if args.ir:
            sys.stdout.write("\n" + str(graph) + "\n")
    return 0


def model_summary(graph: "Graph", sizes: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """Nodes, op histogram, parameters, inputs/outputs, opsets and estimated FLOPs."""
    from graphopt.flops import estimate_flops

    constants = [v.const for v in graph.constants.values()]
    return {
        "graph": graph.name,
        "nodes": len(graph),
        "ops": dict(sorted(graph.op_counts().items(), key=lambda item: (-item[1], item[0]))),
        "parameters": {
            "count": sum(c.size for c in constants),  # type: ignore[union-attr]
            "bytes": sum(c.nbytes for c in constants),  # type: ignore[union-attr]
            "tensors": len(constants),
        },
        "inputs": [_value_info(v) for v in graph.inputs],
        "outputs": [_value_info(v) for v in graph.outputs],
        "opsets": {domain or "ai.onnx": version for domain, version in sorted(graph.opset_imports.items())},
        "flops": estimate_flops(graph, sizes),
    }


def _value_info(value: "Value") -> dict[str, Any]:
    return {
        "name": value.name,
        "dtype": None if value.dtype is None else value.dtype.name.lower(),
        "shape": None if value.shape is None else list(value.shape),
    }


def _format_summary(model: str, summary: dict[str, Any]) -> str:
    params, flops = summary["parameters"], summary["flops"]
    opsets = ", ".join(f"{domain} {version}" for domain, version in summary["opsets"].items())
    lines = [
        f"{model}: graph '{summary['graph']}', {summary['nodes']} nodes, opsets {opsets}",
        f"parameters: {params['count']:,} ({_scaled(params['bytes'])}B) in {params['tensors']} tensors",
    ]
    for kind in ("inputs", "outputs"):
        lines.append(f"{kind}:")
        lines += [f"  {v['name']}: {v['dtype'] or '?'}{format_shape(v['shape'])}" for v in summary[kind]]
    sizes = ", ".join(f"{name}={size}" for name, size in flops["sizes"].items())
    lines.append(f"FLOPs: {flops['total']:,} ({_scaled(flops['total'])}FLOP)" + (f", assuming {sizes}" if sizes else ""))
    if flops["uncounted"]:
        lines.append("  not counted: " + ", ".join(f"{op} x{n}" for op, n in flops["uncounted"].items()))
    lines.append("ops:")
    lines += [f"  {count:6d}  {op}" for op, count in summary["ops"].items()]
    return "\n".join(lines)


def _scaled(number: float) -> str:
    """1234567 -> '1.23 M' (a space and an SI prefix; '' below 1000)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if number >= scale:
            return f"{number / scale:.3g} {prefix}"
    return f"{number:g} "


# ----------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with _logging_to_stderr(args.verbose, args.quiet), _interrupts_noted() as interrupted:
        try:
            return args.run(args)
        except BrokenPipeError:
            return 0
        except KeyboardInterrupt:
            _report("graphopt: interrupted", None)
            return 130
        except Exception as exc:
            if interrupted:  # Ctrl-C inside a native library (TVM) that turned it into its own error
                _report("graphopt: interrupted", exc if args.verbose else None)
                return 130
            if isinstance(exc, (GraphoptError, OSError)):
                _report(f"graphopt: error: {_one_line(exc)}", exc if args.verbose else None)
                return 2
            described = str(exc) if isinstance(exc, PassCrash) else f"{type(exc).__name__}: {_one_line(exc)}"
            hint = "" if args.verbose else " (rerun with -v for the traceback)"
            _report(f"graphopt: error: {described}{hint}", exc if args.verbose else None)
            return 1


def _report(message: str, exc: Optional[BaseException]) -> None:
    """Print the traceback (only when given, i.e. with -v) and then the one-line message."""
    if exc is not None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(message, file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages joined with '; ')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0].rstrip(":") + (": " + "; ".join(lines[1:]) if len(lines) > 1 else "")


@contextlib.contextmanager
def _interrupts_noted() -> Iterator[list[bool]]:
    """For the block, Ctrl-C raises KeyboardInterrupt as usual and is also noted in the yielded
    list (non-empty once interrupted), so an error a native library raised in its place
    (TVM's "RuntimeError") still reads as an interruption. Only in the main thread."""
    import signal
    import threading

    noted: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def on_interrupt(signum: int, frame: Any) -> None:
        noted.append(True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


class _StderrHandler(logging.Handler):
    """Writes log records to the current `sys.stderr` (which tests may swap)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


@contextlib.contextmanager
def _logging_to_stderr(verbose: bool, quiet: bool) -> Iterator[None]:
    """Show graphopt's log records on stderr for one command (info with -v, errors only with -q)."""
    logger = logging.getLogger(_LOGGER)
    handler, level = _StderrHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
