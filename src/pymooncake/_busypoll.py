"""Event loops that poll for a moment before they sleep.

Theory of operation
-------------------
A request/reply round trip between two processes pays, on each side that
sleeps while it waits, the cost of being woken up: on an idle CPU the kernel
(and on a virtual machine the hypervisor) has to bring the CPU out of its idle
state first.  Measured on this project's 2-vCPU VMs, a Python echo over a UNIX
socket takes ~56 us when both sides sleep in ``recv``/``epoll_wait``, ~26 us
when one side polls, and ~4.5 us when both do: the wake-ups, not Python, are
most of a master round trip.

:class:`PollingSelector` is the selector of the master's event loop.  For
``window_s`` after the loop finished handling ready descriptors, a blocking
``select`` first asks the kernel without waiting (``epoll_wait`` with a zero
timeout) until something is ready or the window has passed, and only then
sleeps.  The window starts when the work ends, not when the request arrived: a
batch of 32 keys keeps the master busy for 100 us and more, and a window counted
from its arrival was spent before the reply left (measured: 32-key
BatchGetReplicaList round trips with the client working 100 us between them took
245 us, against 150 us back to back).  A master answering a client that sends
its next request within the window (the PutEnd after a PutStart, the next call
of a loop of small calls) never goes to sleep in between; an idle master sleeps
as before, at most ``window_s`` after its last request.  The price is CPU: up to
``window_s`` of one core after each burst of requests.  Timer callbacks alone
start no window.  Timers keep their deadlines: the poll never runs past the
timeout the loop asked for.

**A busy host.**  Polling pays only while the CPU is otherwise idle.  When other
processes want it, a poller uses up its share of the CPU and then waits a whole
scheduler time slice (milliseconds) where a sleeper would have been woken at
once (measured: a 4 KiB put beside one CPU-bound process per core took 568 us
at the median and 4.3 ms at p99 with polling, 192 us / 465 us without).  So
every poll loop watches the clock between two of its polls: a gap longer than
:attr:`SpinGuard.gap_s` means the poller lost the CPU, and :data:`GUARD` then
turns polling off in this process: for 20 ms, and for twice as long each time
the next gap comes within as long after polling resumed, up to 1 s.  Before
that happens, the guard looks at the tasks runnable on the host (every 50 ms,
/proc/loadavg): with more of them than CPUs at two counts in a row, nobody
polls.

**A moment's burst is not a busy host.**  With master HA three processes share
the cores: client, leader and a standby that wakes every millisecond or so to
apply the leader's stream.  Its bursts once cost the leader and the client
their polling for a full second each time (one gap, one crowded count), so HA
puts ran without polling most of the time (measured: 4 KiB HA puts at 1.3x
and 64 KiB at 1.4x of HA off, median over five set-ups; with short backoffs
and two crowded counts in a row 1.17-1.21x and 1.16-1.18x).  A host that stays
busy still turns polling off within two counts, and its recurring gaps double
the backoff back to a second within a few tenths of one.

Only for a loop that owns its process's GIL (the ``mooncake_master`` process):
a loop thread beside other Python threads would take the GIL from them on every
poll.  The client half is in ``_heldio.py`` (it polls for its reply the same way).
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final, TypeVar

from ._rpcloop import RpcLoop

__all__ = [
    "DEFAULT_POLL_S",
    "GUARD",
    "PollingSelector",
    "SpinGuard",
    "micros_from_env",
    "poll_window_from_env",
    "polling_selector",
    "run_polling",
]

T = TypeVar("T")

#: how long the master keeps polling after its last request (PYMOONCAKE_MASTER_POLL_US)
DEFAULT_POLL_S: Final = 200e-6
_ENV: Final = "PYMOONCAKE_MASTER_POLL_US"

_Base: type[selectors.BaseSelector] = getattr(selectors, "EpollSelector", selectors.DefaultSelector)


def _runnable_tasks() -> int:
    """Tasks runnable on this host right now, the reader included (the 4th field of
    /proc/loadavg); 0 where that cannot be read."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return 0


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class SpinGuard:
    """Says whether polling pays now: not while the host has more runnable tasks
    than CPUs, and not for a while after a poller found it lost the CPU.

    Args:
        gap_s: a gap between two polls longer than this means the poller was
            preempted (one poll takes a microsecond or two; on an idle 2-vCPU VM
            gaps of 50-150 us are common and one of 0.8 ms was seen in 2 s,
            while a CPU-bound competitor takes the CPU for 2.5-5 ms).
        backoff_s: the longest polling stays off after a gap.
        first_backoff_s: how long it stays off after a gap that came long after
            the last backoff ended; doubled for each gap that comes sooner.
        check_s: how often the runnable tasks are counted (a read of /proc/loadavg).
        runnable: counts them (tests pass their own).
    """

    __slots__ = (
        "_backoff",
        "_check_s",
        "_cpus",
        "_crowded",
        "_next_check",
        "backoff_s",
        "backoffs",
        "first_backoff_s",
        "gap_s",
        "off_until",
        "runnable",
    )

    def __init__(
        self,
        gap_s: float = 1e-3,
        backoff_s: float = 1.0,
        check_s: float = 0.05,
        first_backoff_s: float = 0.02,
        runnable: Callable[[], int] = _runnable_tasks,
    ) -> None:
        self.gap_s = gap_s
        self.backoff_s = backoff_s
        self.first_backoff_s = first_backoff_s
        #: how long the last backoff lasted
        self._backoff = first_backoff_s
        self.off_until = 0.0
        #: how often polling was turned off (for tests and benchmarks)
        self.backoffs = 0
        self._check_s = check_s
        self.runnable = runnable
        self._cpus = _usable_cpus()
        self._next_check = 0.0
        #: counts in a row that found more runnable tasks than CPUs (one alone is
        #: a moment's burst of another process, which polling outlasts)
        self._crowded = 0

    def allowed(self, now: float) -> bool:
        """May a poller poll at ``now`` (time.monotonic())?"""
        if now < self.off_until:
            return False
        if now >= self._next_check:
            self._next_check = now + self._check_s
            # the reader counts itself, and a poller on the other side of a round
            # trip (a master) is runnable too: polling pays while these fit the CPUs
            self._crowded = self._crowded + 1 if self.runnable() > self._cpus else 0
        return self._crowded < 2

    def preempted(self, now: float) -> None:
        """A poller saw a gap at ``now``: polling stops for ``first_backoff_s``, or
        for twice as long as the last time (up to ``backoff_s``) when the gap came
        within that long after polling resumed -- a host that stays busy, not a
        moment's burst of another process."""
        if now - self.off_until < self._backoff:
            self._backoff = min(self._backoff * 2, self.backoff_s)
        else:
            self._backoff = min(self.first_backoff_s, self.backoff_s)
        self.off_until = now + self._backoff
        self.backoffs += 1


#: the process's guard, shared by the master's selector and the clients' waits
GUARD: Final = SpinGuard()


def micros_from_env(
    name: str, default_s: float, meaning: str, env: Mapping[str, str] | None = None
) -> float:
    """Seconds from the environment variable ``name``, given in whole microseconds
    (0 to 1000000); ``default_s`` when it is unset or empty.

    Raises:
        ValueError: any other value; the message names the variable and ``meaning``.
    """
    text = (os.environ if env is None else env).get(name, "").strip()
    if not text:
        return default_s
    try:
        us = int(text)
    except ValueError:
        us = -1
    if not 0 <= us <= 1_000_000:
        raise ValueError(
            f"{name}={text!r} is not a whole number of microseconds between 0 and 1000000 "
            f"({meaning}; 0 = never)"
        )
    return us / 1e6


def poll_window_from_env(default_s: float = DEFAULT_POLL_S) -> float:
    """The poll window in seconds from ``PYMOONCAKE_MASTER_POLL_US`` (0 turns polling off).

    Raises:
        ValueError: not a whole number of microseconds in [0, 1000000].
    """
    return micros_from_env(
        _ENV, default_s, "how long the master polls for the next request before it sleeps"
    )


class PollingSelector(_Base):  # type: ignore[misc,valid-type]
    """A selector that polls for up to ``window_s`` after the loop finished
    handling the descriptors it last found ready, before it blocks (see the
    module docstring).

    Args:
        window_s: how long after the last ready descriptor a blocking select polls.
        guard: stops the polling on a busy host.
    """

    def __init__(self, window_s: float = DEFAULT_POLL_S, guard: SpinGuard = GUARD) -> None:
        super().__init__()
        self.window_s = window_s
        self.guard = guard
        self._last_ready = 0.0
        #: descriptors were ready at the last blocking select: the loop is handling them
        self._active = False
        #: selects that found something while polling (they did not sleep)
        self.polled_hits = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        base_select = super().select
        ready: list[tuple[selectors.SelectorKey, int]]
        start = now = time.monotonic()
        if self._active:
            # the loop has been handling what arrived until now: the window starts
            # here, after that work (a batch takes the master 100 us and more; a
            # window counted from the arrival would be spent before the reply left)
            self._last_ready = start
        if timeout is not None and timeout <= 0:
            # the loop has callbacks to run: still active, unless it was only timers
            ready = base_select(0)
            if ready:
                self._active = True
        else:
            guard = self.guard
            stop = self._last_ready + self.window_s
            if now < stop and not guard.allowed(now):
                stop = now
            if timeout is not None:
                stop = min(stop, start + timeout)
            ready = []
            while now < stop:
                ready = base_select(0)
                if ready:
                    self.polled_hits += 1
                    break
                last, now = now, time.monotonic()
                if now - last > guard.gap_s:
                    guard.preempted(now)
                    break
            if not ready:
                ready = base_select(None if timeout is None else max(0.0, timeout - (now - start)))
            self._active = bool(ready)
        return ready


def polling_selector(loop: asyncio.AbstractEventLoop) -> PollingSelector | None:
    """The :class:`PollingSelector` of ``loop`` (made by :func:`run_polling`), or
    None: its owner may change ``window_s`` (an HA standby does not poll: nothing
    it answers is waited for, and its polls would take the CPU from its leader
    and clients)."""
    selector = getattr(loop, "_selector", None)  # asyncio.SelectorEventLoop's
    return selector if isinstance(selector, PollingSelector) else None


def run_polling(coro: Coroutine[Any, Any, T], window_s: float) -> T:
    """``asyncio.run(coro)`` on the master's loop: an :class:`~._rpcloop.RpcLoop`
    (RPC connections served inline) whose selector polls for ``window_s`` after
    activity (a plain selector when ``window_s`` is 0)."""
    loop = RpcLoop(PollingSelector(window_s) if window_s > 0 else None)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
