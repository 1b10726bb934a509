"""Puts their clients confirm to the standby themselves (``HaConfirm``).

The leader answers such a PutEnd without waiting for its standby, and ships the
commit later (``PYMOONCAKE_HA_COMMIT_DEFER_MS`` holds it back here for a
minute, so that only the client's confirmation can have told the standby).  A
failover must still lose none of them; a standby that cannot confirm makes the
client fall back to the leader's own barrier.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pymooncake.errors import RpcTimeout
from pymooncake.store import ReplicateConfig, StoreClient
from pymooncake.testing._etcd_server import EtcdCluster
from pymooncake.testing._ha import HaMaster, HaMasters
from pymooncake.wire import _master_msgs as msg

pytestmark = pytest.mark.slow
TTL = 2
MiB = 1 << 20


def _value(key: str, size: int) -> bytes:
    return random.Random(hashlib.sha256(key.encode()).digest()).randbytes(size)


@pytest.fixture
def held_back(etcd_cluster: EtcdCluster) -> Iterator[HaMasters]:
    env = {"PYMOONCAKE_HA_COMMIT_DEFER_MS": "60000"}
    with HaMasters(etcd_cluster.endpoints, 2, lease_ttl_s=TTL, env=env) as group:
        yield group


def _client(group: HaMasters, put_slot_bytes: int | None = None) -> StoreClient:
    more = {} if put_slot_bytes is None else {"put_slot_bytes": put_slot_bytes}
    return group.client(**more)


def _count_requests(client: StoreClient) -> collections.Counter[str]:
    """The master requests ``client`` sends to the leader, by method."""
    counts: collections.Counter[str] = collections.Counter()
    master = client.master
    call, send = master.call, master.send

    def counting_call(request: Any, **kw: Any) -> Any:
        counts[request.METHOD.value] += 1
        return call(request, **kw)

    def counting_send(request: Any) -> Any:
        counts[request.METHOD.value] += 1
        return send(request)

    master.call = counting_call  # type: ignore[method-assign]
    master.send = counting_send  # type: ignore[method-assign]
    return counts


def _knows_standby(client: StoreClient, group: HaMasters) -> str:
    """Until the client's heartbeat named the standby in sync; its address."""
    leader = group.leader()
    group.wait_in_sync(leader)
    deadline = time.monotonic() + 10
    while not client.confirms.standbys:
        assert time.monotonic() < deadline, "the heartbeat never named the standby"
        time.sleep(0.05)
    (standby,) = client.confirms.standbys
    assert standby != leader.rpc
    return standby


@pytest.mark.parametrize("slots", [True, False], ids=["reserved-buffers", "start-end"])
def test_puts_acknowledged_before_their_commit_reached_the_standby_survive(
    held_back: HaMasters, slots: bool
) -> None:
    """Through buffers reserved ahead (one leader round trip per put: CommitSlot /
    BatchCommitSlots beside HaConfirm of (buffer, key) pairs) and, with them
    off, PutStart / PutEnd."""
    leader = held_back.leader()
    with _client(held_back, None if slots else 0) as client:
        _knows_standby(client, held_back)
        sent = _count_requests(client)
        singles = [f"one-{i}" for i in range(20)]
        for k in singles:
            assert client.put(k, _value(k, 4096)) is True
        batch = [f"many-{i}" for i in range(16)]
        assert all(r is True for r in client.put_many(batch, [[_value(k, 1000)] for k in batch]))
        assert client.confirms.confirmed_keys == len(singles) + len(batch)
        assert client.confirms.fallback_keys == 0
        if slots:
            assert sent["CommitSlot"] == len(singles) and sent["BatchCommitSlots"] == 1
            assert not {"PutStart", "PutEnd", "BatchPutStart", "BatchPutEnd"} & set(sent)
        else:
            assert sent["PutStart"] == sent["PutEnd"] == len(singles)
            assert "ReserveSlots" not in sent
        # each put's commit rode along with the next put's reservation; the batch's
        # are still held back by the leader when it dies
        leader.node.kill(signal.SIGKILL)
        new, _waited = held_back.new_leader(leader)
        found = new.node.wait_for(r"HA: committed (\d+) put\(s\) the previous leader ended")
        assert int(found.group(1)) == len(batch)
        for k in singles:
            assert client.get(k) == _value(k, 4096), k
        for k in batch:
            assert client.get(k) == _value(k, 1000), k


def test_an_upsert_right_after_a_confirmed_put_survives_a_failover(held_back: HaMasters) -> None:
    """An upsert's end is never confirmed to the standby (it could not tell the
    replacement's confirmation from the earlier put's, whose commit the leader
    still holds back): it ends plainly, so the leader answers once a standby has
    everything shipped before, and the replacement survives the leader's death
    (tests/store/test_ha_machine.py: a model that confirmed upserts lost them)."""
    leader = held_back.leader()
    with _client(held_back, 0) as client:
        _knows_standby(client, held_back)
        old, new = _value("u-old", 4096), _value("u-new", 8192)
        assert client.put("u", old) is True
        assert client.confirms.confirmed_keys == 1
        sent = _count_requests(client)
        client.upsert("u", new)
        assert sent["UpsertEnd"] == 1 and "PutEnd" not in sent, sent  # ended plainly
        leader.node.kill(signal.SIGKILL)
        held_back.new_leader(leader)
        assert client.get("u") == new


def test_a_standby_that_cannot_confirm_makes_the_leader_wait_for_it(
    held_back: HaMasters,
) -> None:
    leader = held_back.leader()
    with _client(held_back) as client:
        standby = _knows_standby(client, held_back)
        # the heartbeat must not repair the list meanwhile
        client.confirms.update = lambda standbys: None  # type: ignore[method-assign]
        # one standby answers, a second one (nobody listens there) cannot: the
        # leader answers at once (both are named), the client ends the put again
        # plainly, which the leader answers once the standby has everything
        client.confirms.standbys = (standby, "127.0.0.1:1")
        assert client.put("both", _value("both", 4096)) is True
        assert client.confirms.fallback_keys == 1
        # the unreachable one is skipped from then on; naming only a master that is
        # no standby does not cover the leader's standby: it waits for it itself
        assert list(client.confirms.standbys) == [standby]
        client.confirms.standbys = ("127.0.0.1:1",)
        assert client.put("plain", _value("plain", 4096)) is True
        assert client.confirms.fallback_keys == 2
        leader.node.kill(signal.SIGKILL)
        held_back.new_leader(leader)
        assert client.get("both") == _value("both", 4096)
        assert client.get("plain") == _value("plain", 4096)


def test_lazily_confirmed_puts_survive_though_the_standby_never_answered(
    held_back: HaMasters,
) -> None:
    """Commits of reserved buffers are confirmed lazily: the client posts the
    confirmation and waits for the leader only.  With the standby frozen (it reads
    and answers nothing) the puts are still acknowledged at once; the leader then
    dies with their commits held back.  The standby reads the confirmations from
    its socket when it runs again, before it takes over, and commits them."""
    leader = held_back.leader()
    with _client(held_back) as client:
        assert client.confirms.lazy
        standby_rpc = _knows_standby(client, held_back)
        standby = next(m for m in held_back.masters if m.rpc == standby_rpc)
        for i in range(40):  # buffers reserved ahead (each reservation needs the standby)
            assert client.put(f"warm-{i}", _value(f"warm-{i}", 4096)) is True
        sent = _count_requests(client)
        keys = [f"frozen-{i}" for i in range(10)]
        standby.node.proc.send_signal(signal.SIGSTOP)
        try:
            for k in keys:
                started = time.monotonic()
                assert client.put(k, _value(k, 4096)) is True
                assert time.monotonic() - started < 1.0  # nobody waited for the standby
            assert sent["CommitSlot"] == len(keys)
            assert "ReserveSlots" not in sent and "PutEnd" not in sent
            leader.node.kill(signal.SIGKILL)
        finally:
            standby.node.proc.send_signal(signal.SIGCONT)
        new, _waited = held_back.new_leader(leader)
        assert new is standby
        found = new.node.wait_for(r"HA: committed (\d+) put\(s\) the previous leader ended")
        assert int(found.group(1)) >= len(keys)
        for k in keys:
            assert client.get(k) == _value(k, 4096), k
        assert client.confirms.fallback_keys == 0


def test_a_lazy_confirmation_nobody_vouches_for_makes_the_client_wait_for_a_standby(
    held_back: HaMasters,
) -> None:
    """The client also confirms to a master that is no standby (the leader itself,
    as after a stale heartbeat): its answer, read later, says it cannot vouch; the
    client then sends the leader a barrier (a commit it refuses once a standby has
    everything before it, the held-back commit included), so the put survives the
    leader's death."""
    leader = held_back.leader()
    with _client(held_back) as client:
        standby = _knows_standby(client, held_back)
        client.confirms.update = lambda standbys: None  # type: ignore[method-assign]
        assert client.put("warm", _value("warm", 4096)) is True  # buffers reserved
        client.confirms.standbys = (standby, leader.rpc)
        sent = _count_requests(client)
        assert client.put("odd", _value("odd", 4096)) is True
        assert sent["CommitSlot"] == 1
        deadline = time.monotonic() + 10
        while client.confirms.fallback_keys == 0:  # the leader answers on its tick
            assert time.monotonic() < deadline, "the leader's answer never came"
            time.sleep(0.05)
            client.confirms.settle(client.master)
        assert client.confirms.fallback_keys == 1
        assert sent["CommitSlot"] == 2  # the barrier, after the put was acknowledged
        leader.node.kill(signal.SIGKILL)
        held_back.new_leader(leader)
        assert client.get("odd") == _value("odd", 4096)


@contextlib.contextmanager
def _frozen_standby_setup(
    etcd_cluster: EtcdCluster, sync_timeout_ms: int
) -> Iterator[tuple[StoreClient, HaMaster]]:
    """A leader that drops a silent standby from its barrier after
    ``sync_timeout_ms``, a client that knows the standby, and the standby (which
    the test freezes)."""
    flags = [f"--ha_sync_timeout_ms={sync_timeout_ms}"]
    with (
        HaMasters(etcd_cluster.endpoints, 2, lease_ttl_s=TTL, flags=flags) as group,
        _client(group) as client,
    ):
        standby_rpc = _knows_standby(client, group)
        yield client, next(m for m in group.masters if m.rpc == standby_rpc)


def test_a_leader_answer_later_than_one_attempt_still_acknowledges_the_put(
    etcd_cluster: EtcdCluster,
) -> None:
    """The PutEnd sent beside the confirmations waits one attempt (2 s with HA);
    a leader holding its answer longer -- here for a frozen standby, until
    ``--ha_sync_timeout_ms`` drops it; in a failover for a standby that rejoins
    -- makes the client end the put again through the retrying path, which
    succeeds: the put is acknowledged, not failed with RpcTimeout."""
    with _frozen_standby_setup(etcd_cluster, 5000) as (client, standby):
        client.confirms.update = lambda standbys: None  # type: ignore[method-assign]
        # a master that is no standby: the leader does not count the put as
        # confirmed and holds its answer until its real standby acknowledges
        client.confirms.standbys = ("127.0.0.1:1",)
        standby.node.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert client.put("late", _value("late", 4096)) is True
            waited = time.monotonic() - started
        finally:
            standby.node.proc.send_signal(signal.SIGCONT)
        # the answer came when the leader dropped the frozen standby, after
        # more than one attempt's wait
        assert 2.0 < waited < 15.0, waited
        assert client.get("late") == _value("late", 4096)


def test_buffers_reserved_ahead_are_answered_once_a_standby_has_them(
    etcd_cluster: EtcdCluster,
) -> None:
    """A client writes into buffers reserved ahead at any later time, possibly
    after the leader died: the leader answers ReserveSlots only once a standby
    acknowledged the reservation (a new leader then never hands the buffers out
    to another put).  With the standby frozen, the answer waits until
    ``--ha_sync_timeout_ms`` drops it from the barrier."""
    with _frozen_standby_setup(etcd_cluster, 4000) as (client, standby):
        params = ReplicateConfig().to_params()

        def reserve(batch: str) -> tuple[float, int]:
            started = time.monotonic()
            reply = client.master.call(msg.ReserveSlots(client.client_id, 4096, 4, batch, params))
            return time.monotonic() - started, len(reply.columns)

        waited, count = reserve("awake")
        assert count == 4 and waited < 1.0, waited  # a standby round trip
        standby.node.proc.send_signal(signal.SIGSTOP)
        try:
            waited, count = reserve("frozen")
        finally:
            standby.node.proc.send_signal(signal.SIGCONT)
        assert count == 4
        assert 3.0 < waited < 15.0, waited


def test_a_commit_whose_answer_was_lost_is_acknowledged(etcd_cluster: EtcdCluster) -> None:
    """The CommitSlot sent beside the confirmations reached the leader, which
    committed; its answer never came.  Sent again (by ``call``), the leader no
    longer holds the buffer: a plain end of the key tells the put is done."""
    with (
        HaMasters(etcd_cluster.endpoints, 2, lease_ttl_s=TTL) as group,
        _client(group) as client,
    ):
        _knows_standby(client, group)
        assert client.put("warm", _value("warm", 4096)) is True  # buffers reserved
        master = client.master
        send = master.send
        lost: list[str] = []

        def answer_lost(request: Any) -> Any:
            finish = send(request)
            if not isinstance(request, (msg.CommitSlot, msg.BatchCommitSlots)):
                return finish

            def lose() -> Any:
                finish()  # the leader answered; the client never sees it
                lost.append(request.METHOD.value)
                raise RpcTimeout("the answer was lost (test)")

            return lose

        master.send = answer_lost  # type: ignore[method-assign]
        assert client.put("single", _value("single", 4096)) is True
        batch = [f"b{i}" for i in range(4)]
        assert client.put_many(batch, [[_value(k, 4096)] for k in batch]) == [True] * 4
        assert lost == ["CommitSlot", "BatchCommitSlots"]
        for key in ("single", *batch):
            assert client.get(key) == _value(key, 4096)
