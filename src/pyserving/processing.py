"""Pre- and post-processing in Python, versioned with the model: the API a version folder's `processing.py` uses.

With `--enable_python_processing`, a version folder (beside `saved_model.pb`, `model.tflite` or
`model.onnx`, or alone: a pure-Python model, `model_platform: "python"`) may hold a `processing.py`
whose decorated functions become extra signatures of that version. Code in a model folder runs with
the server's rights: only serve folders you trust. Without the flag, `processing.py` is never imported.

    from pyserving import processing

    @processing.signature(
        "tag_text", inputs={"text": ("string", [-1])}, outputs={"labels": ("string", [-1])}
    )
    def tag_text(model, text):
        ids = ...                                              # numpy, from text
        out = model.predict("serving_default", {"ids": ids})   # the version's own graph
        return {"labels": LABELS[out["classes"]]}

`signature(name, *, inputs, outputs, batched=False)` names the signature and declares its inputs and
outputs as `{alias: (dtype, shape)}`: dtypes are TF's names ("string", "float", "double", "int8",
"int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool", "half", "bfloat16",
"complex64", "complex128"), shapes lists of ints with -1 for an unknown dimension (None: unknown rank).
The signatures appear in the metadata (method `tensorflow/serving/predict`) and answer REST
`:predict` (row and columnar), gRPC Predict and V2 infer (parameter `signature_name`).

The function is called with a `Model` handle first, then the inputs as keyword arguments (numpy
arrays; strings are object arrays of `bytes`), and returns a dict holding exactly the declared
outputs (numpy arrays, or anything `numpy.asarray` turns into the declared dtype; `str` is encoded
as UTF-8). A per-request function (`batched=False`) runs on the server's Python processing threads
(`--python_processing_threads`), bounded by the request's deadline (gRPC), `--rest_api_timeout_in_ms`
(REST) or `--python_processing_timeout_in_ms`; its `model.predict` calls join the server's batches.
With `batched=True` and `--enable_batching`, concurrent requests are merged as for a graph
signature and the function receives the whole batch (every input and output has the batch as its
first dimension).

Errors: raise `InvalidArgument("message")` for a bad request (400 / INVALID_ARGUMENT with that
message); any other exception answers 500 / INTERNAL with "ClassName: text", its traceback goes to
the server log.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["DTYPES", "InvalidArgument", "Model", "Signature", "TensorSpec", "signature"]

# TF's type names a signature may declare -> numpy dtypes (strings are object arrays of bytes).
DTYPES: dict[str, np.dtype] = {
    "float": np.dtype(np.float32),
    "double": np.dtype(np.float64),
    "half": np.dtype(np.float16),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "string": np.dtype(object),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "bfloat16": np.dtype(object),  # replaced below by ml_dtypes' bfloat16 when it is installed
}
try:
    import ml_dtypes

    DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - TensorFlow brings ml_dtypes
    del DTYPES["bfloat16"]


class InvalidArgument(Exception):
    """Raised by a processing function for a bad request: the client gets 400 / INVALID_ARGUMENT with its text."""


@dataclass(frozen=True)
class TensorSpec:
    """One declared input or output: TF dtype name and shape (None: unknown rank)."""

    dtype: str
    shape: tuple[int, ...] | None

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Signature:
    """What `signature` declared for a function."""

    name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    batched: bool
    function: Callable[..., Mapping[str, Any]]


class Model(Protocol):
    """The handle a processing function receives first: the model version it belongs to.

    `name`, `version`: the served model's name and this version's number. `path`: this version's
    folder (to load files shipped with it, such as a pickled estimator or a vocabulary).

    `predict(signature_name, inputs, *, model_name=None, version=None)` runs a signature on
    `inputs` (`{alias: numpy array}`) and returns `{alias: numpy array}` with every output. Without
    `model_name` it runs this version's own signatures (its graph's, through the server's batching
    when that is on, or another processing signature of the same version, on the calling thread);
    with `model_name` (and optionally `version`, else the latest) a signature of another model the
    same server serves, for small pipelines. Errors it raises (a bad input, a model that is not
    served) keep their status when the function lets them through.
    """

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def path(self) -> str: ...

    def predict(
        self,
        signature_name: str,
        inputs: Mapping[str, Any],
        *,
        model_name: str | None = None,
        version: int | None = None,
    ) -> dict[str, np.ndarray]: ...


# The signatures of the processing.py being imported (set by the server while it imports one file).
_registry: contextvars.ContextVar[list[Signature] | None] = contextvars.ContextVar("processing_registry", default=None)


def signature(
    name: str,
    *,
    inputs: Mapping[str, tuple[str, Sequence[int] | None]],
    outputs: Mapping[str, tuple[str, Sequence[int] | None]],
    batched: bool = False,
) -> Callable[[Callable[..., Mapping[str, Any]]], Callable[..., Mapping[str, Any]]]:
    """Declare the decorated function as the signature `name` of the version whose processing.py defines it.

    `inputs` and `outputs` map aliases to `(dtype, shape)`; `batched=True` lets the server merge
    concurrent requests into one call (first dimension of every input and output: the batch).
    Bad declarations raise `ValueError` or `TypeError`, which fails the version's load.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("processing.signature: the signature name must be a non-empty string")
    declared_inputs = _specs(name, "inputs", inputs, batched)
    declared_outputs = _specs(name, "outputs", outputs, batched)
    if not declared_outputs:
        raise ValueError(f"processing.signature {name!r}: declare at least one output")

    def decorate(function: Callable[..., Mapping[str, Any]]) -> Callable[..., Mapping[str, Any]]:
        if not callable(function):
            raise TypeError(f"processing.signature {name!r} decorates {function!r}, which is not callable")
        declared = Signature(name, declared_inputs, declared_outputs, bool(batched), function)
        function.__pyserving_signature__ = declared  # type: ignore[attr-defined]
        registry = _registry.get()
        if registry is not None:
            if any(existing.name == name for existing in registry):
                raise ValueError(f"processing.signature {name!r} is declared twice")
            registry.append(declared)
        return function

    return decorate


@contextlib.contextmanager
def _collecting() -> Iterator[list[Signature]]:
    """The signatures declared while the block runs (the server imports one processing.py in it)."""
    collected: list[Signature] = []
    token = _registry.set(collected)
    try:
        yield collected
    finally:
        _registry.reset(token)


def _specs(
    signature_name: str, what: str, declared: Mapping[str, tuple[str, Sequence[int] | None]], batched: bool
) -> dict[str, TensorSpec]:
    if not isinstance(declared, Mapping):
        raise TypeError(f"processing.signature {signature_name!r}: {what} must be a dict {{alias: (dtype, shape)}}")
    specs = {}
    for alias, entry in declared.items():
        where = f"processing.signature {signature_name!r} {what[:-1]} {alias!r}"
        if not isinstance(alias, str) or not alias:
            raise ValueError(f"processing.signature {signature_name!r}: {what} aliases must be non-empty strings")
        if not isinstance(entry, tuple | list) or len(entry) != 2:
            raise TypeError(f"{where}: expected (dtype, shape), got {entry!r}")
        dtype, shape = entry
        if dtype not in DTYPES:
            raise ValueError(f"{where}: unknown dtype {dtype!r}; expected one of {', '.join(sorted(DTYPES))}")
        dims: tuple[int, ...] | None = None
        if shape is not None:
            if isinstance(shape, str | bytes) or not isinstance(shape, Sequence):
                raise TypeError(f"{where}: shape must be a list of ints (-1: unknown) or None, got {shape!r}")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape):
                raise ValueError(f"{where}: shape must be a list of ints >= -1, got {list(shape)!r}")
            dims = tuple(shape)
        if batched and dims is not None and len(dims) == 0:
            raise ValueError(f"{where}: a batched signature's tensors need the batch as their first dimension")
        specs[alias] = TensorSpec(dtype, dims)
    return specs
