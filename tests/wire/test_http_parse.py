"""The sans-IO HTTP/1.1 request parser and response encoder."""

from __future__ import annotations

import pytest

from pymooncake.wire._http import (
    CONTINUE_RESPONSE,
    HttpParseError,
    HttpRequest,
    HttpResponse,
    RequestParser,
    encode_response,
    error_response,
)
from pymooncake.wire._rpc import NEED_DATA

# what libcurl (the reference engine's HTTPStoragePlugin) sends for a PUT
CURL_PUT = (
    b"PUT /metadata?key=mooncake%2Fram%2FnodeA HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8080\r\n"
    b"Accept: */*\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 13\r\n"
    b"\r\n"
    b'{"name":"a"}\n'
)
GET = b"GET /metadata?key=k1 HTTP/1.1\r\nHost: x\r\n\r\n"
DELETE = b"DELETE /metadata?key=k1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def drain(parser: RequestParser) -> list[HttpRequest]:
    out: list[HttpRequest] = []
    while True:
        item = parser.next_request()
        if item is NEED_DATA:
            return out
        assert isinstance(item, HttpRequest)
        out.append(item)


def parse_one(data: bytes, **limits: int) -> HttpRequest:
    parser = RequestParser(**limits)
    parser.feed(data)
    (request,) = drain(parser)
    assert parser.trailing == b""
    return request


def parse_error(data: bytes, **limits: int) -> HttpParseError:
    parser = RequestParser(**limits)
    parser.feed(data)
    with pytest.raises(HttpParseError) as info:
        drain(parser)
    return info.value


def test_curl_put_is_parsed() -> None:
    req = parse_one(CURL_PUT)
    assert req.method == "PUT"
    assert req.path == "/metadata"
    assert req.query == {"key": "mooncake/ram/nodeA"}
    assert req.target == "/metadata?key=mooncake%2Fram%2FnodeA"
    assert req.body == b'{"name":"a"}\n'
    assert req.version == "HTTP/1.1"
    assert req.headers["content-type"] == "application/json"
    assert req.header("CONTENT-TYPE") == "application/json"
    assert req.header("x-missing") is None
    assert req.keep_alive


def test_pipelined_requests_fed_one_byte_at_a_time() -> None:
    stream = CURL_PUT + GET + DELETE
    whole = RequestParser()
    whole.feed(stream)
    expected = drain(whole)
    assert [r.method for r in expected] == ["PUT", "GET", "DELETE"]

    parser = RequestParser()
    got: list[HttpRequest] = []
    for i in range(len(stream)):
        parser.feed(stream[i : i + 1])
        got.extend(drain(parser))
    assert got == expected
    assert parser.trailing == b""
    assert not parser.in_progress


def test_trailing_data_stays_buffered() -> None:
    parser = RequestParser()
    parser.feed(GET + b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 4\r\n\r\nab")
    (first,) = drain(parser)
    assert first.method == "GET"
    assert parser.trailing == b"ab"
    assert parser.in_progress
    parser.feed(b"cd" + b"GET /x")
    (second,) = drain(parser)
    assert second.body == b"abcd"
    assert parser.trailing == b"GET /x"


def test_query_decoding() -> None:
    req = parse_one(b"GET /metadata?key=a%20b+c&key=second&empty=&flag HTTP/1.1\r\n\r\n")
    assert req.query == {"key": "a b c", "empty": "", "flag": ""}
    assert parse_one(b"GET /metadata?key= HTTP/1.1\r\n\r\n").query == {"key": ""}
    assert parse_one(b"GET /metadata HTTP/1.1\r\n\r\n").query == {}
    utf8 = parse_one(b"GET /m?key=%E6%9C%88 HTTP/1.1\r\n\r\n")
    assert utf8.query == {"key": "\u6708"}


def test_absolute_form_and_percent_encoded_path() -> None:
    req = parse_one(b"GET http://h:1/metadata?key=k HTTP/1.1\r\n\r\n")
    assert (req.path, req.query) == ("/metadata", {"key": "k"})
    assert parse_one(b"GET /meta%64ata HTTP/1.1\r\n\r\n").path == "/metadata"
    assert parse_one(b"OPTIONS * HTTP/1.1\r\n\r\n").path == "*"


def test_header_names_are_case_insensitive_and_repeats_are_joined() -> None:
    req = parse_one(b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a:2\r\nHOST:\t h \r\n\r\n")
    assert req.headers == {"x-a": "1, 2", "host": "h"}


def test_bare_lf_line_endings_and_leading_empty_lines() -> None:
    req = parse_one(b"\r\n\nPUT /m?key=k HTTP/1.1\nContent-Length: 2\n\nhi")
    assert (req.method, req.body) == ("PUT", b"hi")


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n", False),
        (b"GET / HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n", False),
        (b"GET / HTTP/1.0\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n", True),
    ],
)
def test_keep_alive(head: bytes, keep_alive: bool) -> None:
    assert parse_one(head + b"\r\n").keep_alive is keep_alive


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
        (b"GET  / HTTP/1.1\r\n\r\n", 400, "malformed request line"),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400, "malformed request line"),
        (b"GET metadata HTTP/1.1\r\n\r\n", 400, "must be a path"),
        (b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP/2.0"),
        (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400, "malformed header line"),
        (b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n", 400, "malformed header line"),
        (b"GET / HTTP/1.1\r\nA: 1\r\n continued\r\n\r\n", 400, "folding"),
        (b"GET / HTTP/1.1\r\nA: x\x01y\r\n\r\n", 400, "control characters"),
        (b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
        (b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "conflicting"),
        (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411, "Content-Length"),
    ],
)
def test_malformed_requests(data: bytes, status: int, words: str) -> None:
    error = parse_error(data)
    assert error.status == status
    assert words in error.message


def test_repeated_identical_content_length_is_accepted() -> None:
    req = parse_one(b"PUT / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nok")
    assert req.body == b"ok"


def test_body_limit_is_checked_before_the_body_arrives() -> None:
    parser = RequestParser(max_body_bytes=10)
    parser.feed(b"PUT /m?key=k HTTP/1.1\r\nContent-Length: 11\r\n\r\n")
    with pytest.raises(HttpParseError) as info:
        parser.next_request()
    assert info.value.status == 413
    assert "11 bytes exceeds the limit of 10 bytes" in info.value.message
    assert parse_one(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789", max_body_bytes=10)


def test_header_limit() -> None:
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * 200
    # no end of headers in sight yet
    assert parse_error(big, max_header_bytes=128).status == 431
    # complete, but too long
    assert parse_error(big + b"\r\n\r\n", max_header_bytes=128).status == 431
    assert parse_one(big + b"\r\n\r\n", max_header_bytes=len(big) + 4).headers["x"] == "a" * 200


def test_a_failed_parser_stays_failed() -> None:
    parser = RequestParser()
    parser.feed(b"NOT HTTP\r\n\r\n")
    with pytest.raises(HttpParseError) as first:
        parser.next_request()
    parser.feed(GET)
    with pytest.raises(HttpParseError) as again:
        parser.next_request()
    assert again.value is first.value


def test_expect_continue_is_reported_once_while_the_body_is_missing() -> None:
    head = b"PUT /m?key=k HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    parser = RequestParser()
    parser.feed(head)
    assert parser.next_request() is NEED_DATA
    assert parser.take_continue()
    assert not parser.take_continue()
    parser.feed(b"abc")
    (req,) = drain(parser)
    assert req.body == b"abc"
    assert not parser.take_continue()

    # the body came with the headers: nothing to acknowledge
    parser = RequestParser()
    parser.feed(head + b"abc")
    drain(parser)
    assert not parser.take_continue()

    # HTTP/1.0 clients never wait for 100 Continue
    parser = RequestParser()
    parser.feed(head.replace(b"HTTP/1.1", b"HTTP/1.0"))
    assert parser.next_request() is NEED_DATA
    assert not parser.take_continue()
    assert CONTINUE_RESPONSE == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_parser_rejects_silly_limits() -> None:
    with pytest.raises(ValueError, match="max_header_bytes"):
        RequestParser(max_header_bytes=1)
    with pytest.raises(ValueError, match="max_body_bytes"):
        RequestParser(max_body_bytes=-1)


def test_encode_response_exact_bytes() -> None:
    resp = HttpResponse(200, b'{"a":1}', "application/json")
    assert encode_response(resp, keep_alive=True) == (
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}'
    )
    text = HttpResponse.of_text(404, "metadata not found")
    assert encode_response(text, keep_alive=False, date="Thu, 01 Jan 1970 00:00:00 GMT") == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 18\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
        b"Connection: close\r\n\r\nmetadata not found"
    )
    head = encode_response(text, keep_alive=True, include_body=False)
    assert head.endswith(b"Content-Length: 18\r\n\r\n")
    extra = HttpResponse(405, b"", "application/json", headers=(("Allow", "GET"),))
    assert b"\r\nAllow: GET\r\n" in encode_response(extra, keep_alive=True)
    assert encode_response(HttpResponse(299), keep_alive=True).startswith(
        b"HTTP/1.1 299 Unknown\r\n"
    )


def test_encode_response_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="final status"):
        encode_response(HttpResponse(100), keep_alive=True)
    with pytest.raises(ValueError, match="CR or LF"):
        encode_response(HttpResponse(200, headers=(("X", "a\r\nB: c"),)), keep_alive=True)
    with pytest.raises(ValueError, match="not an HTTP token"):
        encode_response(HttpResponse(200, headers=(("X Y", "v"),)), keep_alive=True)


def test_response_text_and_error_response() -> None:
    assert HttpResponse(200, "\u6708".encode()).text == "\u6708"
    assert HttpResponse(200, b"\xff").text == "\ufffd"
    resp = error_response(HttpParseError(413, "too big"))
    assert (resp.status, resp.text, resp.content_type) == (413, "too big\n", "text/plain")
