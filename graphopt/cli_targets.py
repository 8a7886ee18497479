"""The `graphopt compile`, `graphopt run` and `graphopt targets` commands.

    graphopt compile MODEL --target SPEC -o DIR [-p PIPELINE]     optimize, compile, save an artifact
    graphopt run DIR --inputs INPUTS.npz [-o OUTPUTS.npz]         run a saved artifact
    graphopt targets [--json]                                     the registered targets and options
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import typing
from typing import Any

from graphopt.errors import GraphoptError


def add_commands(commands: Any, add_verbosity: typing.Callable[..., None]) -> None:
    """Add the three commands to the `graphopt` subparsers."""
    from graphopt.cli import add_inputs_option
    from graphopt.model_sources import MODEL_HELP

    cmd = commands.add_parser(
        "compile", help="optimize a model and compile it for a target into an artifact folder",
        description="Run PIPELINE over MODEL, then the target's lowering passes (listed in the per-pass "
        "table as 'lowering'), compile the result for TARGET and save the artifact "
        "(target files + manifest.json) into DIR atomically. Load it with `graphopt run` or "
        f"graphopt.load_compiled(DIR). MODEL is {MODEL_HELP}.",
    )
    add_verbosity(cmd, top_level=False)
    cmd.add_argument("model", metavar="MODEL", help="the model to compile (never modified)")
    cmd.add_argument("-t", "--target", required=True, metavar="SPEC", help="e.g. onnxruntime:cpu{threads=2}, torch, tvm:llvm; see `graphopt targets`")
    cmd.add_argument("-o", "--output", required=True, metavar="DIR", help="the artifact folder to write (replaced if it holds an artifact)")
    cmd.add_argument("-p", "--pipeline", default="fuse", metavar="PIPELINE", help="passes to run first (default: fuse)")
    cmd.add_argument(
        "--check", action="store_true",
        help="compare outputs after every pass, the target's lowering included, with IN's on sample inputs "
        "(fails naming the first lossless pass that changed them)",
    )
    cmd.add_argument("--verify", action="store_true", help="verify the IR after every pass, lowering included")
    cmd.add_argument(
        "--dump-ir", metavar="PASS[,PASS]|all",
        help="write the IR before and after these passes, the lowering's included (needs --dump-dir)",
    )
    cmd.add_argument("--dump-dir", metavar="DIR", help="folder for --dump-ir files")
    add_calibration_option(cmd)
    add_inputs_option(cmd, "run the compiled model and MODEL on these and print the fidelity")
    cmd.add_argument(
        "--world-size", type=int, default=1, metavar="N",
        help="tensor-parallel over N processes (the shard pass; torch target): DIR gets one artifact per rank, "
        "which `graphopt run DIR` starts again (default 1)",
    )
    cmd.set_defaults(run=_compile)

    cmd = commands.add_parser(
        "run", help="run a compiled artifact on inputs from an .npz file",
        description="Load the artifact in DIR, run it on the arrays in INPUTS.npz (named by input) "
        "and print the output shapes, or save the outputs with -o.",
    )
    add_verbosity(cmd, top_level=False)
    cmd.add_argument("artifact", metavar="DIR", help="a folder written by `graphopt compile`")
    cmd.add_argument("-i", "--inputs", required=True, metavar="INPUTS.npz", help="one array per model input, named by input")
    cmd.add_argument("-o", "--output", metavar="OUTPUTS.npz", help="write the outputs here (named by output)")
    cmd.set_defaults(run=_run)

    cmd = commands.add_parser(
        "targets", help="list the registered targets, their variants and options",
        description="List every registered target (built-in and from plug-ins), whether it can run here, its variants and options.",
    )
    add_verbosity(cmd, top_level=False)
    cmd.add_argument("--json", action="store_true", help="print JSON instead of text")
    cmd.set_defaults(run=_targets)


def add_calibration_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--calibration-data", metavar="INPUTS.npz",
        help="samples for data-aware passes (quantize, smooth-quant, prune-heads, ...): one array per input, "
        "named by input, samples along the first axis",
    )


def _compile(args: argparse.Namespace) -> int:
    from graphopt.api import compile, load_graph, with_lowering
    from graphopt.cli import dump_ir_names
    from graphopt.model_sources import model_as_onnx
    from graphopt.pipeline import build_pipeline
    from graphopt.target_registry import get_target

    if os.path.exists(args.output) and os.path.exists(args.model) and os.path.samefile(args.output, args.model):
        raise GraphoptError(f"-o {args.output} is the input model; give a folder for the artifact")
    passes = build_pipeline(args.pipeline)
    dump_ir = dump_ir_names(args, with_lowering(passes, get_target(args.target)))
    with model_as_onnx(args.model) as source:
        start = time.perf_counter()
        original = load_graph(source.onnx_path)
        feeds = None
        if args.inputs:
            from graphopt.calibration import load_inputs

            feeds = load_inputs(args.inputs, original)
        compiled = compile(
            original, args.target, passes, check=args.check, verify=args.verify, dump_ir=dump_ir, dump_dir=args.dump_dir,
            calibration_data=args.calibration_data, world_size=args.world_size,
        )
        built = time.perf_counter() - start
        try:
            path = compiled.save(args.output)
            if feeds is not None:
                fidelity = _fidelity_text(original, compiled, feeds, args.inputs)
        finally:
            if hasattr(compiled, "close"):  # a sharded model: stop its ranks
                compiled.close()
        if not args.quiet:
            if compiled.pipeline_report is not None:
                print(compiled.pipeline_report.table())
            ranks = f" as {args.world_size} ranks" if args.world_size > 1 else ""
            print(f"{args.model}: compiled for {compiled.target.spec}{ranks} in {built:.2f} s; wrote {path}")
            for line in compiled.build_notes():
                print(f"  {line}")
        if feeds is not None:
            print(fidelity)
    return 0


def _fidelity_text(original: Any, compiled: Any, feeds: dict[str, Any], where: str) -> str:
    """The compiled model's fidelity vs the original (run in ONNX Runtime) on `feeds`."""
    import textwrap

    from graphopt.check import run_graph
    from graphopt.fidelity import compare_outputs, format_fidelity

    report = compare_outputs(run_graph(original, feeds), list(compiled(**feeds)), compiled.output_names, feeds)
    return f"fidelity vs the original on {where}:\n" + textwrap.indent(format_fidelity(report), "  ")


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from graphopt.api import load_compiled
    from graphopt.calibration import load_input_arrays

    compiled = load_compiled(args.artifact)
    feeds = load_input_arrays(args.inputs, compiled.input_names)
    start = time.perf_counter()
    outputs = compiled(**feeds)
    elapsed = time.perf_counter() - start
    if args.output:
        save_outputs(args.output, dict(zip(compiled.output_names, outputs)))
    if not args.quiet:
        for name, value in zip(compiled.output_names, outputs):
            array = np.asarray(value)
            print(f"{name}: {array.dtype} {list(array.shape)}")
        print(f"ran {args.artifact} ({compiled.target.spec}) in {elapsed * 1000:.1f} ms" + (f"; wrote {args.output}" if args.output else ""))
    return 0


def save_outputs(path: str, arrays: dict[str, Any]) -> None:
    """Write the .npz atomically."""
    import io

    import numpy as np

    from graphopt.exporters.files import atomic_write

    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    atomic_write(path, buffer.getvalue())


def _targets(args: argparse.Namespace) -> int:
    from graphopt.target_registry import registered_targets

    infos = [target_info(cls) for cls in registered_targets().values()]
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 0
    for info in infos:
        status = "available" if info["available"] is None else f"unavailable: {info['available']}"
        variants = ":" + "|".join(info["variants"]) if info["variants"] else ""
        print(f"{info['name']}{variants}  {info['summary']} ({status})")
        for option in info["options"]:
            print(f"    {option['name']}: {option['type']} = {option['default']!r}")
    return 0


def target_info(cls: type) -> dict[str, Any]:
    """Name, summary, variants, options and availability of a target class."""
    from graphopt.cli import _type_text

    hints = typing.get_type_hints(cls)
    options = [
        {"name": f.name, "type": _type_text(hints.get(f.name, Any)), "default": f.default}
        for f in dataclasses.fields(cls) if f.name != "variant"
    ]
    try:
        available = cls(variant=cls.variants[0] if cls.variants else "").available()
    except Exception as exc:  # a plug-in's availability probe must not break the listing
        available = f"availability check failed: {exc}"
    return {"name": cls.name, "summary": cls.summary(), "variants": list(cls.variants), "options": options, "available": available}
