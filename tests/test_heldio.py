"""_heldio: short waits keep the GIL, long ones fall back to the ordinary calls."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from pymooncake._heldio import held_socket

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
