"""The master state's invariants, checked by tests after every scenario.

:func:`validate` walks everything once and cross-checks each index against the
objects: the per-segment eviction order, the in-flight and per-client indexes,
the soft-pin count, the discard list's bytes, and every allocator's ranges
against the live replicas (they must tile each segment exactly).  It is O(the
whole state): for tests and debugging, never on the service's loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _slot_runs
from ._records import BUSY, READABLE, SOFT_PIN, reserved_size

if TYPE_CHECKING:
    from ._state import MasterState

__all__ = ["validate"]


def validate(st: MasterState) -> None:
    """Assert every invariant of ``st`` and cross-check every index.

    Raises:
        AssertionError: an index disagrees with the objects (the message names it).
    """
    live: dict[str, list[tuple[int, int]]] = {sid: [] for sid in st.segments}
    in_seg: dict[str, set[str]] = {sid: set() for sid in st.segments}
    soft = 0
    count = 0
    for key, obj in st.objects.items():
        count += 1
        assert obj.key == key and obj.flags, f"{key}: record of another key, or dead"
        reps = obj.replicas()
        pending = obj.pending()
        assert reps or pending, f"{key} has no replicas"
        names = [s.name for s, _ in reps]
        assert len(names) == len(set(names)), f"{key}: two replicas in one segment name"
        for seg, addr in reps:
            assert st.segments.get(seg.id) is seg, f"{key}: replica in a dropped segment"
            live[seg.id].append((addr, reserved_size(obj.size)))
            in_seg[seg.id].add(key)
        if pending:
            assert obj.flags & BUSY, f"{key}: pending replicas without a write in progress"
            size = obj.extension().pending_size
            for seg, addr in pending:
                assert st.segments.get(seg.id) is seg
                live[seg.id].append((addr, reserved_size(size)))
                in_seg[seg.id].add(key)
        busy = bool(obj.flags & BUSY)
        assert busy == (key in st.inflight), f"{key}: in-flight index disagrees"
        if busy:
            client = st.clients.get(obj.writer)
            assert client is None or key in client.inflight
            assert obj.ext is not None
        else:
            assert obj.flags & READABLE, f"{key}: neither readable nor being written"
        if obj.flags & SOFT_PIN:
            soft += 1
    assert count == len(st.objects)
    assert soft == st.soft_pinned, "soft-pin count disagrees"
    for key in st.inflight:
        assert key in st.objects
    for client in st.clients.values():
        for key in client.inflight:
            writing = st.objects.get(key)
            assert writing is not None and writing.flags & BUSY and writing.writer == client.id
    staged = 0
    for _, _, seg, addr, reserved in st._discards:
        staged += reserved
        if st.segments.get(seg.id) is seg:
            live[seg.id].append((addr, reserved))
    assert staged == st.metrics.discard_staging_bytes, "discarded-bytes gauge disagrees"
    _slot_runs.validate(st, live)
    for seg, addr, reserved in st.replication.ranges():
        live[seg.id].append((addr, reserved))
    st.replication.validate()
    st.tasks.validate()
    for sid, seg in st.segments.items():
        records = seg.live()
        assert len(records) == len({id(o) for o in records}), f"segment {sid}: duplicate"
        assert len(seg.order) - len(records) == seg.dead, f"segment {sid}: dead count"
        assert {o.key for o in records} == in_seg[sid], f"segment {sid}: deque disagrees"
        for o in records:
            assert st.objects.get(o.key) is o, f"segment {sid}: stale record {o.key}"
        assert seg.evict_debt >= 0
        seg.allocator.validate(live[sid])
        assert seg.client_id in st.clients, f"segment {sid} of unknown client"
    st.offload.validate()
