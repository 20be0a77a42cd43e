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
from typing import Any

import orjson

from pyserving import metrics, tracing
from pyserving.concurrency import run_sized, run_sync
from pyserving.errors import INTERNAL_ERROR, Code, ServingError, invalid_argument, not_found
from pyserving.protocols.v2 import datatypes
from pyserving.protocols.v2.inference import INFER_SPAN, Inference, InputTensor, model_spec
from pyserving.serving import PredictResult
from pyserving.transports import http

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

    def __init__(self, inference: Inference, pool: Executor, settings: V2Settings) -> None:
        self._inference = inference
        self._pool = pool
        self._settings = settings

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
            ready_only = _object(body).get("ready", False) is True if body else False
            return 200, orjson.dumps(await run_sync(self._pool, inference.repository_index, ready_only)), _JSON
        match = _REPOSITORY.fullmatch(path)
        if match is not None:
            _allow(method, "POST")
            name, action = match.groups()
            await run_sync(self._pool, inference.load if action == "load" else inference.unload, name)
            return 200, _OK_EMPTY, _JSON
        raise not_found(f"no Open Inference Protocol route for {path}")

    async def _infer(self, name: str, version: str, scope: http.Scope, body: bytes) -> tuple[int, bytes, http.Headers]:
        """Parse (with the binary extension), run, encode; request metrics as TF Serving's REST API records them."""
        started = time.perf_counter()
        code = Code.OK
        try:
            with tracing.rest_span(INFER_SPAN, scope["headers"], _INFER_ROUTE, name):
                request = await run_sized(self._pool, len(body), _parse_infer, body, http.header(scope, HEADER_LENGTH))
                spec = model_spec(name, version, request.parameters)
                result = await self._inference.infer(
                    spec, request.inputs, request.outputs, len(body), self._settings.timeout_ms
                )
                size = sum(array.nbytes for array in result.outputs.values())
                payload, header_length = await run_sized(self._pool, size, _encode_infer, result, request)
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


@dataclass(slots=True)
class _InferRequest:
    id: str
    parameters: dict[str, Any]
    inputs: list[InputTensor]
    outputs: list[str]
    binary_outputs: set[str]


def _parse_infer(body: bytes, header_length: bytes | None) -> _InferRequest:
    """An infer body: JSON, or a JSON header and the inputs' raw bytes after it."""
    raw = memoryview(body)[:0]
    head: bytes | memoryview = body
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise invalid_argument(
                f"Inference-Header-Content-Length {header_length.decode('latin-1')!r} is not a length "
                f"within the {len(body)}-byte body"
            )
        head, raw = memoryview(body)[: int(header_length)], memoryview(body)[int(header_length) :]
    doc = _object(head)
    parameters = _field(doc, "parameters", dict, {})
    request_id = _field(doc, "id", str, "")
    inputs, offset = [], 0
    for entry in _field(doc, "inputs", list, None):
        if not isinstance(entry, dict):
            raise invalid_argument("each of 'inputs' must be an object")
        name = _field(entry, "name", str, None)
        datatype = _field(entry, "datatype", str, None)
        shape = _field(entry, "shape", list, None)
        size = _field(entry, "parameters", dict, {}).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(raw):
                raise invalid_argument(f"input '{name}': binary_data_size {size} is beyond the binary data")
            inputs.append(InputTensor(name, datatype, shape, raw[offset : offset + size], "raw"))
            offset += size
        elif "data" in entry:
            inputs.append(InputTensor(name, datatype, shape, entry["data"], "json"))
        else:
            raise invalid_argument(f"input '{name}' has neither 'data' nor the binary_data_size parameter")
    if offset != len(raw):
        raise invalid_argument(f"{len(raw) - offset} bytes of binary data after the inputs' binary_data_size")
    binary_default = parameters.get("binary_data_output", False) is True
    outputs, binary_outputs = [], set()
    for entry in _field(doc, "outputs", list, []):
        if not isinstance(entry, dict):
            raise invalid_argument("each of 'outputs' must be an object")
        name = _field(entry, "name", str, None)
        outputs.append(name)
        if _field(entry, "parameters", dict, {}).get("binary_data", binary_default) is True:
            binary_outputs.add(name)
    if not outputs and binary_default:
        binary_outputs = {"*"}
    return _InferRequest(request_id, parameters, inputs, outputs, binary_outputs)


def _encode_infer(result: PredictResult, request: _InferRequest) -> tuple[bytes, int | None]:
    """(body, JSON header length when raw outputs follow it)."""
    every = "*" in request.binary_outputs
    described, raws = [], []
    for name, array in result.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatypes.datatype_of(array), "shape": list(array.shape)}
        if every or name in request.binary_outputs:
            raw = datatypes.to_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            entry["data"] = datatypes.to_json(name, array)
        described.append(entry)
    doc: dict[str, Any] = {"model_name": result.model, "model_version": str(result.version)}
    if request.id:
        doc["id"] = request.id
    doc["outputs"] = described
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not raws:
        return head, None
    return b"".join([head, *raws]), len(head)


def _object(data: bytes | memoryview) -> dict[str, Any]:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise invalid_argument(f"failed to parse the request JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid_argument("the request JSON must be an object")
    return doc


def _field(doc: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = doc.get(key, default)
    if value is None:
        raise invalid_argument(f"missing '{key}'")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = _KINDS[kind]
        raise invalid_argument(f"'{key}' must be {'an' if what[0] in 'aeiou' else 'a'} {what}")
    return value


_KINDS = {dict: "object", list: "array", str: "string", int: "integer"}


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _MethodNotAllowed()


def _error(message: str) -> bytes:
    return orjson.dumps({"error": message})
