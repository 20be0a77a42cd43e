"""TF Serving's REST API (`/v1/models/...`) as an ASGI app over the data plane.

A thin adapter: it routes, reads (and gunzips) the body, decodes small predict
bodies on the loop and hands everything else to a worker thread, and maps
`ServingError` to TF Serving's HTTP status and `{"error": ...}` body. No web
framework: TF Serving's routing quirks (case-insensitive prefix, case-sensitive
verbs, percent-decoded names, the query string inside the match, empty bodies for
some early errors) are easier to reproduce with two regexes.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, input_pb2

from pyserving import metrics, tensors, tracing
from pyserving.concurrency import run_sized, run_sync
from pyserving.errors import INTERNAL_ERROR, Code, ServingError, invalid_argument
from pyserving.protocols.tfs import bodies
from pyserving.protocols.tfs.json import examples, predict_request, predict_response
from pyserving.protocols.tfs.json.document import encode_error, signature_name
from pyserving.serving import DataPlane, ModelSpec, PredictResult, Target, VersionStatus
from pyserving.transports import http
from pyserving.workers.codecs import CodecProcesses

__all__ = ["NOT_FOUND_RESPONSE", "PREFIX", "RestApi", "RestSettings"]

log = logging.getLogger("pyserving")

PREFIX = "/v1/"  # mounted case-insensitively, as TF Serving matches it
_POST = re.compile(r"(?i)/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)")
_GET = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?")
_ORIGIN = re.compile(r"https?://.*")
# A traced call's http.route: its route template (one per verb, version or label optional).
_ROUTES = {
    verb: f"/v1/models/{{model_name}}[/versions/{{version}}|/labels/{{label}}]:{verb}"
    for verb in ("predict", "classify", "regress")
}
# TF Serving's limit on a gunzipped request body.
MAX_UNCOMPRESSED_BYTES = 100 * 1024 * 1024
_MAX_VERSION = 2**63 - 1

_JSON_HEADERS = [(b"content-type", b"application/json")]
_CORS_HEADERS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"POST, GET"),
    (b"access-control-allow-headers", b"Content-Type"),
]
# The rest of an oversized body is never read, so the connection cannot be reused.
_CLOSE = [(b"connection", b"close")]
# libevent's default error page, which TF Serving returns for paths outside /v1/.
NOT_FOUND_RESPONSE = (
    404,
    b"<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n</BODY></HTML>\n",
    [(b"content-type", b"text/html; charset=ISO-8859-1")],
)


class _EmptyBodyError(Exception):
    """An early routing error TF Serving answers with a 400 and no body."""


@dataclass(frozen=True)
class RestSettings:
    timeout_ms: int = 0
    cors: bool = False
    max_body_bytes: int = 64 * 1024 * 1024


class RestApi:
    """ASGI app serving `/v1/models/...`: predict, classify, regress, status and metadata."""

    def __init__(
        self,
        dataplane: DataPlane,
        pool: ThreadPoolExecutor,
        settings: RestSettings,
        codecs: CodecProcesses | None = None,
    ) -> None:
        self._dataplane = dataplane
        self._pool = pool
        self._codecs = codecs
        self._settings = settings
        self._cors = _CORS_HEADERS if settings.cors else []
        self._json_headers = _JSON_HEADERS + self._cors

    async def __call__(self, scope: http.Scope, receive: http.Receive, send: http.Send) -> None:
        """ASGI entry point."""
        method = scope["method"]
        if method == "OPTIONS":
            origin = http.header(scope, b"origin")
            ok = origin is not None and _ORIGIN.fullmatch(origin.decode("latin-1"))
            await http.respond(send, 200 if ok else 400, b"", self._cors)
            return
        try:
            body = await http.read_body(receive, scope, self._settings.max_body_bytes)
            encoding = http.header(scope, b"content-encoding")
            if encoding is not None and b"gzip" in encoding:
                body = _gunzip(body)
        except http.ClientGone:
            return
        except http.BodyTooLarge:
            message = f"Request body exceeds the limit of {self._settings.max_body_bytes} bytes"
            await http.respond(send, 413, encode_error(message), self._json_headers + _CLOSE)
            return
        except ServingError as exc:
            await http.respond(send, exc.http_status, encode_error(exc.message), self._json_headers)
            return
        status, payload = await self._handle(method, http.request_target(scope), body, scope)
        await http.respond(send, status, payload, self._json_headers)

    async def _handle(self, method: str, path: str, body: bytes, scope: http.Scope) -> tuple[int, bytes]:
        """Route and run one request; records request_count and request_latency, and its tracing span."""
        started = time.perf_counter()
        model, api, code = "", "", Code.OK
        try:
            model, api, run = self._route(method, path)
            if api and tracing.enabled:  # predict, classify, regress
                with tracing.rest_span(api.capitalize(), scope["headers"], _ROUTES[api], model):
                    status, payload = 200, await run(body)
            else:
                status, payload = 200, await run(body)
        except _EmptyBodyError:
            code, status, payload = Code.INVALID_ARGUMENT, 400, b""
        except ServingError as exc:
            code, status, payload = exc.code, exc.http_status, encode_error(exc.message)
        except Exception:  # a bug answers 500 (no Python details), not a dropped connection; logged once
            log.exception("Unexpected error handling %s %s", method, path)
            code, status, payload = Code.INTERNAL, 500, encode_error(INTERNAL_ERROR)
        if code == Code.OK:  # a configured model answered
            metrics.REQUEST_COUNT.inc(model, code.name)
            metrics.REQUEST_LATENCY.observe(model, api, "REST", value=(time.perf_counter() - started) * 1e6)
        else:
            metrics.REQUEST_COUNT.inc(self._dataplane.metric_label(model), code.name)
        return status, payload

    def _route(self, method: str, path: str) -> tuple[str, str, Callable[[bytes], Awaitable[bytes]]]:
        """(model name, API label, handler of the body) for a request."""
        if method == "POST":
            match = _POST.fullmatch(path)
            verb = match.group(4) if match else ""
            if match and verb in ("predict", "classify", "regress"):  # the prefix ignores case, verbs do not
                spec = _model_spec(*match.group(1, 2, 3))
                if verb == "predict":
                    return spec.name, verb, functools.partial(self._predict, spec)
                return spec.name, verb, functools.partial(self._classify_or_regress, verb, spec)
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
        """The hot path: codecs inline for small bodies, the session call off the loop; a big body is parsed and
        decoded, a big answer written, in a codec process."""
        codecs = self._codecs
        if codecs is not None and codecs.wanted(len(body)):
            try:
                target = self._dataplane.resolve(spec)
            except ServingError:
                await codecs.run(bodies.CHECK_PREDICT, body)  # a parse error comes first, as in TF Serving
                raise
            with target:
                key, inputs = await codecs.run(bodies.DECODE_PREDICT, body, dict(target.signature_defs))
                result = await self._run_predict(target, key, inputs, len(body))
        else:
            doc = await run_sized(self._pool, len(body), predict_request.parse_predict, body)
            key = signature_name(doc)
            with self._dataplane.resolve(spec) as target:
                signature = bodies.predict_signature(target.signature_defs, key)
                inputs = await run_sized(
                    self._pool, len(body), predict_request.decode_predict, doc, signature, key, body
                )
                result = await self._run_predict(target, key, inputs, len(body))
        fmt = inputs.format
        del inputs  # (arrays from a codec process map /dev/shm files: freed before the answer takes room there)
        size = predict_response.encoded_size(result.outputs)
        if codecs is not None and codecs.wanted(size):
            answer = await codecs.run(bodies.ENCODE_PREDICT, result.outputs, fmt)
            return await run_sync(self._pool, bytes, answer)  # from its shared memory (ASGI servers want bytes)
        return await run_sized(self._pool, size, predict_response.encode_predict, result.outputs, fmt)

    async def _run_predict(
        self, target: Target, key: str, inputs: predict_request.PredictInputs, body_size: int
    ) -> PredictResult:
        _check_decoded(inputs.tensors, body_size, self._dataplane.max_decoded_bytes)
        return await self._dataplane.predict(
            target, key, inputs.tensors, timeout_ms=self._settings.timeout_ms, executor=self._pool
        )

    async def _classify_or_regress(self, verb: str, spec: ModelSpec, body: bytes) -> bytes:
        """Whole on a worker thread; a big body is parsed and decoded in a codec process first."""
        decoded = None
        if self._codecs is not None and self._codecs.wanted(len(body)):
            decoded = await self._codecs.run(bodies.DECODE_EXAMPLES, body)
        return await run_sync(self._pool, self._run_classify_or_regress, verb, spec, body, decoded)

    def _run_classify_or_regress(
        self, verb: str, spec: ModelSpec, body: bytes, decoded: tuple[str, input_pb2.Input] | None
    ) -> bytes:
        key, request_input = decoded if decoded is not None else bodies.decode_examples(body)
        timeout_ms = self._settings.timeout_ms
        with self._dataplane.resolve(spec) as target:
            if verb == "classify":
                _, classification = self._dataplane.classify(target, key, request_input, timeout_ms)
                return examples.encode_classification(classification)
            _, regression = self._dataplane.regress(target, key, request_input, timeout_ms)
            return examples.encode_regression(regression)

    def _metadata(self, spec: ModelSpec) -> bytes:
        with self._dataplane.resolve(spec) as target:
            signature_map = get_model_metadata_pb2.SignatureDefMap(signature_def=target.signature_defs)
            version = target.version
        model_spec = {"name": spec.name, "signature_name": "", "version": str(version)}
        signatures = json_format.MessageToDict(
            signature_map, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        # Hand-assembled around two protobuf JSON dumps, exactly as TF Serving does.
        return (
            '{\n"model_spec":'
            + _proto_json(model_spec)
            + ',\n"metadata": {"signature_def": '
            + _proto_json(signatures)
            + "}\n}\n"
        ).encode()

    def _status(self, spec: ModelSpec) -> bytes:
        statuses = self._dataplane.status(spec.name, spec.version)
        return _proto_json({"model_version_status": [_status_json(s) for s in statuses]}).encode()


def _check_decoded(arrays: dict[str, np.ndarray], body_bytes: int, max_bytes: int) -> None:
    """--max_decoded_tensor_bytes for JSON tensors. JSON cannot describe more than about 4 bytes of tensor
    per byte of body (`1,` as an int64), so the tensors exist by now; strings are counted exactly only
    when the buffers plus the whole body (which holds every string) come near the limit."""
    if max_bytes > 0 and sum(a.nbytes for a in arrays.values()) + body_bytes > max_bytes:
        tensors.check_decoded_bytes(((n, a.shape, tensors.decoded_nbytes(a)) for n, a in arrays.items()), max_bytes)


def _proto_json(document: dict[str, Any]) -> str:
    """protobuf's C++ JSON printer with add_whitespace: 1-space indent, trailing newline."""
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def _status_json(status: VersionStatus) -> dict[str, Any]:
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
        number = int(version)  # the route's regex allows digits only
        if number > _MAX_VERSION:  # does not fit int64
            raise _EmptyBodyError()
    return ModelSpec(unquote(name), number, unquote(label) if label is not None else None)


def _gunzip(body: bytes) -> bytes:
    """Gunzip with TF Serving's 100 MiB cap; like TF Serving, a body that fails becomes empty."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = decompressor.decompress(body, MAX_UNCOMPRESSED_BYTES + 1)
    except zlib.error:
        return b""
    if len(data) > MAX_UNCOMPRESSED_BYTES or decompressor.unconsumed_tail:
        raise invalid_argument(f"Request body exceeds {MAX_UNCOMPRESSED_BYTES} bytes after gzip decompression")
    return data
