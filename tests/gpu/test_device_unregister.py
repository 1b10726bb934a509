"""Device regions under the engine's limits: unregister waits for staged TCP requests
and for same-host copies in flight, metrics count device requests, and device
memory moves over authenticated ports."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from pymooncake import EngineConfig, TransferEngine
from pymooncake.errors import TransferFailed
from pymooncake.testing import wait_until
from pymooncake.transfer.device import DeviceBackend
from pymooncake.transfer.transports.shm import ShmTransport
from pymooncake.wire import STATUS, STATUS_OK, encode_header

from .conftest import LOCAL, DeviceMem, DevicePeer, pattern, sha

Pair = tuple[TransferEngine, TransferEngine]
SIZE = 1 << 20  # four staging chunks of gpu_config


def test_unregister_waits_for_a_staged_device_write(engines: Pair, mem: DeviceMem) -> None:
    """The data port pins the device region while it stages a peer's WRITE into it."""
    _, b = engines
    dev = mem.alloc(SIZE, 0)
    b.register(dev, SIZE)
    port = b.transport("tcp").data_port  # type: ignore[attr-defined]
    head = pattern(31, SIZE // 2)
    tail = pattern(32, SIZE - len(head))
    with socket.create_connection((LOCAL, port), timeout=10) as s:
        s.sendall(encode_header(SIZE, dev, is_write=True, v2=True) + head)
        # the first chunks reach device memory while the rest of the payload is pending
        assert wait_until(lambda: mem.get(dev, 4096) == head[:4096])
        done = threading.Event()
        t = threading.Thread(target=lambda: (b.unregister(dev), done.set()))
        t.start()
        try:
            assert not done.wait(0.2)  # blocked on the request in flight
            s.sendall(tail)
            assert s.recv(8) == STATUS.pack(STATUS_OK)
        finally:
            t.join(10)
        assert done.is_set()
    assert sha(mem.get(dev, SIZE)) == sha(head + tail)


def test_unregister_cuts_a_stalled_device_write(gpu_config: EngineConfig, mem: DeviceMem) -> None:
    target = TransferEngine(
        LOCAL, "P2PHANDSHAKE", config=gpu_config.replace(unregister_drain_s=0.3)
    )
    try:
        dev = mem.alloc(SIZE, 0, bytes(SIZE))
        target.register(dev, SIZE)
        port = target.transport("tcp").data_port  # type: ignore[attr-defined]
        with socket.create_connection((LOCAL, port), timeout=10) as s:
            first = 2 * 256 * 1024 + 4096  # the first chunk is in device memory (lazy streams)
            s.sendall(encode_header(SIZE, dev, is_write=True, v2=True) + b"A" * first)
            assert wait_until(lambda: mem.get(dev, 16) == b"A" * 16)  # in flight
            start = time.monotonic()
            target.unregister(dev)
            assert time.monotonic() - start >= 0.25  # it waited, then cut the connection
            try:
                s.sendall(b"B" * (SIZE - first))
                s.recv(8)
            except OSError:
                pass
        time.sleep(0.1)
        assert b"B" not in mem.get(dev, SIZE)
        server = target.transport("tcp").server  # type: ignore[attr-defined]
        assert wait_until(lambda: server.connections == 0)
    finally:
        target.close()


def test_metrics_count_device_requests(engines: Pair, mem: DeviceMem) -> None:
    a, b = engines
    metrics = a.enable_metrics()
    n = 3 * 256 * 1024 + 5
    src = mem.alloc(n, 0, pattern(33, n))
    dst = mem.alloc(n, 0)
    host = bytearray(n)
    b.register(dst, n)
    a.write(b.segment_name, src, dst, n)
    a.read(b.segment_name, host, dst, n)
    batch = a.allocate_batch(1)
    from pymooncake.transfer import TransferRequest

    a.submit(batch, [TransferRequest.read(src, dst, n)], segment=b.segment_name)
    assert a.wait_batch(batch, 20)
    a.free_batch(batch)
    assert metrics.value("write_bytes", "tcp") == n
    assert metrics.value("read_bytes", "tcp") == 2 * n
    assert metrics.value("read_requests", "tcp") == 2
    assert metrics.value("write_failures", "tcp") == 0


def test_device_memory_over_authenticated_ports(
    gpu_config: EngineConfig, backend: DeviceBackend, mem: DeviceMem
) -> None:
    cfg = gpu_config.replace(cluster_token="device-test-token-0123456789abcdef")
    a = TransferEngine(LOCAL, "P2PHANDSHAKE", config=cfg)
    b = TransferEngine(LOCAL, "P2PHANDSHAKE", config=cfg)
    try:
        n = 2 * 256 * 1024 + 1
        data = pattern(34, n)
        src = mem.alloc(n, 0, data)
        dst = mem.alloc(n, backend.device_count() - 1)
        b.register(dst, n)
        a.write(b.segment_name, src, dst, n)
        back = mem.alloc(n, 0)
        a.read(b.segment_name, back, dst, n)
        assert mem.get(back, n) == data
    finally:
        a.close()
        b.close()


def test_same_host_device_copy_in_flight_holds_unregister(
    peer_factory: Callable[[bool], DevicePeer], gpu_config: EngineConfig, mem: DeviceMem
) -> None:
    """The copy lock of a peer's device buffer (at its device address) keeps the
    owner's unregister waiting, as for host buffers."""
    peer = peer_factory(True)
    eng = TransferEngine(LOCAL, "P2PHANDSHAKE", config=gpu_config)
    try:
        shm = eng.transport("shm")
        assert isinstance(shm, ShmTransport)
        local = mem.alloc(4096, 0, pattern(35, 4096))
        eng.write(peer.segment, local, peer.addr("dev0"), 4096)
        assert shm.stats["slices_device"] == 1  # it went through the same-host path
        state = shm._peer(eng.segment(peer.segment))
        assert state is not None
        shm._share(state, peer.addr("dev0"))  # as a copy in progress would
        done = threading.Event()
        t = threading.Thread(target=lambda: (peer.call(cmd="unregister", which="dev0"), done.set()))
        t.start()
        try:
            assert not done.wait(0.5)  # the owner waits for our copy
        finally:
            shm._unshare(state, peer.addr("dev0"))
        t.join(10)
        assert done.is_set()
        with pytest.raises(TransferFailed, match="not within any buffer"):
            eng.write(peer.segment, local, peer.addr("dev0"), 4096)
    finally:
        eng.close()
