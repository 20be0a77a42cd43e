"""The batch scheduler: calls of one signature merge into one run and every caller gets its own rows."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import DoublingServable

from pyserving.errors import Code, ServingError
from pyserving.runtimes.batching import Batcher, BatchingOptions


@pytest.fixture()
def batcher():
    scheduler = Batcher(BatchingOptions(max_batch_size=8, max_enqueued_batches=4, num_batch_threads=1))
    yield scheduler
    scheduler.stop()


def _queue_behind_a_held_run(batched, servable_gate, calls):
    """Start `calls` (lists of x values) on threads while the batch thread is held; return their results."""
    with ThreadPoolExecutor(len(calls) + 1) as pool:
        first = pool.submit(batched.run, "double", {"x": np.array([0.0], np.float32)}, ["y"], 0)
        time.sleep(0.2)  # the batch thread now holds the first run
        futures = [pool.submit(batched.run, "double", {"x": np.array(x, np.float32)}, ["y"], 0) for x in calls]
        time.sleep(0.2)  # all queued
        servable_gate.set()
        first.result(10)
        return [f.result(10)[0].tolist() for f in futures]


def test_concurrent_calls_run_as_one_batch_and_split_back(batcher):
    gate = threading.Event()
    servable = DoublingServable(gate)
    batched = batcher.wrap(servable)
    results = _queue_behind_a_held_run(batched, gate, [[1.0], [2.0, 3.0], [4.0]])
    assert results == [[2.0], [4.0, 6.0], [8.0]]
    assert servable.runs == [1, 4]  # the held call alone, then the three queued ones together


def test_allowed_batch_sizes_pad_with_the_first_row():
    scheduler = Batcher(BatchingOptions(max_batch_size=4, allowed_batch_sizes=(2, 4), num_batch_threads=1))
    try:
        servable = DoublingServable()
        result = scheduler.wrap(servable).run("double", {"x": np.array([1.0, 2.0, 3.0], np.float32)}, ["y"], 0)
        assert result[0].tolist() == [2.0, 4.0, 6.0]
        assert servable.runs == [4]
    finally:
        scheduler.stop()


def test_a_call_larger_than_a_batch_is_refused_unless_splitting(batcher):
    with pytest.raises(ServingError) as info:
        batcher.wrap(DoublingServable()).run("double", {"x": np.zeros(9, np.float32)}, ["y"], 0)
    assert info.value.message == "Task size 9 is larger than maximum input batch size 8"
    splitting = BatchingOptions(max_batch_size=8, enable_large_batch_splitting=True, max_execution_batch_size=3)
    servable = DoublingServable()
    result = batcher.wrap(servable, splitting).run("double", {"x": np.arange(7, dtype=np.float32)}, ["y"], 0)
    assert result[0].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert servable.runs == [3, 3, 1]


def test_a_full_queue_answers_unavailable(batcher):
    gate = threading.Event()
    batched = batcher.wrap(DoublingServable(gate), BatchingOptions(max_batch_size=2, max_enqueued_batches=1))
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(batched.run, "double", {"x": np.zeros(1, np.float32)}, ["y"], 0)
        time.sleep(0.2)
        queued = pool.submit(batched.run, "double", {"x": np.zeros(2, np.float32)}, ["y"], 0)
        time.sleep(0.2)
        with pytest.raises(ServingError) as info:
            batched.run("double", {"x": np.zeros(1, np.float32)}, ["y"], 0)
        gate.set()
        running.result(10), queued.result(10)
    assert info.value.code == Code.UNAVAILABLE
    assert info.value.message == "The batch scheduling queue to which this task was submitted is full"


def test_inputs_need_a_common_batch_dimension(batcher):
    batched = batcher.wrap(DoublingServable())
    with pytest.raises(ServingError) as info:
        batched.run("double", {"x": np.float32(1.0).reshape(())}, ["y"], 0)
    assert info.value.message == "Batching session Run() input tensors must have at least one dimension"


def test_run_async_waits_on_the_loop(batcher):
    servable = DoublingServable()
    batched = batcher.wrap(servable)

    async def calls():
        return await asyncio.gather(
            *(batched.run_async("double", {"x": np.array([float(i)], np.float32)}, ["y"], 0) for i in range(5))
        )

    results = asyncio.run(calls())
    assert [r[0].tolist() for r in results] == [[0.0], [2.0], [4.0], [6.0], [8.0]]
    assert sum(servable.runs) == 5


def test_stopping_fails_queued_calls_with_unavailable():
    scheduler = Batcher(BatchingOptions(max_batch_size=8, num_batch_threads=1))
    gate = threading.Event()
    batched = scheduler.wrap(DoublingServable(gate))
    with ThreadPoolExecutor(2) as pool:
        pool.submit(batched.run, "double", {"x": np.zeros(1, np.float32)}, ["y"], 0)
        time.sleep(0.2)
        queued = pool.submit(batched.run, "double", {"x": np.zeros(1, np.float32)}, ["y"], 0)
        time.sleep(0.2)
        scheduler.stop()
        with pytest.raises(ServingError) as info:
            queued.result(10)
        gate.set()
    assert (info.value.code, info.value.message) == (Code.UNAVAILABLE, "Server is shutting down")


def test_options_are_checked_as_tf_serving_checks_them():
    with pytest.raises(ServingError) as info:
        BatchingOptions(max_batch_size=4, allowed_batch_sizes=(2, 3)).validate()
    assert info.value.message == (
        "Last entry in allowed_batch_sizes must match max_batch_size; last entry was 3; expected 4"
    )
