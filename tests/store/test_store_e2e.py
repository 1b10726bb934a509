"""End-to-end store tests: a real master (RPC, admin HTTP, embedded metadata
server) and several StoreClients in this process, talking over real sockets
on 127.0.0.1.

Every test builds its own cluster (they start in milliseconds), so nothing
a test opens outlives it: the autouse leak check of tests/conftest.py sees
every socket and thread closed.  Leases and TTLs are short (a few hundred ms)
so the waits that lease semantics need stay small; every loop is bounded in
iterations and in time.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import itertools
import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from pymooncake.errors import (
    InvalidParams,
    LeaseExpired,
    NoAvailableHandle,
    ObjectHasLease,
    ObjectNotFound,
    ReplicaNotReady,
    StoreError,
)
from pymooncake.store import (
    ErrorCode,
    MasterConfig,
    ReplicaStatus,
    ReplicateConfig,
    SoftPinAction,
    StoreClient,
)
from pymooncake.testing import LocalCluster, run_threads, wait_until
from pymooncake.wire._master_msgs import SLOT_MARK

KiB = 1 << 10
MiB = 1 << 20
LEASE_MS = 300
LEASE_S = LEASE_MS / 1000
#: the sizes every data path is exercised with: tiny, one page, odd, large
SIZES = (1, 4 * KiB, MiB + 3, 8 * MiB)


def _config(**kw: Any) -> MasterConfig:
    base: dict[str, Any] = {"default_kv_lease_ttl_ms": LEASE_MS, "client_ttl_s": 2.0}
    base.update(kw)
    return MasterConfig(**base)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(_config()) as c:
        yield c


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


_HDR = struct.Struct("<II")


def checked(body: bytes) -> bytes:
    """A value that proves its own integrity: crc32 and length of the body first."""
    return _HDR.pack(zlib.crc32(body), len(body)) + body


def verify(value: bytes | memoryview) -> bytes:
    """The body of a :func:`checked` value; AssertionError if it is torn."""
    value = bytes(value)
    assert len(value) >= _HDR.size, f"value of {len(value)} bytes has no header"
    crc, n = _HDR.unpack_from(value)
    body = value[_HDR.size :]
    assert len(body) == n, f"length header {n} but {len(body)} body bytes"
    assert zlib.crc32(body) == crc, "checksum mismatch: torn or stale value"
    return body


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        exc.close()
        return int(exc.code), body


def metric(cluster_metrics_url: str, name: str) -> float:
    _, body = http_get(cluster_metrics_url + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def master_keys(cluster: LocalCluster) -> set[str]:
    """The master's keys (reserved put buffers are not keys)."""
    return set(cluster.master.call(lambda st: [k for k in st.objects if k[:1] != SLOT_MARK]))


def validate_master(cluster: LocalCluster) -> None:
    cluster.master.call(lambda st: st.validate())


def record_endpoints(client: StoreClient) -> list[str]:
    """Wrap the client's engine so every transfer's target segment is recorded."""
    calls: list[str] = []
    original = client.engine.transfer

    def transfer(target: Any, requests: Any, *args: Any, **kw: Any) -> Any:
        calls.append(target)
        return original(target, requests, *args, **kw)

    client.engine.transfer = transfer  # type: ignore[method-assign]
    return calls


# ----------------------------------------------------------------------------------
# basic data paths, in both metadata modes
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("p2p", [False, True], ids=["http-metadata", "p2p-handshake"])
def test_put_get_every_size(p2p: bool) -> None:
    with LocalCluster(_config()) as cluster:
        a = cluster.client(32 * MiB, 16 * MiB, p2p=p2p)
        b = cluster.client(32 * MiB, 16 * MiB, p2p=p2p)
        reader = cluster.client(0, 16 * MiB, p2p=p2p)  # pure client: no segment
        for i, size in enumerate(SIZES):
            key = f"obj-{size}"
            value = payload(size, i)
            # land it in b's segment so that both remote and local reads are exercised
            cfg = ReplicateConfig(preferred_segments=(b.hostname,))
            assert a.put(key, value, cfg) is True
            (rep,) = a.replicas(key)
            assert rep.endpoint == b.hostname
            assert rep.size == size and rep.status is ReplicaStatus.COMPLETE
            for c in (a, b, reader):
                assert c.get(key) == value
                assert c.size_of(key) == size
                assert c.exists(key)
        assert reader.exists_many(["obj-1", "missing", f"obj-{8 * MiB}"]) == [True, False, True]
        with pytest.raises(ObjectNotFound) as info:
            reader.get("missing")
        assert info.value.code == ErrorCode.OBJECT_NOT_FOUND
        assert reader.health() and a.health()
        validate_master(cluster)


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
def test_every_method_at_every_size(cluster: LocalCluster, size: int) -> None:
    """One pass over the whole StoreClient surface with one object size."""
    # room for every 8 MiB value of the test (56 MiB), the buffers the clients
    # reserve ahead and an upsert's new replicas in either segment: puts are placed
    # at random, and with 48 MiB each one segment now and then passed its high
    # watermark and evicted a key the test reads back (~1 run in 60)
    a = cluster.client(96 * MiB, 16 * MiB)
    b = cluster.client(96 * MiB, 16 * MiB)
    value, other = payload(size, 1), payload(size, 2)
    cut = size // 3
    # writes
    assert a.put("put", value) is True
    assert a.put_parts("parts", [value[:cut], value[cut:]]) is True
    src = b.engine.allocate(size)
    src.view[:] = value
    assert b.put_from("from", src.addr, size) is True
    assert b.put_many(["many-1", "many-2"], [[value], [(src.addr, cut), value[cut:]]]) == [
        True,
        True,
    ]
    a.upsert("ups", other)
    a.upsert("ups", value)
    assert a.upsert_many(["ups-many"], [[(src.addr, size)]]) == [True]
    keys = ["put", "parts", "from", "many-1", "many-2", "ups", "ups-many"]
    # reads
    for k in keys:
        assert b.get(k) == value, k
    assert a.get_many(keys) == [value] * len(keys)
    dst = a.engine.allocate(size)
    assert a.get_into("parts", dst.addr, size) == size
    assert bytes(dst.view) == value
    parts = [bytearray(cut), bytearray(size - cut)]
    assert a.get_many_into(["ups"], [parts]) == [size]
    assert bytes(parts[0] + parts[1]) == value
    handle = a.get_buffer("many-2")
    assert bytes(handle) == value
    handle.release()
    (loc,) = a.locate(["from"])
    assert not isinstance(loc, StoreError) and loc.size == size
    tail = bytearray(min(size, 100))
    assert a.read_ranges([loc], [[(memoryview(tail), size - len(tail))]]) == [[len(tail)]]
    assert bytes(tail) == value[size - len(tail) :]
    # queries
    assert all(a.exists_many(keys))
    assert [a.size_of(k) for k in keys] == [size] * len(keys)
    for reps in a.replicas_many(keys):
        assert not isinstance(reps, StoreError)
        assert [r.size for r in reps] == [size]
        assert reps[0].endpoint in (a.hostname, b.hostname)
    # removal (the reads above hold leases)
    with pytest.raises(ObjectHasLease):
        a.remove("put")
    a.remove("put", force=True)
    assert a.remove_many(["parts", "from"], force=True) == [None, None]
    assert a.remove_by_regex("^many-", force=True) == 2
    assert a.remove_all(force=True) == 2
    assert not any(a.exists_many(keys))
    b.engine.free(src.addr)
    a.engine.free(dst.addr)
    validate_master(cluster)


def test_put_existing_key_returns_false_and_keeps_value(cluster: LocalCluster) -> None:
    a = cluster.client(16 * MiB)
    b = cluster.client(16 * MiB)
    first, second = payload(4 * KiB, 1), payload(4 * KiB, 2)
    assert a.put("k", first) is True
    assert a.put("k", second) is False
    assert b.put("k", payload(100, 3)) is False  # another writer, other size: still no overwrite
    assert b.put_parts("k", [second[:10], second[10:]]) is False
    assert b.put_many(["k", "k2"], [[second], [second]]) == [False, True]
    src = np.frombuffer(second, dtype=np.uint8).copy()
    b.engine.register(src)
    assert b.put_from("k", src) is False
    for c in (a, b):
        assert c.get("k") == first
    assert b.get("k2") == second


def test_put_parts_put_many_get_many(cluster: LocalCluster) -> None:
    a = cluster.client(32 * MiB)
    b = cluster.client(32 * MiB)
    parts = [payload(n, n) for n in (1, 4 * KiB, MiB + 3)]
    assert a.put_parts("parts", parts) is True
    assert b.get("parts") == b"".join(parts)

    # put_many: buffers and (address, size) pairs of registered memory
    region = a.engine.allocate(2 * MiB)
    raw = payload(2 * MiB, 9)
    region.view[:] = raw
    keys = [f"many-{i}" for i in range(4)]
    values: list[list[Any]] = [
        [payload(1, 10)],
        [payload(4 * KiB, 11), payload(5, 12)],
        [(region.addr, MiB + 3)],
        [(region.addr + 7, 100), memoryview(raw)[:50]],
    ]
    expect = [
        values[0][0],
        values[1][0] + values[1][1],
        raw[: MiB + 3],
        raw[7:107] + raw[:50],
    ]
    assert a.put_many(keys, values) == [True] * 4
    got = b.get_many([*keys, "absent"])
    assert got[:4] == expect
    assert isinstance(got[4], ObjectNotFound)
    assert [
        r.size for rs in b.replicas_many(keys) if not isinstance(rs, StoreError) for r in rs
    ] == [len(v) for v in expect]
    missing = b.replicas_many(["absent"])[0]
    assert isinstance(missing, ObjectNotFound)
    a.engine.free(region.addr)


def test_invalid_keys_and_values_are_refused(cluster: LocalCluster) -> None:
    a = cluster.client(16 * MiB)
    with pytest.raises(InvalidParams):
        a.put("", b"x")
    with pytest.raises(InvalidParams):
        a.put("empty", b"")
    with pytest.raises(InvalidParams):
        a.put("zero-replicas", b"x", ReplicateConfig(replica_num=0))
    with pytest.raises(InvalidParams):  # a TTL is only valid with soft_pin_action ENABLE
        a.put("ttl", b"x", ReplicateConfig(soft_pin_ttl_ms=1000))
    assert not a.exists("empty") and not a.exists("zero-replicas")


def test_bytes_api_is_bounded_by_the_local_buffer(cluster: LocalCluster) -> None:
    big = cluster.client(32 * MiB, 16 * MiB)
    small = cluster.client(32 * MiB, 1 * MiB)
    value = payload(MiB + 1, 5)
    for call in (
        lambda: small.put("big", value),
        lambda: small.put_parts("big", [value[:10], value[10:]]),
        lambda: small.upsert("big", value),
        lambda: small.put_many(["big"], [[value]], bytes_api=True),
    ):
        with pytest.raises(InvalidParams) as info:
            call()
        assert info.value.code == ErrorCode.INVALID_PARAMS
        assert "local_buffer_size" in str(info.value)
    assert not big.exists("big")
    # exactly the local buffer size is fine
    assert small.put("fits", payload(MiB, 6)) is True
    # reading a larger object with the bytes API is refused too; zero-copy reads are not bounded
    assert big.put("big", value) is True
    with pytest.raises(InvalidParams):
        small.get("big")
    res = small.get_many(["big", "fits"])
    assert isinstance(res[0], InvalidParams) and res[1] == payload(MiB, 6)
    dst = bytearray(len(value))
    assert small.get_into("big", dst) == len(value)
    assert bytes(dst) == value
    # the zero-copy write path is not bounded by the local buffer either
    src = np.frombuffer(value, dtype=np.uint8).copy()
    small.engine.register(src)
    assert small.put_from("big-zero-copy", src) is True
    assert big.get("big-zero-copy") == value


# ----------------------------------------------------------------------------------
# zero copy
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
def test_zero_copy_numpy_and_raw_addresses(cluster: LocalCluster, size: int) -> None:
    a = cluster.client(32 * MiB)
    b = cluster.client(32 * MiB)
    src = np.frombuffer(payload(size, size), dtype=np.uint8).copy()
    a.engine.register(src)
    dst = np.zeros(size + 16, dtype=np.uint8)  # room to spare: only `size` bytes are written
    b.engine.register(dst)

    # numpy array in, numpy array out
    assert a.put_from("np", src) is True
    assert b.get_into("np", dst) == size
    assert np.array_equal(dst[:size], src) and not dst[size:].any()

    # raw registered address + size, and (address, size) tuples
    dst[:] = 0
    assert a.put_from("raw", src.ctypes.data, size) is True
    assert b.get_into("raw", dst.ctypes.data, size) == size
    assert np.array_equal(dst[:size], src)
    dst[:] = 0
    assert b.get_into("np", (dst.ctypes.data, dst.nbytes)) == size
    assert np.array_equal(dst[:size], src)

    # a float32 view of the same bytes round-trips through its buffer protocol
    if size % 4 == 0:
        floats = src.view(np.float32)
        out = np.empty_like(floats)
        assert b.get_into("np", out) == size
        assert np.array_equal(out.view(np.uint8), src)

    # memory the engine allocated (the reference's registered buffers)
    region = b.engine.allocate(size)
    assert b.get_into("raw", region.addr, size) == size
    assert bytes(region.view) == src.tobytes()
    b.engine.free(region.addr)

    # foreign memory registered by raw address (register_buffer(ptr, size) in the reference)
    raw_src = ctypes.create_string_buffer(src.tobytes(), size)
    raw_dst = ctypes.create_string_buffer(size)
    a.engine.register(ctypes.addressof(raw_src), size)
    b.engine.register(ctypes.addressof(raw_dst), size)
    assert a.put_from("ctypes", ctypes.addressof(raw_src), size) is True
    assert b.get_into("ctypes", ctypes.addressof(raw_dst), size) == size
    assert raw_dst.raw == src.tobytes()
    a.engine.unregister(ctypes.addressof(raw_src))
    b.engine.unregister(ctypes.addressof(raw_dst))


def test_get_many_into_multipart_destinations(cluster: LocalCluster) -> None:
    a = cluster.client(32 * MiB)
    b = cluster.client(32 * MiB)
    values = {f"mp-{n}": payload(n, n) for n in SIZES}
    assert a.put_many(list(values), [[v] for v in values.values()]) == [True] * len(values)
    keys = [*values, "mp-missing"]
    dests: list[list[Any]] = []
    bufs: list[list[bytearray]] = []
    for key in keys:
        n = len(values.get(key, b"x"))
        # split each destination into three uneven parts, with 5 bytes to spare at the end
        cuts = sorted({0, n // 3, n // 2 + 1, n + 5})
        parts = [bytearray(hi - lo) for lo, hi in itertools.pairwise(cuts)]
        bufs.append(parts)
        dests.append(parts)
    region = b.engine.allocate(MiB)
    # one destination mixes a bytearray and an (address, size) tuple
    keys.append("mp-4096")
    head = bytearray(1000)
    dests.append([head, (region.addr, MiB)])
    res = b.get_many_into(keys, dests)
    for i, key in enumerate(keys[:-2]):
        assert res[i] == len(values[key])
        joined = b"".join(bufs[i])
        assert joined[: len(values[key])] == values[key]
        assert joined[len(values[key]) :] == b"\0" * 5
    assert isinstance(res[-2], ObjectNotFound)
    assert res[-1] == 4 * KiB
    assert bytes(head) + bytes(region.view[: 4 * KiB - 1000]) == values["mp-4096"]
    with pytest.raises(InvalidParams):
        b.get_many_into(["mp-1"], [])
    b.engine.free(region.addr)


def test_one_key_from_a_peer_into_several_parts(cluster: LocalCluster) -> None:
    """A single key another client holds is read with one engine call (no batch
    plan): parts filled back to back, an empty part skipped, the object's size
    returned; a missing key and a short destination answer as in a batch."""
    a = cluster.client(32 * MiB)
    b = cluster.client(32 * MiB)
    value = payload(100 * KiB + 7, 3)
    assert a.put("one-parts", value) is True
    parts = [bytearray(10), bytearray(0), bytearray(len(value) - 10 + 4)]
    assert b.get_many_into(["one-parts"], [parts]) == [len(value)]
    assert (bytes(parts[0]) + bytes(parts[2]))[: len(value)] == value
    assert b.get("one-parts") == value
    (missing,) = b.get_many_into(["one-absent"], [[bytearray(8)]])
    assert isinstance(missing, ObjectNotFound)
    (short,) = b.get_many_into(["one-parts"], [[bytearray(len(value) - 1)]])
    assert isinstance(short, StoreError)


def test_pointer_batches_across_regions_and_own_segment(cluster: LocalCluster) -> None:
    """Batches of (address, size) pairs that hop between registered buffers, leave
    them for unregistered memory, and land in the writer's own segment (local
    copies) or a peer's: every value arrives intact and a short destination is
    refused without being written."""
    a = cluster.client(32 * MiB)
    b = cluster.client(32 * MiB)
    one, two = a.engine.allocate(MiB), a.engine.allocate(MiB)
    raw = ctypes.create_string_buffer(64 * KiB)  # not registered: the engine's raw path
    sizes = [1, 64, 4 * KiB, 100, 64 * KiB - 1, 7]
    places = [(one, 0), (one, 64), (two, 0), (one, 8 * KiB), (two, 100 * KiB), (one, 999_999)]
    values = [payload(n, i + 50) for i, n in enumerate(sizes)]
    ptrs = []
    for (region, off), v in zip(places, values, strict=True):
        region.view[off : off + len(v)] = v
        ptrs.append(region.addr + off)
    raw.raw = values[1] + b"\0" * (64 * KiB - 64)
    ptrs.append(ctypes.addressof(raw))
    sizes.append(64)
    values.append(values[1])
    keys = [f"ptr-{i}" for i in range(len(sizes))]
    res = a.put_many(keys, [[(p, n)] for p, n in zip(ptrs, sizes, strict=True)])
    assert res == [True] * len(keys)
    for reader in (a, b):
        dst = reader.engine.allocate(MiB)
        offs = [i * 70 * KiB % (MiB - 64 * KiB) for i in range(len(keys))]
        got = reader.get_many_into(
            keys, [[(dst.addr + o, n)] for o, n in zip(offs, sizes, strict=True)]
        )
        assert got == sizes
        for o, v in zip(offs, values, strict=True):
            assert bytes(dst.view[o : o + len(v)]) == v
        # a destination one byte short is refused and left untouched
        short = reader.get_many_into([keys[2]], [[(dst.addr + 512 * KiB, sizes[2] - 1)]])
        assert isinstance(short[0], StoreError)
        assert not any(dst.view[512 * KiB : 512 * KiB + sizes[2]])
        reader.engine.free(dst.addr)
    a.engine.free(one.addr)
    a.engine.free(two.addr)


@pytest.mark.parametrize("short_by", [1, 4 * KiB])
def test_get_into_too_small_destination(cluster: LocalCluster, short_by: int) -> None:
    a = cluster.client(32 * MiB)
    b = cluster.client(32 * MiB)
    value = payload(MiB + 3, 1)
    assert a.put("k", value) is True
    dst = bytearray(len(value) - short_by)
    with pytest.raises(StoreError) as info:
        b.get_into("k", dst)
    assert info.value.code in (ErrorCode.INVALID_PARAMS, ErrorCode.BUFFER_OVERFLOW)
    assert not any(dst), "a refused read must not write into the destination"
    res = b.get_many_into(["k"], [[bytearray(10), bytearray(len(value) - 10 - short_by)]])
    assert isinstance(res[0], StoreError)
    # the object itself is intact
    assert b.get_into("k", bytearray(len(value))) == len(value)


# ----------------------------------------------------------------------------------
# get_buffer handles
# ----------------------------------------------------------------------------------


def test_get_buffer_handles_and_local_buffer_exhaustion(cluster: LocalCluster) -> None:
    a = cluster.client(32 * MiB)
    b = cluster.client(0, 2 * MiB)
    values = {f"h-{i}": payload(512 * KiB, i) for i in range(8)}
    for k, v in values.items():
        assert a.put(k, v) is True
    h = b.get_buffer("h-0")
    assert bytes(h) == values["h-0"]
    assert h.tobytes() == values["h-0"]
    assert len(h) == h.size() == 512 * KiB
    assert h.ptr() != 0
    assert bytes(memoryview(h)[:16]) == values["h-0"][:16]
    assert np.frombuffer(h, dtype=np.uint8).tobytes() == values["h-0"]
    h.release()
    free_all = b.local.free_bytes

    held = []
    with pytest.raises(NoAvailableHandle) as info:
        for k in list(values):  # bounded: 8 x 512 KiB > the 2 MiB local buffer
            held.append(b.get_buffer(k))
    assert info.value.code == ErrorCode.NO_AVAILABLE_HANDLE
    assert 1 <= len(held) <= 4
    for got, key in zip(held, values, strict=False):
        assert bytes(got) == values[key]
    held.pop().release()
    again = b.get_buffer("h-7")  # room again after one release
    assert bytes(again) == values["h-7"]
    again.release()
    for got in held:
        got.release()
    held.clear()
    assert b.local.free_bytes == free_all
    # a handle can also be given back by dropping it
    h = b.get_buffer("h-1")
    del h
    assert b.local.free_bytes == free_all
    with pytest.raises(ObjectNotFound):
        b.get_buffer("missing")
    assert b.local.free_bytes == free_all


# ----------------------------------------------------------------------------------
# locate + read_ranges
# ----------------------------------------------------------------------------------


def test_read_ranges(cluster: LocalCluster) -> None:
    a = cluster.client(32 * MiB)
    b = cluster.client(32 * MiB)
    v1, v2 = payload(MiB + 3, 1), payload(4 * KiB, 2)
    assert a.put("r1", v1) is True
    assert a.put("r2", v2) is True
    locs = b.locate(["r1", "r2", "nope"])
    assert isinstance(locs[2], ObjectNotFound)
    l1, l2 = locs[0], locs[1]
    assert not isinstance(l1, StoreError) and not isinstance(l2, StoreError)
    assert (l1.key, l1.size, len(l1.replicas)) == ("r1", MiB + 3, 1)
    assert l1.lease_deadline > time.monotonic()
    d = [bytearray(n) for n in (10, 4 * KiB, MiB, 3, 5, 1, 1)]
    ranges = [
        [
            (memoryview(d[0]), 0),
            (memoryview(d[1]), 12345),
            (memoryview(d[2]), 3),  # ends exactly at the object's end
            (memoryview(d[3]), MiB + 1),  # crosses the end: out of range
            (memoryview(d[4]), -1),  # negative offset: out of range
        ],
        [(memoryview(d[5]), 4 * KiB - 1), (memoryview(d[6]), 4 * KiB)],  # last byte; one past
    ]
    res = b.read_ranges([l1, l2], ranges)
    assert res[0][:3] == [10, 4 * KiB, MiB]
    assert isinstance(res[0][3], InvalidParams) and isinstance(res[0][4], InvalidParams)
    assert res[1][0] == 1 and isinstance(res[1][1], InvalidParams)
    assert bytes(d[0]) == v1[:10]
    assert bytes(d[1]) == v1[12345 : 12345 + 4 * KiB]
    assert bytes(d[2]) == v1[3:]
    assert bytes(d[3]) == b"\0" * 3 and bytes(d[4]) == b"\0" * 5
    assert bytes(d[5]) == v2[-1:]

    # after the lease has run out, ranged reads are refused (the space may be reused)
    time.sleep(LEASE_S + 0.1)
    late = b.read_ranges([l1], [[(memoryview(bytearray(8)), 0)]])
    assert isinstance(late[0][0], LeaseExpired)


# ----------------------------------------------------------------------------------
# upsert
# ----------------------------------------------------------------------------------


def test_upsert_replaces_and_inserts(cluster: LocalCluster) -> None:
    a = cluster.client(32 * MiB)
    b = cluster.client(32 * MiB)
    a.upsert("u", payload(4 * KiB, 1))  # insert
    assert b.get("u") == payload(4 * KiB, 1)
    a.upsert("u", payload(4 * KiB, 2))  # same size
    assert b.get("u") == payload(4 * KiB, 2)
    b.upsert("u", payload(MiB + 3, 3))  # other size, other writer
    assert a.get("u") == payload(MiB + 3, 3)
    assert a.size_of("u") == MiB + 3
    assert a.upsert_many(["u", "u2"], [[payload(10, 4)], [payload(20, 5), payload(1, 6)]]) == [
        True,
        True,
    ]
    assert b.get_many(["u", "u2"]) == [payload(10, 4), payload(20, 5) + payload(1, 6)]
    # the old buffers are freed once their read lease has run out
    time.sleep(LEASE_S + 0.3)
    validate_master(cluster)
    discards = cluster.master.call(lambda st: len(st._discards))
    assert discards == 0


def test_upsert_readers_never_see_torn_values(cluster: LocalCluster) -> None:
    writer = cluster.client(32 * MiB)
    readers = [cluster.client(32 * MiB) for _ in range(2)]
    size = 256 * KiB
    versions = [checked(payload(size - _HDR.size, v)) for v in range(6)]
    writer.put("hot", versions[0])
    stop = threading.Event()
    seen: list[int] = []
    upserts = 0

    def upsert_loop() -> None:
        nonlocal upserts
        deadline = time.monotonic() + 2.0
        try:
            for i in range(1, 200):
                if time.monotonic() > deadline:
                    break
                writer.upsert("hot", versions[i % len(versions)])
                upserts += 1
        finally:
            stop.set()

    def read_loop(client: StoreClient) -> None:
        for _ in range(2000):
            if stop.is_set():
                break
            try:
                value = client.get("hot")
            except LeaseExpired:
                continue  # a stalled read is reported, never returned torn
            verify(value)
            seen.append(versions.index(value))

    run_threads([upsert_loop, *(functools.partial(read_loop, r) for r in readers)], 30)
    assert upserts >= 5 and len(seen) >= 10
    assert len(set(seen)) >= 2, "readers never observed a new value"


# ----------------------------------------------------------------------------------
# removal and leases
# ----------------------------------------------------------------------------------


def test_remove_variants_without_leases(cluster: LocalCluster) -> None:
    a = cluster.client(32 * MiB)
    for k in ("x1", "x2", "x3", "y1", "y2", "z"):
        assert a.put(k, k.encode()) is True
    a.remove("x1")
    with pytest.raises(ObjectNotFound):
        a.remove("x1")
    res = a.remove_many(["x2", "x3", "x1"])
    assert res[0] is None and res[1] is None and isinstance(res[2], ObjectNotFound)
    assert a.remove_by_regex("^y") == 2
    assert a.remove_by_regex("^y") == 0
    with pytest.raises(InvalidParams):
        a.remove_by_regex("(unclosed")
    assert a.put("w", b"w") is True
    assert a.remove_all() == 2
    assert a.remove_all() == 0
    assert master_keys(cluster) == set()
    # removed keys can be put again
    assert a.put("x1", b"again") is True
    assert a.get("x1") == b"again"
    validate_master(cluster)


def test_read_lease_blocks_removal_until_it_expires() -> None:
    lease_s = 1.0  # long enough that the checks below surely run inside it
    with LocalCluster(_config(default_kv_lease_ttl_ms=int(lease_s * 1000))) as cluster:
        a = cluster.client(32 * MiB)
        b = cluster.client(0)
        readers: dict[str, Callable[[str], Any]] = {
            "get": b.get,
            "get_into": lambda k: b.get_into(k, bytearray(16)),
            "get_buffer": lambda k: b.get_buffer(k).release(),
            "get_many": lambda k: b.get_many([k]),
            "exists": b.exists,
            "exists_many": lambda k: b.exists_many([k]),
            "size_of": b.size_of,
            "replicas": b.replicas,
            "replicas_many": lambda k: b.replicas_many([k]),
            "locate": lambda k: b.locate([k]),
        }
        keys = [f"leased-{name}" for name in readers]
        for k in [*keys, "unread"]:
            assert a.put(k, b"v") is True
        a.remove("unread")  # never read: no lease, removable at once
        assert a.put("unread", b"v") is True
        t0 = time.monotonic()
        for name, read in readers.items():
            read(f"leased-{name}")
        for k in keys:
            with pytest.raises(ObjectHasLease) as info:
                a.remove(k)
            assert info.value.code == ErrorCode.OBJECT_HAS_LEASE
        assert all(isinstance(e, ObjectHasLease) for e in a.remove_many(keys))
        assert a.remove_by_regex("^leased-") == 0
        assert a.remove_all() == 1  # only "unread"
        assert time.monotonic() - t0 < lease_s, "too slow to check the lease; results are void"
        assert master_keys(cluster) == set(keys)
        time.sleep(max(0.0, t0 + lease_s + 0.15 - time.monotonic()))
        for k in keys:
            a.remove(k)
        assert master_keys(cluster) == set()


def test_force_removes_leased_objects(cluster: LocalCluster) -> None:
    a = cluster.client(32 * MiB)
    for k in ("f1", "f2", "f3", "f4"):
        assert a.put(k, b"x" * 100) is True
    assert a.exists_many(["f1", "f2", "f3", "f4"]) == [True] * 4  # all leased now
    with pytest.raises(ObjectHasLease):
        a.remove("f1")
    a.remove("f1", force=True)
    assert a.remove_many(["f2"], force=True) == [None]
    assert a.remove_by_regex("f3", force=True) == 1
    assert a.remove_all(force=True) == 1
    assert master_keys(cluster) == set()


def test_lease_expired_when_a_read_outlives_its_lease() -> None:
    with LocalCluster(_config(default_kv_lease_ttl_ms=1)) as cluster:
        owner = cluster.client(32 * MiB)
        reader = cluster.client(0, 16 * MiB)
        value = payload(8 * MiB, 1)
        assert owner.put("slow", value) is True
        # 8 MiB over loopback TCP through Python takes far longer than 1 ms
        with pytest.raises(LeaseExpired) as info:
            reader.get("slow")
        assert info.value.code == ErrorCode.LEASE_EXPIRED
        with pytest.raises(LeaseExpired):
            reader.get_into("slow", bytearray(len(value)))
        (res,) = reader.get_many_into(["slow"], [[bytearray(len(value))]])
        assert isinstance(res, LeaseExpired)
        (loc,) = reader.locate(["slow"])
        assert not isinstance(loc, StoreError)
        time.sleep(0.01)
        (frag,) = reader.read_ranges([loc], [[(memoryview(bytearray(1)), 0)]])
        assert isinstance(frag[0], LeaseExpired)
        # the lease is long gone: plain removal works
        time.sleep(0.01)
        owner.remove("slow")


def _memfds() -> set[int]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                out.add(int(fd))
        except OSError:
            pass
    return out


def test_failed_get_buffer_releases_the_local_buffer_on_close() -> None:
    before = _memfds()
    gc.disable()  # the bug shows until the cyclic collector happens to run
    try:
        with LocalCluster(_config(default_kv_lease_ttl_ms=1)) as cluster:
            owner = cluster.client(32 * MiB)
            reader = cluster.client(0, 16 * MiB)
            assert owner.put("slow", payload(8 * MiB, 1)) is True
            free = reader.local.free_bytes
            try:
                reader.get_buffer("slow")
            except LeaseExpired:
                pass
            else:
                pytest.fail("an 8 MiB read finished within a 1 ms lease")
            assert reader.local.free_bytes == free, "the failed get_buffer kept its range"
        assert wait_until(lambda: not (_memfds() - before), 1.0), "local buffer memfd still open"
    finally:
        gc.enable()
        gc.collect()


# ----------------------------------------------------------------------------------
# replication and placement
# ----------------------------------------------------------------------------------


def test_three_replicas_survive_the_loss_of_one_owner(cluster: LocalCluster) -> None:
    owners = [cluster.client(32 * MiB) for _ in range(3)]
    reader = cluster.client(0)
    values = {f"rep-{n}": payload(n, n) for n in SIZES}
    cfg = ReplicateConfig(replica_num=3)
    for k, v in values.items():
        assert owners[0].put(k, v, cfg) is True
        reps = reader.replicas(k)
        assert len(reps) == 3
        assert {r.endpoint for r in reps} == {o.hostname for o in owners}
        assert len({r.segment_id for r in reps}) == 3
    # more replicas than segments: best effort, one per segment
    assert owners[0].put("rep-many", b"m", ReplicateConfig(replica_num=5)) is True
    assert len(reader.replicas("rep-many")) == 3

    owners[1].close()  # unmounts: its replicas disappear, the others remain
    for k, v in values.items():
        reps = reader.replicas(k)
        assert {r.endpoint for r in reps} == {owners[0].hostname, owners[2].hostname}
        assert reader.get(k) == v
        assert owners[2].get(k) == v
    validate_master(cluster)


def test_reads_fail_over_to_another_replica_when_an_owner_vanishes(cluster: LocalCluster) -> None:
    """An owner whose engine died without unmounting (the master still lists it):
    readers fall back to the surviving replica instead of failing."""
    a = cluster.client(32 * MiB)
    b = cluster.client(32 * MiB)
    reader = cluster.client(0)
    value = payload(MiB + 3, 4)
    assert (
        a.put("fo", value, ReplicateConfig(replica_num=2, preferred_segments=(b.hostname,))) is True
    )
    assert reader.replicas("fo")[0].endpoint == b.hostname
    b.engine.close()  # b's data path is gone; its segment is still mounted at the master
    calls = record_endpoints(reader)
    assert reader.get("fo") == value
    assert calls[-1] == a.hostname
    assert b.hostname in calls, "the first (dead) replica was not tried"


def test_preferred_segments_and_local_reads(cluster: LocalCluster) -> None:
    clients = [cluster.client(32 * MiB) for _ in range(3)]
    for i, c in enumerate(clients):
        for j, target in enumerate(clients):
            key = f"pref-{i}-{j}"
            cfg = ReplicateConfig(preferred_segments=(target.hostname,))
            assert c.put(key, payload(4 * KiB, i * 3 + j), cfg) is True
            assert c.replicas(key)[0].endpoint == target.hostname
    # an ordered list: the first name that exists and has room wins
    cfg = ReplicateConfig(
        preferred_segments=("127.0.0.1:1", clients[2].hostname, clients[0].hostname)
    )
    assert clients[0].put("pref-list", b"x", cfg) is True
    assert clients[0].replicas("pref-list")[0].endpoint == clients[2].hostname
    # an unknown preferred segment falls back to any segment
    cfg = ReplicateConfig(preferred_segments=("127.0.0.1:1",))
    assert clients[0].put("pref-unknown", b"x", cfg) is True
    assert clients[0].replicas("pref-unknown")[0].endpoint in {c.hostname for c in clients}
    # two replicas, the first preferred in our own segment: reads are served locally
    me = clients[1]
    cfg = ReplicateConfig(replica_num=2, preferred_segments=(me.hostname,))
    value = payload(MiB + 3, 77)
    assert clients[0].put("mine", value, cfg) is True
    reps = me.replicas("mine")
    assert reps[0].endpoint == me.hostname and len(reps) == 2
    calls = record_endpoints(me)
    for _ in range(3):
        assert me.get("mine") == value
    assert calls == []  # a replica in our own segment is a plain memcpy: no transfer at all
    # a client without a replica of its own reads the first one listed
    (other,) = [c for c in clients if c.hostname not in {r.endpoint for r in reps}]
    calls = record_endpoints(other)
    assert other.get("mine") == value
    assert calls == [reps[0].endpoint]


def test_single_reads_of_an_object_in_our_own_segment() -> None:
    """One key whose only replica is in the reader's own segment is copied without a
    transfer plan (``ReadOps._read_own``): every read API, its errors, its lease
    check and its metrics behave as on the general path."""
    with LocalCluster(_config(default_kv_lease_ttl_ms=LEASE_MS)) as cluster:
        me = cluster.client(32 * MiB, 1 * MiB)
        other = cluster.client(32 * MiB)
        mine = ReplicateConfig(preferred_segments=(me.hostname,))
        values = {n: payload(n, n) for n in (1, 4 * KiB, 64 * KiB + 1, MiB)}
        for n, value in values.items():
            assert me.put(f"own-{n}", value, mine) is True
            assert [r.endpoint for r in me.replicas(f"own-{n}")] == [me.hostname]
        calls = record_endpoints(me)
        before = me.metrics.read_bytes.value if me.metrics is not None else None
        for n, value in values.items():
            key = f"own-{n}"
            got = me.get(key)
            assert type(got) is bytes and got == value
            dst = bytearray(n + 5)
            assert me.get_into(key, dst) == n and bytes(dst[:n]) == value
            assert not any(dst[n:]), "bytes past the object stay untouched"
            if n > 1:  # two destination parts, filled in order
                half = n // 2
                a, b = bytearray(half), bytearray(n - half)
                assert me.get_many_into([key], [[a, b]]) == [n]
                assert bytes(a) + bytes(b) == value
            (arr,) = me.get_many_alloc([key], lambda i, size: np.empty(size, np.uint8))
            assert arr.tobytes() == value
        assert calls == [], "our own segment is read by a copy, never a transfer"
        if before is not None:
            assert me.metrics is not None
            reads = sum((4 if n > 1 else 3) * n for n in values)  # the calls above
            assert me.metrics.read_bytes.value - before == reads
        # a destination one byte short is refused and left untouched
        short = bytearray(MiB - 1)
        with pytest.raises(StoreError) as info:
            me.get_into(f"own-{MiB}", short)
        assert info.value.code == ErrorCode.INVALID_PARAMS and not any(short)
        # the bytes API stays bounded by the local buffer (1 MiB here)
        big = payload(MiB + 1, 9)
        assert other.put("own-big", big, mine) is True
        with pytest.raises(InvalidParams, match="local_buffer_size"):
            me.get("own-big")
        assert me.get_into("own-big", bytearray(len(big))) == len(big)
        assert other.get("own-big") == big  # the general path reads the same bytes
        # a read that outlives its lease is refused, as on the general path
        (late,) = me.get_many_alloc(
            ["own-4096"], lambda i, size: time.sleep(LEASE_S * 1.5) or bytearray(size)
        )
        assert isinstance(late, LeaseExpired) and "own-4096" in str(late)
        # batches copy their own-segment keys at once and transfer the others
        theirs = payload(5000, 10)
        assert other.put("theirs", theirs, ReplicateConfig(preferred_segments=(other.hostname,)))
        keys = [*(f"own-{n}" for n in values), "theirs", "missing"]
        sizes = [*values, len(theirs), 1]
        dsts = [bytearray(n) for n in sizes]
        calls.clear()
        res = me.get_many_into(keys, [[d] for d in dsts])
        assert res[:-1] == sizes[:-1] and isinstance(res[-1], ObjectNotFound)
        assert [bytes(d) for d in dsts[:-1]] == [*values.values(), theirs]
        assert calls == [other.hostname]
        assert me.get_many(keys[:-1]) == [*values.values(), theirs]
        late_many = me.get_many_alloc(
            keys[:2], lambda i, size: time.sleep(LEASE_S * 0.8) or bytearray(size)
        )
        assert all(isinstance(r, LeaseExpired) for r in late_many)
        # a batch whose every key is ours is copied at once, whatever the value's
        # size; the keys that cannot be (two destination parts, a short
        # destination) still read as on the general path
        own_keys = [f"own-{n}" for n in values]
        calls.clear()
        before = me.metrics.read_bytes.value if me.metrics is not None else None
        dsts = [bytearray(n) for n in values]
        split = (bytearray(2 * KiB), bytearray(2 * KiB))
        shorter = bytearray(10)
        parts: list[list[Any]] = [[d] for d in dsts] + [list(split), [shorter]]
        res = me.get_many_into([*own_keys, "own-4096", "own-65537"], parts)
        assert res[:-1] == [*values, 4 * KiB]
        assert isinstance(res[-1], StoreError) and res[-1].code == ErrorCode.INVALID_PARAMS
        assert [bytes(d) for d in dsts] == list(values.values())
        assert bytes(split[0]) + bytes(split[1]) == values[4 * KiB]
        assert not any(shorter)
        assert calls == [], "our own segment is read by a copy, never a transfer"
        if before is not None:
            assert me.metrics is not None
            assert me.metrics.read_bytes.value - before == sum(values) + 4 * KiB
        assert me.get_many(own_keys) == list(values.values())


# ----------------------------------------------------------------------------------
# eviction and pins
# ----------------------------------------------------------------------------------

SEG = 4 * MiB
OBJ = 256 * KiB


def _eviction_cluster(**kw: Any) -> LocalCluster:
    return LocalCluster(_config(**kw))


def test_eviction_keeps_puts_succeeding() -> None:
    with _eviction_cluster() as cluster:
        owner = cluster.client(SEG)
        writer = cluster.client(0)
        keys = [f"ev-{i:03d}" for i in range(48)]  # 12 MiB into a 4 MiB segment
        for i, k in enumerate(keys):
            assert writer.put(k, payload(OBJ, i)) is True
        time.sleep(0.3)  # let background eviction (above the 90 % watermark) settle
        present = master_keys(cluster)
        assert 0 < len(present) <= SEG // OBJ
        assert keys[-1] in present
        assert keys[0] not in present, "the oldest objects go first"
        for k in present:
            assert writer.get(k) == payload(OBJ, keys.index(k))
        assert metric(cluster.metrics_url, "master_evicted_key_count") >= len(keys) - len(present)
        assert metric(cluster.metrics_url, "master_allocated_bytes") <= SEG
        assert owner.segments[0].size == SEG
        validate_master(cluster)


def test_eviction_is_lru_by_last_read() -> None:
    # no background eviction: only the synchronous one on allocation failure
    with _eviction_cluster(eviction_high_watermark_ratio=1.0) as cluster:
        cluster.client(SEG)
        w = cluster.client(0)
        keys = [f"lru-{i:02d}" for i in range(SEG // OBJ)]
        stored = []
        for i, k in enumerate(keys):
            try:
                w.put(k, payload(OBJ, i))
            except NoAvailableHandle:
                break  # allocator rounding: the segment may hold one object less
            stored.append(k)
        assert len(stored) >= len(keys) - 1
        w.get(stored[0])  # the oldest write is now the most recent read
        time.sleep(LEASE_S + 0.1)  # ... and its lease has expired
        for i in range(3):
            assert w.put(f"lru-new-{i}", payload(OBJ, 100 + i)) is True
        present = master_keys(cluster)
        assert stored[0] in present
        assert stored[1] not in present and stored[2] not in present


def test_no_available_handle_only_when_nothing_is_evictable() -> None:
    with _eviction_cluster(eviction_high_watermark_ratio=1.0) as cluster:
        cluster.client(SEG)
        w = cluster.client(0)
        stored = []
        for i in range(SEG // OBJ + 4):  # bounded: a few more than fit
            try:
                assert w.put(f"hp-{i}", payload(OBJ, i), ReplicateConfig(with_hard_pin=True))
            except NoAvailableHandle as exc:
                assert exc.code == ErrorCode.NO_AVAILABLE_HANDLE
                break
            stored.append(f"hp-{i}")
        else:
            pytest.fail("hard-pinned objects were evicted to make room")
        assert len(stored) >= SEG // OBJ - 1
        assert master_keys(cluster) == set(stored)
        with pytest.raises(NoAvailableHandle):  # nothing to evict: hard pins stay
            w.put("plain", payload(OBJ, 999))
        # unpinned but leased objects cannot be evicted either
        for k in stored[:4]:
            w.remove(k)
        plain = [f"pl-{i}" for i in range(4)]
        for i, k in enumerate(plain):
            assert w.put(k, payload(OBJ, 200 + i)) is True
        assert w.exists_many(plain) == [True] * 4  # leased from now on
        with pytest.raises(NoAvailableHandle):
            w.put("plain", payload(OBJ, 999))
        time.sleep(LEASE_S + 0.1)  # leases expired: the plain objects are evictable again
        assert w.put("plain", payload(OBJ, 999)) is True
        present = master_keys(cluster)
        assert set(stored[4:]) <= present, "a hard-pinned object was evicted"
        assert len(set(plain) & present) == 3
        validate_master(cluster)


def test_soft_pinned_objects_outlive_plain_ones() -> None:
    with _eviction_cluster() as cluster:
        cluster.client(SEG)
        w = cluster.client(0)
        pin = ReplicateConfig(soft_pin_action=SoftPinAction.ENABLE, soft_pin_ttl_ms=60_000)
        pinned = [f"soft-{i}" for i in range(4)]
        for i, k in enumerate(pinned):  # the oldest objects, but pinned
            assert w.put(k, payload(OBJ, i), pin) is True
        assert w.put("soft-shorthand", payload(OBJ, 50), ReplicateConfig(with_soft_pin=True))
        pinned.append("soft-shorthand")
        for i in range(40):  # 10 MiB of plain objects through the rest of the segment
            assert w.put(f"plain-{i}", payload(OBJ, 100 + i)) is True
        present = master_keys(cluster)
        assert set(pinned) <= present, "a soft-pinned object was evicted before plain ones"
        assert metric(cluster.metrics_url, "master_soft_pin_key_count") == len(pinned)
        for k in pinned:
            assert w.get(k) == payload(OBJ, 50 if k == "soft-shorthand" else pinned.index(k))
        # when only soft-pinned objects are left they are evicted too (allowed by default)
        w.remove_by_regex("^plain-", force=True)
        time.sleep(LEASE_S + 0.1)  # the reads above leased the pinned objects
        for i in range(SEG // OBJ + 2):
            assert w.put(f"pinned-too-{i}", payload(OBJ, i), pin) is True
        assert not set(pinned) <= master_keys(cluster)


def test_soft_pinned_objects_are_never_evicted_when_disallowed() -> None:
    with _eviction_cluster(allow_evict_soft_pinned_objects=False) as cluster:
        cluster.client(SEG)
        w = cluster.client(0)
        pin = ReplicateConfig(soft_pin_action=SoftPinAction.ENABLE, soft_pin_ttl_ms=60_000)
        stored = []
        with pytest.raises(NoAvailableHandle):
            for i in range(SEG // OBJ + 4):
                w.put(f"sp-{i}", payload(OBJ, i), pin)
                stored.append(f"sp-{i}")
        assert master_keys(cluster) == set(stored)


def test_an_oversized_put_does_not_wipe_the_cache() -> None:
    """An object larger than every segment can never be placed: failing must not
    first evict everything that is evictable (regression)."""
    with _eviction_cluster(eviction_high_watermark_ratio=1.0) as cluster:
        cluster.client(SEG)
        cluster.client(SEG)
        w = cluster.client(0, 16 * MiB)
        for i in range(2 * SEG // OBJ):
            assert w.put(f"cached-{i}", payload(OBJ, i)) is True
        before = master_keys(cluster)
        with pytest.raises(NoAvailableHandle):
            w.put("huge", payload(SEG + OBJ, 0))  # larger than any segment: can never fit
        assert len(master_keys(cluster)) >= len(before) // 2, "the cache was wiped"


# ----------------------------------------------------------------------------------
# concurrency
# ----------------------------------------------------------------------------------


def test_concurrent_writers_and_readers_only_see_whole_values(cluster: LocalCluster) -> None:
    clients = [cluster.client(16 * MiB) for _ in range(3)]
    keys = [f"cc-{i}" for i in range(6)]
    sizes = (1, 4 * KiB, 64 * KiB + 3, 300 * KiB)
    verified = [0]
    tolerated = [0]
    lock = threading.Lock()
    # transient outcomes of racing with other threads; anything else is a failure
    benign = (ObjectNotFound, ReplicaNotReady, ObjectHasLease, LeaseExpired)

    def value_for(key: str, rng: random.Random) -> bytes:
        return checked(key.encode() + b"|" + rng.randbytes(rng.choice(sizes)))

    def check(key: str, value: bytes) -> None:
        assert verify(value).startswith(key.encode() + b"|"), (
            f"{key!r} returned another key's value"
        )

    def worker(n: int) -> None:
        rng = random.Random(n)
        client = clients[n % len(clients)]
        deadline = time.monotonic() + 2.5
        for _ in range(400):
            if time.monotonic() > deadline:
                break
            key = rng.choice(keys)
            op = rng.random()
            try:
                if op < 0.25:
                    cfg = ReplicateConfig(replica_num=rng.choice((1, 2)))
                    client.put(key, value_for(key, rng), cfg)
                elif op < 0.40:
                    client.upsert(key, value_for(key, rng))
                elif op < 0.50:
                    client.remove(key)
                elif op < 0.60:
                    for k, got in zip(keys[:3], client.get_many(keys[:3]), strict=True):
                        if isinstance(got, bytes):
                            check(k, got)
                            with lock:
                                verified[0] += 1
                        elif not isinstance(got, benign):
                            raise got
                else:
                    check(key, client.get(key))
                    with lock:
                        verified[0] += 1
            except benign:
                with lock:
                    tolerated[0] += 1
            except StoreError as exc:
                if exc.code != ErrorCode.OBJECT_REPLICA_BUSY:  # racing upserts
                    raise

    run_threads([functools.partial(worker, n) for n in range(6)], 30)
    assert verified[0] >= 20
    # the master's bookkeeping is consistent afterwards and every survivor verifies
    validate_master(cluster)
    for key, got in zip(keys, clients[0].get_many(keys), strict=True):
        if isinstance(got, bytes):
            check(key, got)
        else:
            assert isinstance(got, ObjectNotFound), (key, got)


# ----------------------------------------------------------------------------------
# master admin HTTP
# ----------------------------------------------------------------------------------


def test_master_metrics_and_admin_endpoints(cluster: LocalCluster) -> None:
    a = cluster.client(32 * MiB)
    b = cluster.client(16 * MiB)
    keys = [f"m-{i}" for i in range(5)]
    for i, k in enumerate(keys):
        assert a.put(k, payload(4 * KiB, i), ReplicateConfig(preferred_segments=(b.hostname,)))
    url = cluster.metrics_url
    status, body = http_get(url + "/metrics")
    assert status == 200
    text = body.decode()
    assert "master_key_count" in text
    assert metric(url, "master_key_count") == 5
    assert metric(url, "master_total_capacity_bytes") == 48 * MiB
    assert metric(url, "master_allocated_bytes") >= 5 * 4 * KiB
    assert metric(url, "master_segment_count") == 2
    status, body = http_get(url + "/get_all_keys")
    assert status == 200 and set(body.decode().split()) == set(keys)
    status, body = http_get(url + "/get_all_segments")
    assert status == 200 and set(body.decode().split()) == {a.hostname, b.hostname}
    status, body = http_get(url + "/query_key?key=m-3")
    assert status == 200
    doc = json.loads(body)
    assert doc["success"] is True
    (desc,) = doc["data"]
    assert desc["size_"] == 4 * KiB and desc["transport_endpoint_"] == b.hostname
    assert desc["buffer_address_"] == a.replicas("m-3")[0].address
    status, body = http_get(url + "/query_key?key=absent")
    assert status == 404 and json.loads(body)["error_code"] == ErrorCode.OBJECT_NOT_FOUND
    status, body = http_get(url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _ = http_get(url + "/no-such-endpoint")
    assert status == 404
    a.remove("m-0")
    assert metric(url, "master_key_count") == 4
    _, body = http_get(url + "/get_all_keys")
    assert "m-0" not in body.decode().split()


# ----------------------------------------------------------------------------------
# client identity, segments and close
# ----------------------------------------------------------------------------------


def test_mount_adds_capacity(cluster: LocalCluster) -> None:
    a = cluster.client(4 * MiB)
    assert len(a.segments) == 1 and a.segments[0].name == a.hostname
    info = a.mount(8 * MiB)
    assert info.name == a.hostname and info.size == 8 * MiB
    assert [s.size for s in a.segments] == [4 * MiB, 8 * MiB]
    assert metric(cluster.metrics_url, "master_total_capacity_bytes") == 12 * MiB
    value = payload(6 * MiB, 1)  # only fits in the second segment
    assert a.put("big", value) is True
    (rep,) = a.replicas("big")
    assert rep.segment_id == info.id
    assert a.get("big") == value


def _resident_kib(addr: int) -> int:
    """Rss of the mapping of this process that starts at ``addr`` (from smaps)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        start = line.split("-", 1)[0]
        if "-" in line.split(" ", 1)[0] and int(start, 16) == addr:
            for follow in lines[i + 1 :]:
                if follow.startswith("Rss:"):
                    return int(follow.split()[1])
    raise AssertionError(f"no mapping starts at {addr:#x}")


@pytest.mark.parametrize("prefault", [True, False])
def test_segments_are_prefaulted(cluster: LocalCluster, prefault: bool) -> None:
    """As the reference (MAP_POPULATE), a segment is backed by memory when it is
    mounted, so the first put into a page does not fault; prefault=False
    (PYMOONCAKE_PREFAULT=0) leaves it lazy.  The local buffer (only get_buffer
    handles use it) stays lazy either way."""
    a = cluster.client(8 * MiB, 4 * MiB, prefault=prefault)
    assert _resident_kib(a.segments[0].base) == (8 * 1024 if prefault else 0)
    assert _resident_kib(a.local.addr) == 0
    assert _resident_kib(a.mount(2 * MiB).base) == (2 * 1024 if prefault else 0)
    assert a.put("k", b"x" * 5000) is True and a.get("k") == b"x" * 5000


def test_prefault_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pymooncake.store import StoreClientConfig

    monkeypatch.setenv("PYMOONCAKE_PREFAULT", "0")
    assert StoreClientConfig("127.0.0.1").prefault is False
    monkeypatch.setenv("PYMOONCAKE_PREFAULT", "1")
    assert StoreClientConfig("127.0.0.1").prefault is True


def test_a_short_client_ttl_shortens_the_heartbeat() -> None:
    # 1 s pings under a 1 s ttl would expire a healthy client whenever one
    # ping came a little late: the master tells its ttl, the client pings at a
    # quarter of it; a period set in the config is kept as it is
    with LocalCluster(_config(client_ttl_s=1.0)) as cluster:
        short = cluster.client(0)
        assert short._ping_every == pytest.approx(0.25)
        fixed = cluster.client(0, ping_interval_s=0.6)
        assert fixed._ping_every == pytest.approx(0.6)
        pings = cluster.master.call(lambda st: st.clients[short.client_id].last_seen)
        # a ping within a period (+ scheduling slack); the client stays through 3 ttls
        assert wait_until(
            lambda: cluster.master.call(lambda st: st.clients[short.client_id].last_seen) > pings,
            2.0,
        )
        time.sleep(3.0)
        assert cluster.master.call(lambda st: st.metrics.expired_clients) == 0
    with LocalCluster(_config(client_ttl_s=30.0)) as cluster:
        assert cluster.client(0)._ping_every == pytest.approx(1.0)  # the reference's period


def test_an_expired_client_remounts_on_its_next_heartbeat() -> None:
    with LocalCluster(_config()) as cluster:
        a = cluster.client(16 * MiB, ping_interval_s=0.1)
        w = cluster.client(0, ping_interval_s=0.1)
        assert w.put("k", payload(MiB, 1), ReplicateConfig(preferred_segments=(a.hostname,)))
        # the master forgets a (as after client_ttl without pings, or a master restart)
        cluster.master.call(lambda st: st.expire_client(a.client_id, time.monotonic()))
        assert not w.exists("k"), "the expired client's objects must disappear"
        assert wait_until(lambda: cluster.master.call(lambda st: len(st.segments)) == 1, 5.0), (
            "the client did not re-mount after NEED_REMOUNT"
        )
        assert cluster.master.call(lambda st: a.client_id in st.clients)
        assert w.put("k", payload(MiB, 2), ReplicateConfig(preferred_segments=(a.hostname,)))
        assert w.replicas("k")[0].endpoint == a.hostname
        assert w.get("k") == payload(MiB, 2)
        validate_master(cluster)


_HANDLE_AFTER_CLOSE = """
from pymooncake.store import MasterConfig
from pymooncake.testing import LocalCluster
with LocalCluster(MasterConfig()) as cluster:
    owner = cluster.client(16 << 20)
    reader = cluster.client(0, 4 << 20)
    owner.put("k", b"v" * 100_000)
    handle = reader.get_buffer("k")
    reader.close()
    print("read", bytes(handle)[:1].decode(), flush=True)
    handle.release()
"""


def test_a_buffer_handle_stays_readable_after_its_client_closes() -> None:
    """A handle keeps the local buffer mapped after close() (regression: it used
    to point at unmapped memory).  In a child process: the failure mode is SIGSEGV."""
    proc = subprocess.run(
        [sys.executable, "-c", _HANDLE_AFTER_CLOSE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    assert "read v" in proc.stdout


def test_close_unmounts_its_segments_only(cluster: LocalCluster) -> None:
    a = cluster.client(32 * MiB)
    b = cluster.client(32 * MiB)
    for c, name in ((a, "on-a"), (b, "on-b")):
        for i in range(3):
            key = f"{name}-{i}"
            assert b.put(
                key, payload(MiB + 3, i), ReplicateConfig(preferred_segments=(c.hostname,))
            )
    a.close()
    assert a.closed
    a.close()  # idempotent
    for i in range(3):
        assert not b.exists(f"on-a-{i}")
        with pytest.raises(ObjectNotFound):
            b.get(f"on-a-{i}")
        assert b.get(f"on-b-{i}") == payload(MiB + 3, i)
    _, body = http_get(cluster.metrics_url + "/get_all_segments")
    assert body.decode().split() == [b.hostname]
    with pytest.raises(StoreError) as info:
        a.get("on-b-0")
    assert info.value.code == ErrorCode.INVALID_PARAMS
    # the freed space is usable again
    assert b.put("after", payload(MiB, 9)) is True
    validate_master(cluster)


def test_health_reflects_the_master() -> None:
    cluster = LocalCluster(_config())
    master_closed = False
    try:
        a = cluster.client(4 * MiB)
        assert a.health() is True
        a.close()
        b = cluster.client(0)
        cluster.master.close()
        master_closed = True
        assert b.health() is False
        with pytest.raises(StoreError) as info:
            b.get("anything")
        assert info.value.code in (ErrorCode.RPC_FAIL, ErrorCode.RPC_TIMEOUT)
    finally:
        for c in cluster.clients:
            c.close()
        cluster.clients.clear()
        if not master_closed:
            cluster.master.close()
