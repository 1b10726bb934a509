"""``mooncake.async_store``: the store's API as coroutines.

``MooncakeDistributedStoreAsync`` is a :class:`~mooncake.store.MooncakeDistributedStore`
whose every public method ``name`` also exists as ``async_name``: a coroutine
that runs the method on a thread pool owned by the store, so an event loop is
never blocked, and returns the same value (``await store.async_put(k, v)``
returns 0 or a negative code, ``await store.async_get_tensor(k)`` a tensor or
None).

Why threads: a store call talks to the master over a blocking socket and
moves bytes with the transfer engine's worker threads; neither has an
asyncio face that covers a whole store operation, so each call runs on one
pool thread (GIL released while it waits on sockets).  The pool is bounded
(``max_workers``, default ``min(32, cpus + 4)`` as asyncio's default
executor), created on first use and shut down by :meth:`close`.  Calls made
from several event loops share it.

The reference builds ``async_*`` on attribute lookup and runs them on the
event loop's default executor; here the methods are real attributes of the
class (``dir()`` and ``help()`` show them) and the pool is the store's own,
so closing the store stops its threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from .store import MooncakeDistributedStore

__all__ = ["MooncakeDistributedStoreAsync"]


class MooncakeDistributedStoreAsync(MooncakeDistributedStore):
    """A store with ``async_<method>`` coroutines for every method.

    Args:
        max_workers: threads that run calls concurrently (default
            ``min(32, os.cpu_count() + 4)``).
    """

    def __init__(self, max_workers: int | None = None) -> None:
        super().__init__()
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self._max_workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._worker_idents: set[int] = set()

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self._max_workers,
                    thread_name_prefix="mc-store-async",
                    initializer=lambda: self._worker_idents.add(threading.get_ident()),
                )
            return self._executor

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), functools.partial(method, *args, **kwargs))

    def close(self) -> int:
        """Close the store, then stop the pool (waiting for running calls,
        unless called from one of them, i.e. through ``async_close``)."""
        rc = super().close()
        with self._executor_lock:
            executor, self._executor = getattr(self, "_executor", None), None
        if executor is not None:
            executor.shutdown(wait=threading.get_ident() not in self._worker_idents)
        return rc


def _async_method(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    sync = getattr(MooncakeDistributedStore, name)

    @functools.wraps(sync)
    async def method(self: MooncakeDistributedStoreAsync, *args: Any, **kwargs: Any) -> Any:
        return await self._call(getattr(self, name), *args, **kwargs)

    method.__name__ = method.__qualname__ = f"async_{name}"
    method.__doc__ = (
        f"Coroutine form of :meth:`MooncakeDistributedStore.{name}` (runs on the store's pool).\n\n"
        + (sync.__doc__ or "")
    )
    return method


#: every public method of the store, as a coroutine
ASYNC_METHODS = tuple(
    name
    for name in dir(MooncakeDistributedStore)
    if not name.startswith("_") and callable(getattr(MooncakeDistributedStore, name))
)
for _name in ASYNC_METHODS:
    setattr(MooncakeDistributedStoreAsync, f"async_{_name}", _async_method(_name))
del _name
