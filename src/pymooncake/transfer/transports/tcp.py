"""TCP transport, wire-compatible with the reference's ``TcpTransport``.

Theory of operation
-------------------
*Target side* (:mod:`._tcp_server`).  One listener (the descriptor's
``tcp_data_port``); idle connections wait in one selector thread and readable
ones are served by a bounded pool of workers.  A connection carries any number
of requests (24-byte header, then payload for WRITE).  Every request's
``[addr, addr+size)`` is checked against the registry before a byte is read or
written; a bad one gets the v2 rejection status (v1: nothing) and the
connection is closed, as the reference does.  Replies (status frames and READ
payloads) are gathered and sent with one ``sendmsg`` when the next request is
not yet buffered, so a pipelined burst of small requests costs a few system
calls, not one per request.  With a cluster token a connection must
authenticate (context ``b"te-data"``) before its first request is read.

*Initiator side.*  A pool of persistent connections per peer data address
(``lanes_per_peer`` kept idle).  A group of slices is pipelined over one
connection: all WRITE headers and payloads go out in one scatter/gather
``sendmsg`` stream and the status frames are read afterwards; READ headers go
out in windows (small enough to always fit the socket buffers, so neither side
can block the other) and the replies are received straight into the local
views.  A broken connection is retried once on a fresh one for the slices
without a result (transfers are idempotent); a rejected slice fails alone and
the rest continue on a new connection.  With a cluster token every new
connection authenticates before its first request.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

from ..._authio import secure_client
from ..._heldio import DEFAULT_HOLD_S, send_held
from ..._net import connect_tcp, join_host_port, set_io_timeout
from ...errors import (
    AuthenticationError,
    MooncakeError,
    PeerRejected,
    PeerSocketError,
    TransferTimeout,
)
from ...wire import HEADER, STATUS, STATUS_AUTH_REQUIRED, STATUS_MAGIC, STATUS_OK, V2_FLAG
from ._base import Peer, Slice, SliceCallback, Transport, TransportContext
from ._sockio import PeerClosed, SocketReader, sendmsg_all
from ._tcp_server import AUTH_CONTEXT, IN_PROCESS_DATA_PORTS, DataServer

__all__ = ["TcpTransport"]

log = logging.getLogger("pymooncake.transport.tcp")

#: READ headers sent ahead of replies; 256 * 24 B = 6 KiB always fits socket buffers
_READ_WINDOW: Final = 256
#: WRITE requests per send window (status frames are read after each window)
_WRITE_WINDOW: Final = 512
#: payloads from this size on are received in place (headers read exactly)
_GREEDY_LIMIT: Final = 64 * 1024
#: WRITE windows up to this size are joined and sent with the GIL held (``_heldio``)
_HELD_BYTES: Final = 64 * 1024
_HELD_SLICES: Final = 64
_pack_header = HEADER.pack
_unpack_status = STATUS.unpack_from


class _Rejected(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


class _Broken(Exception):
    def __init__(self, done: int, cause: BaseException) -> None:
        self.done = done
        self.cause = cause


class _AuthRequired(Exception):
    """The target wants a cluster token this side does not have."""


# --------------------------------------------------------------------------------
# initiator side
# --------------------------------------------------------------------------------


class _Conn:
    __slots__ = ("key", "reader", "reused", "sock", "timeout")

    def __init__(self, sock: socket.socket, key: tuple[str, int]) -> None:
        self.sock = sock
        self.key = key
        self.reader = SocketReader(sock)
        # plain sockets only (the data port never speaks TLS), and never towards a
        # server of this process: its thread needs the GIL to answer
        if not isinstance(sock, ssl.SSLSocket) and key[1] not in IN_PROCESS_DATA_PORTS:
            self.reader.hold_ms = int(DEFAULT_HOLD_S * 1000)
        self.reused = False
        self.timeout: float | None = None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Pool:
    def __init__(self, ctx: TransportContext) -> None:
        self._ctx = ctx
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._key = ctx.config.security.key

    def checkout(self, key: tuple[str, int], peer_name: str) -> _Conn:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                conn = idle.pop()
                conn.reused = True
                return conn
        cfg = self._ctx.config
        what = f"TCP data port of segment {peer_name!r}"
        sock = connect_tcp(key[0], key[1], timeout_s=cfg.connect_timeout_s, what=what)
        try:
            sock = secure_client(
                sock,
                ssl_context=None,  # the data port speaks plain TCP (docs/security.md)
                key=self._key,
                context=AUTH_CONTEXT,
                timeout_s=max(cfg.connect_timeout_s, cfg.auth_timeout_s),
                port=what,
                peer=join_host_port(*key),
            )
        except OSError as exc:
            raise PeerSocketError(
                f"authenticating with the {what} at {join_host_port(*key)} failed: {exc}"
            ) from exc
        return _Conn(sock, key)

    def checkin(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed:
                idle = self._idle.setdefault(conn.key, [])
                if len(idle) < self._ctx.config.lanes_per_peer:
                    idle.append(conn)
                    return
        conn.close()

    def drop(self, key: tuple[str, int]) -> None:
        with self._lock:
            conns = self._idle.pop(key, [])
        for c in conns:
            c.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            all_conns = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
        for c in all_conns:
            c.close()


def _check_status(buf: bytearray, off: int, k: int) -> None:
    """The v2 status frame of request ``k`` at ``buf[off:]``: returns on OK.

    Raises:
        _Rejected: the target refused the address.
        _Broken: not a status frame (the stream is out of step).
    """
    (status,) = _unpack_status(buf, off)
    if status != STATUS_OK:
        if status == STATUS_AUTH_REQUIRED:
            raise _AuthRequired
        if (status >> 32) == (STATUS_MAGIC >> 32):
            raise _Rejected(k)
        raise _Broken(k, PeerClosed(f"invalid status frame {status:#x}"))


def _timeout_error(peer: Peer) -> TransferTimeout:
    return TransferTimeout(
        f"Sync batch data transfer timeout: no progress from segment {peer.name!r} at "
        f"{join_host_port(peer.data_host, peer.data_port)} before the deadline "
        "(MC_TRANSFER_TIMEOUT / MC_TCP_STATUS_TIMEOUT_SEC); the peer is overloaded, hung or "
        "unreachable"
    )


class TcpTransport(Transport):
    """The reference-compatible TCP transport (protocol ``tcp``)."""

    name = "tcp"

    def __init__(self, ctx: TransportContext) -> None:
        self._ctx = ctx
        self._server = DataServer(ctx)
        self._pool = _Pool(ctx)
        self._v2 = not ctx.config.tcp_force_v1

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self._server.start()

    @property
    def data_port(self) -> int:
        return self._server.port

    @property
    def stats(self) -> dict[str, int]:
        srv = self._server
        return {
            "requests_served": srv.requests_served,
            "requests_rejected": srv.requests_rejected,
            "connections": srv.connections,
            "workers": srv.workers,
            "refused_connections": srv.refused_connections,
            "auth_failures": srv.auth_failures,
            "timed_out": srv.timed_out,
        }

    @property
    def server(self) -> DataServer:
        """The data-port listener (counters, connection and worker counts)."""
        return self._server

    def descriptor_fields(self) -> dict[str, Any]:
        return {
            "tcp_data_port": self._server.port,
            "tcp_data_host": self._ctx.advertised_host,
            "tcp_proto_version": 1 if self._ctx.config.tcp_force_v1 else 2,
        }

    def can_reach(self, peer: Peer) -> bool:
        return peer.desc.protocol == "tcp" and peer.data_port > 0

    def forget_peer(self, peer: Peer) -> None:
        self._pool.drop((peer.data_host, peer.data_port))

    def close(self) -> None:
        self._pool.close()
        self._server.close()

    # --- initiator ------------------------------------------------------------------

    def execute(
        self, peer: Peer, slices: Sequence[Slice], deadline: float, on_done: SliceCallback
    ) -> None:
        pending: list[Slice] = []
        for s in slices:
            if s.length == 0:
                on_done(s, None)  # zero-length requests complete locally
            else:
                pending.append(s)
        v2 = self._v2 and peer.desc.tcp_proto_version >= 2
        key = (peer.data_host, peer.data_port)
        cfg = self._ctx.config
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                err = _timeout_error(peer)
                for s in pending:
                    on_done(s, err)
                return
            try:
                conn = self._pool.checkout(key, peer.name)
            except MooncakeError as exc:
                for s in pending:
                    on_done(s, exc)
                return
            timeout = min(cfg.tcp_status_timeout_s, remaining)
            if conn.timeout is None or abs(conn.timeout - timeout) > 1.0:
                set_io_timeout(conn.sock, timeout)  # two syscalls: only when it changes
                conn.timeout = timeout
            try:
                self._pipeline(conn, pending, v2, on_done)
            except _AuthRequired:
                conn.close()
                auth_err = AuthenticationError(
                    f"TCP data port of segment {peer.name!r} at "
                    f"{join_host_port(peer.data_host, peer.data_port)} requires the cluster "
                    "token and this engine has none. Fix: set the same PYMOONCAKE_CLUSTER_TOKEN "
                    "in every process of the cluster"
                )
                for s in pending:
                    on_done(s, auth_err)
                return
            except _Rejected as rej:
                conn.close()
                bad = pending[rej.index]
                on_done(
                    bad,
                    PeerRejected(
                        f"WRITE/READ rejected by segment {peer.name!r}: remote address "
                        f"{bad.remote_addr:#x} with size {bad.length} is not within any buffer "
                        "the peer registered (stale descriptor, wrong address arithmetic, or the "
                        "peer unregistered it)"
                    ),
                )
                pending = pending[rej.index + 1 :]
                continue
            except _Broken as broken:
                conn.close()
                pending = pending[broken.done :]
                cause = broken.cause
                if isinstance(cause, (BlockingIOError, TimeoutError, socket.timeout)):
                    timeout_err = _timeout_error(peer)
                    for s in pending:
                        on_done(s, timeout_err)
                    return
                if conn.reused or broken.done:
                    # a pooled connection went stale, or progress was made: retry the rest
                    self._pool.drop(key)
                    continue
                sock_err = PeerSocketError(
                    f"data connection to segment {peer.name!r} at "
                    f"{join_host_port(peer.data_host, peer.data_port)} failed: {cause}; the peer "
                    "crashed, closed the connection or speaks another protocol version (a v1 "
                    "target closes the connection on an address outside its registered buffers"
                    "; a peer requiring a cluster token closes unauthenticated connections)"
                )
                for s in pending:
                    on_done(s, sock_err)
                return
            self._pool.checkin(conn)
            return

    def _pipeline(
        self, conn: _Conn, pending: Sequence[Slice], v2: bool, on_done: SliceCallback
    ) -> None:
        """Run all of ``pending`` on ``conn``.

        Raises:
            _Rejected: slice ``index`` was rejected; all before it completed.
            _Broken: the connection failed after ``done`` slices completed.
        """
        flag = V2_FLAG if v2 else 0
        n = len(pending)
        i = 0
        while i < n:
            first = pending[i]
            window = _WRITE_WINDOW if first.is_write else _READ_WINDOW
            j = i + 1
            while j < n and j - i < window and pending[j].is_write == first.is_write:
                j += 1
            if first.is_write:
                self._write_window(conn, pending, i, j, flag, on_done)
            else:
                self._read_window(conn, pending, i, j, flag, on_done)
            i = j

    def _write_window(
        self,
        conn: _Conn,
        pending: Sequence[Slice],
        i: int,
        j: int,
        flag: int,
        on_done: SliceCallback,
    ) -> None:
        iov: list[bytes | bytearray | memoryview] = []
        for k in range(i, j):
            s = pending[k]
            iov.append(_pack_header(s.length, s.remote_addr, 1 | flag))
            iov.append(s.local)
        send_error: BaseException | None = None
        try:
            if conn.reader.hold_ms and j - i <= _HELD_SLICES and sum(map(len, iov)) <= _HELD_BYTES:
                send_held(conn.sock, b"".join(iov))  # a copy of a few KiB, GIL kept
            else:
                sendmsg_all(conn.sock, iov)
        except OSError as exc:
            send_error = exc
        if not flag:
            if send_error is not None:
                raise _Broken(i, send_error)
            for k in range(i, j):
                on_done(pending[k], None)
            return
        reader = conn.reader
        buf = reader.buffer
        for k in range(i, j):
            try:
                off = reader.take(8)
            except OSError as exc:
                raise _Broken(k, send_error or exc) from None
            _check_status(buf, off, k)
            on_done(pending[k], None)

    def _read_window(
        self,
        conn: _Conn,
        pending: Sequence[Slice],
        i: int,
        j: int,
        flag: int,
        on_done: SliceCallback,
    ) -> None:
        headers = b"".join(
            _pack_header(pending[k].length, pending[k].remote_addr, flag) for k in range(i, j)
        )
        try:
            if conn.reader.hold_ms:
                send_held(conn.sock, headers)
            else:
                conn.sock.sendall(headers)
        except OSError as exc:
            raise _Broken(i, exc) from None
        reader = conn.reader
        buf = reader.buffer
        for k in range(i, j):
            s = pending[k]
            try:
                if flag:
                    _check_status(buf, reader.take(8, s.length < _GREEDY_LIMIT), k)
                reader.readinto(s.local)
            except OSError as exc:
                raise _Broken(k, exc) from None
            on_done(s, None)
