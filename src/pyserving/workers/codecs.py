"""Codec processes: big REST bodies are parsed, and big answers written, in a child process, not under this
process's GIL.

orjson and simdjson hold the GIL for the whole parse (about 10 ms per MiB of JSON here), and writing a big
answer holds it as long, so a big body handled on a worker thread stalls the event loop, and every other
client, for as long. `CodecProcesses` sends such work to a child (`python -m pyserving.workers codec FD`) that
runs a codec function and sends the result back as a `wire` frame: bodies and arrays go both ways through
shared-memory files (no copy under the GIL on this side), so what costs the size of the body runs in the child.

A child is started at the first big body or answer (about 70 MiB: numpy, orjson, simdjson, TensorFlow's protos
only), serves one call at a time, and exits when its socket closes: at once when this process ends, however
it ends, or when it next answers if it was busy (no parent-death signal, so that it removes its
shared-memory folder). A child that dies in a call (killed for memory by a hostile body) fails that call with
RESOURCE_EXHAUSTED; the next big body starts another. Both ends are this server's own code: the child
unpickles only what this process sent, and this process what its own child built.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from pyserving.concurrency import run_sync
from pyserving.errors import Code, ServingError
from pyserving.workers import wire

__all__ = ["CodecProcesses", "serve"]

log = logging.getLogger("pyserving")

_DIR_PREFIX = "pyserving-codec-"
_START_TIMEOUT_S = 120.0


class _Child:
    """One codec process and the stream to it."""

    def __init__(self, process: subprocess.Popen[bytes], reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.process = process
        self.reader = reader
        self.writer = writer
        self.shm_dir = ""

    def close(self) -> None:
        self.writer.close()


class CodecProcesses:
    """Up to `count` codec processes for the bodies of at least `min_bytes` bytes (0: none, all in this process)."""

    def __init__(self, count: int, min_bytes: int, pool: Executor) -> None:
        self._count = max(count, 0)
        self._min_bytes = min_bytes
        self._pool = pool  # where frames are written and read (file writes, not loop work)
        self._slots = asyncio.Semaphore(max(self._count, 1))  # a call holds one from its child's choice to its end
        self._idle: list[_Child] = []

    def wanted(self, size: int) -> bool:
        """Whether a body (or answer) of `size` bytes is handled in a codec process."""
        return self._count > 0 and self._min_bytes > 0 and size >= self._min_bytes

    async def run(self, function: str, *args: Any) -> Any:
        """`function(*args)` in a codec process (`function` is "module:name"); its ServingError is raised here.
        The call goes on if the caller is cancelled, so that the child's answer is read and it serves again.
        """
        exchange = asyncio.ensure_future(self._exchange(function, _out_of_band(args)))
        exchange.add_done_callback(_retrieve)  # a cancelled caller's error is nobody's to log
        return await asyncio.shield(exchange)

    async def _exchange(self, function: str, args: tuple[Any, ...]) -> Any:
        child = await self._acquire()
        try:
            parts = await run_sync(self._pool, wire.encode, (wire.REQUEST, 0, function, args), child.shm_dir)
        except BaseException:  # nothing was sent: the child is still in step
            self._release(child)
            raise
        try:
            child.writer.writelines(parts)
            await child.writer.drain()
            frame = await wire.read_frame(child.reader)
            if frame is None:
                raise ConnectionResetError("the codec process closed its socket")
        except Exception as exc:  # out of step with the child (or it died): it goes
            self._slots.release()
            raise await self._died(child, exc) from None
        self._release(child)
        kind, _, result = await wire.decode_sized(self._pool, frame, child.shm_dir)
        if kind == wire.ERROR:
            wire.raise_error(result)
        return result

    async def _acquire(self) -> _Child:
        """An idle child, or a new one while fewer than `count` are alive; else wait for a call to end."""
        await self._slots.acquire()
        try:
            return self._idle.pop() if self._idle else await self._start()
        except BaseException:
            self._slots.release()
            raise

    def _release(self, child: _Child) -> None:
        self._idle.append(child)
        self._slots.release()

    async def _start(self) -> _Child:
        """A new child, once it said it is ready (its shared-memory folder)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "pyserving.workers", "codec", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        child = _Child(process, reader, writer)
        try:
            frame = await asyncio.wait_for(wire.read_frame(reader), _START_TIMEOUT_S)
            if frame is None:
                raise ConnectionResetError("the codec process exited while starting")
            child.shm_dir = wire.decode(frame, "")[2]
        except (OSError, EOFError, TimeoutError) as exc:
            raise await self._died(child, exc) from None
        log.info("Started codec process %d for REST bodies and answers from %d bytes", process.pid, self._min_bytes)
        return child

    async def _died(self, child: _Child, exc: BaseException) -> ServingError:
        """Stop and forget a child whose stream broke (the next call starts another); the error its call answers."""
        child.close()
        if child.process.poll() is None:
            child.process.kill()
        code = await run_sync(self._pool, child.process.wait)
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        log.warning("Codec process %d stopped (%s; %s); the next big body starts another", child.process.pid, how, exc)
        if child.shm_dir:
            shutil.rmtree(child.shm_dir, ignore_errors=True)
        return ServingError(
            Code.RESOURCE_EXHAUSTED, f"The request could not be handled: its codec process stopped ({how})"
        )


def serve(fd: int) -> int:
    """A codec process's life: say ready, then answer calls until the parent closes the socket."""
    connection = socket.socket(fileno=fd)
    shm = "/dev/shm"
    shm_dir = tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=shm if os.access(shm, os.W_OK) else tempfile.gettempdir())
    # Signals sent to the whole group (Ctrl-C, systemd's stop) are the serving process's to handle: it may still
    # be draining calls that need this process, which exits when the serving process closes the socket.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    try:
        _send(connection, (wire.REPLY, 0, shm_dir), "")
        while (frame := wire.read_frame_blocking(connection)) is not None:
            _, call_id, function, args = wire.decode(frame, shm_dir)
            try:
                reply = (wire.REPLY, call_id, _out_of_band(_function(function)(*args)))
            except Exception as exc:
                if not isinstance(exc, ServingError):
                    log.exception("Unexpected error in %s", function)
                reply = wire.error_reply(call_id, exc)
            del frame, args  # the body's mapping goes before the next call's arrives
            _send(connection, reply, shm_dir)
    except ConnectionError:
        pass
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
    return 0


def _send(connection: socket.socket, message: Any, shm_dir: str) -> None:
    try:
        parts = wire.encode(message, shm_dir)
    except Exception as exc:  # e.g. too big for a frame: the caller gets an error, not silence
        if not isinstance(exc, ServingError):
            log.exception("Unexpected error sending a codec result")
        parts = wire.encode(wire.error_reply(message[1], exc), shm_dir)
    connection.sendall(b"".join(parts))


def _function(name: str) -> Callable[..., Any]:
    module, _, attribute = name.partition(":")
    function: Callable[..., Any] = getattr(importlib.import_module(module), attribute)
    return function


def _out_of_band(value: Any) -> Any:
    """`value` with its big bytes (a body, an encoded answer) marked to travel apart, through shared memory;
    they arrive as memoryviews."""
    if isinstance(value, tuple):
        return tuple(_out_of_band(v) for v in value)
    if isinstance(value, (bytes, bytearray)) and len(value) >= wire.SHM_THRESHOLD:
        return pickle.PickleBuffer(value)
    return value


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
