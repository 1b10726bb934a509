"""The drop-in ``mooncake.engine.TransferEngine`` (ours) against the reference's.

Both sides use the same API here -- the reference's names, positional
arguments and integer return codes -- so this is what a user switching one
process to pymooncake sees.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from interop_support import (
    KiB,
    MetadataServerProc,
    MiB,
    RefPeer,
    assert_same,
    unique_name,
    wait_for,
)

from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode

pytestmark = pytest.mark.interop

TARGET = 16 * MiB + 64 * KiB


@dataclass
class CompatPair:
    metadata: str
    ref: RefPeer
    ours: TransferEngine
    our_seg: str
    our_target: int  # our first managed buffer
    our_local: int
    ref_target: int  # the reference's first registered buffer
    ref_local: int

    @property
    def ref_seg(self) -> str:
        return self.ref.segment_name


@pytest.fixture(scope="module", params=["p2p", "http-ours", "http-ref"])
def cp(
    request: pytest.FixtureRequest,
    ref_peers: Callable[..., RefPeer],
    metadata_servers: Callable[[str], MetadataServerProc],
) -> Iterator[CompatPair]:
    p2p = request.param == "p2p"
    if p2p:
        metadata = "P2PHANDSHAKE"
        ref_env: dict[str, str] = {}
    else:
        kind = "ours" if request.param == "http-ours" else "reference"
        metadata = metadata_servers(kind).url
        ref_env = {"MC_TCP_BIND_ADDRESS": "127.0.0.1"}
    ref = ref_peers(f"compat-{request.param}", ref_env)
    ref.init("127.0.0.1" if p2p else unique_name(), metadata)
    ref_target = ref.alloc(TARGET, pad=4 * KiB)
    ref_local = ref.alloc(TARGET, pad=4 * KiB)

    ours = TransferEngine()
    name = "127.0.0.1" if p2p else unique_name()
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MC_TCP_PROTO", "MC_TCP_BIND_ADDRESS", "MC_TRANSFER_TIMEOUT"):
            mp.delenv(var, raising=False)
        mp.setenv("MC_TRANSFER_TIMEOUT", "10")
        if not p2p:
            mp.setenv("MC_TCP_BIND_ADDRESS", "127.0.0.1")
        assert ours.initialize(name, metadata, "tcp", "") == 0
    try:
        our_seg = f"127.0.0.1:{ours.get_rpc_port()}" if p2p else name
        our_target = ours.allocate_managed_buffer(TARGET)
        our_local = ours.allocate_managed_buffer(TARGET)
        assert our_target and our_local
        yield CompatPair(metadata, ref, ours, our_seg, our_target, our_local, ref_target, ref_local)
    finally:
        ours.close()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    return random.Random(request.node.nodeid)


@pytest.fixture(autouse=True)
def _drain(request: pytest.FixtureRequest) -> None:
    if "cp" in request.fixturenames:
        cp: CompatPair = request.getfixturevalue("cp")
        cp.ours.get_notifies()
        cp.ref.call("get_notifies")


SIZES = [1, 4 * KiB, MiB + 17, 16 * MiB]


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_compat_initiator_write_then_read(cp: CompatPair, rng: random.Random, size: int) -> None:
    data = rng.randbytes(size)
    assert cp.ours.write_bytes_to_buffer(cp.our_local, data, size) == 0
    assert cp.ours.transfer_sync_write(cp.ref_seg, cp.our_local, cp.ref_target + 3, size) == 0
    assert_same(cp.ref.read_bytes(cp.ref_target + 3, size), data, "reference target")
    assert cp.ours.write_bytes_to_buffer(cp.our_local, bytes(size), size) == 0
    assert cp.ours.transfer_sync_read(cp.ref_seg, cp.our_local, cp.ref_target + 3, size) == 0
    assert_same(cp.ours.read_bytes_from_buffer(cp.our_local, size), data, "read back")


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_reference_initiator_to_compat(cp: CompatPair, rng: random.Random, size: int) -> None:
    data = rng.randbytes(size)
    cp.ref.write_bytes(cp.ref_local, data)
    args = {"segment": cp.our_seg, "local": cp.ref_local, "remote": cp.our_target + 5}
    assert cp.ref.call("transfer_sync_write", length=size, **args) == 0
    assert_same(cp.ours.read_bytes_from_buffer(cp.our_target + 5, size), data, "our target")
    cp.ref.write_bytes(cp.ref_local, bytes(size))
    assert cp.ref.call("transfer_sync_read", length=size, **args) == 0
    assert_same(cp.ref.read_bytes(cp.ref_local, size), data, "reference local")


def _batch(rng: random.Random) -> tuple[list[int], list[int]]:
    lengths = [rng.randint(1, 8 * KiB) for _ in range(100)]
    offsets, pos = [], 0
    for n in lengths:
        offsets.append(pos)
        pos += n + rng.randint(0, 32)
    return lengths, offsets


@pytest.mark.parametrize("how", ["sync", "async", "generic"])
def test_compat_batches(cp: CompatPair, rng: random.Random, how: str) -> None:
    lengths, offsets = _batch(rng)
    span = offsets[-1] + lengths[-1]
    data = rng.randbytes(span)
    assert cp.ours.write_bytes_to_buffer(cp.our_local, data, span) == 0
    cp.ref.write_bytes(cp.ref_target, bytes(span))
    locals_ = [cp.our_local + o for o in offsets]
    remotes = [cp.ref_target + o for o in offsets]
    if how == "sync":
        rc = cp.ours.batch_transfer_sync_write(cp.ref_seg, locals_, remotes, lengths)
    elif how == "async":
        bid = cp.ours.batch_transfer_async_write(cp.ref_seg, locals_, remotes, lengths)
        assert bid != 0
        rc = cp.ours.get_batch_transfer_status([bid])
    else:
        rc = cp.ours.batch_transfer_sync(
            cp.ref_seg, locals_, remotes, lengths, TransferOpcode.Write
        )
    assert rc == 0
    expected = bytearray(span)
    for o, n in zip(offsets, lengths, strict=True):
        expected[o : o + n] = data[o : o + n]
    assert_same(cp.ref.read_bytes(cp.ref_target, span), bytes(expected), "reference target")

    assert cp.ours.write_bytes_to_buffer(cp.our_local, bytes(span), span) == 0
    if how == "sync":
        rc = cp.ours.batch_transfer_sync_read(cp.ref_seg, locals_, remotes, lengths)
    elif how == "async":
        bid = cp.ours.batch_transfer_async_read(cp.ref_seg, locals_, remotes, lengths)
        assert bid != 0
        rc = cp.ours.get_batch_transfer_status([bid])
    else:
        bid = cp.ours.batch_transfer_async(
            cp.ref_seg, locals_, remotes, lengths, TransferOpcode.Read
        )
        rc = cp.ours.get_batch_transfer_status([bid])
    assert rc == 0
    assert_same(cp.ours.read_bytes_from_buffer(cp.our_local, span), bytes(expected), "read")


def test_compat_submit_and_check_status(cp: CompatPair) -> None:
    data = b"\xab" * (256 * KiB)
    cp.ours.write_bytes_to_buffer(cp.our_local, data, len(data))
    bid = cp.ours.transfer_submit_write(cp.ref_seg, cp.our_local, cp.ref_target, len(data))
    assert bid != 0
    deadline = time.monotonic() + 10
    status = 0
    for _ in range(10_000):
        status = cp.ours.transfer_check_status(bid)
        if status != 0 or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    assert status == 1
    assert cp.ref.read_bytes(cp.ref_target, len(data)) == data


def test_compat_notify_to_reference(cp: CompatPair) -> None:
    cp.ours.write_bytes_to_buffer(cp.our_local, b"payload", 7)
    rc = cp.ours.transfer_sync(
        cp.ref_seg,
        cp.our_local,
        cp.ref_target,
        7,
        TransferOpcode.Write,
        TransferNotify("compat", "one"),
    )
    assert rc == 0
    rc = cp.ours.batch_transfer_sync(
        cp.ref_seg,
        [cp.our_local],
        [cp.ref_target + 64],
        [7],
        TransferOpcode.Write,
        TransferNotify("compat", "two"),
    )
    assert rc == 0
    assert cp.ref.notifies(2) == [("compat", "one"), ("compat", "two")]
    assert cp.ref.read_bytes(cp.ref_target, 7) == b"payload"
    assert cp.ref.read_bytes(cp.ref_target + 64, 7) == b"payload"


def test_reference_notify_to_compat(cp: CompatPair) -> None:
    rc = cp.ref.call(
        "transfer_sync",
        segment=cp.our_seg,
        local=cp.ref_local,
        remote=cp.our_target,
        length=16,
        opcode="write",
        notify=["ref", "hello compat"],
    )
    assert rc == 0
    got: list[TransferNotify] = []

    def poll() -> bool:
        got.extend(cp.ours.get_notifies())
        return bool(got)

    wait_for(poll)
    assert [(n.name, n.msg) for n in got] == [("ref", "hello compat")]
    assert all(isinstance(n, TransferNotify) for n in got)


def test_compat_probes(cp: CompatPair) -> None:
    assert cp.ours.send_probe(cp.ref_seg) == 0
    assert cp.ref.call("send_probe", segment=cp.our_seg) == 0


def test_compat_first_buffer_address(cp: CompatPair) -> None:
    assert cp.ours.get_first_buffer_address(cp.ref_seg) == cp.ref_target
    assert cp.ref.call("get_first_buffer_address", segment=cp.our_seg) == cp.our_target
    assert cp.ours.get_first_buffer_address(cp.our_seg) == cp.our_target


def test_compat_out_of_bounds(cp: CompatPair) -> None:
    end = cp.ref_target + TARGET
    assert cp.ours.transfer_sync_write(cp.ref_seg, cp.our_local, end - 8, 16) == -1
    assert cp.ours.transfer_sync_read(cp.ref_seg, cp.our_local, end - 8, 16) == -1
    bid = cp.ours.batch_transfer_async_write(
        cp.ref_seg, [cp.our_local, cp.our_local], [cp.ref_target, end], [8, 8]
    )
    assert bid != 0
    assert cp.ours.get_batch_transfer_status([bid]) == -1
    assert cp.ref.canaries_intact(cp.ref_target, TARGET, 4 * KiB)
    # still serving both ways
    cp.ours.write_bytes_to_buffer(cp.our_local, b"after", 5)
    assert cp.ours.transfer_sync_write(cp.ref_seg, cp.our_local, cp.ref_target, 5) == 0
    assert cp.ref.read_bytes(cp.ref_target, 5) == b"after"
