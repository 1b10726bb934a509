"""Replica placement: which segments get an object's replicas.

Every replica is one contiguous range in a segment of its own (distinct segment
*names*: two segments of one engine are one failure domain).  Strategies, as the
reference's ``--allocation_strategy``: ``random`` (a random rotation of the
segments open for allocation), ``free_ratio_first`` (emptiest first) and
``local_first`` (the writer's host first).  Preferred segments are tried first,
excluded ones never.  Pure: the caller owns the segments and the random source.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Protocol

from ._records import Rep, SegmentRecord

__all__ = ["Placement", "ReplicationPolicy"]


class ReplicationPolicy(Protocol):
    """What placement reads from a put's replicate config."""

    @property
    def replica_num(self) -> int: ...

    @property
    def preferred_segments(self) -> tuple[str, ...]: ...

    @property
    def excluded_segments(self) -> tuple[str, ...]: ...


class Placement:
    """Chooses segments and allocates ranges in them."""

    def __init__(self, strategy: str, rng: random.Random) -> None:
        self.strategy = strategy
        self._rng = rng
        self._live: list[SegmentRecord] | None = None

    def invalidate(self) -> None:
        """The segment set (or a segment's draining flag) changed."""
        self._live = None

    def live(self, segments: Iterable[SegmentRecord]) -> list[SegmentRecord]:
        """Segments open for allocation (cached; the segment set rarely changes)."""
        live = self._live
        if live is None:
            live = self._live = [s for s in segments if not s.draining]
        return live

    def first_choice(self, live_count: int) -> int:
        """For a single-replica put under the ``random`` strategy, the index in the
        live segments it tries first (the draw :meth:`allocate` makes)."""
        return int(self._rng.random() * live_count) if live_count > 1 else 0

    def simple(self, policy: ReplicationPolicy) -> bool:
        """Whether ``policy`` places one replica by a random draw alone (the path
        of :meth:`first_choice`)."""
        return (
            policy.replica_num == 1
            and not policy.preferred_segments
            and not policy.excluded_segments
            and self.strategy == "random"
        )

    def candidates(
        self, live: list[SegmentRecord], policy: ReplicationPolicy, writer_host: str
    ) -> list[SegmentRecord]:
        excluded = set(policy.excluded_segments)
        pool = [s for s in live if s.name not in excluded] if excluded else list(live)
        preferred: list[SegmentRecord] = []
        for name in policy.preferred_segments:
            preferred += [s for s in pool if s.name == name and s not in preferred]
        rest = [s for s in pool if s not in preferred] if preferred else pool
        if self.strategy == "free_ratio_first":
            rest.sort(key=lambda s: s.allocator.free_bytes / s.allocator.capacity, reverse=True)
        else:
            if len(rest) > 1:
                start = self._rng.randrange(len(rest))
                rest = rest[start:] + rest[:start]
            if self.strategy == "local_first" and writer_host:
                rest.sort(key=lambda s: s.info.host_id != writer_host)
        return preferred + rest

    def allocate(
        self,
        segments: Iterable[SegmentRecord],
        size: int,
        policy: ReplicationPolicy,
        writer_host: str,
    ) -> list[Rep]:
        """Up to ``policy.replica_num`` ranges of ``size`` bytes in distinct
        segments (fewer, possibly none, when space is short)."""
        live = self.live(segments)
        if self.simple(policy):
            # the common placement, without building a candidate list: this runs
            # once per key of every put
            n = len(live)
            start = self.first_choice(n)
            for i in range(n):
                seg = live[(start + i) % n]
                got = seg.allocator.allocate(size)
                if got is not None:
                    return [(seg, got[0])]
            return []
        reps: list[Rep] = []
        used: set[str] = set()
        for seg in self.candidates(live, policy, writer_host):
            if len(reps) >= policy.replica_num:
                break
            if seg.name in used:
                continue
            got = seg.allocator.allocate(size)
            if got is None:
                continue
            reps.append((seg, got[0]))
            used.add(seg.name)
        return reps
