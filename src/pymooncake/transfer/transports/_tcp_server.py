"""Target side of the TCP transport: the data-port listener.

Theory of operation
-------------------
Idle connections cost no thread.  One *reactor* thread owns an ``epoll``
selector holding the listener and every connection that has nothing to serve:
it accepts (up to ``data_max_connections``), runs the authentication handshake
of new connections without blocking (:mod:`pymooncake.wire._auth`, context
``b"te-data"``, deadline ``auth_timeout_s``), and hands a connection that turns
readable to a bounded pool of *worker* threads (``data_workers``, started on
demand, ended after a while without work).

A worker serves requests exactly as a thread per connection would -- a
24-byte header, the registry check before any payload byte, ``recv_into`` of
WRITE payloads straight into registered memory, replies gathered and sent
with one ``sendmsg`` -- until the connection has no complete header buffered
and none arrives within a short linger (at once if other connections wait for
a worker).  It then flushes, keeps the few unread header bytes (< 24) with the
connection and parks it back in the reactor.  Receive buffers belong to the
workers, not to the connections.

Bounds: connections beyond the cap are closed at once (one log line per peer
host, counted); a parked connection holding part of a header must complete it
within ``tcp_status_timeout_s``; a blocked payload or reply transfer times out
after ``tcp_status_timeout_s`` without progress (SO_RCVTIMEO/SO_SNDTIMEO).

Unregistering: each worker holds a :class:`~pymooncake.transfer._memory.UseSlot`
and pins the region of the request in progress (and of READ replies not yet
sent); ``quiesce`` waits for it and, past the drain time, shuts the worker's
connection down.

Device (GPU) memory: a request on a device region is served by the worker
through the engine's pinned staging buffers (:meth:`DataServer._serve_device`,
``device/_staging.py``) while the region stays pinned; a failed device copy
ends the connection.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from ..._authio import describe_failure
from ..._logging import RepeatLimiter
from ..._net import bind_listener, set_io_timeout
from ...errors import DeviceError
from ...wire import HEADER, OPCODE_WRITE, STATUS, STATUS_ADDR_REJECTED, STATUS_OK, V2_FLAG
from ...wire._auth import MAGIC_U64, ClusterKey, FailureKind, ServerHandshake, no_token_reply
from ...wire._tcp import STATUS_AUTH_REQUIRED
from .._memory import Region, UseSlot
from ._base import TransportContext
from ._sockio import Buffer, PeerClosed, SocketReader, sendmsg_all

__all__ = ["AUTH_CONTEXT", "DataServer"]

log = logging.getLogger("pymooncake.transport.tcp")

#: HMAC context of the TCP data port
AUTH_CONTEXT: Final = b"te-data"
_OK_BYTES: Final = STATUS.pack(STATUS_OK)
_REJECT_BYTES: Final = STATUS.pack(STATUS_ADDR_REJECTED)
_AUTH_REQUIRED_BYTES: Final = STATUS.pack(STATUS_AUTH_REQUIRED)
#: payloads from this size on are received in place (headers read exactly)
_GREEDY_LIMIT: Final = 64 * 1024
#: flush gathered replies beyond this many bytes / iovecs
_FLUSH_BYTES: Final = 8 << 20
_FLUSH_IOVECS: Final = 512
#: SO_LINGER on with a zero timeout: close() sends RST
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
#: a worker waits this long for the next header before parking the connection:
#: long enough to cover an initiator's turn-around between two calls (tens of
#: microseconds in bench/te_py_bench.py), short enough that a quiet peer frees
#: its worker almost at once
_LINGER_S: Final = 0.005
_LINGER_TV: Final = struct.pack("ll", 0, int(_LINGER_S * 1e6))
#: a worker yields a busy connection after this many requests when others wait
_FAIR_REQUESTS: Final = 256
#: a worker thread with no connection to serve for this long ends
_WORKER_IDLE_S: Final = 30.0
#: a refused connection is read and discarded for up to this long / this many
#: bytes after the refusal is sent, so that it is not destroyed by an RST
_DRAIN_S: Final = 1.0
_DRAIN_BYTES: Final = 1 << 20
_HEADER_SIZE: Final = HEADER.size
_unpack_header = HEADER.unpack_from


class _Conn:
    """One accepted connection (parked, in a handshake, or with a worker)."""

    __slots__ = ("addr", "draining", "handshake", "host", "leftover", "sock")

    def __init__(self, sock: socket.socket, addr: Any) -> None:
        self.sock = sock
        self.addr = addr
        self.host = str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)
        self.leftover = b""
        self.handshake: ServerHandshake | None = None
        self.draining = -1  # bytes discarded after a refusal; -1: not draining

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


#: data ports served by this process: an initiator never waits for their replies with
#: the GIL held (the serving thread needs it to answer)
IN_PROCESS_DATA_PORTS: set[int] = set()


class DataServer:
    """The data-port listener (see the module docstring)."""

    def __init__(self, ctx: TransportContext) -> None:
        cfg = ctx.config
        self._ctx = ctx
        self._registry = ctx.registry
        self._key: ClusterKey | None = cfg.security.key
        self._max_conns = cfg.data_max_connections
        self._max_workers = cfg.data_workers
        self._auth_timeout = cfg.auth_timeout_s
        self._io_timeout = cfg.tcp_status_timeout_s
        self._sock: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._closed = False
        self._lock = threading.Lock()
        self._work: collections.deque[_Conn] = collections.deque()
        self._work_cv = threading.Condition(self._lock)
        self._returned: collections.deque[_Conn] = collections.deque()
        self._conns: set[_Conn] = set()
        self._active: dict[threading.Thread, _Conn | None] = {}
        self._idle_workers = 0
        self._reactor: threading.Thread | None = None
        self._log = RepeatLimiter(log)
        self.port = 0
        #: counters for tests and operators
        self.requests_served = 0
        self.requests_rejected = 0
        self.refused_connections = 0
        self.auth_failures = 0
        self.timed_out = 0

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        cfg = self._ctx.config
        self._sock = bind_listener(
            self._ctx.bind_host,
            port_range=(cfg.rpc_port_min, cfg.rpc_port_max),
            backlog=cfg.listen_backlog,
            what="TCP transport data listener",
        )
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        IN_PROCESS_DATA_PORTS.add(self.port)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._sock, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        t = threading.Thread(
            target=self._reactor_loop, name=f"mc-tcp-data:{self.port}", daemon=True
        )
        self._reactor = t
        t.start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    @property
    def workers(self) -> int:
        with self._lock:
            return len(self._active)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            IN_PROCESS_DATA_PORTS.discard(self.port)
            busy = [c for c in self._active.values() if c is not None]
            workers = list(self._active)
            self._work_cv.notify_all()
        self._wake()
        for c in busy:  # workers blocked on a peer end now
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._reactor is not None:
            self._reactor.join(5)
        for t in workers:
            t.join(5)
        with self._lock:
            rest = list(self._conns) + list(self._work) + list(self._returned)
            self._conns.clear()
            self._work.clear()
            self._returned.clear()
        for c in rest:
            c.close()
        if self._sel is not None:
            self._sel.close()
        if self._sock is not None:
            self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full (the reactor will look anyway) or closed
            pass

    # --- reactor ---------------------------------------------------------------------

    def _reactor_loop(self) -> None:
        sel = self._sel
        assert sel is not None
        deadlines: dict[_Conn, float] = {}
        while not self._closed:
            now = time.monotonic()
            timeout = min((d for d in deadlines.values()), default=now + 1.0) - now
            try:
                events = sel.select(max(0.0, min(timeout, 1.0)))
            except (OSError, ValueError):  # the selector was closed under us
                return
            for key, _ in events:
                tag = key.data
                if tag == "accept":
                    self._accept(sel, deadlines)
                elif tag == "wake":
                    self._take_back(sel, deadlines)
                else:
                    self._readable(sel, tag, deadlines)
            if deadlines:
                now = time.monotonic()
                for conn in [c for c, d in deadlines.items() if d <= now]:
                    del deadlines[conn]
                    self._expire(sel, conn)

    def _accept(self, sel: selectors.BaseSelector, deadlines: dict[_Conn, float]) -> None:
        assert self._sock is not None
        while True:
            try:
                sock, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._log(
                        "accept:fds",
                        logging.ERROR,
                        "data port %d: cannot accept: %s (raise the open-files limit, ulimit -n)",
                        self.port,
                        exc.strerror,
                    )
                    time.sleep(0.01)
                return
            conn = _Conn(sock, addr)
            with self._lock:
                full = len(self._conns) >= self._max_conns
                if not full:
                    self._conns.add(conn)
            if full:
                self.refused_connections += 1
                self._log(
                    f"cap:{conn.host}",
                    logging.WARNING,
                    "data port %d: refused a connection from %s: %d connections are open "
                    "(data_max_connections)",
                    self.port,
                    addr,
                    self._max_conns,
                )
                conn.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_io_timeout(sock, self._io_timeout)  # sends give up after this
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _LINGER_TV)
            if self._key is not None:
                conn.handshake = ServerHandshake(self._key, AUTH_CONTEXT)
                deadlines[conn] = time.monotonic() + self._auth_timeout
            sel.register(sock, selectors.EVENT_READ, conn)

    def _readable(
        self, sel: selectors.BaseSelector, conn: _Conn, deadlines: dict[_Conn, float]
    ) -> None:
        if conn.draining >= 0:
            self._drain(sel, conn, deadlines)
            return
        hs = conn.handshake
        if hs is None:
            sel.unregister(conn.sock)
            deadlines.pop(conn, None)
            self._dispatch(conn)
            return
        try:
            data = conn.sock.recv(hs.want, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            hs.feed(data)
        else:
            hs.feed_eof()
        out = hs.bytes_to_send()
        if out:
            try:
                conn.sock.send(out, socket.MSG_DONTWAIT)  # <= 76 bytes into an empty buffer
            except OSError:
                pass
        if hs.done:
            conn.handshake = None
            deadlines.pop(conn, None)
        elif hs.failed is not None:
            self.auth_failures += 1
            self._log(
                f"auth:{conn.host}:{hs.failed.kind.value}",
                logging.ERROR,
                "%s",
                describe_failure(hs.failed, port=f"data port {self.port}", peer=str(conn.addr)),
            )
            conn.handshake = None
            if data and hs.failed.kind is FailureKind.UNAUTHENTICATED:
                # a peer without the token sent a request: say so in its own protocol
                try:
                    conn.sock.send(_AUTH_REQUIRED_BYTES, socket.MSG_DONTWAIT)
                except OSError:
                    pass
            self._start_drain(conn, deadlines)

    def _start_drain(self, conn: _Conn, deadlines: dict[_Conn, float]) -> None:
        """Refused: half-close and discard input for a moment, then close."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.draining = 0
        deadlines[conn] = time.monotonic() + _DRAIN_S

    def _drain(
        self, sel: selectors.BaseSelector, conn: _Conn, deadlines: dict[_Conn, float]
    ) -> None:
        try:
            data = conn.sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        conn.draining += len(data)
        if not data or conn.draining > _DRAIN_BYTES:
            deadlines.pop(conn, None)
            self._forget(sel, conn)

    def _expire(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        if conn.draining < 0:  # not a drain that simply ran out
            self.timed_out += 1
            what = "authenticate" if conn.handshake is not None else "complete a request header"
            self._log(
                f"timeout:{conn.host}",
                logging.INFO,
                "data port %d: %s did not %s in time; closing",
                self.port,
                conn.addr,
                what,
            )
        self._forget(sel, conn)

    def _forget(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        with self._lock:
            self._conns.discard(conn)
        conn.close()

    def _take_back(self, sel: selectors.BaseSelector, deadlines: dict[_Conn, float]) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            with self._lock:
                if not self._returned:
                    return
                conn = self._returned.popleft()
            if len(conn.leftover) >= _HEADER_SIZE:  # a whole request waits: serve it now
                self._dispatch(conn)
                continue
            if conn.leftover:
                deadlines[conn] = time.monotonic() + self._io_timeout
            try:
                sel.register(conn.sock, selectors.EVENT_READ, conn)
            except (ValueError, OSError):  # closed meanwhile
                with self._lock:
                    self._conns.discard(conn)
                conn.close()

    # --- workers ----------------------------------------------------------------------

    def _dispatch(self, conn: _Conn) -> None:
        with self._lock:
            if self._closed:
                return
            self._work.append(conn)
            if self._idle_workers:
                self._work_cv.notify()
                return
            if len(self._active) >= self._max_workers:
                return  # a busy worker takes it when it parks its current connection
            t = threading.Thread(
                target=self._worker, name=f"mc-tcp-worker:{self.port}", daemon=True
            )
            self._active[t] = None
        t.start()

    def _worker(self) -> None:
        me = threading.current_thread()
        reader = SocketReader(None)
        current: list[_Conn | None] = [None]

        def abort() -> None:
            conn = current[0]
            if conn is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        slot = self._registry.new_slot(abort)
        try:
            while True:
                with self._lock:
                    while not self._work and not self._closed:
                        self._idle_workers += 1
                        woke = self._work_cv.wait(_WORKER_IDLE_S)
                        self._idle_workers -= 1
                        if not woke and not self._work:
                            return
                    if self._closed:
                        return
                    conn = self._work.popleft()
                    self._active[me] = conn
                current[0] = conn
                park = False
                try:
                    park = self._serve(conn, reader, slot)
                finally:
                    slot.region = None
                    current[0] = None
                    # a connection that went idle goes back to the reactor -- unless
                    # close() ran meanwhile: then nobody will take it back, close it
                    with self._lock:
                        self._active[me] = None
                        handed_back = park and not self._closed
                        if handed_back:
                            self._returned.append(conn)
                        else:
                            self._conns.discard(conn)
                    if handed_back:
                        self._wake()
                    else:
                        conn.close()
        finally:
            self._registry.drop_slot(slot)
            with self._lock:
                self._active.pop(me, None)

    def _serve(self, conn: _Conn, reader: SocketReader, slot: UseSlot) -> bool:
        """Serve requests on ``conn``; True when it went idle (park it), False when
        it ended (close it)."""
        sock = conn.sock
        out: list[Buffer] = []
        out_bytes = 0
        out_region: Region | None = None  # region viewed by READ replies in ``out``
        pin = self._registry.pin
        work = self._work
        no_key = self._key is None

        # ``slot.region`` stays set between requests (cheaper than clearing it after
        # each one); it is cleared when the connection parks, so an unregister waits
        # at most one linger for an idle connection.  flush() leaves it alone: it
        # also runs in the middle of a WRITE payload (before the reader waits).
        def flush() -> None:
            nonlocal out_bytes, out_region
            if out:
                sendmsg_all(sock, out)
                out.clear()
                out_bytes = 0
            out_region = None

        def park() -> bool:
            flush()
            slot.region = None
            conn.leftover = reader.detach()
            return True

        reader.attach(sock, conn.leftover, flush, lambda: bool(out))
        patience = reader.patience = self._io_timeout
        conn.leftover = b""
        buf = reader.buffer
        served = 0
        greedy = True
        try:
            while True:
                if work:  # others wait for a worker: no lingering, and take turns
                    # (yield only with nothing buffered: the reactor waits for the socket,
                    # it would never see requests held in this reader)
                    if (served >= _FAIR_REQUESTS and not reader.available) or not (
                        reader.fill_nowait(_HEADER_SIZE, greedy)
                    ):
                        return park()
                    off = reader.take(_HEADER_SIZE, greedy)
                else:
                    # served from the buffer, or one blocking recv that the short
                    # SO_RCVTIMEO (_LINGER_S) ends; replies are flushed before waiting
                    reader.patience = None
                    try:
                        off = reader.take(_HEADER_SIZE, greedy)
                    except BlockingIOError:
                        return park()
                    reader.patience = patience
                size, raddr, opcode = _unpack_header(buf, off)
                v2 = opcode & V2_FLAG
                is_write = (opcode & ~V2_FLAG) == OPCODE_WRITE
                if out_region is not None and not (
                    out_region.addr <= raddr and raddr + size <= out_region.end
                ):
                    flush()  # replies must leave before another region is pinned
                region = pin(slot, raddr, size)
                if region is None:
                    if no_key and size == MAGIC_U64 and not served:
                        self._refuse_hello(conn)  # a HELLO: the peer wants a token
                        return False
                    self._reject(conn, sock, raddr, size, v2, is_write, out)
                    flush()
                    return False
                if region.backend is not None:
                    self._serve_device(sock, reader, region, raddr, size, is_write, v2, out, flush)
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
                    out_region = region
                    out_bytes += size
                    if out_bytes >= _FLUSH_BYTES or len(out) >= _FLUSH_IOVECS:
                        flush()
                served += 1
        except (PeerClosed, ConnectionError):
            return False
        except (BlockingIOError, TimeoutError):
            self.timed_out += 1
            self._log(
                f"stall:{conn.host}",
                logging.INFO,
                "data port %d: %s made no progress for %.0f s in the middle of a request; closing",
                self.port,
                conn.addr,
                self._io_timeout,
            )
            return False
        except OSError as exc:
            if not self._closed and exc.errno not in (errno.EBADF, errno.ENOTCONN):
                log.debug("data connection from %s ended: %s", conn.addr, exc)
            return False
        except DeviceError as exc:
            self._log(
                f"device:{conn.host}",
                logging.WARNING,
                "data port %d: device memory copy for %s failed: %s; closing the connection",
                self.port,
                conn.addr,
                exc,
            )
            return False
        finally:
            self.requests_served += served
            if reader.sock is not None:
                reader.detach()

    def _serve_device(
        self,
        sock: socket.socket,
        reader: SocketReader,
        region: Region,
        raddr: int,
        size: int,
        is_write: bool,
        v2: int,
        out: list[Buffer],
        flush: Callable[[], None],
    ) -> None:
        """One request on device memory (``region`` pinned by the caller): staged
        through pinned host buffers (device/_staging.py)."""
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
                region.backend, region.device, raddr, size, lambda v: sendmsg_all(sock, [v])
            )

    def _reject(
        self,
        conn: _Conn,
        sock: socket.socket,
        raddr: int,
        size: int,
        v2: int,
        is_write: bool,
        out: list[Buffer],
    ) -> None:
        self.requests_rejected += 1
        self._log(
            f"reject:{conn.host}",
            logging.WARNING,
            "ServerSession: remote-supplied address %#x with size %d from %s is not within any "
            "registered buffer; closing the connection (the peer uses a stale descriptor or "
            "wrong address arithmetic)",
            raddr,
            size,
            conn.addr,
        )
        if v2:
            out.append(_REJECT_BYTES)
        if is_write:
            # The payload of a refused WRITE is never consumed; end with a reset (as
            # the reference does) so a pipelining v1 peer cannot mistake later writes
            # on this connection for delivered ones.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)

    def _refuse_hello(self, conn: _Conn) -> None:
        """No key here, and the peer starts with a HELLO: tell it, and log why."""
        self.auth_failures += 1
        self._log(
            f"auth:{conn.host}:notoken",
            logging.ERROR,
            "data port %d: %s tries to authenticate with a cluster token, but this engine has "
            "none: refused. Fix: set the same PYMOONCAKE_CLUSTER_TOKEN in every process of the "
            "cluster (or in none)",
            self.port,
            conn.addr,
        )
        try:
            conn.sock.sendall(no_token_reply())
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.settimeout(_DRAIN_S)
            while conn.sock.recv(65536):
                pass
        except OSError:
            pass
