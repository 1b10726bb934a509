"""Master high availability: leader election through etcd, as the reference does it.

Theory of operation
-------------------
Every master of a cluster runs an :class:`Elector` thread.  It grants an etcd
lease of ``lease_ttl_s`` (reference: 5 s) and tries to create
``mooncake-store/<cluster_id>/master_view`` -- value: its RPC address -- with a
create-if-absent transaction bound to that lease.

* The winner keeps the lease alive (``KeepAlive``: its ``deadline`` is a quarter
  lease period before etcd's earliest expiry, :data:`LEADER_SAFETY`) and **warms
  up** for one lease period before it serves: by then any previous leader's
  lease has expired, and a previous
  leader stops serving the moment its own deadline passes (``fenced``), even
  if it was frozen (SIGSTOP) and did not notice.  It serves until its lease is
  lost (etcd unreachable past the deadline, or the key revoked); then it stops
  serving at once and campaigns again as a standby.
* The others are standbys: they read the key's value (the leader's address),
  follow the leader's effect stream (``_replication.py``) so that their state
  equals the leader's, and watch the key; when it goes away they campaign.
* A standby whose stream ended and whose leader then *refuses* connections
  (no process listens on its RPC port: it died), or answers that it no longer
  leads (it stopped serving at its lease deadline: cut off from etcd), revokes
  the leader's lease instead of waiting for etcd to expire it
  (:meth:`Elector.leader_gone`).  Fencing still holds: the old leader stopped
  serving at its deadline, at most 3/4 of a lease period after its last renewal,
  which came before the revocation; the new leader serves one lease period
  after it won, which came after.
* **A frozen leader** (SIGSTOP, a hung process) neither refuses connections
  (the kernel still accepts them) nor answers.  Its stream falls silent (a
  leader sends at least an empty frame every ``HEARTBEAT_S``) and it stops
  renewing its lease.  A standby that sees both -- no frame for
  ``silent_after_s`` and etcd's remaining TTL of the leader's lease showing a
  renewal missed by more than :data:`RENEWAL_SLACK_S` -- revokes that lease
  rather than wait up to a lease period for etcd to expire it.  A leader that
  is merely cut off from its standby keeps renewing (nothing is revoked); one
  cut off from etcd keeps streaming (the path above).  Fencing holds as for a
  dead leader: revoked, it renews no more.

``view_version`` is the etcd revision at which the leader created the key;
clients see it in Ping replies.  Clients given ``etcd://h1:2379;h2:2379`` read
the same key to find the leader (``_master_client.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..._etcd import EtcdClient, EtcdError, KeepAlive

__all__ = ["DEFAULT_LEASE_TTL_S", "Elector", "HaConfig", "master_view_key"]

log = logging.getLogger("pymooncake.master.ha")

#: reference DEFAULT_MASTER_VIEW_LEASE_TTL_SEC
DEFAULT_LEASE_TTL_S: Final = 5
#: the leader stops serving this share of a lease period before its lease could
#: expire in etcd: cut off from etcd, it stops at most 3/4 of a period after its
#: last renewal, and a standby that hears so takes over (after its warm-up of one
#: period) within two periods of the cut
LEADER_SAFETY: Final = 0.25
#: how often a standby re-reads the key when its watch is quiet (reference: 200 ms poll)
_POLL_S: Final = 1.0
#: a leader's renewal must be this late, beyond its interval, before a standby
#: whose stream fell silent revokes its lease (see "a frozen leader")
RENEWAL_SLACK_S: Final = 0.25


def master_view_key(cluster_id: str) -> str:
    """The etcd key naming the leader (reference layout)."""
    return f"mooncake-store/{cluster_id}/master_view"


@dataclass(frozen=True)
class HaConfig:
    """``--enable_ha`` settings."""

    etcd_endpoints: str
    cluster_id: str = "mooncake_cluster"
    lease_ttl_s: int = DEFAULT_LEASE_TTL_S
    #: the address written into the key (this master's RPC address as peers reach it)
    advertise: str = ""


class Elector:
    """Campaigns for leadership in a background thread.

    Args:
        on_standby: ``(leader address, view_version)`` -- someone else leads.
        on_leader: ``(view_version, keepalive)`` -- this master leads now (after
            the warm-up); ``keepalive.deadline`` bounds when it may serve.
        on_lost: ``(reason)`` -- leadership is gone; stop serving now.
        All are called on the elector's thread.
        stream_silence: seconds since this standby last heard its leader's
            stream (None: not following one); with ``silent_after_s``, the
            standby's test for a frozen leader.
    """

    def __init__(
        self,
        config: HaConfig,
        *,
        on_standby: Callable[[str, int], None],
        on_leader: Callable[[int, KeepAlive], None],
        on_lost: Callable[[str], None],
        stream_silence: Callable[[], float | None] | None = None,
        silent_after_s: float = 1.0,
    ) -> None:
        self.config = config
        self.key = master_view_key(config.cluster_id)
        self._etcd = EtcdClient(config.etcd_endpoints, timeout_s=2.0, connect_timeout_s=1.0)
        self._on_standby = on_standby
        self._on_leader = on_leader
        self._on_lost = on_lost
        self._stream_silence = stream_silence
        self._silent_after = silent_after_s
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mc-master-ha", daemon=True)
        self.role = "starting"
        self.leader = ""
        self.view_version = 0
        self.elections = 0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._lost.set()
        self._thread.join(10)
        self._etcd.close()

    def leader_gone(self, leader: str) -> bool:
        """The leader at ``leader`` refuses connections (its process is gone) or
        says it no longer leads: revoke its lease so that the election starts now.
        Blocking (etcd calls); returns whether a lease was revoked."""
        if self.role != "standby" or self.leader != leader:
            return False
        with EtcdClient(self.config.etcd_endpoints, timeout_s=2.0, connect_timeout_s=1.0) as etcd:
            kv = etcd.get(self.key)
            # only the lease of the leader that refused (a new leader may have won
            # meanwhile: its key names another address)
            if kv is None or not kv.lease or kv.value.decode(errors="replace") != leader:
                return False
            revoked = etcd.lease_revoke(kv.lease)
        if revoked:
            log.warning(
                "HA: the leader %s refuses connections (its process is gone) or no longer "
                "leads; revoked its etcd lease %x so that the election need not wait for "
                "it to expire",
                leader,
                kv.lease,
            )
        return revoked

    # --- the campaign ------------------------------------------------------------

    def _run(self) -> None:
        pause = 0.2
        while not self._stop.is_set():
            try:
                self._campaign()
                pause = 0.2
            except EtcdError as exc:
                if self.role == "leader":
                    self._step_down(f"etcd failed: {exc}")
                log.warning("HA: %s; retrying in %.1f s", exc, pause)
                self.role = "candidate"
                self._stop.wait(pause)
                pause = min(pause * 2, 2.0)

    def _campaign(self) -> None:
        ttl = self.config.lease_ttl_s
        granted_at = time.monotonic()
        lease = self._etcd.lease_grant(ttl)
        result = self._etcd.create(self.key, self.config.advertise.encode(), lease=lease.id)
        if not result.created:
            self._etcd.lease_revoke(lease.id)
            existing = result.existing
            if existing is not None:
                self._follow(existing.value.decode(errors="replace"), existing.create_revision)
            self._wait_for_vacancy(result.revision)
            return
        self.view_version = result.revision
        self._lost.clear()
        keep = self._etcd.keep_alive(
            lease.id,
            lease.ttl_s,
            interval_s=min(1.0, lease.ttl_s / 3),
            on_lost=self._lease_lost,
            granted_at=granted_at,
            safety_s=lease.ttl_s * LEADER_SAFETY,
        )
        try:
            self.role = "warmup"
            log.info(
                "HA: won the election for %s (view %d); warming up for %d s before serving",
                self.key,
                self.view_version,
                ttl,
            )
            # fencing by time: any earlier leader's lease has expired by the end
            if self._lost.wait(float(ttl)) or self._stop.is_set():
                return
            self.role = "leader"
            self.leader = self.config.advertise
            self.elections += 1
            self._on_leader(self.view_version, keep)
            self._lost.wait()
            if not self._stop.is_set():
                self._step_down("the etcd lease was lost")
        finally:
            keep.close(revoke=self._stop.is_set())

    def _lease_lost(self, reason: str) -> None:
        self._lost.set()

    def _step_down(self, reason: str) -> None:
        if self.role == "leader":
            log.error("HA: no longer the leader (%s); stopped serving", reason)
            self._on_lost(reason)
        self.role = "standby"

    def _follow(self, leader: str, view_version: int) -> None:
        if (leader, view_version) != (self.leader, self.view_version):
            self.leader, self.view_version = leader, view_version
            log.info("HA: standby; the leader is %s (view %d)", leader, view_version)
            self._on_standby(leader, view_version)
        self.role = "standby"

    def _wait_for_vacancy(self, revision: int) -> None:
        """Block until the leader key is gone (then the caller campaigns)."""
        watch = self._etcd.watch(self.key, start_revision=revision + 1)
        # the frozen-leader test runs more often than the key is re-read
        check_s = min(_POLL_S, max(0.05, self.config.lease_ttl_s / 8))
        reread_at = time.monotonic() + _POLL_S
        try:
            while not self._stop.is_set():
                resp = watch.get(timeout_s=check_s)
                if resp is not None and any(ev.type == "DELETE" for ev in resp.events):
                    return
                if self._revoked_frozen_leader():
                    return
                if resp is None and time.monotonic() < reread_at:
                    continue
                reread_at = time.monotonic() + _POLL_S
                current = self._etcd.get(self.key)
                if current is None:
                    return
                self._follow(current.value.decode(errors="replace"), current.create_revision)
        finally:
            watch.close()

    def _revoked_frozen_leader(self) -> bool:
        """A standby's test for a frozen leader (module docstring): True if the
        leader's lease was revoked (or is gone) and the election may start."""
        silence = self._stream_silence() if self._stream_silence is not None else None
        if silence is None or silence < self._silent_after or self.role != "standby":
            return False
        kv = self._etcd.get(self.key)
        if kv is None:
            return True
        if not kv.lease or kv.value.decode(errors="replace") != self.leader:
            return False  # another leader (the follower moves on) or no lease to judge
        status = self._etcd.lease_time_to_live(kv.lease)
        granted = status.granted_ttl_s or self.config.lease_ttl_s
        interval = min(1.0, granted / 3)  # the leader's renewal interval (_campaign)
        # etcd reports whole seconds, rounded down: the true remaining TTL is below
        # ttl_s + 1, and a leader renewing on time keeps it above granted - interval
        if status.ttl_s > 0 and status.ttl_s + 1 > granted - interval - RENEWAL_SLACK_S:
            return False
        revoked = self._etcd.lease_revoke(kv.lease)
        log.warning(
            "HA: the leader %s sent nothing for %.1f s and missed its etcd lease renewal "
            "(%d s of %d s left): it is frozen or hung; %s its lease %x so that the "
            "election need not wait for it to expire",
            self.leader,
            silence,
            status.ttl_s,
            granted,
            "revoked" if revoked else "etcd had already dropped",
            kv.lease,
        )
        return True
