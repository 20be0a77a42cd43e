"""What every benchmark needs: free loopback ports and a pyserving subprocess it starts and stops."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("server did not start")


@contextlib.contextmanager
def running(command: list[str], port: int, log_path, cwd, timeout: float = 180) -> Iterator[subprocess.Popen]:
    """Start `command` (output to `log_path`), wait until it listens on `port`; terminate it at exit."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            wait_for_port(port, proc, timeout=timeout)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def pyserving(*flags: str) -> Iterator[tuple[subprocess.Popen, int, int]]:
    """Start pyserving on 127.0.0.1 with `flags`; yield (process, grpc_port, rest_port); SIGTERM at exit."""
    grpc_port, rest_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyserving",
            "--host=127.0.0.1",
            f"--port={grpc_port}",
            f"--rest_api_port={rest_port}",
            "--shutdown_delay_seconds=0",
            *flags,
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(grpc_port, proc)
        wait_for_port(rest_port, proc)
        yield proc, grpc_port, rest_port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
