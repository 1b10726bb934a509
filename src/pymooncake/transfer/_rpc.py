"""The RPC/handshake port: an asyncio server and a blocking client.

Server: any number of peers at once (the reference serves them one by one);
each connection gets ``rpc_server_timeout_s`` to send one frame, receives one
reply of the same type, then the write side is shut down (as the reference
does) and the connection closed.  Oversized, malformed or unknown frames are
logged (counted) and the connection closed; the server keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from .._logging import RepeatLimiter
from .._net import connect_tcp, join_host_port
from ..errors import MalformedMessage, MooncakeError, PeerSocketError, TransferTimeout
from ..wire import (
    EMPTY_CONNECTION_REPLY,
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

__all__ = ["RpcServer", "rpc_call"]

log = logging.getLogger("pymooncake.rpc")


class RpcServer:
    """Serves Metadata, Notify, Probe and Connection requests.

    Args:
        sock: a bound, listening socket (ownership passes to the server).
        descriptor: returns the local segment descriptor for Metadata requests,
            or None outside P2P mode (the reply is then JSON ``null``).
        on_notify: receives each Notify message.
        max_frame: largest accepted frame (MC_HANDSHAKE_MAX_LENGTH).
        timeout_s: time a peer has to send its request.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        descriptor: Callable[[], dict[str, Any] | None],
        on_notify: Callable[[NotifyMessage], None],
        max_frame: int,
        timeout_s: float,
    ) -> None:
        self._sock = sock
        self._descriptor = descriptor
        self._on_notify = on_notify
        self._max_frame = max_frame
        self._timeout = timeout_s
        self._server: asyncio.base_events.Server | None = None
        self._bad = RepeatLimiter(log)
        self._tasks: set[asyncio.Task[None]] = set()
        self.port: int = sock.getsockname()[1]
        self.requests = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._sock)

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
            self._on_notify(decode_notify(body))
            return encode_notify(NOTIFY_ACK)
        if msg_type is MessageType.PROBE:
            return PROBE_REPLY
        # Connection (RDMA QP handshake): a TCP-only engine answers an empty desc.
        return EMPTY_CONNECTION_REPLY

    async def _read_frame(self, reader: asyncio.StreamReader) -> Frame | None:
        decoder = FrameDecoder(self._max_frame)
        while True:
            frame = decoder.next_frame()
            if isinstance(frame, Frame):
                return frame
            data = await reader.read(65536)
            if not data:
                return None
            decoder.feed(data)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        try:
            frame = await asyncio.wait_for(self._read_frame(reader), self._timeout)
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
        except MalformedMessage as exc:
            self._bad(
                f"rpc:{type(exc).__name__}",
                logging.WARNING,
                "RPC port: rejected a request from %s: %s",
                peer,
                exc,
            )
        except (TimeoutError, asyncio.TimeoutError):
            self._bad(
                "rpc:timeout",
                logging.INFO,
                "RPC port: %s sent no complete request within %.1f s",
                peer,
                self._timeout,
            )
        except (ConnectionError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


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
) -> Any:
    """One request/reply exchange on a peer's RPC port (blocking).

    Returns:
        The reply's JSON value.

    Raises:
        DnsError / PeerSocketError: the peer cannot be reached.
        TransferTimeout: no reply within ``timeout_s``.
        MalformedMessage: the reply is not a frame of the same type with JSON.
    """
    sock = connect_tcp(host, port, timeout_s=connect_timeout_s, what=what)
    addr = join_host_port(host, port)
    try:
        sock.settimeout(timeout_s)
        sock.sendall(encode_frame_json(msg_type, body))
        decoder = FrameDecoder(max_frame)
        while True:
            frame = decoder.next_frame()
            if isinstance(frame, Frame):
                break
            data = sock.recv(65536)
            if not data:
                raise PeerSocketError(
                    f"{what} at {addr} closed the connection without replying to "
                    f"{msg_type.name}; it is not a Mooncake RPC port or it rejected the request"
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
