"""The master's SSD-tier state (``_offload.py``) with an injected clock: offload
work on heartbeats, pins, refusals, eviction, promotion, client expiry, and
disk effects through a journal record round trip (replay / a standby)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from pymooncake.errors import (
    ObjectExists,
    ObjectHasLease,
    ObjectNotFound,
    ReplicaNotReady,
    StoreError,
)
from pymooncake.store._config import MasterConfig
from pymooncake.store._types import LOCAL_DISK_SEGMENT, ErrorCode, ReplicateConfig, SegmentInfo
from pymooncake.store.master._effects import (
    DURABLE,
    DiskReplicaAdded,
    LocalDiskMounted,
    effect_from_record,
)
from pymooncake.store.master._handlers import build_handlers
from pymooncake.store.master._offload import CountMinSketch, wrap_handlers
from pymooncake.store.master._records import READABLE
from pymooncake.store.master._service import MasterService, RawJson
from pymooncake.store.master._state import MasterState
from pymooncake.wire import _master_msgs as msg
from pymooncake.wire import _master_reply_msgs as rp
from pymooncake.wire import _offload_msgs as omsg
from pymooncake.wire._master import encode_json

MiB = 1 << 20
ONE = ReplicateConfig()


def _state(**kw: Any) -> MasterState:
    cfg = MasterConfig(default_kv_lease_ttl_ms=1000, client_ttl_s=10, enable_offload=True, **kw)
    st = MasterState(cfg, rng=random.Random(1))
    st.effects = []
    return st


def _seg(name: str, size: int = 4 * MiB) -> SegmentInfo:
    return SegmentInfo(id=f"seg-{name}", name=name, base=0x10000000, size=size, host_id="h")


def _put(st: MasterState, key: str, size: int, now: float, client: str = "c1") -> None:
    st.put_start(client, key, size, ONE, now)
    st.put_end(client, key, now)
    st.offload.written(key)


def test_eager_offload_round_trip_and_disk_only_reads() -> None:
    st = _state()
    st.mount_segment("c1", _seg("a:1"), 0)
    st.offload.mount("c1", "127.0.0.1:9", 1 << 30, True, 0)
    _put(st, "k", MiB, 0)
    work = st.offload.heartbeat("c1", 0, 0, 1.0)
    ((key, size, seg_id, addr),) = work["offload"]
    assert (key, size, seg_id) == ("k", MiB, "seg-a:1") and addr >= 0x10000000
    assert st.objects["k"].lease_until >= 1.0 + st.config.offload_task_timeout_s  # pinned
    assert st.offload.notify("c1", ["k"], [MiB], False, 2.0) == [0]
    assert st.objects["k"].lease_until == 0.0  # unpinned
    # eviction drops the memory copy only
    st._delete("k", st.objects["k"])
    found = st.offload.read("k")
    assert found is not None and found["size"] == MiB
    assert found["replicas"][0][1] == "127.0.0.1:9"
    assert found["replicas"][0][5] == LOCAL_DISK_SEGMENT
    st.validate()


def test_reports_without_a_task_or_for_changed_values_are_refused() -> None:
    st = _state()
    st.mount_segment("c1", _seg("a:1"), 0)
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    _put(st, "k", 1000, 0)
    not_found = int(ErrorCode.OBJECT_NOT_FOUND)
    assert st.offload.notify("c1", ["k"], [1000], False, 1) == [not_found]  # no task
    st.offload.heartbeat("c1", 0, 0, 1)
    assert st.offload.notify("c1", ["k"], [999], False, 1) == [not_found]  # other size
    # re-registration: refused while a (maybe newer) value is in memory
    assert st.offload.notify("c1", ["k"], [1000], True, 1) == [int(ErrorCode.OBJECT_ALREADY_EXISTS)]
    assert st.offload.notify("c1", ["gone"], [5], True, 1) == [0]
    assert st.offload.notify("c2", ["x"], [5], True, 1) == [int(ErrorCode.CLIENT_NOT_FOUND)]
    st.validate()


def test_offload_on_evict_pins_then_lets_go() -> None:
    st = _state(offload_on_evict=True)
    st.mount_segment("c1", _seg("a:1", 2 * MiB), 0)
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    _put(st, "a", MiB, 0)
    _put(st, "b", MiB, 0)
    with pytest.raises(StoreError) as exc:  # nothing may go before it is on disk
        st.put_start("c1", "c", MiB, ONE, 1.0)
    assert exc.value.code == ErrorCode.NO_AVAILABLE_HANDLE
    h = wrap_handlers(st, build_handlers(st))
    with pytest.raises(ObjectHasLease, match="kept in memory until its owner copies it"):
        h[msg.Remove](msg.Remove("a"), 1.0)
    work = st.offload.heartbeat("c1", 0, 0, 1.0)
    keys = [w[0] for w in work["offload"]]
    assert keys and set(keys) <= {"a", "b"}
    assert st.offload.notify("c1", keys, [MiB] * len(keys), False, 1.5) == [0] * len(keys)
    st.put_start("c1", "c", MiB, ONE, 2.0)  # now an offloaded object is evicted
    st.put_end("c1", "c", 2.0)
    assert any(k not in st.objects and k in st.offload.replicas for k in keys)
    st.validate()


@pytest.mark.parametrize("read", ["get", "exists", "batch"])
@pytest.mark.parametrize("how", ["reported", "timed out", "evict pin", "removed"])
def test_a_reader_s_lease_outlives_the_ssd_tier_s_pin(how: str, read: str) -> None:
    """A read while the SSD tier pins an object (an offload task, or kept for
    offload by eviction) takes a lease like any read: when the pin ends, the
    object keeps that lease -- it is not evicted, removed without force or
    replaced under the reader (the pin's end once restored the lease from
    before the pin, and the memory went to the next put while the reader
    copied from it: another key's bytes read as this one's)."""
    evict = how == "evict pin"
    st = _state(offload_on_evict=evict)
    st.mount_segment("c1", _seg("a:1", 2 * MiB), 0)
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    _put(st, "a", MiB, 0)
    if evict:
        _put(st, "b", MiB, 0)
        with pytest.raises(StoreError):  # eviction pins both for offload
            st.put_start("c1", "c", MiB, ONE, 1.0)
        assert "a" in st.offload.evict_after
    else:
        assert st.offload.heartbeat("c1", 0, 0, 1.0)["offload"][0][0] == "a"
        assert "a" in st.offload.tasks
    h = wrap_handlers(st, build_handlers(st))
    if read == "get":
        h[msg.GetReplicaList](msg.GetReplicaList("a"), 1.5)
    elif read == "exists":
        assert h[msg.ExistKey](msg.ExistKey("a"), 1.5) == rp.ExistKeyReply(True)
    else:
        h[msg.BatchGetReplicaList](msg.BatchGetReplicaList(("a", "x")), 1.5)
    assert st.objects["a"].lease_until >= 1.5 + st.config.lease_ttl_s  # (the pin's, for now)
    if how == "reported":
        assert st.offload.notify("c1", ["a"], [MiB], False, 1.6) == [0]
    elif how == "timed out":
        st.offload.tick(1.0 + st.config.offload_task_timeout_s + 1)
    elif evict:
        st.offload.heartbeat("c1", 0, 0, 1.6)
        assert st.offload.notify("c1", ["a", "b"], [MiB, MiB], False, 1.6) == [0, 0]
    else:
        st.offload.remove("a")  # (an upsert starting drops the tier's work)
    assert "a" not in st.offload.tasks and "a" not in st.offload.evict_after
    reader_until = 1.5 + st.config.lease_ttl_s
    assert st.objects["a"].lease_until >= reader_until
    with pytest.raises(ObjectHasLease):
        st.remove("a", False, 1.7)
    st.validate()


def test_unmounting_the_tier_lets_go_of_what_eviction_kept_for_it() -> None:
    """Objects eviction kept in memory for an offload of a client whose tier goes
    away (unmounted, or the client expired) are no longer kept: their queue went
    with the tier, and they were pinned for good (never evicted)."""
    st = _state(offload_on_evict=True)
    st.mount_segment("c1", _seg("a:1", 2 * MiB), 0)
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    _put(st, "a", MiB, 0)
    _put(st, "b", MiB, 0)
    with pytest.raises(StoreError):
        st.put_start("c1", "c", MiB, ONE, 1.0)
    assert st.offload.evict_after == {"a", "b"} and set(st.offload.read_leases) == {"a", "b"}
    st.offload.unmount("c1")
    assert not st.offload.evict_after and not st.offload.read_leases
    assert st.objects["a"].lease_until == 0.0 and st.objects["b"].lease_until == 0.0
    st.put_start("c1", "c", MiB, ONE, 2.0)  # eviction takes one of them now
    st.validate()


def test_task_timeout_unpins() -> None:
    st = _state()
    st.mount_segment("c1", _seg("a:1"), 0)
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    _put(st, "k", 100, 0)
    st.offload.heartbeat("c1", 0, 0, 1.0)
    later = 1.0 + st.config.offload_task_timeout_s + 1
    st.ping("c1", later)
    st.tick(later)
    assert not st.offload.tasks and st.objects["k"].lease_until == 0.0
    assert st.offload.metrics.offload_timeouts == 1


def test_promotion_is_admitted_at_the_threshold() -> None:
    st = _state(promotion_on_hit=True, promotion_admission_threshold=2)
    st.mount_segment("c1", _seg("a:1"), 0)
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    assert st.offload.notify("c1", ["k"], [4096], True, 0) == [0]
    st.offload.read("k")
    assert st.offload.heartbeat("c1", 0, 0, 1)["promote"] == []
    st.offload.read("k")
    assert st.offload.heartbeat("c1", 0, 0, 1)["promote"] == [["k", 4096]]
    reps = st.offload.promotion_start("c1", "k", 4096, 2)
    assert len(reps) == 1
    st.put_end("c1", "k", 2)
    assert "k" in st.objects and "k" in st.offload.replicas
    with pytest.raises(ObjectExists):
        st.offload.promotion_start("c1", "k", 4096, 3)
    with pytest.raises(ObjectNotFound):
        st.offload.promotion_start("c1", "nope", 1, 3)
    st.validate()


def test_reads_during_a_promotion_are_served_from_the_disk_replica() -> None:
    """While a promotion writes the memory copy of a disk-only key, a read is
    answered with the disk replica (the same value), single and in a batch --
    not ReplicaNotReady for a key whose value is on disk all along; once the
    memory copy is written, reads see both replicas."""
    st = _state(promotion_on_hit=True, promotion_admission_threshold=1)
    h = wrap_handlers(st, build_handlers(st))
    st.mount_segment("c1", _seg("a:1"), 0)
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    assert st.offload.notify("c1", ["k"], [4096], True, 0) == [0]
    st.offload.promotion_start("c1", "k", 4096, 1)
    assert not st.objects["k"].flags & READABLE  # its memory copy is being written
    reply = h[msg.GetReplicaList](msg.GetReplicaList("k"), 1)
    assert isinstance(reply, rp.GetReplicaListReply)
    assert reply.size == 4096 and [r[5] for r in reply.replicas] == [LOCAL_DISK_SEGMENT]
    got = h[msg.BatchGetReplicaList](msg.BatchGetReplicaList(("k", "x")), 1)
    assert isinstance(got, rp.BatchGetReplicaListReply)
    cols = rp.BatchGetReplicaListReply.decode(json.loads(encode_json(got.to_wire()))).columns
    assert cols.code == [0, int(ErrorCode.OBJECT_NOT_FOUND)] and cols.sizes == [4096, 0]
    assert [r[2] for r in next(iter(cols.replicas()))] == [LOCAL_DISK_SEGMENT]
    assert h[msg.ExistKey](msg.ExistKey("k"), 1) == rp.ExistKeyReply(True)
    assert st.offload.disk_only_keys() == ["k"]  # (whole-index listings find it)
    # the key exists: a put is refused as for any key on disk, an upsert waits
    with pytest.raises(ObjectExists, match="on disk"):
        h[msg.PutStart](msg.PutStart("c2", "k", 64, msg.ReplicateParams()), 1)
    started = h[msg.BatchPutStart](msg.BatchPutStart("c2", ("k",), (64,), msg.ReplicateParams()), 1)
    assert isinstance(started, rp.BatchPutStartReply)
    assert started.columns.code == [int(ErrorCode.OBJECT_ALREADY_EXISTS)]
    busy = int(ErrorCode.OBJECT_REPLICA_BUSY)
    with pytest.raises(StoreError, match="being promoted from the SSD tier") as refused:
        h[msg.UpsertStart](msg.UpsertStart("c2", "k", 64, msg.ReplicateParams()), 1)
    assert refused.value.code == busy
    upserts = h[msg.BatchUpsertStart](
        msg.BatchUpsertStart("c2", ("k",), (64,), msg.ReplicateParams()), 1
    )
    assert isinstance(upserts, rp.BatchUpsertStartReply)
    assert upserts.columns.code == [busy] and "promoted" in upserts.columns.message(0)
    assert "k" in st.offload.replicas  # refused: the disk value stays
    # a removal waits for the promotion, and says so
    with pytest.raises(ReplicaNotReady, match="being promoted from the SSD tier"):
        h[msg.Remove](msg.Remove("k", True), 1)
    # a key being written that has no disk replica is still not ready
    st.put_start("c1", "w", 64, ONE, 1)
    with pytest.raises(ReplicaNotReady):
        h[msg.GetReplicaList](msg.GetReplicaList("w"), 1)
    got = h[msg.BatchGetReplicaList](msg.BatchGetReplicaList(("w", "k")), 1)
    assert isinstance(got, rp.BatchGetReplicaListReply)
    assert got.columns.code == [int(ErrorCode.REPLICA_IS_NOT_READY), 0]
    st.put_end("c1", "k", 2)
    reply = h[msg.GetReplicaList](msg.GetReplicaList("k"), 2)
    assert isinstance(reply, rp.GetReplicaListReply)
    assert sorted(r[5] == LOCAL_DISK_SEGMENT for r in reply.replicas) == [False, True]
    assert st.offload.disk_only_keys() == []
    h[msg.Remove](msg.Remove("k", True), 2)  # both copies
    assert "k" not in st.objects and "k" not in st.offload.replicas
    st.validate()


def test_a_regex_listing_during_a_promotion_lists_the_disk_replica() -> None:
    """GetReplicaListByRegex (the service's whole-index scan) lists a key whose
    promotion is still writing its memory copy with its disk replica: it was
    missing from the listing (not readable in memory, and not disk-only)."""
    svc = MasterService(
        MasterConfig(client_ttl_s=10, enable_offload=True, promotion_on_hit=True),
        metrics_port=None,
    )
    st = svc.state
    st.mount_segment("c1", _seg("a:1"), 0)
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    assert st.offload.notify("c1", ["k", "other"], [4096, 4096], True, 0) == [0, 0]
    st.offload.promotion_start("c1", "k", 4096, 1)
    code, value = asyncio.run(svc.dispatch_scan(msg.GetReplicaListByRegex("^k$")))
    assert code == 0 and isinstance(value, RawJson)
    listed = json.loads(value)
    assert list(listed) == ["k"] and [r[5] for r in listed["k"]] == [LOCAL_DISK_SEGMENT]
    st.validate()


def test_a_removal_refused_for_an_offload_says_so() -> None:
    """An object handed out for offloading is pinned until its client reports the
    file: a removal without force is refused with a message naming the offload
    task (not a reader's lease), single and in a batch; a reader's own lease
    keeps the usual message; force removes it."""
    st = _state()
    h = wrap_handlers(st, build_handlers(st))
    st.mount_segment("c1", _seg("a:1"), 0)
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    _put(st, "k", 4096, 0)
    assert [w[0] for w in st.offload.heartbeat("c1", 0, 0, 1)["offload"]] == ["k"]
    with pytest.raises(ObjectHasLease, match="copied to the SSD tier by client 'c1'"):
        h[msg.Remove](msg.Remove("k"), 2)
    h[msg.GetReplicaList](msg.GetReplicaList("k"), 2)  # a reader during the pin
    with pytest.raises(ObjectHasLease, match=r"leased to a reader for 0\.9\d\d s more \(and"):
        h[msg.Remove](msg.Remove("k"), 2.05)
    assert st.config.lease_ttl_s == 1.0
    out = h[msg.BatchRemove](msg.BatchRemove(("k",)), 3.1)
    assert isinstance(out, rp.BatchRemoveReply)
    assert out.codes == (int(ErrorCode.OBJECT_HAS_LEASE),)
    assert "offload task" in (out.messages[0] or "")
    assert st.offload.notify("c1", ["k"], [4096], False, 3.2) == [0]  # written: unpinned
    h[msg.GetReplicaList](msg.GetReplicaList("k"), 3.2)  # a reader's lease
    with pytest.raises(ObjectHasLease, match="leased to a reader"):
        h[msg.Remove](msg.Remove("k"), 3.3)
    h[msg.Remove](msg.Remove("k", True), 3.3)
    assert "k" not in st.objects and "k" not in st.offload.replicas
    st.validate()


def test_client_expiry_drops_its_disk_replicas() -> None:
    st = _state()
    st.mount_segment("c1", _seg("a:1"), 0)
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    st.offload.notify("c1", ["k"], [10], True, 0)
    for t in range(12):  # silent for client_ttl
        st.tick(t)
    assert "k" not in st.offload.replicas and not st.offload.disks
    st.validate()


def test_disk_effects_replay_and_snapshot() -> None:
    st = _state()
    st.mount_segment("c1", _seg("a:1"), 0)
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    st.offload.notify("c1", ["k1", "k2"], [10, 20], True, 0)
    _put(st, "m", 100, 0)
    st.offload.heartbeat("c1", 0, 0, 1)
    st.offload.notify("c1", ["m"], [100], False, 1)
    st.offload.remove("k2")
    records = [e.record() for e in st.drain_effects() if isinstance(e, DURABLE)]
    assert any(r[0] == "disk_add" for r in records) and any(r[0] == "disk_remove" for r in records)
    for snapshot in (False, True):
        other = _state()
        effects = (
            [effect_from_record(e.record()) for e in st.snapshot_effects()]
            if snapshot
            else [effect_from_record(r) for r in records]
        )
        other.replay(effects, 5)
        assert set(other.offload.replicas) == {"k1", "m"}
        assert other.offload.disks["c1"].endpoint == "e:1"
        assert other.offload.wire("m") is not None and "m" in other.objects
        other.validate()
    assert isinstance(effect_from_record(["ldisk_mount", "c", "e:2", 5]), LocalDiskMounted)
    assert effect_from_record(["disk_add", "k", "c", 3]) == DiskReplicaAdded("k", "c", 3)


def test_handlers_see_both_tiers() -> None:
    st = _state()
    h = wrap_handlers(st, build_handlers(st))
    h[msg.MountSegment](msg.MountSegment("c1", _seg("a:1").to_params()), 0)
    h[omsg.MountLocalDisk](omsg.MountLocalDisk("c1", "e:1", 1 << 30), 0)
    h[omsg.NotifyOffloadSuccess](omsg.NotifyOffloadSuccess("c1", ("d",), (64,), True), 0)
    reply = h[msg.GetReplicaList](msg.GetReplicaList("d"), 1)
    assert isinstance(reply, rp.GetReplicaListReply)
    assert reply.size == 64 and reply.replicas[0][5] == LOCAL_DISK_SEGMENT
    got = h[msg.BatchGetReplicaList](msg.BatchGetReplicaList(("d", "x")), 1)
    assert isinstance(got, rp.BatchGetReplicaListReply)
    cols = got.columns
    assert cols.code == [0, int(ErrorCode.OBJECT_NOT_FOUND)] and cols.sizes == [64, 0]
    assert next(iter(cols.replicas()))[0][:3] == ("e:1", 0, LOCAL_DISK_SEGMENT)
    assert h[msg.ExistKey](msg.ExistKey("d"), 1) == rp.ExistKeyReply(True)
    assert h[msg.BatchExistKey](msg.BatchExistKey(("d", "x")), 1).to_wire() == [True, False]
    with pytest.raises(ObjectExists):
        h[msg.PutStart](msg.PutStart("c1", "d", 64, msg.ReplicateParams()), 1)
    out = h[msg.BatchPutStart](
        msg.BatchPutStart("c1", ("d", "n"), (64, 64), msg.ReplicateParams()), 1
    )
    assert isinstance(out, rp.BatchPutStartReply)
    started = out.columns
    assert started.code == [int(ErrorCode.OBJECT_ALREADY_EXISTS), 0]
    assert [len(r) for r in started.replicas()] == [0, 1] and "exists" in started.message(0)
    # a batch of reserved buffers: the key on disk keeps its buffer reserved
    slots = [name for name, _ in st.reserve_slots("c1", 64, 2, ONE, 1, "b")]
    committed = h[msg.BatchCommitSlots](msg.BatchCommitSlots("c1", tuple(slots), ("d", "s")), 1)
    assert isinstance(committed, rp.BatchCommitSlotsReply)
    assert committed.codes == (int(ErrorCode.OBJECT_ALREADY_EXISTS), 0)
    assert "on disk" in (committed.messages[0] or "") and slots[0] in st.inflight
    assert st.get_replica_list("s", 1).size == 64
    h[msg.PutRevoke](msg.PutRevoke("c1", slots[0]), 1)
    h[msg.PutEnd](msg.PutEnd("c1", "n"), 1)
    got = h[msg.BatchGetReplicaList](msg.BatchGetReplicaList(("n", "d")), 1)
    assert isinstance(got, rp.BatchGetReplicaListReply)
    both = rp.BatchGetReplicaListReply.decode(got.to_wire()).columns
    assert both.code == [0, 0] and [len(r) for r in both.replicas()] == [1, 1]
    h[msg.BatchRemove](msg.BatchRemove(("d",)), 2)
    assert "d" not in st.offload.replicas
    assert st.offload.heartbeat("c1", 0, 0, 3)["drop"] == ["d"]
    st.validate()


def test_count_min_sketch_counts_and_forgets() -> None:
    cms = CountMinSketch(width=1024, limit=8)
    assert [cms.add("a") for _ in range(3)] == [1, 2, 3]
    assert cms.add("b") == 1
    for _ in range(10):
        cms.add("a")
    assert cms.add("a") < 8  # halved at the limit
    cms.forget("a")
    assert cms.add("a") == 1


def test_an_unknown_client_remounts_its_segments_before_its_disk() -> None:
    st = _state()
    with pytest.raises(StoreError) as exc:
        st.offload.mount("ghost", "e:1", 1 << 30, True, 0)
    assert exc.value.code == ErrorCode.CLIENT_NOT_FOUND
    assert "ghost" not in st.clients  # its ping still gets NEED_REMOUNT
    assert st.offload.heartbeat("ghost", 0, 0, 0)["remount"] is True


def test_a_removal_drops_the_disk_copy_only_when_the_tier_holds_anything() -> None:
    """The Remove handler asks the SSD tier to drop the key's disk replica only
    while the tier holds something (``busy``): with no disk replica, offload or
    promotion at all a removal costs it nothing; with one, both copies go."""
    st = _state()
    h = wrap_handlers(st, build_handlers(st))
    st.mount_segment("c1", _seg("a:1"), 0)
    _put(st, "plain", 64, 0)
    assert not st.offload.busy()
    h[msg.Remove](msg.Remove("plain", False, "c1"), 1)
    assert "plain" not in st.objects and not st.offload.busy()
    st.offload.mount("c1", "e:1", 1 << 30, True, 0)
    _put(st, "both", 64, 1)
    assert st.offload.heartbeat("c1", 0, 0, 1.0)["offload"]  # the copy to disk starts
    assert st.offload.busy()  # (an offload in flight)
    assert st.offload.notify("c1", ["both"], [64], False, 2.0) == [0]
    assert "both" in st.offload.replicas and st.offload.busy()
    h[msg.Remove](msg.Remove("both", False, "c1"), 2)
    assert "both" not in st.objects and "both" not in st.offload.replicas
    with pytest.raises(ObjectNotFound):
        h[msg.Remove](msg.Remove("both", False, "c1"), 3)
    st.validate()
