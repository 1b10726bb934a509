"""Fixtures of the device-memory tests.  Each test runs three times:

* ``fake`` -- the fake device (``pymooncake.transfer.device.fake``);
* ``cuda-emulated`` -- the real CUDA backend (``device/cuda.py``) driving an
  emulation of cuda-python's driver module over the fake device
  (``cuda_emulator.py``), so the backend's driver calls run on CPU-only CI;
* ``cuda`` -- the CUDA backend on a real GPU; skipped, with the reason, when
  cuda-python or a GPU is missing.

``PYMOONCAKE_GPU_ONLY=1`` (scripts/gpu-check.sh) keeps only the real variant.
CUDA starts driver threads and opens device files lazily, so the real variant
runs without the per-test leak check.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pymooncake import EngineConfig, TransferEngine
from pymooncake.errors import DeviceUnavailable
from pymooncake.transfer.device import DeviceBackend, _select, get_backend

LOCAL = "127.0.0.1"
PEER_SCRIPT = Path(__file__).with_name("device_peer.py")

_KINDS = [
    pytest.param("fake", id="fake"),
    pytest.param("cuda-emulated", id="cuda-emulated"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.allow_leaks),
]
if os.environ.get("PYMOONCAKE_GPU_ONLY") == "1":
    _KINDS = _KINDS[2:]
#: tells device_peer.py (and child snippets) to build the emulated CUDA backend
EMULATOR_ENV = "PYMOONCAKE_TEST_CUDA_EMULATOR"


def device_mode(kind: str) -> str:
    """The engine's ``device_backend`` for a test kind."""
    return "fake" if kind == "fake" else "cuda"


def emulated_cuda() -> DeviceBackend:
    from pymooncake.transfer.device.cuda import CudaDevice

    from .cuda_emulator import EmulatedDriver

    return CudaDevice(EmulatedDriver(get_backend("fake")))  # type: ignore[arg-type]


@pytest.fixture(scope="session", params=_KINDS)
def device_kind(request: pytest.FixtureRequest) -> str:
    kind = str(request.param)
    if kind == "cuda":
        try:
            get_backend("cuda")
        except DeviceUnavailable as exc:
            pytest.skip(f"no real GPU here: {exc}")
    return kind


@pytest.fixture(scope="session")
def backend(device_kind: str) -> DeviceBackend:
    return emulated_cuda() if device_kind == "cuda-emulated" else get_backend(device_kind)


@pytest.fixture
def selected(device_kind: str, backend: DeviceBackend, monkeypatch: pytest.MonkeyPatch) -> str:
    """Engines of this test that ask for CUDA get ``backend`` (the emulated one
    in the cuda-emulated variant); returns the engine mode."""
    if device_kind == "cuda-emulated":
        monkeypatch.setitem(_select._instances, "cuda", backend)
        monkeypatch.setenv(EMULATOR_ENV, "1")
    return device_mode(device_kind)


def host_addr(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@dataclass
class DeviceMem:
    """Device allocations of one test, freed at its end; host<->device helpers."""

    backend: DeviceBackend
    allocated: list[int] = field(default_factory=list)

    def alloc(self, n: int, device: int = 0, data: bytes | None = None) -> int:
        addr = self.backend.alloc(n, device)
        self.allocated.append(addr)
        if data is not None:
            self.put(addr, data)
        return addr

    def put(self, addr: int, data: bytes) -> None:
        buf = bytearray(data)
        self.backend.copy(addr, host_addr(buf), len(buf))

    def get(self, addr: int, n: int) -> bytes:
        buf = bytearray(n)
        self.backend.copy(host_addr(buf), addr, n)
        return bytes(buf)

    def free_all(self) -> None:
        while self.allocated:
            self.backend.free(self.allocated.pop())


@pytest.fixture
def mem(backend: DeviceBackend) -> Iterator[DeviceMem]:
    m = DeviceMem(backend)
    try:
        yield m
    finally:
        m.free_all()


@pytest.fixture
def gpu_config(selected: str) -> EngineConfig:
    """Loopback engine settings with the device backend under test; small staging
    chunks so that modest buffers already cross many chunks."""
    return EngineConfig(
        tcp_bind_address=LOCAL,
        transfer_timeout_s=20.0,
        tcp_status_timeout_s=20.0,
        connect_timeout_s=2.0,
        rpc_io_timeout_s=5.0,
        async_workers=4,
        device_backend=selected,
        staging_chunk_bytes=256 * 1024,
    )


@pytest.fixture
def engines(gpu_config: EngineConfig) -> Iterator[tuple[TransferEngine, TransferEngine]]:
    """Initiator and target in this process (TCP between them)."""
    a = TransferEngine(LOCAL, "P2PHANDSHAKE", config=gpu_config)
    try:
        b = TransferEngine(LOCAL, "P2PHANDSHAKE", config=gpu_config)
    except BaseException:
        a.close()
        raise
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@dataclass
class DevicePeer:
    """``device_peer.py`` in a child process."""

    proc: subprocess.Popen[str]
    info: dict[str, Any]
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"device peer exited ({self.proc.poll()})")
        return dict(json.loads(line))

    @property
    def segment(self) -> str:
        return str(self.info["segment"])

    def addr(self, which: str) -> int:
        return int(self.info[which])

    def digest(self, which: str, offset: int, length: int) -> str:
        return str(self.call(cmd="digest", which=which, offset=offset, length=length)["sha256"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="quit")
            except (RuntimeError, OSError):
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def spawn_device_peer(kind: str, same_host: bool) -> DevicePeer:
    env = {
        **os.environ,
        "PYMOONCAKE_DEVICE": device_mode(kind),
        EMULATOR_ENV: "1" if kind == "cuda-emulated" else "0",
        "PYMOONCAKE_SAME_HOST": "1" if same_host else "0",
        "PYMOONCAKE_STAGING_CHUNK_BYTES": str(256 * 1024),
    }
    env.pop("PYMOONCAKE_FAKE_GPU", None)
    proc = subprocess.Popen(
        [sys.executable, str(PEER_SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    peer = DevicePeer(proc, {})
    try:
        peer.info = peer.call(cmd="info")
    except BaseException:
        peer.proc.kill()
        peer.close()
        raise
    return peer


@pytest.fixture
def peer_factory(device_kind: str, selected: str) -> Iterator[Callable[[bool], DevicePeer]]:
    peers: list[DevicePeer] = []

    def make(same_host: bool) -> DevicePeer:
        p = spawn_device_peer(device_kind, same_host)
        peers.append(p)
        return p

    try:
        yield make
    finally:
        for p in peers:
            p.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
