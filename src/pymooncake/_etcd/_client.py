"""The etcd v3 client: key-value, transactions, leases and watches over the
HTTP/JSON gateway, with endpoint failover.

Failover rule: a call goes to the endpoint that answered last; when an
endpoint cannot be reached (connect refused, timed out) or reports that it has
no leader, the next one is tried, each at most once per call.  A request that
was *sent* but whose reply was lost is retried on the next endpoint only when
repeating it is harmless (reads, puts, deletes, lease renewals); transactions
and lease grants are not repeated -- the caller gets :class:`EtcdUnreachable`
with ``maybe_applied=True`` and reads back what happened.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ..errors import InvalidArgument, MalformedMessage
from ._endpoints import Endpoint, parse_endpoints
from ._errors import EtcdError, EtcdLeaseNotFound, EtcdUnreachable, error_from_gateway
from ._http import ConnectionPool, NotSent, ReplyLost, describe_failure, warn_if_proxied
from ._lease import KeepAlive
from ._stream import WatchResponse
from ._watch import Watch
from ._wire import (
    Compare,
    DeleteResult,
    GrpcCode,
    KeyValue,
    LeaseGrant,
    LeaseStatus,
    Op,
    OpDelete,
    OpGet,
    OpPut,
    PutResult,
    RangeResult,
    TxnResult,
    decode_error,
    prefix_range_end,
    txn_request,
)

__all__ = ["CreateResult", "EtcdClient", "Key"]

log = logging.getLogger("pymooncake.etcd")

#: reference etcd wrapper: 5 s per operation
DEFAULT_TIMEOUT_S: Final = 5.0
#: reference etcd wrapper: 5 s dial timeout; shorter here so that a dead first
#: endpoint does not eat the whole call before the next one is tried
DEFAULT_CONNECT_TIMEOUT_S: Final = 2.0

Key = bytes | str
T = TypeVar("T")


def _key(key: Key) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def _show(key: bytes | str) -> str:
    """A key as text for messages."""
    return key if isinstance(key, str) else key.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class CreateResult:
    """Outcome of :meth:`EtcdClient.create`.

    ``created``: this call created the key; ``revision``: the store revision
    after the transaction (the key's ``create_revision`` when created);
    ``existing``: the key as it was when it already existed.
    """

    created: bool
    revision: int
    existing: KeyValue | None = None


class EtcdClient:
    """A client of one etcd cluster.

    Args:
        endpoints: ``"h1:2379;h2:2379"`` (``,`` works too; ``http://`` and
            ``https://`` prefixes are accepted) or parsed :class:`Endpoint` s.
        timeout_s: default limit for one request to one endpoint.
        connect_timeout_s: limit for opening a connection to one endpoint.

    Thread-safe: every thread gets its own connections.  :meth:`close` stops
    the keep-alives and watches this client started and closes its connections.

    Raises:
        InvalidArgument: ``endpoints`` holds no usable address.
    """

    def __init__(
        self,
        endpoints: str | Sequence[Endpoint],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        self.endpoints: tuple[Endpoint, ...] = (
            parse_endpoints(endpoints) if isinstance(endpoints, str) else tuple(endpoints)
        )
        if not self.endpoints:
            raise InvalidArgument("an etcd client needs at least one endpoint")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._pool = ConnectionPool(connect_timeout_s=connect_timeout_s)
        self._preferred = 0
        self._lock = threading.Lock()
        self._children: list[Any] = []  # KeepAlive and Watch objects, closed with us
        self._closed = False
        warn_if_proxied(self.endpoints)

    def __repr__(self) -> str:
        return f"<EtcdClient {self.display}>"

    @property
    def display(self) -> str:
        """The endpoints as a user writes them: ``h1:2379;h2:2379``."""
        return ";".join(str(ep) for ep in self.endpoints)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport --------------------------------------------------------------

    def endpoint_order(self) -> list[Endpoint]:
        """The endpoints in the order the next call tries them."""
        with self._lock:
            start = self._preferred
        n = len(self.endpoints)
        return [self.endpoints[(start + i) % n] for i in range(n)]

    def prefer(self, ep: Endpoint) -> None:
        """Try ``ep`` first from now on (it just answered)."""
        with self._lock:
            self._preferred = self.endpoints.index(ep)

    def call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        what: str,
        idempotent: bool = True,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """POST one gateway request and return the decoded reply.

        Args:
            path: e.g. ``/v3/kv/range``.
            what: names the operation in error messages (``"get mooncake/ram/x"``).
            idempotent: repeating the request is harmless (see the module's
                failover rule).

        Raises:
            EtcdUnreachable: no endpoint could serve it (the message lists why,
                endpoint by endpoint, and how to fix it).
            EtcdError: etcd refused the request, or the endpoint is not etcd.
        """
        if self._closed:
            raise EtcdError(f"etcd client for {self.display} is closed ({what})")
        payload = json.dumps(body).encode()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        failures: list[str] = []
        maybe_applied = False
        for ep in self.endpoint_order():
            try:
                status, data = self._pool.post(ep, path, payload, timeout_s=timeout)
            except NotSent as exc:
                if self._closed:
                    raise EtcdError(f"etcd client for {self.display} is closed ({what})") from exc
                failures.append(describe_failure(ep, exc, self.connect_timeout_s))
                continue
            except ReplyLost as exc:
                if self._closed:
                    raise EtcdError(f"etcd client for {self.display} is closed ({what})") from exc
                failures.append(describe_failure(ep, exc, timeout))
                maybe_applied = True
                if not idempotent:
                    break
                continue
            if status == 200:
                self.prefer(ep)
                try:
                    reply = json.loads(data)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise EtcdError(
                        f"etcd {what} at {ep}: the reply is not JSON: {data[:200]!r}"
                    ) from None
                if not isinstance(reply, dict):
                    raise EtcdError(
                        f"etcd {what} at {ep}: the reply is not an object: {reply!r:.200}"
                    )
                return reply
            err = decode_error(status, data)
            if status == 404 and err.code == GrpcCode.UNKNOWN:
                raise EtcdError(
                    f"etcd {what} at {ep}: {path} answered HTTP 404 ({err.message!r}): {ep} is "
                    "not the client URL of an etcd 3.4 or newer (older versions serve the "
                    "gateway under /v3beta or /v3alpha; pymooncake needs /v3)"
                )
            if err.code == GrpcCode.UNAVAILABLE:
                # "no leader", "request timed out", a member that is stopping
                failures.append(f"{ep}: etcd is unavailable: {err.message}")
                timed_out = "timed out" in err.message
                maybe_applied = maybe_applied or timed_out
                if not idempotent and timed_out:
                    break
                continue
            raise error_from_gateway(err, f"{what} at {ep}")
        raise EtcdUnreachable(
            self._unreachable_message(what, failures, maybe_applied),
            maybe_applied=maybe_applied,
        )

    def _unreachable_message(self, what: str, failures: list[str], maybe_applied: bool) -> str:
        tried = "; ".join(failures) or "no endpoint tried"
        first = self.endpoint_order()[0]
        text = (
            f"Error from etcd client: {what} failed on every endpoint of {self.display} "
            f"({tried}). Check that etcd is running and that this host can reach it: "
            f"`curl http://{first}/version` from this host must answer"
        )
        if maybe_applied and failures:
            text += "; the request reached etcd before the connection failed, so it may have been applied"
        return text

    # --- key-value --------------------------------------------------------------

    def range(
        self,
        key: Key,
        range_end: Key | None = None,
        *,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        timeout_s: float | None = None,
    ) -> RangeResult:
        """Keys in ``[key, range_end)`` (just ``key`` when ``range_end`` is None),
        as of ``revision`` (0: now).

        Raises:
            EtcdCompacted: ``revision`` was compacted away.
            EtcdUnreachable / EtcdError: see :meth:`call`.
        """
        op = OpGet(
            _key(key),
            None if range_end is None else _key(range_end),
            revision,
            limit,
            keys_only,
            count_only,
        )
        reply = self.call(
            "/v3/kv/range", op.to_json(), what=f"get {_show(op.key)}", timeout_s=timeout_s
        )
        return _decode(RangeResult.decode, reply, "range")

    def get(
        self, key: Key, *, revision: int = 0, timeout_s: float | None = None
    ) -> KeyValue | None:
        """The key, or None when it does not exist (at ``revision``; 0: now)."""
        result = self.range(key, revision=revision, timeout_s=timeout_s)
        return result.kvs[0] if result.kvs else None

    def get_prefix(
        self, prefix: Key, *, revision: int = 0, limit: int = 0, keys_only: bool = False
    ) -> RangeResult:
        """Every key starting with ``prefix``, in key order."""
        p = _key(prefix)
        # the empty prefix: etcd wants key "\0" with range_end "\0" for every key
        return self.range(
            p or b"\0", prefix_range_end(p), revision=revision, limit=limit, keys_only=keys_only
        )

    def put(
        self,
        key: Key,
        value: bytes,
        *,
        lease: int = 0,
        prev_kv: bool = False,
        timeout_s: float | None = None,
    ) -> PutResult:
        """Write ``value`` (attached to ``lease`` unless 0).

        Raises:
            EtcdLeaseNotFound: the lease expired or was revoked.
        """
        op = OpPut(_key(key), bytes(value), lease, prev_kv)
        reply = self.call(
            "/v3/kv/put", op.to_json(), what=f"put {_show(op.key)}", timeout_s=timeout_s
        )
        return _decode(PutResult.decode, reply, "put")

    def delete(
        self,
        key: Key,
        *,
        range_end: Key | None = None,
        prev_kv: bool = False,
        timeout_s: float | None = None,
    ) -> DeleteResult:
        """Delete ``key`` (or ``[key, range_end)``); ``deleted`` counts the keys removed."""
        op = OpDelete(_key(key), None if range_end is None else _key(range_end), prev_kv)
        reply = self.call(
            "/v3/kv/deleterange", op.to_json(), what=f"delete {_show(op.key)}", timeout_s=timeout_s
        )
        return _decode(DeleteResult.decode, reply, "delete")

    def delete_prefix(self, prefix: Key) -> DeleteResult:
        p = _key(prefix)
        return self.delete(p or b"\0", range_end=prefix_range_end(p))

    def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Op] = (),
        failure: Sequence[Op] = (),
        *,
        what: str = "transaction",
        timeout_s: float | None = None,
    ) -> TxnResult:
        """If every ``compare`` holds, run ``success``, else ``failure`` -- atomically.

        Not repeated on another endpoint once sent (see the module docstring).

        Raises:
            EtcdUnreachable: with ``maybe_applied`` when the outcome is unknown.
            EtcdLeaseNotFound: a put names a lease that is gone.
        """
        reply = self.call(
            "/v3/kv/txn",
            txn_request(compare, success, failure),
            what=what,
            idempotent=False,
            timeout_s=timeout_s,
        )
        return _decode(TxnResult.decode, reply, "txn")

    def create(self, key: Key, value: bytes, *, lease: int = 0) -> CreateResult:
        """Create ``key`` only if it does not exist (compare ``version == 0``).

        When it exists, nothing is written and the current key comes back in
        ``existing``.  This is the reference's leader-election transaction
        (there written as ``create_revision == 0``, which is equivalent).
        """
        k = _key(key)
        result = self.txn(
            [Compare.version(k, "==", 0)],
            [OpPut(k, bytes(value), lease)],
            [OpGet(k)],
            what=f"create {_show(k)}",
        )
        if result.succeeded:
            return CreateResult(True, result.revision)
        existing = None
        if result.responses and isinstance(result.responses[0], RangeResult):
            kvs = result.responses[0].kvs
            existing = kvs[0] if kvs else None
        return CreateResult(False, result.revision, existing)

    def compare_and_swap(self, key: Key, expected: bytes, value: bytes, *, lease: int = 0) -> bool:
        """Replace the value only if it is exactly ``expected``; True if replaced."""
        k = _key(key)
        return self.txn(
            [Compare.value(k, "==", bytes(expected))],
            [OpPut(k, bytes(value), lease)],
            what=f"compare-and-swap {_show(k)}",
        ).succeeded

    def compare_and_delete(
        self, key: Key, *, value: bytes | None = None, mod_revision: int | None = None
    ) -> bool:
        """Delete ``key`` only if it holds exactly ``value`` and/or was last
        changed at ``mod_revision``; True if deleted.

        Raises:
            InvalidArgument: neither condition given.
        """
        k = _key(key)
        compare: list[Compare] = []
        if value is not None:
            compare.append(Compare.value(k, "==", bytes(value)))
        if mod_revision is not None:
            compare.append(Compare.mod_revision(k, "==", mod_revision))
        if not compare:
            raise InvalidArgument("compare_and_delete needs value= or mod_revision=")
        result = self.txn(compare, [OpDelete(k)], what=f"compare-and-delete {_show(k)}")
        if not result.succeeded:
            return False
        first = result.responses[0] if result.responses else None
        return isinstance(first, DeleteResult) and first.deleted > 0

    # --- leases -----------------------------------------------------------------

    def lease_grant(
        self, ttl_s: int, *, lease_id: int = 0, timeout_s: float | None = None
    ) -> LeaseGrant:
        """A new lease of ``ttl_s`` seconds (etcd may raise it to its minimum).

        Not repeated once sent: a lost reply may leave an orphan lease, which
        expires by itself after ``ttl_s``.
        """
        body: dict[str, Any] = {"TTL": str(int(ttl_s))}
        if lease_id:
            body["ID"] = str(lease_id)
        reply = self.call(
            "/v3/lease/grant", body, what=f"lease grant ({ttl_s} s)", idempotent=False
        )
        return _decode(LeaseGrant.decode, reply, "lease grant")

    def lease_keepalive(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        """Renew the lease once; returns its TTL from now in seconds.

        Raises:
            EtcdLeaseNotFound: the lease expired or was revoked (etcd answers a
                renewal of a dead lease with TTL 0).
        """
        reply = self.call(
            "/v3/lease/keepalive",
            {"ID": str(lease_id)},
            what=f"lease keepalive {lease_id:x}",
            timeout_s=timeout_s,
        )
        status = _decode(LeaseStatus.decode, reply, "lease keepalive")
        if status.ttl_s <= 0:
            raise EtcdLeaseNotFound(f"etcd lease {lease_id:x} expired or was revoked")
        return status.ttl_s

    def lease_revoke(self, lease_id: int) -> bool:
        """Revoke the lease (its keys are deleted); False if it was already gone."""
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease_id)}, what=f"lease revoke {lease_id:x}")
        except EtcdLeaseNotFound:
            return False
        return True

    def lease_time_to_live(self, lease_id: int, *, keys: bool = False) -> LeaseStatus:
        """The lease's remaining TTL (``ttl_s <= 0``: gone) and, with ``keys``, its keys."""
        body: dict[str, Any] = {"ID": str(lease_id)}
        if keys:
            body["keys"] = True
        reply = self.call("/v3/lease/timetolive", body, what=f"lease time-to-live {lease_id:x}")
        return _decode(LeaseStatus.decode, reply, "lease time-to-live")

    def keep_alive(
        self,
        lease_id: int,
        ttl_s: float,
        *,
        interval_s: float | None = None,
        on_lost: Callable[[str], None] | None = None,
        granted_at: float | None = None,
        safety_s: float = 0.0,
    ) -> KeepAlive:
        """Keep the lease alive from a background thread until closed; see :class:`KeepAlive`."""
        ka = KeepAlive(
            self,
            lease_id,
            ttl_s,
            interval_s=interval_s,
            on_lost=on_lost,
            granted_at=granted_at,
            safety_s=safety_s,
        )
        self._adopt(ka)
        return ka

    # --- watches and status ----------------------------------------------------

    def watch(
        self,
        key: Key,
        *,
        range_end: Key | None = None,
        prefix: bool = False,
        start_revision: int = 0,
        prev_kv: bool = False,
        on_response: Callable[[WatchResponse], None] | None = None,
        idle_reconnect_s: float = 30.0,
    ) -> Watch:
        """Watch ``key`` (a range, or every key under it with ``prefix``) from
        ``start_revision`` (0: from now on); see :class:`Watch`."""
        k = _key(key)
        end = prefix_range_end(k) if prefix else (None if range_end is None else _key(range_end))
        if prefix and not k:
            k = b"\0"
        w = Watch(
            self,
            k,
            end,
            start_revision=start_revision,
            prev_kv=prev_kv,
            on_response=on_response,
            idle_reconnect_s=idle_reconnect_s,
        )
        self._adopt(w)
        return w

    def status(self, endpoint: Endpoint | None = None) -> dict[str, Any]:
        """``/v3/maintenance/status`` of ``endpoint`` (default: whichever answers):
        ``version``, ``leader``, ``raftTerm``, ``dbSize`` ..."""
        if endpoint is None:
            return self.call("/v3/maintenance/status", {}, what="status")
        try:
            status, data = self._pool.post(
                endpoint, "/v3/maintenance/status", b"{}", timeout_s=self.timeout_s
            )
        except (NotSent, ReplyLost) as exc:
            raise EtcdUnreachable(
                "Error from etcd client: " + describe_failure(endpoint, exc, self.timeout_s)
            ) from exc
        if status != 200:
            raise error_from_gateway(decode_error(status, data), f"status of {endpoint}")
        reply: dict[str, Any] = json.loads(data)
        return reply

    # --- life cycle -------------------------------------------------------------

    def _adopt(self, child: Any) -> None:
        with self._lock:
            if self._closed:
                child.close()
                raise EtcdError(f"etcd client for {self.display} is closed")
            self._children = [c for c in self._children if not c.closed]
            self._children.append(child)

    def new_connection(self, ep: Endpoint) -> Any:
        """A dedicated connection for a stream (used by :class:`Watch`)."""
        return self._pool.new_connection(ep)

    def discard_connection(self, conn: Any) -> None:
        self._pool.discard(conn)

    def close(self) -> None:
        """Stop keep-alives and watches, close connections; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            children, self._children = self._children, []
        for child in children:
            child.stop()
        self._pool.close()  # wakes children blocked on a socket
        for child in children:
            child.close()


def _decode(decoder: Callable[[Any], T], reply: dict[str, Any], what: str) -> T:
    try:
        return decoder(reply)
    except MalformedMessage as exc:
        raise EtcdError(f"etcd {what} reply is malformed: {exc}") from None
