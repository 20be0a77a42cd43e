"""`tensorflow.ProfilerService` on the gRPC port, as TF Serving mounts it with `--enable_profiler`.

`tf.profiler.experimental.client.trace("grpc://host:port", logdir, ms)` sends a
Profile request; like TF's own service (tsl's profiler_service_impl), this one
runs a TensorFlow profiler session in this process for `opts.duration_ms` (or
until a Terminate names the session), writes the XSpace to
`<repository_root>/<session_id>/<host>.xplane.pb` and answers whether the trace
is empty. One session at a time: TensorFlow's profiler lock refuses a second
one, and the RPC answers INTERNAL "Another profiling session active.", as TF's.
Monitor answers UNIMPLEMENTED, as TF's does.

The wheel ships no Python module for profiler_service.proto, so the messages are
described here from the proto's field numbers. XSpace travels as plain bytes
(the same wire encoding as the message): TensorFlow's traces can hold string
fields that are not UTF-8, which Python's protobuf refuses to parse.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import Executor
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from tensorflow.tsl.profiler.protobuf import profiler_options_pb2

from pyserving.concurrency import run_sync, worker_pool
from pyserving.transports.grpc import Service, unary_service

__all__ = ["ProfilerService", "message_class", "service"]

log = logging.getLogger("pyserving")

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONS_FILE = profiler_options_pb2.DESCRIPTOR.name  # tsl/profiler/protobuf/profiler_options.proto


def _message(name: str, *fields: tuple[str, int, int, str]) -> descriptor_pb2.DescriptorProto:
    """A message of (name, number, type, type_name) fields; a type_name starting with '*' is repeated."""
    proto = descriptor_pb2.DescriptorProto(name=name)
    for field_name, number, kind, type_name in fields:
        field = proto.field.add(
            name=field_name,
            number=number,
            type=kind,
            label=_F.LABEL_REPEATED if type_name.startswith("*") else _F.LABEL_OPTIONAL,
        )
        if type_name.lstrip("*"):
            field.type_name = type_name.lstrip("*")
    return proto


def _file() -> descriptor_pb2.FileDescriptorProto:
    """The part of tsl/profiler/protobuf/profiler_service.proto that is served, plus an outline of XSpace
    (planes -> lines -> events) that is enough to tell an empty trace without parsing its strings."""
    file = descriptor_pb2.FileDescriptorProto(
        name="pyserving/profiler_service.proto", package="tensorflow", syntax="proto3", dependency=[_OPTIONS_FILE]
    )
    file.message_type.extend(
        [
            _message(
                "ProfileRequest",
                ("duration_ms", 1, _F.TYPE_UINT64, ""),
                ("max_events", 2, _F.TYPE_UINT64, ""),
                ("tools", 3, _F.TYPE_STRING, "*"),
                ("opts", 4, _F.TYPE_MESSAGE, ".tensorflow.ProfileOptions"),
                ("repository_root", 5, _F.TYPE_STRING, ""),
                ("session_id", 6, _F.TYPE_STRING, ""),
                ("host_name", 7, _F.TYPE_STRING, ""),
                ("emit_xspace", 9, _F.TYPE_BOOL, ""),
            ),
            _message("ProfileToolData", ("name", 1, _F.TYPE_STRING, ""), ("data", 2, _F.TYPE_BYTES, "")),
            _message(
                "ProfileResponse",
                ("tool_data", 6, _F.TYPE_MESSAGE, "*.tensorflow.ProfileToolData"),
                ("empty_trace", 7, _F.TYPE_BOOL, ""),
                ("xspace", 8, _F.TYPE_BYTES, ""),  # a tensorflow.profiler.XSpace, serialized
            ),
            _message("TerminateRequest", ("session_id", 1, _F.TYPE_STRING, "")),
            _message("TerminateResponse"),
            _message(
                "MonitorRequest",
                ("duration_ms", 1, _F.TYPE_UINT64, ""),
                ("monitoring_level", 2, _F.TYPE_INT32, ""),
                ("timestamp", 3, _F.TYPE_BOOL, ""),
            ),
            _message("MonitorResponse", ("data", 1, _F.TYPE_STRING, "")),
            _message("XSpaceOutline", ("planes", 1, _F.TYPE_MESSAGE, "*.tensorflow.XPlaneOutline")),
            _message("XPlaneOutline", ("lines", 3, _F.TYPE_MESSAGE, "*.tensorflow.XLineOutline")),
            _message("XLineOutline", ("events", 4, _F.TYPE_BYTES, "*")),
        ]
    )
    service = file.service.add(name="ProfilerService")
    for method, request, response in (
        ("Profile", "ProfileRequest", "ProfileResponse"),
        ("Terminate", "TerminateRequest", "TerminateResponse"),
        ("Monitor", "MonitorRequest", "MonitorResponse"),
    ):
        service.method.add(name=method, input_type=f".tensorflow.{request}", output_type=f".tensorflow.{response}")
    return file


# A private pool: the names cannot clash with a real profiler_service_pb2 another package may load.
_POOL = descriptor_pool.DescriptorPool()
_options_file = descriptor_pb2.FileDescriptorProto()
profiler_options_pb2.DESCRIPTOR.CopyToProto(_options_file)
_POOL.Add(_options_file)
_FILE = _POOL.AddSerializedFile(_file().SerializeToString())
_SERVICE = _FILE.services_by_name["ProfilerService"]
_ProfileResponse: Any = message_factory.GetMessageClass(_FILE.message_types_by_name["ProfileResponse"])
_TerminateResponse: Any = message_factory.GetMessageClass(_FILE.message_types_by_name["TerminateResponse"])
_XSpaceOutline: Any = message_factory.GetMessageClass(_FILE.message_types_by_name["XSpaceOutline"])

_XPLANE_SUFFIX = ".xplane.pb"
# Durations are uint64 milliseconds; the event loop's timers overflow long before that. TF has no
# limit, and neither has this in practice: a client that gives up cancels the session anyway.
_MAX_WAIT_S = 2**31 / 1000


def service(servicer: object) -> Service:
    """`tensorflow.ProfilerService` over `servicer` (a `--num_workers` worker forwards to the model process's)."""
    return unary_service(servicer, _SERVICE)


def message_class(name: str) -> Any:
    """A message of the service by its short name (`ProfileRequest`...), for raw clients and tests."""
    return message_factory.GetMessageClass(_FILE.message_types_by_name[name])


class ProfilerService:
    """Profile, Terminate and Monitor of `tensorflow.ProfilerService`, over TensorFlow's in-process profiler."""

    def __init__(self, pool: Executor | None = None) -> None:
        # Starting (it may load device tracers) and stopping (it collects the trace) block: off the loop.
        self._pool = pool or worker_pool(1, "profiler")
        self._stops: dict[str, asyncio.Event] = {}

    @property
    def service(self) -> Service:
        return unary_service(self, _SERVICE)

    async def Profile(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 (gRPC method name)
        opts = request.opts
        duration_ms = opts.duration_ms or request.duration_ms  # older clients set only the request's
        path = None
        if not request.emit_xspace:
            path = _xplane_path(request)
            if isinstance(path, _Failure):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, path.message)
        delay_ns = opts.start_timestamp_ns - time.time_ns()
        if opts.start_timestamp_ns and delay_ns > 0:  # the client asked for a synchronised start
            await asyncio.sleep(min(delay_ns / 1e9, _MAX_WAIT_S))
        session = _Session()
        start = asyncio.ensure_future(run_sync(self._pool, session.start, _tracer_levels(opts)))
        try:
            failure = await asyncio.shield(start)
        except asyncio.CancelledError:  # the client went away while the session started: stop it once it has
            start.add_done_callback(lambda done: self._stop_started(done, session))
            raise
        if failure is not None:  # another session is active: TF's message, under TF's code
            await context.abort(grpc.StatusCode.INTERNAL, failure.message)
        log.info("Profiler session %r started for %d ms", request.session_id, duration_ms)
        stop = self._stops.setdefault(request.session_id, asyncio.Event())
        try:
            await asyncio.wait_for(stop.wait(), min(duration_ms / 1000, _MAX_WAIT_S))
        except TimeoutError:
            pass
        finally:
            self._stops.pop(request.session_id, None)
            # Cancelled (the client went away): the session still stops, and its trace is dropped.
            trace = await asyncio.shield(run_sync(self._pool, session.collect))
        if isinstance(trace, _Failure):
            await context.abort(grpc.StatusCode.INTERNAL, trace.message)
        xspace, empty = trace
        response = _ProfileResponse(empty_trace=empty)
        if path is None:
            response.xspace = xspace
            return response
        try:
            await run_sync(self._pool, _write, path, xspace)
        except OSError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"{exc.filename}; {exc.strerror}")
        log.info("Profiler session %r wrote %s (%d bytes)", request.session_id, path, len(xspace))
        return response

    def _stop_started(self, start: asyncio.Future, session: _Session) -> None:
        if not start.cancelled() and start.exception() is None and start.result() is None:
            self._pool.submit(session.collect)

    async def Terminate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """Ends the named session's Profile early; it still collects and writes what it traced."""
        stop = self._stops.get(request.session_id)
        if stop is not None:
            stop.set()
        return _TerminateResponse()

    async def Monitor(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "unimplemented.")


class _Failure:
    """An error message where a value was expected."""

    def __init__(self, message: str) -> None:
        self.message = message


def _xplane_path(request: Any) -> str | _Failure:
    """Where TF's service writes the trace: `<repository_root>/<session_id>/<host>.xplane.pb` (':' -> '_').

    Stricter than TF, which joins whatever it is sent: an empty root or a session or host that is
    not one plain path component (a client-chosen '../..') is INVALID_ARGUMENT. The root itself is any
    folder the server may write to, as in TF: turn the service off where the gRPC port is exposed.
    """
    if not request.repository_root:
        return _Failure("ProfileRequest.repository_root is empty; nowhere to write the trace")
    if "\0" in request.repository_root:
        return _Failure("ProfileRequest.repository_root contains a NUL byte")
    host = _hostname(request)
    for what, name in (("session_id", request.session_id), ("host_name", host)):
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            return _Failure(f"ProfileRequest.{what} {name!r} is not a plain file name")
    file_name = (host + _XPLANE_SUFFIX).replace(":", "_")
    return os.path.join(request.repository_root, request.session_id, file_name)


def _hostname(request: Any) -> str:
    """The request's host_name, unless the options override it (as TF's GetHostname)."""
    opts = request.opts
    override = opts.advanced_configuration.get("override_hostname")
    if override is not None and override.WhichOneof("value") == "string_value" and override.string_value:
        return str(override.string_value)
    return str(opts.override_hostname or request.host_name)


def _tracer_levels(opts: Any) -> dict[str, int]:
    """The profiler's levels from the request; options without a version (old clients) get TF's defaults."""
    if not opts.version:
        return {}
    return {
        "host_tracer_level": opts.host_tracer_level,
        "device_tracer_level": opts.device_tracer_level,
        "python_tracer_level": opts.python_tracer_level,
    }


class _Session:
    """One TensorFlow profiler session. Its Python binding hands back the XSpace only as a file
    (`export_to_tb` writes `<logdir>/plugins/profile/<run>/<host>.xplane.pb`): it is staged in a
    private temporary folder and read back. (`stop()` returns a converted trace, not the XSpace.)"""

    def __init__(self) -> None:
        # TensorFlow's own modules, imported here: a protocol worker imports this module for its messages only.
        from tensorflow.python.profiler.internal import _pywrap_profiler

        self._session = _pywrap_profiler.ProfilerSession()
        self._staging = ""

    def start(self, levels: dict[str, int]) -> _Failure | None:
        from tensorflow.python.framework import errors as tf_errors

        self._staging = tempfile.mkdtemp(prefix="pyserving-profile-")
        try:
            self._session.start(self._staging, levels)
        except tf_errors.OpError as exc:
            shutil.rmtree(self._staging, ignore_errors=True)
            return _Failure(exc.message)
        return None

    def collect(self) -> tuple[bytes, bool] | _Failure:
        """Stop the session: its XSpace, serialized, and whether it is empty; or why it could not be collected."""
        from tensorflow.python.framework import errors as tf_errors

        try:
            self._session.export_to_tb()
            written = glob.glob(os.path.join(glob.escape(self._staging), "plugins", "profile", "*", "*.xplane.pb"))
            if len(written) != 1:
                return _Failure(f"The profiler wrote {len(written)} traces; expected 1")
            with open(written[0], "rb") as file:
                xspace = file.read()
            return xspace, _is_empty(xspace)
        except tf_errors.OpError as exc:
            return _Failure(exc.message)
        except OSError as exc:
            return _Failure(f"{exc.filename}; {exc.strerror}")
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)


def _is_empty(xspace: bytes) -> bool:
    """TF's IsEmpty(XSpace): no line of any plane has an event."""
    outline = _XSpaceOutline.FromString(xspace)
    return not any(line.events for plane in outline.planes for line in plane.lines)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(data)
