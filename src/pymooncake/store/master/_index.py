"""The master's key -> object map, sharded so that whole-index work can be cut
into pieces.

Theory of operation
-------------------
One Python dict of ten million keys cannot be walked without blocking the event
loop for a second, nor copied (``list(d)``) in less than ~100 ms, and a dict
iterator dies when the dict changes.  :class:`ObjectIndex` spreads keys over
:data:`SHARDS` dicts by hash (like the reference's 1024 metadata shards): a
lookup costs one extra index, and a scan (regex queries, snapshots, listings)
takes one shard at a time -- a few thousand keys, well under a millisecond to
copy -- and yields to the loop between shards.  A scan is therefore not an
atomic snapshot: keys added or removed during it may or may not be seen, as
with the reference's shard-by-shard locking.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from ._records import Obj

__all__ = ["SHARDS", "SHARD_MASK", "ObjectIndex"]

#: number of shards (a power of two)
SHARDS: Final = 1024
_MASK: Final = SHARDS - 1
#: ``shards[hash(key) & SHARD_MASK]`` is the shard of ``key``
SHARD_MASK: Final = _MASK


class ObjectIndex:
    """``key -> Obj`` with dict-like access and shard-wise iteration."""

    __slots__ = ("_count", "shards")

    def __init__(self) -> None:
        self.shards: list[dict[str, Obj]] = [{} for _ in range(SHARDS)]
        self._count = 0

    def get(self, key: str) -> Obj | None:
        return self.shards[hash(key) & _MASK].get(key)

    def __getitem__(self, key: str) -> Obj:
        return self.shards[hash(key) & _MASK][key]

    def __contains__(self, key: object) -> bool:
        return key in self.shards[hash(key) & _MASK]

    def shard(self, key: str) -> dict[str, Obj]:
        """The shard dict of ``key`` (for callers that look up and then insert:
        after inserting a new key into it directly, call :meth:`added`)."""
        return self.shards[hash(key) & _MASK]

    def added(self, count: int = 1) -> None:
        self._count += count

    def add(self, key: str, obj: Obj) -> None:
        """Insert a key that is not present."""
        self.shards[hash(key) & _MASK][key] = obj
        self._count += 1

    def replace(self, key: str, obj: Obj) -> None:
        """Point a present key at a new record."""
        self.shards[hash(key) & _MASK][key] = obj

    def pop(self, key: str) -> Obj | None:
        obj = self.shards[hash(key) & _MASK].pop(key, None)
        if obj is not None:
            self._count -= 1
        return obj

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        """All keys (a snapshot per shard; do not call on a loop with millions)."""
        for shard in self.shards:
            yield from list(shard)

    def items(self) -> Iterator[tuple[str, Obj]]:
        for shard in self.shards:
            yield from list(shard.items())

    def values(self) -> Iterator[Obj]:
        for shard in self.shards:
            yield from list(shard.values())

    def shard_keys(self, i: int) -> list[str]:
        """A copy of shard ``i``'s keys."""
        return list(self.shards[i])
