"""Keeping an etcd lease alive from a background thread.

The holder of a lease (a leader, a registered node) must know, at any moment,
until when the lease is *certainly* alive, and must learn promptly when it is
not.  :class:`KeepAlive` renews every ``interval_s`` and keeps ``deadline``:
the send time of the last successful renewal plus the TTL etcd granted then.
The send time, not the reply time, because etcd restarts the TTL when it
processes the renewal, which is after the send; so ``deadline`` is never later
than etcd's own expiry, whatever the network delay (``safety_s`` moves it
earlier still).  (Clocks: only this
host's monotonic clock is used.)

When a renewal fails the thread retries quickly; once ``deadline`` passes, or
etcd answers that the lease is gone, the lease is *lost*: ``alive`` turns
False for good and ``on_lost(reason)`` is called once, on the keep-alive
thread.  A lost lease is never revived; grant a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ._errors import EtcdError, EtcdLeaseNotFound

if TYPE_CHECKING:
    from ._client import EtcdClient

__all__ = ["KeepAlive"]

log = logging.getLogger("pymooncake.etcd")

#: after a failed renewal, retry this often (bounded by the interval)
_RETRY_S: Final = 0.2


class KeepAlive:
    """Renews one lease until closed or lost.

    Args:
        client: the etcd client (its endpoints and failover are used).
        lease_id: the lease.
        ttl_s: the TTL granted (the first deadline is ``granted_at + ttl_s``).
        interval_s: time between renewals; default a third of the TTL.
        on_lost: called once, with the reason, when the lease is lost.
        granted_at: ``time.monotonic()`` taken just before the grant request
            was sent (default: now, which is later than the truth by the
            grant's round trip).
        safety_s: end ``deadline`` this much before etcd's earliest expiry (a
            leader that gives up its lease early lets a standby take over
            sooner after it was cut off from etcd).

    Raises:
        ValueError: a TTL or interval that is not positive, or an interval not
            below the TTL less ``safety_s``.
    """

    def __init__(
        self,
        client: EtcdClient,
        lease_id: int,
        ttl_s: float,
        *,
        interval_s: float | None = None,
        on_lost: Callable[[str], None] | None = None,
        granted_at: float | None = None,
        safety_s: float = 0.0,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, not {ttl_s}")
        interval = ttl_s / 3 if interval_s is None else interval_s
        if not 0 < interval < ttl_s - safety_s or safety_s < 0:
            raise ValueError(
                f"keep-alive interval {interval} s must be in (0, TTL={ttl_s} s - safety "
                f"{safety_s} s), the safety >= 0"
            )
        self.lease_id = lease_id
        self.ttl_s = ttl_s
        self.safety_s = safety_s
        self.interval_s = interval
        self.renewals = 0
        self.failures = 0
        self.lost_reason = ""
        self._last_error = ""
        self._client = client
        self._on_lost = on_lost
        self._deadline = (time.monotonic() if granted_at is None else granted_at) + ttl_s - safety_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lost = False
        self._thread = threading.Thread(
            target=self._run, name=f"etcd-keepalive-{lease_id:x}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        state = "lost" if self._lost else ("closed" if self._stop.is_set() else "alive")
        return f"<KeepAlive {self.lease_id:x} {state} remaining={self.remaining_s():.2f}s>"

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` value until which the lease is certainly alive."""
        with self._lock:
            return self._deadline

    def remaining_s(self) -> float:
        """Seconds the lease is certainly alive for (0 once lost)."""
        with self._lock:
            if self._lost:
                return 0.0
            return max(0.0, self._deadline - time.monotonic())

    @property
    def alive(self) -> bool:
        """Not lost, and the deadline has not passed."""
        return self.remaining_s() > 0.0

    @property
    def lost(self) -> bool:
        with self._lock:
            return self._lost

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def renew_now(self) -> float:
        """Renew once from the calling thread (e.g. a warm-up loop that wants
        to see each renewal succeed); returns the new remaining time.

        Raises:
            EtcdLeaseNotFound: the lease is gone (it is then marked lost).
            EtcdUnreachable / EtcdError: this renewal failed (not yet lost).
        """
        self._renew()
        return self.remaining_s()

    def _renew(self) -> None:
        sent = time.monotonic()
        timeout = max(0.05, min(self.interval_s, self._deadline - sent))
        try:
            ttl = self._client.lease_keepalive(self.lease_id, timeout_s=timeout)
        except EtcdLeaseNotFound as exc:
            self._mark_lost(f"etcd says lease {self.lease_id:x} is gone: {exc}")
            raise
        with self._lock:
            if not self._lost:
                self._deadline = max(self._deadline, sent + ttl - self.safety_s)
                self.renewals += 1

    def _mark_lost(self, reason: str) -> None:
        with self._lock:
            if self._lost:
                return
            self._lost = True
            self.lost_reason = reason
        if self._stop.is_set():
            return  # closed meanwhile: nobody waits for news
        log.warning("etcd lease %x lost: %s", self.lease_id, reason)
        if self._on_lost is not None:
            try:
                self._on_lost(reason)
            except Exception:  # a callback's bug must not kill the thread silently
                log.exception("on_lost callback of lease %x failed", self.lease_id)

    def _run(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            if time.monotonic() >= self.deadline:
                self._mark_lost(
                    f"not renewed within its TTL of {self.ttl_s:g} s (last error: "
                    f"{self._last_error or 'none'})"
                )
                return
            try:
                self._renew()
            except EtcdLeaseNotFound:
                return
            except EtcdError as exc:
                if self._stop.is_set():
                    return
                self.failures += 1
                if self.failures == 1 or self.failures % 50 == 0:
                    log.warning(
                        "renewing etcd lease %x failed (%d so far; %.1f s left): %s",
                        self.lease_id,
                        self.failures,
                        self.remaining_s(),
                        exc,
                    )
                self._last_error = str(exc)
                wait = min(_RETRY_S, self.interval_s)
                continue
            wait = self.interval_s

    def stop(self) -> None:
        """Ask the thread to stop, without waiting (see :meth:`close`)."""
        self._stop.set()

    def close(self, *, revoke: bool = False) -> None:
        """Stop renewing (and revoke the lease with ``revoke``); idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if revoke and not self._client.closed:
            try:
                self._client.lease_revoke(self.lease_id)
            except EtcdError as exc:
                log.warning("revoking etcd lease %x failed: %s", self.lease_id, exc)
