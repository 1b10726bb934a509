"""The reference's HA gauges, the summary and the cluster page of an HA pair:
the leader reports the effect sequence it shipped, the standby the one it
applied, and the standby's page names the leader."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator

import pytest

from pymooncake.testing._etcd_server import EtcdCluster
from pymooncake.testing._ha import HaMaster, HaMasters

pytestmark = pytest.mark.slow
MiB = 1 << 20


@pytest.fixture
def masters(etcd_cluster: EtcdCluster) -> Iterator[HaMasters]:
    with HaMasters(etcd_cluster.endpoints, 2, lease_ttl_s=2) as group:
        yield group


def _get(master: HaMaster, path: str) -> str:
    with urllib.request.urlopen(master.admin + path, timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


def _gauges(master: HaMaster) -> dict[str, float]:
    out = {}
    for line in _get(master, "/metrics").splitlines():
        m = re.fullmatch(r"(ha_\w+) (\S+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_ha_gauges_summary_and_page_follow_replication(masters: HaMasters) -> None:
    leader = masters.leader()
    standby = next(m for m in masters.masters if m is not leader)
    masters.wait_in_sync(leader)
    client = masters.client(global_segment_size=16 * MiB, local_buffer_size=4 * MiB)
    try:
        for i in range(10):
            assert client.put(f"ha-{i}", bytes([i]) * 1000)
        deadline = time.monotonic() + 20
        while True:
            lead, follow = _gauges(leader), _gauges(standby)
            if (
                follow["ha_oplog_applied_sequence_id"] == lead["ha_oplog_last_sequence_id"]
                and lead["ha_oplog_standby_lag"] == 0
            ):
                break
            assert time.monotonic() < deadline, (lead, follow)
            time.sleep(0.1)
        view = json.loads(_get(standby, "/api/v1/cluster"))
        page = _get(standby, "/")
    finally:
        client.close()  # (unmounts its segment: the objects go)
    assert lead["ha_oplog_last_sequence_id"] > 0
    assert lead["ha_standby_state"] == 0  # the leader runs no standby service
    assert follow["ha_standby_state"] == 3  # WATCHING: synced, following the stream
    assert follow["ha_oplog_standby_lag"] == 0

    summary = _get(standby, "/metrics/summary")
    assert summary.startswith("role=standby, state=standby, service_ready=false, master={")
    assert f", leader={leader.rpc}, view_version=" in summary
    assert "ha={HA Metrics Summary: last_seq=" in summary and ", state=3}" in summary
    assert _get(leader, "/metrics/summary").startswith(
        "role=leader, state=serving, service_ready=true"
    )

    assert (view["role"], view["state"], view["service_ready"]) == ("standby", "standby", False)
    assert view["leader"] == leader.rpc
    # the standby shows its copy of the state
    assert (view["totals"]["keys"], view["totals"]["segments"]) == (10, 1)
    assert f'id="leader">leader at {leader.rpc}<' in page
    assert 'id="role">standby<' in page
