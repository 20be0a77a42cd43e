"""A version folder's `processing.py` (`--enable_python_processing`): Python signatures beside the graph's.

`ProcessingServable(inner, ...)` wraps any runtime's servable (or none: a pure-Python model,
`model_platform: "python"`) and adds the functions `processing.py` declares with
`pyserving.processing.signature`. The loader chain applies it right after the runtime load, so with
batching the chain is runtime -> ProcessingServable -> BatchedServable:

- graph signatures go to the inner servable (batched as before);
- a `batched=True` processing signature is batched like a graph signature and runs on a batch
  thread; its `model.predict` calls the inner servable directly (its input is already a batch, and a
  batch thread must never wait for another batch);
- a per-request processing signature is never batched (`unbatched_signatures`): it runs on the
  shared `ProcessingPool`, awaited off the event loop with the request's timeout; its
  `model.predict` goes through the batching wrapper, so its graph calls join batches.

Each processing.py is imported under a module name of its own (model, version, a hash of its path,
a counter), so versions and models never share a module; it leaves `sys.modules` on close.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import itertools
import logging
import os
import queue
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving import processing
from pyserving.errors import Code, ServingError, invalid_argument
from pyserving.runtimes.batching import BatchedServable
from pyserving.runtimes.registry import RuntimeOptions
from pyserving.runtimes.servable import PREDICT_METHOD, Servable

__all__ = [
    "FILE",
    "FLAG",
    "ProcessingPool",
    "ProcessingServable",
    "ProcessingSettings",
    "load",
    "signature_defs",
]

log = logging.getLogger("pyserving")

FILE = "processing.py"
FLAG = "--enable_python_processing"
PYTHON_RUNTIME = "Python"
_counter = itertools.count(1)


class _Target(Protocol):
    """What the processing layer needs from a resolved model version (`serving.Target`)."""

    version: int
    servable: Servable

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc_info: object) -> Any: ...


# (model name, version or None) -> a leased version, for `model.predict(..., model_name=...)`.
Resolver = Callable[[str, int | None], AbstractContextManager[_Target]]


class ProcessingPool:
    """The threads per-request processing functions run on, shared by every model.

    A call that passes its deadline is abandoned: its client gets DEADLINE_EXCEEDED while the thread
    finishes it (Python cannot stop a thread). Threads held by abandoned calls do not serve new ones;
    when every thread is held so, new calls fail at once (UNAVAILABLE) instead of queueing forever.
    """

    def __init__(self, threads: int, name: str = "python_processing") -> None:
        self.threads = max(threads, 1)
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._abandoned = 0  # threads running a call nobody waits for any more
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, fn: Callable[[], list[np.ndarray]]) -> _Call:
        with self._lock:
            if self._abandoned >= self.threads:
                raise ServingError(
                    Code.UNAVAILABLE,
                    f"All {self.threads} Python processing threads are still running calls that passed their "
                    "deadline; Python processing is unavailable until one returns",
                )
        call = _Call(fn)
        self._queue.put(call)
        return call

    def abandon(self, call: _Call) -> None:
        """The caller stopped waiting: drop the call if it has not started, else count its thread as held."""
        with self._lock:
            if call.state == _QUEUED:
                call.state = _DROPPED
            elif call.state == _RUNNING:
                call.state = _ABANDONED
                self._abandoned += 1

    def stop(self) -> None:
        for _ in self._workers:
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            with self._lock:
                if call.state != _QUEUED:
                    continue
                call.state = _RUNNING
            try:
                outcome: Any = call.fn()
            except BaseException as exc:  # handed to the caller; the thread goes on
                outcome = exc
            with self._lock:
                abandoned = call.state == _ABANDONED
                if abandoned:
                    self._abandoned -= 1
                call.state = _DONE
            if not abandoned:
                try:
                    _complete(call.future, outcome)
                except InvalidStateError:  # the caller cancelled it meanwhile: nobody is waiting
                    pass


_QUEUED, _RUNNING, _ABANDONED, _DROPPED, _DONE = range(5)


class _Call:
    __slots__ = ("fn", "future", "state")

    def __init__(self, fn: Callable[[], list[np.ndarray]]) -> None:
        self.fn = fn
        self.future: Future[list[np.ndarray]] = Future()
        self.state = _QUEUED


def _complete(future: Future[Any], outcome: Any) -> None:
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass
class ProcessingSettings:
    """What the loader chain gives every ProcessingServable (from the flags)."""

    pool: ProcessingPool
    default_timeout_ms: int  # --python_processing_timeout_in_ms: when a request carries no deadline
    resolver: Resolver | None = None  # set once the data plane exists (calls to other models)


class ProcessingServable:
    """A version's servable plus the signatures its processing.py declares (see the module's docstring)."""

    def __init__(
        self, inner: Servable | None, model: str, version: int, path: str, settings: ProcessingSettings
    ) -> None:
        self.inner = inner
        self.model, self.version, self.path = model, version, path
        self._settings = settings
        # Where this version's own graph calls go from a per-request function: the batching wrapper
        # when there is one (the loader chain sets it), else the inner servable.
        self.graph_runner: Servable | None = inner
        self._module_name, self._functions = _import(model, version, path)
        try:
            self._signature_defs = dict(inner.signature_defs) if inner is not None else {}
            for name, declared in self._functions.items():
                if name in self._signature_defs:
                    raise invalid_argument(
                        f"{os.path.join(path, FILE)} declares signature {name!r}, which the model already has"
                    )
                self._signature_defs[name] = _signature_def(declared)
        except BaseException:
            sys.modules.pop(self._module_name, None)
            raise
        self.unbatched_signatures = frozenset(n for n, d in self._functions.items() if not d.batched)

    @property
    def runtime(self) -> str:
        return self.inner.runtime if self.inner is not None else PYTHON_RUNTIME

    @property
    def signature_defs(self) -> dict[str, meta_graph_pb2.SignatureDef]:
        return self._signature_defs

    def runs_async(self, signature_name: str) -> bool:
        """Whether the data plane must await `run_async` (a processing signature) rather than call `run`."""
        return signature_name in self._functions

    def run(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_aliases: Sequence[str], timeout_ms: int
    ) -> list[np.ndarray]:
        """On the calling thread: a graph signature on the inner servable, a processing one called here
        (the caller is a batch thread, or a processing thread calling a signature of this version)."""
        declared = self._functions.get(signature_name)
        if declared is None:
            return self._inner().run(signature_name, inputs, output_aliases, timeout_ms)
        direct = declared.batched  # a batched function's graph calls must not wait for another batch
        return self._call(declared, inputs, output_aliases, timeout_ms, direct)

    async def run_async(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_aliases: Sequence[str], timeout_ms: int
    ) -> list[np.ndarray]:
        """A processing signature on the processing pool, awaited with the request's timeout (or the default)."""
        declared = self._functions[signature_name]
        timeout = (timeout_ms or self._settings.default_timeout_ms) / 1000
        pool = self._settings.pool
        call = pool.submit(lambda: self._call(declared, inputs, output_aliases, timeout_ms, False))
        waiting = asyncio.wrap_future(call.future)
        try:
            done, _ = await asyncio.wait({waiting}, timeout=timeout)
        except asyncio.CancelledError:  # the client went away
            pool.abandon(call)
            raise
        if not done:
            pool.abandon(call)
            waiting.cancel()
            raise ServingError(
                Code.DEADLINE_EXCEEDED,
                f"Processing signature {signature_name} of model {self.model} version {self.version} did not "
                f"return within {timeout * 1000:.0f} ms",
            )
        return waiting.result()

    def run_multi(
        self, tasks: Sequence[tuple[str, Sequence[str]]], inputs: dict[str, np.ndarray], timeout_ms: int
    ) -> list[list[np.ndarray]]:
        return self._inner().run_multi(tasks, inputs, timeout_ms)

    def close(self) -> None:
        sys.modules.pop(self._module_name, None)
        self._functions = {}
        if self.inner is not None:
            self.inner.close()

    def predict(
        self,
        signature_name: str,
        inputs: Mapping[str, Any],
        model_name: str | None,
        version: int | None,
        timeout_ms: int,
        direct: bool,
    ) -> dict[str, np.ndarray]:
        """`Model.predict` of a handle of this version; `direct`: called on a batch thread."""
        if model_name is None:
            return _run_signature(self, signature_name, inputs, timeout_ms, direct, own=True)
        resolver = self._settings.resolver
        if resolver is None:
            raise ServingError(Code.UNAVAILABLE, "Calls to other models are not available while the server starts")
        with resolver(model_name, version) as target:
            return _run_signature(target.servable, signature_name, inputs, timeout_ms, direct, own=False)

    def _inner(self) -> Servable:
        if self.inner is None:
            raise ServingError(Code.FAILED_PRECONDITION, "A pure-Python model has no graph signatures")
        return self.inner

    def _call(
        self,
        declared: processing.Signature,
        inputs: dict[str, np.ndarray],
        output_aliases: Sequence[str],
        timeout_ms: int,
        direct: bool,
    ) -> list[np.ndarray]:
        """Call the function: checked inputs in, checked outputs back in `output_aliases` order."""
        arguments = {alias: _checked_input(declared, alias, array) for alias, array in inputs.items()}
        handle = _Handle(self, timeout_ms, direct)
        try:
            returned = declared.function(handle, **arguments)
        except processing.InvalidArgument as exc:
            raise invalid_argument(str(exc)) from None
        except ServingError:
            raise
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: user code must not stop the server
            log.error(
                "Processing signature %s of model %s version %s failed",
                declared.name,
                self.model,
                self.version,
                exc_info=exc,
            )
            raise ServingError(Code.INTERNAL, _one_line(exc)) from None
        return _checked_outputs(declared, returned, output_aliases)


class _Handle:
    """The `processing.Model` a function receives."""

    __slots__ = ("_servable", "_timeout_ms", "_direct")

    def __init__(self, servable: ProcessingServable, timeout_ms: int, direct: bool) -> None:
        self._servable, self._timeout_ms, self._direct = servable, timeout_ms, direct

    @property
    def name(self) -> str:
        return self._servable.model

    @property
    def version(self) -> int:
        return self._servable.version

    @property
    def path(self) -> str:
        return self._servable.path

    def predict(
        self,
        signature_name: str,
        inputs: Mapping[str, Any],
        *,
        model_name: str | None = None,
        version: int | None = None,
    ) -> dict[str, np.ndarray]:
        return self._servable.predict(signature_name, inputs, model_name, version, self._timeout_ms, self._direct)

    def __repr__(self) -> str:
        return f"<pyserving model {self.name} version {self.version}>"


def _run_signature(
    servable: Servable, signature_name: str, inputs: Mapping[str, Any], timeout_ms: int, direct: bool, own: bool
) -> dict[str, np.ndarray]:
    """Run a signature of `servable` on this thread (through its batching unless `direct`): every output."""
    signature = servable.signature_defs.get(signature_name)
    if signature is None or signature_name.startswith("__"):
        names = ", ".join(sorted(k for k in servable.signature_defs if not k.startswith("__")))
        raise ValueError(f"model.predict: no signature {signature_name!r}; the model has {names}")
    if set(inputs) != set(signature.inputs):
        raise ValueError(
            f"model.predict({signature_name!r}): inputs {sorted(inputs)} do not match the signature's "
            f"{sorted(signature.inputs)}"
        )
    arrays = {alias: _as_array(value, signature.inputs[alias].dtype) for alias, value in inputs.items()}
    aliases = sorted(signature.outputs)
    if own:
        assert isinstance(servable, ProcessingServable)
        if signature_name in servable.unbatched_signatures or direct or servable.graph_runner is None:
            runner: Servable = servable  # its run: a function here, or a graph on the inner servable
        else:
            runner = servable.graph_runner  # the batching wrapper, if any: joins the server's batches
    else:
        runner = servable
        if direct and isinstance(servable, BatchedServable):  # a batch thread must not wait for another batch
            runner = servable.inner
    return dict(zip(aliases, runner.run(signature_name, arrays, aliases, timeout_ms), strict=True))


def _as_array(value: Any, dtype: int) -> np.ndarray:
    if isinstance(value, np.ndarray) and dtype != types_pb2.DT_STRING:
        return value
    if dtype == types_pb2.DT_STRING:
        return _strings(value)
    from pyserving import tensors

    return np.asarray(value, dtype=tensors.numpy_dtype(dtype))


def _strings(value: Any) -> np.ndarray:
    """An object array of bytes (str encoded as UTF-8), as the runtimes and codecs hold TF strings."""
    array = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
    if array.dtype == object and all(isinstance(v, bytes) for v in array.flat):
        return array
    out = np.empty(array.shape, dtype=object)
    for index, item in np.ndenumerate(array):
        out[index] = item.encode() if isinstance(item, str) else bytes(item)
    return out


def _checked_input(declared: processing.Signature, alias: str, array: np.ndarray) -> np.ndarray:
    """The input as the function gets it: its dtype must be the declared one (as a graph's feed must)."""
    if array.dtype != declared.inputs[alias].numpy_dtype:
        raise invalid_argument(
            f"input '{alias}' of signature {declared.name} is {_dtype_name(array.dtype)}; "
            f"it expects {declared.inputs[alias].dtype}"
        )
    return array


def _dtype_name(dtype: np.dtype) -> str:
    return "string" if dtype == np.dtype(object) else str(dtype)


def _checked_outputs(declared: processing.Signature, returned: Any, output_aliases: Sequence[str]) -> list[np.ndarray]:
    where = f"Processing signature {declared.name}"
    if not isinstance(returned, Mapping):
        raise ServingError(Code.INTERNAL, f"{where} returned {type(returned).__name__}, not a dict of its outputs")
    if set(returned) != set(declared.outputs):
        missing = sorted(set(declared.outputs) - set(returned))
        extra = sorted(set(map(str, returned)) - set(declared.outputs))
        raise ServingError(
            Code.INTERNAL,
            f"{where} returned outputs {sorted(map(str, returned))}; it declares {sorted(declared.outputs)} "
            f"(missing: {missing}, extra: {extra})",
        )
    outputs = []
    for alias in output_aliases:
        spec, value = declared.outputs[alias], returned[alias]
        try:
            if spec.dtype == "string":
                array = _strings(value)
            else:
                array = np.asarray(value, dtype=spec.numpy_dtype)
        except (TypeError, ValueError, UnicodeError, OverflowError) as exc:
            raise ServingError(
                Code.INTERNAL, f"{where} output '{alias}' is not a {spec.dtype} tensor: {_one_line(exc)}"
            ) from None
        if spec.shape is not None and (
            array.ndim != len(spec.shape) or any(d not in (-1, n) for d, n in zip(spec.shape, array.shape, strict=True))
        ):
            raise ServingError(
                Code.INTERNAL,
                f"{where} output '{alias}' has shape {list(array.shape)}; it declares {list(spec.shape)}",
            )
        outputs.append(array)
    return outputs


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _signature_def(declared: processing.Signature) -> meta_graph_pb2.SignatureDef:
    signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
    for infos, specs, kind in (
        (signature.inputs, declared.inputs, "input"),
        (signature.outputs, declared.outputs, "output"),
    ):
        for alias, spec in specs.items():
            info = infos[alias]
            info.name = f"processing/{declared.name}/{kind}/{alias}"
            info.dtype = types_pb2.DataType.Value(f"DT_{spec.dtype.upper()}")
            if spec.shape is None:
                info.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(unknown_rank=True))
            else:
                info.tensor_shape.CopyFrom(
                    tensor_shape_pb2.TensorShapeProto(
                        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in spec.shape]
                    )
                )
    return signature


def _import(model: str, version: int, path: str) -> tuple[str, dict[str, processing.Signature]]:
    """Import the version's processing.py under a name of its own; its declared signatures by name.
    Any failure (a syntax or import error, a bad declaration) fails the load with one line naming the file."""
    file = os.path.join(path, FILE)
    digest = hashlib.sha1(os.path.abspath(file).encode(), usedforsecurity=False).hexdigest()[:12]
    safe = re.sub(r"\W", "_", model)
    name = f"pyserving_processing_{safe}_v{version}_{digest}_{next(_counter)}"
    try:
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        with processing._collecting() as declared:
            spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        log.error("Loading %s failed", file, exc_info=exc)
        raise invalid_argument(f"{file} failed to load: {_one_line(exc)}") from None
    functions = {d.name: d for d in declared}
    if not functions:
        sys.modules.pop(name, None)
        raise invalid_argument(f"{file} declares no signature (decorate functions with processing.signature)")
    return name, functions


def load(path: str, options: RuntimeOptions) -> Servable:
    """The registry's entry for model_platform "python": the loader chain loads those itself (it knows the
    model's name and the processing settings); anything else asking is told so."""
    raise ServingError(
        Code.FAILED_PRECONDITION,
        f"{os.path.join(path, FILE)} is a pure-Python model: it is served only with {FLAG}",
    )


def signature_defs(path: str, options: RuntimeOptions) -> dict[str, meta_graph_pb2.SignatureDef]:
    """Tools do not import processing.py (it is code): its signatures are known once a server loads it."""
    raise ServingError(
        Code.FAILED_PRECONDITION,
        f"{os.path.join(path, FILE)} is Python code; its signatures are listed by a server running with {FLAG}",
    )
