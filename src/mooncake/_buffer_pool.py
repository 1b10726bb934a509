"""``mooncake.store.BufferPool``: registered scratch buffers for zero-copy I/O.

The reference's native pool (``buffer_pool.cpp``), same arguments, errors and
limits: leases come from the store's local buffer (registered memory); when
it is full the pool *overflows* into fresh aligned memory that it registers
with the store for the lease's lifetime.  ``max_bytes`` caps what is leased
at once (0: twice the local buffer), ``max_regions`` the number of leases,
``max_size_class`` only marks requests as oversize (any size is served).
Waiting for room blocks (GIL released) unless ``block=False``; every error
is a ``RuntimeError`` whose message matches the reference's ("exhausted",
"timed out", "capacity", "alignment", "active leases", "exported views").

A lease's ``buffer`` is a new memoryview on every access; while any such view
is alive the lease cannot be released (``RuntimeError``), and the view keeps
the lease (and its memory) alive even if the lease object is dropped.  A lease
that is garbage-collected returns its memory.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymooncake.store._buffers import LocalBuffer

    from .store import MooncakeDistributedStore

__all__ = ["BufferLease", "BufferLeaseView", "BufferPool"]

_view_types: dict[int, type] = {}
_view_types_lock = threading.Lock()


class BufferLeaseView:
    """The exporter behind ``BufferLease.buffer`` views (a ctypes byte array
    over the lease that holds the lease alive)."""

    _lease: BufferLease


def _view_type(size: int) -> type:
    with _view_types_lock:
        cls = _view_types.get(size)
        if cls is None:
            if len(_view_types) > 4096:
                _view_types.clear()
            cls = _view_types[size] = type(
                "BufferLeaseView", (BufferLeaseView, ctypes.c_ubyte * size), {}
            )
        return cls


class _Region:
    """Memory behind one lease: a range of the local buffer, or overflow memory."""

    __slots__ = ("addr", "mapping", "size")

    def __init__(self, addr: int, size: int, mapping: mmap.mmap | None) -> None:
        self.addr = addr
        self.size = size
        self.mapping = mapping  # overflow only


class BufferLease:
    """A leased buffer: ``ptr``, ``size`` (as requested), ``buffer`` (a writable
    memoryview), ``release()``; a context manager that releases on exit."""

    def __init__(self, pool: BufferPool, region: _Region, size: int) -> None:
        self._pool: BufferPool | None = pool
        self._region = region
        self._size = size
        self._exports = 0
        self._exports_lock = threading.Lock()

    @property
    def ptr(self) -> int:
        if self._pool is None:
            raise RuntimeError("buffer lease is closed")
        return self._region.addr

    @property
    def size(self) -> int:
        return self._size

    @property
    def buffer(self) -> memoryview:
        if self._pool is None:
            raise RuntimeError("buffer lease is closed")
        if self._size == 0:
            return memoryview(bytearray(0))
        view: Any = _view_type(self._size).from_address(self._region.addr)  # type: ignore[attr-defined]
        view._lease = self
        with self._exports_lock:
            self._exports += 1
        weakref.finalize(view, self._unexport)
        return memoryview(view).cast("B")

    def _unexport(self) -> None:
        with self._exports_lock:
            self._exports -= 1

    def release(self) -> None:
        """Return the buffer to the pool (idempotent).

        Raises:
            RuntimeError: memoryviews of :attr:`buffer` are still alive.
        """
        if self._pool is None:
            return
        if self._exports:
            raise RuntimeError("cannot release buffer while exported views exist")
        self._give_back()

    def _give_back(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._release(self._region)

    def __enter__(self) -> BufferLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self._give_back()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "released" if self._pool is None else f"ptr={self._region.addr:#x}"
        return f"<BufferLease {state} size={self._size}>"


class BufferPool:
    """Leases of registered memory from a store (see the module doc).

    Args:
        store: a set-up ``MooncakeDistributedStore`` with a local buffer.
        max_bytes: bytes leased at once (0: twice the local buffer; at least it).
        min_size_class: must be positive (sizes are not rounded: kept for the
            reference's signature).
        max_size_class: requests above it count as oversize (default max_bytes).
        alignment: of overflow buffers; a power of two >= 8.
        block_on_exhaustion: wait for room by default.
        default_timeout: default wait limit in seconds (None: forever).
        max_regions: leases at once (None: unlimited).
        prewarm_size, prewarm_count: accepted; nothing to prewarm (the local
            buffer is registered up front), as in the reference.

    Raises:
        RuntimeError: the store is not set up or has no local buffer, or an
            argument is invalid.
    """

    def __init__(
        self,
        store: MooncakeDistributedStore,
        max_bytes: int = 0,
        min_size_class: int = 64 * 1024,
        max_size_class: int | None = None,
        alignment: int = 8 * 1024 * 1024,
        block_on_exhaustion: bool = True,
        default_timeout: float | None = None,
        max_regions: int | None = None,
        prewarm_size: int | None = None,
        prewarm_count: int = 0,
    ) -> None:
        client = getattr(store, "_client", None)
        if client is None:
            raise RuntimeError("MooncakeDistributedStore is not initialized")
        if min_size_class <= 0 or alignment <= 0:
            raise RuntimeError("min_size_class and alignment must be positive")
        if alignment < ctypes.sizeof(ctypes.c_void_p) or alignment & (alignment - 1):
            raise RuntimeError("alignment must be a power of two and at least sizeof(void*)")
        local: LocalBuffer = client.local
        if local.size == 0:
            raise RuntimeError("BufferPool requires a store configured with a local buffer")
        self._store = store
        self._local = local
        self._max_bytes = local.size * 2 if max_bytes == 0 else max(max_bytes, local.size)
        self._max_size_class = self._max_bytes if max_size_class is None else max_size_class
        self._alignment = alignment
        self._block = bool(block_on_exhaustion)
        self._default_timeout = default_timeout
        self._max_regions = max_regions
        self._cond = threading.Condition()
        self._in_use: dict[int, _Region] = {}
        self._total = 0
        self._reserved = 0
        self._reserved_regions = 0
        self._closed = False
        self._closing = False
        self.oversize_allocations = 0

    def _has_capacity(self, n: int) -> bool:
        if n > self._max_bytes - self._total - self._reserved:
            return False
        return (
            self._max_regions is None
            or len(self._in_use) + self._reserved_regions < self._max_regions
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("buffer pool is closed")
        if self._closing:
            raise RuntimeError("buffer pool is closing")

    def acquire(
        self, size: int, block: bool | None = None, timeout: float | None = None
    ) -> BufferLease:
        """Lease ``size`` bytes (0 is allowed).

        Raises:
            RuntimeError: larger than the pool ("capacity"), no room and not
                blocking ("exhausted"), the wait timed out, the pool closed.
        """
        should_block = self._block if block is None else bool(block)
        wait = self._default_timeout if timeout is None else timeout
        if wait is not None and wait < 0:
            raise RuntimeError("timeout must be non-negative")
        n = max(int(size), 1)
        if n > self._max_bytes:
            raise RuntimeError("requested buffer size exceeds pool capacity")
        deadline = None if wait is None else time.monotonic() + wait
        with self._cond:
            while True:
                self._check_open()
                if self._has_capacity(n):
                    region = self._allocate(n)
                    if region is not None:
                        if size > self._max_size_class:
                            self.oversize_allocations += 1
                        return BufferLease(self, region, int(size))
                if not should_block:
                    raise RuntimeError("buffer pool is exhausted")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise RuntimeError("timed out waiting for buffer")
                self._cond.wait(left)

    buffer = acquire

    def _allocate(self, n: int) -> _Region | None:
        """Reserve ``n`` bytes (lock held; released around registration)."""
        self._reserved += n
        self._reserved_regions += 1
        try:
            got = self._local.take(n)
            if got is not None:
                region = _Region(got[0], n, None)
            else:
                self._cond.release()
                try:
                    region = self._overflow(n)
                finally:
                    self._cond.acquire()
        finally:
            self._reserved -= n
            self._reserved_regions -= 1
            self._cond.notify_all()
        if self._closing or self._closed:
            self._free(region)
            raise RuntimeError("buffer pool is closing")
        self._in_use[region.addr] = region
        self._total += n
        return region

    def _overflow(self, n: int) -> _Region:
        """Fresh memory aligned to ``alignment``, registered with the store."""
        mapping = mmap.mmap(-1, n + self._alignment)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        addr = (base + self._alignment - 1) & ~(self._alignment - 1)
        if self._store.register_buffer(addr, n) != 0:
            mapping.close()
            raise RuntimeError("overflow buffer registration failed")
        return _Region(addr, n, mapping)

    def _free(self, region: _Region) -> None:
        if region.mapping is None:
            self._local.give_back(region.addr)
            return
        rc = self._store.unregister_buffer(region.addr)
        try:
            region.mapping.close()
        except BufferError:  # a ctypes view still points into it; it goes with the view
            pass
        if rc != 0:
            raise RuntimeError("overflow buffer unregistration failed")

    def _release(self, region: _Region) -> None:
        with self._cond:
            if self._in_use.pop(region.addr, None) is None:
                raise RuntimeError("buffer lease is not active")
            self._total -= region.size
        try:
            self._free(region)
        finally:
            with self._cond:
                self._cond.notify_all()

    def prewarm(self, size: int, count: int) -> None:
        """Nothing to do: the local buffer is registered up front."""

    def close(self) -> None:
        """Close the pool (idempotent).

        Raises:
            RuntimeError: leases are still active.
        """
        with self._cond:
            if self._closed:
                return
            self._closing = True
            while self._reserved_regions:
                self._cond.wait()
            self._closing = False
            if self._in_use:
                self._cond.notify_all()
                raise RuntimeError("cannot close buffer pool with active leases")
            self._closed = True
            self._cond.notify_all()


RegisteredBufferPool = BufferPool
RegisteredBufferLease = BufferLease
RegisteredBufferLeaseView = BufferLeaseView
