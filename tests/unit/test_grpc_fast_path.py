"""The cheaper gRPC Predict path: the response written as bytes (exactly the message's deterministic
serialization), passed through the transport's serializer, and the lean worker-thread hop."""

from __future__ import annotations

import asyncio
import contextvars
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
import uvloop
from tensorflow_serving.apis import predict_pb2

from pyserving import tensors
from pyserving.concurrency import run_sync
from pyserving.errors import Code, ServingError
from pyserving.protocols.tfs.protos import effective_spec, predict_response_bytes
from pyserving.transports import grpc as grpc_transport


def _message(model: str, version: int, key: str, outputs: dict, tensor_content: bool) -> predict_pb2.PredictResponse:
    response = predict_pb2.PredictResponse(model_spec=effective_spec(model, version, key))
    for alias, array in outputs.items():
        response.outputs[alias].CopyFrom(tensors.to_proto(array, tensor_content))
    return response


_OUTPUTS = {
    "scores": np.array([[0.25, 0.75]], np.float32),
    "ids": np.array([[3, 1]], np.int64),
    "labels": np.array([[b"cat", b"dog"]], dtype=object),
    "half": np.array([1.5], ml_dtypes.bfloat16),
    "empty": np.zeros((0, 4), np.float64),
    "scalar": np.float32(7.0).reshape(()),
    "big": np.arange(50_000, dtype=np.float32).reshape(50, 1000),
}


@pytest.mark.parametrize("tensor_content", [False, True])
@pytest.mark.parametrize("alias", sorted(_OUTPUTS))
def test_one_output_is_byte_for_byte_the_proto_paths_answer(alias, tensor_content):
    outputs = {alias: _OUTPUTS[alias]}
    expected = _message("m", 3, "serving_default", outputs, tensor_content).SerializeToString()
    assert predict_response_bytes("m", 3, "serving_default", outputs, tensor_content) == expected


@pytest.mark.parametrize("tensor_content", [False, True])
def test_outputs_are_in_the_order_deterministic_serialization_writes(tensor_content):
    """Several outputs: upb writes a map in hash order unless asked to be deterministic; the bytes are those
    of `deterministic=True` (keys bytewise, a key before its own prefixes), whatever order they came in."""
    names = ["y", "", "a", "aa", "ab", "B", "é", "e", "k10", "k9", *sorted(_OUTPUTS)]
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(names)
        outputs = {name: _OUTPUTS.get(name, np.array([len(name)], np.float32)) for name in names}
        message = _message("model-é", 2**40, "sig", outputs, tensor_content)
        ours = predict_response_bytes("model-é", 2**40, "sig", outputs, tensor_content)
        assert ours == message.SerializeToString(deterministic=True)
        assert predict_pb2.PredictResponse.FromString(ours) == message


def test_the_transport_passes_prebuilt_bytes_through_and_serializes_messages():
    message = _message("m", 1, "serving_default", {"y": _OUTPUTS["scores"]}, False)
    serialize = predict_pb2.PredictResponse.SerializeToString
    assert grpc_transport._serialize(serialize, message) == message.SerializeToString()
    assert grpc_transport._serialize(serialize, b"\x12\x03\n\x01m") == b"\x12\x03\n\x01m"


def _on_uvloop(coroutine_function):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine_function())


def test_run_sync_returns_the_result_and_raises_the_exception_of_the_call():
    pool = ThreadPoolExecutor(2)

    def fail() -> None:
        raise ServingError(Code.NOT_FOUND, "Servable not found for request: Latest(m)")

    async def calls() -> tuple:
        value = await run_sync(pool, lambda a, b: (a, b, threading.current_thread().name), 1, "x")
        with pytest.raises(ServingError) as info:
            await run_sync(pool, fail)
        with pytest.raises(RuntimeError, match="^StopIteration raised in a worker thread$"):
            await run_sync(pool, next, iter(()))
        return value, info.value.code, info.value.message

    with pool:
        (a, b, thread), code, message = _on_uvloop(calls)
    assert (a, b, code, message) == (1, "x", Code.NOT_FOUND, "Servable not found for request: Latest(m)")
    assert thread != threading.current_thread().name  # it ran on the pool


def test_run_sync_cancelled_before_its_call_starts_never_makes_it():
    """A cancelled request still queued behind busy workers (a client gone, a deadline passed) does not run."""
    pool = ThreadPoolExecutor(1)
    release = threading.Event()
    ran: list[str] = []

    async def calls() -> None:
        busy = asyncio.ensure_future(run_sync(pool, release.wait, 10))
        queued = asyncio.ensure_future(run_sync(pool, ran.append, "queued"))
        await asyncio.sleep(0.05)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        assert await busy is True
        assert await run_sync(pool, ran.append, "after") is None

    with pool:
        _on_uvloop(calls)
    assert ran == ["after"]


_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def test_run_sync_carries_the_callers_context_variables_to_the_worker():
    pool = ThreadPoolExecutor(1)

    async def calls() -> tuple[str, str]:
        _REQUEST_ID.set("r-17")
        seen = await run_sync(pool, _REQUEST_ID.get)
        return seen, await run_sync(pool, _REQUEST_ID.set, "changed in the worker") and _REQUEST_ID.get()

    with pool:
        assert _on_uvloop(calls) == ("r-17", "r-17")  # the worker's changes stay in its copy
