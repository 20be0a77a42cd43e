"""Fixtures that start the real server as a subprocess on free loopback ports."""

from __future__ import annotations

import shutil
from pathlib import Path

import helpers
import pytest
from helpers import Server


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory: start_server(*flags) -> ready Server; every server is stopped at the end."""
    servers: list[Server] = []

    def start(*args: str, ready: bool = True, rest: bool = True) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = Server(*args, log_path=log, rest=rest)
        servers.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def half_plus_two(start_server) -> Server:
    return start_server("--model_name=half_plus_two", f"--model_base_path={helpers.HALF_PLUS_TWO}")


@pytest.fixture()
def model_copy(tmp_path):
    """copy(src_model_dir) -> a private base path the test may change."""

    def copy(source: Path, name: str = "model") -> Path:
        target = tmp_path / name
        shutil.copytree(source, target)
        return target

    return copy


@pytest.fixture(scope="module")
def http(server):
    """tritonclient's HTTP client (V2) on the `server` fixture of the requesting module."""
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(server.rest.removeprefix("http://"), network_timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server):
    """tritonclient's gRPC client (V2) on the `server` fixture of the requesting module."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc) as client:
        yield client
