"""The RPC/handshake port: an asyncio server and a blocking client.

Server: many peers at once (the reference serves them one by one), at most
``max_connections`` (beyond: closed at once, one log line, counted).  Each
connection gets ``timeout_s`` to authenticate (with a cluster token) and send
one frame, receives one reply of the same type, then the write side is shut
down (as the reference does) and the connection closed.  A frame's length is
checked, and reserved against ``max_buffered_bytes`` (all connections
together), before its payload is read.  Oversized, malformed or unknown frames
are logged (counted) and the connection closed; the server keeps running.

Authentication (``key``): the peer must complete the handshake of
:mod:`pymooncake.wire._auth` (context ``b"te-rpc"``) before its frame is read;
a peer without the token is closed without an answer and both sides log why.
Without a key every peer is served (the reference's behaviour), and a peer
that tries to authenticate is told that this side has no token.  TLS
(``ssl``) wraps the connection before anything else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final

from .._authio import secure_client, server_handshake_async
from .._logging import RepeatLimiter
from .._loop import raw_transport, release_transport
from .._net import connect_tcp, join_host_port
from ..errors import (
    AuthenticationError,
    MalformedMessage,
    MooncakeError,
    PeerSocketError,
    TransferTimeout,
)
from ..wire import (
    EMPTY_CONNECTION_REPLY,
    LENGTH,
    NOTIFY_ACK,
    PROBE_REPLY,
    Frame,
    FrameDecoder,
    MessageType,
    NotifyMessage,
    decode_notify,
    encode_frame_json,
    encode_notify,
)
from ..wire._auth import ClusterKey, looks_like_hello, no_token_reply

__all__ = ["AUTH_CONTEXT", "RpcServer", "rpc_call"]

log = logging.getLogger("pymooncake.rpc")

#: HMAC context of the engine RPC port
AUTH_CONTEXT: Final = b"te-rpc"
_READ_CHUNK: Final = 65536

#: on_notify's verdict: None = queued, a string = refused with this reason
NotifySink = Callable[[NotifyMessage], "str | None"]


class RpcServer:
    """Serves Metadata, Notify, Probe and Connection requests.

    Args:
        sock: a bound, listening socket (ownership passes to the server).
        descriptor: returns the local segment descriptor for Metadata requests,
            or None outside P2P mode (the reply is then JSON ``null``).
        on_notify: receives each Notify message; returns None when it was
            queued, or the reason it was refused (sent back to the peer).
        max_frame: largest accepted frame (MC_HANDSHAKE_MAX_LENGTH).
        timeout_s: time a peer has to authenticate and send its request.
        key: the cluster key (None: no authentication).
        ssl: serve TLS with this context.
        max_connections: connections served at once.
        max_buffered_bytes: request bytes buffered by all connections together.
        name: the segment, for messages.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        descriptor: Callable[[], dict[str, Any] | None],
        on_notify: NotifySink,
        max_frame: int,
        timeout_s: float,
        key: ClusterKey | None = None,
        ssl: ssl.SSLContext | None = None,
        max_connections: int = 256,
        max_buffered_bytes: int = 64 << 20,
        name: str = "",
    ) -> None:
        self._sock = sock
        self._descriptor = descriptor
        self._on_notify = on_notify
        self._max_frame = max_frame
        self._timeout = timeout_s
        self._key = key
        self._ssl = ssl
        self._max_connections = max_connections
        self._max_buffered = max_buffered_bytes
        self._buffered = 0
        self._server: asyncio.base_events.Server | None = None
        self._bad = RepeatLimiter(log)
        self._tasks: set[asyncio.Task[None]] = set()
        self.port: int = sock.getsockname()[1]
        self._what = f"RPC port {self.port}" + (f" of segment {name!r}" if name else "")
        self.requests = 0
        #: counters: connections refused at the cap, frames refused for the
        #: aggregate buffer limit, peers that failed authentication
        self.refused_connections = 0
        self.refused_busy = 0
        self.auth_failures = 0

    @property
    def connections(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle,
            sock=self._sock,
            ssl=self._ssl,
            ssl_handshake_timeout=self._timeout if self._ssl is not None else None,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def _reply(self, msg_type: MessageType, body: Any) -> Any:
        if msg_type is MessageType.METADATA:
            return self._descriptor()
        if msg_type is MessageType.NOTIFY:
            refused = self._on_notify(decode_notify(body))
            if refused is not None:
                # an empty notify_msg is the reference's rejection; "error" says why
                return {"name": "", "notify_msg": "", "error": refused}
            return encode_notify(NOTIFY_ACK)
        if msg_type is MessageType.PROBE:
            return PROBE_REPLY
        # Connection (RDMA QP handshake): a TCP-only engine answers an empty desc.
        return EMPTY_CONNECTION_REPLY

    async def _read_frame(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> Frame | None:
        """One frame, its length reserved against the aggregate limit first."""
        decoder = FrameDecoder(self._max_frame)
        reserved = 0
        first = True
        try:
            while True:
                frame = decoder.next_frame()
                if isinstance(frame, Frame):
                    return frame
                length = decoder.pending_length()
                if length is not None and not reserved:
                    need = LENGTH.size + length
                    if self._buffered + need > self._max_buffered:
                        self.refused_busy += 1
                        self._bad(
                            "rpc:busy",
                            logging.WARNING,
                            "%s: refused a %d-byte request from %s: %d bytes of requests are "
                            "being received already (limit %d)",
                            self._what,
                            length,
                            peer,
                            self._buffered,
                            self._max_buffered,
                        )
                        return None
                    self._buffered += need
                    reserved = need
                want = _READ_CHUNK if not reserved else max(1, reserved - decoder.buffered)
                data = await reader.read(want)
                if not data:
                    return None
                decoder.feed(data)
                if first and self._key is None:
                    first = False
                    if await self._refuse_hello(decoder, reader, writer, peer):
                        return None
        finally:
            self._buffered -= reserved

    async def _refuse_hello(
        self,
        decoder: FrameDecoder,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: object,
    ) -> bool:
        """Without a key: answer a peer that tries to authenticate, and say why."""
        head = decoder.trailing[:8]
        while looks_like_hello(head) is None:
            more = await reader.read(8 - len(head))
            if not more:
                return False
            decoder.feed(more)
            head = decoder.trailing[:8]
        if not looks_like_hello(head):
            return False
        self.auth_failures += 1
        self._bad(
            f"rpc:auth:{_host(peer)}",
            logging.ERROR,
            "%s: %s tries to authenticate with a cluster token, but this engine has none: its "
            "requests are refused. Fix: set the same PYMOONCAKE_CLUSTER_TOKEN in every process "
            "of the cluster (or in none)",
            self._what,
            peer,
        )
        writer.write(no_token_reply())
        await writer.drain()
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        if len(self._tasks) >= self._max_connections:
            self.refused_connections += 1
            self._bad(
                "rpc:cap",
                logging.WARNING,
                "%s: refused a connection from %s: %d requests are being served (the limit, "
                "rpc_max_connections)",
                self._what,
                peer,
                len(self._tasks),
            )
            writer.transport.abort()
            return
        self._tasks.add(task)
        try:
            await asyncio.wait_for(self._serve(reader, writer, peer), self._timeout)
        except AuthenticationError as exc:
            self.auth_failures += 1
            self._bad(f"rpc:auth:{_host(peer)}", logging.ERROR, "%s", exc)
        except MalformedMessage as exc:
            self._bad(
                f"rpc:{type(exc).__name__}",
                logging.WARNING,
                "%s: rejected a request from %s: %s",
                self._what,
                peer,
                exc,
            )
        except (TimeoutError, asyncio.TimeoutError):
            self._bad(
                "rpc:timeout",
                logging.INFO,
                "%s: %s sent no complete request within %.1f s",
                self._what,
                peer,
                self._timeout,
            )
        except (ConnectionError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            raw = raw_transport(writer.transport)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            release_transport(raw)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        if self._key is not None:
            await server_handshake_async(
                reader,
                writer,
                self._key,
                AUTH_CONTEXT,
                timeout_s=self._timeout,
                port=self._what,
                peer=str(peer),
            )
        frame = await self._read_frame(reader, writer, peer)
        if frame is None:
            return
        reply = self._reply(frame.type, frame.json())
        self.requests += 1
        writer.write(encode_frame_json(frame.type, reply))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        try:
            await asyncio.wait_for(reader.read(), 1.0)
        except (TimeoutError, asyncio.TimeoutError):
            pass


def _host(peer: object) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def rpc_call(
    host: str,
    port: int,
    msg_type: MessageType,
    body: Any,
    *,
    connect_timeout_s: float,
    timeout_s: float,
    max_frame: int,
    what: str,
    key: ClusterKey | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Any:
    """One request/reply exchange on a peer's RPC port (blocking).

    Args:
        key: authenticate with the cluster key first (the peer must have the same).
        ssl_context: speak TLS (the peer must too).

    Returns:
        The reply's JSON value.

    Raises:
        DnsError / PeerSocketError: the peer cannot be reached.
        AuthenticationError: the handshake failed (message names the fix).
        TransferTimeout: no reply within ``timeout_s``.
        MalformedMessage: the reply is not a frame of the same type with JSON.
    """
    sock = connect_tcp(host, port, timeout_s=connect_timeout_s, what=what)
    addr = join_host_port(host, port)
    try:
        request = encode_frame_json(msg_type, body)
        if ssl_context is not None:
            sock.settimeout(timeout_s)
        sock = secure_client(
            sock,
            ssl_context=ssl_context,
            key=key,
            context=AUTH_CONTEXT,
            timeout_s=min(timeout_s, 30.0),
            port=what,
            peer=addr,
            first_request=request,
        )
        sock.settimeout(timeout_s)
        if key is None:
            sock.sendall(request)
        decoder = FrameDecoder(max_frame)
        while True:
            frame = decoder.next_frame()
            if isinstance(frame, Frame):
                break
            data = sock.recv(65536)
            if not data:
                hint = (
                    ""
                    if key is not None
                    else " (if it requires a cluster token, set the same PYMOONCAKE_CLUSTER_TOKEN "
                    "here)"
                )
                raise PeerSocketError(
                    f"{what} at {addr} closed the connection without replying to "
                    f"{msg_type.name}; it is not a Mooncake RPC port or it rejected the "
                    f"request{hint}"
                )
            decoder.feed(data)
    except TimeoutError as exc:
        raise TransferTimeout(
            f"{what} at {addr} did not answer {msg_type.name} within {timeout_s:g} s"
        ) from exc
    except MooncakeError:
        raise
    except OSError as exc:
        raise PeerSocketError(f"RPC to {what} at {addr} failed: {exc}") from exc
    finally:
        sock.close()
    if frame.type != msg_type:
        raise MalformedMessage(
            f"{what} at {addr} answered {msg_type.name} with a {frame.type.name} frame"
        )
    return frame.json()
