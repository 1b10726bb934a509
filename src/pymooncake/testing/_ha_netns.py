"""A Mooncake Store with master HA spread over several "hosts", for tests and benchmarks.

:class:`HaDeployment` builds, on a :class:`~pymooncake.testing.NetnsNetwork`
of seven hosts::

    hosts 0-2  etcd members (one Raft cluster: one member can restart without
               the cluster losing its quorum)
    hosts 3-4  mooncake_master --enable_ha=true (one leader, one standby)
    hosts 5-6  mooncake_client storage nodes, --master_server_address=etcd://...
    root       this process: a StoreClient on the bridge address (the "client host")

Every process runs with the same-host shortcuts off (``PYMOONCAKE_SAME_HOST=0``):
bytes cross the bridge over TCP as they would between machines.

:class:`ChecksumLoad` puts fresh keys whose bytes are derived from the key and
reads back acknowledged ones, comparing every byte; :func:`run_scenario` injects
one fault under that load and measures what clients saw (:class:`FailoverRun`).
The faults (:data:`SCENARIOS`):

* ``sigkill``: SIGKILL the leader;
* ``sigstop``: SIGSTOP the leader until another master serves, then SIGCONT: the
  old leader must refuse clients at once and rejoin as a standby;
* ``etcd_cut``: the leader's host loses its routes to the etcd hosts (blackhole
  routes in its namespace: packets to etcd are dropped, new connections fail;
  clients and the standby still reach it): it must stop serving when its lease
  deadline passes, and another master takes over;
* ``etcd_restart``: one etcd member (the Raft leader) is stopped and started
  again with its data: the leader keeps serving, nothing fails over.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..config import EngineConfig
from ..errors import MooncakeError, StoreError
from ..store import StoreClient, StoreClientConfig
from ..store._master_client import MasterClient
from ..store._types import ErrorCode
from ..wire import _master_msgs as msg
from ._cluster import NodeProcess, _spawn
from ._etcd_server import EtcdCluster, EtcdMember
from ._ha import HaMaster, HaMasters
from ._netns import Host, NetnsNetwork, _ip

__all__ = [
    "HOSTS",
    "SCENARIOS",
    "ChecksumLoad",
    "FailoverRun",
    "HaDeployment",
    "StorageNode",
    "run_scenario",
    "summarize",
]

#: hosts a deployment needs: 3 etcd + 2 masters + 2 storage nodes
HOSTS: Final = 7
#: same-host shortcuts off: these "hosts" share one kernel, real ones do not
_NO_SHORTCUTS: Final = {"PYMOONCAKE_SAME_HOST": "0"}
_NODE_READY: Final = r"mooncake_client ready: segment (\S+) contributes"
#: what a storage node logs when a master did not know it (it was expired)
_EXPIRED_MARK: Final = "does not know this client"


def value_of(key: str, size: int) -> bytes:
    """The bytes stored under ``key``: derived from the key, so a read that
    returns another object's bytes, or stale ones, does not compare equal."""
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


# ---------------------------------------------------------------------------------
# the deployment
# ---------------------------------------------------------------------------------


@dataclass
class StorageNode:
    """A ``mooncake_client`` process on one host."""

    node: NodeProcess
    host: Host
    segment: str

    @property
    def alive(self) -> bool:
        return self.node.proc.poll() is None

    def was_expired(self) -> bool:
        """Whether a master told this node it did not know it (it re-mounted)."""
        return any(_EXPIRED_MARK in line for line in self.node.lines)


class HaDeployment:
    """etcd, two HA masters and two storage nodes on seven namespace hosts.

    Args:
        net: a network with at least :data:`HOSTS` hosts.
        lease_ttl_s: the masters' ``--ha_lease_ttl_sec``.
        segment: each storage node's ``--global_segment_size``.
        env: more environment for masters and storage nodes (e.g. a cluster token).

    Raises:
        EtcdStartError, RuntimeError: a part did not start (what was started is
            stopped again).
    """

    def __init__(
        self,
        net: NetnsNetwork,
        *,
        lease_ttl_s: int = 2,
        segment: str = "64 MB",
        env: dict[str, str] | None = None,
    ) -> None:
        if len(net.hosts) < HOSTS:
            raise ValueError(f"a deployment needs {HOSTS} hosts, the network has {len(net.hosts)}")
        self.net = net
        self.lease_ttl_s = lease_ttl_s
        self.cluster_id = f"ha-{uuid.uuid4().hex[:8]}"
        self.env = {**_NO_SHORTCUTS, **(env or {})}
        self.etcd_hosts = net.hosts[0:3]
        self.master_hosts = net.hosts[3:5]
        self.node_hosts = net.hosts[5:7]
        self.masters: HaMasters | None = None
        self.nodes: list[StorageNode] = []
        self._clients: list[StoreClient] = []
        self.etcd = EtcdCluster(3, namespaces=self.etcd_hosts)
        try:
            self.masters = HaMasters(
                self.etcd.endpoints,
                2,
                lease_ttl_s=lease_ttl_s,
                cluster_id=self.cluster_id,
                namespaces=self.master_hosts,
                env=self.env,
            )
            self.nodes = self._start_nodes(self.node_hosts, segment)
        except BaseException:
            self.close()
            raise

    @property
    def group(self) -> HaMasters:
        assert self.masters is not None
        return self.masters

    @property
    def master_address(self) -> str:
        """``etcd://h1:2379;h2:2379;h3:2379``: every client's master_server_addr."""
        return self.etcd.url

    def _start_nodes(self, hosts: Sequence[Host], segment: str) -> list[StorageNode]:
        env = {**self.env, "MC_STORE_CLUSTER_ID": self.cluster_id}
        started = []
        for host in hosts:  # start all, then wait: they start while the masters elect
            args = [
                "-m",
                "pymooncake.cli.store_client",
                f"--host={host.address}",
                f"--master_server_address={self.master_address}",
                f"--metadata_server={self.etcd.url}",
                f"--global_segment_size={segment}",
            ]
            started.append(
                (_spawn(f"mooncake_client@{host.address}", args, env, host.command), host)
            )
        nodes = []
        for node, host in started:
            try:
                segment_name = node.wait_for(_NODE_READY, timeout_s=60).group(1)
            except BaseException:
                for other, _ in started:
                    other.kill()
                raise
            nodes.append(StorageNode(node, host, segment_name))
        return nodes

    def client(self, **config: Any) -> StoreClient:
        """A pure client (no segment) in the root namespace, on the bridge address;
        closed with the deployment."""
        gateway = self.net.gateway
        settings: dict[str, Any] = {
            "local_hostname": gateway,
            "metadata_server": self.etcd.url,
            "master_server_addr": self.master_address,
            "global_segment_size": 0,
            "local_buffer_size": 16 << 20,
            "cluster_id": self.cluster_id,
            "rpc_timeout_s": 30.0,
            "engine": EngineConfig(
                tcp_bind_address=gateway,
                same_host_transport=False,
                connect_timeout_s=2.0,
                transfer_timeout_s=10.0,
            ),
            **config,
        }
        client = StoreClient(StoreClientConfig(**settings))
        self._clients.append(client)
        return client

    # --- faults -------------------------------------------------------------------

    def cut_from_etcd(self, master: HaMaster) -> None:
        """Drop every packet from ``master``'s host to the etcd hosts (blackhole
        routes in its namespace; clients and the other master still reach it)."""
        assert master.netns is not None
        for host in self.etcd_hosts:
            _ip("route", "add", "blackhole", f"{host.address}/32", netns=master.netns.netns)

    def reconnect_to_etcd(self, master: HaMaster) -> None:
        assert master.netns is not None
        for host in self.etcd_hosts:
            _ip(
                "route",
                "del",
                "blackhole",
                f"{host.address}/32",
                netns=master.netns.netns,
                check=False,
            )

    def etcd_raft_leader(self) -> EtcdMember:
        """The etcd member that leads the Raft group now."""
        from .._etcd import EtcdClient

        for member in self.etcd.members:
            if not member.running:
                continue
            with EtcdClient(member.endpoint, timeout_s=2.0) as etcd:
                status = etcd.status()
            if str(status.get("leader")) == str(status.get("header", {}).get("member_id")):
                return member
        raise RuntimeError(f"no etcd member of {self.etcd} leads")

    # --- checks ----------------------------------------------------------------------

    def expired_nodes(self, leader: HaMaster) -> list[str]:
        """Storage nodes the leader no longer lists, or that had to re-mount."""
        mounted = set(leader.segments())
        return [
            n.segment
            for n in self.nodes
            if n.alive and (n.segment not in mounted or n.was_expired())
        ]

    def close(self) -> None:
        """Stop clients, storage nodes, masters and etcd; idempotent."""
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        for n in self.nodes:
            n.node.stop()
        self.nodes.clear()
        if self.masters is not None:
            self.masters.close()
            self.masters = None
        self.etcd.close()

    def __enter__(self) -> HaDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------
# the load
# ---------------------------------------------------------------------------------


@dataclass
class _LoadCounts:
    puts_ok: int = 0
    put_errors: int = 0
    gets_ok: int = 0
    get_errors: int = 0
    corrupt: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    #: the first message of each kind of error (what failed, and why)
    messages: dict[str, str] = field(default_factory=dict)


class ChecksumLoad:
    """``threads`` threads each putting fresh keys and reading acknowledged ones back.

    Every key is put once; a put that returned True is *acknowledged* (recorded
    with its size).  Each read of an acknowledged key compares every byte with
    :func:`value_of`; a mismatch is a corrupt read.  Each thread paces itself to
    ``rate`` put+get rounds a second (so the bytes stored stay far below the
    pool) and stops after ``max_rounds`` rounds, at :meth:`stop`, or after
    ``max_s`` seconds, whichever comes first.

    Args:
        sizes: object sizes to choose from.
    """

    def __init__(
        self,
        client: StoreClient,
        *,
        threads: int = 2,
        rate: float = 100.0,
        sizes: Sequence[int] = (512, 4096, 16384),
        prefix: str = "",
        max_rounds: int = 20_000,
        max_s: float = 120.0,
    ) -> None:
        self.client = client
        self.prefix = prefix or f"load-{uuid.uuid4().hex[:6]}"
        self._threads_n = threads
        self._period = 1.0 / rate
        self._sizes = tuple(sizes)
        self._max_rounds = max_rounds
        self._max_s = max_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        #: acknowledged key -> size
        self.acked: dict[str, int] = {}
        #: monotonic times at which puts were acknowledged
        self.acked_at: list[float] = []
        self.counts = _LoadCounts()

    def start(self) -> None:
        for i in range(self._threads_n):
            t = threading.Thread(target=self._run, args=(i,), name=f"ha-load-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
            if t.is_alive():
                raise RuntimeError(f"load thread {t.name} did not stop within {timeout_s:g} s")
        self._threads.clear()

    def wait_acked(self, n: int, timeout_s: float = 30.0, *, after: float = 0.0) -> None:
        """Until ``n`` puts were acknowledged (after monotonic time ``after``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if sum(1 for t in self.acked_at if t > after) >= n:
                    return
            if not any(t.is_alive() for t in self._threads):
                break
            time.sleep(0.02)
        raise RuntimeError(
            f"the load did not get {n} put(s) acknowledged within {timeout_s:g} s: {self.counts}"
        )

    def _count_error(self, what: str, exc: BaseException) -> None:
        name = f"{what}:{type(exc).__name__}"
        with self._lock:
            if what == "put":
                self.counts.put_errors += 1
            else:
                self.counts.get_errors += 1
            self.counts.errors[name] = self.counts.errors.get(name, 0) + 1
            self.counts.messages.setdefault(name, str(exc)[:500])

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        mine: list[str] = []
        end = time.monotonic() + self._max_s
        next_round = time.monotonic()
        for n in range(self._max_rounds):
            if self._stop.is_set() or time.monotonic() > end:
                return
            key = f"{self.prefix}-{index}-{n}"
            size = rng.choice(self._sizes)
            try:
                ok = self.client.put(key, value_of(key, size))
            except MooncakeError as exc:
                self._count_error("put", exc)
            else:
                if ok:
                    now = time.monotonic()
                    with self._lock:
                        self.acked[key] = size
                        self.acked_at.append(now)
                        self.counts.puts_ok += 1
                    mine.append(key)
            if mine:
                self._check_one(rng.choice(mine))
            next_round += self._period
            delay = next_round - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_round = time.monotonic()

    def _check_one(self, key: str) -> None:
        try:
            got = self.client.get(key)
        except MooncakeError as exc:
            self._count_error("get", exc)
            return
        good = got == value_of(key, self.acked[key])
        with self._lock:
            if good:
                self.counts.gets_ok += 1
            else:
                self.counts.corrupt += 1

    def longest_gap(self, since: float, until: float) -> float:
        """The longest time without an acknowledged put from the last one before
        ``since`` (e.g. the fault) to ``until``."""
        with self._lock:
            before = [t for t in self.acked_at if t <= since]
            times = sorted(t for t in self.acked_at if since < t <= until)
        points = [max(before, default=since), *times, until]
        return max(b - a for a, b in itertools.pairwise(points))

    def verify(self, client: StoreClient | None = None) -> tuple[list[str], list[str]]:
        """Read every acknowledged key; returns (lost, corrupt) keys."""
        reader = client or self.client
        keys = list(self.acked)
        lost: list[str] = []
        corrupt: list[str] = []
        for i in range(0, len(keys), 256):
            chunk = keys[i : i + 256]
            for key, got in zip(chunk, reader.get_many(chunk), strict=True):
                if isinstance(got, StoreError):
                    lost.append(f"{key}: {got}")
                elif got != value_of(key, self.acked[key]):
                    corrupt.append(key)
        return lost, corrupt


# ---------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------


@dataclass
class FailoverRun:
    """What one fault under load looked like."""

    scenario: str
    #: fault -> a master other than the old leader serves (None: no failover)
    leader_s: float | None
    #: the longest time without an acknowledged put, from the last one before the
    #: fault until the load stopped
    client_gap_s: float
    #: fault -> the old leader stopped serving (etcd_cut)
    fenced_s: float | None = None
    acked: int = 0
    lost: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    corrupt_reads: int = 0
    expired: list[str] = field(default_factory=list)
    load_errors: dict[str, int] = field(default_factory=dict)
    #: scenario-specific observations (e.g. the refused direct RPC)
    notes: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "leader_s": self.leader_s,
            "client_gap_s": round(self.client_gap_s, 3),
            "fenced_s": self.fenced_s,
            "acked": self.acked,
            "lost": len(self.lost),
            "corrupt": len(self.corrupt) + self.corrupt_reads,
            "expired": len(self.expired),
            "load_errors": self.load_errors,
            **self.notes,
        }


def _wait(cond: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> float:
    """Poll ``cond`` until true; returns the seconds waited (RuntimeError after ``timeout_s``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if cond():
            return time.monotonic() - start
        time.sleep(poll_s)
    raise RuntimeError(f"{what}: not within {timeout_s:g} s")


def _new_leader(group: HaMasters, old: HaMaster, t0: float, timeout_s: float) -> HaMaster:
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        for m in group.masters:
            if m is not old and m.alive and m.role(timeout_s=0.5) == "leader":
                return m
        time.sleep(0.02)
    raise RuntimeError(f"no new leader within {timeout_s:g} s of the fault")


def refused_directly(master: HaMaster) -> dict[str, int]:
    """Send a read and a write straight to ``master`` (not through etcd); returns
    their error codes (0: it served them)."""
    direct = MasterClient(master.rpc, timeout_s=3.0, same_host_rpc=False, reconnect_s=0)
    codes: dict[str, int] = {}
    try:
        for name, req in (
            ("read", msg.ExistKey("probe")),
            ("write", msg.PutStart("probe-client", "probe", 100, msg.ReplicateParams())),
        ):
            try:
                direct.call(req, patient=False)
                codes[name] = 0
            except StoreError as exc:
                codes[name] = exc.code
    finally:
        direct.close()
    return codes


def _rejoined(group: HaMasters, leader: HaMaster, old: HaMaster, timeout_s: float) -> float:
    """Wait until ``old`` is a standby that names ``leader`` and is in its commit barrier."""

    def ok() -> bool:
        try:
            mine = old.status()
            standbys = leader.status()["standbys"]
        except OSError:
            return False
        return (
            not mine["serving"]
            and mine["role"] == "standby"
            and mine["leader"] == leader.rpc
            and any(s["ready"] and s["standby"] == old.rpc for s in standbys)
        )

    return _wait(ok, timeout_s, f"{old.rpc} rejoining {leader.rpc} as a standby")


def run_scenario(
    dep: HaDeployment,
    scenario: str,
    load: ChecksumLoad,
    *,
    warm_puts: int = 100,
    after_puts: int = 100,
) -> FailoverRun:
    """Inject ``scenario``'s fault under ``load`` (started here, stopped before
    returning), wait for the cluster to serve again, verify every acknowledged
    object; leaves the deployment with a leader and an in-sync standby."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {sorted(SCENARIOS)}")
    group = dep.group
    ttl = dep.lease_ttl_s
    leader = group.leader()
    group.wait_in_sync(leader)
    load.start()
    try:
        load.wait_acked(warm_puts)
        t0 = time.monotonic()
        new, notes, fenced = SCENARIOS[scenario](dep, leader, t0)
        leader_s = None if new is leader else notes.pop("leader_s")
        load.wait_acked(after_puts, timeout_s=60, after=time.monotonic())
        t_end = time.monotonic()
    finally:
        load.stop()
    lost, corrupt = load.verify()
    run = FailoverRun(
        scenario,
        leader_s,
        load.longest_gap(t0, t_end),
        fenced,
        acked=len(load.acked),
        lost=lost,
        corrupt=corrupt,
        corrupt_reads=load.counts.corrupt,
        expired=dep.expired_nodes(new),
        load_errors=dict(load.counts.errors),
        notes={**notes, "error_messages": dict(load.counts.messages)}
        if load.counts.messages
        else notes,
    )
    # leave a leader and an in-sync standby for the next run
    for m in list(group.masters):
        if not m.alive:
            group.restart(m)
    group.wait_in_sync(group.leader(), timeout_s=10 * ttl)
    return run


Outcome = tuple[HaMaster, dict[str, Any], "float | None"]


def _sigkill(dep: HaDeployment, leader: HaMaster, t0: float) -> Outcome:
    leader.node.kill(signal.SIGKILL)
    new = _new_leader(dep.group, leader, t0, 10 * dep.lease_ttl_s)
    return new, {"leader_s": time.monotonic() - t0}, None


def _sigstop(dep: HaDeployment, leader: HaMaster, t0: float) -> Outcome:
    leader.node.proc.send_signal(signal.SIGSTOP)
    try:
        new = _new_leader(dep.group, leader, t0, 10 * dep.lease_ttl_s)
        leader_s = time.monotonic() - t0
    finally:
        leader.node.proc.send_signal(signal.SIGCONT)
    # woken past its lease: it must refuse at once, then follow the new leader
    codes = refused_directly(leader)
    status = leader.status(timeout_s=5.0)
    rejoin_s = _rejoined(dep.group, new, leader, 10 * dep.lease_ttl_s)
    notes = {
        "leader_s": leader_s,
        "refused_codes": codes,
        "woken_role": status["role"],
        "woken_serving": status["serving"],
        "rejoin_s": round(rejoin_s, 3),
    }
    return new, notes, None


def _etcd_cut(dep: HaDeployment, leader: HaMaster, t0: float) -> Outcome:
    dep.cut_from_etcd(leader)
    try:
        fenced = _wait(
            lambda: not leader.status(timeout_s=2.0)["serving"],
            5 * dep.lease_ttl_s,
            f"{leader.rpc} to stop serving without etcd",
            poll_s=0.02,
        )
        new = _new_leader(dep.group, leader, t0, 10 * dep.lease_ttl_s)
        leader_s = time.monotonic() - t0
        codes = refused_directly(leader)
    finally:
        dep.reconnect_to_etcd(leader)
    rejoin_s = _rejoined(dep.group, new, leader, 10 * dep.lease_ttl_s)
    notes = {"leader_s": leader_s, "refused_codes": codes, "rejoin_s": round(rejoin_s, 3)}
    return new, notes, round(fenced, 3)


def _etcd_restart(dep: HaDeployment, leader: HaMaster, t0: float) -> Outcome:
    member = dep.etcd_raft_leader()
    before = {m.rpc: (m.role(), m.status()["failovers"]) for m in dep.group.masters}
    member.stop()
    down_until = time.monotonic() + 2 * dep.lease_ttl_s
    not_serving = 0
    samples = 0
    while time.monotonic() < down_until:  # the leader serves all along
        samples += 1
        if leader.role(timeout_s=1.0) != "leader":
            not_serving += 1
        time.sleep(0.05)
    member.start()
    for _ in range(20):  # and goes on serving while the member catches up
        samples += 1
        if leader.role(timeout_s=1.0) != "leader":
            not_serving += 1
        time.sleep(0.05)
    after = {m.rpc: (m.role(), m.status()["failovers"]) for m in dep.group.masters}
    notes = {
        "etcd_member": member.name,
        "samples_not_serving": not_serving,
        "samples": samples,
        "roles_changed": before != after,
        "down_s": round(time.monotonic() - t0, 3),
    }
    return leader, notes, None


#: scenario name -> fault; each returns the leader afterwards, notes and the
#: seconds until the old leader stopped serving (where measured)
SCENARIOS: Final[dict[str, Callable[[HaDeployment, HaMaster, float], Outcome]]] = {
    "sigkill": _sigkill,
    "sigstop": _sigstop,
    "etcd_cut": _etcd_cut,
    "etcd_restart": _etcd_restart,
}

NOT_LEADER: Final = int(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of measured seconds."""
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }
