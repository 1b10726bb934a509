"""Short socket waits that keep the GIL.

Theory of operation
-------------------
A CPython thread that blocks in ``recv`` releases the GIL.  If another thread of
the process runs Python code meanwhile (an inference server's worker), it takes
the GIL and gives it back only when the switch interval (5 ms) forces it: a
100-microsecond round trip to the store master then costs 5 ms, two of them
10 ms (the reference's C++ client pays the same, it releases the GIL around
every call).

:class:`HeldSocket` sends and receives through libc called with the GIL held
(``ctypes.PyDLL``): a send of a small frame that fits the socket buffer, and a
wait for a reply of up to ``hold_s``.  The first ``spin_s`` of that wait polls
the socket without sleeping (a non-blocking ``recv`` in a loop), the rest sleeps
in ``poll``.  Past ``hold_s`` it falls back to the ordinary calls, which release
the GIL, so a slow peer never stalls the process for longer than that.  Signals
interrupt the wait (EINTR) and are then handled by the ordinary path.

**Why spin.**  A thread that sleeps until its reply arrives pays for being woken
up: on an idle CPU of a virtual machine that is 20-30 us, more than the master
needs to answer a small request (a Python echo over a UNIX socket: 56 us with
both sides sleeping, 4.5 us with both polling; see ``_busypoll.py`` for the
master's half).  A reply that comes within ``spin_s`` (default 100 us,
``PYMOONCAKE_RPC_SPIN_US``; 0 = never spin) is picked up without that cost; a
slower one costs the caller ``spin_s`` of CPU, then it sleeps as before.  On a
busy host polling stops for a while (``_busypoll.GUARD``).

**Why 4 ms.**  The sleep after the spin is ``poll`` with ``hold_s`` as its
timeout, and the kernel arms a high-resolution timer for it.  A timer due
before the CPU's next scheduler tick (every 4 ms at the usual HZ=250) is the
CPU's earliest event: arming it reprograms the CPU's timer, and so does
cancelling it when the reply comes first -- on a virtual machine each of those
is a trap to the hypervisor.  Measured on this project's 2-vCPU VMs, client
and master on one CPU (what a busy host gives a lucky pair), a 4 KiB
``is_exist`` took 49 us with a 2 ms hold and 38 us with 4 ms (median of four
runs each; ``poll`` timeouts of 1-3 ms all paid it, 4 ms and more did not).
A timer due after the next tick changes nothing that is armed.  The wait still
ends within one switch interval, so a slow master holds up the process's other
threads no longer than releasing the GIL would.

Never hold the GIL waiting for a peer that needs *this* process's GIL to answer
(a master on a thread of the same process): callers decide that (see
``store/_master_client.py``).  Linux and other libc platforms; elsewhere, and for
TLS sockets, :func:`held_socket` returns None and callers use plain calls.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ._busypoll import GUARD, micros_from_env

__all__ = [
    "DEFAULT_HOLD_S",
    "DEFAULT_SPIN_S",
    "HeldSocket",
    "PollOne",
    "held_function",
    "held_socket",
    "ready_now",
    "recv_into_held",
    "send_held",
    "spin_from_env",
]

#: how long a wait may keep the GIL: many master round trips, under the 5 ms
#: switch interval it saves, and at least one scheduler tick (see "Why 4 ms")
DEFAULT_HOLD_S: Final = 0.004
#: how long of that wait polls without sleeping (PYMOONCAKE_RPC_SPIN_US)
DEFAULT_SPIN_S: Final = 100e-6
_SPIN_ENV: Final = "PYMOONCAKE_RPC_SPIN_US"


def spin_from_env(env: Mapping[str, str] | None = None) -> float:
    """The spin in seconds from ``PYMOONCAKE_RPC_SPIN_US`` (unset: the default).

    Raises:
        ValueError: not a whole number of microseconds in [0, 1000000].
    """
    return micros_from_env(
        _SPIN_ENV,
        DEFAULT_SPIN_S,
        "how long a master call polls for its reply before it sleeps",
        env,
    )


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


def _open_libc() -> ctypes.PyDLL | None:
    if os.name != "posix":
        return None
    try:
        return ctypes.PyDLL(None, use_errno=True)  # PyDLL: calls keep the GIL
    except OSError:
        return None


_HELD_LIBC: Final = _open_libc()


def held_function(name: str, argtypes: tuple[Any, ...] | None, restype: Any) -> Any:
    """libc's ``name``, called with the GIL held (``ctypes.PyDLL``), with the
    given argument and result types; None where libc or the function is missing.  Only for calls that return at once
    or wait a bounded moment: the whole process stops while one runs.

    Each caller gets its own function object.  ``argtypes`` None leaves ctypes'
    own conversions, which cost about half as much per call (1.2 against 2.4 us
    for a ``poll`` on a slow CPU): then pass only Python ints that fit a C
    ``int``, bytes (``char *``) and ctypes objects of the parameter's exact type
    (a ``c_ulong`` for an ``nfds_t``, say)."""
    if _HELD_LIBC is None:
        return None
    try:
        fn = _HELD_LIBC[name]  # (item access: a new object, typed for this caller only)
    except AttributeError:
        return None
    if argtypes is not None:
        fn.argtypes = argtypes
    fn.restype = restype
    return fn


def _load() -> tuple[Any, Any, Any] | None:
    """(recv, send, poll).  ``recv`` and ``poll`` wait for replies, the hottest
    calls, and are untyped (see :func:`held_function`): ``recv(fd, c_void_p,
    c_size_t, flags)`` and ``poll(pollfds, c_ulong, timeout_ms)``."""
    recv = held_function("recv", None, ctypes.c_ssize_t)
    send = held_function(
        "send", (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_ssize_t
    )
    poll = held_function("poll", None, ctypes.c_int)
    if recv is None or send is None or poll is None:
        return None
    return recv, send, poll


_LIBC = _load()
#: ``poll``'s nfds for one descriptor (untyped calls take it as a ready c_ulong)
_ONE_FD: Final = ctypes.c_ulong(1)
# plain ints: socket's flags are IntFlag members, whose "|" (enum.__or__) costs
# ~0.5 us of Python per send (0.03 us for ints; found profiling the put path)
_DONTWAIT: Final = int(getattr(socket, "MSG_DONTWAIT", 0))
_SEND_FLAGS: Final = _DONTWAIT | int(getattr(socket, "MSG_NOSIGNAL", 0))
_POLLIN: Final = getattr(select, "POLLIN", 1)
_AGAIN: Final = (errno.EAGAIN, errno.EWOULDBLOCK)


class HeldSocket:
    """GIL-holding send/receive on one connected, plain (not TLS) socket.

    Args:
        sock: the socket (blocking mode; its own timeouts apply to the fallback).
        hold_s: longest wait with the GIL held.
        bufsize: bytes read per receive.
        spin_s: how much of ``hold_s`` polls without sleeping.
    """

    __slots__ = ("_addr", "_buf", "_cap", "_fd", "_hold_ms", "_pfd", "_spin", "_to", "sock")

    def __init__(
        self,
        sock: socket.socket,
        hold_s: float = DEFAULT_HOLD_S,
        bufsize: int = 1 << 16,
        spin_s: float = DEFAULT_SPIN_S,
    ) -> None:
        self.sock = sock
        self._fd = sock.fileno()
        self._hold_ms = max(0, int(hold_s * 1000))
        self._spin = max(0.0, min(spin_s, hold_s))
        self._buf = (ctypes.c_char * bufsize)()
        self._addr = ctypes.addressof(self._buf)
        # the untyped recv's arguments, built once
        self._to = ctypes.c_void_p(self._addr)
        self._cap = ctypes.c_size_t(bufsize)
        self._pfd = ctypes.byref(_PollFd(self._fd, _POLLIN, 0))

    def sendall(self, data: bytes) -> None:
        """Send ``data``: what the socket buffer takes at once with the GIL held,
        the rest with ``sock.sendall``."""
        n = _send_prefix(self._fd, data)
        if n != len(data):
            self.sock.sendall(memoryview(data)[n:])

    def recv(self, spin_s: float | None = None) -> bytes:
        """Bytes that arrived (at least one), waiting up to ``hold_s`` with the GIL
        held (polling for the first ``spin_s``, default: the socket's, at most
        ``hold_s``), then in ``sock.recv`` (GIL released, the socket's timeout
        applies).  Returns b"" at EOF."""
        assert _LIBC is not None
        recv, _, _ = _LIBC
        fd, addr, to, cap = self._fd, self._addr, self._to, self._cap
        spin = self._spin if spin_s is None else min(spin_s, self._hold_ms / 1000)
        now = time.monotonic()
        if spin > 0 and GUARD.allowed(now):
            stop = now + spin
            while True:
                n = recv(fd, to, cap, _DONTWAIT)
                if n >= 0:
                    return ctypes.string_at(addr, n)
                if ctypes.get_errno() not in _AGAIN:
                    break  # an error: the path below reports it
                last, now = now, time.monotonic()
                if now - last > GUARD.gap_s:
                    GUARD.preempted(now)  # the host is busy: polling costs more than it saves
                    break
                if now >= stop:
                    break
        n = _recv_within(fd, to, cap, self._hold_ms, self._pfd)
        if n is not None:
            return ctypes.string_at(addr, n)
        return self.sock.recv(len(self._buf))


def _send_prefix(fd: int, data: bytes) -> int:
    """Send what the socket buffer of ``fd`` takes now, with the GIL held; returns
    how much (0 when it is full or the call was interrupted).

    Raises:
        OSError: the socket failed.
    """
    assert _LIBC is not None
    _, send, _ = _LIBC
    n = send(fd, data, len(data), _SEND_FLAGS)
    if n >= 0:
        return int(n)
    err = ctypes.get_errno()
    if err not in _AGAIN and err != errno.EINTR:
        raise OSError(err, os.strerror(err))
    return 0


def send_held(sock: socket.socket, data: bytes) -> None:
    """``sock.sendall(data)`` on a blocking, plain socket, the part that fits its
    send buffer sent with the GIL held (all of a small message)."""
    n = _send_prefix(sock.fileno(), data) if _LIBC is not None else 0
    if n != len(data):
        sock.sendall(memoryview(data)[n:])


def recv_into_held(sock: socket.socket, view: memoryview, hold_ms: int) -> int | None:
    """``sock.recv_into(view)`` with the GIL held, waiting at most ``hold_ms`` for
    the first byte (see "Why 4 ms" for that bound); returns the bytes received
    (0: EOF), or None when nothing came within the hold, the call was
    interrupted or libc cannot be called: then receive the ordinary way.

    Raises:
        OSError: the socket failed.
    """
    if _LIBC is None or not len(view):
        return None
    to = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(view)))
    fd = sock.fileno()
    pfd = ctypes.byref(_PollFd(fd, _POLLIN, 0))
    return _recv_within(fd, to, ctypes.c_size_t(len(view)), hold_ms, pfd)


def _recv_within(fd: int, to: Any, cap: Any, hold_ms: int, pfd: Any) -> int | None:
    """Receive up to ``cap`` (a ``c_size_t``) bytes at ``to`` (a ``c_void_p``) with
    the GIL held, waiting at most ``hold_ms`` for the first (``pfd``: a ``byref``
    of the socket's pollfd); the count (0: EOF), or None when nothing came within
    the hold or a signal interrupted the wait (the ordinary path runs its handler).

    Raises:
        OSError: the socket failed.
    """
    assert _LIBC is not None
    recv, _, poll = _LIBC
    for _ in range(2):
        n = recv(fd, to, cap, _DONTWAIT)
        if n >= 0:
            return int(n)
        err = ctypes.get_errno()
        if err not in _AGAIN:
            if err == errno.EINTR:
                return None
            raise OSError(err, os.strerror(err))
        if not hold_ms or poll(pfd, _ONE_FD, hold_ms) <= 0:
            return None
    return None


def ready_now(fds: Sequence[int], events: int) -> set[int]:
    """The descriptors of ``fds`` that have any of ``events`` now (``poll`` with no
    timeout), asked with the GIL held: ``select.poll`` releases the GIL even for
    a zero timeout, and beside a busy Python thread getting it back costs up to
    the 5 ms switch interval (``select.poll`` only where libc cannot be called)."""
    if _LIBC is None:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, events)
        return {fd for fd, _ in poller.poll(0)}
    _, _, poll = _LIBC
    arr = (_PollFd * len(fds))(*[_PollFd(fd, events, 0) for fd in fds])
    if poll(arr, ctypes.c_ulong(len(fds)), 0) <= 0:
        return set()  # nothing, or interrupted: asked again at the next call
    return {p.fd for p in arr if p.revents}


class PollOne:
    """:func:`ready_now` of one descriptor, its ``struct pollfd`` built once: on a
    slow CPU building it costs more than the call (measured: 6.4 us a call of
    ``ready_now([fd])`` against 1.2 us with the structure ready).  For a
    descriptor that lives as long as this object (a same-host peer's pidfd, a
    pooled master connection)."""

    __slots__ = ("_pfd", "_ref", "fd")

    def __init__(self, fd: int, events: int) -> None:
        self.fd = fd
        self._pfd = _PollFd(fd, events, 0)
        self._ref = ctypes.byref(self._pfd)

    def ready(self) -> bool:
        """Whether the descriptor has any of the events (or an error, a hang-up) now."""
        if _LIBC is None:
            return bool(ready_now([self.fd], self._pfd.events))
        # one descriptor: poll counts it when its revents are set (threads that ask
        # at once share the structure's revents, which is not read)
        return bool(_LIBC[2](self._ref, _ONE_FD, 0) > 0)


def held_socket(
    sock: socket.socket, hold_s: float = DEFAULT_HOLD_S, spin_s: float = DEFAULT_SPIN_S
) -> HeldSocket | None:
    """A :class:`HeldSocket` for ``sock``, or None where it cannot be used (TLS,
    no libc, ``hold_s`` <= 0)."""
    if _LIBC is None or hold_s <= 0 or isinstance(sock, ssl.SSLSocket):
        return None
    return HeldSocket(sock, hold_s, spin_s=spin_s)
