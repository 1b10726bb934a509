"""The master's side of the SSD tier: LOCAL_DISK replicas, offload and promotion work.

Theory of operation
-------------------
A client with an SSD tier mounts it (``MountLocalDiskSegment``: the endpoint
that serves reads of its files).  The master keeps, apart from the memory
objects of :class:`MasterState`, one LOCAL_DISK replica per key at most
(``replicas``: key -> owner and size).  A key is readable while it has a memory
replica *or* a disk replica; eviction drops only memory replicas, a removal
drops both.

Work reaches the clients on their heartbeat (``OffloadObjectHeartbeat``), as in
the reference, never by a call from the master:

* **offload**: the key's memory replica in one of the client's own segments is
  written to its disk.  Keys are queued for the owner of their first replica at
  every put end (eager), or -- with ``offload_on_evict`` -- only when eviction
  picks them: the object is then kept (pinned by a read lease) instead of being
  dropped, and evictable again once it is on disk.  A handed-out object stays
  pinned until ``NotifyOffloadSuccess`` (or ``offload_task_timeout_s``), so the
  bytes the client copies cannot be reused under it.  A report for a key without
  a task of that client is refused (the value may have changed since), except a
  re-registration (``register``) of files found after a restart, which is
  accepted for keys that have no value in memory.
* **promotion** (``promotion_on_hit``): reads of disk-only keys are counted in a
  count-min sketch; at ``promotion_admission_threshold`` the key is queued for
  its owner, which allocates memory (``PromotionAllocStart``), writes the value
  from its disk and ends with an ordinary PutEnd: the key then has both replicas.
* **drop**: files whose replica the master dropped (removed, replaced) are
  listed for deletion.

Durable changes (disk mounted / unmounted, replica added / removed) are typed
effects (``_effects.py``), journaled and shipped to standbys like the others;
queues, tasks and counts are not: after a failover clients re-report.

:func:`wrap_handlers` adds the disk replicas to the RPC handlers of
``_handlers.py`` (reads fall back to disk, exists/remove/put see both tiers).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ...errors import StoreError, store_error
from ...wire import _master_msgs as msg
from ...wire import _master_reply_msgs as rp
from ...wire import _offload_msgs as omsg
from ...wire._master_replies import ReplicaColumns
from .._file_storage import object_path
from .._types import DISK_SEGMENT, LOCAL_DISK_SEGMENT, ErrorCode, ReplicateConfig
from ._effects import (
    DiskReplicaAdded,
    DiskReplicaRemoved,
    LocalDiskMounted,
    LocalDiskUnmounted,
)
from ._records import BUSY, READABLE, REF, Obj, reps_wire

if TYPE_CHECKING:
    from ._state import MasterState

__all__ = [
    "FS_OWNER",
    "OFFLOAD_APPLY",
    "CountMinSketch",
    "OffloadState",
    "unlink_files",
    "wrap_handlers",
]

log = logging.getLogger("pymooncake.master")

_COMPLETE: Final = 3  # ReplicaStatus.COMPLETE on the wire
_PROCESSING: Final = 2
#: replica ids of disk replicas: a high tag above the (segment number << 40) of memory ones
_DISK_ID: Final = 0xFFFFFF << 40
#: bytes one heartbeat hands out at most (bounds the client's read-and-write burst)
_MAX_HEARTBEAT_BYTES: Final = 256 << 20
#: the owner of DISK replicas on the shared filesystem (--root_fs_dir): nobody
FS_OWNER: Final = ""


def _err(code: ErrorCode, message: str) -> StoreError:
    return store_error(int(code), message)


class CountMinSketch:
    """Approximate read counts in fixed memory (4 rows x ``width`` counters);
    counters halve when one saturates ``limit`` (old hits fade)."""

    def __init__(self, width: int = 1 << 16, limit: int = 255) -> None:
        self.width = width
        self.limit = limit
        self.rows = [bytearray(width) for _ in range(4)]

    def add(self, key: str) -> int:
        """Count one read of ``key``; returns its estimated count."""
        h = zlib.crc32(key.encode("utf-8", "surrogatepass"))
        w = self.width
        slots = [(h >> (8 * i) ^ h * (2 * i + 1)) % w for i in range(4)]
        rows = self.rows
        est = min(rows[i][s] for i, s in enumerate(slots))
        if est + 1 >= self.limit:
            for row in rows:
                for j in range(w):
                    row[j] >>= 1
            est = min(rows[i][s] for i, s in enumerate(slots))
        for i, s in enumerate(slots):  # conservative update
            if rows[i][s] <= est:
                rows[i][s] = est + 1
        return est + 1

    def forget(self, key: str) -> None:
        """Lower ``key``'s counters (it was promoted: count afresh next time)."""
        h = zlib.crc32(key.encode("utf-8", "surrogatepass"))
        for i in range(4):
            s = (h >> (8 * i) ^ h * (2 * i + 1)) % self.width
            self.rows[i][s] = 0


class LocalDisk:
    __slots__ = ("capacity_bytes", "client_id", "endpoint", "offloading", "used_bytes")

    def __init__(self, client_id: str, endpoint: str, capacity_bytes: int) -> None:
        self.client_id = client_id
        self.endpoint = endpoint
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.offloading = True


class DiskRep:
    __slots__ = ("client_id", "size")

    def __init__(self, client_id: str, size: int) -> None:
        self.client_id = client_id
        self.size = size


@dataclass
class _Task:
    client_id: str
    deadline: float


@dataclass
class OffloadMetrics:
    offload_queued: int = 0
    offload_handed_out: int = 0
    offloaded: int = 0
    offload_refused: int = 0
    offload_timeouts: int = 0
    offload_queue_full: int = 0
    registered: int = 0
    disk_evicted: int = 0
    disk_reads: int = 0
    promotion_queued: int = 0
    promotion_started: int = 0
    promotion_queue_full: int = 0


class OffloadState:
    """LOCAL_DISK replicas and the SSD work queues of one :class:`MasterState`."""

    def __init__(self, st: MasterState) -> None:
        self.st = st
        self.config = st.config
        self.disks: dict[str, LocalDisk] = {}
        self.replicas: dict[str, DiskRep] = {}
        self.by_client: dict[str, set[str]] = {}
        #: client -> keys to offload, in queue order
        self.queues: dict[str, dict[str, None]] = {}
        self.queued = 0
        #: keys kept in memory because eviction picked them (offload_on_evict)
        self.evict_after: set[str] = set()
        #: keys the tier pins in memory (an offload task, or kept for offload by
        #: eviction) -> the read lease they would hold without the pin: the one
        #: from before it, raised by every read made during it (:meth:`read_pinned`),
        #: and theirs again when the pin ends (:meth:`_unpin`)
        self.read_leases: dict[str, float] = {}
        self.tasks: dict[str, _Task] = {}
        self.promote_queues: dict[str, dict[str, None]] = {}
        self.promote_queued = 0
        self.promoting: dict[str, _Task] = {}
        self.drops: dict[str, list[str]] = {}
        self.sketch = CountMinSketch()
        self.metrics = OffloadMetrics()
        #: DISK replicas on the shared filesystem, oldest first, and their bytes
        self.fs_order: dict[str, None] = {}
        self.fs_used = 0
        #: files of dropped DISK replicas, deleted by the service (I/O)
        self.fs_drops: list[str] = []

    @property
    def fsdir(self) -> str:
        """Where DISK replicas live (``<root_fs_dir>/<cluster_id>``), or ""."""
        root = self.config.root_fs_dir
        return os.path.join(root, self.config.cluster_id) if root else ""

    def storage_config(self) -> dict[str, Any]:
        return {
            "fsdir": self.fsdir,
            "enable_disk_eviction": self.config.enable_disk_eviction,
            "quota_bytes": self.config.quota_bytes,
        }

    def take_fs_drops(self) -> list[str]:
        out, self.fs_drops = self.fs_drops, []
        return out

    @property
    def enabled(self) -> bool:
        return self.config.enable_offload

    # ------------------------------------------------------------------------------
    # local disks
    # ------------------------------------------------------------------------------

    def mount(
        self, client_id: str, endpoint: str, capacity: int, offloading: bool, now: float
    ) -> None:
        """Offer ``client_id``'s SSD tier (idempotent; a new endpoint replaces the old).

        Raises:
            StoreError(UNAVAILABLE_IN_CURRENT_MODE): the master runs without
                ``--enable_offload``.
        """
        if not self.enabled:
            raise _err(
                ErrorCode.UNAVAILABLE_IN_CURRENT_MODE,
                "this master runs without SSD offload; start mooncake_master with "
                "--enable_offload=true to use clients' SSD tiers",
            )
        if client_id not in self.st.clients and not self.st._replaying:
            # unknown (a restarted master, or it expired us): the client's ping must
            # remount its segments first, or its memory would never come back
            raise _err(
                ErrorCode.CLIENT_NOT_FOUND,
                "this master does not know the client; its heartbeat remounts its segments, "
                "then the SSD tier is mounted again",
            )
        self.st._touch(client_id, now)
        disk = self.disks.get(client_id)
        if disk is None or disk.endpoint != endpoint or disk.capacity_bytes != capacity:
            self.st._emit(LocalDiskMounted(client_id, endpoint, capacity))
            old = disk
            disk = self.disks[client_id] = LocalDisk(client_id, endpoint, capacity)
            if old is not None:
                disk.used_bytes = old.used_bytes
        disk.offloading = offloading

    def unmount(self, client_id: str) -> int:
        """Drop ``client_id``'s SSD tier and its replicas; returns how many went."""
        if self.disks.pop(client_id, None) is None:
            return 0
        self.st._emit(LocalDiskUnmounted(client_id))
        keys = self.by_client.pop(client_id, set())
        for key in keys:
            self.replicas.pop(key, None)
        for key in [k for k, t in self.tasks.items() if t.client_id == client_id]:
            self._end_task(key)
        queue = self.queues.pop(client_id, {})
        self.queued -= len(queue)
        for key in queue:  # kept for an offload that will not come: eviction may take them
            if key in self.evict_after:
                self.evict_after.discard(key)
                self._unpin(key)
        self.promote_queued -= len(self.promote_queues.pop(client_id, {}))
        for key in [k for k, t in self.promoting.items() if t.client_id == client_id]:
            del self.promoting[key]
        self.drops.pop(client_id, None)
        return len(keys)

    client_gone = unmount

    # ------------------------------------------------------------------------------
    # replicas
    # ------------------------------------------------------------------------------

    def _add(self, key: str, client_id: str, size: int) -> None:
        old = self.replicas.get(key)
        if old is not None:
            self._unindex(key, old)
        self.st._emit(DiskReplicaAdded(key, client_id, size))
        self.replicas[key] = DiskRep(client_id, self.st._size(size))
        self.by_client.setdefault(client_id, set()).add(key)
        if client_id == FS_OWNER:
            self.fs_order[key] = None
            self.fs_used += size
            self._fs_quota()

    def _unindex(self, key: str, rep: DiskRep) -> None:
        self.by_client.get(rep.client_id, set()).discard(key)
        if rep.client_id == FS_OWNER and self.fs_order.pop(key, 0) is None:
            self.fs_used -= rep.size

    def _fs_quota(self) -> None:
        """Drop the oldest DISK replicas while their bytes exceed --quota_bytes."""
        quota = self.config.quota_bytes
        if not quota or not self.config.enable_disk_eviction:
            return
        while self.fs_used > quota and self.fs_order:
            key = next(iter(self.fs_order))
            self.remove(key)
            self.metrics.disk_evicted += 1

    def busy(self) -> bool:
        """Is there any disk replica, offload or promotion at all (else
        :meth:`remove` has nothing to do for any key)?"""
        return bool(self.replicas or self.tasks or self.evict_after or self.promoting)

    def remove(self, key: str) -> bool:
        """Drop ``key``'s disk replica (removed or replaced); its owner is told to
        delete the file on its next heartbeat.  Cancels its offload/promotion."""
        self._cancel(key)
        rep = self.replicas.pop(key, None)
        if rep is None:
            return False
        self.st._emit(DiskReplicaRemoved(key))
        self._unindex(key, rep)
        if rep.client_id == FS_OWNER:
            if not self.st._replaying and self.fsdir:
                self.fs_drops.append(object_path(self.fsdir, key))
        elif rep.client_id in self.disks:
            self.drops.setdefault(rep.client_id, []).append(key)
        return True

    def _cancel(self, key: str) -> None:
        if key in self.tasks:
            self._end_task(key)
        if key in self.evict_after:
            self.evict_after.discard(key)
            self._unpin(key)
        self.promoting.pop(key, None)

    # --- pins ------------------------------------------------------------------------
    #
    # The tier keeps an object it copies to disk in memory, so that its bytes are
    # not reused meanwhile, by raising its lease (nothing evicts, moves away or
    # removes without force a leased object).  Reads during the pin take their
    # leases as always; the pin remembers them, and gives them back when it ends:
    # the object then stays for as long as its readers need it.

    def _pin(self, key: str, obj: Obj, until: float) -> None:
        self.read_leases.setdefault(key, obj.lease_until)
        if obj.lease_until < until:
            obj.lease_until = until

    def _unpin(self, key: str) -> None:
        lease = self.read_leases.pop(key, None)
        obj = self.st.objects.get(key)
        if lease is not None and obj is not None:
            obj.lease_until = lease

    def read_pinned(self, key: str, lease_until: float) -> None:
        """A read granted ``key`` a lease to ``lease_until`` that its record did
        not take (its lease was later: perhaps this tier's pin)."""
        held = self.read_leases.get(key)
        if held is not None and held < lease_until:
            self.read_leases[key] = lease_until

    def reader_lease(self, key: str, obj: Obj) -> float:
        """Until when readers hold ``obj`` (its lease without this tier's pin)."""
        return self.read_leases.get(key, obj.lease_until)

    def remove_keys(self, keys: Iterable[str]) -> int:
        """Drop the disk replicas of those ``keys`` that have no memory value
        (a whole-index removal; memory objects are removed by the state)."""
        n = 0
        objects = self.st.objects
        for key in keys:
            if key not in objects and self.remove(key):
                n += 1
        return n

    def disk_only_keys(self) -> list[str]:
        """Keys whose only readable value is a disk replica: none in memory, or
        one a promotion is still writing (whole-index listings and removals;
        :meth:`remove_keys` leaves the latter to the memory state)."""
        get = self.st.objects.get
        out = []
        for key in self.replicas:
            obj = get(key)
            if obj is None or not obj.flags & READABLE:
                out.append(key)
        return out

    def wire(self, key: str) -> list[Any] | None:
        """The LOCAL_DISK replica of ``key`` as the master RPC sends it."""
        rep = self.replicas.get(key)
        if rep is None:
            return None
        rid = _DISK_ID | zlib.crc32(key.encode("utf-8", "surrogatepass"))
        if rep.client_id == FS_OWNER:
            fsdir = self.fsdir
            if not fsdir:
                return None
            return [rid, object_path(fsdir, key), 0, rep.size, _COMPLETE, DISK_SEGMENT]
        disk = self.disks.get(rep.client_id)
        if disk is None:
            return None
        return [rid, disk.endpoint, 0, rep.size, _COMPLETE, LOCAL_DISK_SEGMENT]

    def read(self, key: str) -> dict[str, Any] | None:
        """A read of ``key`` that found no memory value: its disk replica (counted
        for promotion), or None."""
        wire = self.wire(key)
        if wire is None:
            return None
        rep = self.replicas[key]
        m = self.st.metrics
        m.get_hits += 1
        m.get_hit_bytes += rep.size
        if m.get_misses:
            m.get_misses -= 1  # the memory lookup counted a miss
        self.metrics.disk_reads += 1
        self._count_hit(key, rep)
        return {
            "replicas": [wire],
            "lease_ttl_ms": self.config.default_kv_lease_ttl_ms,
            "size": rep.size,
        }

    def _count_hit(self, key: str, rep: DiskRep) -> None:
        cfg = self.config
        if not cfg.promotion_on_hit or key in self.promoting or rep.client_id == FS_OWNER:
            return
        queue = self.promote_queues.setdefault(rep.client_id, {})
        if key in queue or self.sketch.add(key) < cfg.promotion_admission_threshold:
            return
        if self.promote_queued >= cfg.promotion_queue_limit:
            self.metrics.promotion_queue_full += 1
            return
        queue[key] = None
        self.promote_queued += 1
        self.metrics.promotion_queued += 1

    # ------------------------------------------------------------------------------
    # offload
    # ------------------------------------------------------------------------------

    def _owner_disk(self, obj: Obj) -> LocalDisk | None:
        for seg, _ in obj.replicas():
            disk = self.disks.get(seg.client_id)
            if disk is not None and disk.offloading:
                return disk
        return None

    def _queue(self, key: str, obj: Obj) -> bool:
        disk = self._owner_disk(obj)
        if disk is None:
            return False
        queue = self.queues.setdefault(disk.client_id, {})
        if key in queue or key in self.tasks:
            return True
        if self.queued >= self.config.offloading_queue_limit:
            self.metrics.offload_queue_full += 1
            return False
        queue[key] = None
        self.queued += 1
        self.metrics.offload_queued += 1
        return True

    def eager(self) -> bool:
        """Whether objects are queued for offload as soon as they are written."""
        return self.enabled and not self.config.offload_on_evict and bool(self.disks)

    def written(self, key: str) -> None:
        """A put/upsert of ``key`` ended: queue it for offload (eager mode)."""
        if not self.eager():
            return
        obj = self.st.objects.get(key)
        if obj is not None and obj.flags & READABLE and key not in self.replicas:
            self._queue(key, obj)

    def keep_on_evict(self, key: str, obj: Obj, now: float) -> bool:
        """Eviction picked ``obj``: True keeps it in memory (queued for offload and
        pinned until it is on disk), False lets it go."""
        if not self.enabled or not self.disks or key in self.replicas:
            return False  # on disk already: only the memory replica goes
        if key in self.tasks or key in self.evict_after:
            return True
        if not self.config.offload_on_evict:
            return False
        if not self._queue(key, obj):
            return not self.config.offload_force_evict and self._owner_disk(obj) is not None
        self.evict_after.add(key)
        self._pin(key, obj, now + self.config.offload_task_timeout_s)
        return True

    def heartbeat(self, client_id: str, used: int, capacity: int, now: float) -> dict[str, Any]:
        """Hand ``client_id`` its SSD work (see the module docstring)."""
        disk = self.disks.get(client_id)
        if disk is None:
            return {"remount": True, "offload": [], "promote": [], "drop": []}
        self.st._touch(client_id, now)
        disk.used_bytes = used
        if capacity:
            disk.capacity_bytes = capacity
        timeout = self.config.offload_task_timeout_s
        offload: list[list[Any]] = []
        queue = self.queues.get(client_id)
        budget = _MAX_HEARTBEAT_BYTES
        objects = self.st.objects
        while queue and len(offload) < self.config.offload_max_per_heartbeat and budget > 0:
            key = next(iter(queue))
            del queue[key]
            self.queued -= 1
            obj = objects.get(key)
            rep = None
            if obj is not None and obj.flags & READABLE and not obj.flags & BUSY:
                rep = next(((s, a) for s, a in obj.replicas() if s.client_id == client_id), None)
            if obj is None or rep is None or key in self.replicas:
                if key in self.evict_after:
                    self.evict_after.discard(key)
                    self._unpin(key)
                continue
            self._pin(key, obj, now + timeout)
            self.tasks[key] = _Task(client_id, now + timeout)
            offload.append([key, obj.size, rep[0].id, rep[1]])
            budget -= obj.size
            self.metrics.offload_handed_out += 1
        promote: list[list[Any]] = []
        pqueue = self.promote_queues.get(client_id)
        while pqueue and len(promote) < self.config.promotion_max_per_heartbeat:
            key = next(iter(pqueue))
            del pqueue[key]
            self.promote_queued -= 1
            drep = self.replicas.get(key)
            if drep is None or drep.client_id != client_id or key in objects:
                continue
            self.promoting[key] = _Task(client_id, now + timeout)
            promote.append([key, drep.size])
        drops = self.drops.pop(client_id, [])
        return {"offload": offload, "promote": promote, "drop": drops}

    def _end_task(self, key: str) -> None:
        task = self.tasks.pop(key, None)
        kept = key in self.evict_after
        self.evict_after.discard(key)
        if task is not None or kept:
            self._unpin(key)

    def notify_shared(self, client_id: str, keys: Sequence[str], sizes: Sequence[int]) -> list[int]:
        """``client_id`` wrote ``keys`` to the shared filesystem: DISK replicas of
        the values now in memory (one code per key, 0: accepted)."""
        if not self.fsdir:
            code = int(ErrorCode.UNAVAILABLE_IN_CURRENT_MODE)
            return [code] * len(keys)
        objects = self.st.objects
        out: list[int] = []
        for key, size in zip(keys, sizes, strict=True):
            obj = objects.get(key)
            have = self.replicas.get(key)
            if obj is None or not obj.flags & READABLE or obj.size != size:
                out.append(int(ErrorCode.OBJECT_NOT_FOUND))
            elif have is not None and have.client_id != FS_OWNER:
                out.append(int(ErrorCode.OBJECT_ALREADY_EXISTS))  # on a client's SSD tier
            else:
                if have is None:
                    self._add(key, FS_OWNER, size)
                out.append(0)
        return out

    def notify(
        self, client_id: str, keys: Sequence[str], sizes: Sequence[int], register: bool, now: float
    ) -> list[int]:
        """``client_id`` has ``keys`` on disk; one code per key (0: accepted)."""
        if client_id not in self.disks:
            code = int(ErrorCode.CLIENT_NOT_FOUND)
            return [code] * len(keys)
        self.st._touch(client_id, now)
        objects = self.st.objects
        out: list[int] = []
        for key, size in zip(keys, sizes, strict=True):
            task = self.tasks.get(key)
            ours = task is not None and task.client_id == client_id
            if ours:
                self._end_task(key)
            obj = objects.get(key)
            have = self.replicas.get(key)
            if have is not None and have.client_id != client_id:
                code = ErrorCode.OBJECT_ALREADY_EXISTS  # one disk replica per key
            elif register:
                if have is not None:
                    code = ErrorCode.OK if have.size == size else ErrorCode.INVALID_REPLICA
                elif obj is not None:
                    code = ErrorCode.OBJECT_ALREADY_EXISTS  # a value in memory may be newer
                else:
                    code = ErrorCode.OK
            elif not ours or obj is None or not obj.flags & READABLE or obj.size != size:
                code = ErrorCode.OBJECT_NOT_FOUND  # removed or replaced meanwhile
            else:
                code = ErrorCode.OK
            if code == ErrorCode.OK:
                if have is None:
                    self._add(key, client_id, size)
                if register:
                    self.metrics.registered += 1
                else:
                    self.metrics.offloaded += 1
            else:
                self.metrics.offload_refused += 1
            out.append(int(code))
        return out

    def evict(self, client_id: str, keys: Sequence[str]) -> int:
        """``client_id`` deletes the files of ``keys`` to make room."""
        n = 0
        for key in keys:
            rep = self.replicas.get(key)
            if rep is not None and rep.client_id == client_id:
                self.st._emit(DiskReplicaRemoved(key))
                del self.replicas[key]
                self.by_client.get(client_id, set()).discard(key)
                n += 1
        self.metrics.disk_evicted += n
        return n

    def promotion_start(self, client_id: str, key: str, size: int, now: float) -> Sequence[Any]:
        """Allocate memory for promoting the disk-only ``key`` of ``client_id``.

        Raises:
            ObjectNotFound: not on this client's disk any more.
            ObjectExists: it has a memory value already.
            NoAvailableHandle: no room.
        """
        rep = self.replicas.get(key)
        if rep is None or rep.client_id != client_id or rep.size != size:
            raise _err(ErrorCode.OBJECT_NOT_FOUND, f"{key!r} is not in this client's SSD tier")
        if key in self.st.objects:
            raise _err(ErrorCode.OBJECT_ALREADY_EXISTS, f"{key!r} is in memory already")
        self.promoting.pop(key, None)
        self.sketch.forget(key)
        obj = self.st.put_start_replicas(client_id, key, size, ReplicateConfig(), now)
        obj.flags |= REF  # it is hot: its first pass of the eviction hand spares it
        self.metrics.promotion_started += 1
        return obj.wire() if not obj.pending() else reps_wire(obj.pending(), size, _PROCESSING)

    def tick(self, now: float) -> None:
        """Expire tasks nobody reported (unpin their objects)."""
        if not self.tasks and not self.promoting:
            return
        late = [k for k, t in self.tasks.items() if t.deadline <= now]
        for key in late:
            self._end_task(key)
        self.metrics.offload_timeouts += len(late)
        for key in [k for k, t in self.promoting.items() if t.deadline <= now]:
            del self.promoting[key]

    def snapshot_effects(self) -> list[Any]:
        """Every disk and disk replica as effects (journal compaction, a standby's sync)."""
        out: list[Any] = [
            LocalDiskMounted(d.client_id, d.endpoint, d.capacity_bytes) for d in self.disks.values()
        ]
        out += [DiskReplicaAdded(k, r.client_id, r.size) for k, r in self.replicas.items()]
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "local_disks": len(self.disks),
            "disk_replicas": len(self.replicas),
            "disk_capacity_bytes": sum(d.capacity_bytes for d in self.disks.values()),
            "disk_used_bytes": sum(d.used_bytes for d in self.disks.values()),
            "offload_queue_length": self.queued,
            "offload_in_flight": len(self.tasks),
            "promotion_queue_length": self.promote_queued,
            **self.metrics.__dict__,
        }

    def validate(self) -> None:
        for key, rep in self.replicas.items():
            if rep.client_id == FS_OWNER:
                assert key in self.fs_order, f"{key}: shared-filesystem order disagrees"
                continue
            assert rep.client_id in self.disks, f"{key}: disk replica of an unmounted disk"
            assert key in self.by_client.get(rep.client_id, ()), f"{key}: by_client disagrees"
        assert sum(len(q) for q in self.queues.values()) == self.queued
        assert sum(len(q) for q in self.promote_queues.values()) == self.promote_queued
        # a pin is an offload task or an eviction's keep, and holds at least what
        # its readers were granted
        assert set(self.read_leases) == set(self.tasks) | self.evict_after, "pins disagree"
        for key, lease in self.read_leases.items():
            obj = self.st.objects.get(key)
            assert obj is None or obj.lease_until >= lease, f"{key}: pin below a read lease"


def unlink_files(paths: Iterable[str]) -> None:
    """Delete files of dropped DISK replicas (run off the service's loop)."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot delete %s of a dropped DISK replica: %s", path, exc)


# --------------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------------


def _apply_mount(st: MasterState, ev: LocalDiskMounted, now: float) -> None:
    if not st.offload.enabled:
        return  # restarted without --enable_offload: the disks are not used
    st.offload.mount(ev.client_id, ev.endpoint, ev.capacity_bytes, True, now)


def _apply_unmount(st: MasterState, ev: LocalDiskUnmounted, now: float) -> None:
    st.offload.unmount(ev.client_id)


def _apply_add(st: MasterState, ev: DiskReplicaAdded, now: float) -> None:
    if ev.client_id in st.offload.disks or ev.client_id == FS_OWNER:
        st.offload._add(ev.key, ev.client_id, ev.size)


def _apply_remove(st: MasterState, ev: DiskReplicaRemoved, now: float) -> None:
    off = st.offload
    rep = off.replicas.pop(ev.key, None)
    if rep is not None:
        off._unindex(ev.key, rep)


OFFLOAD_APPLY: Final[dict[type, Callable[[Any, Any, float], None]]] = {
    LocalDiskMounted: _apply_mount,
    LocalDiskUnmounted: _apply_unmount,
    DiskReplicaAdded: _apply_add,
    DiskReplicaRemoved: _apply_remove,
}


# --------------------------------------------------------------------------------
# RPC handlers
# --------------------------------------------------------------------------------

Handler = Callable[[Any, float], rp.Reply]
_NOT_FOUND: Final = int(ErrorCode.OBJECT_NOT_FOUND)
_NOT_READY: Final = int(ErrorCode.REPLICA_IS_NOT_READY)
_HAS_LEASE: Final = int(ErrorCode.OBJECT_HAS_LEASE)
_BUSY: Final = int(ErrorCode.OBJECT_REPLICA_BUSY)
#: a read that finds no readable memory value: none, or one being written (a
#: promotion; puts and upserts never write a key that keeps a disk replica)
_NO_MEMORY_VALUE: Final = frozenset((_NOT_FOUND, _NOT_READY))
#: the segment number disk replicas are listed under in columnar replies
_DISK_SEG_NUM: Final = 0xFFFFFF


def _splice_failures(
    keys: Sequence[str],
    failed: list[bool],
    started: ReplicaColumns | None,
    error: Callable[[str], StoreError],
) -> ReplicaColumns:
    """A columnar start reply (``wire/_master_replies.py``) for ``keys``: the keys
    marked ``failed`` fail with ``error(key)``, the others take, in order, the
    entries of ``started`` (the reply for them alone)."""
    code: list[int] = []
    msgs: list[list[Any]] = []
    counts: list[int] = []
    seg: list[int] = []
    addr: list[int] = []
    src_code = started.code if started else []
    src_n = started.counts if started else []
    src_msgs = started.messages if started else {}
    j = at = 0
    for key, bad in zip(keys, failed, strict=True):
        if bad:
            exc = error(key)
            msgs.append([len(code), exc.message])
            code.append(exc.code)
            counts.append(0)
            continue
        n = src_n[j]
        if src_code[j] != 0:
            msgs.append([len(code), src_msgs.get(j, "")])
        code.append(src_code[j])
        counts.append(n)
        assert started is not None
        seg += started.seg[at : at + n]
        addr += started.addr[at : at + n]
        at += n
        j += 1
    segs = started.segs if started else []
    return ReplicaColumns(code, dict(msgs), segs, counts, seg, addr, None, 0)


def _add_disk_columns(
    off: OffloadState, keys: Sequence[str], out: ReplicaColumns
) -> ReplicaColumns:
    """A columnar BatchGetReplicaList reply with the keys' disk replicas added:
    after the memory replicas of a key, or as its only replica (a disk-only key
    read, or one whose promotion is still writing its memory copy: counted, and
    maybe admitted for promotion)."""
    code, counts, sizes = out.code, out.counts, out.sizes
    assert sizes is not None
    segs = out.segs
    msgs = dict(out.messages)
    disk_index: dict[tuple[str, str], int] = {}
    seg: list[int] = []
    addr: list[int] = []
    at = 0
    for i, key in enumerate(keys):
        n = counts[i]
        seg += out.seg[at : at + n]
        addr += out.addr[at : at + n]
        at += n
        if code[i] in _NO_MEMORY_VALUE and key in off.replicas:
            found = off.read(key)
            if found is None:
                continue
            wire = found["replicas"][0]
            code[i] = 0
            sizes[i] = found["size"]
            msgs.pop(i, None)
        elif code[i] == 0:
            wire = off.wire(key)
            if wire is None:
                continue
        else:
            continue
        endpoint, marker = wire[1], wire[5]
        j = disk_index.get((endpoint, marker))
        if j is None:
            j = disk_index[(endpoint, marker)] = len(segs)
            segs.append([endpoint, marker, _DISK_SEG_NUM, 0])
        seg.append(j)
        addr.append(0)
        counts[i] = n + 1
    messages = dict(sorted(msgs.items()))
    return ReplicaColumns(code, messages, segs, counts, seg, addr, sizes, out.lease_ttl_ms)


def wrap_handlers(st: MasterState, handlers: dict[type, Handler]) -> dict[type, Handler]:
    """``handlers`` (``_handlers.build_handlers``) made aware of disk replicas,
    plus the SSD-tier requests."""
    off = st.offload
    base = dict(handlers)

    def exists_error(key: str) -> StoreError:
        return _err(ErrorCode.OBJECT_ALREADY_EXISTS, f"object {key!r} already exists (on disk)")

    # A put of a key with a disk replica is refused here: the key exists, whether
    # its memory copy is absent, readable, or being written by a promotion (the
    # memory state would call the last "being written" by the disk's owner).

    def put_start(req: msg.PutStart, now: float) -> Any:
        if req.key in off.replicas:
            raise exists_error(req.key)
        return base[msg.PutStart](req, now)

    def batch_put_start(req: msg.BatchPutStart, now: float) -> rp.Reply:
        on_disk = off.replicas
        disk = [k in on_disk for k in req.keys] if on_disk else []
        if not any(disk):
            return base[msg.BatchPutStart](req, now)
        todo = [i for i, on_disk in enumerate(disk) if not on_disk]
        sub = dataclasses.replace(
            req, keys=tuple(req.keys[i] for i in todo), sizes=tuple(req.sizes[i] for i in todo)
        )
        started = base[msg.BatchPutStart](sub, now) if todo else None
        assert started is None or isinstance(started, rp.BatchPutStartReply)
        return rp.BatchPutStartReply(
            _splice_failures(req.keys, disk, started.columns if started else None, exists_error)
        )

    def commit_slot(req: msg.CommitSlot, now: float) -> Any:
        if req.key in off.replicas:
            raise exists_error(req.key)
        out = base[msg.CommitSlot](req, now)
        off.written(req.key)
        return out

    def batch_commit_slots(req: msg.BatchCommitSlots, now: float) -> rp.Reply:
        on_disk = off.replicas
        disk = [k in on_disk for k in req.keys] if on_disk else []
        if not any(disk):
            out = base[msg.BatchCommitSlots](req, now)
        else:
            todo = [i for i, d in enumerate(disk) if not d]
            sub = dataclasses.replace(
                req, slots=tuple(req.slots[i] for i in todo), keys=tuple(req.keys[i] for i in todo)
            )
            done = base[msg.BatchCommitSlots](sub, now) if todo else None
            assert done is None or isinstance(done, rp.BatchCommitSlotsReply)
            rest = iter(zip(done.codes, done.messages, strict=True) if done else ())
            codes: list[int] = []
            messages: list[str | None] = []
            for key, d in zip(req.keys, disk, strict=True):
                if d:  # the buffer stays reserved, as for a single commit
                    exc = exists_error(key)
                    codes.append(exc.code)
                    messages.append(exc.message)
                else:
                    code, text = next(rest)
                    codes.append(code)
                    messages.append(text)
            out = rp.BatchCommitSlotsReply(tuple(codes), tuple(messages))
        return queue_written(req.keys, out)

    def promoting(key: str) -> bool:
        """A promotion is writing ``key``'s memory copy (from its disk replica)."""
        obj = st.objects.get(key) if key in off.replicas else None
        return obj is not None and not obj.flags & READABLE

    def promoting_error(key: str, code: ErrorCode, what: str) -> StoreError:
        return _err(
            code,
            f"object {key!r} is being promoted from the SSD tier into memory (it was read "
            f"often); retry the {what} in a moment",
        )

    def upsert_start(req: msg.UpsertStart, now: float) -> Any:
        try:
            out = base[msg.UpsertStart](req, now)
        except StoreError as exc:
            if exc.code == _BUSY and promoting(req.key):
                raise promoting_error(req.key, ErrorCode.OBJECT_REPLICA_BUSY, "upsert") from None
            raise
        off.remove(req.key)  # the value is being replaced: the file is stale
        return out

    def batch_upsert_start(req: msg.BatchUpsertStart, now: float) -> rp.Reply:
        out = base[msg.BatchUpsertStart](req, now)
        assert isinstance(out, rp.BatchUpsertStartReply)
        cols = out.columns
        messages = cols.messages
        for i, (key, code) in enumerate(zip(req.keys, cols.code, strict=True)):
            if code == 0:
                off.remove(key)
            elif code == _BUSY and promoting(key):
                if messages is cols.messages:
                    messages = dict(messages)
                messages[i] = promoting_error(key, ErrorCode.OBJECT_REPLICA_BUSY, "upsert").message
        if messages is not cols.messages:
            out = rp.BatchUpsertStartReply(dataclasses.replace(cols, messages=messages))
        return out

    def ended(kind: type) -> Handler:
        def handler(req: Any, now: float) -> Any:
            out = base[kind](req, now)
            off.written(req.key)
            return out

        return handler

    def queue_written(keys: Sequence[str], out: rp.Reply) -> rp.Reply:
        """The keys a batch put ended (code 0 in ``out``) are queued for offload."""
        assert isinstance(out, rp.BatchKeyResultsReply)
        if off.eager():
            for key, code in zip(keys, out.codes, strict=True):
                if code == 0:
                    off.written(key)
        return out

    def batch_ended(kind: type) -> Handler:
        return lambda req, now: queue_written(req.keys, base[kind](req, now))

    def get_replica_list(req: msg.GetReplicaList, now: float) -> rp.Reply:
        try:
            reply = base[msg.GetReplicaList](req, now)
        except StoreError as exc:
            # not in memory, or its memory copy is still being written (a promotion
            # from this very disk replica): the disk replica answers
            found = off.read(req.key) if exc.code in _NO_MEMORY_VALUE else None
            if found is None:
                raise
            return rp.GetReplicaListReply(
                rp.replicas_of(found["replicas"]), found["lease_ttl_ms"], found["size"]
            )
        if not off.replicas:
            return reply  # (no disk replica at all: the common case, one check)
        assert isinstance(reply, rp.GetReplicaListReply)
        wire = off.wire(req.key)
        if wire is not None:
            reply = dataclasses.replace(reply, replicas=(*reply.replicas, rp.replica_of(wire)))
        return reply

    def batch_get_replica_list(req: msg.BatchGetReplicaList, now: float) -> rp.Reply:
        out = base[msg.BatchGetReplicaList](req, now)
        replicas = off.replicas
        if not replicas or not any(k in replicas for k in req.keys):
            return out
        assert isinstance(out, rp.BatchGetReplicaListReply)
        return rp.BatchGetReplicaListReply(_add_disk_columns(off, req.keys, out.columns))

    def exist_key(req: msg.ExistKey, now: float) -> rp.Reply:
        out = base[msg.ExistKey](req, now)
        assert isinstance(out, rp.ExistKeyReply)
        if out.exists or not off.replicas:
            return out
        return rp.ExistKeyReply(req.key in off.replicas)

    def batch_exist_key(req: msg.BatchExistKey, now: float) -> rp.Reply:
        out = base[msg.BatchExistKey](req, now)
        assert isinstance(out, rp.BatchExistKeyReply)
        replicas = off.replicas
        return rp.BatchExistKeyReply(
            tuple([e or k in replicas for e, k in zip(out.exists, req.keys, strict=True)])
        )

    def held_by_tier(key: str, code: int, now: float) -> StoreError | None:
        """A removal of ``key`` refused with ``code`` because the SSD tier is
        working on it, said as such (the memory state's message speaks of a
        write or of a reader's lease); None for any other refusal."""
        if code == _NOT_READY and promoting(key):
            return promoting_error(key, ErrorCode.REPLICA_IS_NOT_READY, "removal")
        obj = st.objects.get(key) if code == _HAS_LEASE and key in off.read_leases else None
        if obj is None:
            return None
        readers = off.reader_lease(key, obj) - now
        if readers > 0:
            return _err(
                ErrorCode.OBJECT_HAS_LEASE,
                f"object {key!r} is leased to a reader for {readers:.3f} s more (and being "
                "copied to the SSD tier); use force=True to remove it anyway",
            )
        task = off.tasks.get(key)
        if task is None:
            return _err(
                ErrorCode.OBJECT_HAS_LEASE,
                f"object {key!r} is kept in memory until its owner copies it to the SSD tier "
                "(eviction picked it, --offload_on_evict); retry once it is written (its "
                "client's next heartbeats) or remove it with force=True",
            )
        return _err(
            ErrorCode.OBJECT_HAS_LEASE,
            f"object {key!r} is being copied to the SSD tier by client {task.client_id!r} "
            f"(an offload task, at most {max(task.deadline - now, 0.0):.1f} s more); retry "
            "once it is written (its client reports within a heartbeat) or remove it with "
            "force=True",
        )

    remove_in_memory = base[msg.Remove]

    def remove(req: msg.Remove, now: float) -> rp.Reply:
        try:
            done = remove_in_memory(req, now)
        except StoreError as exc:
            better = held_by_tier(req.key, exc.code, now)
            if better is not None:
                raise better from None
            if exc.code != _NOT_FOUND or not off.remove(req.key):
                raise
            return rp.RemoveReply()
        if off.busy():
            off.remove(req.key)
        return done

    def batch_remove(req: msg.BatchRemove, now: float) -> rp.Reply:
        out = base[msg.BatchRemove](req, now)
        assert isinstance(out, rp.BatchRemoveReply)
        codes, messages = list(out.codes), list(out.messages)
        for i, key in enumerate(req.keys):
            code = codes[i]
            if code == 0:
                off.remove(key)
            elif code == _NOT_FOUND and off.remove(key):
                codes[i], messages[i] = 0, None
            elif code != _NOT_FOUND:
                better = held_by_tier(key, code, now)
                if better is not None:
                    messages[i] = better.message
        return rp.BatchRemoveReply(tuple(codes), tuple(messages))

    def each(values: Sequence[int]) -> rp.NotifyOffloadSuccessReply:
        return rp.NotifyOffloadSuccessReply(tuple(values))

    def heartbeat(req: omsg.OffloadHeartbeat, now: float) -> rp.OffloadHeartbeatReply:
        work = off.heartbeat(req.client_id, req.used_bytes, req.capacity_bytes, now)
        return rp.OffloadHeartbeatReply(
            tuple([(k, size, sid, addr) for k, size, sid, addr in work["offload"]]),
            tuple([(k, size) for k, size in work["promote"]]),
            tuple(work["drop"]),
            bool(work.get("remount", False)),
        )

    def mount(req: omsg.MountLocalDisk, now: float) -> rp.MountLocalDiskReply:
        off.mount(req.client_id, req.endpoint, req.capacity_bytes, req.enable_offloading, now)
        return rp.MountLocalDiskReply()

    wrapped: dict[type, Handler] = {
        msg.PutStart: put_start,
        msg.BatchPutStart: batch_put_start,
        msg.UpsertStart: upsert_start,
        msg.BatchUpsertStart: batch_upsert_start,
        msg.PutEnd: ended(msg.PutEnd),
        msg.CommitSlot: commit_slot,
        msg.BatchCommitSlots: batch_commit_slots,
        msg.UpsertEnd: ended(msg.UpsertEnd),
        msg.BatchPutEnd: batch_ended(msg.BatchPutEnd),
        msg.BatchUpsertEnd: batch_ended(msg.BatchUpsertEnd),
        msg.GetReplicaList: get_replica_list,
        msg.BatchGetReplicaList: batch_get_replica_list,
        msg.ExistKey: exist_key,
        msg.BatchExistKey: batch_exist_key,
        msg.Remove: remove,
        msg.BatchRemove: batch_remove,
        omsg.MountLocalDisk: mount,
        omsg.UnmountLocalDisk: lambda req, now: rp.UnmountLocalDiskReply(
            off.unmount(req.client_id)
        ),
        omsg.OffloadHeartbeat: heartbeat,
        omsg.NotifyOffloadSuccess: lambda req, now: each(
            off.notify_shared(req.client_id, req.keys, req.sizes)
            if req.shared
            else off.notify(req.client_id, req.keys, req.sizes, req.register, now)
        ),
        omsg.GetStorageConfig: lambda req, now: rp.GetStorageConfigReply(**off.storage_config()),
        omsg.BatchEvictDiskReplica: lambda req, now: rp.BatchEvictDiskReplicaReply(
            off.evict(req.client_id, req.keys)
        ),
        omsg.PromotionAllocStart: lambda req, now: rp.PromotionAllocStartReply(
            rp.replicas_of(off.promotion_start(req.client_id, req.key, req.size, now))
        ),
    }
    out = dict(handlers)
    out.update(wrapped)
    return out
