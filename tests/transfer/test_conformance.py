"""Every transport honours one contract: the conformance checks over TCP and same-host.

The target runs in another process on 127.0.0.1.  With the same-host transport
on, its memfd-backed buffer is reached through a shared mapping and its plain
buffer through process_vm_readv/writev; with it off, both go over TCP.  The
counters prove which path carried the bytes.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

import pytest

from pymooncake import EngineConfig, TransferEngine
from pymooncake.testing import _conformance as conf
from pymooncake.testing._target import TargetProcess, spawn_target
from pymooncake.transfer.transports import shm as shm_module

CHECKS: list[Callable[[TransferEngine, TargetProcess, str], None]] = [
    conf.check_offsets,
    conf.check_zero_length,
    conf.check_out_of_bounds,
    conf.check_many_threads,
    conf.check_unregister_during_use,
    conf.check_peer_death,
]


@pytest.fixture
def target() -> Iterator[TargetProcess]:
    t = spawn_target()
    try:
        yield t
    finally:
        t.close()


def _engine(config: EngineConfig, same_host: bool) -> TransferEngine:
    return TransferEngine("127.0.0.1", config=config.replace(same_host_transport=same_host))


@pytest.mark.parametrize("which", ["managed", "plain"])
@pytest.mark.parametrize("path", ["tcp", "same-host"])
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_conformance(
    config: EngineConfig, target: TargetProcess, path: str, which: str, check: Callable[..., None]
) -> None:
    with _engine(config, path == "same-host") as engine:
        check(engine, target, which)
        stats = engine.transport("shm").stats  # type: ignore[attr-defined]
        used = stats["slices_mapped"] if which == "managed" else stats["slices_pvm"]
        if path == "same-host" and check is not conf.check_zero_length:
            assert used > 0, f"the same-host path was not used: {stats}"
        if path == "tcp":
            assert not any(stats.values()), stats


def test_same_host_is_chosen_automatically_and_tcp_carries_nothing(
    config: EngineConfig, target: TargetProcess
) -> None:
    with _engine(config, True) as engine:
        tcp_before = dict(engine.transport("tcp").stats)  # type: ignore[attr-defined]
        engine.write(target.segment, b"x" * 4096, target.managed)
        engine.write(target.segment, b"y" * 4096, target.plain)
        stats = engine.transport("shm").stats  # type: ignore[attr-defined]
        assert stats["slices_mapped"] == 1 and stats["slices_pvm"] == 1
        assert engine.transport("tcp").stats == tcp_before  # type: ignore[attr-defined]


def test_disabled_by_environment(target: TargetProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYMOONCAKE_SAME_HOST", "0")
    cfg = EngineConfig.from_env().replace(tcp_bind_address="127.0.0.1")
    assert cfg.same_host_transport is False
    with TransferEngine("127.0.0.1", config=cfg) as engine:
        engine.write(target.segment, b"over tcp", target.managed)
        assert (
            target.digest("managed", 0, 8) == __import__("hashlib").sha256(b"over tcp").hexdigest()
        )
        assert engine.transport("shm").stats["slices_mapped"] == 0  # type: ignore[attr-defined]


def test_process_vm_refused_falls_back_to_tcp(
    config: EngineConfig,
    target: TargetProcess,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(*args: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(shm_module, "_pvm", refuse)
    with _engine(config, True) as engine:
        engine.write(target.segment, b"plain via tcp", target.plain)
        engine.write(target.segment, b"plain via tcp", target.plain)
        engine.write(target.segment, b"managed mapped", target.managed)
        stats = engine.transport("shm").stats  # type: ignore[attr-defined]
        assert stats["slices_fallback"] == 2 and stats["slices_mapped"] == 1
    assert (
        target.digest("plain", 0, 13) == __import__("hashlib").sha256(b"plain via tcp").hexdigest()
    )
    assert sum("ptrace" in r.message for r in caplog.records) == 1  # said once, why


def test_reference_peers_ignore_the_extension(config: EngineConfig) -> None:
    from pymooncake.wire import decode_segment

    with _engine(config, True) as engine:
        desc = engine.local_descriptor()
        assert "pymooncake_shm" in desc
        decoded = decode_segment(desc)
        assert decoded.protocol == "tcp" and decoded.tcp_data_port > 0
