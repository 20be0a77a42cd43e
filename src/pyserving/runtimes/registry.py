"""The runtimes, by `model_platform`: which module turns a version folder into a `Servable`.

A runtime is a module with `load(path, options) -> Servable` and
`signature_defs(path, options)` (what a version folder serves, for tools); adding
one is that module plus one line in `_RUNTIMES` and, if a file marks its version
folders, one in `_MARKERS`. Modules are imported on first use, so a
platform nobody serves costs nothing (and its optional dependencies need not be
installed).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from tensorflow.core.protobuf import meta_graph_pb2

from pyserving.runtimes.servable import Servable

__all__ = [
    "ONNX_PLATFORM",
    "PYTHON_PLATFORM",
    "TENSORFLOW_PLATFORM",
    "RuntimeOptions",
    "detect",
    "load",
    "markers",
    "options_for_tools",
    "platform_of",
    "platforms",
    "runtime",
    "signature_defs",
]

TENSORFLOW_PLATFORM = "tensorflow"
ONNX_PLATFORM = "onnx"
PYTHON_PLATFORM = "python"  # a version folder with only processing.py (--enable_python_processing)

# model_platform -> module implementing it.
_RUNTIMES = {
    TENSORFLOW_PLATFORM: "pyserving.runtimes.tf_saved_model",
    ONNX_PLATFORM: "pyserving.runtimes.onnx_model",
    PYTHON_PLATFORM: "pyserving.runtimes.python_processing",
}

# --prefer_tflite_model: TF Serving keeps model_platform "tensorflow" and serves a version folder's
# model.tflite instead of its SavedModel when the folder has one.
_TFLITE_FILE, _TFLITE_RUNTIME = "model.tflite", "pyserving.runtimes.tflite_model"
# model_platform -> files that mark a version folder as its own, in detection order (a SavedModel wins).
_MARKERS = {
    TENSORFLOW_PLATFORM: ("saved_model.pb", "saved_model.pbtxt", _TFLITE_FILE),
    ONNX_PLATFORM: ("model.onnx",),
    PYTHON_PLATFORM: ("processing.py",),  # last: beside a model file, processing.py adds to that model
}


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


def runtime(platform: str, path: str, options: RuntimeOptions) -> str:
    """The module that serves the version folder `path` of a `platform` model (a name from `platforms()`)."""
    if (
        platform == TENSORFLOW_PLATFORM
        and options.prefer_tflite_model
        and os.path.exists(os.path.join(path, _TFLITE_FILE))
    ):
        return _TFLITE_RUNTIME
    return _RUNTIMES[platform]


def load(platform: str, path: str, options: RuntimeOptions) -> Servable:
    """Load the version folder `path` with the runtime of `platform` (a name from `platforms()`)."""
    servable: Servable = importlib.import_module(runtime(platform, path, options)).load(path, options)
    return servable


def markers() -> dict[str, tuple[str, ...]]:
    """model_platform -> the files that mark a version folder as its own."""
    return dict(_MARKERS)


def platform_of(file_names: Iterable[str]) -> str | None:
    """The platform whose marker is among a version folder's top-level `file_names` (`detect`'s order)."""
    names = set(file_names)
    for platform, files in _MARKERS.items():
        if names.intersection(files):
            return platform
    return None


def detect(version_folder: str) -> str | None:
    """The platform whose marker file the version folder holds (the first in `_MARKERS` order), else None."""
    for platform, files in _MARKERS.items():
        if any(os.path.isfile(os.path.join(version_folder, f)) for f in files):
            return platform
    return None


def options_for_tools(folder: str, options: RuntimeOptions) -> RuntimeOptions:
    """`options`, except that a folder whose only model is `model.tflite` is read as `--prefer_tflite_model`
    serves it (tools have nothing else to show for it)."""
    others = [f for f in _MARKERS[TENSORFLOW_PLATFORM] if f != _TFLITE_FILE]
    if os.path.isfile(os.path.join(folder, _TFLITE_FILE)) and not any(
        os.path.isfile(os.path.join(folder, f)) for f in others
    ):
        return dataclasses.replace(options, prefer_tflite_model=True)
    return options


def signature_defs(platform: str, path: str, options: RuntimeOptions) -> dict[str, meta_graph_pb2.SignatureDef]:
    """What the version folder `path` would serve, read as cheaply as its runtime allows (nothing is run)."""
    module = importlib.import_module(runtime(platform, path, options))
    signatures: dict[str, meta_graph_pb2.SignatureDef] = module.signature_defs(path, options)
    return signatures
