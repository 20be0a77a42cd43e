"""Server-side batching: concurrent calls of one signature of one model version run as one call.

`BatchedServable` wraps a servable the way TF Serving's BatchingSession wraps a
Session; the loader builds it, so the data plane sees a servable like any other
and REST and gRPC share the batches. Every batched servable queues on one
`Batcher`: calls wait per (servable, signature, inputs, outputs), and
`num_batch_threads` threads take ready batches from the queues in turn. A batch
is ready when it holds `max_batch_size` rows or its oldest call has waited
`batch_timeout_micros` (with 0, whatever is queued runs as soon as a thread is
free, so batches grow with the load). Inputs are concatenated along dimension 0,
padded up to the next of `allowed_batch_sizes`, run once and split back, so every
caller gets exactly its own rows. Semantics follow TF Serving's BatchingParameters.

Results go back through a concurrent future to a blocked thread (`run`) or through
an asyncio future to the event loop (`run_async`); a batch's asyncio results reach
each loop in one thread-safe call, not one wake-up per caller.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving import metrics, tracing
from pyserving.concurrency import LoopGuard
from pyserving.errors import INTERNAL_ERROR, Code, ServingError, invalid_argument
from pyserving.runtimes.servable import Servable

__all__ = ["DEFAULT_THREAD_POOL", "BatchedServable", "Batcher", "BatchingOptions"]

log = logging.getLogger("pyserving")

DEFAULT_THREAD_POOL = "batch_threads"


@dataclass(frozen=True)
class BatchingOptions:
    """TF Serving's BatchingParameters with its defaults for unset fields."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 1
    thread_pool_name: str = DEFAULT_THREAD_POOL
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int = 0  # with splitting: the largest batch run; a larger call is split

    @classmethod
    def from_proto(cls, proto: Any, default_threads: int) -> BatchingOptions:
        """From a `BatchingParameters` message (`config_protos`); unset fields take TF Serving's defaults."""

        def value(name: str, default: Any) -> Any:
            return getattr(proto, name).value if proto.HasField(name) else default

        options = cls(
            max_batch_size=value("max_batch_size", 1000),
            batch_timeout_micros=value("batch_timeout_micros", 0),
            max_enqueued_batches=value("max_enqueued_batches", 10),
            num_batch_threads=value("num_batch_threads", default_threads),
            thread_pool_name=value("thread_pool_name", DEFAULT_THREAD_POOL),
            allowed_batch_sizes=tuple(proto.allowed_batch_sizes),
            pad_variable_length_inputs=proto.pad_variable_length_inputs,
            enable_large_batch_splitting=value("enable_large_batch_splitting", False),
            max_execution_batch_size=value("max_execution_batch_size", 0),
        )
        options.validate()
        return options

    @property
    def execution_batch_size(self) -> int:
        if self.enable_large_batch_splitting and self.max_execution_batch_size > 0:
            return self.max_execution_batch_size
        return self.max_batch_size

    def validate(self) -> None:
        """TF Serving's checks, raised as start-up/load errors."""
        if self.max_batch_size <= 0:
            raise invalid_argument("max_batch_size must be positive")
        if self.num_batch_threads <= 0:
            raise invalid_argument("num_batch_threads must be positive")
        sizes = self.allowed_batch_sizes
        if sizes:
            if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[0] <= 0:
                raise invalid_argument("allowed_batch_sizes entries must be monotonically increasing")
            if sizes[-1] != self.execution_batch_size:
                raise invalid_argument(
                    f"Last entry in allowed_batch_sizes must match max_batch_size; last entry was {sizes[-1]}; "
                    f"expected {self.execution_batch_size}"
                )


class _Task:
    """A queued call (or part of one); `loop` is None when a thread waits on `future`, else the loop it belongs to."""

    __slots__ = ("inputs", "rows", "loop", "future", "enqueued", "started", "batch_size")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self.inputs = inputs
        self.rows = rows
        self.loop = loop
        self.future: Future[Any] | asyncio.Future[Any] = Future() if loop is None else loop.create_future()
        self.enqueued = time.monotonic()
        self.started = self.enqueued  # when its batch started running (set by the batch thread)
        self.batch_size = 0  # the rows of the batch it ran in, padding included

    def claim(self) -> bool:
        """False if the caller went away (an RPC cancelled while queued); else its future can no longer be
        cancelled (a thread's) or a late cancel is ignored when the result arrives (a loop's)."""
        if isinstance(self.future, Future):
            return self.future.set_running_or_notify_cancel()
        return not self.future.cancelled()


class _Queue:
    """Pending calls of one (servable, signature, inputs, outputs)."""

    def __init__(self, servable: BatchedServable, signature_name: str, aliases: Sequence[str], timeout_ms: int) -> None:
        self.servable, self.signature_name, self.aliases, self.timeout_ms = (
            servable,
            signature_name,
            aliases,
            timeout_ms,
        )
        self.options = servable.options
        self.tasks: collections.deque[_Task] = collections.deque()
        self.rows = 0

    def ready_in(self, now: float) -> float:
        """Seconds until this queue has a batch to run (0: now; inf: nothing queued)."""
        if not self.tasks:
            return math.inf
        if self.rows >= self.options.execution_batch_size:
            return 0.0
        return max(self.tasks[0].enqueued + self.options.batch_timeout_micros / 1e6 - now, 0.0)

    def take(self) -> list[_Task]:
        """The oldest calls that fit one batch (same non-batch shapes unless padding is on)."""
        limit = self.options.execution_batch_size
        first = self.tasks.popleft()
        batch, rows, skipped = [first], first.rows, []
        shapes = {a: v.shape[1:] for a, v in first.inputs.items()}
        while self.tasks and rows + self.tasks[0].rows <= limit:
            task = self.tasks.popleft()
            if self.options.pad_variable_length_inputs or all(v.shape[1:] == shapes[a] for a, v in task.inputs.items()):
                batch.append(task)
                rows += task.rows
            else:
                skipped.append(task)
        self.tasks.extendleft(reversed(skipped))
        self.rows -= rows
        return batch


class BatchedServable:
    """A servable whose signature runs are batched with concurrent calls on a shared `Batcher`.

    MultiInference runs pass through unbatched, as in TF Serving's BatchingSession,
    where a run that fetches several signatures' outputs matches no batched signature.
    So do the signatures the inner servable names in `unbatched_signatures` (per-request
    Python processing functions, which run on their own pool: `inner.run_async`).
    """

    def __init__(self, inner: Servable, batcher: Batcher, options: BatchingOptions, model_name: str = "") -> None:
        options.validate()
        self.inner = inner
        self.options = options
        self.model_name = model_name  # the model_name label of its queue metrics
        self._batcher = batcher
        batcher.add_model(model_name)
        self._unbatched: frozenset[str] = getattr(inner, "unbatched_signatures", frozenset())

    @property
    def runtime(self) -> str:
        return self.inner.runtime

    @property
    def signature_defs(self) -> dict[str, meta_graph_pb2.SignatureDef]:
        return self.inner.signature_defs

    def run(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_aliases: Sequence[str], timeout_ms: int
    ) -> list[np.ndarray]:
        """Blocks until this call's rows are back."""
        if signature_name in self._unbatched:
            return self.inner.run(signature_name, inputs, output_aliases, timeout_ms)
        tasks = self._batcher.submit(self, signature_name, inputs, output_aliases, timeout_ms, None)
        outputs = _joined([task.future.result() for task in tasks])
        if tracing.enabled:
            _trace_batch(tasks)
        return outputs

    async def run_async(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_aliases: Sequence[str], timeout_ms: int
    ) -> list[np.ndarray]:
        """`run` for the event loop: awaits the batch instead of holding a thread."""
        if signature_name in self._unbatched:
            result: list[np.ndarray] = await self.inner.run_async(  # type: ignore[attr-defined]
                signature_name, inputs, output_aliases, timeout_ms
            )
            return result
        loop = asyncio.get_running_loop()
        tasks = self._batcher.submit(self, signature_name, inputs, output_aliases, timeout_ms, loop)
        try:
            outputs = _joined([await task.future for task in tasks])  # type: ignore[misc]
        except asyncio.CancelledError:
            for task in tasks:
                task.future.cancel()
            raise
        if tracing.enabled:
            _trace_batch(tasks)
        return outputs

    def runs_async(self, signature_name: str) -> bool:
        """Every signature is awaited on the loop (`run_async`)."""
        return True

    def run_multi(
        self, tasks: Sequence[tuple[str, Sequence[str]]], inputs: dict[str, np.ndarray], timeout_ms: int
    ) -> list[list[np.ndarray]]:
        return self.inner.run_multi(tasks, inputs, timeout_ms)

    def close(self) -> None:
        self.inner.close()


class Batcher:
    """The shared scheduler: queues and batch threads."""

    def __init__(self, options: BatchingOptions) -> None:
        options.validate()
        self.options = options  # the defaults of every servable it batches; its threads serve them all
        self._queues: dict[tuple, _Queue] = {}
        self._order: collections.deque[tuple] = collections.deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._models: set[str] = set()  # the models it batches: their queue depth shows 0 when empty
        metrics.BATCH_QUEUE_DEPTH.add_source(self.queue_depths)
        self._threads = [
            threading.Thread(target=self._work, name=f"{options.thread_pool_name}-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def wrap(self, servable: Servable, options: BatchingOptions | None = None, model_name: str = "") -> BatchedServable:
        """`servable` (of model `model_name`) batched on this scheduler, with its own parameters if given
        (per-model batching)."""
        return BatchedServable(servable, self, options or self.options, model_name)

    def add_model(self, name: str) -> None:
        """Report `name`'s queue depth from now on, 0 while nothing is queued (a gauge that vanished would
        leave autoscalers without a value)."""
        if name:
            with self._changed:
                self._models.add(name)

    def queue_depths(self) -> dict[tuple[str, ...], float]:
        """Rows queued now per model, as `(model_name,)` -> rows (read when metrics are scraped). A call
        cancelled while queued counts until a batch thread reaches it and drops it."""
        with self._changed:
            depths: dict[tuple[str, ...], float] = dict.fromkeys(((name,) for name in self._models), 0.0)
            for queue in self._queues.values():
                label = (queue.servable.model_name,)
                depths[label] = depths.get(label, 0.0) + queue.rows
        return depths

    def submit(
        self,
        servable: BatchedServable,
        signature_name: str,
        inputs: dict[str, np.ndarray],
        aliases: Sequence[str],
        timeout_ms: int,
        loop: asyncio.AbstractEventLoop | None,
    ) -> list[_Task]:
        """Queue a call, split into parts if it is larger than a batch; each part's future gets its outputs."""
        rows = _batch_rows(inputs)
        options = servable.options
        if rows > options.max_batch_size:
            raise invalid_argument(f"Task size {rows} is larger than maximum input batch size {options.max_batch_size}")
        key = (servable, signature_name, tuple(sorted(inputs)), tuple(aliases), timeout_ms)
        with self._changed:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(servable, signature_name, aliases, timeout_ms)
                self._order.append(key)
            tasks = [
                _Task(part, part_rows, loop) for part, part_rows in _split(inputs, rows, options.execution_batch_size)
            ]
            batches_after = math.ceil((queue.rows + rows) / options.execution_batch_size)
            if batches_after > options.max_enqueued_batches:
                raise ServingError(
                    Code.UNAVAILABLE, "The batch scheduling queue to which this task was submitted is full"
                )
            queue.tasks.extend(tasks)
            queue.rows += rows
            self._changed.notify_all()
        metrics.BATCH_INPUT_SIZE.observe(value=rows)
        return tasks

    def _work(self) -> None:
        guard = LoopGuard(f"Batch thread {threading.current_thread().name}")  # it outlives any failure
        running = True
        while running:
            with guard:
                running = self._work_once()

    def _work_once(self) -> bool:
        """Wait for a ready batch and run it; False once the batcher stops."""
        with self._changed:
            while True:
                if self._stopping:
                    return False
                key, wait = self._next_ready()
                if key is not None:
                    break
                self._changed.wait(None if wait == math.inf else wait)
            queue = self._queues[key]
            batch = queue.take()
            if not queue.tasks:
                del self._queues[key]
                self._order.remove(key)
        try:
            batch = [task for task in batch if task.claim()]  # the rows of callers gone are dropped
            if batch:
                _settle(batch, self._run(queue, batch))
        except Exception:  # nobody may wait forever: the batch's callers get the error
            _fail(batch, ServingError(Code.INTERNAL, "Batch failed"))
            raise
        return True

    def _next_ready(self) -> tuple[tuple | None, float]:
        """The first queue (round robin) with a batch to run now, else how long until one is."""
        now, soonest = time.monotonic(), math.inf
        for _ in range(len(self._order)):
            key = self._order[0]
            self._order.rotate(-1)
            wait = self._queues[key].ready_in(now)
            if wait == 0.0:
                return key, 0.0
            soonest = min(soonest, wait)
        return None, soonest

    def _run(self, queue: _Queue, batch: list[_Task]) -> list[Any]:
        """Each task's outputs, or the exception they all get."""
        options = queue.options
        started = time.monotonic()
        waits = [started - task.enqueued for task in batch]
        for wait in waits:
            metrics.BATCH_QUEUING_LATENCY.observe(options.thread_pool_name, value=wait * 1e6)
        metrics.BATCH_QUEUE_SECONDS.observe_many(queue.servable.model_name, values=waits)
        rows = sum(task.rows for task in batch)
        size = rows
        if options.allowed_batch_sizes:
            size = options.allowed_batch_sizes[bisect.bisect_left(options.allowed_batch_sizes, rows)]
            metrics.BATCH_PADDING_SIZE.observe(str(size), value=size - rows)
        metrics.BATCH_PROCESSED_SIZE.observe(value=size)
        for task in batch:  # read by the caller once its future is done (the future orders the accesses)
            task.started, task.batch_size = started, size
        metrics.BATCH_WRAPPED_RUN_COUNT.inc()
        try:
            merged = {
                alias: _merge([task.inputs[alias] for task in batch], size, options.pad_variable_length_inputs)
                for alias in batch[0].inputs
            }
            outputs = queue.servable.inner.run(queue.signature_name, merged, queue.aliases, queue.timeout_ms)
            for alias, output in zip(queue.aliases, outputs, strict=True):
                if output.ndim == 0 or output.shape[0] != size:
                    raise invalid_argument(
                        f"Batched output tensor {alias} has {output.shape[0] if output.ndim else 'no'} rows for a "
                        f"batch of {size}: its signature cannot be batched"
                    )
        except ServingError as exc:  # every caller of the batch gets the error
            return [exc] * len(batch)
        except Exception:  # a bug: logged once; the callers get no Python details
            log.exception("Unexpected error running a batch")
            return [ServingError(Code.INTERNAL, INTERNAL_ERROR)] * len(batch)
        offsets = itertools.accumulate((task.rows for task in batch), initial=0)
        return [
            [output[start : start + task.rows] for output in outputs]
            for task, start in zip(batch, offsets, strict=False)
        ]

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            pending = [task for queue in self._queues.values() for task in queue.tasks]
            self._queues.clear()
            self._order.clear()
        pending = [task for task in pending if task.claim()]
        _settle(pending, [ServingError(Code.UNAVAILABLE, "Server is shutting down")] * len(pending))


def _trace_batch(tasks: list[_Task]) -> None:
    """The call's queue time (its last part's, for a split call) and batch size, on its tracing span."""
    tracing.note_batch(max(task.started - task.enqueued for task in tasks), max(task.batch_size for task in tasks))


def _settle(tasks: list[_Task], outcomes: list[Any]) -> None:
    """Complete each task's future with its outcome (outputs, or an exception): a thread's directly,
    a loop's in one call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for task, outcome in zip(tasks, outcomes, strict=True):
        if task.loop is None or isinstance(task.future, Future):
            _complete(task.future, outcome)
        else:
            by_loop.setdefault(task.loop, []).append((task.future, outcome))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_on_loop, pairs)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _fail(tasks: list[_Task], error: ServingError) -> None:
    """After an unexpected error: complete every task not completed yet with `error`."""
    for task in tasks:
        try:
            if task.loop is None or isinstance(task.future, Future):
                if not task.future.done():
                    _complete(task.future, error)
            else:
                task.loop.call_soon_threadsafe(_settle_on_loop, [(task.future, error)])
        except Exception:  # a closed loop, a future completed meanwhile: nothing more to do for it
            pass


def _settle_on_loop(pairs: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in pairs:
        if not future.done():
            _complete(future, outcome)


def _complete(future: Future[Any] | asyncio.Future[Any], outcome: Any) -> None:
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _batch_rows(inputs: dict[str, np.ndarray]) -> int:
    sizes = {array.shape[0] if array.ndim else -1 for array in inputs.values()}
    if -1 in sizes:
        raise invalid_argument("Batching session Run() input tensors must have at least one dimension")
    if len(sizes) != 1:
        raise invalid_argument("Batching session Run() input tensors must have equal 0th-dimension size")
    return sizes.pop()


def _joined(results: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The outputs of a call from those of its parts."""
    if len(results) == 1:
        return results[0]
    return [np.concatenate(parts, axis=0) for parts in zip(*results, strict=True)]


def _split(inputs: dict[str, np.ndarray], rows: int, limit: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """A call larger than one batch becomes several tasks (enable_large_batch_splitting)."""
    if rows <= limit:
        yield inputs, rows
        return
    for start in range(0, rows, limit):
        part = {alias: array[start : start + limit] for alias, array in inputs.items()}
        yield part, min(limit, rows - start)


def _merge(arrays: list[np.ndarray], size: int, pad: bool) -> np.ndarray:
    """Concatenate along dimension 0, padding other dimensions with zeros (if allowed) and the batch with
    copies of the first row up to `size`."""
    if pad:
        target = np.max([a.shape[1:] for a in arrays], axis=0) if arrays[0].ndim > 1 else ()
        arrays = [
            a
            if a.shape[1:] == tuple(target)
            else np.pad(
                a,
                [(0, 0)] + [(0, t - s) for s, t in zip(a.shape[1:], target, strict=True)],
                constant_values=b"" if a.dtype == object else 0,
            )
            for a in arrays
        ]
    merged = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    if merged.shape[0] < size:
        merged = np.concatenate([merged, np.repeat(merged[:1], size - merged.shape[0], axis=0)], axis=0)
    return merged
