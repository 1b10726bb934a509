"""Reserved buffers held as runs: one record per reservation, not one per buffer.

Theory of operation
-------------------
A client that puts values of one size again and again reserves buffers ahead
(``ReserveSlots``, ``store/_slots.py``) and commits each under a key within
milliseconds.  Held as writes in progress, every buffer costs the master a
record, an index entry and a place in its client's and segment's indexes when
it is reserved (~4 us each: 1.2 ms for the 256 of one reservation), and its
commit moves that record under the key.

When nothing records the state's changes (no journal, no HA: ``effects`` is
None), a reservation whose buffers fit adjacent ranges of the segments they drew
is instead kept as one :class:`SlotRun`: the allocator holds each buffer as an
allocation of its own (``OffsetAllocator.allocate_run``), and the run knows
which of its buffers are still reserved.  A commit makes the key's record
straight from the run (:func:`commit`): a buffer is reserved, then readable,
and never a write in progress in between.

Everything else that looks at writes in progress -- a revocation, a client or
segment going away, a drain, the periodic tick, a whole-index scan, a snapshot
-- first *spills* every run (:func:`spill`) into the per-buffer records a
reservation made before, with the time it was made: the rest of the master
never sees a run.  The service spills before every request but the ones that
cannot touch a reserved buffer (``_service.RUN_SAFE``); the state spills at
the start of :meth:`MasterState.tick` and of its snapshots.  A spilled buffer
joins the in-flight index behind newer writes, so it is reclaimed at most one
``put_start_release_timeout`` later than it would have been (never earlier:
the client stops writing it long before, ``_slots.deadline``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from ...errors import StoreError
from ...wire._master_msgs import SLOT_INDEXES, SLOT_PREFIX, slot_head
from ._records import BUSY, HARD_PIN, READABLE, Obj, ObjExt, SegmentRecord, reserved_size

if TYPE_CHECKING:
    from ._state import MasterState

__all__ = ["SlotRun", "commit", "find", "held_count", "reserve", "spill", "validate"]

#: a run's buffers are grouped by segment: (first buffer index, segment, its address)
Part = tuple[int, SegmentRecord, int]
#: the last part of a buffer's name -> its index (the names a run gives out; the
#: inverse of the client's table of them)
TAILS: Final = {tail: i for i, tail in enumerate(SLOT_INDEXES)}


class SlotRun:
    """The buffers one reservation still holds.

    Buffer ``i`` (named ``head + ":" + str(i)``) lies in the part whose first
    index is the largest <= ``i``, at that part's address plus ``i - first``
    strides; ``free[i]`` is 1 while it is reserved (not committed, not spilled).
    """

    __slots__ = (
        "base",
        "client_id",
        "count",
        "done_flags",
        "flags",
        "free",
        "head",
        "left",
        "parts",
        "single",
        "size",
        "started_at",
        "stride",
    )

    def __init__(
        self,
        head: str,
        client_id: str,
        size: int,
        flags: int,
        parts: list[Part],
        count: int,
        started_at: float,
    ) -> None:
        self.head = head
        self.client_id = client_id
        #: the values' size (the state's shared int) and each buffer's reserved bytes
        self.size = size
        self.stride = reserved_size(size)
        #: the records' flags while reserved (BUSY, and HARD_PIN if the config asks)
        self.flags = flags
        #: and once committed
        self.done_flags = (flags | READABLE) & ~BUSY
        self.parts = parts
        #: the segment and first address when the run is one part (else None, 0)
        self.single: SegmentRecord | None = parts[0][1] if len(parts) == 1 else None
        self.base = parts[0][2] if len(parts) == 1 else 0
        self.count = count
        self.free = bytearray(b"\x01") * count
        self.left = count
        self.started_at = started_at

    def place(self, i: int) -> tuple[SegmentRecord, int]:
        """Segment and address of buffer ``i``."""
        parts = self.parts
        k = len(parts) - 1
        while k and parts[k][0] > i:
            k -= 1
        first, seg, addr = parts[k]
        return seg, addr + (i - first) * self.stride

    def spans(self) -> list[tuple[int, int, SegmentRecord, int]]:
        """Each part as (first index, end index, segment, first address)."""
        return [
            (first, end, seg, addr) for (first, seg, addr), end in _ends(self.parts, self.count)
        ]

    def held(self) -> list[tuple[int, SegmentRecord, int]]:
        """(index, segment, address) of every buffer still reserved."""
        free, stride = self.free, self.stride
        out = []
        for first, end, seg, addr in self.spans():
            out += [(i, seg, addr + (i - first) * stride) for i in range(first, end) if free[i]]
        return out


def reserve(
    st: MasterState,
    client_id: str,
    size: int,
    count: int,
    config: Any,
    now: float,
    batch: str,
    live: list[SegmentRecord],
) -> SlotRun | None:
    """Reserve ``count`` buffers of ``size`` as one run, each in the segment a
    put of that size would draw (the caller checked that every one of the
    ``live`` segments has room for all of them and that the config places one
    replica by a draw alone).  None when this cannot be a run: effects are being
    recorded, the config pins softly or is refused, the names are taken, or a
    segment has no contiguous room (the caller reserves the per-buffer way)."""
    if st.effects is not None or size <= 0:
        return None
    try:
        if st._validate_put("k", 1, config) is not None:
            return None  # (a soft pin is applied at commit: the per-buffer path)
    except StoreError:
        return None  # refused: the per-buffer path raises the config's error
    head = slot_head(client_id, batch)
    if head in st.slot_runs or f"{head}:0" in st.objects:
        return None  # (a repeated reservation name: answered as before)
    stored = st._size(size)
    stride = reserved_size(stored)
    n = len(live)
    if n == 1:
        counts = [count]
    else:
        counts = [0] * n
        draw = st._placement.first_choice
        for _ in range(count):
            counts[draw(n)] += 1
    parts: list[Part] = []
    first = 0
    for seg, c in zip(live, counts, strict=True):
        if not c:
            continue
        addr = seg.allocator.allocate_run(stride * c, c)
        if addr is None:  # no contiguous room there: give back what was taken
            for (start, part_seg, part_addr), end in _ends(parts, first):
                for j in range(end - start):
                    part_seg.allocator.free(part_addr + j * stride, stride)
            return None
        parts.append((first, seg, addr))
        first += c
    client = st._touch(client_id, now)
    flags = BUSY | (HARD_PIN if config.with_hard_pin else 0)
    run = SlotRun(head, client.id, stored, flags, parts, count, now)
    st.slot_runs[head] = run
    return run


def _ends(parts: list[Part], count: int) -> list[tuple[Part, int]]:
    """Each part with the index its buffers end at (the next part's first, or
    ``count``); none for no parts (a reservation whose first segment had no room)."""
    if not parts:
        return []
    return list(zip(parts, [p[0] for p in parts[1:]] + [count], strict=True))


def find(st: MasterState, client_id: str, slot: str) -> tuple[SlotRun, int] | None:
    """The run and index of ``client_id``'s still-reserved buffer ``slot``, or None."""
    head, _, tail = slot.rpartition(":")
    run = st.slot_runs.get(head)
    i = -1 if run is None else TAILS.get(tail, -1)
    if run is None or not 0 <= i < run.count or not run.free[i] or run.client_id != client_id:
        return None
    return run, i


def commit(st: MasterState, run: SlotRun, i: int, key: str, shard: dict[str, Obj]) -> Obj:
    """Make buffer ``i`` of ``run`` the readable value of ``key`` (absent from
    ``shard``, its shard of the index): its record, in the index and at the end
    of its segment's eviction order.  The caller counts the value's size."""
    seg, addr = run.place(i)
    obj = Obj(key, run.size, seg, addr, run.client_id, run.done_flags)
    shard[key] = obj
    st.objects.added(1)
    seg.order.append(obj)
    run.free[i] = 0
    run.left -= 1
    if not run.left:
        del st.slot_runs[run.head]
    return obj


def spill(st: MasterState) -> None:
    """Turn every run's reserved buffers into per-buffer writes in progress (what
    a reservation made before runs), so that code that looks at writes in
    progress sees them."""
    runs = st.slot_runs
    if not runs:
        return
    st.slot_runs = {}
    objects, inflight = st.objects, st.inflight
    made = 0
    for run in runs.values():
        client = st.clients.get(run.client_id)
        held = None if client is None else client.inflight
        head, size, writer, flags, started = (
            run.head,
            run.size,
            run.client_id,
            run.flags,
            run.started_at,
        )
        for i, seg, addr in run.held():
            name = f"{head}:{i}"
            obj = Obj(name, size, seg, addr, writer, flags)
            obj.ext = ObjExt(started, None)
            objects.shard(name)[name] = obj
            seg.order.append(obj)
            inflight[name] = obj
            if held is not None:
                held.add(name)
            made += 1
    objects.added(made)


def held_count(st: MasterState) -> int:
    """Buffers the runs still reserve."""
    return sum(run.left for run in st.slot_runs.values())


def validate(st: MasterState, live: dict[str, list[tuple[int, int]]]) -> None:
    """Check every run and add its reserved ranges to ``live`` (per segment id)."""
    for head, run in st.slot_runs.items():
        assert run.head == head and head.startswith(SLOT_PREFIX), f"run {head!r} misfiled"
        assert run.left == sum(run.free) > 0, f"run {head!r}: reserved count disagrees"
        assert run.client_id in st.clients, f"run {head!r} of unknown client"
        assert f"{head}:0" not in st.objects, f"run {head!r} also has per-buffer records"
        for i, seg, addr in run.held():
            assert st.segments.get(seg.id) is seg, f"run {head!r}: buffer {i} in a dropped segment"
            live[seg.id].append((addr, run.stride))
