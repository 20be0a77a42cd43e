"""Server lifecycle: load the initial models, then open gRPC and REST, serve until a signal.

Order follows TF Serving: every initial model is loaded (or has failed, which
aborts start-up) before any port opens, then gRPC starts, then REST. On SIGTERM
or SIGINT the listeners stop accepting, in-flight requests finish, models are
unloaded and the process exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import time
from dataclasses import dataclass

import grpc
import uvicorn
import uvloop

from pyserving import grpc_api
from pyserving.concurrency import worker_pool
from pyserving.dataplane import DataPlane
from pyserving.errors import ServingError
from pyserving.flags import Options
from pyserving.manager import ModelManager, RetryPolicy, State
from pyserving.rest_api import RestApi
from pyserving.runtimes.tf_saved_model import SavedModelServable, session_config
from pyserving.sources import VersionPolicy, aspired_versions, list_versions

log = logging.getLogger("pyserving")

_MAX_MESSAGE_BYTES = 2**31 - 1
_SHUTDOWN_GRACE_S = 30.0


class StartupError(Exception):
    """A start-up failure: printed as `Failed to start server. Error: ...`, exit 255."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    base_path: str
    policy: VersionPolicy = VersionPolicy()


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


def model_configs(options: Options) -> list[ModelConfig]:
    log.info("Building single TensorFlow model file config:  model_name: %s model_base_path: %s",
             options.model_name, options.model_base_path)
    return [ModelConfig(options.model_name, options.model_base_path)]


def _wait_for_versions(config: ModelConfig, poll_wait_s: int) -> dict[int, str]:
    """Poll the base path until it holds a version folder (TF Serving waits forever too)."""
    while True:
        found = list_versions(config.name, config.base_path)
        if found:
            return found
        if poll_wait_s <= 0:
            raise StartupError(
                f"NOT_FOUND: No versions of servable {config.name} found under base path {config.base_path} "
                "and --file_system_poll_wait_seconds does not poll again.")
        time.sleep(poll_wait_s)


def load_initial_models(manager: ModelManager, options: Options) -> None:
    intra, inter = options.parallelism()
    loader = functools.partial(SavedModelServable, tags=options.saved_model_tag_list(),
                               config=session_config(intra, inter))
    failures: list[tuple[str, int, ServingError]] = []
    for config in model_configs(options):
        manager.add_model(config.name)
        found = _wait_for_versions(config, options.file_system_poll_wait_seconds)
        for version in aspired_versions(found, config.policy):
            status = manager.load(config.name, version, found[version], loader)
            if status.state != State.AVAILABLE:
                failures.append((config.name, version, status.error))
    if failures:
        details = "".join(f"{{name: {n} version: {v}}} due to error: {e}, " for n, v, e in failures)
        raise StartupError(f"UNKNOWN: {len(failures)} servable(s) did not become available: {{{details}}}")


async def _serve(options: Options, manager: ModelManager) -> None:
    dataplane = DataPlane(manager, options.enable_signature_method_name_check)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    grpc_server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ])
    grpc_api.add_services(grpc_server, dataplane, worker_pool(options.grpc_max_threads, "grpc"),
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
    manager.unload_all()
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
        manager = ModelManager(RetryPolicy(options.max_num_load_retries,
                                           max(options.load_retry_interval_micros, 0) / 1e6))
        load_initial_models(manager, options)
    except StartupError as exc:
        print(f"Failed to start server. Error: {exc}", flush=True)
        return 255
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(_serve(options, manager))
        except StartupError as exc:
            print(f"Failed to start server. Error: {exc}", flush=True)
            return 255
    return 0
