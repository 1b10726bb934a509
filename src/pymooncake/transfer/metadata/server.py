"""The HTTP metadata server: a key-value store that engines reach over HTTP.

Protocol (the reference's ``HTTPStoragePlugin`` client, and the behaviour of its
Python and C++ servers)::

    GET    /metadata?key=K   200 + stored bytes (application/json) | 404 metadata not found
    PUT    /metadata?key=K   body stored, 200 metadata updated
    DELETE /metadata?key=K   200 metadata deleted | 404 metadata not found
    GET    /health           200 OK

The key is percent-decoded (strict UTF-8) and stripped of surrounding
whitespace; a missing or blank key is 400 ``metadata key is required`` whatever
the method, a key longer than :data:`MAX_KEY_CHARS` or holding a lone
surrogate is 400 too.  A PUT body stored under an engine key (``mooncake/...``:
descriptors and rpc_meta entries, always JSON) must be strict JSON (no
NaN/Infinity, at most 32 levels deep, no lone surrogates): otherwise 400 and
nothing is stored, so one bad writer cannot plant a value that breaks the
engines reading it.  Other keys hold any bytes, as on the reference servers.  Other
methods on ``/metadata`` get 405.  A key containing ``rpc_meta`` may be
written once: re-PUTting the same bytes is 200 ``metadata unchanged``,
different bytes 400 ``Duplicate rpc_meta key not allowed`` (two engines
claiming one segment name).  Every ``/metadata`` response is
``application/json``, as the reference Python server sends.

Conditional requests (pymooncake's extension; reference clients never send
them, so they see the protocol above unchanged)::

    PUT    /metadata?key=K   If-None-Match: *   create only if absent:
                             200 metadata created | 412 metadata exists
    DELETE /metadata?key=K   If-Match: "<etag>" delete only if unchanged:
                             200 metadata deleted | 412 metadata changed | 404

A value's ETag is :func:`etag` of its bytes; GET and successful PUTs send it,
which also tells a client that this server honours the conditions.

:meth:`MetadataServer.handle_metadata` makes the decisions without any I/O;
:meth:`MetadataServer.handle` routes an :class:`HttpRequest` to it and is the
handler given to :class:`~pymooncake._httpd.HttpServer`.

With a cluster token (``security=ClusterSecurity(token=...)`` given to
:meth:`MetadataServer.http_server` / :meth:`MetadataServer.serve`) every request
but ``/health`` needs a valid ``Mooncake-HMAC`` signature (context
``b"http-metadata"``): nobody without the token can read, forge or delete a
descriptor.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Final

from ..._authio import ClusterSecurity, HttpAuth, warn_weak
from ..._httpd import HttpLimits, HttpRequest, HttpResponse, HttpServer, ThreadedHttpServer
from ...errors import MalformedMessage
from ...wire._rpc import loads_json
from ._snapshot import MetadataSnapshot

__all__ = ["AUTH_CONTEXT", "DEFAULT_METADATA_PATH", "MAX_KEY_CHARS", "MetadataServer", "etag"]

log = logging.getLogger("pymooncake.metadata.server")

#: the path the reference servers and documentation use
DEFAULT_METADATA_PATH: Final = "/metadata"
#: the C++ reference server's health-check path
DEFAULT_HEALTH_PATH: Final = "/health"

_JSON: Final = "application/json"
#: the HMAC context of metadata requests (clients sign with the same)
AUTH_CONTEXT: Final = b"http-metadata"
#: keys the engines write (descriptors, rpc_meta): their values must be JSON
ENGINE_KEY_PREFIX: Final = "mooncake/"
#: longest key accepted; real keys are ``mooncake/<cluster>/ram/<host:port>`` (< 300)
MAX_KEY_CHARS: Final = 4096


def _reply(status: int, text: str, value: bytes | None = None) -> HttpResponse:
    headers = () if value is None else (("ETag", etag(value)),)
    return HttpResponse(status, text.encode(), _JSON, headers=headers)


def etag(value: bytes) -> str:
    """The entity tag of a stored value (a quoted digest of its bytes)."""
    return '"' + hashlib.sha256(value).hexdigest()[:40] + '"'


class MetadataServer:
    """The metadata store and its HTTP request logic.

    Thread-safe: the store is guarded by a lock, so the server may be used from
    several event loops or threads at once.

    Args:
        path: the metadata endpoint's path.
        health_path: the health-check path.
        store: the dict holding key -> bytes; pass one to share it (the
            ``mooncake`` compatibility edge exposes it as ``store``).
        snapshot: keep the entries in this file (``_snapshot.py``): loaded now
            (unless ``store`` is given), saved after every change before it is
            acknowledged.  A save that fails is logged and the change stands:
            engines publish their entries again after a restart anyway.
    """

    def __init__(
        self,
        *,
        path: str = DEFAULT_METADATA_PATH,
        health_path: str = DEFAULT_HEALTH_PATH,
        store: dict[str, bytes] | None = None,
        snapshot: MetadataSnapshot | None = None,
    ) -> None:
        for what, value in (("path", path), ("health_path", health_path)):
            if not value.startswith("/"):
                raise ValueError(f"metadata server {what} {value!r} must start with '/'")
        self._path = path
        self._health_path = health_path
        if store is None:
            store = {} if snapshot is None else snapshot.load()
        self._store: dict[str, bytes] = store
        self._snapshot = snapshot
        self._lock = threading.Lock()
        self._methods: dict[str, Callable[[str, bytes], HttpResponse]] = {
            "GET": self._get,
            "PUT": self._put,
            "DELETE": self._delete,
        }

    @property
    def path(self) -> str:
        return self._path

    @property
    def store(self) -> dict[str, bytes]:
        """The live key -> bytes dict (mutate it only while no request runs)."""
        return self._store

    # --- direct access ----------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The bytes under ``key``, or None."""
        with self._lock:
            return self._store.get(key)

    def keys(self) -> list[str]:
        """A snapshot of the stored keys."""
        with self._lock:
            return list(self._store)

    # --- request logic ------------------------------------------------------------

    def handle_metadata(
        self,
        method: str,
        key: str | None,
        body: bytes = b"",
        *,
        if_none_match: str | None = None,
        if_match: str | None = None,
    ) -> HttpResponse:
        """Decide one ``/metadata`` request.

        Args:
            method: the HTTP method.
            key: the ``key`` query parameter, percent-decoded (None if absent).
            body: the request body (used by PUT).
            if_none_match / if_match: the conditional headers, if sent.

        Returns:
            The response; never raises for bad input.
        """
        key = (key or "").strip()
        if not key:
            return _reply(400, "metadata key is required")
        problem = _key_problem(key)
        if problem is not None:
            return _reply(400, problem)
        if method == "PUT" and key.startswith(ENGINE_KEY_PREFIX):
            try:
                loads_json(body, f"value of {key[:200]!r}")
            except MalformedMessage as exc:
                log.warning("refused PUT %s: %s", key[:200], exc)
                return _reply(400, str(exc))
        action = self._methods.get(method)
        if action is None:
            return HttpResponse(
                405,
                f"Method not allowed: {method}; use GET, PUT or DELETE".encode(),
                _JSON,
                headers=(("Allow", "GET, PUT, DELETE"),),
            )
        if method == "PUT" and if_none_match is not None and if_none_match.strip() == "*":
            return self._create(key, body)
        if method == "DELETE" and if_match is not None:
            return self._delete_if(key, if_match)
        return action(key, body)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Route one HTTP request (the handler for :class:`HttpServer`)."""
        if request.path == self._path:
            return self.handle_metadata(
                request.method,
                request.query.get("key"),
                request.body,
                if_none_match=request.header("if-none-match"),
                if_match=request.header("if-match"),
            )
        if request.path == self._health_path:
            if request.method in ("GET", "HEAD"):
                return HttpResponse.of_text(200, "OK")
            return HttpResponse.of_text(405, f"Method not allowed: {request.method}; use GET")
        return HttpResponse.of_text(
            404, f"not found: {request.path}; the metadata endpoint is {self._path}?key=<key>"
        )

    def _get(self, key: str, _body: bytes) -> HttpResponse:
        with self._lock:
            value = self._store.get(key)
        if value is None:
            return _reply(404, "metadata not found")
        return HttpResponse(200, value, _JSON, headers=(("ETag", etag(value)),))

    def _put(self, key: str, body: bytes) -> HttpResponse:
        with self._lock:
            old = self._store.get(key) if "rpc_meta" in key else None
            if old is None and self._store.get(key) != body:
                self._store[key] = body
                self._changed()
        if old is None:
            return _reply(200, "metadata updated", body)
        if old == body:
            return _reply(200, "metadata unchanged", body)
        log.warning(
            "refused PUT of %s: the key exists with a different value. Two engines use the same "
            "local_hostname, or an engine restarted before its old entry was removed; delete it "
            "with DELETE %s?key=%s or give each engine a unique name",
            key,
            self._path,
            key,
        )
        return _reply(400, "Duplicate rpc_meta key not allowed")

    def _create(self, key: str, body: bytes) -> HttpResponse:
        with self._lock:
            old = self._store.get(key)
            if old is None:
                self._store[key] = body
                self._changed()
        if old is None:
            return _reply(200, "metadata created", body)
        return _reply(412, "metadata exists", old)

    def _delete_if(self, key: str, if_match: str) -> HttpResponse:
        wanted = {t.strip() for t in if_match.split(",")}
        with self._lock:
            old = self._store.get(key)
            match = old is not None and ("*" in wanted or etag(old) in wanted)
            if match:
                del self._store[key]
                self._changed()
        if old is None:
            return _reply(404, "metadata not found")
        if not match:
            return _reply(412, "metadata changed", old)
        return _reply(200, "metadata deleted", old)

    def _delete(self, key: str, _body: bytes) -> HttpResponse:
        with self._lock:
            found = self._store.pop(key, None) is not None
            if found:
                self._changed()
        if not found:
            return _reply(404, "metadata not found")
        return _reply(200, "metadata deleted")

    def _changed(self) -> None:
        """After a change, with the lock held: save the snapshot (if any)."""
        if self._snapshot is None:
            return
        try:
            self._snapshot.save(self._store)
        except OSError as exc:
            log.error(
                "could not save the metadata snapshot %s: %s; the change is kept in memory "
                "(after a restart engines publish their entries again); check the disk",
                self._snapshot.path,
                exc,
            )

    # --- running ------------------------------------------------------------------

    def _auth(self, security: ClusterSecurity | None) -> HttpAuth:
        key = security.key if security is not None else None
        warn_weak(key, "HTTP metadata server")
        return HttpAuth(
            key, AUTH_CONTEXT, open_paths=(self._health_path,), name="HTTP metadata server"
        )

    def http_server(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: HttpLimits | None = None,
        security: ClusterSecurity | None = None,
    ) -> HttpServer:
        """An (unstarted) :class:`HttpServer` serving this store on the current loop.

        Args:
            security: the cluster token (required on every request but
                ``/health``) and TLS files (HTTPS); None or no token: open.

        Raises:
            ConfigError: unreadable TLS files.
        """
        sec = security or ClusterSecurity()
        return HttpServer(
            self.handle,
            host,
            port,
            limits=limits,
            name="HTTP metadata server",
            auth=self._auth(security),
            ssl=sec.server_ssl_context(),
        )

    def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: HttpLimits | None = None,
        security: ClusterSecurity | None = None,
    ) -> ThreadedHttpServer:
        """Serve this store from a background thread; returns once listening.

        ``with MetadataServer().serve() as http: url = http.url + "/metadata"``

        Raises:
            PortInUse: the port is taken ("bind address already in use: port N ...").
            PeerSocketError / DnsError: ``host`` is not usable.
            ConfigError: unreadable TLS files.
        """
        sec = security or ClusterSecurity()
        server = ThreadedHttpServer(
            self.handle,
            host,
            port,
            limits=limits,
            name="HTTP metadata server",
            auth=self._auth(security),
            ssl=sec.server_ssl_context(),
        )
        return server.start()

    def url(self, server: HttpServer | ThreadedHttpServer) -> str:
        """The metadata URL engines use for ``server``, e.g. ``http://127.0.0.1:8080/metadata``."""
        return server.url + self._path


def _key_problem(key: str) -> str | None:
    if len(key) > MAX_KEY_CHARS:
        return f"metadata key of {len(key)} characters exceeds the limit of {MAX_KEY_CHARS}"
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            return "metadata key contains a lone surrogate; keys must be valid Unicode"
    return None
