"""The master's RPC surface: typed requests -> :class:`MasterState` calls -> wire values.

An explicit ``{request type: handler}`` table; every handler takes a validated
request (``wire/_master_msgs.py``) and the current time and returns the request's
typed reply (``wire/_master_reply_msgs.py``; the service sends its ``to_wire()``)
or raises a :class:`StoreError`.  Batch starts and batch replica lookups answer
in columns (``wire/_master_replies.py``); other batch methods answer a code and
message per key.  Whole-index requests (``*ByRegex``,
``RemoveAll``) are not here: the service runs them shard by shard (``_scan.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from ...errors import StoreError
from ...wire import PROTOCOL_VERSION
from ...wire import _master_msgs as msg
from ...wire import _master_reply_msgs as rep
from ...wire._master_replies import ReplicaColumns, ReplicaColumnsBuilder
from .._types import SegmentInfo
from ._records import READABLE, REF, Obj, SegmentRecord, reps_wire
from ._slot_runs import SlotRun
from ._state import MasterState, start_each
from ._tasks import Task, TaskStatus, client_uuid

__all__ = ["Handler", "build_handlers"]

Handler = Callable[[Any, float], rep.Reply]

_PROCESSING = 2  # ReplicaStatus.PROCESSING on the wire


def _each(
    cls: type[rep.BatchKeyResultsReply], keys: Sequence[str], fn: Callable[[str], None]
) -> rep.BatchKeyResultsReply:
    codes: list[int] = []
    messages: list[str | None] = []
    for key in keys:
        try:
            fn(key)
        except StoreError as exc:
            codes.append(exc.code)
            messages.append(exc.message)
            continue
        codes.append(0)
        messages.append(None)
    return cls(tuple(codes), tuple(messages))


def _written(obj: Obj) -> tuple[rep.ReplicaWire, ...]:
    """The replicas a put/upsert start hands out for writing."""
    pending = obj.pending()
    if pending:
        return rep.replicas_of(reps_wire(pending, obj.extension().pending_size, _PROCESSING))
    return obj.wire()


def start_columns(started: Iterable[Obj | StoreError]) -> ReplicaColumns:
    """The columns of a batch start's reply: where to write each object (the
    replicas being written), or why it was refused."""
    out = ReplicaColumnsBuilder(_describe)
    code, counts, seg_col, addr_col = out.code, out.counts, out.seg, out.addr
    index = out.index
    for obj in started:
        if type(obj) is not Obj:
            assert isinstance(obj, StoreError)
            out.fail(obj.code, obj.message)
            continue
        code.append(0)
        ext = obj.ext
        if ext is None or (not ext.pending and not ext.more):
            seg = obj.seg  # the common case: one replica, written in place
            j = index.get(seg)
            seg_col.append(out.segment_index(seg) if j is None else j)
            addr_col.append(obj.addr)
            counts.append(1)
            continue
        reps = ext.pending or obj.replicas()
        counts.append(len(reps))
        for s, a in reps:
            seg_col.append(out.segment_index(s))
            addr_col.append(a)
    return out.columns()


def run_columns(run: SlotRun) -> ReplicaColumns:
    """The columns of a reservation held as a run: buffer ``i`` at the address
    :meth:`SlotRun.place` gives (every one reserved, one replica each)."""
    out = ReplicaColumnsBuilder(_describe)
    n = run.count
    out.code += [0] * n
    out.counts += [1] * n
    stride = run.stride
    runs = []
    for first, end, seg, addr in run.spans():
        out.seg += [out.segment_index(seg)] * (end - first)
        out.addr += range(addr, addr + (end - first) * stride, stride)
        runs.append([addr, stride, end - first])
    return out.columns(addr_runs=runs)


def _done(cls: type[rep.DoneReply], fn: Callable[[Any, float], object]) -> Handler:
    """A handler for ``fn`` that answers ``cls()`` (null on the wire; one
    instance: it holds nothing)."""
    done = cls()

    def handler(req: Any, now: float) -> rep.Reply:
        fn(req, now)
        return done

    return handler


def _query(t: Task) -> rep.QueryTaskReply:
    return rep.QueryTaskReply(
        t.id,
        int(t.type),
        int(t.status),
        t.created_ms,
        t.updated_ms,
        client_uuid(t.client),
        t.message,
    )


def _assignment(t: Task, limit: int) -> rep.TaskAssignment:
    return rep.TaskAssignment(
        t.id, int(t.type), t.key, t.source, tuple(t.targets), t.created_ms, limit
    )


def _copy_started(value: dict[str, Any], cls: type[rep.CopyStartReply]) -> rep.CopyStartReply:
    return cls(rep.replica_of(value["source"]), rep.replicas_of(value["targets"]))


def _describe(seg: SegmentRecord) -> list[Any]:
    """A segment as the columnar replies name it."""
    return [seg.name, seg.id, seg.num, seg.info.base]


def build_handlers(st: MasterState) -> dict[type, Handler]:
    def put_start(req: msg.PutStart, now: float) -> rep.PutStartReply:
        return rep.PutStartReply(
            _written(st.put_start_replicas(req.client_id, req.key, req.size, req.config, now))
        )

    def upsert_start(req: msg.UpsertStart, now: float) -> rep.UpsertStartReply:
        return rep.UpsertStartReply(
            _written(st.upsert_start_replicas(req.client_id, req.key, req.size, req.config, now))
        )

    def batch_start(
        start: Callable[..., Obj],
        cls: type[rep.ColumnsReply],
        many: Callable[..., list[Obj | StoreError]] | None = None,
    ) -> Handler:
        """A columnar batch start: ``many`` starts every key at once when given,
        else ``start`` is called per key."""

        def handler(req: msg.BatchPutStart, now: float) -> rep.ColumnsReply:
            started = (many or partial(start_each, start))(
                req.client_id, req.keys, req.sizes, req.config, now
            )
            return cls(start_columns(started))

        return handler

    def batch_ended(
        many: Callable[[str, Any, float], list[StoreError | None]],
        cls: type[rep.BatchKeyResultsReply],
    ) -> Handler:
        """A per-key batch: ``many(client, request, now)`` gives each key's error."""

        def handler(req: msg.BatchPutEnd, now: float) -> rep.BatchKeyResultsReply:
            errors = many(req.client_id, req, now)
            if not any(errors):
                return cls((0,) * len(errors), (None,) * len(errors))
            return cls(
                tuple([0 if e is None else e.code for e in errors]),
                tuple([None if e is None else e.message for e in errors]),
            )

        return handler

    def batch_keyed(
        fn: Callable[[str, str, float], None], cls: type[rep.BatchKeyResultsReply]
    ) -> Handler:
        def handler(req: msg.BatchPutEnd, now: float) -> rep.BatchKeyResultsReply:
            client = req.client_id
            return _each(cls, req.keys, lambda k: fn(client, k, now))

        return handler

    def reserve_slots(req: msg.ReserveSlots, now: float) -> rep.ReserveSlotsReply:
        run = st.reserve_slot_run(req.client_id, req.size, req.count, req.config, now, req.batch)
        if run is not None:
            return rep.ReserveSlotsReply(run_columns(run), st.slot_ttl())
        slots = st.reserve_slots(req.client_id, req.size, req.count, req.config, now, req.batch)
        return rep.ReserveSlotsReply(start_columns([obj for _, obj in slots]), st.slot_ttl())

    ttl_ms = st.config.default_kv_lease_ttl_ms

    def get_replica_list(req: msg.GetReplicaList, now: float) -> rep.GetReplicaListReply:
        obj = st.read(req.key, st.lease_deadline(now))
        return rep.GetReplicaListReply(obj.wire(), ttl_ms, obj.size)

    def batch_get_replica_list(
        req: msg.BatchGetReplicaList, now: float
    ) -> rep.BatchGetReplicaListReply:
        lease = st.lease_deadline(now)  # one float shared by the batch
        read, get = st.read, st.objects.get
        pinned = st.offload.read_leases  # (objects the SSD tier pins: see read())
        out = ReplicaColumnsBuilder(_describe, sizes=True)
        code, counts, seg_col, addr_col = out.code, out.counts, out.seg, out.addr
        sizes, index = out.sizes, out.index
        assert sizes is not None
        hits = hit_bytes = 0
        for key in req.keys:
            obj = get(key)
            if obj is None or not obj.flags & READABLE:
                try:
                    read(key, lease)  # raises the error (and counts the miss)
                except StoreError as exc:
                    out.fail(exc.code, exc.message)
                continue
            # read() inlined: extend the lease, mark referenced
            if obj.lease_until < lease:
                obj.lease_until = lease
            elif pinned:
                st.offload.read_pinned(key, lease)
            obj.flags |= REF
            hits += 1
            hit_bytes += obj.size
            code.append(0)
            sizes.append(obj.size)
            ext = obj.ext
            if ext is None or not ext.more:
                seg = obj.seg
                j = index.get(seg)
                seg_col.append(out.segment_index(seg) if j is None else j)
                addr_col.append(obj.addr)
                counts.append(1)
                continue
            reps = obj.replicas()
            counts.append(len(reps))
            for s, a in reps:
                seg_col.append(out.segment_index(s))
                addr_col.append(a)
        st.metrics.get_hits += hits
        st.metrics.get_hit_bytes += hit_bytes
        return rep.BatchGetReplicaListReply(out.columns(ttl_ms))

    def batch_exist_key(req: msg.BatchExistKey, now: float) -> rep.BatchExistKeyReply:
        lease = st.lease_deadline(now)
        exists = st.exists
        return rep.BatchExistKeyReply(tuple([exists(k, lease) for k in req.keys]))

    def ping(req: msg.Ping, now: float) -> rep.PingReply:
        res = st.ping(req.client_id, now)
        # tasks: copy/move tasks waiting for the client (it fetches them: FetchTasks)
        return rep.PingReply(
            res.view_version,
            int(res.status),
            res.instance,
            st.tasks.pending_for(req.client_id),
            client_ttl_ms=round(st.config.client_ttl_s * 1000),
        )

    def batch_replica_clear(req: msg.BatchReplicaClear, now: float) -> rep.Reply:
        clear = st.replica_clear
        return rep.BatchReplicaClearReply(
            tuple([k for k in req.keys if clear(req.client_id, k, req.segment_name, now)])
        )

    return {
        msg.ServiceReady: lambda req, now: rep.ServiceReadyReply(PROTOCOL_VERSION),
        msg.GetSummary: lambda req, now: rep.GetSummaryReply(**st.summary()),
        msg.Ping: ping,
        msg.MountSegment: _done(
            rep.MountSegmentReply,
            lambda req, now: st.mount_segment(
                req.client_id, SegmentInfo.from_params(req.segment), now
            ),
        ),
        msg.ReMountSegment: _done(
            rep.ReMountSegmentReply,
            lambda req, now: st.remount_segments(
                req.client_id, [SegmentInfo.from_params(s) for s in req.segments], now
            ),
        ),
        msg.UnmountSegment: lambda req, now: rep.UnmountSegmentReply(
            st.unmount_segment(req.client_id, req.segment_id, now)
        ),
        msg.PutStart: put_start,
        msg.PutEnd: _done(
            rep.PutEndReply, lambda req, now: st.put_end(req.client_id, req.key, now)
        ),
        msg.PutRevoke: _done(
            rep.PutRevokeReply, lambda req, now: st.put_revoke(req.client_id, req.key, now)
        ),
        msg.BatchPutStart: batch_start(
            st.put_start_replicas, rep.BatchPutStartReply, st.put_start_many
        ),
        msg.BatchPutEnd: batch_ended(
            lambda client, req, now: st.put_end_many(client, req.keys, now), rep.BatchPutEndReply
        ),
        msg.BatchPutRevoke: batch_keyed(st.put_revoke, rep.BatchPutRevokeReply),
        msg.UpsertStart: upsert_start,
        msg.UpsertEnd: _done(
            rep.UpsertEndReply, lambda req, now: st.upsert_end(req.client_id, req.key, now)
        ),
        msg.UpsertRevoke: _done(
            rep.UpsertRevokeReply, lambda req, now: st.upsert_revoke(req.client_id, req.key, now)
        ),
        msg.BatchUpsertStart: batch_start(
            st.upsert_start_replicas, rep.BatchUpsertStartReply, st.upsert_start_many
        ),
        msg.BatchUpsertEnd: batch_ended(
            lambda client, req, now: st.put_end_many(client, req.keys, now),
            rep.BatchUpsertEndReply,
        ),
        msg.BatchUpsertRevoke: batch_keyed(st.upsert_revoke, rep.BatchUpsertRevokeReply),
        msg.ReserveSlots: reserve_slots,
        msg.CommitSlot: _done(
            rep.CommitSlotReply,
            lambda req, now: st.commit_slot(req.client_id, req.slot, req.key, now),
        ),
        msg.BatchCommitSlots: batch_ended(
            lambda client, req, now: st.commit_slots_many(client, req.slots, req.keys, now),
            rep.BatchCommitSlotsReply,
        ),
        msg.GetReplicaList: get_replica_list,
        msg.BatchGetReplicaList: batch_get_replica_list,
        msg.ExistKey: lambda req, now: rep.ExistKeyReply(
            st.exists(req.key, st.lease_deadline(now))
        ),
        msg.BatchExistKey: batch_exist_key,
        msg.Remove: _done(rep.RemoveReply, lambda req, now: st.remove(req.key, req.force, now)),
        msg.BatchRemove: lambda req, now: _each(
            rep.BatchRemoveReply, req.keys, lambda k: st.remove(k, req.force, now)
        ),
        msg.BatchReplicaClear: batch_replica_clear,
        **_task_handlers(st),
    }


def _task_handlers(st: MasterState) -> dict[type, Handler]:
    """Copy/move tasks (``_tasks.py``) and the copies they run (``_replicate.py``)."""
    repl = st.replication
    tasks = st.tasks

    def fetch(req: msg.FetchTasks, now: float) -> rep.FetchTasksReply:
        st._touch(req.client_id, now)
        limit = st.config.max_retry_attempts
        return rep.FetchTasksReply(
            tuple([_assignment(t, limit) for t in tasks.pop(req.client_id, req.batch_size, now)])
        )

    return {
        msg.CreateCopyTask: lambda req, now: rep.CreateCopyTaskReply(
            repl.create_copy_task(req.key, req.targets, now).id
        ),
        msg.CreateMoveTask: lambda req, now: rep.CreateMoveTaskReply(
            repl.create_move_task(req.key, req.source, req.target, now).id
        ),
        msg.QueryTask: lambda req, now: _query(tasks.query(req.task_id)),
        msg.FetchTasks: fetch,
        msg.MarkTaskToComplete: _done(
            rep.MarkTaskToCompleteReply,
            lambda req, now: tasks.complete(
                req.client_id, req.task_id, TaskStatus(req.status), req.message, now
            ),
        ),
        msg.CopyStart: lambda req, now: _copy_started(
            repl.copy_start(req.client_id, req.key, req.source, req.targets, now),
            rep.CopyStartReply,
        ),
        msg.CopyEnd: _done(
            rep.CopyEndReply, lambda req, now: repl.end(req.client_id, req.key, False, now)
        ),
        msg.CopyRevoke: _done(
            rep.CopyRevokeReply, lambda req, now: repl.revoke(req.client_id, req.key, False, now)
        ),
        msg.MoveStart: lambda req, now: _copy_started(
            repl.move_start(req.client_id, req.key, req.source, req.target, now),
            rep.MoveStartReply,
        ),
        msg.MoveEnd: _done(
            rep.MoveEndReply, lambda req, now: repl.end(req.client_id, req.key, True, now)
        ),
        msg.MoveRevoke: _done(
            rep.MoveRevokeReply, lambda req, now: repl.revoke(req.client_id, req.key, True, now)
        ),
    }
