"""Master bookkeeping records: objects, segments, clients (plain data, compact).

Theory of operation
-------------------
A master holds millions of objects, so an object record is as small as Python
allows (measured by ``bench/master_scale.py`` and ``tests/store/test_master_memory.py``):
one ``__slots__`` instance with the first replica inline (segment record + address),
no per-object dict, list or float of its own where a shared one does (sizes, leases
and writer ids are shared objects).  What few objects need (a put in flight, more
replicas, a pending upsert, a soft pin) lives in an optional :class:`ObjExt`.  A
replica's reserved size is derived (``align_up(size)``), its id too (segment number
and offset), so neither is stored.

A segment keeps its objects in ``order``, a deque in eviction order (8 bytes per
object, where a dict would cost ~30): new objects go to the back, the eviction hand
takes from the front and gives objects that were read since (``REF`` flag) a second
chance by moving them to the back (CLOCK, an approximation of LRU that costs nothing
on the read path).  The same deque sweeps a segment that goes away.

Entries are never removed from the middle: an object that goes away is marked dead
(``flags == 0``) and its entries are dropped when the hand (or the compaction in
``tick``) reaches them; ``SegmentRecord.dead`` counts them.  For that to be exact an
``Obj`` instance only ever *gains* segments: when a live object leaves a segment that
stays mounted (an upsert replaced its replicas, a pending upsert was revoked, one
replica was cleared) the master replaces the record by a new instance (see
``MasterState._rebind``) and the old one dies with all its entries.  So an entry is
live exactly when its object is, and no object is in a segment's deque twice.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from .._types import ReplicaDesc, ReplicaStatus, SegmentInfo
from ._allocator import ALIGNMENT, OffsetAllocator

__all__ = [
    "BUSY",
    "HARD_PIN",
    "READABLE",
    "REF",
    "SOFT_PIN",
    "TASK",
    "ClientRecord",
    "Obj",
    "ObjExt",
    "Rep",
    "SegmentRecord",
    "reserved_size",
]

#: object flags (small ints are shared objects: a flags field costs a pointer)
READABLE: Final = 1  # a complete value is readable
BUSY: Final = 2  # a put or upsert is writing replicas
REF: Final = 4  # read since the eviction hand last passed it
HARD_PIN: Final = 8  # never evicted
SOFT_PIN: Final = 16  # evicted last while ext.soft_pin_until is in the future
TASK: Final = 32  # being copied/moved (_replicate.py): not removed, evicted or replaced

_MASK: Final = ALIGNMENT - 1
_COMPLETE: Final = ReplicaStatus.COMPLETE
_PROCESSING: Final = ReplicaStatus.PROCESSING


def reserved_size(size: int) -> int:
    """Bytes the allocator reserves for an object of ``size`` bytes."""
    return (size + _MASK) & ~_MASK


class ClientRecord:
    """A client known to the master (it pinged, mounted or wrote)."""

    __slots__ = ("host_id", "id", "inflight", "last_seen", "segments")

    def __init__(self, client_id: str, now: float) -> None:
        self.id = client_id
        self.last_seen = now
        self.segments: set[str] = set()
        self.host_id = ""
        #: keys this client is writing (put or upsert started, not ended)
        self.inflight: set[str] = set()


class SegmentRecord:
    """A mounted segment: its allocator and the objects with a replica in it."""

    __slots__ = (
        "allocator",
        "client_id",
        "dead",
        "draining",
        "evict_debt",
        "id",
        "info",
        "name",
        "num",
        "order",
    )

    def __init__(self, info: SegmentInfo, client_id: str, num: int) -> None:
        self.info = info
        self.id = info.id
        self.name = info.name
        self.client_id = client_id
        self.allocator = OffsetAllocator(info.base, info.size)
        #: objects with a replica (current or pending) here, in eviction order, and
        #: dead entries not yet dropped (see the module docstring)
        self.order: deque[Obj] = deque()
        #: entries of ``order`` whose object is dead
        self.dead = 0
        #: bytes the background eviction should still free here
        self.evict_debt = 0
        self.draining = False
        #: small per-master number (replica ids are derived from it)
        self.num = num

    @property
    def live_count(self) -> int:
        """Objects with a replica here."""
        return len(self.order) - self.dead

    def live(self) -> list[Obj]:
        """The live objects of ``order`` (a copy; for sweeps that change it)."""
        return [o for o in self.order if o.flags]

    def replica_id(self, addr: int) -> int:
        return (self.num << 40) | ((addr - self.info.base) >> 6)


#: a replica: (segment, address)
Rep = tuple[SegmentRecord, int]


class ObjExt:
    """What only some objects need."""

    __slots__ = (
        "more",
        "pending",
        "pending_size",
        "repin",
        "soft_pin_ttl_s",
        "soft_pin_until",
        "started_at",
    )

    def __init__(self, started_at: float = 0.0, soft_pin_ttl_s: float | None = None) -> None:
        #: replicas after the first
        self.more: tuple[Rep, ...] = ()
        #: replicas of an upsert in progress (the current ones stay readable)
        self.pending: tuple[Rep, ...] = ()
        self.pending_size = 0
        #: when the put or upsert in progress began
        self.started_at = started_at
        self.soft_pin_until = 0.0
        #: applied when the put/upsert in progress completes (None: no pin)
        self.soft_pin_ttl_s = soft_pin_ttl_s
        #: the pending upsert (re)enables the soft pin when it completes
        self.repin = True

    def empty(self) -> bool:
        return not self.more and not self.pending and self.soft_pin_ttl_s is None


class Obj:
    """One object: its key, size, first replica, lease and flags.

    ``seg`` is None only while a put's every replica went away with its segment
    (the object is then about to be dropped).  ``flags == 0``: the record is dead
    (the object was removed, or replaced by a new record).

    Eight slots: with the GC header the instance is 96 bytes, the same allocation
    size class as seven (``key`` costs nothing; it lets a segment's eviction
    deque hold records instead of keys).
    """

    __slots__ = ("addr", "ext", "flags", "key", "lease_until", "seg", "size", "writer")

    def __init__(
        self, key: str, size: int, seg: SegmentRecord | None, addr: int, writer: str, flags: int
    ) -> None:
        self.key = key
        self.size = size
        self.seg = seg
        self.addr = addr
        self.lease_until = 0.0
        self.flags = flags
        #: client id of the put in progress / of the last completed write
        self.writer = writer
        self.ext: ObjExt | None = None

    # --- replicas -----------------------------------------------------------------

    def replicas(self) -> list[Rep]:
        """Current replicas (complete when READABLE, else being written)."""
        if self.seg is None:
            return []
        ext = self.ext
        if ext is None or not ext.more:
            return [(self.seg, self.addr)]
        return [(self.seg, self.addr), *ext.more]

    def set_replicas(self, reps: list[Rep] | tuple[Rep, ...]) -> None:
        if reps:
            self.seg, self.addr = reps[0]
        else:
            self.seg, self.addr = None, 0
        more = tuple(reps[1:])
        if more or self.ext is not None:
            self.extension().more = more
            self.compact()

    def pending(self) -> tuple[Rep, ...]:
        ext = self.ext
        return () if ext is None else ext.pending

    def segments(self) -> list[SegmentRecord]:
        """Every segment this record has a replica in, current or pending (each once)."""
        seg = self.seg
        ext = self.ext
        if ext is None or (not ext.more and not ext.pending):
            return [] if seg is None else [seg]
        out: list[SegmentRecord] = [] if seg is None else [seg]
        for s, _ in (*ext.more, *ext.pending):
            if not any(s is o for o in out):
                out.append(s)
        return out

    def in_segment(self, seg: SegmentRecord) -> bool:
        if self.seg is seg:
            return True
        ext = self.ext
        return ext is not None and any(s is seg for s, _ in (*ext.more, *ext.pending))

    def extension(self) -> ObjExt:
        ext = self.ext
        if ext is None:
            ext = self.ext = ObjExt()
        return ext

    def compact(self) -> None:
        """Drop the extension when nothing in it is needed any more."""
        ext = self.ext
        if ext is not None and ext.empty() and not self.flags & BUSY:
            self.ext = None

    def descs(self, status: ReplicaStatus | None = None) -> list[ReplicaDesc]:
        st = status or (_COMPLETE if self.flags & READABLE else _PROCESSING)
        size = self.size
        return [
            ReplicaDesc(seg.replica_id(addr), seg.name, addr, size, st, seg.id)
            for seg, addr in self.replicas()
        ]

    def wire(self) -> tuple[tuple[int, str, int, int, int, str], ...]:
        """Readable replicas as the master RPC sends them (``ReplicaDesc.to_wire``;
        the typed replies' ``ReplicaWire`` tuples, built once: every get's)."""
        size = self.size
        seg = self.seg
        if seg is None:
            return ()
        st = 3 if self.flags & READABLE else 2  # ReplicaStatus COMPLETE / PROCESSING
        first = (seg.replica_id(self.addr), seg.name, self.addr, size, st, seg.id)
        ext = self.ext
        if ext is None or not ext.more:
            return (first,)
        return (first, *[(s.replica_id(a), s.name, a, size, st, s.id) for s, a in ext.more])


def reps_wire(reps: list[Rep] | tuple[Rep, ...], size: int, status: int) -> list[list[object]]:
    """Replicas being written, in wire form."""
    return [[s.replica_id(a), s.name, a, size, status, s.id] for s, a in reps]
