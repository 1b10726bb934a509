"""Copy/move tasks and drain jobs of MasterState with an injected clock (no sockets)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from pymooncake.errors import StoreError
from pymooncake.store._config import MasterConfig
from pymooncake.store._types import ErrorCode, ReplicateConfig, SegmentInfo
from pymooncake.store.master._drain import JobStatus, SegmentStatus
from pymooncake.store.master._effects import DURABLE, effect_from_record
from pymooncake.store.master._state import MasterState
from pymooncake.store.master._tasks import TaskStatus, TaskType, format_id, parse_id

MiB = 1 << 20


def seg(name: str, base: int) -> SegmentInfo:
    return SegmentInfo(id=f"seg-{name}", name=name, base=base, size=16 * MiB, host_id="h")


@pytest.fixture
def st() -> Iterator[MasterState]:
    state = MasterState(
        MasterConfig(default_kv_lease_ttl_ms=1000, client_ttl_s=10), rng=random.Random(3)
    )
    state.effects = []
    for i, name in enumerate(("a", "b", "c")):
        state.mount_segment(f"owner-{name}", seg(name, 0x10000000 * (i + 1)), 0.0)
    yield state
    state.validate()


def put(st: MasterState, key: str, on: str, size: int = 4096, now: float = 0.0) -> None:
    st.put_start("writer", key, size, ReplicateConfig(preferred_segments=(on,)), now)
    st.put_end("writer", key, now)


def names(st: MasterState, key: str) -> list[str]:
    return sorted(s.name for s, _ in st.objects[key].replicas())


def code(exc: pytest.ExceptionInfo[StoreError]) -> int:
    return exc.value.code


def run_task(st: MasterState, client: str, now: float = 1.0) -> None:
    """Do what a client does with its fetched tasks: start, (write), end, report."""
    for t in st.tasks.pop(client, 16, now):
        move = t.type == TaskType.REPLICA_MOVE
        if move:
            st.replication.move_start(client, t.key, t.source, t.targets[0], now)
        else:
            st.replication.copy_start(client, t.key, t.source, t.targets, now)
        st.replication.end(client, t.key, move, now)
        st.tasks.complete(client, t.id, TaskStatus.SUCCESS, "ok", now)


def test_copy_task_runs_on_the_source_owner(st: MasterState) -> None:
    put(st, "k", "a")
    task = st.replication.create_copy_task("k", ("b", "c"), 0.5)
    assert task.client == "owner-a" and task.status == TaskStatus.PENDING
    assert st.tasks.pending_for("owner-a") == 1
    assert st.tasks.pop("owner-b", 16, 0.6) == []
    [t] = st.tasks.pop("owner-a", 16, 0.6)
    assert t.status == TaskStatus.PROCESSING
    reply = st.replication.copy_start("owner-a", "k", "a", ("b", "c"), 0.7)
    assert reply["source"][1] == "a" and [r[1] for r in reply["targets"]] == ["b", "c"]
    # not readable before the end; the object is locked meanwhile
    assert names(st, "k") == ["a"]
    st.validate()
    with pytest.raises(StoreError) as exc:
        st.remove("k", True, 0.8)
    assert code(exc) == ErrorCode.OBJECT_HAS_REPLICATION_TASK
    with pytest.raises(StoreError) as exc:
        st.upsert_start("w2", "k", 10, ReplicateConfig(), 0.8)
    assert code(exc) == ErrorCode.OBJECT_HAS_REPLICATION_TASK
    assert st.remove_all(True, 0.8) == 0
    st.replication.end("owner-a", "k", False, 0.9)
    assert names(st, "k") == ["a", "b", "c"]
    st.tasks.complete("owner-a", t.id, TaskStatus.SUCCESS, "done", 1.0)
    q = st.tasks.query(t.id).query()
    assert q["status"] == TaskStatus.SUCCESS and q["type"] == TaskType.REPLICA_COPY
    assert q["message"] == "done"
    st.remove("k", True, 1.1)  # unlocked


def test_copy_to_a_segment_holding_a_replica_is_a_noop(st: MasterState) -> None:
    st.put_start("w", "k", 100, ReplicateConfig(replica_num=2, preferred_segments=("a", "b")), 0)
    st.put_end("w", "k", 0)
    st.replication.create_copy_task("k", ("b",), 0)
    client = st.objects["k"].seg.client_id  # type: ignore[union-attr]
    run_task(st, client)
    assert names(st, "k") == ["a", "b"]


def test_move_drops_the_source_after_the_leases(st: MasterState) -> None:
    put(st, "k", "a")
    st.read("k", 5.0)  # a reader holds a lease until t=5
    before = st.segments["seg-a"].allocator.allocated
    st.replication.create_move_task("k", "a", "b", 1.0)
    run_task(st, "owner-a", 1.0)
    assert names(st, "k") == ["b"]
    # the old buffer stays reserved for the reader until its lease ends
    assert st.segments["seg-a"].allocator.allocated == before
    st.tick(5.5)
    assert st.segments["seg-a"].allocator.allocated == 0


def test_create_task_errors(st: MasterState) -> None:
    put(st, "k", "a")
    repl = st.replication
    cases = [
        (lambda: repl.create_copy_task("nope", ("b",), 0), ErrorCode.OBJECT_NOT_FOUND),
        (lambda: repl.create_move_task("nope", "a", "b", 0), ErrorCode.OBJECT_NOT_FOUND),
        (lambda: repl.create_copy_task("k", ("x", "y"), 0), ErrorCode.INVALID_PARAMS),
        (lambda: repl.create_copy_task("k", (), 0), ErrorCode.INVALID_PARAMS),
        (lambda: repl.create_move_task("k", "x", "b", 0), ErrorCode.INVALID_PARAMS),
        (lambda: repl.create_move_task("k", "a", "x", 0), ErrorCode.INVALID_PARAMS),
        (lambda: repl.create_move_task("k", "a", "a", 0), ErrorCode.INVALID_PARAMS),
    ]
    for fn, want in cases:
        with pytest.raises(StoreError) as exc:
            fn()
        assert code(exc) == want
    with pytest.raises(StoreError) as exc:
        st.tasks.query((1, 2))
    assert code(exc) == ErrorCode.TASK_NOT_FOUND
    with pytest.raises(StoreError) as exc:
        st.replication.end("owner-a", "k", False, 0)
    assert code(exc) == ErrorCode.OBJECT_NO_REPLICATION_TASK


def test_limits_and_timeouts() -> None:
    cfg = MasterConfig(
        max_total_pending_tasks=2,
        max_total_processing_tasks=1,
        pending_task_timeout_s=10,
        processing_task_timeout_s=5,
        max_total_finished_tasks=1,
    )
    st = MasterState(cfg, rng=random.Random(1))
    st.mount_segment("oa", seg("a", 0x10000000), 0)
    st.mount_segment("ob", seg("b", 0x20000000), 0)
    for k in ("k1", "k2", "k3"):
        put(st, k, "a")
    t1 = st.replication.create_copy_task("k1", ("b",), 0)
    t2 = st.replication.create_copy_task("k2", ("b",), 0)
    with pytest.raises(StoreError) as exc:
        st.replication.create_copy_task("k3", ("b",), 0)
    assert code(exc) == ErrorCode.TASK_PENDING_LIMIT_EXCEEDED
    assert [t.id for t in st.tasks.pop("oa", 16, 1)] == [t1.id]  # processing cap 1
    for client in ("oa", "ob"):
        st.ping(client, 4)
    st.tick(7)  # t1 silent for 6 s > 5
    assert t1.status == TaskStatus.FAILED and t1.message == "processing timeout"
    for client in ("oa", "ob"):
        st.ping(client, 10)
    st.tick(11)  # t2 pending for 11 s > 10
    assert t2.status == TaskStatus.FAILED and t2.message == "pending timeout"
    assert len(st.tasks.tasks) == 1  # max_total_finished_tasks
    with pytest.raises(StoreError) as exc:
        st.tasks.complete("ob", t2.id, TaskStatus.SUCCESS, "", 12)
    assert code(exc) in (ErrorCode.ILLEGAL_CLIENT, ErrorCode.TASK_NOT_FOUND)
    st.validate()


def test_lost_target_and_source_and_expired_client(st: MasterState) -> None:
    put(st, "k", "a")
    st.replication.copy_start("owner-a", "k", "a", ("b", "c"), 1)
    st.unmount_segment("owner-c", "seg-c", 1)
    with pytest.raises(StoreError) as exc:
        st.replication.end("owner-a", "k", False, 2)
    assert code(exc) == ErrorCode.REPLICA_IS_GONE
    assert names(st, "k") == ["a", "b"]
    st.validate()
    put(st, "j", "a")
    st.replication.move_start("owner-a", "j", "a", "b", 3)
    st.unmount_segment("owner-a", "seg-a", 3)  # the source (and only replica) goes
    assert "j" not in st.objects
    st.validate()
    put(st, "m", "b")
    st.mount_segment("owner-c", seg("c", 0x30000000), 4)
    st.replication.copy_start("owner-b", "m", "b", ("c",), 4)
    st.expire_client("owner-b", 5)
    st.validate()
    assert "m" not in st.objects and not st.replication.active


def test_task_effects_replay_and_restart(st: MasterState) -> None:
    put(st, "k", "a")
    put(st, "j", "a")
    done = st.replication.create_copy_task("k", ("b",), 0)
    run_task(st, "owner-a")
    busy = st.replication.create_move_task("j", "a", "c", 2)
    st.tasks.pop("owner-a", 16, 2)
    st.replication.move_start("owner-a", "j", "a", "c", 2)
    pending = st.replication.create_copy_task("j", ("b",), 3)
    records = [e.record() for e in st.drain_effects() if isinstance(e, DURABLE)]
    fresh = MasterState(MasterConfig())
    fresh.replay([effect_from_record(r) for r in records], 10)
    fresh.validate()
    assert fresh.tasks.query(done.id).status == TaskStatus.SUCCESS
    assert names(fresh, "k") == ["a", "b"]
    assert fresh.tasks.query(busy.id).status == TaskStatus.FAILED  # was processing
    assert fresh.tasks.query(pending.id).status == TaskStatus.PENDING
    assert not fresh.objects["j"].flags & 32  # no copy survives a restart
    # a standby applies every effect, the copy in flight included
    standby = MasterState(MasterConfig())
    for e in st.snapshot_effects() + [
        e for i in range(len(st.objects.shards)) for e in st.shard_effects(i, writes=True)
    ]:
        standby.apply(e, 10)
    standby.promote(10)
    standby.validate()
    assert "j" in standby.replication.active
    standby.replication.end("owner-a", "j", True, 11)
    assert names(standby, "j") == ["c"]
    st.replication.revoke("owner-a", "j", True, 4)


def test_id_text_form() -> None:
    assert format_id((1, 2)) == "1-2"
    assert parse_id("18446744073709551615-0") == ((1 << 64) - 1, 0)
    for bad in ("", "1", "-1", "1-", "a-b", "18446744073709551616-0"):
        assert parse_id(bad) is None


def test_drain_moves_everything_and_blocks_placement(st: MasterState) -> None:
    for i in range(5):
        put(st, f"k{i}", "a")
    job = st.drains.create(("a",), ("b",), 2, 1)
    assert st.drains.segment_status("a") == SegmentStatus.DRAINING
    assert len(job.active) == 2
    # new puts that prefer the draining segment land elsewhere
    put(st, "new", "a", now=1)
    assert names(st, "new") != ["a"]
    with pytest.raises(StoreError) as exc:
        st.drains.cancel(job.id, 1)
    assert code(exc) == ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS
    for _ in range(5):
        run_task(st, "owner-a", 2)
    assert job.status == JobStatus.SUCCEEDED, job.query()
    q = job.query()
    assert q["succeeded_units"] == 5 and q["active_units"] == 0
    assert q["migrated_bytes"] == 5 * 4096
    assert st.drains.segment_status("a") == SegmentStatus.DRAINED
    for i in range(5):
        assert names(st, f"k{i}") == ["b"]
    with pytest.raises(StoreError) as exc:
        st.drains.create(("a",), (), 1, 3)
    assert code(exc) == ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS


def test_drain_validation_and_cancel(st: MasterState) -> None:
    cases = [
        ((), (), 1, ErrorCode.INVALID_PARAMS),
        (("a",), (), 0, ErrorCode.INVALID_PARAMS),
        (("a", "a"), (), 1, ErrorCode.INVALID_PARAMS),
        (("a",), ("a",), 1, ErrorCode.INVALID_PARAMS),
        (("x",), (), 1, ErrorCode.SEGMENT_NOT_FOUND),
        (("a",), ("x",), 1, ErrorCode.SEGMENT_NOT_FOUND),
    ]
    for segments, targets, n, want in cases:
        with pytest.raises(StoreError) as exc:
            st.drains.create(segments, targets, n, 0)
        assert code(exc) == want
    with pytest.raises(StoreError) as exc:
        st.drains.get((5, 5))
    assert code(exc) == ErrorCode.JOB_NOT_FOUND
    put(st, "k", "a")
    st.read("k", 100)  # leased objects are still moved
    job = st.drains.create(("a",), (), 1, 0)
    assert len(job.active) == 1
    [t] = st.tasks.pop("owner-a", 16, 1)
    st.tasks.complete("owner-a", t.id, TaskStatus.FAILED, "injected", 1)
    assert job.failed == 1 and len(job.active) == 1  # retried at once
    [t] = st.tasks.pop("owner-a", 16, 1)
    st.tasks.complete("owner-a", t.id, TaskStatus.FAILED, "injected", 1)
    [t] = st.tasks.pop("owner-a", 16, 1)
    st.tasks.complete("owner-a", t.id, TaskStatus.FAILED, "injected", 1)
    # three failures of one unit: the job fails and the segment is usable again
    assert job.status == JobStatus.FAILED, job.query()
    assert st.drains.segment_status("a") == SegmentStatus.OK
    job2 = st.drains.create(("c",), (), 1, 2)  # empty: done at once
    assert job2.status == JobStatus.SUCCEEDED
    with pytest.raises(StoreError):
        st.drains.cancel(job2.id, 3)


def test_drain_survives_a_restart(st: MasterState) -> None:
    put(st, "k", "a")
    job = st.drains.create(("a",), ("b",), 1, 0)
    records = [e.record() for e in st.drain_effects() if isinstance(e, DURABLE)]
    fresh = MasterState(MasterConfig())
    fresh.effects = []
    fresh.replay([effect_from_record(r) for r in records], 10)
    assert fresh.drains.segment_status("a") == SegmentStatus.DRAINING
    fresh.tick(11)
    fresh.validate()
    again = fresh.drains.get(job.id)
    assert again.status == JobStatus.RUNNING and len(again.active) == 1


def test_drain_of_an_object_with_replicas_elsewhere(st: MasterState) -> None:
    st.put_start("w", "two", 100, ReplicateConfig(replica_num=2, preferred_segments=("a", "b")), 0)
    st.put_end("w", "two", 0)
    # only b may take it, and b holds it already: the move just drops a's replica
    job = st.drains.create(("a",), ("b",), 1, 1)
    run_task(st, "owner-a", 2)
    assert job.status == JobStatus.SUCCEEDED, job.query()
    assert names(st, "two") == ["b"]


def test_an_object_being_copied_is_not_evicted(st: MasterState) -> None:
    put(st, "k", "a")
    put(st, "other", "a")
    st.replication.copy_start("owner-a", "k", "a", ("b",), 1)
    seg_a = st.segments["seg-a"]
    st._evict(seg_a, seg_a.allocator.capacity, 100)
    assert "k" in st.objects and "other" not in st.objects
    assert st.replica_clear("writer", ["k"][0], "", 100) is False
    st.replication.end("owner-a", "k", False, 101)
    assert names(st, "k") == ["a", "b"]


def test_a_drained_owner_that_dies_ends_the_job(st: MasterState) -> None:
    put(st, "k", "a")
    job = st.drains.create(("a",), ("b",), 1, 1)
    assert len(job.active) == 1
    for client in ("owner-b", "owner-c", "writer"):
        st.ping(client, 20)
    st.tick(20)  # owner-a silent past client_ttl: expired, its segment and task go
    assert job.status == JobStatus.SUCCEEDED and not st.tasks.pending_for("owner-a")
    assert job.failed == 1
