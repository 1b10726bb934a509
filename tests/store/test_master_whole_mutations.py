"""A remove and a single put's commit read without the JSON decoder.

``MasterFrameDecoder.whole_mutation`` reads a whole ``Remove`` / ``CommitSlot``
frame as the clients write it; ``_RpcProtocol._process`` serves the request it
made exactly as it serves a decoded frame.  These tests hold the two paths to
the same answers, reply cache and state, on a real master over a real socket
(the wire-level agreement is in ``tests/wire/test_master_frames.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from master_support import RawConn

from pymooncake.store import MasterConfig, StoreClient
from pymooncake.store.master import _service
from pymooncake.testing import LocalCluster
from pymooncake.wire import _master_msgs as msg
from pymooncake.wire import encode_request
from pymooncake.wire._master_msgs import slot_name

MiB = 1 << 20
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
INVALID_PARAMS = -600


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(MasterConfig(client_ttl_s=30.0)) as c:
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> StoreClient:
    return cluster.client(16 * MiB, 1 * MiB, prefault=False)


@pytest.fixture
def read_whole(monkeypatch: pytest.MonkeyPatch) -> list[msg.Request]:
    """The requests ``_process`` got already made by ``whole_mutation`` (the
    master runs in this process)."""
    seen: list[msg.Request] = []
    original = _service._RpcProtocol._process

    def spy(self: Any, first: Any = None) -> None:
        if first is not None and len(first) == 2:
            seen.append(first[1])
        original(self, first)

    monkeypatch.setattr(_service._RpcProtocol, "_process", spy)
    return seen


def _connect(cluster: LocalCluster) -> RawConn:
    conn = RawConn(cluster.master_address)
    assert conn.request("ServiceReady", {})[0] == 0
    return conn


def _fast(conn: RawConn, request: msg.Request, rid: int = 0) -> tuple[int, Any]:
    """``request`` as a client encodes it (``whole_mutation`` reads it)."""
    conn._ids += 1
    conn.send(encode_request(conn._ids, request, rid=rid, ack=rid))
    req_id, code, value = conn.reply()
    assert req_id == conn._ids
    return code, value


def _general(conn: RawConn, request: msg.Request, rid: int = 0) -> tuple[int, Any]:
    """The same request with whitespace in its JSON (the general path reads it)."""
    params = request.params()
    if rid:
        params.update(rid=rid, ack=rid)
    return conn.request(request.NAME, params)


def test_removes_answer_and_are_remembered_as_the_general_path(
    cluster: LocalCluster, client: StoreClient, read_whole: list[msg.Request]
) -> None:
    for key in ("a", "b"):
        assert client.put(key, b"v" * 100) is True
    read_whole.clear()  # (the client's own commits)
    cid = client.client_id
    with _connect(cluster) as conn:
        assert _fast(conn, msg.Remove("a", False, cid), rid=7) == (0, None)
        # retried (same id): the first attempt's answer, from the reply cache
        assert _fast(conn, msg.Remove("a", False, cid), rid=7) == (0, None)
        # a new removal of it: not found, word for word as the general path says
        gone_fast = _fast(conn, msg.Remove("a", False, cid), rid=8)
        gone_general = _general(conn, msg.Remove("a", False, cid), rid=9)
        assert gone_fast == gone_general and gone_fast[0] == OBJECT_NOT_FOUND
        assert "'a'" in gone_fast[1]
        # what the request's checks refuse is refused by the general path
        code, value = _fast(conn, msg.Remove("x" * 5000, False, cid), rid=10)
        assert code == INVALID_PARAMS and "key" in value
        assert _general(conn, msg.Remove("b", True, cid), rid=11) == (0, None)
    assert read_whole == [
        msg.Remove("a", False, cid, 7, 7),
        msg.Remove("a", False, cid, 7, 7),
        msg.Remove("a", False, cid, 8, 8),
    ]
    assert not client.exists("a") and not client.exists("b")
    counts = cluster.master.call(lambda st: dict(st.metrics.requests))
    assert counts["Remove"] >= 6


def test_slot_commits_answer_and_are_remembered_as_the_general_path(
    cluster: LocalCluster, client: StoreClient, read_whole: list[msg.Request]
) -> None:
    cid = client.client_id
    with _connect(cluster) as conn:
        code, value = _fast(conn, msg.ReserveSlots(cid, 4096, 4, "t0"), rid=20)
        assert code == 0, value
        names = [slot_name(cid, "t0", i) for i in range(4)]
        assert _fast(conn, msg.CommitSlot(cid, names[0], "k0"), rid=21) == (0, None)
        assert _fast(conn, msg.CommitSlot(cid, names[0], "k0"), rid=21) == (0, None)  # retried
        assert _general(conn, msg.CommitSlot(cid, names[1], "k1"), rid=22) == (0, None)
        # the key exists: refused alike by both paths (the buffers stay reserved)
        taken_fast = _fast(conn, msg.CommitSlot(cid, names[2], "k1"), rid=23)
        taken_general = _general(conn, msg.CommitSlot(cid, names[3], "k0"), rid=24)
        assert taken_fast[0] == taken_general[0] == OBJECT_ALREADY_EXISTS
        # a buffer that was never reserved
        never = slot_name(cid, "t9", 0)
        missing_fast = _fast(conn, msg.CommitSlot(cid, never, "k2"), rid=25)
        missing_general = _general(conn, msg.CommitSlot(cid, never, "k2"), rid=26)
        assert missing_fast == missing_general and missing_fast[0] != 0
    assert [type(r) for r in read_whole] == [msg.CommitSlot] * 4
    assert read_whole[0] == msg.CommitSlot(cid, names[0], "k0", 21, 21)
    assert client.exists("k0") and client.exists("k1") and not client.exists("k2")


def test_puts_and_removes_of_a_client_take_the_whole_read(
    client: StoreClient, read_whole: list[msg.Request]
) -> None:
    """What this package's own client sends for a single put (into a buffer
    reserved ahead) and a remove is what the decoder reads whole."""
    for i in range(8):
        assert client.put(f"p{i}", bytes([i]) * 4096) is True
    for i in range(8):
        assert client.get(f"p{i}") == bytes([i]) * 4096
        client.remove(f"p{i}", force=True)
    commits = [r for r in read_whole if isinstance(r, msg.CommitSlot)]
    removes = [r for r in read_whole if isinstance(r, msg.Remove)]
    assert {r.key for r in commits} == {f"p{i}" for i in range(8)}
    assert [r.key for r in removes] == [f"p{i}" for i in range(8)]
    assert all(r.client_id == client.client_id and r.rid for r in commits + removes)
