"""Clients of an HA master group on 127.0.0.1: the master client's connection
pool across a leader change, and ``mooncake_client`` storage nodes given
``--master_server_address=etcd://...`` with ``MC_STORE_CLUSTER_ID``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pymooncake.store import StoreClient, StoreClientConfig
from pymooncake.store._master_client import MasterClient
from pymooncake.testing._cluster import _spawn
from pymooncake.testing._etcd_server import EtcdCluster
from pymooncake.testing._ha import HaMasters
from pymooncake.wire import _master_msgs as msg

pytestmark = pytest.mark.slow
LOCAL = "127.0.0.1"


@pytest.fixture
def masters(etcd_cluster: EtcdCluster) -> Iterator[HaMasters]:
    with HaMasters(etcd_cluster.endpoints, 2, lease_ttl_s=2) as group:
        yield group


def test_a_connection_to_the_old_leader_is_not_pooled_after_a_switch(masters: HaMasters) -> None:
    """Thread A holds a connection to the master it believed led; thread B learns
    of the real leader and switches.  A's connection, returned afterwards, must
    not be reused: every call on it would be refused ("not the leader") while
    the client believes it already talks to the leader -- until its timeout."""
    leader = masters.leader()
    standby = next(m for m in masters.masters if m is not leader)
    client = MasterClient(
        masters.client_address, cluster_id=masters.cluster_id, timeout_s=3.0, same_host_rpc=False
    )
    try:
        client.call(msg.Ping("probe"))
        assert client.target == leader.rpc
        # A: checks out a connection while the client still points at the standby
        client._drop_idle()
        host, _, port = standby.rpc.rpartition(":")
        client._host, client._port = host, int(port)
        conn, _reused = client._checkout()
        # B: finds the leader
        assert client._find_leader() is True
        assert client.target == leader.rpc
        # A: done with its connection
        client._checkin(conn)
        for _ in range(5):
            client.call(msg.Ping("probe"))
    finally:
        client.close()


def test_a_storage_node_follows_the_leader_of_its_cluster_id(masters: HaMasters) -> None:
    leader = masters.leader()
    node = _spawn(
        "mooncake_client",
        [
            "-m",
            "pymooncake.cli.store_client",
            f"--host={LOCAL}",
            f"--master_server_address={masters.client_address}",
            "--metadata_server=P2PHANDSHAKE",
            "--global_segment_size=16 MB",
            "--port=0",  # dummy clients on a free port, not the default 50052
        ],
        {"MC_STORE_CLUSTER_ID": masters.cluster_id, "MC_TCP_BIND_ADDRESS": LOCAL},
    )
    try:
        segment = node.wait_for(r"mooncake_client ready: segment (\S+) contributes").group(1)
        assert segment in leader.segments()
        with StoreClient(
            StoreClientConfig(
                local_hostname=LOCAL,
                master_server_addr=masters.client_address,
                cluster_id=masters.cluster_id,
                global_segment_size=0,
            )
        ) as client:
            assert client.put("on-the-node", b"x" * 5000) is True
            assert client.get("on-the-node") == b"x" * 5000
            assert [r.endpoint for r in client.replicas("on-the-node")] == [segment]
    finally:
        assert node.stop() == 0
