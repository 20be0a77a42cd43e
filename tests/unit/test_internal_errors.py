"""Errors that are not ServingErrors (bugs) reach clients as a generic message, never Python's text."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from helpers import DoublingServable

from pyserving.errors import Code, ServingError, c_escape
from pyserving.protocols.tfs import grpc_api
from pyserving.protocols.tfs.json.examples import decode_input
from pyserving.protocols.tfs.rest_api import RestApi, RestSettings
from pyserving.runtimes.batching import Batcher, BatchingOptions

_PYTHON_DETAILS = ("Error'", "<class", "Traceback", "codec can't", "KeyError", "boom")


class _Buggy:
    """A data plane (or servable) whose every call fails with a Python exception."""

    runtime = "numpy"
    signature_defs = DoublingServable().signature_defs

    def resolve(self, spec: object) -> None:
        raise KeyError("boom <class 'x'>")

    def metric_label(self, name: str) -> str:
        return ""

    def run(self, *args: object) -> None:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "boom")


def test_rest_answers_a_bug_with_a_bare_500_and_logs_it_once(caplog):
    api = RestApi(_Buggy(), ThreadPoolExecutor(1), RestSettings())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="pyserving"):
        request = ("POST", "/v1/models/m:predict", b'{"instances": [1.0]}', {"headers": []})
        status, body = asyncio.run(api._handle(*request))
    assert (status, body) == (500, b'{\n    "error": "Internal error"\n}')
    assert [r.exc_info[0] for r in caplog.records] == [KeyError]


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise _Aborted()


def _unary(work_error: Exception) -> tuple[grpc.StatusCode, str] | None:
    async def work() -> None:
        raise work_error

    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(grpc_api._unary(work(), object(), context))  # type: ignore[arg-type]
    return context.status


def test_grpc_answers_a_bug_with_internal_and_no_python_text(caplog):
    with caplog.at_level(logging.ERROR, logger="pyserving"):
        assert _unary(ValueError("boom <class 'ValueError'>")) == (grpc.StatusCode.INTERNAL, "Internal error")
    assert [r.exc_info[0] for r in caplog.records] == [ValueError]
    assert _unary(ServingError(Code.INVALID_ARGUMENT, "tensor parsing error: x")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor parsing error: x",
    )


def test_grpc_messages_holding_bytes_that_are_not_utf8_are_sendable():
    """TF quotes a request's bytes; kept as surrogates for REST, they become U+FFFD for gRPC."""
    message = b"Could not parse example input, value: '\xff'".decode("utf-8", "surrogateescape")
    assert _unary(ServingError(Code.INVALID_ARGUMENT, message)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Could not parse example input, value: '\ufffd'",
    )


def test_a_batch_that_fails_with_a_bug_gives_every_caller_a_bare_internal_error():
    batcher = Batcher(BatchingOptions(max_batch_size=8, num_batch_threads=1))
    try:
        with pytest.raises(ServingError) as info:
            batcher.wrap(_Buggy()).run("double", {"x": np.ones(1, np.float32)}, ["y"], 0)  # type: ignore[arg-type]
    finally:
        batcher.stop()
    assert (info.value.code, info.value.message) == (Code.INTERNAL, "Internal error")
    assert not any(word in info.value.message for word in _PYTHON_DETAILS)


def test_bytes_in_messages_are_c_escaped_not_python_reprs():
    assert c_escape(b'ab "q" \\ \n\t\xff\x00\x7f') == 'ab \\"q\\" \\\\ \\n\\t\\xff\\x00\\x7f'


def test_a_feature_name_with_invalid_utf8_is_named_without_python_repr():
    name = b"a\xffb".decode("utf-8", "surrogateescape")  # how the JSON parser hands over invalid UTF-8
    with pytest.raises(ServingError) as error:
        decode_input({"examples": [{name: [1.0]}]})
    assert error.value.message == 'Feature name "a\\xffb" is not valid UTF-8'
