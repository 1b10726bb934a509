"""Same-host peers: device memory through IPC handles, one device copy per request."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pymooncake import EngineConfig, TransferEngine
from pymooncake.errors import DeviceError
from pymooncake.transfer import TransferRequest
from pymooncake.transfer.device import DeviceBackend
from pymooncake.transfer.device.fake import FakeDevice

from .conftest import LOCAL, DeviceMem, DevicePeer, pattern, sha


@pytest.fixture
def peer(peer_factory: Callable[[bool], DevicePeer]) -> DevicePeer:
    return peer_factory(True)


@pytest.fixture
def eng(gpu_config: EngineConfig) -> Iterator[TransferEngine]:
    e = TransferEngine(LOCAL, "P2PHANDSHAKE", config=gpu_config)
    try:
        yield e
    finally:
        e.close()


def _stats(e: TransferEngine) -> dict[str, int]:
    return dict(e.transport("shm").stats)  # type: ignore[attr-defined]


def test_device_to_device_goes_through_ipc(
    eng: TransferEngine, peer: DevicePeer, backend: DeviceBackend, mem: DeviceMem
) -> None:
    size = int(peer.info["size"])
    data = pattern(21, size)
    local = mem.alloc(size, 0, data)
    before = dict(getattr(backend, "stats", {}))
    for which in ("dev0", "devn"):
        eng.write(peer.segment, local, peer.addr(which), size)
        assert peer.digest(which, 0, size) == sha(data)
    back = mem.alloc(size, backend.device_count() - 1)
    eng.read(peer.segment, back, peer.addr("devn"), size)
    assert mem.get(back, size) == data
    stats = _stats(eng)
    assert stats["slices_device"] == 3 and stats["slices_fallback"] == 0
    if isinstance(backend, FakeDevice):
        assert backend.stats["ipc_open"] - before.get("ipc_open", 0) == 2  # once per allocation
        assert backend.stats["d2d"] - before.get("d2d", 0) >= 3
        assert "copy_async" not in peer.call(cmd="stats")["backend"]  # nobody staged


def test_host_and_device_mix_across_processes(
    eng: TransferEngine, peer: DevicePeer, mem: DeviceMem
) -> None:
    size = int(peer.info["size"])
    host_data = bytearray(pattern(22, size))
    eng.write(peer.segment, host_data, peer.addr("dev0"), size)  # our host -> their device
    assert peer.digest("dev0", 0, size) == sha(bytes(host_data))
    dev_data = pattern(23, 100_000)
    local = mem.alloc(100_000, 0, dev_data)
    eng.write(peer.segment, local, peer.addr("host") + 7, 100_000)  # our device -> their memfd
    assert peer.digest("host", 7, 100_000) == sha(dev_data)
    got = bytearray(50_000)
    eng.read(peer.segment, got, peer.addr("dev0") + 1000, 50_000)  # their device -> our host
    assert got == host_data[1000:51_000]
    assert _stats(eng)["slices_device"] == 3


def test_batch_of_small_device_blocks(
    eng: TransferEngine, peer: DevicePeer, backend: DeviceBackend, mem: DeviceMem
) -> None:
    """vLLM-like: many KV blocks written into the peer's device cache in one batch."""
    block, count = 16 * 1024, 64
    data = pattern(24, block * count)
    local = mem.alloc(block * count, 0, data)
    base = peer.addr("devn")
    reqs = [
        TransferRequest.write(local + i * block, base + (count - 1 - i) * block, block)
        for i in range(count)
    ]
    batch = eng.allocate_batch(count)
    eng.submit(batch, reqs, segment=peer.segment)
    assert eng.wait_batch(batch, 30)
    eng.free_batch(batch)
    for i in (0, 17, count - 1):
        want = data[i * block : (i + 1) * block]
        assert peer.digest("devn", (count - 1 - i) * block, block) == sha(want)


def test_ipc_refused_falls_back_to_tcp_staging(
    eng: TransferEngine,
    peer: DevicePeer,
    backend: DeviceBackend,
    mem: DeviceMem,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Devices without peer access (or another container): the IPC handle does not
    open, the same bytes go over TCP, staged on both ends."""

    def refuse(handle: bytes, device: int) -> int:
        raise DeviceError("injected: CUDA_ERROR_PEER_ACCESS_UNSUPPORTED")

    monkeypatch.setattr(backend, "ipc_open", refuse)
    size = int(peer.info["size"])
    data = pattern(25, size)
    local = mem.alloc(size, 0, data)
    eng.write(peer.segment, local, peer.addr("dev0"), size)
    assert peer.digest("dev0", 0, size) == sha(data)
    back = mem.alloc(size, 0)
    eng.read(peer.segment, back, peer.addr("dev0"), size)
    assert mem.get(back, size) == data
    stats = _stats(eng)
    assert stats["slices_device"] == 0 and stats["slices_fallback"] == 2
