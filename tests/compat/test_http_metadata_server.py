"""mooncake.http_metadata_server: the reference wheel's names over MetadataServer.

The first tests are the reference's white-box cases
(``mooncake-wheel/tests/test_http_metadata_server.py``) in pytest form.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
from collections.abc import Iterator

import pytest

from mooncake.http_metadata_server import KVBootstrapServer, KVPoll
from pymooncake._httpd import HttpResponse
from pymooncake.errors import PortInUse


class FakeRequest:
    """The parts of an aiohttp request that ``_handle_metadata`` uses."""

    def __init__(self, method: str, key: str | None = None, body: bytes = b"") -> None:
        self.method = method
        self.query: dict[str, str] = {} if key is None else {"key": key}
        self.body = body

    async def read(self) -> bytes:
        return self.body


def handle(server: KVBootstrapServer, request: FakeRequest) -> HttpResponse:
    return asyncio.run(server._handle_metadata(request))


@pytest.fixture
def server() -> KVBootstrapServer:
    return KVBootstrapServer(port=0)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_missing_metadata_key_is_rejected_for_all_methods(
    server: KVBootstrapServer, method: str
) -> None:
    response = handle(server, FakeRequest(method, body=b"value"))
    assert response.status == 400
    assert response.content_type == "application/json"
    assert "" not in server.store


@pytest.mark.parametrize("key", ["", "   "])
def test_empty_or_blank_metadata_key_is_rejected(server: KVBootstrapServer, key: str) -> None:
    response = handle(server, FakeRequest("PUT", key=key, body=b"value"))
    assert response.status == 400
    assert response.content_type == "application/json"
    assert response.text == "metadata key is required"
    assert key not in server.store


def test_metadata_key_is_stripped_before_operations(server: KVBootstrapServer) -> None:
    put = handle(server, FakeRequest("PUT", key="  valid  ", body=b"value"))
    got = handle(server, FakeRequest("GET", key="  valid  "))
    assert put.status == 200
    assert got.status == 200
    assert got.body == b"value"
    assert "valid" in server.store
    assert "  valid  " not in server.store


def test_valid_metadata_key_still_round_trips(server: KVBootstrapServer) -> None:
    put = handle(server, FakeRequest("PUT", key="valid", body=b"value"))
    got = handle(server, FakeRequest("GET", key="valid"))
    assert (put.status, put.text) == (200, "metadata updated")
    assert (got.status, got.body, got.content_type) == (200, b"value", "application/json")


def test_every_response_is_application_json(server: KVBootstrapServer) -> None:
    cases = [
        (FakeRequest("GET", key="absent"), 404, "metadata not found"),
        (FakeRequest("DELETE", key="absent"), 404, "metadata not found"),
        (FakeRequest("PUT", key="rpc_meta/a", body=b"1"), 200, "metadata updated"),
        (
            FakeRequest("PUT", key="rpc_meta/a", body=b"2"),
            400,
            "Duplicate rpc_meta key not allowed",
        ),
        (FakeRequest("DELETE", key="rpc_meta/a"), 200, "metadata deleted"),
        (FakeRequest("POST", key="k"), 405, "Method not allowed: POST; use GET, PUT or DELETE"),
    ]
    for request, status, text in cases:
        response = handle(server, request)
        assert (response.status, response.text) == (status, text)
        assert response.content_type == "application/json"


def test_store_is_the_live_dict(server: KVBootstrapServer) -> None:
    server.store["preloaded"] = b"{}"
    assert handle(server, FakeRequest("GET", key="preloaded")).body == b"{}"
    handle(server, FakeRequest("PUT", key="new", body=b"1"))
    assert server.store == {"preloaded": b"{}", "new": b"1"}


def test_kvpoll_values() -> None:
    assert [(p.name, p.value) for p in KVPoll] == [
        ("Failed", 0),
        ("Bootstrapping", 1),
        ("WaitingForInput", 2),
        ("Transferring", 3),
        ("Success", 4),
    ]


@pytest.fixture
def running() -> Iterator[KVBootstrapServer]:
    server = KVBootstrapServer(port=0, host="127.0.0.1")
    try:
        yield server
    finally:
        server.close()


def test_run_and_close_over_real_http(running: KVBootstrapServer) -> None:
    assert running.poll() is KVPoll.Failed
    thread = running.run()
    assert thread.is_alive()
    assert running.thread is thread
    assert running.port != 0
    assert running.poll() is KVPoll.Success
    with pytest.raises(RuntimeError, match="already running"):
        running.run()

    c = http.client.HTTPConnection("127.0.0.1", running.port, timeout=5)
    try:
        c.request("PUT", "/metadata?key=mooncake%2Fram%2Fa", body=b'{"a":1}')
        resp = c.getresponse()
        assert (resp.status, resp.read()) == (200, b"metadata updated")
        assert running.store == {"mooncake/ram/a": b'{"a":1}'}
        c.request("GET", "/metadata?key=mooncake%2Fram%2Fa")
        resp = c.getresponse()
        assert (resp.status, resp.read()) == (200, b'{"a":1}')
        assert resp.getheader("Content-Type") == "application/json"
        c.request("DELETE", "/metadata?key=mooncake%2Fram%2Fa")
        resp = c.getresponse()
        assert (resp.status, resp.read()) == (200, b"metadata deleted")
    finally:
        c.close()

    running.close()
    assert not thread.is_alive()
    assert running.poll() is KVPoll.Failed
    running.close()  # idempotent


def test_run_on_a_taken_port_raises(running: KVBootstrapServer) -> None:
    running.run()
    other = KVBootstrapServer(port=running.port, host="127.0.0.1")
    with pytest.raises(PortInUse, match=f"port {running.port}"):
        other.run()
    assert other.poll() is KVPoll.Failed
    other.close()


def test_default_host_listens_on_every_interface() -> None:
    server = KVBootstrapServer(port=0)
    assert server.host == "0.0.0.0"
    server.run()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
    finally:
        server.close()
