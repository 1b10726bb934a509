"""What keeps the master flat at millions of objects: bytes per object, shared lease
floats, eviction and housekeeping in bounded slices, eviction deques that shed dead
entries.  (bench/master_scale.py measures the same through real processes.)"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
import tracemalloc

import pytest

from pymooncake.errors import StoreError
from pymooncake.store._config import MasterConfig
from pymooncake.store._types import ErrorCode, ReplicateConfig, SegmentInfo
from pymooncake.store.master import _service
from pymooncake.store.master._handlers import build_handlers
from pymooncake.store.master._service import MasterService
from pymooncake.store.master._state import MasterState
from pymooncake.wire import _master_msgs as msg

MiB = 1 << 20
ONE = ReplicateConfig()


def segment(sid: str, size: int, base: int = 1 << 40, name: str = "hostA:1") -> SegmentInfo:
    return SegmentInfo(id=sid, name=name, base=base, size=size, host_id="hostA")


def fill(st: MasterState, n: int, prefix: str = "key-", now: float = 1.0) -> None:
    """Batch puts of 64-byte values through the RPC handlers, client ids fresh from
    "JSON" each request, as the service sees them."""
    handlers = build_handlers(st)
    for b in range(0, n, 1000):
        keys = tuple(f"{prefix}{i:010d}" for i in range(b, min(n, b + 1000)))
        client = b"client-0".decode()
        handlers[msg.BatchPutStart](msg.BatchPutStart(client, keys, (64,) * len(keys)), now)
        client = b"client-0".decode()
        handlers[msg.BatchPutEnd](msg.BatchPutEnd(client, keys), now)


def test_bytes_per_object_with_one_replica() -> None:
    """Traced bytes per stored object (key included) stay under the 250-byte goal;
    the breakdown is printed for docs/performance.md (pytest -s)."""
    n = 30_000
    st = MasterState(MasterConfig(), rng=random.Random(1))
    st.mount_segment("client-0", segment("s1", 8 * MiB), 0.0)
    fill(st, 1000, prefix="warm-")  # shared objects (sizes, writer, leases) exist
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        fill(st, n)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    per_object = total / n
    lines = [f"{s.size_diff / n:6.1f} B  {s.traceback}" for s in stats[:6]]
    print(f"\n{per_object:.1f} B per object (key {sys.getsizeof('key-0000000000')} B):")
    print("\n".join(lines))
    assert per_object <= 250, "\n".join(lines)
    st.validate()


def test_reads_share_one_lease_float() -> None:
    st = MasterState(MasterConfig(default_kv_lease_ttl_ms=5000), rng=random.Random(1))
    st.mount_segment("c", segment("s1", MiB), 0.0)
    for k in ("a", "b"):
        st.put_start("c", k, 64, ONE, 0.0)
        st.put_end("c", k, 0.0)
    st.get_replica_list("a", 10.0001)
    st.exist_key("b", 10.000_11)
    a, b = st.objects["a"], st.objects["b"]
    assert a.lease_until is b.lease_until  # one float object for both
    assert 15.000_11 <= a.lease_until <= 15.000_11 + 1 / 8192
    st.get_replica_list("a", 10.1)
    assert a.lease_until >= 15.1 and a.lease_until is not b.lease_until


def test_full_pool_put_evicts_what_it_needs_and_owes_the_rest() -> None:
    """A put into a full pool evicts only the room it needs at once; the rest of
    the eviction round (eviction_ratio) is freed by housekeeping in slices."""
    n = 4096
    cfg = MasterConfig(eviction_ratio=0.25, eviction_high_watermark_ratio=1.0)
    st = MasterState(cfg, rng=random.Random(1))
    st.mount_segment("c", segment("s1", n * 64), 0.0)
    fill(st, n)
    assert st.segments["s1"].allocator.free_bytes == 0
    st.put_start("c", "new", 64, ONE, 2.0)
    st.put_end("c", "new", 2.0)
    assert st.metrics.evicted_keys == 1
    seg = st.segments["s1"]
    assert seg.evict_debt == n * 64 // 4 - 64  # the round, less what the put freed
    slices = 0
    more = st.tick(3.0, max_visits=100)
    while more:
        slices += 1
        assert st.metrics.evicted_keys <= 1 + 100 * (slices + 1)
        more = st.housekeeping(3.0, max_visits=100)
    assert slices >= 9
    assert st.metrics.evicted_keys == n // 4  # one round in all
    assert seg.evict_debt == 0
    # the oldest went first (CLOCK without reads is FIFO); the newest stays
    assert "key-0000000000" not in st.objects and "new" in st.objects
    st.validate()


def test_watermark_eviction_is_sliced_and_skips_leased_objects() -> None:
    cfg = MasterConfig(eviction_ratio=0.1, eviction_high_watermark_ratio=0.5)
    st = MasterState(cfg, rng=random.Random(1))
    st.mount_segment("c", segment("s1", 2000 * 64), 0.0)
    fill(st, 1500)
    for i in range(0, 100):  # the oldest 100 are read: leased, then REF
        st.get_replica_list(f"key-{i:010d}", 1.0)
    more = st.tick(1.5, max_visits=50)
    assert more
    while st.housekeeping(1.5, max_visits=50):
        pass
    seg = st.segments["s1"]
    assert seg.allocator.allocated <= 0.4 * seg.allocator.capacity + 64
    assert all(f"key-{i:010d}" in st.objects for i in range(100))
    st.validate()


def test_removed_objects_leave_dead_entries_that_housekeeping_drops() -> None:
    st = MasterState(MasterConfig(), rng=random.Random(1))
    st.mount_segment("c", segment("s1", 4 * MiB), 0.0)
    fill(st, 20_000)
    removed = st.remove_keys([f"key-{i:010d}" for i in range(15_000)], False, 2.0)
    assert removed == 15_000
    seg = st.segments["s1"]
    assert seg.dead == 15_000 and seg.live_count == 5000
    st.validate()
    while st.tick(3.0, max_visits=1000):
        pass
    assert seg.dead <= 5000  # at most as many dead as live remain
    st.validate()


def test_upsert_into_another_segment_replaces_the_record() -> None:
    """An object that leaves a segment gets a new record: the old one's deque
    entries die with it, so no segment ever holds a record twice."""
    st = MasterState(MasterConfig(), rng=random.Random(1))
    st.mount_segment("c", segment("s1", MiB, name="hostA:1"), 0.0)
    st.put_start("c", "k", 100, ONE, 0.0)
    st.put_end("c", "k", 0.0)
    first = st.objects["k"]
    st.mount_segment("c", segment("s2", MiB, base=1 << 41, name="hostB:1"), 0.0)
    other = ReplicateConfig(preferred_segments=("hostB:1",))
    for i in range(4):  # back and forth between the two segments
        cfg = other if i % 2 == 0 else ReplicateConfig(preferred_segments=("hostA:1",))
        st.upsert_start("c", "k", 100 + i, cfg, 1.0 + i)
        st.upsert_end("c", "k", 1.0 + i)
        st.validate()
    assert first.flags == 0 and st.objects["k"] is not first
    assert st.objects["k"].size == 103
    s1, s2 = st.segments["s1"], st.segments["s2"]
    assert s1.live() == [st.objects["k"]] and s2.live() == []
    # per move: the old record dies in both segments (its pending entry included)
    assert s1.dead == s2.dead == 4 and len(s1.order) == 5 and len(s2.order) == 4


def test_a_failed_allocation_leaves_no_eviction_debt() -> None:
    """A put refused because nothing is evictable owes the background nothing: the
    objects put once room is freed again must not be evicted for it."""
    st = MasterState(MasterConfig(eviction_high_watermark_ratio=1.0), rng=random.Random(1))
    st.mount_segment("c", segment("s1", 64 * 64), 0.0)
    pinned = ReplicateConfig(with_hard_pin=True)
    for i in range(64):
        st.put_start("c", f"hp-{i}", 64, pinned, 1.0)
        st.put_end("c", f"hp-{i}", 1.0)
    with pytest.raises(StoreError) as refused:  # every object is hard-pinned
        st.put_start("c", "plain", 64, ONE, 1.0)
    assert refused.value.code == ErrorCode.NO_AVAILABLE_HANDLE
    assert all(seg.evict_debt == 0 for seg in st.segments.values())
    st.remove("hp-0", False, 1.0)
    st.put_start("c", "plain", 64, ONE, 1.0)
    st.put_end("c", "plain", 1.0)
    while st.tick(1.1, max_visits=4):
        pass
    assert st.exist_key("plain", 1.1)  # not evicted for the refused put
    st.validate()


def test_a_request_found_during_a_housekeeping_slice_goes_before_the_next_one() -> None:
    """Background eviction runs a slice per turn of the loop; a request that
    arrived during a slice is served before the next slice (it waits for the one
    in progress only), and the records a slice visits follow the slice's cost."""
    log: list[str] = []
    visits: list[int] = []
    a, b = socket.socketpair()

    def slow_housekeeping(now: float, max_visits: int | None = None) -> bool:
        visits.append(max_visits or 0)
        log.append("slice")
        if len(visits) == 1:
            b.send(b"x")  # a request arrives while this slice runs
        time.sleep(0.002)  # each slice ten times the target: visits must shrink
        return len(visits) < 4

    async def run() -> None:
        svc = MasterService(metrics_port=None)
        svc.state.housekeeping = slow_housekeeping  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()

        def request() -> None:
            a.recv(1)
            log.append("request")

        loop.add_reader(a.fileno(), request)
        try:
            await svc._housekeep()
        finally:
            loop.remove_reader(a.fileno())

    try:
        asyncio.run(run())
    finally:
        a.close()
        b.close()
    assert log == ["slice", "request", "slice", "slice", "slice"]
    assert visits[0] == _service.HOUSEKEEPING_VISITS
    assert visits[1] < visits[0] / 4 and visits[-1] >= 16  # toward 0.1 ms, within bounds
