"""`pyserving example | inspect | convert | warmup`: the model glue TF Serving users otherwise write by hand.

The server itself stays `pyserving` / `tensorflow_model_server` with flags; these
subcommands are recognised by their first argument. Every failure prints one
clear line (`pyserving <command>: error: ...`) and exits 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from pyserving.errors import PyservingError

__all__ = ["COMMANDS", "SUMMARIES", "ToolError", "main"]

COMMANDS = ("example", "inspect", "convert", "warmup")
# One line each, for `pyserving --help` and the tools' own help.
SUMMARIES = {
    "example": "export the getting-started model (half_plus_two) to serve",
    "inspect": "show a model's versions and the signatures of its newest version",
    "convert": "turn a TF1 checkpoint or frozen graph into a versioned SavedModel",
    "warmup": "write a version's warmup file from REST request bodies",
}


class ToolError(PyservingError):
    """A user-facing failure: bad path, tensor name, request or option."""


def main(argv: list[str]) -> int:
    # Both together keep TensorFlow's start-up lines out of a tool's output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    args = _parser().parse_args(argv)
    from pyserving.errors import ServingError

    try:
        code: int = args.run(args)
        return code
    except (ToolError, ServingError, OSError) as exc:
        message = exc.message if isinstance(exc, ServingError) else str(exc)
        print(f"pyserving {args.command}: error: {message}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyserving",
        description="Model tools. The server itself takes TF Serving's --flags: see `pyserving --help`.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=SUMMARIES[name],
            description=f"{SUMMARIES[name][0].upper()}{SUMMARIES[name][1:]}.\n\n{description}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    example = command(
        "example",
        "The model computes y = 0.5 * x + 2 and has TF Serving's half_plus_two signatures: serving_default\n"
        "(:predict), regress_x_to_y (:regress) and classify_x_to_y (:classify), the last two on tf.Examples\n"
        "with a float feature x. Then:\n"
        "  pyserving --model_name=half_plus_two --model_base_path=BASE_PATH --rest_api_port=8501",
    )
    example.add_argument("base_path", help="model base path; the model is written to BASE_PATH/<version>")
    example.add_argument("--version", type=int, default=1, help="version number (default: 1)")
    example.set_defaults(run=_run_example)

    inspect = command(
        "inspect",
        "Any runtime's version folders (SavedModel, model.tflite, model.onnx). Reads the model files only; nothing is\n"
        "loaded or run (an ONNX graph is opened in ONNX Runtime, unoptimized, to read its inputs and outputs).",
    )
    inspect.add_argument("path", help="a model base path or one version folder")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--tags", default="serve", help="MetaGraph tags (default: serve)")
    inspect.add_argument(
        "--prefer_tflite_model",
        action="store_true",
        help="show model.tflite's signatures where a folder has a SavedModel too, as the server's flag serves it",
    )
    inspect.set_defaults(run=_run_inspect)

    convert = command(
        "convert",
        "The signature maps the aliases clients use to tensors of the graph; the SavedModel is written\n"
        "under a staging name and renamed into <export_base>/<version> only when complete.",
    )
    kinds = convert.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, summary, source_help in (
        ("checkpoint", "a TF1 checkpoint (variables and .meta graph)", "checkpoint folder or prefix"),
        ("frozen-graph", "a frozen GraphDef (constants, no variables)", "frozen GraphDef file (.pb)"),
    ):
        sub = kinds.add_parser(kind, help=summary, description=f"Convert {summary} to a versioned SavedModel.")
        sub.add_argument("source", help=source_help)
        sub.add_argument("export_base", help="model base path; the SavedModel goes to <export_base>/<version>")
        sub.add_argument("--input", action="append", required=True, metavar="ALIAS=TENSOR", help="an input")
        sub.add_argument("--output", action="append", required=True, metavar="ALIAS=TENSOR", help="an output")
        sub.add_argument("--signature_name", default="serving_default", help="(default: serving_default)")
        sub.add_argument(
            "--method",
            choices=("predict", "classify", "regress"),
            default="predict",
            help="the signature's API (default: predict)",
        )
        sub.add_argument("--version", type=int, help="version number (default: one above the highest)")
        sub.set_defaults(run=_run_convert)

    warmup = command(
        "warmup",
        "Each body is decoded as the REST API would decode it, against the version's own signatures, and\n"
        "written to <version>/assets.extra/tf_serving_warmup_requests, which pyserving and TF Serving\n"
        "replay before the version serves. A signature without inputs (which REST cannot call) takes a\n"
        'body that names none: {"signature_name": "incr_counter"}.',
    )
    warmup.add_argument("base_path", help="model base path")
    warmup.add_argument("--requests", required=True, help="JSON list of REST request bodies")
    warmup.add_argument("--version", type=int, help="version folder to write into (default: newest)")
    warmup.add_argument("--tags", default="serve", help="MetaGraph tags (default: serve)")
    warmup.set_defaults(run=_run_warmup)
    return parser


def _run_example(args: argparse.Namespace) -> int:
    from pyserving.tools.example import export_half_plus_two

    print(f"Wrote half_plus_two to {export_half_plus_two(os.path.abspath(args.base_path), args.version)}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from pyserving.tools import inspect

    print(inspect.render(inspect.describe(args.path, args.tags.split(","), args.prefer_tflite_model), args.json))
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
