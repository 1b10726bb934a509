"""TCP transport, wire-compatible with the reference's ``TcpTransport``.

Theory of operation
-------------------
*Target side.*  One listener (the descriptor's ``tcp_data_port``) and one
thread per accepted connection.  A connection carries any number of requests
(24-byte header, then payload for WRITE).  Every request's ``[addr, addr+size)``
is checked against the registry before a byte is read or written; a bad one
gets the v2 rejection status (v1: nothing) and the connection is closed, as
the reference does.  Replies (status frames and READ payloads) are gathered
and sent with one ``sendmsg`` when the next request is not yet buffered, so a
pipelined burst of small requests costs a few system calls, not one per
request.

*Initiator side.*  A pool of persistent connections per peer data address
(``lanes_per_peer`` kept idle).  A group of slices is pipelined over one
connection: all WRITE headers and payloads go out in one scatter/gather
``sendmsg`` stream and the status frames are read afterwards; READ headers go
out in windows (small enough to always fit the socket buffers, so neither side
can block the other) and the replies are received straight into the local
views.  A broken connection is retried once on a fresh one for the slices
without a result (transfers are idempotent); a rejected slice fails alone and
the rest continue on a new connection.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from ..._logging import RepeatLimiter
from ..._net import bind_listener, connect_tcp, join_host_port, set_io_timeout
from ...errors import DeviceError, MooncakeError, PeerRejected, PeerSocketError, TransferTimeout
from ...wire import (
    HEADER,
    OPCODE_WRITE,
    STATUS,
    STATUS_ADDR_REJECTED,
    STATUS_MAGIC,
    STATUS_OK,
    V2_FLAG,
)
from .._memory import Region
from ._base import Peer, Slice, SliceCallback, Transport, TransportContext
from ._sockio import PeerClosed, SocketReader, sendmsg_all

__all__ = ["TcpTransport"]

log = logging.getLogger("pymooncake.transport.tcp")

_OK_BYTES: Final = STATUS.pack(STATUS_OK)
_REJECT_BYTES: Final = STATUS.pack(STATUS_ADDR_REJECTED)
#: READ headers sent ahead of replies; 256 * 24 B = 6 KiB always fits socket buffers
_READ_WINDOW: Final = 256
#: WRITE requests per send window (status frames are read after each window)
_WRITE_WINDOW: Final = 512
#: payloads from this size on are received in place (headers read exactly)
_GREEDY_LIMIT: Final = 64 * 1024
#: server flushes gathered replies beyond this many bytes / iovecs
_FLUSH_BYTES: Final = 8 << 20
_FLUSH_IOVECS: Final = 512
#: SO_LINGER on with a zero timeout: close() sends RST
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_unpack_status = STATUS.unpack_from


class _Rejected(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


class _Broken(Exception):
    def __init__(self, done: int, cause: BaseException) -> None:
        self.done = done
        self.cause = cause


# --------------------------------------------------------------------------------
# target side
# --------------------------------------------------------------------------------


class _Server:
    def __init__(self, ctx: TransportContext) -> None:
        self._ctx = ctx
        self._registry = ctx.registry
        self._sock: socket.socket | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._accept_thread: threading.Thread | None = None
        self._reject_log = RepeatLimiter(log)
        self.port = 0
        self.requests_served = 0
        self.requests_rejected = 0

    def start(self) -> None:
        cfg = self._ctx.config
        self._sock = bind_listener(
            self._ctx.bind_host,
            port_range=(cfg.rpc_port_min, cfg.rpc_port_max),
            backlog=cfg.listen_backlog,
            what="TCP transport data listener",
        )
        self.port = self._sock.getsockname()[1]
        t = threading.Thread(
            target=self._accept_loop, name=f"mc-tcp-accept:{self.port}", daemon=True
        )
        self._accept_thread = t
        t.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        listener = self._sock
        while True:
            try:
                conn, addr = listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.01)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
                t = threading.Thread(
                    target=self._serve, args=(conn, addr), name=f"mc-tcp-serve:{addr}", daemon=True
                )
                self._threads.add(t)
            t.start()

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        out: list[bytes | bytearray | memoryview] = []
        out_bytes = 0

        def flush() -> None:
            nonlocal out_bytes
            if out:
                sendmsg_all(conn, out)
                out.clear()
                out_bytes = 0

        reader = SocketReader(conn, before_block=flush, pending=lambda: bool(out))
        buf = reader.buffer
        find = self._registry.find_remote
        served = 0
        greedy = True
        try:
            while True:
                off = reader.take(24, greedy)
                size, raddr, opcode = _unpack_header(buf, off)
                v2 = opcode & V2_FLAG
                is_write = (opcode & ~V2_FLAG) == OPCODE_WRITE
                region = find(raddr, size)
                if region is None:
                    self.requests_rejected += 1
                    self._reject_log(
                        f"reject:{addr}",
                        logging.WARNING,
                        "ServerSession: remote-supplied address %#x with size %d from %s is not "
                        "within any registered buffer; closing the connection (the peer uses a "
                        "stale descriptor or wrong address arithmetic)",
                        raddr,
                        size,
                        addr,
                    )
                    if v2:
                        out.append(_REJECT_BYTES)
                        flush()
                    if is_write:
                        # The payload of a refused WRITE is never consumed; end with a
                        # reset (as the reference does) so a pipelining v1 peer cannot
                        # mistake later writes on this connection for delivered ones.
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    return
                if region.backend is not None:
                    self._serve_device(conn, reader, region, raddr, size, is_write, v2, out, flush)
                    served += 1
                    continue
                view = region.slice(raddr, size)
                if is_write:
                    reader.readinto(view)
                    if v2:
                        out.append(_OK_BYTES)
                    # after a large WRITE the next one is likely large too: read
                    # its header alone so its payload can land in place
                    greedy = size < _GREEDY_LIMIT
                else:
                    if v2:
                        out.append(_OK_BYTES)
                    out.append(view)
                    out_bytes += size
                    if out_bytes >= _FLUSH_BYTES or len(out) >= _FLUSH_IOVECS:
                        flush()
                served += 1
        except (PeerClosed, ConnectionError):
            pass
        except OSError as exc:
            if not self._closed and exc.errno not in (errno.EBADF, errno.ENOTCONN):
                log.debug("data connection from %s ended: %s", addr, exc)
        except DeviceError as exc:
            log.warning("device memory copy for %s failed: %s; closing the connection", addr, exc)
        finally:
            self.requests_served += served
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            try:
                conn.close()
            except OSError:
                pass

    def _serve_device(
        self,
        conn: socket.socket,
        reader: SocketReader,
        region: Region,
        raddr: int,
        size: int,
        is_write: bool,
        v2: int,
        out: list[bytes | bytearray | memoryview],
        flush: Callable[[], None],
    ) -> None:
        """One request on device memory: staged through pinned buffers (device/_staging.py)."""
        devices = self._ctx.devices
        assert devices is not None and region.backend is not None
        if is_write:
            devices.receive(region.backend, region.device, raddr, size, reader.readinto)
            if v2:
                out.append(_OK_BYTES)
        else:
            if v2:
                out.append(_OK_BYTES)
            flush()
            devices.send(
                region.backend, region.device, raddr, size, lambda v: sendmsg_all(conn, [v])
            )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
            threads = list(self._threads)
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._accept_thread is not None:
            self._accept_thread.join(5)
        for t in threads:
            t.join(5)


# --------------------------------------------------------------------------------
# initiator side
# --------------------------------------------------------------------------------


class _Conn:
    __slots__ = ("key", "reader", "reused", "sock", "timeout")

    def __init__(self, sock: socket.socket, key: tuple[str, int]) -> None:
        self.sock = sock
        self.key = key
        self.reader = SocketReader(sock)
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

    def checkout(self, key: tuple[str, int], peer_name: str) -> _Conn:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                conn = idle.pop()
                conn.reused = True
                return conn
        sock = connect_tcp(
            key[0],
            key[1],
            timeout_s=self._ctx.config.connect_timeout_s,
            what=f"TCP data port of segment {peer_name!r}",
        )
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
        self._server = _Server(ctx)
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
        return {
            "requests_served": self._server.requests_served,
            "requests_rejected": self._server.requests_rejected,
        }

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
                    "target closes the connection on an address outside its registered buffers)"
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
