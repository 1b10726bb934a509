"""unregister_memory() returns only when no transfer can touch the region again."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pymooncake import EngineConfig, TransferEngine
from pymooncake.errors import TransferFailed
from pymooncake.testing import wait_until
from pymooncake.testing._target import spawn_target
from pymooncake.transfer.transports._base import Peer
from pymooncake.transfer.transports.shm import ShmTransport
from pymooncake.wire import STATUS, STATUS_OK, encode_header

LOCAL = "127.0.0.1"
SIZE = 64 << 10


@pytest.fixture
def target(config: EngineConfig) -> Iterator[TransferEngine]:
    e = TransferEngine(LOCAL, config=config.replace(unregister_drain_s=0.3))
    try:
        yield e
    finally:
        e.close()


def test_tcp_write_racing_unregister_lands_nothing_afterwards(target: TransferEngine) -> None:
    buf = bytearray(SIZE)
    region = target.register(buf)
    port = target.transport("tcp").data_port
    with socket.create_connection((LOCAL, port), timeout=5) as s:
        # the header arrived before unregister; the payload is slow
        s.sendall(encode_header(SIZE, region.addr, is_write=True, v2=True) + b"A" * 1000)
        assert wait_until(lambda: buf[999] == ord("A"))
        start = time.monotonic()
        target.unregister(buf)
        waited = time.monotonic() - start
        assert waited >= 0.25  # it waited for the request in flight ...
        try:  # ... then cut it: the rest of the payload goes nowhere
            s.sendall(b"B" * (SIZE - 1000))
            s.recv(8)
        except OSError:
            pass
    time.sleep(0.2)
    assert b"B" not in buf
    assert bytes(buf[:1000]) == b"A" * 1000


def test_unregister_waits_for_a_write_that_finishes_in_time(target: TransferEngine) -> None:
    buf = bytearray(SIZE)
    region = target.register(buf)
    port = target.transport("tcp").data_port
    with socket.create_connection((LOCAL, port), timeout=5) as s:
        s.sendall(encode_header(SIZE, region.addr, is_write=True, v2=True) + b"A" * 1000)
        assert wait_until(lambda: buf[999] == ord("A"))
        done = threading.Event()
        t = threading.Thread(target=lambda: (target.unregister(buf), done.set()))
        t.start()
        time.sleep(0.05)
        assert not done.is_set()  # blocked on the write in flight
        s.sendall(b"C" * (SIZE - 1000))
        assert s.recv(8) == STATUS.pack(STATUS_OK)
        t.join(5)
        assert done.is_set()
    assert bytes(buf[1000:]) == b"C" * (SIZE - 1000)


def test_new_requests_after_unregister_are_rejected(
    config: EngineConfig, target: TransferEngine
) -> None:
    initiator = TransferEngine(LOCAL, config=config.replace(same_host_transport=False))
    try:
        region = target.allocate(SIZE)
        initiator.write(target.segment_name, bytearray(16), region.addr)
        addr = region.addr
        target.unregister(addr)
        with pytest.raises(TransferFailed, match="not within any buffer"):
            initiator.write(target.segment_name, bytearray(16), addr)
    finally:
        initiator.close()


def test_free_with_a_write_in_flight_does_not_crash(target: TransferEngine) -> None:
    region = target.allocate(SIZE)
    port = target.transport("tcp").data_port
    with socket.create_connection((LOCAL, port), timeout=5) as s:
        s.sendall(encode_header(SIZE, region.addr, is_write=True, v2=True) + b"A" * 100)
        assert wait_until(lambda: region.view[99] == ord("A"))
        target.free(region.addr)  # the mapping goes: the write must be cut first
        try:
            s.sendall(b"B" * (SIZE - 100))
        except OSError:
            pass
    # the engine still serves
    other = target.allocate(SIZE)
    with socket.create_connection((LOCAL, port), timeout=5) as s:
        s.sendall(encode_header(4, other.addr, is_write=True, v2=True) + b"okay")
        assert s.recv(8) == STATUS.pack(STATUS_OK)


@contextlib.contextmanager
def _same_host_peer(
    config: EngineConfig,
) -> Iterator[tuple[Any, TransferEngine, ShmTransport, Peer]]:
    """A target process, an initiator engine here, its same-host transport and
    the target's Peer."""
    proc = spawn_target()
    initiator = TransferEngine(LOCAL, config=config)
    try:
        shm = initiator.transport("shm")
        assert isinstance(shm, ShmTransport)
        yield proc, initiator, shm, initiator.segment(proc.segment)
    finally:
        initiator.close()
        proc.close()


def test_same_host_copy_in_flight_holds_unregister(config: EngineConfig) -> None:
    """A peer process copying (shared lock held) keeps the owner's unregister waiting."""
    with _same_host_peer(config) as (proc, initiator, shm, peer):
        initiator.write(proc.segment, bytearray(b"x" * 16), proc.plain)
        assert shm.stats["slices_pvm"] == 1  # it went over the same-host path
        state = shm._peer(peer)
        assert state is not None
        shm._share(state, proc.plain)  # as a copy in progress would
        done = threading.Event()
        t = threading.Thread(
            target=lambda: (proc.call(cmd="unregister", which="plain"), done.set())
        )
        t.start()
        try:
            assert not done.wait(0.5)  # the owner waits for our copy
        finally:
            shm._unshare(state, proc.plain)
        t.join(10)
        assert done.is_set()
        with pytest.raises(TransferFailed, match="not within any buffer"):
            initiator.write(proc.segment, bytearray(16), proc.plain)


def test_the_last_peer_is_remembered_until_it_is_forgotten(config: EngineConfig) -> None:
    """A transfer asks for its peer's same-host state twice and a loop of them for
    the same peer each time: the last answer is kept, and dropped with the peer
    (``forget_peer``) or when that state is closing, so the next lookup attaches
    again instead of falling back to TCP for good."""
    with _same_host_peer(config) as (proc, initiator, shm, peer):
        first = shm._peer(peer)
        assert first is not None and shm._peer(peer) is first
        shm.forget_peer(peer)  # a restarted peer, say: its state is released
        assert first.closing
        second = shm._peer(peer)
        assert second is not None and second is not first and not second.closing
        # a state released behind the cache's back (close of a racing thread) is
        # not handed out either
        with shm._lock:
            shm._peers.clear()
        shm._release(second)
        third = shm._peer(peer)
        assert third is not None and third is not second
        initiator.write(proc.segment, bytearray(b"y" * 16), proc.plain)
        assert shm.stats["slices_pvm"] == 1 and shm.stats["slices_fallback"] == 0
