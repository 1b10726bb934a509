"""Copies and moves of replicas: ``CopyStart``/``CopyEnd``/``CopyRevoke`` and the
``Move*`` calls (the reference's ``MasterService::CopyStart`` ...).

Theory of operation
-------------------
The client running a task (``_tasks.py``) asks ``CopyStart(key, source,
targets)``: the master reserves one buffer of the object's size in a segment of
each target name that holds no replica yet, marks the object ``TASK`` and answers
the source replica and the new buffers.  The client's engine writes the bytes
from the source (its own memory) into the buffers, then ``CopyEnd`` makes them
replicas: only then are they listed by ``GetReplicaList`` (a reader never sees a
half-written replica).  ``MoveEnd`` also drops the source replica; its buffer is
released only after the read leases of the object have expired, so a reader that
was handed the old location still reads good bytes.  ``*Revoke`` releases the
buffers.

While ``TASK`` is set the object cannot be removed, replaced (upsert) or evicted
(OBJECT_HAS_REPLICATION_TASK), so the source stays valid and the end commits
to the object the copy started from.  A target segment that goes away drops its
buffer (the end then answers REPLICA_IS_GONE for it); a source that goes away
fails the end; an expired client's copies are revoked.

Effects: :class:`ReplicationStarted` / :class:`ReplicationEnded` (standbys only,
like writes in flight) and an ``ObjectCommitted`` for the new replica set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import StoreError, store_error
from .._types import ErrorCode
from ._effects import ReplicationEnded, ReplicationStarted
from ._records import BUSY, READABLE, TASK, Obj, Rep, SegmentRecord, reps_wire, reserved_size
from ._tasks import Task, TaskType

if TYPE_CHECKING:
    from ._state import MasterState

__all__ = ["Replication", "Replications"]

_COMPLETE = 3  # ReplicaStatus on the wire
_PROCESSING = 2


def _err(code: ErrorCode, message: str) -> StoreError:
    return store_error(int(code), message)


class Replication:
    """A copy or move of one object in progress."""

    __slots__ = ("client", "key", "lost", "move", "size", "source", "started", "targets")

    def __init__(
        self,
        key: str,
        move: bool,
        client: str,
        source: Rep,
        targets: list[Rep],
        size: int,
        now: float,
    ) -> None:
        self.key = key
        self.move = move
        self.client = client
        self.source = source
        self.targets = targets
        self.size = size
        self.started = now
        #: a target's segment went away
        self.lost = False


class Replications:
    """The copies/moves in progress of one :class:`MasterState`."""

    def __init__(self, st: MasterState) -> None:
        self.st = st
        self.active: dict[str, Replication] = {}

    # --- lookups -------------------------------------------------------------------------

    def _targets_open(self, names: list[str] | tuple[str, ...]) -> None:
        st = self.st
        for name in names:
            segs = [s for s in st.segments.values() if s.name == name]
            if not segs:
                raise _err(ErrorCode.SEGMENT_NOT_FOUND, f"no segment {name!r} is mounted")
            if all(s.draining for s in segs):
                raise _err(
                    ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS,
                    f"segment {name!r} is draining and takes no new replicas",
                )

    def _object(self, key: str) -> Obj:
        obj = self.st.objects.get(key)
        if obj is None or not obj.flags & READABLE:
            raise _err(ErrorCode.OBJECT_NOT_FOUND, f"object {key!r} not found")
        if obj.flags & TASK:
            raise _err(
                ErrorCode.OBJECT_HAS_REPLICATION_TASK,
                f"object {key!r} is already being copied or moved",
            )
        if obj.flags & BUSY:
            raise _err(
                ErrorCode.OBJECT_REPLICA_BUSY,
                f"object {key!r} is being replaced by an upsert; copy it when that ends",
            )
        return obj

    @staticmethod
    def _source(key: str, obj: Obj, name: str) -> Rep:
        for rep in obj.replicas():
            if rep[0].name == name:
                return rep
        raise _err(
            ErrorCode.REPLICA_NOT_FOUND, f"object {key!r} has no complete replica in {name!r}"
        )

    def _allocate(self, key: str, obj: Obj, names: list[str]) -> list[Rep]:
        st = self.st
        got: list[Rep] = []
        for name in names:
            rep = None
            for seg in st.segments.values():
                if seg.name == name and not seg.draining:
                    r = seg.allocator.allocate(obj.size)
                    if r is not None:
                        rep = (seg, r[0])
                        break
            if rep is None:
                for seg, addr in got:
                    st._free(seg, addr, obj.size)
                st.metrics.put_alloc_failures += 1
                raise _err(
                    ErrorCode.NO_AVAILABLE_HANDLE,
                    f"segment {name!r} has no free range of {obj.size} bytes for a replica "
                    f"of {key!r}; free space there (remove objects) or choose another target",
                )
            got.append(rep)
        return got

    # --- tasks (CreateCopyTask / CreateMoveTask) ------------------------------------------

    def _owner(self, name: str) -> str:
        for seg in self.st.segments.values():
            if seg.name == name:
                return seg.client_id
        raise _err(ErrorCode.INTERNAL_ERROR, f"segment {name!r} has no owner")

    def _check_targets(self, key: str, names: tuple[str, ...] | list[str]) -> None:
        st = self.st
        for name in names:
            segs = [s for s in st.segments.values() if s.name == name]
            if not segs:
                raise _err(
                    ErrorCode.INVALID_PARAMS,
                    f"target segment {name!r} of {key!r} is not mounted (segment names are "
                    "the owners' local_hostname)",
                )
            if all(s.draining for s in segs):
                raise _err(
                    ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS,
                    f"target segment {name!r} is draining and takes no new replicas",
                )

    def create_copy_task(self, key: str, targets: tuple[str, ...], now: float) -> Task:
        """Queue a copy of ``key`` to ``targets`` for the owner of one of its
        replicas (chosen at random, as the reference).

        Raises:
            InvalidParams: no targets, or a target is not mounted.
            ObjectNotFound / UnavailableInCurrentStatus (a target is draining) /
            TaskPendingLimitExceeded.
        """
        if not targets:
            raise _err(ErrorCode.INVALID_PARAMS, f"copy of {key!r} names no target segment")
        obj = self.st.objects.get(key)
        if obj is None or not obj.flags & READABLE:
            raise _err(ErrorCode.OBJECT_NOT_FOUND, f"object {key!r} not found")
        self._check_targets(key, targets)
        reps = obj.replicas()
        seg = reps[self.st._placement._rng.randrange(len(reps))][0]
        return self.st.tasks.submit(
            TaskType.REPLICA_COPY, key, seg.name, tuple(targets), seg.client_id, now
        )

    def create_move_task(self, key: str, source: str, target: str, now: float) -> Task:
        """Queue a move of ``key``'s replica in ``source`` to ``target`` for the
        owner of ``source``.

        Raises:
            ObjectNotFound; InvalidParams (source == target, target not mounted,
            no replica in source); UnavailableInCurrentStatus; TaskPendingLimitExceeded.
        """
        obj = self.st.objects.get(key)
        if obj is None or not obj.flags & READABLE:
            raise _err(ErrorCode.OBJECT_NOT_FOUND, f"object {key!r} not found")
        if source == target:
            raise _err(
                ErrorCode.INVALID_PARAMS, f"move of {key!r}: source and target are both {source!r}"
            )
        self._check_targets(key, (target,))
        if not any(s.name == source for s, _ in obj.replicas()):
            raise _err(
                ErrorCode.INVALID_PARAMS, f"object {key!r} has no replica in segment {source!r}"
            )
        return self.st.tasks.submit(
            TaskType.REPLICA_MOVE, key, source, (target,), self._owner(source), now
        )

    # --- start ---------------------------------------------------------------------------

    def _start(
        self, client: str, key: str, obj: Obj, source: Rep, names: list[str], move: bool, now: float
    ) -> dict[str, Any]:
        st = self.st
        targets = self._allocate(key, obj, names)
        rep = Replication(key, move, client, source, targets, obj.size, now)
        self.active[key] = rep
        obj.flags |= TASK
        st._touch(client, now)
        st._emit(
            ReplicationStarted(
                key,
                move,
                client,
                (source[0].id, source[1]),
                tuple((s.id, a) for s, a in targets),
            )
        )
        return {
            "source": reps_wire([source], obj.size, _COMPLETE)[0],
            "targets": reps_wire(targets, obj.size, _PROCESSING),
        }

    def copy_start(
        self, client: str, key: str, source: str, targets: tuple[str, ...], now: float
    ) -> dict[str, Any]:
        """Reserve buffers for new replicas of ``key`` in ``targets`` (names that
        already hold one are skipped: an empty target list means nothing to copy).

        Raises:
            SegmentNotFound / UnavailableInCurrentStatus (target draining) /
            ObjectNotFound / ObjectHasReplicationTask / ReplicaNotFound (no complete
            replica in ``source``) / NoAvailableHandle.
        """
        if not targets:
            raise _err(ErrorCode.INVALID_PARAMS, f"copy of {key!r} names no target segment")
        self._targets_open(targets)
        obj = self._object(key)
        src = self._source(key, obj, source)
        held = {s.name for s, _ in obj.replicas()}
        names = list(dict.fromkeys(t for t in targets if t not in held))
        return self._start(client, key, obj, src, names, False, now)

    def move_start(
        self, client: str, key: str, source: str, target: str, now: float
    ) -> dict[str, Any]:
        """Reserve a buffer for ``key`` in ``target`` (none if it holds a replica
        already: then the end only drops the source)."""
        if source == target:
            raise _err(
                ErrorCode.INVALID_PARAMS, f"move of {key!r}: source and target are both {source!r}"
            )
        self._targets_open((target,))
        obj = self._object(key)
        src = self._source(key, obj, source)
        names = [] if any(s.name == target for s, _ in obj.replicas()) else [target]
        return self._start(client, key, obj, src, names, True, now)

    # --- end / revoke ----------------------------------------------------------------------

    def _mine(self, client: str, key: str, move: bool) -> tuple[Obj, Replication]:
        obj = self.st.objects.get(key)
        if obj is None:
            raise _err(ErrorCode.OBJECT_NOT_FOUND, f"object {key!r} not found")
        rep = self.active.get(key)
        if rep is None:
            raise _err(
                ErrorCode.OBJECT_NO_REPLICATION_TASK,
                f"object {key!r} has no copy or move in progress (it was revoked, its client "
                "expired, or the master restarted)",
            )
        if rep.client != client:
            raise _err(ErrorCode.ILLEGAL_CLIENT, f"another client is copying or moving {key!r}")
        if rep.move != move:
            raise _err(
                ErrorCode.INVALID_PARAMS,
                f"{key!r} is being {'moved' if rep.move else 'copied'}, not "
                f"{'moved' if move else 'copied'}",
            )
        return obj, rep

    def _release(self, rep: Replication, targets: list[Rep], *, discard: bool, now: float) -> None:
        st = self.st
        release = now + st.config.put_start_release_timeout_s
        for seg, addr in targets:
            if st.segments.get(seg.id) is seg or st._replaying:
                if discard:
                    st._discard(seg, addr, rep.size, release)
                else:
                    st._free(seg, addr, rep.size)

    def _clear(self, obj: Obj | None, key: str) -> Replication | None:
        rep = self.active.pop(key, None)
        if obj is not None:
            obj.flags &= ~TASK
        return rep

    def end(self, client: str, key: str, move: bool, now: float) -> None:
        """The client wrote every target: they become replicas (a move drops the
        source).

        Raises:
            ReplicaIsGone: the source went away (nothing changes), or a target's
                segment did (the others are committed).
        """
        st = self.st
        obj, rep = self._mine(client, key, move)
        st._emit(ReplicationEnded(key))
        self._clear(obj, key)
        st._touch(client, now)
        current = obj.replicas()
        if not any(r[0] is rep.source[0] and r[1] == rep.source[1] for r in current):
            self._release(rep, rep.targets, discard=False, now=now)
            raise _err(
                ErrorCode.REPLICA_IS_GONE,
                f"the source replica of {key!r} went away while it was being copied",
            )
        live = [t for t in rep.targets if st.segments.get(t[0].id) is t[0]]
        lost = rep.lost or len(live) != len(rep.targets)
        if move and lost:
            raise _err(
                ErrorCode.REPLICA_IS_GONE,
                f"the target segment of the move of {key!r} went away; the source stays",
            )
        new = current + live
        if move:
            src_seg, src_addr = rep.source
            new = [r for r in new if not (r[0] is src_seg and r[1] == src_addr)]
            st._discard(src_seg, src_addr, obj.size, max(now, obj.lease_until))
            # the object leaves a segment that stays mounted: a new record (a record
            # only ever gains segments, see _records.py)
            obj = st._rebind(obj)
            obj.set_replicas(new)
            st._enlist(obj)
        else:
            obj.set_replicas(new)
            for seg, _ in live:
                seg.order.append(obj)
        st._committed(key, obj)
        if lost:
            raise _err(
                ErrorCode.REPLICA_IS_GONE,
                f"a target segment of the copy of {key!r} went away; the other copies are stored",
            )

    def revoke(self, client: str, key: str, move: bool, now: float) -> None:
        """The client gave up: the reserved buffers are released."""
        st = self.st
        obj, rep = self._mine(client, key, move)
        st._emit(ReplicationEnded(key))
        self._clear(obj, key)
        self._release(rep, rep.targets, discard=False, now=now)
        st._touch(client, now)

    # --- hooks of MasterState ----------------------------------------------------------------

    def object_gone(self, key: str, now: float) -> None:
        """``key`` left the index (its last replica went away): its copy ends;
        the client may still be writing, so the buffers wait before reuse."""
        rep = self.active.pop(key, None)
        if rep is not None:
            self._release(rep, rep.targets, discard=True, now=now)

    def segment_dropped(self, seg: SegmentRecord) -> None:
        """Target buffers in a segment that went away are gone with it."""
        for rep in self.active.values():
            if any(t[0] is seg for t in rep.targets):
                rep.targets = [t for t in rep.targets if t[0] is not seg]
                rep.lost = True

    def client_expired(self, client: str, now: float) -> None:
        """Revoke the copies of a client that expired."""
        st = self.st
        for key in [k for k, r in self.active.items() if r.client == client]:
            obj = st.objects.get(key)
            st._emit(ReplicationEnded(key))
            rep = self._clear(obj, key)
            if rep is not None:
                self._release(rep, rep.targets, discard=True, now=now)

    def ranges(self) -> list[tuple[SegmentRecord, int, int]]:
        """(segment, address, reserved bytes) of every target buffer."""
        return [
            (seg, addr, reserved_size(rep.size))
            for rep in self.active.values()
            for seg, addr in rep.targets
        ]

    # --- effects -----------------------------------------------------------------------------

    def apply_started(self, ev: ReplicationStarted, now: float) -> None:
        st = self.st
        obj = st.objects.get(ev.key)
        src_seg = st.segments.get(ev.source[0])
        if obj is None or src_seg is None:
            return
        targets = st._restored(ev.targets)
        self.active[ev.key] = Replication(
            ev.key, ev.move, ev.client, (src_seg, ev.source[1]), targets, obj.size, now
        )
        obj.flags |= TASK
        st._touch(ev.client, now)

    def apply_ended(self, ev: ReplicationEnded, now: float) -> None:
        st = self.st
        obj = st.objects.get(ev.key)
        rep = self._clear(obj, ev.key)
        if rep is not None:
            st._dirty_allocators.update(s.id for s, _ in rep.targets)

    def snapshot(self) -> list[ReplicationStarted]:
        return [
            ReplicationStarted(
                rep.key,
                rep.move,
                rep.client,
                (rep.source[0].id, rep.source[1]),
                tuple((s.id, a) for s, a in rep.targets),
            )
            for rep in self.active.values()
        ]

    def validate(self) -> None:
        st = self.st
        for key, rep in self.active.items():
            obj = st.objects.get(key)
            assert obj is not None and obj.flags & TASK, f"{key}: copy of a missing object"
            for seg, _ in rep.targets:
                assert st.segments.get(seg.id) is seg, f"{key}: copy target in a dropped segment"
        for key, obj in st.objects.items():
            if obj.flags & TASK:
                assert key in self.active, f"{key}: TASK flag without a copy in progress"
