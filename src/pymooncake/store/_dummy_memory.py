"""The real client's view of its dummy clients (pure state; the clock is passed in).

Theory of operation
-------------------
Each dummy client that said ``hello`` has a :class:`DummyState`: the shared
regions it registered (where each lies in the dummy's address space and where
the real client mapped the same pages) and when it was last heard of.  Store
calls from a dummy name addresses in *the dummy's* address space;
:meth:`DummyState.translate` turns each range into the real client's address
(the reference's ``map_dummy_buffer_to_real``), refusing any range that is not
entirely inside one registered region -- a dummy can only ever make the real
client touch memory the dummy shared.

:class:`DummyTable` does the reference's liveness bookkeeping
(``dummy_client_monitor_func``): every ping refreshes a dummy; one silent for
longer than the TTL (10 s by default) is expired, and the service unmaps its
regions.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import InvalidParams

__all__ = ["DummyState", "DummyTable", "MappedRegion"]


@dataclass(frozen=True, slots=True)
class MappedRegion:
    """``size`` bytes at ``dummy_base`` in the dummy, mapped at ``real_base`` here."""

    dummy_base: int
    size: int
    real_base: int
    local_buffer: bool = False

    @property
    def dummy_end(self) -> int:
        return self.dummy_base + self.size


@dataclass
class DummyState:
    """One dummy client: its registered regions and liveness."""

    client_id: str
    pid: int = 0
    last_seen: float = 0.0
    _bases: list[int] = field(default_factory=list, repr=False)  # sorted dummy bases
    _regions: dict[int, MappedRegion] = field(default_factory=dict, repr=False)

    def regions(self) -> Iterator[MappedRegion]:
        return iter(list(self._regions.values()))

    @property
    def region_count(self) -> int:
        return len(self._regions)

    @property
    def mapped_bytes(self) -> int:
        return sum(r.size for r in self._regions.values())

    def get(self, dummy_base: int) -> MappedRegion | None:
        return self._regions.get(dummy_base)

    def add(self, region: MappedRegion) -> None:
        """Record a mapped region.

        Raises:
            InvalidParams: it overlaps a region registered before (at another base).
        """
        i = bisect.bisect_left(self._bases, region.dummy_base)
        prev = self._regions[self._bases[i - 1]] if i > 0 else None
        nxt = self._regions[self._bases[i]] if i < len(self._bases) else None
        if (prev is not None and prev.dummy_end > region.dummy_base) or (
            nxt is not None and region.dummy_end > nxt.dummy_base
        ):
            raise InvalidParams(
                f"dummy region [{region.dummy_base:#x}, +{region.size}) overlaps one registered "
                "before; unregister the old buffer first"
            )
        self._bases.insert(i, region.dummy_base)
        self._regions[region.dummy_base] = region

    def remove(self, dummy_base: int) -> MappedRegion:
        """Forget the region registered at ``dummy_base``.

        Raises:
            InvalidParams: nothing is registered there.
        """
        region = self._regions.pop(dummy_base, None)
        if region is None:
            raise InvalidParams(
                f"no shared buffer of this dummy client is registered at {dummy_base:#x} "
                "(unregister_buffer takes the address register_buffer was given)"
            )
        self._bases.remove(dummy_base)
        return region

    def translate(self, addr: int, length: int) -> int:
        """The real client's address of the dummy's ``[addr, addr + length)``.

        Raises:
            InvalidParams: the range is not inside one registered region.
        """
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0 and length >= 0:
            region = self._regions[self._bases[i]]
            if addr + length <= region.dummy_end:
                return region.real_base + (addr - region.dummy_base)
        raise InvalidParams(
            f"dummy buffer [{addr:#x}, +{length}) is not inside shared memory registered with "
            "the real client: allocate it with alloc_from_mem_pool() (or "
            "MooncakeHostMemAllocator) and register_buffer() it first"
        )


class DummyTable:
    """Known dummy clients and their liveness (the clock is passed in)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._dummies: dict[str, DummyState] = {}

    def __len__(self) -> int:
        return len(self._dummies)

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._dummies

    def get(self, client_id: str) -> DummyState | None:
        return self._dummies.get(client_id)

    def all(self) -> list[DummyState]:
        return list(self._dummies.values())

    def hello(self, client_id: str, pid: int, now: float) -> DummyState:
        """A dummy (re)connected: known from now on; the same state if known already."""
        state = self._dummies.get(client_id)
        if state is None:
            state = self._dummies[client_id] = DummyState(client_id, pid, now)
        state.last_seen = now
        return state

    def seen(self, client_id: str, now: float) -> DummyState | None:
        """A ping: refresh a known dummy (None if unknown)."""
        state = self._dummies.get(client_id)
        if state is not None:
            state.last_seen = now
        return state

    def pop(self, client_id: str) -> DummyState | None:
        return self._dummies.pop(client_id, None)

    def expired(self, now: float) -> list[DummyState]:
        """Dummies silent for more than the TTL, removed from the table."""
        gone = [s for s in self._dummies.values() if now - s.last_seen > self.ttl_s]
        for s in gone:
            del self._dummies[s.client_id]
        return gone
