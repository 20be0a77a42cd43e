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
import fcntl
import glob
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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyserving.concurrency import run_sync
from pyserving.errors import Code, ServingError
from pyserving.workers import wire

__all__ = ["CodecProcesses", "serve"]

log = logging.getLogger("pyserving")

_DIR_PREFIX = "pyserving-codec-"
_LOCK = ".lock"
_START_TIMEOUT_S = 120.0
_RETRY_S = 60  # after a failed start, how long big bodies stay in the serving process
_STREAM_LIMIT = 2**20  # frames come inline (two copies on the loop) only when /dev/shm is full


class _Child:
    """One codec process and the stream to it."""

    def __init__(self, process: subprocess.Popen[bytes], reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.process = process
        self.reader = reader
        self.writer = writer
        self.shm_dir = ""

    def alive(self) -> bool:
        return self.process.poll() is None and not self.reader.at_eof()

    def stop(self) -> None:
        """Close the stream and kill the process (no wait: `reap` waits)."""
        self.writer.close()
        if self.process.poll() is None:
            self.process.kill()

    def reap(self) -> int:
        """Wait for the stopped process; remove its folder (a killed child cannot); its exit code."""
        code = self.process.wait()
        if self.shm_dir:
            shutil.rmtree(self.shm_dir, ignore_errors=True)
        return code


class CodecProcesses:
    """Up to `count` codec processes for the bodies of at least `min_bytes` bytes (0: none, all in this process)."""

    def __init__(self, count: int, min_bytes: int) -> None:
        self._count = max(count, 0)
        self._min_bytes = min_bytes
        # Frames are written and read (file writes and maps) on threads of their own, not on the REST pool, so
        # that a child never waits for a pool busy with session calls.
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="codec")
        self._slots = asyncio.Semaphore(max(self._count, 1))  # a call holds one from its child's choice to its end
        self._idle: list[_Child] = []
        self._unavailable_until = 0.0  # a child could not start: big bodies stay in this process until then

    def wanted(self, size: int) -> bool:
        """Whether a body (or answer) of `size` bytes is handled in a codec process."""
        return (
            self._count > 0
            and 0 < self._min_bytes <= size
            and (not self._unavailable_until or time.monotonic() >= self._unavailable_until)
        )

    async def run(self, function: str, *args: Any) -> Any:
        """`function(*args)` in a codec process (`function` is "module:name"); its ServingError is raised here.
        The call goes on if the caller is cancelled, so that the child's answer is read and it serves again.
        If no child can start, the call runs here (on a thread) and big bodies stay here for a minute.
        """
        exchange = asyncio.ensure_future(self._exchange(function, args))
        exchange.add_done_callback(_retrieve)  # a cancelled caller's error is nobody's to log
        return await asyncio.shield(exchange)

    async def close(self) -> None:
        """Stop the idle children (each exits once its socket closes, removing its folder)."""
        children, self._idle = self._idle, []
        for child in children:
            child.writer.close()
        for child in children:
            await run_sync(self._pool, child.reap)

    async def _exchange(self, function: str, args: tuple[Any, ...]) -> Any:
        try:
            child = await self._acquire()
        except _CannotStart:
            return await run_sync(self._pool, _function(function), *args)
        try:
            message = (wire.REQUEST, 0, function, _out_of_band(args))
            parts = await run_sync(self._pool, wire.encode, message, child.shm_dir)
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
        except BaseException:  # cancelled (the loop is closing): no waiting now
            self._slots.release()
            child.stop()
            raise
        try:  # the answer's file is mapped before the child may serve (and be killed by) another call
            kind, _, result = await wire.decode_sized(self._pool, frame, child.shm_dir)
        finally:
            self._release(child)
        if kind == wire.ERROR:
            wire.raise_error(result)
        return result

    async def _acquire(self) -> _Child:
        """An idle child, or a new one while fewer than `count` are alive; else wait for a call to end."""
        await self._slots.acquire()
        try:
            while self._idle:
                child = self._idle.pop()
                if child.alive():
                    return child
                child.stop()  # died while idle (killed for memory, by an operator): not this call's fault
                code = await run_sync(self._pool, child.reap)
                log.warning("Codec process %d stopped while idle (%s); starting another", child.process.pid, code)
            return await self._start()
        except BaseException:
            self._slots.release()
            raise

    def _release(self, child: _Child) -> None:
        self._idle.append(child)
        self._slots.release()

    async def _start(self) -> _Child:
        """A new child, once it said it is ready (its shared-memory folder); `_CannotStart` if it cannot."""
        try:
            return await self._spawn()
        except (OSError, EOFError, TimeoutError, ServingError) as exc:
            self._unavailable_until = time.monotonic() + _RETRY_S
            log.error(
                "Could not start a codec process (%s); big REST bodies are handled in this process for %d s",
                exc,
                _RETRY_S,
            )
            raise _CannotStart() from exc

    async def _spawn(self) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The child gets this process's import path (Ray's working_dir, a zipapp...), and a session of its
            # own, so that the terminal's Ctrl-C is the serving process's alone.
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            process = subprocess.Popen(
                [sys.executable, "-m", "pyserving.workers", "codec", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=ours, limit=_STREAM_LIMIT)
        except BaseException:
            ours.close()
            process.kill()
            raise
        child = _Child(process, reader, writer)
        try:
            frame = await asyncio.wait_for(wire.read_frame(reader), _START_TIMEOUT_S)
            if frame is None:
                raise ConnectionResetError("the codec process exited while starting")
            child.shm_dir = wire.decode(frame, "")[2]
        except BaseException as exc:
            child.stop()
            if isinstance(exc, Exception):
                code = await run_sync(self._pool, child.reap)
                raise ConnectionResetError(f"{exc} (exit code {code})") from None
            raise
        log.info("Started codec process %d for REST bodies and answers from %d bytes", process.pid, self._min_bytes)
        return child

    async def _died(self, child: _Child, exc: BaseException) -> ServingError:
        """Stop and forget a child whose stream broke (the next call starts another); the error its call answers."""
        child.stop()
        code = await run_sync(self._pool, child.reap)
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        log.warning("Codec process %d stopped (%s; %s); the next big body starts another", child.process.pid, how, exc)
        return ServingError(
            Code.RESOURCE_EXHAUSTED, f"The request could not be handled: its codec process stopped ({how})"
        )


class _CannotStart(Exception):
    pass


def serve(fd: int) -> int:
    """A codec process's life: say ready, then answer calls until the parent closes the socket."""
    # Signals sent to the whole group (systemd's stop) are the serving process's to handle: it may still be
    # draining calls that need this process, which exits when the serving process closes the socket.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    connection = socket.socket(fileno=fd)
    shm = "/dev/shm"
    parent = shm if os.access(shm, os.W_OK) else tempfile.gettempdir()
    _sweep(parent)
    shm_dir = tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=parent)
    lock = os.open(os.path.join(shm_dir, _LOCK), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held for life: a folder whose lock is free is a dead child's
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
            del reply  # an idle child holds no tensors
    except ConnectionError:
        pass
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
    return 0


def _sweep(parent: str) -> None:
    """Remove the folders of codec processes that were killed (their lock is free): a killed child cannot."""
    for folder in glob.glob(os.path.join(parent, _DIR_PREFIX + "*")):
        try:
            lock = os.open(os.path.join(folder, _LOCK), os.O_RDWR)
        except FileNotFoundError:  # still starting, or killed before it locked: old enough to be dead
            if time.time() - os.path.getmtime(folder) > _START_TIMEOUT_S:
                shutil.rmtree(folder, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live child holds it
            continue
        else:  # (a child locks within microseconds of creating its folder: a young folder may be one starting)
            if time.time() - os.path.getmtime(folder) > _START_TIMEOUT_S:
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(lock)


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
