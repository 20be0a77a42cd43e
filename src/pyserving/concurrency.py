"""The one place where synchronous work (TensorFlow, JSON encoding) leaves the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["INLINE_BYTES", "run_sized", "run_sync", "worker_pool"]

T = TypeVar("T")

# Decoding or encoding a request or response up to about this many bytes runs on the event
# loop (at most a few hundred microseconds, far less for json_numeric's arrays). A hand-off to
# a worker thread costs more than that: the worker's Python code holds the GIL the loop needs,
# so a 17 KiB body (a 28x28 image) decoded off the loop halved throughput. Larger ones go to
# the pool so a big tensor never stalls the other connections for long.
INLINE_BYTES = 64 * 1024


def worker_pool(threads: int, name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix=name)


async def run_sync(pool: Executor, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` on `pool` and await its result without blocking the loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(pool, fn, *args)


async def run_sized(pool: Executor, size: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` inline when its input is at most `INLINE_BYTES` (`size`), else on `pool`.

    Only for CPU work that grows with `size` (codecs); TensorFlow calls always use `run_sync`.
    """
    if size <= INLINE_BYTES:
        return fn(*args)
    return await run_sync(pool, fn, *args)
