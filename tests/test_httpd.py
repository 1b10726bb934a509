"""pymooncake._httpd: the asyncio HTTP server and its thread runner."""

from __future__ import annotations

import asyncio
import gc
import http.client
import logging
import socket
import threading
import time
import warnings

import pytest

from pymooncake._httpd import (
    HttpLimits,
    HttpRequest,
    HttpResponse,
    HttpServer,
    ThreadedHttpServer,
)
from pymooncake.errors import ClosedError, PeerSocketError, PortInUse


async def echo(request: HttpRequest) -> HttpResponse:
    text = f"{request.method} {request.path} {sorted(request.query.items())} {request.body!r}"
    return HttpResponse.of_text(200, text)


def get(port: int, target: str, method: str = "GET") -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, target)
        resp = c.getresponse()
        return resp.status, resp.read().decode()
    finally:
        c.close()


def test_threaded_server_lifecycle() -> None:
    server = ThreadedHttpServer(echo, name="echo server")
    assert (server.thread, server.running) == (None, False)
    with pytest.raises(RuntimeError, match="echo server is not started; call start"):
        _ = server.port
    assert server.start() is server
    try:
        assert server.running
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert get(server.port, "/a?x=1&y=%2F") == (200, "GET /a [('x', '1'), ('y', '/')] b''")
        with pytest.raises(RuntimeError, match="already started"):
            server.start()
    finally:
        server.close()
    thread = server.thread
    assert thread is not None
    assert (thread.is_alive(), server.running) == (False, False)
    server.close()  # idempotent
    with pytest.raises(ClosedError):
        server.start()


def test_context_manager_starts_and_closes() -> None:
    with ThreadedHttpServer(echo) as server:
        assert get(server.port, "/")[0] == 200
        port = server.port
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_port_in_use_names_the_port() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        before = set(threading.enumerate())
        server = ThreadedHttpServer(echo, "127.0.0.1", port, name="HTTP metadata server")
        with pytest.raises(PortInUse) as info:
            server.start()
        assert f"bind address already in use: port {port}" in str(info.value)
        assert "HTTP metadata server" in str(info.value)
        assert set(threading.enumerate()) <= before
        assert not server.running
        server.close()


def test_host_that_is_not_local_is_a_clear_error() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine
    with pytest.raises(PeerSocketError, match=r"192\.0\.2\.1 is not an address of this machine"):
        ThreadedHttpServer(echo, "192.0.2.1", 0).start()


def test_close_drops_idle_keep_alive_connections() -> None:
    server = ThreadedHttpServer(echo).start()
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    except BaseException:
        server.close()
        raise
    with sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        started = time.monotonic()
        server.close()
        try:
            assert sock.recv(65536) == b""
        except ConnectionResetError:
            pass  # an abort may reset instead of a clean FIN
        assert time.monotonic() - started < 3


def test_close_closes_connections_accepted_an_instant_before() -> None:
    """A client that connects and leaves just before the server closes (the doctor's
    reachability probe) leaves no socket open on the server: connections accepted
    but not yet set up, and ones whose handler has not run yet, are closed too."""
    leaked: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(25):  # the window is a loop turn or two wide: most rounds hit it
            server = ThreadedHttpServer(echo, "0.0.0.0").start()
            try:
                for _ in range(2):
                    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
                        pass
            finally:
                server.close()
            assert server.server.connections == 0
            gc.collect()  # an unclosed socket or transport warns when collected
        leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaked, leaked[:4]


def test_close_cancels_a_hanging_handler() -> None:
    entered = threading.Event()

    async def hang(request: HttpRequest) -> HttpResponse:
        entered.set()
        await asyncio.sleep(3600)
        raise AssertionError("not reached")

    server = ThreadedHttpServer(hang).start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert entered.wait(5)
        server.close()
        thread = server.thread
        assert thread is not None and not thread.is_alive()


def test_handler_exception_is_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: HttpRequest) -> HttpResponse:
        if request.path == "/boom":
            raise KeyError("boom")
        return HttpResponse.of_text(200, "fine")

    with ThreadedHttpServer(broken, name="test server") as server:
        with caplog.at_level(logging.ERROR, logger="pymooncake.httpd"):
            status, body = get(server.port, "/boom")
        assert status == 500
        assert "internal error in test server: KeyError('boom')" in body
        assert get(server.port, "/ok") == (200, "fine")
    assert "handler failed on GET /boom" in caplog.text


def _read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def test_stalled_request_gets_408_and_idle_keepalive_closes() -> None:
    limits = HttpLimits(keepalive_timeout_s=0.2, header_timeout_s=0.3)
    with ThreadedHttpServer(echo, limits=limits) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(b"GET / HTT")  # a stalled, partial request
            assert _read_all(sock).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            assert time.monotonic() - started < 3
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
            started = time.monotonic()
            assert sock.recv(100) == b""  # idle after a complete request: closed quietly
            assert time.monotonic() - started < 3
        assert server.server.timed_out == 1


def test_http_1_0_closes_after_the_response() -> None:
    with (
        ThreadedHttpServer(echo) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock,
    ):
        sock.sendall(b"GET /x HTTP/1.0\r\n\r\n")
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in data


def test_http_server_on_the_callers_event_loop() -> None:
    async def scenario() -> None:
        server = HttpServer(echo)
        await server.start()
        try:
            with pytest.raises(RuntimeError, match="already started"):
                await server.start()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"PUT /p HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            await server.close()
            assert await reader.read() == b"PUT /p [] b'hi'"
            writer.close()
            await writer.wait_closed()
        finally:
            await server.close()
        with pytest.raises(ClosedError):
            await server.start()

    asyncio.run(scenario())


def test_an_unusable_response_becomes_500(caplog: pytest.LogCaptureFixture) -> None:
    async def bad(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, b"", headers=(("X-Bad", "a\r\nInjected: yes"),))

    with (
        ThreadedHttpServer(bad, name="test server") as server,
        caplog.at_level(logging.ERROR, logger="pymooncake.httpd"),
    ):
        status, body = get(server.port, "/")
    assert status == 500
    assert "unusable response" in body
    assert "contains CR or LF" in caplog.text


# --- authentication, limits ------------------------------------------------------------

TOKEN = "httpd-test-token-0123456789abcdef"


def test_auth_protects_everything_but_open_paths() -> None:
    from pymooncake._authio import ClusterSecurity, HttpAuth, http_request
    from pymooncake.errors import AuthenticationError
    from pymooncake.wire._auth import ClusterKey

    sec = ClusterSecurity(token=TOKEN)
    auth = HttpAuth(ClusterKey(TOKEN), b"test-svc", open_paths=("/health",))
    with ThreadedHttpServer(echo, auth=auth, name="guarded") as server:
        assert get(server.port, "/health")[0] == 200
        status, body = get(server.port, "/secret?x=1")
        assert status == 401 and "PYMOONCAKE_CLUSTER_TOKEN" in body
        assert http_request(
            "GET", server.url + "/secret?x=1", security=sec, context=b"test-svc"
        ) == (
            200,
            b"GET /secret [('x', '1')] b''",
        )
        # the signature covers the context: a proof for another service is refused
        with pytest.raises(AuthenticationError, match="refused"):
            http_request("GET", server.url + "/secret", security=sec, context=b"other")
        # a replayed request is refused
        from pymooncake.wire._auth import sign_request

        signed = sign_request(ClusterKey(TOKEN), b"test-svc", "GET", "/secret", now=time.time())
        statuses = []
        for _ in range(2):
            c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            try:
                c.request("GET", "/secret", headers={"Authorization": signed.authorization})
                resp = c.getresponse()
                resp.read()
                statuses.append(resp.status)
            finally:
                c.close()
        assert statuses == [200, 401]
        assert auth.refused >= 3


def test_master_admin_listing_needs_the_token_with_a_one_line_change() -> None:
    """The master's admin HTTP lists every key and segment; with HttpAuth (the one-line
    change in store/master/_service.py) only /metrics, /metrics/summary and /health stay
    open."""
    from pymooncake._authio import ClusterSecurity, HttpAuth, http_request
    from pymooncake.store.master._admin import AdminHttp
    from pymooncake.store.master._service import MasterService

    svc = MasterService(metrics_port=None)
    admin = AdminHttp(svc)
    open_paths = ("/metrics", "/metrics/summary", "/health")
    sec = ClusterSecurity(token=TOKEN)
    # open default: anyone lists the keys
    with ThreadedHttpServer(admin.handle, name="master admin HTTP") as server:
        assert get(server.port, "/get_all_keys")[0] == 200
    with ThreadedHttpServer(
        admin.handle,
        name="master admin HTTP",
        auth=HttpAuth(sec.key, b"master-admin", open_paths=open_paths, name="master admin"),
    ) as server:
        assert get(server.port, "/get_all_keys")[0] == 401
        assert get(server.port, "/get_all_segments")[0] == 401
        assert get(server.port, "/health")[0] == 200
        assert get(server.port, "/metrics")[0] == 200
        assert (
            http_request(
                "GET", server.url + "/get_all_keys", security=sec, context=b"master-admin"
            )[0]
            == 200
        )


def test_connection_cap_and_body_budget_on_the_generic_server() -> None:
    limits = HttpLimits(max_connections=2, max_buffered_bytes=1000)
    with ThreadedHttpServer(echo, limits=limits) as server:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
        try:
            time.sleep(0.1)
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
                extra.sendall(b"GET / HTTP/1.1\r\n\r\n")
                assert _read_all(extra).startswith(b"HTTP/1.1 503 ")
            assert server.server.refused_connections == 1
        finally:
            for s in held:
                s.close()
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as big:
            big.sendall(b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n")
            assert _read_all(big).startswith(b"HTTP/1.1 503 ")
        assert server.server.refused_busy == 1 and server.server.buffered_bytes == 0


def test_a_client_that_never_reads_its_response_is_dropped() -> None:
    big = b"x" * (8 << 20)

    async def large(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, big)

    with ThreadedHttpServer(large, limits=HttpLimits(body_timeout_s=0.3)) as server:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            deadline = time.monotonic() + 5
            while server.server.timed_out == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.server.timed_out == 1
            assert server.server.connections == 0
        finally:
            s.close()
