"""Blocking, thread-safe client of the master's RPC protocol.

Each call checks a connection out of a small pool, sends its frame and reads
the reply in the calling thread (no hand-off to another thread, so a call
costs one round trip).  ``call_many`` pipelines several requests on one
connection.  Timeouts are kernel-side (SO_RCVTIMEO), so blocking waits
release the GIL and cost no extra system calls.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from .._net import connect_tcp, set_io_timeout, split_host_port
from ..errors import (
    InvalidParams,
    MalformedMessage,
    MooncakeError,
    RpcFailed,
    RpcTimeout,
    store_error,
)
from ..wire import (
    PROTOCOL_VERSION,
    MasterFrameDecoder,
    MasterMethod,
    MasterReply,
    MasterRequest,
    encode_request,
    master_unix_name,
)
from ._metrics import ClientMetrics
from ._types import ErrorCode

__all__ = ["MasterClient"]


class _Conn:
    __slots__ = ("decoder", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = MasterFrameDecoder()


class MasterClient:
    """Talks to ``mooncake_master`` at ``address`` (``host:port``).

    Args:
        address: the master's RPC address.
        timeout_s: per request (MC_RPC_TIMEOUT_MS).
        connect_timeout_s: per connection attempt (MC_RPC_CONNECT_TIMEOUT_MS).
        max_idle: connections kept open for reuse.
        metrics: where to count RPCs and their latency (None: not counted).
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
    ) -> None:
        if "://" in address:
            raise InvalidParams(
                f"master_server_addr {address!r} names an HA backend (etcd://, redis://); master HA "
                "is not available in this pymooncake release: use the master's host:port"
            )
        try:
            host, port = split_host_port(address)
        except MooncakeError as exc:
            raise InvalidParams(f"master_server_addr {address!r}: {exc}") from exc
        self.address = address
        self._host, self._port = host, port or 50051
        self._timeout = timeout_s
        self._connect_timeout = connect_timeout_s
        self._max_idle = max_idle
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        self._unix_ok = same_host_rpc
        self._metrics = metrics

    # --- connections ----------------------------------------------------------------

    def _checkout(self) -> tuple[_Conn, bool]:
        with self._lock:
            if self._closed:
                raise RpcFailed(f"master client for {self.address} is closed")
            if self._idle:
                return self._idle.pop(), True
        sock = self._connect_same_host()
        try:
            if sock is None:
                sock = connect_tcp(
                    self._host, self._port, timeout_s=self._connect_timeout, what="store master"
                )
        except MooncakeError as exc:
            raise RpcFailed(
                f"cannot reach the master at {self.address}: {exc}. Check that mooncake_master is "
                "running there and that master_server_addr / MOONCAKE_MASTER point at its --port"
            ) from exc
        set_io_timeout(sock, self._timeout)
        return _Conn(sock), False

    def _connect_same_host(self) -> socket.socket | None:
        """The master's abstract UNIX socket when it runs on this host (same
        protocol, shorter round trip); None to use TCP."""
        if not self._unix_ok:
            return None
        for host in (self._host, "0.0.0.0", "::"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(master_unix_name(host, self._port))
                return s
            except OSError:
                s.close()
        self._unix_ok = False  # not on this host (or an older master): stop trying
        return None

    def _checkin(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.sock.close()

    def _exchange(self, conn: _Conn, frames: bytes, ids: list[int]) -> list[MasterReply]:
        conn.sock.sendall(frames)
        replies: list[MasterReply] = []
        while len(replies) < len(ids):
            frame = conn.decoder.next_frame()
            if isinstance(frame, MasterReply):
                if frame.id != ids[len(replies)]:
                    raise MalformedMessage(
                        f"reply {frame.id} does not match request {ids[len(replies)]}"
                    )
                replies.append(frame)
                continue
            if isinstance(frame, MasterRequest):
                raise MalformedMessage("the master sent a request frame")
            data = conn.sock.recv(1 << 16)
            if not data:
                raise ConnectionResetError("the master closed the connection")
            conn.decoder.feed(data)
        return replies

    def _run(self, requests: Sequence[tuple[MasterMethod, dict[str, Any]]]) -> list[MasterReply]:
        ids = [next(self._ids) for _ in requests]
        frames = b"".join(encode_request(i, m, p) for i, (m, p) in zip(ids, requests, strict=True))
        metrics = self._metrics
        if metrics is not None:  # reference: counted when sent, latency once answered
            for method, _ in requests:
                metrics.rpc(method)[0].inc()
            started = time.perf_counter_ns()
        for attempt in (0, 1):
            conn, reused = self._checkout()
            try:
                replies = self._exchange(conn, frames, ids)
            except (BlockingIOError, TimeoutError) as exc:
                conn.sock.close()
                raise RpcTimeout(
                    f"the master at {self.address} did not answer {requests[0][0].value} within "
                    f"{self._timeout:g} s (MC_RPC_TIMEOUT_MS); it is overloaded or hung"
                ) from exc
            except (OSError, MalformedMessage) as exc:
                conn.sock.close()
                if reused and attempt == 0:
                    with self._lock:  # the pool went stale (master restarted): start afresh
                        stale, self._idle = self._idle, []
                    for c in stale:
                        c.sock.close()
                    continue
                raise RpcFailed(
                    f"RPC {requests[0][0].value} to the master at {self.address} failed: {exc}"
                ) from exc
            self._checkin(conn)
            if metrics is not None:
                latency_us = (time.perf_counter_ns() - started) // 1000
                for method, _ in requests:
                    metrics.rpc(method)[1].observe(latency_us)
            return replies
        raise AssertionError("unreachable")

    # --- calls -------------------------------------------------------------------------

    def call(self, method: MasterMethod, params: dict[str, Any] | None = None) -> Any:
        """One request.

        Raises:
            StoreError subclasses: the master refused (code as the reference's ErrorCode).
            RpcFailed / RpcTimeout: the master is unreachable or silent.
        """
        (reply,) = self._run([(method, params or {})])
        if reply.code != 0:
            raise store_error(reply.code, str(reply.value))
        return reply.value

    def call_many(
        self, requests: Sequence[tuple[MasterMethod, dict[str, Any]]]
    ) -> list[tuple[int, Any]]:
        """Pipeline several requests on one connection; returns (code, value) each."""
        if not requests:
            return []
        return [(r.code, r.value) for r in self._run(requests)]

    def check_version(self) -> str:
        version = self.call(MasterMethod.SERVICE_READY)
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
            idle, self._idle = self._idle, []
        for c in idle:
            c.sock.close()
