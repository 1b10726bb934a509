"""Ports for commands that need one up front (``--port=N`` before the process
starts), chosen where the kernel's own choices cannot land.

Binding port 0, reading the port and closing the socket returns a port that the
kernel may hand to the next outgoing connection of any process (its ephemeral
range, ``net.ipv4.ip_local_port_range``, 32768-60999 by default) before the
command binds it, and the command then fails with "address in use" (a race that
shared/CONVENTIONS.md names; not seen failing here).  :func:`free_port` instead picks at random among the ports below that
range, which only explicit binds use, checks that the port can be bound now, and
never hands out the same port twice in one process.
"""

from __future__ import annotations

import random
import socket
import threading
from typing import Final

__all__ = ["free_port"]

#: the lowest port handed out (below: well-known and registered services'
#: defaults that a test host may run, e.g. etcd 2379, Redis 6379)
_FLOOR: Final = 20000
#: the start of the kernel's default ephemeral range (32768-60999), when /proc
#: does not say
_DEFAULT_EPHEMERAL_LOW: Final = 32768
_handed: set[int] = set()
_lock = threading.Lock()
_rng = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_LOW


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing is bound to now and that no outgoing
    connection will take meanwhile (outside the kernel's ephemeral range when it
    leaves room below it; else the kernel's choice)."""
    low = _ephemeral_low()
    with _lock:
        if low - _FLOOR >= 1000:
            if len(_handed) > (low - _FLOOR) // 2:
                _handed.clear()  # (a very long run: reuse the oldest ones)
            for _ in range(100):
                port = _rng.randrange(_FLOOR, low)
                if port not in _handed and _bindable(host, port):
                    _handed.add(port)
                    return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        _handed.add(port)
        return port
