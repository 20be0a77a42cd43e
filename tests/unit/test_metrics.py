"""Prometheus exposition: TF Serving's TYPE lines, bounded model labels, rendering off the event loop."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from helpers import DoublingServable

from pyserving import metrics
from pyserving.lifecycle.manager import ModelManager, RetryPolicy, VersionSpec
from pyserving.protocols import operations
from pyserving.serving import DataPlane


def test_counters_are_typed_counter_without_a_total_suffix():
    lines = metrics.exposition().decode().splitlines()
    # util/prometheus_exporter.cc: "# TYPE <name> counter" for cumulative metrics, "histogram" for samplers.
    assert [line for line in lines if line.startswith("# TYPE :tensorflow")] == [
        "# TYPE :tensorflow:serving:request_count counter",
        "# TYPE :tensorflow:serving:request_latency histogram",
        "# TYPE :tensorflow:serving:runtime_latency histogram",
        "# TYPE :tensorflow:serving:request_example_counts histogram",
        "# TYPE :tensorflow:serving:request_example_count_total counter",
        "# TYPE :tensorflow:serving:model_warmup_latency histogram",
        "# TYPE :tensorflow:serving:model_warmup_records_read counter",
        "# TYPE :tensorflow:cc:saved_model:load_attempt_count counter",
        "# TYPE :tensorflow:cc:saved_model:load_latency counter",
        "# TYPE :tensorflow:serving:batching_session:queuing_latency histogram",
        "# TYPE :tensorflow:serving:batching_session:wrapped_run_count counter",
        "# TYPE :tensorflow:serving:batching_session:input_batch_size histogram",
        "# TYPE :tensorflow:serving:batching_session:processed_batch_size histogram",
        "# TYPE :tensorflow:serving:batching_session:padding_size histogram",
    ]
    assert not any("_total" in line for line in lines if line.startswith(":tensorflow:serving:request_count"))


def test_counter_samples_keep_their_exact_names_and_labels():
    metrics.MODEL_WARMUP_RECORDS_READ.inc("/unit/metrics/1", "OK", amount=3)
    metrics.MODEL_WARMUP_RECORDS_READ.inc("/unit/metrics/1", "OK", amount=2)
    lines = metrics.exposition().decode().splitlines()
    assert ':tensorflow:serving:model_warmup_records_read{model_path="/unit/metrics/1",status="OK"} 5.0' in lines


def test_only_configured_models_name_their_own_label():
    manager = ModelManager(lambda spec: DoublingServable(), RetryPolicy(0, 0.01), load_threads=1, unload_threads=1)
    manager.set_aspired("m", {1: VersionSpec("m", 1, "/models/m/1", "tensorflow")})
    manager.set_aspired("gone", {})  # configured once (no versions now): still a bounded name
    dataplane = DataPlane(manager, method_name_check=True)
    assert dataplane.metric_label("m") == "m"
    assert dataplane.metric_label("gone") == "gone"
    assert dataplane.metric_label("x" * 1_000_000) == metrics.UNKNOWN_MODEL == ""
    assert dataplane.metric_label("") == ""
    manager.unload_all()


def test_the_scrape_is_rendered_on_the_pool_not_the_loop():
    async def scrape() -> list[dict]:
        pool = ThreadPoolExecutor(1)
        release = threading.Event()
        pool.submit(release.wait, 10)  # the pool's only thread is busy
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        task = asyncio.create_task(operations.metrics_app(pool)({"type": "http"}, receive, send))
        await asyncio.sleep(0.2)  # the loop runs on while the scrape waits for the pool
        assert not task.done() and sent == []
        release.set()
        await asyncio.wait_for(task, 10)
        pool.shutdown()
        return sent

    start, body = asyncio.run(scrape())
    assert start["status"] == 200
    assert (b"content-type", b"text/plain; version=0.0.4; charset=utf-8") in start["headers"]
    assert body["body"].startswith(
        b"# HELP :tensorflow:serving:request_count The total number of requests.\n"
        b"# TYPE :tensorflow:serving:request_count counter\n"
    )
