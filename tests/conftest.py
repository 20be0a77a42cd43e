"""Fixtures that start the real server as a subprocess on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "tf_serving"
if not TESTDATA.is_dir():  # a checkout whose shared/ sits elsewhere can point at it
    TESTDATA = Path(os.environ.get("PYSERVING_TESTDATA", TESTDATA))
HALF_PLUS_TWO = TESTDATA / "saved_model_half_plus_two_cpu"
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Server:
    """A pyserving process; `rest` is its base URL, `grpc` its gRPC target."""

    def __init__(self, *args: str, log_path: Path, rest: bool = True) -> None:
        grpc_port, rest_port = free_port(), free_port() if rest else 0
        command = [sys.executable, "-m", "pyserving", "--host=127.0.0.1", f"--port={grpc_port}",
                   f"--rest_api_port={rest_port}", *args]
        log = open(log_path, "wb")
        self._attach(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), grpc_port, rest_port,
                     log_path, log)

    @classmethod
    def attach(cls, proc: subprocess.Popen, grpc_port: int, rest_port: int, log_path: Path) -> "Server":
        """A Server for a process started some other way (e.g. through the container entrypoint)."""
        server = cls.__new__(cls)
        server._attach(proc, grpc_port, rest_port, log_path, None)
        return server

    def _attach(self, proc, grpc_port: int, rest_port: int, log_path: Path, log) -> None:
        self.proc, self.grpc_port, self.rest_port, self.log_path, self._log = proc, grpc_port, rest_port, log_path, log
        self.rest = f"http://127.0.0.1:{rest_port}"
        self.grpc = f"127.0.0.1:{grpc_port}"

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "Server":
        deadline = time.monotonic() + timeout
        ports = [self.grpc_port] + ([self.rest_port] if self.rest_port else [])
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if all(_port_open(p) for p in ports):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        return self.proc.returncode


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
    return start_server("--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}")


@pytest.fixture()
def model_copy(tmp_path):
    """copy(src_model_dir) -> a private base path the test may change."""
    def copy(source: Path, name: str = "model") -> Path:
        target = tmp_path / name
        shutil.copytree(source, target)
        return target
    return copy


def predict_request(name="half_plus_two", values=(1.0, 2.0, 5.0), **spec) -> predict_pb2.PredictRequest:
    """A half_plus_two-style PredictRequest: `values` as x [n, 1]; spec keys: version, version_label, ..."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array(values, np.float32).reshape(-1, 1)))
    return request


def post(url: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else __import__("json").dumps(body)
    return requests.post(url, data=data, timeout=30, **kwargs)
