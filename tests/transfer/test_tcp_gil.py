"""TCP transfers keep the GIL while they wait for small replies (``_heldio``): beside a
busy Python thread of the caller's process, giving it up costs up to the 5 ms switch
interval to get it back (busy_bench measured 5.2 ms per 4 KiB transfer before, 30 us
after)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from pymooncake import EngineConfig, TransferEngine
from pymooncake.testing import gil_probe
from pymooncake.testing._target import TargetProcess, spawn_target
from pymooncake.transfer.transports import tcp
from pymooncake.transfer.transports._tcp_server import IN_PROCESS_DATA_PORTS

LOCAL = "127.0.0.1"


@pytest.fixture
def tcp_only(config: EngineConfig) -> EngineConfig:
    return config.replace(same_host_transport=False)


@pytest.fixture
def target() -> Iterator[TargetProcess]:
    proc = spawn_target({"PYMOONCAKE_SAME_HOST": "0"})
    try:
        yield proc
    finally:
        proc.close()


def test_small_transfers_to_another_process_never_give_up_the_gil(
    tcp_only: EngineConfig, target: TargetProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread that became runnable before the transfers runs only after them.  (The
    hold is raised for the test: on a loaded machine the target may take longer than
    4 ms to answer, and then the wait falls back to the ordinary one by design.)"""
    monkeypatch.setattr(tcp, "DEFAULT_HOLD_S", 5.0)
    engine = TransferEngine(LOCAL, config=tcp_only)
    try:
        out = bytearray(os.urandom(4096))
        back = bytearray(4096)
        engine.write(target.segment, out, target.plain)  # connects (and may wait)
        with gil_probe() as probe:
            for i in range(20):
                engine.write(target.segment, out, target.plain + 4096 * i)
                engine.read(target.segment, back, target.plain + 4096 * i)
                assert back == out
        assert not probe.released
    finally:
        engine.close()


def test_a_target_in_this_process_is_waited_for_the_ordinary_way(
    tcp_only: EngineConfig,
) -> None:
    """Its data port serves from a thread of this process, which needs the GIL to
    answer: the initiator must not hold it while it waits."""
    target = TransferEngine(LOCAL, config=tcp_only)
    engine = TransferEngine(LOCAL, config=tcp_only)
    try:
        port = target.transport("tcp").data_port
        assert port in IN_PROCESS_DATA_PORTS
        region = target.register(bytearray(1 << 16))
        data = bytearray(os.urandom(4096))
        started = time.monotonic()
        for i in range(50):
            engine.write(target.segment_name, data, region.addr + 1024 * (i % 8))
        assert time.monotonic() - started < 2.0  # not a 4 ms hold per call (200 ms)
        back = bytearray(4096)
        engine.read(target.segment_name, back, region.addr + 1024 * 7)
        assert back == data
    finally:
        engine.close()
        target.close()
    assert port not in IN_PROCESS_DATA_PORTS
