"""The HTTP metadata server, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import functools
import http.client
import socket
import urllib.parse
from collections.abc import Iterator

import pytest

from pymooncake._httpd import HttpLimits, ThreadedHttpServer
from pymooncake.testing import run_threads
from pymooncake.transfer.metadata.server import MetadataServer


@pytest.fixture
def metadata() -> MetadataServer:
    return MetadataServer()


@pytest.fixture
def srv(metadata: MetadataServer) -> Iterator[ThreadedHttpServer]:
    server = metadata.serve("127.0.0.1", 0)
    try:
        yield server
    finally:
        server.close()
        assert server.thread is not None and not server.thread.is_alive()


@pytest.fixture
def conn(srv: ThreadedHttpServer) -> Iterator[http.client.HTTPConnection]:
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        yield c
    finally:
        c.close()


def call(
    c: http.client.HTTPConnection, method: str, target: str, body: bytes | None = None
) -> tuple[int, str, bytes]:
    """One request; returns (status, content type, body)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    c.request(method, target, body=body, headers=headers)
    resp = c.getresponse()
    data = resp.read()
    return resp.status, resp.getheader("Content-Type", ""), data


def target(key: str) -> str:
    return "/metadata?key=" + urllib.parse.quote(key, safe="")


def read_response(sock: socket.socket, buf: bytearray) -> tuple[bytes, bytes]:
    """Read one response (head, body) from a raw socket; ``buf`` keeps the surplus."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a complete response: {bytes(buf)!r}"
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(buf) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a response body"
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return head, body


def recv_until_eof(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


# --- the protocol -------------------------------------------------------------


def test_put_get_delete_round_trip(conn: http.client.HTTPConnection) -> None:
    key = "mooncake/ram/nodeA"
    value = b'{"name":"nodeA","protocol":"tcp"}'
    assert call(conn, "GET", target(key)) == (404, "application/json", b"metadata not found")
    assert call(conn, "PUT", target(key), value) == (200, "application/json", b"metadata updated")
    assert call(conn, "GET", target(key)) == (200, "application/json", value)
    assert call(conn, "PUT", target(key), b"{}") == (200, "application/json", b"metadata updated")
    assert call(conn, "GET", target(key))[2] == b"{}"
    assert call(conn, "DELETE", target(key)) == (200, "application/json", b"metadata deleted")
    assert call(conn, "DELETE", target(key)) == (404, "application/json", b"metadata not found")
    assert call(conn, "GET", target(key))[0] == 404


def test_the_client_encoding_of_the_reference_engine(
    conn: http.client.HTTPConnection, metadata: MetadataServer
) -> None:
    # HTTPStoragePlugin: URL + "?key=" + curl_easy_escape(key)
    assert call(conn, "PUT", "/metadata?key=mooncake%2Fram%2FnodeA", b"{}")[0] == 200
    assert metadata.get("mooncake/ram/nodeA") == b"{}"
    assert metadata.keys() == ["mooncake/ram/nodeA"]
    for key in ("with space", "a+b&c=d", "\u6708/\u00e9", "  padded  "):
        assert call(conn, "PUT", target(key), key.encode())[0] == 200
        assert metadata.get(key.strip()) == key.encode()
        assert call(conn, "GET", target(key))[2] == key.encode()


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "POST"])
@pytest.mark.parametrize("query", ["", "?key=", "?key=%20%20", "?other=1"])
def test_missing_or_blank_key_is_400(
    conn: http.client.HTTPConnection, metadata: MetadataServer, method: str, query: str
) -> None:
    status, ctype, body = call(conn, method, "/metadata" + query, b"v")
    assert (status, ctype, body) == (400, "application/json", b"metadata key is required")
    assert metadata.store == {}


@pytest.mark.parametrize("method", ["POST", "PATCH", "HEAD", "OPTIONS"])
def test_other_methods_are_405(conn: http.client.HTTPConnection, method: str) -> None:
    conn.request(method, target("k"), body=b"x" if method in ("POST", "PATCH") else None)
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 405
    assert resp.getheader("Allow") == "GET, PUT, DELETE"
    if method != "HEAD":
        assert body.startswith(b"Method not allowed: " + method.encode())


def test_rpc_meta_keys_are_written_once(conn: http.client.HTTPConnection) -> None:
    key = "mooncake/rpc_meta/nodeA"
    first = b'{"ip_or_host_name":"10.0.0.1","rpc_port":15001}'
    assert call(conn, "PUT", target(key), first)[2] == b"metadata updated"
    assert call(conn, "PUT", target(key), first) == (200, "application/json", b"metadata unchanged")
    second = b'{"ip_or_host_name":"10.0.0.2","rpc_port":15001}'
    assert call(conn, "PUT", target(key), second) == (
        400,
        "application/json",
        b"Duplicate rpc_meta key not allowed",
    )
    assert call(conn, "GET", target(key))[2] == first
    # once deleted (engine shut down) it can be registered again
    assert call(conn, "DELETE", target(key))[0] == 200
    assert call(conn, "PUT", target(key), second)[0] == 200


def test_health_and_unknown_paths(conn: http.client.HTTPConnection) -> None:
    assert call(conn, "GET", "/health") == (200, "text/plain; charset=utf-8", b"OK")
    conn.request("HEAD", "/health")
    resp = conn.getresponse()
    assert (resp.status, resp.read(), resp.getheader("Content-Length")) == (200, b"", "2")
    assert call(conn, "PUT", "/health", b"")[0] == 405
    status, _, body = call(conn, "GET", "/metadata/extra?key=k")
    assert status == 404
    assert b"/metadata?key=<key>" in body
    assert call(conn, "GET", "/")[0] == 404


def test_custom_path() -> None:
    metadata = MetadataServer(path="/v1/meta")
    with metadata.serve() as server:
        assert metadata.url(server) == f"http://127.0.0.1:{server.port}/v1/meta"
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            assert call(c, "PUT", "/v1/meta?key=k", b"1")[0] == 200
            assert call(c, "GET", "/metadata?key=k")[0] == 404
        finally:
            c.close()
    with pytest.raises(ValueError, match="must start with '/'"):
        MetadataServer(path="metadata")


# --- HTTP behaviour -------------------------------------------------------------


def test_keep_alive_serves_many_requests_on_one_connection(
    conn: http.client.HTTPConnection,
) -> None:
    conn.connect()
    sock = conn.sock
    for i in range(20):
        assert call(conn, "PUT", target(f"k{i}"), str(i).encode())[0] == 200
        assert call(conn, "GET", target(f"k{i}"))[2] == str(i).encode()
    assert conn.sock is sock, "the server closed a keep-alive connection"


def test_connection_close_is_honoured(srv: ThreadedHttpServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = recv_until_eof(sock)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in data
    assert data.endswith(b"\r\n\r\nOK")


def test_pipelined_requests_are_answered_in_order(srv: ThreadedHttpServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(
            b"PUT /metadata?key=p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /metadata?key=p HTTP/1.1\r\n\r\n"
            b"DELETE /metadata?key=p HTTP/1.1\r\n\r\n"
        )
        buf = bytearray()
        bodies = [read_response(sock, buf)[1] for _ in range(3)]
    assert bodies == [b"metadata updated", b"abc", b"metadata deleted"]


def test_expect_100_continue(srv: ThreadedHttpServer, metadata: MetadataServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(
            b"PUT /metadata?key=big HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        buf = bytearray()
        head, _ = read_response(sock, buf)
        assert head == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        head, body = read_response(sock, buf)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"metadata updated"
    assert metadata.get("big") == b"hello"


def test_oversized_body_is_413_and_the_server_keeps_serving(metadata: MetadataServer) -> None:
    with metadata.serve(limits=HttpLimits(max_body_bytes=1024)) as server:
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            status, _, body = call(c, "PUT", target("k"), b"x" * 4096)
            assert status == 413
            assert b"4096 bytes exceeds the limit of 1024 bytes" in body
            c.close()
            assert call(c, "PUT", target("k"), b"x" * 1024)[0] == 200
        finally:
            c.close()
        assert metadata.get("k") == b"x" * 1024


def test_huge_content_length_is_refused_before_the_body(srv: ThreadedHttpServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 100000000000\r\n\r\n")
        data = recv_until_eof(sock)
    assert data.startswith(b"HTTP/1.1 413 Content Too Large\r\n") or data.startswith(
        b"HTTP/1.1 413 Request Entity Too Large\r\n"
    )
    assert b"Connection: close" in data


def test_oversized_headers_are_431(srv: ThreadedHttpServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * (70 << 10) + b"\r\n\r\n")
        data = recv_until_eof(sock)
    assert data.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", b"400"),  # TLS to plain HTTP
        (b"PUT /metadata?key=k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", b"411"),
        (b"GET /health HTTP/3.0\r\n\r\n", b"505"),
    ],
)
def test_bad_requests_are_answered_then_closed_and_the_server_survives(
    srv: ThreadedHttpServer, request_bytes: bytes, status: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(request_bytes)
        data = recv_until_eof(sock)
    assert data.startswith(b"HTTP/1.1 " + status + b" ")
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        assert call(c, "GET", "/health")[0] == 200
    finally:
        c.close()


def test_client_vanishing_mid_request_does_not_hurt(srv: ThreadedHttpServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"GET /heal")
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        assert call(c, "GET", target("k"))[0] == 404
    finally:
        c.close()


def test_concurrent_clients(srv: ThreadedHttpServer, metadata: MetadataServer) -> None:
    def client(n: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        try:
            for i in range(30):
                key = f"client{n}/key{i}"
                assert call(c, "PUT", target(key), f"{n}:{i}".encode())[0] == 200
                assert call(c, "GET", target(key))[2] == f"{n}:{i}".encode()
            # every client races for the same rpc_meta key: exactly one body wins
            call(c, "PUT", target("rpc_meta/shared"), str(n).encode())
        finally:
            c.close()

    run_threads([functools.partial(client, n) for n in range(8)], 30)
    assert len(metadata.keys()) == 8 * 30 + 1
    assert metadata.get("rpc_meta/shared") in {str(n).encode() for n in range(8)}
