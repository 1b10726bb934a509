"""Put sessions, ranged reads, segment mounting, replica clearing, descriptors,
edge cases of the query calls, upsert size changes and the BufferPool of
``mooncake.store`` against a real master (reference semantics:
``real_client.cpp`` and ``buffer_pool.cpp``)."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from store_support import LEASE_MS, LOCAL, MiB, Stores, addr, new_cluster, pattern

from mooncake.store import (
    BufferPool,
    Descriptor,
    DiskDescriptor,
    MooncakeDistributedStore,
    ReplicateConfig,
)
from pymooncake.testing import LocalCluster, wait_until

INVALID_PARAMS = -600
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
LEASE_EXPIRED = -707


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with new_cluster() as c:
        yield c


@pytest.fixture
def stores(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stores]:
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)
    made = Stores(cluster)
    try:
        yield made
    finally:
        made.close_all()


@pytest.fixture
def store(stores: Stores) -> MooncakeDistributedStore:
    return stores.new()


@pytest.fixture
def buf(store: MooncakeDistributedStore) -> Iterator[np.ndarray]:
    b = np.zeros(64 * 1024, np.uint8)
    assert store.register_buffer(addr(b), b.nbytes) == 0
    yield b
    assert store.unregister_buffer(addr(b)) == 0


# ----------------------------------------------------------------------------------------
# put sessions
# ----------------------------------------------------------------------------------------


def test_put_session_lifecycle(
    stores: Stores, store: MooncakeDistributedStore, buf: np.ndarray
) -> None:
    reader = stores.new()
    data = pattern(10_000, seed=1)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    b = addr(buf)
    assert store.batch_put_session_start(["s1", "s2"], [10_000, 100]) == [0, 0]
    assert store.is_exist("s1") == 0  # reserved, not readable yet
    # fill s1 in two ranges, out of order, from two threads; s2 in one
    with ThreadPoolExecutor(2) as pool:
        r1 = pool.submit(
            store.batch_put_from_multi_buffer_ranges, ["s1"], [[b + 6000]], [[4000]], [[6000]]
        )
        r2 = pool.submit(store.batch_put_from_multi_buffer_ranges, ["s1"], [[b]], [[6000]], [[0]])
        assert r1.result() == [4000] and r2.result() == [6000]
    assert store.batch_put_from_multi_buffer_ranges(
        ["s2", "nosession"], [[b, b + 50], [b]], [[50, 50], [1]], [[0, 50], [0]]
    ) == [100, INVALID_PARAMS]
    assert store.batch_put_from_multi_buffer_ranges(["s2"], [[b]], [[51]], [[50]]) == [
        INVALID_PARAMS
    ]  # past the end
    assert store.batch_put_from_multi_buffer_ranges(["s2"], [[b]], [[1, 2]], [[0]]) == [
        INVALID_PARAMS
    ]  # list lengths
    assert store.batch_put_session_end(["s1", "s2", "nosession"]) == [0, 0, INVALID_PARAMS]
    assert reader.get("s1") == data
    assert reader.get("s2") == data[:100]
    assert store.batch_put_session_end(["s1"]) == [INVALID_PARAMS]  # over


def test_put_session_conflicts_and_revoke(store: MooncakeDistributedStore, buf: np.ndarray) -> None:
    assert store.put("exists", b"x") == 0
    assert store.batch_put_session_start(["exists", "r1", "r1"], [1, 8, 8]) == [
        OBJECT_ALREADY_EXISTS,
        0,
        OBJECT_ALREADY_EXISTS,
    ]
    assert store.batch_put_session_start(["r1"], [8]) == [INVALID_PARAMS]  # already open here
    assert store.batch_put_session_start(["a"], [1, 2]) == [INVALID_PARAMS]
    assert store.batch_put_session_revoke(["r1", "none"]) == [0, INVALID_PARAMS]
    assert store.is_exist("r1") == 0
    assert store.batch_put_session_start(["r1"], [8]) == [0]  # the space came back; start again
    assert store.batch_put_from_multi_buffer_ranges(["r1"], [[addr(buf)]], [[8]], [[0]]) == [8]
    assert store.batch_put_session_end(["r1"]) == [0]
    assert store.get("r1") == bytes(8)


def test_put_session_revoked_on_close(cluster: LocalCluster, stores: Stores) -> None:
    first = stores.new()
    assert first.batch_put_session_start(["closing"], [64]) == [0]
    assert first.close() == 0
    other = stores.new()
    assert other.batch_put_session_start(["closing"], [64]) == [
        0
    ]  # not blocked by the old reservation
    assert other.batch_put_session_revoke(["closing"]) == [0]
    assert MooncakeDistributedStore().batch_put_session_start(["x"], [1]) == []  # not set up


# ----------------------------------------------------------------------------------------
# ranged reads
# ----------------------------------------------------------------------------------------


def test_get_into_ranges_fragment_level_results(
    store: MooncakeDistributedStore, buf: np.ndarray
) -> None:
    data = pattern(100, seed=2)
    assert store.put("rk", data) == 0
    b, room = addr(buf), buf.nbytes
    # one fragment past the end of the buffer fails alone
    res = store.get_into_ranges([b], [["rk"]], [[[0, room - 2, 10]]], [[[0, 0, 50]]], [[[5, 4, 5]]])
    assert res == [[[5, INVALID_PARAMS, 5]]]
    assert buf[10:15].tobytes() == data[50:55]
    # an unregistered buffer fails every fragment, shaped like the request
    loose = np.zeros(16, np.uint8)
    assert store.get_into_ranges(
        [addr(loose)], [["rk", "rk"]], [[[0, 1], [2]]], [[[0, 1], [2]]], [[[1, 1], [1]]]
    ) == [[[INVALID_PARAMS] * 2, [INVALID_PARAMS]]]
    # top-level lists of different lengths
    assert store.get_into_ranges([b, b], [["rk"]], [[[0]]], [[[0]]], [[[1]]]) == [
        [[INVALID_PARAMS]],
        [[INVALID_PARAMS]],
    ]
    # zero-length fragments read nothing and succeed
    assert store.get_into_ranges([b], [["rk"]], [[[0]]], [[[100]]], [[[0]]]) == [[[0]]]


def test_get_session_expires_with_its_lease(
    store: MooncakeDistributedStore, buf: np.ndarray
) -> None:
    assert store.put("lk", b"lease" * 10) == 0
    assert store.batch_get_session_start(["lk"]) == [0]
    time.sleep(LEASE_MS / 1000 + 0.2)
    assert store.batch_get_into_multi_buffer_ranges(["lk"], [[addr(buf)]], [[5]], [[0]]) == [
        LEASE_EXPIRED
    ]
    assert store.batch_get_into_multi_buffer_ranges(["lk"], [[addr(buf)]], [[5]], [[0]]) == [
        INVALID_PARAMS
    ]


# ----------------------------------------------------------------------------------------
# segments mounted after setup
# ----------------------------------------------------------------------------------------


@pytest.fixture
def shm_path() -> Iterator[str]:
    path = f"/dev/shm/pymooncake-seg-{uuid.uuid4().hex[:12]}"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    yield path
    os.unlink(path)


def test_mount_file_segment_holds_objects(
    cluster: LocalCluster, stores: Stores, shm_path: str
) -> None:
    owner = stores.new(0, 16 * MiB)  # no segment of its own
    writer = stores.new(0, 16 * MiB)
    assert writer.put("nowhere", b"x") == -200  # pool empty
    res = owner.mount_segment(shm_path, 4 * MiB, 4096, "tcp", "")
    assert res["ret"] == 0 and len(res["segment_ids"]) == 1
    data = pattern(100_000, seed=3)
    assert writer.put("in_file", data) == 0
    assert writer.get("in_file") == data
    with open(shm_path, "rb") as f:  # the bytes sit in the file, past the offset
        assert data in f.read()
    assert owner.unmount_segment(res["segment_ids"]) == 0
    assert writer.get("in_file") == b""  # its replica went with the segment
    assert owner.unmount_segment(res["segment_ids"]) == -1  # not mounted any more
    assert owner.mount_segment(shm_path, 16 * MiB)["ret"] == -1  # larger than the file
    assert owner.mount_segment(shm_path, MiB, 100)["ret"] == -1  # offset not page-aligned
    assert owner.mount_segment("/nonexistent/file", MiB)["ret"] == -1


def test_allocate_mount_and_graceful_unmount(stores: Stores) -> None:
    owner = stores.new(0, 16 * MiB)
    res = owner.allocate_and_mount_segment(1)
    assert res["ret"] == 0 and res["allocated_size"] == 16 * MiB
    assert owner.put("in_alloc", b"abc") == 0
    assert owner.unmount_and_free_segment(res["segment_ids"], grace_period_seconds=1) == 0
    assert owner.get("in_alloc") == b"abc"  # still readable during the grace period
    assert wait_until(lambda: owner.get("in_alloc") == b"", timeout_s=5)
    assert owner.allocate_and_mount_segment(0)["ret"] == -1
    assert owner.unmount_and_free_segment(["bogus"]) == -1
    assert owner.unmount_local_disk_segment(0) == 0  # no SSD tier: nothing to drain
    assert owner.get_offload_rpc_read_count() == 0
    pending = owner.allocate_and_mount_segment(MiB)
    assert owner.unmount_and_free_segment(pending["segment_ids"], grace_period_seconds=60) == 0
    assert owner.close() == 0  # a pending graceful unmount finishes at close, no thread left


# ----------------------------------------------------------------------------------------
# replica clearing (needs the master's BatchReplicaClear)
# ----------------------------------------------------------------------------------------


def test_batch_replica_clear_without_keys(store: MooncakeDistributedStore) -> None:
    assert store.batch_replica_clear([]) == []
    assert MooncakeDistributedStore().batch_replica_clear(["k"]) == []


def test_batch_replica_clear_expired_and_per_segment(stores: Stores) -> None:
    a, b = stores.new(), stores.new()
    config = ReplicateConfig()
    config.replica_num = 2
    assert a.put("clear_all", b"1") == 0
    assert a.put("clear_seg", b"2", config) == 0
    assert a.put("clear_leased", b"3") == 0
    time.sleep(LEASE_MS / 1000 + 0.2)
    assert a.is_exist("clear_leased") == 1  # a fresh lease: skipped
    assert a.batch_replica_clear(["clear_all", "clear_leased", "missing"]) == ["clear_all"]
    assert a.get("clear_all") == b""
    assert a.batch_replica_clear(["clear_seg"], segment_name=a.get_hostname()) == ["clear_seg"]
    assert b.get("clear_seg") == b"2"  # the other replica stays
    assert b.batch_replica_clear(["clear_seg"]) == []  # written by another client


# ----------------------------------------------------------------------------------------
# descriptors and query edge cases
# ----------------------------------------------------------------------------------------


def test_descriptor_accessors(store: MooncakeDistributedStore) -> None:
    assert store.put("dk", b"descriptor") == 0
    (desc,) = store.get_replica_desc("dk")
    assert (desc.is_memory_replica(), desc.is_disk_replica(), desc.is_local_disk_replica()) == (
        True,
        False,
        False,
    )
    with pytest.raises(RuntimeError):
        desc.get_disk_descriptor()
    d = desc.get_memory_descriptor().buffer_descriptor
    assert (
        repr(d)
        == f"<Descriptor size=10 buffer_address={d.buffer_address} transport_endpoint={d.transport_endpoint}>"
    )
    blank = Descriptor()
    assert (blank.size, blank.buffer_address, blank.transport_endpoint) == (0, 0, "")
    disk = DiskDescriptor()
    assert (disk.file_path, disk.object_size) == ("", 0)


def test_query_edge_cases(store: MooncakeDistributedStore) -> None:
    assert store.batch_is_exist([]) == []
    assert store.batch_is_exist(["nope1", "nope2"]) == [0, 0]
    assert store.get_size("nope") == OBJECT_NOT_FOUND
    assert store.remove_by_regex("^no_match_at_all$") == 0
    assert store.remove_by_regex("(unclosed") < 0
    assert store.batch_remove([]) == []
    assert store.get_batch([]) == []
    assert store.put("edge", b"v") == 0
    assert store.batch_is_exist(["edge", "nope", "edge"]) == [1, 0, 1]
    assert wait_until(lambda: store.remove_all() >= 1, timeout_s=LEASE_MS / 1000 * 6)
    assert store.remove_all() == 0


def test_upsert_size_changes_under_concurrent_reads(stores: Stores) -> None:
    writer, reader = stores.new(), stores.new()
    small, large = b"a" * 1000, b"b" * 200_000
    assert writer.upsert("grow", small) == 0
    stop = threading.Event()
    seen: set[bytes] = set()

    def read() -> None:
        while not stop.is_set():
            v = reader.get("grow")
            if v:
                seen.add(v[:1] * len(v) if v == v[:1] * len(v) else b"MIXED")

    t = threading.Thread(target=read)
    t.start()
    try:
        for i in range(20):
            assert writer.upsert("grow", large if i % 2 else small) == 0
    finally:
        stop.set()
        t.join()
    assert b"MIXED" not in seen
    assert writer.get("grow") == large
    assert writer.upsert_parts("grow", b"x", b"y" * 10) == 0
    assert reader.get("grow") == b"x" + b"y" * 10
    assert writer.upsert_batch(["grow", "new"], [b"1", b"22"]) == 0
    assert reader.get_batch(["grow", "new"]) == [b"1", b"22"]


# ----------------------------------------------------------------------------------------
# BufferPool
# ----------------------------------------------------------------------------------------


def test_buffer_pool_limits_and_errors(stores: Stores) -> None:
    store = stores.new(16 * MiB, 4 * MiB)
    with pytest.raises(RuntimeError, match="alignment"):
        BufferPool(store, alignment=12345)
    with pytest.raises(RuntimeError, match="not initialized"):
        BufferPool(MooncakeDistributedStore())
    pool = BufferPool(
        store,
        min_size_class=4096,
        max_size_class=4096,
        alignment=4096,
        max_regions=1,
        block_on_exhaustion=False,
    )
    lease = pool.acquire(0)
    assert lease.size == 0 and len(lease.buffer) == 0
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.acquire(1)
    with pytest.raises(RuntimeError, match="timed out"):
        pool.acquire(1, block=True, timeout=0.05)
    with pytest.raises(RuntimeError, match="active leases"):
        pool.close()
    lease.release()
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.acquire(1)
    big = BufferPool(store)  # max_bytes: twice the 4 MiB local buffer
    with pytest.raises(RuntimeError, match="capacity"):
        big.acquire((1 << 64) - 1)
    big.close()


def test_buffer_pool_overflow_is_registered(stores: Stores) -> None:
    store = stores.new(16 * MiB, 4 * MiB)
    pool = BufferPool(store, alignment=65536)
    local = pool.acquire(4 * MiB)  # the whole local buffer
    over = pool.acquire(1024, block=False)  # overflow memory
    assert over.ptr % 65536 == 0
    over.buffer[:5] = b"flows"
    assert store.put_from("over", over.ptr, 5) == 0  # registered: usable for zero-copy
    assert store.get("over") == b"flows"
    over.release()
    local.release()
    pool.close()


def test_buffer_pool_views_pin_leases(stores: Stores) -> None:
    store = stores.new(16 * MiB, 4 * MiB)
    pool = BufferPool(store, 4096, min_size_class=4096, alignment=4096)
    lease = pool.acquire(4)
    view = lease.buffer
    view[:] = b"test"
    with pytest.raises(RuntimeError, match="exported views"):
        lease.release()
    del view
    gc.collect()
    lease.release()
    dropped = pool.acquire(8)
    del dropped  # a dropped lease returns its memory
    gc.collect()
    with pool.acquire(16) as held:
        assert held.size == 16 and ctypes.c_char.from_address(held.ptr) is not None
    pool.close()


def test_buffer_pool_blocking_acquire_waits_for_release(stores: Stores) -> None:
    store = stores.new(16 * MiB, 4 * MiB)
    pool = BufferPool(store, min_size_class=4096, alignment=4096, max_regions=1)
    lease = pool.acquire(1)
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(1, timeout=5)))
    t.start()
    time.sleep(0.1)
    assert not got
    lease.release()
    t.join(5)
    assert got and got[0].size == 1
    got[0].release()
    pool.close()
