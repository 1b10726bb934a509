"""HTTP metadata backend (the reference's ``HTTPStoragePlugin``).

``GET/PUT/DELETE <url>?key=<percent-encoded key>``; success only on 200;
404 on GET is "absent".  One keep-alive connection per thread.  Timeouts follow
the reference's libcurl settings (3 s total, 1.5 s connect).  Proxies from the
environment are deliberately *not* used: metadata servers live inside the
cluster, and a stray ``http_proxy`` is a classic cause of failures with the
reference (troubleshooting guide: "HTTP proxies need to be disabled").

With a cluster token every request is signed (``Authorization: Mooncake-HMAC``)
and every response's signature is checked, so neither side talks to anyone
without the token; with TLS files an ``https://`` URL verifies the server
against the cluster CA and presents this process's certificate.
:meth:`HttpMetadataStore.create` and :meth:`~HttpMetadataStore.compare_and_remove`
use conditional requests (``If-None-Match: *``, ``If-Match: <etag>``) that
pymooncake's server honours.  A server that ignores them (the reference's)
answers without an ``ETag``: the write then happened unconditionally, which
is logged once; for ``rpc_meta`` keys -- the only ones engines create -- those
servers' own duplicate rule still makes the create exclusive.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import urllib.parse

from ..._authio import ClusterSecurity, HttpClientAuth
from ...errors import AuthenticationError, MetadataError, MetadataUnreachable
from ...wire._auth import HTTP_SIGNATURE_HEADER, HttpAuthError, SignedRequest
from ._base import MetadataConflict, MetadataStore, duplicate_message
from .server import etag

#: the HMAC context of the metadata service (the server uses the same)
AUTH_CONTEXT = b"http-metadata"

__all__ = ["HttpMetadataStore"]

log = logging.getLogger("pymooncake.metadata.http")


class HttpMetadataStore(MetadataStore):
    """Client of an HTTP metadata server such as ``mooncake_http_metadata_server``.

    Args:
        url: ``http://host:port/path`` (``https://`` works too).
        timeout_s: per request.
        connect_timeout_s: for opening a connection.
        security: the cluster token (sign requests, verify responses) and TLS
            files (client certificate and CA for ``https://``).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 3.0,
        connect_timeout_s: float = 1.5,
        security: ClusterSecurity | None = None,
    ) -> None:
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
        sec = security or ClusterSecurity()
        key = sec.key
        self._signer = HttpClientAuth(key, AUTH_CONTEXT) if key is not None else None
        self._ssl = sec.client_ssl_context() if self._https else None

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._connect_timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._connect_timeout
                )
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

    def _request(
        self,
        method: str,
        key: str,
        body: bytes | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        status, data, _ = self._request_full(method, key, body, extra_headers)
        return status, data

    def _request_full(
        self,
        method: str,
        key: str,
        body: bytes | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, str | None]:
        """(status, body, ETag header or None)."""
        if self._closed:
            raise MetadataError(f"metadata client for {self.url} is closed")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        headers.update(extra_headers or {})
        target = self._target(key)
        last: BaseException | None = None
        for attempt in range(2):  # one retry if a kept-alive connection went stale
            conn = self._conn()
            signed = None
            if self._signer is not None:  # a fresh nonce per attempt
                signed = self._signer.sign(method, target, body or b"")
                headers["Authorization"] = signed.authorization
            try:
                if conn.sock is None:
                    conn.connect()
                    sock: socket.socket = conn.sock  # type: ignore[assignment]
                    sock.settimeout(self._timeout)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self._drop()
                if signed is not None and self._signer is not None:
                    self._check_signature(method, key, signed, resp, data)
                elif resp.status == 401:
                    raise AuthenticationError(
                        f"metadata server {self.url} requires the cluster token ({method} {key}: "
                        f"{data[:200].decode(errors='replace').strip()}); set the same "
                        "PYMOONCAKE_CLUSTER_TOKEN here as on the server"
                    )
                return resp.status, data, resp.getheader("ETag")
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

    def _check_signature(
        self,
        method: str,
        key: str,
        signed: SignedRequest,
        resp: http.client.HTTPResponse,
        data: bytes,
    ) -> None:
        assert self._signer is not None
        header = resp.getheader(HTTP_SIGNATURE_HEADER)
        if resp.status == 401 and header is None:
            raise AuthenticationError(
                f"metadata server {self.url} refused {method} {key}: "
                f"{data[:300].decode(errors='replace').strip()}"
            )
        try:
            self._signer.verify(signed, resp.status, data, header)
        except HttpAuthError as exc:
            raise AuthenticationError(
                f"metadata server {self.url} ({method} {key}): {exc}. Fix: set the same "
                "PYMOONCAKE_CLUSTER_TOKEN on the metadata server (mooncake_http_metadata_server, "
                "or the master that embeds it) as on this engine"
            ) from exc

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
        # the server applies the rpc_meta rule itself
        status, data = self._request("PUT", key, value)
        if status == 400 and b"Duplicate rpc_meta" in data:
            raise MetadataConflict(duplicate_message(key, self.url))
        if status != 200:
            raise MetadataError(
                f"metadata server {self.url} refused PUT {key} with HTTP {status}: "
                f"{data[:200].decode(errors='replace')}"
            )

    def _write(self, key: str, value: bytes) -> None:
        self.set(key, value)

    def _warn_unconditional(self, what: str) -> None:
        if not self._warned_unconditional:
            self._warned_unconditional = True
            log.warning(
                "metadata server %s ignored a conditional %s (no ETag in its answer): it is "
                "not pymooncake's server, so create/compare-and-remove are not atomic there",
                self.url,
                what,
            )

    _warned_unconditional = False

    def create(self, key: str, value: bytes) -> bool:
        status, data, tag = self._request_full("PUT", key, value, {"If-None-Match": "*"})
        if status == 200:
            if tag is None:
                self._warn_unconditional("PUT")
            return True
        if status == 412 or (status == 400 and b"Duplicate rpc_meta" in data):
            return False
        raise MetadataError(
            f"metadata server {self.url} refused PUT {key} with HTTP {status}: "
            f"{data[:200].decode(errors='replace')}"
        )

    def compare_and_remove(self, key: str, expected: bytes) -> bool:
        status, data, tag = self._request_full("DELETE", key, None, {"If-Match": etag(expected)})
        if status == 200:
            if tag is None:
                self._warn_unconditional("DELETE")
            return True
        if status in (404, 412):
            return False
        raise MetadataError(
            f"metadata server {self.url} answered DELETE {key} with HTTP {status}: "
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
