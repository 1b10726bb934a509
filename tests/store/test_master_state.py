"""MasterState with an injected clock: no sockets, no threads."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from pymooncake.errors import (
    InvalidParams,
    NoAvailableHandle,
    ObjectExists,
    ObjectHasLease,
    ObjectNotFound,
    ReplicaNotReady,
    StoreError,
)
from pymooncake.store._config import MasterConfig
from pymooncake.store._types import (
    ClientStatus,
    ErrorCode,
    ReplicaStatus,
    ReplicateConfig,
    SegmentInfo,
    SoftPinAction,
)
from pymooncake.store.master._allocator import OffsetAllocator
from pymooncake.store.master._effects import DURABLE
from pymooncake.store.master._state import MasterState, client_tag

MiB = 1 << 20
ONE = ReplicateConfig()


def seg(
    name: str, size: int = 16 * MiB, base: int = 0x10000000, sid: str | None = None
) -> SegmentInfo:
    return SegmentInfo(
        id=sid or f"seg-{name}", name=name, base=base, size=size, host_id=name.split(":")[0]
    )


@pytest.fixture
def state() -> Iterator[MasterState]:
    st = MasterState(
        MasterConfig(default_kv_lease_ttl_ms=1000, client_ttl_s=10), rng=random.Random(1)
    )
    yield st
    st.validate()


def put(
    st: MasterState, key: str, size: int, now: float, client: str = "c1", cfg: ReplicateConfig = ONE
) -> None:
    st.put_start(client, key, size, cfg, now)
    st.put_end(client, key, now)


# --- allocator ------------------------------------------------------------------


def test_allocator_best_fit_and_coalescing() -> None:
    a = OffsetAllocator(0x1000, 1024)
    x = a.allocate(100)
    y = a.allocate(200)
    z = a.allocate(100)
    assert x and y and z
    assert x[0] == 0x1000 and x[1] == 128  # rounded to 64 bytes
    a.validate([x, y, z])
    a.free(*y)
    # best fit: a 150-byte request reuses y's 256-byte hole, not the tail
    w = a.allocate(150)
    assert w is not None and w[0] == y[0]
    a.free(*x)
    a.free(*w)
    a.free(*z)
    a.validate([])
    assert a.allocated == 0 and a.largest_free == 1024 and a.live_count == 0
    assert a.allocate(1025) is None
    with pytest.raises(ValueError):
        a.free(0x1000, 128)  # double free


def test_allocator_random_churn_keeps_invariants() -> None:
    rng = random.Random(5)
    a = OffsetAllocator(1 << 20, 1 << 20)
    live: list[tuple[int, int]] = []
    for _ in range(3000):
        if live and rng.random() < 0.45:
            a.free(*live.pop(rng.randrange(len(live))))
        else:
            got = a.allocate(rng.randint(1, 8192))
            if got:
                live.append(got)
    a.validate(live)
    for start, size in live:
        a.free(start, size)
    a.validate([])
    assert a.largest_free == 1 << 20


# --- segments and puts ------------------------------------------------------------


def test_two_phase_put_and_get(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    descs = state.put_start("c1", "k", 1000, ONE, 1.0)
    assert len(descs) == 1 and descs[0].status is ReplicaStatus.PROCESSING
    assert descs[0].endpoint == "a:1" and descs[0].size == 1000
    assert state.exist_key("k", 1.0) is False
    with pytest.raises(ReplicaNotReady):
        state.get_replica_list("k", 1.0)
    state.put_end("c1", "k", 2.0)
    state.put_end("c1", "k", 2.0)  # repeating is harmless
    res = state.get_replica_list("k", 2.0)
    assert [r.address for r in res.replicas] == [descs[0].address]
    assert res.lease_ttl_ms == 1000 and res.size == 1000
    with pytest.raises(ObjectNotFound):
        state.get_replica_list("missing", 2.0)


def test_keys_are_immutable(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    put(state, "k", 10, 0)
    with pytest.raises(ObjectExists) as info:
        state.put_start("c2", "k", 20, ONE, 1)
    assert info.value.code == ErrorCode.OBJECT_ALREADY_EXISTS


def test_concurrent_put_of_same_key_and_preemption(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    state.put_start("c1", "k", 10, ONE, 0)
    with pytest.raises(ReplicaNotReady, match="being written by client#") as busy:
        state.put_start("c2", "k", 10, ONE, 5)  # nothing readable yet: not "exists"
    assert client_tag("c1") in busy.value.message  # never the id: it is c1's credential
    assert "c1 " not in busy.value.message
    # after put_start_discard_timeout (30 s) a new writer may take over
    descs = state.put_start("c2", "k", 10, ONE, 40)
    with pytest.raises(StoreError) as info:
        state.put_end("c1", "k", 41)
    assert info.value.code == ErrorCode.ILLEGAL_CLIENT
    state.put_end("c2", "k", 41)
    assert state.get_replica_list("k", 42).replicas[0].address == descs[0].address
    # the preempted buffer stays reserved until put_start_release_timeout
    assert state.segments["seg-a:1"].allocator.live_count == 2
    state.ping("c1", 642)
    state.tick(642)
    assert state.segments["seg-a:1"].allocator.live_count == 1


def test_revoke_frees_space(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1", size=4096), 0)
    state.put_start("c1", "k", 4096, ONE, 0)
    with pytest.raises(NoAvailableHandle):
        state.put_start("c1", "k2", 4096, ONE, 0)  # in-flight objects are not evictable
    state.put_revoke("c1", "k", 1)
    assert "k" not in state.objects
    put(state, "k2", 4096, 2)


def test_invalid_puts(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    for key, size, cfg in [("", 1, ONE), ("k", 0, ONE), ("k", 1, ReplicateConfig(replica_num=0))]:
        with pytest.raises(InvalidParams):
            state.put_start("c1", key, size, cfg, 0)
    with pytest.raises(InvalidParams, match="max_kv_soft_pin_ttl"):
        state.put_start(
            "c1", "k", 1, ReplicateConfig(with_soft_pin=True, soft_pin_ttl_ms=10**12), 0
        )
    with pytest.raises(InvalidParams, match="only valid with soft_pin_action ENABLE"):
        state.put_start("c1", "k", 1, ReplicateConfig(soft_pin_ttl_ms=1000), 0)
    with pytest.raises(InvalidParams, match="only valid with soft_pin_action ENABLE"):
        state.put_start(
            "c1",
            "k",
            1,
            ReplicateConfig(soft_pin_action=SoftPinAction.DISABLE, soft_pin_ttl_ms=1000),
            0,
        )


def test_no_segment_no_handle(state: MasterState) -> None:
    with pytest.raises(NoAvailableHandle, match="0 segment"):
        state.put_start("c1", "k", 1, ONE, 0)


def test_replicas_land_in_distinct_segments(state: MasterState) -> None:
    for i in range(3):
        state.mount_segment(f"c{i}", seg(f"n{i}:1", sid=f"s{i}"), 0)
    descs = state.put_start("c0", "k", 100, ReplicateConfig(replica_num=3), 0)
    assert sorted(d.endpoint for d in descs) == ["n0:1", "n1:1", "n2:1"]
    # more replicas than segments: best effort
    descs = state.put_start("c0", "k2", 100, ReplicateConfig(replica_num=5), 0)
    assert len(descs) == 3
    # two segments of one client share a name: never two replicas there
    state.mount_segment("c0", seg("n0:1", base=0x40000000, sid="s0b"), 0)
    descs = state.put_start("c0", "k3", 100, ReplicateConfig(replica_num=4), 0)
    assert len({d.endpoint for d in descs}) == len(descs) == 3


def test_preferred_segment(state: MasterState) -> None:
    for i in range(4):
        state.mount_segment(f"c{i}", seg(f"n{i}:1", sid=f"s{i}"), 0)
    for k in range(10):
        descs = state.put_start(
            "c0", f"k{k}", 100, ReplicateConfig(preferred_segments=("n2:1",)), 0
        )
        assert descs[0].endpoint == "n2:1"


def test_mount_rules(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    state.mount_segment("c1", seg("a:1"), 0)  # idempotent
    with pytest.raises(StoreError) as info:
        state.mount_segment("c2", seg("a:1"), 0)
    assert info.value.code == ErrorCode.SEGMENT_ALREADY_EXISTS
    with pytest.raises(InvalidParams, match="overlaps"):
        state.mount_segment("c1", seg("a:1", base=0x10000000 + 4096, sid="other"), 0)
    with pytest.raises(InvalidParams):
        state.mount_segment("c1", SegmentInfo("x", "a:1", 0, 10), 0)


def test_unmount_drops_replicas_and_objects(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1", sid="sa"), 0)
    state.mount_segment("c2", seg("b:1", sid="sb"), 0)
    put(state, "both", 10, 0, cfg=ReplicateConfig(replica_num=2))
    put(state, "only_a", 10, 0, cfg=ReplicateConfig(preferred_segments=("a:1",)))
    state.unmount_segment("c1", "sa", 1)
    assert "only_a" not in state.objects
    assert [r.endpoint for r in state.get_replica_list("both", 1).replicas] == ["b:1"]
    with pytest.raises(StoreError) as info:
        state.unmount_segment("c2", "sa", 1)
    assert info.value.code == ErrorCode.SEGMENT_NOT_FOUND


# --- leases and removal ------------------------------------------------------------------


def test_lease_blocks_remove_until_expiry(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    put(state, "k", 10, 0)
    state.remove("k", False, 0.5)  # never read: no lease
    put(state, "k", 10, 1)
    state.get_replica_list("k", 1)
    with pytest.raises(ObjectHasLease):
        state.remove("k", False, 1.5)
    assert state.exist_key("k", 1.9)  # exist also renews
    with pytest.raises(ObjectHasLease):
        state.remove("k", False, 2.5)
    state.remove("k", False, 3.0)
    with pytest.raises(ObjectNotFound):
        state.remove("k", False, 3.0)


def test_force_remove_and_in_flight(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    put(state, "k", 10, 0)
    state.get_replica_list("k", 0)
    state.remove("k", True, 0.1)
    state.put_start("c1", "w", 10, ONE, 0)
    with pytest.raises(ReplicaNotReady):
        state.remove("w", True, 0.1)  # even force cannot remove an object being written


def test_remove_all_and_regex(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    for k in ["a1", "a2", "b1", "b2", "leased"]:
        put(state, k, 10, 0)
    state.get_replica_list("leased", 0)
    assert state.remove_by_regex("^a", False, 0) == 2
    assert state.remove_all(False, 0) == 2  # "leased" stays
    assert list(state.objects) == ["leased"]
    assert state.remove_all(True, 0) == 1
    with pytest.raises(InvalidParams):
        state.remove_by_regex("(", False, 0)


# --- eviction ------------------------------------------------------------------------------


def test_allocation_failure_evicts_lru_synchronously(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1", size=64 * 1024), 0)
    for i in range(16):
        put(state, f"k{i}", 4096, float(i))
    state.get_replica_list("k0", 100)  # k0 recently read -> leased and young
    put(state, "new", 4096, 100.5)
    assert "new" in state.objects
    assert "k0" in state.objects  # leased: protected
    assert "k1" not in state.objects  # least recently used went first
    assert state.metrics.evicted_keys >= 1


def test_no_available_handle_only_when_nothing_is_evictable(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1", size=8192), 0)
    put(state, "pinned", 4096, 0, cfg=ReplicateConfig(with_hard_pin=True))
    put(state, "leased", 4096, 0)
    state.get_replica_list("leased", 0)
    with pytest.raises(NoAvailableHandle, match="nothing left to evict"):
        state.put_start("c1", "x", 4096, ONE, 0.5)
    put(state, "x", 4096, 1.5)  # lease gone: "leased" is evicted
    assert "pinned" in state.objects and "leased" not in state.objects


def test_soft_pinned_objects_go_last(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1", size=3 * 4096), 0)
    put(state, "soft", 4096, 0, cfg=ReplicateConfig(with_soft_pin=True))
    put(state, "plain1", 4096, 1)
    put(state, "plain2", 4096, 2)
    put(state, "new", 4096, 3)
    assert "soft" in state.objects and "plain1" not in state.objects


def test_watermark_eviction_in_tick(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1", size=100 * 4096), 0)
    for i in range(95):
        put(state, f"k{i}", 4096, float(i) / 100)
    state.ping("c1", 5)
    state.tick(5)
    used = state.summary()["allocated_bytes"] / state.summary()["capacity_bytes"]
    assert used <= 0.90 - 0.05 + 1e-9
    assert "k0" not in state.objects and "k94" in state.objects


# --- clients ------------------------------------------------------------------------------


def test_client_expiry_unmounts_segments_and_revokes_puts(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1", sid="sa"), 0)
    state.mount_segment("c2", seg("b:1", sid="sb"), 0)
    put(state, "on_a", 10, 0, "c1", ReplicateConfig(preferred_segments=("a:1",)))
    put(state, "on_b", 10, 0, "c1", ReplicateConfig(preferred_segments=("b:1",)))
    state.put_start("c1", "half", 10, ReplicateConfig(preferred_segments=("b:1",)), 0)
    for t in range(1, 12):
        state.ping("c2", t)
        state.tick(t)
    assert "c1" not in state.clients and "sa" not in state.segments
    assert "on_a" not in state.objects  # its only replica was in c1's memory
    assert "on_b" in state.objects  # lives in c2's memory
    assert "half" not in state.objects  # the dead writer's put was revoked
    assert state.ping("c1", 12).status is ClientStatus.NEED_REMOUNT
    state.remount_segments("c1", [seg("a:1", sid="sa")], 12)
    assert state.ping("c1", 12).status is ClientStatus.OK


def test_master_stall_does_not_mass_expire_clients(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    state.tick(0)
    state.tick(60)  # the master slept through a minute
    assert "c1" in state.clients and state.stall_grace_count == 1
    for t in range(61, 72):  # normal ticking again: now the silent client expires
        state.tick(t)
    assert "c1" not in state.clients


def test_abandoned_put_reclaimed_after_release_timeout(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    state.put_start("c1", "k", 10, ONE, 0)
    for t in (100, 300, 500, 601):
        state.ping("c1", t)
        state.tick(t)
    assert "k" not in state.objects
    assert state.metrics.reclaimed_puts == 1


# --- upsert -------------------------------------------------------------------------------


def test_upsert_keeps_old_value_readable_until_end(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    put(state, "k", 100, 0)
    old = state.get_replica_list("k", 1).replicas[0]
    new = state.upsert_start("c1", "k", 200, ONE, 1.5)[0]
    assert new.address != old.address
    assert state.get_replica_list("k", 1.6).replicas[0].address == old.address  # old still served
    with pytest.raises(StoreError) as info:
        state.upsert_start("c2", "k", 10, ONE, 1.7)
    assert info.value.code == ErrorCode.OBJECT_REPLICA_BUSY
    state.upsert_end("c1", "k", 2)
    res = state.get_replica_list("k", 2)
    assert res.replicas[0].address == new.address and res.size == 200
    # the old buffer is freed only after the old readers' lease (until 2.6 + 1 s)
    assert state.segments["seg-a:1"].allocator.live_count == 2
    state.tick(3.7)
    assert state.segments["seg-a:1"].allocator.live_count == 1


def test_upsert_of_absent_key_is_a_put_and_revoke_restores(state: MasterState) -> None:
    state.mount_segment("c1", seg("a:1"), 0)
    state.upsert_start("c1", "k", 10, ONE, 0)
    state.upsert_end("c1", "k", 0)
    assert state.exist_key("k", 0)
    state.upsert_start("c1", "k", 10, ONE, 1)
    state.upsert_revoke("c1", "k", 1)
    assert state.exist_key("k", 1)  # old value untouched


def test_restarted_process_replaces_its_dead_predecessor(state: MasterState) -> None:
    # the old process (client c-old) crashed; a new one starts under the same segment
    # name before client_ttl expired the old one: the old segment must go at once
    state.mount_segment("c-old", seg("node:1", sid="old"), 0)
    put(state, "lost", 10, 0, "c-old")
    state.mount_segment("c-new", seg("node:1", sid="new", base=0x20000000), 1)
    assert "old" not in state.segments and "c-old" not in state.clients
    assert "lost" not in state.objects
    descs = state.put_start("c-new", "k", 10, ONE, 2)
    assert descs[0].segment_id == "new"


def test_journal_replay_restores_segments_objects_and_allocations() -> None:
    st = MasterState(MasterConfig(client_ttl_s=10), rng=random.Random(3))
    st.effects = []
    st.mount_segment("c1", seg("a:1", sid="sa"), 0)
    st.mount_segment("c2", seg("b:1", sid="sb"), 0)
    put(st, "kept", 1000, 1, "c1", ReplicateConfig(replica_num=2))
    put(st, "removed", 1000, 1, "c1")
    put(st, "upserted", 100, 1, "c1")
    st.upsert_start("c1", "upserted", 5000, ONE, 2)
    st.upsert_end("c1", "upserted", 2)
    st.put_start("c1", "unfinished", 10, ONE, 3)  # never committed: not restored
    st.remove("removed", False, 4)
    effects = st.drain_effects()
    assert {type(e).__name__ for e in effects} == {
        "SegmentMounted",
        "ObjectCommitted",
        "ObjectDeleted",
        "WriteStarted",
    }
    events = [e for e in effects if isinstance(e, DURABLE)]  # what a journal keeps

    restored = MasterState(MasterConfig(client_ttl_s=10))
    restored.replay(events, 100.0)
    restored.validate()
    assert set(restored.objects) == {"kept", "upserted"}
    assert restored.get_replica_list("upserted", 100).size == 5000
    before = {r.address for r in st.get_replica_list("kept", 5).replicas}
    assert {r.address for r in restored.get_replica_list("kept", 100).replicas} == before
    # allocations are exactly the restored replicas: nothing leaked, nothing double-booked
    assert sum(seg.allocator.live_count for seg in restored.segments.values()) == 3
    # restored clients are alive for client_ttl, then expire if they never return
    assert restored.ping("c1", 101).status is ClientStatus.OK
    # and the compacted form replays to the same state
    again = MasterState()
    again.replay(restored.snapshot_effects(), 200.0)
    again.validate()
    assert set(again.objects) == {"kept", "upserted"}


def test_a_standby_applying_every_effect_equals_the_leader() -> None:
    """Writes in flight travel too: a promoted standby can finish them, and its
    allocators reserve exactly what the leader had reserved."""
    leader = MasterState(MasterConfig(client_ttl_s=10), rng=random.Random(4))
    leader.effects = []
    standby = MasterState(MasterConfig(client_ttl_s=10))

    def sync(now: float) -> None:
        for e in leader.drain_effects():
            standby.apply(e, now)

    leader.mount_segment("c1", seg("a:1", sid="sa"), 0)
    leader.mount_segment("c2", seg("b:1", sid="sb", base=0x20000000), 0)
    put(leader, "done", 1000, 1, "c1", ReplicateConfig(replica_num=2))
    put(leader, "old", 100, 1, "c2")
    leader.put_start("c1", "writing", 4096, ONE, 2)
    leader.upsert_start("c2", "old", 300, ONE, 2)
    leader.put_start("c2", "revoked", 64, ONE, 2)
    leader.put_revoke("c2", "revoked", 2)
    sync(3)
    standby.promote(3)
    standby.validate()
    assert set(standby.objects) == {"done", "old", "writing"}
    for seg_id in ("sa", "sb"):
        assert (
            standby.segments[seg_id].allocator.allocated
            == leader.segments[seg_id].allocator.allocated
        )
    # the writers finish against the new leader
    standby.put_end("c1", "writing", 4)
    standby.upsert_end("c2", "old", 4)
    assert standby.get_replica_list("old", 5).size == 300
    assert standby.get_replica_list("writing", 5).size == 4096
    standby.validate()


def test_a_read_lease_ends_within_a_fraction_of_a_millisecond_of_its_ttl() -> None:
    """The reference's own store test removes a key one lease ttl after reading it
    and expects success: the shared, rounded deadline may not run much past it."""
    st = MasterState(MasterConfig(default_kv_lease_ttl_ms=500))
    for now in (0.0, 1.000_01, 12.345_678, 99_999.999_9):
        until = st.lease_deadline(now)
        assert now + 0.5 <= until <= now + 0.5 + 0.000_2
    # reads in the same step share one float object
    assert st.lease_deadline(5.000_1) is st.lease_deadline(5.000_11)
