"""The master's ``get`` / ``is_exist`` requests read without the JSON decoder.

``MasterFrameDecoder.whole_key_read`` finds a whole ``ExistKey`` /
``GetReplicaList`` frame as the clients encode it; ``_RpcProtocol._key_read``
serves it through the same ``dispatch`` as every other request when its reply
waits for nothing, else through the general path.  These tests hold the two
paths to the same answers, counters and leases, on a real master over a real
socket, and check the fallbacks (a master that does not lead, a standby link).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from master_support import RawConn

from pymooncake.errors import ObjectHasLease
from pymooncake.store import MasterConfig, StoreClient
from pymooncake.store.master import _service
from pymooncake.testing import LocalCluster
from pymooncake.wire import _master_msgs as msg
from pymooncake.wire import encode_reply, encode_request
from pymooncake.wire._master import _KEY_READ_FIRST, _KEY_READ_METHODS, KEY_READ_TYPES

MiB = 1 << 20
OBJECT_NOT_FOUND = -704
UNAVAILABLE_IN_CURRENT_STATUS = -1010


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(MasterConfig(client_ttl_s=30.0, default_kv_lease_ttl_ms=400)) as c:
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> StoreClient:
    return cluster.client(16 * MiB, 1 * MiB, prefault=False)


@pytest.fixture
def key_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys served by ``_key_read`` (the master runs in this process)."""
    seen: list[str] = []
    original = _service._RpcProtocol._key_read

    def spy(self: Any, req_id: int, method: msg.MasterMethod, key: str) -> None:
        seen.append(key)
        original(self, req_id, method, key)

    monkeypatch.setattr(_service._RpcProtocol, "_key_read", spy)
    return seen


def _connect(cluster: LocalCluster) -> RawConn:
    """A connection past its first read (which the master checks for a cluster
    token's handshake, before any request is decoded)."""
    conn = RawConn(cluster.master_address)
    assert conn.request("ServiceReady", {})[0] == 0
    return conn


def _fast(conn: RawConn, request: msg.Request) -> tuple[int, Any]:
    """``request`` as a client encodes it (the key read takes it)."""
    conn._ids += 1
    conn.send(encode_request(conn._ids, request))
    req_id, code, value = conn.reply()
    assert req_id == conn._ids
    return code, value


def _general(conn: RawConn, request: msg.Request) -> tuple[int, Any]:
    """The same request with whitespace in its JSON (the general path takes it)."""
    return conn.request(request.NAME, request.params())


def test_every_key_read_type_is_its_method_s_request() -> None:
    assert set(_KEY_READ_METHODS.values()) == set(KEY_READ_TYPES)
    assert {name[0] for name in _KEY_READ_METHODS} == _KEY_READ_FIRST
    for method, cls in KEY_READ_TYPES.items():
        assert cls("k").METHOD is method


def test_key_reads_answer_count_and_lease_as_the_general_path(
    cluster: LocalCluster, client: StoreClient, key_reads: list[str]
) -> None:
    assert client.put("here", b"v" * 1000) is True
    counts_before = dict(cluster.master.call(lambda st: dict(st.metrics.requests)))
    with _connect(cluster) as conn:
        for key in ("here", "absent"):
            for request in (msg.ExistKey(key), msg.GetReplicaList(key)):
                assert _fast(conn, request) == _general(conn, request), request
        assert _fast(conn, msg.ExistKey("here")) == (0, True)
        assert _fast(conn, msg.ExistKey("absent")) == (0, False)
        code, value = _fast(conn, msg.GetReplicaList("absent"))
        assert code == OBJECT_NOT_FOUND and "absent" in value
        code, value = _fast(conn, msg.GetReplicaList("here"))
        assert code == 0 and value["size"] == 1000 and len(value["replicas"]) == 1
        # the lease that read took holds the object against removal
        with pytest.raises(ObjectHasLease):
            client.remove("here")
    assert key_reads.count("here") == 4 and key_reads.count("absent") == 4
    counts = cluster.master.call(lambda st: dict(st.metrics.requests))
    assert counts["ExistKey"] - counts_before.get("ExistKey", 0) == 6
    assert counts["GetReplicaList"] - counts_before.get("GetReplicaList", 0) == 6
    deadline = time.monotonic() + 5
    while True:  # removable once the 400 ms lease is over
        try:
            client.remove("here")
            break
        except ObjectHasLease:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with _connect(cluster) as conn:
        assert _fast(conn, msg.ExistKey("here")) == (0, False)


def test_a_master_that_does_not_lead_answers_key_reads_as_every_request(
    cluster: LocalCluster, key_reads: list[str]
) -> None:
    """Not serving (an HA standby, a leader whose lease passed): the key read
    takes the general path, which refuses it naming the role."""
    service = cluster.master.service
    with _connect(cluster) as conn:
        cluster.master.call(lambda st: setattr(service, "_role", "standby"))
        try:
            for request in (msg.ExistKey("k"), msg.GetReplicaList("k")):
                code, value = _fast(conn, request)
                assert (code, value) == _general(conn, request)
                assert code == UNAVAILABLE_IN_CURRENT_STATUS and "role standby" in value
        finally:
            cluster.master.call(lambda st: setattr(service, "_role", "leader"))
        assert _fast(conn, msg.ExistKey("k")) == (0, False)
    assert key_reads == ["k", "k", "k"]


def test_key_reads_beside_a_standby_take_the_general_path() -> None:
    """With a standby attached every reply goes through the HA barrier: the key
    read hands ``_process`` the tuple the decoder would have made (in process: a
    service and one connection, no loop)."""

    async def run() -> list[Any]:
        service = _service.MasterService(metrics_port=None)
        sent: list[bytes] = []

        class Transport:
            def write(self, data: bytes) -> None:
                sent.append(data)

        proto = _service._RpcProtocol(service)
        proto._transport = Transport()  # type: ignore[assignment]
        proto._sniff = False  # (the first read of a connection is checked for a token)
        processed: list[Any] = []
        proto._process = processed.append  # type: ignore[method-assign]
        service.hub.links[proto] = object()  # type: ignore[index, assignment]
        try:
            for request in (msg.ExistKey("k"), msg.GetReplicaList("k")):
                data = encode_request(5, request)
                service._read_buffer[: len(data)] = data
                proto.buffer_updated(len(data))
        finally:
            service.hub.links.clear()
        proto._process = _service._RpcProtocol._process.__get__(proto)  # type: ignore[method-assign]
        data = encode_request(6, msg.ExistKey("k"))
        service._read_buffer[: len(data)] = data
        proto.buffer_updated(len(data))  # no standby: answered at once
        assert sent == [encode_reply(6, 0, False)]
        return processed

    processed = asyncio.run(run())
    assert processed == [
        (5, msg.MasterMethod.EXIST_KEY, {"key": "k"}, False),
        (5, msg.MasterMethod.GET_REPLICA_LIST, {"key": "k"}, False),
    ]
