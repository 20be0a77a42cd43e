"""What operators and orchestrators call: liveness, readiness, Prometheus metrics, the OpenAPI document,
and the standard gRPC health service.

HTTP: `GET /healthz` (alive), `GET /readyz` (200 when every configured model has
an AVAILABLE version and the server is not shutting down, else 503 with each
model's state), the Prometheus text format at `--monitoring_config_file`'s path
and at `--metrics_path`, and `GET /openapi.yaml` (the REST API: TF Serving's and the Open Inference
Protocol's routes). gRPC: `grpc.health.v1.Health` with
`--enable_grpc_healthcheck_service`, SERVING for the server and TF Serving's
service names until shutdown begins.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable
from concurrent.futures import Executor

import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from pyserving import metrics
from pyserving.concurrency import run_sync
from pyserving.transports import http
from pyserving.transports.grpc import Service

__all__ = ["GrpcHealth", "HEALTHZ", "OPENAPI", "READYZ", "Readiness", "liveness", "metrics_app", "openapi", "readiness"]

HEALTHZ = "/healthz"
READYZ = "/readyz"
OPENAPI = "/openapi.yaml"

_JSON_HEADERS = [(b"content-type", b"application/json")]

# () -> (ready, {model name: "AVAILABLE" | "NOT_AVAILABLE"})
Readiness = Callable[[], tuple[bool, dict[str, str]]]


async def liveness(scope: http.Scope, receive: http.Receive, send: http.Send) -> None:
    await http.respond(send, 200, b'{"status": "alive"}\n', _JSON_HEADERS)


def readiness(ready: Readiness) -> http.ASGIApp:
    async def app(scope: http.Scope, receive: http.Receive, send: http.Send) -> None:
        is_ready, models = ready()
        body = orjson.dumps({"ready": is_ready, "models": models}) + b"\n"
        await http.respond(send, 200 if is_ready else 503, body, _JSON_HEADERS)

    return app


def metrics_app(pool: Executor, render: Callable[[], bytes] = metrics.exposition) -> http.ASGIApp:
    """The Prometheus text format, rendered on `pool` (it walks every series; the loop keeps serving).
    `render`: a `--num_workers` worker asks the model process for the merged exposition instead."""

    async def app(scope: http.Scope, receive: http.Receive, send: http.Send) -> None:
        body = await run_sync(pool, render)
        await http.respond(send, 200, body, [(b"content-type", metrics.CONTENT_TYPE)])

    return app


async def openapi(scope: http.Scope, receive: http.Receive, send: http.Send) -> None:
    await http.respond(send, 200, _openapi_document(), [(b"content-type", b"application/yaml")])


@functools.cache
def _openapi_document() -> bytes:
    return importlib.resources.files("pyserving.protocols").joinpath("openapi.yaml").read_bytes()


# TF Serving marks both services SERVING; "" is the whole server.
_HEALTH_SERVICES = (
    "",
    "ModelService",
    "PredictionService",
    "tensorflow.serving.ModelService",
    "tensorflow.serving.PredictionService",
)


class GrpcHealth:
    """grpc.health.v1.Health: SERVING from `start` until `shutdown`."""

    def __init__(self) -> None:
        self._servicer = health_aio.HealthServicer()

    @property
    def service(self) -> Service:
        return functools.partial(health_pb2_grpc.add_HealthServicer_to_server, self._servicer)

    async def start(self) -> None:
        for name in _HEALTH_SERVICES:
            await self._servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def shutdown(self) -> None:
        await self._servicer.enter_graceful_shutdown()
