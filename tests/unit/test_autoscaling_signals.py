"""pyserving's autoscaling signals: requests in flight per model, batch queue depth and queueing time, and
the `--metrics_path` route's checks."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import DoublingServable

from pyserving import flags, metrics, server
from pyserving.errors import Code, ServingError
from pyserving.lifecycle.manager import ModelManager, RetryPolicy, VersionSpec
from pyserving.runtimes.batching import Batcher, BatchingOptions
from pyserving.serving import DataPlane, ModelSpec


def sample(name: str, model: str) -> float | None:
    """The value of `name{model_name="model"}` in a fresh exposition (None: no such sample)."""
    prefix = f'{name}{{model_name="{model}"}} '
    values = [line[len(prefix) :] for line in metrics.exposition().decode().splitlines() if line.startswith(prefix)]
    assert len(values) <= 1
    return float(values[0]) if values else None


def in_flight(model: str) -> float | None:
    return sample(":pyserving:requests_in_flight", model)


def depth(model: str) -> float | None:
    return sample(":pyserving:batch_queue_depth", model)


def queued_count(model: str) -> float | None:
    return sample(":pyserving:batch_queue_seconds_count", model)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class HeldServable(DoublingServable):
    """DoublingServable whose runs wait for `gate`; `started` is set when the first run begins."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        super().__init__(self.gate)
        self.started = threading.Event()

    def run(self, signature_name, inputs, output_aliases, timeout_ms):
        self.started.set()
        return super().run(signature_name, inputs, output_aliases, timeout_ms)


class FailingServable(DoublingServable):
    def run(self, signature_name, inputs, output_aliases, timeout_ms):
        raise ServingError(Code.INTERNAL, "broken")


def test_the_series_are_gauges_and_a_histogram_in_seconds():
    lines = metrics.exposition().decode().splitlines()
    assert "# TYPE :pyserving:requests_in_flight gauge" in lines
    assert "# TYPE :pyserving:batch_queue_depth gauge" in lines
    assert "# TYPE :pyserving:batch_queue_seconds histogram" in lines


def test_sampled_gauge_sums_its_sources_and_forgets_the_ones_gone():
    class Source:
        def __init__(self, values):
            self.values = values

        def report(self):
            return self.values

    gauge = metrics._SampledGauge(":unit:sampled", "A test gauge.", ("model_name",))
    first, second = Source({("a",): 2.0, ("b",): 1.0}), Source({("a",): 3.0})
    gauge.add_source(first.report)
    gauge.add_source(second.report)
    assert gauge.values() == {("a",): 5.0, ("b",): 1.0}
    assert gauge.render().decode().splitlines() == [
        "# HELP :unit:sampled A test gauge.",
        "# TYPE :unit:sampled gauge",
        ':unit:sampled{model_name="a"} 5.0',
        ':unit:sampled{model_name="b"} 1.0',
    ]
    del second
    gc.collect()
    assert gauge.values() == {("a",): 2.0, ("b",): 1.0}


@pytest.fixture()
def dataplane():
    gate = threading.Event()
    servable = DoublingServable(gate)
    manager = ModelManager(lambda spec: servable, RetryPolicy(0, 0), load_threads=1, unload_threads=1)
    manager.set_aspired(
        "inflight-a",
        {1: VersionSpec("inflight-a", 1, "/a/1", "tensorflow"), 2: VersionSpec("inflight-a", 2, "/a/2", "tensorflow")},
    )
    manager.set_aspired("inflight-b", {1: VersionSpec("inflight-b", 1, "/b/1", "tensorflow")})
    manager.wait_settled(["inflight-a", "inflight-b"])
    metrics.REQUESTS_IN_FLIGHT.add_source(manager.leases_by_model)  # as server._build does
    plane = DataPlane(manager, method_name_check=False)
    plane.gate = gate  # type: ignore[attr-defined]
    yield plane
    gate.set()
    manager.unload_all()


def test_requests_in_flight_count_each_models_leases_until_the_block_ends(dataplane):
    assert (in_flight("inflight-a"), in_flight("inflight-b")) == (0.0, 0.0)
    with (
        dataplane.resolve(ModelSpec("inflight-a")),
        dataplane.resolve(ModelSpec("inflight-a", version=1)),  # every version counts for its model
        dataplane.resolve(ModelSpec("inflight-b")),
    ):
        assert (in_flight("inflight-a"), in_flight("inflight-b")) == (2.0, 1.0)
        with pytest.raises(ServingError):  # a model that is not served holds nothing and gets no series
            dataplane.resolve(ModelSpec("inflight-unknown"))
        assert in_flight("inflight-unknown") is None
        assert in_flight(metrics.UNKNOWN_MODEL) is None
    assert (in_flight("inflight-a"), in_flight("inflight-b")) == (0.0, 0.0)
    with pytest.raises(ServingError), dataplane.resolve(ModelSpec("inflight-b")):  # a failed request ends too
        assert in_flight("inflight-b") == 1.0
        raise ServingError(Code.INVALID_ARGUMENT, "bad request")
    assert in_flight("inflight-b") == 0.0


def test_a_request_is_in_flight_while_its_model_runs(dataplane):
    async def request():
        with dataplane.resolve(ModelSpec("inflight-a")) as target:
            return await dataplane.predict(target, "double", {"x": np.ones(2, np.float32)}, executor=pool)

    async def scenario():
        task = asyncio.create_task(request())
        await asyncio.sleep(0.1)  # the run waits for the gate on the pool
        assert in_flight("inflight-a") == 1.0
        dataplane.gate.set()
        return await asyncio.wait_for(task, 10)

    with ThreadPoolExecutor(1) as pool:
        result = asyncio.run(scenario())
    assert result.outputs["y"].tolist() == [2.0, 2.0]
    assert in_flight("inflight-a") == 0.0


def _call(batched, *xs: float):
    return batched.run("double", {"x": np.array(xs, np.float32)}, ["y"], 0)


def test_queue_depth_counts_the_queued_rows_per_model_and_returns_to_zero():
    scheduler = Batcher(BatchingOptions(max_batch_size=8, max_enqueued_batches=10, num_batch_threads=1))
    servable = HeldServable()
    batched = scheduler.wrap(servable, model_name="depth-a")
    scheduler.wrap(DoublingServable(), model_name="depth-b")
    assert (depth("depth-a"), depth("depth-b"), queued_count("depth-a")) == (0.0, 0.0, None)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(_call, batched, 0.0)
            assert servable.started.wait(10)  # the one batch thread is held by the first call
            queued = [pool.submit(_call, batched, *xs) for xs in ([1.0], [2.0, 3.0], [4.0])]
            wait_until(lambda: depth("depth-a") == 4.0)
            time.sleep(0.2)
            assert (depth("depth-a"), depth("depth-b")) == (4.0, 0.0)  # rows, not calls
            assert queued_count("depth-a") == 1.0  # the first call, taken at once
            servable.gate.set()
            assert first.result(10)[0].tolist() == [0.0]
            assert [f.result(10)[0].tolist() for f in queued] == [[2.0], [4.0, 6.0], [8.0]]
        assert depth("depth-a") == 0.0
        assert queued_count("depth-a") == 4.0
        total = sample(":pyserving:batch_queue_seconds_sum", "depth-a")
        assert total is not None and total >= 3 * 0.2  # the three queued calls waited at least 0.2 s each
    finally:
        scheduler.stop()


def test_queue_depth_returns_to_zero_when_the_batcher_stops():
    scheduler = Batcher(BatchingOptions(max_batch_size=8, num_batch_threads=1))
    servable = HeldServable()
    batched = scheduler.wrap(servable, model_name="depth-stop")
    with ThreadPoolExecutor(2) as pool:
        pool.submit(_call, batched, 0.0)
        assert servable.started.wait(10)
        queued = pool.submit(_call, batched, 1.0, 2.0)
        wait_until(lambda: depth("depth-stop") == 2.0)
        scheduler.stop()
        assert depth("depth-stop") == 0.0
        with pytest.raises(ServingError) as info:
            queued.result(10)
        assert info.value.message == "Server is shutting down"
        servable.gate.set()
    assert queued_count("depth-stop") == 1.0  # the held call only: stopped calls never ran


def test_cancelled_calls_leave_the_depth_when_a_batch_thread_reaches_them():
    scheduler = Batcher(BatchingOptions(max_batch_size=8, num_batch_threads=1))
    servable = HeldServable()
    batched = scheduler.wrap(servable, model_name="depth-cancel")

    async def scenario():
        held = asyncio.create_task(batched.run_async("double", {"x": np.zeros(1, np.float32)}, ["y"], 0))
        await asyncio.to_thread(servable.started.wait, 10)
        cancelled = asyncio.create_task(batched.run_async("double", {"x": np.ones(3, np.float32)}, ["y"], 0))
        await asyncio.sleep(0.1)
        assert depth("depth-cancel") == 3.0
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert depth("depth-cancel") == 3.0  # still queued: dropped when a thread takes it
        servable.gate.set()
        await asyncio.wait_for(held, 10)
        await asyncio.to_thread(wait_until, lambda: depth("depth-cancel") == 0.0)

    try:
        asyncio.run(scenario())
        assert servable.runs == [1]  # the cancelled rows never ran
        assert queued_count("depth-cancel") == 1.0
    finally:
        scheduler.stop()


def test_a_failed_batch_leaves_the_queue_empty():
    scheduler = Batcher(BatchingOptions(max_batch_size=8, num_batch_threads=1))
    batched = scheduler.wrap(FailingServable(), model_name="depth-fail")
    try:
        with pytest.raises(ServingError) as info:
            _call(batched, 1.0, 2.0)
        assert info.value.message == "broken"
        assert (depth("depth-fail"), queued_count("depth-fail")) == (0.0, 1.0)
    finally:
        scheduler.stop()


def _paths(*args: str) -> list[str]:
    return server._metrics_paths(flags.parse(["--model_base_path=/m", *args]).options)


def test_metrics_paths_from_the_monitoring_config_and_the_flag(tmp_path):
    config = tmp_path / "monitoring.config"
    config.write_text("prometheus_config { enable: true }")
    custom = tmp_path / "custom.config"
    custom.write_text('prometheus_config { enable: true path: "/metrics" }')
    assert _paths() == []
    assert _paths("--metrics_path=/metrics") == ["/metrics"]
    assert _paths(f"--monitoring_config_file={config}") == ["/monitoring/prometheus/metrics"]
    assert _paths(f"--monitoring_config_file={config}", "--metrics_path=/metrics") == [
        "/monitoring/prometheus/metrics",
        "/metrics",
    ]
    assert _paths(f"--monitoring_config_file={custom}", "--metrics_path=/metrics") == ["/metrics"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v1/metrics", "--metrics_path=/v1/metrics collides with the REST API's /v1 paths; choose another path, "),
        ("/V2", "--metrics_path=/V2 collides with the REST API's /v2 paths; choose another path, "),
        ("/healthz", "--metrics_path=/healthz collides with the /healthz route; choose another path, "),
        ("/openapi.yaml", "--metrics_path=/openapi.yaml collides with the /openapi.yaml route; choose another path, "),
        ("metrics", "--metrics_path=metrics is not a URL path: it must start with / and hold only "),
        ("/metrics?x=1", "--metrics_path=/metrics?x=1 is not a URL path: it must start with / and hold only "),
    ],
)
def test_a_metrics_path_that_collides_or_is_no_path_fails_start_up(path, message):
    with pytest.raises(ServingError) as info:
        _paths(f"--metrics_path={path}")
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.message.startswith(message)


def test_the_metrics_path_flag_is_off_by_default_and_listed():
    assert flags.Options().metrics_path == ""
    assert flags.parse(["--metrics_path=/metrics"]).options.metrics_path == "/metrics"
    assert (
        "\t"
        + '--metrics_path=""'.ljust(33)
        + "\tstring\tpyserving: also serve the Prometheus metrics on the REST port "
        "at this path, e.g. /metrics, with or without --monitoring_config_file (empty: off; not under /v1 or /v2)"
    ) in flags.usage().splitlines()
