"""The HTTP transport's router: mounted apps by path, TF Serving's matching rules, the not-found answer."""

from __future__ import annotations

import asyncio

import pytest

from pyserving.transports.http import BodyTooLarge, Router, read_body, request_target, respond


def _app(name: str):
    async def app(scope, receive, send):
        await respond(send, 200, name.encode(), [])

    return app


def _call(app, method: str, path: str, query: bytes = b"") -> tuple[int, bytes]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": [],
    }
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], sent[1]["body"]


@pytest.fixture()
def router() -> Router:
    router = Router(not_found=(404, b"nope", []))
    router.route("/healthz", _app("health"), methods=["GET"])
    router.route("/metrics", _app("metrics"))
    router.mount("/v1/", _app("tfs"), ignore_case=True)
    return router


@pytest.mark.parametrize(
    ("method", "path", "query", "answer"),
    [
        ("GET", "/healthz", b"", (200, b"health")),
        ("POST", "/healthz", b"", (404, b"nope")),  # routes can be limited to methods
        ("GET", "/healthz", b"x=1", (404, b"nope")),  # the query string is part of the match, as in TF Serving
        ("POST", "/metrics", b"", (200, b"metrics")),
        ("POST", "/v1/models/m:predict", b"", (200, b"tfs")),
        ("GET", "/V1/MODELS/m", b"", (200, b"tfs")),  # TF Serving's prefix is case-insensitive
        ("GET", "/v1", b"", (404, b"nope")),
        ("GET", "/v2/models/m", b"", (404, b"nope")),
    ],
)
def test_dispatch(router, method, path, query, answer):
    assert _call(router, method, path, query) == answer


def test_request_target_keeps_the_encoded_path_and_the_query():
    scope = {"path": "/v1/models/a b", "raw_path": b"/v1/models/a%20b", "query_string": b"q=1"}
    assert request_target(scope) == "/v1/models/a%20b?q=1"


def test_read_body_enforces_the_limit_before_and_while_reading():
    chunks = [
        {"type": "http.request", "body": b"x" * 6, "more_body": True},
        {"type": "http.request", "body": b"x" * 6, "more_body": False},
    ]

    async def receive():
        return chunks.pop(0)

    async def read(headers, limit):
        return await read_body(receive, {"headers": headers}, limit)

    with pytest.raises(BodyTooLarge):  # the declared length alone is enough to refuse
        asyncio.run(read([(b"content-length", b"100")], 10))
    with pytest.raises(BodyTooLarge):  # a body without a length is counted as it arrives
        asyncio.run(read([], 10))
