"""gil_probe tells a block that gives up the GIL from one that keeps it."""

from __future__ import annotations

import socket
import time

from pymooncake.testing import gil_probe


def test_pure_python_keeps_the_gil() -> None:
    with gil_probe() as probe:
        total = sum(i * i for i in range(20000))
    assert total > 0
    assert not probe.released


def test_sleep_and_socket_calls_give_it_up() -> None:
    with gil_probe() as probe:
        time.sleep(0.001)
    assert probe.released
    a, b = socket.socketpair()
    try:
        with gil_probe() as probe:
            a.send(b"x")  # even a call that does not wait
        assert probe.released
    finally:
        a.close()
        b.close()
