"""Codec processes (`workers.codecs`): real children, started and killed here; and the whole-body functions they run."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving.errors import Code, ServingError
from pyserving.protocols.tfs import bodies
from pyserving.protocols.tfs.json import predict_response
from pyserving.protocols.v2 import bodies as v2_bodies
from pyserving.workers import codecs as codecs_module
from pyserving.workers.codecs import CodecProcesses


def _signatures() -> dict[str, meta_graph_pb2.SignatureDef]:
    signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    signature.inputs["x"].name = "x:0"
    signature.inputs["x"].dtype = types_pb2.DT_FLOAT
    signature.outputs["y"].name = "y:0"
    signature.outputs["y"].dtype = types_pb2.DT_FLOAT
    return {"serving_default": signature}


def _run(coroutine_function, count: int = 1):
    """Run `coroutine_function(codecs)` with `count` codec processes (bodies from 1 byte); stop them after."""

    async def main():
        codecs = CodecProcesses(count, 1)
        try:
            return await coroutine_function(codecs)
        finally:
            await codecs.close()

    return asyncio.run(main())


def test_a_predict_body_decodes_in_the_child_exactly_as_here():
    body = b'{"instances": [' + b", ".join(b"%d.5" % i for i in range(300_000)) + b"]}"

    async def check(codecs):
        pid = await codecs.run("os:getpid")
        key, inputs = await codecs.run(bodies.DECODE_PREDICT, body, _signatures())
        return pid, key, inputs

    pid, key, inputs = _run(check)
    assert pid != os.getpid()
    here_key, here = bodies.decode_predict_body(body, _signatures())
    assert (key, inputs.format) == (here_key, here.format) == ("", "row")
    assert inputs.tensors["x"].dtype == np.float32 and inputs.tensors["x"].shape == (300_000,)
    np.testing.assert_array_equal(inputs.tensors["x"], here.tensors["x"])
    inputs.tensors["x"][0] = 7.0  # writable, as decoded here


def test_the_childs_errors_are_tf_servings_and_nothing_else():
    hostile = b'{"signature_name": 5, "inputs": [' + b"1, " * 1000 + b"1]}"
    calls = [
        (bodies.decode_predict_body, (hostile, _signatures())),
        (bodies.check_predict, (b"[1.0]",)),
        (bodies.decode_predict_body, (b'{"signature_name": "nope", "instances": [1.0]}', _signatures())),
        (bodies.decode_examples, (b'{"examples": 3}',)),
    ]
    expected = []
    for function, args in calls:
        with pytest.raises(ServingError) as here:
            function(*args)
        expected.append((here.value.code, here.value.message))

    async def check(codecs):
        errors = []
        names = [bodies.DECODE_PREDICT, bodies.CHECK_PREDICT, bodies.DECODE_PREDICT, bodies.DECODE_EXAMPLES]
        # The last is not a ServingError: a bug, whose details stay in the child's log.
        for function, args in [*zip(names, [args for _, args in calls], strict=True), ("json:loads", (b"{",))]:
            with pytest.raises(ServingError) as caught:
                await codecs.run(function, *args)
            errors.append((caught.value.code, caught.value.message))
        return errors

    errors = _run(check)
    assert errors[:4] == expected
    assert expected[0][1].startswith('JSON Value: {\n    "signature_name": 5,')
    assert expected[1] == (Code.INVALID_ARGUMENT, "JSON Value: [1.0] Is not object")
    assert expected[2] == (Code.INVALID_ARGUMENT, 'Serving signature name: "nope" not found in signature def')
    assert errors[4] == (Code.INTERNAL, "Internal error")


def test_a_big_answer_comes_back_through_shared_memory_exactly():
    outputs = {"y": np.linspace(-3.0, 3.0, 400_000, dtype=np.float32)}

    async def check(codecs):
        return await codecs.run(bodies.ENCODE_PREDICT, outputs, "row")

    answer = _run(check)
    assert isinstance(answer, memoryview)  # out of band: mapped, not copied through the socket
    assert bytes(answer) == predict_response.encode_predict(outputs, "row")


def test_a_child_killed_in_a_call_fails_that_call_and_the_waiting_call_starts_another():
    async def check(codecs):
        first = await codecs.run("os:getpid")
        call = asyncio.ensure_future(codecs.run("time:sleep", 30))
        waiting = asyncio.ensure_future(codecs.run("os:getpid"))  # one process: it waits for the first call
        await asyncio.sleep(0.3)
        assert not waiting.done()
        os.kill(first, signal.SIGKILL)
        with pytest.raises(ServingError) as caught:
            await asyncio.wait_for(call, 10)
        second = await asyncio.wait_for(waiting, 30)
        return first, second, caught.value

    first, second, error = _run(check)
    assert second != first
    assert (error.code, error.message) == (
        Code.RESOURCE_EXHAUSTED,
        "The request could not be handled: its codec process stopped (killed by signal 9)",
    )


def test_a_cancelled_caller_leaves_the_child_in_step():
    """The child's answer to a call whose caller went away is still read, so the next call gets its own."""

    async def check(codecs):
        pid = await codecs.run("os:getpid")
        call = asyncio.ensure_future(codecs.run("time:sleep", 0.5))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return pid, await codecs.run("os:getpid"), await codecs.run("operator:add", 2, 3)

    pid, again, total = _run(check)
    assert (again, total) == (pid, 5)


def test_calls_beyond_the_process_count_wait_their_turn():
    async def check(codecs):
        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(codecs.run("time:sleep", 0.3) for _ in range(3)))
        return asyncio.get_running_loop().time() - started, len({await codecs.run("os:getpid") for _ in range(3)})

    elapsed, pids = _run(check)
    assert elapsed >= 0.9 and pids == 1  # one process (the count), three calls one after the other


@pytest.mark.parametrize(
    ("count", "min_bytes", "size", "wanted"),
    [(1, 100, 99, False), (1, 100, 100, True), (0, 100, 10**9, False), (1, 0, 10**9, False)],
)
def test_which_bodies_go_to_a_codec_process(count, min_bytes, size, wanted):
    assert CodecProcesses(count, min_bytes).wanted(size) is wanted


def test_examples_bodies_decode_to_the_input_proto():
    body = b'{"signature_name": "s", "examples": [{"x": 1.5}, {"x": [2, 3]}]}'
    key, request_input = bodies.decode_examples(memoryview(body))
    assert key == "s"
    features = [e.features.feature["x"] for e in request_input.example_list.examples]
    assert [list(f.float_list.value) for f in features] == [[1.5], []]
    assert [list(f.int64_list.value) for f in features] == [[], [2, 3]]


def test_an_infer_body_decodes_in_the_child_exactly_as_here():
    rows = 100_000
    header = orjson.dumps(
        {"id": "7", "inputs": [{"name": "x", "shape": [rows], "datatype": "FP32", "data": [0.25] * rows}]}
    )
    raw = np.arange(3, dtype=np.float32).tobytes()
    binary = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}]}
    )
    bad_parameter = orjson.dumps({"parameters": {"signature_name": 3}, "inputs": []})

    async def check(codecs):
        decoded = await codecs.run(v2_bodies.DECODE_INFER, header, None, "m", "", _signatures(), 0)
        from_raw = await codecs.run(
            v2_bodies.DECODE_INFER, binary + raw, str(len(binary)).encode(), "m", "2", _signatures(), 0
        )
        with pytest.raises(ServingError) as caught:
            await codecs.run(v2_bodies.CHECK_INFER, bad_parameter, None, "m", "")
        return decoded, from_raw, caught.value

    (request, key, arrays), (_, _, raw_arrays), error = _run(check)
    assert (request.id, request.inputs, key) == ("7", [], "serving_default")
    np.testing.assert_array_equal(arrays["x"], np.full(rows, 0.25, np.float32))
    np.testing.assert_array_equal(raw_arrays["x"], np.arange(3, dtype=np.float32))
    assert (error.code, error.message) == (Code.INVALID_ARGUMENT, "parameter 'signature_name' must be a string")


def test_group_signals_are_left_to_the_serving_process():
    """SIGTERM/SIGINT/SIGHUP sent to the whole process group (systemd's stop, Ctrl-C) must not stop a codec
    process while the serving process may still drain calls that need it."""

    async def check(codecs):
        pid = await codecs.run("os:getpid")
        call = asyncio.ensure_future(codecs.run("time:sleep", 0.5))
        await asyncio.sleep(0.2)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(pid, signum)
        await call
        return pid, await codecs.run("os:getpid")

    pid, again = _run(check)
    assert again == pid


def test_a_child_that_died_while_idle_is_replaced_without_failing_a_call():
    async def check(codecs):
        first = await codecs.run("os:getpid")
        os.kill(first, signal.SIGKILL)
        await asyncio.sleep(0.3)
        return first, await codecs.run("os:getpid")

    first, second = _run(check)
    assert second not in (first, os.getpid())


def test_when_no_child_can_start_calls_run_here_and_big_bodies_stay_here_a_while(monkeypatch):
    monkeypatch.setattr(codecs_module.sys, "executable", "/nonexistent/python")

    async def check(codecs):
        pid = await codecs.run("os:getpid")
        return pid, codecs.wanted(10**6)

    pid, wanted = _run(check)
    assert (pid, wanted) == (os.getpid(), False)


def test_folders_of_killed_children_are_swept_and_live_ones_kept(tmp_path):
    dead, live, starting = (tmp_path / f"pyserving-codec-{name}" for name in ("dead", "live", "starting"))
    for folder in (dead, live, starting):
        folder.mkdir()
    for folder in (dead, live):
        (folder / ".lock").touch()
        (folder / "t-1-a-0").write_bytes(b"tensor")
    held = os.open(live / ".lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        old = time.time() - 3600
        for folder in (dead, live):
            os.utime(folder, (old, old))
        codecs_module._sweep(str(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pyserving-codec-live", "pyserving-codec-starting"]
        os.utime(starting, (old, old))  # no lock after two minutes: killed while starting
        codecs_module._sweep(str(tmp_path))
        assert [p.name for p in tmp_path.iterdir()] == ["pyserving-codec-live"]
    finally:
        os.close(held)


def test_a_closed_child_exits_and_removes_its_folder():
    async def check(codecs):
        pid = await codecs.run("os:getpid")
        folder = codecs._idle[0].shm_dir
        assert Path(folder).is_dir()
        await codecs.close()
        return pid, folder

    pid, folder = _run(check)
    assert not Path(folder).exists() and not Path(f"/proc/{pid}").exists()


def test_deep_infer_parameters_never_travel_between_processes():
    """orjson accepts 1,024 levels; pickle stops near 500: a request's parameters stay where they were parsed."""
    deep = b'{"parameters": {"p": ' + b"[" * 900 + b"]" * 900 + b'}, "inputs": [{"name": "x", "shape": [1], '
    body = deep + b'"datatype": "FP32", "data": [1.5]}], "outputs": [{"name": "y"}]}'

    async def check(codecs):
        return await codecs.run(v2_bodies.DECODE_INFER, body, None, "m", "", _signatures(), 0)

    request, key, arrays = _run(check)
    assert (request.parameters, request.outputs, key, arrays["x"].tolist()) == ({}, ["y"], "serving_default", [1.5])
