"""The HTTP metadata server's conditional requests (create-if-absent and
compare-and-delete) and how the client copes with a server without them."""

from __future__ import annotations

import http.client
import logging
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from pymooncake._httpd import HttpResponse
from pymooncake.transfer.metadata import HttpMetadataStore
from pymooncake.transfer.metadata.server import MetadataServer, etag


def test_create_if_absent_decisions() -> None:
    server = MetadataServer()
    first = server.handle_metadata("PUT", "mooncake/ram/a", b"1", if_none_match="*")
    assert (first.status, first.text) == (200, "metadata created")
    assert dict(first.headers)["ETag"] == etag(b"1")
    again = server.handle_metadata("PUT", "mooncake/ram/a", b"2", if_none_match="*")
    assert (again.status, again.text) == (412, "metadata exists")
    assert dict(again.headers)["ETag"] == etag(b"1")
    assert server.get("mooncake/ram/a") == b"1"
    # without the header: the reference protocol, unchanged
    assert server.handle_metadata("PUT", "mooncake/ram/a", b"2").status == 200
    assert server.get("mooncake/ram/a") == b"2"


def test_compare_and_delete_decisions() -> None:
    server = MetadataServer()
    server.handle_metadata("PUT", "k", b"v")
    get = server.handle_metadata("GET", "k")
    assert dict(get.headers)["ETag"] == etag(b"v")
    wrong = server.handle_metadata("DELETE", "k", if_match=etag(b"other"))
    assert (wrong.status, wrong.text) == (412, "metadata changed")
    assert server.get("k") == b"v"
    right = server.handle_metadata("DELETE", "k", if_match=f'"nope", {etag(b"v")}')
    assert (right.status, right.text) == (200, "metadata deleted")
    assert server.get("k") is None
    assert server.handle_metadata("DELETE", "k", if_match=etag(b"v")).status == 404
    server.handle_metadata("PUT", "k", b"w")
    assert server.handle_metadata("DELETE", "k", if_match="*").status == 200


@pytest.fixture
def legacy_url() -> Iterator[str]:
    """A server that ignores conditional headers and sends no ETag (like the
    reference's servers): our server's decisions with those parts cut away."""
    server = MetadataServer()

    async def handle(request: object) -> HttpResponse:
        resp = server.handle_metadata(
            request.method,  # type: ignore[attr-defined]
            request.query.get("key"),  # type: ignore[attr-defined]
            request.body,  # type: ignore[attr-defined]
        )
        return HttpResponse(resp.status, resp.body, resp.content_type)

    from pymooncake._httpd import ThreadedHttpServer

    with ThreadedHttpServer(handle, "127.0.0.1", 0, name="legacy metadata server").start() as srv:
        yield srv.url + "/metadata"


def test_client_against_a_server_without_conditions(
    legacy_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = HttpMetadataStore(legacy_url)
    try:
        with caplog.at_level(logging.WARNING, logger="pymooncake.metadata.http"):
            assert store.create("mooncake/ram/x", b"1") is True
            assert store.create("mooncake/ram/x", b"2") is True  # not atomic there...
            assert store.create("mooncake/rpc_meta/x", b"1") is True
            # ...but rpc_meta keys stay exclusive through the server's duplicate rule
            assert store.create("mooncake/rpc_meta/x", b"2") is False
        assert caplog.text.count("ignored a conditional") == 1
    finally:
        store.close()


def test_reference_style_requests_see_no_difference() -> None:
    """What the reference's libcurl client sends still gets the reference's answers."""
    server = MetadataServer()
    with server.serve() as http_server:
        conn = http.client.HTTPConnection(http_server.host, http_server.port, timeout=5)
        try:
            target = "/metadata?key=" + quote("mooncake/rpc_meta/n", safe="")
            for body, status, text in [
                (b'{"a":1}', 200, b"metadata updated"),
                (b'{"a":1}', 200, b"metadata unchanged"),
                (b'{"a":2}', 400, b"Duplicate rpc_meta key not allowed"),
            ]:
                conn.request("PUT", target, body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                assert (resp.status, resp.read()) == (status, text)
        finally:
            conn.close()
