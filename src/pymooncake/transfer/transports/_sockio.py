"""Zero-copy socket helpers shared by the data-path transports.

``SocketReader`` keeps one receive buffer per connection.  Small items
(headers, status frames, small payloads) are served from it, so a single
``recv_into`` can deliver many pipelined requests; large payloads bypass it
and are received straight into the destination view.  Before any call that
may block, the reader runs ``before_block`` -- the server uses that hook to
flush replies it has batched up ("flush before you would wait").

``sendmsg_all`` sends a list of buffers with ``sendmsg`` (scatter/gather), in
groups of at most ``IOV_MAX`` and resuming after partial sends, without ever
joining payloads.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Final

from ..._heldio import recv_into_held

__all__ = ["IOV_MAX", "PeerClosed", "SocketReader", "sendmsg_all"]

#: Linux UIO_MAXIOV
IOV_MAX: Final = 1024
#: payloads below this are pulled through the receive buffer (one recv may
#: then carry several requests); larger ones are received in place.
_DIRECT_THRESHOLD: Final = 64 * 1024
_DEFAULT_BUFFER: Final = 256 * 1024
_DONTWAIT: Final = socket.MSG_DONTWAIT
_SEND_CHUNK: Final = 1 << 20


class PeerClosed(ConnectionError):
    """The peer closed the connection (EOF) while more bytes were expected."""


def _detached(*args: object) -> int:
    raise PeerClosed("the reader has no connection attached")


Buffer = bytes | bytearray | memoryview


def sendmsg_all(sock: socket.socket, bufs: list[Buffer]) -> int:
    """Send every buffer of ``bufs`` in order; returns the bytes sent.

    ``bufs`` may be modified (partially sent items are replaced by their tails).

    Raises:
        OSError: the socket failed; some prefix of the data may have been sent.
    """
    total = 0
    i, n = 0, len(bufs)
    sendmsg = sock.sendmsg
    while i < n:
        # at most ~_SEND_CHUNK bytes per call: the kernel copies a huge sendmsg in
        # one go while the receiver waits for the first bytes
        j = i + 1
        size = len(bufs[i])
        while j < n and j - i < IOV_MAX and size < _SEND_CHUNK:
            size += len(bufs[j])
            j += 1
        if size > 2 * _SEND_CHUNK and j == i + 1:  # one big buffer: send it in pieces
            sent = sendmsg([memoryview(bufs[i])[:_SEND_CHUNK]])
        else:
            sent = sendmsg(bufs[i:j])
        total += sent
        while sent:
            size = len(bufs[i])
            if sent >= size:
                sent -= size
                i += 1
            else:
                bufs[i] = memoryview(bufs[i])[sent:]
                sent = 0
        while i < n and not len(bufs[i]):
            i += 1
    return total


class SocketReader:
    """Buffered reader over a blocking socket.

    Args:
        sock: a connected blocking socket (None: :meth:`attach` one later).
        before_block: called before a ``recv`` that would block.
        pending: if given, ``before_block`` is only considered while it returns True
            (nothing to flush: no extra non-blocking attempt).
        size: receive buffer size.

    One reader (and its buffer) may serve many connections in turn: the data
    port's workers :meth:`attach` a connection when it becomes readable and
    :meth:`detach` it, with its few unread bytes, when it goes idle.
    """

    __slots__ = (
        "_before_block",
        "_buf",
        "_end",
        "_mv",
        "_pending",
        "_recv_into",
        "_start",
        "hold_ms",
        "patience",
        "sock",
    )

    def __init__(
        self,
        sock: socket.socket | None,
        before_block: Callable[[], None] | None = None,
        size: int = _DEFAULT_BUFFER,
        pending: Callable[[], bool] | None = None,
    ) -> None:
        self._buf = bytearray(size)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.sock: socket.socket | None = None
        self._recv_into: Callable[..., int] = _detached
        self._before_block: Callable[[], None] | None = None
        self._pending: Callable[[], bool] | None = None
        #: seconds a receive may go on timing out (short SO_RCVTIMEO) without
        #: progress before BlockingIOError reaches the caller; None: at once
        self.patience: float | None = None
        #: an initiator's connection: wait up to this long for the small items
        #: (status frames, small payloads) with the GIL held (``_heldio``): beside a
        #: busy Python thread of this process, a wait that gives up the GIL costs
        #: up to the 5 ms switch interval.  0: never (servers, large payloads)
        self.hold_ms = 0
        if sock is not None:
            self.attach(sock, b"", before_block, pending)

    def attach(
        self,
        sock: socket.socket,
        leftover: bytes = b"",
        before_block: Callable[[], None] | None = None,
        pending: Callable[[], bool] | None = None,
    ) -> None:
        """Read from ``sock`` from now on; ``leftover`` are bytes already received
        from it (what :meth:`detach` returned)."""
        self.sock = sock
        self._recv_into = sock.recv_into
        self._before_block = before_block
        self._pending = pending
        n = len(leftover)
        self._mv[:n] = leftover
        self._start, self._end = 0, n

    def detach(self) -> bytes:
        """Stop reading from the socket; returns the bytes received but not consumed."""
        left = bytes(self._mv[self._start : self._end])
        self._start = self._end = 0
        self.sock = None
        self._recv_into = _detached
        self._before_block = self._pending = None
        return left

    @property
    def available(self) -> int:
        """Bytes received and not yet consumed."""
        return self._end - self._start

    def fill_nowait(self, need: int, greedy: bool = True) -> bool:
        """Receive without waiting until ``need`` bytes are buffered; False if the
        socket has nothing more now.  ``greedy=False`` asks for exactly the
        missing bytes (a large payload behind them stays for ``recv_into``).

        Raises:
            PeerClosed: EOF.
        """
        if self._end - self._start >= need:
            return True
        if self._start and (len(self._buf) - self._start) < need:
            n = self._end - self._start
            self._mv[:n] = self._mv[self._start : self._end]
            self._start, self._end = 0, n
        while self._end - self._start < need:
            stop = len(self._buf) if greedy else self._start + need
            try:
                got = self._recv_into(self._mv[self._end : stop], 0, _DONTWAIT)
            except BlockingIOError:
                return False
            if not got:
                raise PeerClosed("peer closed the connection")
            self._end += got
        return True

    @property
    def buffer(self) -> bytearray:
        return self._buf

    def _fill(self, need: int, greedy: bool = True) -> None:
        """Receive until at least ``need`` bytes are buffered.  Non-greedy fills
        ask the kernel for exactly the missing bytes, so a large payload that
        follows stays in the socket for a zero-copy ``recv_into``."""
        if self._start and (len(self._buf) - self._start) < need:
            # compact: move the unread tail to the front
            n = self._end - self._start
            self._mv[:n] = self._mv[self._start : self._end]
            self._start, self._end = 0, n
        while self._end - self._start < need:
            view = self._mv[self._end :] if greedy else self._mv[self._end : self._start + need]
            got = None
            if self.hold_ms and self.sock is not None:
                got = recv_into_held(self.sock, view, self.hold_ms)
            if got is None:
                got = self._recv(view)
            if not got:
                raise PeerClosed("peer closed the connection")
            self._end += got

    def _recv(self, view: memoryview) -> int:
        """recv_into; ``before_block`` runs only when the call would actually wait.

        A non-blocking attempt comes first: while the peer keeps streaming, replies
        gathered by the caller are not flushed one by one but in one later batch.
        A receive timeout (SO_RCVTIMEO) surfaces as BlockingIOError, unless
        :attr:`patience` allows retrying for that long without progress.
        """
        try:
            if self._before_block is None or (self._pending is not None and not self._pending()):
                return self._recv_into(view)
            try:
                return self._recv_into(view, 0, _DONTWAIT)
            except BlockingIOError:
                self._before_block()
                return self._recv_into(view)
        except BlockingIOError:
            if self.patience is None:
                raise
        deadline = time.monotonic() + self.patience
        while True:
            try:
                return self._recv_into(view)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise

    def ensure(self, n: int, greedy: bool = True) -> None:
        """Make ``n`` bytes available without consuming them (may block)."""
        if self._end - self._start < n:
            self._fill(n, greedy)

    def take(self, n: int, greedy: bool = True) -> int:
        """Make ``n`` bytes available and consume them; returns their offset
        in :attr:`buffer` (valid until the next call).  ``greedy=False`` when a
        large payload is expected right after these bytes."""
        if self._end - self._start < n:
            self._fill(n, greedy)
        off = self._start
        self._start += n
        return off

    def readinto(self, view: memoryview) -> None:
        """Fill ``view`` completely from the connection."""
        need = len(view)
        pos = 0
        avail = self._end - self._start
        if avail:
            k = avail if avail < need else need
            view[:k] = self._mv[self._start : self._start + k]
            self._start += k
            pos = k
            if self._start == self._end:
                self._start = self._end = 0
        remaining = need - pos
        if not remaining:
            return
        if remaining < _DIRECT_THRESHOLD:
            self._fill(remaining)
            view[pos:] = self._mv[self._start : self._start + remaining]
            self._start += remaining
            return
        recv = self._recv
        while pos < need:
            got = recv(view[pos:])
            if not got:
                raise PeerClosed("peer closed the connection in the middle of a payload")
            pos += got
