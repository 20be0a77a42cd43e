"""The HTTP transport's limits: request heads (431), oversized bodies (a 413 the client reads), and
hostile clients that must not delay anyone else, REST or gRPC."""

from __future__ import annotations

import socket
import statistics
import threading
import time

import pytest
import requests
from helpers import HALF_PLUS_TWO, call_latencies, post

PREDICT = "/v1/models/half_plus_two:predict"
HEAD_ERROR = {"error": "Request header fields exceed the limit of 65536 bytes or 100 headers"}
HEAD_ERROR_BYTES = b'{"error":"Request header fields exceed the limit of 65536 bytes or 100 headers"}'


def _exchange(port: int, head: bytes, timeout: float = 10) -> bytes:
    """Send `head` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return response


def _status_and_body(response: bytes) -> tuple[bytes, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


def test_a_one_mib_header_gets_431(half_plus_two):
    r = requests.get(half_plus_two.rest + "/v1/models/half_plus_two", headers={"X-Big": "a" * 1024 * 1024}, timeout=10)
    assert (r.status_code, r.json(), r.headers["connection"]) == (431, HEAD_ERROR, "close")
    assert post(half_plus_two.rest + PREDICT, {"instances": [1.0]}).json() == {"predictions": [2.5]}


@pytest.mark.parametrize(
    "count, status", [(98, b"HTTP/1.1 200 OK"), (99, b"HTTP/1.1 431 Request Header Fields Too Large")]
)
def test_header_count_limit(half_plus_two, count, status):
    # With Host and Connection, `count` more headers make count + 2: 100 is the limit.
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(count))
    head = b"GET /v1/models/half_plus_two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"
    status_line, _ = _status_and_body(_exchange(half_plus_two.rest_port, head))
    assert status_line == status


def test_ten_thousand_headers_get_431(half_plus_two):
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(10_000))
    response = _exchange(
        half_plus_two.rest_port, b"GET /v1/models/half_plus_two HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    )
    status_line, body = _status_and_body(response)
    assert (status_line, body) == (b"HTTP/1.1 431 Request Header Fields Too Large", HEAD_ERROR_BYTES)


def test_header_limits_are_flags(start_server):
    server = start_server(
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        "--rest_api_max_header_bytes=2048",
        "--rest_api_max_header_count=10",
    )
    url = server.rest + "/v1/models/half_plus_two"
    r = requests.get(url, headers={"X-Big": "a" * 3000}, timeout=10)
    assert (r.status_code, r.json()) == (
        431,
        {"error": "Request header fields exceed the limit of 2048 bytes or 10 headers"},
    )
    assert requests.get(url, headers={"X-Big": "a" * 1500}, timeout=10).status_code == 200
    # requests sends 5 headers of its own (Host, User-Agent, Accept-Encoding, Accept, Connection).
    assert requests.get(url, headers={f"X-{i}": "v" for i in range(5)}, timeout=10).status_code == 200
    assert requests.get(url, headers={f"X-{i}": "v" for i in range(6)}, timeout=10).status_code == 431


def _stream_a_header_forever(port: int, stop: threading.Event, outcome: dict) -> None:
    """A client that sends an endless header value (16 MB/s at most, so that the client itself does not
    take the machine's cores from the server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models/half_plus_two HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent, piece = 0, b"a" * 16384
        try:
            while not stop.is_set():
                sock.sendall(piece)
                sent += len(piece)
                time.sleep(0.001)
        except OSError:
            pass  # the server answered and closed
        outcome["sent"] = sent
        try:
            sock.settimeout(2)
            outcome["answer"] = sock.recv(4096)
        except OSError as exc:
            outcome["answer"] = repr(exc)


def test_an_endless_header_delays_neither_rest_nor_grpc(half_plus_two):
    """A client streaming a header value (it used to freeze every client for seconds) gets its 431, and
    concurrent REST and gRPC calls stay fast throughout."""

    def latencies(seconds: float) -> tuple[list[float], list[float]]:
        end = time.monotonic() + seconds
        return call_latencies(half_plus_two, lambda: time.monotonic() >= end)

    quiet_rest, quiet_grpc = latencies(1.5)
    stop, outcomes = threading.Event(), [{}, {}]
    attackers = [
        threading.Thread(target=_stream_a_header_forever, args=(half_plus_two.rest_port, stop, outcome))
        for outcome in outcomes
    ]
    for attacker in attackers:
        attacker.start()
    try:
        busy_rest, busy_grpc = latencies(3)
    finally:
        stop.set()
        for attacker in attackers:
            attacker.join(30)
    for outcome in outcomes:
        assert outcome["answer"].startswith(b"HTTP/1.1 431 "), outcome
    # The worst call under attack stays within a few milliseconds of the quiet ones (2-core machine: 50 ms).
    assert max(busy_rest) < max(quiet_rest) + 0.05, (statistics.median(busy_rest), max(busy_rest), max(quiet_rest))
    assert max(busy_grpc) < max(quiet_grpc) + 0.05, (statistics.median(busy_grpc), max(busy_grpc), max(quiet_grpc))


@pytest.mark.parametrize("limit, size", [(1_000_000, 1_000_005), (64 * 1024 * 1024, 64 * 1024 * 1024 + 5)])
def test_the_client_reads_the_413_of_a_body_it_is_still_sending(start_server, limit, size):
    """The server answers 413 from Content-Length and discards the rest, so the client (which sends the
    whole body before reading) gets the answer instead of a connection reset."""
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", f"--rest_api_max_body_bytes={limit}"
    )
    r = requests.post(server.rest + PREDICT, data=b" " * size, timeout=60)
    assert (r.status_code, r.json()) == (413, {"error": f"Request body exceeds the limit of {limit} bytes"})
    assert post(server.rest + PREDICT, {"instances": [1.0]}).json() == {"predictions": [2.5]}
