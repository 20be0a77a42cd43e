"""TensorFlow SavedModel runtime: every model (TF1 or TF2) runs through a graph-mode Session.

Why a Session and not TF2 signature functions: measured on the 2-core dev machine,
a cached Session callable costs ~30 us per call against ~270 us for an eager
signature function, TF1 exports (half_plus_three, the stateful counter) only load
this way, and it is what TF Serving itself does. Callables are built with
`Session._make_callable_from_options` because the public `Session.run` /
`make_callable` check feeds against declared shapes, which TF Serving never does.

A TF2 SavedModel whose variables the Session cannot restore is served through TF2's signature
functions instead (`tf_signature_functions`); `load` picks the path and logs why.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import (
    config_pb2,
    meta_graph_pb2,
    saved_model_pb2,
    saved_object_graph_pb2,
    trackable_object_graph_pb2,
)
from tensorflow.python.framework import op_def_registry

from pyserving.errors import Code, ServingError, from_tf_error
from pyserving.runtimes import custom_ops
from pyserving.runtimes.registry import RuntimeOptions
from pyserving.runtimes.servable import Servable

__all__ = [
    "SAVED_MODEL_FILES",
    "SavedModelServable",
    "VariablesNotRestored",
    "load",
    "read_signature_defs",
    "session_config",
    "signature_defs",
]

log = logging.getLogger("pyserving")

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


class VariablesNotRestored(ServingError):
    """The Session path's load failure for signatures that read variables nothing restores."""

    def __init__(self, handles: list[str], meta_graph: meta_graph_pb2.MetaGraphDef) -> None:
        super().__init__(
            Code.FAILED_PRECONDITION,
            f"The signatures read variables that the SavedModel does not restore: {', '.join(handles)}. "
            "Neither its restore op nor its object graph's checkpoint keys fill them.",
        )
        self.signature_defs = dict(meta_graph.signature_def)
        # Only a TF2 SavedModel has one. TF2 loads a TF1 one through its restore op and graph, as the Session
        # path does, and its signature functions then fail every call on the same variables.
        self.has_object_graph = bool(meta_graph.object_graph_def.nodes)


def load(path: str, options: RuntimeOptions) -> Servable:
    """The registry's entry point: a SavedModel version folder as a servable.

    The Session path first; a TF2 model whose variables it cannot restore is served through TF2's signature
    functions if `tf.saved_model.load` restores them. If that fails too, the Session path's error stands
    (it names the variables), with TF2's reason appended.
    """
    config = session_config(options.intra_op_parallelism, options.inter_op_parallelism)
    tags = list(options.saved_model_tags)
    try:
        return SavedModelServable(path, tags, config)
    except VariablesNotRestored as exc:
        if not exc.has_object_graph:
            raise
        from pyserving.runtimes.tf_signature_functions import SignatureFunctionServable

        try:
            servable = SignatureFunctionServable(path, tags, exc.signature_defs)
        except ServingError as fallback:
            raise ServingError(
                exc.code, f"{exc.message} tf.saved_model.load cannot serve it either: {fallback.message}"
            ) from None
        log.info("Serving %s through TF2 signature functions (runtime TF2): %s", path, exc.message)
        return servable


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


def _load_session(
    path: str, tags: list[str], config: config_pb2.ConfigProto
) -> tuple[tf.Graph, tf.compat.v1.Session, meta_graph_pb2.MetaGraphDef]:
    """Load the MetaGraph into a new graph and session.

    A graph that names an op nobody registered gets one retry after `tensorflow_text` (if
    installed) has registered its ops; then the load fails naming the op.
    """
    retried = False
    while True:
        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph, config=config)
        try:
            with graph.as_default():
                return graph, session, tf.compat.v1.saved_model.loader.load(session, tags, path)
        except Exception as exc:
            session.close()
            op = custom_ops.unregistered_op(exc)
            if op is None:
                raise from_tf_error(exc) from exc
            custom_ops.import_text_ops()
            if retried or op_def_registry.get(op) is None:
                raise custom_ops.unregistered_op_error(op) from None
            retried = True


def _signature_handles(graph_def: graph_pb2.GraphDef, signatures: Iterable[meta_graph_pb2.SignatureDef]) -> list[str]:
    """The VarHandleOp nodes the signatures' outputs depend on, sorted."""
    nodes = {node.name: node for node in graph_def.node}
    stack = [info.name.split(":")[0] for signature in signatures for info in signature.outputs.values()]
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
    return sorted(handles)


def _unread_handles(graph_def: graph_pb2.GraphDef, read: list[str]) -> list[str]:
    """The VarHandleOp nodes no signature reads, less those sharing a resource with one that is read."""
    handles = [node for node in graph_def.node if node.op == "VarHandleOp"]
    read_set = set(read)
    read_resources = {(n.attr["container"].s, n.attr["shared_name"].s) for n in handles if n.name in read_set}
    return [
        n.name
        for n in handles
        if n.name not in read_set and (n.attr["container"].s, n.attr["shared_name"].s) not in read_resources
    ]


def _captured_objects(meta_graph: meta_graph_pb2.MetaGraphDef) -> dict[str, int]:
    """Main-graph node name -> the SavedObjectGraph node it stands for, from the function calls that capture it.

    A call's last inputs are its function's captures, in the order of the function's `bound_inputs`.
    """
    functions = meta_graph.object_graph_def.concrete_functions
    captured: dict[str, int] = {}
    for node in meta_graph.graph_def.node:
        if node.op not in ("StatefulPartitionedCall", "PartitionedCall"):
            continue
        function = functions.get(node.attr["f"].func.name)
        if function is None or not function.bound_inputs:
            continue
        inputs = [i.split(":")[0] for i in node.input if not i.startswith("^")]
        bound = list(function.bound_inputs)
        if len(inputs) >= len(bound):
            captured.update(zip(inputs[len(inputs) - len(bound) :], bound, strict=True))
    return captured


def _checkpoint_keys(
    object_graph: saved_object_graph_pb2.SavedObjectGraph,
    checkpoint_graph: trackable_object_graph_pb2.TrackableObjectGraph,
) -> dict[int, str]:
    """SavedObjectGraph node -> checkpoint key of its variable value, matching the two graphs by child names
    from the root, as TF2's loader does."""
    if not object_graph.nodes or not checkpoint_graph.nodes:
        return {}
    matched, stack = {0: 0}, [0]
    while stack:
        saved_id = stack.pop()
        children = {c.local_name: c.node_id for c in checkpoint_graph.nodes[matched[saved_id]].children}
        for child in object_graph.nodes[saved_id].children:
            if child.node_id not in matched and child.local_name in children:
                matched[child.node_id] = children[child.local_name]
                stack.append(child.node_id)
    return {
        saved_id: attribute.checkpoint_key
        for saved_id, checkpoint_id in matched.items()
        for attribute in checkpoint_graph.nodes[checkpoint_id].attributes
        if attribute.name == "VARIABLE_VALUE"
    }


class SavedModelServable:
    """A SavedModel version loaded into its own graph and session."""

    runtime = "TF1"  # TF Serving's runtime_latency label for a Session-based servable

    def __init__(self, path: str, tags: list[str], config: config_pb2.ConfigProto) -> None:
        if not any(os.path.exists(os.path.join(path, f)) for f in SAVED_MODEL_FILES):
            raise ServingError(
                Code.NOT_FOUND,
                f"Could not find SavedModel .pb or .pbtxt at supplied export directory path: {path}",
            )
        self._graph, self._session, meta_graph = _load_session(path, tags, config)
        try:
            self._signature_defs = dict(meta_graph.signature_def)
            self._ensure_variables_restored(path, meta_graph)
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

    def _ensure_variables_restored(self, path: str, meta_graph: meta_graph_pb2.MetaGraphDef) -> None:
        """Restore the variables the signatures read that the SavedModel's restore op left uninitialized.

        A Keras 3 model saved with tf.saved_model.save (plain, wrapped in a tf.Module, or built
        under a tf.distribute strategy) gets a restore op that fills one set of variable handles
        while its signatures read another; TF Serving loads such a model and then fails every
        request. TF2's loader finds each captured variable's checkpoint key through the object
        graph; so does this, and restores into the handles the signatures read, which keeps the
        Session fast path. A variable still uninitialized fails the load, naming it, so the
        previous version keeps serving.
        """
        read = _signature_handles(meta_graph.graph_def, self._signature_defs.values())
        missing = self._uninitialized(read)
        if missing:
            missing = self._restore_from_object_graph(path, meta_graph, missing, read)
        if missing:
            raise VariablesNotRestored(missing, meta_graph)

    def _uninitialized(self, handles: list[str]) -> list[str]:
        """The VarHandleOp nodes among `handles` whose variable holds no value."""
        if not handles:
            return []
        with self._graph.as_default():
            checks = [tf.raw_ops.VarIsInitializedOp(resource=self._graph.get_tensor_by_name(f"{h}:0")) for h in handles]
        return [h for h, ok in zip(handles, self._session.run(checks), strict=True) if not ok]

    def _restore_from_object_graph(
        self, path: str, meta_graph: meta_graph_pb2.MetaGraphDef, handles: list[str], read: list[str]
    ) -> list[str]:
        """Fill `handles` from the checkpoint, keyed as TF2's loader keys them; return those it cannot key.

        When it keys them all, the same run frees the variables the restore op filled and no signature
        reads: the second copy of every weight (a Keras model with 128 MiB of weights took 265 MiB of
        memory without this, 137 MiB with it). One run: each run that adds ops costs ~25 ms of load time.
        """
        prefix = os.path.join(path, "variables", "variables")
        try:
            reader = tf.train.load_checkpoint(prefix)
            checkpoint_graph = trackable_object_graph_pb2.TrackableObjectGraph()
            checkpoint_graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
        except Exception:  # no TF2 checkpoint, or one whose object graph does not parse: nothing to key by
            return handles
        try:
            return self._restore_keyed(prefix, reader, checkpoint_graph, meta_graph, handles, read)
        except Exception as exc:  # an object graph that does not match, a failing restore: the fallback decides
            log.info("Restoring %s by checkpoint keys failed: %s", path, exc)
            return handles

    def _restore_keyed(
        self,
        prefix: str,
        reader: Any,
        checkpoint_graph: trackable_object_graph_pb2.TrackableObjectGraph,
        meta_graph: meta_graph_pb2.MetaGraphDef,
        handles: list[str],
        read: list[str],
    ) -> list[str]:
        """`_restore_from_object_graph` once the checkpoint is open: key, check shapes, restore in one run."""
        captured = _captured_objects(meta_graph)
        keys = _checkpoint_keys(meta_graph.object_graph_def, checkpoint_graph)
        nodes = {node.name: node for node in meta_graph.graph_def.node}
        stored = reader.get_variable_to_shape_map()
        # A key whose stored shape differs from the variable's is a wrong match: leave that variable unkeyed.
        targets = [
            (h, keys[captured[h]])
            for h in handles
            if h in captured
            and keys.get(captured[h]) in stored
            and tf.TensorShape(nodes[h].attr["shape"].shape).is_compatible_with(stored[keys[captured[h]]])
        ]
        if not targets:
            return handles
        keyed = {h for h, _ in targets}
        unkeyed = [h for h in handles if h not in keyed]
        with self._graph.as_default(), tf.name_scope("pyserving_restore"):
            values = tf.raw_ops.RestoreV2(
                prefix=tf.constant(prefix),
                tensor_names=tf.constant([key for _, key in targets]),
                shape_and_slices=tf.constant([""] * len(targets)),
                dtypes=[tf.dtypes.as_dtype(nodes[h].attr["dtype"].type) for h, _ in targets],
            )
            ops = [
                tf.raw_ops.AssignVariableOp(resource=self._graph.get_tensor_by_name(f"{h}:0"), value=value)
                for (h, _), value in zip(targets, values, strict=True)
            ]
            if not unkeyed:
                ops += [
                    tf.raw_ops.DestroyResourceOp(
                        resource=self._graph.get_tensor_by_name(f"{h}:0"), ignore_lookup_error=True
                    )
                    for h in _unread_handles(meta_graph.graph_def, read)
                ]
        self._session.run(ops)
        return unkeyed

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
