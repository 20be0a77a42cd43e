"""A protocol worker of `--num_workers` > 1: the unchanged protocol adapters over a remote data plane.

`RemoteDataPlane` and `RemoteCore` have the interfaces of `DataPlane` and `ServerCore` (they subclass
them, so `server.rest_router`, `server.grpc_servicers` and `server._serve` run here as in one process) and
forward each call to the model process (`pyserving.workers.model_process`). Resolving a spec is the one
call the protocols make on the event loop before anything is awaited: it is answered from a cache that the
shared generation counter invalidates, the model process asked only on a miss.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import numpy as np
import uvloop
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2
from tensorflow_serving.config import model_server_config_pb2

from pyserving import metrics, tracing
from pyserving.concurrency import run_sized, worker_pool
from pyserving.errors import Code, ServingError
from pyserving.flags import Options
from pyserving.lifecycle.core import ServerCore
from pyserving.lifecycle.manager import State, VersionStatus
from pyserving.protocols import profiler
from pyserving.runtimes.servable import CLASSIFY_METHOD, Servable
from pyserving.serving import DataPlane, ModelSpec, MultiInferenceResult, PredictResult, Target
from pyserving.workers import wire
from pyserving.workers.model_process import GENERATION_FILE, MODEL_SOCKET

__all__ = ["RemoteCore", "RemoteDataPlane", "serve"]

log = logging.getLogger("pyserving")

# A call the event loop makes (a resolve miss) fails rather than stall the loop longer than this.
_LOOP_CALL_TIMEOUT_S = 10.0
_GONE = "The model process is not available"
_CHANNEL_LOST = 3  # the exit code of a worker whose connection to the model process broke


def serve(options: Options, run_dir: str, index: int) -> int:
    """Serve REST and gRPC on the shared ports until SIGTERM; the exit code."""
    from pyserving import server  # TensorFlow's protos, gRPC, the protocols

    try:
        tls, tls_context = server._tls(options)
        paths = server._metrics_paths(options)
    except ServingError as exc:
        print(f"Failed to start server. Error: {exc}", flush=True)
        return 255
    tracing.setup(options.enable_tracing)
    gc.collect()
    gc.freeze()

    # The profiler service traces TensorFlow where it runs: a worker forwards its calls to the model process.
    profile, options.enable_profiler = options.enable_profiler, False
    if index != 0:  # a Unix socket path has one listener: worker 0's (bound again when it restarts)
        options.grpc_socket_path = ""

    async def main() -> None:
        channel = await _AsyncChannel.open(run_dir, index)
        dataplane = RemoteDataPlane(options, channel, run_dir)
        core = RemoteCore(options, dataplane, channel)
        services = [profiler.service(_RemoteProfiler(channel))] if profile else []
        built = server.Server(
            options,
            core,
            dataplane,
            None,
            tls,
            tls_context,
            paths,
            reuse_port=True,
            exposition=dataplane.scrape,
            grpc_services=services,
        )
        if profile:
            log.info("Profiler service is enabled (it profiles the model process)")
        await server._serve(built)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(main())
        except ServingError as exc:
            print(f"Failed to start server. Error: {exc}", flush=True)
            return 255
        finally:
            tracing.shutdown()
    return 0


class _AsyncChannel:
    """The worker's event-loop connection: calls multiplexed by id; answers the model process's metrics calls."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, run_dir: str) -> None:
        self._reader, self._writer, self._run_dir = reader, writer, run_dir
        self._sender = wire.Sender(writer)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._closed = False
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, run_dir: str, index: int) -> _AsyncChannel:
        try:
            reader, writer = await asyncio.open_unix_connection(os.path.join(run_dir, MODEL_SOCKET), limit=2**20)
        except OSError as exc:
            raise ServingError(Code.UNAVAILABLE, f"{_GONE}: {exc}") from None
        channel = cls(reader, writer, run_dir)
        await channel.call("hello", index)
        return channel

    async def call(self, method: str, *args: Any, size: int = 0) -> Any:
        """The model process's answer (its `ServingError` raised); `size`: the arrays' bytes, which decide
        whether encoding leaves the loop."""
        if self._closed:
            raise ServingError(Code.UNAVAILABLE, _GONE)
        self._next_id += 1
        call_id = self._next_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            parts = await run_sized(
                _ENCODE_POOL, size, wire.encode, (wire.REQUEST, call_id, method, args), self._run_dir
            )
            self._sender.send(parts)
            try:
                kind, result = await future
            except asyncio.CancelledError:  # the client went away or its deadline passed: so does the call
                if not self._closed:
                    self._sender.send(wire.encode((wire.REQUEST, 0, "cancel", (call_id,)), self._run_dir))
                raise
        finally:
            self._pending.pop(call_id, None)
        if kind == wire.ERROR:
            wire.raise_error(result)
        return result

    async def _read(self) -> None:
        lost = True  # unless the worker itself stops reading (close(), or its loop ending)
        try:
            while True:
                frame = await wire.read_frame(self._reader)
                if frame is None:
                    break
                message = await wire.decode_sized(_ENCODE_POOL, frame, self._run_dir)
                if message[0] == wire.REQUEST:  # the model process gathering a scrape
                    reply = (wire.REPLY, message[1], metrics.state())
                    self._sender.send(wire.encode(reply, self._run_dir))
                    continue
                kind, call_id, result = message
                future = self._pending.get(call_id)
                if future is not None and not future.done():
                    future.set_result((kind, result))
        except asyncio.CancelledError:
            lost = False
        except OSError:
            pass
        except Exception:  # a frame that does not decode: this connection cannot be trusted any more
            log.exception("Could not read the model process's answer")
        finally:
            broken = lost and not self._closed  # the model process went away, or the stream broke
            self._closed = True
            for future in self._pending.values():
                if not future.done():
                    future.set_result((wire.ERROR, (Code.UNAVAILABLE.value, _GONE)))
            if broken:  # a worker without its channel must not keep accepting: the supervisor starts a new one
                log.error("The model process closed its connection: this worker exits")
                os._exit(_CHANNEL_LOST)

    def close(self) -> None:
        self._closed = True
        self._task.cancel()
        self._writer.close()


_ENCODE_POOL = worker_pool(2, "encode")


class _Blocking:
    """Blocking connections to the model process, one per concurrent call, kept for reuse."""

    def __init__(self, run_dir: str) -> None:
        self._run_dir = run_dir
        self._path = os.path.join(run_dir, MODEL_SOCKET)
        self._idle: list[wire.BlockingChannel] = []
        self._lock = threading.Lock()
        self._loop_channel: wire.BlockingChannel | None = None
        self.loop_thread = threading.get_ident()

    def call(self, method: str, *args: Any) -> Any:
        on_loop = threading.get_ident() == self.loop_thread
        try:
            if on_loop:  # one connection, with a bound: the loop must not wait on a wedged model process
                if self._loop_channel is None:
                    self._loop_channel = wire.BlockingChannel(self._path, self._run_dir, _LOOP_CALL_TIMEOUT_S)
                channel = self._loop_channel
            else:
                with self._lock:
                    idle = self._idle.pop() if self._idle else None
                channel = idle or wire.BlockingChannel(self._path, self._run_dir)
        except OSError as exc:
            raise ServingError(Code.UNAVAILABLE, f"{_GONE}: {exc}") from None
        try:
            result = channel.call(method, *args)
        except ServingError:
            self._keep(channel, on_loop)
            raise
        except OSError as exc:  # the connection is unusable (and so, probably, the model process)
            channel.close()
            if on_loop:
                self._loop_channel = None
            raise ServingError(Code.UNAVAILABLE, f"{_GONE}: {exc}") from None
        self._keep(channel, on_loop)
        return result

    def _keep(self, channel: wire.BlockingChannel, on_loop: bool) -> None:
        if not on_loop:
            with self._lock:
                self._idle.append(channel)


class _RemoteProfiler:
    """`tensorflow.ProfilerService`, answered by the model process's (where TensorFlow runs)."""

    def __init__(self, channel: _AsyncChannel) -> None:
        self._channel = channel

    async def Profile(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 (gRPC name)
        return await self._forward("Profile", request, context)

    async def Terminate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._forward("Terminate", request, context)

    async def Monitor(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._forward("Monitor", request, context)

    async def _forward(self, name: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            code, details, response = await self._channel.call("profiler", name, request.SerializeToString())
        except ServingError as exc:
            await context.abort(exc.grpc_code, exc.grpc_message)
        if code:
            await context.abort(grpc.StatusCode[code], details)
        return profiler.message_class(f"{name}Response").FromString(response)


class _Signatures:
    """A version's signature defs, parsed once per (model, version)."""

    __slots__ = ("signature_defs",)

    def __init__(self, signature_defs: dict[str, meta_graph_pb2.SignatureDef]) -> None:
        self.signature_defs = signature_defs


class _Resolved:
    """What a worker's `Target` carries instead of a servable: the version's signature defs and the spec it
    was resolved from (the model process runs the call on the spec's version now if that one has unloaded
    since: one process holds its lease from resolve to result, a worker cannot)."""

    __slots__ = ("signature_defs", "spec")
    runtime = "remote"

    def __init__(self, signatures: _Signatures, spec: ModelSpec) -> None:
        self.signature_defs = signatures.signature_defs
        self.spec = spec


class RemoteDataPlane(DataPlane):
    """`DataPlane`'s interface, answered by the model process."""

    def __init__(self, options: Options, channel: _AsyncChannel, run_dir: str) -> None:
        self._method_name_check = options.enable_signature_method_name_check
        self.max_decoded_bytes = max(options.max_decoded_tensor_bytes, 0)
        self._channel = channel
        self._blocking = _Blocking(run_dir)
        self._generation = wire.Generation(os.path.join(run_dir, GENERATION_FILE), create=False)
        self._seen = -1  # the generation the caches below belong to
        self._swap = threading.Lock()
        self._targets: dict[tuple[str, int | None, str | None], tuple[int, str, _Signatures]] = {}
        # The model process's refusals (unknown model, version or label), so that a client repeating one
        # costs no round trip on the loop: bounded, since the names are the client's.
        self._refusals: dict[tuple[str, int | None, str | None], tuple[Code, str]] = {}
        self._signatures: dict[tuple[str, int], _Signatures] = {}
        self._known: frozenset[str] | None = None
        self._ready: tuple[bool, dict[str, str]] | None = None

    def _fresh(self) -> None:
        generation = self._generation.read()
        if generation != self._seen:
            with self._swap:  # the loop and pool threads both come here
                if generation != self._seen:
                    self._targets, self._signatures, self._refusals = {}, {}, {}
                    self._known, self._ready = None, None
                    self._seen = generation

    def resolve(self, spec: ModelSpec) -> Target:
        self._fresh()
        key = (spec.name, spec.version, spec.label)
        # The caches of this generation: an answer given before a change lands in these, which the change
        # discards, never in the next generation's (resolve also runs on pool threads).
        targets, refusals, signature_cache = self._targets, self._refusals, self._signatures
        entry = targets.get(key)
        if entry is None:
            refusal = refusals.get(key)
            if refusal is not None:
                raise ServingError(*refusal)
            try:
                version, platform, serialized = self._blocking.call("resolve", spec.name, spec.version, spec.label)
            except ServingError as exc:
                if exc.code != Code.UNAVAILABLE and _cacheable(key, len(refusals)):
                    refusals[key] = (exc.code, exc.message)
                raise
            signatures = signature_cache.get((spec.name, version))
            if signatures is None:
                signatures = _Signatures({k: _signature_def(v) for k, v in serialized.items()})
                signature_cache[(spec.name, version)] = signatures
            entry = targets[key] = (version, platform, signatures)
        version, platform, signatures = entry
        return Target(spec.name, version, _servable(_Resolved(signatures, spec)), None, platform)

    def readiness(self) -> tuple[bool, dict[str, str]]:
        self._fresh()
        ready = self._ready
        if ready is None:
            try:
                answer = self._blocking.call("readiness")
            except ServingError:  # the model process is gone: not ready (the supervisor stops the server)
                return False, {}
            ready = self._ready = (answer[0], dict(answer[1]))
        return ready[0], dict(ready[1])

    def knows(self, name: str) -> bool:
        self._fresh()
        known = self._known
        if known is None:
            known = self._known = frozenset(self._blocking.call("known"))
        return name in known

    def metric_label(self, name: str) -> str:
        return name if self.knows(name) else metrics.UNKNOWN_MODEL

    async def predict(
        self,
        target: Target,
        signature_name: str,
        inputs: dict[str, np.ndarray],
        output_filter: Sequence[str] = (),
        timeout_ms: int = 0,
        executor: Executor | None = None,
    ) -> PredictResult:
        size = wire.arrays_bytes(inputs.values())
        version, key, outputs = _traced(
            await self._channel.call(
                "predict", *_where(target), signature_name, inputs, list(output_filter), timeout_ms, size=size
            )
        )
        target.version = version  # another one if the resolved version unloaded meanwhile (`_Resolved`)
        return PredictResult(target.model, version, key, outputs)

    def classify(
        self, target: Target, signature_name: str, request_input: input_pb2.Input, timeout_ms: int = 0
    ) -> tuple[str, classification_pb2.ClassificationResult]:
        return self._examples(
            "classify", classification_pb2.ClassificationResult, target, signature_name, request_input, timeout_ms
        )

    def regress(
        self, target: Target, signature_name: str, request_input: input_pb2.Input, timeout_ms: int = 0
    ) -> tuple[str, regression_pb2.RegressionResult]:
        return self._examples(
            "regress", regression_pb2.RegressionResult, target, signature_name, request_input, timeout_ms
        )

    def _examples(
        self,
        method: str,
        result_class: type[_Result],
        target: Target,
        signature_name: str,
        request_input: input_pb2.Input,
        timeout_ms: int,
    ) -> tuple[str, _Result]:
        """A classify or regress call: the tf.Examples travel serialized, the result comes back so."""
        target.version, key, serialized = _traced(
            self._blocking.call(method, *_where(target), signature_name, request_input.SerializeToString(), timeout_ms)
        )
        return key, result_class.FromString(serialized)

    def multi_inference(
        self,
        target: Target,
        tasks: Sequence[tuple[ModelSpec, str]],
        request_input: input_pb2.Input,
        timeout_ms: int = 0,
    ) -> list[MultiInferenceResult]:
        target.version, answers = _traced(
            self._blocking.call(
                "multi_inference", *_where(target), list(tasks), request_input.SerializeToString(), timeout_ms
            )
        )
        results = []
        for key, method, serialized in answers:
            kind = (
                classification_pb2.ClassificationResult
                if method == CLASSIFY_METHOD
                else regression_pb2.RegressionResult
            )
            results.append(MultiInferenceResult(key, method, kind.FromString(serialized)))
        return results

    def status(self, name: str, version: int | None) -> list[VersionStatus]:
        return [
            VersionStatus(number, State(state), ServingError(Code(error[0]), error[1]) if error else None)
            for number, state, error in self._blocking.call("status", name, version)
        ]

    def call(self, method: str, *args: Any) -> Any:
        """A blocking call to the model process (from a worker thread)."""
        return self._blocking.call(method, *args)

    def scrape(self) -> bytes:
        """The merged Prometheus exposition (the model process's and every worker's series)."""
        result: bytes = self._blocking.call("metrics")
        return result


class RemoteCore(ServerCore):
    """What the protocols and `server._serve` use of `ServerCore`, answered by the model process."""

    def __init__(self, options: Options, dataplane: RemoteDataPlane, channel: _AsyncChannel) -> None:
        self._options = options
        self._dataplane = dataplane
        self._channel = channel
        self.draining = False
        self.config_file = None

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """The model process's readiness (asked again only once the generation changed) and this worker's
        own draining."""
        ready, models = self._dataplane.readiness()
        return ready and not self.draining, models

    def reload_proto(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        self._dataplane.call("reload_proto", config.SerializeToString())

    def model_names(self) -> list[str]:
        names: list[str] = self._dataplane.call("model_names")
        return names

    def load_model(self, name: str) -> None:
        self._dataplane.call("load_model", name)

    def unload_model(self, name: str) -> None:
        self._dataplane.call("unload_model", name)

    def reload_config_file(self) -> None:
        self._dataplane.call("reload_config_file")

    def stop(self) -> None:
        self._channel.close()


_Result = TypeVar("_Result", classification_pb2.ClassificationResult, regression_pb2.RegressionResult)
_MAX_REFUSALS = 1024
_MAX_REFUSAL_NAME = 1024  # characters of model name and label together


def _cacheable(key: tuple[str, int | None, str | None], cached: int) -> bool:
    """Whether a refusal may be kept: the cache is bounded in entries and each entry in size."""
    return cached < _MAX_REFUSALS and len(key[0]) + len(key[2] or "") <= _MAX_REFUSAL_NAME


def _signature_def(serialized: bytes) -> meta_graph_pb2.SignatureDef:
    return meta_graph_pb2.SignatureDef.FromString(serialized)


def _servable(resolved: _Resolved) -> Servable:
    return resolved  # type: ignore[return-value]  # a Target here only carries the signature defs and spec


def _traced(result: Any) -> Any:
    """A `wire.TRACED` call's result; with tracing, its attributes added to the current span first."""
    if not tracing.enabled:
        return result
    value, attributes = result
    tracing.add_attributes(attributes)
    return value


def _where(target: Target) -> tuple[str, int, int | None, str | None]:
    """(model, resolved version, requested version, label): what the model process leases for a call."""
    spec: ModelSpec = target.servable.spec  # type: ignore[attr-defined]
    return target.model, target.version, spec.version, spec.label
