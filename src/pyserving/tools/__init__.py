"""`pyserving inspect | convert | warmup`: the model glue TF Serving users otherwise write by hand.

The server itself stays `pyserving` / `tensorflow_model_server` with flags; these
subcommands are recognised by their first argument. Every failure prints one
clear line (`pyserving <command>: error: ...`) and exits 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

COMMANDS = ("inspect", "convert", "warmup")


class ToolError(Exception):
    """A user-facing failure: bad path, tensor name, request or option."""


def main(argv: list[str]) -> int:
    # Both together keep TensorFlow's start-up lines out of a tool's output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    args = _parser().parse_args(argv)
    from pyserving.errors import ServingError

    try:
        return args.run(args)
    except (ToolError, ServingError, OSError) as exc:
        message = exc.message if isinstance(exc, ServingError) else str(exc)
        print(f"pyserving {args.command}: error: {message}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyserving", description="Model tooling (the server takes --flags).")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="versions and signatures of a model")
    inspect.add_argument("path", help="a model base path or one version folder")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--tags", default="serve", help="MetaGraph tags (default: serve)")
    inspect.set_defaults(run=_run_inspect)

    convert = commands.add_parser("convert", help="a TF1 checkpoint or frozen graph to a versioned SavedModel")
    kinds = convert.add_subparsers(dest="kind", required=True)
    for kind, source_help in (
        ("checkpoint", "checkpoint folder or prefix (with its .meta graph)"),
        ("frozen-graph", "frozen GraphDef file (.pb)"),
    ):
        sub = kinds.add_parser(kind)
        sub.add_argument("source", help=source_help)
        sub.add_argument("export_base", help="model base path; the SavedModel goes to <export_base>/<version>")
        sub.add_argument("--input", action="append", required=True, metavar="ALIAS=TENSOR")
        sub.add_argument("--output", action="append", required=True, metavar="ALIAS=TENSOR")
        sub.add_argument("--signature_name", default="serving_default")
        sub.add_argument("--method", choices=("predict", "classify", "regress"), default="predict")
        sub.add_argument("--version", type=int, help="version number (default: one above the highest)")
        sub.set_defaults(run=_run_convert)

    warmup = commands.add_parser("warmup", help="write assets.extra/tf_serving_warmup_requests")
    warmup.add_argument("base_path", help="model base path")
    warmup.add_argument("--requests", required=True, help="JSON list of REST request bodies")
    warmup.add_argument("--version", type=int, help="version folder to write into (default: newest)")
    warmup.add_argument("--tags", default="serve", help="MetaGraph tags (default: serve)")
    warmup.set_defaults(run=_run_warmup)
    return parser


def _run_inspect(args: argparse.Namespace) -> int:
    from pyserving.tools import inspect

    print(inspect.render(inspect.describe(args.path, args.tags.split(",")), args.json))
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from pyserving.tools import convert

    spec = convert.SignatureSpec(
        convert.parse_pairs(args.input), convert.parse_pairs(args.output), args.signature_name, args.method
    )
    if args.kind == "checkpoint":
        path = convert.from_checkpoint(args.source, args.export_base, spec, args.version)
    else:
        path = convert.from_frozen_graph(args.source, args.export_base, spec, args.version)
    print(f"Wrote SavedModel to {path}")
    return 0


def _run_warmup(args: argparse.Namespace) -> int:
    from pyserving.tools import warmup_file

    path, count = warmup_file.write(args.base_path, args.requests, args.version, args.tags.split(","))
    print(f"Wrote {count} warmup record(s) to {path}")
    return 0
