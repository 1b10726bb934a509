"""Data moves between pymooncake and the reference engine, in both directions.

Every test runs in each :data:`MODES` entry: P2P handshake or an HTTP metadata
server (ours or the reference's), TCP protocol v2 or v1 (forced on the
reference with MC_TCP_PROTO=1, or on our side with ``tcp_force_v1``, whose
descriptor then makes the reference initiator speak v1 too).  Data is random
and checked byte for byte, including the bytes around each destination.
"""

from __future__ import annotations

import random

import pytest
from interop_support import (
    KiB,
    MiB,
    Mode,
    Pair,
    assert_same,
    expect_our_bytes,
    expect_ref_bytes,
)

from pymooncake import TaskState, TransferRequest

pytestmark = pytest.mark.interop

MODES = [
    Mode("p2p"),
    Mode("p2p", ref_v1=True),
    Mode("p2p", ours_v1=True),
    Mode("http-ours"),
    Mode("http-ref"),
    Mode("http-ours", ref_v1=True, ours_v1=True),
]
SIZES = [1, 4 * KiB, MiB + 17, 16 * MiB]
BATCH = 100


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    return random.Random(request.node.nodeid)


def _offset(size: int) -> int:
    """Destination offsets are unaligned, except for the largest transfer."""
    return 0 if size >= 16 * MiB else 4099


def _span(size: int) -> tuple[int, int]:
    """The region checked around a destination: 64 bytes either side."""
    off = _offset(size)
    lo = max(0, off - 64)
    return lo, off + size + 64 - lo


# --- pymooncake initiator -> reference target ---------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_ours_write_to_ref(pair: Pair, rng: random.Random, size: int) -> None:
    data = rng.randbytes(size)
    lo, n = _span(size)
    before = rng.randbytes(n)
    pair.ref.write_bytes(pair.ref_target + lo, before)
    pair.our_local.view[:size] = data
    pair.ours.write(pair.ref_seg, pair.our_local.addr, pair.ref_target + _offset(size), size)
    off = _offset(size) - lo
    expected = before[:off] + data + before[off + size :]
    expect_ref_bytes(pair, pair.ref_target + lo, expected, "reference target")


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_ours_read_from_ref(pair: Pair, rng: random.Random, size: int) -> None:
    data = rng.randbytes(size)
    pair.ref.write_bytes(pair.ref_target + _offset(size), data)
    guard = rng.randbytes(64)
    pair.our_local.view[size : size + 64] = guard
    pair.ours.read(pair.ref_seg, pair.our_local.addr, pair.ref_target + _offset(size), size)
    assert_same(pair.our_local.view[:size], data, "our local buffer")
    assert_same(pair.our_local.view[size : size + 64], guard, "bytes after our local buffer")


def test_ours_python_buffers(pair: Pair, rng: random.Random) -> None:
    """bytes as the source of a WRITE, a bytearray as the sink of a READ."""
    data = rng.randbytes(100 * KiB + 3)
    pair.ours.write(pair.ref_seg, data, pair.ref_target + 1)
    expect_ref_bytes(pair, pair.ref_target + 1, data, "reference target")
    sink = bytearray(len(data))
    pair.ours.read(pair.ref_seg, sink, pair.ref_target + 1)
    assert_same(sink, data, "bytearray read back")


def _layout(rng: random.Random, count: int) -> tuple[list[int], list[int], list[int], int]:
    """Lengths, remote offsets and (reversed-order) local offsets of a batch,
    with small gaps in between; returns them and the span they cover."""
    lengths = [1, *(rng.randint(1, 20 * KiB) for _ in range(count - 1))]
    remote, pos = [], 0
    for n in lengths:
        pos += rng.randint(0, 64)
        remote.append(pos)
        pos += n
    span = pos + 64
    local, pos = [0] * count, 0
    for i in reversed(range(count)):
        pos += rng.randint(0, 64)
        local[i] = pos
        pos += lengths[i]
    return lengths, remote, local, max(span, pos + 64)


def _apply(before: bytes, offsets: list[int], pieces: list[bytes]) -> bytes:
    out = bytearray(before)
    for off, piece in zip(offsets, pieces, strict=True):
        out[off : off + len(piece)] = piece
    return bytes(out)


@pytest.mark.parametrize("how", ["sync", "async"])
def test_ours_batch_write_to_ref(pair: Pair, rng: random.Random, how: str) -> None:
    lengths, remote, local, span = _layout(rng, BATCH)
    pieces = [rng.randbytes(n) for n in lengths]
    before = rng.randbytes(span)
    pair.ref.write_bytes(pair.ref_target, before)
    for off, piece in zip(local, pieces, strict=True):
        pair.our_local.view[off : off + len(piece)] = piece
    requests = [
        TransferRequest.write(pair.our_local.addr + lo, pair.ref_target + ro, n)
        for lo, ro, n in zip(local, remote, lengths, strict=True)
    ]
    _run_ours(pair, requests, how)
    expect_ref_bytes(pair, pair.ref_target, _apply(before, remote, pieces), "reference")


@pytest.mark.parametrize("how", ["sync", "async"])
def test_ours_batch_read_from_ref(pair: Pair, rng: random.Random, how: str) -> None:
    lengths, remote, local, span = _layout(rng, BATCH)
    source = rng.randbytes(span)
    pair.ref.write_bytes(pair.ref_target, source)
    before = rng.randbytes(span)
    pair.our_local.view[:span] = before
    requests = [
        TransferRequest.read(pair.our_local.addr + lo, pair.ref_target + ro, n)
        for lo, ro, n in zip(local, remote, lengths, strict=True)
    ]
    _run_ours(pair, requests, how)
    pieces = [source[ro : ro + n] for ro, n in zip(remote, lengths, strict=True)]
    assert_same(pair.our_local.view[:span], _apply(before, local, pieces), "our local buffer")


def test_ours_mixed_batch(pair: Pair, rng: random.Random) -> None:
    """READs and WRITEs in one batch, on disjoint remote ranges."""
    src = rng.randbytes(BATCH * KiB)
    pair.ref.write_bytes(pair.ref_target, src)
    pair.our_local.view[: len(src)] = bytes(len(src))
    mine = rng.randbytes(BATCH * KiB)
    pair.our_local.view[MiB : MiB + len(mine)] = mine
    requests = []
    for i in range(BATCH):
        if i % 2:
            requests.append(
                TransferRequest.read(pair.our_local.addr + i * KiB, pair.ref_target + i * KiB, KiB)
            )
        else:
            requests.append(
                TransferRequest.write(
                    pair.our_local.addr + MiB + i * KiB, pair.ref_target + i * KiB, KiB
                )
            )
    pair.ours.transfer(pair.ref_seg, requests)
    expected = b"".join(
        src[i * KiB : (i + 1) * KiB] if i % 2 else mine[i * KiB : (i + 1) * KiB]
        for i in range(BATCH)
    )
    expect_ref_bytes(pair, pair.ref_target, expected, "reference target")
    remote = pair.ref.read_bytes(pair.ref_target, len(src))
    for i in range(BATCH):
        chunk = slice(i * KiB, (i + 1) * KiB)
        if i % 2:
            assert_same(pair.our_local.view[chunk], src[chunk], f"read {i}")
            assert_same(remote[chunk], src[chunk], f"untouched remote {i}")
        else:
            assert_same(remote[chunk], mine[chunk], f"written {i}")


def _run_ours(pair: Pair, requests: list[TransferRequest], how: str) -> None:
    if how == "sync":
        pair.ours.transfer(pair.ref_seg, requests)
        return
    batch_id = pair.ours.allocate_batch(len(requests))
    try:
        pair.ours.submit(batch_id, requests, segment=pair.ref_seg)
        assert pair.ours.wait_batch(batch_id, timeout_s=30), "async batch did not finish"
        status = pair.ours.batch_status(batch_id)
        errors = [e for e in pair.ours.batch(batch_id).errors() if e is not None]
        assert status.state == TaskState.COMPLETED, errors[:3]
        assert status.transferred_bytes == sum(r.length or 0 for r in requests)
    finally:
        pair.ours.free_batch(batch_id)


# --- reference initiator -> pymooncake target ------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_ref_write_to_ours(pair: Pair, rng: random.Random, size: int) -> None:
    data = rng.randbytes(size)
    lo, n = _span(size)
    before = rng.randbytes(n)
    pair.our_target.view[lo : lo + n] = before
    pair.ref.write_bytes(pair.ref_local, data)
    rc = pair.ref.call(
        "transfer_sync_write",
        segment=pair.our_seg,
        local=pair.ref_local,
        remote=pair.our_target.addr + _offset(size),
        length=size,
    )
    assert rc == 0
    off = _offset(size) - lo
    expected = before[:off] + data + before[off + size :]
    expect_our_bytes(pair, pair.our_target.view[lo : lo + n], expected, "our target")


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_ref_read_from_ours(pair: Pair, rng: random.Random, size: int) -> None:
    data = rng.randbytes(size)
    pair.our_target.view[_offset(size) : _offset(size) + size] = data
    guard = rng.randbytes(64)
    pair.ref.write_bytes(pair.ref_local + size, guard)
    rc = pair.ref.call(
        "transfer_sync_read",
        segment=pair.our_seg,
        local=pair.ref_local,
        remote=pair.our_target.addr + _offset(size),
        length=size,
    )
    assert rc == 0
    assert_same(pair.ref.read_bytes(pair.ref_local, size + 64), data + guard, "reference local")


def _ref_batch(
    pair: Pair, opcode: str, how: str, locals_: list[int], remotes: list[int], lengths: list[int]
) -> None:
    args = {"segment": pair.our_seg, "locals": locals_, "remotes": remotes, "lengths": lengths}
    if how == "sync":
        assert pair.ref.call(f"batch_transfer_sync_{opcode}", **args) == 0
        return
    batch_id = pair.ref.call(f"batch_transfer_async_{opcode}", **args)
    assert batch_id != 0, "batch_transfer_async failed to submit"
    assert pair.ref.call("get_batch_transfer_status", batch_ids=[batch_id]) == 0


@pytest.mark.parametrize("how", ["sync", "async"])
def test_ref_batch_write_to_ours(pair: Pair, rng: random.Random, how: str) -> None:
    lengths, remote, local, span = _layout(rng, BATCH)
    pieces = [rng.randbytes(n) for n in lengths]
    staging = bytearray(span)
    for off, piece in zip(local, pieces, strict=True):
        staging[off : off + len(piece)] = piece
    pair.ref.write_bytes(pair.ref_local, bytes(staging))
    before = rng.randbytes(span)
    pair.our_target.view[:span] = before
    _ref_batch(
        pair,
        "write",
        how,
        [pair.ref_local + o for o in local],
        [pair.our_target.addr + o for o in remote],
        lengths,
    )
    expect_our_bytes(
        pair, pair.our_target.view[:span], _apply(before, remote, pieces), "our target"
    )


@pytest.mark.parametrize("how", ["sync", "async"])
def test_ref_batch_read_from_ours(pair: Pair, rng: random.Random, how: str) -> None:
    lengths, remote, local, span = _layout(rng, BATCH)
    source = rng.randbytes(span)
    pair.our_target.view[:span] = source
    before = rng.randbytes(span)
    pair.ref.write_bytes(pair.ref_local, before)
    _ref_batch(
        pair,
        "read",
        how,
        [pair.ref_local + o for o in local],
        [pair.our_target.addr + o for o in remote],
        lengths,
    )
    pieces = [source[ro : ro + n] for ro, n in zip(remote, lengths, strict=True)]
    assert_same(
        pair.ref.read_bytes(pair.ref_local, span), _apply(before, local, pieces), "ref local"
    )


def test_both_directions_at_once(pair: Pair, rng: random.Random) -> None:
    """The reference reads our target while we write its target, concurrently."""
    ours_data = rng.randbytes(4 * MiB)
    theirs = rng.randbytes(4 * MiB)
    pair.our_target.view[: len(theirs)] = theirs
    pair.our_local.view[: len(ours_data)] = ours_data
    future = pair.ours.submit_transfer(
        pair.ref_seg,
        [TransferRequest.write(pair.our_local.addr, pair.ref_target, len(ours_data))],
    )
    rc = pair.ref.call(
        "transfer_sync_read",
        segment=pair.our_seg,
        local=pair.ref_local,
        remote=pair.our_target.addr,
        length=len(theirs),
    )
    future.result(timeout=30)
    assert rc == 0
    assert_same(pair.ref.read_bytes(pair.ref_local, len(theirs)), theirs, "reference local")
    expect_ref_bytes(pair, pair.ref_target, ours_data, "reference target")
