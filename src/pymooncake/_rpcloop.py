"""An asyncio event loop that serves RPC connections without asyncio's per-event machinery.

Theory of operation
-------------------
The master answers each small request within one read event: decode, a dict
lookup, encode, one ``send``.  On asyncio's ``SelectorEventLoop`` that event
also passes through the loop's generic path: the selector's result becomes a
``Handle`` queued on the ready deque, run later in the same turn under
``Context.run``, which calls the socket transport's read callback, which asks the
protocol for a buffer, reads, and hands the bytes over; the reply goes through
the transport's ``write`` checks.  Measured on a 2-vCPU VM (``bench/loop_bench.py``
and the master's own ``ExistKey`` loop), that machinery is several microseconds
of the master's ~60 us of CPU per request.

:class:`RpcLoop` is a ``SelectorEventLoop`` whose ``_process_events`` calls a
:class:`StreamConn` straight from the selector's result: the connection reads
into its protocol's buffer (``asyncio.BufferedProtocol``: ``get_buffer`` /
``buffer_updated``) and its ``write`` sends at once when nothing is queued.
Every other descriptor -- timers, HTTP servers, the HA stream, executors --
takes asyncio's own path on the same loop, so everything else the master runs
stays plain asyncio.  :class:`RpcServer` accepts connections on a listening
socket (TCP or UNIX) and makes a :class:`StreamConn` for each; it is used only
on an :class:`RpcLoop` and without TLS (TLS connections keep asyncio's
transports, which own the TLS state machine).

A :class:`StreamConn` is an ``asyncio.Transport`` for the protocol: ``write``
(sent at once, the rest queued and sent when the socket is writable, with
``pause_writing``/``resume_writing`` at 64 KiB / 16 KiB queued, as asyncio's),
``close`` (after the queue is sent), ``abort``, ``pause_reading`` /
``resume_reading``, ``get_write_buffer_size``, ``is_closing`` and
``get_extra_info`` (``peername``, ``sockname``, ``socket``).
``connection_lost`` is called from the loop, as asyncio does, never from
inside the protocol's own callbacks.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import selectors
import socket
from collections.abc import Callable
from typing import Any, Final

__all__ = ["RpcLoop", "RpcServer", "StreamConn"]

log = logging.getLogger(__name__)

_READ: Final = selectors.EVENT_READ
_WRITE: Final = selectors.EVENT_WRITE
#: queued bytes at which the protocol is asked to stop writing, and to resume
_HIGH_WATER: Final = 64 * 1024
_LOW_WATER: Final = 16 * 1024
#: errors of accept() that mean "out of a resource": stop accepting for a moment
_ACCEPT_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_PAUSE_S: Final = 1.0


class RpcLoop(asyncio.SelectorEventLoop):
    """A ``SelectorEventLoop`` that runs :class:`StreamConn` events inline (see
    the module docstring); every other descriptor is handled as asyncio does."""

    def _process_events(self, event_list: list[tuple[selectors.SelectorKey, int]]) -> None:
        rest: list[tuple[selectors.SelectorKey, int]] | None = None
        for item in event_list:
            conn = item[0].data
            if type(conn) is StreamConn:
                try:
                    conn.ready(item[1])
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    conn.failed(exc)
            elif rest is None:
                rest = [item]
            else:
                rest.append(item)
        if rest is not None:
            super()._process_events(rest)  # type: ignore[misc]


class StreamConn(asyncio.Transport):
    """One accepted stream socket served inline by an :class:`RpcLoop`.

    Args:
        loop: the loop (an :class:`RpcLoop`) whose selector watches ``sock``.
        sock: a connected, non-blocking stream socket (owned from now on).
        protocol: an ``asyncio.BufferedProtocol``; ``connection_made`` is called
            before any byte is read.
    """

    def __init__(
        self, loop: RpcLoop, sock: socket.socket, protocol: asyncio.BufferedProtocol
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._get_buffer: Callable[[int], Any] = protocol.get_buffer
        self._updated: Callable[[int], None] = protocol.buffer_updated
        self._send = sock.send
        self._queue = bytearray()
        self._events = 0  # what the selector watches for
        self._reading = True
        self._closing = False
        self._lost = False
        self._write_paused = False
        self._extra: dict[str, Any] = {"socket": sock}
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (as asyncio's)
        try:
            self._extra["peername"] = sock.getpeername()
        except OSError:
            self._extra["peername"] = None
        try:
            self._extra["sockname"] = sock.getsockname()
        except OSError:
            self._extra["sockname"] = None
        protocol.connection_made(self)
        if not self._closing:
            self._watch(_READ if self._reading else 0)

    # --- the selector ----------------------------------------------------------------

    def _watch(self, events: int) -> None:
        if events == self._events or self._lost:
            return
        selector = self._loop._selector  # type: ignore[attr-defined]
        if not self._events:
            selector.register(self._fd, events, self)
        elif not events:
            selector.unregister(self._fd)
        else:
            selector.modify(self._fd, events, self)
        self._events = events

    def _want(self) -> int:
        events = _WRITE if self._queue else 0
        if self._reading and not self._closing:
            events |= _READ
        return events

    def ready(self, mask: int) -> None:
        """The selector found the socket ready (``mask``: read and/or write)."""
        if mask & _READ and self._reading and not self._closing:
            buffer = self._get_buffer(-1)
            if not len(buffer):  # (asyncio refuses it the same way)
                raise RuntimeError("the protocol's get_buffer() returned an empty buffer")
            try:
                n = self._sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                n = -1
            except OSError as exc:
                self._fatal(exc)
                return
            if n > 0:
                self._updated(n)
            elif n == 0:
                self._eof()
                return
        if mask & _WRITE and not self._lost:
            self._flush()

    def failed(self, exc: BaseException) -> None:
        """A protocol callback raised ``exc`` (a bug): report it, drop the connection."""
        self._loop.call_exception_handler(
            {
                "message": "unexpected error serving an RPC connection",
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            }
        )
        self._force_close(exc if isinstance(exc, Exception) else None)

    # --- reading ------------------------------------------------------------------

    def _eof(self) -> None:
        keep_open = self._protocol.eof_received()
        if keep_open:
            self._reading = False
            self._watch(self._want())
        else:
            self.close()

    def pause_reading(self) -> None:
        if self._closing or not self._reading:
            return
        self._reading = False
        self._watch(self._want())

    def resume_reading(self) -> None:
        if self._closing or self._reading:
            return
        self._reading = True
        self._watch(self._want())

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # --- writing ------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost:
            return  # (asyncio drops it too, warning after a few)
        if not self._queue:
            try:
                n = self._send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if n == len(data):
                return
            self._queue += memoryview(data)[n:]
            self._watch(self._want())
        else:
            self._queue += data
        if not self._write_paused and len(self._queue) > _HIGH_WATER:
            self._write_paused = True
            self._protocol.pause_writing()

    def _flush(self) -> None:
        queue = self._queue
        if queue:
            try:
                n = self._send(queue)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fatal(exc)
                return
            del queue[:n]
        if self._write_paused and len(queue) <= _LOW_WATER:
            self._write_paused = False
            self._protocol.resume_writing()
        if not queue:
            if self._closing:
                self._lose(None)
            else:
                self._watch(self._want())

    def get_write_buffer_size(self) -> int:
        return len(self._queue)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (_LOW_WATER, _HIGH_WATER)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        raise NotImplementedError("StreamConn keeps fixed write buffer limits (16/64 KiB)")

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("StreamConn does not half-close")

    # --- closing ------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; the connection is lost once the queued bytes are sent."""
        if self._closing:
            return
        self._closing = True
        if self._queue:
            self._watch(_WRITE)
        else:
            self._lose(None)

    def abort(self) -> None:
        self._force_close(None)

    def _fatal(self, exc: OSError) -> None:
        self._force_close(exc)

    def _force_close(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._closing = True
        self._queue.clear()
        self._lose(exc)

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._watch(0)
        self._lost = True
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()
            self._get_buffer = self._updated = _unset  # (no cycle through the protocol)

    # --- the rest of the Transport interface ------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("StreamConn serves one protocol for its lifetime")

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return f"<StreamConn fd={self._fd} {state} peer={self._extra.get('peername')!r}>"


def _unset(*args: object) -> Any:
    raise RuntimeError("connection already lost")


class RpcServer:
    """Accepts connections on ``sock`` (listening, any stream family) and serves
    each with a :class:`StreamConn` and a new ``protocol_factory()``.

    Args:
        loop: an :class:`RpcLoop`.
        protocol_factory: makes the ``asyncio.BufferedProtocol`` of a connection.
        sock: the listening socket (owned from now on).
        burst: most connections accepted per readiness event (asyncio's backlog
            argument plays this role for its servers).
        what: names the listener in log messages.
    """

    def __init__(
        self,
        loop: RpcLoop,
        protocol_factory: Callable[[], asyncio.BufferedProtocol],
        sock: socket.socket,
        *,
        burst: int = 100,
        what: str = "RPC listener",
    ) -> None:
        self._loop = loop
        self._factory = protocol_factory
        self._sock = sock
        self._burst = burst
        self._what = what
        self._closed = False
        self._resume: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    def _accept(self) -> None:
        for _ in range(self._burst):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_EXHAUSTED:
                    log.error(
                        "%s: cannot accept connections (%s); retrying in %g s -- raise the "
                        "open-file limit (ulimit -n) or lower the connection cap",
                        self._what,
                        exc,
                        _ACCEPT_PAUSE_S,
                    )
                    self._loop.remove_reader(self._sock.fileno())
                    self._resume = self._loop.call_later(_ACCEPT_PAUSE_S, self._listen_again)
                    return
                raise
            conn.setblocking(False)
            try:
                StreamConn(self._loop, conn, self._factory())
            except Exception:
                log.exception("%s: could not set up a new connection", self._what)
                conn.close()

    def _listen_again(self) -> None:
        self._resume = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting (connections already made are their owner's to close)."""
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    async def wait_closed(self) -> None:
        """Nothing to wait for: :meth:`close` is immediate (asyncio.Server's shape)."""
