"""The gateway's JSON as values: exact request bodies, replies with the fields
the gateway leaves out, the watch stream fed one byte at a time."""

from __future__ import annotations

import base64
import json

import pytest

from pymooncake._etcd import (
    Compare,
    DeleteResult,
    Endpoint,
    KeyValue,
    LeaseStatus,
    OpDelete,
    OpGet,
    OpPut,
    PutResult,
    RangeResult,
    TxnResult,
    WatchResponse,
    parse_endpoints,
    prefix_range_end,
)
from pymooncake._etcd._stream import StreamDecoder, decode_watch_message, watch_request
from pymooncake._etcd._wire import GrpcCode, decode_error, txn_request
from pymooncake.errors import InvalidArgument, MalformedMessage


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


HEADER = {"cluster_id": "1", "member_id": "2", "revision": "42", "raft_term": "3"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("h1:2379;h2:2379", [Endpoint("h1", 2379), Endpoint("h2", 2379)]),
        ("h1:1,h2:2", [Endpoint("h1", 1), Endpoint("h2", 2)]),
        (" h1:1 ; ;h2:2,", [Endpoint("h1", 1), Endpoint("h2", 2)]),
        ("10.0.0.1:2379", [Endpoint("10.0.0.1", 2379)]),
        ("etcd-host", [Endpoint("etcd-host", 2379)]),
        ("http://h:12/", [Endpoint("h", 12)]),
        ("https://h:12", [Endpoint("h", 12, tls=True)]),
        ("[::1]:2379;HTTP://[fe80::1]", [Endpoint("::1", 2379), Endpoint("fe80::1", 2379)]),
    ],
)
def test_endpoint_lists_parse_like_the_reference(text: str, expected: list[Endpoint]) -> None:
    assert list(parse_endpoints(text)) == expected


@pytest.mark.parametrize("text", ["", " ; , ", "ftp://h:1", "h:1/v3", "h:0", "h:port", ":2379"])
def test_bad_endpoint_lists_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_endpoints(text)


def test_endpoint_text_forms() -> None:
    assert str(Endpoint("::1", 5)) == "[::1]:5"
    assert Endpoint("h", 1, tls=True).url == "https://h:1"


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        (b"a", b"b"),
        (b"mooncake/", b"mooncake0"),
        (b"a\xff", b"b"),
        (b"\xff\xff", b"\0"),
        (b"", b"\0"),
    ],
)
def test_prefix_range_end(prefix: bytes, end: bytes) -> None:
    assert prefix_range_end(prefix) == end


def test_compares_are_encoded_as_the_gateway_wants() -> None:
    assert Compare.version(b"k", "==", 0).to_json() == {
        "key": b64(b"k"),
        "target": "VERSION",
        "result": "EQUAL",
        "version": "0",
    }
    assert Compare.create_revision(b"k", "<", 7).to_json()["create_revision"] == "7"
    assert Compare.mod_revision(b"k", ">", 8).to_json()["result"] == "GREATER"
    assert Compare.value(b"k", "!=", b"v").to_json() == {
        "key": b64(b"k"),
        "target": "VALUE",
        "result": "NOT_EQUAL",
        "value": b64(b"v"),
    }
    assert Compare.lease(b"k", "==", 2**63 - 1).to_json()["lease"] == str(2**63 - 1)
    with pytest.raises(InvalidArgument):
        Compare(b"k", "VERSION", "<=", 1)  # type: ignore[arg-type]


def test_operations_and_transactions() -> None:
    assert OpGet(b"a").to_json() == {"key": b64(b"a")}
    assert OpGet(b"a", b"b", revision=5, limit=2, keys_only=True, count_only=True).to_json() == {
        "key": b64(b"a"),
        "range_end": b64(b"b"),
        "revision": "5",
        "limit": "2",
        "keys_only": True,
        "count_only": True,
    }
    assert OpPut(b"a", b"", lease=9, prev_kv=True).to_json() == {
        "key": b64(b"a"),
        "value": "",
        "lease": "9",
        "prev_kv": True,
    }
    assert OpDelete(b"a", b"b").to_txn() == {
        "request_delete_range": {"key": b64(b"a"), "range_end": b64(b"b")}
    }
    body = txn_request([Compare.version(b"k", "==", 0)], [OpPut(b"k", b"v")], [OpGet(b"k")])
    assert body["success"] == [{"request_put": {"key": b64(b"k"), "value": b64(b"v")}}]
    assert body["failure"] == [{"request_range": {"key": b64(b"k")}}]
    json.dumps(body)  # plain JSON
    assert watch_request(b"p", b"q", start_revision=3, prev_kv=True) == {
        "create_request": {
            "key": b64(b"p"),
            "range_end": b64(b"q"),
            "start_revision": "3",
            "prev_kv": True,
        }
    }


def test_replies_restore_the_fields_the_gateway_leaves_out() -> None:
    # a missing key: no kvs, no count
    empty = RangeResult.decode({"header": HEADER})
    assert empty == RangeResult((), 0, False, 42)
    kv = KeyValue.decode({"key": b64(b"k"), "create_revision": "5", "mod_revision": "6"})
    assert kv == KeyValue(b"k", b"", 5, 6, 0, 0)  # empty value, no lease, version 0
    # a failed txn has no "succeeded"; sub-replies have a revision-only header
    txn = TxnResult.decode(
        {
            "header": HEADER,
            "responses": [
                {
                    "response_range": {
                        "header": {"revision": "42"},
                        "kvs": [{"key": b64(b"k"), "value": b64(b"v"), "version": "1"}],
                        "count": "1",
                    }
                },
                {"response_put": {"header": {"revision": "42"}}},
                {"response_delete_range": {"header": {"revision": "42"}, "deleted": "1"}},
            ],
        }
    )
    assert not txn.succeeded and txn.revision == 42
    assert isinstance(txn.responses[0], RangeResult) and txn.responses[0].kvs[0].value == b"v"
    assert txn.responses[1] == PutResult(42)
    assert txn.responses[2] == DeleteResult(1, 42)
    assert TxnResult.decode({"header": HEADER, "succeeded": True}).succeeded
    # lease replies: grant, keepalive (a stream of one result), time-to-live
    assert LeaseStatus.decode({"result": {"header": HEADER, "ID": "7", "TTL": "5"}}).ttl_s == 5
    ttl = LeaseStatus.decode({"header": HEADER, "ID": "7", "TTL": "-1", "keys": [b64(b"x")]})
    assert ttl.ttl_s == -1 and ttl.keys == (b"x",)


@pytest.mark.parametrize(
    "reply",
    [
        {"kvs": "nope"},
        {"kvs": [{"key": "!!!"}]},
        {"header": {"revision": "x"}},
        {"header": {"revision": True}},
        [],
    ],
)
def test_malformed_replies_raise(reply: object) -> None:
    with pytest.raises(MalformedMessage):
        RangeResult.decode(reply)


def test_errors_decode_whatever_the_body() -> None:
    err = decode_error(
        400,
        b'{"error":"etcdserver: key is not provided","message":"etcdserver: key is not provided","code":3}',
    )
    assert (err.code, err.message, err.grpc) == (
        3,
        "etcdserver: key is not provided",
        GrpcCode.INVALID_ARGUMENT,
    )
    assert decode_error(404, b"404 page not found\n").message == "404 page not found"
    assert decode_error(502, b"").message == "HTTP 502"
    assert decode_error(500, b"[1]").code == GrpcCode.UNKNOWN


STREAM = (
    b'{"result":{"header":{"revision":"4"},"created":true}}\n'
    b'{"result":{"header":{"revision":"5"},"events":[{"kv":{"key":"'
    + b64(b"k").encode()
    + b'","mod_revision":"5","value":"'
    + b64(b"v").encode()
    + b'"}},{"type":"DELETE","kv":{"key":"'
    + b64(b"j").encode()
    + b'","mod_revision":"5"}}]}}\n'
    b'{"result":{"header":{"revision":"9"},"canceled":true,"compact_revision":"7"}}\n'
)


def _decode_all(chunks: list[bytes]) -> list[WatchResponse]:
    decoder = StreamDecoder()
    out = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (obj := decoder.next()) is not None:
            msg = decode_watch_message(obj)
            assert isinstance(msg, WatchResponse)
            out.append(msg)
    assert decoder.buffered == 0
    return out


def test_watch_stream_in_any_chunking() -> None:
    whole = _decode_all([STREAM])
    assert _decode_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == whole
    created, events, canceled = whole
    assert created.created and created.revision == 4
    assert [(e.type, e.kv.key, e.kv.mod_revision) for e in events.events] == [
        ("PUT", b"k", 5),
        ("DELETE", b"j", 5),
    ]
    assert canceled.canceled and canceled.compact_revision == 7


def test_watch_stream_trailing_partial_message_waits() -> None:
    decoder = StreamDecoder()
    decoder.feed(STREAM + b'{"result":{"head')
    assert sum(1 for _ in iter(decoder.next, None)) == 3
    assert decoder.buffered == len(b'{"result":{"head')


def test_watch_stream_errors() -> None:
    decoder = StreamDecoder()
    decoder.feed(b"not json\n")
    with pytest.raises(MalformedMessage):
        decoder.next()
    small = StreamDecoder(max_bytes=10)
    with pytest.raises(MalformedMessage, match="exceeds"):
        small.feed(b"x" * 11)
    err = decode_watch_message({"error": {"grpc_code": 14, "message": "no leader", "code": 14}})
    assert not isinstance(err, WatchResponse) and err.code == GrpcCode.UNAVAILABLE


def test_the_wire_modules_are_sans_io() -> None:
    from pathlib import Path

    import pymooncake._etcd._endpoints as endpoints
    import pymooncake._etcd._stream as stream
    import pymooncake._etcd._wire as wire

    for module in (wire, stream, endpoints):
        text = Path(module.__file__ or "").read_text()
        for imp in ("import socket", "import http", "import threading", "import asyncio"):
            assert imp not in text, (module.__name__, imp)
