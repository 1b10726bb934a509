"""``mooncake.engine.TransferEngine``: the reference wheel's Python API, end to end.

The first group reproduces, in spirit, the reference's own black-box test
(``mooncake-wheel/tests/transfer_engine_initiator_test.py`` against
``transfer_engine_target.py``): a target in another process
(``te_target_script.py``), reached in P2P handshake mode and through our HTTP
metadata server.  The rest runs both engines in this process (or one native
engine) and pins the reference's return conventions: 0 / -1, batch id 0 on
failure, negative ``ERR_*`` codes from memory registration, 1/0/-1 from
``transfer_check_status``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

import mooncake.engine as mc
from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode
from pymooncake import EngineConfig
from pymooncake import TransferEngine as NativeEngine
from pymooncake.testing import free_port, read_stdout_until
from pymooncake.transfer.metadata.server import MetadataServer

LOCAL = "127.0.0.1"
P2P = "P2PHANDSHAKE"
TARGET_SCRIPT = Path(__file__).with_name("te_target_script.py")
#: the peer name the reference test uses for "not registered anywhere"
UNKNOWN_PEER = "unreachable_peer:9"
T = TypeVar("T")
#: the initiator's fallback buffer (the reference uses 64 MiB; 4 MiB is plenty here)
LOCAL_BUFFER_BYTES = 4 << 20
ERR_ADDRESS_NOT_REGISTERED = -3
ERR_ADDRESS_OVERLAPPED = -7


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def random_text(rng: random.Random, n: int) -> bytes:
    chars = string.ascii_letters + string.digits + string.punctuation
    return "".join(rng.choices(chars, k=n)).encode()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MC_")}
    env.update(extra)
    return env


@dataclass
class RemoteTarget:
    """A ``te_target_script.py`` process and what it announced."""

    proc: subprocess.Popen[bytes]
    segment: str
    buffer_addr: int
    metadata: str
    log_path: Path

    @property
    def mode(self) -> str:
        return "p2p" if self.metadata == P2P else "http"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> int:
        """Close its stdin (it then exits), wait; kill if it does not.  Returns its exit code."""
        proc = self.proc
        try:
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
            try:
                return proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(timeout=10)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()


def start_target(local_hostname: str, metadata: str, log_path: Path) -> RemoteTarget:
    env = clean_env(MC_TCP_BIND_ADDRESS=LOCAL)
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(TARGET_SCRIPT), local_hostname, metadata],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
    target = RemoteTarget(proc, "", 0, metadata, log_path)
    try:
        (line,) = read_stdout_until(proc, timeout_s=30)
        fields = line.split()
        assert fields[:1] == ["READY"] and len(fields) == 3, line
    except BaseException:
        target.stop()
        pytest.fail(f"target did not start: stderr:\n{target.log_text()}")
    target.segment, target.buffer_addr = fields[1], int(fields[2])
    return target


@pytest.fixture(autouse=True)
def no_mc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compat engine reads MC_* variables; the caller's must not leak into tests."""
    for name in list(os.environ):
        if name.startswith("MC_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def metadata_url() -> Iterator[str]:
    """Our HTTP metadata server, in this process."""
    with MetadataServer().serve(LOCAL, 0) as http:
        yield http.url + "/metadata"


@pytest.fixture(scope="module", params=["p2p", "http"])
def remote_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RemoteTarget]:
    """A compat target engine in a subprocess, with a 64 MiB buffer."""
    log_path = tmp_path_factory.mktemp("target") / "stderr.log"
    if request.param == "p2p":
        target = start_target(LOCAL, P2P, log_path)
    else:
        url = request.getfixturevalue("metadata_url")
        target = start_target(f"{LOCAL}:{free_port()}", url, log_path)
    yield target
    rc = target.stop()
    assert rc == 0, f"target exited {rc}:\n{target.log_text()}"


@dataclass
class Initiator:
    engine: TransferEngine
    name: str

    def local_buffer(self) -> int:
        """As the reference test: the segment's first buffer, else a managed one."""
        addr = self.engine.get_first_buffer_address(self.name)
        if addr == 0:
            addr = self.engine.allocate_managed_buffer(LOCAL_BUFFER_BYTES)
            assert addr != 0
        return addr


@pytest.fixture
def initiator(remote_target: RemoteTarget, monkeypatch: pytest.MonkeyPatch) -> Iterator[Initiator]:
    """A compat engine in this process, using the same metadata as ``remote_target``."""
    engine = TransferEngine()
    try:
        if remote_target.mode == "http":
            monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)
            name = f"{LOCAL}:{free_port()}"
            assert engine.initialize(name, remote_target.metadata, "tcp", "") == 0
        else:
            assert engine.initialize(LOCAL, P2P, "tcp", "") == 0
            name = f"{LOCAL}:{engine.get_rpc_port()}"
        yield Initiator(engine, name)
    finally:
        engine.close()


@pytest.fixture
def compat_pair(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[TransferEngine, TransferEngine, str]]:
    """Initiator and target compat engines in this process (P2P); the target's segment name."""
    monkeypatch.setenv("MC_TRANSFER_TIMEOUT", "5")
    monkeypatch.setenv("MC_HANDSHAKE_CONNECT_TIMEOUT", "2")
    initiator, target = TransferEngine(), TransferEngine()
    try:
        assert initiator.initialize(LOCAL, P2P, "tcp", "") == 0
        assert target.initialize(LOCAL, P2P, "tcp", "") == 0
        yield initiator, target, f"{LOCAL}:{target.get_rpc_port()}"
    finally:
        initiator.close()
        target.close()


# ----------------------------------------------------------------------------------------
# the reference's black-box test, against a target process
# ----------------------------------------------------------------------------------------


def test_random_write_read_round_trips(remote_target: RemoteTarget, initiator: Initiator) -> None:
    adaptor = initiator.engine
    rng = random.Random(1)
    src = initiator.local_buffer()
    dst = adaptor.get_first_buffer_address(remote_target.segment)
    assert dst == remote_target.buffer_addr
    for i in range(200):
        data = random_text(rng, rng.randint(16, 256))
        n = len(data)
        peer = dst + rng.randrange(0, 1 << 20)
        assert adaptor.write_bytes_to_buffer(src, data, n) == 0
        assert adaptor.transfer_sync_write(remote_target.segment, src, peer, n) == 0, i
        assert adaptor.write_bytes_to_buffer(src, bytes(n), n) == 0
        assert adaptor.read_bytes_from_buffer(src, n) == bytes(n)
        assert adaptor.transfer_sync_read(remote_target.segment, src, peer, n) == 0, i
        assert adaptor.read_bytes_from_buffer(src, n) == data, f"iteration {i}"


def _batch_lists(
    src: int, dst: int, rng: random.Random
) -> tuple[list[int], list[int], list[bytes]]:
    stride = 1024
    srcs = [src + i * stride for i in range(100)]
    dsts = [dst + i * stride for i in range(100)]
    return srcs, dsts, [random_text(rng, rng.randint(32, 128)) for _ in range(100)]


def test_batch_sync_write_read(remote_target: RemoteTarget, initiator: Initiator) -> None:
    adaptor = initiator.engine
    rng = random.Random(2)
    dst = adaptor.get_first_buffer_address(remote_target.segment)
    assert dst != 0
    for _ in range(2):
        srcs, dsts, data = _batch_lists(initiator.local_buffer(), dst, rng)
        lengths = [len(d) for d in data]
        for addr, d in zip(srcs, data, strict=True):
            assert adaptor.write_bytes_to_buffer(addr, d, len(d)) == 0
        assert adaptor.batch_transfer_sync_write(remote_target.segment, srcs, dsts, lengths) == 0
        for addr, n in zip(srcs, lengths, strict=True):
            assert adaptor.write_bytes_to_buffer(addr, bytes(n), n) == 0
        assert adaptor.batch_transfer_sync_read(remote_target.segment, srcs, dsts, lengths) == 0
        got = [adaptor.read_bytes_from_buffer(a, n) for a, n in zip(srcs, lengths, strict=True)]
        assert got == data


def test_batch_async_write_read(remote_target: RemoteTarget, initiator: Initiator) -> None:
    adaptor = initiator.engine
    rng = random.Random(3)
    dst = adaptor.get_first_buffer_address(remote_target.segment)
    for _ in range(2):
        srcs, dsts, data = _batch_lists(initiator.local_buffer(), dst, rng)
        lengths = [len(d) for d in data]
        for addr, d in zip(srcs, data, strict=True):
            assert adaptor.write_bytes_to_buffer(addr, d, len(d)) == 0
        batch_id = adaptor.batch_transfer_async_write(remote_target.segment, srcs, dsts, lengths)
        assert batch_id != 0
        assert adaptor.get_batch_transfer_status([batch_id]) == 0
        for addr, n in zip(srcs, lengths, strict=True):
            assert adaptor.write_bytes_to_buffer(addr, bytes(n), n) == 0
        batch_id = adaptor.batch_transfer_async_read(remote_target.segment, srcs, dsts, lengths)
        assert batch_id != 0
        assert adaptor.get_batch_transfer_status([batch_id]) == 0
        got = [adaptor.read_bytes_from_buffer(a, n) for a, n in zip(srcs, lengths, strict=True)]
        assert got == data


def test_async_submit_to_unknown_peer_returns_zero(
    remote_target: RemoteTarget, initiator: Initiator
) -> None:
    adaptor = initiator.engine
    assert adaptor.batch_transfer_async_write(UNKNOWN_PEER, [0], [0], [16]) == 0
    assert adaptor.transfer_submit_write(UNKNOWN_PEER, 0, 0, 16) == 0


def test_send_probe(remote_target: RemoteTarget, initiator: Initiator) -> None:
    assert initiator.engine.send_probe(remote_target.segment) == 0
    assert initiator.engine.send_probe(UNKNOWN_PEER) != 0


def test_first_buffer_address(remote_target: RemoteTarget, initiator: Initiator) -> None:
    adaptor = initiator.engine
    assert adaptor.get_first_buffer_address(remote_target.segment) == remote_target.buffer_addr
    # our own segment has no buffer until one is allocated
    assert adaptor.get_first_buffer_address(initiator.name) == 0
    addr = adaptor.allocate_managed_buffer(1 << 20)
    assert addr != 0
    assert adaptor.get_first_buffer_address(initiator.name) != 0
    assert adaptor.free_managed_buffer(addr, 1 << 20) == 0
    assert adaptor.get_first_buffer_address(UNKNOWN_PEER) == 0


# ----------------------------------------------------------------------------------------
# initialize
# ----------------------------------------------------------------------------------------


def test_initialize_is_positional_only_and_returns_zero() -> None:
    engine = TransferEngine()
    try:
        with pytest.raises(TypeError):
            engine.initialize(  # type: ignore[call-arg]
                local_hostname=LOCAL, metadata_server=P2P, protocol="tcp", device_name=""
            )
        assert engine.initialize(LOCAL, P2P, "tcp", "") == 0
        assert 0 < engine.get_rpc_port() < 65536
    finally:
        engine.close()


def test_initialize_with_unreachable_http_metadata_fails_fast(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # bound but not listening: connections are refused, and no one else can take the port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind((LOCAL, 0))
        url = f"http://{LOCAL}:{closed.getsockname()[1]}/metadata"
        engine = TransferEngine()
        caplog.set_level(logging.INFO)
        try:
            start = time.monotonic()
            assert engine.initialize(LOCAL, url, "tcp", "") == -1
            elapsed = time.monotonic() - start
        finally:
            engine.close()
    assert elapsed < 5.0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(url in m for m in errors), errors


@pytest.mark.parametrize("scheme", ["", "etcd://"])
def test_initialize_with_unreachable_etcd_says_error_from_etcd_client(
    scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind((LOCAL, 0))
        server = f"{scheme}{LOCAL}:{closed.getsockname()[1]}"
        engine = TransferEngine()
        caplog.set_level(logging.INFO)
        try:
            assert engine.initialize(LOCAL, server, "tcp", "") == -1
        finally:
            engine.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("Error from etcd client" in m and server.split("//")[-1] in m for m in errors), (
        errors
    )


def test_legacy_rpc_port_binding_with_port_in_use(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MC_LEGACY_RPC_PORT_BINDING", "1")
    caplog.set_level(logging.INFO)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind((LOCAL, 0))
        busy.listen()
        port = busy.getsockname()[1]
        engine = TransferEngine()
        try:
            assert engine.initialize(f"{LOCAL}:{port}", P2P, "tcp", "") == -1
        finally:
            engine.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("bind address already in use" in m and str(port) in m for m in errors), errors


def test_legacy_rpc_port_binding_uses_the_named_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MC_LEGACY_RPC_PORT_BINDING", "1")
    port = free_port()
    engine = TransferEngine()
    try:
        assert engine.initialize(f"{LOCAL}:{port}", P2P, "tcp", "") == 0
        assert engine.get_rpc_port() == port
    finally:
        engine.close()


def test_initialize_twice_fails() -> None:
    engine = TransferEngine()
    try:
        assert engine.initialize(LOCAL, P2P, "tcp", "") == 0
        port = engine.get_rpc_port()
        assert engine.initialize(LOCAL, P2P, "tcp", "") == -1
        assert engine.get_rpc_port() == port  # the first engine is untouched
    finally:
        engine.close()


def _assert_failure_codes(engine: TransferEngine) -> None:
    nobody = f"{LOCAL}:1"
    assert engine.transfer_sync_write(nobody, 4096, 4096, 8) == -1
    assert engine.batch_transfer_sync_read(nobody, [4096], [4096], [8]) == -1
    assert engine.batch_transfer_async_write(nobody, [4096], [4096], [8]) == 0
    assert engine.transfer_submit_write(nobody, 4096, 4096, 8) == 0
    assert engine.get_batch_transfer_status([1]) == -1
    assert engine.transfer_check_status(1) == -1
    assert engine.allocate_managed_buffer(4096) == 0
    assert engine.register_memory(4096, 4096) != 0
    assert engine.unregister_memory(4096) != 0
    assert engine.get_first_buffer_address(nobody) == 0
    assert engine.get_notifies() == []
    assert engine.send_probe(nobody) != 0


def test_calls_before_initialize_and_after_close_return_failure_codes() -> None:
    engine = TransferEngine()
    _assert_failure_codes(engine)
    try:
        assert engine.initialize(LOCAL, P2P, "tcp", "") == 0
    finally:
        engine.close()
    _assert_failure_codes(engine)


# ----------------------------------------------------------------------------------------
# module attributes
# ----------------------------------------------------------------------------------------


def test_support_flags_are_false() -> None:
    for name in (
        "SUPPORT_CUDA",
        "SUPPORT_EFA",
        "SUPPORT_HIP",
        "SUPPORT_MNNVL",
        "SUPPORT_MUSA",
        "SUPPORT_INTRA_NVLINK",
    ):
        assert getattr(mc, name) is False, name


def test_transfer_opcode_values_and_aliases() -> None:
    values = {op.name: int(op) for op in TransferOpcode}
    assert values == {"Read": 0, "Write": 1}
    assert mc.Read is TransferOpcode.Read
    assert mc.Write is TransferOpcode.Write
    assert TransferEngine.TransferOpcode is TransferOpcode
    assert TransferEngine.TransferOpcode.Write + 1 == 2  # arithmetic, as py::arithmetic enums


def test_transfer_notify_fields() -> None:
    n = TransferNotify("n1", "m1")
    assert (n.name, n.msg) == ("n1", "m1")
    n.msg = "changed"
    assert n.msg == "changed"
    kw = TransferNotify(name="a", msg="b")
    assert (kw.name, kw.msg) == ("a", "b")
    empty = TransferNotify()
    assert (empty.name, empty.msg) == ("", "")


def test_inner_engine_handle() -> None:
    engine = TransferEngine()
    try:
        assert engine.get_engine() is None
        assert engine.initialize(LOCAL, P2P, "tcp", "") == 0
        assert isinstance(engine.get_engine(), mc.InnerTransferEngine)
        assert engine.get_engine_ptr() != 0
    finally:
        engine.close()


# ----------------------------------------------------------------------------------------
# memory registration
# ----------------------------------------------------------------------------------------


def test_register_numpy_array(compat_pair: tuple[TransferEngine, TransferEngine, str]) -> None:
    _, engine, _ = compat_pair
    arr = np.zeros(8192, dtype=np.uint8)
    addr = arr.ctypes.data
    assert engine.register_memory(addr, 4096) == 0
    assert engine.register_memory(addr, 4096) == ERR_ADDRESS_OVERLAPPED
    assert engine.register_memory(addr + 1024, 4096) == ERR_ADDRESS_OVERLAPPED  # tail overlaps
    assert engine.register_memory(addr + 4095, 1) == ERR_ADDRESS_OVERLAPPED  # last byte
    assert engine.register_memory(addr + 4096, 0) != 0  # capacity 0
    assert engine.register_memory(addr + 4096, 4096) == 0  # adjacent is fine
    assert engine.unregister_memory(addr + 100) == ERR_ADDRESS_NOT_REGISTERED
    assert engine.unregister_memory(addr) == 0
    assert engine.unregister_memory(addr) == ERR_ADDRESS_NOT_REGISTERED
    assert engine.register_memory(addr, 4096, "cpu:0") == 0  # again after unregistering
    assert engine.unregister_memory(addr) == 0
    assert engine.unregister_memory(addr + 4096) == 0


def test_register_bytearray(compat_pair: tuple[TransferEngine, TransferEngine, str]) -> None:
    _, engine, _ = compat_pair
    buf = bytearray(4096)
    cbuf = (ctypes.c_char * len(buf)).from_buffer(buf)
    try:
        addr = ctypes.addressof(cbuf)
        assert engine.register_memory(addr, len(buf)) == 0
        assert engine.register_memory(addr, len(buf)) == ERR_ADDRESS_OVERLAPPED
        assert engine.unregister_memory(addr) == 0
    finally:
        del cbuf


def test_batch_register_and_unregister(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, engine, segment = compat_pair
    arr = np.zeros(4 * 4096, dtype=np.uint8)
    addrs = [arr.ctypes.data + i * 4096 for i in range(4)]
    assert engine.batch_register_memory(addrs, [4096] * 4) == 0
    for a in addrs:
        assert engine.register_memory(a, 16) == ERR_ADDRESS_OVERLAPPED
    # every range is reachable by a peer
    src = initiator.allocate_managed_buffer(4096)
    assert initiator.write_bytes_to_buffer(src, b"\x5a" * 64, 64) == 0
    for a in addrs:
        assert initiator.transfer_sync_write(segment, src, a + 100, 64) == 0
    for i in range(4):
        assert bytes(arr[i * 4096 + 100 : i * 4096 + 164]) == b"\x5a" * 64
    assert engine.batch_unregister_memory(addrs) == 0
    for a in addrs:
        assert engine.unregister_memory(a) == ERR_ADDRESS_NOT_REGISTERED
    assert engine.batch_register_memory(addrs, [4096] * 3) != 0  # lists differ in length


def test_peer_writes_into_registered_numpy_array_and_not_outside(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, target, segment = compat_pair
    canary = 0xAB
    arr = np.full(4096, canary, dtype=np.uint8)
    start, length = 1024, 2048
    base = arr.ctypes.data + start
    assert target.register_memory(base, length) == 0
    src = initiator.allocate_managed_buffer(8192)
    assert src != 0
    payload = bytes(range(256)) * (length // 256)
    assert initiator.write_bytes_to_buffer(src, payload, length) == 0

    assert initiator.transfer_sync_write(segment, src, base, length) == 0
    assert bytes(arr[start : start + length]) == payload
    assert initiator.transfer_sync_write(segment, src + 5, base + 300, 7) == 0
    assert bytes(arr[start + 300 : start + 307]) == payload[5:12]

    junk = b"\xee" * 4096
    assert initiator.write_bytes_to_buffer(src, junk, len(junk)) == 0
    # runs past the end, starts before the start, lies wholly outside
    assert initiator.transfer_sync_write(segment, src, base + length - 16, 64) == -1
    assert initiator.transfer_sync_write(segment, src, base - 16, 64) == -1
    assert initiator.transfer_sync_write(segment, src, base + length + 64, 64) == -1
    assert initiator.transfer_sync_read(segment, src, base - 16, 64) == -1
    assert bytes(arr[:start]) == bytes([canary]) * start
    assert bytes(arr[start + length :]) == bytes([canary]) * (4096 - start - length)

    # the engine recovers from the rejected requests
    assert initiator.write_bytes_to_buffer(src, b"ok", 2) == 0
    assert initiator.transfer_sync_write(segment, src, base, 2) == 0
    assert bytes(arr[start : start + 2]) == b"ok"
    assert target.unregister_memory(base) == 0
    # after unregistering, the range is out of reach too
    assert initiator.transfer_sync_write(segment, src, base, 2) == -1


def test_managed_buffers(compat_pair: tuple[TransferEngine, TransferEngine, str]) -> None:
    engine, _, _ = compat_pair
    a = engine.allocate_managed_buffer(1 << 20)
    b = engine.allocate_managed_buffer(4096)
    assert a != 0 and b != 0 and a != b
    assert not (a <= b < a + (1 << 20))
    assert engine.write_bytes_to_buffer(b, b"hello", 5) == 0
    assert engine.read_bytes_from_buffer(b, 5) == b"hello"
    assert engine.write_bytes_to_buffer(b, "text", 4) == 0  # str is accepted, as pybind11 does
    assert engine.read_bytes_from_buffer(b, 4) == b"text"
    assert engine.free_managed_buffer(a, 1 << 20) == 0
    assert engine.free_managed_buffer(b, 4096) == 0


_UNREGISTER_MANAGED = """
import gc
from mooncake.engine import TransferEngine
e = TransferEngine()
assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
a = e.allocate_managed_buffer(1 << 20)
assert a != 0
print("unregister_memory", e.unregister_memory(a), flush=True)
gc.collect()
assert e.write_bytes_to_buffer(a, b"still mapped", 12) == 0
assert e.read_bytes_from_buffer(a, 12) == b"still mapped"
e.close()
print("ok", flush=True)
"""


def test_unregistering_a_managed_buffer_keeps_it_mapped() -> None:
    # in a subprocess: the failure mode is a segmentation fault
    proc = subprocess.run(
        [sys.executable, "-c", _UNREGISTER_MANAGED],
        capture_output=True,
        timeout=30,
        env=clean_env(),
        check=False,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert proc.stdout.endswith(b"ok\n")


# ----------------------------------------------------------------------------------------
# notifications
# ----------------------------------------------------------------------------------------


def _drain_notifies(get: Callable[[], list[T]], want: int, timeout_s: float = 5.0) -> list[T]:
    """Collect ``get()`` results until ``want`` arrived or ``timeout_s`` passed."""
    got: list[T] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got.extend(get())
        if len(got) < want:
            time.sleep(0.01)
    return got


def test_transfer_sync_with_notify(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, target, segment = compat_pair
    dst = target.allocate_managed_buffer(4096)
    src = initiator.allocate_managed_buffer(4096)
    assert initiator.write_bytes_to_buffer(src, b"payload", 7) == 0
    assert (
        initiator.transfer_sync(
            segment, src, dst, 7, TransferOpcode.Write, TransferNotify("n1", "m1")
        )
        == 0
    )
    assert target.read_bytes_from_buffer(dst, 7) == b"payload"
    got = _drain_notifies(target.get_notifies, 1)
    assert len(got) == 1
    assert isinstance(got[0], TransferNotify)
    assert (got[0].name, got[0].msg) == ("n1", "m1")
    assert target.get_notifies() == []  # drained
    # no notify argument: nothing arrives
    assert initiator.transfer_sync(segment, src, dst, 7, TransferOpcode.Read) == 0
    time.sleep(0.05)
    assert target.get_notifies() == []


def test_batch_transfer_sync_with_notify(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, target, segment = compat_pair
    dst = target.allocate_managed_buffer(1 << 16)
    src = initiator.allocate_managed_buffer(1 << 16)
    data = bytes(random.Random(4).randbytes(1 << 16))
    assert initiator.write_bytes_to_buffer(src, data, len(data)) == 0
    offsets = [i * 4096 for i in range(16)]
    rc = initiator.batch_transfer_sync(
        segment,
        [src + o for o in offsets],
        [dst + o for o in offsets],
        [4096] * 16,
        TransferOpcode.Write,
        TransferNotify("batch", "done"),
    )
    assert rc == 0
    assert target.read_bytes_from_buffer(dst, len(data)) == data
    got = _drain_notifies(target.get_notifies, 1)
    assert [(n.name, n.msg) for n in got] == [("batch", "done")]


def test_notify_to_a_native_target(config: EngineConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compat initiator and a native pymooncake target."""
    monkeypatch.setenv("MC_TRANSFER_TIMEOUT", "5")
    initiator = TransferEngine()
    try:
        assert initiator.initialize(LOCAL, P2P, "tcp", "") == 0
        with NativeEngine(LOCAL, P2P, config=config) as target:
            region = target.allocate(4096)
            src = initiator.allocate_managed_buffer(4096)
            assert initiator.write_bytes_to_buffer(src, b"native", 6) == 0
            rc = initiator.transfer_sync(
                target.segment_name,
                src,
                region.addr,
                6,
                mc.Write,
                TransferNotify("to-native", "hello"),
            )
            assert rc == 0
            assert bytes(region.view[:6]) == b"native"
            got = _drain_notifies(target.get_notifies, 1)
            assert [(n.name, n.notify_msg) for n in got] == [("to-native", "hello")]
            assert initiator.send_probe(target.segment_name) == 0
    finally:
        initiator.close()


# ----------------------------------------------------------------------------------------
# asynchronous batches
# ----------------------------------------------------------------------------------------


def _check_until_done(engine: TransferEngine, batch_id: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    rc = engine.transfer_check_status(batch_id)
    while rc == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
        rc = engine.transfer_check_status(batch_id)
    return rc


def test_async_batch_and_transfer_check_status(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, target, segment = compat_pair
    dst = target.allocate_managed_buffer(1 << 16)
    src = initiator.allocate_managed_buffer(1 << 16)
    data = random.Random(5).randbytes(1 << 16)
    assert initiator.write_bytes_to_buffer(src, data, len(data)) == 0
    offsets = [i * 1024 for i in range(64)]
    batch_id = initiator.batch_transfer_async_write(
        segment, [src + o for o in offsets], [dst + o for o in offsets], [1024] * 64
    )
    assert batch_id != 0
    assert _check_until_done(initiator, batch_id) == 1
    assert target.read_bytes_from_buffer(dst, len(data)) == data
    assert initiator.transfer_check_status(batch_id) == -1  # freed by the first check

    # the generic form, reading back
    assert initiator.write_bytes_to_buffer(src, bytes(len(data)), len(data)) == 0
    batch_id = initiator.batch_transfer_async(
        segment, [src], [dst], [len(data)], TransferOpcode.Read
    )
    assert batch_id != 0
    assert _check_until_done(initiator, batch_id) == 1
    assert initiator.read_bytes_from_buffer(src, len(data)) == data


def test_transfer_submit_write_and_check_status(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, target, segment = compat_pair
    dst = target.allocate_managed_buffer(4096)
    src = initiator.allocate_managed_buffer(4096)
    assert initiator.write_bytes_to_buffer(src, b"submitted", 9) == 0
    batch_id = initiator.transfer_submit_write(segment, src, dst, 9)
    assert batch_id != 0
    assert _check_until_done(initiator, batch_id) == 1
    assert target.read_bytes_from_buffer(dst, 9) == b"submitted"
    assert initiator.transfer_check_status(batch_id) == -1


def test_failed_async_batch_checks_minus_one(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, target, segment = compat_pair
    dst = target.allocate_managed_buffer(4096)
    src = initiator.allocate_managed_buffer(4096)
    batch_id = initiator.transfer_submit_write(segment, src, dst + 4096, 64)  # outside
    assert batch_id != 0
    assert _check_until_done(initiator, batch_id) == -1
    assert initiator.transfer_check_status(batch_id) == -1


def test_get_batch_transfer_status_on_several_batches(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, target, segment = compat_pair
    dst = target.allocate_managed_buffer(1 << 16)
    src = initiator.allocate_managed_buffer(1 << 16)
    data = random.Random(6).randbytes(1 << 16)
    assert initiator.write_bytes_to_buffer(src, data, len(data)) == 0
    ids = []
    for k in range(4):
        part = k * (1 << 14)
        offs = [part + i * 1024 for i in range(16)]
        ids.append(
            initiator.batch_transfer_async_write(
                segment, [src + o for o in offs], [dst + o for o in offs], [1024] * 16
            )
        )
    assert 0 not in ids and len(set(ids)) == 4
    assert initiator.get_batch_transfer_status(ids) == 0
    assert target.read_bytes_from_buffer(dst, len(data)) == data
    for batch_id in ids:
        assert initiator.transfer_check_status(batch_id) == -1  # all freed

    good = initiator.transfer_submit_write(segment, src, dst, 64)
    bad = initiator.transfer_submit_write(segment, src, dst + (1 << 16), 64)
    assert good != 0 and bad != 0
    assert initiator.get_batch_transfer_status([good, bad]) == -1
    assert initiator.transfer_check_status(good) == -1
    assert initiator.transfer_check_status(bad) == -1
    assert initiator.get_batch_transfer_status([123456789]) == -1  # unknown id


def test_transfer_check_status_on_a_partly_done_batch_returns_an_int(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, target, segment = compat_pair
    big = 64 << 20
    dst = target.allocate_managed_buffer(big)
    src = initiator.allocate_managed_buffer(big)
    # task 0 (empty) completes at once; task 1 (64 MiB) keeps the batch busy for a while
    batch_id = initiator.batch_transfer_async_write(segment, [src, src], [dst, dst], [0, big])
    assert batch_id != 0
    rc = _check_until_done(initiator, batch_id, timeout_s=20)
    assert rc == 1


# ----------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------


def test_zero_length_transfers(compat_pair: tuple[TransferEngine, TransferEngine, str]) -> None:
    initiator, target, segment = compat_pair
    dst = target.allocate_managed_buffer(4096)
    src = initiator.allocate_managed_buffer(4096)
    assert initiator.transfer_sync_write(segment, src, dst, 0) == 0
    assert initiator.transfer_sync_read(segment, src, dst, 0) == 0
    assert initiator.batch_transfer_sync_write(segment, [src], [dst], [0]) == 0
    batch_id = initiator.batch_transfer_async_write(segment, [src], [dst], [0])
    assert batch_id != 0
    assert initiator.get_batch_transfer_status([batch_id]) == 0


def test_batch_lists_of_different_lengths(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, target, segment = compat_pair
    dst = target.allocate_managed_buffer(4096)
    src = initiator.allocate_managed_buffer(4096)
    assert initiator.batch_transfer_sync_write(segment, [src, src], [dst], [8, 8]) == -1
    assert initiator.batch_transfer_sync_read(segment, [src], [dst], [8, 8]) == -1
    assert initiator.batch_transfer_async_write(segment, [src], [dst, dst], [8]) == 0
    assert initiator.batch_transfer_async_read(segment, [src], [dst], []) == 0


def test_transfer_to_unknown_segment_fails_fast(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, _, _ = compat_pair
    src = initiator.allocate_managed_buffer(4096)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind((LOCAL, 0))  # bound, not listening: refused
        nobody = f"{LOCAL}:{closed.getsockname()[1]}"
        start = time.monotonic()
        assert initiator.transfer_sync_write(nobody, src, 4096, 16) == -1
        assert initiator.transfer_sync_read(UNKNOWN_PEER, src, 4096, 16) == -1
        assert initiator.batch_transfer_sync_write(nobody, [src], [4096], [16]) == -1
        assert initiator.send_probe(nobody) != 0
        assert time.monotonic() - start < 5.0


def test_local_topology_is_a_cpu_priority_matrix() -> None:
    engine = TransferEngine()
    try:
        topo = json.loads(engine.get_local_topology())  # works before initialize too
        assert "cpu:0" in topo
        assert all(k.startswith("cpu:") and v == [[], []] for k, v in topo.items())
        assert engine.initialize(LOCAL, P2P, "tcp", "") == 0
        assert json.loads(engine.get_local_topology()) == topo
    finally:
        engine.close()


def test_many_threads_on_one_engine(
    compat_pair: tuple[TransferEngine, TransferEngine, str],
) -> None:
    initiator, target, segment = compat_pair
    threads_n, rounds, region = 4, 50, 1 << 14
    dst = target.allocate_managed_buffer(threads_n * region)
    src = initiator.allocate_managed_buffer(threads_n * region)
    failures: list[str] = []

    def worker(tid: int) -> None:
        rng = random.Random(100 + tid)
        mine_src, mine_dst = src + tid * region, dst + tid * region
        try:
            for i in range(rounds):
                n = rng.randint(1, region)
                data = rng.randbytes(n)
                if initiator.write_bytes_to_buffer(mine_src, data, n) != 0:
                    failures.append(f"{tid}/{i}: write_bytes_to_buffer")
                    return
                if initiator.transfer_sync_write(segment, mine_src, mine_dst, n) != 0:
                    failures.append(f"{tid}/{i}: transfer_sync_write")
                    return
                initiator.write_bytes_to_buffer(mine_src, bytes(n), n)
                if initiator.transfer_sync_read(segment, mine_src, mine_dst, n) != 0:
                    failures.append(f"{tid}/{i}: transfer_sync_read")
                    return
                if initiator.read_bytes_from_buffer(mine_src, n) != data:
                    failures.append(f"{tid}/{i}: data mismatch")
                    return
        except Exception as exc:  # reported below, not lost in the thread
            failures.append(f"{tid}: {exc!r}")

    workers = [threading.Thread(target=worker, args=(t,), name=f"compat-{t}") for t in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers), "workers hung"
    assert failures == []


def test_killed_target_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MC_TRANSFER_TIMEOUT", "5")
    monkeypatch.setenv("MC_HANDSHAKE_CONNECT_TIMEOUT", "2")
    target = start_target(LOCAL, P2P, tmp_path / "target.log")
    initiator = TransferEngine()
    try:
        assert initiator.initialize(LOCAL, P2P, "tcp", "") == 0
        src = initiator.allocate_managed_buffer(4096)
        assert initiator.write_bytes_to_buffer(src, b"alive", 5) == 0
        assert initiator.transfer_sync_write(target.segment, src, target.buffer_addr, 5) == 0
        assert initiator.send_probe(target.segment) == 0

        target.proc.send_signal(signal.SIGKILL)
        target.proc.wait(timeout=10)

        start = time.monotonic()
        assert initiator.transfer_sync_write(target.segment, src, target.buffer_addr, 5) == -1
        assert initiator.transfer_sync_read(target.segment, src, target.buffer_addr, 5) == -1
        assert initiator.send_probe(target.segment) != 0
        assert time.monotonic() - start < 10.0
    finally:
        initiator.close()
        assert target.stop() == -signal.SIGKILL
