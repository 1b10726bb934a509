"""Copy/move tasks and drain jobs across a leader failover (real etcd, ``--enable_ha``
master processes): the standby mirrors the task queue, the copies in flight and
the drain jobs, so the new leader answers for them and finishes them."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest

from pymooncake._authio import http_request
from pymooncake.store import ReplicateConfig, StoreClient
from pymooncake.store._tasks import TaskStatus
from pymooncake.store._types import ReplicaDesc
from pymooncake.testing._etcd_server import EtcdCluster
from pymooncake.testing._ha import HaMasters
from pymooncake.wire import _master_msgs as msg

pytestmark = pytest.mark.slow
TTL = 2
MiB = 1 << 20


@pytest.fixture
def masters(etcd_cluster: EtcdCluster) -> Iterator[HaMasters]:
    with HaMasters(etcd_cluster.endpoints, 2, lease_ttl_s=TTL) as group:
        yield group


def _client(group: HaMasters) -> StoreClient:
    return group.client(global_segment_size=16 * MiB, local_buffer_size=4 * MiB)


def test_tasks_copies_in_flight_and_drain_jobs_survive_a_failover(masters: HaMasters) -> None:
    leader = masters.leader()
    with _client(masters) as a, _client(masters) as b:
        masters.wait_in_sync(leader)
        value = bytes(range(256)) * 1000
        assert a.put("done", value, ReplicateConfig(preferred_segments=(a.hostname,)))
        assert a.put("flight", value, ReplicateConfig(preferred_segments=(a.hostname,)))
        done = a.create_copy_task("done", [b.hostname])
        deadline = time.monotonic() + 30
        while not a.query_task(done).finished:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # a copy in flight: reserved and written on the old leader, published on the new
        start = a.master.call(msg.CopyStart(a.client_id, "flight", a.hostname, (b.hostname,)))
        src = ReplicaDesc.from_wire(start.source)
        a._tasks._write(src, [ReplicaDesc.from_wire(t) for t in start.targets])
        status, body = http_request(
            "POST",
            leader.admin + "/api/v1/drain_jobs",
            context=b"master-admin",
            body=json.dumps({"segments": [a.hostname], "target_segments": [b.hostname]}).encode(),
        )
        assert status == 200, body
        job = json.loads(body)["job_id"]
        masters.wait_in_sync(leader)
        leader.node.kill(signal.SIGKILL)
        new, _ = masters.new_leader(leader)
        assert a.query_task(done).status == TaskStatus.SUCCESS
        a.master.call(msg.CopyEnd(a.client_id, "flight"))
        # the drain job goes on under the new leader and empties a's segment
        deadline = time.monotonic() + 60
        while True:
            status, body = http_request(
                "GET", new.admin + f"/api/v1/drain_jobs/query?job_id={job}", context=b"master-admin"
            )
            assert status == 200, body
            if json.loads(body)["status_name"] == "SUCCEEDED":
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
        for key in ("done", "flight"):
            assert [r.endpoint for r in a.replicas(key)] == [b.hostname]
            assert a.get(key) == value
