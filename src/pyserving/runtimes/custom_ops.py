"""Ops that TensorFlow itself does not register: TF Text's, and those of user libraries.

TF Serving links TF Text's ops into its binary; pyserving imports `tensorflow_text`
(the `pyserving[text]` extra) the first time a model needs an op nobody has
registered, and not before: the import takes ~0.4 s and most models never need it.
`--custom_op_libraries` (`tf.load_op_library`) and `--custom_op_modules` (Python
modules whose import registers ops) are loaded once at start-up, before any model.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from collections.abc import Sequence

import tensorflow as tf

from pyserving.errors import Code, ServingError

__all__ = ["TEXT_MODULE", "import_text_ops", "load", "unregistered_op", "unregistered_op_error"]

log = logging.getLogger("pyserving")

TEXT_MODULE = "tensorflow_text"
# TF's message when a graph names an op that no loaded library registers.
_UNREGISTERED = re.compile(r"Op type not registered '([^']+)'")


def load(libraries: Sequence[str], modules: Sequence[str]) -> None:
    """Register the ops of `--custom_op_libraries` and `--custom_op_modules`; `ServingError` names a failing one."""
    for path in libraries:
        try:
            tf.load_op_library(path)
        except Exception as exc:  # NotFoundError for a missing file, others for a bad library
            message = getattr(exc, "message", None) or str(exc)
            raise ServingError(Code.INVALID_ARGUMENT, f"--custom_op_libraries: cannot load {path}: {message}") from None
        log.info("Loaded custom op library %s", path)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ServingError(
                Code.INVALID_ARGUMENT, f"--custom_op_modules: cannot import {name}: {type(exc).__name__}: {exc}"
            ) from None
        log.info("Imported custom op module %s", name)


def unregistered_op(exc: BaseException) -> str | None:
    """The op a failed load names as unregistered, or None if it failed for another reason."""
    if not isinstance(exc, tf.errors.NotFoundError):
        return None
    match = _UNREGISTERED.search(exc.message)
    return match.group(1) if match else None


@functools.cache
def import_text_ops() -> bool:
    """Import `tensorflow_text` once, registering its ops; False if it is not installed (or fails to import)."""
    try:
        importlib.import_module(TEXT_MODULE)
    except ImportError as exc:
        log.info("%s is not importable (%s); its ops stay unregistered", TEXT_MODULE, exc)
        return False
    log.info("Imported %s: a model uses an op TensorFlow does not register", TEXT_MODULE)
    return True


def unregistered_op_error(op: str) -> ServingError:
    """The load error for a model whose graph names an op that nothing registered."""
    text = "tensorflow_text is imported" if import_text_ops() else "tensorflow_text is not installed"
    return ServingError(
        Code.NOT_FOUND,
        f"Op type not registered '{op}': no loaded library registers it ({text}). TF Text models need "
        "pyserving[text]; register other ops with --custom_op_libraries=LIB.so or --custom_op_modules=MODULE.",
    )
