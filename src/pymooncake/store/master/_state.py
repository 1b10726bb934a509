"""The master's state machine: segments, objects, replicas, leases, eviction, clients.

Theory of operation
-------------------
Pure: every method takes the current time ``now`` (seconds, monotonic) and
either returns a result or raises a :class:`StoreError` carrying the
reference's ``ErrorCode``.  No sockets, threads or clocks -- the asyncio
service (``_service.py``) feeds it requests and periodic :meth:`tick` calls.

* A **segment** is a client's registered memory range; the master only does
  offset arithmetic on it (one :class:`OffsetAllocator` each).
* A **put** is two-phase: ``put_start`` allocates one contiguous buffer per
  replica, each in a segment with a distinct name, status PROCESSING;
  ``put_end`` makes them COMPLETE (readable); ``put_revoke`` frees them.
  A key is immutable: ``put_start`` on a readable key is OBJECT_ALREADY_EXISTS
  (the client reports success without writing).
* An **upsert** writes new replicas while the old ones stay readable and swaps
  them atomically at ``upsert_end``; the old buffers are freed only after the
  read lease of the old value has expired, so a reader never sees torn data.
* A **read lease** (``default_kv_lease_ttl``) is granted by get/exist; a
  leased object cannot be removed (OBJECT_HAS_LEASE) nor evicted.
* **Eviction** drops least-recently-used readable objects without a lease
  (soft-pinned ones last, hard-pinned never): above the high watermark during
  :meth:`tick`, and synchronously when an allocation fails, so that
  NO_AVAILABLE_HANDLE means nothing evictable was left.
* **Clients** ping; one silent for ``client_ttl`` is expired: its segments are
  unmounted (their replicas disappear) and its unfinished puts revoked.  An
  unknown client's ping is answered NEED_REMOUNT (master restarted).
* Buffers of a preempted or abandoned put may still be written by a slow
  writer, so they go to a *discard* list and return to the allocator only
  after ``put_start_release_timeout``.
"""

from __future__ import annotations

import heapq
import math
import random
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ...errors import StoreError, store_error
from .._config import MasterConfig
from .._types import (
    ClientStatus,
    ErrorCode,
    ReplicaDesc,
    ReplicaStatus,
    ReplicateConfig,
    SegmentInfo,
    SoftPinAction,
)
from ._allocator import OffsetAllocator, align_up
from ._objects import ClientRecord, ObjectRecord, Replica, SegmentRecord

__all__ = ["GetReplicaListResult", "MasterState", "PingResult"]


def _err(code: ErrorCode, message: str) -> StoreError:
    return store_error(int(code), message)


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


@dataclass
class _Discard:
    segment_id: str
    addr: int
    release_at: float


@dataclass
class Metrics:
    requests: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    evicted_keys: int = 0
    evicted_bytes: int = 0
    eviction_rounds: int = 0
    expired_clients: int = 0
    replaced_clients: int = 0
    alloc_failures: int = 0
    discarded_puts: int = 0
    reclaimed_puts: int = 0
    get_hits: int = 0
    get_misses: int = 0


class MasterState:
    """All master decisions.  Not thread-safe: one owner (the service loop)."""

    def __init__(
        self, config: MasterConfig | None = None, *, rng: random.Random | None = None
    ) -> None:
        self.config = config or MasterConfig()
        self._rng = rng or random.Random()
        self.objects: dict[str, ObjectRecord] = {}
        self.segments: dict[str, SegmentRecord] = {}
        self.clients: dict[str, ClientRecord] = {}
        self._discards: list[_Discard] = []
        self._next_replica = 1
        self._live_cache: list[SegmentRecord] | None = None
        self.view_version = 1
        self.instance = uuid.uuid4().hex
        self.metrics = Metrics()
        #: durable changes since the last drain_events() (see _journal.py):
        #: ("mount", segment, client) / ("unmount", id) / ("commit", key, ...) / ("delete", key)
        self.events: list[list[Any]] | None = None
        self._last_tick: float | None = None
        self.stall_grace_count = 0

    # ------------------------------------------------------------------------------
    # clients and segments
    # ------------------------------------------------------------------------------

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
                    f"segment id {info.id} is already mounted by client {existing.client_id}",
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
        if self.events is not None:
            self.events.append(["mount", info.to_wire(), client_id])
        self._add_segment(info, client)

    def _add_segment(self, info: SegmentInfo, client: ClientRecord) -> None:
        self.segments[info.id] = SegmentRecord(
            info, client.id, OffsetAllocator(info.base, info.size)
        )
        self._live_cache = None
        client.segments.add(info.id)

    def _unindex(self, obj: ObjectRecord) -> None:
        """Take ``obj``'s replicas out of their segments' replica index."""
        for r in obj.replicas:
            seg = self.segments.get(r.segment_id)
            if seg is not None:
                seg.replicas.pop(r.id, None)

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
        seg = self.segments.get(segment_id)
        if seg is None or seg.client_id != client_id:
            raise _err(
                ErrorCode.SEGMENT_NOT_FOUND, f"client {client_id} has no segment {segment_id}"
            )
        self._touch(client_id, now)
        return self._drop_segment(seg)

    def _drop_segment(self, seg: SegmentRecord) -> int:
        self._live_cache = None
        if self.events is not None:
            self.events.append(["unmount", seg.id])
        del self.segments[seg.id]
        client = self.clients.get(seg.client_id)
        if client is not None:
            client.segments.discard(seg.id)
        self._discards = [d for d in self._discards if d.segment_id != seg.id]
        keys = set(seg.replicas.values())
        for key in keys:
            obj = self.objects.get(key)
            if obj is None:
                continue
            obj.replicas = [r for r in obj.replicas if r.segment_id != seg.id]
            obj.pending = [r for r in obj.pending if r.segment_id != seg.id]
            if not obj.replicas and not obj.pending:
                del self.objects[key]
        self.view_version += 1
        return len(keys)

    def expire_client(self, client_id: str, now: float) -> None:
        """Forget a client: unmount its segments, revoke its unfinished puts."""
        client = self.clients.pop(client_id, None)
        if client is None:
            return
        for seg_id in list(client.segments):
            seg = self.segments.get(seg_id)
            if seg is not None:
                self._drop_segment(seg)
        for key, obj in list(self.objects.items()):
            if obj.writer == client_id and obj.in_flight:
                self._abandon(key, obj, discard=True, now=now)
        self.metrics.expired_clients += 1

    # ------------------------------------------------------------------------------
    # allocation
    # ------------------------------------------------------------------------------

    def _live(self) -> list[SegmentRecord]:
        """Segments open for allocation (cached; the segment set rarely changes)."""
        live = self._live_cache
        if live is None:
            live = self._live_cache = [s for s in self.segments.values() if not s.draining]
        return live

    def _candidates(self, config: ReplicateConfig, writer_host: str) -> list[SegmentRecord]:
        strategy = self.config.allocation_strategy
        if not config.preferred_segments and not config.excluded_segments and strategy == "random":
            live = self._live()  # the common case: a random rotation of every segment
            if len(live) <= 1:
                return live
            start = self._rng.randrange(len(live))
            return live[start:] + live[:start]
        excluded = set(config.excluded_segments)
        live = [s for s in self._live() if s.name not in excluded]
        preferred: list[SegmentRecord] = []
        for name in config.preferred_segments:
            preferred += [s for s in live if s.name == name and s not in preferred]
        rest = [s for s in live if s not in preferred]
        if strategy == "free_ratio_first":
            rest.sort(key=lambda s: s.allocator.free_bytes / s.allocator.capacity, reverse=True)
        else:
            if rest:
                start = self._rng.randrange(len(rest))
                rest = rest[start:] + rest[:start]
            if strategy == "local_first" and writer_host:
                rest.sort(key=lambda s: s.info.host_id != writer_host)
        return preferred + rest

    def _allocate(
        self, size: int, config: ReplicateConfig, writer_host: str, key: str
    ) -> list[Replica]:
        if (
            config.replica_num == 1
            and not config.preferred_segments
            and not config.excluded_segments
            and self.config.allocation_strategy == "random"
        ):
            return self._allocate_one(size, key)
        replicas: list[Replica] = []
        used_names: set[str] = set()
        for seg in self._candidates(config, writer_host):
            if len(replicas) >= config.replica_num:
                break
            if seg.name in used_names:
                continue
            got = seg.allocator.allocate(size)
            if got is None:
                continue
            addr, reserved = got
            rid = self._next_replica
            self._next_replica += 1
            replicas.append(Replica(rid, seg.id, seg.name, addr, size, reserved))
            seg.replicas[rid] = key
            used_names.add(seg.name)
        return replicas

    def _allocate_one(self, size: int, key: str) -> list[Replica]:
        """The common placement (one replica, random start, no preferences),
        without building a candidate list: this runs once per key of every put."""
        live = self._live()
        n = len(live)
        start = int(self._rng.random() * n) if n > 1 else 0
        for i in range(n):
            seg = live[(start + i) % n]
            got = seg.allocator.allocate(size)
            if got is not None:
                rid = self._next_replica
                self._next_replica = rid + 1
                info = seg.info
                seg.replicas[rid] = key
                return [Replica(rid, info.id, info.name, got[0], size, got[1])]
        return []

    def _allocate_or_evict(
        self, size: int, config: ReplicateConfig, writer_host: str, key: str, now: float
    ) -> list[Replica]:
        replicas = self._allocate(size, config, writer_host, key)
        if not replicas:
            self.metrics.alloc_failures += 1
            # Evict only from segments the object could fit in at all: an object
            # larger than every segment must not wipe the cache before failing.
            need = align_up(size)
            excluded = set(config.excluded_segments)
            fits = {
                s.id
                for s in self.segments.values()
                if not s.draining and s.name not in excluded and s.allocator.capacity >= need
            }
            chunk = max(size, int(self._capacity() * self.config.eviction_ratio))
            # free room synchronously, round by round, while something can be evicted
            while fits and self._evict(now, need_bytes=chunk, protect=key, segments=fits):
                replicas = self._allocate(size, config, writer_host, key)
                if replicas:
                    break
        if not replicas:
            total = len(self.segments)
            largest = max((s.allocator.largest_free for s in self.segments.values()), default=0)
            raise _err(
                ErrorCode.NO_AVAILABLE_HANDLE,
                f"no segment can hold {size} bytes for {key!r} ({total} segment(s), largest free "
                f"range {largest} bytes, nothing left to evict: objects are leased, pinned or "
                "being written); add memory (global_segment_size) or remove objects",
            )
        return replicas

    def _free_replica(self, rep: Replica) -> None:
        seg = self.segments.get(rep.segment_id)
        if seg is not None:
            seg.replicas.pop(rep.id, None)
            seg.allocator.free(rep.addr)

    def _discard_replica(self, rep: Replica, release_at: float) -> None:
        """Keep a replica's range reserved until ``release_at`` (a writer or reader may
        still be using it), then free it in :meth:`tick`."""
        seg = self.segments.get(rep.segment_id)
        if seg is not None:
            seg.replicas.pop(rep.id, None)
            self._discards.append(_Discard(rep.segment_id, rep.addr, release_at))

    # ------------------------------------------------------------------------------
    # puts
    # ------------------------------------------------------------------------------

    def _validate_put(self, key: str, size: int, config: ReplicateConfig) -> float | None:
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
        action = config.pin_action
        if config.soft_pin_ttl_ms is not None and action is not SoftPinAction.ENABLE:
            raise _err(
                ErrorCode.INVALID_PARAMS,
                f"soft_pin_ttl_ms is only valid with soft_pin_action ENABLE (got {action.name}) "
                f"for {key!r}",
            )
        if action is SoftPinAction.ENABLE:
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
        self, client_id: str, key: str, size: int, config: ReplicateConfig, now: float
    ) -> list[ReplicaDesc]:
        """Allocate replicas for a new object.

        Raises:
            ObjectExists: the key is readable, or another put of it started
                less than ``put_start_discard_timeout`` ago.
            NoAvailableHandle: no room even after eviction.
            InvalidParams: empty key, size <= 0, replica_num < 1, soft pin too long.
        """
        return [r.desc() for r in self.put_start_replicas(client_id, key, size, config, now)]

    def put_start_replicas(
        self, client_id: str, key: str, size: int, config: ReplicateConfig, now: float
    ) -> list[Replica]:
        """:meth:`put_start`, returning the master's replica records (the RPC
        handlers turn them into wire form without an intermediate ReplicaDesc)."""
        pin_ttl = self._validate_put(key, size, config)
        client = self._touch(client_id, now)
        obj = self.objects.get(key)
        if obj is not None:
            if obj.readable:
                raise _err(ErrorCode.OBJECT_ALREADY_EXISTS, f"object {key!r} already exists")
            if now - obj.started_at < self.config.put_start_discard_timeout_s:
                raise _err(
                    ErrorCode.OBJECT_ALREADY_EXISTS,
                    f"object {key!r} is being written by client {obj.writer}",
                )
            # the earlier writer is presumed dead: its buffers go to the discard list
            self._abandon(key, obj, discard=True, now=now)
            self.metrics.discarded_puts += 1
        replicas = self._allocate_or_evict(size, config, client.host_id, key, now)
        self.objects[key] = ObjectRecord(
            key=key,
            size=size,
            writer=client_id,
            started_at=now,
            replicas=replicas,
            soft_pin_ttl_s=pin_ttl,
            hard_pinned=config.with_hard_pin,
        )
        return replicas

    def _writer_object(self, client_id: str, key: str) -> ObjectRecord:
        obj = self.objects.get(key)
        if obj is None or not obj.in_flight:
            raise _err(
                ErrorCode.OBJECT_NOT_FOUND,
                f"no put of {key!r} is in progress (it timed out, was revoked, or its segment "
                "went away)",
            )
        if obj.writer != client_id:
            raise _err(
                ErrorCode.ILLEGAL_CLIENT,
                f"client {client_id} did not start the put of {key!r} (client {obj.writer} did)",
            )
        return obj

    def put_end(self, client_id: str, key: str, now: float) -> None:
        """Make the replicas of a put readable.  Repeating it is harmless."""
        done = self.objects.get(key)
        if done is not None and not done.in_flight and done.writer == client_id:
            return
        obj = self._writer_object(client_id, key)
        if obj.pending:
            self._finish_upsert(obj, now)
            return
        if not obj.replicas:
            del self.objects[key]
            raise _err(
                ErrorCode.OBJECT_NOT_FOUND, f"every replica of {key!r} was lost during the put"
            )
        for r in obj.replicas:
            r.status = ReplicaStatus.COMPLETE
        obj.last_access = now
        if obj.soft_pin_ttl_s is not None:
            obj.soft_pin_until = now + obj.soft_pin_ttl_s
        self._touch(client_id, now)
        self._committed(obj)

    def put_revoke(self, client_id: str, key: str, now: float) -> None:
        """Abort a put: its buffers are freed (the writer says it stopped writing)."""
        obj = self._writer_object(client_id, key)
        self._abandon(key, obj, discard=False, now=now)
        self._touch(client_id, now)

    def _abandon(self, key: str, obj: ObjectRecord, *, discard: bool, now: float) -> None:
        release = now + self.config.put_start_release_timeout_s
        if obj.pending:
            for r in obj.pending:
                self._discard_replica(r, release) if discard else self._free_replica(r)
            obj.pending = []
            obj.pending_size = 0
            if obj.replicas:
                return
        for r in obj.replicas:
            self._discard_replica(r, release) if discard else self._free_replica(r)
        self.objects.pop(key, None)

    # --- upserts -----------------------------------------------------------------------

    def upsert_start(
        self, client_id: str, key: str, size: int, config: ReplicateConfig, now: float
    ) -> list[ReplicaDesc]:
        """Insert or replace.  The old value stays readable until :meth:`upsert_end`.

        Raises:
            StoreError(OBJECT_REPLICA_BUSY): another put/upsert of the key is in
                flight and younger than ``put_start_discard_timeout``.
        """
        return [r.desc() for r in self.upsert_start_replicas(client_id, key, size, config, now)]

    def upsert_start_replicas(
        self, client_id: str, key: str, size: int, config: ReplicateConfig, now: float
    ) -> list[Replica]:
        """:meth:`upsert_start`, returning replica records."""
        pin_ttl = self._validate_put(key, size, config)
        obj = self.objects.get(key)
        if obj is None or not obj.readable:
            if obj is not None and now - obj.started_at < self.config.put_start_discard_timeout_s:
                raise _err(ErrorCode.OBJECT_REPLICA_BUSY, f"object {key!r} is being written")
            return self.put_start_replicas(client_id, key, size, config, now)
        if obj.pending:
            if now - obj.started_at < self.config.put_start_discard_timeout_s:
                raise _err(ErrorCode.OBJECT_REPLICA_BUSY, f"object {key!r} is being rewritten")
            self._abandon(key, obj, discard=True, now=now)
        client = self._touch(client_id, now)
        obj.pending = self._allocate_or_evict(size, config, client.host_id, key, now)
        obj.pending_size = size
        obj.writer = client_id
        obj.started_at = now
        obj.repin = config.pin_action is SoftPinAction.ENABLE
        if obj.repin:
            obj.soft_pin_ttl_s = pin_ttl
        elif config.pin_action is SoftPinAction.DISABLE:
            obj.soft_pin_ttl_s = None
            obj.soft_pin_until = None
        obj.hard_pinned = obj.hard_pinned or config.with_hard_pin
        return obj.pending

    def _finish_upsert(self, obj: ObjectRecord, now: float) -> None:
        release = max(now, obj.lease_until)
        for r in obj.replicas:
            self._discard_replica(r, release)
        for r in obj.pending:
            r.status = ReplicaStatus.COMPLETE
        obj.replicas, obj.pending = obj.pending, []
        obj.size, obj.pending_size = obj.pending_size, 0
        obj.last_access = now
        if obj.repin and obj.soft_pin_ttl_s is not None:
            obj.soft_pin_until = now + obj.soft_pin_ttl_s
        self._committed(obj)

    @staticmethod
    def _commit_event(obj: ObjectRecord) -> list[Any]:
        """The journal record of a completed object (replayed by :meth:`replay`)."""
        return [
            "commit",
            obj.key,
            obj.size,
            [[r.id, r.segment_id, r.addr, r.size, r.reserved] for r in obj.replicas],
            obj.hard_pinned,
        ]

    def _committed(self, obj: ObjectRecord) -> None:
        if self.events is not None:
            self.events.append(self._commit_event(obj))

    upsert_end = put_end
    upsert_revoke = put_revoke

    # ------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------

    def _grant_lease(self, obj: ObjectRecord, now: float) -> None:
        obj.lease_until = max(obj.lease_until, now + self.config.lease_ttl_s)
        obj.last_access = now

    def get_replica_list(self, key: str, now: float) -> GetReplicaListResult:
        """Readable replicas of ``key`` and a read lease.

        Raises:
            ObjectNotFound: absent.
            ReplicaNotReady: only unfinished replicas exist.
        """
        obj, complete = self.replicas_for_read(key, now)
        return GetReplicaListResult(
            tuple(r.desc() for r in complete), self.config.default_kv_lease_ttl_ms, obj.size
        )

    def replicas_for_read(self, key: str, now: float) -> tuple[ObjectRecord, list[Replica]]:
        """:meth:`get_replica_list` as records: the object and its complete replicas
        (a read lease is granted)."""
        obj = self.objects.get(key)
        if obj is None:
            self.metrics.get_misses += 1
            raise _err(ErrorCode.OBJECT_NOT_FOUND, f"object {key!r} not found")
        complete = [r for r in obj.replicas if r.status is ReplicaStatus.COMPLETE]
        if not complete:
            self.metrics.get_misses += 1
            raise _err(ErrorCode.REPLICA_IS_NOT_READY, f"object {key!r} is still being written")
        self._grant_lease(obj, now)
        self.metrics.get_hits += 1
        return obj, complete

    def exist_key(self, key: str, now: float) -> bool:
        obj = self.objects.get(key)
        if obj is None or not obj.readable:
            return False
        self._grant_lease(obj, now)
        return True

    def get_replica_list_by_regex(self, pattern: str, now: float) -> dict[str, list[ReplicaDesc]]:
        rx = self._regex(pattern)
        out = {}
        for key, obj in self.objects.items():
            if rx.search(key) and obj.readable:
                out[key] = [r.desc() for r in obj.replicas if r.status is ReplicaStatus.COMPLETE]
        return out

    # ------------------------------------------------------------------------------
    # removal
    # ------------------------------------------------------------------------------

    def _check_removable(self, key: str, obj: ObjectRecord, force: bool, now: float) -> None:
        if obj.in_flight:
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

    def _delete(self, key: str, obj: ObjectRecord) -> None:
        if self.events is not None:
            self.events.append(["delete", key])
        for r in obj.replicas:
            self._free_replica(r)
        del self.objects[key]

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
        return self._remove_matching(lambda k: rx.search(k) is not None, force, now)

    def remove_all(self, force: bool, now: float) -> int:
        return self._remove_matching(lambda k: True, force, now)

    def _remove_matching(self, match: Callable[[str], bool], force: bool, now: float) -> int:
        removed = 0
        for key, obj in list(self.objects.items()):
            if not match(key):
                continue
            try:
                self._check_removable(key, obj, force, now)
            except StoreError:
                continue
            self._delete(key, obj)
            removed += 1
        return removed

    # ------------------------------------------------------------------------------
    # housekeeping
    # ------------------------------------------------------------------------------

    def _capacity(self) -> int:
        return sum(s.allocator.capacity for s in self.segments.values())

    def _used(self) -> int:
        return sum(s.allocator.allocated for s in self.segments.values())

    def _evictable(
        self, now: float, protect: str | None, segments: set[str] | None = None
    ) -> list[tuple[int, float, str]]:
        """(tier, last access, key) of objects eviction may drop (only those with a
        replica in ``segments``, when given)."""
        out = []
        for key, obj in self.objects.items():
            if key == protect or obj.hard_pinned or obj.in_flight or obj.lease_until > now:
                continue
            if not obj.replicas:
                continue
            if segments is not None and not any(r.segment_id in segments for r in obj.replicas):
                continue
            pinned = obj.soft_pin_until is not None and obj.soft_pin_until > now
            if pinned and not self.config.allow_evict_soft_pinned_objects:
                continue
            out.append((1 if pinned else 0, obj.last_access, key))
        return out

    def _evict(
        self,
        now: float,
        need_bytes: int,
        protect: str | None = None,
        segments: set[str] | None = None,
    ) -> int:
        """Drop LRU objects until ``need_bytes`` are freed; returns bytes freed."""
        candidates = self._evictable(now, protect, segments)
        if not candidates:
            return 0
        heapq.heapify(candidates)
        freed = 0
        self.metrics.eviction_rounds += 1
        while candidates and freed < need_bytes:
            _, _, key = heapq.heappop(candidates)
            obj = self.objects[key]
            freed += sum(r.reserved for r in obj.replicas)
            self._delete(key, obj)
            self.metrics.evicted_keys += 1
        self.metrics.evicted_bytes += freed
        return freed

    def tick(self, now: float) -> None:
        """Periodic work: expire clients, reclaim abandoned puts and discarded
        buffers, evict above the high watermark."""
        ttl = self.config.client_ttl_s
        if self._last_tick is not None and now - self._last_tick > ttl / 2:
            # The master itself stalled (paused, swapped, overloaded): pings may
            # be queued unread.  Do not mass-expire healthy clients; give all of
            # them a fresh ttl instead (the reference erases the whole cache here).
            for client in self.clients.values():
                client.last_seen = max(client.last_seen, now)
            self.stall_grace_count += 1
        self._last_tick = now
        for client_id, client in list(self.clients.items()):
            if now - client.last_seen > ttl:
                self.expire_client(client_id, now)
        if self._discards:
            keep = []
            for d in self._discards:
                if d.release_at <= now:
                    seg = self.segments.get(d.segment_id)
                    if seg is not None:
                        seg.allocator.free(d.addr)
                else:
                    keep.append(d)
            self._discards = keep
        release = self.config.put_start_release_timeout_s
        for key, obj in list(self.objects.items()):
            if obj.in_flight and now - obj.started_at > release:
                self._abandon(key, obj, discard=False, now=now)
                self.metrics.reclaimed_puts += 1
        capacity = self._capacity()
        if capacity and self.config.eviction_ratio > 0:
            used = self._used()
            hw = self.config.eviction_high_watermark_ratio
            if used > hw * capacity:
                target = max(
                    self.config.eviction_ratio * capacity,
                    used - (hw - self.config.eviction_ratio) * capacity,
                )
                self._evict(now, math.ceil(target))

    # ------------------------------------------------------------------------------
    # durability: replaying a journal
    # ------------------------------------------------------------------------------

    def drain_events(self) -> list[list[Any]]:
        events = self.events or []
        if self.events is not None:
            self.events = []
        return events

    def replay(self, events: Iterable[list[Any]], now: float) -> None:
        """Rebuild segments and readable objects from journal events.

        Restored clients count as seen ``now``: they have ``client_ttl`` to
        ping (and keep their segments and objects) before they expire.
        Leases, soft pins and unfinished puts are not restored.
        """
        recording, self.events = self.events, None
        try:
            for ev in events:
                kind = ev[0]
                if kind == "mount":
                    info = SegmentInfo.from_wire(ev[1])
                    if info.id not in self.segments:
                        self._add_segment(info, self._touch(ev[2], now))
                elif kind == "unmount":
                    seg = self.segments.get(ev[1])
                    if seg is not None:
                        self._drop_segment(seg)
                elif kind == "commit":
                    _, key, size, reps, hard = ev
                    old = self.objects.pop(key, None)
                    if old is not None:
                        self._unindex(old)
                    replicas = []
                    for rid, seg_id, addr, rsize, reserved in reps:
                        seg = self.segments.get(seg_id)
                        if seg is None:
                            continue
                        replicas.append(
                            Replica(
                                rid, seg_id, seg.name, addr, rsize, reserved, ReplicaStatus.COMPLETE
                            )
                        )
                        seg.replicas[rid] = key
                        self._next_replica = max(self._next_replica, rid + 1)
                    if replicas:
                        self.objects[key] = ObjectRecord(
                            key, size, "", now, replicas, last_access=now, hard_pinned=bool(hard)
                        )
                elif kind == "delete":
                    obj = self.objects.pop(ev[1], None)
                    if obj is not None:
                        self._unindex(obj)
            # allocators: exactly the ranges of the restored replicas
            live: dict[str, list[tuple[int, int]]] = {sid: [] for sid in self.segments}
            for obj in self.objects.values():
                for r in obj.replicas:
                    live[r.segment_id].append((r.addr, r.reserved))
            for sid, seg in self.segments.items():
                seg.allocator.rebuild(live[sid])
        finally:
            self.events = recording

    def snapshot_events(self) -> list[list[Any]]:
        """The current durable state as a minimal event list (for compaction)."""
        out: list[list[Any]] = []
        for seg in self.segments.values():
            out.append(["mount", seg.info.to_wire(), seg.client_id])
        out += [self._commit_event(obj) for obj in self.objects.values() if obj.readable]
        return out

    # ------------------------------------------------------------------------------
    # introspection
    # ------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        capacity = self._capacity()
        used = self._used()
        return {
            "capacity_bytes": capacity,
            "allocated_bytes": used,
            "key_count": len(self.objects),
            "segment_count": len(self.segments),
            "client_count": len(self.clients),
            "soft_pinned_keys": sum(
                1 for o in self.objects.values() if o.soft_pin_until is not None
            ),
        }

    def validate(self) -> None:
        """Assert every invariant; tests call this after each scenario."""
        for record in self.segments.values():
            record.allocator.validate()
        reserved: dict[str, int] = {sid: 0 for sid in self.segments}
        for key, obj in self.objects.items():
            assert obj.replicas or obj.pending, f"{key} has no replicas"
            names = [r.endpoint for r in obj.replicas]
            assert len(names) == len(set(names)), f"{key}: two replicas in one segment"
            for r in obj.replicas + obj.pending:
                owner = self.segments.get(r.segment_id)
                assert owner is not None, f"{key}: replica in unknown segment {r.segment_id}"
                assert owner.replicas.get(r.id) == key
                reserved[r.segment_id] += r.reserved
        for d in self._discards:
            seg = self.segments[d.segment_id]
            reserved[d.segment_id] += seg.allocator._live[d.addr]
        for sid, seg in self.segments.items():
            assert seg.allocator.allocated == reserved[sid], (
                f"segment {sid}: allocator and replicas disagree"
            )
            assert seg.client_id in self.clients, f"segment {sid} of unknown client"
