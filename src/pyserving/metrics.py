"""Prometheus metrics under TF Serving's names, labels and bucket layouts, exposed with prometheus-client.

TF Serving's counters have no `_total` suffix (`:tensorflow:serving:request_count`),
which prometheus-client's counter type would add to their names; their samples are
rendered under their exact names and their `# TYPE` line says `counter`, as TF
Serving's exporter (util/prometheus_exporter.cc) writes for cumulative metrics.
Histograms are regular Prometheus histograms. Process metrics (CPU, memory, file
descriptors) come from prometheus-client's ProcessCollector.

pyserving's own series, under `:pyserving:` (the autoscaling signals, docs/DEPLOY.md): the event loop's
lag, requests in flight and batch queue depth per model (gauges read from their sources when scraped), and
the time calls wait in batch queues per model.

Rendering walks every series: `exposition` runs on a worker thread, never on the
event loop. Label values that come from requests are bounded by the callers (a
model that is not served counts under `UNKNOWN_MODEL`).
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "BATCH_INPUT_SIZE",
    "BATCH_PADDING_SIZE",
    "BATCH_PROCESSED_SIZE",
    "BATCH_QUEUE_DEPTH",
    "BATCH_QUEUE_SECONDS",
    "BATCH_QUEUING_LATENCY",
    "BATCH_WRAPPED_RUN_COUNT",
    "CONTENT_TYPE",
    "DEFAULT_PATH",
    "EVENT_LOOP_LAG",
    "LOAD_ATTEMPT_COUNT",
    "LOAD_LATENCY",
    "MODEL_WARMUP_LATENCY",
    "MODEL_WARMUP_RECORDS_READ",
    "REQUEST_COUNT",
    "REQUEST_EXAMPLE_COUNTS",
    "REQUEST_EXAMPLE_COUNT_TOTAL",
    "REQUESTS_IN_FLIGHT",
    "REQUEST_LATENCY",
    "RUNTIME_LATENCY",
    "UNKNOWN_MODEL",
    "exposition",
    "record_examples",
    "state",
]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
DEFAULT_PATH = "/monitoring/prometheus/metrics"
# The model_name of requests for a model that is not configured: one series for all of them, so that
# client-chosen names never become labels (TF Serving labels them with whatever name the client sent).
UNKNOWN_MODEL = ""


def _exponential(scale: float, growth: float, count: int) -> list[float]:
    return [scale * growth**i for i in range(count)]


class _Families(Collector):
    """Metric families for prometheus-client's text renderer."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class _Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...]) -> None:
        self.name, self._help, self._labels = name, help_text, labels
        self._values: dict[tuple[str, ...], float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, *label_values: str, amount: float = 1) -> None:
        with self._lock:
            self._values[label_values] += amount

    def state(self) -> dict[tuple[str, ...], float]:
        """A copy of the values (what a worker process sends for the merged scrape)."""
        with self._lock:
            return dict(self._values)

    def render(self, others: Iterable[dict[tuple[str, ...], float]] = ()) -> bytes:
        """`# TYPE <name> counter` and the samples under `name` itself (no `_total`); `others`' values
        (other processes' `state()`) are added to this process's."""
        # Rendered as an untyped family (its samples keep their names); only the header is TF Serving's.
        metric = Metric(self.name, self._help, "unknown")
        with self._lock:
            merged = dict(self._values)
        for other in others:
            for label_values, value in other.items():
                merged[label_values] = merged.get(label_values, 0.0) + value
        for label_values, total in merged.items():
            metric.add_sample(self.name, dict(zip(self._labels, label_values, strict=True)), total)
        samples = generate_latest(_Families([metric])).split(b"\n", 2)[2]
        return f"# HELP {self.name} {self._help}\n# TYPE {self.name} counter\n".encode() + samples


class _Histogram:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...], bounds: list[float]) -> None:
        self.name, self._help, self._labels, self._bounds = name, help_text, labels, bounds
        self._series: dict[tuple[str, ...], list] = {}  # [bucket counts..., +Inf count, sum]
        self._lock = threading.Lock()

    def observe(self, *label_values: str, value: float) -> None:
        index = bisect.bisect_left(self._bounds, value)
        with self._lock:
            series = self._series_of(label_values)
            series[index] += 1
            series[-1] += value

    def observe_many(self, *label_values: str, values: Iterable[float]) -> None:
        """`observe` for several values of one series, under one lock."""
        indexes = [(bisect.bisect_left(self._bounds, value), value) for value in values]
        with self._lock:
            series = self._series_of(label_values)
            for index, value in indexes:
                series[index] += 1
                series[-1] += value

    def _series_of(self, label_values: tuple[str, ...]) -> list:
        """The series of these label values, created empty the first time (hold the lock)."""
        series = self._series.get(label_values)
        if series is None:
            series = self._series[label_values] = [0] * (len(self._bounds) + 1) + [0.0]
        return series

    def state(self) -> dict[tuple[str, ...], list]:
        """A copy of every series (what a worker process sends for the merged scrape)."""
        with self._lock:
            return {values: list(series) for values, series in self._series.items()}

    def render(self, others: Iterable[dict[tuple[str, ...], list]] = ()) -> bytes:
        """The histogram, `others`' series (other processes' `state()`) added to this process's."""
        family = HistogramMetricFamily(self.name, self._help, labels=list(self._labels))
        merged = self.state()
        for other in others:
            for values, series in other.items():
                mine = merged.get(values)
                merged[values] = list(series) if mine is None else [a + b for a, b in zip(mine, series, strict=True)]
        copies = list(merged.items())
        bounds = [f"{b:.6g}" for b in self._bounds] + ["+Inf"]
        for values, series in copies:
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, series[:-1], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(values), buckets, series[-1])
        return generate_latest(_Families([family]))


# A source of a sampled gauge: () -> {label values: value}, a bound method (held weakly).
Source = Callable[[], dict[tuple[str, ...], float]]


class _SampledGauge:
    """A gauge read when scraped: the values its sources report then (summed per label set), so the hot
    path keeps no count of its own. Sources are held weakly: an object that goes away stops reporting."""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...]) -> None:
        self.name, self._help, self._labels = name, help_text, labels
        self._sources: list[weakref.WeakMethod] = []
        self._lock = threading.Lock()

    def add_source(self, source: Source) -> None:
        with self._lock:
            self._sources.append(weakref.WeakMethod(source))

    def values(self) -> dict[tuple[str, ...], float]:
        with self._lock:
            self._sources = [ref for ref in self._sources if ref() is not None]
            sources = [ref() for ref in self._sources]
        totals: dict[tuple[str, ...], float] = defaultdict(float)
        for source in sources:
            if source is not None:
                for label_values, value in source().items():
                    totals[label_values] += value
        return dict(totals)

    def render(self) -> bytes:
        family = GaugeMetricFamily(self.name, self._help, labels=list(self._labels))
        for label_values, value in sorted(self.values().items()):
            family.add_metric(list(label_values), value)
        return generate_latest(_Families([family]))


_LATENCY_US = _exponential(10, 1.8, 33)

REQUEST_COUNT = _Counter(":tensorflow:serving:request_count", "The total number of requests.", ("model_name", "status"))
REQUEST_LATENCY = _Histogram(
    ":tensorflow:serving:request_latency",
    "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
    ("model_name", "API", "entrypoint"),
    _LATENCY_US,
)
RUNTIME_LATENCY = _Histogram(
    ":tensorflow:serving:runtime_latency",
    "Distribution of wall time (in microseconds) for Tensorflow Serving runtime.",
    ("model_name", "API", "runtime"),
    _LATENCY_US,
)
REQUEST_EXAMPLE_COUNTS = _Histogram(
    ":tensorflow:serving:request_example_counts",
    "The number of tensorflow.Examples per request.",
    ("model",),
    _exponential(1, 2, 15),
)
REQUEST_EXAMPLE_COUNT_TOTAL = _Counter(
    ":tensorflow:serving:request_example_count_total", "The total number of tensorflow.Examples.", ("model",)
)
MODEL_WARMUP_LATENCY = _Histogram(
    ":tensorflow:serving:model_warmup_latency",
    "Distribution of wall time (in microseconds) for warming up the model.",
    ("model_path", "status"),
    _LATENCY_US,
)
MODEL_WARMUP_RECORDS_READ = _Counter(
    ":tensorflow:serving:model_warmup_records_read", "The number of warmup records read.", ("model_path", "status")
)
LOAD_ATTEMPT_COUNT = _Counter(
    ":tensorflow:cc:saved_model:load_attempt_count",
    "The number of times a SavedModel was successfully loaded.",
    ("model_path", "status"),
)
LOAD_LATENCY = _Counter(
    ":tensorflow:cc:saved_model:load_latency",
    "Latency in microseconds for SavedModels that were successfully loaded.",
    ("model_path",),
)

BATCH_QUEUING_LATENCY = _Histogram(
    ":tensorflow:serving:batching_session:queuing_latency",
    "Distribution of wall time spent (in microseconds) in queues",
    ("thread_pool_name",),
    _exponential(100, 1.2, 52),
)
BATCH_WRAPPED_RUN_COUNT = _Counter(
    ":tensorflow:serving:batching_session:wrapped_run_count",
    "Counts the number of times a batched session run was called",
    (),
)
BATCH_INPUT_SIZE = _Histogram(
    ":tensorflow:serving:batching_session:input_batch_size",
    "Tracks the batch size distribution on the inputs by model_name (if available).",
    (),
    _exponential(1, 2, 14),
)
BATCH_PROCESSED_SIZE = _Histogram(
    ":tensorflow:serving:batching_session:processed_batch_size",
    "Tracks the batch size distribution on processing by model_name (if available).",
    (),
    _exponential(1, 2, 14),
)
BATCH_PADDING_SIZE = _Histogram(
    ":tensorflow:serving:batching_session:padding_size",
    "Tracks the padding size distribution on batches by model_name (if available).",
    ("execution_batch_size",),
    _exponential(1, 2, 14),
)

_ALL: list[_Counter | _Histogram] = [
    REQUEST_COUNT,
    REQUEST_LATENCY,
    RUNTIME_LATENCY,
    REQUEST_EXAMPLE_COUNTS,
    REQUEST_EXAMPLE_COUNT_TOTAL,
    MODEL_WARMUP_LATENCY,
    MODEL_WARMUP_RECORDS_READ,
    LOAD_ATTEMPT_COUNT,
    LOAD_LATENCY,
    BATCH_QUEUING_LATENCY,
    BATCH_WRAPPED_RUN_COUNT,
    BATCH_INPUT_SIZE,
    BATCH_PROCESSED_SIZE,
    BATCH_PADDING_SIZE,
]


# prometheus-client's own metrics: the process collector and pyserving's gauges.
_REGISTRY = CollectorRegistry(auto_describe=False)
ProcessCollector(registry=_REGISTRY)

# pyserving's own: how late the event loop runs a timer, the worst of the last second. A loop that
# lags delays every REST and gRPC request; it should stay in the low milliseconds under any input.
EVENT_LOOP_LAG = Gauge(
    ":pyserving:event_loop_lag_seconds",
    "How late the server's event loop ran a timer (worst of the last second).",
    registry=_REGISTRY,
)


# pyserving's autoscaling signals, per model (docs/DEPLOY.md, "Autoscaling signals"). The gauges are read
# when scraped: requests in flight are the model's leased versions' lease counts (the manager's, kept under
# its lock anyway), queue depth the batcher's queued rows; the hot path adds nothing to count them.
REQUESTS_IN_FLIGHT = _SampledGauge(
    ":pyserving:requests_in_flight",
    "Requests holding a version of the model now (every protocol; from the version lookup to the model's result).",
    ("model_name",),
)
BATCH_QUEUE_DEPTH = _SampledGauge(
    ":pyserving:batch_queue_depth",
    "Rows (examples) waiting in the model's batching queues now.",
    ("model_name",),
)
BATCH_QUEUE_SECONDS = _Histogram(
    ":pyserving:batch_queue_seconds",
    "Seconds a batched call waited in its queue before its batch ran.",
    ("model_name",),
    _exponential(1e-4, 2, 20),  # 100 us .. 52 s
)
_PYSERVING: list[_SampledGauge | _Histogram] = [REQUESTS_IN_FLIGHT, BATCH_QUEUE_DEPTH, BATCH_QUEUE_SECONDS]


def exposition(others: Sequence[dict[str, dict]] = ()) -> bytes:
    """Every metric in the Prometheus text format (walks every series: call it off the event loop).
    `others`: other processes' `state()` (`--num_workers`), added to this process's counters and histograms."""
    parts = []
    for metric in [*_ALL, *_PYSERVING]:
        if isinstance(metric, _SampledGauge):
            parts.append(metric.render())
        else:
            parts.append(metric.render([other[metric.name] for other in others if metric.name in other]))
    return b"".join([*parts, generate_latest(_REGISTRY)])


def state() -> dict[str, dict]:
    """This process's counters and histograms, by name: what a protocol worker adds to the merged scrape."""
    return {metric.name: metric.state() for metric in [*_ALL, BATCH_QUEUE_SECONDS]}


def record_examples(model: str, count: int) -> None:
    REQUEST_EXAMPLE_COUNTS.observe(model, value=count)
    REQUEST_EXAMPLE_COUNT_TOTAL.inc(model, amount=count)
