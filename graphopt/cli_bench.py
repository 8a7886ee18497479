"""The `graphopt bench` command (see `graphopt.bench`)."""

from __future__ import annotations

import argparse
import sys
import textwrap
import typing
from typing import Any


def add_command(commands: Any, add_verbosity: typing.Callable[..., None], add_dims: typing.Callable[..., None]) -> None:
    from graphopt.bench import CONTENDERS

    cmd = commands.add_parser(
        "bench", help="time the original model, graphopt's result and alternatives side by side",
        description="Build the original model (ONNX Runtime), graphopt's result (PIPELINE compiled for "
        "TARGET) and each contender of --against; time them side by side in rounds on the same inputs and "
        "print latency, ratio to the original, size, FLOPs and fidelity.",
    )
    add_verbosity(cmd, top_level=False)
    from graphopt.cli import add_inputs_option
    from graphopt.cli_targets import add_calibration_option
    from graphopt.model_sources import MODEL_HELP

    cmd.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    cmd.add_argument("-p", "--pipeline", default="fuse", help="graphopt's pipeline (default: fuse)")
    cmd.add_argument("-t", "--target", default="onnxruntime:cpu", metavar="SPEC", help="graphopt's target (default: onnxruntime:cpu)")
    cmd.add_argument(
        "--against", default="ort-opt", metavar="LIST",
        help=f"comma-separated contenders from {', '.join(CONTENDERS)} (default: ort-opt; 'none' for none)",
    )
    cmd.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    cmd.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    cmd.add_argument("--threads", type=int, default=2, help="intra-op threads for every contender (default 2; 0: the runtime's default)")
    cmd.add_argument("--warmup", type=int, default=3, help="untimed calls per contender (default 3)")
    cmd.add_argument("--repeats", type=int, default=10, help="timed calls per contender (default 10)")
    add_dims(cmd, "sizes of other symbolic input dims")
    add_inputs_option(cmd, "time and compare on these inputs instead of random token ids (--batch/--seq are then the file's)")
    add_calibration_option(cmd)
    cmd.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    cmd.add_argument("--html", metavar="FILE", help="also write an HTML page with the table and charts")
    cmd.add_argument("--png", metavar="FILE", help="also write the charts as PNG (needs matplotlib)")
    cmd.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from graphopt.bench import run_bench, save_html, save_json, save_png

    against = [] if args.against.strip() == "none" else [a.strip() for a in args.against.split(",") if a.strip()]

    def progress(message: str) -> None:
        if not args.quiet and sys.stderr.isatty():
            sys.stderr.write(f"  {message}\r\n")

    result = run_bench(
        args.model, args.pipeline, args.target, against, batch=args.batch, seq=args.seq, threads=args.threads,
        warmup=args.warmup, repeats=args.repeats, dims=dict(args.dims), progress=progress,
        inputs=args.inputs, calibration_data=args.calibration_data,
    )
    if args.json:
        save_json(result, args.json)
    if args.html:
        save_html(result, args.html)
    if args.png:
        save_png(result, args.png)
    print(result.header())
    print(result.table())
    if not args.quiet:
        for note in result.footnotes():
            print(textwrap.fill(note, width=110, initial_indent="* ", subsequent_indent="  "))
    return 0
