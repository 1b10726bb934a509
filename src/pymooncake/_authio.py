"""Cluster authentication and TLS around sockets, streams and HTTP (the I/O side
of :mod:`pymooncake.wire._auth`).

* :class:`ClusterSecurity` -- the token and TLS files (frozen config;
  :meth:`ClusterSecurity.from_env` is the only reader of
  ``PYMOONCAKE_CLUSTER_TOKEN`` / ``PYMOONCAKE_TLS_CERT`` / ``PYMOONCAKE_TLS_KEY`` /
  ``PYMOONCAKE_TLS_CA``) and the :mod:`ssl` contexts made from them.
* :func:`client_handshake` / :func:`server_handshake` (blocking sockets) and
  :func:`client_handshake_async` / :func:`server_handshake_async` (asyncio
  streams) run the stream handshake under a deadline and raise
  :class:`~pymooncake.errors.AuthenticationError` with a message naming the
  port, the peer and the fix.  They read at most the bytes the handshake
  needs, so a request pipelined behind it stays in the socket.
* :class:`HttpAuth` -- what an :class:`~pymooncake._httpd.HttpServer` applies to
  each request (verify, refuse with 401, sign the response);
  :class:`HttpClientAuth` -- what an HTTP client adds and checks;
  :func:`http_request` -- one signed request (scripts, tests, operators).
* :func:`warn_open` -- the one start-up warning of a process running without a token.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import logging
import os
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from ._logging import RepeatLimiter
from .errors import AuthenticationError, ConfigError
from .wire._auth import (
    HTTP_AUTH_SCHEME,
    HTTP_SIGNATURE_HEADER,
    AuthFailure,
    ClientHandshake,
    ClusterKey,
    FailureKind,
    HttpAuthError,
    ReplayCache,
    ServerHandshake,
    SignedRequest,
    sign_request,
    sign_response,
    verify_request,
    verify_response,
)
from .wire._http import HttpRequest, HttpResponse

__all__ = [
    "TOKEN_ENV",
    "ClusterSecurity",
    "HttpAuth",
    "HttpClientAuth",
    "client_handshake",
    "client_handshake_async",
    "describe_failure",
    "http_request",
    "secure_client",
    "server_handshake",
    "server_handshake_async",
    "warn_open",
]

log = logging.getLogger("pymooncake.auth")

TOKEN_ENV: Final = "PYMOONCAKE_CLUSTER_TOKEN"
TLS_CERT_ENV: Final = "PYMOONCAKE_TLS_CERT"
TLS_KEY_ENV: Final = "PYMOONCAKE_TLS_KEY"
TLS_CA_ENV: Final = "PYMOONCAKE_TLS_CA"

_FIX: Final = (
    f"set the same {TOKEN_ENV} in every process of the cluster (engines, store clients, "
    "master, metadata server) or in none of them"
)


# --------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _key_for(token: str) -> ClusterKey:
    return ClusterKey(token)


@dataclass(frozen=True)
class ClusterSecurity:
    """The cluster token and optional TLS files of one process.

    Attributes:
        token: the shared secret; empty means authentication off (open ports).
        tls_cert_file / tls_key_file: this process's certificate and key (PEM).
        tls_ca_file: the CA that signed every process's certificate.  TLS is on
            when all three are set; then servers require client certificates
            from that CA (mutual TLS) and clients verify servers against it.
            Host names are not checked (peers are addressed by IP inside the
            cluster); the CA is the cluster's own.

    Raises:
        ConfigError: a token that is not valid UTF-8, or only some TLS files.
    """

    token: str = field(default="", repr=False)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""

    def __post_init__(self) -> None:
        if self.token:
            try:
                _key_for(self.token)
            except ValueError as exc:
                raise ConfigError(f"{TOKEN_ENV}: {exc}") from None
        files = {
            TLS_CERT_ENV: self.tls_cert_file,
            TLS_KEY_ENV: self.tls_key_file,
            TLS_CA_ENV: self.tls_ca_file,
        }
        given = [k for k, v in files.items() if v]
        if given and len(given) != len(files):
            missing = [k for k, v in files.items() if not v]
            raise ConfigError(
                f"TLS is half configured: {', '.join(given)} set but {', '.join(missing)} "
                "missing; TLS needs this process's certificate, its key and the cluster CA"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClusterSecurity:
        """Read ``PYMOONCAKE_CLUSTER_TOKEN`` and ``PYMOONCAKE_TLS_*``.

        Raises:
            ConfigError: as the constructor.
        """
        env = os.environ if env is None else env
        return cls(
            token=env.get(TOKEN_ENV, ""),
            tls_cert_file=env.get(TLS_CERT_ENV, "").strip(),
            tls_key_file=env.get(TLS_KEY_ENV, "").strip(),
            tls_ca_file=env.get(TLS_CA_ENV, "").strip(),
        )

    @property
    def key(self) -> ClusterKey | None:
        """The HMAC key, or None without a token."""
        return _key_for(self.token) if self.token else None

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """A server context (client certificates required), or None without TLS.

        Raises:
            ConfigError: a file cannot be read or is not a certificate/key.
        """
        if not self.tls:
            return None
        return _ssl_context(True, self.tls_cert_file, self.tls_key_file, self.tls_ca_file)

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """A client context (server verified against the CA), or None without TLS."""
        if not self.tls:
            return None
        return _ssl_context(False, self.tls_cert_file, self.tls_key_file, self.tls_ca_file)


_ssl_lock = threading.Lock()
_ssl_cache: dict[tuple[bool, str, str, str], ssl.SSLContext] = {}


def _ssl_context(server: bool, cert: str, key: str, ca: str) -> ssl.SSLContext:
    with _ssl_lock:
        cached = _ssl_cache.get((server, cert, key, ca))
        if cached is not None:
            return cached
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(cert, key)
            ctx.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load TLS files ({TLS_CERT_ENV}={cert}, {TLS_KEY_ENV}={key}, "
                f"{TLS_CA_ENV}={ca}): {exc}"
            ) from exc
        ctx.check_hostname = False  # peers are addressed by IP; the CA is the cluster's own
        ctx.verify_mode = ssl.CERT_REQUIRED
        _ssl_cache[(server, cert, key, ca)] = ctx
        return ctx


_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_open(what: str) -> None:
    """Log once per process and port kind that ``what`` accepts anyone."""
    with _warned_lock:
        if what in _warned:
            return
        _warned.add(what)
    log.warning(
        "%s: no cluster token is set, so this port is open to anyone who can reach it (read and "
        "write registered memory, publish or delete descriptors, list keys). Set %s to the same "
        "secret in every process to require authentication (see docs/security.md); leave it "
        "unset only on a trusted network or when reference engines must connect",
        what,
        TOKEN_ENV,
    )


def warn_weak(key: ClusterKey | None, what: str) -> None:
    if key is not None and key.weak:
        with _warned_lock:
            if "weak" in _warned:
                return
            _warned.add("weak")
        log.warning(
            "%s: the cluster token is shorter than 16 bytes and can be guessed; use e.g. "
            "`openssl rand -hex 32`",
            what,
        )


# --------------------------------------------------------------------------------
# stream handshakes
# --------------------------------------------------------------------------------


def describe_failure(failure: AuthFailure, *, port: str, peer: str) -> str:
    """An operator message: which port, which peer, what happened, how to fix it."""
    kind = failure.kind
    if kind is FailureKind.UNAUTHENTICATED:
        fix = f"if that peer belongs to this cluster, set {TOKEN_ENV} there too ({_FIX})"
    elif kind is FailureKind.PEER_HAS_NO_TOKEN:
        fix = f"set {TOKEN_ENV} on that peer too ({_FIX})"
    elif kind is FailureKind.NOT_AUTH_PEER or kind is FailureKind.TRUNCATED:
        fix = (
            f"reference engines cannot authenticate: {_FIX} (keep it unset for a mixed "
            "cluster with reference engines)"
        )
    elif kind is FailureKind.VERSION:
        fix = "run the same pymooncake version on both sides"
    else:
        fix = _FIX
    return f"{port}: authentication with {peer} failed: {failure.message}. Fix: {fix}"


def _auth_error(failure: AuthFailure, port: str, peer: str) -> AuthenticationError:
    err = AuthenticationError(describe_failure(failure, port=port, peer=peer))
    err.failure = failure
    return err


def _timeout_error(port: str, peer: str, timeout_s: float) -> AuthenticationError:
    failure = AuthFailure(
        FailureKind.TRUNCATED,
        f"the authentication handshake did not complete within {timeout_s:g} s",
    )
    return _auth_error(failure, port, peer)


def _run_blocking(
    hs: ClientHandshake | ServerHandshake,
    sock: socket.socket,
    timeout_s: float,
    port: str,
    peer: str,
    first_request: bytes = b"",
) -> None:
    deadline = time.monotonic() + timeout_s
    old = sock.gettimeout()
    try:
        while True:
            out = hs.bytes_to_send()
            if first_request and isinstance(hs, ClientHandshake) and hs.proof_sent:
                out += first_request  # pipelined behind PROOF: saves a round trip
                first_request = b""
            if out:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                try:
                    sock.sendall(out)
                except OSError:
                    if not hs.finished:
                        raise
            if hs.finished:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            data = sock.recv(hs.want)
            if data:
                hs.feed(data)
            else:
                hs.feed_eof()
    except TimeoutError:
        raise _timeout_error(port, peer, timeout_s) from None
    except (ConnectionResetError, BrokenPipeError):
        hs.feed_eof()
    finally:
        try:
            sock.settimeout(old)
        except OSError:
            pass
    if hs.failed is not None:
        raise _auth_error(hs.failed, port, peer)


def client_handshake(
    sock: socket.socket,
    key: ClusterKey,
    context: bytes,
    *,
    timeout_s: float,
    port: str,
    peer: str,
    first_request: bytes = b"",
) -> None:
    """Authenticate a connected blocking socket as the client.

    Args:
        context: the port kind (``b"te-rpc"``, ``b"te-data"``, ``b"master-rpc"``).
        port: names the port for messages (``"RPC port of segment 'x'"``).
        peer: the peer's address for messages.
        first_request: bytes sent right behind PROOF, in the same segment (one
            round trip less); the server reads them only once the proof checks out.
            On return the RESULT has been read; the reply follows.

    Raises:
        AuthenticationError: refused, different token, the peer has no token or
            does not authenticate, or no answer within ``timeout_s``; ``.failure``
            holds the :class:`AuthFailure`.
        OSError: the connection failed otherwise.
    """
    _run_blocking(ClientHandshake(key, context), sock, timeout_s, port, peer, first_request)


def secure_client(
    sock: socket.socket,
    *,
    ssl_context: ssl.SSLContext | None,
    key: ClusterKey | None,
    context: bytes,
    timeout_s: float,
    port: str,
    peer: str,
    server_hostname: str | None = None,
    first_request: bytes = b"",
) -> socket.socket:
    """TLS (with ``ssl_context``) and then the cluster-token handshake (with
    ``key``) on a connected client socket: what every pymooncake client does
    before its first request.  Returns the socket to use from now on (the TLS one
    with TLS); on any failure ``sock`` is closed.

    Args:
        context, port, peer, first_request: as :func:`client_handshake`.
        server_hostname: the name TLS checks the peer's certificate against.

    Raises:
        AuthenticationError: TLS or the handshake failed (the message names the fix).
        OSError: the connection failed otherwise.
    """
    try:
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError):
                raise  # the connection ended (a peer restarting): a connection error
            except ssl.SSLError as exc:  # certificates, protocol: configuration
                raise AuthenticationError(
                    f"TLS with the {port} at {peer} failed: {exc}; both sides need "
                    "certificates from the same cluster CA (PYMOONCAKE_TLS_CERT/_KEY/_CA)"
                ) from exc
        if key is not None:
            client_handshake(
                sock,
                key,
                context,
                timeout_s=timeout_s,
                port=port,
                peer=peer,
                first_request=first_request,
            )
    except BaseException:
        sock.close()
        raise
    return sock


def server_handshake(
    sock: socket.socket,
    key: ClusterKey,
    context: bytes,
    *,
    timeout_s: float,
    port: str,
    peer: str,
) -> None:
    """Authenticate an accepted blocking socket as the server (raises as
    :func:`client_handshake`); on failure the refusal was sent, the caller closes."""
    _run_blocking(ServerHandshake(key, context), sock, timeout_s, port, peer)


async def _run_async(
    hs: ClientHandshake | ServerHandshake,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    timeout_s: float,
    port: str,
    peer: str,
) -> None:
    async def run() -> None:
        while True:
            out = hs.bytes_to_send()
            if out:
                writer.write(out)
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    if not hs.finished:
                        raise
            if hs.finished:
                return
            try:
                data = await reader.read(hs.want)
            except (ConnectionError, OSError):
                data = b""
            if data:
                hs.feed(data)
            else:
                hs.feed_eof()

    try:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(timeout_s):  # no extra task, unlike wait_for
                await run()
        else:  # pragma: no cover - Python 3.10
            await asyncio.wait_for(run(), timeout_s)
    except (TimeoutError, asyncio.TimeoutError):
        raise _timeout_error(port, peer, timeout_s) from None
    except (ConnectionError, OSError):
        hs.feed_eof()
    if hs.failed is not None:
        raise _auth_error(hs.failed, port, peer)


async def client_handshake_async(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: ClusterKey,
    context: bytes,
    *,
    timeout_s: float,
    port: str,
    peer: str,
) -> None:
    """:func:`client_handshake` over asyncio streams."""
    await _run_async(ClientHandshake(key, context), reader, writer, timeout_s, port, peer)


async def server_handshake_async(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: ClusterKey,
    context: bytes,
    *,
    timeout_s: float,
    port: str,
    peer: str,
) -> None:
    """:func:`server_handshake` over asyncio streams."""
    await _run_async(ServerHandshake(key, context), reader, writer, timeout_s, port, peer)


# --------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------


class HttpAuth:
    """Request authentication for an HTTP server.

    Args:
        key: the cluster key; None serves everyone (the open default) and only
            logs clients that present credentials nobody checks.
        context: the service kind (``b"http-metadata"``, ``b"master-admin"``).
        open_paths: paths served without the token (``/metrics``, ``/health``).
        name: the server, for messages.
        clock: Unix time (injected by tests).
    """

    def __init__(
        self,
        key: ClusterKey | None,
        context: bytes,
        *,
        open_paths: Iterable[str] = (),
        name: str = "HTTP server",
        clock: Callable[[], float] = time.time,
        replay: ReplayCache | None = None,
    ) -> None:
        self.key = key
        self.context = context
        self.open_paths = frozenset(open_paths)
        self._name = name
        self._clock = clock
        self._replay = replay or ReplayCache()
        self._lock = threading.Lock()
        self._log = RepeatLimiter(log)
        self.refused = 0

    def check(self, request: HttpRequest, peer: object) -> HttpResponse | str | None:
        """Decide whether ``request`` may be served.

        Returns:
            An :class:`HttpResponse` (401) to send instead of serving it, the
            request's nonce (serve it, then :meth:`sign` the response), or None
            (serve it unsigned: an open path, or no token configured).
        """
        authorization = request.headers.get("authorization")
        if self.key is None:
            if authorization and authorization.startswith(HTTP_AUTH_SCHEME):
                self._log(
                    f"notoken:{_host_of(peer)}",
                    logging.ERROR,
                    "%s: client %s sent cluster-token credentials but this server has no token: "
                    "its requests are refused (serving them would apply writes the client then "
                    "cannot trust). Fix: %s",
                    self._name,
                    peer,
                    _FIX,
                )
                if request.path in self.open_paths:
                    return None
                return HttpResponse(
                    401,
                    (
                        f"{self._name}: this server has no cluster token configured but the "
                        f"request is signed with one. Fix: {_FIX}"
                    ).encode(),
                    "text/plain",
                )
            return None
        if request.path in self.open_paths and not authorization:
            return None
        try:
            with self._lock:  # the replay cache is shared by every connection
                return verify_request(
                    self.key,
                    self.context,
                    request.method,
                    request.target,
                    authorization,
                    request.body,
                    now=self._clock(),
                    replay=self._replay,
                )
        except HttpAuthError as exc:
            self.refused += 1
            self._log(
                f"refused:{_host_of(peer)}:{exc.reason}",
                logging.WARNING,
                "%s: refused %s %s from %s: %s",
                self._name,
                request.method,
                request.path[:100],
                peer,
                exc,
            )
            return HttpResponse(
                exc.status,
                f"{self._name}: {exc}\n".encode(),
                "text/plain",
                headers=(("WWW-Authenticate", HTTP_AUTH_SCHEME),),
            )

    def sign(self, nonce: str, response: HttpResponse, *, include_body: bool) -> HttpResponse:
        """``response`` with the server's signature header."""
        assert self.key is not None
        body = response.body if include_body else b""
        sig = sign_response(self.key, self.context, nonce, response.status, body)
        return HttpResponse(
            response.status,
            response.body,
            response.content_type,
            headers=(*response.headers, (HTTP_SIGNATURE_HEADER, sig)),
        )


def _host_of(peer: object) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


class HttpClientAuth:
    """Signs requests and verifies responses for an HTTP client.

    Args:
        key: the cluster key.
        context: the service kind the server uses.
        clock: Unix time.
    """

    def __init__(
        self, key: ClusterKey, context: bytes, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.key = key
        self.context = context
        self._clock = clock

    def sign(self, method: str, target: str, body: bytes = b"") -> SignedRequest:
        return sign_request(self.key, self.context, method, target, body, now=self._clock())

    def verify(self, signed: SignedRequest, status: int, body: bytes, header: str | None) -> None:
        """Raises HttpAuthError (see :func:`verify_response`)."""
        verify_response(self.key, self.context, signed.nonce, status, body, header)


def http_request(
    method: str,
    url: str,
    *,
    security: ClusterSecurity | None = None,
    context: bytes = b"http-metadata",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP request, signed and verified when ``security`` has a token.

    Returns:
        (status, body).

    Raises:
        AuthenticationError: the response is unsigned or wrongly signed.
        OSError / http.client.HTTPException: the request failed.
    """
    parts = urllib.parse.urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    sec = security or ClusterSecurity()
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port or 443, timeout=timeout_s,
            context=sec.client_ssl_context(),
        )  # fmt: skip
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout_s)
    hdrs = dict(headers or {})
    key = sec.key
    signer = HttpClientAuth(key, context) if key is not None else None
    signed = None
    if signer is not None:
        signed = signer.sign(method, target, body or b"")
        hdrs["Authorization"] = signed.authorization
    try:
        conn.request(method, target, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        if signer is not None and signed is not None:
            if resp.status == 401 and resp.getheader(HTTP_SIGNATURE_HEADER) is None:
                text = data[:300].decode("utf-8", "replace").strip()
                raise AuthenticationError(f"HTTP server {url} refused the request: {text}")
            try:
                signer.verify(
                    signed,
                    resp.status,
                    data if method != "HEAD" else b"",
                    resp.getheader(HTTP_SIGNATURE_HEADER),
                )
            except HttpAuthError as exc:
                raise AuthenticationError(f"HTTP server {url}: {exc}") from exc
        return resp.status, data
    finally:
        conn.close()
