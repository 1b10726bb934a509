"""A TCP proxy in front of the store master that loses replies on purpose.

Theory of operation
-------------------
:class:`MasterProxy` listens on 127.0.0.1 (port chosen at run time) and relays
each accepted connection to the master over a new TCP connection, from one
thread with a selector.  It reads the master RPC framing (``u32 length | u8 kind
| u32 id | JSON``, see ``wire/_master.py``) in both directions, just enough to
know which method a reply answers: the method name is the first JSON string of
the request body.  A cluster-token handshake at the start of a connection
(``MCAUTH1`` messages, 88 bytes each way) is relayed untouched and skipped.

Faults, armed at any time from any thread:

* :meth:`drop_replies` -- when a reply to the given method comes back from the
  master, it is *not* forwarded: the proxy resets (RST) both connections
  instead.  The master has acted; the client saw its connection break.  This
  is the "lost reply" of issue 7, deterministically.
* :meth:`reset_all` -- reset every connection now (a flaky network).
* :meth:`refuse` -- reset new connections at once while set.

Counters (``dropped``, ``resets``, ``accepted``) say what happened.  The proxy
moves bytes without copying them into frames; it is a test tool, not a fast
path.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Final

__all__ = ["MasterProxy"]

_PREFIX: Final = struct.Struct("<IBI")
_MAGIC: Final = b"MCAUTH1\n"
#: HELLO + PROOF (client -> master), CHALLENGE + RESULT (master -> client)
_AUTH_BYTES: Final = 88
_LINGER_RST: Final = struct.pack("ii", 1, 0)


def _method_of(body: bytes | bytearray) -> str:
    """The method name of a request body ``["Name", {...}]`` (without parsing JSON)."""
    start = body.find(b'"')
    end = body.find(b'"', start + 1)
    if start < 0 or end < 0:
        return ""
    return bytes(body[start + 1 : end]).decode(errors="replace")


@dataclass
class _Side:
    """One direction of a relayed connection, and what is parsed of it."""

    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)  # parsed-ahead bytes not yet sent
    skip: int = -1  # handshake bytes still to pass untouched (-1: not decided)


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = _Side(client)
        self.master = _Side(upstream)
        self.methods: dict[int, str] = {}
        self.closed = False


class MasterProxy:
    """Relays master RPC connections from ``address`` to ``upstream``.

    Args:
        upstream: the master's ``host:port``.
        parse: read the framing (needed for :meth:`drop_replies`); False relays
            bytes blindly (cheaper, :meth:`reset_all` still works).
    """

    def __init__(self, upstream: str, *, parse: bool = True) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._parse = parse
        self._lock = threading.Lock()
        self._drop: dict[str, int] = {}
        self._reset_now = False
        self._refusing = False
        self.dropped: dict[str, int] = {}
        self.resets = 0
        self.accepted = 0
        self._pairs: list[_Pair] = []
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="master-proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    # --- faults -----------------------------------------------------------------------

    def drop_replies(self, method: str, count: int = 1) -> None:
        """Lose the next ``count`` replies to ``method`` (reset instead of forwarding)."""
        with self._lock:
            self._drop[method] = self._drop.get(method, 0) + count

    def heal(self) -> None:
        """Forget the armed drops and stop refusing."""
        with self._lock:
            self._drop.clear()
            self._refusing = False

    def refuse(self, on: bool = True) -> None:
        """Reset new connections at once while ``on``."""
        with self._lock:
            self._refusing = on

    def reset_all(self) -> None:
        """Reset every relayed connection (asynchronously, within milliseconds)."""
        with self._lock:
            self._reset_now = True
        self._wake()

    def armed(self, method: str) -> int:
        """Drops of ``method`` still armed."""
        with self._lock:
            return self._drop.get(method, 0)

    # --- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Stop relaying; every socket is closed when this returns."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake()
        self._thread.join(10)
        for pair in self._pairs:
            self._close_pair(pair, reset=False)
        self._pairs.clear()
        self._sel.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> MasterProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # --- the relay --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.5):
                if self._stop.is_set():
                    break
                obj = key.fileobj
                if obj is self._listener:
                    self._accept()
                elif obj is self._wake_r:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                else:
                    pair, side = key.data
                    self._relay(pair, side)
            with self._lock:
                reset, self._reset_now = self._reset_now, False
            if reset:
                for pair in list(self._pairs):
                    self._close_pair(pair, reset=True)
            self._pairs = [p for p in self._pairs if not p.closed]

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.accepted += 1
            with self._lock:
                refusing = self._refusing
            if refusing:
                self._rst(conn)
                self.resets += 1
                continue
            try:
                up = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                self._rst(conn)
                continue
            for s in (conn, up):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(conn, up)
            self._pairs.append(pair)
            self._sel.register(conn, selectors.EVENT_READ, (pair, "client"))
            self._sel.register(up, selectors.EVENT_READ, (pair, "master"))

    def _relay(self, pair: _Pair, side: str) -> None:
        if pair.closed:
            return
        src, dst = (pair.client, pair.master) if side == "client" else (pair.master, pair.client)
        try:
            data = src.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_pair(pair, reset=False)
            return
        if not self._parse:
            self._send(pair, dst, data)
            return
        src.buf += data
        out, lost = self._frames(pair, src, side == "client")
        if out:
            self._send(pair, dst, out)
        if lost:
            self.resets += 1
            self._close_pair(pair, reset=True)

    def _frames(self, pair: _Pair, src: _Side, requests: bool) -> tuple[bytes, bool]:
        """Whole frames of ``src.buf`` to forward, and whether a reply was dropped."""
        buf = src.buf
        out = bytearray()
        if src.skip < 0:  # a connection starts with a handshake or with a frame
            if len(buf) < len(_MAGIC) and _MAGIC.startswith(bytes(buf)):
                return b"", False
            src.skip = _AUTH_BYTES if buf.startswith(_MAGIC) else 0
        if src.skip:
            n = min(src.skip, len(buf))
            out += buf[:n]
            del buf[:n]
            src.skip -= n
        while len(buf) >= _PREFIX.size:
            length, _kind, req_id = _PREFIX.unpack_from(buf, 0)
            end = 4 + length
            if len(buf) < end:
                break
            if requests:
                pair.methods[req_id] = _method_of(buf[_PREFIX.size : min(end, _PREFIX.size + 64)])
            else:
                method = pair.methods.pop(req_id, "")
                if self._should_drop(method):
                    del buf[:]
                    return bytes(out), True
            out += buf[:end]
            del buf[:end]
        return bytes(out), False

    def _should_drop(self, method: str) -> bool:
        with self._lock:
            left = self._drop.get(method, 0)
            if left <= 0:
                return False
            if left == 1:
                del self._drop[method]
            else:
                self._drop[method] = left - 1
            self.dropped[method] = self.dropped.get(method, 0) + 1
            return True

    def _send(self, pair: _Pair, dst: _Side, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 10
        while view:
            try:
                n = dst.sock.send(view)
            except (BlockingIOError, InterruptedError):
                if time.monotonic() > deadline:
                    self._close_pair(pair, reset=True)
                    return
                time.sleep(0.0005)  # a test tool: a short spin on a full buffer is fine
                continue
            except OSError:
                self._close_pair(pair, reset=False)
                return
            view = view[n:]

    def _close_pair(self, pair: _Pair, *, reset: bool) -> None:
        if pair.closed:
            return
        pair.closed = True
        for side in (pair.client, pair.master):
            try:
                self._sel.unregister(side.sock)
            except (KeyError, ValueError):
                pass
            if reset:
                self._rst(side.sock)
            else:
                side.sock.close()

    @staticmethod
    def _rst(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
        sock.close()
