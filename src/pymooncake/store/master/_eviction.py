"""Eviction within one segment: CLOCK over the segment's eviction deque.

The segment's ``order`` deque is the clock (see ``_records.py``): the hand takes
records from the front.  Dead records are dropped on the way.  A record that was
read since the hand last passed (``REF``), or is leased, being written,
hard-pinned, or protected by the caller goes to the back (``REF`` cleared: its
second chance); soft-pinned ones go back too unless ``allow_soft``.  Anything
else is evicted.  A call visits every live record at most twice, so its cost is
O(records visited), and a read costs nothing but setting a flag.  The reference
evicts by lease timestamp over all objects; this is the same approximate LRU
without the scan.

``max_visits`` bounds one call (the service evicts in the background a slice at
a time, between requests); the hand keeps its place between calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from ._records import BUSY, HARD_PIN, REF, SOFT_PIN, TASK, Obj, SegmentRecord

__all__ = ["compact_segment", "evict_segment"]

_SKIP: Final = BUSY | HARD_PIN | REF | TASK


def evict_segment(
    seg: SegmentRecord,
    need_bytes: int,
    now: float,
    evict: Callable[[Obj, SegmentRecord], int],
    protect: str | None = None,
    allow_soft: bool = False,
    max_visits: int | None = None,
) -> tuple[int, bool]:
    """Evict objects of ``seg`` until ``need_bytes`` bytes were freed in it.

    Args:
        evict: drops one (live) object, returns the bytes it freed in ``seg``.
        protect: a key never to evict (the put that needs the room).
        allow_soft: soft-pinned objects may go (the second pass).
        max_visits: stop after visiting this many records (None: no bound).

    Returns:
        (bytes freed in ``seg``, whether it stopped at ``max_visits`` with more
        to do: False when ``need_bytes`` were freed or nothing evictable is left).
    """
    order = seg.order
    popleft, append = order.popleft, order.append
    # twice round the clock at most: the first pass may only clear REF flags
    budget = 2 * (len(order) - seg.dead)
    visits = 0
    freed = 0
    while freed < need_bytes and budget > 0 and order:
        if max_visits is not None and visits >= max_visits:
            return freed, True
        visits += 1
        obj = popleft()
        flags = obj.flags
        if not flags:
            seg.dead -= 1  # a dead record: dropped for good
            continue
        budget -= 1
        if (
            flags & _SKIP
            or obj.lease_until > now
            or obj.key == protect
            or (
                flags & SOFT_PIN
                and not allow_soft
                and obj.ext is not None
                and obj.ext.soft_pin_until > now
            )
        ):
            obj.flags = flags & ~REF
            append(obj)  # to the back of the clock
            continue
        freed += evict(obj, seg)
        # evicting counted this record's entry here as dead, but it was already
        # taken off the deque
        seg.dead -= 1
    return freed, False


def compact_segment(seg: SegmentRecord, max_visits: int) -> int:
    """Drop dead records from ``seg``'s deque, moving at most ``max_visits``
    records (live ones go to the back in order: the hand advances without
    clearing REF).  Returns the dead records dropped."""
    order = seg.order
    popleft, append = order.popleft, order.append
    dropped = 0
    for _ in range(min(max_visits, len(order))):
        obj = popleft()
        if obj.flags:
            append(obj)
        else:
            dropped += 1
    seg.dead -= dropped
    return dropped
