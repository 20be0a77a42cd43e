"""Entry point of `pyserving` and `tensorflow_model_server`.

With `--flags` it is the server; `pyserving example|inspect|convert|warmup ...`
runs a tool (`pyserving.tools`). Heavy imports (TensorFlow, gRPC) happen only
after the arguments are parsed, so `--help` and `--version` answer at once.
Called as `tensorflow_model_server`, `--help` prints exactly TF Serving's usage
(and exits 255 as it does); as `pyserving`, it also lists the tools.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys

from pyserving import __version__, flags, tools
from pyserving.errors import ServingError

__all__ = ["main"]

log = logging.getLogger("pyserving")

TF_SERVING_PROGRAM = "tensorflow_model_server"


def _program() -> str:
    return TF_SERVING_PROGRAM if os.path.basename(sys.argv[0]) == TF_SERVING_PROGRAM else "pyserving"


def _usage(program: str) -> str:
    text = flags.usage(program)
    if program != TF_SERVING_PROGRAM:
        text += "\nCommands (`pyserving COMMAND --help` for each):\n" + "".join(
            f"\t{name:<10}\t{tools.SUMMARIES[name]}\n" for name in tools.COMMANDS
        )
    return text


def configure_logging(tag: str = "pyserving") -> None:
    """Log lines as TF Serving's; `tag`: which process (`--num_workers` children name theirs)."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s.%(msecs)03d: %(levelname).1s {tag}] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    # TensorFlow's C++ start-up chatter is noise for a server; users can still override.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def configure_tensorflow() -> None:
    """Environment TensorFlow reads at import; a value the user set wins."""
    # oneDNN's CPU allocator keeps freed memory pooled for the life of the process, so an
    # unloaded version's memory would never go back to the OS (measured: bench/lifecycle_rss.py).
    # TF Serving's stock CPU build has no oneDNN either. TF_ENABLE_ONEDNN_OPTS=1 opts back in.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _tensorflow_version() -> str:
    for dist in ("tensorflow", "tensorflow-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    program = _program()
    if args and args[0] in tools.COMMANDS:
        return tools.main(args)
    try:
        parsed = flags.parse(args)
    except flags.UsageError as exc:
        if str(exc):
            print(exc, file=sys.stderr)
        sys.stdout.write(_usage(program))
        sys.stdout.flush()
        # TF Serving exits 255 even for --help.
        return 0 if not str(exc) and program != TF_SERVING_PROGRAM else 255
    options = parsed.options
    if parsed.unknown:
        sys.stdout.write(f"unknown argument: {parsed.unknown[0]}\n{_usage(program)}")
        sys.stdout.flush()
    if options.version:
        print(f"TensorFlow ModelServer: {__version__}-pyserving")
        print(f"TensorFlow Library: {_tensorflow_version()}")
        return 0
    configure_logging()
    configure_tensorflow()
    for name, reason in options.pending_flags(parsed.given):
        log.warning("Flag --%s is accepted but has no effect in this pyserving release (%s).", name, reason)

    try:
        workers = options.worker_count()
    except ServingError as exc:
        print(f"Failed to start server. Error: {exc}", flush=True)
        return 255
    if workers > 1:
        from pyserving.workers import supervisor

        code = supervisor.run(options, args, workers)
    else:
        from pyserving import server

        code = server.run(options)
    # Exit without joining worker threads: a load stuck inside TensorFlow (a hanging init op)
    # must not keep a stopped server alive. Everything that had to finish has finished.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
