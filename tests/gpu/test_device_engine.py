"""The engine with device memory: registration, descriptors, TCP staging, errors."""

from __future__ import annotations

import json

import pytest

from pymooncake import EngineConfig, TransferEngine
from pymooncake.errors import (
    AddressOverlapped,
    DeviceError,
    DeviceUnavailable,
    InvalidArgument,
    NotSupported,
    PeerRejected,
    TransferFailed,
)
from pymooncake.transfer import TaskState, TransferRequest
from pymooncake.transfer.device import DeviceBackend, DeviceSpan, _select
from pymooncake.transfer.device.fake import FakeDevice
from pymooncake.wire import NotifyMessage, decode_segment

from .conftest import LOCAL, DeviceMem, DevicePeer, pattern, sha

Pair = tuple[TransferEngine, TransferEngine]
CHUNK = 256 * 1024  # gpu_config's staging_chunk_bytes


def test_register_device_memory_and_publish_its_location(
    engines: Pair, backend: DeviceBackend, mem: DeviceMem
) -> None:
    a, b = engines
    last = backend.device_count() - 1
    d0 = mem.alloc(1 << 20, 0)
    dn = mem.alloc(1 << 20, last)
    host = bytearray(4096)
    r0 = b.register(d0, 1 << 20)  # location "*" is worked out: cuda:0
    rn = b.register(dn, 1 << 20, location=f"cuda:{last}")
    rh = b.register(host)
    assert (r0.location, r0.device, rn.location, rh.location) == (
        "cuda:0",
        0,
        f"cuda:{last}",
        "cpu:0",
    )
    with pytest.raises(AddressOverlapped):
        b.register(d0 + 4096, 4096)
    with pytest.raises(ValueError):  # device bytes have no host view: loud, not a crash
        r0.slice(d0, 16)
    spare = mem.alloc(8192, 0)
    base, size = backend.allocation_range(spare)
    with pytest.raises(InvalidArgument, match="past the end"):
        b.register(base + size - 8, 4096)

    desc = a.segment(b.segment_name, refresh=True).desc
    by_addr = {buf.addr: buf for buf in desc.buffers}
    assert by_addr[d0].extra == {"location": "cuda:0"}
    assert by_addr[dn].extra == {"location": f"cuda:{last}"}
    assert by_addr[rh.addr].extra == {}

    b.unregister(d0)
    b.unregister(dn)
    assert {buf.addr for buf in a.segment(b.segment_name, refresh=True).desc.buffers} == {rh.addr}


def test_descriptor_json_keeps_the_reference_tcp_shape(engines: Pair, mem: DeviceMem) -> None:
    """A reference TCP peer reads buffers as {name, addr, length}: a device buffer
    adds only "location" (TENT's field name), which jsoncpp readers ignore."""
    _, b = engines
    dev = mem.alloc(8192, 0)
    host = bytearray(4096)
    b.register(dev, 8192)
    b.register(host)
    wire = json.loads(json.dumps(b.local_descriptor()))
    assert wire["protocol"] == "tcp"
    dev_buf, host_buf = wire["buffers"]
    assert dev_buf == {"name": b.segment_name, "addr": dev, "length": 8192, "location": "cuda:0"}
    assert set(host_buf) == {"name", "addr", "length"}  # host buffers: byte-for-byte as before
    assert all(isinstance(dev_buf[k], int) for k in ("addr", "length"))
    back = decode_segment(wire, b.segment_name)
    assert back.buffers[0].extra == {"location": "cuda:0"}


def test_register_many_and_batch_unregister(engines: Pair, mem: DeviceMem) -> None:
    a, b = engines
    blocks = [mem.alloc(64 * 1024, 0) for _ in range(4)]
    regions = b.register_many([(p, 64 * 1024) for p in blocks])
    assert all(r.device == 0 for r in regions)
    assert len(a.segment(b.segment_name, refresh=True).desc.buffers) == 4
    b.unregister_many(blocks)
    assert a.segment(b.segment_name, refresh=True).desc.buffers == ()


@pytest.mark.parametrize("size", [1, 4095, CHUNK, 3 * CHUNK + 123])
def test_tcp_device_to_device_both_directions(
    engines: Pair, backend: DeviceBackend, mem: DeviceMem, size: int
) -> None:
    a, b = engines
    last = backend.device_count() - 1
    data = pattern(size, size)
    src = mem.alloc(size, 0, data)
    dst = mem.alloc(size, last)
    b.register(dst, size)
    a.write(b.segment_name, src, dst, size)  # staged on both ends
    assert mem.get(dst, size) == data
    back = mem.alloc(size, last)
    a.read(b.segment_name, back, dst, size)
    assert mem.get(back, size) == data


def test_tcp_host_and_device_mixed_in_one_batch(
    engines: Pair, backend: DeviceBackend, mem: DeviceMem
) -> None:
    """Many small device requests are packed into chunks; host requests and
    requests spanning chunks ride along; each completes on its own."""
    a, b = engines
    total = 2 * 1024 * 1024
    remote_dev = mem.alloc(total, 0)
    remote_host = b.allocate(total)
    b.register(remote_dev, total)
    local_data = pattern(7, total)
    local = mem.alloc(total, 0, local_data)
    host_src = bytearray(pattern(8, 100_000))
    sizes = [100, 3000, 70_000, 1, 600_000, 5, CHUNK, 40_000]
    reqs = []
    off = 0
    for n in sizes:
        reqs.append(TransferRequest.write(DeviceSpan(backend, 0, local + off, n), remote_dev + off))
        reqs.append(TransferRequest.write(local + off, remote_host.addr + off, n))  # device->host
        off += n + 17
    reqs.append(TransferRequest.write(host_src, remote_dev + total - len(host_src)))  # host->device
    a.transfer(b.segment_name, reqs)
    got = mem.get(remote_dev, total)
    off = 0
    for n in sizes:
        assert got[off : off + n] == local_data[off : off + n]
        assert bytes(remote_host.view[off : off + n]) == local_data[off : off + n]
        off += n + 17
    assert got[total - len(host_src) :] == host_src
    # and back: reads of pieces into device memory
    dst = mem.alloc(total, 0)
    a.transfer(
        b.segment_name,
        [
            TransferRequest.read(dst + 10, remote_dev, 900_000),
            TransferRequest.read(dst, remote_dev + 5, 3),
        ],
    )
    assert mem.get(dst + 10, 900_000) == got[:900_000]
    assert mem.get(dst, 3) == got[5:8]


def test_async_batch_with_device_memory_and_notify(engines: Pair, mem: DeviceMem) -> None:
    a, b = engines
    n = 5 * CHUNK + 1
    data = pattern(9, n)
    src = mem.alloc(n, 0, data)
    dst = mem.alloc(n, 0)
    b.register(dst, n)
    batch = a.allocate_batch(4)
    a.submit(
        batch,
        [TransferRequest.write(src, dst, n)],
        segment=b.segment_name,
        notify=(b.segment_name, NotifyMessage("kv", "layer0")),
    )
    assert a.wait_batch(batch, 20)
    assert a.batch_status(batch).state is TaskState.COMPLETED
    assert a.task_status(batch, 0).transferred_bytes == n
    a.free_batch(batch)
    assert mem.get(dst, n) == data
    for _ in range(100):
        if b.get_notifies():
            break
        import time

        time.sleep(0.05)
    else:
        pytest.fail("the notification after the device batch never arrived")


def test_own_segment_copies_device_memory(
    engines: Pair, backend: DeviceBackend, mem: DeviceMem
) -> None:
    a, _ = engines
    n = 300_000
    data = pattern(10, n)
    dev = mem.alloc(n, 0, data)
    other = mem.alloc(n, backend.device_count() - 1)
    host = bytearray(n)
    a.register(other, n)
    a.register(host)
    a.write(a.segment_name, dev, other, n)  # own segment: one device copy, no socket
    assert mem.get(other, n) == data
    a.read(a.segment_name, host, other, n)
    assert host == data
    assert a.transport("tcp").stats["requests_served"] == 0  # type: ignore[attr-defined]


def test_requests_outside_a_device_region_are_rejected(engines: Pair, mem: DeviceMem) -> None:
    a, b = engines
    dev = mem.alloc(65536, 0)
    b.register(dev, 4096)  # only the first page is registered
    local = mem.alloc(8192, 0)
    with pytest.raises(TransferFailed) as info:
        a.write(b.segment_name, local, dev + 4000, 200)
    assert isinstance(info.value.errors[0], PeerRejected)
    a.write(b.segment_name, local, dev, 4096)  # the connection recovers


def test_device_copy_failure_fails_the_requests_it_touched(
    engines: Pair, backend: DeviceBackend, mem: DeviceMem, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not isinstance(backend, FakeDevice):
        pytest.skip("fault injection uses the fake device")
    a, b = engines
    n = 4 * CHUNK
    src = mem.alloc(n, 0, pattern(11, n))
    dst = mem.alloc(n, 0)
    b.register(dst, n)
    a.write(b.segment_name, src, dst, CHUNK)  # warm: lanes exist
    calls = {"n": 0}
    real_stream = FakeDevice.stream

    def flaky_stream(self: FakeDevice, device: int):  # type: ignore[no-untyped-def]
        s = real_stream(self, device)
        real_copy = s.copy_async

        def copy_async(dst_: int, src_: int, k: int) -> None:
            calls["n"] += 1
            if calls["n"] == 3:
                raise DeviceError("injected: CUDA_ERROR_ILLEGAL_ADDRESS")
            real_copy(dst_, src_, k)

        s.copy_async = copy_async  # type: ignore[method-assign]
        return s

    monkeypatch.setattr(FakeDevice, "stream", flaky_stream)
    # a fresh engine (fresh lanes, so the flaky streams are used)
    c = TransferEngine(LOCAL, "P2PHANDSHAKE", config=a.config)
    try:
        with pytest.raises(TransferFailed) as info:
            c.transfer(
                b.segment_name,
                [
                    TransferRequest.write(src, dst, CHUNK),
                    TransferRequest.write(src, dst, 3 * CHUNK),
                ],
            )
        errs = info.value.errors
        assert errs[0] is None and isinstance(errs[1], DeviceError)
    finally:
        c.close()


def test_between_processes_over_tcp(
    peer_factory: object, backend: DeviceBackend, mem: DeviceMem, gpu_config: EngineConfig
) -> None:
    peer: DevicePeer = peer_factory(False)  # type: ignore[operator]
    size = int(peer.info["size"])
    data = pattern(12, size)
    local = mem.alloc(size, 0, data)
    eng = TransferEngine(
        LOCAL, "P2PHANDSHAKE", config=gpu_config.replace(same_host_transport=False)
    )
    try:
        for which in ("dev0", "devn", "host"):
            eng.write(peer.segment, local, peer.addr(which), size)
            assert peer.digest(which, 0, size) == sha(data)
        peer.call(cmd="fill", which="devn", seed=13)
        back = mem.alloc(size, backend.device_count() - 1)
        eng.read(peer.segment, back, peer.addr("devn"), size)
        assert mem.get(back, size) == pattern(13, size)
        host = bytearray(1000)
        eng.read(peer.segment, host, peer.addr("devn") + 5, 1000)
        assert host == pattern(13, size)[5:1005]
        if backend.name == "fake":
            stats = peer.call(cmd="stats")["backend"]
            assert stats["copy_async"] > 0 and stats["host_register"] > 0  # the peer staged too
            assert "ipc_open" not in stats
    finally:
        eng.close()


# --- errors -----------------------------------------------------------------------------


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as if cuda-python were not installed."""
    real = _select.get_backend

    def get_backend(name: str) -> DeviceBackend:
        if name == "cuda":
            raise DeviceUnavailable(
                "GPU memory needs cuda-python, which is not installed: pip install "
                "'pymooncake[cuda]'"
            )
        return real(name)

    monkeypatch.setattr(_select, "get_backend", get_backend)


def test_device_pointer_without_cuda_names_the_fix(no_cuda: None, config: EngineConfig) -> None:
    fake = FakeDevice()
    dev = fake.alloc(4096)
    eng = TransferEngine(LOCAL, "P2PHANDSHAKE", config=config)  # device_backend auto
    try:
        with pytest.raises(InvalidArgument, match=r"pip install 'pymooncake\[cuda\]'"):
            eng.register(dev, 4096)
        with pytest.raises(DeviceUnavailable, match=r"pymooncake\[cuda\]"):
            eng.register(bytearray(8), location="cuda:0")
        with pytest.raises(NotSupported, match="CUDA only"):
            eng.register(bytearray(8), location="musa:0")
        host = eng.allocate(4096)
        with pytest.raises(InvalidArgument, match=r"pymooncake\[cuda\]"):
            eng.write(eng.segment_name, dev, host.addr, 16)
    finally:
        eng.close()
        fake.free(dev)


def test_device_backend_cuda_demanded_but_missing(no_cuda: None, config: EngineConfig) -> None:
    eng = TransferEngine(LOCAL, "P2PHANDSHAKE", config=config.replace(device_backend="cuda"))
    try:
        with pytest.raises(DeviceUnavailable, match="cuda-python"):
            eng.register(bytearray(8), location="cuda:0")
    finally:
        eng.close()


def test_device_memory_switched_off(config: EngineConfig) -> None:
    eng = TransferEngine(LOCAL, "P2PHANDSHAKE", config=config.replace(device_backend="none"))
    try:
        with pytest.raises(DeviceUnavailable, match="PYMOONCAKE_DEVICE=none"):
            eng.register(bytearray(8), location="cuda:0")
    finally:
        eng.close()


def test_config_from_env_selects_the_backend() -> None:
    assert EngineConfig.from_env({"PYMOONCAKE_FAKE_GPU": "1"}).device_backend == "fake"
    assert EngineConfig.from_env({"PYMOONCAKE_DEVICE": "cuda"}).device_backend == "cuda"
    assert EngineConfig.from_env({}).device_backend == "auto"
    assert (
        EngineConfig.from_env({"PYMOONCAKE_STAGING_CHUNK_BYTES": "65536"}).staging_chunk_bytes
        == 65536
    )
    with pytest.raises(ValueError, match="PYMOONCAKE_DEVICE"):
        EngineConfig.from_env({"PYMOONCAKE_DEVICE": "rocm"})
    with pytest.raises(ValueError, match="contradicts"):
        EngineConfig.from_env({"PYMOONCAKE_FAKE_GPU": "1", "PYMOONCAKE_DEVICE": "cuda"})
