"""_busypoll: the master's selector polls for a moment after activity, then sleeps."""

from __future__ import annotations

import asyncio
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pymooncake._busypoll import PollingSelector, SpinGuard, poll_window_from_env, run_polling

#: writes one byte after a delay, from another process (no GIL of ours involved)
_LATE = """
import socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
time.sleep(float(sys.argv[2]))
sock.sendall(b"x")
sock.recv(1)
"""


@pytest.fixture
def sel_pair() -> Iterator[tuple[PollingSelector, socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    # a guard that never calls these long polls preempted (see the guard's own test)
    # (and a host that is never crowded: other tests may run beside this one)
    sel = PollingSelector(window_s=0.5, guard=SpinGuard(gap_s=10.0, runnable=lambda: 1))
    sel.register(a, selectors.EVENT_READ)
    yield sel, a, b
    sel.close()
    a.close()
    b.close()


def _late(sock: socket.socket, delay: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _LATE, str(sock.fileno()), str(delay)],
        pass_fds=(sock.fileno(),),
        stdin=subprocess.DEVNULL,
    )


def _timed_select(
    sel: PollingSelector, a: socket.socket, b: socket.socket, delay: float
) -> tuple[list[tuple[selectors.SelectorKey, int]], float]:
    """A blocking ``sel.select`` while a peer process writes to ``b`` after
    ``delay``; returns what it found and the CPU time this thread spent."""
    proc = _late(b, delay)
    try:
        cpu0 = time.thread_time()
        ready = sel.select(5.0)
        return ready, time.thread_time() - cpu0
    finally:
        a.sendall(b"!")
        proc.wait(30)


def test_after_activity_a_blocking_select_polls(
    sel_pair: tuple[PollingSelector, socket.socket, socket.socket],
) -> None:
    sel, a, b = sel_pair
    b.sendall(b"1")
    assert sel.select(1.0)  # activity: the window opens
    a.recv(1)
    ready, spent = _timed_select(sel, a, b, 0.15)
    assert ready and ready[0][0].fileobj is a
    assert sel.polled_hits == 1  # found while polling, not by sleeping
    assert spent > 0.05


def test_the_window_starts_when_the_work_ends(
    sel_pair: tuple[PollingSelector, socket.socket, socket.socket],
) -> None:
    """A request the loop took longer than the window to handle (a big batch) still
    leaves the whole window for the client's next one."""
    sel, a, b = sel_pair
    b.sendall(b"1")
    assert sel.select(1.0)
    a.recv(1)
    assert sel.select(0) == []  # the loop runs the handler's callbacks ...
    time.sleep(0.6)  # ... which take longer than the 0.5 s window
    ready, spent = _timed_select(sel, a, b, 0.1)
    assert ready and ready[0][0].fileobj is a
    assert sel.polled_hits == 1  # the window opened after the work, not at the arrival
    assert spent > 0.03


def test_timers_alone_open_no_window(
    sel_pair: tuple[PollingSelector, socket.socket, socket.socket],
) -> None:
    sel, a, b = sel_pair
    assert sel.select(0.02) == []  # a timer came due
    assert sel.select(0) == []  # its callbacks ran
    ready, spent = _timed_select(sel, a, b, 0.3)
    assert ready
    assert spent < 0.15  # asleep until the byte came
    assert sel.polled_hits == 0


def test_an_idle_selector_sleeps_and_keeps_timeouts(
    sel_pair: tuple[PollingSelector, socket.socket, socket.socket],
) -> None:
    sel, a, b = sel_pair
    # never active: no polling at all
    cpu0, t0 = time.thread_time(), time.monotonic()
    assert sel.select(0.2) == []
    assert time.monotonic() - t0 >= 0.19
    assert time.thread_time() - cpu0 < 0.1
    # active (the 0.5 s window opens), then nothing: it polls, but never past the
    # timeout the loop asked for (a timer due in 50 ms runs on time)
    b.sendall(b"1")
    assert sel.select(0)
    a.recv(1)
    t0 = time.monotonic()
    assert sel.select(0.05) == []
    assert 0.045 <= time.monotonic() - t0 < 0.4
    assert sel.polled_hits == 0


def test_a_poll_window_past_its_end_sleeps(
    sel_pair: tuple[PollingSelector, socket.socket, socket.socket],
) -> None:
    sel, a, b = sel_pair
    sel.window_s = 0.02
    b.sendall(b"1")
    assert sel.select(1.0)
    a.recv(1)
    ready, spent = _timed_select(sel, a, b, 0.3)
    assert ready
    assert spent < 0.15  # 20 ms of polling, then asleep until the byte came
    assert sel.polled_hits == 0


def test_a_poller_that_lost_the_cpu_stops_polling() -> None:
    """A gap between two polls (here: any gap) turns polling off for the backoff,
    for every poller sharing the guard."""
    a, b = socket.socketpair()
    guard = SpinGuard(gap_s=0.0, backoff_s=30.0, first_backoff_s=30.0, runnable=lambda: 1)
    sel = PollingSelector(window_s=0.5, guard=guard)
    sel.register(a, selectors.EVENT_READ)
    try:
        b.sendall(b"1")
        assert sel.select(1.0)
        a.recv(1)
        ready, spent = _timed_select(sel, a, b, 0.3)
        assert ready
        assert guard.backoffs == 1
        assert not guard.allowed(time.monotonic())
        assert spent < 0.15  # slept instead of polling through the 300 ms
        assert sel.polled_hits == 0
    finally:
        sel.close()
        a.close()
        b.close()


def test_run_polling_runs_an_asyncio_server_to_completion() -> None:
    async def echo_once() -> bytes:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = await r.readexactly(5)
            w.write(data.upper())
            await w.drain()
            w.close()
            got.set_result(data)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        reply = await reader.readexactly(5)
        writer.close()
        server.close()
        await server.wait_closed()
        assert await got == b"hello"
        return reply

    assert run_polling(echo_once(), 0.001) == b"HELLO"
    assert run_polling(echo_once(), 0.0) == b"HELLO"  # 0: plain asyncio.run


def test_poll_window_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYMOONCAKE_MASTER_POLL_US", raising=False)
    assert poll_window_from_env(0.123) == 0.123
    monkeypatch.setenv("PYMOONCAKE_MASTER_POLL_US", "0")
    assert poll_window_from_env() == 0.0
    monkeypatch.setenv("PYMOONCAKE_MASTER_POLL_US", "350")
    assert poll_window_from_env() == pytest.approx(350e-6)
    for bad in ("-5", "nan", "soon", "5000000"):
        monkeypatch.setenv("PYMOONCAKE_MASTER_POLL_US", bad)
        with pytest.raises(ValueError, match="PYMOONCAKE_MASTER_POLL_US"):
            poll_window_from_env()


def test_backoffs_double_while_gaps_recur_and_start_short_again() -> None:
    """A gap turns polling off for first_backoff_s; a gap within as long after
    polling resumed (a host that stays busy) for twice the last backoff, up to
    backoff_s; a gap after a calm stretch for first_backoff_s again."""
    guard = SpinGuard(backoff_s=1.0, first_backoff_s=0.02, runnable=lambda: 1)
    now = 100.0
    offs = []
    for _ in range(8):  # each gap right after polling resumed
        guard.preempted(now)
        offs.append(round(guard.off_until - now, 6))
        assert not guard.allowed(now + offs[-1] / 2)
        now = guard.off_until + 0.001
        assert guard.allowed(now)
    assert offs == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0]
    now += 5.0  # calm: polling worked for seconds
    guard.preempted(now)
    assert guard.off_until - now == pytest.approx(0.02)
    assert guard.backoffs == 9


def test_a_crowded_host_is_not_polled_on() -> None:
    """More runnable tasks than CPUs at two counts in a row (at most one every
    check_s): nobody polls.  One crowded count is a moment's burst of another
    process (an HA standby applying its stream), which polling outlasts."""
    count = [1]
    calls: list[int] = []

    def runnable() -> int:
        calls.append(count[0])
        return count[0]

    guard = SpinGuard(check_s=0.5, runnable=runnable)
    assert guard.allowed(100.0)
    count[0] = 10_000  # more than any machine's CPUs
    assert guard.allowed(100.1)  # not counted again yet
    assert guard.allowed(100.6)  # crowded once
    assert guard.allowed(100.7)  # not counted again yet
    assert not guard.allowed(101.2)  # crowded twice in a row
    assert not guard.allowed(101.8)
    assert len(calls) == 4
    count[0] = 1
    assert guard.allowed(102.4)
    count[0] = 10_000
    assert guard.allowed(103.0)  # the run starts again
    # the real count: the reader itself is runnable
    real = SpinGuard()
    assert real.runnable() >= 1
