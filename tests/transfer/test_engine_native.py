"""The native engine end to end over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import time

import numpy as np
import pytest

from pymooncake import (
    AsyncTransferEngine,
    EngineConfig,
    NotifyMessage,
    TaskState,
    TransferEngine,
    TransferRequest,
)
from pymooncake.errors import (
    AddressNotRegistered,
    AddressOverlapped,
    ClosedError,
    InvalidArgument,
    MetadataError,
    MetadataUnreachable,
    NotSupported,
    PeerRejected,
    PeerSocketError,
    SegmentNotFound,
    TooManyRequests,
    TransferFailed,
)
from pymooncake.testing import run_threads
from pymooncake.transfer.metadata import MemoryMetadataStore
from pymooncake.transfer.metadata.server import MetadataServer

LOCAL = "127.0.0.1"
Pair = tuple[TransferEngine, TransferEngine]


def rand(n: int) -> bytes:
    return os.urandom(n)


def test_p2p_segment_name_is_host_and_rpc_port(engine_pair: Pair) -> None:
    a, b = engine_pair
    assert a.segment_name == f"{LOCAL}:{a.rpc_port}"
    assert a.segment_name != b.segment_name
    assert a.open_segment(a.segment_name) == 0
    assert a.open_segment(b.segment_name) >= 1


@pytest.mark.parametrize("size", [1, 4095, 4096, 65536 + 3, 1 << 20, (4 << 20) + 1])
def test_write_then_read_back(engine_pair: Pair, size: int) -> None:
    a, b = engine_pair
    target = b.allocate(8 << 20)
    data = rand(size)
    a.write(b.segment_name, data, target.addr + 123)
    assert bytes(target.view[123 : 123 + size]) == data
    out = bytearray(size)
    a.read(b.segment_name, out, target.addr + 123)
    assert out == data


def test_many_requests_at_offsets_in_one_transfer(engine_pair: Pair) -> None:
    a, b = engine_pair
    target = b.allocate(1 << 20)
    local = a.allocate(1 << 20)
    local.view[:] = rand(1 << 20)
    rng = random.Random(7)
    reqs = []
    spans = []
    for i in range(300):
        n = rng.randint(1, 3000)
        off = i * 3000
        spans.append((off, n))
        reqs.append(TransferRequest.write(local.addr + off, target.addr + off, n))
    a.transfer(b.segment_name, reqs)
    for off, n in spans:
        assert target.view[off : off + n] == local.view[off : off + n]
    local.view[:] = b"\0" * (1 << 20)
    a.transfer(
        b.segment_name, [TransferRequest.read(local.addr + o, target.addr + o, n) for o, n in spans]
    )
    for off, n in spans:
        assert target.view[off : off + n] == local.view[off : off + n]


def test_mixed_reads_and_writes_in_one_batch(engine_pair: Pair) -> None:
    a, b = engine_pair
    target = b.allocate(1 << 16)
    target.view[:4096] = b"r" * 4096
    out = bytearray(4096)
    a.transfer(
        b.segment_name,
        [
            TransferRequest.write(b"w" * 100, target.addr + 8192),
            TransferRequest.read(out, target.addr),
        ],
    )
    assert out == b"r" * 4096
    assert bytes(target.view[8192:8292]) == b"w" * 100


def test_zero_length_requests_complete_locally(engine_pair: Pair) -> None:
    a, b = engine_pair
    served = b.transport("tcp").stats["requests_served"]  # type: ignore[attr-defined]
    a.transfer(b.segment_name, [TransferRequest.write(bytearray(0), 0xDEAD0000, 0)])
    assert b.transport("tcp").stats["requests_served"] == served  # type: ignore[attr-defined]


def test_out_of_bounds_is_rejected_and_target_keeps_serving(engine_pair: Pair) -> None:
    a, b = engine_pair
    target = b.allocate(4096)
    for addr, n in [
        (target.addr + 4000, 200),
        (target.addr - 1, 1),
        (target.addr + 4096, 1),
        (12345, 8),
    ]:
        with pytest.raises(TransferFailed) as info:
            a.write(b.segment_name, b"x" * n, addr)
        assert isinstance(info.value.errors[0], PeerRejected)
        assert "not within any buffer" in str(info.value)
        with pytest.raises(TransferFailed):
            a.read(b.segment_name, bytearray(n), addr)
    assert bytes(target.view) == b"\0" * 4096
    a.write(b.segment_name, b"ok", target.addr)
    assert bytes(target.view[:2]) == b"ok"


def test_one_bad_request_fails_alone(engine_pair: Pair) -> None:
    a, b = engine_pair
    target = b.allocate(4096)
    reqs = [
        TransferRequest.write(b"a" * 10, target.addr),
        TransferRequest.write(b"b" * 10, target.addr + 5000),  # outside
        TransferRequest.write(b"c" * 10, target.addr + 100),
    ]
    with pytest.raises(TransferFailed) as info:
        a.transfer(b.segment_name, reqs)
    errors = info.value.errors
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], PeerRejected)
    assert bytes(target.view[:10]) == b"a" * 10
    assert bytes(target.view[100:110]) == b"c" * 10


def test_unregistered_target_memory_is_refused(engine_pair: Pair) -> None:
    a, b = engine_pair
    arr = np.zeros(4096, dtype=np.uint8)
    region = b.register(arr)
    a.write(b.segment_name, b"hi", region.addr)
    assert bytes(arr[:2]) == b"hi"
    b.unregister(arr)
    with pytest.raises(TransferFailed):
        a.write(b.segment_name, b"no", region.addr)
    assert bytes(arr[:2]) == b"hi"


def test_not_remote_accessible_is_neither_published_nor_served(engine_pair: Pair) -> None:
    a, b = engine_pair
    arr = bytearray(64)
    region = b.register(arr, remote_accessible=False)
    assert b.first_buffer_address(b.segment_name) == 0
    with pytest.raises(TransferFailed):
        a.write(b.segment_name, b"x", region.addr)


def test_registration_rules(engine_pair: Pair) -> None:
    _, b = engine_pair
    arr = np.zeros(1024, dtype=np.uint8)
    b.register(arr)
    with pytest.raises(AddressOverlapped):
        b.register(arr)
    with pytest.raises(AddressOverlapped):
        b.register(arr.ctypes.data + 512, 1024)
    with pytest.raises(InvalidArgument):
        b.register(arr.ctypes.data, 0)
    with pytest.raises(InvalidArgument):
        b.register(bytearray(0))
    with pytest.raises(NotSupported, match="GPU"):
        b.register(bytearray(8), location="cuda:0")
    with pytest.raises(AddressNotRegistered):
        b.unregister(arr.ctypes.data + 1)
    b.unregister(arr)
    with pytest.raises(AddressNotRegistered):
        b.free(123456)


def test_first_buffer_address_follows_registration(engine_pair: Pair) -> None:
    a, b = engine_pair
    assert a.first_buffer_address(b.segment_name) == 0
    first = b.allocate(4096)
    b.allocate(4096)
    assert a.first_buffer_address(b.segment_name) == first.addr
    assert b.first_buffer_address(b.segment_name) == first.addr


def test_own_segment_is_a_memcpy(engine_pair: Pair) -> None:
    a, _ = engine_pair
    region = a.allocate(4096)
    a.write(a.segment_name, b"self", region.addr)
    assert bytes(region.view[:4]) == b"self"
    out = bytearray(4)
    a.read(0, out, region.addr)
    assert out == b"self"
    with pytest.raises(TransferFailed):
        a.write(a.segment_name, b"x", region.addr + 4096)


def test_many_threads_share_one_engine(engine_pair: Pair) -> None:
    a, b = engine_pair
    target = b.allocate(8 << 20)

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        for i in range(40):
            n = rng.randint(1, 64 << 10)
            off = tid * (1 << 20)
            data = rand(n)
            a.write(b.segment_name, data, target.addr + off)
            out = bytearray(n)
            a.read(b.segment_name, out, target.addr + off)
            assert out == data, (tid, i)

    run_threads([functools.partial(worker, t) for t in range(8)])


def test_async_batches_and_statuses(engine_pair: Pair) -> None:
    a, b = engine_pair
    target = b.allocate(1 << 20)
    batch = a.allocate_batch(4)
    idx = a.submit(
        batch,
        [TransferRequest.write(b"%d" % i * 100, target.addr + i * 1000) for i in range(3)],
        segment=b.segment_name,
    )
    assert list(idx) == [0, 1, 2]
    assert a.wait_batch(batch, 10)
    assert a.batch_status(batch).state is TaskState.COMPLETED
    assert a.task_status(batch, 1).state is TaskState.COMPLETED
    assert a.task_status(batch, 1).transferred_bytes == 100
    with pytest.raises(TooManyRequests):
        a.submit(batch, [TransferRequest.write(b"x", target.addr)] * 2, segment=b.segment_name)
    a.free_batch(batch)


def test_async_batch_failure_is_reported_per_task(engine_pair: Pair) -> None:
    a, b = engine_pair
    target = b.allocate(4096)
    batch = a.allocate_batch(2)
    a.submit(
        batch,
        [TransferRequest.write(b"x", target.addr), TransferRequest.write(b"y", 1)],
        segment=b.segment_name,
    )
    assert a.wait_batch(batch, 10)
    assert a.task_status(batch, 0).state is TaskState.COMPLETED
    assert a.task_status(batch, 1).state is TaskState.FAILED
    assert a.batch_status(batch).state is TaskState.FAILED
    a.free_batch(batch)


def test_notify_after_batch_and_direct(engine_pair: Pair) -> None:
    a, b = engine_pair
    target = b.allocate(4096)
    batch = a.allocate_batch(1)
    a.submit(
        batch,
        [TransferRequest.write(b"x", target.addr)],
        segment=b.segment_name,
        notify=(b.segment_name, NotifyMessage("kv", "done-1")),
    )
    a.wait_batch(batch, 10)
    a.send_notify(b.segment_name, NotifyMessage("kv", "done-2"))
    deadline = time.monotonic() + 5
    got: list[NotifyMessage] = []
    while len(got) < 2 and time.monotonic() < deadline:
        got += b.get_notifies()
        time.sleep(0.01)
    assert sorted(n.notify_msg for n in got) == ["done-1", "done-2"]
    assert b.get_notifies() == []
    a.free_batch(batch)


def test_probe(engine_pair: Pair) -> None:
    a, b = engine_pair
    a.probe(b.segment_name)
    b.close()
    with pytest.raises(PeerSocketError, match="connection refused"):
        a.probe(b.segment_name)


def test_unknown_segment_messages(engine_pair: Pair) -> None:
    a, _ = engine_pair
    with pytest.raises(SegmentNotFound, match="no ':port' part"):
        a.write("127.0.0.1", b"x", 1)
    with pytest.raises(
        PeerSocketError, match=r"Failed to get description of 127\.0\.0\.1:1 .*refused"
    ):
        a.write("127.0.0.1:1", b"x", 1)


def test_peer_death_fails_transfers_fast(engine_pair: Pair) -> None:
    a, b = engine_pair
    target = b.allocate(4096)
    a.write(b.segment_name, b"x", target.addr)  # connection now pooled
    b.close()
    t = time.monotonic()
    with pytest.raises(TransferFailed) as info:
        a.write(b.segment_name, b"x", target.addr)
    assert time.monotonic() - t < 5
    assert isinstance(info.value.errors[0], PeerSocketError)


def test_memory_metadata_backend(config: EngineConfig) -> None:
    store = MemoryMetadataStore("test_memory_metadata_backend")
    with (
        TransferEngine("nodeA", store, config=config) as a,
        TransferEngine("nodeB", store, config=config) as b,
    ):
        assert b.segment_name == "nodeB"
        region = b.allocate(4096)
        a.write("nodeB", b"hello", region.addr)
        assert bytes(region.view[:5]) == b"hello"
        keys = store.keys()
        assert "mooncake/ram/nodeB" in keys
        assert "mooncake/rpc_meta/nodeB" in keys
        a.send_notify("nodeB", NotifyMessage("x", "y"))
        a.probe("nodeB")
        with pytest.raises(SegmentNotFound, match="strictly match the local_hostname"):
            a.write("nodeC", b"x", 1)
    remaining = store.keys()
    assert "mooncake/ram/nodeB" not in remaining


def test_http_metadata_and_cluster_id(config: EngineConfig) -> None:
    server = MetadataServer()
    with server.serve(LOCAL, 0) as http:
        url = f"{http.url}/metadata"
        cfg = config.replace(metadata_cluster_id="c1")
        with (
            TransferEngine("127.0.0.1:1111", url, config=cfg) as a,
            TransferEngine("127.0.0.1:2222", url, config=cfg) as b,
        ):
            region = b.allocate(4096)
            a.write(b.segment_name, b"via http", region.addr)
            assert bytes(region.view[:8]) == b"via http"
            keys = server.keys()
            assert "mooncake/c1/ram/127.0.0.1:2222" in keys
            assert "mooncake/c1/rpc_meta/127.0.0.1:2222" in keys
        assert server.keys() == []


def test_stale_rpc_meta_is_replaced_but_live_one_is_not(config: EngineConfig) -> None:
    store = MemoryMetadataStore("test_stale_rpc_meta")
    store.set("mooncake/rpc_meta/dup", b'{"ip_or_host_name":"127.0.0.1","rpc_port":1}')
    with TransferEngine("dup", store, config=config) as a:
        assert a.segment_name == "dup"
        with pytest.raises(MetadataError, match="already registered by a live engine"):
            TransferEngine("dup", store, config=config)


def test_restarted_peer_is_found_again(config: EngineConfig) -> None:
    store = MemoryMetadataStore("test_restarted_peer")
    with TransferEngine("initiator", store, config=config) as a:
        b = TransferEngine("target", store, config=config)
        region = b.allocate(4096)
        a.write("target", b"one", region.addr)
        b.close()
        b2 = TransferEngine("target", store, config=config)
        try:
            r2 = b2.allocate(4096)
            a.write("target", b"two", r2.addr)  # stale cached port: re-resolved
            assert bytes(r2.view[:3]) == b"two"
        finally:
            b2.close()


def test_metadata_server_unreachable(config: EngineConfig) -> None:
    with pytest.raises(MetadataUnreachable, match=r"127\.0\.0\.1:1/metadata is unreachable"):
        TransferEngine("n", "http://127.0.0.1:1/metadata", config=config)


def test_unreachable_etcd_and_redis_are_explained(config: EngineConfig) -> None:
    import socket

    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind((LOCAL, 0))
        port = closed.getsockname()[1]
        with pytest.raises(MetadataUnreachable, match=f"Error from etcd client.*{port}"):
            TransferEngine("n", f"127.0.0.1:{port}", config=config)
        pytest.importorskip("redis")
        with pytest.raises(MetadataUnreachable, match=f"redis://127.0.0.1:{port}.*unreachable"):
            TransferEngine("n", f"redis://127.0.0.1:{port}", config=config)


def test_loopback_warning(config: EngineConfig, caplog: pytest.LogCaptureFixture) -> None:
    from pymooncake.transfer import _engine

    _engine._warned_loopback.discard("127.0.0.1")
    with caplog.at_level(logging.WARNING, logger="pymooncake.engine"):
        TransferEngine(LOCAL, config=config).close()
    assert "loopback" in caplog.text and "connectable_name" in caplog.text


def test_non_local_address_is_explained(config: EngineConfig) -> None:
    with pytest.raises(PeerSocketError, match="not an address of this machine"):
        TransferEngine("192.0.2.123", config=config)  # TEST-NET-1, never local


def test_port_in_use_with_legacy_binding(config: EngineConfig) -> None:
    import socket

    with socket.socket() as s:
        s.bind((LOCAL, 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = config.replace(legacy_rpc_port_binding=True)
        with pytest.raises(PeerSocketError, match=f"bind address already in use: port {port}"):
            TransferEngine(f"{LOCAL}:{port}", config=cfg)


def test_closed_engine_refuses_work(config: EngineConfig) -> None:
    e = TransferEngine(LOCAL, config=config)
    e.close()
    e.close()
    with pytest.raises(ClosedError):
        e.allocate(10)


def test_asyncio_face(engine_pair: Pair) -> None:
    a, b = engine_pair
    region = b.allocate(1 << 20)

    async def main() -> bytes:
        eng = AsyncTransferEngine(a)
        await asyncio.gather(
            *(
                eng.write(b.segment_name, bytes([i]) * 1000, region.addr + i * 1000)
                for i in range(10)
            )
        )
        out = bytearray(10_000)
        await eng.read(b.segment_name, out, region.addr)
        await eng.probe(b.segment_name)
        return bytes(out)

    out = asyncio.run(main())
    assert out == b"".join(bytes([i]) * 1000 for i in range(10))


def test_numpy_and_torch_like_local_buffers(engine_pair: Pair) -> None:
    a, b = engine_pair
    region = b.allocate(4096)
    src = np.arange(256, dtype=np.uint32)
    a.write(b.segment_name, src, region.addr)
    dst = np.zeros(256, dtype=np.uint32)
    a.read(b.segment_name, dst, region.addr)
    assert (dst == src).all()
    with pytest.raises(InvalidArgument, match="writable"):
        a.read(b.segment_name, b"readonly", region.addr)


def test_bad_pointers_are_errors_not_crashes(engine_pair: Pair) -> None:
    a, b = engine_pair
    bogus = 0x7F0000000000  # not mapped in this process (like a GPU pointer without CUDA)
    with pytest.raises(InvalidArgument, match="not readable host memory"):
        a.register(bogus, 4096)
    with pytest.raises(InvalidArgument, match="GPU"):
        a.register_many([(bogus, 4096)])
    target = b.allocate(4096)
    with pytest.raises(InvalidArgument, match="not readable host memory"):
        a.write(b.segment_name, bogus, target.addr, 16)
    with pytest.raises(InvalidArgument, match="not readable host memory"):
        a.read(b.segment_name, bogus, target.addr, 16)
