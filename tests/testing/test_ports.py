"""free_port: ports a command can bind later, never one an outgoing connection
could take meanwhile."""

from __future__ import annotations

import socket

import pytest

from pymooncake.testing import _ports, free_port
from pymooncake.testing._ports import _ephemeral_low


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    low = _ephemeral_low()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    if low - 20000 >= 1000:  # (room below the kernel's range: it is used)
        assert all(20000 <= p < low for p in ports), sorted(ports)[-3:]
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port something listens on is skipped even when the draw lands on it
    (here: forced to, with a port this process never handed out before)."""
    if _ephemeral_low() - 20000 < 1000:
        pytest.skip("no room below the kernel's ephemeral range on this host")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port()))
        busy.listen(1)
        port = busy.getsockname()[1]
        _ports._handed.discard(port)  # as if another process had bound it
        draws = iter([port, port, port + 1 if port + 1 < _ephemeral_low() else port - 1])
        monkeypatch.setattr(_ports._rng, "randrange", lambda a, b: next(draws))
        got = free_port()
    assert got != port and abs(got - port) == 1
