"""The one place where synchronous work (TensorFlow, JSON encoding) leaves the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def worker_pool(threads: int, name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix=name)


async def run_sync(pool: ThreadPoolExecutor, fn: Callable[..., T], *args) -> T:
    """Run `fn(*args)` on `pool` and await its result without blocking the loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(pool, fn, *args)
