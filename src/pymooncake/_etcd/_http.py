"""Connections to etcd endpoints: one keep-alive HTTP/1.1 connection per thread
and endpoint, failures turned into messages an operator can act on, and the
proxy check.

Proxies: the standard library's ``http.client`` never reads ``http_proxy`` /
``https_proxy`` (only ``urllib`` does), so etcd traffic always goes straight to
the endpoint.  The reference's Go/gRPC client does honour those variables, and
the troubleshooting guide's fix for "Error from etcd client" is to unset them;
:func:`warn_if_proxied` logs once when they are set and would have applied, so
an operator comparing the two engines knows why they behave differently.
"""

from __future__ import annotations

import errno
import http.client
import logging
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable
from typing import Final

from .._net import is_loopback
from ._endpoints import Endpoint

__all__ = ["ConnectionPool", "NotSent", "ReplyLost", "describe_failure", "warn_if_proxied"]

log = logging.getLogger("pymooncake.etcd")

_KEEPALIVE_OPTS: Final = (
    # detect a dead peer on an idle connection (a watch stream) within ~20 s
    ("TCP_KEEPIDLE", 10),
    ("TCP_KEEPINTVL", 3),
    ("TCP_KEEPCNT", 3),
)

#: urllib's no_proxy matcher (not in the type stubs)
_bypass: Callable[[str, dict[str, str]], bool] = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]

_warned_proxies: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def warn_if_proxied(endpoints: tuple[Endpoint, ...]) -> list[str]:
    """Log (once per process and endpoint) that a proxy variable is set which a
    proxy-honouring client would use for ``endpoints``; returns the warnings."""
    proxies = urllib.request.getproxies_environment()
    warnings: list[str] = []
    for ep in endpoints:
        scheme = "https" if ep.tls else "http"
        proxy = proxies.get(scheme)
        if not proxy or _bypass(ep.host, proxies):
            continue
        key = (scheme, str(ep))
        with _warned_lock:
            if key in _warned_proxies:
                continue
            _warned_proxies.add(key)
        text = (
            f"{scheme}_proxy is set ({proxy}) and does not exempt etcd endpoint {ep}: "
            "pymooncake connects to etcd directly and ignores it, but the reference engine's "
            "etcd client sends its traffic through the proxy and then fails with 'Error from "
            "etcd client'. Unset http_proxy and https_proxy before starting Mooncake "
            f"processes, or add {ep.host} to no_proxy"
        )
        log.warning("%s", text)
        warnings.append(text)
    return warnings


class NotSent(Exception):
    """The request never reached the endpoint (connect failed): safe to retry elsewhere."""


class ReplyLost(Exception):
    """The request was sent but no complete reply came back: a write may have applied."""


def describe_failure(ep: Endpoint, exc: BaseException, timeout_s: float) -> str:
    """A short cause for one endpoint's failure, with the likely fix."""
    err: BaseException = exc
    if isinstance(exc, (NotSent, ReplyLost)) and exc.__cause__ is not None:
        err = exc.__cause__
    if isinstance(err, socket.gaierror):
        return f"{ep}: host name {ep.host!r} does not resolve ({err.strerror}); check DNS or /etc/hosts"
    if isinstance(err, ConnectionRefusedError) or (
        isinstance(err, OSError) and err.errno == errno.ECONNREFUSED
    ):
        if is_loopback(ep.host):
            return f"{ep}: connection refused: etcd is not running on this host at port {ep.port}"
        return (
            f"{ep}: connection refused: nothing listens on {ep} as seen from this host -- etcd "
            "is not running there, or it listens on 127.0.0.1 only (etcd's default); start it "
            f"with --listen-client-urls http://0.0.0.0:{ep.port} --advertise-client-urls "
            f"http://{ep.host}:{ep.port}"
        )
    if isinstance(err, (TimeoutError, socket.timeout)):
        return (
            f"{ep}: no answer within {timeout_s:g} s (a firewall dropping packets, a wrong "
            "address, or an overloaded or stopped etcd)"
        )
    if isinstance(err, OSError) and err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"{ep}: {err.strerror}: no route from this host to {ep.host}"
    if isinstance(err, ssl.SSLError):
        return f"{ep}: TLS failed ({err}); is it an https:// endpoint?"
    if isinstance(err, http.client.HTTPException):
        return (
            f"{ep}: not an HTTP answer ({type(err).__name__}: {err}); is {ep} etcd's client port?"
        )
    return f"{ep}: {type(err).__name__}: {err}"


class ConnectionPool:
    """Per-thread keep-alive connections to a set of endpoints.

    Thread-safe; :meth:`close` closes every connection any thread opened (a
    thread blocked on one then sees its socket fail).
    """

    def __init__(self, *, connect_timeout_s: float) -> None:
        self._connect_timeout = connect_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: set[http.client.HTTPConnection] = set()
        self._closed = False

    def new_connection(self, ep: Endpoint) -> http.client.HTTPConnection:
        """A fresh connected connection, not pooled (for streams); the caller closes it.

        Raises:
            NotSent: connecting failed.
        """
        conn = self._make(ep)
        try:
            self._connect(conn)
        except BaseException:
            self.discard(conn)
            raise
        return conn

    def _make(self, ep: Endpoint) -> http.client.HTTPConnection:
        if ep.tls:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                ep.host, ep.port, timeout=self._connect_timeout
            )
        else:
            conn = http.client.HTTPConnection(ep.host, ep.port, timeout=self._connect_timeout)
        with self._lock:
            if self._closed:
                raise NotSent("the etcd client is closed")
            self._all.add(conn)
        return conn

    def _connect(self, conn: http.client.HTTPConnection) -> None:
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            raise NotSent(str(exc)) from exc
        sock = conn.sock
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _KEEPALIVE_OPTS:
            opt = getattr(socket, name, None)
            if opt is not None:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)

    def discard(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        with self._lock:
            self._all.discard(conn)
        conns: dict[Endpoint, http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None
        )
        if conns:
            for ep, c in list(conns.items()):
                if c is conn:
                    del conns[ep]

    def post(self, ep: Endpoint, path: str, body: bytes, *, timeout_s: float) -> tuple[int, bytes]:
        """POST ``body`` to ``path`` on ``ep`` with this thread's connection.

        A kept-alive connection that the server closed meanwhile is replaced
        once, transparently (nothing was processed on it).

        Raises:
            NotSent: connecting failed.
            ReplyLost: sent, but the reply did not come (timeout, reset).
        """
        conns: dict[Endpoint, http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None
        )
        if conns is None:
            conns = self._local.conns = {}
        for attempt in range(2):
            conn = conns.get(ep)
            reused = conn is not None and conn.sock is not None
            if conn is None or conn.sock is None:
                if conn is not None:
                    self.discard(conn)
                conn = self._make(ep)
                conns[ep] = conn
                try:
                    self._connect(conn)
                except NotSent:
                    self.discard(conn)
                    raise
            assert conn.sock is not None
            conn.sock.settimeout(timeout_s)
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
            except (
                http.client.RemoteDisconnected,
                BrokenPipeError,
                ConnectionResetError,
            ) as exc:
                self.discard(conn)
                if reused and attempt == 0:
                    continue  # the server closed an idle connection: try a fresh one
                raise ReplyLost(str(exc)) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.discard(conn)
                raise ReplyLost(str(exc)) from exc
            if resp.will_close:
                self.discard(conn)
            return resp.status, data
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, set()
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
                except OSError:
                    pass
            conn.close()
