"""The device interface itself, on the fake device and (when present) a real GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pymooncake.errors import DeviceError
from pymooncake.transfer._memory import DEVICE_VIEW, allocate_shared, is_host_memory
from pymooncake.transfer.device import IPC_HANDLE_BYTES, DeviceBackend, parse_location
from pymooncake.transfer.device.fake import FAKE_BASE, FakeDevice

from .conftest import DeviceMem, host_addr, pattern


def test_pointer_kinds(backend: DeviceBackend, mem: DeviceMem) -> None:
    d0 = mem.alloc(1 << 20, 0)
    dn = mem.alloc(4096, backend.device_count() - 1)
    assert backend.pointer_device(d0) == 0
    assert backend.pointer_device(d0 + (1 << 20) - 1) == 0
    assert backend.pointer_device(dn) == backend.device_count() - 1
    host = bytearray(64)
    assert backend.pointer_device(host_addr(host)) is None
    base, size = backend.allocation_range(d0 + 100)
    assert base == d0 and size >= 1 << 20
    # device memory is not host memory: the engine's host probe must say so
    assert not is_host_memory(d0, 1 << 20)
    assert is_host_memory(host_addr(host), 64)


def test_sync_copies_every_direction(backend: DeviceBackend, mem: DeviceMem) -> None:
    n = 3 * 1024 * 1024 + 17
    data = pattern(1, n)
    d0 = mem.alloc(n, 0, data)
    d1 = mem.alloc(n, backend.device_count() - 1)
    backend.copy(d1, d0, n)  # device to device (across devices when there are two)
    assert mem.get(d1, n) == data
    assert mem.get(d1 + 1000, 10) == data[1000:1010]


def test_stream_copies_need_an_event_wait(backend: DeviceBackend, mem: DeviceMem) -> None:
    n = 1 << 20
    data = pattern(2, n)
    dev = mem.alloc(n, 0, data)
    mm, view, addr, fd = allocate_shared(n, name="test-pinned")
    try:
        backend.host_register(addr, n)
        try:
            stream = backend.stream(0)
            event = backend.event(0)
            try:
                stream.copy_async(addr, dev, n)  # D2H
                stream.record(event)
                event.wait()
                assert event.query()
                assert bytes(view) == data
                view[:] = pattern(3, n)
                stream.copy_async(dev, addr, n)  # H2D
                stream.synchronize()
                assert mem.get(dev, n) == pattern(3, n)
            finally:
                event.close()
                stream.close()
        finally:
            backend.host_unregister(addr)
    finally:
        view.release()
        mm.close()
        os.close(fd)


def test_ipc_handle_is_opaque_bytes(backend: DeviceBackend, mem: DeviceMem) -> None:
    dev = mem.alloc(2 << 20, 0)
    h = backend.ipc_export(dev + 4096)  # a pointer inside: the allocation's handle
    assert len(h.handle) == IPC_HANDLE_BYTES
    assert h.base == dev and h.size >= 2 << 20 and h.device == 0
    if not backend.real:  # the fake refuses its own process's handles, as CUDA documents
        with pytest.raises(DeviceError):
            backend.ipc_open(h.handle, 0)


def test_ipc_open_in_another_process(
    device_kind: str, backend: DeviceBackend, mem: DeviceMem
) -> None:
    n = 1 << 20
    data = pattern(4, n)
    dev = mem.alloc(n, 0, data)
    h = backend.ipc_export(dev)
    make = (
        "from cuda_emulator import EmulatedDriver\n"
        "from pymooncake.transfer.device.cuda import CudaDevice\n"
        "b = CudaDevice(EmulatedDriver(get_backend('fake')))\n"
        if device_kind == "cuda-emulated"
        else f"b = get_backend({device_kind!r})\n"
    )
    child = (
        "import sys, hashlib, ctypes\n"
        "from pymooncake.transfer.device import get_backend\n"
        + make
        + "h = bytes.fromhex(sys.argv[1]); n = int(sys.argv[2])\n"
        "base = b.ipc_open(h, 0)\n"
        "assert b.ipc_open(h, 0) == base  # opened once, counted twice\n"
        "buf = bytearray(n)\n"
        "b.copy(ctypes.addressof((ctypes.c_char * n).from_buffer(buf)), base, n)\n"
        "print(hashlib.sha256(buf).hexdigest())\n"
        "msg = bytearray(b'ipc!')\n"
        "b.copy(base, ctypes.addressof((ctypes.c_char * 4).from_buffer(msg)), 4)\n"
        "b.ipc_close(base); b.ipc_close(base)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", child, h.handle.hex(), str(n)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    import hashlib

    assert out.stdout.strip() == hashlib.sha256(data).hexdigest()
    assert mem.get(dev, 4) == b"ipc!"  # the child wrote our memory through the mapping


def test_location_parsing() -> None:
    assert parse_location("cuda:3") == ("cuda", 3)
    assert parse_location("cuda") == ("cuda", 0)
    assert parse_location("cpu:0") is None
    assert parse_location("*") is None
    with pytest.raises(ValueError, match="ordinal"):
        parse_location("cuda:x")


# --- what only the fake device can show ------------------------------------------------


def test_fake_device_memory_is_out_of_reach_of_host_code() -> None:
    fake = FakeDevice()
    dev = fake.alloc(4096)
    try:
        assert dev >= FAKE_BASE
        # neither /proc/self/mem nor process_vm_readv can read it
        fd = os.open("/proc/self/mem", os.O_RDONLY)
        try:
            with pytest.raises(OSError):
                os.pread(fd, 1, dev)
        finally:
            os.close(fd)
        assert not is_host_memory(dev, 4096)
        # the engine's stand-in view for device bytes refuses every use
        with pytest.raises(ValueError):
            len(DEVICE_VIEW)
        with pytest.raises(ValueError):
            DEVICE_VIEW[0:1]
        with pytest.raises(DeviceError, match="out-of-bounds"):
            fake.copy(host_addr(bytearray(8)), dev + 4090, 8)
    finally:
        fake.free(dev)


def test_fake_streams_run_lazily_so_a_missing_wait_is_seen() -> None:
    fake = FakeDevice()
    n = 4096
    dev = fake.alloc(n)
    staging = bytearray(n)
    addr = host_addr(staging)
    try:
        data = bytearray(pattern(5, n))
        fake.copy(dev, host_addr(data), n)
        fake.host_register(addr, n)
        stream = fake.stream(0)
        event = fake.event(0)
        stream.copy_async(addr, dev, n)
        stream.record(event)
        assert staging == bytes(n)  # not waited for: the bytes are not there yet
        event.wait()
        assert staging == data
        stream.close()
        event.close()
        fake.host_unregister(addr)
    finally:
        fake.free(dev)


def test_fake_async_copies_refuse_pageable_memory() -> None:
    fake = FakeDevice()
    dev = fake.alloc(4096)
    try:
        stream = fake.stream(0)
        with pytest.raises(DeviceError, match="pinned"):
            stream.copy_async(host_addr(bytearray(4096)), dev, 4096)
        stream.close()
        with pytest.raises(DeviceError, match="already registered"):
            buf = bytearray(8192)
            fake.host_register(host_addr(buf), 8192)
            try:
                fake.host_register(host_addr(buf) + 4096, 4096)
            finally:
                fake.host_unregister(host_addr(buf))
        with pytest.raises(DeviceError, match="does not exist"):
            fake.stream(7)
    finally:
        fake.free(dev)


def test_cuda_backend_leaves_the_callers_context_alone(
    device_kind: str, backend: DeviceBackend, mem: DeviceMem
) -> None:
    """An application thread keeps its current CUDA context across our calls
    (vLLM's workers are bound to their device)."""
    if device_kind != "cuda-emulated":
        pytest.skip("the emulated driver exposes the context stack")
    driver = backend._d  # type: ignore[attr-defined]
    assert driver.context_depth() == 0
    dev = mem.alloc(4096, 1)
    backend.copy(dev, mem.alloc(4096, 0), 4096)
    backend.pointer_device(dev)
    stream, event = backend.stream(1), backend.event(1)
    stream.record(event)
    event.wait()
    stream.close()
    event.close()
    assert driver.context_depth() == 0
    assert "CudaDevice" in type(backend).__name__ and "Emulated GPU" in backend.describe()
