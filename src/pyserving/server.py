"""Server lifecycle: load the initial models, then open gRPC and REST, serve until a signal.

Order follows TF Serving: every initial model is loaded (or has failed, which
aborts start-up) before any port opens, then gRPC starts, then REST. Unlike TF
Serving, SIGTERM and SIGINT shut down gracefully: /readyz and the gRPC health
service turn NOT_SERVING at once, the listeners refuse new requests, in-flight
ones finish within `--shutdown_grace_period_seconds`, models are unloaded and the
process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import ssl
import tempfile

import grpc
import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from pyserving import config_protos, grpc_api, metrics
from pyserving.concurrency import worker_pool
from pyserving.errors import ServingError
from pyserving.flags import Options
from pyserving.rest_api import RestApi, RestSettings
from pyserving.server_core import ServerCore, initial_configs

log = logging.getLogger("pyserving")

_MAX_MESSAGE_BYTES = 2**31 - 1


class StartupError(Exception):
    """A start-up failure: printed as `Failed to start server. Error: ...`, exit 255."""


def validate(options: Options) -> None:
    """TF Serving's start-up checks on flag combinations."""
    if not options.model_base_path and not options.model_config_file:
        raise StartupError("INVALID_ARGUMENT: Both server_options.model_base_path and "
                           "server_options.model_config_file are empty!")
    if options.port == 0 and not options.grpc_socket_path:
        raise StartupError("INVALID_ARGUMENT: server_options.grpc_port is not set.")
    if options.use_alts_credentials and options.ssl_config_file:
        raise StartupError("INVALID_ARGUMENT: Either use_alts_credentials must be false or "
                           "ssl_config_file must be empty.")
    if options.batching_parameters_file and not options.enable_batching:
        raise StartupError("FAILED_PRECONDITION: server_options.batching_parameters_file is set without "
                           "setting server_options.enable_batching to true.")
    if (options.tensorflow_session_parallelism > 0 and options.tensorflow_intra_op_parallelism > 0
            and options.tensorflow_inter_op_parallelism > 0):
        raise StartupError(
            "FAILED_PRECONDITION: Either configure server_options.tensorflow_session_parallelism or "
            "(server_options.tensorflow_intra_op_parallelism, server_options.tensorflow_inter_op_parallelism) "
            "separately. You cannot configure all.")


async def _serve(options: Options, core: ServerCore, tls: config_protos.SSLConfig | None,
                 metrics_path: str | None) -> None:
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

    grpc_server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        *_channel_arguments(options.grpc_channel_arguments),
    ])
    grpc_api.add_services(grpc_server, core, worker_pool(_request_threads(options.grpc_max_threads, options), "grpc"),
                          options.enable_serialization_as_tensor_content)
    health = None
    if options.enable_grpc_healthcheck_service:
        health = health_aio.HealthServicer()
        for service in _HEALTH_SERVICES:
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    credentials = _grpc_credentials(tls) if tls is not None else None
    if options.port:
        _bind_grpc(grpc_server, f"{_grpc_host(options.host)}:{options.port}", credentials)
    if options.grpc_socket_path:
        _bind_grpc(grpc_server, f"unix:{options.grpc_socket_path}", credentials)
    await grpc_server.start()
    if options.port:
        log.info("Running gRPC ModelServer at %s:%d ...", options.host, options.port)
    if options.grpc_socket_path:
        log.info("Running gRPC ModelServer at UNIX socket %s ...", options.grpc_socket_path)

    rest_server = None
    if options.rest_api_port:
        rest_server = await _start_rest(options, core, tls if options.rest_api_enable_ssl else None, metrics_path)

    await stop.wait()
    grace = max(options.shutdown_grace_period_seconds, 0)
    log.info("Received shutdown signal; refusing new requests, draining in-flight ones (up to %d s)", grace)
    if health is not None:
        await health.enter_graceful_shutdown()
    drains = [grpc_server.stop(grace)]
    if rest_server is not None:
        rest_server.should_exit = True
        drains.append(rest_server.shutdown())
    await asyncio.gather(*drains)
    core.stop()
    log.info("Server stopped")


# TF Serving marks both services SERVING; "" is the whole server.
_HEALTH_SERVICES = ("", "ModelService", "PredictionService", "tensorflow.serving.ModelService",
                    "tensorflow.serving.PredictionService")


# With batching, a request thread waits for its batch; a batch can only grow as large as the
# number of requests waiting at once, so the request pools must not cap it.
_BATCHING_REQUEST_THREADS = 128


def _request_threads(configured: int, options: Options) -> int:
    return max(configured, _BATCHING_REQUEST_THREADS) if options.enable_batching else configured


def _channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """`--grpc_channel_arguments=k=v,k=v`: values that parse as int32 are ints, like TF Serving."""
    arguments = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            log.warning("Ignoring gRPC channel argument without '=': %s", item)
            continue
        try:
            number = int(value)
            arguments.append((key, number) if -(2**31) <= number < 2**31 else (key, value))
        except ValueError:
            arguments.append((key, value))
    return arguments


def _grpc_credentials(tls: config_protos.SSLConfig) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(tls.server_key.encode(), tls.server_cert.encode())],
        root_certificates=tls.custom_ca.encode() or None,
        require_client_auth=tls.client_verify)


def _rest_ssl_context(tls: config_protos.SSLConfig) -> ssl.SSLContext:
    """An SSLContext from PEM *contents*; ssl loads key pairs only from files, so they pass a private temp dir."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="pyserving-tls-") as folder:
        cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        for path, text in ((cert, tls.server_cert), (key, tls.server_key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
                handle.write(text)
        context.load_cert_chain(cert, key)
    if tls.custom_ca:
        context.load_verify_locations(cadata=tls.custom_ca)
    if tls.client_verify:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bind_grpc(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> None:
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"UNAVAILABLE: Failed to bind gRPC to {address}: {exc}") from None


async def _start_rest(options: Options, core: ServerCore, tls: config_protos.SSLConfig | None,
                      metrics_path: str | None) -> uvicorn.Server | None:
    if options.rest_api_port == options.port:
        log.error("server_options.http_port cannot be same as grpc_port. Please use a different port for "
                  "HTTP/REST API. Skipped exporting HTTP/REST API.")
        return None
    settings = RestSettings(options.rest_api_timeout_in_ms, options.rest_api_enable_cors_support,
                            options.rest_api_max_body_bytes, metrics_path)
    app = RestApi(core.dataplane, worker_pool(_request_threads(options.rest_api_num_threads, options), "rest"),
                  settings, core.readiness)
    protocol = type("RestProtocol", (_RestProtocol,), {"read_timeout_s": max(options.rest_api_read_timeout_seconds, 1)})
    config = uvicorn.Config(app, http=protocol, lifespan="off", access_log=False, log_config=None,
                            server_header=False, date_header=False, proxy_headers=False,
                            timeout_graceful_shutdown=max(options.shutdown_grace_period_seconds, 0))
    config.load()
    if tls is not None:
        config.ssl = _rest_ssl_context(tls)
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((options.host, options.rest_api_port))
    except OSError as exc:
        sock.close()
        log.error("Failed to start HTTP Server at localhost:%d (%s)", options.rest_api_port, exc)
        return None
    sock.listen(2048)
    sock.setblocking(False)
    server = uvicorn.Server(config)
    # Server.serve() would install its own signal handlers; we drive startup/shutdown
    # ourselves, so set up the (disabled) lifespan that serve() would have created.
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    log.info("Exporting HTTP/REST API at:localhost:%d ...", options.rest_api_port)
    return server


class _RestProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for receiving each whole request (headers and body),
    whose responses go out in one send().

    uvicorn times out idle keep-alive connections but not a client that sends half a
    request and goes quiet; such a client would hold its connection (and a file
    descriptor) forever. The deadline is armed when a connection opens and when a
    request begins, and cleared once the request is complete.
    """

    read_timeout_s = 30.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(_GatheringTransport(transport, self.loop))
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class _GatheringTransport:
    """A connection's transport whose writes within one loop iteration leave as one writev.

    uvicorn writes a response's head and its body separately, which costs a second
    send() syscall and a second wake-up of the client per response; on loopback that
    was about a tenth of the event loop's time per small predict.
    """

    __slots__ = ("_transport", "_loop", "_parts")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._parts:
            self._loop.call_soon(self._flush)
        self._parts.append(data)

    def writelines(self, parts) -> None:
        for data in parts:
            self.write(data)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def _flush(self) -> None:
        parts, self._parts = self._parts, []
        if parts and not self._transport.is_closing():
            self._transport.writelines(parts)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def _monitoring(options: Options) -> str | None:
    """The Prometheus path from `--monitoring_config_file`, or None when metrics are not exported."""
    if not options.monitoring_config_file:
        return None
    config = config_protos.parse_file(options.monitoring_config_file, config_protos.MonitoringConfig)
    if not config.prometheus_config.enable:
        return None
    return config.prometheus_config.path or metrics.DEFAULT_PATH


def _tls(options: Options) -> config_protos.SSLConfig | None:
    if not options.ssl_config_file:
        if options.rest_api_enable_ssl:
            raise StartupError("INVALID_ARGUMENT: --rest_api_enable_ssl needs --ssl_config_file")
        return None
    return config_protos.parse_file(options.ssl_config_file, config_protos.SSLConfig)


def run(options: Options) -> int:
    """Load, serve until SIGTERM/SIGINT; return the process exit code."""
    try:
        validate(options)
        metrics_path, tls = _monitoring(options), _tls(options)
        core = ServerCore(options)
        core.start(initial_configs(options))
    except (StartupError, ServingError) as exc:
        print(f"Failed to start server. Error: {exc}", flush=True)
        return 255
    # TensorFlow and the loaded graphs leave about a million long-lived objects; a full
    # collection walking them all paused serving for 100+ ms (p99 at 64 connections went
    # from 9 to 128 ms). Frozen, they are never scanned again.
    gc.collect()
    gc.freeze()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(_serve(options, core, tls, metrics_path))
        except StartupError as exc:
            print(f"Failed to start server. Error: {exc}", flush=True)
            return 255
    return 0
