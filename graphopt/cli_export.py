"""The `graphopt export` command: any MODEL (see `graphopt.model_sources`) to an ONNX file.

    graphopt export path/to/hf-folder -o model.onnx [--task causal-lm] [--opset 17]
"""

from __future__ import annotations

import argparse
import os
import time
import typing
from typing import Any

from graphopt.errors import GraphoptError


def add_command(commands: Any, add_verbosity: typing.Callable[..., None]) -> None:
    from graphopt.model_sources import MODEL_HELP, TASK_HELP

    cmd = commands.add_parser(
        "export", help="export a Hugging Face folder, hf:<type> config, .pt2 or module:function to ONNX",
        description="Write MODEL as an ONNX file with its dynamic axes (batch, seq, past) named, the way Optimum "
        "names inputs and outputs. The model is exported in eval mode and left unchanged. "
        f"MODEL is {MODEL_HELP}.",
    )
    add_verbosity(cmd, top_level=False)
    cmd.add_argument("model", metavar="MODEL", help="the model to export")
    cmd.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the ONNX file (atomically)")
    cmd.add_argument("--task", default="auto", help=TASK_HELP)
    cmd.add_argument("--opset", type=int, default=None, help="ONNX opset of the export (default 17)")
    cmd.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    from graphopt.ir.types import format_shape
    from graphopt.exporters.files import atomic_write
    from graphopt.frontends.onnx_import import from_onnx
    from graphopt.model_sources import model_as_onnx

    if os.path.isdir(args.output):
        raise GraphoptError(f"-o {args.output} is a folder; give the path of the .onnx file to write")
    start = time.perf_counter()
    with model_as_onnx(args.model, task=args.task, opset=args.opset) as source:
        if not source.exported:
            raise GraphoptError(f"{args.model} is already an ONNX file; `graphopt optimize` or `compile` take it as is")
        with open(source.onnx_path, "rb") as handle:
            atomic_write(args.output, handle.read())
        graph = from_onnx(args.output)
    if not args.quiet:
        print(f"{args.model}: {source.origin}; wrote {args.output} in {time.perf_counter() - start:.1f} s")
        for kind, values in (("inputs", graph.inputs), ("outputs", graph.outputs)):
            shown = ", ".join(f"{v.name}: {v.dtype.name.lower() if v.dtype else '?'}{format_shape(v.shape)}" for v in values[:6])
            more = f", ... ({len(values)} in all)" if len(values) > 6 else ""
            print(f"  {kind}: {shown}{more}")
    return 0
