"""Fixtures that start the real server as a subprocess on free loopback ports."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import helpers
import pytest
from helpers import Server


class _Started:
    """The servers `start_server` started, and which of them live for the whole session."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.session_lived: set[int] = set()

    def stop(self, servers: list[Server]) -> None:
        """Stop `servers`, signalled all at once (each takes about a second to drain and exit)."""
        for server in servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in servers:
            server.stop()
        self.servers = [server for server in self.servers if server not in servers]


@pytest.fixture(scope="session")
def _started():
    started = _Started()
    yield started
    started.stop(list(started.servers))


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, _started):
    """Factory: start_server(*flags) -> ready Server. A server stops when the test module that started it
    ends (`session_lived`: at the end of the session)."""

    def start(*args: str, ready: bool = True, rest: bool = True, session_lived: bool = False) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = Server(*args, log_path=log, rest=rest)
        _started.servers.append(server)
        if session_lived:
            _started.session_lived.add(id(server))
        return server.wait_ready() if ready else server

    return start


@pytest.fixture(scope="module", autouse=True)
def _stop_the_modules_servers(_started):
    """Each module's servers stop when it ends (its own fixtures' teardowns run first), so the tier holds
    one module's servers at a time rather than every server it started (about 250 MB each)."""
    yield
    _started.stop([server for server in _started.servers if id(server) not in _started.session_lived])


@pytest.fixture(scope="session")
def half_plus_two(start_server) -> Server:
    return start_server("--model_name=half_plus_two", f"--model_base_path={helpers.HALF_PLUS_TWO}", session_lived=True)


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
