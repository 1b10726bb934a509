"""Master HA against a real etcd: election, failover without loss, fencing.

Masters run as ``mooncake_master --enable_ha`` processes; the store client
finds the leader through ``etcd://`` as reference clients do.  Lease TTL 2 s
(etcd's minimum is about 1.5 s), so one failover takes about 4 s.
"""

from __future__ import annotations

import hashlib
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pymooncake.errors import StoreError
from pymooncake.store import StoreClient
from pymooncake.store._master_client import MasterClient
from pymooncake.store._types import ErrorCode
from pymooncake.store.master._replication import FROZEN_SILENCE_S
from pymooncake.testing._etcd_server import EtcdCluster
from pymooncake.testing._ha import HaMaster, HaMasters
from pymooncake.wire import _master_msgs as msg

pytestmark = pytest.mark.slow
TTL = 2
MiB = 1 << 20


def _value(key: str, size: int) -> bytes:
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    return rng.randbytes(size)


@pytest.fixture
def masters(etcd_cluster: EtcdCluster) -> Iterator[HaMasters]:
    with HaMasters(etcd_cluster.endpoints, 2, lease_ttl_s=TTL) as group:
        yield group


def _ha_log(master: HaMaster) -> str:
    """The HA lines a master printed (why a failover took as long as it did)."""
    return "its HA log:\n" + "".join(line for line in master.node.lines if "HA:" in line)[-4000:]


def _client(group: HaMasters, segment: int = 64 * MiB) -> StoreClient:
    return group.client(global_segment_size=segment)


def test_one_leader_is_elected_and_serves(masters: HaMasters) -> None:
    leader = masters.leader()
    roles = sorted(m.role() for m in masters.masters)
    assert roles == ["leader", "standby"]
    # the standby refuses clients and names the leader
    standby = next(m for m in masters.masters if m is not leader)
    direct = MasterClient(standby.rpc, timeout_s=2.0, same_host_rpc=False)
    try:
        with pytest.raises(StoreError) as info:
            direct.call(msg.Ping("someone"))
        assert info.value.code == ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS
        assert leader.rpc in str(info.value)
    finally:
        direct.close()
    with _client(masters) as client:
        assert client.put("k", b"v") is True
        assert client.get("k") == b"v"
    # idle, the leader still streams: the standby never looks at a frozen leader
    masters.wait_in_sync(leader)
    assert leader.status()["stream"] is None  # a leader follows nobody
    for _ in range(10):
        stream = standby.status()["stream"]
        assert stream["leader"] == leader.rpc and stream["synced"] is True
        assert stream["applied_seq"] > 0
        assert stream["silent_s"] < FROZEN_SILENCE_S, stream
        time.sleep(0.2)


def test_sigkill_of_the_leader_loses_no_acknowledged_object(masters: HaMasters) -> None:
    leader = masters.leader()
    with _client(masters) as client:
        masters.wait_in_sync(leader)
        keys = [f"obj-{i}" for i in range(200)]
        sizes = [random.Random(i).choice([100, 4096, 65536, 300_000]) for i in range(200)]
        for k, n in zip(keys, sizes, strict=True):
            assert client.put(k, _value(k, n)) is True
        batch = [f"batch-{i}" for i in range(64)]
        assert all(r is True for r in client.put_many(batch, [[_value(k, 4096)] for k in batch]))
        leader.node.kill(signal.SIGKILL)
        new, waited = masters.new_leader(leader)
        # the standby sees the dead leader refuse connections and revokes its lease
        # (no waiting for etcd to expire it), then warms up for one TTL
        assert waited < 2 * TTL, f"failover took {waited:.1f} s; {_ha_log(new)}"
        new.node.wait_for(r"HA: the leader at \S+ refuses connections")
        new.node.wait_for(r"so that the election need not wait for it to expire")
        status = new.status()
        assert status["failovers"] == 1
        for k, n in zip(keys, sizes, strict=True):
            assert client.get(k) == _value(k, n), k
        for k in batch:
            assert client.get(k) == _value(k, 4096)
        assert client.put("after", b"x" * 1000) is True
        assert client.get("after") == b"x" * 1000
        # the client was not expired: its segment is still the store's
        assert client.exists("obj-0")


def test_puts_in_flight_across_a_failover_complete(masters: HaMasters) -> None:
    """A put that started on the old leader finishes on the new one (its buffers
    were replicated), and puts issued during the election wait and then succeed."""
    leader = masters.leader()
    with _client(masters) as client:
        masters.wait_in_sync(leader)
        reps = client.master.call(
            msg.PutStart(client.client_id, "half", 4096, msg.ReplicateParams())
        )
        assert len(reps.replicas) == 1
        # no reply waits for a reservation to reach the standby: a leader killed
        # right after answering may not have streamed it (then the put is not in
        # flight anywhere, and its writer starts over): wait until it did
        masters.wait_replicated(leader)
        leader.node.kill(signal.SIGKILL)
        t0 = time.monotonic()
        assert client.put("during", b"d" * 4096) is True  # waits for the new leader
        assert time.monotonic() - t0 < 2 * TTL + 5
        client.master.call(msg.PutEnd(client.client_id, "half"))
        assert client.exists("half")


def test_a_frozen_leader_never_serves_again(masters: HaMasters) -> None:
    leader = masters.leader()
    with _client(masters) as client:
        masters.wait_in_sync(leader)
        assert client.put("before", b"1" * 100) is True
        leader.node.proc.send_signal(signal.SIGSTOP)
        try:
            new, waited = masters.new_leader(leader)
            # the standby saw the stream fall silent and the renewals stop, and
            # revoked the lease (about 1 s) instead of waiting for etcd's expiry
            assert waited < 2 * TTL, f"failover took {waited:.1f} s; {_ha_log(new)}"
            new.node.wait_for(r"missed its etcd lease renewal", timeout_s=5)
            assert client.put("meanwhile", b"2" * 100) is True
        finally:
            leader.node.proc.send_signal(signal.SIGCONT)
        # the old leader wakes up past its lease: it must refuse at once
        direct = MasterClient(leader.rpc, timeout_s=3.0, same_host_rpc=False)
        try:
            with pytest.raises(StoreError) as info:
                direct.call(msg.ExistKey("before"))
            assert info.value.code == ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS
        finally:
            direct.close()
        deadline = time.monotonic() + 10
        while leader.role() == "leader" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leader.role() != "leader"
        assert client.get("before") == b"1" * 100
        assert client.get("meanwhile") == b"2" * 100


def test_a_probe_answered_by_a_standby_sends_the_next_one_to_the_leader(
    masters: HaMasters,
) -> None:
    """A liveness probe (patient=False) is not retried when a standby answers it,
    but the next one goes to the leader: a storage node, which only pings, once
    kept pinging a master that had stepped down until the new leader expired it."""
    from pymooncake._net import split_host_port

    leader = masters.leader()
    standby = next(m for m in masters.masters if m is not leader)
    probe = MasterClient(
        masters.client_address,
        cluster_id=masters.cluster_id,
        timeout_s=5.0,
        same_host_rpc=False,
    )
    try:
        assert probe.call(msg.Ping("probe"), patient=False).instance
        assert probe.target == leader.rpc
        # as right after a step-down: the client's connection leads to a standby
        host, port = split_host_port(standby.rpc)
        probe._drop_idle()
        probe._host, probe._port = host, port or 0
        with pytest.raises(StoreError) as info:
            probe.call(msg.Ping("probe"), patient=False)
        assert info.value.code == ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS
        assert probe.target == leader.rpc
        assert probe.call(msg.Ping("probe"), patient=False).instance
    finally:
        probe.close()


def _on_a_new_leader(
    masters: HaMasters, leader: HaMaster, request: msg.Request
) -> tuple[Any, MasterClient]:
    """Send ``request`` to ``leader`` and kill it once the standby has the
    change; returns the answer and a fresh connection to the new leader (the
    caller closes it).  Two fresh connections number their first request alike
    (rid 1): sent there, ``request`` stands for the retry of a client whose
    reply was lost with the old leader."""
    first = MasterClient(leader.rpc, timeout_s=5.0, same_host_rpc=False)
    try:
        answer = first.call(request)
    finally:
        first.close()
    masters.wait_replicated(leader)
    leader.node.kill(signal.SIGKILL)
    new, _ = masters.new_leader(leader)
    return answer, MasterClient(new.rpc, timeout_s=5.0, same_host_rpc=False)


def test_a_remove_retried_on_the_new_leader_gets_the_first_answer(masters: HaMasters) -> None:
    """A Remove the old leader executed and streamed, whose reply was lost with
    the leader, is retried on the new one with the same request id: the answer
    the old leader kept with the removal (``ReplyKept``) answers it -- success,
    not OBJECT_NOT_FOUND."""
    leader = masters.leader()
    with _client(masters) as client:
        masters.wait_in_sync(leader)
        assert client.put("gone", b"g" * 1000) is True
        assert client.put("kept", b"k" * 1000) is True
        time.sleep(0.3)  # past the read lease of the puts
        remove = msg.Remove("gone", False, "remover-1")
        _, retry = _on_a_new_leader(masters, leader, remove)
        try:
            retry.call(remove)  # raised ObjectNotFound before
            with pytest.raises(StoreError) as info:  # a new request id is a new remove
                retry.call(remove)
            assert info.value.code == ErrorCode.OBJECT_NOT_FOUND
        finally:
            retry.close()
        assert not client.exists("gone")
        assert client.get("kept") == b"k" * 1000


def test_a_task_creation_retried_on_the_new_leader_gets_the_first_task(
    masters: HaMasters,
) -> None:
    """A CreateCopyTask the old leader queued and streamed, whose reply was lost
    with the leader, is retried on the new one with the same request id: it is
    answered with the first task's id (kept with the state, ``ReplyKept``)
    instead of queueing a second copy, which would fail once the first ran."""
    leader = masters.leader()
    with _client(masters) as source, _client(masters) as target:
        masters.wait_in_sync(leader)
        assert source.put("copied", b"c" * 1000) is True
        (replica,) = source.replicas("copied")
        names = {s.name for s in (*source.segments, *target.segments)}
        (other,) = names - {replica.endpoint}
        create = msg.CreateCopyTask("copied", (other,), "tasker-1")
        first, retry = _on_a_new_leader(masters, leader, create)
        try:
            assert retry.call(create).task_id == first.task_id
        finally:
            retry.close()
