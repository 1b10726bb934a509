"""A private asyncio event loop on a background thread.

Blocking facades (the transfer engine, later the store client) run their
asyncio servers here, so callers never need an event loop of their own and
never share theirs with us.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread", "raw_transport", "release_transport"]

T = TypeVar("T")


def raw_transport(transport: asyncio.BaseTransport) -> asyncio.BaseTransport | None:
    """The socket transport under ``transport`` (itself, or the one under a TLS
    transport), to pass to :func:`release_transport` once the connection is lost.
    Take it while the connection is open: asyncio forgets it when TLS closes."""
    ssl_protocol = getattr(transport, "_ssl_protocol", None)
    if ssl_protocol is None:
        return transport
    raw: asyncio.BaseTransport | None = getattr(ssl_protocol, "_transport", None)
    return raw


def _no_read() -> None:
    """Stands in for a released transport's read callback (never reads)."""


def release_transport(transport: asyncio.BaseTransport | None) -> None:
    """Break the reference cycle of a closed asyncio socket transport.

    CPython's selector transports keep a bound method of themselves as their read
    callback, so a transport that has closed is a reference cycle that only the
    cyclic garbage collector frees -- and a master process freezes what survives a
    collection (``store.master.tune_gc_for_master``), so it would never be freed.
    Replacing the callback by a plain function after the close lets reference
    counting free the transport (and its socket object) at once.  Call it only
    after ``close()``/``abort()``: the transport reads nothing afterwards.  Harmless
    for transports without that attribute.
    """
    if transport is not None and "_read_ready_cb" in getattr(transport, "__dict__", ()):
        transport._read_ready_cb = _no_read  # type: ignore[attr-defined]


class LoopThread:
    """Runs an event loop in a daemon thread until :meth:`close`.

    Args:
        name: the thread's name.
        loop: the loop to run (default: a new one of asyncio's policy).
    """

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop if loop is not None else asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()
        self._ready.wait()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(self._loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            finally:
                self._loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (GIL released while waiting)."""
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
