"""The Open Inference Protocol's REST side (`/v2/...`) as an ASGI app over `inference`.

Routes: `GET /v2`, `/v2/health/live`, `/v2/health/ready`,
`/v2/models/{m}[/versions/{v}]` (metadata) and `.../ready`, `POST .../infer`,
and the model repository extension (`POST /v2/repository/index`,
`/v2/repository/models/{m}/load|unload`). Infer bodies are JSON, or, with the
binary tensor data extension, a JSON header of `Inference-Header-Content-Length`
bytes followed by the raw tensors; outputs are raw when requested with the
`binary_data` output parameter or the `binary_data_output` request parameter.
Errors are `{"error": "..."}` with the data plane's codes mapped to HTTP as in
TF Serving's API (400 bad request, 404 unknown model, version or path, 503
unavailable, 504 timeout...). A ready check that says no answers 400 with
`"ready": false`: the protocol gives "not ready" a 4xx, and Triton a 400.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import orjson

from pyserving import metrics, tracing
from pyserving.concurrency import run_sized, run_sync
from pyserving.errors import INTERNAL_ERROR, Code, ServingError, not_found
from pyserving.protocols.v2 import bodies
from pyserving.protocols.v2.inference import INFER_SPAN, Inference, model_spec
from pyserving.serving import PredictResult
from pyserving.transports import http
from pyserving.workers.codecs import CodecProcesses

__all__ = ["HEADER_LENGTH", "PREFIX", "V2RestApi", "V2Settings"]

log = logging.getLogger("pyserving")

PREFIX = "/v2"
HEADER_LENGTH = b"inference-header-content-length"
_MODEL = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|infer))?")
_REPOSITORY = re.compile(r"/v2/repository/models/([^/]+)/(load|unload)")
_JSON = [(b"content-type", b"application/json")]
_BINARY = [(b"content-type", b"application/octet-stream")]
_CLOSE = [(b"connection", b"close")]
_OK_EMPTY = b"{}"
_INFER_ROUTE = "/v2/models/{model_name}[/versions/{model_version}]/infer"  # a traced call's http.route


@dataclass(frozen=True)
class V2Settings:
    timeout_ms: int = 0
    max_body_bytes: int = 64 * 1024 * 1024


class _MethodNotAllowed(Exception):
    pass


class V2RestApi:
    """ASGI app serving `/v2...`."""

    def __init__(
        self, inference: Inference, pool: Executor, settings: V2Settings, codecs: CodecProcesses | None = None
    ) -> None:
        self._inference = inference
        self._pool = pool
        self._settings = settings
        self._codecs = codecs

    async def __call__(self, scope: http.Scope, receive: http.Receive, send: http.Send) -> None:
        """ASGI entry point."""
        try:
            body = await http.read_body(receive, scope, self._settings.max_body_bytes)
        except http.ClientGone:
            return
        except http.BodyTooLarge:
            message = f"Request body exceeds the limit of {self._settings.max_body_bytes} bytes"
            await http.respond(send, 413, _error(message), _JSON + _CLOSE)
            return
        status, payload, headers = await self._handle(scope, body)
        await http.respond(send, status, payload, headers)

    async def _handle(self, scope: http.Scope, body: bytes) -> tuple[int, bytes, http.Headers]:
        method, path = scope["method"], scope["path"]
        try:
            return await self._route(method, path, scope, body)
        except ServingError as exc:
            return exc.http_status, _error(exc.message), _JSON
        except _MethodNotAllowed:
            return 405, _error(f"{method} is not allowed on {path}"), _JSON
        except Exception:  # a bug answers 500 (no Python details), logged once
            log.exception("Unexpected error handling %s %s", method, path)
            return 500, _error(INTERNAL_ERROR), _JSON

    async def _route(self, method: str, path: str, scope: http.Scope, body: bytes) -> tuple[int, bytes, http.Headers]:
        inference = self._inference
        match = _MODEL.fullmatch(path)
        if match is not None:
            name, version, verb = match.groups()
            if verb == "infer":
                _allow(method, "POST")
                return await self._infer(name, version or "", scope, body)
            _allow(method, "GET")
            spec = model_spec(name, version or "", {})
            if verb == "ready":
                ready = await run_sync(self._pool, inference.model_ready, spec)
                return 200 if ready else 400, orjson.dumps({"name": name, "ready": ready}), _JSON
            return 200, orjson.dumps(await run_sync(self._pool, inference.model_metadata, spec)), _JSON
        if path in ("/v2", "/v2/"):
            _allow(method, "GET")
            return 200, orjson.dumps(inference.server_metadata()), _JSON
        if path == "/v2/health/live":
            _allow(method, "GET")
            return 200, b'{"live":true}', _JSON
        if path == "/v2/health/ready":
            _allow(method, "GET")
            ready = inference.server_ready()
            return 200 if ready else 400, orjson.dumps({"ready": ready}), _JSON
        if path == "/v2/repository/index":
            _allow(method, "POST")
            ready_only = bodies.json_object(body).get("ready", False) is True if body else False
            return 200, orjson.dumps(await run_sync(self._pool, inference.repository_index, ready_only)), _JSON
        match = _REPOSITORY.fullmatch(path)
        if match is not None:
            _allow(method, "POST")
            name, action = match.groups()
            await run_sync(self._pool, inference.load if action == "load" else inference.unload, name)
            return 200, _OK_EMPTY, _JSON
        raise not_found(f"no Open Inference Protocol route for {path}")

    async def _infer(self, name: str, version: str, scope: http.Scope, body: bytes) -> tuple[int, bytes, http.Headers]:
        """Parse (with the binary extension), run, encode; request metrics as TF Serving's REST API records them.
        A big body is parsed and decoded, a big answer written, in a codec process."""
        started = time.perf_counter()
        code = Code.OK
        codecs = self._codecs
        try:
            with tracing.rest_span(INFER_SPAN, scope["headers"], _INFER_ROUTE, name):
                header = http.header(scope, HEADER_LENGTH)
                if codecs is not None and codecs.wanted(_json_bytes(body, header)):
                    request, result = await self._infer_apart(codecs, name, version, header, body)
                else:
                    request = await run_sized(self._pool, len(body), bodies.parse_infer, body, header)
                    spec = model_spec(name, version, request.parameters)
                    result = await self._inference.infer(
                        spec, request.inputs, request.outputs, len(body), self._settings.timeout_ms
                    )
                size = sum(array.nbytes for array in result.outputs.values())
                if codecs is not None and codecs.wanted(_json_output_bytes(result, request)):
                    described = bodies.described(request)
                    payload, header_length = await codecs.run(bodies.ENCODE_INFER, result, described)
                    payload = await run_sync(self._pool, bytes, payload)  # from its shared memory
                else:
                    payload, header_length = await run_sized(self._pool, size, bodies.encode_infer, result, request)
        except ServingError as exc:
            code = exc.code
            raise
        finally:
            if code == Code.OK:
                metrics.REQUEST_COUNT.inc(name, code.name)
                metrics.REQUEST_LATENCY.observe(name, "infer", "REST", value=(time.perf_counter() - started) * 1e6)
            else:
                metrics.REQUEST_COUNT.inc(self._inference.metric_label(name), code.name)
        if header_length is None:
            return 200, payload, _JSON
        return 200, payload, [*_BINARY, (HEADER_LENGTH, str(header_length).encode())]

    async def _infer_apart(
        self, codecs: CodecProcesses, name: str, version: str, header: bytes | None, body: bytes
    ) -> tuple[bodies.InferRequest, PredictResult]:
        """`_infer`'s first steps with the body parsed and decoded in a codec process."""
        try:
            target = self._inference.resolve(model_spec(name, version, {}))
        except ServingError:
            await codecs.run(bodies.CHECK_INFER, body, header, name, version)  # the body's errors come first
            raise
        with target:
            request, key, arrays = await codecs.run(
                bodies.DECODE_INFER,
                body,
                header,
                name,
                version,
                dict(target.signature_defs),
                self._inference.max_decoded_bytes,
            )
            result = await self._inference.run(target, key, arrays, request.outputs, self._settings.timeout_ms)
        return request, result


def _json_bytes(body: bytes, header_length: bytes | None) -> int:
    """How much of an infer body is JSON (raw tensors after a JSON header cost nothing to parse)."""
    if header_length is not None and header_length.isdigit() and len(header_length) <= 19:
        return min(int(header_length), len(body))
    return len(body)


def _json_output_bytes(result: PredictResult, request: bodies.InferRequest) -> int:
    """The tensor bytes an answer writes as JSON (raw outputs are only joined)."""
    if "*" in request.binary_outputs:
        return 0
    return sum(array.nbytes for name, array in result.outputs.items() if name not in request.binary_outputs)


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _MethodNotAllowed()


def _error(message: str) -> bytes:
    return orjson.dumps({"error": message})
