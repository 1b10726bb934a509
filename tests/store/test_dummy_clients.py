"""Dummy clients (``setup_dummy``) served by a real client (``mooncake_client``).

The first part runs the real client in this process (a :class:`LocalCluster`
master, a :class:`StoreClient` with a segment and the :class:`DummyService`
that ``mooncake_client --port`` starts) and goes through every API path of a
dummy, checking where the bytes went: buffers in registered shared memory
are used in place (nothing staged), everything else is staged once through
the dummy's local buffer.

The second part runs real processes (:class:`ProcessCluster`): a
``mooncake_client`` and dummy clients in their own processes handing keys to
each other, a real client killed and restarted under them, and a dummy
SIGKILLed and cleaned up by the real client.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mooncake.store import (
    MooncakeDistributedStore,
    MooncakeHostMemAllocator,
    ReplicateConfig,
    TaskStatus,
)
from pymooncake._authio import ClusterSecurity
from pymooncake.store import MasterConfig, StoreClient
from pymooncake.store._dummy_client import DummyClient
from pymooncake.store._dummy_io import SPECULATIVE_BYTES
from pymooncake.store._dummy_service import DummyService, DummyServiceConfig
from pymooncake.testing import LocalCluster, ProcessCluster, free_port, make_test_pki, wait_until

LOCAL = "127.0.0.1"
MiB = 1 << 20
LEASE_MS = 300
TOKEN = "dummy-test-token-0123456789abcdef"


def pattern(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# ----------------------------------------------------------------------------------------
# the real client in this process
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(MasterConfig(default_kv_lease_ttl_ms=LEASE_MS)) as c:
        yield c


@pytest.fixture(scope="module")
def real(cluster: LocalCluster) -> StoreClient:
    return cluster.client(64 * MiB, 0)


@pytest.fixture(scope="module")
def service(real: StoreClient) -> Iterator[DummyService]:
    with DummyService(real, DummyServiceConfig(host=LOCAL, port=0)) as svc:
        yield svc


class Dummies:
    """Dummy stores of one test, closed at teardown."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stores: list[MooncakeDistributedStore] = []

    def new(
        self, pool: int = 64 * MiB, local: int = 16 * MiB, address: str = ""
    ) -> MooncakeDistributedStore:
        store = MooncakeDistributedStore()
        self.stores.append(store)
        assert store.setup_dummy(pool, local, address or self.address) == 0
        return store

    def close(self) -> None:
        for s in self.stores:
            s.close()


@pytest.fixture
def dummies(service: DummyService) -> Iterator[Dummies]:
    made = Dummies(service.address)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def store(dummies: Dummies) -> MooncakeDistributedStore:
    return dummies.new()


@pytest.fixture
def own_real() -> Iterator[StoreClient]:
    """A real client of a cluster of its own, for tests that start services on it:
    each service pools master connections on its client, and a put through it may
    open another while the client's heartbeat runs -- they go with that cluster
    rather than counting as leaks of the module's client."""
    with LocalCluster(MasterConfig(default_kv_lease_ttl_ms=LEASE_MS)) as own:
        yield own.client(64 * MiB, 0)


@pytest.fixture
def own_store() -> Iterator[MooncakeDistributedStore]:
    """A dummy of a cluster of its own: tests whose concurrency opens more
    connections and engine workers, which must go with that cluster."""
    with LocalCluster(MasterConfig(default_kv_lease_ttl_ms=LEASE_MS)) as own:
        real = own.client(64 * MiB, 0)
        with DummyService(real, DummyServiceConfig(host=LOCAL, port=0)) as svc:
            made = Dummies(svc.address)
            try:
                yield made.new()
            finally:
                made.close()


def client_of(store: MooncakeDistributedStore) -> DummyClient:
    client = store._client
    assert isinstance(client, DummyClient)
    return client


@contextlib.contextmanager
def staging_count(store: MooncakeDistributedStore) -> Iterator[list[int]]:
    """Counts the bytes the dummy stages through its local buffer meanwhile."""
    mem = client_of(store).mem
    staged: list[int] = []
    original = mem.stage

    def spy(n: int, held: int, what: str) -> Any:
        staged.append(n)
        return original(n, held, what)

    mem.stage = spy  # type: ignore[method-assign]
    try:
        yield staged
    finally:
        mem.stage = original  # type: ignore[method-assign]


def registered(store: MooncakeDistributedStore, size: int) -> int:
    ptr = store.alloc_from_mem_pool(size)
    assert ptr != 0
    assert store.register_buffer(ptr, size) == 0
    return ptr


# --- set-up, health, identity -------------------------------------------------------------


def test_setup_maps_the_local_buffer_in_the_real_client(
    service: DummyService, dummies: Dummies
) -> None:
    before = service.stats()
    store = dummies.new(local=8 * MiB)
    assert store.health_check() == 0
    assert store.get_hostname() == ""  # a dummy has no segment (reference)
    stats = service.stats()
    assert stats["dummies"] == before["dummies"] + 1
    assert stats["mapped_bytes"] == before["mapped_bytes"] + 8 * MiB
    assert store.close() == 0
    assert store.health_check() == 1
    assert service.stats() == before  # close told the real client, which unmapped at once


def test_no_real_client_at_the_address(caplog: pytest.LogCaptureFixture) -> None:
    store = MooncakeDistributedStore()
    port = free_port()
    with caplog.at_level(logging.ERROR, logger="mooncake.store"):
        assert store.setup_dummy(16 * MiB, 16 * MiB, f"{LOCAL}:{port}") == -1
    assert f"cannot reach the real client (mooncake_client) at {LOCAL}:{port}" in caplog.text
    assert f"--port={port}" in caplog.text
    assert store.health_check() == 1
    assert store.put("k", b"v") == -600  # not set up
    assert store.close() == 0
    assert store.setup_dummy(1, 1, "no-port-here") == -1


# --- bytes API ----------------------------------------------------------------------------


def test_bytes_api_stages_once_through_the_local_buffer(store: MooncakeDistributedStore) -> None:
    small, value = pattern(3000, 0), pattern(100_000, 1)
    with staging_count(store) as staged:
        assert store.put("small_key", small) == 0
        assert staged == [len(small)]
        # a get stages room for a small object and asks for it in one round trip ...
        assert store.get("small_key") == small
        assert staged == [len(small), SPECULATIVE_BYTES]
    with staging_count(store) as staged:
        assert store.put("bytes_key", value) == 0
        assert staged == [len(value)]
        # ... and a larger one is read in place with a second, into its exact size
        assert store.get("bytes_key") == value
        assert staged == [len(value), SPECULATIVE_BYTES, len(value)]
    assert store.get_size("bytes_key") == len(value)
    assert store.is_exist("bytes_key") == 1
    assert store.put("bytes_key", b"other") == 0  # exists: kept, not overwritten
    assert store.get("bytes_key") == value
    assert store.is_exist("missing") == 0
    assert store.get("missing") == b""
    assert store.get_size("missing") == -704
    assert store.batch_is_exist(["bytes_key", "missing"]) == [1, 0]
    assert store.batch_is_exist([]) == []
    assert store.remove("bytes_key") == -706  # read lease
    time.sleep(LEASE_MS / 1000 + 0.1)
    assert store.remove("bytes_key") == 0
    assert store.remove("bytes_key") == -704
    assert store.put("empty_value", b"") == -600
    assert store.put("", b"x") != 0


def test_batches_parts_and_upserts(store: MooncakeDistributedStore) -> None:
    keys = [f"batch_{i}" for i in range(5)]
    values = [pattern(1000 * (i + 1), i) for i in range(5)]
    assert store.put_batch(keys, values) == 0
    assert store.get_batch([*keys, "nope"]) == [*values, b""]
    assert store.put_parts("parts", b"ab", memoryview(b"cd"), bytearray(b"ef")) == 0
    assert store.get("parts") == b"abcdef"
    assert store.upsert("up", b"first") == 0
    assert store.upsert("up", b"second!") == 0
    assert store.get("up") == b"second!"
    assert store.upsert_parts("up_parts", b"x", b"y") == 0
    assert store.get("up_parts") == b"xy"
    assert store.upsert_batch(["ub1", "ub2"], [b"1", b"22"]) == 0
    assert store.get_batch(["ub1", "ub2"]) == [b"1", b"22"]
    assert store.batch_remove([*keys, "nope"], True) == [0] * 5 + [-704]
    assert store.remove_by_regex("^u", True) == 4
    assert store.remove_all(True) >= 1
    assert store.get("parts") == b""


def test_a_batch_larger_than_the_local_buffer_goes_in_pieces(dummies: Dummies) -> None:
    store = dummies.new(local=1 * MiB)
    keys = [f"piece_{i}" for i in range(8)]
    values = [pattern(300_000, i) for i in range(8)]  # 2.4 MB through a 1 MiB buffer
    assert store.put_batch(keys, values) == 0
    assert store.get_batch(keys) == values
    assert store.put("too_big", bytes(2 * MiB)) == -600  # as the reference: bounded
    assert store.get_buffer("too_big") is None


def test_get_buffer_handles_live_in_the_local_buffer(store: MooncakeDistributedStore) -> None:
    value = pattern(50_000, 3)
    assert store.put("handle_key", value) == 0
    client = client_of(store)
    free = client.local.free_bytes
    handle = store.get_buffer("handle_key")
    assert handle is not None
    assert bytes(handle) == value and handle.size() == len(value)
    base, end = client.local.addr, client.local.addr + client.local.size
    assert base <= handle.ptr() < end  # read in place, nothing copied out
    assert client.local.free_bytes < free
    handle.release()
    assert client.local.free_bytes == free
    handles = store.batch_get_buffer(["handle_key", "missing"])
    assert handles[1] is None and handles[0] is not None and bytes(handles[0]) == value


# --- zero-copy API (registered shared memory) ---------------------------------------------


def test_registered_pool_buffers_are_used_in_place(store: MooncakeDistributedStore) -> None:
    ptr = registered(store, 4 * MiB)
    a, b, c = pattern(4096, 1), pattern(1 << 20, 2), pattern(1234, 3)
    ctypes.memmove(ptr, a, len(a))
    ctypes.memmove(ptr + MiB, b, len(b))
    ctypes.memmove(ptr + 3 * MiB, c, len(c))
    with staging_count(store) as staged:
        assert store.put_from("zc_a", ptr, len(a)) == 0
        assert store.batch_put_from(
            ["zc_b", "zc_c"], [ptr + MiB, ptr + 3 * MiB], [len(b), len(c)]
        ) == [0, 0]
        assert store.put_from_with_metadata("zc_meta", ptr, ptr + 3 * MiB, len(a), len(c)) == 0
        assert store.batch_put_from_multi_buffers(
            ["zc_multi"], [[ptr, ptr + 3 * MiB]], [[len(a), len(c)]]
        ) == [0]
        out = ptr + 2 * MiB
        assert store.get_into("zc_a", out, MiB) == len(a)
        assert ctypes.string_at(out, len(a)) == a
        assert store.batch_get_into(["zc_c", "zc_meta"], [out, out + 8192], [8192, 8192]) == [
            len(c),
            len(a) + len(c),
        ]
        assert ctypes.string_at(out + 8192, len(a) + len(c)) == a + c
        assert store.batch_get_into_multi_buffers(
            ["zc_multi"], [[out, out + 100_000]], [[100, 100_000]]
        ) == [len(a) + len(c)]
        assert (
            ctypes.string_at(out, 100) + ctypes.string_at(out + 100_000, len(a) + len(c) - 100)
            == a + c
        )
        assert store.upsert_from("zc_a", ptr + MiB, 5000) == 0
        assert store.batch_upsert_from(["zc_c"], [ptr], [10]) == [0]
        assert staged == []  # not one byte staged: the real client's engine used the pool
    assert store.get("zc_a") == b[:5000]
    assert store.get("zc_c") == a[:10]
    assert store.get_into("zc_a", ptr + 2 * MiB, 100) == -600  # destination too small
    assert store.get_into("missing", ptr, 100) == -704
    assert store.batch_put_from(["x", "y"], [ptr], [1]) == [-600, -600]
    assert store.batch_get_into([], [], []) == []


def test_unregistered_memory_is_staged(store: MooncakeDistributedStore) -> None:
    array = np.frombuffer(pattern(70_000, 5), dtype=np.uint8).copy()
    with staging_count(store) as staged:
        assert store.put_from("np_key", int(array.ctypes.data), array.nbytes) == 0
        out = np.zeros(100_000, dtype=np.uint8)
        assert store.get_into("np_key", int(out.ctypes.data), out.nbytes) == array.nbytes
        assert staged == [array.nbytes, out.nbytes]  # the read stages the destination's room
    assert out[: array.nbytes].tobytes() == array.tobytes()
    assert store.get_into("np_key", int(out.ctypes.data), 1000) == -600  # too small
    assert store.get_into("missing", int(out.ctypes.data), 1000) == -704
    pool = store.alloc_from_mem_pool(MiB)  # allocated but not registered: staged as well
    ctypes.memmove(pool, b"abc", 3)
    with staging_count(store) as staged:
        assert store.put_from("pool_unregistered", pool, 3) == 0
        assert staged == [3]


def test_register_rules_and_pool_exhaustion(
    store: MooncakeDistributedStore, caplog: pytest.LogCaptureFixture
) -> None:
    ptr = store.alloc_from_mem_pool(MiB)
    assert store.register_buffer(ptr, MiB) == 0
    assert store.register_buffer(ptr, MiB) == 0  # once is enough
    assert store.register_buffer(ptr + 4096, 4096) == 0  # inside a registered buffer
    other = np.zeros(4096, dtype=np.uint8)
    with caplog.at_level(logging.ERROR, logger="mooncake.store"):
        assert store.register_buffer(int(other.ctypes.data), 4096) == -1
    assert "alloc_from_mem_pool() or MooncakeHostMemAllocator" in caplog.text
    assert store.unregister_buffer(ptr + 4096) == -1
    assert store.unregister_buffer(ptr) == 0
    assert store.unregister_buffer(ptr) == -1
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="mooncake.store"):
        assert store.alloc_from_mem_pool(63 * MiB) != 0
        assert store.alloc_from_mem_pool(MiB) == 0  # 64 MiB pool handed out
    assert "memory pool is exhausted" in caplog.text and "mem_pool_size" in caplog.text
    assert store.alloc_from_mem_pool(0) == 0


def test_host_mem_allocator_memory_can_be_registered(store: MooncakeDistributedStore) -> None:
    allocator = MooncakeHostMemAllocator()
    ptr = allocator.alloc(2 * MiB)
    try:
        payload = pattern(4096, 9)
        ctypes.memmove(ptr, payload, len(payload))
        assert store.register_buffer(ptr, 2 * MiB) == 0
        with staging_count(store) as staged:
            assert store.put_from("host_mem_key", ptr, len(payload)) == 0
            assert store.get_into("host_mem_key", ptr + MiB, MiB) == len(payload)
            assert staged == []
        assert ctypes.string_at(ptr + MiB, len(payload)) == payload
        assert store.unregister_buffer(ptr) == 0
    finally:
        assert allocator.free(ptr) == 0


def test_ranges_and_get_sessions(store: MooncakeDistributedStore) -> None:
    data1 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    data2 = b"abcdefghijklmnopqrstuvwxyz0123456789"
    assert store.put("range1", data1) == 0
    assert store.put("range2", data2) == 0
    b0, b1 = registered(store, 32), registered(store, 32)
    ctypes.memset(b0, ord("_"), 32)
    ctypes.memset(b1, ord("_"), 32)
    results = store.get_into_ranges(
        [b0, b1],
        [["range1", "range2"], ["range2", "range1"]],
        [[[0, 20], [8]], [[4], [16]]],
        [[[2, 30], [10]], [[0], [12]]],
        [[[4, 3], [6]], [[6], [4]]],
    )
    assert results == [[[4, 3], [6]], [[6], [4]]]
    assert ctypes.string_at(b0, 23) == b"2345____klmnop______UVW"
    assert ctypes.string_at(b1 + 4, 16) == b"abcdef______CDEF"
    over = store.get_into_ranges([b0], [["range1"]], [[[30]]], [[[0]]], [[[4]]])
    assert over[0][0][0] < 0
    assert store.batch_get_session_start(["range1", "missing"]) == [0, -704]
    assert store.batch_get_into_multi_buffer_ranges(["range1"], [[b1]], [[5]], [[3]]) == [5]
    assert ctypes.string_at(b1, 5) == data1[3:8]
    assert store.batch_get_session_end(["range1"]) == 0
    # put sessions need a full client (the reference's dummy answers INVALID_PARAMS)
    assert store.batch_put_session_start(["s"], [10]) == [-600]
    assert store.batch_put_from_multi_buffer_ranges(["s"], [[b0]], [[1]], [[0]]) == [-600]
    assert store.batch_put_session_end(["s"]) == [-600]
    assert store.batch_put_session_revoke(["s"]) == [-600]


# --- queries ---------------------------------------------------------------------------------


def test_replica_descriptors_and_clear(store: MooncakeDistributedStore, real: StoreClient) -> None:
    assert store.put("desc_key", b"x" * 100) == 0
    (desc,) = store.get_replica_desc("desc_key")
    assert desc.is_memory_replica()
    assert desc.get_memory_descriptor().buffer_descriptor.transport_endpoint == real.hostname
    assert store.get_replica_desc("missing") == []
    both = store.batch_get_replica_desc(["desc_key", "missing"])
    assert list(both) == ["desc_key"] and len(both["desc_key"]) == 1
    # the real client wrote it on the dummy's behalf: the dummy's clear (carried out by
    # the real client, as the reference's) drops it once the read lease is over
    time.sleep(LEASE_MS / 1000 + 0.1)
    assert store.batch_replica_clear(["desc_key", "missing"]) == ["desc_key"]
    assert store.is_exist("desc_key") == 0


def test_copy_and_move_tasks_through_the_real_client() -> None:
    # a cluster of its own: the real client's connections to the second segment's
    # owner go with it
    with LocalCluster(MasterConfig(default_kv_lease_ttl_ms=LEASE_MS)) as own:
        real = own.client(64 * MiB, 0)
        other = own.client(16 * MiB, 0)
        with DummyService(real, DummyServiceConfig(host=LOCAL, port=0)) as svc:
            made = Dummies(svc.address)
            try:
                _copy_and_move(made.new(), real, other)
            finally:
                made.close()


def _copy_and_move(store: MooncakeDistributedStore, real: StoreClient, other: StoreClient) -> None:
    value = pattern(300_000, 7)
    cfg = ReplicateConfig()
    cfg.preferred_segment = real.hostname
    assert store.put("task_key", value, cfg) == 0

    def finished(task_id: tuple[int, int]) -> Any:
        resp, rc = store.query_task(task_id)
        assert rc == 0 and resp is not None
        return resp if resp.status in (TaskStatus.SUCCESS, TaskStatus.FAILED) else None

    def endpoints() -> list[str]:
        return sorted(
            d.get_memory_descriptor().buffer_descriptor.transport_endpoint
            for d in store.get_replica_desc("task_key")
        )

    assert endpoints() == [real.hostname]
    task_id, rc = store.create_copy_task("task_key", [other.hostname])
    assert rc == 0
    assert wait_until(lambda: finished(task_id) is not None)
    assert finished(task_id).status == TaskStatus.SUCCESS
    assert endpoints() == sorted([real.hostname, other.hostname])
    task_id, rc = store.create_move_task("task_key", real.hostname, other.hostname)
    assert rc == 0 and wait_until(lambda: finished(task_id) is not None)
    assert endpoints() == [other.hostname] and store.get("task_key") == value
    assert store.create_copy_task("missing", [other.hostname]) == ((0, 0), -704)
    assert store.query_task((3, 4)) == (None, -1400)


def test_mounting_segments_needs_a_full_client(store: MooncakeDistributedStore) -> None:
    assert store.allocate_and_mount_segment(16 * MiB)["ret"] == -1
    assert store.mount_segment("/dev/null", 4096)["ret"] == -1


# --- tensors ---------------------------------------------------------------------------------


def test_tensor_api(store: MooncakeDistributedStore) -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert store.put_tensor("t", tensor) == 0
    assert torch.equal(store.get_tensor("t"), tensor)
    size = store.get_size("t")
    ptr = registered(store, size)
    with staging_count(store) as staged:
        into = store.get_tensor_into("t", ptr, size)
        assert into is not None and torch.equal(into, tensor)
        assert store.put_tensor_from("t_from", ptr, size) == 0
        assert staged == []  # the object was in registered memory both ways
    assert torch.equal(store.get_tensor("t_from"), tensor)
    assert list(store.batch_put_tensor(["tb0", "tb1"], [tensor, tensor + 1])) == [0, 0]
    got = store.batch_get_tensor(["tb0", "tb1", "missing"])
    assert torch.equal(got[0], tensor) and torch.equal(got[1], tensor + 1) and got[2] is None
    assert store.upsert_tensor("tu", tensor + 2) == 0
    assert store.upsert_tensor("tu", tensor + 3) == 0
    assert torch.equal(store.get_tensor("tu"), tensor + 3)
    assert store.pub_tensor("tp", tensor + 4, ReplicateConfig()) == 0
    assert torch.equal(store.get_tensor("tp"), tensor + 4)
    assert store.put_tensor_with_tp("ttp", tensor, tp_size=2, split_dim=1) == 0
    for rank, part in enumerate(torch.chunk(tensor, 2, dim=1)):
        assert torch.equal(store.get_tensor_with_tp("ttp", tp_rank=rank, tp_size=2), part)
    assert store.put_tensor_with_parallelism("tpar", tensor) == 0
    assert torch.equal(store.get_tensor("tpar"), tensor)
    assert torch.equal(store.get_tensor_with_parallelism("tpar"), tensor)
    mismatch = store.batch_get_tensor_into(["t", "x"], [ptr], [size])
    assert len(mismatch) == 2 and all(r < 0 for r in mismatch)
    # reads into existing tensors (CUDA ones in practice; torch copies, so any device)
    dst = torch.zeros(3, 4)
    assert store.get_tensor_into_cuda("t", dst) == tensor.numel() * 4
    assert torch.equal(dst, tensor)
    assert store.batch_get_tensor_into_cuda(
        ["tb1", "missing", "t"], [dst, torch.zeros(3, 4), torch.zeros(4, 3)]
    ) == [48, -704, -600]
    assert torch.equal(dst, tensor + 1)


def test_mixed_put_and_put_tensor_from_two_threads(own_store: MooncakeDistributedStore) -> None:
    store = own_store
    torch = pytest.importorskip("torch")
    n = 12
    values = [f"regular-{i}-".encode() * 4096 for i in range(n)]
    tensors = [(torch.arange(4096, dtype=torch.float32) + i).reshape(64, 64) for i in range(n)]
    errors: list[str] = []
    start = threading.Event()

    def puts() -> None:
        start.wait()
        for i, v in enumerate(values):
            if (rc := store.put(f"mix_r{i}", v)) != 0:
                errors.append(f"put {i}: {rc}")

    def tensor_puts() -> None:
        start.wait()
        for i, t in enumerate(tensors):
            if (rc := store.put_tensor(f"mix_t{i}", t)) != 0:
                errors.append(f"put_tensor {i}: {rc}")

    threads = [threading.Thread(target=puts), threading.Thread(target=tensor_puts)]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(60)
    assert errors == []
    for i in range(n):
        assert store.get(f"mix_r{i}") == values[i]
        assert torch.equal(store.get_tensor(f"mix_t{i}"), tensors[i])


# --- liveness and authentication ----------------------------------------------------------------


def test_a_silent_dummy_is_unmapped_and_registers_again(
    own_real: StoreClient, caplog: pytest.LogCaptureFixture
) -> None:
    real = own_real
    config = DummyServiceConfig(host=LOCAL, port=0, ttl_s=0.6, monitor_interval_s=0.1)
    with DummyService(real, config) as svc:
        store = MooncakeDistributedStore()
        try:
            assert store.setup_dummy(8 * MiB, 4 * MiB, svc.address) == 0
            ptr = registered(store, MiB)
            assert svc.stats()["regions"] == 2
            client = client_of(store)
            client._stop.set()  # no more pings: the dummy looks dead to the real client
            client._ping_thread.join(5)
            with caplog.at_level(logging.WARNING, logger="pymooncake.store.dummy"):
                assert wait_until(lambda: svc.stats()["regions"] == 0, 10)
            assert "sent no ping for 0.6 s: unmapping its 2 shared region(s)" in caplog.text
            # it was only silent: its next call registers its memory again and works
            ctypes.memmove(ptr, b"back", 4)
            assert store.put_from("silent_key", ptr, 4) == 0
            assert store.get("silent_key") == b"back"
            assert svc.stats()["regions"] == 2
        finally:
            store.close()


def test_cluster_token_guards_the_rpc_port(
    own_real: StoreClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = own_real
    secure = DummyServiceConfig(host=LOCAL, port=0, security=ClusterSecurity(token=TOKEN))
    with DummyService(real, secure) as svc:
        store = MooncakeDistributedStore()
        monkeypatch.delenv("PYMOONCAKE_CLUSTER_TOKEN", raising=False)
        with caplog.at_level(logging.ERROR, logger="mooncake.store"):
            assert store.setup_dummy(MiB, MiB, svc.address) == -1
        assert "PYMOONCAKE_CLUSTER_TOKEN" in caplog.text
        monkeypatch.setenv("PYMOONCAKE_CLUSTER_TOKEN", "another-token-0123456789abcdef")
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="mooncake.store"):
            assert store.setup_dummy(MiB, MiB, svc.address) == -1
        assert "token" in caplog.text
        monkeypatch.setenv("PYMOONCAKE_CLUSTER_TOKEN", TOKEN)
        assert store.setup_dummy(MiB, MiB, svc.address) == 0
        assert store.put("auth_key", b"ok") == 0
        assert store.get("auth_key") == b"ok"
        store.close()
    with DummyService(real, DummyServiceConfig(host=LOCAL, port=0)) as open_svc:
        store = MooncakeDistributedStore()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="mooncake.store"):
            assert store.setup_dummy(MiB, MiB, open_svc.address) == -1  # still holds TOKEN
        assert "has no" in caplog.text or "no token" in caplog.text.lower()
        store.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificates")
def test_rpc_port_over_tls(
    own_real: StoreClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_test_pki(tmp_path).env(TOKEN)
    for k, v in files.items():
        monkeypatch.setenv(k, v)
    config = DummyServiceConfig(host=LOCAL, port=0, security=ClusterSecurity.from_env())
    with DummyService(own_real, config) as svc:
        store = MooncakeDistributedStore()
        try:
            assert store.setup_dummy(MiB, MiB, svc.address) == 0
            assert store.put("tls_key", b"over tls") == 0
            assert store.get("tls_key") == b"over tls"
        finally:
            store.close()


def test_a_second_service_on_the_same_port_is_refused(
    real: StoreClient, service: DummyService
) -> None:
    from pymooncake.errors import PortInUse

    with pytest.raises(PortInUse, match="port"):
        DummyService(real, DummyServiceConfig(host=LOCAL, port=service.port))


# ----------------------------------------------------------------------------------------
# processes: mooncake_client and dummies in their own processes
# ----------------------------------------------------------------------------------------

PEER = Path(__file__).with_name("dummy_peer_script.py")


class Peer:
    """A dummy client in its own process (``dummy_peer_script.py``)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self._replies: queue.Queue[Any] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("REPLY "):
                self._replies.put(json.loads(line[6:]))
        self.proc.stdout.close()

    def send(self, op: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout_s: float = 60.0) -> Any:
        try:
            return self._replies.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(
                f"no reply within {timeout_s} s:\n{''.join(self.lines[-30:])}"
            ) from None

    def call(self, op: str, **args: Any) -> Any:
        self.send(op, **args)
        return self.reply()

    def log(self) -> str:
        return "".join(line for line in self.lines if line.startswith("LOG "))

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        elif self.proc.stdin is not None:
            self.proc.stdin.close()
        self._reader.join(10)


@contextlib.contextmanager
def peers(n: int, env: dict[str, str] | None = None) -> Iterator[list[Peer]]:
    made = [Peer(env) for _ in range(n)]
    try:
        yield made
    finally:
        for p in made:
            p.close()


def dummy_regions_mapped(pid: int) -> int:
    """Shared regions of dummies mapped in process ``pid`` (their memfd name)."""
    with open(f"/proc/{pid}/maps") as f:
        return sum("memfd:mooncake_shm" in line for line in f)


def serving(node: Any) -> str:
    return str(node.wait_for(r"serving dummy clients on (\S+)").group(1))


@pytest.mark.slow
def test_two_dummy_processes_hand_keys_to_each_other() -> None:
    with ProcessCluster([f"--default_kv_lease_ttl={LEASE_MS}"]) as pc:
        node, segment = pc.node("64 MB")
        address = serving(node)
        with peers(2) as (a, b):
            for p in (a, b):
                assert p.call("setup", addr=address, pool=8 * MiB, local=4 * MiB) == 0
            # bytes: put in one, get in the other, and back
            one, two = pattern(3000, 1), pattern(MiB, 2)
            assert a.call("put", key="from_a", hex=one.hex()) == 0
            assert b.call("exist", key="from_a") == 1
            assert b.call("size", key="from_a") == len(one)
            assert bytes.fromhex(b.call("get", key="from_a")) == one
            assert b.call("put", key="from_a", hex=two.hex()) == 0  # exists: kept
            assert b.call("put", key="from_b", hex=two.hex()) == 0
            assert bytes.fromhex(a.call("get", key="from_b")) == two
            # zero copy: registered pool buffers on both sides
            three = pattern(500_000, 3)
            assert a.call("put_pool", key="pool_a", hex=three.hex()) == 0
            n, data = b.call("get_pool", key="pool_a")
            assert n == len(three) and bytes.fromhex(data) == three
            assert b.call("put_pool", key="pool_b", hex=one.hex()) == 0
            n, data = a.call("get_pool", key="pool_b")
            assert n == len(one) and bytes.fromhex(data) == one
            # both dummies' memory is mapped in the real client; the replica is its segment
            assert dummy_regions_mapped(node.proc.pid) == 4
            time.sleep(LEASE_MS / 1000 + 0.1)
            assert a.call("remove", key="from_b") == 0
            assert b.call("exist", key="from_b") == 0
            assert b.call("close") == 0
            assert wait_until(lambda: dummy_regions_mapped(node.proc.pid) == 2, 10)
        assert wait_until(lambda: dummy_regions_mapped(node.proc.pid) == 0, 10)
        assert segment


@pytest.mark.slow
def test_a_real_client_restart_is_survived() -> None:
    port = free_port()
    flags = [f"--port={port}"]
    with ProcessCluster([f"--default_kv_lease_ttl={LEASE_MS}", "--client_ttl=2"]) as pc:
        node, _ = pc.node("64 MB", flags=flags)
        address = serving(node)
        with peers(1) as (p,):
            assert p.call("setup", addr=address, pool=8 * MiB, local=4 * MiB) == 0
            assert p.call("put", key="before", hex="00ff") == 0
            assert p.call("put_pool", key="before_pool", hex="abcd") == 0
            # a call is out when the real client dies: it fails, saying so
            node.proc.send_signal(signal.SIGSTOP)
            p.send("put", key="in_flight", hex="01")
            time.sleep(0.5)
            node.kill(signal.SIGKILL)
            got = p.reply()
            # (failed once in CI with 0: what both sides printed, for the next look)
            assert got == -900, (
                f"the in-flight put answered {got}; dummy:\n{''.join(p.lines[-30:])}"
                f"real client:\n{''.join(node.lines[-30:])}"
            )
            assert "broke during put('in_flight')" in p.log()
            assert "may or may not have taken effect" in p.log()
            pc.nodes.remove(node)
            # while it is down, calls fail at once with RPC_FAIL, and the pings notice
            assert p.call("put", key="down", hex="02") == -900
            assert "cannot reach the real client (mooncake_client)" in p.log()
            assert wait_until(lambda: p.call("health") == 2, 10)
            new, _ = pc.node("64 MB", flags=flags)
            assert serving(new) == address
            assert wait_until(lambda: p.call("health") == 0, 30), "".join(p.lines[-20:])
            assert "registered 2 shared region(s) again" in p.log()
            assert dummy_regions_mapped(new.proc.pid) == 2
            # later calls work, bytes and zero copy (old objects died with the old segment)
            assert p.call("put", key="after", hex="0a0b") == 0
            assert p.call("get", key="after") == "0a0b"
            assert p.call("put_pool", key="after_pool", hex="beef") == 0
            assert p.call("get_pool", key="after_pool") == [2, "beef"]


@pytest.mark.slow
def test_a_killed_dummy_is_cleaned_up_by_the_real_client() -> None:
    with ProcessCluster() as pc:
        node, _ = pc.node("64 MB", flags=["--dummy_client_ttl_sec=2"])
        address = serving(node)
        with peers(2) as (dead, alive):
            for p in (dead, alive):
                assert p.call("setup", addr=address, pool=8 * MiB, local=4 * MiB) == 0
                assert p.call("put_pool", key=f"k{id(p)}", hex="11") == 0
            assert dummy_regions_mapped(node.proc.pid) == 4
            dead.proc.kill()
            dead.proc.wait(10)
            t0 = time.monotonic()
            assert wait_until(lambda: dummy_regions_mapped(node.proc.pid) == 2, 15)
            assert time.monotonic() - t0 >= 1.0  # after the TTL, not at once
            assert any(
                "sent no ping for 2 s: unmapping its 2 shared region(s)" in line
                for line in node.lines
            )
            assert alive.call("health") == 0  # the other one is untouched
            assert alive.call("put", key="still", hex="22") == 0
            assert alive.call("get", key="still") == "22"
