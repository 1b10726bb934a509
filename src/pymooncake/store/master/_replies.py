"""The master's reply cache: a retried mutation gets its first attempt's answer.

Theory of operation
-------------------
A client that loses the reply of a mutating request (connection reset after the
master acted) cannot tell whether it was executed.  It therefore re-sends the
*same* request id (``rid``) on a new connection, and the master answers from
this cache instead of executing it again: a retried PutStart gets the same
buffers, a retried Remove gets OK, a retried BatchPutEnd the same per-key codes.

Entries are kept per client in request-id order and dropped when the client
says it will never retry them (``ack``: the lowest request id it may still
retry), after ``ttl_s`` (longer than any client retries: its RPC timeout), or
beyond ``max_per_client``.  Pure bookkeeping; the clock is passed in.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["ReplyCache"]

#: reference MC_RPC_TIMEOUT_MS is 30 s; a client retries within its timeout
DEFAULT_TTL_S: Final = 120.0
#: concurrent requests of one client (its threads) that may await a retry
DEFAULT_MAX_PER_CLIENT: Final = 4096


class ReplyCache:
    """``(client, rid) -> (code, value)`` of recent mutations."""

    def __init__(
        self, ttl_s: float = DEFAULT_TTL_S, max_per_client: int = DEFAULT_MAX_PER_CLIENT
    ) -> None:
        self.ttl_s = ttl_s
        self.max_per_client = max_per_client
        self._clients: dict[str, dict[int, tuple[int, Any, float]]] = {}
        self.hits = 0

    def __len__(self) -> int:
        return sum(len(c) for c in self._clients.values())

    def lookup(self, client_id: str, rid: int) -> tuple[int, Any] | None:
        entries = self._clients.get(client_id)
        if entries is None:
            return None
        got = entries.get(rid)
        if got is None:
            return None
        self.hits += 1
        return got[0], got[1]

    def store(self, client_id: str, rid: int, ack: int, code: int, value: Any, now: float) -> None:
        entries = self._clients.get(client_id)
        if entries is None:
            entries = self._clients[client_id] = {}
        # acknowledged replies can never be asked for again
        while entries:
            first = next(iter(entries))
            if first >= ack and len(entries) < self.max_per_client:
                break
            del entries[first]
        entries[rid] = (code, value, now)

    def forget_client(self, client_id: str) -> None:
        self._clients.pop(client_id, None)

    def prune(self, now: float) -> None:
        """Drop entries older than ``ttl_s`` (O(clients + dropped))."""
        cutoff = now - self.ttl_s
        for client_id in list(self._clients):
            entries = self._clients[client_id]
            while entries:
                first = next(iter(entries))
                if entries[first][2] >= cutoff:
                    break
                del entries[first]
            if not entries:
                del self._clients[client_id]
