"""The one place where synchronous work (TensorFlow, JSON encoding) leaves the event loop, and how
background threads survive their failures.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["INLINE_BYTES", "LoopGuard", "run_sized", "run_sync", "submit_logged", "worker_pool"]

T = TypeVar("T")

log = logging.getLogger("pyserving")

# Decoding or encoding a request or response up to about this many bytes runs on the event
# loop (at most a few hundred microseconds, far less for json_numeric's arrays). A hand-off to
# a worker thread costs more than that: the worker's Python code holds the GIL the loop needs,
# so a 17 KiB body (a 28x28 image) decoded off the loop halved throughput. Larger ones go to
# the pool so a big tensor never stalls the other connections for long.
INLINE_BYTES = 64 * 1024


def worker_pool(threads: int, name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix=name)


async def run_sync(pool: Executor, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` on `pool` and await its result without blocking the loop; `fn` sees the caller's
    context variables (as with `asyncio.to_thread`), such as the request's tracing span.

    The worker hands the outcome straight to a loop future (one call_soon_threadsafe):
    `loop.run_in_executor` chains the pool's Future to an asyncio one through locks and
    callbacks, and cost about twice as much per call (35 against 15 us, 16 tasks on uvloop),
    paid by every request whose session call leaves the loop. A task cancelled before the
    worker starts its call cancels the call, as with run_in_executor.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    work = pool.submit(contextvars.copy_context().run, _run_into, loop, future, fn, args)
    try:
        return await future
    except asyncio.CancelledError:
        work.cancel()
        raise


def _run_into(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], fn: Callable[..., Any], args: Any) -> None:
    try:
        result = fn(*args)
    except BaseException as exc:  # the awaiting task gets it, as from run_in_executor
        _call_soon(loop, _settle, future, None, exc)
    else:
        _call_soon(loop, _settle, future, result, None)


def _call_soon(loop: asyncio.AbstractEventLoop, *callback: Any) -> None:
    try:
        loop.call_soon_threadsafe(*callback)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is None:
        future.set_result(result)
    elif isinstance(exc, (StopIteration, asyncio.CancelledError)):  # a future refuses these two
        future.set_exception(RuntimeError(f"{type(exc).__name__} raised in a worker thread"))
    else:
        future.set_exception(exc)


async def run_sized(pool: Executor, size: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` inline when its input is at most `INLINE_BYTES` (`size`), else on `pool`.

    Only for CPU work that grows with `size` (codecs); TensorFlow calls always use `run_sync`.
    """
    if size <= INLINE_BYTES:
        return fn(*args)
    return await run_sync(pool, fn, *args)


class LoopGuard:
    """`with guard:` around one pass of a background loop: an exception ends that pass, not the thread.

    It is logged with its traceback; the same failure again in the next passes (same type and
    message) is logged in one line, so a loop that fails every second does not flood the log.
    A pass that succeeds resets that memory.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._last: tuple[type, str] | None = None

    def __enter__(self) -> LoopGuard:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None or exc_type is None:
            self._last = None
            return False
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not ours to swallow
            return False
        key = (exc_type, str(exc))
        if key == self._last:
            log.error("%s failed again: %s: %s", self._what, exc_type.__name__, exc)
        else:
            log.error("%s failed; it goes on", self._what, exc_info=(exc_type, exc, tb))
        self._last = key
        return True


def submit_logged(pool: Executor, what: str, fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """`pool.submit(fn, *args)` whose exception, if any, is logged with its traceback (nobody waits on
    the future of background work, so it would be lost otherwise)."""
    future = pool.submit(fn, *args)
    future.add_done_callback(lambda done: _log_failure(what, done))
    return future


def _log_failure(what: str, future: Future[Any]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.error("%s failed", what, exc_info=(type(exc), exc, exc.__traceback__))
