"""Eviction within one segment: CLOCK over the segment's objects.

The segment's ``objs`` dict is the clock: the hand takes objects from the front.
An object that was read since the hand last passed (``REF``), or is leased,
being written, hard-pinned, or protected by the caller is moved to the back
(``REF`` cleared: its second chance); soft-pinned objects are moved back too
unless ``allow_soft``.  Anything else is evicted.  Each call visits every object
at most twice, so its cost is O(objects visited), and a read costs nothing but
setting a flag.  The reference evicts by lease timestamp over all objects; this
is the same approximate LRU without the scan.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Final

from ._records import BUSY, HARD_PIN, REF, SOFT_PIN, TASK, Obj, SegmentRecord

__all__ = ["evict_segment"]

#: objects taken from the front of the clock per slice (a slice is copied out of
#: the dict so that evictions and moves do not disturb the iteration)
_SLICE: Final = 256
_SKIP: Final = BUSY | HARD_PIN | REF | TASK


def evict_segment(
    seg: SegmentRecord,
    need_bytes: int,
    now: float,
    evict: Callable[[str, Obj, SegmentRecord], int],
    protect: str | None = None,
    allow_soft: bool = False,
) -> int:
    """Evict objects of ``seg`` until ``need_bytes`` bytes were freed in it.

    Args:
        evict: drops one object, returns the bytes it freed in ``seg``.
        protect: a key never to evict (the put that needs the room).
        allow_soft: soft-pinned objects may go (the second pass).

    Returns:
        bytes freed in ``seg``.
    """
    objs = seg.objs
    # twice round the clock at most: the first pass may only clear REF flags
    budget = 2 * len(objs)
    freed = 0
    while freed < need_bytes and budget > 0:
        batch = list(islice(objs.items(), min(budget, _SLICE)))
        if not batch:
            break
        for key, obj in batch:
            budget -= 1
            if objs.get(key) is not obj:
                continue  # went away with an earlier eviction of this slice
            flags = obj.flags
            if (
                flags & _SKIP
                or obj.lease_until > now
                or key == protect
                or (
                    flags & SOFT_PIN
                    and not allow_soft
                    and obj.ext is not None
                    and obj.ext.soft_pin_until > now
                )
            ):
                obj.flags = flags & ~REF
                del objs[key]
                objs[key] = obj  # to the back of the clock
                continue
            freed += evict(key, obj, seg)
            if freed >= need_bytes:
                break
    return freed
