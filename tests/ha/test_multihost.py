"""Master HA across hosts: network namespaces on a bridge, one per host.

etcd runs as three members on three hosts (one can restart without losing the
quorum), ``mooncake_master --enable_ha=true`` on two more, two
``mooncake_client`` storage nodes (``--master_server_address=etcd://...``) on
two more; this process is the client host (the bridge address) and runs a
checksummed put/get load (:class:`~pymooncake.testing._ha_netns.ChecksumLoad`)
while one fault is injected.  Each scenario asserts: a new leader serving
within two lease periods (plus etcd's lease-expiry check period, see
``LEADER_LIMIT_S``), no acknowledged object lost (the storage nodes all live),
no corrupt read, no healthy client expired, no client call failed.  Measured times are printed (``-s``)
and recorded as test properties; ``bench/ha_failover_netns.py`` repeats them.

Needs root and iproute2 (skipped otherwise) and etcd (Debian etcd-server).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from pymooncake.testing import NetnsNetwork, require_tool
from pymooncake.testing._ha_netns import (
    HOSTS,
    NOT_LEADER,
    ChecksumLoad,
    FailoverRun,
    HaDeployment,
    run_scenario,
)

pytestmark = pytest.mark.slow

#: the masters' lease TTL: the shortest etcd grants with its default timings is 1.5 s
TTL = 2
#: etcd revokes expired leases in a loop that runs every 500 ms (etcd 3.4/3.5
#: lessor), so a lease outlives its TTL by up to that much
ETCD_EXPIRY_CHECK_S = 0.5
#: the old lease runs out at most TTL after the fault, the new leader warms up
#: for TTL; plus etcd's expiry check and 0.5 s of scheduling on a loaded machine
LEADER_LIMIT_S = 2 * TTL + ETCD_EXPIRY_CHECK_S + 0.5


@pytest.fixture
def deployment(netns: Callable[[int], NetnsNetwork]) -> Iterator[HaDeployment]:
    require_tool("etcd", package="etcd-server")
    with HaDeployment(netns(HOSTS), lease_ttl_s=TTL) as dep:
        yield dep


def _run(dep: HaDeployment, scenario: str, record: Callable[[str, object], None]) -> FailoverRun:
    run = run_scenario(dep, scenario, ChecksumLoad(dep.client(), prefix=scenario))
    row = run.row()
    print(f"\n{scenario}: {json.dumps(row)}")
    record("failover", json.dumps(row))
    assert run.acked > 0
    assert run.lost == [], f"acknowledged objects lost: {run.lost[:5]}"
    assert run.corrupt == [] and run.corrupt_reads == 0, f"corrupt reads: {run.corrupt[:5]}"
    assert run.expired == [], f"healthy storage nodes expired: {run.expired}"
    # the client rode through: its calls waited for the new leader, none failed
    assert run.load_errors == {}, (
        f"client calls failed: {run.load_errors} {run.notes.get('error_messages', {})}"
    )
    return run


def _check_failover(run: FailoverRun) -> None:
    assert run.leader_s is not None
    assert run.leader_s < LEADER_LIMIT_S, f"a new leader served after {run.leader_s:.2f} s"


def test_sigkill_of_the_leader_under_load(
    deployment: HaDeployment, record_property: Callable[[str, object], None]
) -> None:
    run = _run(deployment, "sigkill", record_property)
    _check_failover(run)


def test_a_leader_stopped_past_its_lease_never_serves_again(
    deployment: HaDeployment, record_property: Callable[[str, object], None]
) -> None:
    run = _run(deployment, "sigstop", record_property)
    _check_failover(run)
    # woken up (SIGCONT) after the new leader served: direct RPCs are refused at once
    assert run.notes["refused_codes"] == {"read": NOT_LEADER, "write": NOT_LEADER}
    assert run.notes["woken_serving"] is False
    # then its /ha_status says standby, names the new leader, and the new leader
    # counts it as an in-sync standby (run_scenario waited for that: rejoin_s)
    assert run.notes["rejoin_s"] < 5 * TTL


def test_a_leader_cut_off_from_etcd_stops_serving_and_another_takes_over(
    deployment: HaDeployment, record_property: Callable[[str, object], None]
) -> None:
    """Blackhole routes to the etcd hosts in the leader's namespace: clients and
    the standby still reach it, etcd does not."""
    run = _run(deployment, "etcd_cut", record_property)
    _check_failover(run)
    assert run.fenced_s is not None and run.leader_s is not None
    # it stops when its lease deadline passes (at most TTL after its last renewal)...
    assert run.fenced_s <= TTL + 0.5
    # ...which is before anyone else may serve: never two leaders at once
    assert run.fenced_s < run.leader_s
    assert run.notes["refused_codes"] == {"read": NOT_LEADER, "write": NOT_LEADER}


def test_an_etcd_member_restart_needs_no_failover(
    deployment: HaDeployment, record_property: Callable[[str, object], None]
) -> None:
    """The Raft leader of etcd is stopped for two lease periods, then started with
    its data dir: the master leader keeps its lease through the other members."""
    run = _run(deployment, "etcd_restart", record_property)
    assert run.leader_s is None
    assert run.notes["samples_not_serving"] == 0
    assert run.notes["roles_changed"] is False
    assert run.client_gap_s < TTL
