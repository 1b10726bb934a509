"""The store master: pure state (``_state``), RPC surface (``_handlers``), asyncio
service (``_service``), admin HTTP (``_admin``), and a thread runner for embedding."""

from __future__ import annotations

import gc
from typing import Any, Final

from ..._loop import LoopThread
from ..._rpcloop import RpcLoop
from .._config import MasterConfig
from ._allocator import OffsetAllocator
from ._service import MasterService, ServiceAddresses
from ._state import MasterState

__all__ = [
    "MASTER_GC_YOUNG",
    "MasterConfig",
    "MasterService",
    "MasterState",
    "OffsetAllocator",
    "ServiceAddresses",
    "ThreadedMaster",
    "tune_gc_for_master",
]


#: tracked allocations between two young collections of a master process: each
#: examines at most about this many objects (~1.5 ms per 10,000 records)
MASTER_GC_YOUNG: Final = 10_000


def tune_gc_for_master() -> None:
    """Keep the cyclic garbage collector from pausing a master for long.

    A master keeps one tracked record per object and makes no reference cycles on
    its request path.  With CPython's generational collector each record is
    examined again by every collection of an older generation it reaches: a
    master that had grown by a million objects stopped for ~260 ms in one
    middle-generation collection, and a full collection over ten million records
    takes seconds.  So here every object that survives a collection is frozen
    (``gc.freeze``: moved out of the collector's generations); the older
    generations stay empty and each collection examines only what was allocated
    since the last one (:data:`MASTER_GC_YOUNG` objects, ~1.5 ms).  Frozen objects
    are still freed by reference counting when the master drops them.

    The cost: garbage *cycles* among objects that survived one collection are never
    reclaimed, so a master must leave none behind.  Its records hold no cycle that
    outlives them (a segment's eviction deque is swept when it unmounts), and the
    closed asyncio transports of its connections are released
    (``_loop.release_transport``).  ``tests/store/test_master_gc.py`` runs
    puts, reads, removals, refusals and connection churn against a tuned master
    process, then unfreezes it: a full collection finds nothing to free.  A
    process that also runs clients (``pymooncake cluster``) keeps them for its
    lifetime anyway.

    Called by the ``mooncake_master`` and ``pymooncake cluster`` commands (never by
    the library on its own: the GC settings belong to the process).  Idempotent.
    """
    gc.collect()
    gc.freeze()  # what exists at start-up (modules, the service) is never garbage
    gc.set_threshold(MASTER_GC_YOUNG, 10, 10)
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)


def _freeze_survivors(phase: str, info: dict[str, int]) -> None:
    """``gc.callbacks`` hook: after each collection, what survived it is frozen."""
    if phase == "stop":
        gc.freeze()


class ThreadedMaster:
    """A :class:`MasterService` on its own event-loop thread (tests, embedded clusters).

    ``ThreadedMaster(config, metadata_port=0)`` starts at construction; use as a
    context manager or call :meth:`close`.
    """

    def __init__(self, config: MasterConfig | None = None, **service_kwargs: Any) -> None:
        self._closed = False
        # the loop mooncake_master runs (without its polling: a thread beside the
        # caller's must not take the GIL from them on every poll)
        self._loop = LoopThread("mc-master", RpcLoop())
        self.service = MasterService(config, **service_kwargs)
        try:
            self.addresses: ServiceAddresses = self._loop.run(self.service.start(), timeout=30)
        except BaseException:
            self._loop.close()
            raise

    @property
    def rpc_address(self) -> str:
        return self.addresses.rpc_address

    @property
    def metadata_url(self) -> str | None:
        return self.addresses.metadata_url

    @property
    def metrics_url(self) -> str | None:
        return self.addresses.metrics_url

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(state, *args)`` on the master's loop (for tests and tools)."""

        async def run() -> Any:
            return fn(self.service.state, *args)

        return self._loop.run(run(), timeout=30)

    def close(self) -> None:
        """Stop the master; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self.service.close(), timeout=30)
        finally:
            self._loop.close()

    def __enter__(self) -> ThreadedMaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
