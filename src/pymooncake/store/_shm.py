"""Shareable host memory of this process: memfd regions another process can map.

Theory of operation
-------------------
A dummy client shares memory with its real client (``mooncake_client``) by
handing over a file descriptor: each region is a ``memfd`` mapped
``MAP_SHARED`` here; the real client maps the same pages and registers them
with its transfer engine, so the engine reads and writes the dummy's memory
directly.  This module keeps the process-wide table of such regions (the
reference's ``ShmHelper`` singleton), so memory from
``MooncakeHostMemAllocator.alloc`` and from ``alloc_from_mem_pool`` can both be
registered by a dummy client.

The fd of each region stays open until the region is freed: after a restart of
the real client the dummy sends it again.  Regions are *sealed* against
shrinking (``F_SEAL_SHRINK``): a mapping of a truncated memfd raises SIGBUS
on access, so a sealed memfd is what lets the real client map a dummy's memory
without trusting it not to truncate the file later.
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
import threading
from dataclasses import dataclass, field

from ..errors import InvalidArgument
from ..transfer._memory import buffer_address

__all__ = ["ShmRegion", "ShmRegistry", "shm_registry"]

#: what /proc/<pid>/maps shows for these regions (the reference's MOONCAKE_SHM_NAME)
SHM_NAME = "mooncake_shm"


@dataclass(eq=False)
class ShmRegion:
    """One memfd mapped ``MAP_SHARED``: ``size`` bytes at ``addr``."""

    fd: int
    addr: int
    size: int
    mapping: mmap.mmap = field(repr=False)
    view: memoryview = field(repr=False)

    @property
    def end(self) -> int:
        return self.addr + self.size

    def slice(self, addr: int, length: int) -> memoryview:
        """The bytes ``[addr, addr + length)``, which must lie inside the region."""
        start = addr - self.addr
        if start < 0 or length < 0 or start + length > self.size:
            raise InvalidArgument(
                f"[{addr:#x}, +{length}) is outside the shared region [{self.addr:#x}, +{self.size})"
            )
        return self.view[start : start + length]


def _create(size: int, populate: bool) -> ShmRegion:
    fd = os.memfd_create(SHM_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        # the real client maps it: it must never shrink under that mapping
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        flags = mmap.MAP_SHARED
        if populate:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, size, flags=flags)
    except BaseException:
        os.close(fd)
        raise
    view = memoryview(mm)
    return ShmRegion(fd, buffer_address(view), size, mm, view)


def _release(region: ShmRegion) -> None:
    try:
        os.close(region.fd)
    except OSError:
        pass
    region.view.release()
    try:
        region.mapping.close()
    except BufferError:  # a view still points into it: unmapped when that view goes
        pass


class ShmRegistry:
    """The shareable regions of this process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bases: list[int] = []  # sorted
        self._regions: dict[int, ShmRegion] = {}

    def allocate(self, size: int, *, populate: bool = False) -> ShmRegion:
        """A new region of exactly ``size`` bytes (the mapping starts page-aligned).

        ``populate`` faults the pages in now (MAP_POPULATE, as the reference).

        Raises:
            InvalidArgument: ``size`` is not positive.
            OSError: memfd_create/ftruncate/mmap failed (out of memory, no memfd).
        """
        if size <= 0:
            raise InvalidArgument(f"cannot allocate {size} bytes of shared memory")
        region = _create(size, populate)
        with self._lock:
            bisect.insort(self._bases, region.addr)
            self._regions[region.addr] = region
        return region

    def free(self, addr: int) -> bool:
        """Unmap the region starting at ``addr``; False if there is none."""
        with self._lock:
            region = self._regions.pop(addr, None)
            if region is None:
                return False
            self._bases.remove(addr)
        _release(region)
        return True

    def find(self, addr: int, length: int = 1) -> ShmRegion | None:
        """The region holding ``[addr, addr + length)`` entirely, or None."""
        with self._lock:
            i = bisect.bisect_right(self._bases, addr) - 1
            if i < 0:
                return None
            region = self._regions[self._bases[i]]
        if addr + max(length, 1) > region.end:
            return None
        return region


_REGISTRY = ShmRegistry()


def shm_registry() -> ShmRegistry:
    """The process-wide registry (the reference's ``ShmHelper::getInstance()``)."""
    return _REGISTRY
