"""HTTP metadata backend (the reference's ``HTTPStoragePlugin``).

``GET/PUT/DELETE <url>?key=<percent-encoded key>``; success only on 200;
404 on GET is "absent".  One keep-alive connection per thread.  Timeouts follow
the reference's libcurl settings (3 s total, 1.5 s connect).  Proxies from the
environment are deliberately *not* used: metadata servers live inside the
cluster, and a stray ``http_proxy`` is a classic cause of failures with the
reference (troubleshooting guide: "HTTP proxies need to be disabled").
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.parse

from ...errors import MetadataError, MetadataUnreachable
from ._base import MetadataStore

__all__ = ["HttpMetadataStore"]


class HttpMetadataStore(MetadataStore):
    """Client of an HTTP metadata server such as ``mooncake_http_metadata_server``.

    Args:
        url: ``http://host:port/path`` (``https://`` works too).
        timeout_s: per request.
        connect_timeout_s: for opening a connection.
    """

    def __init__(self, url: str, *, timeout_s: float = 3.0, connect_timeout_s: float = 1.5) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise MetadataError(f"metadata server URL {url!r} is not http://host:port/path")
        self.url = url
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port or (443 if self._https else 80)
        self._path = parsed.path or "/"
        self._timeout = timeout_s
        self._connect_timeout = connect_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[http.client.HTTPConnection] = []
        self._closed = False

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self._connect_timeout)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def _target(self, key: str) -> str:
        return f"{self._path}?key={urllib.parse.quote(key, safe='')}"

    def _request(self, method: str, key: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self._closed:
            raise MetadataError(f"metadata client for {self.url} is closed")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        last: BaseException | None = None
        for attempt in range(2):  # one retry if a kept-alive connection went stale
            conn = self._conn()
            try:
                if conn.sock is None:
                    conn.connect()
                    sock: socket.socket = conn.sock  # type: ignore[assignment]
                    sock.settimeout(self._timeout)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                conn.request(method, self._target(key), body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self._drop()
                return resp.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop()
                last = exc
                if attempt == 0:
                    continue
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                last = exc
                break
        raise MetadataUnreachable(
            f"metadata server {self.url} is unreachable ({method} {key}: {last}). Check that it "
            "is running and listening on an address this node can reach (a server bound to "
            "127.0.0.1 is invisible to other nodes; start it with --host 0.0.0.0), that no "
            "firewall blocks the port, and verify with `curl "
            f"'{self.url}?key=x'`. pymooncake does not use http_proxy/https_proxy for metadata"
        ) from last

    def get(self, key: str) -> bytes | None:
        status, data = self._request("GET", key)
        if status == 200:
            return data
        if status == 404:
            return None
        raise MetadataError(
            f"metadata server {self.url} answered GET {key} with HTTP {status}: "
            f"{data[:200].decode(errors='replace')}"
        )

    def set(self, key: str, value: bytes) -> None:
        status, data = self._request("PUT", key, value)
        if status != 200:
            raise MetadataError(
                f"metadata server {self.url} refused PUT {key} with HTTP {status}: "
                f"{data[:200].decode(errors='replace')}"
            )

    def remove(self, key: str) -> bool:
        status, data = self._request("DELETE", key)
        if status == 200:
            return True
        if status == 404:
            return False
        raise MetadataError(
            f"metadata server {self.url} answered DELETE {key} with HTTP {status}: "
            f"{data[:200].decode(errors='replace')}"
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for c in conns:
            c.close()
