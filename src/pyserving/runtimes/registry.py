"""The runtimes, by `model_platform`: which module turns a version folder into a `Servable`.

A runtime is a module with `load(path, options) -> Servable`; adding one is that
module plus one line in `_RUNTIMES`. Modules are imported on first use, so a
platform nobody serves costs nothing (and its optional dependencies need not be
installed).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pyserving.runtimes.servable import Servable

__all__ = ["TENSORFLOW_PLATFORM", "RuntimeOptions", "load", "platforms"]

TENSORFLOW_PLATFORM = "tensorflow"

# model_platform -> module implementing it.
_RUNTIMES = {
    TENSORFLOW_PLATFORM: "pyserving.runtimes.tf_saved_model",
}


@dataclass(frozen=True)
class RuntimeOptions:
    """What runtimes take from the server's flags."""

    saved_model_tags: tuple[str, ...] = ("serve",)
    intra_op_parallelism: int = 0  # 0 = auto
    inter_op_parallelism: int = 0  # 0 = auto


def platforms() -> frozenset[str]:
    """Every `model_platform` a model config may name."""
    return frozenset(_RUNTIMES)


def load(platform: str, path: str, options: RuntimeOptions) -> Servable:
    """Load the version folder `path` with the runtime of `platform` (a name from `platforms()`)."""
    module = importlib.import_module(_RUNTIMES[platform])
    servable: Servable = module.load(path, options)
    return servable
