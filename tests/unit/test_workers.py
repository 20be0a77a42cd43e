"""`--num_workers` pieces that run in one process: the frames, the generation counter, merged metrics, the flag."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from pyserving import flags, metrics
from pyserving.errors import Code, ServingError
from pyserving.workers import wire


def _roundtrip(message, tmp_path):
    parts = wire.encode(message, str(tmp_path))
    frame = b"".join(bytes(part) for part in parts)
    assert int.from_bytes(frame[:4], "little") == len(frame) - 4
    return wire.decode(bytearray(frame[4:]), str(tmp_path))


def test_small_arrays_travel_inline_and_come_back_writable(tmp_path):
    inputs = {"x": np.array([[1.5], [2.5]], dtype=np.float32), "n": np.arange(3, dtype=np.int64)}
    kind, call_id, method, args = _roundtrip((wire.REQUEST, 7, "predict", ("m", 3, "", inputs, ["y"], 100)), tmp_path)
    assert (kind, call_id, method, args[:3], args[4:]) == (wire.REQUEST, 7, "predict", ("m", 3, ""), (["y"], 100))
    np.testing.assert_array_equal(args[3]["x"], inputs["x"])
    assert args[3]["x"].dtype == np.float32 and args[3]["n"].dtype == np.int64
    args[3]["x"][0, 0] = 9.0  # a servable may write into its inputs, as in one process
    assert os.listdir(tmp_path) == []  # nothing went through a file


def test_big_arrays_travel_in_one_shared_file_that_the_receiver_unlinks(tmp_path):
    big = np.arange(wire.SHM_THRESHOLD // 4 + 3, dtype=np.float32)  # just over the threshold
    other = np.arange(wire.SHM_THRESHOLD, dtype=np.uint8).reshape(2, -1)  # and a second one: one file for both
    small = np.array([b"a", b"bc"], dtype=object)  # strings are pickled in the frame
    parts = wire.encode((wire.REPLY, 1, {"a": big, "b": other, "s": small}), str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1
    frame = bytearray(b"".join(bytes(part) for part in parts)[4:])
    assert len(frame) < wire.SHM_THRESHOLD  # the big buffers are not in the frame
    kind, call_id, result = wire.decode(frame, str(tmp_path))
    assert (kind, call_id) == (wire.REPLY, 1)
    np.testing.assert_array_equal(result["a"], big)
    np.testing.assert_array_equal(result["b"], other)
    assert result["s"].tolist() == [b"a", b"bc"]
    result["a"][0] = -1.0  # copy-on-write: writable, and the sender's file (already gone) is untouched
    assert os.listdir(tmp_path) == []


def test_errors_travel_as_code_and_message():
    kind, call_id, detail = wire.error_reply(
        4, ServingError(Code.NOT_FOUND, "Servable not found for request: Latest(x)"), {"pyserving.signature": "s"}
    )
    # With the tracing attributes noted before the error (the worker adds them to its span when tracing is on).
    assert (kind, call_id, detail) == (
        wire.ERROR,
        4,
        (Code.NOT_FOUND.value, "Servable not found for request: Latest(x)", {"pyserving.signature": "s"}),
    )
    with pytest.raises(ServingError) as raised:
        wire.raise_error(detail)
    assert (raised.value.code, raised.value.message) == (Code.NOT_FOUND, "Servable not found for request: Latest(x)")
    # Anything but a ServingError reaches the worker without Python details.
    assert wire.error_reply(5, KeyError("secret")) == (wire.ERROR, 5, (Code.INTERNAL.value, "Internal error", None))


def test_frames_read_from_a_stream_one_at_a_time(tmp_path):
    async def read_two():
        reader = asyncio.StreamReader()
        for message in [(wire.REQUEST, 1, "status", ("m", None)), (wire.REPLY, 1, [1, 2])]:
            for part in wire.encode(message, str(tmp_path)):
                reader.feed_data(bytes(part))
        reader.feed_eof()
        frames = [await wire.read_frame(reader) for _ in range(3)]
        return [wire.decode(frame, str(tmp_path)) if frame is not None else None for frame in frames]

    assert asyncio.run(read_two()) == [(wire.REQUEST, 1, "status", ("m", None)), (wire.REPLY, 1, [1, 2]), None]


def test_the_generation_is_shared_through_its_file(tmp_path):
    writer = wire.Generation(str(tmp_path / "generation"), create=True)
    reader = wire.Generation(str(tmp_path / "generation"), create=False)
    assert (writer.read(), reader.read()) == (0, 0)
    writer.bump()
    writer.bump()
    assert reader.read() == 2


def test_the_merged_scrape_adds_other_processes_counters_and_histograms():
    metrics.REQUEST_COUNT.inc("merge-test", "OK", amount=2)
    metrics.REQUEST_LATENCY.observe("merge-test", "predict", "REST", value=15.0)
    other = {
        metrics.REQUEST_COUNT.name: {("merge-test", "OK"): 3.0, ("merge-test", "NOT_FOUND"): 1.0},
        metrics.REQUEST_LATENCY.name: metrics.REQUEST_LATENCY.state(),  # the same series again: doubled
    }
    lines = metrics.exposition([other]).decode().splitlines()
    assert ':tensorflow:serving:request_count{model_name="merge-test",status="OK"} 5.0' in lines
    assert ':tensorflow:serving:request_count{model_name="merge-test",status="NOT_FOUND"} 1.0' in lines
    count = ':tensorflow:serving:request_latency_count{API="predict",entrypoint="REST",model_name="merge-test"} '
    assert [line for line in lines if line.startswith(count)] == [count + "2.0"]
    assert set(metrics.state()) >= {metrics.REQUEST_COUNT.name, metrics.REQUEST_LATENCY.name}


@pytest.mark.parametrize(("text", "count"), [("1", 1), ("2", 2), (" 3 ", 3), ("auto", os.cpu_count() or 1)])
def test_num_workers_values(text, count):
    assert flags.Options(num_workers=text).worker_count() == count


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5", "", "1025", "٣"])
def test_bad_num_workers_values_name_the_flag(text):
    with pytest.raises(ServingError) as raised:
        flags.Options(num_workers=text).worker_count()
    assert raised.value.code == Code.INVALID_ARGUMENT
    assert raised.value.message == f"--num_workers={text} must be auto or a whole number from 1 to 1024"


def test_every_numeric_dtype_and_layout_comes_back_exactly(tmp_path):
    arrays = {
        "bool": np.array([True, False]),
        "int8": np.array([-3, 4], dtype=np.int8),
        "uint64": np.array([2**64 - 1], dtype=np.uint64),
        "half": np.array([[0.5, -1.0]], dtype=np.float16),
        "big_endian": np.array([1.5, 2.5], dtype=">f8"),
        "complex": np.array([1 + 2j], dtype=np.complex64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "scalar": np.array(7, dtype=np.int32),
        "transposed": np.arange(6, dtype=np.int32).reshape(2, 3).T,  # not C-contiguous: numpy's own reduction
        "datetime": np.array(["2024-01-02"], dtype="datetime64[D]"),
    }
    back = _roundtrip(arrays, tmp_path)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        np.testing.assert_array_equal(back[name], array)


def test_the_sweep_removes_only_run_directories_that_killed_servers_left(tmp_path):
    import socket

    from pyserving.workers import supervisor

    def run_dir(name: str) -> Path:
        path = tmp_path / f"pyserving-run-{name}"
        path.mkdir()
        return path

    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(run_dir("live") / "model.sock"))
    live.listen()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(run_dir("dead") / "model.sock"))  # bound, never listening: what a killed process leaves
    dead.close()
    run_dir("loading")  # a model process still loading its models: no socket yet
    old = run_dir("abandoned")
    os.utime(old, (0, 0))
    (tmp_path / "pyserving-model-cache").mkdir()  # another pyserving folder: never touched
    os.utime(tmp_path / "pyserving-model-cache", (0, 0))
    try:
        supervisor._sweep(str(tmp_path))
    finally:
        live.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pyserving-model-cache",
        "pyserving-run-live",
        "pyserving-run-loading",
    ]


def test_tensors_go_inline_when_shared_memory_has_no_room(tmp_path):
    big = np.arange(wire.SHM_THRESHOLD, dtype=np.float32)
    missing = tmp_path / "gone"  # writing a file there fails, as a full /dev/shm does
    parts = wire.encode((wire.REPLY, 3, {"y": big}), str(missing))
    frame = bytearray(b"".join(bytes(part) for part in parts)[4:])
    assert len(frame) > big.nbytes  # the array is in the frame itself
    kind, call_id, outputs = wire.decode(frame, str(missing))
    assert (kind, call_id) == (wire.REPLY, 3)
    np.testing.assert_array_equal(outputs["y"], big)


def test_string_tensors_count_by_elements_when_deciding_to_leave_the_loop():
    strings = np.array([b"x" * 10] * 2000, dtype=object)
    assert strings.nbytes == 16000  # pointers only: it would have been encoded on the loop
    assert wire.arrays_bytes([strings]) > 64 * 1024
    assert wire.arrays_bytes([np.zeros(10, np.float32), strings[:10]]) == 40 + 10 * 64


def test_stale_tensor_files_are_swept_and_fresh_ones_kept(tmp_path):
    from pyserving.workers import supervisor

    for name in ("t-1-a-0", "t-1-a-1", "model.sock", "generation"):
        (tmp_path / name).write_bytes(b"x")
    os.utime(tmp_path / "t-1-a-0", (0, 0))
    os.utime(tmp_path / "generation", (0, 0))
    supervisor._sweep_tensor_files(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generation", "model.sock", "t-1-a-1"]
