"""The master service: asyncio I/O around :class:`MasterState`.

One event loop owns the state, so no locks are needed: the RPC server, the
periodic :meth:`MasterState.tick` (client expiry, reclaim, eviction), the
admin/metrics HTTP endpoints and the optional embedded HTTP metadata server
all run on it.  Requests on one connection are answered in order; many
connections are served at once.

Every request is validated into its typed message (``wire/_master_msgs.py``)
before it reaches the state; a retried mutation is answered from the reply
cache (``_replies.py``); effects are journaled before the reply that
acknowledges them is written.  Whole-index requests (``*ByRegex``,
``RemoveAll``, ``/get_all_keys``, journal compaction) proceed a shard at a time
with the loop serving in between, and regular expressions are matched in a
worker process with a deadline (``_scan.py``).  Listeners are bounded:
:class:`MasterLimits`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import resource
import select
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from ..._authio import ClusterSecurity, HttpAuth, warn_open, warn_weak
from ..._busypoll import PollingSelector, polling_selector
from ..._etcd import EtcdError
from ..._httpd import HttpServer
from ..._logging import RepeatLimiter
from ..._loop import raw_transport, release_transport
from ..._net import bind_listener
from ..._rpcloop import RpcLoop, RpcServer
from ...errors import InvalidParams, MalformedMessage, StoreError
from ...transfer.metadata._snapshot import MetadataSnapshot
from ...transfer.metadata.server import MetadataServer
from ...wire import (
    DEFAULT_MAX_MASTER_FRAME,
    MasterFrameDecoder,
    encode_json,
    encode_reply,
    encode_reply_json,
    master_unix_name,
)
from ...wire import _master_msgs as msg
from ...wire._auth import FailureKind, ServerHandshake, looks_like_hello, no_token_reply
from ...wire._frames import PREFIX, REPLY
from ...wire._master import KEY_READ_TYPES, NO_TOKEN_MESSAGE, encode_short_reply
from ...wire._master_msgs import REQUEST_TYPES
from ...wire._master_reply_msgs import RemoveAllReply, RemoveByRegexReply
from .._config import MasterConfig
from .._master_client import IN_PROCESS_MASTER_PORTS
from .._types import ErrorCode
from ._admin import AdminHttp
from ._effects import DURABLE
from ._ha import Elector, HaConfig
from ._handlers import build_handlers
from ._index import SHARDS
from ._journal import Journal
from ._metrics import BATCH_STATS, MasterStats
from ._offload import unlink_files, wrap_handlers
from ._page import PAGE_OPEN_PATHS
from ._replication import (
    DEFAULT_SYNC_TIMEOUT_S,
    FROZEN_SILENCE_S,
    Follower,
    ReplicationHub,
    unwaited_start,
)
from ._replies import ReplyCache
from ._scan import IN_LOOP_MAX_KEYS, RegexScanner
from ._state import SLOT_MARK, MasterState

__all__ = ["AUTH_CONTEXT", "MasterLimits", "MasterService", "ServiceAddresses"]


log = logging.getLogger("pymooncake.master")

#: the HMAC context of the master RPC port (clients use the same)
AUTH_CONTEXT: Final = b"master-rpc"
#: the HMAC context of the master's admin HTTP port
ADMIN_AUTH_CONTEXT: Final = b"master-admin"
#: admin endpoints that stay open with a cluster token (scrapers, probes; the cluster
#: page checks its own session cookie, see _page.py)
ADMIN_OPEN_PATHS: Final = ("/metrics", "/metrics/summary", "/health", *PAGE_OPEN_PATHS)
#: keys per slice of a whole-index operation (one slice is handled between two
#: turns of the event loop; ~1-3 ms of work)
SLICE_KEYS: Final = 4096
#: keys a whole-index request removes or lists per turn of the loop: ~1-3 ms of
#: work (a slice -- a shard of ~10k keys at 10M objects -- at once held it 30-75 ms)
WORK_KEYS: Final = 512


def _pieces(keys: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(keys), WORK_KEYS):
        yield keys[i : i + WORK_KEYS]


#: records the periodic housekeeping (background eviction, deque compaction) visits
#: per segment between two turns of the event loop at first; the count then
#: follows :data:`HOUSEKEEPING_SLICE_S` (a record costs ~1.5 us when every one is
#: evicted in a small pool, ~3 us at 10M objects, less when most are passed over)
HOUSEKEEPING_VISITS: Final = 256
#: how long one slice of housekeeping should keep the loop: a request that arrives
#: meanwhile waits for the slice in progress (measured at 10M objects: slices of
#: 256 records took 0.7-0.8 ms, and puts into a full pool waited two of them,
#: p50 1.6 ms, for the 1.5 s an eviction round of 500k objects lasted; at 1M
#: objects, puts into a full pool while a round of 50k was paid: p50 128-132 us
#: with 100 us slices, 79-81 us with 50 us, 72-75 us with 25 us.  A slice also
#: costs two turns of the loop, ~4 us on a fast machine: 50 us keeps that near 10 %)
HOUSEKEEPING_SLICE_S: Final = 50e-6
#: bounds of the records visited per slice
_VISITS_MIN: Final = 16
_VISITS_MAX: Final = 4 * HOUSEKEEPING_VISITS

#: most bytes one read of an RPC connection takes (asyncio's own read size)
READ_CHUNK: Final = 256 << 10
#: what a connection may read while the buffered-bytes budget is spent: enough
#: for small requests to keep flowing, so little that thousands of connections
#: cannot push the total far past the budget
SMALL_READ: Final = 4 << 10


@dataclass(frozen=True)
class MasterLimits:
    """Bounds on what clients can make the master hold or do.

    Defaults are sized for a real cluster: thousands of clients each pooling a
    few connections, batches of tens of thousands of keys.
    """

    #: RPC connections at once (TCP and UNIX together); more are closed at once.
    #: Capped below the process's open-file limit at start-up.
    max_connections: int = 8192
    #: bytes of unfinished request frames held by all connections together; a
    #: connection that would exceed it is paused until others drain (reads are
    #: sized to the budget left, so the total stays within it plus
    #: SMALL_READ per connection reading at that moment)
    max_buffered_bytes: int = 512 << 20
    #: a request frame must arrive completely within this many seconds once its
    #: first byte came (slow senders are disconnected)
    frame_deadline_s: float = 30.0
    #: a connection with nothing in flight is closed after this long (clients
    #: reconnect transparently)
    idle_timeout_s: float = 600.0
    #: the cluster-token handshake must complete within this many seconds
    auth_timeout_s: float = 5.0
    #: how long answers of mutations are kept for retries (see _replies.py)
    reply_cache_ttl_s: float = 120.0
    #: per slice of keys, the longest a regular expression may run
    regex_deadline_s: float = 2.0
    #: most keys GetReplicaListByRegex returns (its reply is one frame)
    max_regex_results: int = 100_000


@dataclass(frozen=True)
class ServiceAddresses:
    """Where a running master listens."""

    rpc: tuple[str, int]
    metrics: tuple[str, int] | None
    metadata: tuple[str, int] | None
    #: the HTTP ports serve TLS (https URLs)
    tls: bool = False

    @property
    def rpc_address(self) -> str:
        return f"{self.rpc[0]}:{self.rpc[1]}"

    @property
    def _scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def metadata_url(self) -> str | None:
        if self.metadata is None:
            return None
        return f"{self._scheme}://{self.metadata[0]}:{self.metadata[1]}/metadata"

    @property
    def metrics_url(self) -> str | None:
        if self.metrics is None:
            return None
        return f"{self._scheme}://{self.metrics[0]}:{self.metrics[1]}"


_SCANS: Final = (msg.GetReplicaListByRegex, msg.RemoveByRegex, msg.RemoveAll)


class RawJson(str):
    """A reply value already encoded as JSON text."""

    __slots__ = ()


def _request_id(data: bytes) -> int | None:
    """The id of the request frame ``data`` starts with, or None if it does not."""
    if len(data) < PREFIX.size:
        return None
    length, kind, req_id = PREFIX.unpack_from(data, 0)
    return int(req_id) if kind == 0 and 5 <= length <= DEFAULT_MAX_MASTER_FRAME else None


class MasterService:
    """Runs a master on the current event loop.

    Args:
        config: behaviour (leases, eviction, ttl ...).
        host/port: RPC listener (port 0 = any free port).
        metrics_host/metrics_port: admin HTTP (/metrics, /query_key, ...); None disables.
        metadata_host/metadata_port: embedded HTTP metadata server; None disables.
        clock: monotonic seconds (tests inject a fake).
        tick_interval_s: how often expiry/reclaim/eviction run.
        security: cluster token / TLS (``ClusterSecurity.from_env()`` in the CLI);
            with a token every RPC connection and the admin and metadata HTTP
            ports authenticate.
        limits: see :class:`MasterLimits`.
        owns_process: the master's event loop is the only thread of its process
            that serves anyone (the ``mooncake_master`` command): whole-index
            scans with a pattern that cannot backtrack are matched in the loop at
            any size, which would starve other busy threads of the GIL (see
            ``_scan.py``).
    """

    def __init__(
        self,
        config: MasterConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = 0,
        metadata_host: str = "127.0.0.1",
        metadata_port: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick_interval_s: float = 0.1,
        max_frame: int | None = None,
        journal_path: str | None = None,
        journal_fsync: bool = False,
        security: ClusterSecurity | None = None,
        limits: MasterLimits | None = None,
        ha: HaConfig | None = None,
        ha_sync_timeout_s: float = DEFAULT_SYNC_TIMEOUT_S,
        owns_process: bool = False,
    ) -> None:
        self.config = config or MasterConfig()
        self.state = MasterState(self.config)
        self.state.tasks.wall_offset = time.time() - clock()
        self.limits = limits or MasterLimits()
        self.security = security or ClusterSecurity()
        self._clock = clock
        self._host, self._port = host, port
        self._metrics = (metrics_host, metrics_port) if metrics_port is not None else None
        self._metadata = (metadata_host, metadata_port) if metadata_port is not None else None
        self._tick_interval = tick_interval_s
        self._handlers = wrap_handlers(self.state, build_handlers(self.state))
        self._server: asyncio.base_events.Server | RpcServer | None = None
        self._unix_server: asyncio.base_events.Server | RpcServer | None = None
        self._admin: HttpServer | None = None
        self._metadata_http: HttpServer | None = None
        self.metadata_server: MetadataServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: the eviction a request asked for, paid ahead of the tick (_housekeep_soon)
        self._housekeeping: asyncio.Task[None] | None = None
        self._conns: set[_RpcProtocol] = set()
        self.buffered = 0
        self.refused_connections = 0
        #: idle connections closed to admit new ones at the connection cap
        self.evicted_connections = 0
        #: connections paused because the buffered-bytes budget was spent
        self.memory_paused: set[_RpcProtocol] = set()
        #: HA: connections of clients that post confirmations without waiting, by
        #: file descriptor, and a poll object over them (one system call finds
        #: those with bytes, however many clients there are)
        self.lazy: dict[int, _RpcProtocol] = {}
        self._lazy_poll = select.poll()
        # one read buffer for every connection: reads happen one at a time on the
        # loop, and each is copied into its connection's decoder at once
        self._read_buffer = memoryview(bytearray(READ_CHUNK))
        self._bad = RepeatLimiter(log)
        self._max_frame = max_frame
        self._max_connections = self.limits.max_connections
        self.started_at = time.time()
        self.addresses: ServiceAddresses | None = None
        self.journal = Journal(journal_path, fsync=journal_fsync) if journal_path else None
        self.replies = ReplyCache(self.limits.reply_cache_ttl_s)
        self.scanner = RegexScanner(
            self.limits.regex_deadline_s,
            in_loop_max_keys=None if owns_process else IN_LOOP_MAX_KEYS,
        )
        self.ha = ha
        #: the event loop's polling selector (run_polling) and its window: only a
        #: leader polls (see the ``role`` setter)
        self._selector: PollingSelector | None = None
        self._poll_window = 0.0
        self._role = "starting" if ha is not None else "leader"
        self.hub = ReplicationHub(ha_sync_timeout_s)
        self._elector: Elector | None = None
        self._keep: Any = None  # the leader's etcd KeepAlive (its deadline fences us)
        self._follower: Follower | None = None
        self._follow_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.leader_address = ""
        self.failovers = 0
        self._last_conn_check = 0.0
        self._in_process_port = 0
        #: periodic work: ticks run, their total duration, the most recent durations
        self.tick_count = 0
        self.tick_seconds = 0.0
        #: records a housekeeping slice visits per segment (follows
        #: HOUSEKEEPING_SLICE_S, see _housekeep)
        self._visits = HOUSEKEEPING_VISITS
        self.recent_ticks: deque[float] = deque(maxlen=50)
        #: batch-item counters and the rate samples of /metrics and the cluster page
        self.stats = MasterStats()

    @property
    def role(self) -> str:
        """HA: "leader" (serving), "standby", "warmup" or "starting"; without HA a
        master always leads."""
        return self._role

    @role.setter
    def role(self, value: str) -> None:
        self._role = value
        self._poll_for_role()

    def _poll_for_role(self) -> None:
        """Only a leader polls for requests before it sleeps: a standby answers
        nothing anybody waits for (its stream frames, the confirmations clients
        post without waiting), and its polls would take the CPU from the leader
        and the clients where they share cores."""
        selector = self._selector
        if selector is not None:
            selector.window_s = self._poll_window if self._role == "leader" else 0.0

    @property
    def connection_count(self) -> int:
        """Open RPC connections."""
        return len(self._conns)

    def now(self) -> float:
        return self._clock()

    async def start(self) -> ServiceAddresses:
        """Open every listener.

        Raises:
            PortInUse / PeerSocketError: a port cannot be bound (message names it).
        """
        self._loop = asyncio.get_running_loop()
        self._selector = polling_selector(self._loop)
        if self._selector is not None:
            self._poll_window = self._selector.window_s
            self._poll_for_role()
        if self.journal is not None:
            effects = self.journal.load()
            if effects:
                self.state.replay(effects, self._clock())
                self._load_kept_replies()
                log.info(
                    "journal %s: restored %d segment(s) and %d object(s); clients have "
                    "client_ttl to come back",
                    self.journal.path,
                    len(self.state.segments),
                    len(self.state.objects),
                )
            self.journal.rewrite(self.state.snapshot_effects())
            self.state.effects = []
        key = self.security.key
        if key is None:
            warn_open("master RPC, admin HTTP and metadata HTTP ports")
        warn_weak(key, "master")
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # room for the other files (64) and for what the two listeners accept in
        # one turn of the loop before admit() runs (the victims it closes are
        # closed a turn later): without it a burst of connections at the cap runs
        # out of files, and asyncio then stops accepting for a second at a time
        room = 64 + 2 * _ACCEPT_BURST
        if soft != resource.RLIM_INFINITY and soft - room < self._max_connections:
            self._max_connections = max(16, soft - room)
            log.info(
                "master RPC: at most %d connections (open-file limit %d; raise it with "
                "ulimit -n for more clients)",
                self._max_connections,
                soft,
            )
        sock = bind_listener(self._host, port=self._port, backlog=1024, what="master RPC listener")
        ssl_ctx = self.security.server_ssl_context() if self.security.tls else None
        loop = asyncio.get_running_loop()
        # on the master's own loop (mooncake_master), plain connections are served
        # inline by the selector (_rpcloop.py); TLS keeps asyncio's transports
        inline = loop if isinstance(loop, RpcLoop) and ssl_ctx is None else None
        try:
            if inline is not None:
                self._server = RpcServer(
                    inline, self._protocol, sock, burst=_ACCEPT_BURST, what="master RPC listener"
                )
            else:
                self._server = await loop.create_server(
                    self._protocol, sock=sock, ssl=ssl_ctx, backlog=_ACCEPT_BURST
                )
        except BaseException:
            sock.close()
            raise
        rpc = sock.getsockname()[:2]
        self._in_process_port = int(rpc[1])
        IN_PROCESS_MASTER_PORTS.add(self._in_process_port)
        # Same-host clients skip TCP: the same protocol on an abstract UNIX socket
        # named after the listening address (a round trip ~10 us shorter).
        unix_name = master_unix_name(str(rpc[0]), int(rpc[1]))
        try:
            if inline is not None:
                self._unix_server = RpcServer(
                    inline,
                    self._protocol,
                    _unix_listener(unix_name),
                    burst=_ACCEPT_BURST,
                    what="master same-host RPC listener",
                )
            else:
                self._unix_server = await loop.create_unix_server(
                    self._protocol, unix_name, backlog=_ACCEPT_BURST
                )
        except OSError as exc:
            log.info("no same-host (UNIX socket) RPC listener: %s; clients use TCP", exc)
        metrics = metadata = None
        try:
            if self._metadata is not None:
                # with a journal the entries survive a restart too: engines do not
                # have to publish theirs again before transfers to them work
                journal = self.journal
                self.metadata_server = MetadataServer(
                    snapshot=None
                    if journal is None
                    else MetadataSnapshot(f"{journal.path}.metadata", fsync=journal.fsyncs)
                )
                self._metadata_http = self.metadata_server.http_server(
                    *self._metadata, security=self.security
                )
                await self._metadata_http.start()
                metadata = (self._metadata_http.host, self._metadata_http.port)
            if self._metrics is not None:
                admin = AdminHttp(self)
                self._admin = HttpServer(
                    admin.handle,
                    self._metrics[0],
                    self._metrics[1],
                    name="master admin HTTP",
                    auth=HttpAuth(
                        key,
                        ADMIN_AUTH_CONTEXT,
                        open_paths=ADMIN_OPEN_PATHS,
                        name="master admin HTTP",
                    ),
                    ssl=self.security.server_ssl_context() if self.security.tls else None,
                )
                await self._admin.start()
                metrics = (self._admin.host, self._admin.port)
        except BaseException:
            await self.close()
            raise
        self.scanner.start()
        self._ticker = asyncio.create_task(self._tick_loop())
        self.addresses = ServiceAddresses(rpc, metrics, metadata, tls=self.security.tls)
        if self.ha is not None:
            self._start_ha(rpc)
        return self.addresses

    async def close(self) -> None:
        IN_PROCESS_MASTER_PORTS.discard(self._in_process_port)
        if self._elector is not None:
            elector, self._elector = self._elector, None
            await asyncio.get_running_loop().run_in_executor(None, elector.close)
        if self._follow_task is not None:
            self._follow_task.cancel()
            await asyncio.gather(self._follow_task, return_exceptions=True)
            self._follow_task = None
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._unix_server is not None:
            self._unix_server.close()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._unix_server is not None:
            await self._unix_server.wait_closed()
            self._unix_server = None
        for http in (self._admin, self._metadata_http):
            if http is not None:
                await http.close()
        self._admin = self._metadata_http = None
        self.scanner.close()
        if self.journal is not None:
            self.journal.abort_compaction()
            self.persist()
            self.journal.close()

    # ------------------------------------------------------------------------------
    # periodic work
    # ------------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_interval)
            try:
                now = self._clock()
                if self.serving():  # a leader past its lease deadline decides nothing
                    started = time.perf_counter()
                    more = self.state.tick(now, self._visits)
                    self.persist()
                    self._timed(started)
                    if more:
                        self._housekeep_soon()  # one task pays, between requests
                    drops = self.state.offload.take_fs_drops()
                    if drops:  # files of dropped DISK replicas (--root_fs_dir)
                        self._spawn(asyncio.to_thread(unlink_files, drops))
                    mono = time.monotonic()
                    self.hub.check(mono)
                    self.hub.heartbeat(mono)
                    now = self._clock()
                if self.lazy:  # answered while no stream frame comes (or posted here
                    self.drain_lazy()  # by a client that still takes us for a standby)
                self.stats.sample(self.state)
                self.replies.prune(now)
                mono = time.monotonic()
                if mono - self._last_conn_check >= 1.0:
                    self._last_conn_check = mono
                    self._check_connections(mono)
                if self.journal is not None and self.journal.needs_compaction():
                    self._spawn(self._compact())
            except Exception:  # a bug here must not stop expiry for good
                log.exception("master tick failed")

    async def _housekeep(self) -> None:
        """Eviction owed, dead entries: a slice per turn of the loop (requests are
        served between two slices)."""
        more = True
        while more and self.serving():
            # Yield twice: after the first the loop polls for I/O, but this task
            # was queued before what that poll found and would run first; after
            # the second it runs behind those requests -- a request then waits for
            # the slice in progress only, not for the next one too.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            started = time.perf_counter()
            more = self.state.housekeeping(self._clock(), self._visits)
            self.persist()
            took = self._timed(started)
            if more:  # (a last slice that ran out of work says nothing of the cost)
                self._visits = max(
                    _VISITS_MIN,
                    min(_VISITS_MAX, int(self._visits * HOUSEKEEPING_SLICE_S / max(took, 1e-6))),
                )

    def _housekeep_soon(self) -> None:
        """A request made a segment owe eviction (a put found the pool full), or a
        tick left work: pay it from the next turn of the loop (rather than at the
        next tick, so that the puts of the next 100 ms find room instead of each
        evicting for itself first), in one task: two paying at once would put two
        slices between a request and its answer."""
        self.state.debt_raised = False
        task = self._housekeeping
        if task is not None and not task.done():
            return  # its next slice sees the new debt
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # (a direct call outside the service's loop: the tick pays it)
        self._housekeeping = self._spawn(self._housekeep())

    def _timed(self, started: float) -> float:
        """Count a tick or housekeeping slice that began at ``started``; returns
        how long it took (seconds)."""
        took = time.perf_counter() - started
        self.tick_count += 1
        self.tick_seconds += took
        self.recent_ticks.append(took)
        return took

    def _check_connections(self, now: float) -> None:
        limits = self.limits
        for conn in list(self._conns):
            reason = conn.overdue(now, limits)
            if reason:
                self._bad(
                    f"deadline:{reason}",
                    logging.WARNING,
                    "master RPC: closing connection from %s: %s",
                    conn.peer,
                    reason,
                )
                conn.abort()
        self.resume_readers()

    def read_window(self) -> memoryview:
        """Where the next read of a connection goes: READ_CHUNK bytes while the
        buffered-bytes budget allows, at most the budget left (never less than
        SMALL_READ) when it runs out."""
        left = self.limits.max_buffered_bytes - self.buffered
        if left >= READ_CHUNK:
            return self._read_buffer
        return self._read_buffer[: max(left, SMALL_READ)]

    def resume_readers(self) -> None:
        """Resume the connections paused for memory once the budget has room."""
        if self.memory_paused and self.buffered <= self.limits.max_buffered_bytes:
            paused, self.memory_paused = self.memory_paused, set()
            for conn in paused:
                conn.resume_if_paused()

    async def _compact(self) -> None:
        """Rewrite the journal from the current state, a shard at a time."""
        journal = self.journal
        if journal is None or journal.compacting:
            return
        journal.begin_compaction()
        try:
            journal.add_snapshot(self.state.segment_effects())
            for i in range(SHARDS):
                journal.add_snapshot(self.state.shard_effects(i))
                if i % 16 == 15:
                    await asyncio.sleep(0)
            journal.finish_compaction()
        except BaseException:
            journal.abort_compaction()
            raise

    def persist(self, *, confirmed: bool = False) -> int:
        """Journal the state changes and ship them to standbys before acknowledging
        them; returns the sequence number replies must wait for (0: none).
        ``confirmed``: only commits of puts their clients confirm to the standbys."""
        effects = self.state.drain_effects()
        if not effects:
            return 0
        if self.journal is not None:
            self.journal.append([e for e in effects if isinstance(e, DURABLE)])
        return self.hub.ship(effects, confirmed=confirmed)

    # ------------------------------------------------------------------------------
    # HA
    # ------------------------------------------------------------------------------

    def serving(self) -> bool:
        """May this master answer clients now?  A leader whose lease deadline
        passed (etcd unreachable, or this process was frozen) stops at once, before
        the elector thread even notices."""
        if self._role != "leader":
            return False
        keep = self._keep
        return keep is None or time.monotonic() < keep.deadline

    def may_stream(self) -> bool:
        """Standbys may follow an elected leader already during its warm-up."""
        if self.serving():
            return True
        elector = self._elector
        return elector is not None and elector.role == "warmup"

    def ha_confirm(self, req: msg.HaConfirm) -> tuple[str, ...]:
        """A client confirms the puts it is ending at the leader (answered in any
        role: only a standby in sync can vouch for them); returns the keys this
        master cannot vouch for."""
        follower = self._follower
        if self.role != "standby" or follower is None:
            return req.keys
        return follower.confirm(req.client_id, req.keys, self._clock(), req.slots)

    def drain_lazy(self) -> None:
        """Process the confirmations clients posted without waiting (their
        connections are not read when bytes arrive, see ``_RpcProtocol._go_lazy``):
        after each frame of the leader's stream, on each tick, and before this
        master takes over as the leader."""
        for fd, _ in self._lazy_poll.poll(0):
            conn = self.lazy.get(fd)
            if conn is not None:
                conn.drain()

    def add_lazy(self, fd: int, conn: _RpcProtocol) -> None:
        self.lazy[fd] = conn
        self._lazy_poll.register(fd, select.POLLIN)

    def drop_lazy(self, fd: int) -> None:
        if self.lazy.pop(fd, None) is not None:
            self._lazy_poll.unregister(fd)

    def may_confirm(self) -> bool:
        """A standby following a leader (its stream may bring what a confirmation
        lacks)."""
        follower = self._follower
        return self.role == "standby" and follower is not None and follower.synced

    def not_serving_reply(self) -> tuple[int, str]:
        leader = self.leader_address
        hint = f"; the leader is {leader}" if leader else ""
        return (
            int(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS),
            f"this master is not the leader (role {self.role}){hint}; clients given "
            "etcd://... find the leader themselves",
        )

    def _start_ha(self, rpc: tuple[str, int]) -> None:
        assert self.ha is not None
        advertise = self.ha.advertise or f"{rpc[0]}:{rpc[1]}"
        if advertise.startswith(("0.0.0.0:", "[::]:", ":::")):
            from ..._net import first_non_loopback_ipv4

            advertise = f"{first_non_loopback_ipv4() or '127.0.0.1'}:{rpc[1]}"
        self.ha = HaConfig(
            self.ha.etcd_endpoints, self.ha.cluster_id, self.ha.lease_ttl_s, advertise
        )
        self.state.effects = []
        self._elector = Elector(
            self.ha,
            on_standby=lambda leader, view: self._soon(self._become_standby, leader, view),
            on_leader=lambda view, keep: self._soon(self._become_leader, view, keep),
            on_lost=lambda reason: self._soon(self._lose_leadership, reason),
            stream_silence=self._stream_silence,
            silent_after_s=FROZEN_SILENCE_S,
        )
        self._elector.start()

    @property
    def follower(self) -> Follower | None:
        """The leader's stream this master applies (set while it follows one)."""
        return self._follower

    def stream_status(self) -> dict[str, Any] | None:
        """``/ha_status``'s view of the leader's stream; None when not following."""
        follower = self._follower
        if follower is None:
            return None
        silent = self._stream_silence()
        return {
            "leader": follower.leader,
            "synced": follower.synced,
            "applied_seq": follower.seq,
            # seconds since the leader's stream last brought anything: an idle
            # leader sends every 0.2 s, so more than ~1 s means it is stuck
            "silent_s": None if silent is None else round(silent, 3),
        }

    def _stream_silence(self) -> float | None:
        """Seconds since the leader's stream last brought anything (the elector's
        frozen-leader test; read from its thread)."""
        follower = self._follower
        if self.role != "standby" or follower is None:
            return None
        return follower.silent_for(time.monotonic())

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _install(self, state: MasterState) -> None:
        self.state = state
        state.tasks.wall_offset = time.time() - self._clock()
        self._handlers = wrap_handlers(state, build_handlers(state))

    def _become_standby(self, leader: str, view: int) -> None:
        assert self.ha is not None
        was_leader = self.role == "leader"
        self.role = "standby"
        self.leader_address = leader
        self._keep = None
        if was_leader:
            self._drop_clients()
        if self._follow_task is not None:
            self._follow_task.cancel()
        self._follower = Follower(self.config, self.ha.advertise, self.security, clock=self._clock)
        self._follower.on_frame = self.drain_lazy
        self._follow_task = asyncio.ensure_future(
            self._follower.run(leader, view, self._install, self._leader_gone)
        )

    def _leader_gone(self, leader: str) -> None:
        """The leader's process is gone: have the elector revoke its lease (etcd
        calls block: on a worker thread)."""
        elector = self._elector
        if elector is None:
            return

        def revoke() -> None:
            try:
                elector.leader_gone(leader)
            except EtcdError as exc:
                log.warning("HA: revoking the lease of the gone leader %s failed: %s", leader, exc)

        self._spawn(asyncio.to_thread(revoke))

    def _become_leader(self, view: int, keep: Any) -> None:
        # the confirmations clients posted without waiting: still as a standby (a
        # put they confirm may have been acknowledged by the previous leader)
        self.drain_lazy()
        follower, self._follower = self._follower, None
        if self._follow_task is not None:
            self._follow_task.cancel()
            self._follow_task = None
        now = self._clock()
        if follower is not None and follower.state is not None and follower.synced:
            self._install(follower.state)
            self.failovers += 1
            log.info(
                "HA: now the leader (view %d) with the previous leader's state: %d object(s), "
                "%d segment(s)",
                view,
                len(self.state.objects),
                len(self.state.segments),
            )
        elif follower is not None:
            log.error(
                "HA: now the leader (view %d) but the previous leader's state never arrived "
                "in full; serving what this master has (%d object(s))",
                view,
                len(self.state.objects),
            )
        self.state.promote(now)
        self._load_kept_replies()
        self.state.view_version = max(self.state.view_version, view)
        self.state.effects = []
        if follower is not None and follower.synced:
            self._commit_confirmed(follower, now)
        self._keep = keep
        self.leader_address = self.ha.advertise if self.ha is not None else ""
        self.role = "leader"

    def _commit_confirmed(self, follower: Follower, now: float) -> None:
        """Commit the writes their clients confirmed to this standby whose end the
        previous leader's stream did not bring: the leader may have acknowledged
        them without waiting for a standby (``HaConfirm``)."""
        done = 0
        for key, writer, slot in follower.take_confirmed():
            try:
                if slot:
                    self.state.commit_slot(writer, slot, key, now)
                else:
                    self.state.put_end(writer, key, now)
                done += 1
            except StoreError as exc:  # revoked meanwhile: the stream settled it
                log.info("HA: confirmed put of %r not committed: %s", key, exc)
        if done:
            log.warning(
                "HA: committed %d put(s) the previous leader ended (their clients "
                "confirmed them here) but whose commit had not reached this master",
                done,
            )

    def _lose_leadership(self, reason: str) -> None:
        self.role = "standby"
        self._keep = None
        self.leader_address = ""
        self._drop_clients()

    def _drop_clients(self) -> None:
        """Close every connection: clients reconnect and find the new leader."""
        for conn in list(self._conns):
            conn.abort()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------------------
    # requests
    # ------------------------------------------------------------------------------

    def decode(
        self, method: msg.MasterMethod, params: Any, escapes: bool
    ) -> msg.Request | tuple[int, Any]:
        """The typed request (``MasterFrameDecoder.next_request``'s parts), or the
        (code, message) refusing it.  (``_RpcProtocol._process`` decodes the common
        case, a dict without surrogate escapes, itself.)"""
        try:
            return msg.decode_request(method, params, escapes=escapes)
        except InvalidParams as exc:
            return self.refuse(method, exc)

    def refuse(self, method: msg.MasterMethod, exc: InvalidParams) -> tuple[int, Any]:
        """The (code, message) answering a request whose parameters are invalid
        (counted as a request of ``method`` and as a failure)."""
        self._count(method.value)
        self._count(method.value, failed=True)
        return int(ErrorCode.INVALID_PARAMS), f"{method.value}: {exc.message}"

    def _count(self, name: str, *, failed: bool = False) -> None:
        counters = self.state.metrics.failures if failed else self.state.metrics.requests
        counters[name] = counters.get(name, 0) + 1

    def cached(self, req: msg.Request) -> tuple[int, Any] | None:
        if isinstance(req, msg.Mutation) and req.rid:
            return self.replies.lookup(req.client_id, req.rid)
        return None

    def remember(self, req: msg.Request, code: int, value: Any) -> None:
        if isinstance(req, msg.Mutation) and req.rid:
            self._remember(req, code, value, self._clock())

    def _remember(self, req: msg.Mutation, code: int, value: Any, now: float) -> None:
        """Keep the answer to a mutation with a request id (``remember`` checks)."""
        self.replies.store(req.client_id, req.rid, req.ack, code, value, now)
        if code == 0 and self.state.effects is not None and type(req) in _KEPT_REPLIES:
            # journaled and shipped with the removal: a retry that reaches a
            # restarted master or a new leader gets this answer too (a master
            # without journal or HA restarts empty: nothing to keep it for)
            self.state.keep_reply(req.client_id, req.rid, code, value)

    def _load_kept_replies(self) -> None:
        """The answers a journal or the previous leader kept (``keep_reply``)
        into the reply cache: retries of those requests get them."""
        now = self._clock()
        for kept in self.state.kept_replies:
            self.replies.store(kept.client_id, kept.rid, 0, kept.code, kept.value, now)

    def dispatch(self, req: msg.Request) -> tuple[int, Any]:
        """Run one (non-scan) request against the state; returns (code, value or message).

        On every request's path: what is written inline here (the request counter,
        the reply cache and batch statistics only for the requests they concern)
        saves a few calls per request, which the master's CPU per call shows."""
        kind = type(req)
        name = req.NAME
        counts = self.state.metrics.requests
        counts[name] = counts.get(name, 0) + 1
        mutation = req if isinstance(req, msg.Mutation) and req.rid else None
        if mutation is not None:
            hit = self.replies.lookup(mutation.client_id, mutation.rid)
            if hit is not None:
                return hit
        if self.state.slot_runs and kind not in RUN_SAFE:
            self.state.spill_slot_runs()
        now = self._clock()
        value: Any
        try:
            # the typed reply (wire/_master_reply_msgs.py) as the JSON value it sends
            reply = self._handlers[kind](req, now)
            if reply.JSON_TEXT:  # (every get's reply: its text made directly)
                code, value = 0, RawJson(reply.to_json())
            else:
                code, value = 0, reply.to_wire()
                if kind is msg.Ping and self.hub.links:
                    standbys = self.hub.ready_names()
                    if standbys:
                        value["standbys"] = list(standbys)
        except StoreError as exc:
            self._count(name, failed=True)
            code, value = exc.code, exc.message
        except Exception as exc:  # a bug of the master, not the client's fault
            log.exception("master: internal error handling %s", name)
            self._count(name, failed=True)
            code = int(ErrorCode.INTERNAL_ERROR)
            value = f"internal error of the master handling {name}: {exc!r} (see the master log)"
        if kind in BATCH_STATS:
            self.stats.record(req, code, value)
        if mutation is not None:
            self._remember(mutation, code, value, now)
        if self.state.debt_raised:
            self._housekeep_soon()
        return code, value

    async def dispatch_scan(self, req: msg.Request) -> tuple[int, Any]:
        """Run a whole-index request a slice at a time."""
        name = req.NAME
        self._count(name)
        self.state.spill_slot_runs()
        hit = self.cached(req)
        if hit is not None:
            return hit
        try:
            code, value = 0, await self._scan(req)
        except StoreError as exc:
            self._count(name, failed=True)
            code, value = exc.code, exc.message
        except Exception as exc:
            log.exception("master: internal error handling %s", name)
            self._count(name, failed=True)
            code = int(ErrorCode.INTERNAL_ERROR)
            value = f"internal error of the master handling {name}: {exc!r} (see the master log)"
        self.remember(req, code, value)  # (what it keeps is persisted with the change)
        self.persist()
        return code, value

    async def key_slices(
        self, pattern: str | None = None, among: list[str] | None = None
    ) -> AsyncIterator[list[str]]:
        """Keys (matching ``pattern`` with ``re.search``, when given), a slice at a
        time, yielding to the loop between slices; ``among``: these keys instead
        of the object index's."""
        objects = self.state.objects
        batch: list[str] = []
        shards = SHARDS if among is None else max(1, -(-len(among) // SLICE_KEYS))
        # reserved buffers are writes under names no key can have: never listed
        hidden = among is None and self.state.slots_held() > 0
        # a small scan with a plain pattern is matched here (see _scan.py)
        here = None
        if pattern is not None:
            here = self.scanner.in_loop_pattern(
                pattern, len(objects) if among is None else len(among)
            )
        for i in range(shards):
            if among is None:
                keys = objects.shard_keys(i)
                batch += [k for k in keys if k[:1] != SLOT_MARK] if hidden else keys
            else:
                batch += among[i * SLICE_KEYS : (i + 1) * SLICE_KEYS]
            if len(batch) < SLICE_KEYS and i < shards - 1:
                continue
            if not batch:
                continue
            if pattern is None:
                hits = batch
            elif here is not None:
                hits = await self.scanner.match_here(here, batch)
            else:
                hits = [batch[j] for j in await self.scanner.match(pattern, batch)]
            batch = []
            yield hits
            await asyncio.sleep(0)

    async def _remove_pieces(self, keys: list[str], force: bool) -> int:
        removed = 0
        for piece in _pieces(keys):
            removed += self.state.remove_keys(piece, force, self._clock())
            self.persist()
            await asyncio.sleep(0)
        return removed

    async def _scan(self, req: msg.Request) -> Any:
        st = self.state
        pattern = getattr(req, "pattern", None)
        if pattern is not None:
            try:  # refuse a bad pattern even when no key is there to match it
                re.compile(pattern)
            except re.error as exc:
                raise InvalidParams(f"invalid regular expression {pattern!r}: {exc}") from None
        if isinstance(req, msg.GetReplicaListByRegex):
            # The reply is encoded a slice at a time too: encoding 50k keys' replicas
            # at once holds the loop ~90 ms (measured in tests/store/test_master_input.py).
            parts: list[str] = []
            found = 0
            limit = self.limits.max_regex_results

            def add(out: dict[str, Any]) -> None:
                nonlocal found
                found += len(out)
                if found > limit:
                    raise InvalidParams(
                        f"regular expression {req.pattern!r} matches more than {limit} keys; "
                        "narrow it (the reply is a single frame)"
                    )
                if out:
                    parts.append(encode_json(out)[1:-1])

            async for keys in self.key_slices(req.pattern):
                for piece in _pieces(keys):
                    add(
                        {
                            key: [d.to_wire() for d in descs]
                            for key, descs in st.replicas_of(piece, self._clock()).items()
                        }
                    )
                    await asyncio.sleep(0)
            async for keys in self.key_slices(req.pattern, st.offload.disk_only_keys()):
                add({key: [w] for key in keys if (w := st.offload.wire(key)) is not None})
            return RawJson("{" + ",".join(parts) + "}")
        if isinstance(req, msg.RemoveByRegex):
            removed = 0
            async for keys in self.key_slices(req.pattern):
                removed += await self._remove_pieces(keys, req.force)
            async for keys in self.key_slices(req.pattern, st.offload.disk_only_keys()):
                removed += st.offload.remove_keys(keys)  # LOCAL_DISK-only objects
                self.persist()
            return RemoveByRegexReply(removed).to_wire()
        assert isinstance(req, msg.RemoveAll)
        removed = 0
        async for keys in self.key_slices():
            removed += await self._remove_pieces(keys, req.force)
        removed += st.offload.remove_keys(st.offload.disk_only_keys())
        return RemoveAllReply(removed).to_wire()

    # ------------------------------------------------------------------------------
    # connections
    # ------------------------------------------------------------------------------

    def _protocol(self) -> _RpcProtocol:
        return _RpcProtocol(self)

    def admit(self, conn: _RpcProtocol) -> bool:
        """Take a new connection; at the cap, close the connection that has been
        idle longest (clients reconnect transparently and retry with the same
        request ids) rather than lock every new client out."""
        if len(self._conns) >= self._max_connections:
            victim = min(
                (c for c in self._conns if c.evictable()),
                key=lambda c: (c.authenticated, c.last_active),
                default=None,
            )
            if victim is not None:
                self.evicted_connections += 1
                self._bad(
                    "conn-evict",
                    logging.WARNING,
                    "master RPC: %d connections open (--rpc_max_connections / the "
                    "open-file limit): closing idle connection from %s to admit %s",
                    len(self._conns),
                    victim.peer,
                    conn.peer,
                )
                victim.abort()
                self._conns.discard(victim)
                self._conns.add(conn)
                return True
            self.refused_connections += 1
            self._bad(
                "conn-cap",
                logging.WARNING,
                "master RPC: refusing a connection from %s: %d connections already open "
                "(--rpc_max_connections / the open-file limit)",
                conn.peer,
                len(self._conns),
            )
            return False
        self._conns.add(conn)
        return True


#: the listen backlog of the RPC listeners, which is also how many connections
#: asyncio accepts in one turn of the loop (its default)
_ACCEPT_BURST: Final = 100


def _unix_listener(name: str) -> socket.socket:
    """A listening UNIX stream socket bound to ``name`` (abstract when it starts
    with a NUL byte), as ``loop.create_unix_server`` would make it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        sock.listen(_ACCEPT_BURST)
    except BaseException:
        sock.close()
        raise
    return sock


#: mutations whose retry would be answered differently once they acted: their
#: answers are kept with the state (``MasterState.keep_reply``).  A retried
#: removal would be OBJECT_NOT_FOUND, an unmount SEGMENT_NOT_FOUND, a replica
#: clear would report no key, a task creation would queue a second task (which
#: fails once the first ran), and a copy's or move's end would find no copy in
#: progress (its task would be reported FAILED).  Retries of the others find
#: what the first attempt did and answer the same (a put's end, a mount), or
#: concern state a restart drops anyway (writes and copies in flight)
_KEPT_REPLIES: Final = frozenset(
    {
        msg.Remove,
        msg.BatchRemove,
        msg.RemoveByRegex,
        msg.RemoveAll,
        msg.UnmountSegment,
        msg.BatchReplicaClear,
        msg.CreateCopyTask,
        msg.CreateMoveTask,
        msg.CopyEnd,
        msg.MoveEnd,
    }
)
#: the requests that end puts and may name the standbys their client confirms
#: them to (``confirmed``): answered without waiting for a standby when covered
#: requests that cannot touch a reserved buffer held as a run (``_slot_runs.py``):
#: they leave the runs as they are; any other request spills them first
RUN_SAFE: Final = frozenset(
    {
        msg.ReserveSlots,
        msg.CommitSlot,
        msg.BatchCommitSlots,
        msg.Ping,
        msg.ExistKey,
        msg.BatchExistKey,
        msg.GetReplicaList,
        msg.BatchGetReplicaList,
        msg.PutStart,
        msg.BatchPutStart,
        msg.PutEnd,
        msg.BatchPutEnd,
        msg.Remove,
        msg.BatchRemove,
    }
)
_ENDS: Final = (msg.PutEnd, msg.BatchPutEnd, msg.CommitSlot, msg.BatchCommitSlots)
#: how ``_RpcProtocol._process`` routes a request, by its type (one dict lookup):
#: most are answered at once (_PLAIN); the others have a branch of their own
_PLAIN: Final = 0
_ACK: Final = 1
_FOLLOW: Final = 2
_CONFIRM: Final = 3
_SCAN: Final = 4
_END: Final = 5
_ROUTES: Final[dict[type, int]] = {
    msg.Ack: _ACK,
    msg.Follow: _FOLLOW,
    msg.HaConfirm: _CONFIRM,
    **dict.fromkeys(_SCANS, _SCAN),
    **dict.fromkeys(_ENDS, _END),
}
#: an HaConfirm of keys a standby does not know yet waits for up to this many
#: stream frames, each for at most _CONFIRM_WAIT_S
_CONFIRM_WAITS: Final = 3
_CONFIRM_WAIT_S: Final = 0.002
#: most bytes one read of a lazy connection takes (it is read until empty)
_LAZY_READ: Final = 1 << 16


class _RpcProtocol(asyncio.BufferedProtocol):
    """One client connection: (authentication,) frames in, replies out, in order.

    A plain (buffered) Protocol, no StreamReader/Task per connection: requests
    are decoded and answered straight from ``buffer_updated``, which saves tens
    of microseconds per round trip on the master's single event loop.  Reads go
    into the service's shared buffer, sized by :meth:`MasterService.read_window`
    so that all connections together stay within the buffered-bytes budget.  A
    whole-index request is answered by a task; the connection reads nothing
    more until it is done, so replies stay in request order.
    """

    def __init__(self, service: MasterService) -> None:
        self._svc = service
        #: the service's shared read buffer, and the buffered bytes up to which all
        #: of it may be read into (``MasterService.read_window``)
        self._rbuf = service._read_buffer
        self._roomy = service.limits.max_buffered_bytes - READ_CHUNK
        self._decoder = (
            MasterFrameDecoder()
            if service._max_frame is None
            else MasterFrameDecoder(service._max_frame)
        )
        self._transport: asyncio.Transport | None = None
        #: the socket transport under it, released when the connection is lost
        self._raw: asyncio.BaseTransport | None = None
        self.peer: object = None
        key = service.security.key
        self._auth: ServerHandshake | None = (
            ServerHandshake(key, AUTH_CONTEXT) if key is not None else None
        )
        self._sniff = key is None  # no token: refuse (explain to) clients that have one
        self._busy = False  # a whole-index request is running
        self._paused = 0  # reasons: 1 write backpressure, 2 memory, 4 busy, 8 lazy
        self._buffered = 0
        self._opened = time.monotonic()
        self._last_active = self._opened
        self._partial_since: float | None = None
        self._following = False  # a standby's stream (HA)
        #: a client's lazy confirmations (HA): read when the stream brings a frame
        #: (:meth:`drain`), not when they arrive
        self.lazy = False
        self._lazy_fd = -1
        #: replies waiting for a standby's acknowledgement: (sequence, frames)
        self._held: collections.deque[tuple[int, bytes]] = collections.deque()
        self.held_since = 0.0

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    # --- lifecycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._raw = raw_transport(transport)
        self.peer = transport.get_extra_info("peername") or "local UNIX socket"
        if not self._svc.admit(self):
            transport.abort()
            self._transport = None
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        svc = self._svc
        svc._conns.discard(self)
        if self.lazy:
            svc.drop_lazy(self._lazy_fd)
        svc.memory_paused.discard(self)
        svc.hub.lost(self)
        self._account(0)
        self._held.clear()
        self._transport = None
        release_transport(self._raw)
        self._raw = None
        svc.resume_readers()

    @property
    def authenticated(self) -> bool:
        return self._auth is None

    @property
    def last_active(self) -> float:
        return self._last_active

    def evictable(self) -> bool:
        """Idle: nothing being received or answered (or still authenticating).  A
        lazy connection never is: bytes it holds unread may be confirmations."""
        if self._transport is None or self.lazy:
            return False
        return self._auth is not None or (not self._busy and self._partial_since is None)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def overdue(self, now: float, limits: MasterLimits) -> str:
        """Why this connection should be closed now ("" if it should not)."""
        if self._following:
            return ""
        if self._auth is not None and now - self._opened > limits.auth_timeout_s:
            return f"no cluster-token handshake within {limits.auth_timeout_s:g} s"
        if self._partial_since is not None and now - self._partial_since > limits.frame_deadline_s:
            return f"a request frame did not arrive completely within {limits.frame_deadline_s:g} s"
        if (
            not self._busy
            and self._partial_since is None
            and now - self._last_active > limits.idle_timeout_s
        ):
            return f"idle for more than {limits.idle_timeout_s:g} s"
        return ""

    # --- lazy confirmations (HA) ---------------------------------------------------

    def _go_lazy(self) -> None:
        """The client posts confirmations on this connection without waiting for
        the answers: stop reading it when bytes arrive (which would wake this
        standby once per put); :meth:`MasterService.drain_lazy` reads it when the
        leader's stream brings a frame, on the master's tick, and before this
        master takes over as the leader.  Not over TLS (its bytes are read by the
        transport only): such a connection is read as any other."""
        transport = self._transport
        if transport is None or transport.get_extra_info("sslcontext") is not None:
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        self.lazy = True
        self._lazy_fd = sock.fileno()
        self._pause(8)
        self._svc.add_lazy(self._lazy_fd, self)

    def drain(self) -> None:
        """Process what the client posted on this lazy connection so far."""
        while self._transport is not None and not self._transport.is_closing():
            try:
                data = os.read(self._lazy_fd, _LAZY_READ)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.abort()
                return
            if not data:
                self.abort()  # the client closed it (no reader noticed: paused)
                return
            self.data_received(data)

    # --- flow control -------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self._transport is not None:
            self._transport.resume_reading()

    def resume_if_paused(self) -> None:
        self._resume(2)

    def pause_writing(self) -> None:
        # a client pipelining without reading its replies: stop reading its requests
        self._pause(1)

    def resume_writing(self) -> None:
        self._resume(1)

    def _account(self, buffered: int) -> None:
        self._svc.buffered += buffered - self._buffered
        self._buffered = buffered

    # --- data ---------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._svc.buffered <= self._roomy:  # (read_window's common case, inline)
            return self._rbuf
        return self._svc.read_window()

    def buffer_updated(self, nbytes: int) -> None:
        if (
            self._auth is None
            and not self._sniff
            and not self._busy  # (else a request waits in the decoder: feed it)
            and self._transport is not None
        ):
            # a client waiting for each answer sends one request per read: served
            # from the read buffer where it lies (data_received feeds the decoder)
            read = self._decoder.whole_key_read(self._rbuf, nbytes)
            if read is not None:
                self._last_active = time.monotonic()
                self._key_read(*read)
                return
            done = self._decoder.whole_mutation(self._rbuf, nbytes)
            if done is not None:  # (a remove, a single put's commit)
                self._last_active = time.monotonic()
                self._process(done)
                return
            try:
                frame = self._decoder.whole_request(self._rbuf, nbytes)
            except MalformedMessage as exc:
                self._malformed(exc)
                return
            if frame is not None:
                self._last_active = time.monotonic()
                self._process(frame)
                return
        self.data_received(self._rbuf[:nbytes])

    def _key_read(self, req_id: int, method: msg.MasterMethod, key: str) -> None:
        """Serve an ``ExistKey`` / ``GetReplicaList`` the decoder read without its
        JSON decoder (``whole_key_read``): when its reply waits for nothing (no
        standby, nothing held), straight through :meth:`MasterService.dispatch`,
        as :meth:`_process` would; else through :meth:`_process`."""
        svc = self._svc
        if svc.hub.links or self._held or not svc.serving():
            self._process((req_id, method, {"key": key}, False))
            return
        transport = self._transport
        assert transport is not None  # (buffer_updated's condition)
        code, value = svc.dispatch(KEY_READ_TYPES[method](key))
        if svc.state.effects:  # e.g. the SSD tier promoting what was read: journaled first
            self._send(transport, [self._encode(req_id, code, value)], True, 0)
        elif not svc.serving():
            self._fence()
        else:
            transport.write(self._encode(req_id, code, value))

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes from the peer (``data`` is only valid during this call)."""
        transport = self._transport
        if transport is None:
            return
        self._last_active = time.monotonic()
        if self._auth is not None:
            data = self._authenticate(bytes(data))
            if not data:
                return
        elif self._sniff:
            self._sniff = False
            if looks_like_hello(data[:16]):
                self._svc._bad(
                    f"notoken:{self.peer}",
                    logging.ERROR,
                    "master RPC: client %s authenticates with a cluster token but this master "
                    "has none; set the same PYMOONCAKE_CLUSTER_TOKEN on the master",
                    self.peer,
                )
                transport.write(no_token_reply())
                transport.close()
                return
        self._decoder.feed(data)
        self._process()

    def _authenticate(self, data: bytes) -> bytes:
        auth = self._auth
        assert auth is not None and self._transport is not None
        auth.feed(data)
        out = auth.bytes_to_send()
        if out:
            self._transport.write(out)
        if auth.failed is not None:
            self._svc._bad(
                f"auth:{auth.failed.kind}",
                logging.WARNING,
                "master RPC: refusing %s: %s (every client needs the master's "
                "PYMOONCAKE_CLUSTER_TOKEN)",
                self.peer,
                auth.failed.message,
            )
            if auth.failed.kind is FailureKind.UNAUTHENTICATED:
                # a client without a token sent a request: answer it with the reason
                # (it is not retried) instead of a bare close (retried until timeout)
                req_id = _request_id(data)
                if req_id is not None:
                    self._transport.write(
                        encode_reply(req_id, int(ErrorCode.ILLEGAL_CLIENT), NO_TOKEN_MESSAGE)
                    )
            self._transport.close()
            return b""
        if not auth.done:
            return b""
        self._auth = None
        return auth.trailing

    def _process(
        self,
        first: tuple[int, msg.MasterMethod, Any, bool] | tuple[int, msg.Request] | None = None,
    ) -> None:
        """Serve the requests buffered (``first``: one already read, as a frame's
        parts or as the request ``whole_mutation`` made of it) and send their
        replies, in order."""
        transport = self._transport
        if transport is None:
            return
        svc = self._svc
        decoder = self._decoder
        out: list[bytes] = []
        served = False
        serving = svc.serving()
        # HA: what this batch's replies wait for beyond their own effects: 1 = every
        # served request is a PutEnd its client confirms to every standby in sync
        # (no wait for its own commit), 2 = a plain PutEnd (possibly repeated: wait
        # for everything shipped before it)
        ends = 0
        frame = first
        try:
            while not self._busy:
                if first is None:
                    frame = decoder.next_request()
                    if frame is None:
                        break
                elif frame is None:
                    break  # (buffer_updated's one request, served: nothing is buffered)
                req: msg.Request | tuple[int, Any]
                if len(frame) == 2:  # (read whole by the decoder: whole_mutation)
                    req_id, req = frame
                else:
                    req_id, method, params, escapes = frame
                    if type(params) is dict and not escapes:  # (decode's common case)
                        try:
                            req = REQUEST_TYPES[method](params)
                        except InvalidParams as exc:
                            req = svc.refuse(method, exc)
                    else:
                        req = svc.decode(method, params, escapes)
                frame = None
                if isinstance(req, tuple):  # refused: (code, message)
                    out.append(encode_reply(req_id, *req))
                    continue
                route = _ROUTES.get(type(req), _PLAIN)
                if route == _PLAIN and serving:  # most requests: answered at once
                    if ends == 1:
                        ends = 0  # another request: its own effects are waited for
                    served = True
                    code, value = svc.dispatch(req)
                    out.append(self._encode(req_id, code, value))
                elif route == _ACK:
                    assert isinstance(req, msg.Ack)
                    svc.hub.on_ack(self, req.seq)
                elif route == _FOLLOW and svc.may_stream():
                    assert isinstance(req, msg.Follow)
                    self._following = True
                    svc._spawn(svc.hub.follow(self, req_id, req, svc.state))
                elif route == _CONFIRM:
                    assert isinstance(req, msg.HaConfirm)
                    if req.lazy and not self.lazy:
                        self._go_lazy()
                    missing = svc.ha_confirm(req)
                    if missing and svc.may_confirm() and not req.lazy:
                        # the write's reservation is likely still in the stream's
                        # socket (the leader ships it right after PutStart's reply):
                        # answer once the next frame is in
                        self._busy = True
                        self._pause(4)
                        svc._spawn(self._confirm_later(req_id, req))
                    else:
                        out.append(self._encode(req_id, 0, {"missing": list(missing)}))
                elif not serving:
                    out.append(encode_reply(req_id, *svc.not_serving_reply()))
                elif route == _SCAN:
                    self._busy = True
                    self._pause(4)
                    svc._spawn(self._run_scan(req_id, req))
                else:  # _END
                    assert isinstance(req, _ENDS)
                    if not svc.hub.covered(req.confirmed):
                        ends = 2
                    elif not served:
                        ends = 1
                    served = True
                    code, value = svc.dispatch(req)
                    out.append(self._encode(req_id, code, value))
        except MalformedMessage as exc:
            self._malformed(exc)
            return
        if first is None:  # (else nothing was buffered, before or after)
            self._buffered_changed()
        self._send(transport, out, served, ends)

    def _send(
        self, transport: asyncio.Transport, out: list[bytes], served: bool, ends: int
    ) -> None:
        """Send the replies ``out`` of requests just served (``served``: any went to
        the state; ``ends``: see :meth:`_process`) once what they acknowledge is
        journaled and shipped to the standbys: now, or held until they confirm."""
        svc = self._svc
        hub = svc.hub
        if not hub.links and not svc.state.effects and not self._held:
            # no standby, no state change to journal: the replies wait for nothing
            # (every read without HA)
            if served and not svc.serving():
                self._fence()
            elif out:
                transport.write(out[0] if len(out) == 1 else b"".join(out))
            return
        if out and not self._held and hub.links and self._reply_first(out, ends):
            return
        own = svc.persist()  # journal and replicate before acknowledging
        if ends == 1:
            own = 0  # the client has every standby confirm it (HaConfirm)
        elif ends == 2:
            own = max(own, hub.sync_point())  # perhaps a repeated end: all before it
        seq = hub.barrier(own)
        if served and not svc.serving():
            self._fence()
            return
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            if self._held or seq > hub.acked:
                self._hold(seq, data)
            else:
                transport.write(data)

    def _buffered_changed(self) -> None:
        """After the decoder took a read: account what it holds against the
        service's budget, pausing this connection when over it, and resume the
        connections paused for memory once this one holds nothing."""
        svc = self._svc
        buffered = self._decoder.buffered
        if buffered != self._buffered:
            self._account(buffered)
        if buffered:
            if self._partial_since is None:
                self._partial_since = time.monotonic()
            if svc.buffered > svc.limits.max_buffered_bytes:
                self._pause(2)
                svc.memory_paused.add(self)
        else:
            self._partial_since = None
            if svc.memory_paused:
                svc.resume_readers()

    def _malformed(self, exc: MalformedMessage) -> None:
        self._svc._bad(
            "bad-frame",
            logging.WARNING,
            "master RPC: closing connection from %s: %s",
            self.peer,
            exc,
        )
        if self._transport is not None:
            self._transport.abort()

    def _reply_first(self, out: list[bytes], ends: int) -> bool:
        """HA: replies that wait for nothing go out before the stream frame of their
        effects (writing to the standby first would let it preempt this process
        before the client has its answer): the commits of PutEnds every standby
        confirms (``ends == 1``; then shipped asking for no acknowledgement, and not
        with a journal, which must have them first), and PutStart reservations (the
        frame follows within this callback; a standby that gets the client's
        confirmation first waits for it, ``_confirm_later``).  Returns False to take
        the ordinary path."""
        svc = self._svc
        if ends == 1:
            if svc.journal is not None:
                return False
        else:
            pending = svc.state.effects
            if ends or not pending or not all(map(unwaited_start, pending)):
                return False
        if svc.hub.barrier(0) or not svc.serving() or self._transport is None:
            return False
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        svc.persist(confirmed=ends == 1)
        return True

    def _hold(self, seq: int, data: bytes) -> None:
        self._svc.hub.held += 1
        if not self._held:
            self.held_since = time.monotonic()
        self._held.append((seq, data))
        self._svc.hub.wait(self)

    def _fence(self) -> None:
        """The lease deadline passed while this connection's requests were served
        (this process was frozen, or etcd unreachable): a new leader may lack their
        effects, so none is acknowledged -- the connection is closed and the client
        sends the same request ids to the new leader."""
        self._held.clear()
        self.held_since = 0.0
        self.abort()

    def release_held(self, acked: int) -> bool:
        """Send the held replies a standby has now acknowledged; True when none is left.
        A master no longer serving acknowledges nothing (see :meth:`_fence`)."""
        held = self._held
        if held and not self._svc.serving():
            self._fence()
            return True
        transport = self._transport
        while held and held[0][0] <= acked:
            _, data = held.popleft()
            if transport is not None:
                transport.write(data)
        self.held_since = time.monotonic() if held else 0.0
        return not held

    def _encode(self, req_id: int, code: int, value: Any) -> bytes:
        if code == 0 and (value is None or type(value) is bool):  # (every remove, put end)
            return encode_short_reply(req_id, value)
        if type(value) is RawJson:
            return encode_reply_json(req_id, code, value)
        try:
            body = encode_json([code, value]).encode()  # (encode_reply, inline)
            return PREFIX.pack(len(body) + 5, REPLY, req_id) + body
        except (TypeError, ValueError, RecursionError) as exc:  # a bug: not JSON-able
            log.exception("master: cannot encode the reply to request %d", req_id)
            return encode_reply(
                req_id,
                int(ErrorCode.INTERNAL_ERROR),
                f"the master could not encode its reply: {exc!r}",
            )

    async def _confirm_later(self, req_id: int, req: msg.HaConfirm) -> None:
        """Answer an ``HaConfirm`` whose keys this standby did not know yet once its
        stream brought them, or after a few milliseconds (the client then has the
        leader wait for a standby instead)."""
        svc = self._svc
        try:
            missing = req.keys
            for _ in range(_CONFIRM_WAITS):
                follower = svc.follower
                if follower is None or not svc.may_confirm():
                    break
                await follower.wait_applied(_CONFIRM_WAIT_S)
                missing = svc.ha_confirm(req)
                if not missing:
                    break
            if self._transport is not None:
                self._transport.write(self._encode(req_id, 0, {"missing": list(missing)}))
        finally:
            self._busy = False
            self._resume(4)
            self._process()  # requests that arrived meanwhile

    async def _run_scan(self, req_id: int, req: msg.Request) -> None:
        try:
            code, value = await self._svc.dispatch_scan(req)
            if not self._svc.serving():
                self._fence()
            elif self._transport is not None:
                data = self._encode(req_id, code, value)
                seq = self._svc.hub.barrier(self._svc.persist())
                if self._held or seq > self._svc.hub.acked:
                    self._hold(seq, data)
                else:
                    self._transport.write(data)
        finally:
            self._busy = False
            self._resume(4)
            self._process()  # requests that arrived meanwhile
