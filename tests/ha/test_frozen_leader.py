"""A standby's test for a frozen leader, against a real etcd.

A frozen leader (SIGSTOP, a hung process) neither refuses connections nor
answers; before this test existed the election waited for etcd to expire its
lease (up to a lease period, plus etcd's expiry check), so a failover took up to
2 lease periods + 0.5 s.  The standby now revokes the lease itself when the
leader's stream fell silent *and* etcd shows the leader missed a renewal -- but
never the lease of a leader that still renews (one merely cut off from this
standby keeps leading).  The Elector runs no thread here: the test plays the
leader's lease by hand and asks the standby's check directly.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest

from pymooncake._etcd import EtcdClient
from pymooncake.store.master._ha import Elector, HaConfig
from pymooncake.testing._etcd_server import EtcdCluster

TTL = 2
LEADER = "127.0.0.1:1"
_clusters = itertools.count()


@pytest.fixture
def standby(etcd_cluster: EtcdCluster) -> Iterator[tuple[Elector, list[float | None]]]:
    """An elector in the standby role whose stream silence the test sets."""
    silence: list[float | None] = [None]
    elector = Elector(  # a cluster id of its own: etcd is shared by the module
        HaConfig(etcd_cluster.endpoints, f"frozen-{next(_clusters)}", TTL, "127.0.0.1:2"),
        on_standby=lambda leader, view: None,
        on_leader=lambda view, keep: None,
        on_lost=lambda reason: None,
        stream_silence=lambda: silence[0],
        silent_after_s=0.8,
    )
    elector.role, elector.leader = "standby", LEADER
    try:
        yield elector, silence
    finally:
        elector._etcd.close()


def _lead(etcd: EtcdClient, elector: Elector) -> int:
    """The leader's key on a fresh lease, as a campaign writes it."""
    lease = etcd.lease_grant(TTL)
    assert etcd.create(elector.key, LEADER.encode(), lease=lease.id).created
    return lease.id


def test_a_silent_leader_that_stopped_renewing_has_its_lease_revoked(
    standby: tuple[Elector, list[float | None]], etcd_client: EtcdClient
) -> None:
    elector, silence = standby
    lease = _lead(etcd_client, elector)
    key = elector.key
    silence[0] = 5.0
    # just renewed: not frozen, whatever the stream says
    assert elector._revoked_frozen_leader() is False
    # no renewal from here on (frozen): within a renewal interval + slack + etcd's
    # whole-second rounding the standby revokes, well before etcd would expire it
    started = time.monotonic()
    while not elector._revoked_frozen_leader():
        assert time.monotonic() - started < TTL, "never judged frozen"
        time.sleep(0.05)
    took = time.monotonic() - started
    assert 0.5 < took < TTL - 0.3, took
    assert etcd_client.get(key) is None  # revoked with its lease: the election may start
    assert etcd_client.lease_time_to_live(lease).ttl_s <= 0


def test_a_leader_that_renews_keeps_its_lease_however_silent_its_stream(
    standby: tuple[Elector, list[float | None]], etcd_client: EtcdClient
) -> None:
    """A leader cut off from this standby only (it renews, clients reach it) must
    not be deposed by the standby: it may still hold acknowledged writes the
    standby never saw."""
    elector, silence = standby
    lease = _lead(etcd_client, elector)
    silence[0] = 60.0
    keep = etcd_client.keep_alive(lease, TTL, interval_s=TTL / 3)
    try:
        deadline = time.monotonic() + 2 * TTL
        while time.monotonic() < deadline:
            assert elector._revoked_frozen_leader() is False
            time.sleep(0.1)
    finally:
        keep.close()
    assert etcd_client.get(elector.key) is not None


def test_a_stream_that_talks_or_was_never_followed_asks_etcd_nothing(
    standby: tuple[Elector, list[float | None]], etcd_client: EtcdClient
) -> None:
    elector, silence = standby
    _lead(etcd_client, elector)
    time.sleep(1.5)  # the lease has missed its renewals by now
    for heard in (None, 0.1, 0.79):
        silence[0] = heard
        assert elector._revoked_frozen_leader() is False
    elector.role = "leader"  # only a standby judges
    silence[0] = 5.0
    assert elector._revoked_frozen_leader() is False
    assert etcd_client.get(elector.key) is not None
