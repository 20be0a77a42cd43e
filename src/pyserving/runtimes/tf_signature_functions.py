"""The fallback for TF2 SavedModels the Session path cannot restore: serve TF2's own loaded signature functions.

`tf_saved_model` serves every SavedModel it can through a Session (~30 us a call). A TF2 SavedModel whose
signatures read variables that neither its restore op nor the object graph's checkpoint keys (as the Session
path matches them) fill would fail there, yet `tf.saved_model.load` restores it through the object graph.
Such a model is served here, at the cost of an eager call: on the 2-core dev machine a batch-1 call of a
Keras Dense model took ~300 us here against ~30 us on the Session path, and its load ~100 ms against ~70 ms
(the Session attempt, then TF2's load and one trace per signature).

Shapes stay unchecked, as in TF Serving: each signature is called from a `tf.function` traced once with
unknown-shaped inputs of the declared dtypes. That function's own input check accepts any shape, and an
unknown shape is compatible with every declared one, so the signature's shapes never reject an input
whatever its call path checks (TF 2.21's loaded signatures happen not to check them, which nothing
promises); a mismatch reaches the ops, whose error is TF's own. Other ways measured or considered:
`ConcreteFunction._call_flat` (~140 us faster in one measurement, but private) and importing the
signature's FunctionDef into a Session graph (Session speed, but only variables can be rebuilt there, not
tables or other resources the function captures, and every weight is copied).

Not carried over from the Session path: the `--tensorflow_*_parallelism` flags (eager ops use TF's
process-wide pools) and request timeouts (an eager call cannot be cancelled).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving.errors import Code, ServingError, from_tf_error

__all__ = ["SignatureFunctionServable"]

# Signature combinations (MultiInference) are few; the bound only stops the cache growing without limit.
_MAX_FUNCTIONS = 256

# Lines TF puts before an op error from a function traced in this process (see `_session_message`).
_PREAMBLE = ("Graph execution error:", "Detected at node ", "<stack traces unavailable>")
# Key prefix of the MetaGraph's non-signature entries (__saved_model_init_op, __saved_model_train_op).
_TF_INTERNAL = "__saved_model_"
_Outputs = dict[str, dict[str, tf.Tensor]]
# A traced call: its input aliases, in the order it takes them, and the function.
_Function = tuple[list[str], Callable[..., _Outputs]]


def _session_message(message: str) -> str:
    """An eager call's op error as the Session path words it.

    TF prefixes the error of a function traced in this process with "Graph execution error:" and where
    each failing node was defined (unknown for a loaded function), and suffixes it with the called
    function's name; neither is in the Session path's (and TF Serving's) error, so both are dropped.
    """
    lines = message.split("\n")
    if lines[0] == "Graph execution error:":
        while lines and (not lines[0] or lines[0][0].isspace() or lines[0].startswith(_PREAMBLE)):
            lines.pop(0)
    text = "\n".join(lines) or message
    return re.sub(r" \[Op:__inference_call_\d+\]$", "", text)


class SignatureFunctionServable:
    """A TF2 SavedModel loaded with `tf.saved_model.load`, run through its signature functions."""

    # TF Serving labels runtime_latency "TF1" for its Session-based servables and has no servable that runs
    # signature functions; "TF2" keeps this slower path apart from the Session one in latency metrics.
    runtime = "TF2"

    def __init__(self, path: str, tags: list[str], signature_defs: dict[str, meta_graph_pb2.SignatureDef]) -> None:
        try:
            self._loaded = tf.saved_model.load(path, tags=tags)
            signatures = dict(self._loaded.signatures)
        except Exception as exc:
            raise from_tf_error(exc) from exc
        # TF2 makes no function of the MetaGraph's init and train op entries; every other signature needs one.
        missing = sorted(n for n in signature_defs if n not in signatures and not n.startswith(_TF_INTERNAL))
        if missing:
            raise ServingError(
                Code.FAILED_PRECONDITION, f"tf.saved_model.load gives no function for the signatures {missing}"
            )
        unset = sorted({v.name for fn in signatures.values() for v in fn.variables if not v.is_initialized()})
        if unset:
            raise ServingError(
                Code.FAILED_PRECONDITION, f"tf.saved_model.load leaves variables uninitialized: {', '.join(unset)}"
            )
        self._signature_defs = signature_defs
        self._signatures = signatures
        self._functions: dict[tuple[str, ...], _Function] = {}
        self._lock = threading.Lock()
        for name in signatures:  # traced now, not on a first request
            self._function((name,))

    @property
    def signature_defs(self) -> dict[str, meta_graph_pb2.SignatureDef]:
        return self._signature_defs

    def _function(self, names: tuple[str, ...]) -> _Function:
        """One call of the signatures `names` on shared inputs, by alias, traced with unknown input shapes."""
        fn = self._functions.get(names)
        if fn is not None:
            return fn
        unknown = [name for name in names if name not in self._signatures]
        if unknown:
            raise ServingError(
                Code.INVALID_ARGUMENT, f"Signature {unknown[0]} has no function in the loaded SavedModel"
            )
        dtypes: dict[str, tf.DType] = {}
        for name in names:
            for alias, info in self._signature_defs[name].inputs.items():
                dtypes.setdefault(alias, tf.dtypes.as_dtype(info.dtype))
        aliases = sorted(dtypes)
        signatures = [(name, self._signatures[name], list(self._signature_defs[name].inputs)) for name in names]

        def call(*tensors: tf.Tensor) -> _Outputs:
            feeds = dict(zip(aliases, tensors, strict=True))
            return {name: fn(**{a: feeds[a] for a in inputs}) for name, fn, inputs in signatures}

        specs = [tf.TensorSpec(None, dtypes[a], name=a) for a in aliases]
        with self._lock:
            fn = self._functions.get(names)
            if fn is None:
                try:
                    fn = (aliases, tf.function(call, input_signature=specs).get_concrete_function())
                except Exception as exc:
                    raise from_tf_error(exc) from exc
                if len(self._functions) >= _MAX_FUNCTIONS:
                    self._functions.clear()
                self._functions[names] = fn
        return fn

    def _call(self, names: tuple[str, ...], inputs: dict[str, np.ndarray]) -> _Outputs:
        aliases, fn = self._function(names)
        missing = [a for a in aliases if a not in inputs]
        if missing:
            raise ServingError(Code.INVALID_ARGUMENT, f"Missing inputs: {', '.join(missing)}")
        try:
            return fn(*(inputs[a] for a in aliases))
        except tf.errors.OpError as exc:
            raise ServingError(from_tf_error(exc).code, _session_message(exc.message)) from exc
        except UnicodeDecodeError as exc:
            # As on the Session path: TF's message quoted bytes that are not UTF-8 (a tf.Example that does
            # not parse), so Python could not build the OpError; the undecodable text is TF's message.
            raise ServingError(Code.INVALID_ARGUMENT, bytes(exc.object).decode("utf-8", "surrogateescape")) from exc
        except (TypeError, ValueError) as exc:
            raise ServingError(Code.INVALID_ARGUMENT, str(exc)) from exc

    def run(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_aliases: Sequence[str], timeout_ms: int
    ) -> list[np.ndarray]:
        """Every output is computed (the function returns them all); `timeout_ms` is not enforced, as an
        eager call cannot be cancelled."""
        outputs = self._call((signature_name,), inputs)[signature_name]
        return [outputs[a].numpy() for a in output_aliases]

    def run_multi(
        self, tasks: Sequence[tuple[str, Sequence[str]]], inputs: dict[str, np.ndarray], timeout_ms: int
    ) -> list[list[np.ndarray]]:
        # Sorted: one traced function per set of signatures, whatever order a request lists them in.
        outputs = self._call(tuple(sorted({name for name, _ in tasks})), inputs)
        return [[outputs[name][a].numpy() for a in aliases] for name, aliases in tasks]

    def close(self) -> None:
        self._functions.clear()
        self._signatures.clear()
        del self._loaded
