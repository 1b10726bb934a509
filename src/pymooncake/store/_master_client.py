"""Blocking, thread-safe client of the master's RPC protocol.

Each call checks a connection out of a small pool, sends its frame and reads
the reply in the calling thread (no hand-off to another thread, so a call
costs one round trip).  ``call_many`` pipelines several requests on one
connection.  Timeouts are kernel-side (SO_RCVTIMEO), so blocking waits
release the GIL and cost no extra system calls.  A single call to a master
without HA makes its first attempt on a pooled connection without setting up
the retry loop (``_call_one``: 5 us of Python per ``is_exist`` instead of 11);
the loop takes over, with the same request id, when that attempt cannot be made
or breaks.

**Busy interpreters.**  A reply usually arrives within a fraction of a
millisecond; waiting for it with the GIL released lets another Python thread of
the process take the GIL, and getting it back costs the 5 ms switch interval.
So small frames are sent and replies awaited with the GIL held for up to
``gil_hold_s`` (``_heldio.py``), then the ordinary way.  Never for a master that
runs in this very process (it needs the GIL to answer): masters register their
ports in :data:`IN_PROCESS_MASTER_PORTS`.

**Retries, exactly once.**  Every mutating request gets a request id (``rid``,
increasing per client) and ``ack``, the lowest id still awaiting its reply.
When a connection breaks before the reply arrived -- the master may or may not
have acted -- the same frame (same ``rid``) is sent again on a new connection,
until the RPC timeout: the master answers a repeated ``rid`` from its reply
cache instead of executing it twice, so a lost reply never turns into a double
allocation, a spurious "already exists" or a lost put.  A master that is
restarting is waited for (up to ``reconnect_s``) once this client has talked to
it.  A master that accepts the connection but does not answer within the
timeout is reported (RpcTimeout) and not retried.
"""

from __future__ import annotations

import collections
import itertools
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .._authio import ClusterSecurity, secure_client
from .._heldio import DEFAULT_HOLD_S, DEFAULT_SPIN_S, HeldSocket, PollOne, held_socket
from .._net import connect_tcp, is_local_address, set_io_timeout, split_host_port
from ..errors import (
    AuthenticationError,
    InvalidParams,
    MalformedMessage,
    MooncakeError,
    RpcFailed,
    RpcTimeout,
    store_error,
)
from ..wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    MasterFrameDecoder,
    MasterReply,
    MasterRequest,
    NeedData,
    encode_request,
    master_unix_name,
)
from ..wire import _master_msgs as msg
from ..wire._auth import AuthFailure, FailureKind
from ..wire._master import NO_TOKEN_MESSAGE
from ._metrics import ClientMetrics
from ._types import ErrorCode

__all__ = ["AUTH_CONTEXT", "IN_PROCESS_MASTER_PORTS", "MasterClient"]

_NOT_LEADER = int(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
#: HA: how long one attempt waits for a reply before the leader is looked up again
_HA_SLICE_S = 2.0
#: poll events of a connection the peer closed (buffered bytes do not count: a
#: TLS connection may hold a session ticket nobody read)
_CLOSED_EVENTS = select.POLLRDHUP | select.POLLHUP | select.POLLERR

#: the HMAC context of the master RPC port (the master uses the same)
AUTH_CONTEXT = b"master-rpc"
#: RPC ports of masters running in this process (MasterService adds its own):
#: waiting for them with the GIL held would hold up their answer
IN_PROCESS_MASTER_PORTS: set[int] = set()


class _Conn:
    __slots__ = ("addr", "decoder", "hangup", "held", "io_timeout", "sock")

    def __init__(
        self,
        sock: socket.socket,
        addr: tuple[str, int],
        held: HeldSocket | None,
        io_timeout: float,
    ) -> None:
        self.sock = sock
        self.addr = addr  # the master it was opened to (with HA: who led then)
        self.held = held
        self.decoder = MasterFrameDecoder()
        #: the socket's kernel send/receive timeout (set_io_timeout), seconds
        self.io_timeout = io_timeout
        #: did the master close it (asked with the GIL held; see idle_intact)
        self.hangup = PollOne(sock.fileno(), _CLOSED_EVENTS)

    def timeout(self, seconds: float) -> None:
        """Set the socket's send/receive timeout (two system calls, skipped when
        it has that one already)."""
        if seconds != self.io_timeout:
            set_io_timeout(self.sock, seconds)
            self.io_timeout = seconds


class _Pending(NamedTuple):
    """HA: a single call whose first attempt did not settle it -- what its retry
    through ``_run_frames`` needs (made only on that path)."""

    request: msg.Request
    rid: int
    ack: int
    patient: bool
    deadline: float


class _LeaderView:
    """HA: where the leader is, read from etcd (the key the masters elect on)."""

    def __init__(self, endpoints: str, cluster_id: str, timeout_s: float) -> None:
        from .._etcd import EtcdClient
        from .master._ha import master_view_key

        self.key = master_view_key(cluster_id)
        self.endpoints = endpoints
        self._etcd = EtcdClient(endpoints, timeout_s=timeout_s, connect_timeout_s=timeout_s)

    def resolve(self) -> tuple[str, int] | None:
        """The leader's (host, port); None when no master leads (or etcd is down)."""
        from .._etcd import EtcdError

        try:
            kv = self._etcd.get(self.key)
        except EtcdError:
            return None
        if kv is None:
            return None
        host, port = split_host_port(kv.value.decode(errors="replace"))
        return host, port or 50051

    def close(self) -> None:
        self._etcd.close()


class MasterClient:
    """Talks to ``mooncake_master`` at ``address`` (``host:port``).

    Args:
        address: the master's RPC address.
        timeout_s: per request, retries included (MC_RPC_TIMEOUT_MS).
        connect_timeout_s: per connection attempt (MC_RPC_CONNECT_TIMEOUT_MS).
        max_idle: connections kept open for reuse.
        same_host_rpc: reach a master on this host through its abstract UNIX
            socket (same frames, same authentication); False = TCP only.
        metrics: where to count RPCs and their latency (None: not counted).
        security: cluster token / TLS; with a token every connection authenticates.
        reconnect_s: how long a call waits for a master it reached before to come
            back (restart); 0 fails at once.
        gil_hold_s: how long a call waits for its reply with the GIL held before
            it waits the ordinary way (see the module docstring); 0 never holds it.
        spin_s: how much of that wait polls without sleeping (``_heldio.py``).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        max_idle: int = 8,
        same_host_rpc: bool = True,
        metrics: ClientMetrics | None = None,
        security: ClusterSecurity | None = None,
        reconnect_s: float = 15.0,
        cluster_id: str = "mooncake_cluster",
        gil_hold_s: float = DEFAULT_HOLD_S,
        spin_s: float = DEFAULT_SPIN_S,
    ) -> None:
        self.address = address
        self._leader: _LeaderView | None = None
        if "://" in address:
            scheme, _, rest = address.partition("://")
            if scheme != "etcd":
                raise InvalidParams(
                    f"master_server_addr {address!r}: HA backend {scheme!r} is not available in "
                    "pymooncake; use etcd://h1:2379;h2:2379 (masters started with "
                    "--enable_ha=true --etcd_endpoints=...) or the master's host:port"
                )
            self._leader = _LeaderView(rest, cluster_id, connect_timeout_s)
            host, port = "", 0
        else:
            try:
                host, parsed = split_host_port(address)
            except MooncakeError as exc:
                raise InvalidParams(f"master_server_addr {address!r}: {exc}") from exc
            port = parsed or 50051
        self._host, self._port = host, port
        self._timeout = timeout_s
        self._connect_timeout = connect_timeout_s
        self._reconnect = reconnect_s
        self._max_idle = max_idle
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        #: notified when a connection goes back to the pool
        self._returned = threading.Condition(self._lock)
        #: callers waiting on ``_returned`` (a checkin without any skips the notify)
        self._waiting = 0
        self._ids = itertools.count(1)
        self._rids = itertools.count(1)
        self._outstanding: set[int] = set()
        self._closed = False
        self._ever_connected = False
        self._same_host = same_host_rpc
        self._unix_names: list[str] | None = None if same_host_rpc else []
        self._metrics = metrics
        self._security = security or ClusterSecurity()
        self._key = self._security.key
        self._ssl = self._security.client_ssl_context() if self._security.tls else None
        self.retries = 0
        self._hold = gil_hold_s
        self._spin = spin_s
        #: "unix" or "tcp": how the latest new connection reached the master
        self.last_transport = ""
        #: bumped whenever a connection broke or was found closed by the master,
        #: or another master leads: what the master reserved for this client
        #: before may be gone (``_slots.py``)
        self.epoch = 0

    # --- connections ----------------------------------------------------------------

    @property
    def target(self) -> str:
        """The master this client talks to now (the leader, with HA)."""
        return f"{self._host}:{self._port}" if self._host else "(no leader known)"

    def _find_leader(self) -> bool:
        """HA: re-read the leader's address; True if it changed."""
        view = self._leader
        if view is None:
            return False
        found = view.resolve()
        if found is None or found == (self._host, self._port):
            return False
        with self._lock:
            self._host, self._port = found
            self.epoch += 1
            stale, self._idle = self._idle, []
            self._unix_names = None if self._same_host else []
        for c in stale:
            c.sock.close()
        return True

    def _checkout(self, idle_wait_s: float = 0.0) -> tuple[_Conn, bool]:
        with self._lock:
            if self._closed:
                raise RpcFailed(f"master client for {self.address} is closed")
            if not self._idle and idle_wait_s > 0:
                # rather than open one more connection, wait a little for a call in
                # flight to hand its connection back
                self._waiting += 1
                try:
                    self._returned.wait_for(lambda: self._idle or self._closed, idle_wait_s)
                finally:
                    self._waiting -= 1
            if self._idle:
                return self._idle.pop(), True
        if not self._host:
            self._find_leader()
            if not self._host:
                raise RpcFailed(
                    f"no master leads the cluster at {self.address} yet (etcd key "
                    f"{self._leader.key if self._leader else ''} is empty): start mooncake_master "
                    "--enable_ha=true with the same --etcd_endpoints and --cluster_id"
                )
        addr = (self._host, self._port)
        try:
            sock = self._connect_same_host()
            tls = None  # the same host's UNIX socket needs none
            if sock is None:
                sock = connect_tcp(
                    self._host, self._port, timeout_s=self._connect_timeout, what="store master"
                )
                tls = self._ssl
            sock = secure_client(
                sock,
                ssl_context=tls,
                key=self._key,
                context=AUTH_CONTEXT,
                timeout_s=self._connect_timeout,
                port="master RPC port",
                peer=self.address,
                server_hostname=self._host,
            )
        except AuthenticationError as exc:
            failure = exc.failure
            if isinstance(failure, AuthFailure) and failure.kind is FailureKind.TRUNCATED:
                # the connection ended mid-handshake (a master restarting, a proxy or
                # load balancer resetting it): a broken connection, retried as such; a
                # peer that always does it fails the call with this reason at the timeout
                raise RpcFailed(
                    f"cannot reach the master at {self.address}: the connection closed "
                    f"during the cluster-token handshake ({failure.message})"
                ) from exc
            raise
        except (MooncakeError, OSError) as exc:
            raise RpcFailed(
                f"cannot reach the master at {self.target}: {exc}. Check that mooncake_master is "
                "running there and that master_server_addr / MOONCAKE_MASTER point at its --port"
            ) from exc
        # with HA a wait is cut in slices (a frozen leader must not hold a call for
        # its whole timeout: between slices the caller looks for a new leader)
        io_timeout = self._timeout if self._leader is None else _HA_SLICE_S
        set_io_timeout(sock, io_timeout)
        self.last_transport = "unix" if sock.family == socket.AF_UNIX else "tcp"
        self._ever_connected = True
        hold = 0.0 if addr[1] in IN_PROCESS_MASTER_PORTS else self._hold
        return _Conn(sock, addr, held_socket(sock, hold, self._spin), io_timeout), False

    def _connect_same_host(self) -> socket.socket | None:
        """The master's abstract UNIX socket when it runs on this host (same
        protocol, shorter round trip); None to use TCP."""
        names = self._unix_names
        if names is None:
            # Wildcard listeners (0.0.0.0 / ::) are only this master when the
            # configured address is one of this machine's: a client configured for
            # a remote master must never land on a local one that shares the port.
            hosts = [self._host]
            if is_local_address(self._host):
                hosts += ["0.0.0.0", "::"]
            names = self._unix_names = [master_unix_name(h, self._port) for h in hosts]
        for name in names:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(name)
                return s
            except OSError:
                s.close()
        self._unix_names = []  # not on this host (or an older master): stop trying
        return None

    def _checkin(self, conn: _Conn) -> None:
        with self._lock:
            # with HA, another thread may have moved to a new leader while this
            # connection was out: a connection to the old one must not be reused
            current = conn.addr == (self._host, self._port)
            if current and not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                if self._waiting:
                    self._returned.notify()
                return
        conn.sock.close()

    def preconnect(self, count: int) -> None:
        """Open connections until ``count`` are pooled (at most ``max_idle``), for
        a client about to serve concurrent callers: their first calls then do not
        each pay a connect, and the pool does not grow under their first burst.

        Raises:
            RpcFailed: the master cannot be reached.
        """
        held: list[_Conn] = []
        try:  # holding the pooled ones while checking out makes the rest new
            for _ in range(min(count, self._max_idle)):
                conn, reused = self._checkout()
                if not reused:  # one round trip: the master has taken it
                    req_id = next(self._ids)
                    try:
                        self._exchange(conn, encode_request(req_id, msg.ServiceReady()), [req_id])
                    except (OSError, MalformedMessage) as exc:
                        self._discard(conn, False)
                        raise RpcFailed(
                            f"a new connection to the master at {self.target} broke at its "
                            f"first request ({exc}); check the master's log"
                        ) from exc
                held.append(conn)
        finally:
            for conn in held:
                self._checkin(conn)

    def idle_intact(self) -> bool:
        """Whether no pooled connection was closed by the master (it exited or
        restarted) since it was last used: a ``poll`` each, without waiting.  Closed
        ones are dropped and :attr:`epoch` moves on."""
        with self._lock:
            conns = list(self._idle)
        if not conns:
            return True
        # (a poll per connection, its pollfd built once: cheaper than one ready_now
        # that builds an array each time, for the one or two a pool usually holds)
        dead = [c for c in conns if c.sock.fileno() >= 0 and c.hangup.ready()]
        if not dead:
            return True
        with self._lock:
            self._idle = [c for c in self._idle if c not in dead]
            self.epoch += 1
        for c in dead:
            c.sock.close()
        return False

    def _drop_idle(self) -> None:
        with self._lock:  # the pool went stale (master restarted): start afresh
            self.epoch += 1
            stale, self._idle = self._idle, []
        for c in stale:
            c.sock.close()

    def _exchange(
        self,
        conn: _Conn,
        frames: bytes,
        ids: list[int],
        ha_wait: Callable[[], bool] | None = None,
        spin_s: float | None = None,
    ) -> list[MasterReply]:
        """Send ``frames``, read their replies.  With ``ha_wait``, a receive timeout
        asks it whether to keep waiting on this connection (the leader is the same
        and time is left) instead of giving up.  ``spin_s``: how long to poll for
        the reply before sleeping (default: the connection's)."""
        self._send(conn, frames)
        return self._receive(conn, ids, ha_wait, spin_s)

    @staticmethod
    def _send(conn: _Conn, frames: bytes) -> None:
        if conn.held is not None:
            conn.held.sendall(frames)
        else:
            conn.sock.sendall(frames)

    @staticmethod
    def _receive(
        conn: _Conn,
        ids: list[int],
        ha_wait: Callable[[], bool] | None = None,
        spin_s: float | None = None,
    ) -> list[MasterReply]:
        held, decoder = conn.held, conn.decoder
        replies: list[MasterReply] = []
        want = len(ids)
        while len(replies) < want:
            frame: MasterRequest | MasterReply | NeedData | None = (
                decoder.next_frame() if decoder.buffered else NEED_DATA
            )
            if frame is NEED_DATA:
                try:
                    data = held.recv(spin_s) if held is not None else conn.sock.recv(1 << 16)
                except (BlockingIOError, TimeoutError):
                    if ha_wait is not None and ha_wait():
                        continue
                    raise
                if not data:
                    raise ConnectionResetError("the master closed the connection")
                frame = decoder.whole_reply(data)  # (one answer per read: most calls)
                if frame is None:
                    decoder.feed(data)
                    continue
            if type(frame) is not MasterReply:
                raise MalformedMessage("the master sent a request frame")
            if frame.id != ids[len(replies)]:
                raise MalformedMessage(
                    f"reply {frame.id} does not match request {ids[len(replies)]}"
                )
            replies.append(frame)
        return replies

    def _run(
        self, requests: Sequence[msg.Request], patient: bool = True, idle_wait_s: float = 0.0
    ) -> list[MasterReply]:
        rids = [0] * len(requests)
        with self._lock:
            for i, req in enumerate(requests):
                if isinstance(req, msg.Mutation) and req.client_id:
                    rids[i] = next(self._rids)
                    self._outstanding.add(rids[i])
            ack = min(self._outstanding) if self._outstanding else 0
        metrics = self._metrics
        pairs = None
        if metrics is not None:  # reference: counted when sent, latency once answered
            pairs = [metrics.rpc(req.NAME) for req in requests]
            for count, _ in pairs:
                count.inc()
        started = time.perf_counter_ns()
        try:
            replies = self._run_frames(requests, rids, ack, patient, idle_wait_s)
        finally:
            if any(rids):
                with self._lock:
                    self._outstanding.difference_update(rids)
        if pairs is not None:
            latency_us = (time.perf_counter_ns() - started) // 1000
            for _, latency in pairs:
                latency.observe(latency_us)
        return replies

    def _run_frames(
        self,
        requests: Sequence[msg.Request],
        rids: list[int],
        ack: int,
        patient: bool,
        idle_wait_s: float = 0.0,
        deadline: float | None = None,
    ) -> list[MasterReply]:
        if deadline is None:
            deadline = time.monotonic() + self._timeout
        pause = 0.005
        attempt = 0
        down_since: float | None = None
        ha = self._leader is not None
        spin = self._spin_for(sum(map(_key_count, requests)))
        while True:
            ids = [next(self._ids) for _ in requests]
            frames = b"".join(
                encode_request(i, r, rid=rid, ack=ack)
                for i, r, rid in zip(ids, requests, rids, strict=True)
            )
            reused = False
            try:
                conn, reused = self._checkout(idle_wait_s)
            except RpcFailed:
                # the master is down: wait (bounded) for it (or, with HA, a new
                # leader) to come back if we knew it
                now = time.monotonic()
                down_since = down_since or now
                waited = now - down_since + pause
                if ha:
                    self._find_leader()
                if (
                    not patient
                    or not (self._ever_connected or ha)
                    or (waited > self._reconnect and not ha)
                    or now + pause > deadline
                ):
                    raise
                attempt += 1
                self.retries += 1
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
                self._find_leader()
                continue
            ha_wait = None
            if ha:
                # a leader may be frozen or gone without closing connections: wait in
                # short slices and look for a new leader in between
                conn.timeout(_HA_SLICE_S)

                def ha_wait() -> bool:
                    return time.monotonic() + _HA_SLICE_S < deadline and not self._find_leader()

            try:
                replies = self._exchange(conn, frames, ids, ha_wait, spin)
            except (BlockingIOError, TimeoutError) as exc:
                conn.sock.close()
                self.epoch += 1
                if ha and time.monotonic() + pause < deadline:
                    attempt += 1
                    self.retries += 1
                    self._find_leader()
                    continue
                raise self._silent(requests[0]) from exc
            except (OSError, MalformedMessage) as exc:
                self._discard(conn, reused)
                # The master may have acted: send the same request ids again (it answers
                # repeats from its reply cache), until the timeout.
                attempt += 1
                if time.monotonic() + pause >= deadline:
                    raise RpcFailed(
                        f"RPC {requests[0].METHOD.value} to the master at {self.target} failed: {exc} "
                        f"({attempt} attempt(s) within {self._timeout:g} s)"
                    ) from exc
                self.retries += 1
                if not reused or attempt > 1:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.5)
                self._find_leader()
                continue
            if ha and any(r.code == _NOT_LEADER for r in replies):
                # a standby, or a leader that lost its lease: find the new leader and
                # send the same request ids there (on a new connection: this one
                # leads to a master that refuses)
                conn.sock.close()
                if time.monotonic() + pause >= deadline or not patient:
                    # not retried now, but the next call must not land here again: a
                    # heartbeat-only client (a storage node) would keep pinging a
                    # standby until the leader expired it
                    self._find_leader()
                    return replies
                attempt += 1
                self.retries += 1
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
                self._find_leader()
                continue
            self._checkin(conn)
            return replies

    # --- calls -------------------------------------------------------------------------

    def call(self, request: msg.Request, *, patient: bool = True, idle_wait_s: float = 0.0) -> Any:
        """One request; returns its typed reply (``type(request).REPLY``,
        ``wire/_master_reply_msgs.py``), decoded and validated here.

        Args:
            patient: wait (``reconnect_s``) for a master that is restarting; False for
                liveness probes, which must notice a dead master at once.
            idle_wait_s: with no pooled connection free, wait this long for one to
                come back before opening another (the heartbeat: a call it overlaps
                need not cost the master one more connection).

        Raises:
            StoreError subclasses: the master refused (code as the reference's ErrorCode).
            RpcFailed / RpcTimeout: the master is unreachable or silent.
            InvalidReply: the reply does not have the shape of ``request``'s reply.
        """
        return self._typed(request, self._call_one(request, patient, idle_wait_s))

    def _spin_for(self, keys: int) -> float:
        """How long to poll for the reply to requests naming ``keys`` keys in all: a
        batch keeps the master busy for longer (3-5 us per key), so its reply is
        polled for a little longer, up to 8x the usual spin at 56 keys or more."""
        return self._spin * min(1.0 + keys / 8, 8.0)

    def _call_one(self, request: msg.Request, patient: bool, idle_wait_s: float) -> MasterReply:
        """:meth:`_run` of one request, its first attempt made here on a pooled
        connection: a single call (most of the store's calls) then skips the retry
        loop's set-up.  Anything else -- no pooled connection, a connection that
        broke, with HA a master that no longer leads or a leader silent past its
        slice -- continues in :meth:`_run_frames` with the same request id and
        deadline, so the retries are the same."""
        deadline = time.monotonic() + self._timeout
        rid = ack = 0
        if isinstance(request, msg.Mutation) and request.client_id:
            with self._lock:
                rid = next(self._rids)
                self._outstanding.add(rid)
                ack = min(self._outstanding)
        metrics = self._metrics
        pair = None
        if metrics is not None:  # reference: counted when sent, latency once answered
            pair = metrics.rpc(request.NAME)
            pair[0].inc()
        started = time.perf_counter_ns()
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle and not self._closed else None
            if conn is None or conn.held is None:
                if conn is not None:
                    self._checkin(conn)
                (reply,) = self._run_frames([request], [rid], ack, patient, idle_wait_s, deadline)
            else:
                ident = next(self._ids)
                try:
                    conn.held.sendall(encode_request(ident, request, rid=rid, ack=ack))
                    keys = _key_count(request)
                    spin = self._spin_for(keys) if keys else None
                    (reply,) = self._receive(conn, [ident], None, spin)
                except (BlockingIOError, TimeoutError) as exc:
                    if self._leader is None:
                        conn.sock.close()
                        self.epoch += 1
                        raise self._silent(request) from exc
                    pending = _Pending(request, rid, ack, patient, deadline)
                    reply = self._ha_resume(conn, ident, pending)
                except (OSError, MalformedMessage):
                    self._discard(conn, True)
                    self.retries += 1
                    (reply,) = self._run_frames(
                        [request], [rid], ack, patient, idle_wait_s, deadline
                    )
                else:
                    if reply.code == _NOT_LEADER and self._leader is not None:
                        pending = _Pending(request, rid, ack, patient, deadline)
                        reply = self._not_leader(conn, reply, pending)
                    else:
                        self._checkin(conn)
        finally:
            if rid:
                with self._lock:
                    self._outstanding.discard(rid)
        if pair is not None:
            pair[1].observe((time.perf_counter_ns() - started) // 1000)
        return reply

    def _ha_resume(self, conn: _Conn, ident: int, pending: _Pending) -> MasterReply:
        """HA: the leader did not answer within a slice.  Keep waiting on this
        connection while it is still the leader and time is left (as
        :meth:`_run_frames` does; a slow request is not sent twice), else go on
        in :meth:`_run_frames` (it finds the new leader) with the same request id."""
        deadline = pending.deadline

        def ha_wait() -> bool:
            return time.monotonic() + _HA_SLICE_S < deadline and not self._find_leader()

        if ha_wait():
            try:
                (reply,) = self._receive(conn, [ident], ha_wait)
            except (OSError, MalformedMessage):  # timeouts included
                pass
            else:
                if reply.code != _NOT_LEADER:
                    self._checkin(conn)
                    return reply
                return self._not_leader(conn, reply, pending)
        conn.sock.close()
        self.epoch += 1
        if time.monotonic() >= deadline:
            raise self._silent(pending.request)
        self._find_leader()
        return self._retry(pending)

    def _not_leader(self, conn: _Conn, refusal: MasterReply, pending: _Pending) -> MasterReply:
        """HA: the master answering on ``conn`` no longer leads (``refusal``).  The
        connection is closed (it leads to a master that refuses) and the leader looked
        up again; a patient call goes on in :meth:`_run_frames` with the same request
        id, a liveness probe returns the refusal (as :meth:`_run_frames` does)."""
        conn.sock.close()
        self.epoch += 1
        self._find_leader()
        if not pending.patient or time.monotonic() >= pending.deadline:
            return refusal
        return self._retry(pending)

    def _retry(self, pending: _Pending) -> MasterReply:
        """The single call's request again, through :meth:`_run_frames`."""
        self.retries += 1
        p = pending
        (reply,) = self._run_frames([p.request], [p.rid], p.ack, p.patient, 0.0, p.deadline)
        return reply

    def _silent(self, request: msg.Request) -> RpcTimeout:
        return RpcTimeout(
            f"the master at {self.target} did not answer {request.METHOD.value} within "
            f"{self._timeout:g} s (MC_RPC_TIMEOUT_MS); it is overloaded or hung"
        )

    def _typed(self, request: msg.Request, reply: MasterReply) -> Any:
        """The typed reply, or the refusal as an exception."""
        if reply.code != 0:
            if reply.code == ErrorCode.ILLEGAL_CLIENT and reply.value == NO_TOKEN_MESSAGE:
                raise AuthenticationError(
                    f"master RPC port: the master at {self.address} refused this client: "
                    f"{reply.value}"
                )
            raise store_error(reply.code, str(reply.value))
        return _decode(request, reply.value)

    def _discard(self, conn: _Conn, reused: bool) -> None:
        """A connection broke: close it, and the pool with it if it was pooled
        (the others are likely stale too: the master restarted)."""
        conn.sock.close()
        self.epoch += 1
        if reused:
            self._drop_idle()

    def call_many(self, requests: Sequence[msg.Request]) -> list[tuple[int, Any]]:
        """Pipeline several requests on one connection; returns (code, typed reply)
        each, or (code, message) for a request the master refused."""
        if not requests:
            return []
        return [
            (r.code, _decode(q, r.value) if r.code == 0 else r.value)
            for q, r in zip(requests, self._run(requests), strict=True)
        ]

    def link(self) -> MasterLink:
        """A connection of its own (not pooled) for requests posted without waiting
        for their answers (see :class:`MasterLink`); the caller closes it.

        Raises:
            RpcFailed: the master cannot be reached.
        """
        conn, _ = self._checkout()
        return MasterLink(self, conn)

    def send(self, request: msg.Request) -> Callable[[], Any]:
        """Send ``request`` now; the returned function reads its typed reply (call
        it exactly once).  Lets a caller keep two masters working in parallel (a
        standby confirming puts while the leader ends them).  One attempt: no
        retries and no leader search, unlike :meth:`call`.

        Raises (now, or from the function):
            RpcFailed / RpcTimeout: the master is unreachable, broke or is silent.
            StoreError subclasses: the master refused.
        """
        conn, reused = self._checkout()
        ident = next(self._ids)
        # one attempt: with HA it waits one slice (a frozen leader must not hold the
        # caller for the whole timeout; the caller retries with call(), which follows
        # the leader), else the whole timeout
        wait_s = min(_HA_SLICE_S, self._timeout) if self._leader is not None else self._timeout
        conn.timeout(wait_s)
        try:
            self._send(conn, encode_request(ident, request))
        except OSError as exc:
            self._discard(conn, reused)
            raise RpcFailed(
                f"RPC {request.METHOD.value} to the master at {self.target} failed: {exc}"
            ) from exc

        def finish() -> Any:
            try:
                (reply,) = self._receive(conn, [ident])
            except (BlockingIOError, TimeoutError) as exc:
                conn.sock.close()
                raise RpcTimeout(
                    f"the master at {self.target} did not answer {request.METHOD.value} "
                    f"within {wait_s:g} s"
                ) from exc
            except (OSError, MalformedMessage) as exc:
                self._discard(conn, reused)
                raise RpcFailed(
                    f"RPC {request.METHOD.value} to the master at {self.target} failed: {exc}"
                ) from exc
            self._checkin(conn)
            return self._typed(request, reply)

        return finish

    def check_version(self) -> str:
        version = self.call(msg.ServiceReady()).version
        if version != PROTOCOL_VERSION:
            raise store_error(
                int(ErrorCode.INVALID_VERSION),
                f"the master at {self.address} speaks {version!r}, this client {PROTOCOL_VERSION!r}; "
                "run the same pymooncake version on both",
            )
        return str(version)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._returned.notify_all()
            idle, self._idle = self._idle, []
        for c in idle:
            c.sock.close()
        if self._leader is not None:
            self._leader.close()


class MasterLink:
    """One connection of its own to a master for requests whose answers nobody
    waits for (``MasterClient.link``): :meth:`post` sends at once, :meth:`answers`
    reads whatever answers have arrived, without waiting.  Not thread-safe (the
    caller serialises)."""

    def __init__(self, client: MasterClient, conn: _Conn) -> None:
        self._client = client
        self._conn: _Conn | None = conn
        self._ids = itertools.count(1)
        #: requests posted and not answered yet, in order: (frame id, request)
        self._posted: collections.deque[tuple[int, msg.Request]] = collections.deque()

    @property
    def open(self) -> bool:
        return self._conn is not None

    @property
    def outstanding(self) -> int:
        return len(self._posted)

    def post(self, request: msg.Request) -> None:
        """Send ``request`` (what the socket buffer does not take at once is sent
        with the socket's timeout).

        Raises:
            RpcFailed: the link is closed or broke (it is closed then).
        """
        conn = self._conn
        if conn is None:
            raise RpcFailed(f"the link to the master at {self._client.target} is closed")
        ident = next(self._ids)
        try:
            MasterClient._send(conn, encode_request(ident, request))
        except OSError as exc:
            self.close()
            raise RpcFailed(
                f"RPC {request.METHOD.value} to the master at {self._client.target} failed: {exc}"
            ) from exc
        self._posted.append((ident, request))

    def answers(self) -> list[tuple[msg.Request, Any]]:
        """(request, typed reply or the exception it ended with) for each answer
        that has arrived, in order.  A link that broke or was closed ends every
        request still posted with RpcFailed (the master may or may not have read
        them)."""
        conn = self._conn
        if not self._posted:
            return []
        if conn is None:  # closed (or broken) with requests posted
            failed = RpcFailed(f"the link to the master at {self._client.target} was closed")
            closed: list[tuple[msg.Request, Any]] = [(r, failed) for _, r in self._posted]
            self._posted.clear()
            return closed
        failure: MooncakeError | None = None
        sock = conn.sock
        tls = isinstance(sock, ssl.SSLSocket)  # (takes no recv flags)
        if tls:
            sock.settimeout(0.0)
        try:
            while True:
                data = sock.recv(1 << 16) if tls else sock.recv(1 << 16, socket.MSG_DONTWAIT)
                if not data:
                    failure = RpcFailed(f"the master at {self._client.target} closed the link")
                    break
                conn.decoder.feed(data)
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except OSError as exc:
            failure = RpcFailed(f"the link to the master at {self._client.target} broke: {exc}")
        finally:
            if tls:
                sock.settimeout(None)  # blocking again: the kernel timeouts apply
        out: list[tuple[msg.Request, Any]] = []
        try:
            while self._posted and conn.decoder.buffered:
                frame = conn.decoder.next_frame()
                if type(frame) is not MasterReply:
                    if isinstance(frame, MasterRequest):
                        raise MalformedMessage("the master sent a request frame")
                    break
                ident, request = self._posted.popleft()
                if frame.id != ident:
                    raise MalformedMessage(f"reply {frame.id} does not match request {ident}")
                try:
                    out.append((request, self._client._typed(request, frame)))
                except MooncakeError as exc:
                    out.append((request, exc))
        except MalformedMessage as exc:
            failure = RpcFailed(f"the master at {self._client.target} answered garbage: {exc}")
        if failure is not None:
            out += [(request, failure) for _, request in self._posted]
            self._posted.clear()
            self.close()
        return out

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.sock.close()


def _key_count(request: msg.Request) -> int:
    """How many keys a request names (a batch's ``keys``; 0 for the others)."""
    if type(request) in msg.KEYED_REQUESTS:
        return len(request.keys)  # type: ignore[attr-defined]
    return 0


def _decode(request: msg.Request, value: Any) -> Any:
    """The one place a master reply is decoded (validated once) into the
    request's reply type."""
    cls = request.REPLY
    return value if cls is None else cls.decode(value)
