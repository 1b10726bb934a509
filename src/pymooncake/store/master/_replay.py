"""Durability of the master's state: effects applied and effects described.

Theory of operation
-------------------
Every durable change of :class:`~._state.MasterState` is emitted as a typed
effect (``_effects.py``).  Two readers turn effects back into state: a restarted
master replaying its journal, and a standby applying its leader's stream.
:func:`apply` runs one effect with recording switched off (an applied effect
is not emitted again) and leaves the allocators to :func:`finish_replay`, which
rebuilds each touched segment's allocator from the records once: replaying a
range at a time would cost a free-list edit per effect.  :func:`promote` turns
a standby's state into a deciding one.

The other direction, :func:`snapshot_effects` and friends, describes the current
state as the shortest effect list that rebuilds it: the journal's compaction
writes it (a shard at a time, :func:`shard_effects`) and a leader streams it to a
new standby before its live effects.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._effects import (
    DrainCreated,
    DrainEnded,
    Effect,
    ObjectCommitted,
    ObjectDeleted,
    ReplicationEnded,
    ReplicationStarted,
    ReplyKept,
    SegmentMounted,
    SegmentUnmounted,
    TaskFinished,
    TaskStarted,
    TaskSubmitted,
    WriteEnded,
    WriteRenamed,
    WriteStarted,
)
from ._offload import OFFLOAD_APPLY
from ._records import BUSY, HARD_PIN, READABLE, TASK, Obj, reserved_size

if TYPE_CHECKING:
    from ._state import MasterState

__all__ = [
    "apply",
    "finish_replay",
    "promote",
    "segment_effects",
    "shard_effects",
    "snapshot_effects",
    "start_effect",
]


def apply(st: MasterState, effect: Effect, now: float) -> None:
    """Apply one effect (replay, or a standby following a leader).  Allocators
    are brought up to date by :func:`finish_replay`."""
    recording, st.effects = st.effects, None
    st._replaying = True
    try:
        _APPLY[type(effect)](st, effect, now)
    finally:
        st.effects = recording
        st._replaying = False


def _apply_mount(st: MasterState, ev: SegmentMounted, now: float) -> None:
    if ev.info.id not in st.segments:
        st._add_segment(ev.info, st._touch(ev.client_id, now))
        st._dirty_allocators.add(ev.info.id)


def _apply_unmount(st: MasterState, ev: SegmentUnmounted, now: float) -> None:
    seg = st.segments.get(ev.segment_id)
    if seg is not None:
        st._drop_segment(seg)
        st._dirty_allocators.discard(seg.id)


def _apply_commit(st: MasterState, ev: ObjectCommitted, now: float) -> None:
    old = st.objects.get(ev.key)
    if old is not None:
        st._dirty_allocators.update(seg.id for seg, _ in old.replicas())
        st._forget(ev.key, old, free=False)
    reps = st._restored(ev.replicas)
    if not reps:
        return
    flags = READABLE | (HARD_PIN if ev.hard_pinned else 0)
    client = st.clients.get(ev.writer)  # one string per writer, not per object
    writer = client.id if client is not None else sys.intern(ev.writer)
    obj = Obj(ev.key, st._size(ev.size), reps[0][0], reps[0][1], writer, flags)
    if len(reps) > 1:
        obj.extension().more = tuple(reps[1:])
    st.objects.add(ev.key, obj)
    for seg, _ in reps:
        seg.order.append(obj)


def _apply_start(st: MasterState, ev: WriteStarted, now: float) -> None:
    reps = st._restored(ev.replicas)
    old = st.objects.get(ev.key)
    if old is not None and old.flags & BUSY:
        st._abandon(ev.key, old, discard=False, now=now)
        old = st.objects.get(ev.key)
    if not reps:
        return
    client = st._touch(ev.writer, now)
    if ev.upsert and old is not None and old.flags & READABLE:
        obj = old
        current = obj.segments()
        ext = obj.extension()
        ext.pending = tuple(reps)
        ext.pending_size = st._size(ev.size)
        ext.repin = ev.soft_pin_ttl_s is not None
        if ext.repin:
            ext.soft_pin_ttl_s = ev.soft_pin_ttl_s
        obj.flags |= BUSY | (HARD_PIN if ev.hard_pinned else 0)
        obj.writer = client.id
        for seg, _ in reps:  # the record gains the pending segments it is not in
            if not any(seg is c for c in current):
                seg.order.append(obj)
    else:
        if old is not None:
            st._dirty_allocators.update(seg.id for seg in old.segments())
            st._forget(ev.key, old)
        flags = BUSY | (HARD_PIN if ev.hard_pinned else 0)
        obj = Obj(ev.key, st._size(ev.size), reps[0][0], reps[0][1], client.id, flags)
        ext = obj.extension()
        ext.soft_pin_ttl_s = ev.soft_pin_ttl_s
        if len(reps) > 1:
            ext.more = tuple(reps[1:])
        st.objects.add(ev.key, obj)
        for seg, _ in reps:
            seg.order.append(obj)
    ext.started_at = now
    st.inflight.pop(ev.key, None)
    st.inflight[ev.key] = obj
    client.inflight.add(ev.key)


def _apply_abandon(st: MasterState, ev: WriteEnded, now: float) -> None:
    obj = st.objects.get(ev.key)
    if obj is not None and obj.flags & BUSY:
        st._abandon(ev.key, obj, discard=False, now=now)


def _apply_rename(st: MasterState, ev: WriteRenamed, now: float) -> None:
    obj = st.objects.get(ev.slot)
    if obj is None or not obj.flags & BUSY:
        return
    old = st.objects.get(ev.key)
    if old is not None:  # (the leader had no record of the key)
        st._dirty_allocators.update(seg.id for seg in old.segments())
        st._forget(ev.key, old, free=False)
    st._rekey(ev.slot, ev.key, obj)


def _apply_delete(st: MasterState, ev: ObjectDeleted, now: float) -> None:
    obj = st.objects.get(ev.key)
    if obj is not None:
        st._dirty_allocators.update(seg.id for seg, _ in obj.replicas())
        st._forget(ev.key, obj, free=False)


_APPLY: dict[type, Callable[[MasterState, Any, float], None]] = {
    SegmentMounted: _apply_mount,
    SegmentUnmounted: _apply_unmount,
    ObjectCommitted: _apply_commit,
    ObjectDeleted: _apply_delete,
    WriteStarted: _apply_start,
    WriteEnded: _apply_abandon,
    WriteRenamed: _apply_rename,
    TaskSubmitted: lambda st, ev, now: st.tasks.apply_submitted(ev, now),
    TaskStarted: lambda st, ev, now: st.tasks.apply_started(ev, now),
    TaskFinished: lambda st, ev, now: st.tasks.apply_finished(ev, now),
    ReplicationStarted: lambda st, ev, now: st.replication.apply_started(ev, now),
    ReplicationEnded: lambda st, ev, now: st.replication.apply_ended(ev, now),
    DrainCreated: lambda st, ev, now: st.drains.apply_created(ev, now),
    DrainEnded: lambda st, ev, now: st.drains.apply_ended(ev, now),
    ReplyKept: lambda st, ev, now: st.kept_replies.append(ev),
    **OFFLOAD_APPLY,
}


def finish_replay(st: MasterState) -> None:
    """Rebuild the allocators touched by :func:`apply` from the objects (their
    current and pending replicas).

    Raises:
        ValueError: restored replicas overlap or leave their segment.
    """
    for seg_id in st._dirty_allocators:
        seg = st.segments.get(seg_id)
        if seg is None:
            continue
        live: list[tuple[int, int]] = []
        for obj in seg.order:  # (each live record is in a segment's deque once)
            if not obj.flags:
                continue
            reserved = reserved_size(obj.size)
            live += [(addr, reserved) for s, addr in obj.replicas() if s is seg]
            pending = obj.pending()
            if pending:
                reserved = reserved_size(obj.extension().pending_size)
                live += [(addr, reserved) for s, addr in pending if s is seg]
        live += [(addr, n) for s, addr, n in st.replication.ranges() if s is seg]
        seg.allocator.rebuild(live)
    st._dirty_allocators.clear()


def promote(st: MasterState, now: float) -> None:
    """This state, built by applying a leader's effects, starts deciding: the
    allocators are rebuilt and every known client gets a fresh ``client_ttl``
    (none of them could ping a standby)."""
    st.finish_replay()
    for client in st.clients.values():
        client.last_seen = now
    for obj in st.inflight.values():
        if obj.ext is not None:
            obj.ext.started_at = now
    st._last_tick = None
    st.view_version += 1


def snapshot_effects(st: MasterState) -> list[Effect]:
    """The current durable state as a minimal effect list (for compaction).
    Walks everything: for small states and tests; the service snapshots shard
    by shard (:func:`segment_effects`, :func:`shard_effects`)."""
    out = st.segment_effects()
    for i in range(len(st.objects.shards)):
        out += st.shard_effects(i)
    return out


def segment_effects(st: MasterState) -> list[Effect]:
    """Segments, the task queue and drain jobs (small: bounded by their limits),
    then the SSD tiers and their disk replicas, and the answers kept for
    retries."""
    out: list[Effect] = [SegmentMounted(seg.info, seg.client_id) for seg in st.segments.values()]
    out += st.tasks.snapshot()
    out += st.drains.snapshot()
    return out + st.offload.snapshot_effects() + list(st.kept_replies)


def shard_effects(st: MasterState, shard: int, *, writes: bool = False) -> list[Effect]:
    """Records of one shard's objects: their readable values, and with
    ``writes`` also the writes in progress (what a standby needs)."""
    out: list[Effect] = []
    for key, obj in st.objects.shards[shard].items():
        if obj.flags & READABLE:
            out.append(st._commit_effect(key, obj))
        if writes and obj.flags & BUSY:
            out.append(start_effect(key, obj))
        if writes and obj.flags & TASK:
            out += [r for r in st.replication.snapshot() if r.key == key]
    return out


def start_effect(key: str, obj: Obj) -> WriteStarted:
    """The record of a write in progress (what a standby needs to finish or drop it)."""
    ext = obj.extension()
    upsert = bool(obj.flags & READABLE)
    reps = ext.pending if upsert else tuple(obj.replicas())
    return WriteStarted(
        key,
        ext.pending_size if upsert else obj.size,
        tuple((seg.id, addr) for seg, addr in reps),
        obj.writer,
        bool(obj.flags & HARD_PIN),
        upsert,
        ext.soft_pin_ttl_s,
    )
