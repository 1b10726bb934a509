"""A dummy client's memory: what it shares with its real client, and staging.

Theory of operation
-------------------
The real client can only reach memory the dummy *registered* with it
(``_dummy_service.py`` maps those memfds).  Every buffer a store call names is
resolved here into ranges of that shared memory:

* a range inside a registered region (the local buffer, a buffer from
  ``alloc_from_mem_pool`` or ``MooncakeHostMemAllocator`` passed to
  ``register_buffer``) is used in place: the real client's engine reads or
  writes it directly, nothing is copied;
* anything else (a ``bytes`` value, a numpy array, a tensor's memory) is
  *staged* through the local buffer: copied in before a put, copied out after
  a get -- the one copy through the shared pool.

Staging takes space from the local buffer (``setup_dummy``'s
``local_buffer_size``); a call that needs more than is free waits while other
calls' staging is in flight (it will be given back soon) and fails when
nothing it waits for can free space.  ``get_buffer`` handles live in the same
buffer until released.
"""

from __future__ import annotations

import bisect
import ctypes
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParams, NoAvailableHandle, StoreError, store_error
from ..transfer._memory import buffer_address, is_host_memory, view_at
from ._buffers import LocalBuffer
from ._shm import ShmRegion, ShmRegistry
from ._types import ErrorCode

__all__ = ["DummyMemory", "Span"]


@dataclass(frozen=True, slots=True)
class Span:
    """Caller memory named by a store call: ``n`` bytes at ``addr``; ``view`` is
    a byte view of them when the caller passed a buffer object."""

    addr: int
    n: int
    view: memoryview | None = None

    def bytes_view(self, writable: bool) -> memoryview:
        if self.view is not None:
            return self.view
        if not is_host_memory(self.addr, self.n):
            raise InvalidParams(
                f"[{self.addr:#x}, +{self.n}) is not host memory of this process: a stale "
                "pointer, or device memory (dummy clients move host memory only)"
            )
        return view_at(self.addr, self.n)


def _as_view(obj: Any, writable: bool) -> memoryview:
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidParams(
            f"{type(obj).__name__} is neither a buffer nor an (address, size) pair"
        ) from None
    if writable and view.readonly:
        raise InvalidParams("a read needs a writable destination; got a read-only buffer")
    if not view.c_contiguous:
        raise InvalidParams("buffers must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def span_of(part: Any, size: int | None = None, *, writable: bool) -> Span:
    """A store call's buffer argument as a :class:`Span`: an ``(address, size)``
    pair, an address with ``size``, or a buffer object (first ``size`` bytes).

    Raises:
        InvalidParams: not a buffer, read-only for a read, a bad size or pointer.
    """
    if isinstance(part, Span):
        return part
    if isinstance(part, tuple):
        part, size = part
    if isinstance(part, int):
        if size is None or size < 0:
            raise InvalidParams("a raw address needs a size >= 0")
        if size and part <= 0:
            raise InvalidParams(f"address {part:#x} is not valid")
        return Span(part, size)
    if hasattr(part, "data_ptr") and hasattr(part, "nbytes") and not isinstance(part, memoryview):
        if getattr(part, "is_cuda", False):
            raise InvalidParams(
                "device (GPU) memory cannot go through a dummy client: copy it to host "
                "memory first (or use a full client with setup())"
            )
        n = int(part.nbytes) if size is None else size
        return Span(int(part.data_ptr()), n)
    view = _as_view(part, writable)
    if size is not None:
        if not 0 <= size <= len(view):
            raise InvalidParams(f"size {size} exceeds the {len(view)}-byte buffer")
        view = view[:size]
    return Span(buffer_address(view) if len(view) else 0, len(view), view)


class DummyMemory:
    """Shared regions of one dummy client, its local buffer and staging (thread-safe).

    Args:
        shm: the process's shareable regions.
        local: the local buffer (registered by the client before use).
        local_region: its memfd region (None without a local buffer).
        mem_pool_size: what ``alloc_from_mem_pool`` may hand out in total.
        wait_s: how long staging waits for space other calls hold.
    """

    def __init__(
        self,
        shm: ShmRegistry,
        local: LocalBuffer,
        local_region: ShmRegion | None,
        mem_pool_size: int,
        wait_s: float = 30.0,
    ) -> None:
        self.shm = shm
        self.local = local
        self.local_region = local_region
        self.mem_pool_size = mem_pool_size
        self._wait_s = wait_s
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._bases: list[int] = []  # registered with the real client, sorted
        self._registered: dict[int, ShmRegion] = {}
        self._pool: list[ShmRegion] = []  # from alloc_from_mem_pool
        self._pool_used = 0
        self._staged = 0  # local-buffer bytes held by running calls

    # --- shared regions ------------------------------------------------------------

    def mark_registered(self, region: ShmRegion) -> None:
        with self._lock:
            if region.addr not in self._registered:
                bisect.insort(self._bases, region.addr)
                self._registered[region.addr] = region

    def mark_unregistered(self, base: int) -> ShmRegion | None:
        with self._lock:
            region = self._registered.pop(base, None)
            if region is not None:
                self._bases.remove(base)
            return region

    def registered(self) -> list[ShmRegion]:
        with self._lock:
            return [self._registered[b] for b in self._bases]

    def registered_region(self, addr: int, n: int = 1) -> ShmRegion | None:
        """The registered region holding ``[addr, addr + n)``, or None."""
        with self._lock:
            i = bisect.bisect_right(self._bases, addr) - 1
            if i < 0:
                return None
            region = self._registered[self._bases[i]]
        return region if addr + max(n, 1) <= region.end else None

    def shared(self, span: Span) -> bool:
        """Whether the real client can reach ``span`` in place."""
        return span.n == 0 or self.registered_region(span.addr, span.n) is not None

    def local_view(self, addr: int, n: int) -> memoryview:
        """A byte view of ``n`` bytes at ``addr`` (shared memory, or host memory
        the caller vouches for).

        Raises:
            InvalidParams: not host memory of this process.
        """
        region = self.shm.find(addr, n)
        if region is not None:
            return region.slice(addr, n)
        return Span(addr, n).bytes_view(True)

    # --- the memory pool ---------------------------------------------------------------

    def alloc_pool(self, size: int, populate: bool) -> ShmRegion:
        """A new shared buffer of ``size`` bytes counted against ``mem_pool_size``.

        Raises:
            InvalidParams: ``size`` is not positive.
            NoAvailableHandle: the pool is exhausted.
        """
        if size <= 0:
            raise InvalidParams(f"alloc_from_mem_pool({size}): the size must be positive")
        with self._lock:
            if self._pool_used + size > self.mem_pool_size:
                raise NoAvailableHandle(
                    f"alloc_from_mem_pool({size}): the dummy client's memory pool is exhausted "
                    f"({self._pool_used} of mem_pool_size={self.mem_pool_size} bytes handed out); "
                    "pass a larger mem_pool_size to setup_dummy"
                )
            self._pool_used += size
        try:
            region = self.shm.allocate(size, populate=populate)
        except BaseException:
            with self._lock:
                self._pool_used -= size
            raise
        with self._lock:
            self._pool.append(region)
        return region

    def release_all(self) -> None:
        """Free the pool buffers and the local buffer (the client closes)."""
        with self._lock:
            pool, self._pool = self._pool, []
            self._registered.clear()
            self._bases.clear()
            self._pool_used = 0
        for region in pool:
            self.shm.free(region.addr)
        if self.local_region is not None:
            self.shm.free(self.local_region.addr)

    # --- staging ------------------------------------------------------------------------

    def stage(self, n: int, held: int, what: str) -> tuple[int, memoryview] | None:
        """``n`` bytes of the local buffer for a call that holds ``held`` bytes of
        staging already.  Waits while *other* calls hold staging space; None when
        only this call's own staging (or handles) stand in the way.

        Raises:
            InvalidParams: ``n`` exceeds the whole local buffer.
        """
        if n > self.local.size:
            raise store_error(
                int(ErrorCode.INVALID_PARAMS),
                f"{what}: {n} bytes cannot be staged through the dummy client's local buffer "
                f"({self.local.size} bytes, setup_dummy's local_buffer_size); raise "
                "local_buffer_size, or use a registered buffer from alloc_from_mem_pool() "
                "with the *_from / *_into calls (no staging)",
            )
        deadline = time.monotonic() + self._wait_s
        with self._space:
            while True:
                got = self.local.take(n)
                if got is not None:
                    self._staged += self.local.size_of(got[0])
                    return got
                left = deadline - time.monotonic()
                if self._staged - held <= 0 or left <= 0:
                    return None
                self._space.wait(left)

    def unstage(self, addrs: Sequence[int]) -> None:
        if not addrs:
            return
        with self._space:
            for a in addrs:
                self._staged -= self.local.give_back(a)
            self._space.notify_all()

    def no_room(self, n: int, what: str, *, write: bool) -> StoreError:
        """The error of a call that found no room to stage ``n`` bytes: INVALID_PARAMS
        for writes (as the reference's put), NO_AVAILABLE_HANDLE for reads."""
        code = ErrorCode.INVALID_PARAMS if write else ErrorCode.NO_AVAILABLE_HANDLE
        return store_error(
            int(code),
            f"{what}: no room to stage {n} bytes in the dummy client's local buffer "
            f"({self.local.size} bytes, {self.local.free_bytes} free; BufferHandles from "
            "get_buffer hold space until released); release handles or raise "
            "local_buffer_size",
        )


def copy_into(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` releasing the GIL for large copies (ctypes.memmove)."""
    n = len(src)
    if n >= 256 * 1024 and not dst.readonly:
        ctypes.memmove(buffer_address(dst), buffer_address(src), n)
    else:
        dst[:n] = src
