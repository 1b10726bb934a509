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
        # a port nearby that is free and was not handed out before in this process
        # (a whole test run hands out thousands: the next one may be among them)
        nearby = (port + d for d in (*range(1, 200), *range(-1, -200, -1)))
        spare = next(
            p
            for p in nearby
            if 20000 <= p < _ephemeral_low()
            and p not in _ports._handed
            and _ports._bindable("127.0.0.1", p)
        )
        draws = iter([port, port, spare])
        monkeypatch.setattr(_ports._rng, "randrange", lambda a, b: next(draws))
        got = free_port()
    assert got == spare != port
