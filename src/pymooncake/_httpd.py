"""A small asyncio HTTP/1.1 server for pymooncake's own services.

The HTTP metadata server runs on it, and the store master's ``/metrics`` and
query endpoints are meant to.  Parsing and encoding live in the sans-IO
:mod:`pymooncake.wire._http`; this module only moves bytes.

* :class:`HttpServer` serves an ``async (HttpRequest) -> HttpResponse``
  handler on the running event loop.
* :class:`ThreadedHttpServer` runs an :class:`HttpServer` on its own event loop
  in a background thread, for synchronous programs and tests.

Connections are kept alive (HTTP/1.1 default) until the client closes, sends
``Connection: close``, stays idle past ``keepalive_timeout_s``, or sends a
request the parser refuses (answered with 400/411/413/431/505, then closed).
A handler that raises gets a 500 response and a log record; the server keeps
serving.  Closing the server closes the listening socket and every open
connection, cancelling handlers still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from ._net import bind_listener, join_host_port
from .errors import ClosedError
from .wire._http import (
    CONTINUE_RESPONSE,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    HttpParseError,
    HttpRequest,
    HttpResponse,
    RequestParser,
    encode_response,
    error_response,
)
from .wire._rpc import NeedData

__all__ = [
    "Handler",
    "HttpLimits",
    "HttpRequest",
    "HttpResponse",
    "HttpServer",
    "ThreadedHttpServer",
]

log = logging.getLogger("pymooncake.httpd")

Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]

_READ_CHUNK: Final = 64 << 10
#: a graceful close that the peer does not acknowledge within this time is aborted
_CLOSE_TIMEOUT_S: Final = 2.0
#: after an error response: how long, and how many bytes, to read and discard
_LINGER_S: Final = 2.0
_LINGER_MAX_BYTES: Final = 4 << 20
#: how long ThreadedHttpServer.close() waits for its thread
_JOIN_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection limits of an :class:`HttpServer`.

    Attributes:
        max_header_bytes: request line + headers; larger requests get 431.
        max_body_bytes: request body; larger ``Content-Length`` gets 413.
        keepalive_timeout_s: an idle connection is closed after this long
            (75 s is aiohttp's default, which the reference Python server uses).
    """

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    keepalive_timeout_s: float = 75.0


class HttpServer:
    """Serves ``handler`` over HTTP/1.1 on ``host:port`` in the running event loop.

    Args:
        handler: called once per request; its response is sent back.  An
            exception becomes a 500 response (logged with its traceback).
        host: address to listen on (``0.0.0.0`` for every interface).
        port: port to listen on; 0 lets the kernel choose (see :attr:`port`).
        limits: header/body size limits and the keep-alive timeout.
        name: what this server is, for log and error messages.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: HttpLimits | None = None,
        name: str = "HTTP server",
    ) -> None:
        self._handler = handler
        self._host = host
        self._requested_port = port
        self._limits = limits or HttpLimits()
        self._name = name
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The port actually bound.

        Raises:
            RuntimeError: before :meth:`start`.
        """
        if self._port is None:
            raise RuntimeError(f"{self._name} is not started; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening socket."""
        return f"http://{join_host_port(self._host, self.port)}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        """Bind and start accepting connections.

        Raises:
            PortInUse: the port is taken ("bind address already in use: port N ...").
            PeerSocketError: ``host`` is not an address of this machine.
            DnsError: ``host`` does not resolve.
            RuntimeError: already started; ClosedError: already closed.
        """
        if self._closing:
            raise ClosedError(f"{self._name} was closed; create a new server")
        if self._server is not None:
            raise RuntimeError(f"{self._name} is already started on {self.url}")
        sock = bind_listener(self._host, port=self._requested_port, what=self._name)
        try:
            self._server = await asyncio.start_server(self._on_connection, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._port = int(sock.getsockname()[1])
        log.debug("%s listening on %s", self._name, self.url)

    async def close(self) -> None:
        """Stop listening and close every open connection (idempotent).

        Handlers still running are cancelled; their clients see the connection
        close without a response.
        """
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Abort the connections first: their handlers then end on their own.
        # (Cancelling the tasks directly makes asyncio's stream callback log a
        # CancelledError traceback on Python 3.11.)
        for writer in list(self._connections.values()):
            writer.transport.abort()
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None  # called by asyncio in a task of its own
        if self._closing:
            writer.transport.abort()
            return
        self._connections[task] = writer
        peer = writer.get_extra_info("peername")
        try:
            await self._serve_connection(reader, writer, peer)
        except (ConnectionError, OSError) as exc:
            log.debug("%s: connection from %s failed: %s", self._name, peer, exc)
        finally:
            self._connections.pop(task, None)
            await self._close_writer(writer)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        limits = self._limits
        parser = RequestParser(
            max_header_bytes=limits.max_header_bytes, max_body_bytes=limits.max_body_bytes
        )
        while True:
            try:
                item = parser.next_request()
            except HttpParseError as exc:
                log.info("%s: refused request from %s: %s", self._name, peer, exc)
                await self._send(writer, error_response(exc), keep_alive=False)
                await self._linger(reader, writer)
                return
            if isinstance(item, NeedData):
                if parser.take_continue():
                    writer.write(CONTINUE_RESPONSE)
                    await writer.drain()
                try:
                    data = await asyncio.wait_for(
                        reader.read(_READ_CHUNK), limits.keepalive_timeout_s
                    )
                except asyncio.TimeoutError:
                    log.debug("%s: closing idle connection from %s", self._name, peer)
                    return
                if not data:
                    return  # EOF; a partial request is dropped with the connection
                parser.feed(data)
                continue
            response = await self._dispatch(item)
            keep_alive = item.keep_alive and not self._closing
            await self._send(
                writer, response, keep_alive=keep_alive, include_body=item.method != "HEAD"
            )
            log.debug(
                "%s: %s %s %s -> %d", self._name, peer, item.method, item.target, response.status
            )
            if not keep_alive:
                return

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard what the client still sends for a while.

        Closing a socket with unread input makes the kernel send RST, which can
        destroy the error response before the client reads it (e.g. a 413 sent
        while the client is still writing the body).
        """
        if writer.can_write_eof():
            writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _LINGER_S
        discarded = 0
        while discarded < _LINGER_MAX_BYTES:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                data = await asyncio.wait_for(reader.read(_READ_CHUNK), remaining)
            except asyncio.TimeoutError:
                return
            if not data:
                return
            discarded += len(data)

    async def _dispatch(self, request: HttpRequest) -> HttpResponse:
        try:
            return await self._handler(request)
        except Exception as exc:
            log.exception("%s: handler failed on %s %s", self._name, request.method, request.target)
            return HttpResponse.of_text(
                500, f"internal error in {self._name}: {exc!r}; see the server log\n"
            )

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        response: HttpResponse,
        *,
        keep_alive: bool,
        include_body: bool = True,
    ) -> None:
        date = email.utils.formatdate(usegmt=True)
        try:
            payload = encode_response(
                response, keep_alive=keep_alive, include_body=include_body, date=date
            )
        except ValueError as exc:
            log.error("%s: the handler returned an unusable response: %s", self._name, exc)
            fallback = HttpResponse.of_text(
                500, f"internal error in {self._name}: unusable response; see the server log\n"
            )
            payload = encode_response(
                fallback, keep_alive=keep_alive, include_body=include_body, date=date
            )
        writer.write(payload)
        await writer.drain()

    async def _close_writer(self, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
        else:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT_S)
                return
            except (asyncio.TimeoutError, ConnectionError, OSError):
                writer.transport.abort()
            except asyncio.CancelledError:
                writer.transport.abort()
                raise
        # let the transport's connection_lost run so the socket is really closed
        await asyncio.sleep(0)


class ThreadedHttpServer:
    """An :class:`HttpServer` on its own event loop in a background thread.

    Usable as a context manager (``with ThreadedHttpServer(h) as srv:``), which
    starts it if needed and closes it on exit.

    Args:
        handler, host, port, limits, name: as for :class:`HttpServer`; the
            handler runs on the server thread's event loop.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: HttpLimits | None = None,
        name: str = "HTTP server",
    ) -> None:
        self._server = HttpServer(handler, host, port, limits=limits, name=name)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        """The port actually bound.

        Raises:
            RuntimeError: before :meth:`start`.
        """
        return self._server.port

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening socket."""
        return self._server.url

    @property
    def thread(self) -> threading.Thread | None:
        """The server thread (None before :meth:`start`)."""
        return self._thread

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`close`."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self._error is None

    def start(self) -> ThreadedHttpServer:
        """Start the thread and return once the socket is listening.

        Returns:
            self, so that ``srv = ThreadedHttpServer(h).start()`` works.

        Raises:
            PortInUse: the port is taken ("bind address already in use: port N ...").
            PeerSocketError / DnsError: ``host`` is not usable.
            RuntimeError: already started; ClosedError: already closed.
        """
        with self._lock:
            if self._closed:
                raise ClosedError(f"{self._server.name} was closed; create a new server")
            if self._thread is not None:
                raise RuntimeError(f"{self._server.name} is already started")
            thread = threading.Thread(
                target=self._run, name=f"pymooncake {self._server.name}", daemon=True
            )
            self._thread = thread
            thread.start()
        self._ready.wait()
        if self._error is not None:
            thread.join()
            raise self._error
        return self

    def close(self) -> None:
        """Stop the server, close its connections and join the thread (idempotent)."""
        with self._lock:
            self._closed = True
            thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already finished
                loop.call_soon_threadsafe(stop.set)
        if thread is threading.current_thread():
            return  # called from a handler: the thread ends once the handler returns
        thread.join(_JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.error(
                "%s thread did not stop within %.0f s; a handler may be blocking its event loop",
                self._server.name,
                _JOIN_TIMEOUT_S,
            )

    def __enter__(self) -> ThreadedHttpServer:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start(), or logged
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("%s thread failed", self._server.name)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        stop = asyncio.Event()
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._stop = stop
            closed = self._closed
        if closed:
            self._error = ClosedError(f"{self._server.name} was closed while starting")
            return
        try:
            await self._server.start()
        except Exception as exc:
            self._error = exc
            return
        self._ready.set()
        try:
            await stop.wait()
        finally:
            await self._server.close()
