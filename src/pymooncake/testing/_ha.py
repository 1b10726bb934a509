"""HA master groups for tests: several ``mooncake_master --enable_ha`` processes
electing through one etcd, on 127.0.0.1 (or in network namespaces)."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._cluster import LOCAL, NodeProcess, _spawn

__all__ = ["HaMaster", "HaMasters"]


@dataclass
class HaMaster:
    """One master of the group: its process and addresses."""

    node: NodeProcess
    rpc: str
    admin: str  # http://host:port

    def status(self, timeout_s: float = 1.0) -> dict[str, Any]:
        """``/ha_status`` (raises OSError when the process does not answer)."""
        with urllib.request.urlopen(f"{self.admin}/ha_status", timeout=timeout_s) as resp:
            return dict(json.loads(resp.read()))

    def role(self) -> str:
        try:
            return str(self.status()["role"]) if self.status()["serving"] else "standby"
        except OSError:
            return "down"


class HaMasters:
    """``n`` masters of one cluster id electing through ``etcd_endpoints``.

    Args:
        flags: extra ``mooncake_master`` flags for every master.
        wrap: turns a command line into the one to run (e.g. ``ip netns exec``).
        hosts: the address each master binds to (default 127.0.0.1 for all).
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
        env: dict[str, str] | None = None,
    ) -> None:
        self.etcd_endpoints = etcd_endpoints
        self.cluster_id = cluster_id or f"test-{uuid.uuid4().hex[:8]}"
        self.lease_ttl_s = lease_ttl_s
        self._flags = list(flags)
        self._env = {"MC_TCP_BIND_ADDRESS": LOCAL, **(env or {})}
        self.masters: list[HaMaster] = []
        try:
            for i in range(n):
                self.masters.append(self.start((hosts or [LOCAL] * n)[i]))
        except BaseException:
            self.close()
            raise

    @property
    def client_address(self) -> str:
        """What clients pass as master_server_addr."""
        return f"etcd://{self.etcd_endpoints}"

    def start(
        self, host: str = LOCAL, wrap: Callable[[list[str]], list[str]] | None = None
    ) -> HaMaster:
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
        node = _spawn("mooncake_master(ha)", args, self._env)
        try:
            admin = node.wait_for(r"admin HTTP server listening on (http://\S+)").group(1)
            rpc = node.wait_for(r"Master service started on (\S+)").group(1)
        except BaseException:
            node.kill()
            raise
        return HaMaster(node, rpc, admin)

    def leader(self, timeout_s: float = 30.0) -> HaMaster:
        """The master serving as leader (waits for an election)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in self.masters:
                if m.node.proc.poll() is None and m.role() == "leader":
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

    def new_leader(self, old: HaMaster, timeout_s: float = 60.0) -> tuple[HaMaster, float]:
        """Wait for a leader other than ``old``; returns it and the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            for m in self.masters:
                if m is not old and m.node.proc.poll() is None and m.role() == "leader":
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
