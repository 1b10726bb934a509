"""Blocking, thread-safe RPC client of a real client's dummy-client port.

Each call checks a connection out of a small pool, sends one request frame and
reads the reply in the calling thread (one round trip).  Calls are *not*
retried: when the connection breaks while a call is out, the real client may
or may not have acted, so the call fails with :class:`RpcFailed` saying so,
and the dummy's ping thread takes care of reconnecting.  Idle pooled
connections are checked before reuse (a peek), so a real client that
restarted while nothing was in flight costs no failed call.
"""

from __future__ import annotations

import itertools
import select
import socket
import threading
from typing import Any

from .._authio import ClusterSecurity, secure_client
from .._net import connect_tcp, set_io_timeout, split_host_port
from ..errors import (
    AuthenticationError,
    InvalidParams,
    MalformedMessage,
    MooncakeError,
    RpcFailed,
    RpcTimeout,
    store_error,
)
from ..wire._dummy import (
    DUMMY_AUTH_CONTEXT,
    DummyFrameDecoder,
    DummyMethod,
    DummyReply,
    DummyRequest,
    encode_dummy_request,
)

__all__ = ["DummyRpc"]


class _Conn:
    __slots__ = ("decoder", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = DummyFrameDecoder()


def _alive(sock: socket.socket) -> bool:
    """An idle connection the peer has not closed: nothing may arrive on an idle
    connection, so a readable one was closed (or is broken); works for TLS too."""
    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


class DummyRpc:
    """Calls to the real client serving dummies at ``address`` (``host:port``).

    Args:
        timeout_s: how long one call may take (MC_RPC_TIMEOUT_MS).
        connect_timeout_s: per connection attempt.
        security: with a cluster token every connection authenticates first.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        max_idle: int = 8,
        security: ClusterSecurity | None = None,
    ) -> None:
        try:
            host, port = split_host_port(address)
        except MooncakeError as exc:
            raise InvalidParams(f"real client address {address!r}: {exc}") from exc
        if port is None:
            raise InvalidParams(
                f"real client address {address!r} has no port: give host:port, the "
                "mooncake_client's --port (reference default 50052)"
            )
        self.address = address
        self.host, self.port = host, port
        self._timeout = timeout_s
        self._connect_timeout = connect_timeout_s
        self._max_idle = max_idle
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        security = security or ClusterSecurity()
        self._key = security.key
        self._ssl = security.client_ssl_context() if security.tls else None

    def _connect(self) -> _Conn:
        try:
            sock = secure_client(
                connect_tcp(
                    self.host, self.port, timeout_s=self._connect_timeout, what="real client"
                ),
                ssl_context=self._ssl,
                key=self._key,
                context=DUMMY_AUTH_CONTEXT,
                timeout_s=self._connect_timeout,
                port="dummy-client RPC port of mooncake_client",
                peer=self.address,
                server_hostname=self.host,
            )
        except AuthenticationError:
            raise
        except (MooncakeError, OSError) as exc:
            raise RpcFailed(
                f"cannot reach the real client (mooncake_client) at {self.address}: {exc}. "
                f"Start mooncake_client --port={self.port} on this host, or pass setup_dummy "
                "the host:port it serves dummy clients on"
            ) from exc
        set_io_timeout(sock, self._timeout)
        return _Conn(sock)

    def _checkout(self) -> _Conn:
        while True:
            with self._lock:
                if self._closed:
                    raise RpcFailed(f"the dummy client of {self.address} is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if _alive(conn.sock):
                return conn
            conn.sock.close()  # the real client closed it (restart): try the next one

    def _checkin(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.sock.close()

    def drop_idle(self) -> None:
        """Close the pooled connections (after the real client was lost)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.sock.close()

    def call(self, method: DummyMethod, params: dict[str, Any], *, what: str = "") -> Any:
        """One request; returns the reply value.

        Raises:
            StoreError subclasses: the real client answered with an error code.
            RpcFailed: it cannot be reached, or the connection broke mid-call.
            RpcTimeout: no answer within the timeout.
        """
        what = what or method.value
        conn = self._checkout()
        req_id = next(self._ids)
        try:
            conn.sock.sendall(encode_dummy_request(req_id, method, params))
            reply = self._read(conn)
        except (BlockingIOError, TimeoutError) as exc:
            conn.sock.close()
            raise RpcTimeout(
                f"the real client at {self.address} did not answer {what} within "
                f"{self._timeout:g} s (MC_RPC_TIMEOUT_MS); it is overloaded or hung"
            ) from exc
        except (OSError, MalformedMessage) as exc:
            conn.sock.close()
            self.drop_idle()
            raise RpcFailed(
                f"the connection to the real client at {self.address} broke during {what} "
                f"({exc}): it restarted or crashed, and the call may or may not have taken "
                "effect; the dummy client reconnects and registers its memory again by itself"
            ) from exc
        if reply.id != req_id:
            conn.sock.close()
            raise RpcFailed(f"reply {reply.id} does not match request {req_id} ({what})")
        self._checkin(conn)
        if reply.code != 0:
            raise store_error(reply.code, str(reply.value))
        return reply.value

    def _read(self, conn: _Conn) -> DummyReply:
        while True:
            frame = conn.decoder.next_frame()
            if isinstance(frame, DummyReply):
                return frame
            if isinstance(frame, DummyRequest):
                raise MalformedMessage("the real client sent a request frame")
            data = conn.sock.recv(1 << 16)
            if not data:
                raise ConnectionResetError("the real client closed the connection")
            conn.decoder.feed(data)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.sock.close()
