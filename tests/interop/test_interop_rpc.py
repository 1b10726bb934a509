"""The RPC port across implementations: notifications, probes, segment
descriptors (``get_first_buffer_address``), with P2P handshake and with both
HTTP metadata servers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from interop_support import (
    KiB,
    MetadataServerProc,
    Mode,
    Pair,
    RefPeer,
    expect_our_bytes,
    expect_ref_bytes,
    unique_name,
    wait_for,
)

from pymooncake import NotifyMessage, TransferEngine, TransferRequest
from pymooncake.config import EngineConfig
from pymooncake.errors import MooncakeError
from pymooncake.transfer import address_of

pytestmark = pytest.mark.interop

MODES = [Mode("p2p"), Mode("http-ours"), Mode("http-ref"), Mode("p2p", ours_v1=True)]
#: names and messages that exercise JSON escaping on both sides
MESSAGES = [
    ("n1", "m1"),
    ("kv/done", 'quote " backslash \\ slash / tab \t newline \n'),
    ("ünïcødé 名字", "ünïcødé ✓ 🚀"),
    ("", ""),
    ("big", "x" * 100_000),
]


@pytest.fixture(autouse=True)
def _drain(request: pytest.FixtureRequest) -> None:
    """Each test starts with empty notification queues on both sides."""
    if "pair" in request.fixturenames:
        p: Pair = request.getfixturevalue("pair")
        p.ours.get_notifies()
        p.ref.call("get_notifies")


def _our_notifies(pair: Pair, expected: int) -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []

    def poll() -> bool:
        got.extend((n.name, n.notify_msg) for n in pair.ours.get_notifies())
        return len(got) >= expected

    wait_for(poll)
    return got


# --- notifications ----------------------------------------------------------------


def test_ref_transfer_sync_with_notify_reaches_ours(pair: Pair) -> None:
    data = bytes(range(256)) * 16
    pair.ref.write_bytes(pair.ref_local, data)
    rc = pair.ref.call(
        "transfer_sync",
        segment=pair.our_seg,
        local=pair.ref_local,
        remote=pair.our_target.addr,
        length=len(data),
        opcode="write",
        notify=["kv_ready", "layer-7"],
    )
    assert rc == 0
    assert _our_notifies(pair, 1) == [("kv_ready", "layer-7")]
    # (with v1 the notify may overtake the data: a WRITE is done once sent)
    expect_our_bytes(pair, pair.our_target.view[: len(data)], data, "data written with the notify")


def test_ref_batch_transfer_sync_with_notify_reaches_ours(pair: Pair) -> None:
    pieces = [bytes([i]) * KiB for i in range(10)]
    pair.ref.write_bytes(pair.ref_local, b"".join(pieces))
    rc = pair.ref.call(
        "batch_transfer_sync",
        segment=pair.our_seg,
        locals=[pair.ref_local + i * KiB for i in range(10)],
        remotes=[pair.our_target.addr + (9 - i) * KiB for i in range(10)],
        lengths=[KiB] * 10,
        opcode="write",
        notify=["batch", "10 pieces"],
    )
    assert rc == 0
    assert _our_notifies(pair, 1) == [("batch", "10 pieces")]
    expect_our_bytes(
        pair, pair.our_target.view[: 10 * KiB], b"".join(reversed(pieces)), "our target"
    )


def test_ref_read_with_notify_reaches_ours(pair: Pair) -> None:
    pair.our_target.view[:KiB] = b"\x77" * KiB
    rc = pair.ref.call(
        "transfer_sync",
        segment=pair.our_seg,
        local=pair.ref_local,
        remote=pair.our_target.addr,
        length=KiB,
        opcode="read",
        notify=["read-done", "ok"],
    )
    assert rc == 0
    assert pair.ref.read_bytes(pair.ref_local, KiB) == b"\x77" * KiB
    assert _our_notifies(pair, 1) == [("read-done", "ok")]


@pytest.mark.parametrize("message", MESSAGES, ids=["plain", "escapes", "unicode", "empty", "big"])
def test_notify_messages_both_ways(pair: Pair, message: tuple[str, str]) -> None:
    name, msg = message
    pair.ours.send_notify(pair.ref_seg, NotifyMessage(name, msg))
    assert pair.ref.notifies(1) == [(name, msg)]
    rc = pair.ref.call(
        "transfer_sync",
        segment=pair.our_seg,
        local=pair.ref_local,
        remote=pair.our_target.addr,
        length=1,
        opcode="write",
        notify=[name, msg],
    )
    assert rc == 0
    assert _our_notifies(pair, 1) == [(name, msg)]


def test_many_notifies_keep_order(pair: Pair) -> None:
    for i in range(20):
        pair.ours.send_notify(pair.ref_seg, NotifyMessage("seq", str(i)))
    assert pair.ref.notifies(20) == [("seq", str(i)) for i in range(20)]


def test_our_batch_notify_reaches_ref(pair: Pair) -> None:
    """A batch submitted with ``notify`` sends it once all of it completed."""
    data = b"\x13" * (64 * KiB)
    batch_id = pair.ours.allocate_batch(4)
    try:
        pair.ours.submit(
            batch_id,
            [
                TransferRequest.write(
                    data[i * 16 * KiB : (i + 1) * 16 * KiB], pair.ref_target + i * 16 * KiB
                )
                for i in range(4)
            ],
            segment=pair.ref_seg,
            notify=(pair.ref_seg, NotifyMessage("batch-done", "4")),
        )
        assert pair.ours.wait_batch(batch_id, timeout_s=30)
    finally:
        pair.ours.free_batch(batch_id)
    assert pair.ref.notifies(1) == [("batch-done", "4")]
    expect_ref_bytes(pair, pair.ref_target, data, "reference target")


# --- probes -----------------------------------------------------------------------


def test_probes_both_ways(pair: Pair) -> None:
    assert pair.ref.call("send_probe", segment=pair.our_seg) == 0
    pair.ours.probe(pair.ref_seg)


def test_probe_of_a_stopped_reference_fails(pair: Pair, ref_peers: Callable[..., RefPeer]) -> None:
    peer = ref_peers("probed", pair.mode.ref_env())
    peer.init("127.0.0.1" if pair.mode.p2p else unique_name(), pair.metadata_url)
    pair.ours.probe(peer.segment_name)
    assert peer.call("send_probe", segment=pair.our_seg) == 0
    peer.close()
    pair.ours.sync_segment_cache(peer.segment_name)
    with pytest.raises(MooncakeError):
        pair.ours.probe(peer.segment_name)


# --- segment descriptors ------------------------------------------------------------


def test_first_buffer_address_both_ways(pair: Pair) -> None:
    """Each side registered its target buffer first."""
    assert pair.ref.call("get_first_buffer_address", segment=pair.our_seg) == pair.our_target.addr
    assert pair.ours.first_buffer_address(pair.ref_seg) == pair.ref_target
    # and each agrees with what the owner says about itself
    assert pair.ref.call("get_first_buffer_address", segment=pair.ref_seg) == pair.ref_target
    assert pair.ours.first_buffer_address(pair.our_seg) == pair.our_target.addr


@pytest.fixture(params=["p2p", "http-ours", "http-ref"])
def fresh(
    request: pytest.FixtureRequest,
    ref_peers: Callable[..., RefPeer],
    metadata_servers: Callable[[str], MetadataServerProc],
) -> Iterator[tuple[RefPeer, TransferEngine, Mode]]:
    """A reference peer and our engine with nothing registered yet."""
    mode = Mode(request.param)
    if mode.p2p:
        metadata = "P2PHANDSHAKE"
    else:
        metadata = metadata_servers("ours" if mode.metadata == "http-ours" else "reference").url
    peer = ref_peers("fresh", mode.ref_env())
    peer.init("127.0.0.1" if mode.p2p else unique_name(), metadata)
    ours = TransferEngine(
        "127.0.0.1" if mode.p2p else unique_name(), metadata, config=mode.our_config()
    )
    try:
        yield peer, ours, mode
    finally:
        peer.close()
        ours.close()


def test_first_buffer_is_first_registered_not_lowest(
    fresh: tuple[RefPeer, TransferEngine, Mode],
) -> None:
    """``buffers[0]`` is the first registration, whatever the addresses.

    (The reference caches a peer's descriptor on first lookup, so it is asked
    only once everything is registered; our engine looks up afresh.)
    """
    peer, ours, _ = fresh
    assert ours.first_buffer_address(peer.segment_name) == 0

    memory = bytearray(16 * KiB)
    base, _ = address_of(memory)
    ours.register(base + 8 * KiB, 8 * KiB)  # the higher address first
    ours.register(base, 8 * KiB)

    ref_a = peer.alloc(8 * KiB, register=False)
    ref_b = peer.alloc(8 * KiB, register=False)
    first, second = max(ref_a, ref_b), min(ref_a, ref_b)
    assert peer.call("register", addr=first, length=8 * KiB) == 0
    assert peer.call("register", addr=second, length=8 * KiB) == 0

    assert peer.call("get_first_buffer_address", segment=ours.segment_name) == base + 8 * KiB
    assert ours.first_buffer_address(peer.segment_name) == first
    assert peer.call("get_first_buffer_address", segment=peer.segment_name) == first

    # unregistering the first makes the second one first (fresh lookups on our side)
    assert peer.call("unregister", addr=first) == 0
    assert ours.first_buffer_address(peer.segment_name) == second
    ours.unregister(base + 8 * KiB)
    assert ours.first_buffer_address(ours.segment_name) == base
    ours.unregister(base)


def test_reference_managed_buffer_first_address(
    fresh: tuple[RefPeer, TransferEngine, Mode],
) -> None:
    """The reference's first managed allocation publishes its whole backing
    chunk; our view of its segment agrees with its own, and a write to that
    address lands (the reference's own TE tests do this)."""
    peer, ours, _ = fresh
    addr = peer.call("alloc_managed", size=64 * KiB)
    assert addr != 0
    first = peer.call("get_first_buffer_address", segment=peer.segment_name)
    assert first != 0
    assert ours.first_buffer_address(peer.segment_name) == first
    ours.write(peer.segment_name, b"first!", first)
    assert peer.read_bytes(first, 6) == b"first!"
    ours.write(peer.segment_name, b"alloc!", addr)
    assert peer.read_bytes(addr, 6) == b"alloc!"


@pytest.mark.parametrize("fresh", ["http-ours", "http-ref"], indirect=True)
def test_http_descriptors_as_published(
    fresh: tuple[RefPeer, TransferEngine, Mode],
    metadata_servers: Callable[[str], MetadataServerProc],
) -> None:
    """Both engines publish comparable TCP descriptors on either server."""
    peer, ours, mode = fresh
    server = metadata_servers("ours" if mode.metadata == "http-ours" else "reference")
    region = ours.register(bytearray(4 * KiB))
    peer.alloc(4 * KiB)
    descs = {}
    for who, name in (("ours", ours.segment_name), ("ref", peer.segment_name)):
        status, body = server.get(f"mooncake/ram/{name}")
        assert status == 200, (who, body)
        descs[who] = json.loads(body)
        status, body = server.get(f"mooncake/rpc_meta/{name}")
        assert status == 200, (who, body)
        assert json.loads(body)["ip_or_host_name"] == "127.0.0.1", body
    assert set(descs["ours"]) >= set(descs["ref"]) - {"timestamp"}, descs
    for who, d in descs.items():
        assert d["protocol"] == "tcp", who
        assert d["tcp_data_host"] == "127.0.0.1", who
        assert d["tcp_proto_version"] == 2, who
        assert len(d["buffers"]) == 1, who
    assert descs["ours"]["buffers"][0] == {
        "addr": region.addr,
        "length": 4 * KiB,
        "name": ours.segment_name,
    }


def test_our_v1_descriptor_advertises_v1(
    ref_peers: Callable[..., RefPeer],
    metadata_servers: Callable[[str], MetadataServerProc],
) -> None:
    """``tcp_force_v1`` publishes ``tcp_proto_version: 1`` (what makes a
    reference initiator speak v1 to us)."""
    server = metadata_servers("reference")
    ours = TransferEngine(
        unique_name(),
        server.url,
        config=EngineConfig(tcp_force_v1=True, tcp_bind_address="127.0.0.1"),
    )
    try:
        status, body = server.get(f"mooncake/ram/{ours.segment_name}")
        assert status == 200, body
        assert json.loads(body)["tcp_proto_version"] == 1
    finally:
        ours.close()
