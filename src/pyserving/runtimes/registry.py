"""The runtimes, by `model_platform`: which module turns a version folder into a `Servable`.

A runtime is a module with `load(path, options) -> Servable`; adding one is that
module plus one line in `_RUNTIMES`. Modules are imported on first use, so a
platform nobody serves costs nothing (and its optional dependencies need not be
installed).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from pyserving.runtimes.servable import Servable

__all__ = ["TENSORFLOW_PLATFORM", "RuntimeOptions", "load", "platforms"]

TENSORFLOW_PLATFORM = "tensorflow"

# model_platform -> module implementing it.
_RUNTIMES = {
    TENSORFLOW_PLATFORM: "pyserving.runtimes.tf_saved_model",
}
# --prefer_tflite_model: TF Serving keeps model_platform "tensorflow" and serves a version folder's
# model.tflite instead of its SavedModel when the folder has one.
_TFLITE_FILE, _TFLITE_RUNTIME = "model.tflite", "pyserving.runtimes.tflite_model"


@dataclass(frozen=True)
class RuntimeOptions:
    """What runtimes take from the server's flags."""

    saved_model_tags: tuple[str, ...] = ("serve",)
    intra_op_parallelism: int = 0  # 0 = auto
    inter_op_parallelism: int = 0  # 0 = auto
    prefer_tflite_model: bool = False
    num_tflite_pools: int = 1  # interpreters per TFLite version
    num_tflite_interpreters_per_pool: int = 1  # > 1: large requests run in mini-batches on several interpreters


def platforms() -> frozenset[str]:
    """Every `model_platform` a model config may name."""
    return frozenset(_RUNTIMES)


def load(platform: str, path: str, options: RuntimeOptions) -> Servable:
    """Load the version folder `path` with the runtime of `platform` (a name from `platforms()`)."""
    name = _RUNTIMES[platform]
    if (
        platform == TENSORFLOW_PLATFORM
        and options.prefer_tflite_model
        and os.path.exists(os.path.join(path, _TFLITE_FILE))
    ):
        name = _TFLITE_RUNTIME
    module = importlib.import_module(name)
    servable: Servable = module.load(path, options)
    return servable
