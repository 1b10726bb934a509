"""Lost replies never lose data (issue 7, "silent loss").

A :class:`~pymooncake.testing.MasterProxy` sits between a store client and the
master and, on cue, swallows the master's reply to one method and resets the
connection: the master has acted, the client saw its connection break.  The
client must retry with the same request id and be answered from the master's
reply cache, so that a put reports success only when the value is stored and
readable, a batch stores every key, and an application that retries a put that
raised never gets "already existed" with nothing stored.

Before commit 5ee5100 each of these failed: the retried PutStart was answered
OBJECT_ALREADY_EXISTS (the first attempt was still "being written"), the put
reported success and nothing was ever readable.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pymooncake.errors import MooncakeError, ObjectNotFound
from pymooncake.store import MasterConfig, StoreClient, StoreClientConfig
from pymooncake.testing import LocalCluster, MasterProxy

KiB = 1 << 10
MiB = 1 << 20


def _value(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _client(cluster: LocalCluster, master: str, segment: int = 0, **kw: Any) -> StoreClient:
    """A client of ``cluster`` whose master RPC goes to ``master`` (the proxy)."""
    return StoreClient(
        StoreClientConfig(
            local_hostname="127.0.0.1",
            metadata_server=cluster.metadata_url,
            master_server_addr=master,
            global_segment_size=segment,
            local_buffer_size=4 * MiB,
            engine=cluster.engine_config,
            prefault=False,
            **kw,
        )
    )


@pytest.fixture
def setup() -> Iterator[tuple[LocalCluster, MasterProxy, StoreClient, StoreClient]]:
    """(cluster, proxy, storage node with a direct connection, writer via the proxy)."""
    with LocalCluster(MasterConfig(client_ttl_s=5.0)) as cluster:
        node = cluster.client(32 * MiB, 4 * MiB)
        with MasterProxy(cluster.master_address) as proxy:
            writer = _client(cluster, proxy.address)
            try:
                yield cluster, proxy, node, writer
            finally:
                writer.close()


@pytest.mark.parametrize("method", ["PutStart", "PutEnd", "ReserveSlots", "CommitSlot"])
def test_a_put_whose_reply_is_lost_is_stored_and_readable(
    setup: tuple[LocalCluster, MasterProxy, StoreClient, StoreClient], method: str
) -> None:
    cluster, proxy, node, writer = setup
    if method in ("PutStart", "PutEnd"):  # the ordinary two-phase path
        writer = _client(cluster, proxy.address, put_slot_bytes=0)
    try:
        value = _value(64 * KiB + 3, 1)
        proxy.drop_replies(method)
        assert writer.put("k", value) is True  # stored, not "existed"
        assert proxy.dropped == {method: 1}
        assert writer.get("k") == value
        assert node.get("k") == value  # another client sees it too
    finally:
        if method in ("PutStart", "PutEnd"):
            writer.close()


@pytest.mark.parametrize("method", ["BatchPutStart", "BatchPutEnd", "BatchCommitSlots"])
def test_put_batch_of_8_whose_reply_is_lost_stores_all_8(
    setup: tuple[LocalCluster, MasterProxy, StoreClient, StoreClient], method: str
) -> None:
    cluster, proxy, node, writer = setup
    if method != "BatchCommitSlots":  # the ordinary two-phase path
        writer = _client(cluster, proxy.address, put_slot_bytes=0)
    try:
        keys = [f"batch-{i}" for i in range(8)]
        values = [_value(4 * KiB, i) for i in range(8)]
        proxy.drop_replies(method)
        results = writer.put_many(keys, [[v] for v in values], bytes_api=True)
        assert proxy.dropped == {method: 1}
        assert results == [True] * 8
        assert writer.get_many(keys) == values
        assert node.get_many(keys) == values
        cluster.master.call(lambda st: st.validate())
    finally:
        if method != "BatchCommitSlots":
            writer.close()


@pytest.mark.parametrize("method", ["UpsertStart", "UpsertEnd"])
def test_an_upsert_whose_reply_is_lost_replaces_the_value(
    setup: tuple[LocalCluster, MasterProxy, StoreClient, StoreClient], method: str
) -> None:
    _, proxy, node, writer = setup
    writer.put("u", b"old" * 100)
    proxy.drop_replies(method)
    writer.upsert("u", b"new" * 200)
    assert proxy.dropped == {method: 1}
    assert node.get("u") == b"new" * 200


@pytest.mark.parametrize("method", ["Remove", "BatchRemove"])
def test_a_remove_whose_reply_is_lost_reports_success(
    setup: tuple[LocalCluster, MasterProxy, StoreClient, StoreClient], method: str
) -> None:
    _, proxy, node, writer = setup
    writer.put("r", b"x" * 1000)
    proxy.drop_replies(method)
    if method == "Remove":
        writer.remove("r")  # not OBJECT_NOT_FOUND: the retry gets the first answer
    else:
        assert writer.remove_many(["r"]) == [None]
    assert proxy.dropped == {method: 1}
    assert not node.exists("r")
    with pytest.raises(ObjectNotFound):
        node.get("r")


def test_a_mount_whose_reply_is_lost_mounts_once(
    setup: tuple[LocalCluster, MasterProxy, StoreClient, StoreClient],
) -> None:
    cluster, proxy, _, _ = setup
    proxy.drop_replies("MountSegment")
    second = _client(cluster, proxy.address, segment=16 * MiB)
    try:
        assert proxy.dropped == {"MountSegment": 1}
        summary = cluster.master.call(lambda st: st.summary())
        assert summary["segment_count"] == 2
        assert summary["capacity_bytes"] == 48 * MiB
        cluster.master.call(lambda st: st.validate())
    finally:
        second.close()


def test_an_application_retry_of_a_failed_put_stores_the_value(
    setup: tuple[LocalCluster, MasterProxy, StoreClient, StoreClient],
) -> None:
    cluster, proxy, node, _ = setup
    impatient = _client(cluster, proxy.address, rpc_timeout_s=1.0, put_slot_bytes=0)
    try:
        value = _value(100 * KiB, 7)
        proxy.drop_replies("PutStart", 10_000)  # every reply lost: the put must fail
        with pytest.raises(MooncakeError):
            impatient.put("retry", value)
        assert proxy.dropped["PutStart"] >= 2  # the client retried, same request id
        proxy.heal()
        # The master did start the first put (its replies were lost). The retry must
        # store the value -- never answer "already existed" with nothing readable.
        assert impatient.put("retry", value) is True
        assert impatient.get("retry") == value
        assert node.get("retry") == value
        cluster.master.call(lambda st: st.validate())
    finally:
        impatient.close()


def test_lost_replies_of_every_phase_in_a_row(
    setup: tuple[LocalCluster, MasterProxy, StoreClient, StoreClient],
) -> None:
    """Each phase of 20 puts loses one reply; everything acknowledged is readable
    and nothing is left in flight."""
    cluster, proxy, node, _ = setup
    writer = _client(cluster, proxy.address, put_slot_bytes=0)  # two-phase single puts
    stored = {}
    for i in range(20):
        proxy.drop_replies(("PutStart", "PutEnd", "BatchPutStart", "BatchPutEnd")[i % 4])
        if i % 4 < 2:
            key, value = f"seq-{i}", _value(1000 + i, i)
            assert writer.put(key, value) is True
            stored[key] = value
        else:
            keys = [f"seq-{i}-{j}" for j in range(3)]
            values = [_value(500 + j, i * 10 + j) for j in range(3)]
            assert writer.put_many(keys, [[v] for v in values], bytes_api=True) == [True] * 3
            stored.update(zip(keys, values, strict=True))
    assert sum(proxy.dropped.values()) == 20
    assert node.get_many(list(stored)) == list(stored.values())
    inflight = cluster.master.call(lambda st: len(st.inflight))
    assert inflight == 0
    writer.close()


def test_lost_commits_of_reserved_buffers_in_a_row(
    setup: tuple[LocalCluster, MasterProxy, StoreClient, StoreClient],
) -> None:
    """Single puts through reserved buffers (one round trip each): every commit
    loses its reply; each put is stored exactly once and reports success."""
    cluster, proxy, node, writer = setup
    stored = {}
    for i in range(12):
        proxy.drop_replies("CommitSlot")
        key, value = f"slot-{i}", _value(2000, i)
        assert writer.put(key, value) is True
        stored[key] = value
    assert proxy.dropped == {"CommitSlot": 12}
    assert node.get_many(list(stored)) == list(stored.values())
    cluster.master.call(lambda st: st.validate())


def test_a_reservation_whose_reply_is_lost_is_revoked_and_the_put_still_stored(
    setup: tuple[LocalCluster, MasterProxy, StoreClient, StoreClient],
) -> None:
    """Every ReserveSlots reply lost: the put takes the ordinary path, and the
    buffers the master did reserve (named after the client's batch) are revoked
    by the heartbeat instead of staying reserved for put_start_release_timeout."""
    cluster, proxy, node, _ = setup
    impatient = _client(cluster, proxy.address, rpc_timeout_s=1.0)
    try:
        proxy.drop_replies("ReserveSlots", 10_000)
        value = _value(3000, 9)
        assert impatient.put("via-start", value) is True
        assert proxy.dropped["ReserveSlots"] >= 2  # retried with the same request id
        assert node.get("via-start") == value
        deadline = time.monotonic() + 10.0
        while cluster.master.call(lambda st: len(st.inflight)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cluster.master.call(lambda st: len(st.inflight)) == 0
        cluster.master.call(lambda st: st.validate())
    finally:
        impatient.close()


def test_a_connection_closed_during_the_token_handshake_is_retried() -> None:
    """A master restarting or a proxy resetting connections can end a connection
    in the middle of the cluster-token handshake: that is a broken connection, to be
    retried like any other, not an authentication failure."""
    with LocalCluster(MasterConfig(client_ttl_s=5.0), token="soak-" + "t" * 32) as cluster:
        node = cluster.client(16 * MiB, 1 * MiB)
        with MasterProxy(cluster.master_address) as proxy:
            writer = _client(cluster, proxy.address)
            heal = threading.Timer(0.5, proxy.heal)
            try:
                proxy.refuse()  # new connections are reset during the handshake
                proxy.reset_all()  # and the pooled one breaks
                time.sleep(0.2)
                heal.start()
                value = _value(10 * KiB, 3)
                assert writer.put("hs", value) is True
                assert proxy.resets >= 2  # the pooled one and at least one refused
                assert writer.master.retries >= 2
                assert node.get("hs") == value
            finally:
                heal.cancel()
                if heal.is_alive():
                    heal.join()
                writer.close()


@pytest.mark.parametrize("method", ["PutStart", "BatchPutStart", "UpsertStart"])
def test_a_put_abandoned_after_a_lost_start_is_revoked_without_a_retry(
    setup: tuple[LocalCluster, MasterProxy, StoreClient, StoreClient], method: str
) -> None:
    """The master reserved space for a put whose client never learned it (every
    reply lost until the RPC timeout). The client gives up -- and revokes it once the
    master answers again, instead of leaving it reserved for
    put_start_release_timeout (600 s) unless the application happens to retry."""
    cluster, proxy, node, _ = setup
    impatient = _client(cluster, proxy.address, rpc_timeout_s=1.0, put_slot_bytes=0)
    try:
        proxy.drop_replies(method, 10_000)
        with pytest.raises(MooncakeError):
            if method == "PutStart":
                impatient.put("gone", _value(100 * KiB, 5))
            elif method == "UpsertStart":
                impatient.upsert("gone", _value(100 * KiB, 6))
            else:
                impatient.put_many(["gone", "gone-2"], [[b"x" * 1000], [b"y" * 1000]])
        assert cluster.master.call(lambda st: len(st.inflight)) >= 1  # reserved
        proxy.heal()
        deadline = time.monotonic() + 10.0
        while cluster.master.call(lambda st: len(st.inflight)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cluster.master.call(lambda st: len(st.inflight)) == 0
        assert not node.exists("gone")
        assert node.put("gone", b"free") is True  # the key is free at once
        cluster.master.call(lambda st: st.validate())
    finally:
        impatient.close()
