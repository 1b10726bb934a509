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
serving.  Closing the server closes the listening socket and every connection
it accepted -- also those accepted an instant before the close, whose handler
has not run yet -- cancelling handlers still running, and returns once their
sockets are closed.

Bounded resources (:class:`HttpLimits`): at most ``max_connections`` open
connections (beyond: 503 and close, counted in ``refused_connections``); a
request's headers must arrive within ``header_timeout_s`` of its first byte
(or of the connection's opening) and its body within ``body_timeout_s`` after
that (408 and close: slow-loris clients cannot hold a connection); request
bodies buffered by all connections together stay under ``max_buffered_bytes``
(a body that would exceed it is refused with 503 before it is read).

Authentication (:class:`~pymooncake._authio.HttpAuth`): with a cluster token
every request except the ``open_paths`` needs a valid ``Mooncake-HMAC``
signature (401 otherwise, before the handler runs), and responses carry the
server's signature.  TLS: pass an :class:`ssl.SSLContext`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from ._authio import HttpAuth, warn_open
from ._logging import RepeatLimiter
from ._loop import raw_transport, release_transport
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
    "HttpAuth",
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
#: a connection refused at the cap is aborted this long after its 503 was sent
_REFUSE_LINGER_S: Final = 0.5
#: how long ThreadedHttpServer.close() waits for its thread
_JOIN_TIMEOUT_S: Final = 10.0
#: loop turns asyncio needs to turn a socket it accepted into a connection that
#: reaches HttpServer._accept (its set-up task runs, then connection_made is
#: called on the next turn); close() gives them, plus one to spare
_SETUP_TURNS: Final = 3


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection limits of an :class:`HttpServer`.

    Attributes:
        max_header_bytes: request line + headers; larger requests get 431.
        max_body_bytes: request body; larger ``Content-Length`` gets 413.
        keepalive_timeout_s: an idle connection is closed after this long
            (75 s is aiohttp's default, which the reference Python server uses).
        max_connections: open connections; more are answered 503 and closed.
            A metadata server holds one keep-alive connection per engine thread
            that talks to it (libcurl keeps one per thread): 1024 covers ~250
            engines with 4 such threads, and stays below the common 1024-fd
            soft limit plus the server's own few.
        header_timeout_s: from a request's first byte (or the connection's
            opening) to the end of its headers; libcurl sends a request in one
            write, so 10 s only ever bites slow or hostile clients.
        body_timeout_s: from the end of the headers to the end of the body;
            60 s lets a 64 MiB body arrive at ~1 MB/s.  A response the client does
            not read for this long ends the connection too.
        max_buffered_bytes: request bodies buffered by all connections
            together; a request that would exceed it gets 503 before its body
            is read.  256 MiB = four maximal bodies, or thousands of real
            descriptors (a few KiB each) at once.
    """

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    keepalive_timeout_s: float = 75.0
    max_connections: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_buffered_bytes: int = 256 << 20


class HttpServer:
    """Serves ``handler`` over HTTP/1.1 on ``host:port`` in the running event loop.

    Args:
        handler: called once per request; its response is sent back.  An
            exception becomes a 500 response (logged with its traceback).
        host: address to listen on (``0.0.0.0`` for every interface).
        port: port to listen on; 0 lets the kernel choose (see :attr:`port`).
        limits: size, time and connection limits.
        name: what this server is, for log and error messages.
        auth: request authentication (None: everyone is served).
        ssl: serve HTTPS with this context.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: HttpLimits | None = None,
        name: str = "HTTP server",
        auth: HttpAuth | None = None,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        self._handler = handler
        self._host = host
        self._requested_port = port
        self._limits = limits or HttpLimits()
        self._name = name
        self._auth = auth
        self._ssl = ssl
        self._server: asyncio.Server | None = None
        self._listener_fd = -1
        self._port: int | None = None
        #: connections being served (accepted, not yet closing): the cap counts them
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        #: every accepted connection whose task has not ended (closing ones too)
        self._open: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False
        self._buffered = 0
        self._refusing: set[asyncio.StreamWriter] = set()
        self._log = RepeatLimiter(log)
        #: connections refused at the cap, requests refused for the buffer limit
        #: or a deadline (counters for tests and operators)
        self.refused_connections = 0
        self.refused_busy = 0
        self.timed_out = 0

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
        """``http://host:port`` (``https://`` with TLS) of the listening socket."""
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{join_host_port(self._host, self.port)}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def connections(self) -> int:
        """Open connections."""
        return len(self._connections)

    @property
    def buffered_bytes(self) -> int:
        """Request-body bytes reserved by all connections."""
        return self._buffered

    @property
    def auth(self) -> HttpAuth | None:
        return self._auth

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
            self._server = await asyncio.start_server(
                self._accept,
                sock=sock,
                ssl=self._ssl,
                ssl_handshake_timeout=self._limits.header_timeout_s if self._ssl else None,
            )
        except BaseException:
            sock.close()
            raise
        self._listener_fd = sock.fileno()
        self._port = int(sock.getsockname()[1])
        log.debug("%s listening on %s", self._name, self.url)
        if self._auth is not None and self._auth.key is None:
            warn_open(self._name)

    async def close(self) -> None:
        """Stop listening and close every connection accepted (idempotent).

        Handlers still running are cancelled; their clients see the connection
        close without a response.  Returns once the sockets are closed.
        """
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            await self._stop_accepting()
            server.close()
        # Abort the connections first: their handlers then end on their own.
        # (Cancelling the tasks directly makes asyncio's stream callback log a
        # CancelledError traceback on Python 3.11.)
        for writer in [*self._open.values(), *self._refusing]:
            writer.transport.abort()
        self._refusing.clear()
        tasks = list(self._open)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.sleep(0)  # connection_lost of the aborted transports closes their sockets
        if server is not None:
            await server.wait_closed()

    async def _stop_accepting(self) -> None:
        """Stop taking connections, and let those already taken become connections.

        asyncio accepts a socket in one loop turn and wraps it in a transport in
        a set-up task on the next; a transport made after ``Server.close()``
        fails (Python 3.11: an assertion the task swallows) and leaves the
        accepted socket open forever.  So the listener leaves the loop first,
        the set-up tasks get their turns -- their connections reach
        :meth:`_accept`, which aborts them -- and only then is the server closed.
        """
        loop = asyncio.get_running_loop()
        if self._listener_fd >= 0:
            with contextlib.suppress(NotImplementedError, ValueError, OSError):
                loop.remove_reader(self._listener_fd)
        for _ in range(_SETUP_TURNS):
            await asyncio.sleep(0)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's callback for a new connection, called as the connection is made.

        Registering it here, not in its task, lets close() reach a connection
        whose task has not run yet (a task that never runs would otherwise
        leave the socket open).
        """
        if self._closing:
            writer.transport.abort()
            return
        peer = writer.get_extra_info("peername")
        if len(self._connections) >= self._limits.max_connections:
            self.refused_connections += 1
            self._log(
                "cap",
                logging.WARNING,
                "%s: refused a connection from %s: %d connections are open (the limit; raise "
                "HttpLimits.max_connections if this many clients are legitimate)",
                self._name,
                peer,
                len(self._connections),
            )
            busy = HttpResponse.of_text(503, f"{self._name} is at its connection limit; retry\n")
            with contextlib.suppress(ConnectionError, OSError, ValueError, RuntimeError):
                writer.write(encode_response(busy, keep_alive=False))
                if writer.can_write_eof():
                    writer.write_eof()
            # closing with the request unread would reset the connection and lose the
            # 503: abort a moment later instead, without a task per refused client
            self._refusing.add(writer)
            asyncio.get_running_loop().call_later(_REFUSE_LINGER_S, self._drop_refused, writer)
            return
        task = asyncio.get_running_loop().create_task(self._on_connection(reader, writer, peer))
        self._connections[task] = writer
        self._open[task] = writer

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        task = asyncio.current_task()
        assert task is not None  # the task made by _accept
        raw = raw_transport(writer.transport)
        try:
            if self._closing:  # close() came between _accept and this task's start
                return
            await self._serve_connection(reader, writer, peer)
        except (ConnectionError, OSError) as exc:
            log.debug("%s: connection from %s failed: %s", self._name, peer, exc)
        finally:
            self._connections.pop(task, None)
            try:
                await self._close_writer(writer)
            finally:
                self._open.pop(task, None)
                release_transport(raw)

    def _drop_refused(self, writer: asyncio.StreamWriter) -> None:
        self._refusing.discard(writer)
        writer.transport.abort()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        limits = self._limits
        parser = RequestParser(
            max_header_bytes=limits.max_header_bytes, max_body_bytes=limits.max_body_bytes
        )
        loop = asyncio.get_running_loop()
        reserved = 0
        # the first request's clock starts at the opening; later ones at their first byte
        head_started: float | None = loop.time()
        body_started: float | None = None
        try:
            while True:
                try:
                    item = parser.next_request()
                except HttpParseError as exc:
                    log.info("%s: refused request from %s: %s", self._name, peer, exc)
                    await self._send(writer, error_response(exc), keep_alive=False)
                    await self._linger(reader, writer)
                    return
                if not isinstance(item, NeedData):
                    self._buffered -= reserved
                    reserved = 0
                    head_started = body_started = None
                    if not await self._answer(writer, item, peer):
                        return
                    continue
                if parser.take_continue():
                    writer.write(CONTINUE_RESPONSE)
                    await writer.drain()
                need = parser.expected_body
                if need and body_started is None:
                    body_started = loop.time()
                    if self._buffered + need > limits.max_buffered_bytes:
                        await self._refuse_busy(reader, writer, peer, need)
                        return
                    self._buffered += need
                    reserved = need
                if body_started is not None:
                    timeout = body_started + limits.body_timeout_s - loop.time()
                elif head_started is not None:
                    timeout = head_started + limits.header_timeout_s - loop.time()
                else:
                    timeout = limits.keepalive_timeout_s
                try:
                    if timeout <= 0:
                        raise asyncio.TimeoutError
                    data = await asyncio.wait_for(reader.read(_READ_CHUNK), timeout)
                except asyncio.TimeoutError:
                    if head_started is None and body_started is None:
                        log.debug("%s: closing idle connection from %s", self._name, peer)
                        return
                    await self._time_out(reader, writer, peer, body_started is not None)
                    return
                if not data:
                    return  # EOF; a partial request is dropped with the connection
                parser.feed(data)
                if head_started is None:
                    head_started = loop.time()
        finally:
            self._buffered -= reserved

    async def _answer(
        self, writer: asyncio.StreamWriter, request: HttpRequest, peer: object
    ) -> bool:
        """Serve one request; returns whether the connection stays open."""
        include_body = request.method != "HEAD"
        verdict = self._auth.check(request, peer) if self._auth is not None else None
        if isinstance(verdict, HttpResponse):
            response = verdict
        else:
            response = await self._dispatch(request)
            if verdict is not None and self._auth is not None:
                response = self._auth.sign(verdict, response, include_body=include_body)
        keep_alive = request.keep_alive and not self._closing
        await self._send(writer, response, keep_alive=keep_alive, include_body=include_body)
        log.debug(
            "%s: %s %s %s -> %d", self._name, peer, request.method, request.target, response.status
        )
        return keep_alive

    async def _refuse_busy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object, need: int
    ) -> None:
        self.refused_busy += 1
        self._log(
            "busy",
            logging.WARNING,
            "%s: refused a %d-byte request body from %s: %d bytes of request bodies are "
            "buffered already (limit %d)",
            self._name,
            need,
            peer,
            self._buffered,
            self._limits.max_buffered_bytes,
        )
        busy = HttpResponse(
            503,
            f"{self._name} is busy: too many request bytes in flight; retry shortly\n".encode(),
            "text/plain",
            headers=(("Retry-After", "1"),),
        )
        await self._send(writer, busy, keep_alive=False)
        await self._linger(reader, writer)

    async def _time_out(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object, body: bool
    ) -> None:
        self.timed_out += 1
        limit = self._limits.body_timeout_s if body else self._limits.header_timeout_s
        part = "body" if body else "headers"
        self._log(
            f"slow:{part}",
            logging.INFO,
            "%s: closing the connection from %s: the request %s did not arrive within %.0f s",
            self._name,
            peer,
            part,
            limit,
        )
        text = f"request {part} not received within {limit:g} s\n"
        await self._send(writer, HttpResponse.of_text(408, text), keep_alive=False)

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
        if writer.transport.get_write_buffer_size():
            # a client that does not read its response must not hold the connection
            try:
                await asyncio.wait_for(writer.drain(), self._limits.body_timeout_s)
            except asyncio.TimeoutError:
                self.timed_out += 1
                raise ConnectionError(
                    f"the client did not read its response within {self._limits.body_timeout_s:g} s"
                ) from None

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
        handler, host, port, limits, name, auth, ssl: as for :class:`HttpServer`;
            the handler runs on the server thread's event loop.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: HttpLimits | None = None,
        name: str = "HTTP server",
        auth: HttpAuth | None = None,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        self._server = HttpServer(handler, host, port, limits=limits, name=name, auth=auth, ssl=ssl)
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
    def server(self) -> HttpServer:
        """The underlying server (counters, limits)."""
        return self._server

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
