"""The frames between the workers and the model process: pickled calls whose numpy buffers travel apart.

A frame is a 4-byte length, then `_HEADER` (payload length, buffer count, the shared-memory file's name
length), each buffer's (where, size), the name, the pickle (protocol 5) and the inline buffers. Arrays
under `SHM_THRESHOLD` bytes travel inline (a socket write is cheaper than a file for them); bigger ones are
written into one shared-memory file per frame, which the receiver maps copy-on-write (numpy arrays on the
mapping, no copy) and unlinks at once. Both ends are this server's own processes on a private socket:
nothing a client sent is ever unpickled here (the protocol codecs decoded it into arrays first).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import mmap
import os
import pickle
import secrets
import socket
import struct
from collections.abc import Iterable
from concurrent.futures import Executor
from typing import Any

import numpy as np

from pyserving import tracing
from pyserving.concurrency import INLINE_BYTES, run_sync
from pyserving.errors import INTERNAL_ERROR, Code, ServingError

__all__ = [
    "ERROR",
    "TENSOR_FILE_PREFIX",
    "REPLY",
    "REQUEST",
    "SHM_THRESHOLD",
    "TRACED",
    "BlockingChannel",
    "Generation",
    "Sender",
    "arrays_bytes",
    "decode",
    "decode_sized",
    "encode",
    "error_reply",
    "raise_error",
    "read_frame",
    "read_frame_blocking",
]

REQUEST, REPLY, ERROR = 0, 1, 2
# Arrays from this size on travel in a shared-memory file (docs/WORKERS.md: where the threshold pays).
SHM_THRESHOLD = 256 * 1024
_LENGTH = struct.Struct("<I")
_HEADER = struct.Struct("<IIH")
_BUFFER = struct.Struct("<BQ")
_INLINE, _SHARED = 0, 1
_ALIGN = 64
_JOIN_BYTES = 64 * 1024  # frames up to this much inline data go out as one buffer (copying is cheaper)
log = logging.getLogger("pyserving")
_names = itertools.count()
# A tensor file's name: the prefix, a token of this process (a pid may come back: a restarted worker), a count.
TENSOR_FILE_PREFIX = "t-"
_PROCESS_TOKEN = f"{os.getpid()}-{secrets.token_hex(4)}"


def encode(message: Any, shm_dir: str) -> list[bytes | memoryview]:
    """`message` as one frame's parts (for `writelines`/`sendmsg`); big buffers written to a file in `shm_dir`."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(message)
    payload = stream.getvalue()
    views = [buffer.raw() for buffer in buffers]
    layout, inline, shared = [], [], []
    for view in views:
        if view.nbytes >= SHM_THRESHOLD:
            layout.append(_BUFFER.pack(_SHARED, view.nbytes))
            shared.append(view)
        else:
            layout.append(_BUFFER.pack(_INLINE, view.nbytes))
            inline.append(view)
    name = b""
    if shared:
        try:
            name = _write_shared(shared, shm_dir).encode()
        except (OSError, ServingError) as exc:  # /dev/shm full (64 MiB in a default container): slower, inline
            _warn_shm(shm_dir, exc)
            layout = [_BUFFER.pack(_INLINE, view.nbytes) for view in views]
            inline, shared = views, []
    body = _HEADER.pack(len(payload), len(views), len(name)) + b"".join(layout) + name
    inline_size = sum(view.nbytes for view in inline)
    size = len(body) + len(payload) + inline_size
    if size >= 1 << 32:
        raise ServingError(
            Code.RESOURCE_EXHAUSTED, f"A message of {size} bytes cannot pass between the server's processes"
        )
    if inline_size <= _JOIN_BYTES:  # one write call: a transport writes each part of a list by itself
        return [b"".join([_LENGTH.pack(size), body, payload, *inline])]
    return [_LENGTH.pack(size), body, payload, *inline]


class _Pickler(pickle.Pickler):
    """Numeric arrays as (dtype, shape, buffer): numpy's own reduction pickles the dtype object, several
    times slower for the small arrays of a typical request."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and obj.dtype.kind in _NUMERIC_KINDS and obj.flags.c_contiguous:
            array: Any = obj
            return _array, (obj.dtype.str, obj.shape, pickle.PickleBuffer(array))
        return NotImplemented


_NUMERIC_KINDS = frozenset("biufc")  # (datetimes have no buffer interface: numpy's reduction pickles them)


def _array(dtype: str, shape: tuple[int, ...], buffer: Any) -> np.ndarray:
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _warn_shm(shm_dir: str, exc: BaseException) -> None:
    global _shm_warned
    if not _shm_warned:
        _shm_warned = True
        log.warning("Tensors go inline: no room for them in %s (%s); give /dev/shm more space", shm_dir, exc)


_shm_warned = False


def arrays_bytes(arrays: Iterable[Any]) -> int:
    """About how many bytes `arrays` take in a frame, to decide whether encoding leaves the event loop: a
    string (object) array counts `_OBJECT_BYTES` per element (its `nbytes` counts only the pointers)."""
    total = 0
    for array in arrays:
        if isinstance(array, np.ndarray):
            total += array.size * _OBJECT_BYTES if array.dtype.kind == "O" else array.nbytes
    return total


_OBJECT_BYTES = 64


async def decode_sized(pool: Executor, frame: bytearray, shm_dir: str) -> Any:
    """`decode`, on `pool` for a frame big enough (inline strings) to hold the event loop too long."""
    if len(frame) <= INLINE_BYTES:
        return decode(frame, shm_dir)
    return await run_sync(pool, decode, frame, shm_dir)


def _write_shared(views: list[memoryview], shm_dir: str) -> str:
    """One file holding `views`, each at a 64-byte aligned offset (numpy's alignment for any dtype)."""
    path = os.path.join(shm_dir, f"{TENSOR_FILE_PREFIX}{_PROCESS_TOKEN}-{next(_names)}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        parts: list[bytes | memoryview] = []
        offset = 0
        for view in views:
            pad = -offset % _ALIGN
            if pad:
                parts.append(bytes(pad))
            parts.append(view)
            offset += pad + view.nbytes
        for start in range(0, len(parts), 512):  # IOV_MAX is 1024
            chunk = parts[start : start + 512]
            expected = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in chunk)
            written = os.writev(fd, chunk)
            if written != expected:  # tmpfs writes whole buffers; anything else is a full /dev/shm
                raise ServingError(Code.RESOURCE_EXHAUSTED, f"Could not write a tensor to {shm_dir} (full?)")
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return os.path.basename(path)


def decode(frame: bytearray | bytes, shm_dir: str) -> Any:
    """The message of a frame (without its length prefix)."""
    view = memoryview(frame)
    payload_size, count, name_size = _HEADER.unpack_from(view, 0)
    offset = _HEADER.size
    layout = [_BUFFER.unpack_from(view, offset + i * _BUFFER.size) for i in range(count)]
    offset += count * _BUFFER.size
    name = bytes(view[offset : offset + name_size]).decode()
    offset += name_size
    payload = view[offset : offset + payload_size]
    offset += payload_size
    if name and not (name.startswith(TENSOR_FILE_PREFIX) and os.path.basename(name) == name):
        raise ServingError(Code.INTERNAL, INTERNAL_ERROR)  # only this code's own file names, in the folder
    mapped = _map_shared(os.path.join(shm_dir, name)) if name else None
    shared_offset = 0
    buffers: list[memoryview] = []
    for where, size in layout:
        if where == _INLINE:
            buffers.append(view[offset : offset + size])
            offset += size
        else:
            assert mapped is not None
            shared_offset += -shared_offset % _ALIGN
            buffers.append(mapped[shared_offset : shared_offset + size])
            shared_offset += size
    return pickle.loads(payload, buffers=buffers)


def _map_shared(path: str) -> memoryview:
    """The file mapped copy-on-write (writable arrays, the file untouched), unlinked at once."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        os.unlink(path)
    return memoryview(mapping)


async def read_frame(reader: asyncio.StreamReader) -> bytearray | None:
    """The next frame (writable, so that arrays decoded from it are too), None at the end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        return bytearray(await reader.readexactly(_LENGTH.unpack(head)[0]))
    except asyncio.IncompleteReadError:
        return None


def read_frame_blocking(connection: socket.socket) -> bytearray | None:
    """`read_frame` from a blocking socket; None at the end of the stream."""
    head = bytearray(_LENGTH.size)
    got = connection.recv_into(head)
    if not got:
        return None
    _recv_into(connection, memoryview(head)[got:])
    frame = bytearray(_LENGTH.unpack(head)[0])
    _recv_into(connection, memoryview(frame))
    return frame


def _recv_into(connection: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        count = connection.recv_into(view[got:])
        if not count:
            raise ConnectionResetError("the other process closed the connection in the middle of a frame")
        got += count


# Calls whose tracing attributes (`tracing.recorded`) travel back with the result, or with the error: with
# --enable_tracing their result is (result, attributes).
TRACED = frozenset(["predict", "classify", "regress", "multi_inference"])


def error_reply(
    call_id: int, exc: BaseException, attributes: dict[str, Any] | None = None
) -> tuple[int, int, tuple[Any, ...]]:
    """The reply for a call that raised: a ServingError's code and message; anything else INTERNAL; and the
    tracing attributes recorded before it did."""
    if isinstance(exc, ServingError):
        return (ERROR, call_id, (exc.code.value, exc.message, attributes))
    return (ERROR, call_id, (Code.INTERNAL.value, INTERNAL_ERROR, attributes))


def raise_error(detail: tuple[Any, ...]) -> None:
    """Raise the error of an ERROR reply (its tracing attributes first added to the caller's span)."""
    code, message = detail[0], detail[1]
    if len(detail) > 2 and detail[2] and tracing.enabled:
        tracing.add_attributes(detail[2])
    raise ServingError(Code(code), message)


class Sender:
    """Frames for one connection, written once per event-loop iteration: the calls (or replies) of one
    iteration leave in one write, and the other end reads them in one wake-up."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._parts: list[bytes | memoryview] = []

    def send(self, parts: list[bytes | memoryview]) -> None:
        if not self._parts:
            asyncio.get_running_loop().call_soon(self._flush)
        self._parts.extend(parts)

    def _flush(self) -> None:
        parts, self._parts = self._parts, []
        if self._writer.is_closing():
            return
        if len(parts) == 1:
            self._writer.write(parts[0])
        elif sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts) <= _JOIN_BYTES:
            self._writer.write(b"".join(parts))
        else:
            self._writer.writelines(parts)


class BlockingChannel:
    """A blocking connection for one call at a time (a worker thread's calls; the loop's rare cache misses)."""

    def __init__(self, path: str, shm_dir: str, timeout_s: float | None = None) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(timeout_s)
        self._socket.connect(path)
        self._shm_dir = shm_dir

    def call(self, method: str, *args: Any) -> Any:
        """The model process's answer; its `ServingError`; `OSError` if the connection failed."""
        parts = encode((REQUEST, 0, method, args), self._shm_dir)
        self._socket.sendall(b"".join(parts))
        frame = read_frame_blocking(self._socket)
        if frame is None:
            raise ConnectionResetError("the model process closed the connection")
        kind, _, result = decode(frame, self._shm_dir)
        if kind == ERROR:
            raise_error(result)
        return result

    def close(self) -> None:
        self._socket.close()


class Generation:
    """A counter in a shared file: the model process bumps it when what a lease resolves to may have changed;
    the workers read it per request (one memory read) to know their resolve caches are still good."""

    def __init__(self, path: str, create: bool) -> None:
        if create:
            with open(path, "wb") as file:
                file.write(bytes(8))
        fd = os.open(path, os.O_RDWR if create else os.O_RDONLY)
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if create else 0)
            self._mapping = mmap.mmap(fd, 8, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)
        self._value = np.frombuffer(self._mapping, dtype=np.uint64, count=1)

    def read(self) -> int:
        return int(self._value[0])

    def bump(self) -> None:
        """One writer only (the model process, under the manager's lock)."""
        self._value[0] += 1
