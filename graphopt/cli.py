"""The `graphopt` command line.

    graphopt inspect MODEL.onnx            print the IR of a model
    graphopt inspect MODEL.onnx --ops      op histogram and value counts only

Errors graphopt raises on purpose (bad files, unsupported ops) print one line and exit
with status 2; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from graphopt import __version__

    parser = argparse.ArgumentParser(
        prog="graphopt",
        description="A compiler-style graph optimizer for Transformer models.",
    )
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    inspect = commands.add_parser(
        "inspect", help="print a model's IR (or its op histogram)",
        description="Load an ONNX model into graphopt's IR, verify it and print it.",
    )
    inspect.add_argument("model", help="path of an .onnx file")
    inspect.add_argument("--ops", action="store_true", help="print the op histogram instead of the whole graph")
    inspect.set_defaults(run=_inspect)
    return parser


def _inspect(args: argparse.Namespace) -> int:
    import graphopt

    graph = graphopt.from_onnx(args.model)
    graph.verify()
    if not args.ops:
        sys.stdout.write(str(graph))
        return 0
    weights = sum(v.const.nbytes for v in graph.constants.values())  # type: ignore[union-attr]
    print(f"{args.model}: {len(graph)} nodes, {len(graph.inputs)} inputs, {len(graph.outputs)} outputs, "
          f"{len(graph.constants)} constants ({weights / 1e6:.1f} MB), opsets {graph.opset_imports}")
    for op, count in sorted(graph.op_counts().items(), key=lambda item: (-item[1], item[0])):
        print(f"  {count:6d}  {op}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from graphopt.errors import GraphoptError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except GraphoptError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
