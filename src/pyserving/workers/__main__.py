"""`python -m pyserving.workers model|worker INDEX`: a child of the `--num_workers` supervisor;
`python -m pyserving.workers codec FD`: a codec process (`codecs`) of any serving process."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

from pyserving import cli, flags
from pyserving.workers.supervisor import ARGV_ENV, DIR_ENV, READY_FD_ENV, die_with_parent


def main() -> int:
    role = sys.argv[1]
    if role == "codec":  # no parent-death signal: it exits when its socket closes (workers.codecs)
        cli.configure_logging("pyserving codec")
        _protos_only_tensorflow()
        from pyserving.workers import codecs

        return codecs.serve(int(sys.argv[2]))
    die_with_parent()
    options = flags.parse(json.loads(os.environ[ARGV_ENV])).options
    run_dir = os.environ[DIR_ENV]
    if role == "model":
        cli.configure_logging("pyserving model")
        cli.configure_tensorflow()
        from pyserving.workers import model_process

        return model_process.serve(options, run_dir, int(os.environ[READY_FD_ENV]))
    index = int(sys.argv[2])
    cli.configure_logging(f"pyserving worker {index}")
    cli.configure_tensorflow()
    _protos_only_tensorflow()
    from pyserving.workers import worker

    return worker.serve(options, run_dir, index)


def _protos_only_tensorflow() -> None:
    """Let a worker or a codec process import TensorFlow's generated protos (`tensorflow.core.*_pb2`, which the
    protocols and tensorflow_serving's APIs use) without running `tensorflow/__init__.py`, which loads the whole
    library (about 450 MiB of a worker's RSS). They never run TensorFlow ops: the model process does."""
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or spec.submodule_search_locations is None:
        return
    package = types.ModuleType("tensorflow", "TensorFlow's packages, for its protos only (a protocol worker)")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["tensorflow"] = package


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as the single process: a stuck TF thread must not keep a stopped child alive
