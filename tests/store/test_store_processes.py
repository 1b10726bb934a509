"""Failure handling with real processes: ``mooncake_master`` and ``mooncake_client``
subprocesses (ProcessCluster), SIGKILLed and restarted, plus StoreClients in
this process that put and get through them.

What the reference does and these tests expect (reference store.md §0, §4):

* a storage node that stops pinging is expired after ``--client_ttl``; its
  segment is unmounted and every replica in it disappears;
* a restarted master (without ``--journal_path``) knows nothing: clients get
  NEED_REMOUNT on their next heartbeat, re-mount their segments and re-publish
  their descriptors (the embedded metadata server restarted empty too), but
  **object metadata is lost** -- old keys are simply gone;
* a writer that dies between PutStart and PutEnd is expired like any other
  client; its half-written object is dropped and its buffers are returned
  after ``--put_start_release_timeout_sec`` (the reference's zombie cleanup;
  a slow writer might still be writing into them until then).

Timeouts are short (client_ttl 1 s) and every wait is a bounded poll.
"""

from __future__ import annotations

import contextlib
import json
import random
import selectors
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from pymooncake.config import EngineConfig
from pymooncake.errors import ObjectNotFound, ReplicaNotReady
from pymooncake.store import ReplicateConfig, StoreClient
from pymooncake.testing import ProcessCluster, free_port, wait_until

pytestmark = pytest.mark.slow

MiB = 1 << 20
CLIENT_TTL_S = 1
LEASE_MS = 300
#: how long past client_ttl an expiry may take: the master ticks every 0.1 s,
#: and a loaded 2-core machine schedules subprocesses late
MARGIN_S = 4.0


def _engine() -> EngineConfig:
    return EngineConfig(
        tcp_bind_address="127.0.0.1",
        transfer_timeout_s=5.0,
        connect_timeout_s=2.0,
        rpc_io_timeout_s=3.0,
    )


def _client(cluster: ProcessCluster, segment_bytes: int = 0) -> StoreClient:
    return StoreClient(
        cluster.client_config(
            global_segment_size=segment_bytes,
            local_buffer_size=16 * MiB,
            rpc_timeout_s=5.0,
            rpc_connect_timeout_s=2.0,
            ping_interval_s=0.2,
            engine=_engine(),
        )
    )


def _flags(*extra: str) -> list[str]:
    return [f"--client_ttl={CLIENT_TTL_S}", f"--default_kv_lease_ttl={LEASE_MS}", *extra]


@contextlib.contextmanager
def _cluster(*extra: str) -> Iterator[ProcessCluster]:
    cluster = ProcessCluster(_flags(*extra))
    try:
        yield cluster
    finally:
        cluster.close()


def _http(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return bytes(resp.read())


def _segments(cluster: ProcessCluster) -> set[str]:
    return set(_http(cluster.metrics_url + "/get_all_segments").decode().split())


def _keys(cluster: ProcessCluster) -> set[str]:
    return set(_http(cluster.metrics_url + "/get_all_keys").decode().split())


def _metric(cluster: ProcessCluster, name: str) -> float:
    for line in _http(cluster.metrics_url + "/metrics").decode().splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _gone(client: StoreClient, key: str) -> bool:
    try:
        client.get(key)
    except ObjectNotFound:
        return True
    return False


# ----------------------------------------------------------------------------------
# storage nodes
# ----------------------------------------------------------------------------------


def test_objects_land_in_node_segments_and_die_with_the_node() -> None:
    with _cluster() as cluster, contextlib.ExitStack() as stack:
        n1, seg1 = cluster.node("16 MB")
        n2, seg2 = cluster.node("16 MB")
        assert _segments(cluster) == {seg1, seg2}
        writer = stack.enter_context(_client(cluster))
        reader = stack.enter_context(_client(cluster))
        on1 = {f"n1-{i}": _payload(MiB + i, i) for i in range(3)}
        on2 = {f"n2-{i}": _payload(4096 + i, 10 + i) for i in range(3)}
        for seg, objs in ((seg1, on1), (seg2, on2)):
            for k, v in objs.items():
                assert writer.put(k, v, ReplicateConfig(preferred_segments=(seg,))) is True
                (rep,) = writer.replicas(k)
                assert rep.endpoint == seg, "the object did not land in the node's segment"
                assert reader.get(k) == v
        # replicated on both nodes: survives either one
        assert writer.put("both", b"b" * 5000, ReplicateConfig(replica_num=2)) is True
        assert {r.endpoint for r in reader.replicas("both")} == {seg1, seg2}

        n1.kill(signal.SIGKILL)
        # until the master notices, reads of n1's objects fail over or fail, never hang
        assert reader.get("both") == b"b" * 5000
        assert wait_until(lambda: not reader.exists("n1-0"), CLIENT_TTL_S + MARGIN_S), (
            "the dead node's replicas were not dropped within client_ttl"
        )
        for k in on1:
            assert not reader.exists(k)
            assert _gone(reader, k)
        for k, v in on2.items():
            assert reader.get(k) == v
        assert [r.endpoint for r in reader.replicas("both")] == [seg2]
        assert reader.get("both") == b"b" * 5000
        assert _segments(cluster) == {seg2}
        assert _metric(cluster, "master_expired_clients_total") >= 1
        # new puts avoid the dead node
        for i in range(4):
            assert writer.put(f"after-{i}", _payload(MiB, i)) is True
            assert writer.replicas(f"after-{i}")[0].endpoint == seg2
        assert n2.proc.poll() is None


def test_a_node_restarted_under_the_same_name_serves_again() -> None:
    with _cluster() as cluster, contextlib.ExitStack() as stack:
        n1, seg1 = cluster.node("16 MB")
        _, seg2 = cluster.node("16 MB")
        client = stack.enter_context(_client(cluster))
        prefer1 = ReplicateConfig(preferred_segments=(seg1,))
        assert client.put("before", _payload(MiB, 1), prefer1) is True
        assert client.get("before") == _payload(MiB, 1)  # the client now knows n1's descriptor
        n1.kill(signal.SIGKILL)
        assert wait_until(lambda: seg1 not in _segments(cluster), CLIENT_TTL_S + MARGIN_S)
        # the same segment name again (a new process: new memory, new ports)
        _, again = cluster.node("16 MB", name=seg1)
        assert again == seg1
        assert _segments(cluster) == {seg1, seg2}
        assert _gone(client, "before"), "objects of the old incarnation must not come back"
        for i in range(3):
            assert client.put(f"new-{i}", _payload(MiB + 7, i), prefer1) is True
            assert client.replicas(f"new-{i}")[0].endpoint == seg1
            assert client.get(f"new-{i}") == _payload(MiB + 7, i)
        fresh = stack.enter_context(_client(cluster))
        assert fresh.get("new-0") == _payload(MiB + 7, 0)


def test_node_restarted_before_expiry_replaces_its_predecessor() -> None:
    """The same segment name mounted again while the old incarnation is not yet
    expired: the master drops the stale segment at once (it names dead memory)."""
    with _cluster("--client_ttl=30") as cluster, contextlib.ExitStack() as stack:
        n1, seg1 = cluster.node("16 MB")
        client = stack.enter_context(_client(cluster))
        assert client.put("stale", b"s" * 100, ReplicateConfig(preferred_segments=(seg1,)))
        n1.kill(signal.SIGKILL)
        _, again = cluster.node("16 MB", name=seg1)
        assert again == seg1
        assert _gone(client, "stale")
        assert _metric(cluster, "master_segment_count") == 1
        assert client.put("fresh", b"f" * 100) is True
        assert client.replicas("fresh")[0].endpoint == seg1
        assert client.get("fresh") == b"f" * 100


def _segment_allocated(cluster: ProcessCluster, segment: str) -> float:
    total = 0.0
    for line in _http(cluster.metrics_url + "/metrics").decode().splitlines():
        if line.startswith("segment_allocated_bytes{") and f'segment="{segment}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_writes_and_reads_route_around_a_crashed_node_before_it_expires() -> None:
    """Between a node's crash and its expiry the master still places objects
    there: writers must notice, revoke and write elsewhere; readers must use
    the surviving replica."""
    with _cluster("--client_ttl=30") as cluster, contextlib.ExitStack() as stack:
        n1, seg1 = cluster.node("16 MB")
        _, seg2 = cluster.node("16 MB")
        client = stack.enter_context(_client(cluster))
        assert client.put("pair", _payload(MiB, 1), ReplicateConfig(replica_num=2)) is True
        n1.kill(signal.SIGKILL)
        assert seg1 in _segments(cluster)  # not expired yet
        assert client.get("pair") == _payload(MiB, 1)
        for i in range(6):  # random placement: some of these pick the dead node first
            key = f"around-{i}"
            cfg = ReplicateConfig(replica_num=1 + i % 2)
            assert client.put(key, _payload(MiB + i, i), cfg) is True
            assert [r.endpoint for r in client.replicas(key)] == [seg2]
            assert client.get(key) == _payload(MiB + i, i)
        cfg = ReplicateConfig(preferred_segments=(seg1,))
        assert client.put("prefers-dead", b"x" * 1000, cfg) is True
        assert [r.endpoint for r in client.replicas("prefers-dead")] == [seg2]
        # the revoked attempts left nothing allocated in the dead node's segment
        client.remove("pair", force=True)
        assert _segment_allocated(cluster, seg1) == 0
        assert seg1 in _segments(cluster)


# ----------------------------------------------------------------------------------
# master restart
# ----------------------------------------------------------------------------------


def _fixed_port_flags() -> list[str]:
    # the master, its admin HTTP and its embedded metadata server come back on the
    # same ports, so clients and nodes keep their addresses
    return [
        f"--port={free_port()}",
        f"--metrics_port={free_port()}",
        f"--http_metadata_server_port={free_port()}",
    ]


@contextlib.contextmanager
def _restartable_master() -> Iterator[tuple[ProcessCluster, Callable[[], ProcessCluster]]]:
    """A cluster whose master can be SIGKILLed and restarted on the same ports;
    yields the cluster and a function that does the kill + restart."""
    cluster = ProcessCluster(_flags(*_fixed_port_flags()))

    def restart() -> ProcessCluster:
        before = (cluster.master_address, cluster.metadata_url, cluster.metrics_url)
        cluster.restart_master()  # SIGKILL, then the same flags
        assert (cluster.master_address, cluster.metadata_url, cluster.metrics_url) == before
        return cluster

    try:
        yield cluster, restart
    finally:
        cluster.close()


def test_master_restart_clients_remount_and_old_objects_are_lost() -> None:
    with _restartable_master() as (cluster, restart), contextlib.ExitStack() as stack:
        _, node_seg = cluster.node("16 MB")
        owner = stack.enter_context(_client(cluster, 16 * MiB))
        writer = stack.enter_context(_client(cluster))
        for seg in (node_seg, owner.hostname):
            cfg = ReplicateConfig(preferred_segments=(seg,))
            assert writer.put(f"old-{seg}", _payload(MiB, 3), cfg) is True
            assert writer.get(f"old-{seg}") == _payload(MiB, 3)
        assert _segments(cluster) == {node_seg, owner.hostname}

        master2 = restart()
        # heartbeats get NEED_REMOUNT and re-mount every segment
        assert wait_until(lambda: _segments(master2) == {node_seg, owner.hostname}, 3 + MARGIN_S), (
            f"segments after restart: {_segments(master2)}"
        )
        assert writer.health() and owner.health()
        # the reference's behaviour without snapshots/HA: object metadata is gone
        assert _keys(master2) == set()
        for seg in (node_seg, owner.hostname):
            assert not writer.exists(f"old-{seg}")
            assert _gone(writer, f"old-{seg}")
            # ... so the key can be written again, into the re-mounted segments
            cfg = ReplicateConfig(preferred_segments=(seg,))
            assert writer.put(f"old-{seg}", _payload(MiB, 4), cfg) is True
            assert writer.replicas(f"old-{seg}")[0].endpoint == seg
            assert writer.get(f"old-{seg}") == _payload(MiB, 4)
        assert owner.get(f"old-{owner.hostname}") == _payload(MiB, 4)
        # the re-mounted capacity is fully usable (fresh allocators, nothing leaked)
        assert _metric(master2, "master_total_capacity_bytes") == 32 * MiB
        assert writer.put("big", _payload(12 * MiB, 5)) is True
        assert writer.get_into("big", bytearray(12 * MiB)) == 12 * MiB


def test_master_restart_new_clients_can_reach_remounted_segments() -> None:
    """The embedded metadata server restarts empty with the master: clients must
    publish their transfer-engine descriptors again, or a client that never
    cached a peer's descriptor could not reach that peer's segment."""
    with _restartable_master() as (cluster, restart), contextlib.ExitStack() as stack:
        _, node_seg = cluster.node("16 MB")
        owner = stack.enter_context(_client(cluster, 16 * MiB))
        master2 = restart()
        assert wait_until(lambda: _segments(master2) == {node_seg, owner.hostname}, 3 + MARGIN_S)
        newcomer = stack.enter_context(_client(master2))
        for seg in (node_seg, owner.hostname):
            cfg = ReplicateConfig(preferred_segments=(seg,))
            assert newcomer.put(f"k-{seg}", _payload(4096, 1), cfg) is True
            assert newcomer.get(f"k-{seg}") == _payload(4096, 1)


# ----------------------------------------------------------------------------------
# a writer killed between PutStart and PutEnd
# ----------------------------------------------------------------------------------

_HALF_WRITER = r"""
import json, sys, time, uuid
from pymooncake.store._master_client import MasterClient
from pymooncake.wire import _master_msgs as msg

address, key, size, segment = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
client_id = uuid.uuid4().hex
master = MasterClient(address, timeout_s=5.0, connect_timeout_s=2.0)
config = msg.ReplicateParams(preferred_segments=(segment,))
replicas = master.call(msg.PutStart(client_id, key, size, config))
print("put_start " + json.dumps(replicas.to_wire()), flush=True)
deadline = time.monotonic() + 60  # a live writer that never finishes; bounded all the same
while time.monotonic() < deadline:
    master.call(msg.Ping(client_id))
    time.sleep(0.2)
"""


@contextlib.contextmanager
def _half_writer(
    cluster: ProcessCluster, key: str, size: int, segment: str
) -> Iterator[tuple[subprocess.Popen[str], list[object]]]:
    """A process that calls PutStart and then only pings, as a writer stuck
    mid-transfer would; yields it and the replicas it was given."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HALF_WRITER, cluster.master_address, key, str(size), segment],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=30):
                pytest.fail("the half writer did not start within 30 s")
        line = proc.stdout.readline()
        assert line.startswith("put_start "), line + proc.stdout.read()
        yield proc, json.loads(line.split(" ", 1)[1])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(15)
        proc.stdout.close()


def test_writer_killed_mid_put_gives_its_key_back_after_client_ttl() -> None:
    # a longer client_ttl than the others': the live writer must stay alive
    # through the second put's wait (the RPC timeout, 5 s) although a loaded
    # machine may schedule its pings late (it pings every 0.2 s)
    ttl_s = 3
    with _cluster(f"--client_ttl={ttl_s}") as cluster, contextlib.ExitStack() as stack:
        _, seg = cluster.node("16 MB")
        client = stack.enter_context(_client(cluster))
        with _half_writer(cluster, "zombie", 4 * MiB, seg) as (proc, replicas):
            assert len(replicas) == 1
            # while the writer lives (it pings), the key is being written: not readable,
            # and a second put of it waits for that put (up to the RPC timeout) and then
            # fails: it never reports "already exists" while nothing is stored
            with pytest.raises(ReplicaNotReady):
                client.get("zombie")
            assert not client.exists("zombie")
            with pytest.raises(ReplicaNotReady, match="being written by client"):
                client.put("zombie", b"other")
            with pytest.raises(ReplicaNotReady):  # PROCESSING replicas cannot be removed
                client.remove("zombie", force=True)
            proc.kill()
            proc.wait(15)
        assert wait_until(lambda: "zombie" not in _keys(cluster), ttl_s + MARGIN_S), (
            "the dead writer's unfinished put was not dropped after client_ttl"
        )
        assert _metric(cluster, "master_expired_clients_total") >= 1
        assert client.put("zombie", b"mine") is True
        assert client.get("zombie") == b"mine"


def test_writer_killed_mid_put_space_is_reclaimed() -> None:
    with (
        _cluster("--put_start_release_timeout_sec=1") as cluster,
        contextlib.ExitStack() as stack,
    ):
        _, seg = cluster.node("16 MB")
        client = stack.enter_context(_client(cluster))
        assert _metric(cluster, "master_allocated_bytes") == 0
        with _half_writer(cluster, "zombie", 8 * MiB, seg) as (proc, _):
            assert _metric(cluster, "master_allocated_bytes") >= 8 * MiB
            proc.kill()
            proc.wait(15)
        # client_ttl (writer expired) + put_start_release_timeout (buffers returned)
        assert wait_until(
            lambda: _metric(cluster, "master_allocated_bytes") == 0, CLIENT_TTL_S + 1 + MARGIN_S
        ), "the dead writer's buffers were never returned to the allocator"
        # the whole segment is usable again: 12 MiB did not fit next to the 8 MiB zombie
        big = _payload(12 * MiB, 7)
        assert client.put("big", big, ReplicateConfig(preferred_segments=(seg,))) is True
        assert client.get("big") == big
        assert client.put("zombie", b"z") is True


def test_master_http_endpoints_of_a_process_master() -> None:
    with _cluster() as cluster, contextlib.ExitStack() as stack:
        _, seg = cluster.node("16 MB")
        client = stack.enter_context(_client(cluster))
        assert client.put("k", b"v" * 10) is True
        assert _keys(cluster) == {"k"}
        assert _segments(cluster) == {seg}
        assert _metric(cluster, "master_key_count") == 1
        doc = json.loads(_http(cluster.metrics_url + "/query_key?key=k"))
        assert doc["success"] and doc["data"][0]["transport_endpoint_"] == seg
        with pytest.raises(urllib.error.HTTPError) as info:
            _http(cluster.metrics_url + "/query_key?key=absent")
        assert info.value.code == 404
        info.value.close()
