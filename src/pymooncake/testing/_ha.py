"""HA master groups for tests: several ``mooncake_master --enable_ha`` processes
electing through one etcd, on 127.0.0.1 or each on a "host" of a
:class:`~pymooncake.testing.NetnsNetwork` (``namespaces=``)."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..store import StoreClient, StoreClientConfig
from ._cluster import LOCAL, NodeProcess, _spawn
from ._netns import Host

#: admin requests never go through an http_proxy from the environment
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

__all__ = ["HaMaster", "HaMasters"]


@dataclass
class HaMaster:
    """One master of the group: its process and addresses."""

    node: NodeProcess
    rpc: str
    admin: str  # http://host:port
    host: str = LOCAL
    netns: Host | None = None

    @property
    def alive(self) -> bool:
        return self.node.proc.poll() is None

    def get(self, path: str, timeout_s: float = 1.0) -> bytes:
        """GET ``path`` of the admin port (OSError when nobody answers)."""
        with _OPENER.open(f"{self.admin}{path}", timeout=timeout_s) as resp:
            return bytes(resp.read())

    def status(self, timeout_s: float = 1.0) -> dict[str, Any]:
        """``/ha_status`` (raises OSError when the process does not answer)."""
        return dict(json.loads(self.get("/ha_status", timeout_s)))

    def segments(self, timeout_s: float = 5.0) -> list[str]:
        """``/get_all_segments``: the segments this master knows to be mounted."""
        return self.get("/get_all_segments", timeout_s).decode().split()

    def role(self, timeout_s: float = 1.0) -> str:
        """ "leader" while it serves, "standby" when it does not (whatever its
        HA state: standby, warming up, fenced), "down" when its admin port does
        not answer."""
        try:
            status = self.status(timeout_s)
        except OSError:
            return "down"
        return "leader" if status["serving"] else "standby"


class HaMasters:
    """``n`` masters of one cluster id electing through ``etcd_endpoints``.

    Args:
        flags: extra ``mooncake_master`` flags for every master.
        hosts: the address each master binds to (default 127.0.0.1 for all).
        namespaces: a network-namespace host per master to run it in (its
            address is then the master's unless ``hosts`` says otherwise).
    """

    def __init__(
        self,
        etcd_endpoints: str,
        n: int = 2,
        *,
        lease_ttl_s: int = 2,
        flags: Sequence[str] = (),
        cluster_id: str | None = None,
        hosts: Sequence[str] | None = None,
        namespaces: Sequence[Host] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.etcd_endpoints = etcd_endpoints
        self.cluster_id = cluster_id or f"test-{uuid.uuid4().hex[:8]}"
        self.lease_ttl_s = lease_ttl_s
        self._flags = list(flags)
        self._env = dict(env or {})
        if namespaces is not None and len(namespaces) != n:
            raise ValueError("namespaces needs one host per master")
        if hosts is None:
            hosts = [ns.address for ns in namespaces] if namespaces else [LOCAL] * n
        self.masters: list[HaMaster] = []
        try:
            for i in range(n):
                self.masters.append(
                    self.start(hosts[i], None if namespaces is None else namespaces[i])
                )
        except BaseException:
            self.close()
            raise

    @property
    def client_address(self) -> str:
        """What clients pass as master_server_addr."""
        return f"etcd://{self.etcd_endpoints}"

    def client(self, **config: Any) -> StoreClient:
        """A store client of this cluster on 127.0.0.1 (P2P handshake metadata, a
        64 MiB segment, a 30 s RPC timeout); ``config`` overrides any
        :class:`StoreClientConfig` field.  The caller closes it."""
        settings: dict[str, Any] = {
            "local_hostname": LOCAL,
            "metadata_server": "P2PHANDSHAKE",
            "master_server_addr": self.client_address,
            "global_segment_size": 64 << 20,
            "local_buffer_size": 16 << 20,
            "cluster_id": self.cluster_id,
            "rpc_timeout_s": 30.0,
            **config,
        }
        return StoreClient(StoreClientConfig(**settings))

    def start(self, host: str = LOCAL, netns: Host | None = None) -> HaMaster:
        """Start one more master bound to ``host`` (inside ``netns`` if given);
        the caller adds it to :attr:`masters` (see :meth:`restart`)."""
        args = [
            "-m",
            "pymooncake.cli.master",
            f"--rpc_address={host}",
            "--port=0",
            f"--metrics_host={host}",
            "--metrics_port=0",
            "--enable_ha=true",
            f"--etcd_endpoints={self.etcd_endpoints}",
            f"--cluster_id={self.cluster_id}",
            f"--ha_lease_ttl_sec={self.lease_ttl_s}",
            "--enable_metric_reporting=false",
            *self._flags,
        ]
        env = {"MC_TCP_BIND_ADDRESS": host, **self._env}
        node = _spawn(
            f"mooncake_master(ha)@{host}",
            args,
            env,
            None if netns is None else netns.command,
        )
        try:
            admin = node.wait_for(r"admin HTTP server listening on (http://\S+)").group(1)
            rpc = node.wait_for(r"Master service started on (\S+)").group(1)
        except BaseException:
            node.kill()
            raise
        return HaMaster(node, rpc, admin, host, netns)

    def restart(self, master: HaMaster) -> HaMaster:
        """Kill ``master`` if it still runs and start a fresh one on its host
        (a new process: it joins as a standby when another master leads)."""
        if master.alive:
            master.node.proc.send_signal(signal.SIGCONT)
            master.node.kill()
        new = self.start(master.host, master.netns)
        self.masters[self.masters.index(master)] = new
        return new

    def leader(self, timeout_s: float = 30.0) -> HaMaster:
        """The master serving as leader (waits for an election)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in self.masters:
                if m.alive and m.role() == "leader":
                    return m
            time.sleep(0.05)
        raise RuntimeError(f"no HA master became the leader within {timeout_s:g} s")

    def wait_in_sync(self, leader: HaMaster, timeout_s: float = 30.0) -> None:
        """Until a standby is in the leader's commit barrier."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if any(s["ready"] for s in leader.status()["standbys"]):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"no standby got in sync with {leader.rpc} within {timeout_s:g} s")

    def wait_replicated(self, leader: HaMaster, timeout_s: float = 30.0) -> None:
        """Until a standby acknowledged everything ``leader`` had streamed when this
        was called -- reservations too, which no reply waits for (an idle
        leader's heartbeat asks for the acknowledgement within 0.2 s)."""
        standbys = leader.status()["standbys"]
        target = max((s["seq"] for s in standbys), default=0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(s["acked"] >= target for s in leader.status()["standbys"]):
                return
            time.sleep(0.02)
        raise RuntimeError(
            f"no standby of {leader.rpc} acknowledged stream frame {target} within {timeout_s:g} s"
        )

    def new_leader(self, old: HaMaster, timeout_s: float = 60.0) -> tuple[HaMaster, float]:
        """Wait for a leader other than ``old``; returns it and the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            for m in self.masters:
                if m is not old and m.alive and m.role() == "leader":
                    return m, time.monotonic() - start
            time.sleep(0.05)
        raise RuntimeError(f"no new leader within {timeout_s:g} s")

    def close(self) -> None:
        for m in self.masters:
            if m.node.proc.poll() is not None:
                continue
            try:
                m.node.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            m.node.stop()
        self.masters.clear()

    def __enter__(self) -> HaMasters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
