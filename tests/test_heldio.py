"""_heldio: short waits keep the GIL, long ones fall back to the ordinary calls."""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from pymooncake._busypoll import GUARD, SpinGuard
from pymooncake._heldio import (
    DEFAULT_SPIN_S,
    HeldSocket,
    PollOne,
    held_socket,
    ready_now,
    recv_into_held,
    send_held,
    spin_from_env,
)
from pymooncake.testing import gil_probe

#: a peer in another process (a thread of ours would need the GIL to answer): it
#: wakes our probe thread (pipe), then answers on the socket ``gap`` seconds later
#: with the time (CLOCK_MONOTONIC, shared by every process) at which it answered
_PEER = """
import os, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
probe = int(sys.argv[2])
time.sleep(float(sys.argv[3]))
os.write(probe, b"p")
time.sleep(float(sys.argv[4]))
sock.sendall(repr(time.monotonic()).encode())
sock.recv(1)
"""

#: a peer that sends ``n`` bytes after a delay
_SENDER = """
import socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
time.sleep(float(sys.argv[2]))
sock.sendall(b"x" * int(sys.argv[3]))
sock.recv(1)
"""


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _spawn(code: str, *args: object, fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], pass_fds=fds, stdin=subprocess.DEVNULL
    )


def test_a_short_wait_keeps_the_gil(pair: tuple[socket.socket, socket.socket]) -> None:
    """A thread woken while the caller waits in ``recv`` runs Python code only after
    the reply arrived: the wait never gave up the GIL."""
    a, b = pair
    held = held_socket(a, hold_s=20.0)
    assert held is not None
    rfd, wfd = os.pipe()
    ran_at: list[float] = []

    def probe() -> None:
        os.read(rfd, 1)  # GIL released while blocked; needs it back to go on
        ran_at.append(time.monotonic())

    thread = threading.Thread(target=probe)
    thread.start()
    proc = _spawn(_PEER, b.fileno(), wfd, 0.2, 0.1, fds=(b.fileno(), wfd))
    try:
        data = held.recv()  # holds the GIL from here until the reply
    finally:
        a.sendall(b"!")
        proc.wait(30)
        thread.join(30)
        os.close(rfd)
        os.close(wfd)
    answered_at = float(data)
    assert ran_at and ran_at[0] > answered_at  # the probe woke 100 ms earlier, ran after


def test_a_long_wait_falls_back_and_large_sends_complete(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    held = held_socket(a, hold_s=0.005)
    assert held is not None
    proc = _spawn(_SENDER, b.fileno(), 0.2, 1 << 20, fds=(b.fileno(),))
    try:
        got = bytearray()
        while len(got) < 1 << 20:  # the first byte comes after the hold: ordinary recv
            chunk = held.recv()
            assert chunk
            got += chunk
    finally:
        a.sendall(b"!")
        proc.wait(30)
    assert bytes(got) == b"x" * (1 << 20)
    # a send larger than the socket buffer: the rest goes the ordinary way
    received = bytearray()

    def reader() -> None:
        while chunk := b.recv(1 << 20):
            received.extend(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    held.sendall(b"y" * (4 << 20))
    a.shutdown(socket.SHUT_WR)
    thread.join(30)
    assert not thread.is_alive()
    assert received == b"y" * (4 << 20)


def test_ready_now_names_the_closed_connections_and_keeps_the_gil() -> None:
    """``ready_now`` reports the sockets whose peer closed, and never gives up the GIL:
    a thread that became runnable before the calls runs only after them (a
    ``select.poll`` would hand it the GIL at the first call; beside a busy thread
    taking it back costs a switch interval, which made every put wait for one)."""
    events = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    (a, b), (c, d) = socket.socketpair(), socket.socketpair()
    try:
        d.close()
        assert ready_now([a.fileno(), c.fileno()], events) == {c.fileno()}
        assert ready_now([a.fileno()], events) == set()
        with gil_probe() as probe:
            for _ in range(100):
                ready_now([a.fileno(), c.fileno()], events)
        assert not probe.released
    finally:
        for s in (a, b, c):
            s.close()


def test_poll_one_sees_data_and_hang_ups_and_keeps_the_gil() -> None:
    """``PollOne`` (a peer's pidfd in the same-host transport): ready once the
    descriptor is readable or its peer hung up, not before, and asked without
    giving up the GIL (the probe's thread runs only after the calls)."""
    a, b = socket.socketpair()
    try:
        one = PollOne(a.fileno(), select.POLLIN)
        assert not one.ready()
        b.send(b"x")
        assert one.ready()
        a.recv(1)
        assert not one.ready()
        with gil_probe() as probe:
            for _ in range(100):
                one.ready()
        assert not probe.released
        b.close()
        assert one.ready()  # POLLHUP counts whatever was asked
    finally:
        a.close()
        if b.fileno() >= 0:
            b.close()


def test_recv_into_held_and_send_held(pair: tuple[socket.socket, socket.socket]) -> None:
    """The TCP transport's small waits: data within the hold is received into the
    view; nothing within it is None (the caller waits the ordinary way); EOF is 0."""
    a, b = pair
    view = memoryview(bytearray(16))
    started = time.monotonic()
    assert recv_into_held(a, view, 20) is None
    assert time.monotonic() - started >= 0.015
    send_held(b, b"hello")
    assert recv_into_held(a, view, 20) == 5
    assert bytes(view[:5]) == b"hello"
    big = os.urandom(4 << 20)  # more than the socket buffer: the rest the ordinary way
    got = bytearray()

    def reader() -> None:
        while len(got) < len(big):
            got.extend(a.recv(1 << 20))

    thread = threading.Thread(target=reader)
    thread.start()
    send_held(b, big)
    thread.join(30)
    assert bytes(got) == big
    b.close()
    assert recv_into_held(a, view, 20) == 0


def test_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    held = held_socket(a)
    assert held is not None
    b.close()
    assert held.recv() == b""


def test_no_held_socket_for_tls_or_zero_hold(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    assert held_socket(a, hold_s=0) is None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    tls = ctx.wrap_socket(socket.socket(fileno=os.dup(b.fileno())), do_handshake_on_connect=False)
    try:
        assert held_socket(tls) is None
    finally:
        tls.close()


def _timed_recv(
    held: HeldSocket, a: socket.socket, b: socket.socket, delay: float
) -> tuple[bytes, float]:
    """``held.recv()`` of 3 bytes a peer process sends ``delay`` seconds from now;
    returns them and the CPU time this thread spent waiting."""
    proc = _spawn(_SENDER, b.fileno(), delay, 3, fds=(b.fileno(),))
    try:
        cpu0 = time.thread_time()
        data = held.recv()
        return data, time.thread_time() - cpu0
    finally:
        a.sendall(b"!")
        proc.wait(30)


@pytest.fixture
def steady_guard(monkeypatch: pytest.MonkeyPatch) -> SpinGuard:
    """The process's spin guard, made to tolerate the long polls of these tests (and
    to see a host that is never crowded: other tests may run beside this one)."""
    monkeypatch.setattr(GUARD, "gap_s", 10.0)
    monkeypatch.setattr(GUARD, "off_until", 0.0)
    monkeypatch.setattr(GUARD, "runnable", lambda: 1)
    monkeypatch.setattr(GUARD, "_next_check", 0.0)
    return GUARD


def test_a_reply_within_the_spin_is_polled_for_without_sleeping(
    pair: tuple[socket.socket, socket.socket], steady_guard: SpinGuard
) -> None:
    """The first ``spin_s`` of the wait burns CPU (no sleep, no wake-up to pay);
    a reply after it is still received, and the spinning stopped at ``spin_s``."""
    a, b = pair
    fast = held_socket(a, hold_s=2.0, spin_s=0.5)
    assert fast is not None
    data, spun = _timed_recv(fast, a, b, 0.15)
    assert data == b"xxx"
    assert spun > 0.05  # it polled through most of the 150 ms

    c, d = socket.socketpair()
    try:
        short = held_socket(c, hold_s=2.0, spin_s=0.05)
        assert short is not None
        data, spun = _timed_recv(short, c, d, 0.4)
        assert data == b"xxx"
        assert spun < 0.25  # 50 ms of polling, then it slept for the rest of the 400 ms
    finally:
        c.close()
        d.close()


@pytest.mark.parametrize("preempted", [False, True], ids=["no-spin", "preempted"])
def test_a_wait_that_does_not_spin_sleeps(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch, preempted: bool
) -> None:
    """No spin (``spin_s=0``), or a spin that lost the CPU -- a gap between two polls
    (here: any gap) turns spinning off for the backoff: the wait sleeps."""
    if preempted:
        monkeypatch.setattr(GUARD, "gap_s", 0.0)
        monkeypatch.setattr(GUARD, "backoff_s", 30.0)
        monkeypatch.setattr(GUARD, "first_backoff_s", 30.0)
        monkeypatch.setattr(GUARD, "_backoff", 30.0)
        monkeypatch.setattr(GUARD, "off_until", 0.0)
        monkeypatch.setattr(GUARD, "runnable", lambda: 1)
        monkeypatch.setattr(GUARD, "_next_check", 0.0)
    before = GUARD.backoffs
    a, b = pair
    held = held_socket(a, hold_s=2.0, spin_s=1.0 if preempted else 0.0)
    assert held is not None
    data, spent = _timed_recv(held, a, b, 0.3)
    assert data == b"xxx"
    assert spent < 0.15
    assert GUARD.backoffs == before + preempted
    if preempted:
        assert not GUARD.allowed(time.monotonic())


def test_spin_from_env() -> None:
    assert spin_from_env({}) == DEFAULT_SPIN_S
    assert spin_from_env({"PYMOONCAKE_RPC_SPIN_US": " 250 "}) == pytest.approx(250e-6)
    assert spin_from_env({"PYMOONCAKE_RPC_SPIN_US": "0"}) == 0.0
    for bad in ("-1", "abc", "1.5", "2000000"):
        with pytest.raises(ValueError, match="PYMOONCAKE_RPC_SPIN_US"):
            spin_from_env({"PYMOONCAKE_RPC_SPIN_US": bad})
