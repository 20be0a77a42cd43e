"""Background threads never die: a failure in one pass of fs-poll, config-poll or a batch thread is logged
(with its traceback once) and the thread goes on; background pool work logs what failed."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import DoublingServable

from pyserving import flags
from pyserving.concurrency import LoopGuard, submit_logged
from pyserving.errors import Code, ServingError
from pyserving.lifecycle.core import ServerCore
from pyserving.lifecycle.manager import ModelManager, RetryPolicy, State
from pyserving.lifecycle.model_config import ModelConfig, VersionPolicy
from pyserving.lifecycle.sources import FileSystemSource
from pyserving.runtimes.batching import Batcher, BatchingOptions


def _wait(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _errors(caplog) -> list[tuple[str, str | None]]:
    """(message, the exception's text when a traceback was logged) of each ERROR record."""
    return [
        (r.getMessage(), str(r.exc_info[1]) if r.exc_info else None) for r in caplog.records if r.levelname == "ERROR"
    ]


def test_loop_guard_logs_a_traceback_once_then_one_line_per_repeat(caplog):
    guard = LoopGuard("Work")
    for error in (RuntimeError("a"), RuntimeError("a"), ValueError("b"), None, ValueError("b")):
        with guard:
            if error is not None:
                raise error
    assert _errors(caplog) == [
        ("Work failed; it goes on", "a"),
        ("Work failed again: RuntimeError: a", None),
        ("Work failed; it goes on", "b"),  # another failure: its traceback
        ("Work failed; it goes on", "b"),  # after a pass that worked: the traceback again
    ]
    with pytest.raises(KeyboardInterrupt), guard:  # not an Exception: not swallowed
        raise KeyboardInterrupt


def test_background_pool_work_logs_what_failed(caplog):
    def fail() -> None:
        raise RuntimeError("injected")

    with ThreadPoolExecutor(1) as pool:
        future = submit_logged(pool, "Loading m version 1", fail)
        _wait(future.done)
    _wait(lambda: _errors(caplog) == [("Loading m version 1 failed", "injected")])


def test_the_fs_poll_thread_survives_a_model_whose_poll_fails(tmp_path, caplog):
    class FailingSource(FileSystemSource):
        def _poll(self, config: ModelConfig) -> bool:
            if config.name == "bad" and threading.current_thread().name == "fs-poll":
                raise RuntimeError("injected")
            return super()._poll(config)

    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1").mkdir(parents=True)
    manager = ModelManager(lambda spec: DoublingServable(), RetryPolicy(0, 0.01), load_threads=2, unload_threads=1)
    source = FailingSource(manager, poll_wait_s=0.2)
    configs = [ModelConfig(name, str(tmp_path / name), VersionPolicy(), platform="tensorflow") for name in ("bad", "m")]
    source.set_models(configs)
    manager.wait_settled(["bad", "m"])
    source.start()
    _wait(lambda: len(_errors(caplog)) >= 2)  # two passes failed for "bad"
    (tmp_path / "m" / "2").mkdir()  # "m" is still polled: its new version loads
    _wait(lambda: [(s.version, s.state) for s in manager.status("m")] == [(2, State.AVAILABLE), (1, State.END)])
    errors = _errors(caplog)
    assert errors[0] == ("Polling the versions of bad failed; it goes on", "injected")
    assert set(errors[1:]) == {("Polling the versions of bad failed again: RuntimeError: injected", None)}
    source.stop()
    manager.unload_all()


def test_the_config_poll_thread_survives_a_failing_pass(tmp_path, caplog):
    class FailingOnce(ServerCore):
        failures = 1

        def reload(self, configs: list[ModelConfig]) -> None:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("injected")
            super().reload(configs)

    for name in ("a", "b"):
        (tmp_path / name / "1").mkdir(parents=True)
    path = tmp_path / "models.config"
    entry = 'config {{ name: "{0}" base_path: "{1}/{0}" model_platform: "tensorflow" }} '
    path.write_text(f"model_config_list {{ {entry.format('a', tmp_path)}}}")
    options = flags.Options()
    options.model_config_file = str(path)
    options.model_config_file_poll_wait_seconds = 1
    options.file_system_poll_wait_seconds = 1
    core = FailingOnce(options, lambda spec: DoublingServable())
    core.start(core.initial_configs())
    staged = tmp_path / "staged.config"  # replaced whole: the poller never reads half a file
    staged.write_text(f"model_config_list {{ {entry.format('a', tmp_path)}{entry.format('b', tmp_path)}}}")
    os.replace(staged, path)
    _wait(lambda: core.readiness() == (True, {"a": "AVAILABLE", "b": "AVAILABLE"}))  # the next pass applied it
    assert core.failures == 0
    assert core.config_file is not None and core.config_file.parses == 2  # the file itself was parsed once more
    assert _errors(caplog) == [("Polling the model config file failed; it goes on", "injected")]
    core.stop()


def test_a_batch_thread_survives_failures_outside_and_inside_a_batch(caplog):
    class FailingBatcher(Batcher):
        schedule_failures = 1
        run_failures = 1

        def _next_ready(self):
            if self.schedule_failures:
                self.schedule_failures -= 1
                raise RuntimeError("scheduling")
            return super()._next_ready()

        def _run(self, queue, batch):
            if self.run_failures:
                self.run_failures -= 1
                raise RuntimeError("running")
            return super()._run(queue, batch)

    batcher = FailingBatcher(BatchingOptions(max_batch_size=4, num_batch_threads=1))
    batched = batcher.wrap(DoublingServable())
    x = {"x": np.array([1.0, 2.0], np.float32)}
    with pytest.raises(ServingError) as info:  # the batch that failed: its caller hears it
        batched.run("double", x, ["y"], 0)
    assert (info.value.code, info.value.message) == (Code.INTERNAL, "Batch failed")
    assert batched.run("double", x, ["y"], 0)[0].tolist() == [2.0, 4.0]  # the same thread runs the next one
    assert _errors(caplog) == [
        ("Batch thread batch_threads-0 failed; it goes on", "scheduling"),
        ("Batch thread batch_threads-0 failed; it goes on", "running"),
    ]
    batcher.stop()


@pytest.fixture(autouse=True)
def _errors_only(caplog):
    caplog.set_level(logging.ERROR, logger="pyserving")
