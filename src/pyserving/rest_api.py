"""The REST front-end: TF Serving's /v1 URL scheme as a raw ASGI application (and /healthz, /readyz, /openapi.yaml).

A thin adapter: it routes, reads (and gunzips) the body, decodes small predict
bodies on the loop and hands everything else to a worker thread, and maps
`ServingError` to TF Serving's HTTP status and `{"error": ...}` body. No web
framework: TF Serving's routing quirks (case-insensitive prefix, case-sensitive
verbs, percent-decoded names, empty bodies for some early errors) are easier to
reproduce with two regexes.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import unquote

import orjson
from google.protobuf import json_format

from pyserving import json_codec, json_examples, metrics
from pyserving.concurrency import run_sized, run_sync
from pyserving.dataplane import SIGNATURE_DEF_FIELD, DataPlane, ModelSpec
from pyserving.errors import Code, ServingError, invalid_argument
from pyserving.manager import VersionStatus
from pyserving.servable import DEFAULT_SIGNATURE
from pyserving.sources import parse_version

log = logging.getLogger("pyserving")

_V1 = re.compile(r"(?i)/v1/.*")
_POST = re.compile(r"(?i)/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)")
_GET = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?")
_ORIGIN = re.compile(r"https?://.*")
# TF Serving's limit on a gunzipped request body.
MAX_UNCOMPRESSED_BYTES = 100 * 1024 * 1024

_JSON_HEADERS = [(b"content-type", b"application/json")]
_CORS_HEADERS = [(b"access-control-allow-origin", b"*"), (b"access-control-allow-methods", b"POST, GET"),
                 (b"access-control-allow-headers", b"Content-Type")]
# The rest of an oversized body is never read, so the connection cannot be reused.
_CLOSE = [(b"connection", b"close")]
_HEALTHZ = "/healthz"
_READYZ = "/readyz"
_OPENAPI = "/openapi.yaml"
# libevent's default error page, which TF Serving returns for paths outside /v1/.
_NOT_FOUND_PAGE = b"<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n</BODY></HTML>\n"


class _EmptyBodyError(Exception):
    """An early routing error TF Serving answers with a 400 and no body."""


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    """The client disconnected (or was disconnected) before sending the whole body."""


@dataclass(frozen=True)
class RestSettings:
    timeout_ms: int = 0
    cors: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    metrics_path: str | None = None  # None: no Prometheus endpoint


class RestApi:
    """ASGI app serving `/v1/models/...`, plus `/healthz`, `/readyz` and the Prometheus path."""

    def __init__(self, dataplane: DataPlane, pool: ThreadPoolExecutor, settings: RestSettings,
                 readiness: Callable[[], tuple[bool, dict]]) -> None:
        self._dataplane = dataplane
        self._pool = pool
        self._settings = settings
        self._readiness = readiness
        self._cors = _CORS_HEADERS if settings.cors else []
        self._json_headers = _JSON_HEADERS + self._cors

    async def __call__(self, scope, receive, send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return
        # TF Serving matches its regexes against the still-encoded path *with* the query.
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        method = scope["method"]
        if method == "GET" and path in (_HEALTHZ, _READYZ, _OPENAPI) or path == self._settings.metrics_path:
            await self._operations(send, path)
            return
        if not _V1.fullmatch(path):
            await _respond(send, 404, _NOT_FOUND_PAGE, [(b"content-type", b"text/html; charset=ISO-8859-1")])
            return
        if method == "OPTIONS":
            origin = _header(scope, b"origin")
            ok = origin is not None and _ORIGIN.fullmatch(origin.decode("latin-1"))
            await _respond(send, 200 if ok else 400, b"", self._cors)
            return
        try:
            body = await _read_body(receive, scope, self._settings.max_body_bytes)
        except _ClientGone:
            return
        except _BodyTooLarge:
            message = f"Request body exceeds the limit of {self._settings.max_body_bytes} bytes"
            await _respond(send, 413, json_codec.encode_error(message), self._json_headers + _CLOSE)
            return
        except ServingError as exc:
            await _respond(send, exc.http_status, json_codec.encode_error(exc.message), self._json_headers)
            return
        status, payload = await self._handle(method, path, body)
        await _respond(send, status, payload, self._json_headers)

    async def _operations(self, send, path: str) -> None:
        if path == _HEALTHZ:
            await _respond(send, 200, b'{"status": "alive"}\n', _JSON_HEADERS)
        elif path == _READYZ:
            ready, models = self._readiness()
            body = orjson.dumps({"ready": ready, "models": models}) + b"\n"
            await _respond(send, 200 if ready else 503, body, _JSON_HEADERS)
        elif path == _OPENAPI:
            await _respond(send, 200, _openapi_document(), [(b"content-type", b"application/yaml")])
        else:
            await _respond(send, 200, metrics.exposition(), [(b"content-type", metrics.CONTENT_TYPE)])

    async def _handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        """Route and run one request; records request_count and request_latency."""
        started = time.perf_counter()
        model, api, code = "", "", Code.OK
        try:
            model, api, run = self._route(method, path)
            status, payload = 200, await run(body)
        except _EmptyBodyError:
            code, status, payload = Code.INVALID_ARGUMENT, 400, b""
        except ServingError as exc:
            code, status, payload = exc.code, exc.http_status, json_codec.encode_error(exc.message)
        except Exception as exc:  # a bug must answer 500, not drop the connection
            log.exception("Unexpected error handling %s %s", method, path)
            code, status = Code.INTERNAL, 500
            payload = json_codec.encode_error(f"Internal error: {type(exc).__name__}: {exc}")
        metrics.REQUEST_COUNT.inc(model, code.name)
        if code == Code.OK:
            metrics.REQUEST_LATENCY.observe(model, api, "REST", value=(time.perf_counter() - started) * 1e6)
        return status, payload

    def _route(self, method: str, path: str) -> tuple[str, str, Callable[[bytes], Awaitable[bytes]]]:
        """(model name, API label, handler of the body) for a request."""
        if method == "POST":
            match = _POST.fullmatch(path)
            if match and match.group(4) in ("predict", "classify", "regress"):
                spec = _model_spec(*match.group(1, 2, 3))
                if match.group(4) == "predict":
                    return spec.name, "predict", functools.partial(self._predict, spec)
                return spec.name, match.group(4), functools.partial(
                    run_sync, self._pool, self._classify_or_regress, match.group(4), spec)
        elif method == "GET":
            match = _GET.fullmatch(path)
            if match:
                if match.group(1) is None:
                    raise invalid_argument("Missing model name in request.")
                spec = _model_spec(*match.group(1, 2, 3))
                if match.group(4) == "metadata":
                    return spec.name, "", lambda _: run_sync(self._pool, self._metadata, spec)
                return spec.name, "", lambda _: run_sync(self._pool, self._status, spec)
        raise invalid_argument(f"Malformed request: {method} {path}")

    async def _predict(self, spec: ModelSpec, body: bytes) -> bytes:
        """The hot path: codecs inline for small bodies, the session call off the loop."""
        doc = await run_sized(self._pool, len(body), json_codec.parse_predict, body)
        signature_key = json_codec.signature_name(doc)
        with self._dataplane.lease(spec) as target:
            signature = target[1].signature_defs.get(signature_key or DEFAULT_SIGNATURE)
            if signature is None:
                raise invalid_argument(f'Serving signature name: "{signature_key}" not found in signature def')
            inputs = await run_sized(self._pool, len(body), json_codec.decode_predict, doc, signature, signature_key,
                                     body)
            spec = ModelSpec(spec.name, spec.version, spec.label, signature_key)
            result = await self._dataplane.predict_async(self._pool, spec, inputs.tensors,
                                                         timeout_ms=self._settings.timeout_ms, target=target)
        return await run_sized(self._pool, json_codec.encoded_size(result.outputs), json_codec.encode_predict,
                               result.outputs, inputs.format)

    def _classify_or_regress(self, method: str, spec: ModelSpec, body: bytes) -> bytes:
        doc = json_codec.parse_object(body)
        spec = ModelSpec(spec.name, spec.version, spec.label, json_codec.signature_name(doc))
        request_input = json_examples.decode_input(doc)
        if method == "classify":
            _, _, result = self._dataplane.classify(spec, request_input, self._settings.timeout_ms)
            return json_examples.encode_classification(result)
        _, _, result = self._dataplane.regress(spec, request_input, self._settings.timeout_ms)
        return json_examples.encode_regression(result)

    def _metadata(self, spec: ModelSpec) -> bytes:
        version, signature_map = self._dataplane.signature_def_map(spec, [SIGNATURE_DEF_FIELD])
        model_spec = {"name": spec.name, "signature_name": "", "version": str(version)}
        # Hand-assembled around two protobuf JSON dumps, exactly as TF Serving does.
        return ('{\n"model_spec":' + _proto_json(model_spec) + ',\n"metadata": {"signature_def": '
                + _proto_json(json_format.MessageToDict(signature_map, preserving_proto_field_name=True,
                                                        always_print_fields_with_no_presence=True))
                + "}\n}\n").encode()

    def _status(self, spec: ModelSpec) -> bytes:
        statuses = self._dataplane.status(spec.name, spec.version)
        return _proto_json({"model_version_status": [_status_json(s) for s in statuses]}).encode()


def _proto_json(document: dict) -> str:
    """protobuf's C++ JSON printer with add_whitespace: 1-space indent, trailing newline."""
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


@functools.cache
def _openapi_document() -> bytes:
    return importlib.resources.files("pyserving").joinpath("openapi.yaml").read_bytes()


def _status_json(status: VersionStatus) -> dict:
    error = status.error
    return {
        "version": str(status.version),
        "state": status.state.name,
        "status": {
            "error_code": error.code.name if error else "OK",
            "error_message": error.message if error else "",
        },
    }


def _model_spec(name: str, version: str | None, label: str | None) -> ModelSpec:
    number = None
    if version is not None:
        number = parse_version(version)
        if number is None:  # does not fit int64
            raise _EmptyBodyError()
    return ModelSpec(unquote(name), number, unquote(label) if label is not None else None)


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def _read_body(receive, scope, limit: int) -> bytes:
    """The whole body (gunzipped if so encoded); `_BodyTooLarge` past `limit` bytes on the wire."""
    length = _header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _BodyTooLarge()
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge()
        chunks.append(chunk)
        more = message.get("more_body", False)
    body = b"".join(chunks)
    encoding = _header(scope, b"content-encoding")
    if encoding is not None and b"gzip" in encoding:
        return _gunzip(body)
    return body


def _gunzip(body: bytes) -> bytes:
    """Gunzip with TF Serving's 100 MiB cap; like TF Serving, a body that fails becomes empty."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = decompressor.decompress(body, MAX_UNCOMPRESSED_BYTES + 1)
    except zlib.error:
        return b""
    if len(data) > MAX_UNCOMPRESSED_BYTES or decompressor.unconsumed_tail:
        raise invalid_argument(
            f"Request body exceeds {MAX_UNCOMPRESSED_BYTES} bytes after gzip decompression")
    return data


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
