"""OpenTelemetry request tracing (`--enable_tracing`, `pyserving[tracing]`): one server span per inference call.

Off (the default), nothing from OpenTelemetry is imported: the adapters get a shared no-op context
manager, and the data plane and the batcher skip their annotations behind one check of `enabled`.
On, `setup` builds a `TracerProvider` that the standard `OTEL_*` variables configure (service name,
sampler, OTLP endpoint, headers, TLS, timeouts, the batch span processor) and makes it the global one,
so that spans a `processing.py` starts with the OpenTelemetry API become children of the request's.
Spans leave on the batch span processor's own thread, never on the event loop.

A span is the current one while its request runs (`contextvars`; `concurrency.run_sync` carries the
context to the worker thread), so the layers below annotate it without being handed it: the data
plane with the version, signature and rows (`annotate`), the batcher with the queue time and the size
of the batch the call ran in (`note_batch`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import types
from collections.abc import Iterable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from pyserving import __version__
from pyserving.errors import INTERNAL_ERROR, Code, ServingError

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "add_attributes",
    "annotate",
    "enabled",
    "grpc_span",
    "note_batch",
    "recorded",
    "rest_span",
    "setup",
    "shutdown",
]

log = logging.getLogger("pyserving")

DEFAULT_SERVICE_NAME = "pyserving"
_EXTRA = "pip install 'pyserving[tracing]'"

enabled = False  # read at every call site: `if tracing.enabled:`
_tracer: Any = None
_provider: Any = None
_api: Any = None  # the OpenTelemetry API modules once `setup` imported them (attribute look-ups, not imports, per call)
_NOOP: AbstractContextManager[None] = contextlib.nullcontext()


def setup(enable: bool) -> None:
    """Start exporting spans when `enable` (`--enable_tracing`); `ServingError` (start-up fails) if the
    packages are missing or an `OTEL_*` variable names an exporter or protocol this build cannot use."""
    global enabled, _tracer, _provider, _api
    if not enable:
        return
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.warning("--enable_tracing is set but OTEL_SDK_DISABLED=true: no spans are recorded")
        return
    try:
        from opentelemetry import context, propagate, trace
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ServingError(
            Code.FAILED_PRECONDITION, f"--enable_tracing needs the OpenTelemetry SDK: {_EXTRA} ({exc})"
        ) from None
    exporter = _exporter()
    # OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES' service.name win; without either, "pyserving".
    resource = Resource.create({SERVICE_VERSION: __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER(_ARG)
    provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* apply
    trace.set_tracer_provider(provider)
    _provider, _tracer = provider, provider.get_tracer("pyserving", __version__)
    _api = types.SimpleNamespace(context=context, propagate=propagate, trace=trace)
    enabled = True
    log.info(
        "Tracing on: service %s, exporter %s, sampler %s",
        resource.attributes.get(SERVICE_NAME),
        type(exporter).__name__,
        provider.sampler.get_description(),
    )


def _exporter() -> Any:
    """The span exporter `OTEL_TRACES_EXPORTER` names (otlp or console) over the OTLP protocol that
    `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL` names (grpc unless set)."""
    kinds = [kind.strip() for kind in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if kind.strip()]
    if kinds == ["console"]:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kinds != ["otlp"]:
        raise ServingError(
            Code.INVALID_ARGUMENT, f"OTEL_TRACES_EXPORTER={','.join(kinds)}: pyserving exports to one of otlp, console"
        )
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            # Not in pyserving[tracing]: opentelemetry-exporter-otlp-proto-http, installed by hand, brings requests.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[no-redef,import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        else:
            raise ServingError(
                Code.INVALID_ARGUMENT, f"OTLP protocol {protocol!r}: pyserving exports over grpc or http/protobuf"
            )
    except ImportError as exc:
        extra = _EXTRA if protocol == "grpc" else "pip install opentelemetry-exporter-otlp-proto-http"
        raise ServingError(
            Code.FAILED_PRECONDITION, f"--enable_tracing with OTLP over {protocol} needs its exporter: {extra} ({exc})"
        ) from None
    return OTLPSpanExporter()  # endpoint, headers, TLS, timeout and compression from OTEL_EXPORTER_OTLP_*


def shutdown() -> None:
    """Export the spans still queued (bounded by the exporter's timeout) and stop; at server exit."""
    global enabled
    if _provider is not None and enabled:
        enabled = False
        _provider.shutdown()


def rest_span(name: str, headers: Iterable[tuple[bytes, bytes]], route: str, model: str) -> AbstractContextManager[Any]:
    """The span of a REST call (`headers`: the ASGI scope's), the current one inside the `with`."""
    if not enabled:
        return _NOOP
    carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in headers}
    attributes = {"http.request.method": "POST", "http.route": route, "pyserving.model.name": model}
    return _RequestSpan(name, carrier, attributes, http=True)


def grpc_span(
    name: str, metadata: Iterable[tuple[str, Any]] | None, service: str, model: str, method: str = ""
) -> AbstractContextManager[Any]:
    """The span of a gRPC call (`metadata`: `context.invocation_metadata()`; `method`: the RPC's name when
    the span's differs), the current one inside the `with`."""
    if not enabled:
        return _NOOP
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}  # -bin values are bytes
    attributes = {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": method or name,
        "pyserving.model.name": model,
    }
    return _RequestSpan(name, carrier, attributes, http=False)


def annotate(model: str, version: int, signature: str, rows: int | None) -> None:
    """The version, signature and rows a call ran with, on the current span (call when `enabled`)."""
    attributes: dict[str, str | int] = {
        "pyserving.model.name": model,
        "pyserving.model.version": version,
        "pyserving.signature": signature,
    }
    if rows is not None:
        attributes["pyserving.batch.size"] = rows
    _api.trace.get_current_span().set_attributes(attributes)  # one call: the SDK locks the span once


def recorded(attributes: dict[str, Any]) -> AbstractContextManager[None]:
    """Annotations made inside (`annotate`, `note_batch`) go into `attributes` instead of a span (call when
    `enabled`): a `--num_workers` model process runs calls whose span is open in a worker, which adds them."""
    return _Recorded(attributes)


def add_attributes(attributes: dict[str, Any]) -> None:
    """Attributes recorded by the model process, on the current span (call when `enabled`)."""
    if attributes:
        _api.trace.get_current_span().set_attributes(attributes)


class _Recorded:
    def __init__(self, attributes: dict[str, Any]) -> None:
        self._attributes = attributes
        self._token: Any = None

    def __enter__(self) -> None:
        span = _recording_span_class()(_api.trace.INVALID_SPAN_CONTEXT)
        span.attributes = self._attributes
        self._token = _api.context.attach(_api.trace.set_span_in_context(span))

    def __exit__(self, *exc_info: object) -> None:
        _api.context.detach(self._token)


@functools.cache
def _recording_span_class() -> Any:
    """A span that only keeps the attributes set on it (made once `setup` imported OpenTelemetry)."""

    class _RecordingSpan(_api.trace.NonRecordingSpan):
        attributes: dict[str, Any]

        def set_attributes(self, attributes: dict[str, Any]) -> None:
            self.attributes.update(attributes)

        def set_attribute(self, key: str, value: Any) -> None:
            self.attributes[key] = value

    return _RecordingSpan


def note_batch(queue_seconds: float, batch_size: int) -> None:
    """How long the call waited in the batcher's queue and the size of the batch it ran in (padded, the
    largest when the call was split), on the current span (call when `enabled`)."""
    _api.trace.get_current_span().set_attributes(
        {"pyserving.queue.time_ms": max(queue_seconds, 0.0) * 1e3, "pyserving.batch.run_size": batch_size}
    )


class _RequestSpan:
    """A SERVER span whose parent is the caller's (W3C traceparent through the global propagator, which
    `OTEL_PROPAGATORS` configures); an exception ends it with status ERROR and the client's message."""

    __slots__ = ("_name", "_carrier", "_attributes", "_http", "_span", "_token")

    def __init__(self, name: str, carrier: dict[str, str], attributes: dict[str, Any], http: bool) -> None:
        self._name, self._carrier, self._attributes, self._http = name, carrier, attributes, http
        self._span: Any = None
        self._token: Any = None

    def __enter__(self) -> Any:
        trace = _api.trace
        parent = _api.propagate.extract(self._carrier)
        self._span = _tracer.start_span(
            self._name, context=parent, kind=trace.SpanKind.SERVER, attributes=self._attributes
        )
        self._token = _api.context.attach(trace.set_span_in_context(self._span, parent))
        return self._span

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        trace = _api.trace
        span = self._span
        try:
            if exc is None:
                code, message, http_status = Code.OK, "", 200
            elif isinstance(exc, ServingError):
                code, message, http_status = exc.code, exc.message, exc.http_status
            elif isinstance(exc, Exception):
                code, message, http_status = Code.INTERNAL, INTERNAL_ERROR, 500
            else:  # the call was cancelled (client gone, deadline): no answer was sent
                code, message, http_status = Code.CANCELLED, "Cancelled", 0
            attributes: dict[str, str | int] = {}
            if self._http:
                if http_status:
                    attributes["http.response.status_code"] = http_status
            else:
                attributes["rpc.grpc.status_code"] = int(code)
            if code != Code.OK:
                attributes["pyserving.status.code"] = code.name
                span.set_status(trace.Status(trace.StatusCode.ERROR, message))
            span.set_attributes(attributes)
        finally:
            _api.context.detach(self._token)
            span.end()
