"""The server process: build the core from flags, mount the protocols on the transports, serve until a signal.

Order follows TF Serving: every initial model is loaded (or has failed, which
aborts start-up) before any port opens, then gRPC starts, then REST. Unlike TF
Serving, SIGTERM and SIGINT shut down gracefully: /readyz and the gRPC health
service turn NOT_SERVING at once; the listeners keep serving for
`--shutdown_delay_seconds` (REST responses close their connections) so that load
balancers stop routing here; then the listeners refuse new requests, in-flight
ones finish within `--shutdown_grace_period_seconds`, models are unloaded and the
process exits 0. A second signal exits at once. SIGHUP reloads
`--model_config_file` (as nginx reloads its configuration); without one it is
logged and ignored.

This module is the composition root: the only one that knows every layer.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import signal
import ssl
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvloop

from pyserving import config_protos, metrics, tracing
from pyserving.concurrency import worker_pool
from pyserving.errors import Code, ServingError
from pyserving.flags import Options
from pyserving.lifecycle.core import ServerCore
from pyserving.lifecycle.loader import LoaderChain
from pyserving.lifecycle.manager import VersionSpec
from pyserving.protocols import operations
from pyserving.protocols.tfs import grpc_api, rest_api, warmup
from pyserving.protocols.v2 import grpc_api as v2_grpc
from pyserving.protocols.v2 import rest as v2_rest
from pyserving.protocols.v2.inference import Inference
from pyserving.runtimes import custom_ops
from pyserving.runtimes.batching import Batcher, BatchingOptions
from pyserving.runtimes.python_processing import ProcessingPool, ProcessingSettings
from pyserving.runtimes.registry import RuntimeOptions
from pyserving.runtimes.servable import Servable
from pyserving.serving import DataPlane, ModelSpec, Target
from pyserving.transports import grpc as grpc_transport
from pyserving.transports import http
from pyserving.workers.codecs import CodecProcesses

__all__ = ["Server", "Servicers", "build", "grpc_servicers", "rest_router", "run"]

log = logging.getLogger("pyserving")

# With batching, a request thread waits for its batch; a batch can only grow as large as the
# number of requests waiting at once, so the request pools must not cap it.
_BATCHING_REQUEST_THREADS = 128


@dataclass
class Server:
    """Everything `run` builds before the listeners open."""

    options: Options
    core: ServerCore
    dataplane: DataPlane
    batcher: Batcher | None
    tls: Any  # an SSLConfig message, or None
    tls_context: ssl.SSLContext | None  # the same certificates for REST (built once, when they are checked)
    metrics_paths: list[str]  # where REST serves the Prometheus metrics (none: not exported)
    # --num_workers > 1: a protocol worker shares its ports with the others and asks the model process for
    # the merged metrics.
    reuse_port: bool = False
    exposition: Callable[[], bytes] = metrics.exposition
    grpc_services: list[grpc_transport.Service] = field(default_factory=list)  # mounted after the others


def _build(options: Options) -> Server:
    """The loader chain, the core and the data plane; `ServingError` if a config file is bad."""
    options.validate()
    tracing.setup(options.enable_tracing)
    custom_ops.load(options.custom_op_library_list(), options.custom_op_module_list())
    metrics_paths, (tls, tls_context) = _metrics_paths(options), _tls(options)
    intra, inter = options.parallelism()
    batcher = _batcher(options)
    processing = _processing(options)
    loader = LoaderChain(
        RuntimeOptions(
            tuple(options.saved_model_tag_list()),
            intra,
            inter,
            options.prefer_tflite_model,
            options.num_tflite_pools,
            options.num_tflite_interpreters_per_pool,
        ),
        batcher,
        options.enable_batching and options.enable_per_model_batching_parameters,
        processing=processing,
    )
    core = ServerCore(options, loader)
    dataplane = DataPlane(
        core.manager, options.enable_signature_method_name_check, max(options.max_decoded_tensor_bytes, 0)
    )  # the one place the limit is read: every protocol checks against the data plane's
    if processing is not None:  # processing functions may call the other models this server serves
        processing.resolver = lambda name, version: dataplane.resolve(ModelSpec(name, version))
    if options.enable_model_warmup:
        iterations = options.num_request_iterations_for_warmup

        def replay_warmup(spec: VersionSpec, servable: Servable) -> None:
            warmup.replay(spec.path, Target(spec.model, spec.version, servable), dataplane, iterations)

        loader.warmup = replay_warmup
    metrics.REQUESTS_IN_FLIGHT.add_source(core.manager.leases_by_model)
    return Server(options, core, dataplane, batcher, tls, tls_context, metrics_paths)


def build(options: Options) -> Server:
    """Everything but the listeners, with the initial models loaded (or `ServingError`): what `run` serves,
    and what an engine that brings its own listeners (`pyserving.ray_serve`) mounts."""
    server = _build(options)
    server.core.start(server.core.initial_configs())
    return server


@dataclass
class Servicers:
    """The gRPC servicers over one data plane: TF Serving's two services and the Open Inference Protocol's."""

    prediction: grpc_api.PredictionService
    model: grpc_api.ModelService
    inference: v2_grpc.InferenceService


def grpc_servicers(server: Server) -> Servicers:
    options = server.options
    pool = worker_pool(_request_threads(options.grpc_max_threads, options), "grpc")
    return Servicers(
        grpc_api.PredictionService(server.dataplane, pool, options.enable_serialization_as_tensor_content),
        grpc_api.ModelService(server.dataplane, pool, server.core.reload_proto),
        v2_grpc.InferenceService(Inference(server.dataplane, server.core, pool)),
    )


def rest_router(server: Server) -> http.Router:
    """The REST port's ASGI app: TF Serving's /v1, the V2 /v2, health, readiness, OpenAPI, metrics."""
    options = server.options
    router = http.Router(not_found=rest_api.NOT_FOUND_RESPONSE)
    router.route(operations.HEALTHZ, operations.liveness, methods=["GET"])
    router.route(operations.READYZ, operations.readiness(server.core.readiness), methods=["GET"])
    router.route(operations.OPENAPI, operations.openapi, methods=["GET"])
    if server.metrics_paths:
        # One thread: scrapes queue behind each other instead of rendering side by side.
        scrape = operations.metrics_app(worker_pool(1, "metrics"), server.exposition)
        for path in server.metrics_paths:
            router.route(path, scrape)
    pool = worker_pool(_request_threads(options.rest_api_num_threads, options), "rest")
    settings = rest_api.RestSettings(
        options.rest_api_timeout_in_ms,
        options.rest_api_enable_cors_support,
        options.rest_api_max_body_bytes,
    )
    codecs = CodecProcesses(options.rest_api_codec_processes, options.rest_api_codec_process_min_bytes)
    router.mount(rest_api.PREFIX, rest_api.RestApi(server.dataplane, pool, settings, codecs), ignore_case=True)
    v2_settings = v2_rest.V2Settings(options.rest_api_timeout_in_ms, options.rest_api_max_body_bytes)
    inference = Inference(server.dataplane, server.core, pool)
    router.mount(v2_rest.PREFIX, v2_rest.V2RestApi(inference, pool, v2_settings, codecs))
    return router


def _batcher(options: Options) -> Batcher | None:
    """The shared batcher for `--enable_batching`, from `--batching_parameters_file` or TF Serving's defaults."""
    if not options.enable_batching:
        return None
    if options.batching_parameters_file:
        proto: Any = config_protos.parse_file(options.batching_parameters_file, config_protos.BatchingParameters)
    else:
        proto = config_protos.BatchingParameters()
        proto.thread_pool_name.value = "model_server_batch_threads"
    return Batcher(BatchingOptions.from_proto(proto, os.cpu_count() or 1))


def _processing(options: Options) -> ProcessingSettings | None:
    """`--enable_python_processing`: the shared processing pool and the default bound of a call."""
    if not options.enable_python_processing:
        return None
    log.warning("Python processing is on: processing.py files in model version folders run with the server's rights")
    return ProcessingSettings(
        ProcessingPool(options.python_processing_threads), max(options.python_processing_timeout_in_ms, 1)
    )


def _monitoring(options: Options) -> str | None:
    """The Prometheus path from `--monitoring_config_file`, or None when metrics are not exported."""
    if not options.monitoring_config_file:
        return None
    config: Any = config_protos.parse_file(options.monitoring_config_file, config_protos.MonitoringConfig)
    if not config.prometheus_config.enable:
        return None
    return config.prometheus_config.path or metrics.DEFAULT_PATH


# --metrics_path: a URL path without a query; and the paths it may not take (the REST APIs' prefixes, any
# case, and the operations routes).
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
_API_PREFIXES = ("/v1", "/v2")


def _metrics_paths(options: Options) -> list[str]:
    """The REST paths of the Prometheus metrics: `--monitoring_config_file`'s and `--metrics_path`
    (one route when they are the same); `ServingError` naming the problem for a `--metrics_path` that
    is not a path or collides with a served route."""
    paths = [path for path in [_monitoring(options)] if path is not None]
    path = options.metrics_path
    if not path:
        return paths
    if not _PATH.fullmatch(path):
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"--metrics_path={path} is not a URL path: it must start with / and hold only letters, digits "
            "and -._~!$&'()*+,;=:@%/ (no query)",
        )
    lowered = path.lower()
    prefix = next((prefix for prefix in _API_PREFIXES if lowered.startswith(prefix)), None)
    if prefix is not None:
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"--metrics_path={path} collides with the REST API's {prefix} paths; choose another path, e.g. /metrics",
        )
    if path in (operations.HEALTHZ, operations.READYZ, operations.OPENAPI):
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"--metrics_path={path} collides with the {path} route; choose another path, e.g. /metrics",
        )
    return paths if path in paths else [*paths, path]


def _tls(options: Options) -> tuple[Any, ssl.SSLContext | None]:
    """The `--ssl_config_file` SSLConfig message and an SSLContext of its certificates, or (None, None);
    `ServingError` naming the problem if they cannot be used (gRPC would only report that it failed to bind)."""
    if not options.ssl_config_file:
        return None, None
    config: Any = config_protos.parse_file(options.ssl_config_file, config_protos.SSLConfig)
    if config.client_verify and not config.custom_ca:
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"{options.ssl_config_file}: client_verify is true but custom_ca is empty; "
            "client certificates cannot be verified without a CA",
        )
    try:
        context = http.ssl_context(config.server_cert, config.server_key, config.custom_ca, config.client_verify)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"{options.ssl_config_file}: invalid server_cert, server_key or custom_ca ({reason})",
        ) from None
    return config, context


def _request_threads(configured: int, options: Options) -> int:
    return max(configured, _BATCHING_REQUEST_THREADS) if options.enable_batching else configured


def run(options: Options) -> int:
    """Load, serve until SIGTERM/SIGINT; return the process exit code."""
    # A JSON number beyond float32's range becomes +-inf, as in TF Serving; numpy warns about such a
    # cast. The warning is noise for a server, and an np.errstate around each cast cost a microsecond.
    warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
    try:
        server = build(options)
    except ServingError as exc:
        print(f"Failed to start server. Error: {exc}", flush=True)
        return 255
    # TensorFlow and the loaded graphs leave about a million long-lived objects; a full
    # collection walking them all paused serving for 100+ ms (p99 at 64 connections went
    # from 9 to 128 ms). Frozen, they are never scanned again.
    gc.collect()
    gc.freeze()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(_serve(server))
        except ServingError as exc:
            print(f"Failed to start server. Error: {exc}", flush=True)
            return 255
        finally:
            tracing.shutdown()  # the spans still queued leave before the process exits
    return 0


async def _serve(server: Server) -> None:
    options, core = server.options, server.core
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("Second shutdown signal: exiting without waiting for in-flight requests")
            os._exit(128 + signum)
        core.draining = True  # /readyz answers 503 from now on
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, server)

    grpc_server, health = await _start_grpc(server)
    rest_server = None
    if options.rest_api_port:
        rest_server = await _start_rest(server)
    lag_watch = asyncio.create_task(_watch_loop_lag())

    await stop.wait()
    delay, grace = max(options.shutdown_delay_seconds, 0), max(options.shutdown_grace_period_seconds, 0)
    log.info("Received shutdown signal; not ready from now on, closing the listeners in %d s", delay)
    if health is not None:
        await health.shutdown()
    if rest_server is not None:
        rest_server.drain()
    await asyncio.sleep(delay)
    log.info("Closing the listeners; draining in-flight requests (up to %d s)", grace)
    drains = [grpc_server.stop(grace)]
    if rest_server is not None:
        drains.append(rest_server.stop())
    await asyncio.gather(*drains)
    lag_watch.cancel()
    if server.batcher is not None:
        server.batcher.stop()
    core.stop()
    log.info("Server stopped")


def _on_sighup(server: Server) -> None:
    if not server.options.model_config_file:
        log.info("SIGHUP ignored: there is no --model_config_file to reload")
        return
    log.info("SIGHUP: reloading %s", server.options.model_config_file)
    asyncio.get_running_loop().run_in_executor(None, server.core.reload_config_file)


_LAG_PERIOD_S = 0.1


async def _watch_loop_lag() -> None:
    """Export the event loop's lag: how late a timer fires, the worst of each second."""
    worst, window_start = 0.0, time.monotonic()
    while True:
        expected = time.monotonic() + _LAG_PERIOD_S
        await asyncio.sleep(_LAG_PERIOD_S)
        now = time.monotonic()
        worst = max(worst, now - expected)
        if now - window_start >= 1.0:
            metrics.EVENT_LOOP_LAG.set(worst)
            worst, window_start = 0.0, now


async def _start_grpc(server: Server) -> tuple[grpc.aio.Server, operations.GrpcHealth | None]:
    options = server.options
    servicers = grpc_servicers(server)
    services = grpc_api.services(servicers.prediction, servicers.model) + v2_grpc.services(servicers.inference)
    health = None
    if options.enable_grpc_healthcheck_service:
        health = operations.GrpcHealth()
        await health.start()
        services.append(health.service)
    services.extend(server.grpc_services)
    if options.enable_profiler:
        from pyserving.protocols import profiler  # TensorFlow's profiler, which a protocol worker never loads

        services.append(profiler.ProfilerService().service)
        log.info("Profiler service is enabled")
    grpc_server = grpc_transport.create_server(
        services, grpc_transport.channel_arguments(options.grpc_channel_arguments)
    )
    tls = server.tls
    creds = None
    if tls is not None:
        creds = grpc_transport.credentials(tls.server_cert, tls.server_key, tls.custom_ca, tls.client_verify)
    addresses = []
    if options.port:
        host = f"[{options.host}]" if ":" in options.host else options.host
        addresses.append(f"{host}:{options.port}")
    if options.grpc_socket_path:
        addresses.append(f"unix:{options.grpc_socket_path}")
    for address in addresses:
        try:
            grpc_transport.bind(grpc_server, address, creds)
        except RuntimeError as exc:
            raise ServingError(Code.UNAVAILABLE, f"Failed to bind gRPC to {address}: {exc}") from None
    await grpc_server.start()
    if options.port:
        log.info("Running gRPC ModelServer at %s:%d ...", options.host, options.port)
    if options.grpc_socket_path:
        log.info("Running gRPC ModelServer at UNIX socket %s ...", options.grpc_socket_path)
    return grpc_server, health


async def _start_rest(server: Server) -> http.Listener | None:
    """The HTTP listener with every HTTP protocol mounted; None (logged) if it cannot start, as TF Serving."""
    options = server.options
    if options.rest_api_port == options.port:
        log.error(
            "server_options.http_port cannot be same as grpc_port. Please use a different port for "
            "HTTP/REST API. Skipped exporting HTTP/REST API."
        )
        return None
    router = rest_router(server)
    try:
        rest_server = await http.start(
            router,
            options.host,
            options.rest_api_port,
            limits=http.HttpLimits(
                read_timeout_s=max(options.rest_api_read_timeout_seconds, 1),
                max_header_bytes=options.rest_api_max_header_bytes,
                max_header_count=options.rest_api_max_header_count,
            ),
            grace_s=max(options.shutdown_grace_period_seconds, 0),
            tls=server.tls_context if options.rest_api_enable_ssl else None,
            reuse_port=server.reuse_port,
        )
    except OSError as exc:
        log.error("Failed to start HTTP Server at localhost:%d (%s)", options.rest_api_port, exc)
        return None
    log.info("Exporting HTTP/REST API at:localhost:%d ...", options.rest_api_port)
    log.info("NET_LOG: Entering the event loop ...")  # TF Serving's line once REST serves; scripts wait for it
    return rest_server
