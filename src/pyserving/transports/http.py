"""The HTTP transport: uvicorn (httptools, uvloop) serving a `Router` of ASGI apps mounted by path.

Protocols are plain ASGI apps; `Router` sends each request to the first route
whose path matches (TF Serving matches the still-encoded path with its query
string, so routes do too) and answers everything else with a fixed not-found
response. The transport adds what uvicorn lacks for a model server:
- a deadline for receiving a whole request (a client that sends half a request and
  goes quiet is disconnected);
- limits on the request head (bytes and header count; 431 past them), checked as
  the bytes arrive, so a client streaming an endless header costs nothing;
- a lingering close: when a response is sent before the request body was read
  (413), the rest of the body is read and discarded (bounded in bytes and time)
  so that the client reads the answer instead of a connection reset;
- a drain mode for shutdown: every response says `Connection: close`, so clients
  move to other replicas while the listener still accepts;
- one `writev` per response instead of one send for the head and one for the body.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = [
    "ASGIApp",
    "BodyTooLarge",
    "ClientGone",
    "HttpLimits",
    "Listener",
    "Router",
    "header",
    "read_body",
    "request_target",
    "respond",
    "ssl_context",
    "start",
]

log = logging.getLogger("pyserving")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP client may send: time for a whole request, and the size of its head."""

    read_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 100


# A lingering close reads and discards at most this much, for at most this long (nginx: 5 s).
_LINGER_BYTES = 256 * 1024 * 1024
_LINGER_S = 5.0
# When the listener closes, an idle connection may already carry a request the loop has not read yet
# (sent just before the close): it stays open this long, and a request that begins is answered.
_IDLE_CLOSE_GRACE_S = 1.0


class BodyTooLarge(Exception):
    """The request body is larger than the limit `read_body` was given."""


class ClientGone(Exception):
    """The client disconnected (or was disconnected) before sending the whole body."""


def request_target(scope: Scope) -> str:
    """The path as the client sent it (still percent-encoded), with `?query` if there is one."""
    path: str = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        path += "?" + scope["query_string"].decode("latin-1")
    return path


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a (lower-case) request header."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def read_body(receive: Receive, scope: Scope, limit: int) -> bytes:
    """The whole request body; `BodyTooLarge` past `limit` bytes (from Content-Length, before reading)."""
    length = header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge()
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes, headers: Headers) -> None:
    """A whole response with its Content-Length."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class _Route:
    pattern: re.Pattern[str]
    app: ASGIApp
    methods: frozenset[str] | None


class Router:
    """An ASGI app that dispatches by path to mounted apps, in mount order."""

    def __init__(self, not_found: tuple[int, bytes, Headers]) -> None:
        self._routes: list[_Route] = []
        self._not_found = not_found

    def route(self, path: str, app: ASGIApp, methods: Iterable[str] | None = None) -> None:
        """`app` answers exactly `path` (query included), for `methods` (all if None)."""
        self._routes.append(_Route(re.compile(re.escape(path)), app, frozenset(methods) if methods else None))

    def mount(self, prefix: str, app: ASGIApp, ignore_case: bool = False) -> None:
        """`app` answers every path that starts with `prefix`."""
        pattern = re.compile(("(?i)" if ignore_case else "") + re.escape(prefix) + ".*")
        self._routes.append(_Route(pattern, app, None))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        target = request_target(scope)
        method = scope["method"]
        for route in self._routes:
            if route.pattern.fullmatch(target) and (route.methods is None or method in route.methods):
                await route.app(scope, receive, send)
                return
        await respond(send, *self._not_found)


def ssl_context(cert_pem: str, key_pem: str, ca_pem: str = "", client_verify: bool = False) -> ssl.SSLContext:
    """A server SSLContext from PEM *contents*; ssl loads key pairs only from files, so they pass a private
    temp dir. With `client_verify`, clients must present a certificate signed by `ca_pem` (mTLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="pyserving-tls-") as folder:
        cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        for path, text in ((cert, cert_pem), (key, key_pem)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
                handle.write(text)
        context.load_cert_chain(cert, key)
    if ca_pem:
        context.load_verify_locations(cadata=ca_pem)
    if client_verify:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass
class Listener:
    """A running HTTP listener; `drain` before `stop` to hand clients over gracefully."""

    server: uvicorn.Server
    _protocol: type[_HttpProtocol]
    _socket: socket.socket

    def drain(self) -> None:
        """From now on every response closes its connection (the listener still accepts)."""
        self._protocol.draining = True

    async def stop(self) -> None:
        """Refuse new connections, let in-flight requests finish (within the grace period), close.

        Closing a listening socket resets the connections still in its accept queue, whose clients have
        already sent their requests. So first the socket drops every new SYN (a socket filter; the
        client retries and then finds the port closed), the loop accepts what is queued, then it closes."""
        if _drop_new_connections(self._socket):
            await asyncio.sleep(_ACCEPT_QUEUE_DRAIN_S)
        self.server.should_exit = True
        await self.server.shutdown()


# Time for the loop to accept the connections already queued when the listener stops taking new ones.
_ACCEPT_QUEUE_DRAIN_S = 0.05
# A classic BPF program of one instruction, "return 0": every packet to the socket is dropped.
_SO_ATTACH_FILTER = 26
_DROP_ALL = (ctypes.c_uint16 * 4)(0x06, 0, 0, 0)  # code BPF_RET|BPF_K, jt, jf, k (two u16 stand for k=0)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.c_void_p)]


def _drop_new_connections(sock: socket.socket) -> bool:
    """Make a listening socket drop new connection attempts (Linux); False where that is not possible."""
    program = _SockFprog(1, ctypes.addressof(_DROP_ALL))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(program))
    except OSError:
        return False
    return True


async def start(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    limits: HttpLimits,
    grace_s: float,
    tls: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> Listener:
    """Serve `app` on host:port; `OSError` if the port cannot be bound. `reuse_port`: SO_REUSEPORT, so that
    several processes (`--num_workers`) accept on the port, the kernel spreading connections among them."""
    protocol = type("HttpProtocol", (_HttpProtocol,), {"limits": limits, "draining": False})
    config = uvicorn.Config(
        app,
        http=protocol,
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=int(grace_s),
    )
    config.load()
    if tls is not None:
        config.ssl = tls
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.setblocking(False)
    server = uvicorn.Server(config)
    # Server.serve() would install its own signal handlers; the caller drives start-up and shutdown,
    # so set up the (disabled) lifespan that serve() would have created.
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    return Listener(server, protocol, sock)


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of `HttpLimits`, a lingering close, a drain mode,
    and responses that go out in one send().

    uvicorn times out idle keep-alive connections but not a client that sends half a
    request and goes quiet; such a client would hold its connection (and a file
    descriptor) forever. The deadline is armed when a connection opens and when a
    request begins, and cleared once the request is complete.

    httptools limits neither the size nor the number of headers, and it joins a
    header's pieces as they arrive (quadratic in the header's size), so the head is
    measured in `data_received`, before the parser sees the bytes.
    """

    limits = HttpLimits()
    draining = False
    _deadline: asyncio.TimerHandle | None = None
    _in_head = True  # between the start of a request and the end of its headers
    _head_bytes = 0  # bytes received while in the head (they may include the start of the body)
    _header_bytes = 0
    _header_count = 0
    _head_too_large = False
    _request_complete = True
    _discarded: int | None = None  # bytes discarded while lingering; None when not lingering
    _closing = False  # the listener closed (shutdown)
    _gathering: _GatheringTransport  # self.transport, typed as what it is

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._gathering = _GatheringTransport(transport, self.loop, self)
        super().connection_made(self._gathering)  # type: ignore[arg-type]
        self._arm()

    @property
    def lingering(self) -> bool:
        return self._discarded is not None

    def data_received(self, data: bytes) -> None:
        if self._discarded is not None:
            self._discarded += len(data)
            if self._discarded > _LINGER_BYTES:
                self._close_now()
            return
        if self._in_head:
            if self._head_bytes > self.limits.max_header_bytes:
                # The head received before this piece is already over the limit: answer without
                # feeding the parser any more of it.
                self._reject_head()
                return
            self._head_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_complete = False
        self._arm()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4  # "name: value\r\n"
        if self._header_count > self.limits.max_header_count or self._header_bytes > self.limits.max_header_bytes:
            self._head_too_large = True
            raise _HeadTooLarge()  # stops the parser; uvicorn answers through send_400_response
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        if (self.draining or self._closing) and self.cycle is not None:
            self.cycle.keep_alive = False

    def shutdown(self) -> None:
        """The listener closed: finish the request in progress, then close; an idle connection closes
        after a short grace, unless a request arrives on it (then it is answered, then closed)."""
        if self.cycle is not None and not self.cycle.response_complete:
            super().shutdown()
            return
        if self._closing or self.transport.is_closing():
            return
        self._closing = True
        self._disarm()
        self._deadline = self.loop.call_later(_IDLE_CLOSE_GRACE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:
            if self._request_complete:
                self.transport.close()
            else:  # a request has begun but its head is incomplete: the read deadline closes it
                self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        self._request_complete = True
        self._in_head, self._head_bytes, self._header_bytes, self._header_count = True, 0, 0, 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._reject_head()
        else:
            super().send_400_response(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _reject_head(self) -> None:
        """431, then a lingering close (the client may still be sending its head)."""
        limits = self.limits
        log.warning(
            "Request head over the limit of %d bytes or %d headers", limits.max_header_bytes, limits.max_header_count
        )
        body = orjson.dumps(
            {
                "error": f"Request header fields exceed the limit of {limits.max_header_bytes} bytes "
                f"or {limits.max_header_count} headers"
            }
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()

    def linger(self) -> bool:
        """Called by the transport on close: if the request was not read to its end, keep reading and
        discarding it (bounded) so that the client receives the answer already written. True if lingering."""
        if self._request_complete or self.lingering:
            return False
        self._discarded = 0
        self._disarm()
        self._deadline = self.loop.call_later(_LINGER_S, self._close_now)
        self.flow.resume_reading()
        return True

    def _close_now(self) -> None:
        self._disarm()
        self._gathering.close_now()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class _HeadTooLarge(Exception):
    pass


class _GatheringTransport:
    """A connection's transport whose writes within one loop iteration leave as one writev.

    uvicorn writes a response's head and its body separately, which costs a second
    send() syscall and a second wake-up of the client per response; on loopback that
    was about a tenth of the event loop's time per small predict.
    """

    __slots__ = ("_transport", "_loop", "_parts", "_protocol")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, protocol: _HttpProtocol) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: list[bytes] = []
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._parts:
            self._loop.call_soon(self._flush)
        self._parts.append(data)

    def writelines(self, parts: Iterable[bytes]) -> None:
        for data in parts:
            self.write(data)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        """Close, or (when the request was not read to its end) half-close and linger."""
        self._flush()
        if self._protocol.lingering:
            return
        if self._protocol.linger():
            if self._transport.can_write_eof():
                self._transport.write_eof()
            return
        self._transport.close()

    def close_now(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def _flush(self) -> None:
        parts, self._parts = self._parts, []
        if parts and not self._transport.is_closing():
            self._transport.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
