"""The master's RPC surface: typed requests -> :class:`MasterState` calls -> wire values.

An explicit ``{request type: handler}`` table; every handler takes a validated
request (``wire/_master_msgs.py``) and the current time and returns a JSON-able
value or raises a :class:`StoreError`.  Batch starts and batch replica lookups
answer in columns (``wire/_master_replies.py``); other batch methods answer
``[[code, value], ...]`` per key.  Whole-index requests (``*ByRegex``,
``RemoveAll``) are not here: the service runs them shard by shard (``_scan.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ...errors import StoreError
from ...wire import PROTOCOL_VERSION
from ...wire import _master_msgs as msg
from ...wire._master_replies import ReplicaColumnsBuilder
from .._types import SegmentInfo
from ._records import READABLE, REF, Obj, SegmentRecord, reps_wire
from ._state import MasterState
from ._tasks import TaskStatus

__all__ = ["Handler", "build_handlers"]

Handler = Callable[[Any, float], Any]

_PROCESSING = 2  # ReplicaStatus.PROCESSING on the wire


def _each(keys: Sequence[str], fn: Callable[[int, str], Any]) -> list[list[Any]]:
    out: list[list[Any]] = []
    append = out.append
    for i, key in enumerate(keys):
        try:
            append([0, fn(i, key)])
        except StoreError as exc:
            append([exc.code, exc.message])
    return out


def _written(obj: Obj) -> list[list[object]]:
    """The replicas a put/upsert start hands out for writing."""
    pending = obj.pending()
    if pending:
        return reps_wire(pending, obj.extension().pending_size, _PROCESSING)
    return obj.wire()


def _describe(seg: SegmentRecord) -> list[Any]:
    """A segment as the columnar replies name it."""
    return [seg.name, seg.id, seg.num, seg.info.base]


def build_handlers(st: MasterState) -> dict[type, Handler]:
    def put_start(req: msg.PutStart, now: float) -> Any:
        return _written(st.put_start_replicas(req.client_id, req.key, req.size, req.config, now))

    def upsert_start(req: msg.UpsertStart, now: float) -> Any:
        return _written(st.upsert_start_replicas(req.client_id, req.key, req.size, req.config, now))

    def batch_start(start: Callable[..., Obj]) -> Handler:
        def handler(req: msg.BatchPutStart, now: float) -> Any:
            sizes, cfg, client = req.sizes, req.config, req.client_id
            out = ReplicaColumnsBuilder(_describe)
            code, counts, seg_col, addr_col = out.code, out.counts, out.seg, out.addr
            index = out.index
            for i, key in enumerate(req.keys):
                try:
                    obj = start(client, key, sizes[i], cfg, now)
                except StoreError as exc:
                    out.fail(exc.code, exc.message)
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
            return out.value()

        return handler

    def batch_keyed(fn: Callable[[str, str, float], None]) -> Handler:
        def handler(req: msg.BatchPutEnd, now: float) -> Any:
            client = req.client_id
            return _each(req.keys, lambda i, k: fn(client, k, now))

        return handler

    ttl_ms = st.config.default_kv_lease_ttl_ms

    def read_reply(obj: Obj) -> dict[str, Any]:
        return {"replicas": obj.wire(), "lease_ttl_ms": ttl_ms, "size": obj.size}

    def get_replica_list(req: msg.GetReplicaList, now: float) -> Any:
        return read_reply(st.read(req.key, st.lease_deadline(now)))

    def batch_get_replica_list(req: msg.BatchGetReplicaList, now: float) -> Any:
        lease = st.lease_deadline(now)  # one float shared by the batch
        read, get = st.read, st.objects.get
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
        return out.value(ttl_ms)

    def batch_exist_key(req: msg.BatchExistKey, now: float) -> Any:
        lease = st.lease_deadline(now)
        exists = st.exists
        return [exists(k, lease) for k in req.keys]

    def ping(req: msg.Ping, now: float) -> Any:
        res = st.ping(req.client_id, now)
        reply = {
            "view_version": res.view_version,
            "status": int(res.status),
            "instance": res.instance,
        }
        waiting = st.tasks.pending_for(req.client_id)
        if waiting:
            reply["tasks"] = waiting  # copy/move tasks to fetch (FetchTasks)
        return reply

    def batch_replica_clear(req: msg.BatchReplicaClear, now: float) -> Any:
        clear = st.replica_clear
        return [k for k in req.keys if clear(req.client_id, k, req.segment_name, now)]

    return {
        msg.ServiceReady: lambda req, now: PROTOCOL_VERSION,
        msg.GetSummary: lambda req, now: st.summary(),
        msg.Ping: ping,
        msg.MountSegment: lambda req, now: st.mount_segment(
            req.client_id, SegmentInfo.from_params(req.segment), now
        ),
        msg.ReMountSegment: lambda req, now: st.remount_segments(
            req.client_id, [SegmentInfo.from_params(s) for s in req.segments], now
        ),
        msg.UnmountSegment: lambda req, now: st.unmount_segment(req.client_id, req.segment_id, now),
        msg.PutStart: put_start,
        msg.PutEnd: lambda req, now: st.put_end(req.client_id, req.key, now),
        msg.PutRevoke: lambda req, now: st.put_revoke(req.client_id, req.key, now),
        msg.BatchPutStart: batch_start(st.put_start_replicas),
        msg.BatchPutEnd: batch_keyed(st.put_end),
        msg.BatchPutRevoke: batch_keyed(st.put_revoke),
        msg.UpsertStart: upsert_start,
        msg.UpsertEnd: lambda req, now: st.upsert_end(req.client_id, req.key, now),
        msg.UpsertRevoke: lambda req, now: st.upsert_revoke(req.client_id, req.key, now),
        msg.BatchUpsertStart: batch_start(st.upsert_start_replicas),
        msg.BatchUpsertEnd: batch_keyed(st.upsert_end),
        msg.BatchUpsertRevoke: batch_keyed(st.upsert_revoke),
        msg.GetReplicaList: get_replica_list,
        msg.BatchGetReplicaList: batch_get_replica_list,
        msg.ExistKey: lambda req, now: st.exist_key(req.key, now),
        msg.BatchExistKey: batch_exist_key,
        msg.Remove: lambda req, now: st.remove(req.key, req.force, now),
        msg.BatchRemove: lambda req, now: _each(
            req.keys, lambda i, k: st.remove(k, req.force, now)
        ),
        msg.BatchReplicaClear: batch_replica_clear,
        **_task_handlers(st),
    }


def _task_handlers(st: MasterState) -> dict[type, Handler]:
    """Copy/move tasks (``_tasks.py``) and the copies they run (``_replicate.py``)."""
    repl = st.replication
    tasks = st.tasks

    def fetch(req: msg.FetchTasks, now: float) -> Any:
        st._touch(req.client_id, now)
        limit = st.config.max_retry_attempts
        return [t.assignment(limit) for t in tasks.pop(req.client_id, req.batch_size, now)]

    return {
        msg.CreateCopyTask: lambda req, now: list(
            repl.create_copy_task(req.key, req.targets, now).id
        ),
        msg.CreateMoveTask: lambda req, now: list(
            repl.create_move_task(req.key, req.source, req.target, now).id
        ),
        msg.QueryTask: lambda req, now: tasks.query(req.task_id).query(),
        msg.FetchTasks: fetch,
        msg.MarkTaskToComplete: lambda req, now: tasks.complete(
            req.client_id, req.task_id, TaskStatus(req.status), req.message, now
        ),
        msg.CopyStart: lambda req, now: repl.copy_start(
            req.client_id, req.key, req.source, req.targets, now
        ),
        msg.CopyEnd: lambda req, now: repl.end(req.client_id, req.key, False, now),
        msg.CopyRevoke: lambda req, now: repl.revoke(req.client_id, req.key, False, now),
        msg.MoveStart: lambda req, now: repl.move_start(
            req.client_id, req.key, req.source, req.target, now
        ),
        msg.MoveEnd: lambda req, now: repl.end(req.client_id, req.key, True, now),
        msg.MoveRevoke: lambda req, now: repl.revoke(req.client_id, req.key, True, now),
    }
