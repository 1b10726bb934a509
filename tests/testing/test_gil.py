"""gil_probe tells a block that gives up the GIL from one that keeps it."""

from __future__ import annotations

import socket
import time

import pytest

from pymooncake.testing import gil_probe


def test_pure_python_keeps_the_gil() -> None:
    with gil_probe() as probe:
        total = sum(i * i for i in range(20000))
    assert total > 0
    assert not probe.released


def test_waits_without_the_gil_are_seen() -> None:
    with gil_probe() as probe:
        time.sleep(0.05)
    assert probe.released
    a, b = socket.socketpair()
    try:
        a.settimeout(0.05)
        with gil_probe() as probe, pytest.raises(TimeoutError):
            a.recv(1)  # waits 50 ms without the GIL
        assert probe.released
    finally:
        a.close()
        b.close()
