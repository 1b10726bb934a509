"""The master service: asyncio I/O around :class:`MasterState`.

One event loop owns the state, so no locks are needed: the RPC server, the
periodic :meth:`MasterState.tick` (client expiry, reclaim, eviction), the
admin/metrics HTTP endpoints and the optional embedded HTTP metadata server
all run on it.  Requests on one connection are answered in order; many
connections are served at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..._httpd import HttpServer
from ..._logging import RepeatLimiter
from ..._net import bind_listener
from ...errors import MalformedMessage, StoreError
from ...transfer.metadata.server import MetadataServer
from ...wire import (
    MasterFrameDecoder,
    MasterReply,
    MasterRequest,
    encode_reply,
    master_unix_name,
)
from .._config import MasterConfig
from .._types import ErrorCode
from ._admin import AdminHttp
from ._handlers import build_handlers
from ._journal import Journal
from ._state import MasterState

__all__ = ["MasterService", "ServiceAddresses"]


log = logging.getLogger("pymooncake.master")


@dataclass(frozen=True)
class ServiceAddresses:
    """Where a running master listens."""

    rpc: tuple[str, int]
    metrics: tuple[str, int] | None
    metadata: tuple[str, int] | None

    @property
    def rpc_address(self) -> str:
        return f"{self.rpc[0]}:{self.rpc[1]}"

    @property
    def metadata_url(self) -> str | None:
        return (
            None
            if self.metadata is None
            else f"http://{self.metadata[0]}:{self.metadata[1]}/metadata"
        )

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics is None else f"http://{self.metrics[0]}:{self.metrics[1]}"


class MasterService:
    """Runs a master on the current event loop.

    Args:
        config: behaviour (leases, eviction, ttl ...).
        host/port: RPC listener (port 0 = any free port).
        metrics_host/metrics_port: admin HTTP (/metrics, /query_key, ...); None disables.
        metadata_host/metadata_port: embedded HTTP metadata server; None disables.
        clock: monotonic seconds (tests inject a fake).
        tick_interval_s: how often expiry/reclaim/eviction run.
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
    ) -> None:
        self.config = config or MasterConfig()
        self.state = MasterState(self.config)
        self._clock = clock
        self._host, self._port = host, port
        self._metrics = (metrics_host, metrics_port) if metrics_port is not None else None
        self._metadata = (metadata_host, metadata_port) if metadata_port is not None else None
        self._tick_interval = tick_interval_s
        self._handlers = build_handlers(self.state)
        self._server: asyncio.base_events.Server | None = None
        self._unix_server: asyncio.base_events.Server | None = None
        self._admin: HttpServer | None = None
        self._metadata_http: HttpServer | None = None
        self.metadata_server: MetadataServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._transports: set[asyncio.Transport] = set()
        self._bad = RepeatLimiter(log)
        self._max_frame = max_frame
        self.started_at = time.time()
        self.addresses: ServiceAddresses | None = None
        self.journal = Journal(journal_path, fsync=journal_fsync) if journal_path else None

    def now(self) -> float:
        return self._clock()

    async def start(self) -> ServiceAddresses:
        """Open every listener.

        Raises:
            PortInUse / PeerSocketError: a port cannot be bound (message names it).
        """
        if self.journal is not None:
            events = self.journal.load()
            if events:
                self.state.replay(events, self._clock())
                log.info(
                    "journal %s: restored %d segment(s) and %d object(s); clients have "
                    "client_ttl to come back",
                    self.journal.path,
                    len(self.state.segments),
                    len(self.state.objects),
                )
            self.journal.rewrite(self.state.snapshot_events())
            self.state.events = []
        sock = bind_listener(self._host, port=self._port, backlog=1024, what="master RPC listener")
        try:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(self._protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        rpc = sock.getsockname()[:2]
        # Same-host clients skip TCP: the same protocol on an abstract UNIX socket
        # named after the listening address (a round trip ~10 us shorter).
        try:
            self._unix_server = await loop.create_unix_server(
                self._protocol, master_unix_name(str(rpc[0]), int(rpc[1]))
            )
        except OSError as exc:
            log.info("no same-host (UNIX socket) RPC listener: %s; clients use TCP", exc)
        metrics = metadata = None
        try:
            if self._metadata is not None:
                self.metadata_server = MetadataServer()
                self._metadata_http = self.metadata_server.http_server(*self._metadata)
                await self._metadata_http.start()
                metadata = (self._metadata_http.host, self._metadata_http.port)
            if self._metrics is not None:
                admin = AdminHttp(self)
                self._admin = HttpServer(
                    admin.handle, self._metrics[0], self._metrics[1], name="master admin HTTP"
                )
                await self._admin.start()
                metrics = (self._admin.host, self._admin.port)
        except BaseException:
            await self.close()
            raise
        self._ticker = asyncio.create_task(self._tick_loop())
        self.addresses = ServiceAddresses(rpc, metrics, metadata)
        return self.addresses

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        if self._unix_server is not None:
            self._unix_server.close()
        if self._server is not None:
            self._server.close()
            for transport in list(self._transports):
                transport.abort()
            self._transports.clear()
            await self._server.wait_closed()
            self._server = None
        if self._unix_server is not None:
            await self._unix_server.wait_closed()
            self._unix_server = None
        for http in (self._admin, self._metadata_http):
            if http is not None:
                await http.close()
        self._admin = self._metadata_http = None
        if self.journal is not None:
            self._persist()
            self.journal.close()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_interval)
            try:
                self.state.tick(self._clock())
                self._persist()
                if self.journal is not None and self.journal.needs_compaction():
                    self.journal.rewrite(self.state.snapshot_events())
            except Exception:  # a bug here must not stop expiry for good
                log.exception("master tick failed")

    def _persist(self) -> None:
        """Journal the state changes before acknowledging them."""
        if self.journal is not None:
            self.journal.append(self.state.drain_events())

    def dispatch(self, req: MasterRequest) -> tuple[int, Any]:
        """Run one request against the state; returns (code, value or message)."""
        handler = self._handlers[req.method]
        counters = self.state.metrics
        name = req.method.value
        counters.requests[name] = counters.requests.get(name, 0) + 1
        try:
            return 0, handler(req.params, self._clock())
        except StoreError as exc:
            counters.failures[name] = counters.failures.get(name, 0) + 1
            return exc.code, exc.message
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            counters.failures[name] = counters.failures.get(name, 0) + 1
            return int(ErrorCode.INVALID_PARAMS), f"bad parameters for {name}: {exc!r}"

    def _protocol(self) -> _RpcProtocol:
        return _RpcProtocol(self)


class _RpcProtocol(asyncio.Protocol):
    """One client connection: frames in, replies out, in order.

    A plain Protocol (no StreamReader/Task per connection): requests are
    decoded and answered straight from ``data_received``, which saves tens of
    microseconds per round trip on the master's single event loop.
    """

    def __init__(self, service: MasterService) -> None:
        self._svc = service
        self._decoder = (
            MasterFrameDecoder()
            if service._max_frame is None
            else MasterFrameDecoder(service._max_frame)
        )
        self._transport: asyncio.Transport | None = None
        self._peer: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._svc._transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._svc._transports.discard(self._transport)

    def pause_writing(self) -> None:
        # a client pipelining without reading its replies: stop reading its requests
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        decoder = self._decoder
        decoder.feed(data)
        out = []
        try:
            while True:
                frame = decoder.next_frame()
                if not isinstance(frame, MasterRequest):
                    if isinstance(frame, MasterReply):
                        raise MalformedMessage("a client sent a reply frame")
                    break
                code, value = self._svc.dispatch(frame)
                out.append(encode_reply(frame.id, code, value))
        except MalformedMessage as exc:
            self._svc._bad(
                "bad-frame",
                logging.WARNING,
                "master RPC: closing connection from %s: %s",
                self._peer,
                exc,
            )
            transport.abort()
            return
        if out:
            self._svc._persist()  # journal before acknowledging
            transport.write(out[0] if len(out) == 1 else b"".join(out))
