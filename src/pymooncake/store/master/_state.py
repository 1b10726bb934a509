"""The master's state machine: segments, objects, replicas, leases, eviction, clients.

Theory of operation
-------------------
Pure: every method takes the current time ``now`` (seconds, monotonic) and
either returns a result or raises a :class:`StoreError` carrying the
reference's ``ErrorCode``.  No sockets, threads or clocks -- the asyncio
service (``_service.py``) feeds it requests and periodic :meth:`tick` calls.
Changes of durable state are emitted as typed effects (``_effects.py``);
applying them back (journal replay, a standby) and describing the state as
effects (snapshots) is ``_replay.py``, the invariants tests check are
``_validate.py``; placement, eviction order and the allocator have their own
modules (``_placement.py``, ``_eviction.py``, ``_allocator.py``).

* A **segment** is a client's registered memory range; the master only does
  offset arithmetic on it (one :class:`OffsetAllocator` each).
* A **put** is two-phase: ``put_start`` allocates one contiguous buffer per
  replica, each in a segment with a distinct name; ``put_end`` makes the value
  readable; ``put_revoke`` frees the buffers.  Batches (``put_start_many``,
  ``put_end_many``) give each key the answer a put of it alone would get, with
  the common keys (new, one replica) placed and ended without a call per key.  A key is immutable: ``put_start``
  on a readable key is OBJECT_ALREADY_EXISTS (the client reports success
  without writing).  A put of a key that another put is still writing is
  REPLICA_IS_NOT_READY: the caller waits for it to finish (then the key exists)
  or to be revoked -- never "exists" while nothing is readable.
* An **upsert** writes new replicas while the old ones stay readable and swaps
  them atomically at ``upsert_end``; the old buffers are freed only after the
  read lease of the old value has expired, so a reader never sees torn data.
* A **read lease** (``default_kv_lease_ttl``) is granted by get/exist; a
  leased object cannot be removed (OBJECT_HAS_LEASE) nor evicted.
* **Eviction** is per segment, CLOCK over the segment's objects (see
  ``_records.py``): objects read since the hand passed get a second chance;
  leased, pinned and in-flight ones are skipped, soft-pinned ones go last.  It
  runs above the high watermark during :meth:`tick` and synchronously when an
  allocation fails, so NO_AVAILABLE_HANDLE means nothing evictable was left.
* **Clients** ping; one silent for ``client_ttl`` is expired: its segments are
  unmounted (their replicas disappear) and its unfinished puts revoked.  An
  unknown client's ping is answered NEED_REMOUNT (master restarted).
* **Reserved buffers** (``ReserveSlots``) are puts in progress under names no
  key can take, committed under a key by ``commit_slot``; without a journal or
  HA a reservation is held as one record until then (``_slot_runs.py``), and
  whatever looks at writes in progress first spills it into per-buffer records.
* Buffers of a preempted or abandoned put may still be written by a slow
  writer, so they go to a *discard* heap and return to the allocator only after
  ``put_start_release_timeout``.

Costs: every request costs O(its keys); :meth:`tick` costs O(clients + what
expired or is evicted); nothing walks all objects except the explicit
whole-index operations, which the service runs shard by shard.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
import re
import uuid
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from typing import Any, Final

from ...errors import StoreError, store_error
from ...wire._master_msgs import SLOT_MARK, SLOT_PREFIX, SlotRuns, slot_name, slot_names
from .._config import MasterConfig
from .._types import ClientStatus, ErrorCode, ReplicaDesc, SegmentInfo, SoftPinAction
from . import _replay, _slot_runs, _validate
from ._drain import DrainJobs
from ._effects import (
    Effect,
    ObjectCommitted,
    ObjectDeleted,
    ReplyKept,
    SegmentMounted,
    SegmentUnmounted,
    WriteEnded,
    WriteRenamed,
    WriteStarted,
)
from ._eviction import compact_segment, evict_segment
from ._index import SHARD_MASK, ObjectIndex
from ._offload import OffloadState
from ._placement import Placement
from ._records import (
    BUSY,
    HARD_PIN,
    READABLE,
    REF,
    SOFT_PIN,
    TASK,
    ClientRecord,
    Obj,
    ObjExt,
    Rep,
    SegmentRecord,
    reps_wire,
    reserved_size,
)
from ._replicate import Replications
from ._slot_runs import SlotRun
from ._tasks import TaskQueue

__all__ = [
    "SLOT_MARK",
    "SLOT_PREFIX",
    "SLOT_TTL_S",
    "GetReplicaListResult",
    "MasterState",
    "Metrics",
    "PingResult",
    "client_tag",
    "slot_name",
    "start_each",
]


def client_tag(client_id: str) -> str:
    """How messages and listings name a client: a digest of its id, never the id.

    A client id is the only credential of its owner's segments and puts (unmount,
    put end/revoke, replica clear check it), so another client must not learn it
    from an error message or the admin HTTP.
    """
    digest = hashlib.blake2s(client_id.encode(errors="replace"), digest_size=6).hexdigest()
    return f"client#{digest}"


#: dead deque entries a segment may hold before housekeeping drops them (and
#: then only while they outnumber the live ones)
_COMPACT_MIN_DEAD = 4096
#: read leases end on multiples of 1/8192 s (see MasterState.lease_deadline)
_LEASE_STEPS = 8192


#: how long a client may keep a reserved buffer before writing and committing it
#: (at most half of ``put_start_release_timeout``, after which the master would
#: reclaim it); also how long a segment that replaces a dead one keeps the
#: ranges its predecessor had reserved for other clients' writes
SLOT_TTL_S = 10.0


#: segment names whose lost writes are remembered before expired ones are pruned
_LOST_WRITES_MAX = 256
#: answers of removals kept with the state for retries across a restart or a
#: failover (:meth:`MasterState.keep_reply`): the most recent ones
KEPT_REPLIES_MAX = 4096


def _ranges_written(obj: Obj, seg: SegmentRecord) -> list[tuple[int, int]]:
    """The (address, reserved bytes) ``obj``'s write in progress holds in ``seg``."""
    if obj.flags & READABLE:  # an upsert: what it writes is pending
        size = obj.extension().pending_size
        return [(a, reserved_size(size)) for s, a in obj.pending() if s is seg]
    return [(a, reserved_size(obj.size)) for s, a in obj.replicas() if s is seg]


def _key_taken(key: str, current: Obj) -> StoreError:
    """Why a reserved buffer cannot become ``key``'s value: it is stored, or
    another put is writing it (the reservation stays)."""
    if current.flags & READABLE:
        return _err(ErrorCode.OBJECT_ALREADY_EXISTS, f"object {key!r} already exists")
    return _err(
        ErrorCode.REPLICA_IS_NOT_READY,
        f"object {key!r} is being written by {client_tag(current.writer)}; it becomes "
        "readable when that put ends",
    )


def _err(code: ErrorCode, message: str) -> StoreError:
    return store_error(int(code), message)


def _has_task(key: str) -> StoreError:
    return _err(
        ErrorCode.OBJECT_HAS_REPLICATION_TASK,
        f"object {key!r} is being copied or moved by a task; retry when the task ends (query_task)",
    )


#: flags put_end_many reads to tell a plain put in progress (BUSY alone of these)
_END_CHECKED = READABLE | BUSY | SOFT_PIN


def _plain_write(obj: Obj, client_id: str) -> bool:
    """``obj`` is a put in progress of ``client_id`` with one replica, nothing
    pending and no pin: the batch paths end it inline."""
    ext = obj.ext
    return (
        ext is not None
        and obj.flags & _END_CHECKED == BUSY
        and obj.writer == client_id
        and not ext.pending
        and not ext.more
        and ext.soft_pin_ttl_s is None
    )


_ENABLE = int(SoftPinAction.ENABLE)
_DISABLE = int(SoftPinAction.DISABLE)


@dataclass(frozen=True)
class PingResult:
    view_version: int
    status: ClientStatus
    #: changes whenever the master process restarts
    instance: str = ""


@dataclass(frozen=True)
class GetReplicaListResult:
    replicas: tuple[ReplicaDesc, ...]
    lease_ttl_ms: int
    size: int


#: upper bounds of the value-size histogram (the reference's master_value_size_bytes:
#: 4 KiB .. 64 MiB; the last slot counts larger values)
VALUE_SIZE_BOUNDS: tuple[int, ...] = (4096, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20)


@dataclass
class Metrics:
    """Plain-int counters of the state (rendered by ``_exposition.py``)."""

    requests: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    evicted_keys: int = 0
    evicted_bytes: int = 0
    eviction_rounds: int = 0
    #: eviction rounds that freed something
    successful_evictions: int = 0
    expired_clients: int = 0
    replaced_clients: int = 0
    #: first allocation attempts that failed (eviction may then have made room)
    alloc_failures: int = 0
    #: put/upsert starts refused for lack of room (NO_AVAILABLE_HANDLE)
    put_alloc_failures: int = 0
    discarded_puts: int = 0
    reclaimed_puts: int = 0
    #: buffers whose release was delayed (abandoned writes, replaced upsert values),
    #: those released since, and the bytes still held
    discarded_buffers: int = 0
    released_buffers: int = 0
    discard_staging_bytes: int = 0
    get_hits: int = 0
    get_misses: int = 0
    #: value bytes of the reads that found their object
    get_hit_bytes: int = 0
    #: objects started per VALUE_SIZE_BOUNDS slot (the last: larger), and their sizes' sum
    value_size_counts: list[int] = field(default_factory=lambda: [0] * (len(VALUE_SIZE_BOUNDS) + 1))
    value_size_sum: int = 0

    def observe_value_size(self, size: int, count: int = 1) -> None:
        self.value_size_counts[bisect_left(VALUE_SIZE_BOUNDS, size)] += count
        self.value_size_sum += size * count


def _policy_pin(config: Any) -> int:
    """The soft-pin action of a ReplicateConfig (``pin_action``) or wire params."""
    return int(config.pin_action)


def _started(
    start: Callable[[str, str, int, Any, float], Obj],
    client_id: str,
    key: str,
    size: int,
    config: Any,
    now: float,
) -> Obj | StoreError:
    try:
        return start(client_id, key, size, config, now)
    except StoreError as exc:
        return exc


def start_each(
    start: Callable[[str, str, int, Any, float], Obj],
    client_id: str,
    keys: Sequence[str],
    sizes: Sequence[int],
    config: Any,
    now: float,
) -> list[Obj | StoreError]:
    """``start`` (``put_start_replicas``, ``upsert_start_replicas``) of every key
    in order, one call each: the key's record, or the error that refused it."""
    return [_started(start, client_id, k, z, config, now) for k, z in zip(keys, sizes, strict=True)]


#: flags whose records need _forget's extra steps (a write, a soft pin, a task)
_SLOW_FORGET: Final = BUSY | SOFT_PIN | TASK


class MasterState:
    """All master decisions.  Not thread-safe: one owner (the service loop)."""

    def __init__(
        self, config: MasterConfig | None = None, *, rng: random.Random | None = None
    ) -> None:
        self.config = config or MasterConfig()
        self.objects = ObjectIndex()
        self.segments: dict[str, SegmentRecord] = {}
        self.clients: dict[str, ClientRecord] = {}
        #: objects being written, in the order their write started
        self.inflight: dict[str, Obj] = {}
        #: reservations held as one record each, by name prefix (``_slot_runs.py``)
        self.slot_runs: dict[str, SlotRun] = {}
        self._discards: list[tuple[float, int, SegmentRecord, int, int]] = []
        self._discard_seq = itertools.count()
        self._seg_numbers = itertools.count(1)
        self._placement = Placement(self.config.allocation_strategy, rng or random.Random())
        self.view_version = 1
        self.instance = uuid.uuid4().hex
        self.metrics = Metrics()
        self.soft_pinned = 0
        #: durable changes not yet drained (None: nobody records them)
        self.effects: list[Effect] | None = None
        self._last_tick: float | None = None
        self._evict_now = 0.0
        #: a segment was just asked to evict more (:meth:`_owe`): the service pays
        #: it from the next turn of its loop instead of at the next tick
        self.debt_raised = False
        self.stall_grace_count = 0
        #: size -> the int object of that size: objects of equal size share one
        #: (a KV cache has few distinct block sizes)
        self._sizes: dict[int, int] = {}
        self._dirty_allocators: set[str] = set()
        self._lease_tick = -1
        self._lease_until = 0.0
        #: the last put config that passed the checks, and its soft-pin ttl
        self._checked_config: Any = None
        self._checked_pin: float | None = None
        #: segment name -> (until, ranges) other clients were writing when it went
        #: away (``_keep_lost_writes``)
        self._lost_writes: dict[str, tuple[float, list[tuple[int, int]]]] = {}
        #: the most recent answers kept for retries (:meth:`keep_reply`)
        self.kept_replies: deque[ReplyKept] = deque(maxlen=KEPT_REPLIES_MAX)
        #: applying effects (replay, a standby): allocators are rebuilt afterwards
        #: by finish_replay() instead of being updated range by range
        self._replaying = False
        #: copy/move tasks, the copies in progress, drain jobs (_tasks.py,
        #: _replicate.py, _drain.py)
        self.tasks: TaskQueue = TaskQueue(self.config, self._emit)
        self.replication: Replications = Replications(self)
        self.drains: DrainJobs = DrainJobs(self)
        #: the SSD tier: LOCAL_DISK replicas and offload work (``_offload.py``)
        self.offload = OffloadState(self)

    # ------------------------------------------------------------------------------
    # clients and segments
    # ------------------------------------------------------------------------------

    def _restored(self, placed: Iterable[tuple[Any, ...]]) -> list[Rep]:
        """The replicas of an applied effect, ``(segment id, address, ...)`` each, that
        lie in segments mounted here, as (segment, address); their allocators are
        rebuilt by ``finish_replay``."""
        reps: list[Rep] = []
        for seg_id, addr, *_ in placed:
            seg = self.segments.get(seg_id)
            if seg is not None:
                reps.append((seg, addr))
                self._dirty_allocators.add(seg_id)
        return reps

    def _touch(self, client_id: str, now: float) -> ClientRecord:
        client = self.clients.get(client_id)
        if client is None:
            client = self.clients[client_id] = ClientRecord(client_id, now)
        client.last_seen = now
        return client

    def ping(self, client_id: str, now: float) -> PingResult:
        """Record liveness.  Unknown clients are told to remount."""
        client = self.clients.get(client_id)
        if client is None:
            return PingResult(self.view_version, ClientStatus.NEED_REMOUNT, self.instance)
        client.last_seen = now
        return PingResult(self.view_version, ClientStatus.OK, self.instance)

    def mount_segment(self, client_id: str, info: SegmentInfo, now: float) -> None:
        """Offer a segment to the store.  Idempotent for the same client and id.

        Raises:
            InvalidParams: empty name, non-positive size/base, overlap with
                another segment of the same transfer-engine segment.
            StoreError(SEGMENT_ALREADY_EXISTS): the id belongs to another client.
        """
        if not info.id or not info.name or info.size <= 0 or info.base <= 0:
            raise _err(
                ErrorCode.INVALID_PARAMS,
                f"segment {info.id!r} ({info.name!r}, base {info.base:#x}, size {info.size}) "
                "is invalid",
            )
        existing = self.segments.get(info.id)
        client = self._touch(client_id, now)
        if info.host_id:
            client.host_id = info.host_id
        if existing is not None:
            if existing.client_id != client_id:
                raise _err(
                    ErrorCode.SEGMENT_ALREADY_EXISTS,
                    f"segment id {info.id} is already mounted by {client_tag(existing.client_id)}",
                )
            return
        # A transfer-engine segment name belongs to one live engine at a time (the
        # engine claims it at start-up). Another client's segment under the same name
        # is therefore a crashed predecessor that has not expired yet: drop it now,
        # or new objects would be placed in memory that no longer exists.
        stale = {
            s.client_id
            for s in self.segments.values()
            if s.name == info.name and s.client_id != client_id
        }
        for old_client in stale:
            self.expire_client(old_client, now)
            self.metrics.replaced_clients += 1
        for seg in self.segments.values():
            if (
                seg.name == info.name
                and info.base < seg.info.base + seg.info.size
                and seg.info.base < info.base + info.size
            ):
                raise _err(
                    ErrorCode.INVALID_PARAMS,
                    f"segment {info.id} overlaps segment {seg.id} of {info.name!r}",
                )
        self._emit(SegmentMounted(info, client_id))
        self._keep_lost_writes(self._add_segment(info, client), now)

    def lost_write_hold(self) -> float:
        """How long the ranges others were writing into a dropped segment stay
        reserved in a segment that replaces it: until no such write can come.  A
        reserved buffer is written within :meth:`slot_ttl`; a put started with
        PutStart is reclaimed after ``put_start_release_timeout`` anyway (the
        master frees its buffers then), and :data:`SLOT_TTL_S` bounds both."""
        return min(SLOT_TTL_S, self.config.put_start_release_timeout_s)

    def _keep_lost_writes(self, seg: SegmentRecord, now: float) -> None:
        """``seg`` replaces a segment of the same name that went away while other
        clients were writing into it (a crashed storage node came back): a
        writer that has not noticed may still write its old ranges, which in a
        new process's memory can be the same addresses.  They stay reserved (on
        the discard list) until no such write can come (:meth:`lost_write_hold`)."""
        held = self._lost_writes.pop(seg.name, None)
        if held is None or held[0] <= now:
            return
        until, ranges = held
        base, end = seg.info.base, seg.info.base + seg.info.size
        inside = [(a, n) for a, n in ranges if base <= a and a + n <= end]
        if not inside:
            return
        seg.allocator.rebuild(inside)
        for a, n in inside:
            heapq.heappush(self._discards, (until, next(self._discard_seq), seg, a, n))
            self.metrics.discarded_buffers += 1
            self.metrics.discard_staging_bytes += n

    def _add_segment(self, info: SegmentInfo, client: ClientRecord) -> SegmentRecord:
        seg = SegmentRecord(info, client.id, next(self._seg_numbers))
        self.segments[info.id] = seg
        self._placement.invalidate()
        self.drains.segment_mounted(seg)
        client.segments.add(info.id)
        return seg

    def remount_segments(self, client_id: str, infos: Iterable[SegmentInfo], now: float) -> None:
        """Re-register a client and all its segments (after NEED_REMOUNT)."""
        self._touch(client_id, now)
        for info in infos:
            self.mount_segment(client_id, info, now)

    def unmount_segment(self, client_id: str, segment_id: str, now: float) -> int:
        """Remove a segment and every replica in it; returns the keys affected.

        Raises:
            StoreError(SEGMENT_NOT_FOUND): unknown id or another client's segment.
        """
        self.spill_slot_runs()
        seg = self.segments.get(segment_id)
        if seg is None or seg.client_id != client_id:
            raise _err(
                ErrorCode.SEGMENT_NOT_FOUND, f"{client_tag(client_id)} has no segment {segment_id}"
            )
        self._touch(client_id, now)
        return self._drop_segment(seg, now)

    def _drop_segment(self, seg: SegmentRecord, now: float | None = None) -> int:
        """Forget ``seg`` and its replicas.  With ``now``, the ranges other
        clients were writing into it are remembered for a segment that replaces
        it (:meth:`_keep_lost_writes`)."""
        self._emit(SegmentUnmounted(seg.id))
        self.replication.segment_dropped(seg)
        del self.segments[seg.id]
        self._placement.invalidate()
        client = self.clients.get(seg.client_id)
        if client is not None:
            client.segments.discard(seg.id)
        affected = seg.live_count
        order = seg.order
        lost: list[tuple[int, int]] = []
        keep = now is not None and not self._replaying
        while order:  # consumes the deque (no copy of millions of entries)
            obj = order.popleft()
            if obj.flags:
                if keep and obj.flags & BUSY and obj.writer != seg.client_id:
                    lost += _ranges_written(obj, seg)
                self._lose_replicas(obj.key, obj, seg)
        if lost and now is not None:
            if len(self._lost_writes) >= _LOST_WRITES_MAX:
                self._lost_writes = {k: v for k, v in self._lost_writes.items() if v[0] > now}
            self._lost_writes[seg.name] = (now + self.lost_write_hold(), lost)
        seg.dead = 0
        self.view_version += 1
        return affected

    def _lose_replicas(self, key: str, obj: Obj, seg: SegmentRecord) -> None:
        """``seg`` went away: drop ``obj``'s replicas (current and pending) in it."""
        reps = [r for r in obj.replicas() if r[0] is not seg]
        pending = obj.pending()
        if pending:
            kept = tuple(r for r in pending if r[0] is not seg)
            if len(kept) != len(pending):
                ext = obj.extension()
                ext.pending = kept
                if not kept:  # the upsert lost everything it wrote: it failed
                    ext.pending_size = 0
                    self._end_write(key, obj)
        if reps:
            obj.set_replicas(reps)
            return
        pending = obj.pending()
        if pending and obj.flags & READABLE:
            # the old value is gone; what the upsert writes becomes the object
            ext = obj.extension()
            obj.flags &= ~READABLE
            obj.size = ext.pending_size
            ext.pending, ext.pending_size = (), 0
            obj.set_replicas(pending)
            return
        self._forget(key, obj)

    def expire_client(self, client_id: str, now: float) -> None:
        """Forget a client: unmount its segments, revoke its unfinished puts."""
        self.spill_slot_runs()
        client = self.clients.pop(client_id, None)
        if client is None:
            return
        self.replication.client_expired(client_id, now)
        for seg_id in list(client.segments):
            seg = self.segments.get(seg_id)
            if seg is not None:
                self._drop_segment(seg, now)
        # after its segments went: a drain job that follows these tasks then sees
        # nothing left to move there instead of queueing more for a dead client
        self.tasks.fail_client(client_id, "the client running the task expired", now)
        for key in list(client.inflight):
            obj = self.objects.get(key)
            if obj is not None and obj.flags & BUSY and obj.writer == client_id:
                self._abandon(key, obj, discard=True, now=now)
        client.inflight.clear()
        self.offload.client_gone(client_id)
        self.metrics.expired_clients += 1

    # ------------------------------------------------------------------------------
    # allocation
    # ------------------------------------------------------------------------------

    def _allocate_or_evict(
        self, size: int, config: Any, writer_host: str, key: str, now: float
    ) -> list[Rep]:
        segments = self.segments.values()
        reps = self._placement.allocate(segments, size, config, writer_host)
        if reps:
            return reps
        self.metrics.alloc_failures += 1
        # Evict what this put needs, now; the rest of an eviction round (eviction_ratio
        # of the segment, as the reference frees per round) is owed to the background
        # work of tick(), which frees it a slice at a time: evicting 5 % of a
        # 10-million-object pool here would stall every client for a second.
        # Evict only from segments the object could fit in at all: an object
        # larger than every segment must not wipe the cache before failing.
        need = reserved_size(size)
        excluded = set(config.excluded_segments)
        fits = [
            s
            for s in self._placement.live(segments)
            if s.name not in excluded and s.allocator.capacity >= need
        ]
        fits.sort(key=lambda s: s.allocator.free_bytes)  # the fullest first
        for allow_soft in (False, True):
            if allow_soft and not self.config.allow_evict_soft_pinned_objects:
                break
            progress = True
            while progress:
                progress = False
                for seg in fits:
                    self._owe(seg, self._round_bytes(seg))
                    freed = self._evict(seg, need, now, protect=key, allow_soft=allow_soft)
                    if freed:
                        # what this put freed counts towards the round: the rest is owed
                        seg.evict_debt = max(0, seg.evict_debt - freed)
                        progress = True
                        reps = self._placement.allocate(segments, size, config, writer_host)
                        if reps:
                            return reps
        # Every segment that could hold the object was swept in full and had nothing
        # more to give: nothing is owed any more (a debt left here would evict the
        # next objects put into room freed later, before the background forgives it).
        for seg in fits:
            seg.evict_debt = 0
        self.metrics.put_alloc_failures += 1
        total = len(self.segments)
        largest = max((s.allocator.largest_free for s in self.segments.values()), default=0)
        raise _err(
            ErrorCode.NO_AVAILABLE_HANDLE,
            f"no segment can hold {size} bytes for {key!r} ({total} segment(s), largest free "
            f"range {largest} bytes, nothing left to evict: objects are leased, pinned or "
            "being written); add memory (global_segment_size) or remove objects",
        )

    def _free(self, seg: SegmentRecord, addr: int, size: int) -> None:
        if self._replaying:
            self._dirty_allocators.add(seg.id)
        elif self.segments.get(seg.id) is seg:
            seg.allocator.free(addr, reserved_size(size))

    def _discard(self, seg: SegmentRecord, addr: int, size: int, release_at: float) -> None:
        """Keep a range reserved until ``release_at`` (a writer or reader may still
        be using it), then free it in :meth:`tick`."""
        if self._replaying:
            self._dirty_allocators.add(seg.id)
            return
        reserved = reserved_size(size)
        heapq.heappush(self._discards, (release_at, next(self._discard_seq), seg, addr, reserved))
        self.metrics.discarded_buffers += 1
        self.metrics.discard_staging_bytes += reserved

    def _size(self, size: int) -> int:
        return self._sizes.setdefault(size, size) if len(self._sizes) < 4096 else size

    # ------------------------------------------------------------------------------
    # puts
    # ------------------------------------------------------------------------------

    def _validate_put(self, key: str, size: int, config: Any) -> float | None:
        if not key:
            raise _err(ErrorCode.INVALID_PARAMS, "key must not be empty")
        if size <= 0:
            raise _err(
                ErrorCode.INVALID_PARAMS, f"object size must be positive, got {size} for {key!r}"
            )
        if config.replica_num < 1:
            raise _err(
                ErrorCode.INVALID_PARAMS,
                f"replica_num must be at least 1, got {config.replica_num}",
            )
        action = _policy_pin(config)
        if config.soft_pin_ttl_ms is not None and action != _ENABLE:
            raise _err(
                ErrorCode.INVALID_PARAMS,
                f"soft_pin_ttl_ms is only valid with soft_pin_action ENABLE (got "
                f"{SoftPinAction(action).name}) for {key!r}",
            )
        if action == _ENABLE:
            ttl_ms = (
                self.config.default_kv_soft_pin_ttl_ms
                if config.soft_pin_ttl_ms is None
                else config.soft_pin_ttl_ms
            )
            if ttl_ms < 0 or ttl_ms > self.config.max_kv_soft_pin_ttl_ms:
                raise _err(
                    ErrorCode.INVALID_PARAMS,
                    f"soft_pin_ttl_ms {ttl_ms} exceeds --max_kv_soft_pin_ttl "
                    f"({self.config.max_kv_soft_pin_ttl_ms})",
                )
            return ttl_ms / 1000.0
        return None

    def put_start(
        self, client_id: str, key: str, size: int, config: Any, now: float
    ) -> list[ReplicaDesc]:
        """Allocate replicas for a new object (see :meth:`put_start_replicas`)."""
        self.put_start_replicas(client_id, key, size, config, now)
        obj = self.objects[key]
        return obj.descs()

    def put_start_replicas(
        self,
        client_id: str,
        key: str,
        size: int,
        config: Any,
        now: float,
        observe: bool = True,
        evict: bool = True,
    ) -> Obj:
        """Allocate replicas for a new object; returns its record (replicas being
        written).

        Raises:
            ObjectExists: the key is readable.
            ReplicaNotReady: another put of the key is in progress (younger than
                ``put_start_discard_timeout``): wait for it to end or be revoked.
            NoAvailableHandle: no room even after eviction.
            InvalidParams: empty key, size <= 0, replica_num < 1, soft pin too long.
        """
        # (this runs once per key of every put: the checks of a config a batch
        # shares are made once, the index shard is looked up once)
        if config is self._checked_config and key and size > 0:
            pin_ttl = self._checked_pin
        else:
            pin_ttl = self._validate_put(key, size, config)
            self._checked_config, self._checked_pin = config, pin_ttl
        shard = self.objects.shard(key)
        obj = shard.get(key)
        if obj is not None:
            if obj.flags & READABLE:
                raise _err(ErrorCode.OBJECT_ALREADY_EXISTS, f"object {key!r} already exists")
            ext = obj.ext
            started = ext.started_at if ext is not None else 0.0
            if now - started < self.config.put_start_discard_timeout_s:
                raise _err(
                    ErrorCode.REPLICA_IS_NOT_READY,
                    f"object {key!r} is being written by {client_tag(obj.writer)} (its put started "
                    f"{now - started:.3f} s ago); it becomes readable when that put ends",
                )
            # the earlier writer is presumed dead: its buffers go to the discard list
            self._abandon(key, obj, discard=True, now=now)
            self.metrics.discarded_puts += 1
        client = self.clients.get(client_id)
        if client is None:
            client = self._touch(client_id, now)
        else:
            client.last_seen = now
        reps = self._placement.allocate(self.segments.values(), size, config, client.host_id)
        if not reps:
            if not evict:
                raise _err(ErrorCode.NO_AVAILABLE_HANDLE, f"no room for {key!r} without evicting")
            reps = self._allocate_or_evict(size, config, client.host_id, key, now)
        flags = BUSY | (HARD_PIN if config.with_hard_pin else 0)
        sizes = self._sizes
        seg, addr = reps[0]
        obj = Obj(key, sizes.get(size, size), seg, addr, client.id, flags)
        if size not in sizes and len(sizes) < 4096:
            sizes[size] = size
        ext = obj.ext = ObjExt()
        ext.started_at = now
        ext.soft_pin_ttl_s = pin_ttl
        if len(reps) > 1:
            ext.more = tuple(reps[1:])
            for s, _ in reps[1:]:
                s.order.append(obj)
        shard[key] = obj
        self.objects.added()
        seg.order.append(obj)
        self.inflight[key] = obj
        client.inflight.add(key)
        if self.effects is not None:
            self.effects.append(
                WriteStarted(
                    key,
                    size,
                    tuple((seg.id, addr) for seg, addr in reps),
                    client.id,
                    bool(flags & HARD_PIN),
                    False,
                    pin_ttl,
                )
            )
        if observe:
            self.metrics.observe_value_size(size)
        return obj

    def upsert_start_many(
        self, client_id: str, keys: Sequence[str], sizes: Sequence[int], config: Any, now: float
    ) -> list[Obj | StoreError]:
        """:meth:`upsert_start_replicas` of every key, in order.  An upsert of an
        absent key is a put, so new keys take :meth:`put_start_many`'s fast path;
        replacements go through :meth:`upsert_start_replicas` one by one.  Every
        key gets the answer an upsert of it alone would get; only where a random
        placement lands may differ (the new keys draw their segments first)."""
        return self.put_start_many(client_id, keys, sizes, config, now, upsert=True)

    def put_start_many(
        self,
        client_id: str,
        keys: Sequence[str],
        sizes: Sequence[int],
        config: Any,
        now: float,
        *,
        upsert: bool = False,
        observe: bool = True,
        evict: bool = True,
    ) -> list[Obj | StoreError]:
        """:meth:`put_start_replicas` (``upsert``: :meth:`upsert_start_replicas`)
        of every key, in order: each key's record, or the error that refused it.
        ``observe`` / ``evict``: as :meth:`put_start_replicas`'s (puts only).

        The common batch -- new keys, one replica each, random placement -- takes
        a fast path: each key draws its segment as :meth:`put_start_replicas`
        would, the keys that drew one segment are reserved as one run of its
        allocator (adjacent ranges, each freed on its own later), and records are
        made without a call per key.  Any other key (present or repeated, in a
        segment without room for the run, or any other placement) goes through
        :meth:`put_start_replicas` at its place in the order, so the outcome of
        every key is what a put of it alone would have had.
        """
        n = len(keys)
        live = self._placement.live(self.segments.values())
        places: list[tuple[SegmentRecord, int, dict[str, Obj]] | None] = [None] * n
        pin_ttl: float | None = None
        if n > 1 and live and self._placement.simple(config):
            try:
                pin_ttl = self._validate_put("k", 1, config)
            except StoreError:
                pass  # every key gets the config's error one by one
            else:
                self._reserve_runs(keys, sizes, live, places)
        start_one: Callable[..., Obj] = (
            self.upsert_start_replicas if upsert else self.put_start_replicas
        )
        if not (observe and evict):
            assert not upsert
            start_one = partial(self.put_start_replicas, observe=observe, evict=evict)
        if not any(places):
            return start_each(start_one, client_id, keys, sizes, config, now)
        client = self._touch(client_id, now)
        writer = client.id
        flags = BUSY | (HARD_PIN if config.with_hard_pin else 0)
        hard = bool(flags & HARD_PIN)
        inflight, held = self.inflight, client.inflight
        size_of, effects = self._size, self.effects
        out: list[Obj | StoreError] = []
        made = 0
        last_size = -1
        stored_size = 0
        for key, size, place in zip(keys, sizes, places, strict=True):
            if place is None:
                out.append(_started(start_one, client_id, key, size, config, now))
                continue
            seg, addr, shard = place
            if size != last_size:  # (a batch is mostly of one size)
                last_size, stored_size = size, size_of(size)
            obj = Obj(key, stored_size, seg, addr, writer, flags)
            obj.ext = ObjExt(now, pin_ttl)
            shard[key] = obj
            made += 1
            seg.order.append(obj)
            inflight[key] = obj
            held.add(key)
            if effects is not None:
                effects.append(
                    WriteStarted(key, size, ((seg.id, addr),), writer, hard, False, pin_ttl)
                )
            out.append(obj)
        self.objects.added(made)
        if not observe:
            return out
        seen = self.metrics.observe_value_size
        if made == n and sizes.count(sizes[0]) == n:  # one size for the whole batch
            seen(sizes[0], n)
        else:
            placed = Counter(sizes[i] for i, place in enumerate(places) if place is not None)
            for size, count in placed.items():
                seen(size, count)
        return out

    def _reserve_runs(
        self,
        keys: Sequence[str],
        sizes: Sequence[int],
        live: list[SegmentRecord],
        places: list[tuple[SegmentRecord, int, dict[str, Obj]] | None],
    ) -> None:
        """The fast path of :meth:`put_start_many`: set ``places[i]`` to the segment
        and address reserved for each new, distinct, valid key whose segment had
        room for its run (and the key's shard of the index); leave the others None."""
        draw, n = self._placement.first_choice, len(live)
        shards = self.objects.shards
        runs: dict[int, list[int]] = {}
        only: list[int] | None = None
        if n == 1:  # one segment: no draw to make
            only = runs[0] = []
        seen: set[str] = set()
        found: list[dict[str, Obj]] = []
        for i, key in enumerate(keys):
            shard = shards[hash(key) & SHARD_MASK]
            found.append(shard)
            if sizes[i] <= 0 or not key or key in shard or key in seen:
                continue  # (refused or decided one by one)
            seen.add(key)
            if only is not None:
                only.append(i)
                continue
            choice = draw(n)
            run = runs.get(choice)
            if run is None:
                runs[choice] = [i]
            else:
                run.append(i)
        for choice, idxs in runs.items():
            if not idxs:
                continue
            seg = live[choice]
            needs = [reserved_size(sizes[i]) for i in idxs]
            addr = seg.allocator.allocate_run(sum(needs), len(needs))
            if addr is None:
                continue  # one by one: they may fit elsewhere, or evict
            for i, need in zip(idxs, needs, strict=True):
                places[i] = (seg, addr, found[i])
                addr += need

    def _writing(self, client_id: str, key: str) -> Obj:
        obj = self.objects.get(key)
        if obj is None or not obj.flags & BUSY:
            raise _err(
                ErrorCode.OBJECT_NOT_FOUND,
                f"no put of {key!r} is in progress (it timed out, was revoked, or its segment "
                "went away)",
            )
        if obj.writer != client_id:
            raise _err(
                ErrorCode.ILLEGAL_CLIENT,
                f"{client_tag(client_id)} did not start the put of {key!r} ({client_tag(obj.writer)} did)",
            )
        return obj

    def put_end_many(
        self, client_id: str, keys: Sequence[str], now: float
    ) -> list[StoreError | None]:
        """:meth:`put_end` of every key, in order: None for each ended, or the error.
        A plain put's end (one replica, no pin) is made here; any other key
        goes through :meth:`put_end`."""
        out: list[StoreError | None] = [None] * len(keys)
        client = self.clients.get(client_id)
        if client is None:
            client = self._touch(client_id, now)
        else:
            client.last_seen = now
        shards, inflight, held = self.objects.shards, self.inflight, client.inflight
        effects, end_one = self.effects, self.put_end
        for i, key in enumerate(keys):
            obj = shards[hash(key) & SHARD_MASK].get(key)
            if obj is None or not _plain_write(obj, client_id):
                try:
                    end_one(client_id, key, now)
                except StoreError as exc:
                    out[i] = exc
                continue
            obj.flags = (obj.flags | READABLE) & ~BUSY
            obj.ext = None
            inflight.pop(key, None)
            held.discard(key)
            if effects is not None:
                effects.append(self._commit_effect(key, obj))
        return out

    def put_end(self, client_id: str, key: str, now: float) -> None:
        """Make the replicas of a put readable.  Repeating it is harmless.

        Raises:
            ObjectNotFound: no put of the key is in progress (revoked, reclaimed,
                or every replica's segment went away).
            IllegalClient: another client's put (or it took this one over).
        """
        obj = self.objects.get(key)
        flags = 0 if obj is None else obj.flags
        if flags & READABLE and not flags & BUSY:
            assert obj is not None
            if obj.writer == client_id:
                return  # a repeated end
            raise _err(
                ErrorCode.ILLEGAL_CLIENT,
                f"the put of {key!r} by {client_tag(client_id)} was taken over by "
                f"{client_tag(obj.writer)} (after put_start_discard_timeout), whose value is stored",
            )
        if obj is None or not flags & BUSY or obj.writer != client_id:
            obj = self._writing(client_id, key)  # raises the right error
        client = self.clients.get(client_id)
        if client is None:
            self._touch(client_id, now)
        else:
            client.last_seen = now
        ext = obj.ext
        if ext is None:  # (a put in flight always has one)
            ext = obj.extension()
        if ext.pending:
            self._finish_upsert(key, obj, now)
            return
        pin = ext.soft_pin_ttl_s
        if pin is not None or flags & SOFT_PIN:
            self._apply_pin(obj, pin, now)
        obj.flags = (obj.flags | READABLE) & ~BUSY
        self.inflight.pop(key, None)
        if client is not None:
            client.inflight.discard(key)
        if pin is None and not ext.more:
            obj.ext = None  # the common case of _end_write: nothing left to keep
        else:
            self._end_write(key, obj)
        self._committed(key, obj)

    def _apply_pin(self, obj: Obj, ttl_s: float | None, now: float) -> None:
        ext = obj.extension()
        if ttl_s is None:
            if obj.flags & SOFT_PIN:
                obj.flags &= ~SOFT_PIN
                self.soft_pinned -= 1
            ext.soft_pin_ttl_s = None
            return
        ext.soft_pin_until = now + ttl_s
        if not obj.flags & SOFT_PIN:
            obj.flags |= SOFT_PIN
            self.soft_pinned += 1

    def _end_write(self, key: str, obj: Obj) -> None:
        """The write in progress of ``key`` is over (ended, revoked or lost)."""
        obj.flags &= ~BUSY
        self.inflight.pop(key, None)
        client = self.clients.get(obj.writer)
        if client is not None:
            client.inflight.discard(key)
        ext = obj.ext
        if ext is not None:
            ext.pending, ext.pending_size = (), 0
            if not obj.flags & SOFT_PIN:
                ext.soft_pin_ttl_s = None
            obj.compact()

    def put_revoke(self, client_id: str, key: str, now: float) -> None:
        """Abort a put: its buffers are freed (the writer says it stopped writing)."""
        self.spill_slot_runs()
        obj = self._writing(client_id, key)
        self._abandon(key, obj, discard=False, now=now)
        self._touch(client_id, now)

    # --- reserved buffers: a put in one round trip ----------------------------------

    def slot_ttl(self) -> float:
        """How long after reserving a client may write a buffer and commit it."""
        return min(SLOT_TTL_S, self.config.put_start_release_timeout_s / 2)

    def reserve_slots(
        self, client_id: str, size: int, count: int, config: Any, now: float, batch: str = "r"
    ) -> list[tuple[str, Obj]]:
        """Reserve up to ``count`` buffers of ``size`` bytes for ``client_id``'s
        single puts to come, each placed as a put of that size would be: puts in
        progress under names no key can take (:func:`slot_name`).  Returns the
        (name, record) of each; fewer than ``count`` when the pool ran out after
        the first.

        Raises:
            NoAvailableHandle / InvalidParams: as :meth:`put_start_replicas`, when
                not even one could be reserved.
        """
        # Only the first evicts (as the put at hand would); the ones ahead take the
        # room there is, up to a segment's capacity.  Not only below the high
        # watermark: a full pool is a cache's steady state, kept between the
        # watermark and full by eviction rounds, and buffers ahead limited to the
        # room below the watermark were single ones there -- a put then took a
        # reservation and a commit, and with HA the reservation waits for a
        # standby (measured: 1 MiB puts into a full HA pool 2.2x HA off).  What
        # they hold counts towards the watermark like any write in progress, and
        # goes back within seconds when unused (``_slots.py``).
        if count > 1 and self._placement.simple(config):
            out = self._reserve_slots_at_once(client_id, size, count, config, now, batch)
            if out:
                return out
        out = []
        for i in range(count):
            name = slot_name(client_id, batch, i)
            try:
                obj = self.put_start_replicas(
                    client_id, name, size, config, now, observe=False, evict=not out
                )
            except StoreError:
                if not out:
                    raise
                break
            out.append((name, obj))
        return out

    def reserve_slot_run(
        self, client_id: str, size: int, count: int, config: Any, now: float, batch: str
    ) -> SlotRun | None:
        """:meth:`reserve_slots`' common case held as one record (``_slot_runs.py``):
        nothing records effects, several buffers of a config placed by a draw
        alone, and every live segment has room for all of them.  None otherwise
        (the caller reserves with :meth:`reserve_slots`)."""
        if count < 2 or self.effects is not None or not self._placement.simple(config):
            return None
        live = self._room_for_all(size, count)
        if not live:
            return None
        return _slot_runs.reserve(self, client_id, size, count, config, now, batch, live)

    def _room_for_all(self, size: int, count: int) -> list[SegmentRecord]:
        """The live segments when every one of them has room for ``count`` buffers
        of ``size`` (whichever a buffer draws), else an empty list."""
        live = self._placement.live(self.segments.values())
        need = reserved_size(size) * count
        if any(s.allocator.allocated + need > s.allocator.capacity for s in live):
            return []
        return live

    def spill_slot_runs(self) -> None:
        """Turn the runs into per-buffer writes in progress (``_slot_runs.spill``):
        called first by whatever looks at writes in progress."""
        if self.slot_runs:
            _slot_runs.spill(self)

    def _reserve_slots_at_once(
        self,
        client_id: str,
        size: int,
        count: int,
        config: Any,
        now: float,
        batch: str,
    ) -> list[tuple[str, Obj]]:
        """:meth:`reserve_slots`'s common case: every live segment has room for
        all of them, so they are started as one batch
        (:meth:`put_start_many`'s runs).  Empty when that did not place the
        first (the caller reserves one by one)."""
        if not self._room_for_all(size, count):
            return []
        names = slot_names(client_id, batch, count)
        started = self.put_start_many(
            client_id, names, [size] * count, config, now, observe=False, evict=False
        )
        out: list[tuple[str, Obj]] = []
        for name, obj in zip(names, started, strict=True):
            if type(obj) is not Obj:
                break
            out.append((name, obj))
        # the names must run from 0 without a gap: the client derives them
        for name, obj in zip(names[len(out) :], started[len(out) :], strict=True):
            if type(obj) is Obj:
                self._abandon(name, obj, discard=False, now=now)
        return out

    def slots_held(self) -> int:
        """Reserved buffers not committed yet (O(writes in progress + runs))."""
        return self._slots_in_flight() + _slot_runs.held_count(self)

    def _slots_in_flight(self) -> int:
        return sum(1 for k in self.inflight if k[:1] == SLOT_MARK)

    def key_count(self) -> int:
        """Keys stored or being written (reserved buffers are not keys)."""
        return len(self.objects) - self._slots_in_flight()

    def writing_new(self) -> int:
        """Puts of new keys in progress (not upserts, not reserved buffers)."""
        return sum(
            1 for k, obj in self.inflight.items() if not obj.flags & READABLE and k[:1] != SLOT_MARK
        )

    def commit_slot(self, client_id: str, slot: str, key: str, now: float) -> None:
        """Make the buffer reserved as ``slot`` (and written by ``client_id``) the
        value of ``key``: the put's end, with the key's own checks made now.

        Raises:
            ObjectNotFound: no such reservation of this client (it was reclaimed,
                its segment went away, or the master restarted): the caller puts
                the ordinary way.
            ObjectExists: ``key`` is readable (the reservation stays).
            ReplicaNotReady: another put of ``key`` is in progress (the
                reservation stays).
        """
        obj = self.objects.get(slot)
        if obj is None and self.slot_runs:
            found = _slot_runs.find(self, client_id, slot)
            if found is not None:
                shard = self.objects.shard(key)
                current = shard.get(key)
                if current is not None:
                    raise _key_taken(key, current)
                self._touch(client_id, now)
                made = _slot_runs.commit(self, *found, key, shard)
                self.metrics.observe_value_size(made.size)
                return
        if (
            obj is None
            or not slot.startswith(SLOT_PREFIX)
            or obj.flags & (BUSY | READABLE) != BUSY
            or obj.writer != client_id
        ):
            raise _err(
                ErrorCode.OBJECT_NOT_FOUND,
                f"buffer {slot[len(SLOT_PREFIX) :]!r} reserved for {key!r} by "
                f"{client_tag(client_id)} is gone (reclaimed, its segment went away, or the "
                "master restarted); the put is made the ordinary way",
            )
        current = self.objects.get(key)
        if current is not None:
            raise _key_taken(key, current)
        self._rekey(slot, key, obj)
        self._emit(WriteRenamed(slot, key))
        self.metrics.observe_value_size(obj.size)
        self.put_end(client_id, key, now)

    def commit_slots_many(
        self, client_id: str, slots: Sequence[str], keys: Sequence[str], now: float
    ) -> list[StoreError | None]:
        """:meth:`commit_slot` of each pair, in order: None for each committed,
        or the error.  A plain buffer (one replica, no pin) under a new key is
        committed here; any other pair goes through :meth:`commit_slot`."""
        n = len(keys)
        if len(slots) != n:
            raise ValueError(f"{len(slots)} buffers for {n} keys")
        out: list[StoreError | None] = [None] * n
        client = self._touch(client_id, now)
        shards, inflight, held = self.objects.shards, self.inflight, client.inflight
        effects, commit_one = self.effects, self.commit_slot
        committed: list[int] = []
        runs, made = self.slot_runs, 0
        # each buffer's run (its name up to the index) and index in it, from the
        # runs a client names them by; buffers named one by one (HA clients, whose
        # masters hold no runs) go through commit_slot, which also finds a run's
        names: Sequence[str] | None = None
        heads: Iterable[str | None]
        indexes: Iterable[int]
        if runs and type(slots) is SlotRuns and slots.client_id == client_id:
            heads, indexes = slots.heads(), slots.indexes()
        else:
            names = slots
            heads, indexes = repeat(None), repeat(-1)
        last_head: str | None = None
        run: SlotRun | None = None
        # (heads and indexes are as long as keys, or endless: the lengths were compared)
        for i, (head, j, key) in enumerate(zip(heads, indexes, keys, strict=False)):
            target = shards[hash(key) & SHARD_MASK]
            if j >= 0:  # (_slot_runs.find and .commit inline)
                if head is not last_head:
                    last_head, run = head, runs.get(head)  # type: ignore[arg-type]
                if (
                    run is not None
                    and j < run.count
                    and run.free[j]
                    and run.client_id == client_id
                    and key not in target
                ):
                    if run.single is None:
                        seg, addr = run.place(j)
                    else:
                        seg, addr = run.single, run.base + j * run.stride
                    made_obj = Obj(key, run.size, seg, addr, client_id, run.done_flags)
                    target[key] = made_obj
                    seg.order.append(made_obj)
                    run.free[j] = 0
                    run.left -= 1
                    if not run.left:
                        del runs[head]  # type: ignore[arg-type]
                    made += 1
                    committed.append(run.size)
                    continue
            slot = names[i] if names is not None else f"{head}:{j}"
            source = shards[hash(slot) & SHARD_MASK]
            obj = source.get(slot)
            ext = None if obj is None else obj.ext
            if (  # (_plain_write inline: a put in progress of this client, one replica)
                ext is None
                or obj.flags & _END_CHECKED != BUSY  # type: ignore[union-attr]
                or obj.writer != client_id  # type: ignore[union-attr]
                or ext.pending
                or ext.more
                or ext.soft_pin_ttl_s is not None
                or key in target
                or not slot.startswith(SLOT_PREFIX)
            ):
                try:
                    commit_one(client_id, slot, key, now)
                except StoreError as exc:
                    out[i] = exc
                continue
            assert obj is not None
            del source[slot]
            inflight.pop(slot, None)
            held.discard(slot)
            obj.key = key
            target[key] = obj
            obj.flags = (obj.flags | READABLE) & ~BUSY
            obj.ext = None
            if effects is not None:
                effects.append(WriteRenamed(slot, key))
                effects.append(self._commit_effect(key, obj))
            committed.append(obj.size)
        if made:
            self.objects.added(made)
        if committed:
            if committed.count(committed[0]) == len(committed):  # (one size: no Counter)
                self.metrics.observe_value_size(committed[0], len(committed))
            else:
                for size, n in Counter(committed).items():
                    self.metrics.observe_value_size(size, n)
        return out

    def _rekey(self, slot: str, key: str, obj: Obj) -> None:
        """The write in progress ``obj`` under ``slot`` moves to ``key`` (absent)."""
        self.objects.pop(slot)
        self.inflight.pop(slot, None)
        client = self.clients.get(obj.writer)
        if client is not None:
            client.inflight.discard(slot)
            client.inflight.add(key)
        obj.key = key
        self.objects.add(key, obj)
        self.inflight[key] = obj

    def _abandon(self, key: str, obj: Obj, *, discard: bool, now: float) -> None:
        self._emit(WriteEnded(key))
        release = now + self.config.put_start_release_timeout_s
        pending = obj.pending()
        if pending:
            size = obj.extension().pending_size
            for seg, addr in pending:
                self._release(seg, addr, size, discard, release)
            if obj.flags & READABLE:  # an upsert: the old value stays
                current = obj.replicas()
                leaves = any(not any(s is c for c, _ in current) for s, _ in pending)
                if leaves:  # the record leaves the pending segments: a new one
                    obj = self._rebind(obj)
                self._end_write(key, obj)
                if leaves:
                    self._enlist(obj)
                return
        size = obj.size
        for seg, addr in obj.replicas():
            self._release(seg, addr, size, discard, release)
        self._forget(key, obj, free=False)

    def _release(
        self, seg: SegmentRecord, addr: int, size: int, discard: bool, release: float
    ) -> None:
        if discard:
            self._discard(seg, addr, size, release)
        else:
            self._free(seg, addr, size)

    # --- upserts -----------------------------------------------------------------------

    def upsert_start(
        self, client_id: str, key: str, size: int, config: Any, now: float
    ) -> list[ReplicaDesc]:
        """Insert or replace (see :meth:`upsert_start_replicas`)."""
        obj = self.upsert_start_replicas(client_id, key, size, config, now)
        pending = obj.pending()
        if not pending:
            return obj.descs()
        return [ReplicaDesc.from_wire(w) for w in reps_wire(pending, size, 2)]

    def upsert_start_replicas(
        self, client_id: str, key: str, size: int, config: Any, now: float
    ) -> Obj:
        """Insert or replace.  The old value stays readable until :meth:`upsert_end`;
        the replicas to write are ``obj.pending()`` (or ``obj.replicas()`` when the
        key did not exist).

        Raises:
            StoreError(OBJECT_REPLICA_BUSY): another put/upsert of the key is in
                flight and younger than ``put_start_discard_timeout``.
        """
        pin_ttl = self._validate_put(key, size, config)
        obj = self.objects.get(key)
        if obj is not None and obj.flags & BUSY:
            ext = obj.extension()
            if now - ext.started_at < self.config.put_start_discard_timeout_s:
                raise _err(
                    ErrorCode.OBJECT_REPLICA_BUSY,
                    f"object {key!r} is being written by {client_tag(obj.writer)}",
                )
            self._abandon(key, obj, discard=True, now=now)
            obj = self.objects.get(key)
        if obj is None or not obj.flags & READABLE:
            return self.put_start_replicas(client_id, key, size, config, now)
        if obj.flags & TASK:
            raise _has_task(key)
        client = self._touch(client_id, now)
        pending = self._allocate_or_evict(size, config, client.host_id, key, now)
        current = obj.segments()
        ext = obj.extension()
        ext.pending = tuple(pending)
        ext.pending_size = size
        ext.started_at = now
        obj.writer = client.id
        obj.flags |= BUSY
        action = _policy_pin(config)
        ext.repin = action == _ENABLE
        if ext.repin:
            ext.soft_pin_ttl_s = pin_ttl
        elif action == _DISABLE:
            ext.soft_pin_ttl_s = None
            if obj.flags & SOFT_PIN:
                obj.flags &= ~SOFT_PIN
                self.soft_pinned -= 1
        if config.with_hard_pin:
            obj.flags |= HARD_PIN
        for seg, _ in pending:
            if not any(seg is c for c in current):
                seg.order.append(obj)
        self.inflight.pop(key, None)
        self.inflight[key] = obj
        client.inflight.add(key)
        if self.effects is not None:
            self.effects.append(
                WriteStarted(
                    key,
                    size,
                    tuple((seg.id, addr) for seg, addr in pending),
                    client.id,
                    bool(obj.flags & HARD_PIN),
                    True,
                    ext.soft_pin_ttl_s if ext.repin else None,
                )
            )
        self.metrics.observe_value_size(size)
        return obj

    def _finish_upsert(self, key: str, obj: Obj, now: float) -> None:
        ext = obj.extension()
        release = max(now, obj.lease_until)
        old = obj.replicas()
        new = ext.pending
        for seg, addr in old:
            self._discard(seg, addr, obj.size, release)
        leaves = any(not any(s is n for n, _ in new) for s, _ in old)
        if leaves:  # the record leaves old segments: a new one (see _records.py)
            obj = self._rebind(obj)
        obj.size = self._size(ext.pending_size)
        obj.set_replicas(new)
        obj.flags = (obj.flags | READABLE) & ~BUSY
        if ext.repin and ext.soft_pin_ttl_s is not None:
            self._apply_pin(obj, ext.soft_pin_ttl_s, now)
        self._end_write(key, obj)
        if leaves:
            self._enlist(obj)
        self._committed(key, obj)

    def _rebind(self, obj: Obj) -> Obj:
        """A new record for ``obj``'s object, which is about to leave a segment that
        stays mounted: the old record dies (its deque entries with it), the new one
        takes its place in the indexes; the caller changes its replicas, then
        :meth:`_enlist` s it.  (A record only ever gains segments, see ``_records.py``.)"""
        for seg in obj.segments():
            seg.dead += 1
        new = Obj(obj.key, obj.size, obj.seg, obj.addr, obj.writer, obj.flags)
        new.lease_until = obj.lease_until
        new.ext, obj.ext = obj.ext, None
        obj.flags = 0
        key = obj.key
        self.objects.replace(key, new)
        if key in self.inflight:
            self.inflight[key] = new
        return new

    @staticmethod
    def _enlist(obj: Obj) -> None:
        """Put a new record at the back of the clock of every segment it is in."""
        for seg in obj.segments():
            seg.order.append(obj)

    def _committed(self, key: str, obj: Obj) -> None:
        if self.effects is not None:
            self.effects.append(self._commit_effect(key, obj))

    @staticmethod
    def _commit_effect(key: str, obj: Obj) -> ObjectCommitted:
        reserved = reserved_size(obj.size)
        return ObjectCommitted(
            key,
            obj.size,
            tuple((seg.id, addr, reserved) for seg, addr in obj.replicas()),
            bool(obj.flags & HARD_PIN),
            obj.writer,
        )

    upsert_end = put_end
    upsert_revoke = put_revoke

    # ------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------

    def get_replica_list(self, key: str, now: float) -> GetReplicaListResult:
        """Readable replicas of ``key`` and a read lease.

        Raises:
            ObjectNotFound: absent.
            ReplicaNotReady: only unfinished replicas exist.
        """
        obj = self.read(key, self.lease_deadline(now))
        return GetReplicaListResult(
            tuple(obj.descs()), self.config.default_kv_lease_ttl_ms, obj.size
        )

    def lease_deadline(self, now: float) -> float:
        """When a read lease granted ``now`` ends: ``now + lease ttl`` rounded up to
        1/8192 s, the same float object for every read in that step (a lease costs
        an object nothing but a pointer).  Holding it up to 122 us longer is safe:
        readers count their lease from their own request.  A coarser step broke
        the reference's own test, which removes a key exactly one lease ttl after
        reading it (a 1/64 s step held the lease up to 16 ms too long)."""
        tick = math.ceil((now + self.config.lease_ttl_s) * _LEASE_STEPS)
        if tick != self._lease_tick:
            self._lease_tick = tick
            self._lease_until = tick / _LEASE_STEPS
        return self._lease_until

    def read(self, key: str, lease_until: float) -> Obj:
        """The readable object ``key``; its read lease is extended to ``lease_until``
        (``now + lease ttl``; one float shared by a whole batch).

        Raises:
            ObjectNotFound / ReplicaNotReady.
        """
        obj = self.objects.get(key)
        if obj is None:
            self.metrics.get_misses += 1
            raise _err(ErrorCode.OBJECT_NOT_FOUND, f"object {key!r} not found")
        flags = obj.flags
        if not flags & READABLE:
            self.metrics.get_misses += 1
            raise _err(ErrorCode.REPLICA_IS_NOT_READY, f"object {key!r} is still being written")
        if obj.lease_until < lease_until:
            obj.lease_until = lease_until
        elif self.offload.read_leases:  # perhaps pinned by the SSD tier: kept there
            self.offload.read_pinned(key, lease_until)
        obj.flags = flags | REF
        metrics = self.metrics
        metrics.get_hits += 1
        metrics.get_hit_bytes += obj.size
        return obj

    def exist_key(self, key: str, now: float) -> bool:
        return self.exists(key, self.lease_deadline(now))

    def exists(self, key: str, lease_until: float) -> bool:
        obj = self.objects.get(key)
        if obj is None or not obj.flags & READABLE:
            return False
        if obj.lease_until < lease_until:
            obj.lease_until = lease_until
        elif self.offload.read_leases:  # perhaps pinned by the SSD tier: kept there
            self.offload.read_pinned(key, lease_until)
        obj.flags |= REF
        return True

    def replicas_of(self, keys: Iterable[str], now: float) -> dict[str, list[ReplicaDesc]]:
        """Readable replicas of those ``keys`` that are readable (no lease granted:
        the *ByRegex listing, as the reference)."""
        out: dict[str, list[ReplicaDesc]] = {}
        get = self.objects.get
        for key in keys:
            obj = get(key)
            if obj is not None and obj.flags & READABLE:
                out[key] = obj.descs()
        return out

    def get_replica_list_by_regex(self, pattern: str, now: float) -> dict[str, list[ReplicaDesc]]:
        """Every readable key matching ``pattern`` (``re.search``) with its replicas.
        Walks the whole index: the service runs the same shard by shard, with the
        pattern evaluated off the loop (``_scan.py``)."""
        rx = self._regex(pattern)
        return self.replicas_of((k for k in self.objects if rx.search(k)), now)

    # ------------------------------------------------------------------------------
    # removal
    # ------------------------------------------------------------------------------

    def _check_removable(self, key: str, obj: Obj, force: bool, now: float) -> None:
        if obj.flags & TASK:
            raise _has_task(key)
        if obj.flags & BUSY:
            raise _err(
                ErrorCode.REPLICA_IS_NOT_READY, f"object {key!r} is being written; retry later"
            )
        if not force and obj.lease_until > now:
            raise _err(
                ErrorCode.OBJECT_HAS_LEASE,
                f"object {key!r} is leased to a reader for {obj.lease_until - now:.3f} s more "
                "(leases come from get/is_exist; use force=True to remove anyway)",
            )

    def remove(self, key: str, force: bool, now: float) -> None:
        obj = self.objects.get(key)
        if obj is None:
            raise _err(ErrorCode.OBJECT_NOT_FOUND, f"object {key!r} not found")
        self._check_removable(key, obj, force, now)
        self._delete(key, obj)

    def _delete(self, key: str, obj: Obj) -> int:
        """Drop a complete object and free its replicas; returns the bytes freed."""
        if self.effects is not None:
            self.effects.append(ObjectDeleted(key))
        seg = obj.seg
        if obj.ext is None and seg is not None and not obj.flags & _SLOW_FORGET:
            # the common object -- one replica, no write, pin or task to end -- without
            # the lists of the general path (an eviction round at 10M objects deletes
            # 500,000 of them between requests)
            self._free(seg, obj.addr, obj.size)
            seg.dead += 1  # its deque entry dies with it
            obj.flags = 0
            self.objects.pop(key)
            return reserved_size(obj.size)
        freed = 0
        reserved = reserved_size(obj.size)
        for seg, addr in obj.replicas():
            self._free(seg, addr, obj.size)
            freed += reserved
        self._forget(key, obj, free=False)
        return freed

    def _forget(self, key: str, obj: Obj, *, free: bool = True) -> None:
        """Take ``key`` out of every index (``free``: also its replicas' ranges)."""
        if free:
            for seg, addr in obj.replicas():
                self._free(seg, addr, obj.size)
        for seg in obj.segments():  # its deque entries die with it
            seg.dead += 1
        if obj.flags & BUSY:
            self._end_write(key, obj)
        if obj.flags & SOFT_PIN:
            self.soft_pinned -= 1
        if obj.flags & TASK:
            self.replication.object_gone(key, self._last_tick or 0.0)
        obj.flags = 0
        self.objects.pop(key)

    @staticmethod
    def _regex(pattern: str) -> re.Pattern[str]:
        try:
            return re.compile(pattern)
        except re.error as exc:
            raise _err(
                ErrorCode.INVALID_PARAMS, f"invalid regular expression {pattern!r}: {exc}"
            ) from exc

    def remove_by_regex(self, pattern: str, force: bool, now: float) -> int:
        rx = self._regex(pattern)
        return self.remove_keys([k for k in self.objects if rx.search(k)], force, now)

    def remove_all(self, force: bool, now: float) -> int:
        self.spill_slot_runs()
        return self.remove_keys(list(self.objects), force, now)

    def remove_keys(self, keys: Iterable[str], force: bool, now: float) -> int:
        """Remove those of ``keys`` that may be removed; returns how many were."""
        removed = 0
        get = self.objects.get
        for key in keys:
            obj = get(key)
            if obj is None or obj.flags & (BUSY | TASK) or (not force and obj.lease_until > now):
                continue
            self._delete(key, obj)
            self.offload.remove(key)
            removed += 1
        return removed

    def replica_clear(self, client_id: str, key: str, segment_name: str, now: float) -> bool:
        """Drop ``client_id``'s object ``key`` whose lease has expired: whole
        (``segment_name`` empty) or only its replicas in ``segment_name`` (the
        object goes when none is left).  Returns whether anything was cleared;
        missing, foreign, leased or busy keys are skipped."""
        obj = self.objects.get(key)
        if (
            obj is None
            or obj.writer != client_id
            or obj.lease_until > now
            or obj.flags & (BUSY | TASK)
            or not obj.flags & READABLE
        ):
            return False
        if not segment_name:
            self._delete(key, obj)
            return True
        reps = obj.replicas()
        keep = [r for r in reps if r[0].name != segment_name]
        if len(keep) == len(reps):
            return False
        if not keep:
            self._delete(key, obj)
            return True
        for seg, addr in reps:
            if seg.name == segment_name:
                self._free(seg, addr, obj.size)
        obj = self._rebind(obj)  # it leaves a segment: a new record
        obj.set_replicas(keep)
        self._enlist(obj)
        self._committed(key, obj)
        return True

    # ------------------------------------------------------------------------------
    # eviction and housekeeping
    # ------------------------------------------------------------------------------

    def _evict(
        self,
        seg: SegmentRecord,
        need_bytes: int,
        now: float,
        protect: str | None = None,
        allow_soft: bool = False,
    ) -> int:
        """Evict from ``seg`` until ``need_bytes`` are free in it; returns bytes freed."""
        self.metrics.eviction_rounds += 1
        self._evict_now = now
        freed, _ = evict_segment(seg, need_bytes, now, self._evict_one, protect, allow_soft)
        self.metrics.evicted_bytes += freed
        if freed:
            self.metrics.successful_evictions += 1
        return freed

    def _evict_one(self, obj: Obj, seg: SegmentRecord) -> int:
        """Evict ``obj``; returns the bytes it freed in ``seg``."""
        if self.offload.disks and self.offload.keep_on_evict(obj.key, obj, self._evict_now):
            # kept until it is on disk (offload_on_evict): back to the clock, live
            # (evict_segment counts an evicted record's entry as dead)
            seg.order.append(obj)
            seg.dead += 1
            return 0
        # (one replica, the common case, without building the list)
        in_seg = (
            int(obj.seg is seg)
            if obj.ext is None
            else sum(1 for s, _ in obj.replicas() if s is seg)
        )
        self._delete(obj.key, obj)
        self.metrics.evicted_keys += 1
        return in_seg * reserved_size(obj.size)

    def _owe(self, seg: SegmentRecord, nbytes: int) -> None:
        """Ask the background eviction to free ``nbytes`` in ``seg``."""
        if nbytes > seg.evict_debt:
            seg.evict_debt = nbytes
            self.debt_raised = True

    def evict_above_watermark(self, now: float, max_visits: int | None = None) -> int:
        """Bring every segment below ``high watermark - eviction ratio``; returns bytes
        freed.  ``max_visits`` bounds the work (the rest is owed to :meth:`housekeeping`)."""
        self._owe_watermark()
        return self._pay_debts(now, max_visits)[0]

    def _round_bytes(self, seg: SegmentRecord) -> int:
        """What one eviction round frees in ``seg``: ``eviction_ratio`` of it, and
        at least enough to bring it below ``high watermark - eviction ratio``.  A
        put that found the pool full owes the same as the tick's watermark check
        (which would ask for the rest within 100 ms): the room it leaves is where
        buffers reserved ahead go (``reserve_slots``), so the puts after it take
        one round trip each."""
        alloc = seg.allocator
        ratio = self.config.eviction_ratio
        if ratio <= 0:  # no rounds: a put evicts what it needs, nothing more
            return 0
        hw = self.config.eviction_high_watermark_ratio
        return max(
            int(ratio * alloc.capacity), alloc.allocated - int((hw - ratio) * alloc.capacity)
        )

    def _owe_watermark(self) -> None:
        hw = self.config.eviction_high_watermark_ratio
        if self.config.eviction_ratio <= 0:
            return
        for seg in self.segments.values():
            alloc = seg.allocator
            if alloc.allocated > hw * alloc.capacity:
                self._owe(seg, self._round_bytes(seg))

    def _pay_debts(self, now: float, max_visits: int | None) -> tuple[int, bool]:
        """Evict what segments owe (watermark, failed allocations), visiting at most
        ``max_visits`` records per segment; returns (bytes freed, whether debts remain)."""
        freed = 0
        more = False
        soft = self.config.allow_evict_soft_pinned_objects
        self._evict_now = now
        for seg in list(self.segments.values()):
            debt = seg.evict_debt
            if debt <= 0:
                continue
            self.metrics.eviction_rounds += 1
            got, stopped = evict_segment(seg, debt, now, self._evict_one, max_visits=max_visits)
            if not stopped and got < debt and soft:
                got2, stopped = evict_segment(
                    seg, debt - got, now, self._evict_one, allow_soft=True, max_visits=max_visits
                )
                got += got2
            self.metrics.evicted_bytes += got
            if got:
                self.metrics.successful_evictions += 1
            freed += got
            # a full pass that could not pay (leased, pinned, in flight) forgives the
            # rest: the next watermark check or failed allocation asks again
            seg.evict_debt = debt - got if stopped and got < debt else 0
            more = more or seg.evict_debt > 0
        return freed, more

    def housekeeping(self, now: float, max_visits: int | None = None) -> bool:
        """Background work a slice at a time: eviction owed by segments, and dead
        entries dropped from eviction deques that hold more dead than live ones.
        ``max_visits`` bounds the records visited per segment (None: everything).
        Returns whether work remains (the service calls again after serving)."""
        _, more = self._pay_debts(now, max_visits)
        for seg in self.segments.values():
            if seg.dead > max(_COMPACT_MIN_DEAD, seg.live_count):
                compact_segment(seg, len(seg.order) if max_visits is None else max_visits)
                more = more or seg.dead > max(_COMPACT_MIN_DEAD, seg.live_count)
        return more

    def tick(self, now: float, max_visits: int | None = None) -> bool:
        """Periodic work: expire clients, reclaim abandoned puts and discarded
        buffers, evict above the high watermark (the first slice of
        :meth:`housekeeping`, bounded by ``max_visits``).  Returns whether
        housekeeping work remains."""
        self.spill_slot_runs()  # (expiries, drains and tasks look at writes in progress)
        ttl = self.config.client_ttl_s
        if self._last_tick is not None and now - self._last_tick > ttl / 2:
            # The master itself stalled (paused, swapped, overloaded): pings may
            # be queued unread.  Do not mass-expire healthy clients; give all of
            # them a fresh ttl instead (the reference erases the whole cache here).
            for client in self.clients.values():
                client.last_seen = max(client.last_seen, now)
            self.stall_grace_count += 1
        self._last_tick = now
        for client_id in [c.id for c in self.clients.values() if now - c.last_seen > ttl]:
            self.expire_client(client_id, now)
        discards = self._discards
        while discards and discards[0][0] <= now:
            _, _, seg, addr, reserved = heapq.heappop(discards)
            self.metrics.released_buffers += 1
            self.metrics.discard_staging_bytes -= reserved
            if self.segments.get(seg.id) is seg:
                seg.allocator.free(addr, reserved)
        release = self.config.put_start_release_timeout_s
        while self.inflight:
            key, obj = next(iter(self.inflight.items()))
            ext = obj.ext
            if ext is not None and now - ext.started_at <= release:
                break
            self._abandon(key, obj, discard=False, now=now)
            self.metrics.reclaimed_puts += 1
        self.offload.tick(now)
        self._owe_watermark()
        self.tasks.expire(now)
        self.drains.step(now)
        return self.housekeeping(now, max_visits)

    # ------------------------------------------------------------------------------
    # durability: effects and replay
    # ------------------------------------------------------------------------------

    def keep_reply(self, client_id: str, rid: int, code: int, value: Any) -> None:
        """Keep the answer to a client's mutation with the state (journaled and
        shipped to standbys with the change it answers), for a mutation whose
        retry would otherwise be answered differently once it acted: a restarted
        master or a new leader answers the retry from it (``_replies.py``)."""
        kept = ReplyKept(client_id, rid, code, value)
        self.kept_replies.append(kept)
        self._emit(kept)

    def _emit(self, effect: Effect) -> None:
        if self.effects is not None:
            self.effects.append(effect)

    def drain_effects(self) -> list[Effect]:
        effects = self.effects
        if not effects:
            return []
        self.effects = []
        return effects

    def replay(self, effects: Iterable[Effect], now: float) -> None:
        """Rebuild segments and readable objects from effects (a journal).

        Restored clients count as seen ``now``: they have ``client_ttl`` to
        ping (and keep their segments and objects) before they expire.
        Leases, soft pins and unfinished puts are not restored.
        """
        for effect in effects:
            self.apply(effect, now)
        self.finish_replay()
        self.tasks.after_restart(now)

    def apply(self, effect: Effect, now: float) -> None:
        """Apply one effect (replay, or a standby following a leader).  Allocators
        are brought up to date by :meth:`finish_replay` (``_replay.py``)."""
        _replay.apply(self, effect, now)

    def finish_replay(self) -> None:
        """Rebuild the allocators that :meth:`apply` touched (``_replay.py``)."""
        _replay.finish_replay(self)

    def promote(self, now: float) -> None:
        """This state, built from a leader's effects, starts deciding (``_replay.py``)."""
        _replay.promote(self, now)

    def snapshot_effects(self) -> list[Effect]:
        """The current durable state as a minimal effect list (``_replay.py``)."""
        self.spill_slot_runs()
        return _replay.snapshot_effects(self)

    def segment_effects(self) -> list[Effect]:
        """Segments, tasks, drains and SSD tiers as effects (``_replay.py``)."""
        self.spill_slot_runs()
        return _replay.segment_effects(self)

    def shard_effects(self, shard: int, *, writes: bool = False) -> list[Effect]:
        """One index shard's objects as effects (``_replay.py``)."""
        self.spill_slot_runs()
        return _replay.shard_effects(self, shard, writes=writes)

    # ------------------------------------------------------------------------------
    # introspection
    # ------------------------------------------------------------------------------

    def _capacity(self) -> int:
        return sum(s.allocator.capacity for s in self.segments.values())

    def _used(self) -> int:
        return sum(s.allocator.allocated for s in self.segments.values())

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "capacity_bytes": self._capacity(),
            "allocated_bytes": self._used(),
            "key_count": self.key_count(),
            "segment_count": len(self.segments),
            "client_count": len(self.clients),
            "soft_pinned_keys": self.soft_pinned,
        }
        if self.config.enable_offload:
            out["ssd"] = self.offload.summary()
        return out

    def validate(self) -> None:
        """Assert every invariant and cross-check every index (``_validate.py``);
        tests call this after each scenario."""
        _validate.validate(self)
