"""TensorFlow SavedModel runtime: every model (TF1 or TF2) runs through a graph-mode Session.

Why a Session and not TF2 signature functions: measured on the 2-core dev machine,
a cached Session callable costs ~30 us per call against ~270 us for an eager
signature function, TF1 exports (half_plus_three, the stateful counter) only load
this way, and it is what TF Serving itself does. Callables are built with
`Session._make_callable_from_options` because the public `Session.run` /
`make_callable` check feeds against declared shapes, which TF Serving never does.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2

from pyserving.errors import Code, ServingError, from_tf_error

_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
# Feed/fetch combinations are few per signature; the bound only stops a client
# cycling through output_filter subsets from growing the cache without limit.
_MAX_CALLABLES = 256


def session_config(intra_op: int, inter_op: int) -> config_pb2.ConfigProto:
    """TF session options from the `--tensorflow_*_parallelism` flags (0 = TF decides)."""
    return config_pb2.ConfigProto(
        intra_op_parallelism_threads=intra_op,
        inter_op_parallelism_threads=inter_op,
        allow_soft_placement=True,
    )


class SavedModelServable:
    """A SavedModel version loaded into its own graph and session."""

    def __init__(self, path: str, tags: list[str], config: config_pb2.ConfigProto) -> None:
        if not any(os.path.exists(os.path.join(path, f)) for f in _SAVED_MODEL_FILES):
            raise ServingError(
                Code.NOT_FOUND,
                f"Could not find SavedModel .pb or .pbtxt at supplied export directory path: {path}",
            )
        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph, config=config)
        try:
            with self._graph.as_default():
                meta_graph = tf.compat.v1.saved_model.loader.load(self._session, tags, path)
        except Exception as exc:
            self._session.close()
            raise from_tf_error(exc) from exc
        self._signature_defs = dict(meta_graph.signature_def)
        self._callables: dict[tuple, object] = {}
        self._lock = threading.Lock()

    @property
    def signature_defs(self) -> dict[str, meta_graph_pb2.SignatureDef]:
        return self._signature_defs

    def run(
        self,
        signature: meta_graph_pb2.SignatureDef,
        inputs: dict[str, np.ndarray],
        output_aliases: list[str],
        timeout_ms: int,
    ) -> list[np.ndarray]:
        feed_aliases = tuple(sorted(inputs))
        key = (id(signature), feed_aliases, tuple(output_aliases), timeout_ms)
        fn = self._callables.get(key)
        if fn is None:
            fn = self._make_callable(signature, feed_aliases, output_aliases, timeout_ms, key)
        try:
            return fn(*(inputs[a] for a in feed_aliases))
        except tf.errors.OpError as exc:
            raise from_tf_error(exc) from exc
        except (TypeError, ValueError) as exc:
            raise ServingError(Code.INVALID_ARGUMENT, str(exc)) from exc

    def _make_callable(self, signature, feed_aliases, output_aliases, timeout_ms, key):
        options = config_pb2.CallableOptions(
            feed=[signature.inputs[a].name for a in feed_aliases],
            fetch=[signature.outputs[a].name for a in output_aliases],
        )
        if timeout_ms > 0:
            options.run_options.timeout_in_ms = timeout_ms
        with self._lock:
            fn = self._callables.get(key)
            if fn is None:
                try:
                    fn = self._session._make_callable_from_options(options)
                except tf.errors.OpError as exc:
                    raise from_tf_error(exc) from exc
                if len(self._callables) >= _MAX_CALLABLES:
                    self._callables.clear()
                self._callables[key] = fn
        return fn

    def close(self) -> None:
        self._callables.clear()
        self._session.close()
