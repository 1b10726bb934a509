"""A TCP relay that records the Transfer Engine's TCP session headers, so tests
can see which protocol version an initiator really speaks."""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from typing import Any, Final

#: reference SessionHeader: size u64 LE, addr u64 LE, opcode u8, 7 padding bytes
SESSION_HEADER: Final = struct.Struct("<QQB7x")
OPCODE_WRITE_BITS: Final = 1
V2_FLAG_BIT: Final = 0x80


class HeaderTap:
    """Relays TCP connections from ``127.0.0.1:<port>`` to ``upstream`` and records
    the (opcode, size) of every session header the initiator sends.

    The initiator->target stream is parsed (24-byte header, then ``size``
    payload bytes for a WRITE); the target->initiator stream is passed through.
    One thread with a selector does all the work; :meth:`close` stops it and
    closes every socket.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.headers: list[tuple[int, int]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns: list[socket.socket] = []
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="interop-header-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # per initiator socket: [peer socket, parse buffer, payload bytes to skip]
        state: dict[socket.socket, list[Any]] = {}
        try:
            while not self._stop:
                for key, _ in self._sel.select(timeout=1.0):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if key.data == "wake":
                        continue
                    if sock is self._listener:
                        client, _ = self._listener.accept()
                        server = socket.create_connection(self.upstream, timeout=5)
                        for s in (client, server):
                            s.setblocking(True)
                            s.settimeout(10)
                            self._conns.append(s)
                        state[client] = [server, bytearray(), 0]
                        self._sel.register(client, selectors.EVENT_READ, "up")
                        self._sel.register(server, selectors.EVENT_READ, client)
                        continue
                    data = sock.recv(1 << 20)
                    if key.data == "up":
                        peer = state[sock][0]
                        if data:
                            self._parse(state[sock], data)
                    else:
                        peer = key.data
                    if not data:
                        for s in (sock, peer):
                            with contextlib.suppress(KeyError, ValueError):
                                self._sel.unregister(s)
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                        continue
                    peer.sendall(data)
        except BaseException as exc:  # reported by close()
            self._error = exc

    def _parse(self, st: list[Any], data: bytes) -> None:
        buf: bytearray = st[1]
        buf += data
        pos = 0
        while True:
            if st[2]:
                take = min(st[2], len(buf) - pos)
                st[2] -= take
                pos += take
                if st[2]:
                    break
            if len(buf) - pos < SESSION_HEADER.size:
                break
            size, _addr, opcode = SESSION_HEADER.unpack_from(buf, pos)
            pos += SESSION_HEADER.size
            self.headers.append((opcode, size))
            if opcode & 0x7F == OPCODE_WRITE_BITS:
                st[2] = size
        del buf[:pos]

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=10)
        for s in (*self._conns, self._listener, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()
        if self._error is not None:
            raise AssertionError(f"header tap failed: {self._error!r}")
