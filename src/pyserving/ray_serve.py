"""pyserving as a Ray Serve application (`pip install pyserving[ray]`).

Each replica is a whole pyserving data plane built from the CLI's flags (`server.build`): its own
`ServerCore` with version polling, labels, batching and warmup. Ray brings the listeners:

- REST: Ray's HTTP proxy forwards each request to a replica's ASGI ingress, which is pyserving's REST
  router (TF Serving's `/v1`, the V2 `/v2`, `/healthz`, `/readyz`, metrics). Deploy with `route_prefix="/"`
  so paths reach the router unchanged. Each response names its replica in `x-pyserving-replica`.
- gRPC: Ray's gRPC proxy, started with `GRPC_SERVICER_FUNCTIONS`, routes each RPC by method name to the
  deployment method of that name (`Predict`, `GetModelStatus`, `ModelInfer`...), which calls pyserving's
  servicer. A `ServingError` keeps its gRPC code (NOT_FOUND, INVALID_ARGUMENT...) through the proxy.

Run: `serve run pyserving.ray_serve:app model_name=m model_base_path=/models/m enable_batching=true`
(every `key=value` is the CLI's `--key=value`), plus deployment options `num_replicas`,
`max_ongoing_requests`, `min_replicas`/`max_replicas`/`target_ongoing_requests` and the delays
`upscale_delay_s`, `downscale_delay_s`, `look_back_period_s`, `metrics_interval_s` (autoscaling). Importing
this module imports Ray; nothing else in pyserving does.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from pyserving import config_protos, flags

__all__ = [
    "GRPC_SERVICER_FUNCTIONS",
    "REPLICA_HEADER",
    "PyServing",
    "add_GRPCInferenceServiceServicer_to_server",
    "app",
    "deployment_options",
]

log = logging.getLogger("pyserving")

# Ray's gRPC proxy registers these services and routes each of their methods to the deployment method of
# the same name (the names do not collide across the three services).
GRPC_SERVICER_FUNCTIONS = [
    "tensorflow_serving.apis.prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server",
    "tensorflow_serving.apis.model_service_pb2_grpc.add_ModelServiceServicer_to_server",
    "pyserving.ray_serve.add_GRPCInferenceServiceServicer_to_server",
]
REPLICA_HEADER = b"x-pyserving-replica"

# Ray's gRPC proxy pickles each request for the replica, and pickle finds a message class by its module's
# name. Triton's generated V2 messages name theirs `grpc_service_pb2` (the .proto's name), which nothing
# installs: this alias makes it importable in each Ray process that imports this module (the proxy imports it
# for the servicer function below, a replica for the deployment class).
sys.modules.setdefault("grpc_service_pb2", service_pb2)


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 (gRPC's name)
    """The V2 service for Ray's gRPC proxy (named in `GRPC_SERVICER_FUNCTIONS`)."""
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


# Ray's default max_ongoing_requests (5) would cap a replica's batches at 5 requests. Without batching a
# request holds a worker thread for its session call; more waiting inside the replica than its threads only
# adds latency that Ray's router could have spent on another replica.
_UNBATCHED_ONGOING = 32
_MAX_ONGOING_CAP = 2048

# Autoscaling's timing, passed to Ray's autoscaling_config as given (seconds).
_AUTOSCALING_TIMES = ("upscale_delay_s", "downscale_delay_s", "look_back_period_s", "metrics_interval_s")
_DEPLOYMENT_KEYS = {
    "num_replicas",
    "max_ongoing_requests",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    *_AUTOSCALING_TIMES,
}


class _Aborted(Exception):
    """Raised by `_Context.abort`; Ray's proxy answers with the code set on the context."""


class _Context:
    """What pyserving's servicers use of `grpc.aio.ServicerContext`, over Ray's serializable context."""

    def __init__(self, context: RayServegRPCContext) -> None:
        self._context = context

    def time_remaining(self) -> float | None:
        return None  # Ray's proxy does not pass the client's deadline on (its request_timeout_s bounds a call)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted(details)


def _rpc(service: str, method: str) -> Callable[[Any, Any, RayServegRPCContext], Awaitable[Any]]:
    """A deployment method that Ray's gRPC proxy calls for `method`: the servicer's coroutine."""

    async def call(self: Any, request: Any, grpc_context: RayServegRPCContext) -> Any:
        servicer = getattr(self._servicers, service)
        response = await getattr(servicer, method)(request, _Context(grpc_context))
        return _Serialized(response) if type(response) is bytes else response

    call.__name__ = method
    return call


class _Serialized:
    """A response the servicer answered already serialized (Predict: `protos.predict_response_bytes`); Ray's
    proxy only calls `SerializeToString` on what a method returns."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 (the protobuf method Ray calls)
        return self._data


class _ReplicaHeader:
    """pyserving's REST router, with the replica's id on every response and ASGI lifespan acknowledged."""

    def __init__(self, router: Any, replica: str) -> None:
        self._router = router
        self._header = (REPLICA_HEADER, replica.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return

        async def send_named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            await send(message)

        await self._router(scope, receive, send_named)


def _options(args: Mapping[str, str]) -> Any:
    """The CLI's Options from `key=value` arguments (`--key=value`); ValueError naming a bad one."""
    argv = [f"--{key}={value}" for key, value in args.items() if key not in _DEPLOYMENT_KEYS]
    try:
        parsed = flags.parse(argv)
    except flags.UsageError as exc:
        raise ValueError(f"pyserving.ray_serve: {exc or 'usage'}") from None
    if parsed.unknown:
        raise ValueError(f"pyserving.ray_serve: unknown argument: {parsed.unknown[0]}")
    return parsed.options


class _Replica:
    """One replica: pyserving's core and data plane, REST as the ASGI ingress, gRPC as methods."""

    # Ray awaits an async constructor (the type checker knows only sync ones).
    async def __init__(self, argv: list[str]) -> None:  # type: ignore[misc]
        # As the CLI: TF's environment before TensorFlow is imported (by `server`), then the server's pieces.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
        from pyserving import server
        from pyserving.errors import ServingError

        options = flags.parse(argv).options
        try:  # the initial load blocks: off the replica's loop, which answers Ray's health checks
            self._server = await asyncio.to_thread(server.build, options)
        except ServingError as exc:
            raise RuntimeError(f"Failed to start server. Error: {exc}") from None
        gc.collect()
        gc.freeze()  # as `server.run`: TF's long-lived objects are never scanned again
        self._servicers = server.grpc_servicers(self._server)
        self._router = server.rest_router(self._server)
        self._replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> _ReplicaHeader:
        return _ReplicaHeader(self._router, self._replica)

    def __del__(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            if server.batcher is not None:
                server.batcher.stop()
            server.core.stop()

    # TF Serving's PredictionService and ModelService.
    Predict = _rpc("prediction", "Predict")
    GetModelMetadata = _rpc("prediction", "GetModelMetadata")
    Classify = _rpc("prediction", "Classify")
    Regress = _rpc("prediction", "Regress")
    MultiInference = _rpc("prediction", "MultiInference")
    GetModelStatus = _rpc("model", "GetModelStatus")
    HandleReloadConfigRequest = _rpc("model", "HandleReloadConfigRequest")
    # The Open Inference Protocol's GRPCInferenceService (its unary RPCs pyserving serves).
    ServerLive = _rpc("inference", "ServerLive")
    ServerReady = _rpc("inference", "ServerReady")
    ServerMetadata = _rpc("inference", "ServerMetadata")
    ModelReady = _rpc("inference", "ModelReady")
    ModelMetadata = _rpc("inference", "ModelMetadata")
    ModelInfer = _rpc("inference", "ModelInfer")
    RepositoryIndex = _rpc("inference", "RepositoryIndex")
    RepositoryModelLoad = _rpc("inference", "RepositoryModelLoad")
    RepositoryModelUnload = _rpc("inference", "RepositoryModelUnload")


async def _unimplemented(self: Any, request: Any, grpc_context: RayServegRPCContext) -> Any:
    """A method of the three services that pyserving does not serve: UNIMPLEMENTED, as its own gRPC port
    answers (without it, Ray's proxy would answer INTERNAL for a method the deployment lacks)."""
    grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    grpc_context.set_details("Method not found!")
    raise _Aborted("Method not found!")


for _service in (
    prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"],
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"],
    service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
):
    for _method in _service.methods:
        if not hasattr(_Replica, _method.name):
            setattr(_Replica, _method.name, _unimplemented)

PyServing = serve.deployment(name="pyserving", ray_actor_options={"num_cpus": 1})(serve.ingress()(_Replica))


def _batch_capacity(options: Any) -> int:
    """How many requests a replica's batches can hold at once: `max_batch_size` for each batch thread,
    plus one batch filling while they run."""
    if options.batching_parameters_file:
        proto: Any = config_protos.parse_file(options.batching_parameters_file, config_protos.BatchingParameters)
    else:
        proto = config_protos.BatchingParameters()
    batch_size = proto.max_batch_size.value if proto.HasField("max_batch_size") else 1000
    threads = proto.num_batch_threads.value if proto.HasField("num_batch_threads") else (os.cpu_count() or 1)
    return batch_size * (threads + 1)


def deployment_options(args: Mapping[str, str]) -> dict[str, Any]:
    """Ray deployment options from the builder's arguments: replicas or autoscaling, and
    `max_ongoing_requests` (given, or sized so that batches can fill: see `_batch_capacity`)."""
    options = _options(args)
    ongoing = int(args["max_ongoing_requests"]) if "max_ongoing_requests" in args else 0
    if ongoing <= 0:
        ongoing = min(_batch_capacity(options), _MAX_ONGOING_CAP) if options.enable_batching else _UNBATCHED_ONGOING
    result: dict[str, Any] = {"max_ongoing_requests": ongoing}
    if "max_replicas" in args:
        result["autoscaling_config"] = {
            "min_replicas": int(args.get("min_replicas", "1")),
            "max_replicas": int(args["max_replicas"]),
            "target_ongoing_requests": float(args.get("target_ongoing_requests", str(max(ongoing // 2, 1)))),
        }
        for key in _AUTOSCALING_TIMES:
            if key in args:
                result["autoscaling_config"][key] = float(args[key])
    else:
        result["num_replicas"] = int(args.get("num_replicas", "1"))
    return result


def app(args: Mapping[str, str]) -> Any:
    """Ray Serve's application builder: `serve run pyserving.ray_serve:app key=value...`."""
    # A YAML config's `true` or `2` arrive as bool and int: written as the command line writes them.
    args = {key: value if isinstance(value, str) else json.dumps(value) for key, value in args.items()}
    _options(args).validate()  # a bad flag fails here, in the driver, not in every replica
    argv = [f"--{key}={value}" for key, value in args.items() if key not in _DEPLOYMENT_KEYS]
    return PyServing.options(**deployment_options(args)).bind(argv)
