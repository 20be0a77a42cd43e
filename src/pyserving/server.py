"""Server lifecycle: load the initial models, then open gRPC and REST, serve until a signal.

Order follows TF Serving: every initial model is loaded (or has failed, which
aborts start-up) before any port opens, then gRPC starts, then REST. On SIGTERM
or SIGINT the listeners stop accepting, in-flight requests finish, models are
unloaded and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import grpc
import uvicorn
import uvloop

from pyserving import grpc_api
from pyserving.concurrency import worker_pool
from pyserving.dataplane import DataPlane
from pyserving.errors import ServingError
from pyserving.flags import Options
from pyserving.rest_api import RestApi
from pyserving.server_core import ServerCore, initial_configs

log = logging.getLogger("pyserving")

_MAX_MESSAGE_BYTES = 2**31 - 1
_SHUTDOWN_GRACE_S = 30.0


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


async def _serve(options: Options, core: ServerCore) -> None:
    dataplane = core.dataplane
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    grpc_server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ])
    grpc_api.add_services(grpc_server, core, worker_pool(options.grpc_max_threads, "grpc"),
                          options.enable_serialization_as_tensor_content)
    if options.port:
        _bind_grpc(grpc_server, f"{_grpc_host(options.host)}:{options.port}")
    if options.grpc_socket_path:
        _bind_grpc(grpc_server, f"unix:{options.grpc_socket_path}")
    await grpc_server.start()
    if options.port:
        log.info("Running gRPC ModelServer at %s:%d ...", options.host, options.port)
    if options.grpc_socket_path:
        log.info("Running gRPC ModelServer at UNIX socket %s ...", options.grpc_socket_path)

    rest_server = None
    if options.rest_api_port:
        rest_server = await _start_rest(options, dataplane)

    await stop.wait()
    log.info("Received shutdown signal; draining in-flight requests")
    if rest_server is not None:
        rest_server.should_exit = True
        await rest_server.shutdown()
    await grpc_server.stop(_SHUTDOWN_GRACE_S)
    core.stop()
    log.info("Server stopped")


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bind_grpc(server: grpc.aio.Server, address: str) -> None:
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"UNAVAILABLE: Failed to bind gRPC to {address}: {exc}") from None


async def _start_rest(options: Options, dataplane: DataPlane) -> uvicorn.Server | None:
    if options.rest_api_port == options.port:
        log.error("server_options.http_port cannot be same as grpc_port. Please use a different port for "
                  "HTTP/REST API. Skipped exporting HTTP/REST API.")
        return None
    app = RestApi(dataplane, worker_pool(options.rest_api_num_threads, "rest"), options.rest_api_timeout_in_ms)
    config = uvicorn.Config(app, http="httptools", lifespan="off", access_log=False, log_config=None,
                            server_header=False, date_header=False, timeout_graceful_shutdown=_SHUTDOWN_GRACE_S)
    config.load()
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


def run(options: Options) -> int:
    """Load, serve until SIGTERM/SIGINT; return the process exit code."""
    try:
        validate(options)
        core = ServerCore(options)
        core.start(initial_configs(options))
    except (StartupError, ServingError) as exc:
        print(f"Failed to start server. Error: {exc}", flush=True)
        return 255
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(_serve(options, core))
        except StartupError as exc:
            print(f"Failed to start server. Error: {exc}", flush=True)
            return 255
    return 0
