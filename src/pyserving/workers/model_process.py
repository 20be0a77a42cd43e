"""The model process of `--num_workers` > 1: the real data plane and core, answering the workers' calls.

It builds what a single process builds (`server.build`: every model loaded, warmup, the batcher), then
serves the workers on a Unix socket: predict on its event loop (the batcher awaits there, so every
worker's requests share batches), the calls that may block (classify, regress, reloads) on its pool, the
cheap ones (resolve, status, readiness) inline. On a scrape it asks every worker for its request metrics
and renders them with its own, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import uvloop
from google.protobuf import message
from tensorflow_serving.apis import input_pb2
from tensorflow_serving.config import model_server_config_pb2

from pyserving import metrics, tracing
from pyserving.concurrency import run_sized, run_sync, worker_pool
from pyserving.errors import Code, ServingError
from pyserving.flags import Options
from pyserving.serving import ModelSpec, Target
from pyserving.workers import wire

__all__ = ["MODEL_SOCKET", "GENERATION_FILE", "serve"]

log = logging.getLogger("pyserving")

MODEL_SOCKET = "model.sock"
GENERATION_FILE = "generation"
# How long a scrape waits for each worker's metrics (a worker that does not answer is left out).
_SCRAPE_WAIT_S = 2.0


def serve(options: Options, run_dir: str, ready_fd: int) -> int:
    """Build, tell the supervisor (one byte on `ready_fd`), serve until SIGTERM; the exit code."""
    from pyserving import server  # TensorFlow: only in the model process and the workers

    try:
        built = server.build(options)
    except ServingError as exc:
        print(f"Failed to start server. Error: {exc}", flush=True)
        return 255
    gc.collect()
    gc.freeze()  # as server.run: TF's long-lived objects are never scanned again
    process = _ModelProcess(built, run_dir)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(process.run(ready_fd))
    return 0


class _ModelProcess:
    def __init__(self, built: Any, run_dir: str) -> None:
        from pyserving import server

        self._server = built
        self._dataplane = built.dataplane
        self._core = built.core
        self._run_dir = run_dir
        # As many as one process's request pools: with batching, a classify or regress call holds its thread
        # while it waits for its batch.
        options = built.options
        threads = max(server._request_threads(max(options.rest_api_num_threads, options.grpc_max_threads), options), 8)
        self._pool = worker_pool(threads, "model-calls")
        self._generation = wire.Generation(os.path.join(run_dir, GENERATION_FILE), create=True)
        self._core.manager.on_change = self._generation.bump
        self._workers: dict[int, wire.Sender] = {}  # worker index -> its async connection
        self._pending: dict[int, asyncio.Future[Any]] = {}  # reverse calls (metrics) awaiting a reply
        self._next_id = 0
        self._profiler: Any = None  # the profiler service, made at the first forwarded call
        self._sync: dict[str, Callable[..., Any]] = {
            "resolve": self._resolve,
            "status": self._status,
            "known": self._core.manager.names,
            "readiness": self._core.readiness,
        }
        self._blocking: dict[str, Callable[..., Any]] = {
            "classify": self._classify,
            "regress": self._regress,
            "multi_inference": self._multi_inference,
            "reload_proto": self._reload_proto,
            "load_model": self._core.load_model,
            "unload_model": self._core.unload_model,
            "model_names": self._core.model_names,
            "reload_config_file": self._core.reload_config_file,
        }

    async def run(self, ready_fd: int) -> None:
        from pyserving import server

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server._on_sighup, self._server)
        listener = await asyncio.start_unix_server(
            self._connection, os.path.join(self._run_dir, MODEL_SOCKET), limit=2**20
        )
        os.write(ready_fd, b"R")
        os.close(ready_fd)
        await stop.wait()
        log.info("Model process: stopping")
        listener.close()
        if self._server.batcher is not None:
            self._server.batcher.stop()
        self._core.stop()
        log.info("Model process stopped")

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker: int | None = None
        sender = wire.Sender(writer)
        tasks: dict[int, asyncio.Task[None]] = {}  # this connection's calls in progress, by id
        try:
            while True:
                frame = await wire.read_frame(reader)
                if frame is None:
                    return
                kind, call_id, method, args = _unpack(await wire.decode_sized(self._pool, frame, self._run_dir))
                if kind != wire.REQUEST:  # a worker's answer to a metrics call
                    future = self._pending.pop(call_id, None)
                    if future is not None and not future.done():
                        future.set_result(args if kind == wire.REPLY else None)
                    continue
                if method == "hello":  # the worker's async connection: metrics calls go to it
                    worker = args[0]
                    self._workers[worker] = sender
                    sender.send(wire.encode((wire.REPLY, call_id, None), self._run_dir))
                    continue
                if method == "cancel":  # the worker's caller went away: as in one process, so does the call
                    running = tasks.get(args[0])
                    if running is not None:
                        running.cancel()
                    continue
                task = asyncio.create_task(self._answer(sender, writer, call_id, method, args))
                tasks[call_id] = task
                task.add_done_callback(functools.partial(_forget, tasks, call_id))
        finally:
            for running in list(tasks.values()):  # the worker is gone: nobody waits for these any more
                running.cancel()
            if worker is not None and self._workers.get(worker) is sender:
                del self._workers[worker]
            writer.close()

    async def _answer(
        self, sender: wire.Sender, writer: asyncio.StreamWriter, call_id: int, method: str, args: tuple[Any, ...]
    ) -> None:
        attributes: dict[str, Any] | None = {} if tracing.enabled and method in wire.TRACED else None
        recording = tracing.recorded(attributes) if attributes is not None else contextlib.nullcontext()
        try:
            with recording:  # the worker's span gets what the data plane and batcher note
                result: Any = await self._call(method, args)
            if attributes is not None:
                result = (result, attributes)
            reply: Any = (wire.REPLY, call_id, result)
        except Exception as exc:
            if not isinstance(exc, ServingError):
                log.exception("Unexpected error answering a worker's %s call", method)
            reply = wire.error_reply(call_id, exc, attributes)
        if writer.is_closing():
            return
        size = _result_bytes(reply[2]) if method == "predict" else 0
        try:
            parts = await run_sized(self._pool, size, wire.encode, reply, self._run_dir)
        except Exception as exc:  # the caller must get an answer, never wait forever
            if not isinstance(exc, ServingError):
                log.exception("Could not encode the answer to a worker's %s call", method)
            parts = wire.encode(wire.error_reply(call_id, exc), self._run_dir)
        sender.send(parts)

    async def _call(self, method: str, args: tuple[Any, ...]) -> Any:
        if method == "predict":
            result: Any = await self._predict(*args)
        elif method == "metrics":
            result = await self._metrics()
        elif method == "profiler":
            result = await self._profile(*args)
        elif method in self._sync:
            result = self._sync[method](*args)
        elif method in self._blocking:
            result = await run_sync(self._pool, self._blocking[method], *args)
        else:
            raise ServingError(Code.UNIMPLEMENTED, f"Unknown call {method}")
        return result

    def _resolve(self, name: str, version: int | None, label: str | None) -> tuple[int, str, dict[str, bytes]]:
        with self._dataplane.resolve(ModelSpec(name, version, label)) as target:
            signatures = {key: sig.SerializeToString() for key, sig in target.signature_defs.items()}
            return target.version, target.platform, signatures

    def _lease(self, name: str, version: int, requested: int | None, label: str | None) -> Target:
        """The version the worker resolved; if it unloaded since (a hot swap), what the worker's spec resolves
        to now, as the request would have run in one process (which leases at resolve time)."""
        try:
            return self._dataplane.resolve(ModelSpec(name, version))
        except ServingError:
            if requested is not None:
                raise
            return self._dataplane.resolve(ModelSpec(name, None, label))

    async def _predict(
        self,
        name: str,
        version: int,
        requested: int | None,
        label: str | None,
        key: str,
        inputs: dict[str, Any],
        output_filter: list[str],
        timeout_ms: int,
    ) -> tuple[int, str, dict[str, Any]]:
        with self._lease(name, version, requested, label) as target:
            result = await self._dataplane.predict(target, key, inputs, output_filter, timeout_ms, self._pool)
        return target.version, result.signature_name, result.outputs

    def _status(self, name: str, version: int | None) -> list[tuple[int, int, tuple[int, str] | None]]:
        return [
            (s.version, int(s.state), (s.error.code.value, s.error.message) if s.error else None)
            for s in self._dataplane.status(name, version)
        ]

    def _classify(
        self, name: str, version: int, requested: int | None, label: str | None, key: str, request: bytes, timeout: int
    ) -> tuple[int, str, bytes]:
        with self._lease(name, version, requested, label) as target:
            ran, result = self._dataplane.classify(target, key, _input(request), timeout)
        return target.version, ran, result.SerializeToString()

    def _regress(
        self, name: str, version: int, requested: int | None, label: str | None, key: str, request: bytes, timeout: int
    ) -> tuple[int, str, bytes]:
        with self._lease(name, version, requested, label) as target:
            ran, result = self._dataplane.regress(target, key, _input(request), timeout)
        return target.version, ran, result.SerializeToString()

    def _multi_inference(
        self,
        name: str,
        version: int,
        requested: int | None,
        label: str | None,
        tasks: list[tuple[ModelSpec, str]],
        request: bytes,
        timeout: int,
    ) -> tuple[int, list[tuple[str, str, bytes]]]:
        with self._lease(name, version, requested, label) as target:
            results = self._dataplane.multi_inference(target, tasks, _input(request), timeout)
        return target.version, [(r.signature_name, r.method_name, r.result.SerializeToString()) for r in results]

    async def _profile(self, name: str, request: bytes) -> tuple[str, str, bytes]:
        """A `tensorflow.ProfilerService` call forwarded by a worker: (status code name or "", details, response)."""
        if not self._server.options.enable_profiler:
            raise ServingError(Code.UNIMPLEMENTED, "The profiler service is off")
        from pyserving.protocols import profiler

        if self._profiler is None:
            self._profiler = profiler.ProfilerService()
        message = profiler.message_class(f"{name}Request").FromString(request)
        try:
            response = await getattr(self._profiler, name)(message, _AbortContext())
        except _Aborted as exc:
            return exc.code, exc.details, b""
        return "", "", response.SerializeToString()

    def _reload_proto(self, config: bytes) -> None:
        proto = model_server_config_pb2.ModelServerConfig()
        proto.ParseFromString(config)
        self._core.reload_proto(proto)

    async def _metrics(self) -> bytes:
        """Every worker's request metrics added to this process's, rendered once."""
        loop = asyncio.get_running_loop()
        waits = []
        for sender in list(self._workers.values()):
            self._next_id += 1
            future: asyncio.Future[Any] = loop.create_future()
            self._pending[self._next_id] = future
            sender.send(wire.encode((wire.REQUEST, self._next_id, "metric_state", ()), self._run_dir))
            waits.append((self._next_id, future))
        states = []
        for call_id, future in waits:
            try:
                state = await asyncio.wait_for(future, _SCRAPE_WAIT_S)
            except TimeoutError:
                self._pending.pop(call_id, None)
                continue
            if state is not None:
                states.append(state)
        return await run_sync(self._pool, metrics.exposition, states)


class _Aborted(Exception):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _AbortContext:
    """What the profiler service uses of a gRPC context when a worker forwards its call: `abort`."""

    async def abort(self, code: Any, details: str) -> None:
        raise _Aborted(code.name, details)


def _forget(tasks: dict[int, asyncio.Task[None]], call_id: int, _: asyncio.Task[None]) -> None:
    tasks.pop(call_id, None)


def _unpack(message_: Any) -> tuple[int, int, str, Any]:
    if len(message_) == 4:
        kind, call_id, method, args = message_
        return kind, call_id, method, args
    kind, call_id, result = message_
    return kind, call_id, "", result


def _input(serialized: bytes) -> input_pb2.Input:
    proto = input_pb2.Input()
    try:
        proto.ParseFromString(serialized)
    except message.DecodeError:  # the worker serialized it: cannot happen short of a bug
        raise ServingError(Code.INTERNAL, "Could not read the request's input") from None
    return proto


def _result_bytes(result: Any) -> int:
    """A predict reply's array bytes (version, signature, outputs), with or without tracing attributes."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        result = result[0]
    if isinstance(result, tuple) and len(result) == 3 and isinstance(result[2], dict):
        return wire.arrays_bytes(result[2].values())
    return 0


if __name__ == "__main__":  # pragma: no cover - started through pyserving.workers
    sys.exit("start this through `python -m pyserving.workers model`")
