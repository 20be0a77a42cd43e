"""TensorFlow SavedModel runtime: every model (TF1 or TF2) runs through a graph-mode Session.

Why a Session and not TF2 signature functions: measured on the 2-core dev machine,
a cached Session callable costs ~30 us per call against ~270 us for an eager
signature function, TF1 exports (half_plus_three, the stateful counter) only load
this way, and it is what TF Serving itself does. Callables are built with
`Session._make_callable_from_options` because the public `Session.run` /
`make_callable` check feeds against declared shapes, which TF Serving never does.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2

from pyserving.errors import Code, ServingError, from_tf_error
from pyserving.runtimes.registry import RuntimeOptions

__all__ = ["SAVED_MODEL_FILES", "SavedModelServable", "load", "read_signature_defs", "session_config", "signature_defs"]

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
# Feed/fetch combinations are few per signature; the bound only stops a client
# cycling through output_filter subsets from growing the cache without limit.
_MAX_CALLABLES = 256
# RunOptions.inter_op_thread_pool value that runs a call's ops on the calling thread: no
# hand-off to a pool and back. Measured on the 2-core dev machine, it cuts the CPU of a
# batch-1 call from 43 to 7 us (half_plus_two) and from 187 to 63 us (small CNN); batch-64
# CNN calls are no slower, as ops still use the intra-op pool.
_CALLER_THREAD = -1


def read_signature_defs(path: str, tags: list[str]) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The signatures of the MetaGraph tagged `tags` in a version folder, read from disk without loading it."""
    for name in SAVED_MODEL_FILES:
        file = os.path.join(path, name)
        if os.path.exists(file):
            break
    else:
        raise ServingError(
            Code.NOT_FOUND, f"Could not find SavedModel .pb or .pbtxt at supplied export directory path: {path}"
        )
    saved_model = saved_model_pb2.SavedModel()
    try:
        with open(file, "rb") as handle:
            data = handle.read()
        if file.endswith(".pbtxt"):
            text_format.Parse(data.decode("utf-8"), saved_model)
        else:
            saved_model.ParseFromString(data)
    except Exception as exc:
        raise ServingError(Code.DATA_LOSS, f"Cannot parse {file}: {exc}") from None
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == set(tags):
            return dict(meta_graph.signature_def)
    available = [",".join(m.meta_info_def.tags) for m in saved_model.meta_graphs]
    raise ServingError(Code.NOT_FOUND, f"No MetaGraph tagged {','.join(tags)} in {file} (found: {available})")


def signature_defs(path: str, options: RuntimeOptions) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The registry's reader for tools: `read_signature_defs` with the server's tags."""
    return read_signature_defs(path, list(options.saved_model_tags))


# The inter-op pool that auto parallelism names: shared by every session, used by loads
# and by graphs with loops (a call on the caller's thread cannot be cancelled).
_SHARED_INTER_OP_POOL = "pyserving_inter_op"


def load(path: str, options: RuntimeOptions) -> SavedModelServable:
    """The registry's entry point: a SavedModel version folder as a servable."""
    config = session_config(options.intra_op_parallelism, options.inter_op_parallelism)
    return SavedModelServable(path, list(options.saved_model_tags), config)


@functools.cache
def session_config(intra_op: int, inter_op: int) -> config_pb2.ConfigProto:
    """TF session options from the `--tensorflow_*_parallelism` flags (0 = auto).

    Auto inter-op differs from TF Serving on purpose: a call to a graph without loops runs
    its ops on the calling thread instead of handing them to the inter-op pool (see
    `SavedModelServable`), so the session gets a named pool it can opt out of per call.
    A positive value gives TF's plain pool of that size, for graphs with independent
    branches worth running side by side.
    """
    config = config_pb2.ConfigProto(
        intra_op_parallelism_threads=intra_op,
        inter_op_parallelism_threads=inter_op,
        allow_soft_placement=True,
    )
    if inter_op == 0:
        config.session_inter_op_thread_pool.add(num_threads=0, global_name=_SHARED_INTER_OP_POOL)
    return config


# Ops that make a graph loop: TF1 control flow frames and TF2 functional loops.
_LOOP_OPS = frozenset({"Enter", "NextIteration", "LoopCond", "While", "StatelessWhile", "_While", "For"})


def _has_loop(graph_def: graph_pb2.GraphDef) -> bool:
    """Whether the graph or any function in its library can loop."""
    nodes = [node.op for node in graph_def.node]
    nodes += [node.op for function in graph_def.library.function for node in function.node_def]
    return not _LOOP_OPS.isdisjoint(nodes)


_Callable = Callable[..., list[np.ndarray]]


class SavedModelServable:
    """A SavedModel version loaded into its own graph and session."""

    runtime = "TF1"  # TF Serving's runtime_latency label for a Session-based servable

    def __init__(self, path: str, tags: list[str], config: config_pb2.ConfigProto) -> None:
        if not any(os.path.exists(os.path.join(path, f)) for f in SAVED_MODEL_FILES):
            raise ServingError(
                Code.NOT_FOUND,
                f"Could not find SavedModel .pb or .pbtxt at supplied export directory path: {path}",
            )
        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph, config=config)
        try:
            with self._graph.as_default():
                meta_graph = tf.compat.v1.saved_model.loader.load(self._session, tags, path)
            self._signature_defs = dict(meta_graph.signature_def)
            self._check_variables_restored(meta_graph.graph_def)
        except Exception as exc:
            self._session.close()
            raise from_tf_error(exc) from exc
        self._callables: dict[tuple, _Callable] = {}
        self._lock = threading.Lock()
        # A call on the caller's thread ignores its timeout, so only graphs without loops (whose run
        # time is bounded by their input) run there; a graph with a loop keeps cancellable calls.
        self._caller_thread = any(
            p.global_name == _SHARED_INTER_OP_POOL for p in config.session_inter_op_thread_pool
        ) and not _has_loop(meta_graph.graph_def)

    def _check_variables_restored(self, graph_def: graph_pb2.GraphDef) -> None:
        """Fail the load if a signature reads a resource variable that restoring left uninitialized.

        A Keras 3 model wrapped in a tf.Module and saved with tf.saved_model.save gets a
        restore op that fills one set of variable handles while its signatures read
        another; TF Serving loads such a model and then fails every request. Failing
        here keeps the previous version serving and names the cause.
        """
        nodes = {node.name: node for node in graph_def.node}
        stack = [
            info.name.split(":")[0]
            for signature in self._signature_defs.values()
            for info in signature.outputs.values()
        ]
        seen: set[str] = set()
        handles = []
        while stack:
            name = stack.pop()
            if name in seen or name not in nodes:
                continue
            seen.add(name)
            if nodes[name].op == "VarHandleOp":
                handles.append(name)
            stack.extend(i.lstrip("^").split(":")[0] for i in nodes[name].input)
        if not handles:
            return
        with self._graph.as_default():
            checks = [
                tf.raw_ops.VarIsInitializedOp(resource=self._graph.get_tensor_by_name(f"{h}:0"))
                for h in sorted(handles)
            ]
        missing = [h for h, ok in zip(sorted(handles), self._session.run(checks), strict=True) if not ok]
        if missing:
            raise ServingError(
                Code.FAILED_PRECONDITION,
                f"The signatures read variables that the SavedModel does not restore: {', '.join(missing)}. "
                "A Keras 3 model saved with tf.saved_model.save inside another object does this; export it with "
                "model.export() or keras.export.ExportArchive.",
            )

    @property
    def signature_defs(self) -> dict[str, meta_graph_pb2.SignatureDef]:
        return self._signature_defs

    def run(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_aliases: Sequence[str], timeout_ms: int
    ) -> list[np.ndarray]:
        feed_aliases = tuple(sorted(inputs))
        timeout_ms = 0 if self._caller_thread else timeout_ms
        key = (signature_name, feed_aliases, tuple(output_aliases), timeout_ms)
        fn = self._callables.get(key)
        if fn is None:
            signature = self._signature_defs[signature_name]
            fn = self._make_callable(
                key,
                [signature.inputs[a].name for a in feed_aliases],
                [signature.outputs[a].name for a in output_aliases],
                timeout_ms,
            )
        return self._call(fn, [inputs[a] for a in feed_aliases])

    def run_multi(
        self, tasks: Sequence[tuple[str, Sequence[str]]], inputs: dict[str, np.ndarray], timeout_ms: int
    ) -> list[list[np.ndarray]]:
        signatures = [(self._signature_defs[name], aliases) for name, aliases in tasks]
        feeds = {signature.inputs[alias].name: array for signature, _ in signatures for alias, array in inputs.items()}
        feed_names = tuple(sorted(feeds))
        fetch_names = tuple(sorted({signature.outputs[a].name for signature, aliases in signatures for a in aliases}))
        timeout_ms = 0 if self._caller_thread else timeout_ms
        key = (feed_names, fetch_names, timeout_ms)
        fn = self._callables.get(key) or self._make_callable(key, feed_names, fetch_names, timeout_ms)
        values = dict(zip(fetch_names, self._call(fn, [feeds[n] for n in feed_names]), strict=True))
        return [[values[signature.outputs[a].name] for a in aliases] for signature, aliases in signatures]

    @staticmethod
    def _call(fn: _Callable, feeds: list[np.ndarray]) -> list[np.ndarray]:
        try:
            return fn(*feeds)
        except tf.errors.OpError as exc:
            raise from_tf_error(exc) from exc
        except UnicodeDecodeError as exc:
            # TF's error quoted bytes that are not UTF-8 (e.g. a serialized tf.Example that does not
            # parse), so Python could not build the OpError; the undecodable text is TF's message (up
            # to its first NUL byte), which TF Serving returns as it is. Such input errors are
            # INVALID_ARGUMENT.
            raise ServingError(Code.INVALID_ARGUMENT, bytes(exc.object).decode("utf-8", "surrogateescape")) from exc
        except (TypeError, ValueError) as exc:
            raise ServingError(Code.INVALID_ARGUMENT, str(exc)) from exc

    def _make_callable(
        self, key: tuple, feed_names: Sequence[str], fetch_names: Sequence[str], timeout_ms: int
    ) -> _Callable:
        options = config_pb2.CallableOptions(feed=feed_names, fetch=fetch_names)
        if self._caller_thread:
            options.run_options.inter_op_thread_pool = _CALLER_THREAD
        elif timeout_ms > 0:
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
