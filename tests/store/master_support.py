"""Raw master RPC connections for tests that send what no honest client would.

:class:`RawConn` speaks the master's framing (``u32 length | u8 kind | u32 id |
JSON``) over a plain socket and encodes JSON with ``ensure_ascii=True``, so
that strings with lone surrogates, integers where strings belong and hand-made
bodies reach the master exactly as written.  :class:`Pinger` measures another
client's round trips while something heavy runs.  Only the stdlib and the wire
format are used, so these tests run unchanged against older masters.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from typing import Any

from pymooncake.wire._master_reply_msgs import BatchPutEndReply, BatchPutStartReply

PREFIX = struct.Struct("<IBI")


def frame(req_id: int, body: bytes, kind: int = 0) -> bytes:
    return PREFIX.pack(len(body) + 5, kind, req_id) + body


def body(method: str, params: Any) -> bytes:
    """A request body; surrogates become ``\\udxxx`` escapes (valid JSON text)."""
    return json.dumps([method, params], ensure_ascii=True).encode()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class RawConn:
    """One connection to the master, requests answered in order."""

    def __init__(self, address: str, *, timeout_s: float = 10.0, token: str = "") -> None:
        self.sock = socket.create_connection(_split(address), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._ids = 0
        if token:
            from pymooncake._authio import ClusterSecurity, client_handshake

            key = ClusterSecurity(token).key
            assert key is not None
            client_handshake(
                self.sock, key, b"master-rpc", timeout_s=timeout_s, port="master", peer=address
            )

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, params: Any) -> tuple[int, Any]:
        """Send one request, return the reply's (code, value).

        Raises:
            ConnectionError: the master closed the connection instead of answering.
        """
        self._ids += 1
        self.send(frame(self._ids, body(method, params)))
        reply_id, code, value = self.reply()
        assert reply_id == self._ids
        return code, value

    def reply(self) -> tuple[int, int, Any]:
        req_id, raw = self.reply_body()
        code, value = json.loads(raw)
        return req_id, code, value

    def reply_body(self) -> tuple[int, bytes]:
        """The next reply's id and undecoded JSON body (decoding a big reply holds
        this process's GIL, which a master running in a thread here shares)."""
        while True:
            if len(self._buf) >= PREFIX.size:
                length, kind, req_id = PREFIX.unpack_from(self._buf, 0)
                if len(self._buf) >= 4 + length:
                    raw = bytes(self._buf[PREFIX.size : 4 + length])
                    del self._buf[: 4 + length]
                    assert kind == 1
                    return req_id, raw
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionResetError("the master closed the connection")
            self._buf += data

    def closed_by_peer(self, timeout_s: float) -> bool:
        """Whether the master closes this connection within ``timeout_s`` (data it
        sends meanwhile is kept)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return False
            except OSError:
                return True
            if not data:
                return True
            self._buf += data
        return False


def populate(address: str, n: int, *, prefix: str = "k", batch: int = 10_000) -> str:
    """Mount a segment (a fake address range: nothing is ever transferred) and
    commit ``n`` one-byte objects ``{prefix}{i:07d}``; returns the client id."""
    client = f"populate-{prefix}"
    with RawConn(address, timeout_s=60) as c:
        segment = {"id": f"seg-{prefix}", "name": f"fake-{prefix}:1", "base": 1 << 40}
        segment["size"] = 1 << 34
        code, value = c.request("MountSegment", {"client_id": client, "segment": segment})
        assert code == 0, value
        for start in range(0, n, batch):
            keys = [f"{prefix}{i:07d}" for i in range(start, min(n, start + batch))]
            code, value = c.request(
                "BatchPutStart", {"client_id": client, "keys": keys, "sizes": [1] * len(keys)}
            )
            # (a columnar reply, see wire/_master_replies.py)
            assert code == 0, value
            assert not any(BatchPutStartReply.decode(value).columns.code), value["msg"][:3]
            code, value = c.request("BatchPutEnd", {"client_id": client, "keys": keys})
            assert code == 0 and not any(BatchPutEndReply.decode(value).codes), value
    return client


class Pinger(threading.Thread):
    """Another client: ExistKey round trips back to back on its own connection,
    recording each latency (seconds) until :meth:`stop`."""

    def __init__(self, address: str, key: str = "no-such-key") -> None:
        super().__init__(name="pinger", daemon=True)
        self.conn = RawConn(address)
        self.key = key
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                t = time.perf_counter()
                code, _ = self.conn.request("ExistKey", {"key": self.key})
                self.latencies.append(time.perf_counter() - t)
                assert code == 0
                time.sleep(0.001)
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> list[float]:
        self._stop_event.set()
        self.join(30)
        self.conn.close()
        if self.errors:
            raise self.errors[0]
        return self.latencies

    def __enter__(self) -> Pinger:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.is_alive() or not self._stop_event.is_set():
            self._stop_event.set()
            self.join(30)
            self.conn.close()
